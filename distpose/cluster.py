"""The Ray session every command shares: connect to a cluster or start a local Ray, say where its
Prometheus metrics are, and disconnect only what was connected here."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from distpose.config import MonitorConfig
from distpose.errors import UserError
from distpose.monitor.prometheus import metrics_endpoints
from distpose.reaper import DONE as REAPER_DONE

log = logging.getLogger(__name__)

SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
AUTH_MODE_ENV = "RAY_AUTH_MODE"
CONNECT_TIMEOUT_S = 10.0
AUTH_PROBE_S = 3.0
REAPER_WAIT_S = 5.0
TOKEN_FIX = ("give this machine the head node's token (`ray get-auth-token` there prints it) in RAY_AUTH_TOKEN or "
             "~/.ray/auth_token")


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Fail in one line when nothing listens at a `host:port` cluster address: ray.init would retry
    its GCS connection for minutes, printing a raw line each time. ("auto" is left to Ray.)"""
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        if target != "auto":
            raise UserError(f"cluster address {address!r}: expected HOST:PORT (the head node's GCS, 6379 by "
                            f"default) or 'auto'")
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as exc:
        reason = f"no answer within {timeout:g} s" if isinstance(exc, TimeoutError) else \
            (exc.strerror or str(exc)).lower()
        raise UserError(f"cannot connect to the Ray cluster at {address}: {reason} (is `ray start --head` "
                        f"running there, and its port open?)") from None


def token_required(address: str, timeout: float = AUTH_PROBE_S) -> bool:
    """Whether the cluster at `address` requires Ray's authentication token; one token is then needed, else
    connecting fails in one line naming the fix. Ray joins such a cluster only with RAY_AUTH_MODE=token set, and
    otherwise retries for about 20 s, printing a raw line each time, before a message that says nothing of tokens.
    Asking the GCS once (the call every client makes first) tells within a round trip. (Ray Client's `ray://` and
    "auto" are left to Ray.)"""
    if address.startswith("ray://") or address == "auto":
        return False
    import grpc
    from ray._raylet import AuthenticationTokenLoader
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)

        def refused(metadata: list[tuple[str, str]] | None) -> bool:
            try:
                stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=timeout, metadata=metadata)
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                    return True
                if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    raise UserError(f"the Ray cluster at {address} did not answer within {timeout:g} s (is it a "
                                    f"Ray head node's GCS port?)") from None
                return False  # anything else is Ray's to report
            return False

        if not refused(None):
            return False
        if os.environ.get(AUTH_MODE_ENV, "").lower() == "disabled":
            raise UserError(f"the Ray cluster at {address} requires an authentication token, but {AUTH_MODE_ENV}="
                            f"disabled here: unset it, and {TOKEN_FIX}")
        header = AuthenticationTokenLoader.instance().get_token_for_http_header(ignore_auth_mode=True)
        if not header:
            raise UserError(f"the Ray cluster at {address} requires an authentication token and this machine has "
                            f"none: {TOKEN_FIX}")
        if refused(list(header.items())):
            raise UserError(f"the Ray cluster at {address} rejected this machine's authentication token "
                            f"(RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token, in that order): {TOKEN_FIX}")
    return True


@contextlib.contextmanager
def token_authentication(required: bool) -> Iterator[None]:
    """With `required`, Ray's token mode for this process and what it starts, for the duration. Ray reads the mode
    into its cached configuration, so that is read again on the way in and out."""
    if not required:
        yield
        return
    from ray._raylet import Config

    try:
        with environment(AUTH_MODE_ENV, "token"):
            Config.initialize("")
            yield
    finally:
        Config.initialize("")


def verbose() -> bool:
    """`-v`: Ray's and the workers' own output streams to the console too."""
    return logging.getLogger("distpose").isEnabledFor(logging.DEBUG)


def quiet() -> bool:
    """`-q`: warnings and errors only, the libraries' progress output included."""
    return not logging.getLogger("distpose").isEnabledFor(logging.INFO)


@contextlib.contextmanager
def log_file(path: Path) -> Iterator[None]:
    """Every log record of this process (distpose's and the libraries') also goes to `path`, at any
    console verbosity."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root, distpose = logging.getLogger(), logging.getLogger("distpose")
    level = distpose.level
    root.addHandler(handler)
    distpose.setLevel(logging.DEBUG if verbose() else logging.INFO)
    try:
        yield
    finally:
        root.removeHandler(handler)
        distpose.setLevel(level)
        handler.close()


def is_local(address: str | None) -> bool:
    """Whether a command given this address starts its own Ray on this machine."""
    return address is None and "RAY_ADDRESS" not in os.environ


def connected() -> bool:
    return "ray" in sys.modules and sys.modules["ray"].is_initialized()


def _count(amount: float, resource: str) -> str:
    return f"{amount:g} {resource}{'' if amount == 1 else 's'}"


def check_resources(need: dict[str, tuple[float, str]], address: str | None) -> None:
    """Before Ray starts: a local Ray (this machine) or the Ray already connected must hold `need`
    ({"GPU": (2, "the settings asking for them")}) in total, or the run would wait for workers that can
    never start. A cluster not yet connected is checked by `warn_if_short` once connected: an autoscaler
    may still add nodes there."""
    if connected():
        have, where, hint = sys.modules["ray"].cluster_resources(), "the connected Ray cluster", ""
    elif is_local(address):
        import torch

        have = {"CPU": len(os.sched_getaffinity(0)), "GPU": torch.cuda.device_count()}
        where, hint = "this machine", " (no cluster given: --address or RAY_ADDRESS)"
    else:
        return
    for resource, (amount, what) in need.items():
        if have.get(resource, 0) < amount:
            raise UserError(f"{what} needs {_count(amount, resource)}, but {where} has {have.get(resource, 0):g}{hint}")


def warn_if_short(need: dict[str, tuple[float, str]], wait_s: float) -> None:
    """On a cluster without the resources yet: say what the run will wait for, and for how long."""
    have = sys.modules["ray"].cluster_resources()
    for resource, (amount, what) in need.items():
        if have.get(resource, 0) < amount:
            log.warning("%s needs %s, but the cluster has %g now: each start of the workers waits up to %g s "
                        "for nodes to join", what, _count(amount, resource), have.get(resource, 0), wait_s)


@contextlib.contextmanager
def ray_cluster(address: str | None = None, monitor: MonitorConfig | None = None) -> Iterator[bool]:
    """Connect to `address` (or RAY_ADDRESS), else start a local Ray; reuse one already connected.
    Only a connection made here is closed here. A local Ray's metrics endpoint follows `monitor`
    (a cluster's follows its `ray start` options). Yields whether leaving disconnects from a cluster
    that stays up (then the last metrics should reach its endpoint first)."""
    monitor = monitor or MonitorConfig()
    local = is_local(address)
    import ray

    if ray.is_initialized():
        yield False
        return
    required = False
    if not local:
        check_reachable(address or os.environ["RAY_ADDRESS"])
        required = token_required(address or os.environ["RAY_ADDRESS"])
    with (single_machine(local and monitor.host == "127.0.0.1"), own_temporary_files(local),
          token_authentication(required), _connected(address, monitor, local) as leaves):
        yield leaves


@contextlib.contextmanager
def environment(name: str, value: str | None) -> Iterator[None]:
    """The environment variable `name` set to `value` (None: left as it is) for the duration, then back to what it
    was; a process started meanwhile (Ray's, a loader's) inherits the value."""
    previous = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


@contextlib.contextmanager
def single_machine(loopback: bool) -> Iterator[None]:
    """With `loopback`, a local Ray that listens on 127.0.0.1 only. On Linux Ray replaces a loopback node address
    by a routable one, and its servers then listen on every interface; Ray's one-machine switch prevents that. Ray
    reads it from the environment when it is imported (this process may have imported ray already, so the value
    read then is set too) and when its own processes start."""
    if not loopback:
        yield
        return
    from ray._private import ray_constants

    previous, ray_constants.ENABLE_RAY_CLUSTER = ray_constants.ENABLE_RAY_CLUSTER, False
    try:
        with environment(SINGLE_MACHINE_ENV, "0"):
            yield
    finally:  # a later Ray of this process may be a cluster's node
        ray_constants.ENABLE_RAY_CLUSTER = previous


@contextlib.contextmanager
def own_temporary_files(local: bool) -> Iterator[None]:
    """With `local`, the processes of the Ray started meanwhile keep their temporary files in a directory of their
    own, removed once Ray has stopped: Ray stops its processes without their exit handlers, so what they leave in
    the temporary directory stays there (the dashboard's multiprocessing folder, pymp-*, on every start). Ray's own
    directory (sessions, logs, locks) stays where Ray puts it without this."""
    if not local:
        yield
        return
    from ray._common.utils import get_default_system_temp_dir

    tempfile.gettempdir()  # this process keeps the one it has: tempfile reads the environment once
    directory = tempfile.mkdtemp(prefix="distpose-ray-tmp-")
    # Kills the local Ray's processes and removes the directory if this process dies without the finally below
    # (SIGKILL). It reads /proc: elsewhere (macOS) there is none.
    reaper = subprocess.Popen([sys.executable, "-m", "distpose.reaper", directory], stdin=subprocess.PIPE,
                              start_new_session=True) if Path("/proc/self/stat").exists() else None
    try:
        with environment("RAY_TMPDIR", get_default_system_temp_dir()), environment("TMPDIR", directory):
            yield
    finally:
        if reaper is not None:
            _dismiss(reaper)
        shutil.rmtree(directory, ignore_errors=True)


def _dismiss(reaper: subprocess.Popen) -> None:
    """Tell the reaper this process ends normally (Ray has stopped its processes), and wait for it to leave."""
    assert reaper.stdin is not None
    with contextlib.suppress(OSError):
        reaper.stdin.write(REAPER_DONE)
        reaper.stdin.close()
    try:
        reaper.wait(timeout=REAPER_WAIT_S)
    except subprocess.TimeoutExpired:
        reaper.kill()


@contextlib.contextmanager
def _connected(address: str | None, monitor: MonitorConfig, local: bool) -> Iterator[bool]:
    import ray

    if not verbose():  # Ray's notices on connecting (token auth, usage stats) are for -v
        logging.getLogger("ray").setLevel(logging.ERROR)
    try:
        # Ray Train would re-route every print in the workers (pycocotools' included) through its
        # logger, doubling our console lines and undoing pycocotools' silencing.
        ray.init(address=address, configure_logging=False, log_to_driver=verbose(),
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


def torch_trainer(*args: Any, **kwargs: Any) -> Any:
    """A Ray TorchTrainer whose Ctrl-C stops the run now. Ray's own handler asks the controller to abort
    and blocks on its answer, which does not come while the controller waits for workers that cannot be
    placed, and further Ctrl-C queue behind that wait; killing the controller takes the workers with it,
    and the latest checkpoint stays on storage for a rerun."""
    import ray
    from ray.train.torch import TorchTrainer

    class Trainer(TorchTrainer):
        def _register_sigint_handler(self, controller: Any) -> None:
            def stop(signum: int, frame: Any) -> None:
                ray.kill(controller, no_restart=True)
                raise KeyboardInterrupt

            signal.signal(signal.SIGINT, stop)

    return Trainer(*args, **kwargs)


def fit(trainer: Any) -> Any:
    """`trainer.fit()`, with the caller's SIGINT handler back afterwards: fit() leaves its handler
    installed, and the handler's reference keeps the finished run's controller actor alive."""
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGINT) if main_thread else None
    try:
        return trainer.fit()
    except SystemExit:  # Ray's own handler, were it installed, ends a third Ctrl-C this way
        raise KeyboardInterrupt from None
    finally:
        if previous is not None:  # None: not the main thread, or a handler installed outside Python
            signal.signal(signal.SIGINT, previous)
