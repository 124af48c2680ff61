"""Skeleton drawings: the 19 COCO limbs over the original image, a split's predictions drawn on its
images, and grids of them for reports."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np

from distpose.data.shards import SampleError, decode_image, parse_sample, read_manifest, readable_samples
from distpose.errors import UserError
from distpose.eval.inference import Predictions
from distpose.files import atomic_write_bytes, join
from distpose.keypoints import LEFT_JOINTS, RIGHT_JOINTS, SKELETON

log = logging.getLogger(__name__)

# BGR. The person's left side warm, right side cool, the centre line (face, shoulders, hips) green.
LEFT_COLOUR, RIGHT_COLOUR, CENTRE_COLOUR = (0, 128, 255), (255, 128, 0), (0, 200, 0)
DRAWN_MIN_SCORE = 0.1  # joints less confident than this are left out of drawings


def limb_colour(a: int, b: int) -> tuple[int, int, int]:
    if {a, b} <= LEFT_JOINTS:
        return LEFT_COLOUR
    if {a, b} <= RIGHT_JOINTS:
        return RIGHT_COLOUR
    return CENTRE_COLOUR


def draw_skeletons(image: np.ndarray, people: np.ndarray, min_score: float = 0.0) -> np.ndarray:
    """A copy of `image` (BGR) with each person's skeleton. people [N, K, 3]: x, y, and a visibility
    flag or score; joints at or below `min_score` are not drawn, nor limbs touching them."""
    canvas = image.copy()
    thickness = max(2, round(min(image.shape[:2]) / 200))
    for person in np.asarray(people, dtype=np.float64):
        shown = person[:, 2] > min_score
        points = np.rint(person[:, :2]).astype(int)
        for a, b in SKELETON:
            if shown[a] and shown[b]:
                cv2.line(canvas, tuple(points[a]), tuple(points[b]), limb_colour(a, b), thickness, cv2.LINE_AA)
        for k in np.flatnonzero(shown):
            colour = LEFT_COLOUR if k in LEFT_JOINTS else RIGHT_COLOUR if k in RIGHT_JOINTS else CENTRE_COLOUR
            cv2.circle(canvas, tuple(points[k]), thickness + 1, colour, -1, cv2.LINE_AA)
    return canvas


def grid(images: Sequence[np.ndarray], columns: int = 4, cell: tuple[int, int] = (240, 320)) -> np.ndarray:
    """Tile images, each letterboxed into a cell of (height, width), row by row."""
    if not images:
        raise UserError("no images to put in a grid")
    ch, cw = cell
    rows = -(-len(images) // columns)
    sheet = np.full((rows * ch, min(columns, len(images)) * cw, 3), 255, np.uint8)
    for i, img in enumerate(images):
        scale = min(ch / img.shape[0], cw / img.shape[1])
        h, w = max(1, round(img.shape[0] * scale)), max(1, round(img.shape[1] * scale))
        y, x = (i // columns) * ch + (ch - h) // 2, (i % columns) * cw + (cw - w) // 2
        sheet[y:y + h, x:x + w] = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
    return sheet


def save_image(path: str | Path, image: np.ndarray, jpeg_quality: int = 92) -> Path:
    """PNG or JPEG by the file's extension, written atomically."""
    path = Path(path)
    ext = path.suffix.lower()
    if ext not in (".png", ".jpg", ".jpeg"):
        raise UserError(f"{path}: drawings are written as .png or .jpg, not {ext or 'no extension'}")
    params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality] if ext != ".png" else []
    ok, data = cv2.imencode(ext, image, params)
    if not ok:
        raise UserError(f"{path}: could not encode the image")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, data.tobytes())
    return path


def draw_predictions(shards: str, split: str, predictions: Predictions, out_dir: Path, max_images: int = 12
                     ) -> Path | None:
    """Predicted skeletons on the first `max_images` images of the split that have predictions:
    one JPEG each under out_dir/images/ and out_dir/skeletons.jpg, the grid of them."""
    by_image: dict[int, list[int]] = {}
    for i, image_id in enumerate(predictions.image_ids.tolist()):
        by_image.setdefault(int(image_id), []).append(i)
    drawn = []
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    for shard in read_manifest(shards, split)["shards"]:
        for raw in readable_samples(join(shards, shard["name"]), "drawing"):
            try:  # a corrupt sample is skipped here as the evaluation skipped it
                sample = parse_sample(raw)
                if sample.image_id not in by_image:
                    continue
                image = decode_image(sample)  # BGR, as drawing and saving expect
            except SampleError as exc:
                log.warning("drawing: skipped %s", exc)
                continue
            rows = by_image[sample.image_id]
            people = np.concatenate([predictions.keypoints[rows], predictions.scores[rows][..., None]], axis=-1)
            drawing = draw_skeletons(image, people, DRAWN_MIN_SCORE)
            save_image(out_dir / "images" / f"{sample.image_id:012d}.jpg", drawing)
            drawn.append(drawing)
            if len(drawn) == max_images:
                return save_image(out_dir / "skeletons.jpg", grid(drawn))
    return save_image(out_dir / "skeletons.jpg", grid(drawn)) if drawn else None
