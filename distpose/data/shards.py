"""WebDataset shards: one sample per image, written atomically, described by a manifest.

A sample is `<key>.jpg` (the source JPEG's bytes, unchanged) and `<key>.json`:
    {"image_id", "file_name", "width", "height", "jpg_crc32", "persons": [COCO person annotations]}
Each split gets `<split>-NNNNNN.tar` shards of equal size (they differ by at most one sample) and a
`<split>.manifest.json` with per-shard sample, instance and byte counts and sha256 digests.

The shard directory is a local path, an object-store prefix (`s3://bucket/prefix`) or, for reading, an
`http(s)://` URL. Every shard is complete at its final name before the manifest that lists it is written;
an overwrite removes the old manifest first, so a reader finds the old split whole, no split, or the new
split whole.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import tarfile
import tempfile
import zlib
from array import array
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import cv2
import numpy as np
import simplejpeg
from tqdm import tqdm

from distpose import __version__
from distpose.data.coco import CocoSplit, ImageRecord, Person, annotation_path, check_person, load_split
from distpose.errors import DataError, UserError
from distpose.files import (
    exists,
    file_sizes,
    is_http,
    is_uri,
    join,
    open_input,
    read_bytes,
    remove_file,
    upload,
    write_bytes,
)
from distpose.keypoints import person_category

log = logging.getLogger(__name__)

MANIFEST_FORMAT = "distpose.shards/v1"
NO_KEYPOINTS = "image without usable keypoint annotations"
CORRUPT_SOURCE = "corrupt source image"


class SampleError(ValueError):
    """A sample that cannot be used. The message names the sample and the problem; `reason` is a
    short category for counting skips."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


MANIFEST_SUFFIX = ".manifest.json"


def manifest_path(shard_dir: str | Path, split: str) -> str:
    return join(shard_dir, f"{split}{MANIFEST_SUFFIX}")


def splits_in(shard_dir: str | Path) -> list[str]:
    """The splits with a manifest in `shard_dir` (an http(s) location cannot be listed: none)."""
    if is_http(shard_dir):
        return []
    return sorted(name.removesuffix(MANIFEST_SUFFIX) for name in file_sizes(shard_dir, recursive=False)
                  if name.endswith(MANIFEST_SUFFIX))


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def jpeg_problem(data: bytes) -> str | None:
    """A cheap structural check: JPEG start marker, and an end marker near the end (truncation)."""
    if not data.startswith(b"\xff\xd8\xff"):
        return "not a JPEG (no start-of-image marker)"
    if data.rfind(b"\xff\xd9", max(0, len(data) - 1024)) < 0:
        return "JPEG truncated (no end-of-image marker)"
    return None


def _jpeg_file_problem(path: Path) -> str | None:
    """jpeg_problem() reading only the file's first bytes and its last kilobyte."""
    with open(path, "rb") as fh:
        head = fh.read(4096)
        if len(head) == 4096:
            fh.seek(-1024, os.SEEK_END)
            head = head[:3] + fh.read()
    return jpeg_problem(head)


# ---------------------------------------------------------------------------------------------
# Sample format


@dataclass
class DecodedSample:
    key: str
    image_id: int
    width: int
    height: int
    persons: list[Person]
    jpg: bytes
    jpg_crc32: int


def sample_json(record: ImageRecord, jpg: bytes) -> bytes:
    doc = {
        "image_id": record.id, "file_name": record.file_name, "width": record.width, "height": record.height,
        "jpg_crc32": zlib.crc32(jpg), "persons": [p.to_json() for p in record.persons],
    }
    return json.dumps(doc, separators=(",", ":")).encode()


def parse_sample(sample: dict[str, Any], check_jpeg: bool = True) -> DecodedSample:
    """Check a raw webdataset sample (bytes per extension) against the format; SampleError if it fails. Without
    `check_jpeg`, its JPEG bytes are left for check_jpeg_crc."""
    key = sample.get("__key__", "?")
    for ext in ("jpg", "json"):
        if ext not in sample:
            raise SampleError(f"sample {key} lacks its .{ext} member", "incomplete sample")
    try:
        doc = json.loads(sample["json"])
        width, height, image_id = int(doc["width"]), int(doc["height"]), int(doc["image_id"])
        raw_persons, crc = doc["persons"], int(doc["jpg_crc32"])
    except (ValueError, KeyError, TypeError, OverflowError) as exc:
        raise SampleError(f"sample {key}: malformed annotation JSON ({type(exc).__name__}: {exc})",
                          "malformed annotation") from None
    if check_jpeg:
        check_jpeg_crc(key, sample["jpg"], crc)
    if not isinstance(raw_persons, list):
        raise SampleError(f"sample {key}: field 'persons' is not a list", "malformed annotation")
    persons = []
    try:
        for raw in raw_persons:
            person, _ = check_person(raw, width, height, f"sample {key}")
            if person is not None:
                persons.append(person)
    except DataError as exc:
        raise SampleError(str(exc), "malformed annotation") from None
    return DecodedSample(key, image_id, width, height, persons, sample["jpg"], crc)


def check_jpeg_crc(key: str, jpg: bytes, crc: int) -> None:
    if zlib.crc32(jpg) != crc:
        raise SampleError(f"sample {key}: JPEG bytes do not match their crc32 (corrupt)", "corrupt JPEG")


def decode_jpeg(data: bytes) -> np.ndarray:
    """Decode to BGR (OpenCV order) uint8, strictly: libjpeg's warnings about corrupt entropy-coded data
    ("premature end of data segment"), which OpenCV prints and decodes past as grey, raise ValueError here.
    CMYK/YCCK files (libjpeg-turbo cannot convert them to BGR) go through OpenCV."""
    if simplejpeg.decode_jpeg_header(data)[2] in ("CMYK", "YCCK"):
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if image is None:
            raise ValueError("does not decode")
        return image
    return simplejpeg.decode_jpeg(data, colorspace="BGR", strict=True)


def decode_image(sample: DecodedSample) -> np.ndarray:
    """Decode to a BGR (OpenCV order) uint8 array, checking it is a whole, uncorrupted JPEG of the
    annotated size."""
    problem = jpeg_problem(sample.jpg)
    if problem:
        raise SampleError(f"sample {sample.key}: {problem}", "corrupt JPEG")
    try:
        image = decode_jpeg(sample.jpg)
    except ValueError as exc:
        raise SampleError(f"sample {sample.key}: JPEG data corrupt ({exc})", "corrupt JPEG") from None
    if image.shape[:2] != (sample.height, sample.width):
        raise SampleError(f"sample {sample.key}: image is {image.shape[1]}x{image.shape[0]}, "
                          f"annotation says {sample.width}x{sample.height}", "corrupt JPEG")
    return image


# ---------------------------------------------------------------------------------------------
# Writing


def _sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open_input(path) as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _ordered_map(fn: Callable[..., Any], tasks: Iterable[tuple], workers: int) -> Iterator[Any]:
    """fn(*task) for each task, in order, in this process or in a pool of `workers` processes.
    Tasks are drawn from `tasks` only a few ahead of the results, so a lazy iterable stays lazy."""
    if workers == 1:
        yield from (fn(*task) for task in tasks)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        running: deque[Future] = deque()
        for task in tasks:
            running.append(pool.submit(fn, *task))
            if len(running) > 2 * workers:
                yield running.popleft().result()
        while running:
            yield running.popleft().result()


def _partial(path: Path) -> Path:
    """Where a shard is written before it is complete (hidden, and never read as a shard)."""
    return path.with_name(f".{path.name}.partial")


def _write_one_shard(path: Path, records: list[ImageRecord], image_dir: Path) -> dict[str, Any]:
    """Write the shard under its partial name; the caller renames it once every shard is written.
    An image that does not decode strictly, or not at its annotated size, is left out and named in
    the result's "corrupt" ({file name: problem})."""
    tmp = _partial(path)
    written, corrupt, offsets = [], {}, []
    try:
        with open(tmp, "wb") as fh, tarfile.open(fileobj=fh, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for record in records:
                jpg = (image_dir / record.file_name).read_bytes()
                problem = _source_image_problem(jpg, record)
                if problem:
                    corrupt[record.file_name] = problem
                    continue
                written.append(record)
                offsets.append(tar.offset)
                key = f"{record.id:012d}"
                for ext, data in (("jpg", jpg), ("json", sample_json(record, jpg))):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size, info.mode, info.mtime = len(data), 0o444, 0  # mtime 0: same input, same bytes
                    tar.addfile(info, io.BytesIO(data))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    per_sample = [sum(p.usable for p in r.persons) for r in written]
    return {
        "name": path.name, "samples": len(written), "instances": sum(per_sample),
        "bytes": tmp.stat().st_size, "sha256": _sha256(tmp), "corrupt": corrupt,
        # where each sample's first member starts, and its usable instances: a reader can start mid-shard
        "sample_offsets": offsets, "sample_instances": per_sample,
    }


def _source_image_problem(jpg: bytes, record: ImageRecord) -> str | None:
    try:
        height, width = decode_jpeg(jpg).shape[:2]
    except ValueError as exc:
        return f"JPEG data corrupt ({exc})"
    if (height, width) != (record.height, record.width):
        return f"image is {width}x{height}, annotation says {record.width}x{record.height}"
    return None


def _existing_shards(out_dir: str | Path, split: str, prefix: str = "") -> list[str]:
    """The names of this split's shard files (or, with prefix ".", its partial ones), and no other split's:
    `train-*.tar` would also match a split named `train-small`."""
    pattern = re.compile(rf"{re.escape(prefix + split)}-\d{{6}}\.tar{'.partial' if prefix else ''}")
    return sorted(name for name in file_sizes(out_dir, recursive=False) if pattern.fullmatch(name))


def split_evenly(items: list, parts: int) -> list[list]:
    """`parts` contiguous chunks whose sizes differ by at most one."""
    base, extra = divmod(len(items), parts)
    chunks, start = [], 0
    for i in range(parts):
        end = start + base + (1 if i < extra else 0)
        chunks.append(items[start:end])
        start = end
    return chunks


def split_role(split: str) -> str:
    return "train" if split.startswith("train") else "eval"


def _write_split(coco: CocoSplit, split: str, out_dir: str | Path, samples_per_shard: int, workers: int,
                 role: str, progress: bool) -> tuple[list[dict[str, Any]], Counter, dict[str, str]]:
    """Write the split's shards (see write_shards); the caller writes the manifest. Returns the shards'
    manifest entries, the images skipped by reason, and the source images left out as corrupt, by file name.
    Each shard's image records are read from the index only shortly before the shard is written."""
    skipped: Counter = Counter()
    corrupt: dict[str, str] = {}
    chosen = array("q")  # the images to write, by index into coco
    for i, name in enumerate(coco.file_names):
        path = coco.image_dir / name
        if not path.is_file():
            raise DataError(f"{path}: image listed in {coco.annotation_file.name} not found")
        if role == "train" and not coco.usable_persons[i]:
            skipped[NO_KEYPOINTS] += 1
            continue
        problem = _jpeg_file_problem(path)
        if problem:
            corrupt[name] = problem
            continue
        chosen.append(i)
    if not chosen:
        raise DataError(f"{coco.annotation_file}: no usable images in split '{split}' (skipped: {dict(skipped)})")

    chunks = split_evenly(chosen, -(-len(chosen) // samples_per_shard))
    remote = is_uri(out_dir)
    with tempfile.TemporaryDirectory(prefix="distpose-shards-") as staging:
        # Local shards are written beside their final names and renamed at the end; shards for object
        # storage are written to local staging and uploaded one by one, after the old manifest is gone.
        local_dir = Path(staging) if remote else Path(out_dir)
        local_dir.mkdir(parents=True, exist_ok=True)
        for leftover in _existing_shards(local_dir, split, prefix="."):  # from a run that was killed
            (local_dir / leftover).unlink()
        if remote:
            remove_file(manifest_path(out_dir, split))
        paths = [local_dir / shard_name(split, i) for i in range(len(chunks))]
        tasks = ((path, [coco.record(i) for i in chunk], coco.image_dir) for path, chunk in zip(paths, chunks))
        shards = []
        try:
            with tqdm(total=len(chosen), unit="img", desc=f"shard {split}", disable=not progress) as bar:
                for path, info in zip(paths, _ordered_map(_write_one_shard, tasks, workers)):
                    corrupt |= info.pop("corrupt")
                    shards.append(info)
                    if remote:
                        upload(_partial(path), join(out_dir, path.name))
                        _partial(path).unlink()
                    bar.update(info["samples"])
        except BaseException:
            for path in paths:
                _partial(path).unlink(missing_ok=True)
            raise
        if not remote:  # every shard is complete: only now replace the old split, shards first
            for path in paths:
                os.replace(_partial(path), path)
    if corrupt:
        skipped[CORRUPT_SOURCE] += len(corrupt)
    return shards, skipped, corrupt


def write_shards(coco_root: str | Path, split: str, out_dir: str | Path, samples_per_shard: int = 1000,
                 workers: int = 1, role: str = "auto", overwrite: bool = False,
                 progress: bool = True) -> dict[str, Any]:
    """Shard one COCO split. Training splits skip images with no usable person (counted)."""
    if samples_per_shard < 1:
        raise UserError(f"--samples-per-shard must be >= 1, got {samples_per_shard}")
    if workers < 1:
        raise UserError(f"--workers must be >= 1, got {workers}")
    role = split_role(split) if role == "auto" else role
    if is_http(out_dir):
        raise UserError(f"--out {out_dir}: an http(s) location is read only (write to a local path or s3://)")
    remote = is_uri(out_dir)
    if not remote:
        out_dir = Path(out_dir).resolve()
        if out_dir.exists() and not out_dir.is_dir():
            raise UserError(f"--out {out_dir} is a file, not a directory")
    manifest_file = manifest_path(out_dir, split)
    old_shards = _existing_shards(out_dir, split)
    source = annotation_path(coco_root, split)
    asked = {"source": str(source.resolve()), "source_sha256": _sha256(source) if source.is_file() else None,
             "samples_per_shard": samples_per_shard, "role": role}
    if (exists(manifest_file) or old_shards) and not overwrite:
        if exists(manifest_file):
            manifest = read_manifest(out_dir, split)
            if all(manifest.get(key) == value for key, value in asked.items()):
                log.info("%s already holds split '%s' of %s, sharded the same way: nothing to do", out_dir, split,
                         source)
                return manifest
        existing = manifest_file if exists(manifest_file) else join(out_dir, old_shards[0])
        raise UserError(f"{existing} already exists (from another source, shard size or role); pass "
                        f"--overwrite to replace split '{split}'")

    with load_split(coco_root, split) as coco:
        shards, skipped, corrupt = _write_split(coco, split, out_dir, samples_per_shard, workers, role, progress)
        repairs = dict(coco.repairs)
    manifest = {
        "format": MANIFEST_FORMAT, "created_by": f"distpose {__version__}", "split": split, **asked,
        "samples": sum(s["samples"] for s in shards), "instances": sum(s["instances"] for s in shards),
        "skipped": dict(skipped), "corrupt_images": dict(sorted(corrupt.items())), "repairs": repairs,
        "shards": shards,
    }
    write_bytes(manifest_file, json.dumps(manifest, indent=1).encode())  # the manifest last
    fresh = {s["name"] for s in shards}
    for stale in old_shards:
        if stale not in fresh:
            remove_file(join(out_dir, stale))
    return manifest


# ---------------------------------------------------------------------------------------------
# Reading manifests and verifying


def read_manifest(shard_dir: str | Path, split: str) -> dict[str, Any]:
    path = manifest_path(shard_dir, split)
    try:
        data = read_bytes(path)
    except FileNotFoundError:
        have = "cannot list an http(s) location" if is_http(shard_dir) else ", ".join(splits_in(shard_dir)) or "none"
        raise DataError(f"{path}: no manifest for split '{split}' (splits here: {have}); "
                        "run `distpose data shard` first") from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read the manifest ({exc})") from None
    try:
        manifest = json.loads(data)
        if manifest.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"format {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}")
        for key in ("samples", "instances"):
            _expect(manifest, key, int)
        if not isinstance(manifest.get("shards"), list) or not manifest["shards"]:
            raise ValueError("'shards' is not a non-empty list")
        for shard in manifest["shards"]:
            for key, kind in _SHARD_FIELDS.items():
                _expect(shard, key, kind)
    except (ValueError, TypeError, AttributeError) as exc:
        raise DataError(f"{path}: malformed manifest ({exc})") from None
    return manifest


_SHARD_FIELDS = {"name": str, "samples": int, "instances": int, "bytes": int, "sha256": str}


def _expect(record: dict[str, Any], key: str, kind: type) -> None:
    if not isinstance(record.get(key), kind) or isinstance(record.get(key), bool):
        raise ValueError(f"field '{key}' is {record.get(key)!r}, expected {kind.__name__}")


def shard_paths(shard_dir: str | Path, split: str) -> list[str]:
    manifest = read_manifest(shard_dir, split)
    return [join(shard_dir, s["name"]) for s in manifest["shards"]]


@dataclass
class ShardCheck:
    name: str
    samples: int = 0
    instances: int = 0
    problems: list[str] = field(default_factory=list)


def iter_tar_samples(location: str | Path) -> Iterator[dict[str, Any]]:
    """Group a shard's members into samples by key, in order (tarfile errors propagate)."""
    with open_input(location) as stream:
        yield from _tar_samples(stream)


def readable_samples(location: str | Path, reader: str) -> Iterator[dict[str, Any]]:
    """iter_tar_samples, ending at a damaged or unreadable shard with a warning that names it: what `reader`
    (the ground truth, the drawing) sees is what the loaders see, which keep the samples before the damage."""
    read = 0
    try:
        for sample in iter_tar_samples(location):
            read += 1
            yield sample
    except (OSError, EOFError, tarfile.TarError) as exc:
        log.warning("%s: shard %s is unreadable after %d samples (%s): the rest is skipped", reader, location,
                    read, exc)


def _tar_samples(stream: IO[bytes]) -> Iterator[dict[str, Any]]:
    current: dict[str, Any] = {}
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            if not member.isreg():
                continue
            key, _, ext = member.name.partition(".")
            if current and current["__key__"] != key:
                yield current
                current = {}
            current.setdefault("__key__", key)
            current[ext] = tar.extractfile(member).read()
    if current:
        yield current


def shard_ground_truth(shard_dir: str | Path, split: str, max_images: int | None = None) -> dict[str, Any]:
    """The COCO annotation content of a split (its first `max_images` images, if given), read back from
    its shards' JSON members (a damaged shard's up to the damage, as the loaders read it)."""
    images, annotations = [], []
    for shard in read_manifest(shard_dir, split)["shards"]:
        for sample in readable_samples(join(shard_dir, shard["name"]), "ground truth"):
            if max_images is not None and len(images) >= max_images:
                break
            if "json" not in sample:
                continue
            doc = json.loads(sample["json"])
            images.append({k: doc[k] for k in ("file_name", "width", "height")} | {"id": doc["image_id"]})
            annotations += [p | {"image_id": doc["image_id"], "category_id": 1} for p in doc["persons"]]
    return {"images": images, "annotations": annotations, "categories": [person_category()]}


def check_shard(location: str, expected: dict[str, Any]) -> ShardCheck:
    """Checksum, then every sample: format, crc32, full JPEG decode at the annotated size."""
    name = expected["name"]
    check = ShardCheck(name)
    try:
        data = read_bytes(location)
    except FileNotFoundError:
        check.problems.append(f"shard {name}: file missing")
        return check
    except OSError as exc:
        check.problems.append(f"shard {name}: unreadable ({exc})")
        return check
    if len(data) != expected["bytes"]:
        check.problems.append(f"shard {name}: {len(data)} bytes, manifest says {expected['bytes']}")
    if hashlib.sha256(data).hexdigest() != expected["sha256"]:
        check.problems.append(f"shard {name}: sha256 differs from the manifest")
    last_key, per_sample = "(start)", []
    try:
        for raw in _tar_samples(io.BytesIO(data)):
            last_key = raw["__key__"]
            check.samples += 1
            per_sample.append(None)
            try:
                sample = parse_sample(raw)
                decode_image(sample)
                per_sample[-1] = sum(p.usable for p in sample.persons)
                check.instances += per_sample[-1]
            except SampleError as exc:
                check.problems.append(f"shard {name}: {exc}")
        if "sample_offsets" in expected:
            _check_sample_index(check, data, per_sample, expected)
    except (tarfile.TarError, OSError, EOFError) as exc:
        check.problems.append(f"shard {name}: unreadable tar after sample {last_key} ({exc})")
    if check.samples != expected["samples"]:
        check.problems.append(f"shard {name}: {check.samples} samples, manifest says {expected['samples']}")
    return check


def _check_sample_index(check: ShardCheck, data: bytes, per_sample: list[int | None], expected: dict[str, Any]
                        ) -> None:
    """The manifest's sample index against the shard: each sample's first member where it says, and its usable
    instances (a sample that failed its checks has its own problem)."""
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        offsets = [m.offset for m in tar if m.name.endswith(".jpg")]
    counts = [n if n is not None else c for n, c in zip(per_sample, expected["sample_instances"])]
    if offsets != expected["sample_offsets"] or counts != expected["sample_instances"]:
        check.problems.append(f"shard {expected['name']}: its sample index in the manifest does not match it "
                              f"(the pass order would misplace its readers): write the split again with "
                              f"`distpose data shard ... --overwrite`")


def verify_shards(shard_dir: str | Path, workers: int = 1, progress: bool = True,
                  splits: list[str] | None = None) -> dict[str, Any]:
    """Check every split in `shard_dir` (or the `splits` named: an http(s) location cannot be listed).
    Returns per-split counts and the list of problems."""
    if not is_uri(shard_dir) and not Path(shard_dir).is_dir():
        raise UserError(f"{shard_dir}: shard directory not found")
    if not splits:
        if is_http(shard_dir):
            raise UserError(f"{shard_dir}: an http(s) location cannot be listed; name its splits with --split")
        splits = splits_in(shard_dir)
        if not splits:
            raise DataError(f"{shard_dir}: no *{MANIFEST_SUFFIX} found; run `distpose data shard` first")
    report: dict[str, Any] = {"splits": {}, "problems": []}
    for split in splits:
        manifest = read_manifest(shard_dir, split)
        tasks = [(join(shard_dir, s["name"]), s) for s in manifest["shards"]]
        with tqdm(total=len(tasks), unit="shard", desc=f"verify {split}", disable=not progress) as bar:
            checks = []
            for check in _ordered_map(check_shard, tasks, workers):
                checks.append(check)
                bar.update()
        problems = [p for c in checks for p in c.problems]
        report["splits"][split] = {
            "shards": len(checks), "samples": sum(c.samples for c in checks),
            "instances": sum(c.instances for c in checks),
            "manifest_samples": manifest["samples"], "manifest_instances": manifest["instances"],
            "bad_shards": sum(1 for c in checks if c.problems),
        }
        report["problems"].extend(f"{split}: {p}" for p in problems)
    return report
