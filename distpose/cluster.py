"""The Ray session every command shares: connect to a cluster or start a local Ray, say where its
Prometheus metrics are, and disconnect only what was connected here."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator

from distpose.config import MonitorConfig
from distpose.errors import UserError
from distpose.monitor.metrics import metrics_endpoints

log = logging.getLogger(__name__)

SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@contextlib.contextmanager
def ray_cluster(address: str | None = None, monitor: MonitorConfig | None = None) -> Iterator[bool]:
    """Connect to `address` (or RAY_ADDRESS), else start a local Ray; reuse one already connected.
    Only a connection made here is closed here. A local Ray's metrics endpoint follows `monitor`
    (a cluster's follows its `ray start` options). Yields whether leaving disconnects from a cluster
    that stays up (then the last metrics should reach its endpoint first)."""
    monitor = monitor or MonitorConfig()
    local = address is None and "RAY_ADDRESS" not in os.environ
    # On Linux Ray replaces a loopback node address by a routable one, and its metrics agent then listens on
    # every interface; this switch (read when ray is first imported) keeps a one-machine Ray on loopback.
    loopback = local and monitor.host == "127.0.0.1"
    imported_before = "ray" in sys.modules
    if loopback and not imported_before:
        os.environ.setdefault(SINGLE_MACHINE_ENV, "0")
    import ray

    if ray.is_initialized():
        yield False
        return
    if loopback and imported_before and os.environ.get(SINGLE_MACHINE_ENV) != "0":
        log.warning("the metrics endpoint of this local Ray will listen on every interface, not only 127.0.0.1: "
                    "ray was imported before distpose could set %s=0 (set it before importing ray)",
                    SINGLE_MACHINE_ENV)
    try:
        # Ray Train would re-route every print in the workers (pycocotools' included) through its
        # logger, doubling our console lines and undoing pycocotools' silencing.
        ray.init(address=address, configure_logging=False,
                 runtime_env={"env_vars": {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}},
                 **({"_metrics_export_port": monitor.port or None} if local else {}))
    except (ConnectionError, ValueError) as exc:
        raise UserError(f"cannot connect to the Ray cluster at {address}: {exc}") from None
    try:
        if monitor.enabled:
            log.info(metrics_banner())
        yield not local
    finally:
        ray.shutdown()


def metrics_banner() -> str:
    endpoints = metrics_endpoints()
    shown = ", ".join(endpoints[:3]) + (f" and {len(endpoints) - 3} more" if len(endpoints) > 3 else "")
    return (f"[distpose] Prometheus metrics: {shown or 'no endpoint (is ray[default] installed?)'}; "
            f"a Prometheus server finds every node's through prom_metrics_service_discovery.json in "
            f"the head node's Ray session directory (launch/prometheus.yml)")
