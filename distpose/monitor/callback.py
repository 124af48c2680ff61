"""The Ray Train controller's share of a run's metrics and record: evaluation results, and worker-group failures,
which it also appends to the run's metrics.jsonl for the driver's console (the ranks' tracebacks stay in their logs).

Ray Train calls UserCallbacks in its controller process, which sees every report and every worker
failure of the run, whichever node the workers are on.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from ray.train import UserCallback

from distpose.metrics_log import append_record
from distpose.monitor.prometheus import RunMetrics

log = logging.getLogger(__name__)


ERROR_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b")
ERROR_CHARS = 400


def error_line(exc: BaseException) -> str:
    """One line for `exc`: the last line of its text that names an exception type (a worker's error comes wrapped in
    Ray's text and traceback), else its first line."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
    named = [line for line in lines if ERROR_LINE.match(line)]
    text = named[-1] if named else f"{type(exc).__name__}: {lines[0]}"
    return text if len(text) <= ERROR_CHARS else text[: ERROR_CHARS - 3] + "..."


class RunMetricsCallback(UserCallback):
    def __init__(self, enabled: bool, run: str, mode: str, record: str):
        """`record`: the run's metrics.jsonl."""
        self.enabled, self.run, self.mode, self.record = enabled, run, mode, record
        self._metrics: RunMetrics | None = None  # built in the controller, where the callback runs

    def _run_metrics(self) -> RunMetrics:
        if self._metrics is None:
            self._metrics = RunMetrics(self.enabled, self.run, self.mode)
        return self._metrics

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if metrics:
            self._run_metrics().evaluation(metrics[0])  # rank 0's: the ranks agree on evaluation

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        metrics = self._run_metrics()
        metrics.worker_group_failed()
        ranks = sorted(worker_exceptions)
        first = worker_exceptions[ranks[0]] if ranks else None
        try:
            append_record(self.record, "failure", failure=metrics.failures_so_far, ranks=ranks,
                          error=error_line(first) if first is not None else "the worker group failed")
        except OSError as exc:  # storage out of reach (maybe why the workers failed): the ranks' logs say it all
            log.warning("could not record failure %d in %s: %s", metrics.failures_so_far, self.record, exc)
