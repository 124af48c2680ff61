"""Helpers shared by the data tests: damaging shards the ways real storage does."""

import io
import json
import socket
import tarfile
import zlib
from pathlib import Path

import numpy as np

from distpose.data.shards import iter_tar_samples


def corrupt_jpeg_in_shard(shard: Path) -> str:
    """Zero 64 bytes in the middle of the first sample's JPEG inside the tar (tar stays readable).
    Returns the sample key."""
    with tarfile.open(shard) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".jpg"))
    data = bytearray(shard.read_bytes())
    middle = member.offset_data + member.size // 2
    data[middle: middle + 64] = bytes(64)
    shard.write_bytes(bytes(data))
    return member.name.split(".")[0]


def truncate_shard(shard: Path, keep: float = 0.6) -> None:
    data = shard.read_bytes()
    shard.write_bytes(data[: int(len(data) * keep)])


def scramble_jpeg(data: bytes, start: int = 2000, seed: int = 0) -> bytes:
    """Random bytes in place of the entropy-coded data after `start`, the end-of-image marker kept: the
    file keeps its structure (start and end markers) and OpenCV still decodes it, to grey."""
    noise = np.random.default_rng(seed).integers(0, 256, len(data) - start - 2, dtype=np.uint8).tobytes()
    return data[:start] + noise + b"\xff\xd9"


def _first_sample_rewritten(shard: Path, change) -> str:
    """Rewrite the shard with `change` applied to its first sample (a dict of bytes per extension, in place).
    Returns the sample key."""
    samples = list(iter_tar_samples(shard))
    change(samples[0])
    with tarfile.open(shard, "w") as tar:
        for sample in samples:
            for ext in ("jpg", "json"):
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size = len(sample[ext])
                tar.addfile(info, io.BytesIO(sample[ext]))
    return samples[0]["__key__"]


def damage_first_jpeg_in_shard(shard: Path, damage) -> str:
    """Rewrite the shard with its first sample's JPEG passed through `damage` and a crc32 that matches the
    damaged bytes: only a check of the JPEG itself can catch it. Returns the sample key."""
    def change(sample: dict) -> None:
        sample["jpg"] = damage(sample["jpg"])
        meta = json.loads(sample["json"])
        meta["jpg_crc32"] = zlib.crc32(sample["jpg"])
        sample["json"] = json.dumps(meta).encode()

    return _first_sample_rewritten(shard, change)


def cut_first_annotation_in_shard(shard: Path) -> str:
    """Rewrite the shard with its first sample's JSON cut short: no reader can tell its persons."""
    return _first_sample_rewritten(shard, lambda sample: sample.update(json=sample["json"][:-5]))


def truncate_jpeg_in_shard(shard: Path) -> str:
    return damage_first_jpeg_in_shard(shard, lambda data: data[: len(data) // 2])


def scramble_jpeg_in_shard(shard: Path) -> str:
    return damage_first_jpeg_in_shard(shard, scramble_jpeg)


def free_port() -> int:
    """A TCP port free on every interface now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]
