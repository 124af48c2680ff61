"""Synthetic person-keypoint dataset in the official COCO layout: the embedded default, no download.

Every image holds one to four articulated figures (head, torso, capsule limbs) drawn with OpenCV
over a cluttered background. The annotation files follow the COCO keypoint format, so the same
loaders, `pycocotools.coco.COCO` and `COCOeval(..., "keypoints")` work on them as on COCO itself::

    out/annotations/person_keypoints_{train,val}.json
    out/{train,val}/<12-digit image id>.jpg

Conventions, chosen to match real COCO photos:

* Left and right are the *person's* sides. A front-facing person (about 80%) shows its left
  joints on the image right; a back-facing one shows them on the image left, and its face is
  hidden, so nose and eyes are unlabelled (v=0) while the ears stay labelled.
* Left limbs and the left eye/ear are drawn in warm hues (red to yellow), right ones in cool hues
  (green to blue), each person with its own shades. Real photos tell the sides apart by faces
  and body shape; these figures have neither, so colour is the cue that keeps the task solvable.
* Visibility: v=2 visible; v=1 inside the image but covered by a person drawn later or by an
  occluder shape; v=0 outside the image or a face joint of a back-facing person, with x=y=0.
  A person's own limbs never make its joints v=1 (COCO annotators label those visible too).
* Determinism: each image has its own `numpy.random.Generator` seeded from (seed, split, index),
  so the files are byte-identical for the same seed and counts whatever the number of workers.
"""

from __future__ import annotations

import colorsys
import json
import logging
import math
import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from distpose.errors import UserError
from distpose.files import atomic_write_bytes
from distpose.keypoints import INDEX, LEFT_JOINTS, NUM_JOINTS, person_category

SPLITS = ("train", "val")
# Val image ids start above this, so image ids are unique across both splits.
VAL_ID_OFFSET = 1_000_000
# Annotation id = image id * 10 + slot: unique, and independent of every other image.
ANN_IDS_PER_IMAGE = 10
MAX_PEOPLE = 4

# (width, height) of common photo shapes, landscape and portrait.
IMAGE_SIZES = ((640, 480), (480, 640), (512, 384), (384, 512), (640, 427), (427, 640))
JPEG_PARAMS = [cv2.IMWRITE_JPEG_QUALITY, 90]
CC0_URL = "https://creativecommons.org/publicdomain/zero/1.0/"

# cv2 fixed-point coordinates: 4 fractional bits place anti-aliased shapes at sub-pixel positions.
SHIFT = 4
FIXED_ONE = 1 << SHIFT

BACK_FACING_PROB = 0.2
OCCLUDER_PROB = 0.35
NEAR_PREVIOUS_PROB = 0.5  # a later person is placed next to the previous one, so people overlap
INSIDE_PROB = 0.8  # otherwise a person may stand partly outside the frame
MIN_PERSON_HEIGHT = 60.0
MAX_PERSON_HEIGHT_FRACTION = 0.9

# Body proportions in units of the person height H (pelvis-centred, y pointing down).
NECK_TO_PELVIS = 0.30
SHOULDER_HALF_WIDTH = 0.11
HIP_HALF_WIDTH = 0.07
NECK_TO_HEAD = 0.11
HEAD_RADIUS = 0.065
UPPER_ARM, FOREARM, THIGH, SHIN = 0.17, 0.15, 0.24, 0.23
# Capsule thicknesses, also in units of H.
UPPER_ARM_T, FOREARM_T, THIGH_T, SHIN_T, NECK_T = 0.05, 0.042, 0.075, 0.06, 0.05
EYE_R, EAR_R, NOSE_R = 0.011, 0.015, 0.011

# Hue families in degrees; with any saturation > 0, warm gives red > blue and cool blue > red.
WARM_HUES = (-15.0, 50.0)
COOL_HUES = (140.0, 250.0)
SKIN_TONES_RGB = ((255, 224, 189), (234, 192, 134), (224, 172, 105), (198, 134, 66), (141, 85, 36))
HAIR_RGB = ((20, 15, 10), (60, 40, 25), (110, 75, 40), (190, 160, 110), (120, 120, 120))

FACE_JOINTS = (INDEX["nose"], INDEX["left_eye"], INDEX["right_eye"])
# (shoulder, elbow, wrist) and (hip, knee, ankle) per side.
SIDES = ("left", "right")
ARMS = {side: tuple(INDEX[f"{side}_{j}"] for j in ("shoulder", "elbow", "wrist")) for side in SIDES}
LEGS = {side: tuple(INDEX[f"{side}_{j}"] for j in ("hip", "knee", "ankle")) for side in SIDES}
TORSO = tuple(INDEX[n] for n in ("left_shoulder", "right_shoulder", "right_hip", "left_hip"))

BGR = tuple[int, int, int]


@dataclass(frozen=True)
class Pose:
    """Body configuration in the person's own frame; angles in radians, per side (left, right)."""

    front: bool
    body_rotation: float
    head_tilt: float
    head_yaw: float  # -1..1: how far the face points turn sideways
    shoulder: tuple[float, float]  # 0 = arm hanging, positive = raised away from the body
    elbow: tuple[float, float]  # signed flexion: the forearm turns outward (+) or inward (-)
    hip: tuple[float, float]  # 0 = leg straight down, positive = spread outward
    knee: tuple[float, float]  # signed flexion, like the elbow
    torso_scale: float
    width_scale: float
    arm_scale: float
    leg_scale: float


@dataclass(frozen=True)
class Colours:
    skin: BGR
    hair: BGR
    torso: BGR
    left_arm: BGR
    left_leg: BGR
    right_arm: BGR
    right_leg: BGR


@dataclass(frozen=True)
class Person:
    joints: np.ndarray  # (17, 2) image coordinates, rounded to 2 decimals like the annotation
    head: np.ndarray  # (2,) head centre
    height: float  # H in pixels
    front: bool
    head_angle: float  # degrees, for the head ellipse
    colours: Colours


def sample_pose(rng: np.random.Generator) -> Pose:
    """Joint angles from plausible ranges, left and right independent."""
    rotation = rng.normal(0.0, 20.0)
    if rng.random() < 0.1:  # the occasional strongly leaning or lying person
        rotation = rng.normal(0.0, 60.0)
    elbow_sign, knee_sign = rng.choice((-1.0, 1.0), size=(2, 2))
    scales = rng.uniform(0.92, 1.08, size=4)  # per-person proportions
    return Pose(
        front=bool(rng.random() >= BACK_FACING_PROB),
        body_rotation=math.radians(float(np.clip(rotation, -90.0, 90.0))),
        head_tilt=math.radians(rng.normal(0.0, 10.0)),
        head_yaw=float(rng.uniform(-1.0, 1.0)),
        shoulder=_radians_pair(rng.uniform(-30.0, 160.0, size=2)),
        elbow=_radians_pair(rng.uniform(0.0, 140.0, size=2) * elbow_sign),
        hip=_radians_pair(rng.uniform(-30.0, 60.0, size=2)),
        knee=_radians_pair(rng.uniform(0.0, 120.0, size=2) * knee_sign),
        torso_scale=float(scales[0]),
        width_scale=float(scales[1]),
        arm_scale=float(scales[2]),
        leg_scale=float(scales[3]),
    )


def _radians_pair(degrees: np.ndarray) -> tuple[float, float]:
    return math.radians(float(degrees[0])), math.radians(float(degrees[1]))


def _limb_direction(angle: float, outward: float) -> np.ndarray:
    """Unit vector: angle 0 points down, positive angles turn towards image-x sign `outward`."""
    return np.array([outward * math.sin(angle), math.cos(angle)])


def _rotation(angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    return np.array([[c, -s], [s, c]])


def joint_positions(pose: Pose, height: float, pelvis: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 17 COCO joints and the head centre in image coordinates.

    Built in the person's frame (origin at the pelvis, units of H, y down), then rotated about
    the pelvis, scaled to `height` pixels and moved to `pelvis`.
    """
    # Image-x sign of the person's left side: front-facing people show their left on image right.
    left_x = 1.0 if pose.front else -1.0
    p = np.zeros((NUM_JOINTS, 2))
    neck = np.array([0.0, -NECK_TO_PELVIS * pose.torso_scale])
    # Head and face points in the tilted head frame; yaw slides the face points sideways as a
    # turning face would.
    face = _rotation(pose.head_tilt)
    head = neck + face @ np.array([0.0, -NECK_TO_HEAD])
    yaw = pose.head_yaw
    p[INDEX["nose"]] = head + face @ np.array([0.03 * yaw, 0.015])
    for side, sign in zip(SIDES, (left_x, -left_x)):
        p[INDEX[f"{side}_eye"]] = head + face @ np.array([sign * 0.028 + 0.03 * yaw, -0.012])
        p[INDEX[f"{side}_ear"]] = head + face @ np.array([sign * 0.06 + 0.01 * yaw, 0.005])

    for k, (side, sign) in enumerate(zip(SIDES, (left_x, -left_x))):
        shoulder, elbow, wrist = ARMS[side]
        p[shoulder] = neck + np.array([sign * SHOULDER_HALF_WIDTH * pose.width_scale, 0.0])
        p[elbow] = p[shoulder] + UPPER_ARM * pose.arm_scale * _limb_direction(pose.shoulder[k], sign)
        forearm_angle = pose.shoulder[k] + pose.elbow[k]
        p[wrist] = p[elbow] + FOREARM * pose.arm_scale * _limb_direction(forearm_angle, sign)

        hip, knee, ankle = LEGS[side]
        p[hip] = np.array([sign * HIP_HALF_WIDTH * pose.width_scale, 0.0])
        p[knee] = p[hip] + THIGH * pose.leg_scale * _limb_direction(pose.hip[k], sign)
        # Keep the shin from pointing upwards: in a 2D view a bent knee mostly shortens the leg.
        shin_angle = float(np.clip(pose.hip[k] + pose.knee[k], -math.pi / 3, math.radians(100)))
        p[ankle] = p[knee] + SHIN * pose.leg_scale * _limb_direction(shin_angle, sign)

    body = _rotation(pose.body_rotation) * height
    return np.round(p @ body.T + pelvis, 2), head @ body.T + pelvis


def _hue_colour(rng: np.random.Generator, hues: tuple[float, float]) -> BGR:
    hue = rng.uniform(*hues) % 360.0
    r, g, b = colorsys.hsv_to_rgb(hue / 360.0, rng.uniform(0.55, 1.0), rng.uniform(0.55, 1.0))
    return round(b * 255), round(g * 255), round(r * 255)


def _palette_colour(rng: np.random.Generator, palette: tuple[tuple[int, int, int], ...]) -> BGR:
    r, g, b = np.clip(np.array(palette[rng.integers(len(palette))]) + rng.integers(-15, 16, size=3), 0, 255)
    return int(b), int(g), int(r)


def _random_colour(rng: np.random.Generator) -> BGR:
    b, g, r = rng.integers(0, 256, size=3)
    return int(b), int(g), int(r)


def sample_colours(rng: np.random.Generator) -> Colours:
    return Colours(
        skin=_palette_colour(rng, SKIN_TONES_RGB),
        hair=_palette_colour(rng, HAIR_RGB),
        torso=_random_colour(rng),
        left_arm=_hue_colour(rng, WARM_HUES),
        left_leg=_hue_colour(rng, WARM_HUES),
        right_arm=_hue_colour(rng, COOL_HUES),
        right_leg=_hue_colour(rng, COOL_HUES),
    )


def sample_people(rng: np.random.Generator, width: int, height: int) -> list[Person]:
    """One to four people, returned in drawing order (smaller, i.e. farther, people first)."""
    people: list[Person] = []
    pelvises: list[np.ndarray] = []
    max_height = MAX_PERSON_HEIGHT_FRACTION * height
    size = np.array([width, height], dtype=float)
    for k in range(int(rng.integers(1, MAX_PEOPLE + 1))):
        pose = sample_pose(rng)
        h = float(np.exp(rng.uniform(math.log(MIN_PERSON_HEIGHT), math.log(max_height))))
        local, _ = joint_positions(pose, h, np.zeros(2))
        margin = 0.08 * h  # head radius and limb thickness around the joints
        lo, hi = local.min(axis=0) - margin, local.max(axis=0) + margin

        if k > 0 and rng.random() < NEAR_PREVIOUS_PROB:
            pelvis = pelvises[-1] + rng.normal(0.0, [0.3 * h, 0.1 * h])
        elif rng.random() < INSIDE_PROB and np.all(hi - lo <= size):
            pelvis = rng.uniform(-lo, size - hi)
        else:
            pelvis = rng.uniform((0.0, 0.0), size)
        # A pelvis inside the frame keeps at least part of every person in the picture.
        pelvis = np.clip(pelvis, 0.0, size - 1.0)
        pelvises.append(pelvis)

        joints, head = joint_positions(pose, h, pelvis)
        angle = math.degrees(pose.body_rotation + pose.head_tilt)
        people.append(Person(joints, head, h, pose.front, angle, sample_colours(rng)))
    # Stable sort: equal heights keep their sampling order, so the result is deterministic.
    return sorted(people, key=lambda person: person.height)


def _fixed(point: np.ndarray) -> tuple[int, int]:
    return round(float(point[0]) * FIXED_ONE), round(float(point[1]) * FIXED_ONE)


def _thickness(person: Person, fraction: float) -> int:
    return max(2, round(fraction * person.height))


def _dot_radius(person: Person, fraction: float) -> int:
    return max(FIXED_ONE, round(fraction * person.height * FIXED_ONE))


def draw_person(canvas: np.ndarray, person: Person, mask_value: int | None = None) -> None:
    """Draws the figure anti-aliased in its colours, or, with `mask_value`, its filled silhouette.

    Both go through the same calls so that the silhouette matches the rendered pixels.
    """
    line_type = cv2.LINE_AA if mask_value is None else cv2.LINE_8

    def paint(colour: BGR) -> BGR | int:
        return colour if mask_value is None else mask_value

    def capsule(a: np.ndarray, b: np.ndarray, fraction: float, colour: BGR) -> None:
        thickness = _thickness(person, fraction)
        cv2.line(canvas, _fixed(a), _fixed(b), paint(colour), thickness, line_type, SHIFT)

    def dot(joint: int, fraction: float, colour: BGR) -> None:
        center = _fixed(person.joints[joint])
        cv2.circle(canvas, center, _dot_radius(person, fraction), paint(colour), -1, line_type, SHIFT)

    c = person.colours
    j = person.joints
    # Right side first, so where limbs cross the left one is on top; either order would do.
    for side, colour in (("right", c.right_leg), ("left", c.left_leg)):
        hip, knee, ankle = LEGS[side]
        capsule(j[hip], j[knee], THIGH_T, colour)
        capsule(j[knee], j[ankle], SHIN_T, colour)

    torso = np.array([_fixed(j[k]) for k in TORSO], dtype=np.int32)
    cv2.fillPoly(canvas, [torso], paint(c.torso), line_type, SHIFT)
    capsule((j[INDEX["left_shoulder"]] + j[INDEX["right_shoulder"]]) / 2, person.head, NECK_T, c.skin)

    # A back-facing head shows hair, not a face.
    radius = HEAD_RADIUS * person.height * FIXED_ONE
    axes = (max(FIXED_ONE, round(0.85 * radius)), max(FIXED_ONE, round(radius)))
    head_colour = c.skin if person.front else c.hair
    centre = _fixed(person.head)
    cv2.ellipse(canvas, centre, axes, person.head_angle, 0, 360, paint(head_colour), -1, line_type, SHIFT)
    if person.front:
        dot(INDEX["nose"], NOSE_R, tuple(int(v * 0.6) for v in c.skin))
    face_dots = [("ear", EAR_R)] + ([("eye", EYE_R)] if person.front else [])
    for part, fraction in face_dots:
        for side in SIDES:
            joint = INDEX[f"{side}_{part}"]
            dot(joint, fraction, c.left_arm if joint in LEFT_JOINTS else c.right_arm)

    for side, colour in (("right", c.right_arm), ("left", c.left_arm)):
        shoulder, elbow, wrist = ARMS[side]
        capsule(j[shoulder], j[elbow], UPPER_ARM_T, colour)
        capsule(j[elbow], j[wrist], FOREARM_T, colour)


def draw_background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A colour gradient with a noise texture and a few clutter shapes, all from `rng`."""
    # Smooth gradient: a tiny random colour grid, bilinearly upsampled.
    grid = rng.integers(0, 256, size=(int(rng.integers(2, 4)), int(rng.integers(2, 4)), 3), dtype=np.uint8)
    img = cv2.resize(grid, (width, height), interpolation=cv2.INTER_LINEAR)

    # Noise texture at a coarse cell size (cheap, and blotchier than per-pixel noise).
    cell = int(rng.choice((2, 4, 8)))
    amplitude = int(rng.integers(4, 40))
    coarse = (height // cell + 1, width // cell + 1, 3)
    noise = rng.integers(-amplitude, amplitude + 1, size=coarse, dtype=np.int16)
    noise = cv2.resize(noise, (width, height), interpolation=cv2.INTER_NEAREST)
    img = np.clip(img.astype(np.int16) + noise, 0, 255).astype(np.uint8)

    for _ in range(int(rng.integers(2, 10))):
        kind = int(rng.integers(3))
        colour = _random_colour(rng)
        p = _fixed(rng.uniform((0, 0), (width, height)))
        q = _fixed(rng.uniform((0, 0), (width, height)))
        thickness = -1 if rng.random() < 0.5 else int(rng.integers(1, 6))
        if kind == 0:
            cv2.rectangle(img, p, q, colour, thickness, cv2.LINE_AA, SHIFT)
        elif kind == 1:
            axes = (abs(q[0] - p[0]) // 2 + FIXED_ONE, abs(q[1] - p[1]) // 2 + FIXED_ONE)
            angle = float(rng.uniform(0, 180))
            cv2.ellipse(img, p, axes, angle, 0, 360, colour, thickness, cv2.LINE_AA, SHIFT)
        else:
            cv2.line(img, p, q, colour, max(1, thickness), cv2.LINE_AA, SHIFT)
    return img


def draw_occluders(
    rng: np.random.Generator, img: np.ndarray, owner: np.ndarray, people: list[Person]
) -> None:
    """With some probability, 1-3 solid shapes on top of everything, centred near random joints.

    Each is also painted into `owner` with 255, above every person label, so it occludes them all.
    """
    if rng.random() >= OCCLUDER_PROB:
        return
    height, width = owner.shape
    short_side = min(width, height)
    for _ in range(int(rng.integers(1, 4))):
        person = people[int(rng.integers(len(people)))]
        centre = person.joints[int(rng.integers(NUM_JOINTS))] + rng.normal(0.0, 0.1 * person.height, size=2)
        half = rng.uniform(0.03, 0.12, size=2) * short_side
        colour = _random_colour(rng)
        if rng.random() < 0.5:
            p, q = _fixed(centre - half), _fixed(centre + half)
            cv2.rectangle(img, p, q, colour, -1, cv2.LINE_AA, SHIFT)
            cv2.rectangle(owner, p, q, 255, -1, cv2.LINE_8, SHIFT)
        else:
            c, axes, angle = _fixed(centre), _fixed(half), float(rng.uniform(0, 180))
            cv2.ellipse(img, c, axes, angle, 0, 360, colour, -1, cv2.LINE_AA, SHIFT)
            cv2.ellipse(owner, c, axes, angle, 0, 360, 255, -1, cv2.LINE_8, SHIFT)


def visibility(person: Person, label: int, owner: np.ndarray) -> np.ndarray:
    """COCO v flags (17,) for the person painted with `label` into the owner map.

    `owner` holds, per pixel, the label of the top-most thing drawn there (people get 1, 2, ...
    in drawing order, occluders 255), so a joint is covered exactly when a later-drawn person or
    an occluder owns its pixel, i.e. when the owner label there is greater than its own.
    """
    height, width = owner.shape
    x, y = person.joints[:, 0], person.joints[:, 1]
    inside = (x >= 0) & (x <= width - 1) & (y >= 0) & (y <= height - 1)
    v = np.zeros(NUM_JOINTS, dtype=np.int64)
    xi = np.rint(x[inside]).astype(np.int64)
    yi = np.rint(y[inside]).astype(np.int64)
    v[inside] = np.where(owner[yi, xi] > label, 1, 2)
    if not person.front:
        v[list(FACE_JOINTS)] = 0
    return v


def render_image(rng: np.random.Generator) -> tuple[np.ndarray, list[dict]]:
    """One BGR image and its COCO annotations (without ids), all drawn from `rng`."""
    width, height = IMAGE_SIZES[int(rng.integers(len(IMAGE_SIZES)))]
    img = draw_background(rng, width, height)
    people = sample_people(rng, width, height)

    owner = np.zeros((height, width), dtype=np.uint8)
    silhouette = np.empty_like(owner)
    boxes = []
    for label, person in enumerate(people, start=1):
        draw_person(img, person)
        silhouette[:] = 0
        draw_person(silhouette, person, mask_value=1)
        area = cv2.countNonZero(silhouette)
        boxes.append((cv2.boundingRect(silhouette), area))
        np.putmask(owner, silhouette, label)
    draw_occluders(rng, img, owner, people)

    annotations = []
    for label, (person, (box, area)) in enumerate(zip(people, boxes), start=1):
        if area == 0:  # entirely outside the frame: nothing to annotate
            continue
        v = visibility(person, label, owner)
        keypoints: list[float | int] = []
        for (x, y), flag in zip(person.joints.tolist(), v.tolist()):
            keypoints += [x, y, flag] if flag else [0, 0, 0]
        annotations.append(
            {
                "category_id": 1,
                "bbox": [float(b) for b in box],
                "area": float(area),
                "iscrowd": 0,
                "keypoints": keypoints,
                "num_keypoints": int(np.count_nonzero(v)),
            }
        )
    return img, annotations


def _image_id(split: str, index: int) -> int:
    return index + 1 + (VAL_ID_OFFSET if split == "val" else 0)


def _make_image(task: tuple[Path, str, int, int]) -> dict:
    """Renders, encodes and writes one image; returns its COCO image entry and annotations."""
    out, split, index, seed = task
    rng = np.random.default_rng(np.random.SeedSequence([seed, SPLITS.index(split), index]))
    img, annotations = render_image(rng)
    image_id = _image_id(split, index)
    file_name = f"{image_id:012d}.jpg"
    ok, jpeg = cv2.imencode(".jpg", img, JPEG_PARAMS)
    if not ok:
        raise RuntimeError(f"JPEG encoding failed for {split}/{file_name}")
    atomic_write_bytes(out / split / file_name, jpeg.tobytes())
    for slot, ann in enumerate(annotations):
        ann["id"] = image_id * ANN_IDS_PER_IMAGE + slot
        ann["image_id"] = image_id
    height, width = img.shape[:2]
    image = {"id": image_id, "file_name": file_name, "width": width, "height": height, "license": 1}
    return {"image": image, "annotations": annotations}


def _init_worker() -> None:
    # Processes already run in parallel; OpenCV's own threads would only oversubscribe the cores.
    cv2.setNumThreads(1)


def _coco_header(seed: int) -> dict:
    return {
        "info": {
            "description": f"distpose synthetic person keypoints (seed {seed})",
            "version": "1.0",
            "contributor": "distpose",
            "url": "",
        },
        "licenses": [{"id": 1, "name": "CC0 1.0", "url": CC0_URL}],
        "categories": [person_category()],
    }


def _split_summary(images: list[dict], annotations: list[dict]) -> dict:
    flags = np.array([ann["keypoints"][2::3] for ann in annotations], dtype=np.int64).reshape(-1)
    return {
        "images": len(images),
        "instances": len(annotations),
        "instances_with_keypoints": sum(1 for ann in annotations if ann["num_keypoints"] > 0),
        "visible": int(np.count_nonzero(flags == 2)),
        "occluded": int(np.count_nonzero(flags == 1)),
        "unlabelled": int(np.count_nonzero(flags == 0)),
    }


log = logging.getLogger(__name__)


def _existing_set(out: Path, ann_paths: dict[str, Path], counts: dict[str, int], seed: int) -> dict | None:
    """The per-split summary of the set already in `out`, if it is exactly the one asked for (same seed and
    image counts, every image there); else None."""
    summary = {}
    for split, path in ann_paths.items():
        try:
            dataset = json.loads(path.read_bytes())
        except (OSError, ValueError):
            return None
        images = dataset.get("images", [])
        if dataset.get("info") != _coco_header(seed)["info"] or len(images) != counts[split] or \
                not all((out / split / image["file_name"]).is_file() for image in images):
            return None
        summary[split] = _split_summary(images, dataset["annotations"])
    return summary


def generate_synthetic_coco(
    out: Path,
    num_train: int = 1000,
    num_val: int = 100,
    seed: int = 0,
    workers: int = 1,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Writes the synthetic dataset under `out` in the COCO layout; returns per-split counts.

    A set already there with the same seed and counts is kept (nothing to do); another set there is replaced
    only with `overwrite`, else UserError (as for bad counts).
    """
    out = Path(out)
    counts = {"train": num_train, "val": num_val}
    if min(counts.values()) < 0 or seed < 0 or workers < 1:
        raise UserError(f"need counts and seed >= 0, workers >= 1; got {counts}, {seed=}, {workers=}")
    if num_train > VAL_ID_OFFSET:
        raise UserError(f"num_train must be <= {VAL_ID_OFFSET} to keep image ids unique, got {num_train}")
    ann_paths = {split: out / "annotations" / f"person_keypoints_{split}.json" for split in SPLITS}
    there = [path for path in ann_paths.values() if path.exists()]
    if there and not overwrite:
        summary = _existing_set(out, ann_paths, counts, seed)
        if summary is not None:
            log.info("%s already holds this set (seed %d, %d training and %d validation images): nothing to do",
                     out, seed, num_train, num_val)
            return summary
        raise UserError(f"{there[0]} already exists and holds another set than seed {seed} with {num_train} "
                        f"training and {num_val} validation images; pass --overwrite to replace it")

    ann_paths["train"].parent.mkdir(parents=True, exist_ok=True)
    # Spawned workers import only this module, whatever threads or state the caller holds.
    pool = None
    if workers > 1:
        spawn = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(workers, mp_context=spawn, initializer=_init_worker)
    summary = {}
    try:
        for split in SPLITS:
            (out / split).mkdir(parents=True, exist_ok=True)
            tasks = [(out, split, index, seed) for index in range(counts[split])]
            if pool is None:
                results = map(_make_image, tasks)
            else:
                results = pool.map(_make_image, tasks, chunksize=max(1, len(tasks) // (workers * 8)))
            images, annotations = [], []
            # Both maps yield in index order, so the JSON does not depend on `workers`.
            for result in tqdm(results, total=len(tasks), desc=f"synth {split}", unit="img",
                               file=sys.stderr, disable=not progress):
                images.append(result["image"])
                annotations.extend(result["annotations"])
            dataset = {**_coco_header(seed), "images": images, "annotations": annotations}
            atomic_write_bytes(ann_paths[split], json.dumps(dataset, separators=(",", ":")).encode())
            # A regenerated, smaller set must not leave the old set's extra images behind.
            current = {image["file_name"] for image in images}
            for stale in (out / split).glob("*.jpg"):
                if stale.name not in current:
                    stale.unlink()
            summary[split] = _split_summary(images, annotations)
    finally:
        if pool is not None:
            pool.shutdown()
    return summary
