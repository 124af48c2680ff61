"""Reading COCO person-keypoint annotations, checked field by field.

Structural problems (missing fields, wrong types, wrong keypoint counts) raise DataError naming
the file, the record and the field. Data-quality problems that real COCO files can contain are
repaired and counted instead: an instance with a zero or negative box is dropped, a labelled
keypoint outside its image is unlabelled (v=0).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from array import array
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ijson
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


def _number(value: Any) -> bool:
    # Not bool (JSON true/false), and not NaN or Infinity, which Python's json module accepts.
    try:
        return type(value) in (int, float) and math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


def _finite_numbers(values: list) -> np.ndarray | None:
    """`values` as float64, or None where one is not a _number. Vectorised: this runs for every person of
    every image the loader reads and the indexer streams."""
    if not {type(v) for v in values} <= {int, float}:
        return None
    try:
        array = np.array(values, dtype=np.float64)
    except OverflowError:
        return None
    return array if np.isfinite(array).all() else None


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
    joints = _finite_numbers(kps)
    if joints is None:
        bad = next(v for v in kps if not _number(v))
        raise DataError(f"{where}: field 'keypoints' holds {bad!r}, expected finite numbers")
    bbox = raw["bbox"]
    if not isinstance(bbox, list) or len(bbox) != 4 or _finite_numbers(bbox) is None:
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

    joints = joints.reshape(NUM_JOINTS, 3)
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


# One checked person, as stored on disk while a split is indexed: fixed size, exact (float64) values.
PERSON_ROW = np.dtype([
    ("id", "<i8"), ("bbox", "<f8", 4), ("keypoints", "<f8", 3 * NUM_JOINTS), ("num_keypoints", "<i4"),
    ("iscrowd", "<i4"), ("area", "<f8"),
])


class CocoSplit:
    """The images of one COCO split, in id order, each with its checked persons.

    A COCO annotation file does not fit in memory at the scale this reads (COCO train's is 238 MB of JSON,
    several GB as Python objects), so it is streamed, twice: once for the images, once for the
    annotations. Memory holds a small table per image; the persons go to an unlinked temporary file, as
    fixed-size rows that `record(i)` reads back. Close it (or use it as a context manager) to free the file.
    """

    def __init__(self, annotation_file: Path, image_dir: Path):
        self.annotation_file, self.image_dir = annotation_file, image_dir
        self.repairs: Counter = Counter()  # what was dropped or unlabelled while reading, by reason
        self._read_images()
        self._spill = tempfile.TemporaryFile(prefix="distpose-persons-")
        try:
            self._read_annotations()
        except BaseException:
            self.close()
            raise

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self) -> Iterator[ImageRecord]:
        return (self.record(i) for i in range(len(self)))

    def __enter__(self) -> CocoSplit:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        self._spill.close()

    def record(self, i: int) -> ImageRecord:
        first, last = int(self.starts[i]), int(self.starts[i + 1])
        rows = b"".join(os.pread(self._spill.fileno(), PERSON_ROW.itemsize, PERSON_ROW.itemsize * int(row))
                        for row in self.order[first:last])
        persons = [
            Person(int(r["id"]), r["bbox"].tolist(), r["keypoints"].tolist(), int(r["num_keypoints"]),
                   float(r["area"]), int(r["iscrowd"]))
            for r in np.frombuffer(rows, dtype=PERSON_ROW)
        ]
        width, height = self.sizes[i].tolist()
        return ImageRecord(int(self.ids[i]), self.file_names[i], width, height, persons)

    def _items(self, prefix: str) -> Iterator[Any]:
        with open(self.annotation_file, "rb") as fh:
            try:
                yield from ijson.items(fh, prefix, use_float=True)
            except ijson.JSONError as exc:
                # yajl's message spans lines: the error, then the text around it.
                detail = " ".join(line.strip() for line in str(exc).splitlines()[:2] if line.strip())
                raise DataError(f"{self.annotation_file}: malformed JSON ({detail})") from None

    def _require_list(self, key: str, message: str) -> None:
        """Called when no items were found under `key`: an empty list is fine, anything else is not."""
        if next(self._items(key), None) != []:
            raise DataError(f"{self.annotation_file}: {message}")

    def _read_images(self) -> None:
        ids, sizes, names = array("q"), array("q"), []
        for raw in self._items("images.item"):
            try:
                image_id, name = int(raw["id"]), str(raw["file_name"])
                width, height = int(raw["width"]), int(raw["height"])
            except (KeyError, TypeError, ValueError):
                raise DataError(f"{self.annotation_file}: image record {raw!r:.80} lacks id, file_name, width or "
                                "height") from None
            if width <= 0 or height <= 0:
                raise DataError(f"{self.annotation_file}: image {image_id} has size {width}x{height}")
            ids.append(image_id)
            sizes.extend((width, height))
            names.append(name)
        if not ids:
            self._require_list("images", "expected an object with an 'images' list")
        order = np.argsort(np.frombuffer(ids, dtype=np.int64), kind="stable")
        self.ids = np.frombuffer(ids, dtype=np.int64)[order]
        self.sizes = np.frombuffer(sizes, dtype=np.int64).reshape(-1, 2)[order]
        self.file_names = [names[i] for i in order]
        twice = np.flatnonzero(np.diff(self.ids) == 0)
        if twice.size:
            i = int(twice[0])
            raise DataError(f"{self.annotation_file}: image id {self.ids[i]} appears twice ({self.file_names[i]}, "
                            f"{self.file_names[i + 1]})")

    def _read_annotations(self) -> None:
        images, usable, buffer, filled, seen = array("q"), array("b"), np.zeros(4096, dtype=PERSON_ROW), 0, False
        for raw in self._items("annotations.item"):
            seen = True
            if isinstance(raw, dict) and raw.get("category_id", PERSON_CATEGORY_ID) != PERSON_CATEGORY_ID:
                continue
            image_id = raw.get("image_id") if isinstance(raw, dict) else None
            i = int(np.searchsorted(self.ids, image_id)) if type(image_id) is int else len(self.ids)
            if i == len(self.ids) or self.ids[i] != image_id:
                raise DataError(f"{self.annotation_file}: annotation "
                                f"{raw.get('id') if isinstance(raw, dict) else raw!r:.40} "
                                f"refers to image_id {image_id!r}, which is not in 'images'")
            width, height = self.sizes[i].tolist()
            person, fixes = check_person(raw, width, height, str(self.annotation_file))
            self.repairs.update(fixes)
            if person is None:
                continue
            row = buffer[filled]
            row["id"], row["bbox"], row["keypoints"] = person.id, person.bbox, person.keypoints
            row["num_keypoints"], row["iscrowd"], row["area"] = person.num_keypoints, person.iscrowd, person.area
            images.append(i)
            usable.append(person.usable)
            filled += 1
            if filled == len(buffer):
                self._spill.write(buffer.tobytes())
                filled = 0
        self._spill.write(buffer[:filled].tobytes())
        self._spill.flush()
        if not seen:
            self._require_list("annotations", "expected an 'annotations' list")
        owner = np.frombuffer(images, dtype=np.int64)
        self.order = np.argsort(owner, kind="stable")  # rows grouped by image, in file order within one
        self.starts = np.concatenate([[0], np.cumsum(np.bincount(owner, minlength=len(self.ids)))])
        self.usable_persons = np.bincount(owner, weights=np.frombuffer(usable, dtype=np.int8),
                                          minlength=len(self.ids)).astype(np.int64)


def load_split(root: str | Path, split: str) -> CocoSplit:
    """Index `root/annotations/person_keypoints_<split>.json`, validating every person annotation."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"COCO root {root} is not a directory")
    ann_file = annotation_path(root, split)
    image_dir = root / split
    if not ann_file.is_file():
        raise DataError(f"{ann_file}: annotation file not found (expected the official COCO layout)")
    if not image_dir.is_dir():
        raise DataError(f"{image_dir}: image directory not found (expected the official COCO layout)")
    return CocoSplit(ann_file, image_dir)


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
