"""Helpers shared by the data tests: damaging shards the ways real storage does."""

import io
import json
import tarfile
import zlib
from pathlib import Path

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


def truncate_jpeg_in_shard(shard: Path) -> str:
    """Rewrite the shard with its first sample's JPEG cut in half and a crc32 that matches the cut
    bytes: only the JPEG structure check can catch it. Returns the sample key."""
    samples = list(iter_tar_samples(shard))
    first = samples[0]
    first["jpg"] = first["jpg"][: len(first["jpg"]) // 2]
    meta = json.loads(first["json"])
    meta["jpg_crc32"] = zlib.crc32(first["jpg"])
    first["json"] = json.dumps(meta).encode()
    with tarfile.open(shard, "w") as tar:
        for sample in samples:
            for ext in ("jpg", "json"):
                info = tarfile.TarInfo(f"{sample['__key__']}.{ext}")
                info.size = len(sample[ext])
                tar.addfile(info, io.BytesIO(sample[ext]))
    return first["__key__"]


def records(directory: Path, kind: str | None = None) -> list[dict]:
    """metrics.jsonl's complete lines (a line being appended is left out), of `kind` if given."""
    path = directory / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if kind is None or record["kind"] == kind:
            out.append(record)
    return out
