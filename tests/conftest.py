import os
from pathlib import Path

import pytest

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


def pytest_collection_modifyitems(items):
    """A test that needs the shared Ray instance, directly or through a fixture, is an integration test:
    `-m "not integration"` never starts Ray."""
    for item in items:
        if "ray_session" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for every integration test (starting Ray costs ~10 s here)."""
    ray = pytest.importorskip("ray")
    # The dashboard serves the State API that Ray Train's PlacementGroupCleaner polls: without it a Tune
    # trial's placement group outlives the trial and later trials wait for CPUs forever.
    # Metrics reach the nodes' endpoints every second instead of every 10 s (tests/test_monitor.py).
    ray.init(num_cpus=4, include_dashboard=True, configure_logging=False, log_to_driver=False,
             _system_config={"metrics_report_interval_ms": 1000})
    yield ray
    ray.shutdown()
