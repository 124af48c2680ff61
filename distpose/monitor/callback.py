"""The Ray Train controller's share of a run's metrics: evaluation results and worker-group failures.

Ray Train calls UserCallbacks in its controller process, which sees every report and every worker
failure of the run, whichever node the workers are on.
"""

from __future__ import annotations

from typing import Any

from ray.train import UserCallback

from distpose.monitor.prometheus import RunMetrics


class RunMetricsCallback(UserCallback):
    def __init__(self, enabled: bool, run: str, mode: str):
        self.enabled, self.run, self.mode = enabled, run, mode
        self._metrics: RunMetrics | None = None  # built in the controller, where the callback runs

    def _run_metrics(self) -> RunMetrics:
        if self._metrics is None:
            self._metrics = RunMetrics(self.enabled, self.run, self.mode)
        return self._metrics

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if metrics:
            self._run_metrics().evaluation(metrics[0])  # rank 0's: the ranks agree on evaluation

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        self._run_metrics().worker_group_failed()
