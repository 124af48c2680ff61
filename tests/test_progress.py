"""The driver's console lines, made from rank 0's metrics.jsonl records: which steps are shown, the rate and
ETA they state, the evaluation line, and a file followed as it grows."""

import json
import logging
import time

import pytest

from distpose.config import load_config
from distpose.train.progress import FollowProgress, ProgressLines


def step(n: int, t: float, per_epoch: int = 10, loss: float = 0.5) -> dict:
    return {"kind": "step", "epoch": (n - 1) // per_epoch + 1, "step": n, "time": t, "loss": loss, "lr": 1e-3,
            "step_time": 0.5, "data_wait": 0.1, "samples_per_s": 64.0}


def config():
    return load_config(None, ["data.batches_per_epoch=10", "train.epochs=3", "train.log_every=4",
                              "data.batch_size=32"])


def test_lines_every_log_every_steps_and_at_each_epochs_end_with_rate_and_eta():
    lines = ProgressLines(config())
    start = {"kind": "start", "world_size": 2, "device": "cpu", "micro_batch": 16, "resumed_from": "fresh start",
             "epoch": 0, "step": 0}
    assert lines.line(start).endswith("2 worker(s) on cpu, global batch 32 (16 x 2 x 1), fp32, ZeRO 0; fresh start")
    # one step every 2 s from t=100 (the first step began at t=99.5): 2 s per step, 32 samples per step
    shown = {n: lines.line(step(n, 100.0 + 2 * (n - 1))) for n in range(1, 31)}
    assert sorted(n for n, text in shown.items() if text) == [4, 8, 10, 14, 18, 20, 24, 28, 30]
    # step 4 at t=106: 6.5 s for 4 steps, 1.625 s per step, 26 steps left
    assert shown[4] == ("epoch 1/3 step 4/10 [4/30 13%] loss 0.5 lr 1.00e-03 19.7 samples/s (data wait 20%) "
                        "ETA 0:42")
    assert shown[30].startswith("epoch 3/3 step 10/10 [30/30 100%]") and shown[30].endswith("ETA 0:00")
    evaluation = {"kind": "eval", "epoch": 1, "val/visible/pck@0.1": 0.5, "val/AP": 0.25, "skipped_samples": 2}
    assert lines.line(evaluation) == ("eval after epoch 1: visible/pck@0.1 0.5000, AP 0.2500 (training: 2 corrupt "
                                      "samples skipped so far, logs/ name them)")
    lost = {**evaluation, "val/lost_instances": 9.0, "val/unreadable_shards": "val-000001.tar"}
    assert lines.line(lost) == ("eval after epoch 1: visible/pck@0.1 0.5000, AP 0.2500; validation: 9 of the split's "
                                "instances not scored: unreadable shard(s) val-000001.tar (training: 2 corrupt samples "
                                "skipped so far, logs/ name them)")


def test_a_resumed_attempt_measures_its_rate_from_its_own_first_step():
    lines = ProgressLines(config())
    lines.line({"kind": "start", "world_size": 1, "resumed_from": "x", "epoch": 1, "step": 10})
    # resumed after step 13: its first step (14) took 0.5 s, so the 16 left are 8 s away
    assert lines.line(step(14, 1000.0)).endswith("ETA 0:08") and lines.first == (999.5, 13)
    assert lines.line(step(18, 1004.0)).endswith("ETA 0:11")  # 4.5 s for 5 steps, 12 to go


def test_the_follower_prints_records_appended_after_it_started(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(step(4, 1.0)) + "\n")  # an earlier attempt's: not shown again
    caplog.set_level(logging.INFO, logger="distpose.train.progress")
    with FollowProgress(path, config()):
        with path.open("a") as f:
            f.write(json.dumps(step(8, 10.0)) + "\n" + json.dumps(step(10, 12.0))[:20])  # the last, half written
        time.sleep(1.2)
        with path.open("a") as f:
            f.write(json.dumps(step(10, 12.0))[20:] + "\n")
    shown = [r.getMessage() for r in caplog.records]
    assert [text.split(" [")[0] for text in shown] == ["epoch 1/3 step 8/10", "epoch 1/3 step 10/10"]


@pytest.mark.parametrize("seconds, text", [(5, "0:05"), (65, "1:05"), (3725, "1:02:05")])
def test_clock(seconds, text):
    from distpose.train.progress import _clock

    assert _clock(seconds) == text


def test_a_failure_record_names_the_ranks_the_error_and_what_happens_next():
    lines = ProgressLines(load_config(None, ["train.max_failures=2", "train.run_name=r"]))
    failure = {"kind": "failure", "failure": 1, "ranks": [0], "error": "OSError: Timeout was reached"}
    assert lines.line(failure) == ("[distpose] r: the workers failed (rank(s) [0]: OSError: Timeout was reached); "
                                   "failure 1 of train.max_failures=2: Ray Train restarts them from the latest "
                                   "checkpoint (logs/rank<r>.log has each rank's traceback)")
    assert "the run stops" in lines.line({**failure, "failure": 3})


def test_the_follower_outlives_a_record_out_of_reach(tmp_path, caplog, monkeypatch):
    """Object storage down: the follower thread died of the OSError (a traceback on the console, and no progress
    line for the rest of the run). It now warns once and reads the record again when it can."""
    path = tmp_path / "metrics.jsonl"
    path.write_text("")
    caplog.set_level(logging.INFO, logger="distpose.train.progress")
    follower = FollowProgress(path, config())
    read, outage = follower._unread, [3]

    def flaky() -> bytes:
        if outage[0]:
            outage[0] -= 1
            raise OSError("When reading information for key 'runs/r/metrics.jsonl': Timeout was reached")
        return read()

    monkeypatch.setattr(follower, "_unread", flaky)
    with follower:
        with path.open("a") as f:
            f.write(json.dumps(step(4, 1.0)) + "\n")
        time.sleep(2.5)
    shown = [r.getMessage() for r in caplog.records]
    assert len([t for t in shown if "cannot read" in t]) == 1 and "Timeout was reached" in shown[0]
    assert shown[-1].startswith("epoch 1/3 step 4/10")
