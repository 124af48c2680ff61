"""Benchmarks run end to end at toy sizes (their figures come from `distpose bench ...`, not from tests)."""

import pytest
import torch
from distpose.kernels.tree_crf import message

from distpose.bench.crf import run as run_crf
from distpose.bench.kernel import conv_message
from distpose.bench.kernel import run as run_kernel


def test_crf_benchmark_runs_and_formulations_agree():
    report = run_crf(batch=1, size=(8, 6), radii=(1, 2), repeats=1)
    assert report["reference_formulation"] == "shift" and report["joints"] == 17
    assert [row["radius"] for row in report["results"]] == [1, 2]
    for row in report["results"]:
        assert row["shift_forward_s"] > 0 and row["unfold_forward_backward_s"] > 0
        assert row["max_abs_log_marginal_difference"] < 1e-3


def test_kernel_benchmark_reports_every_implementation():
    report = run_kernel(batch=1, size=(8, 6), radii=(1,), full_window=False, repeats=1)
    (row,) = report["results"]
    assert report["machine"]["device"] and report["edges"] == 16
    for name in ("triton", "shift", "unfold", "conv"):
        assert row[name]["status"] == "ok" and row[name]["forward_backward_ms"] > 0, name
        assert row[name]["max_abs_log_marginal_error"] < 1e-4, name
    assert "max_product_ms" in row["triton"] and "max_product_ms" not in row["conv"]
    assert row["triton_forward_backward_speedup_vs_fastest_pytorch"] > 0


def test_conv_baseline_loses_outputs_on_peaked_heatmaps():
    """The probability-space shortcut underflows where the exact message does not."""
    belief = -((torch.arange(32.0)[:, None] - 5) ** 2 + (torch.arange(24.0)[None, :] - 4) ** 2)[None] / 2.0
    pairwise = -(torch.arange(-7.0, 8)[:, None] ** 2 + torch.arange(-7.0, 8)[None, :] ** 2)[None] / 8.0
    exact, _ = message(belief.double(), pairwise.double())
    approx, _ = conv_message(belief, pairwise, False)
    assert torch.isfinite(exact).all()
    assert (~torch.isfinite(approx)).sum() > 50


@pytest.mark.integration
def test_train_benchmark_times_both_paths(ray_session, tmp_path):
    from distpose.bench.train import run as run_train
    from distpose.config import load_config

    cfg = load_config(None, ["model.backbone=cnn_small", "data.input_size=[64,48]", "data.heatmap_size=[16,12]",
                             "data.source=random", "data.batch_size=4", "train.log_every=1000"])
    report = run_train(cfg, warmup=2, steps=4)
    distributed, plain = report["distributed"], report["plain"]
    assert distributed["samples_per_s"] > 0 and plain["samples_per_s"] > 0
    assert report["ratio"] == pytest.approx(distributed["samples_per_s"] / plain["samples_per_s"])
    assert report["overhead"] == pytest.approx(1 - report["ratio"])  # one worker
    assert 0 <= distributed["data_wait_share"] < 1 and report["mfu"] is None  # no MFU without a GPU
    assert report["timed_steps"] == 4 and report["machine"]["device"] == "cpu"
