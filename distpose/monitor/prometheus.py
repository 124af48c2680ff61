"""Prometheus metrics of training runs, exported through Ray's per-node metrics agent.

Why Ray's agent (ray.util.metrics) rather than a prometheus_client server per worker: every Ray node
already runs one metrics endpoint (`ray start --metrics-export-port`), and the head node keeps a
Prometheus file-discovery list of the endpoints of all live nodes (`prom_metrics_service_discovery.json`
in the session directory), so a Prometheus server finds new nodes by itself and scrapes one endpoint
per node, with Ray's own node metrics beside ours. Per-worker servers would need a port per rank and a
discovery mechanism of our own. The price: a value reaches the endpoint within Ray's report interval
(`metrics_report_interval_ms`, 10 s by default), and Ray prefixes every name with `ray_`.

Exported series (names as Prometheus sees them are in EXPORTED_NAMES):
- per worker, labelled run, mode, rank: samples (counter), step time and data-wait time (histograms),
  loss, lr, epoch (gauges), skipped corrupt samples (counter, by reason), checkpoint save time
  (histogram), the times of the rank's latest progress and latest checkpoint (gauges, Unix seconds),
  GPU memory allocated and its peak (gauges, CUDA only);
- per run, from the driver and the Ray Train controller: run state (gauge, 1 for the current state),
  the latest evaluation results (gauge, by metric), and worker-group failures so far (gauge).

Timestamps rather than counters for progress and checkpoints: `time() - gauge` is the age alerts and panels
need, and a rank blocked in a collective keeps re-sending its last value (the held-gauge thread runs while
the main thread waits), so a stalled run shows up as a growing age instead of a vanished series.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Mapping
from typing import Any

log = logging.getLogger(__name__)

RUN_STATES = ("running", "finished", "failed", "interrupted")

STEP_SECONDS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]
WAIT_SECONDS = [0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0]
SAVE_SECONDS = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0]

# name -> (kind, description, extra tag keys, histogram boundaries)
WORKER_METRICS: dict[str, tuple[str, str, tuple[str, ...], list[float] | None]] = {
    "distpose_train_samples": ("counter", "Training samples this rank has stepped on", (), None),
    "distpose_train_step_seconds": ("histogram", "Wall time of one optimizer step", (), STEP_SECONDS),
    "distpose_train_data_wait_seconds": ("histogram", "Time a step waited for its batches", (), WAIT_SECONDS),
    "distpose_train_loss": ("gauge", "Training loss of the latest step, averaged over ranks", (), None),
    "distpose_train_lr": ("gauge", "Learning rate of the latest step", (), None),
    "distpose_train_epoch": ("gauge", "Epochs completed", (), None),
    "distpose_train_skipped_samples": ("counter", "Corrupt or unusable samples skipped", ("reason",), None),
    "distpose_checkpoint_save_seconds": ("histogram", "Time to save and report a checkpoint", (), SAVE_SECONDS),
    "distpose_train_progress_timestamp_seconds": ("gauge", "Unix time of this rank's latest progress: its start, "
                                                  "a step, an evaluation or a checkpoint", (), None),
    "distpose_train_checkpoint_timestamp_seconds": ("gauge", "Unix time of this rank's latest checkpoint (its "
                                                    "start, before the first)", (), None),
    "distpose_gpu_memory_bytes": ("gauge", "CUDA memory allocated by this rank (kind: current, peak)",
                                  ("kind",), None),
}
RUN_METRICS: dict[str, tuple[str, str, tuple[str, ...], list[float] | None]] = {
    "distpose_run_state": ("gauge", "1 for the run's current state, 0 for the others", ("state",), None),
    "distpose_eval": ("gauge", "Latest validation result, by metric name", ("metric",), None),
    "distpose_worker_group_failures": ("gauge", "Worker-group failures so far (0 from the start); each restarts "
                                       "the group from the latest checkpoint while train.max_failures allows",
                                       (), None),
}


def _exported(definitions: Mapping[str, tuple[str, str, tuple[str, ...], list[float] | None]]) -> set[str]:
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
    return {f"ray_{name}{suffix}" for name, (kind, *_) in definitions.items() for suffix in suffixes[kind]}


EXPORTED_NAMES = frozenset(_exported(WORKER_METRICS) | _exported(RUN_METRICS))


class _HeldGauges:
    """Re-sends every gauge's last value each second from a daemon thread. Ray's metrics agent drops a gauge
    series that no process has re-set within two of its report intervals (20 s by default), which would blank
    the run state, the evaluation and the epoch between their updates."""

    def __init__(self):
        self._values: dict[tuple[int, tuple[tuple[str, str], ...]], tuple[Any, float]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def set(self, gauge: Any, value: float, tags: dict[str, str]) -> None:
        gauge.set(value, tags)
        with self._lock:
            self._values[id(gauge), tuple(sorted(tags.items()))] = (gauge, value)
            if self._thread is None:
                self._thread = threading.Thread(target=self._resend, name="distpose-gauges", daemon=True)
                self._thread.start()

    def _resend(self) -> None:
        import ray

        while True:
            time.sleep(1.0)
            if not ray.is_initialized():  # a driver between runs: nothing to send to
                continue
            with self._lock:
                held = list(self._values.items())
            try:
                for (_, tags), (gauge, value) in held:
                    gauge.set(value, dict(tags))
            except Exception as exc:  # Ray shutting down under us: keep the thread, try again next second
                log.debug("re-sending gauges failed: %s", exc)


_GAUGES = _HeldGauges()


def _build(definitions, base_tags: tuple[str, ...]) -> dict[str, Any]:
    from ray.util import metrics

    built = {}
    for name, (kind, description, extra_tags, boundaries) in definitions.items():
        tags = (*base_tags, *extra_tags)
        if kind == "counter":
            built[name] = metrics.Counter(name, description, tag_keys=tags)
        elif kind == "gauge":
            built[name] = metrics.Gauge(name, description, tag_keys=tags)
        else:
            built[name] = metrics.Histogram(name, description, boundaries=boundaries, tag_keys=tags)
    return built


class _Series:
    """Metrics built from `definitions` for one set of tags (their keys are the metrics' tag keys). Disabled
    (monitor.enabled false), none are built and every method does nothing."""

    def __init__(self, enabled: bool, definitions, tags: dict[str, str]):
        self.tags = tags
        self._metrics = _build(definitions, tuple(tags)) if enabled else None

    def _set(self, gauge: str, value: float, **extra_tags: str) -> None:
        """A gauge, held (re-sent every second) at `value`."""
        if self._metrics is not None:
            _GAUGES.set(self._metrics[gauge], value, {**self.tags, **extra_tags})


class WorkerMetrics(_Series):
    """One rank's training metrics."""

    def __init__(self, enabled: bool, run: str, mode: str, rank: int):
        super().__init__(enabled, WORKER_METRICS, {"run": run, "mode": mode, "rank": str(rank)})
        self._skipped_seen: Counter = Counter()
        now = time.time()
        self._set("distpose_train_progress_timestamp_seconds", now)
        self._set("distpose_train_checkpoint_timestamp_seconds", now)

    def progressed(self) -> None:
        """An evaluation (or anything else long that is not a step) has finished."""
        self._set("distpose_train_progress_timestamp_seconds", time.time())

    def step(self, samples: int, step_time: float, data_wait: float, loss: float, lr: float) -> None:
        if self._metrics is None:
            return
        m, tags = self._metrics, self.tags
        m["distpose_train_samples"].inc(samples, tags)
        m["distpose_train_step_seconds"].observe(step_time, tags)
        m["distpose_train_data_wait_seconds"].observe(data_wait, tags)
        self._set("distpose_train_loss", loss)
        self._set("distpose_train_lr", lr)
        self.progressed()

    def epoch(self, epoch: int, skipped: Mapping[str, int]) -> None:
        """After an epoch: the epoch count, and the loader's running skip counts (only the increase is added)."""
        if self._metrics is None:
            return
        self._set("distpose_train_epoch", epoch)
        for reason, count in skipped.items():
            new = count - self._skipped_seen[reason]
            if new > 0:
                self._metrics["distpose_train_skipped_samples"].inc(new, {**self.tags, "reason": reason})
                self._skipped_seen[reason] = count

    def checkpoint_saved(self, seconds: float) -> None:
        if self._metrics is None:
            return
        self._metrics["distpose_checkpoint_save_seconds"].observe(seconds, self.tags)
        now = time.time()
        self._set("distpose_train_checkpoint_timestamp_seconds", now)
        self._set("distpose_train_progress_timestamp_seconds", now)

    def gpu_memory(self, device) -> None:
        import torch

        if self._metrics is None or device.type != "cuda":
            return
        self._set("distpose_gpu_memory_bytes", torch.cuda.memory_allocated(device), kind="current")
        self._set("distpose_gpu_memory_bytes", torch.cuda.max_memory_allocated(device), kind="peak")


class RunMetrics(_Series):
    """A run's state and evaluation results, set from the driver and the Ray Train controller. Dashboards and
    alerts take the max over the processes that set a series (the driver sets the failure count to 0 at the
    start, the controller, which sees the failures, raises it)."""

    def __init__(self, enabled: bool, run: str, mode: str):
        super().__init__(enabled, RUN_METRICS, {"run": run, "mode": mode})
        self._failures = 0

    def state(self, current: str) -> None:
        for state in RUN_STATES:
            self._set("distpose_run_state", float(state == current), state=state)

    def evaluation(self, results: Mapping[str, float]) -> None:
        """`results`: metrics as reported by rank 0; the `val/...` ones are exported, without the prefix."""
        for key, value in results.items():
            if key.startswith("val/") and isinstance(value, (int, float)):
                self._set("distpose_eval", float(value), metric=key[4:])

    def failures(self, count: int) -> None:
        self._set("distpose_worker_group_failures", count)

    def worker_group_failed(self) -> None:
        self._failures += 1
        self.failures(self._failures)

    @property
    def failures_so_far(self) -> int:
        return self._failures

    def wait_until_exported(self, current: str, timeout: float = 20.0) -> bool:
        """Block until this node's endpoint shows `current` as the run's state (at most `timeout` s). A driver
        about to disconnect from a cluster that stays up calls this: a gauge reaches the endpoint only at Ray's
        next metrics report (every 10 s by default), so the final state would otherwise leave with the driver."""
        if self._metrics is None:
            return True
        url = local_metrics_endpoint()
        if url is None:
            log.warning("this node has no metrics endpoint: the run's final state (%s) is not exported", current)
            return False
        deadline = time.monotonic() + timeout
        while True:
            try:
                samples = scrape(url)
            except OSError:
                samples = []
            if any(s.name == "ray_distpose_run_state" and s.value == 1 and s.labels.get("state") == current
                   and s.labels.get("run") == self.tags["run"] for s in samples):
                return True
            if time.monotonic() > deadline:
                log.warning("the run's final state (%s) did not reach this node's metrics endpoint %s within %g s",
                            current, url, timeout)
                return False
            time.sleep(0.5)


def metrics_endpoints() -> list[str]:
    """The metrics endpoint of every live node of the connected cluster."""
    import ray

    return [_endpoint(node) for node in ray.nodes() if node.get("Alive") and node.get("MetricsExportPort")]


def local_metrics_endpoint() -> str | None:
    """The endpoint of the node this process runs on, which exports this process's metrics."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    return next((_endpoint(n) for n in ray.nodes() if n["NodeID"] == here and n.get("MetricsExportPort")), None)


def _endpoint(node: Mapping[str, Any]) -> str:
    return f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"


def scrape(url: str, timeout: float = 10.0) -> list:
    """Every sample an endpoint serves, parsed by prometheus_client's own parser (OSError if it does not answer)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=timeout) as response:
        text = response.read().decode()
    return [s for family in text_string_to_metric_families(text) for s in family.samples]
