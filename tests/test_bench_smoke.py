"""Benchmarks run end to end at toy sizes (their figures come from `distpose bench ...`, not from tests)."""

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
    """The probability-space shortcut underflows where the exact message does not (DESIGN.md)."""
    belief = -((torch.arange(32.0)[:, None] - 5) ** 2 + (torch.arange(24.0)[None, :] - 4) ** 2)[None] / 2.0
    pairwise = -(torch.arange(-7.0, 8)[:, None] ** 2 + torch.arange(-7.0, 8)[None, :] ** 2)[None] / 8.0
    exact, _ = message(belief.double(), pairwise.double())
    approx, _ = conv_message(belief, pairwise, False)
    assert torch.isfinite(exact).all()
    assert (~torch.isfinite(approx)).sum() > 50
