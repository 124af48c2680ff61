"""`distpose predict`: keypoints for image files, from person boxes or from the whole image.

Boxes come from a COCO-results JSON of person detections whose image_id is the image file's number
(COCO's naming: 000000000139.jpg is image 139); without one, each image is a single person box.
Writes COCO keypoint results and one drawing per image.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from distpose.data.coco import Detection, load_detections
from distpose.data.codec import HeatmapCodec
from distpose.data.shards import decode_jpeg, jpeg_problem
from distpose.data.transforms import TopDownTransform
from distpose.errors import UserError
from distpose.eval.coco_eval import coco_results
from distpose.eval.draw import DRAWN_MIN_SCORE, draw_skeletons, save_image
from distpose.eval.inference import Predictions, model_maps, predict
from distpose.files import atomic_write_bytes
from distpose.keypoints import NUM_JOINTS

log = logging.getLogger(__name__)


def image_id_of(path: Path) -> int | None:
    return int(path.stem) if path.stem.isdigit() else None


def _batch(image: np.ndarray, image_id: int, boxes: list[Detection], transform: TopDownTransform
           ) -> dict[str, torch.Tensor]:
    crops = [transform(image, list(d.bbox), np.zeros((NUM_JOINTS, 3))) for d in boxes]
    return {
        "image": torch.from_numpy(np.stack([c.image for c in crops])),
        "image_to_crop": torch.from_numpy(np.stack([c.image_to_crop for c in crops])),
        "score": torch.tensor([d.score for d in boxes], dtype=torch.float32),
        "image_id": torch.full((len(boxes),), image_id, dtype=torch.int64),
        "instance_id": torch.tensor([d.index for d in boxes], dtype=torch.int64),
        "bbox": torch.tensor([list(d.bbox) for d in boxes], dtype=torch.float32),
        "area": torch.tensor([d.bbox[2] * d.bbox[3] for d in boxes], dtype=torch.float32),
        "keypoints": torch.zeros(len(boxes), NUM_JOINTS, 3),
    }


def predict_images(checkpoint: str, images: list[str], out_dir: Path, boxes_file: str | None = None,
                   min_box_score: float = 0.0) -> dict[str, Any]:
    """Predict every image; returns counts (images, people, skipped). Unreadable images are skipped,
    named in the log and counted."""
    from distpose.models.model_file import load_model_file

    model, cfg, _ = load_model_file(checkpoint)
    detections = load_detections(boxes_file, min_box_score) if boxes_file else None
    transform = TopDownTransform(cfg.data.input_size, cfg.data.box_padding)
    codec = HeatmapCodec(cfg.data.input_size, cfg.data.heatmap_size, cfg.data.sigma)
    maps = model_maps(model, cfg.eval.flip_test)
    out_dir.mkdir(parents=True, exist_ok=True)
    parts, skipped, people = [], [], 0
    paths = image_files(images)
    for number, path in enumerate(paths):
        image, problem = read_image(path)
        if problem:
            log.warning("skipped %s: %s", path, problem)
            skipped.append(str(path))
            continue
        image_id = image_id_of(path)
        if detections is not None:
            if image_id is None:
                raise UserError(f"{path}: with --boxes, image file names must be COCO image ids "
                                "(e.g. 000000000139.jpg)")
            boxes = detections.get(image_id, [])
        else:
            h, w = image.shape[:2]
            boxes = [Detection((0.0, 0.0, float(w), float(h)), 1.0, 0)]
        image_id = number if image_id is None else image_id
        drawing = image
        if boxes:
            found = predict([_batch(image, image_id, boxes, transform)], maps, codec)
            parts.append(found)
            people += len(found)
            drawing = draw_skeletons(image, np.concatenate([found.keypoints, found.scores[..., None]], -1),
                                     DRAWN_MIN_SCORE)
        save_image(out_dir / f"{path.stem}.jpg", drawing)
    results = coco_results(Predictions.concat(parts), nms_threshold=0.9 if detections else None) if parts else []
    atomic_write_bytes(out_dir / "results.json", json.dumps(results).encode())
    return {"images": len(paths) - len(skipped), "people": len(results), "removed_by_nms": people - len(results),
            "skipped": skipped}


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def image_files(names: list[str]) -> list[Path]:
    """The files named, a directory standing for the image files directly inside it."""
    paths = []
    for name in names:
        path = Path(name)
        paths += sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if path.is_dir() else [path]
    return paths


def read_image(path: Path) -> tuple[np.ndarray | None, str | None]:
    """(BGR image, None), or (None, why not): JPEGs decode strictly, as in training."""
    if not path.is_file():
        return None, "no such file" if not path.exists() else "not a file"
    data = path.read_bytes()
    if data.startswith(b"\xff\xd8\xff"):
        problem = jpeg_problem(data)
        if problem:
            return None, problem
        try:
            return decode_jpeg(data), None
        except ValueError as exc:
            return None, f"JPEG data corrupt ({exc})"
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    return (None, "not a readable image") if image is None else (image, None)
