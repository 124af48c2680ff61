"""Benchmarks run end to end at toy sizes (their figures come from `distpose bench ...`, not from tests)."""

from distpose.bench.crf import run as run_crf


def test_crf_benchmark_runs_and_formulations_agree():
    report = run_crf(batch=1, size=(8, 6), radii=(1, 2), repeats=1)
    assert report["reference_formulation"] == "shift" and report["joints"] == 17
    assert [row["radius"] for row in report["results"]] == [1, 2]
    for row in report["results"]:
        assert row["shift_forward_s"] > 0 and row["unfold_forward_backward_s"] > 0
        assert row["max_abs_log_marginal_difference"] < 1e-3
