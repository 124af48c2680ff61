"""The driver's console view of a run: it follows rank 0's metrics.jsonl and says, in the project's own
words, how the run started, how far it is with a rate and an ETA, and what each evaluation scored.

The workers' own output (DeepSpeed, Ray Train, tracebacks) goes to the run's logs/ directory instead, so
that these lines are the console (`-v` streams the workers' output too).
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any

from distpose.config import Config
from distpose.eval.evaluate import lost_data
from distpose.files import is_uri, read_bytes
from distpose.metrics_log import complete_lines, parse_records

log = logging.getLogger(__name__)
POLL_S = 0.5
SHOWN_SCORES = ("visible/pck@0.1", "occluded/pck@0.1", "AP", "AR")


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02d}"


class ProgressLines:
    """Turns metrics.jsonl records into console lines (kept apart from the file following, to be tested)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg
        self.total = cfg.train.epochs * cfg.data.batches_per_epoch
        self.first: tuple[float, int] | None = None  # (time, step) of this attempt's first step

    def line(self, record: dict[str, Any]) -> str | None:
        c, kind = self.cfg, record.get("kind")
        if kind == "start":
            self.first = None
            return (f"[distpose] {c.train.run_name}: mode {c.train.mode}, {c.model.backbone}, "
                    f"{record['world_size']} worker(s) on {record.get('device', '?')}, "
                    f"global batch {c.data.batch_size} "
                    f"({record.get('micro_batch', '?')} x {record['world_size']} x "
                    f"{record.get('grad_accum', c.train.grad_accum)}), "
                    f"{record.get('precision', c.train.precision)}, ZeRO {c.train.zero_stage}; "
                    f"{record['resumed_from']}")
        if kind == "failure":
            n, most = record["failure"], c.train.max_failures
            then = "Ray Train restarts them from the latest checkpoint" if n <= most else "the run stops"
            return (f"[distpose] {c.train.run_name}: the workers failed (rank(s) {record['ranks']}: "
                    f"{record['error']}); failure {n} of train.max_failures={most}: {then} (logs/rank<r>.log "
                    "has each rank's traceback)")
        if kind == "step":
            step, now = record["step"], record["time"]
            if self.first is None:
                self.first = (now - record["step_time"], step - 1)
            in_epoch = (step - 1) % c.data.batches_per_epoch + 1
            if in_epoch % c.train.log_every and in_epoch != c.data.batches_per_epoch:
                return None
            done = step - self.first[1]
            per_step = (now - self.first[0]) / done
            wait_share = record["data_wait"] / record["step_time"] if record["step_time"] > 0 else 0.0
            return (f"epoch {record['epoch']}/{c.train.epochs} step {in_epoch}/{c.data.batches_per_epoch} "
                    f"[{step}/{self.total} {100 * step / self.total:.0f}%] loss {record['loss']:.5g} "
                    f"lr {record['lr']:.2e} {c.data.batch_size / per_step:.1f} samples/s "
                    f"(data wait {100 * wait_share:.0f}%) ETA {_clock(per_step * (self.total - step))}")
        if kind == "eval":
            scores = [f"{name} {record[f'val/{name}']:.4f}" for name in SHOWN_SCORES if f"val/{name}" in record]
            skipped, lost = record.get("skipped_samples"), lost_data(record, "val/")
            return (f"eval after epoch {record['epoch']}: {', '.join(scores)}"
                    + (f"; validation: {lost}" if lost else "")
                    + (f" (training: {skipped} corrupt samples skipped so far, logs/ name them)" if skipped else ""))
        return None


class FollowProgress:
    """A thread that prints ProgressLines for the records appended to `path` after it started."""

    def __init__(self, path: str | Path, cfg: Config):
        self.path, self.lines = path, ProgressLines(cfg)
        self.offset, self.out_of_reach = 0, False
        self.offset = len(self._unread())
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name="distpose-progress", daemon=True)

    def __enter__(self) -> FollowProgress:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.thread.join(timeout=5)

    def _run(self) -> None:
        while not self.stopping.wait(POLL_S):
            self._read_or_warn()
        self._read_or_warn()

    def _read_or_warn(self) -> None:
        """A record out of reach (object storage down) is read at the next poll: the run's own waits on storage
        are bounded and fail it if the outage lasts; this thread only says so, once per outage."""
        try:
            self._read()
        except OSError as exc:
            if not self.out_of_reach:
                log.warning("[distpose] cannot read %s for the progress lines (%s); trying again every %g s",
                            self.path, str(exc).splitlines()[0] if str(exc) else type(exc).__name__, POLL_S)
            self.out_of_reach = True
        else:
            self.out_of_reach = False

    def _unread(self) -> bytes:
        """What was appended since the last read: a local file is read from there on; a copy on object
        storage (rank 0 uploads it every few seconds) is read whole."""
        if is_uri(self.path):
            try:
                return read_bytes(self.path)[self.offset:]
            except FileNotFoundError:
                return b""
        path = Path(self.path)
        if not path.is_file():
            return b""
        with path.open("rb") as f:
            f.seek(self.offset)
            return f.read()

    def _read(self) -> None:
        complete = complete_lines(self._unread())  # a line still being written waits for the next poll
        self.offset += len(complete)
        for record in parse_records(complete):
            try:
                text = self.lines.line(record)
            except (KeyError, TypeError, ZeroDivisionError):
                continue  # a record of another version: the file is the record, this only a view of it
            if text:
                log.info(text)
