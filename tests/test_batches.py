"""A rank's training stream restarted at a step draws what a stream started there draws: what makes a resumed run
exact (tests/test_exact_resume.py runs it end to end)."""

import shutil

import pytest
import torch
from helpers import corrupt_jpeg_in_shard

from distpose.config import load_config
from distpose.train.batches import TrainingBatches


def config(shards, source: str):
    return load_config(None, [f"data.source={source}", f"data.shards={shards}", "model.backbone=cnn_small",
                              "data.input_size=[64,48]", "data.heatmap_size=[16,12]", "data.batch_size=8",
                              "data.loader_workers=1", "train.workers=2", "data.batches_per_epoch=4"])


def take(batches: TrainingBatches, n: int) -> list[dict[str, torch.Tensor]]:
    return [next(batches) for _ in range(n)]


def same(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> bool:
    return all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize("source", ["shards", "random"])
def test_a_stream_restarted_at_a_step_draws_what_one_started_there_draws(synth_shards, source):
    cfg = config(synth_shards, source)
    running = TrainingBatches(cfg, 1, 2, 0)
    first = take(running, 5)
    running.restart(5)
    after_restart = take(running, 6)
    started_there = TrainingBatches(cfg, 1, 2, 5)
    assert same(take(started_there, 6), after_restart)
    # Without the restart, the shard stream would go on drawing other batches: the restart is what makes a resume
    # exact. Random batches are a function of the step alone, restarted or not.
    going_on = TrainingBatches(cfg, 1, 2, 0)
    take(going_on, 5)
    assert same(take(going_on, 6), after_restart) == (source == "random")
    assert not same(first[:1], after_restart[:1])


def test_skips_are_counted_across_restarts(synth_shards, tmp_path):
    """The skip counts a run reports are running totals: a restart keeps the counts of the stream it drops."""
    shards = tmp_path / "shards"
    shutil.copytree(synth_shards, shards)
    for shard in shards.glob("train-*.tar"):
        corrupt_jpeg_in_shard(shard)
    batches = TrainingBatches(config(shards, "shards"), 0, 2, 0)
    counts = []
    for step in range(1, 4):
        take(batches, 4)
        counts.append(batches.skipped["corrupt JPEG"])
        batches.restart(step)
    print(f"corrupt JPEGs skipped, after each of 3 streams: {counts}")
    assert 0 < counts[0] < counts[1] < counts[2]
