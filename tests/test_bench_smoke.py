"""Benchmarks run end to end at toy sizes (their figures come from `distpose bench ...`, not from tests)."""

import functools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from distpose.bench import ablation
from distpose.bench.crf import run as run_crf
from distpose.bench.kernel import conv_message
from distpose.bench.kernel import run as run_kernel
from distpose.config import find_config
from distpose.kernels.tree_crf import message


def test_crf_benchmark_runs_and_formulations_agree():
    report = run_crf(batch=1, size=(8, 6), radii=(1, 2), repeats=1)
    assert report["reference_formulation"] == "shift" and report["joints"] == 17
    assert [row["radius"] for row in report["results"]] == [1, 2]
    for row in report["results"]:
        assert row["shift_forward_s"] > 0 and row["unfold_forward_backward_s"] > 0
        assert row["max_abs_log_marginal_difference"] < 1e-3


def test_kernel_benchmark_reports_every_implementation():
    report = run_kernel(batch=2, size=(8, 6), radii=(1,), full_window=False, repeats=1)
    assert report["machine"]["device"] and report["edges"] == 16
    assert [row["tables"] for row in report["results"]] == ["shared", "per-sample"]
    for row in report["results"]:
        for name in ("triton", "shift", "unfold", "conv"):
            assert row[name]["status"].startswith("ok") and row[name]["forward_backward_ms"] > 0, name
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


def test_the_gpu_script_runs_every_step_in_its_dry_run(tmp_path):
    """benchmarks/gpu.sh --dry-run: the kernel tests, bench kernel and the plain training loop at toy size on
    this machine, in a process without Ray or DeepSpeed imported (about 20 s here)."""
    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "results"
    proc = subprocess.run(["bash", str(root / "benchmarks" / "gpu.sh"), "--dry-run", str(out)], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHON": sys.executable}, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    (summary,) = out.glob("gpu-checks-*-dry-run.json")
    checks = json.loads(summary.read_text())
    assert checks["dry_run"] is True and (device == "cuda" or checks["device"] == "cpu")
    assert [(s["step"], s["exit_status"]) for s in checks["steps"]] == [("tests", 0), ("kernel", 0), ("train", 0)]
    kernel = json.loads(next(out.glob("crf-kernel-*.json")).read_text())
    assert kernel["results"][0]["shift"]["status"] == "ok"
    train = json.loads(next(out.glob("train-plain-*.json")).read_text())
    assert train["plain"]["samples_per_s"] > 0 and "distributed" not in train


def test_a_failing_step_fails_the_gpu_script(tmp_path):
    """Steps that fail are recorded with their status, the later ones still run, and the script exits non-zero."""
    root = Path(__file__).resolve().parents[1]
    fake = tmp_path / "python"
    fake.write_text(f'#!/bin/sh\nif [ "$1" = -m ]; then exit 3; fi\nexec {sys.executable} "$@"\n')  # every step
    fake.chmod(0o755)
    out = tmp_path / "results"
    proc = subprocess.run(["bash", str(root / "benchmarks" / "gpu.sh"), "--dry-run", str(out)], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "PYTHON": str(fake)}, check=False)
    assert proc.returncode != 0
    steps = json.loads(next(out.glob("gpu-checks-*.json")).read_text())["steps"]
    assert [(s["step"], s["exit_status"]) for s in steps] == [("tests", 3), ("kernel", 3), ("train", 3)]


def test_cpu_by_process_charges_each_process_its_own_time(tmp_path):
    """benchmarks/cpu_by_process.py on a command whose child spins for a second and whose parent sleeps: the spin is
    charged to the child's title, not to the parent nor to the measuring process."""
    spin = "import time\nend = time.process_time() + 1.0\nwhile time.process_time() < end: pass\n"
    parent = f"import subprocess, sys, time; subprocess.run([sys.executable, '-c', {spin!r}]); time.sleep(0.3)"
    out = tmp_path / "cpu.json"
    proc = subprocess.run([sys.executable, str(Path(__file__).parents[1] / "benchmarks" / "cpu_by_process.py"),
                           "--out", str(out), "--", sys.executable, "-c", parent],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(out.read_text())
    assert report == json.loads(proc.stdout) and report["exit_code"] == 0 and report["wall_s"] >= 1.3
    spun = {name: s for name, s in report["cpu_s_by_process"].items() if name.startswith("python -c import time")}
    # up to one interval (0.2 s) of a process is lost between its last look and its end
    assert len(spun) == 1 and 0.7 <= next(iter(spun.values())) <= 1.5, report["cpu_s_by_process"]
    parents = [s for name, s in report["cpu_s_by_process"].items() if "subprocess" in name]
    assert sum(parents) < 0.5, report["cpu_s_by_process"]


def test_ablation_runs_are_named_by_variant_so_an_inserted_variant_reuses_no_other_run(monkeypatch):
    """A rerun in the same storage resumes each variant's finished run by its name: named by position, a variant
    inserted before others took the name of a finished run of another variant and silently reused its model."""
    config_dir = find_config("quick", directory=True)
    before = {name: cfg.train.run_name for name, cfg in ablation.variant_configs(config_dir, "cnn", ())}
    assert len(set(before.values())) == len(ablation.VARIANTS)
    inserted = ("crf, an inserted variant", "crf", ("model.crf_window=4",))
    monkeypatch.setattr(ablation, "VARIANTS", (ablation.VARIANTS[0], inserted, *ablation.VARIANTS[1:]))
    after = {name: cfg.train.run_name for name, cfg in ablation.variant_configs(config_dir, "cnn", ())}
    assert {name: after[name] for name in before} == before
    assert after[inserted[0]] not in before.values()


@pytest.mark.integration  # DeepSpeed ranks (the checkpoint stages); about 70 s
def test_scale_benchmark_quick_measures_every_stage_at_each_size(tmp_path):
    """`distpose bench scale --quick` as documented: every stage at both sizes, the process tree's RSS (2 shard
    workers hold more than 1), the same shard bytes from 1 and 2 workers, the plot, and no scratch left."""
    work, out, png = tmp_path / "work", tmp_path / "scale.json", tmp_path / "scale.png"
    subprocess.run([sys.executable, "-m", "distpose", "bench", "scale", "--quick", "--work", str(work),
                    "--out", str(out), "--plot", str(png)], check=True, capture_output=True, timeout=600)
    result = json.loads(out.read_text())
    stages = {(s["stage"], s["images"]): s for s in result["stages"]}
    names = ["shard, 1 worker", "shard, 2 workers", "evaluate ground-truth boxes",
             "evaluate 20 detector boxes an image", "verify, 2 workers", "stream 256x192, 1 loader worker",
             "stream 256x192, 2 loader workers"]
    for n in result["sizes"]:
        shard1, shard2 = stages["shard, 1 worker", n], stages["shard, 2 workers", n]
        assert shard1["items"] == n and shard1["bytes_written"] == shard2["bytes_written"] > 0
        assert shard2["peak_rss_bytes"] > shard1["peak_rss_bytes"]
        for name in names:
            assert stages[name, n]["seconds_per_item"] > 0 and stages[name, n]["peak_rss_bytes"] > 0
        assert stages["stream 256x192, 1 loader worker", n]["items"] >= n  # about 2.5 people an image
        truth, detected = stages["evaluate ground-truth boxes", n], stages["evaluate 20 detector boxes an image", n]
        assert truth["items"] == truth["val_instances"] >= truth["val_images"]
        assert detected["items"] % 20 == 0 and detected["items"] <= 20 * detected["val_images"]
    assert [f["stage"] for f in result["flatness"] if f["stage"] in names] == names
    assert [c["zero_stage"] for c in result["checkpoints"]] == [0, 2, 3]
    assert len({c["parameters"] for c in result["checkpoints"]}) == 1  # the whole network's, at every stage
    for c in result["checkpoints"]:
        # every stage writes at least the fp32 weights and both Adam moments: 12 bytes a parameter
        assert c["bytes_written"] > 12 * c["parameters"] and c["save_seconds"] > 0 and c["load_seconds"] > 0
    assert png.read_bytes().startswith(b"\x89PNG") and not any(work.iterdir())


@pytest.mark.integration  # the --quick synthetic set, up to its first shard stage; about 45 s
def test_interrupted_scale_benchmark_stops_its_stage_and_leaves_no_scratch(tmp_path):
    """Ctrl-C sent to the benchmark alone (`kill -INT`, or a scheduler) while a shard stage writes reaches the
    stage once, and it cleans up. The stage was SIGKILLed, which left its staging directory in TMPDIR."""
    scratch, work = tmp_path / "tmp", tmp_path / "work"
    scratch.mkdir()
    # SIGINT's default disposition, which Python turns into KeyboardInterrupt: a shell running this suite in
    # the background hands its children SIGINT ignored, and Python then leaves it ignored.
    bench = subprocess.Popen([sys.executable, "-m", "distpose", "bench", "scale", "--quick", "--work", str(work),
                              "--out", str(tmp_path / "scale.json")], env={**os.environ, "TMPDIR": str(scratch)},
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, process_group=0,
                             preexec_fn=functools.partial(signal.signal, signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 300
    while not any(p.name.startswith("distpose-shards-") for p in scratch.iterdir()):
        assert bench.poll() is None and time.monotonic() < deadline, "no shard stage was seen writing"
        time.sleep(0.002)
    stage = next(c for c in psutil.Process(bench.pid).children() if "shard" in c.cmdline())
    bench.send_signal(signal.SIGINT)
    _, err = bench.communicate(timeout=120)
    assert bench.returncode == 130 and "interrupted" in err, err
    assert not stage.is_running()
    assert not [p.name for p in scratch.iterdir() if p.name.startswith("distpose-shards-")]
    assert not list(work.rglob("*.partial"))
