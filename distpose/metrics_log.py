"""metrics.jsonl, a run's record: one JSON object per line, written by rank 0 and read by the driver's progress
lines, sweeps, the pipeline report and the benchmarks.

Every record has `kind` and `time`. Kinds: `start` (each attempt, with what it resumed from), `step`, `epoch`
(its mean loss, and the instances it trained on: their number and passes.instance_digest), `eval`, `checkpoint`,
`final`, and `failure` (an attempt's workers failed: which rank, and its error), which the Ray Train controller
appends (append_record). The file is appended across attempts, so a resumed run shows the steps it redid. A reader
may meet the last line half written (rank 0 is appending, or an object-storage copy is being replaced): every
reader here reads complete lines only.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from distpose.files import append_bytes, read_bytes, upload, within, write_bytes

METRICS_LOG = "metrics.jsonl"


class MetricsLog:
    """The writer, on rank 0 (other ranks hold a disabled one). With the run on object storage (`mirror`), the
    file is appended locally and uploaded whole: at every record other than a step, at every sync() (before a
    checkpoint), and after steps at most every MIRROR_EVERY_S."""

    MIRROR_EVERY_S = 5.0

    def __init__(self, path: Path, enabled: bool, mirror: str | None = None):
        self.path, self.enabled, self.mirror = path, enabled, mirror
        self.mirrored = 0.0
        if enabled and mirror is not None:  # a restarted rank 0 (maybe on another node) goes on from the copy
            try:
                write_bytes(path, read_bytes(mirror))
            except FileNotFoundError:
                path.unlink(missing_ok=True)
        if enabled and path.is_file() and path.read_bytes()[-1:] not in (b"", b"\n"):
            with path.open("a") as f:  # a rank 0 killed mid-line: its torn record stays a line of its own
                f.write("\n")

    def write(self, kind: str, **fields: Any) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"kind": kind, "time": time.time(), **fields}) + "\n")
        if kind != "step" or time.monotonic() - self.mirrored > self.MIRROR_EVERY_S:
            self.sync()

    def sync(self) -> None:
        if self.enabled and self.mirror is not None:
            upload(self.path, self.mirror)
            self.mirrored = time.monotonic()


def append_record(location: str | Path, kind: str, **fields: Any) -> None:
    """Append one record to the metrics.jsonl at `location` from a process that is not rank 0. On object storage
    the file is rewritten whole, and an upload of rank 0's copy at the same moment would drop the record."""
    append_bytes(location, (json.dumps({"kind": kind, "time": time.time(), **fields}) + "\n").encode())


def complete_lines(data: bytes) -> bytes:
    """`data` up to its last newline: a line still being written is left for the next read."""
    return data[: data.rfind(b"\n") + 1]


def parse_records(data: bytes, kind: str | None = None) -> list[dict[str, Any]]:
    """The records in the complete lines of `data`, of `kind` if given. A line that is not JSON can only be the
    torn record of a killed attempt, and is left out."""
    records = []
    for line in complete_lines(data).splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and (kind is None or record.get("kind") == kind):
            records.append(record)
    return records


def read_records(run_dir: Path | str, kind: str | None = None) -> list[dict[str, Any]]:
    """The records of the run in `run_dir` (a path or a URI), of `kind` if given; none before it has any."""
    try:
        data = read_bytes(within(run_dir, METRICS_LOG))
    except FileNotFoundError:
        return []
    return parse_records(data, kind)


def run_history(run_dir: Path | str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(step records, eval records) of a run in step and epoch order, the last attempt's record kept for a step
    or an epoch that a resumed attempt redid."""
    steps: dict[int, dict[str, Any]] = {}
    evals: dict[int, dict[str, Any]] = {}
    for record in read_records(run_dir):
        if record["kind"] == "step":
            steps[record["step"]] = record
        elif record["kind"] == "eval":
            evals[record["epoch"]] = record
    return [steps[k] for k in sorted(steps)], [evals[k] for k in sorted(evals)]
