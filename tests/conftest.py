import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import free_port

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False
# Without a GPU the Triton kernels run in Triton's interpreter, which must be chosen before triton
# is first imported.
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

COCO_MINI = Path(__file__).parent / "data" / "coco_val2017_mini"


@pytest.fixture(scope="session")
def coco_mini() -> Path:
    return COCO_MINI


@pytest.fixture(scope="session")
def synth_root(tmp_path_factory) -> Path:
    """A small synthetic COCO set shared by the data tests (generation is deterministic)."""
    from distpose.data.synth import generate_synthetic_coco

    root = tmp_path_factory.mktemp("synth")
    generate_synthetic_coco(root, num_train=24, num_val=18, seed=3, progress=False)
    return root


@pytest.fixture(scope="session")
def synth_shards(tmp_path_factory, synth_root) -> Path:
    """The synthetic set as shards: train in 5 shards, val in 5 shards (uneven instance counts)."""
    from distpose.data.shards import write_shards

    out = tmp_path_factory.mktemp("synth_shards")
    write_shards(synth_root, "train", out, samples_per_shard=5, progress=False)
    write_shards(synth_root, "val", out, samples_per_shard=4, progress=False)
    return out


@dataclass(frozen=True)
class ObjectStore:
    endpoint: str
    bucket: str
    pid: int  # the server's: a test may pause it (SIGSTOP) and let it go on (SIGCONT)

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint)


S3_ENV = {"AWS_ACCESS_KEY_ID": "distpose-test", "AWS_SECRET_ACCESS_KEY": "distpose-test",
          "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture(scope="session")
def object_store(tmp_path_factory):
    """A real S3-compatible server (moto's, a separate process) on 127.0.0.1 with one bucket, and the standard
    AWS environment variables pointing at it for the whole session (so Ray workers started later inherit
    them)."""
    port = free_port()
    log = tmp_path_factory.mktemp("s3") / "server.log"
    with open(log, "wb") as out:
        server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                  stdout=out, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in [*S3_ENV, "AWS_ENDPOINT_URL"]}
    os.environ.update(S3_ENV, AWS_ENDPOINT_URL=endpoint)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the S3 server did not start: {log.read_text()[-2000:]}") from None
                time.sleep(0.1)
        store = ObjectStore(endpoint, "distpose-test", server.pid)
        store.client().create_bucket(Bucket=store.bucket)
        yield store
    finally:
        server.terminate()
        server.wait(10)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session", autouse=True)
def object_store_scratch_removed():
    """Runs on object storage keep their logs in $TMPDIR/distpose-runs/<run name>/ on each node (here, one):
    the suite removes those its runs made."""
    scratch = Path(tempfile.gettempdir()) / "distpose-runs"
    before = set(scratch.iterdir()) if scratch.is_dir() else set()
    yield
    for made in (set(scratch.iterdir()) if scratch.is_dir() else set()) - before:
        shutil.rmtree(made, ignore_errors=True)


def pytest_collection_modifyitems(items):
    """A test that needs the shared Ray instance, directly or through a fixture, is an integration test:
    `-m "not integration"` never starts Ray."""
    for item in items:
        if "ray_session" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def ray_session(object_store):
    """One local Ray instance for every integration test (starting Ray costs ~10 s here). Its processes
    inherit the object store's environment variables, as a cluster's nodes would have them set."""
    ray = pytest.importorskip("ray")
    # The dashboard serves the State API that Ray Train's PlacementGroupCleaner polls: without it a Tune
    # trial's placement group outlives the trial and later trials wait for CPUs forever.
    # Metrics reach the nodes' endpoints every second instead of every 10 s (tests/test_monitor.py).
    # Ray Train's controller polls its workers every 2 s: up to 2 s at the start and end of every fit, in every
    # process that fits (the drivers the tests start inherit this).
    os.environ["RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"] = "0.2"
    ray.init(address="local", num_cpus=4, include_dashboard=True, configure_logging=False, log_to_driver=False,
             _system_config={"metrics_report_interval_ms": 1000})
    yield ray
    ray.shutdown()


# Ray Train's controller and its placement-group cleaner exit seconds after a run (once, 30 s was too short).
LEAK_GRACE_S = 60
# Ray's own helpers, holding no resources: one autoscaling coordinator per session, and Ray Train's detached
# placement-group cleaner, which once outlived by over a minute a controller killed by Ctrl-C while it was starting
# (once in about ten suite runs; the placement groups themselves are still checked).
RAY_HELPERS = {"_AutoscalingCoordinatorActor", "PlacementGroupCleaner"}


@pytest.fixture(autouse=True)
def leaves_nothing_on_the_cluster(request):
    """A test on the shared Ray must leave no actor and no placement group behind: a leaked reservation
    makes every later fit wait for CPUs (a whole suite once hung on one). Leftover placement groups are
    removed, so that the next test can run, and the test fails naming what it left."""
    if "ray_session" not in request.fixturenames:
        yield
        return
    import ray
    from ray.util import state

    def alive() -> dict[str, str]:
        return {a.actor_id: a.class_name for a in state.list_actors(
            filters=[("state", "!=", "DEAD")], limit=1000, raise_on_missing_output=False)}

    before = alive() if ray.is_initialized() else {}
    yield
    if not ray.is_initialized():
        return
    deadline = time.monotonic() + LEAK_GRACE_S
    while True:
        actors = [f"{name} ({actor[:8]})" for actor, name in alive().items()
                  if actor not in before and name not in RAY_HELPERS]
        groups = [g for g in state.list_placement_groups(limit=1000, raise_on_missing_output=False)
                  if g.state != "REMOVED"]
        if not actors and not groups or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    for group in groups:
        ray.util.remove_placement_group(
            ray.util.placement_group.PlacementGroup(ray.PlacementGroupID.from_hex(group.placement_group_id)))
    assert not actors and not groups, (f"left on the cluster after {LEAK_GRACE_S} s: actors {actors}, "
                                       f"placement groups {[g.placement_group_id[:8] for g in groups]}")
