"""Reading COCO person-keypoint annotations, checked field by field.

Structural problems (missing fields, wrong types, wrong keypoint counts) raise DataError naming
the file, the record and the field. Data-quality problems that real COCO files can contain are
repaired and counted instead: an instance with a zero or negative box is dropped, a labelled
keypoint outside its image is unlabelled (v=0).
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from distpose.errors import DataError, UserError
from distpose.keypoints import NUM_JOINTS

PERSON_CATEGORY_ID = 1


@dataclass
class Person:
    id: int
    bbox: list[float]  # x, y, w, h in image pixels
    keypoints: list[float]  # 17 x (x, y, v)
    num_keypoints: int
    area: float
    iscrowd: int

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "bbox": self.bbox, "keypoints": self.keypoints,
            "num_keypoints": self.num_keypoints, "area": self.area, "iscrowd": self.iscrowd,
        }

    @property
    def usable(self) -> bool:
        """Trainable and scored by COCO eval: labelled joints and not a crowd region."""
        return self.num_keypoints > 0 and not self.iscrowd


def usable_annotations(ground_truth: dict[str, Any]) -> list[dict[str, Any]]:
    """The person annotations of COCO content that training uses and COCO eval scores (Person.usable)."""
    return [a for a in ground_truth["annotations"] if a["num_keypoints"] > 0 and not a["iscrowd"]]


@dataclass
class ImageRecord:
    id: int
    file_name: str
    width: int
    height: int
    persons: list[Person] = field(default_factory=list)


@dataclass
class CocoSplit:
    annotation_file: Path
    image_dir: Path
    images: list[ImageRecord]
    repairs: Counter  # what was dropped or unlabelled while reading, by reason


def _number(value: Any) -> bool:
    # Not bool (JSON true/false), and not NaN or Infinity, which Python's json module accepts.
    return type(value) in (int, float) and math.isfinite(value)


def check_person(raw: Any, width: int, height: int, where: str) -> tuple[Person | None, Counter]:
    """Validate one annotation dict. Returns the person (None if dropped) and the repairs made.

    Raises DataError (naming `where` and the field) for records no repair can save.
    """
    if not isinstance(raw, dict):
        raise DataError(f"{where}: annotation is {type(raw).__name__}, expected an object")
    repairs: Counter = Counter()
    for key in ("id", "bbox", "keypoints"):
        if key not in raw:
            raise DataError(f"{where}: annotation lacks field '{key}'")
    ann_id = raw["id"]
    if not isinstance(ann_id, int) or isinstance(ann_id, bool):
        raise DataError(f"{where}: annotation field 'id' is {ann_id!r}, expected an integer")
    where = f"{where} annotation {ann_id}"
    kps = raw["keypoints"]
    if not isinstance(kps, list) or len(kps) != 3 * NUM_JOINTS:
        count = len(kps) if isinstance(kps, list) else type(kps).__name__
        raise DataError(f"{where}: field 'keypoints' has {count} values, expected {3 * NUM_JOINTS} numbers")
    if not all(_number(v) for v in kps):
        bad = next(v for v in kps if not _number(v))
        raise DataError(f"{where}: field 'keypoints' holds {bad!r}, expected finite numbers")
    bbox = raw["bbox"]
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_number(v) for v in bbox):
        raise DataError(f"{where}: field 'bbox' is {bbox!r}, expected [x, y, w, h] finite numbers")
    iscrowd = raw.get("iscrowd", 0)
    if iscrowd not in (0, 1):
        raise DataError(f"{where}: field 'iscrowd' is {iscrowd!r}, expected 0 or 1")
    area = raw.get("area", float(bbox[2] * bbox[3]))
    if not _number(area):
        raise DataError(f"{where}: field 'area' is {area!r}, expected a number")

    # Clip the box to the image as HRNet does; nothing left means an unusable box.
    x0, y0 = max(0.0, float(bbox[0])), max(0.0, float(bbox[1]))
    x1 = min(float(width - 1), float(bbox[0]) + max(0.0, float(bbox[2] - 1)))
    y1 = min(float(height - 1), float(bbox[1]) + max(0.0, float(bbox[3] - 1)))
    if bbox[2] <= 0 or bbox[3] <= 0 or x1 < x0 or y1 < y0:
        repairs["instance dropped: zero or negative box"] += 1
        return None, repairs

    # Vectorised: this runs for every person of every image the loader reads.
    joints = np.array(kps, dtype=np.float64).reshape(NUM_JOINTS, 3)
    x, y, v = joints.T
    bad = np.flatnonzero((v != 0) & (v != 1) & (v != 2))
    if bad.size:
        raise DataError(f"{where}: keypoint {bad[0]} has visibility {kps[3 * bad[0] + 2]!r}, expected 0, 1 or 2")
    outside = (v > 0) & ~((x >= 0) & (x < width) & (y >= 0) & (y < height))
    if outside.any():
        repairs["keypoint unlabelled: outside the image"] += int(outside.sum())
    joints[(v == 0) | outside] = 0.0
    person = Person(
        id=ann_id, bbox=[x0, y0, x1 - x0 + 1, y1 - y0 + 1], keypoints=joints.ravel().tolist(),
        num_keypoints=int(np.count_nonzero(joints[:, 2])), area=float(area), iscrowd=int(iscrowd),
    )
    return person, repairs


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: malformed JSON ({exc})") from None


def annotation_path(root: Path, split: str) -> Path:
    return Path(root) / "annotations" / f"person_keypoints_{split}.json"


def load_split(root: str | Path, split: str) -> CocoSplit:
    """Read `root/annotations/person_keypoints_<split>.json`, validating every person annotation."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"COCO root {root} is not a directory")
    ann_file = annotation_path(root, split)
    image_dir = root / split
    if not ann_file.is_file():
        raise DataError(f"{ann_file}: annotation file not found (expected the official COCO layout)")
    if not image_dir.is_dir():
        raise DataError(f"{image_dir}: image directory not found (expected the official COCO layout)")
    doc = _read_json(ann_file)
    if not isinstance(doc, dict) or not isinstance(doc.get("images"), list):
        raise DataError(f"{ann_file}: expected an object with an 'images' list")
    if not isinstance(doc.get("annotations"), list):
        raise DataError(f"{ann_file}: expected an 'annotations' list")

    images: dict[int, ImageRecord] = {}
    for raw in doc["images"]:
        try:
            rec = ImageRecord(int(raw["id"]), str(raw["file_name"]), int(raw["width"]), int(raw["height"]))
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{ann_file}: image record {raw!r:.80} lacks id, file_name, width or height") from None
        if rec.width <= 0 or rec.height <= 0:
            raise DataError(f"{ann_file}: image {rec.id} has size {rec.width}x{rec.height}")
        if rec.id in images:
            raise DataError(f"{ann_file}: image id {rec.id} appears twice ({images[rec.id].file_name}, "
                            f"{rec.file_name})")
        images[rec.id] = rec

    repairs: Counter = Counter()
    for raw in doc["annotations"]:
        if isinstance(raw, dict) and raw.get("category_id", PERSON_CATEGORY_ID) != PERSON_CATEGORY_ID:
            continue
        image_id = raw.get("image_id") if isinstance(raw, dict) else None
        if not isinstance(image_id, int) or image_id not in images:
            raise DataError(f"{ann_file}: annotation {raw.get('id') if isinstance(raw, dict) else raw!r:.40} "
                            f"refers to image_id {image_id!r}, which is not in 'images'")
        img = images[image_id]
        person, fixes = check_person(raw, img.width, img.height, str(ann_file))
        repairs.update(fixes)
        if person is not None:
            img.persons.append(person)
    ordered = sorted(images.values(), key=lambda r: r.id)
    return CocoSplit(annotation_file=ann_file, image_dir=image_dir, images=ordered, repairs=repairs)


@dataclass(frozen=True)
class Detection:
    """A person-detector box (COCO results format) to run the pose model on."""

    bbox: tuple[float, float, float, float]  # x, y, w, h in image pixels
    score: float
    index: int  # position in the detections file: the instance id of what is predicted from it


def load_detections(path: str | Path, min_score: float = 0.0) -> dict[int, list[Detection]]:
    """Person boxes by image id from a COCO-results JSON (a list of {image_id, category_id, bbox, score}).

    Non-person categories, boxes scoring below `min_score`, and empty boxes are left out.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"detections file {path} does not exist")
    doc = _read_json(path)
    if not isinstance(doc, list):
        raise DataError(f"{path}: expected a list of detections (COCO results format), got {type(doc).__name__}")
    boxes: dict[int, list[Detection]] = {}
    for index, raw in enumerate(doc):
        if not isinstance(raw, dict):
            raise DataError(f"{path}: detection {index} is {type(raw).__name__}, expected an object")
        image_id, bbox, score = raw.get("image_id"), raw.get("bbox"), raw.get("score")
        if not isinstance(image_id, int) or isinstance(image_id, bool):
            raise DataError(f"{path}: detection {index} field 'image_id' is {image_id!r}, expected an integer")
        if not isinstance(bbox, list) or len(bbox) != 4 or not all(_number(v) for v in bbox):
            raise DataError(f"{path}: detection {index} field 'bbox' is {bbox!r}, expected [x, y, w, h] numbers")
        if not _number(score):
            raise DataError(f"{path}: detection {index} field 'score' is {score!r}, expected a number")
        if raw.get("category_id", PERSON_CATEGORY_ID) != PERSON_CATEGORY_ID or score < min_score:
            continue
        if bbox[2] > 0 and bbox[3] > 0:
            boxes.setdefault(image_id, []).append(Detection(tuple(float(v) for v in bbox), float(score), index))
    return boxes
