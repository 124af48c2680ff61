"""The pipeline report: a comparison table, loss and PCK curves, and a skeleton grid per run."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distpose.eval.bootstrap import RESAMPLES, Interval, instance_pck, paired_difference, pck_interval
from distpose.eval.inference import Predictions
from distpose.files import atomic_write_bytes

PCK_COLUMNS = ("pck@0.05", "pck@0.1", "pck@0.2")
# The score every interval and comparison is about.
HEADLINE, HEADLINE_THRESHOLD = "pck@0.1", 0.1
KINDS = ("visible", "occluded")


@dataclass
class RunResult:
    name: str  # cnn, hrnet, cnn_crf, ...
    description: str
    metrics: dict[str, float]  # flat metrics of the final model
    wall_time: float | None = None  # seconds of training (fit), None for the floor
    samples_per_s: float | None = None  # median over the run's steps
    steps: list[dict[str, Any]] = field(default_factory=list)  # step records (metrics_log.run_history)
    evals: list[dict[str, Any]] = field(default_factory=list)  # eval records
    skeletons: str | None = None  # grid image, relative to the report directory
    predictions: Predictions | None = None  # per validation instance, for intervals and paired comparisons

    def intervals(self) -> dict[str, Interval]:
        """95% bootstrap intervals of the headline PCK, visible and occluded joints."""
        if self.predictions is None:
            return {}
        return {kind: pck_interval(instance_pck(self.predictions, kind, HEADLINE_THRESHOLD)) for kind in KINDS}


@dataclass
class Comparison:
    run: str
    against: str
    differences: dict[str, Interval]  # run minus against, per kind of joint


def compare(run: RunResult, against: RunResult) -> Comparison:
    """The headline PCK of `run` minus that of `against`, paired over the validation instances both scored."""
    return Comparison(run.name, against.name, {
        kind: paired_difference(instance_pck(run.predictions, kind, HEADLINE_THRESHOLD),
                                instance_pck(against.predictions, kind, HEADLINE_THRESHOLD)) for kind in KINDS})


def _cell(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def comparison_table(results: list[RunResult]) -> str:
    head = ["run"] + [f"{kind} {HEADLINE} [95% interval]" for kind in KINDS] + \
        [f"{kind} {c}" for kind in KINDS for c in PCK_COLUMNS if c != HEADLINE] + \
        ["AP", "AR", "samples/s", "wall time (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        m, intervals = r.metrics, r.intervals()
        row = [f"{r.name} ({r.description})"]
        row += [intervals[kind].format() if kind in intervals else _cell(m.get(f"{kind}/{HEADLINE}")) for kind in KINDS]
        row += [_cell(m.get(f"{kind}/{c}")) for kind in KINDS for c in PCK_COLUMNS if c != HEADLINE]
        row += [_cell(m.get("AP")), _cell(m.get("AR")), _cell(r.samples_per_s, 1), _cell(r.wall_time, 1)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def comparisons_table(comparisons: list[Comparison]) -> str:
    """Paired differences with their intervals, and a verdict only where the interval excludes zero."""
    head = ["run", "against"] + [f"{kind} {HEADLINE} difference [95% interval]" for kind in KINDS] + \
        [f"{kind}: verdict" for kind in KINDS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in comparisons:
        row = [c.run, c.against] + [c.differences[kind].format(signed=True) for kind in KINDS]
        row += [c.differences[kind].verdict() for kind in KINDS]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot_curves(results: list[RunResult], out_dir: Path) -> list[str]:
    """loss.png (training loss per step; the CRF runs' cross-entropy on its own axis) and pck.png
    (validation PCK@0.1 of visible joints per epoch). Returns the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = [r for r in results if r.steps]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, crf, title in ((axes[0], False, "heatmap MSE (backbone mode)"),
                           (axes[1], True, "CRF marginal cross-entropy (crf and joint modes)")):
        for r in trained:
            if ("crf" in r.name or "joint" in r.name) == crf:
                ax.plot([s["step"] for s in r.steps], [s["loss"] for s in r.steps], label=r.name, linewidth=1)
        ax.set(title=title, xlabel="optimizer step", ylabel="loss", yscale="log")
        ax.legend()
    fig.tight_layout()
    save_figure(fig, out_dir / "loss.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    floor = next((r for r in results if not r.steps), None)
    for r in trained:
        if r.evals:
            ax.plot([e["epoch"] for e in r.evals], [e.get("val/visible/pck@0.1") for e in r.evals], marker="o",
                    label=r.name)
    if floor is not None and "visible/pck@0.1" in floor.metrics:
        ax.axhline(floor.metrics["visible/pck@0.1"], color="grey", linestyle="--", label=floor.name)
    ax.set(title="validation PCK@0.1, visible joints", xlabel="epoch", ylabel="PCK@0.1", ylim=(0, 1))
    ax.legend()
    fig.tight_layout()
    save_figure(fig, out_dir / "pck.png")
    plt.close("all")
    return ["loss.png", "pck.png"]


def save_figure(fig: Any, path: Path) -> None:
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    atomic_write_bytes(path, buffer.getvalue())


def write_report(out_dir: Path, results: list[RunResult], header: list[str], comparisons: list[Comparison],
                 notes: list[str]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = plot_curves(results, out_dir)
    scored = next((r.predictions for r in results if r.predictions is not None), None)
    size = f"{len(scored)} validation instances" if scored is not None else "the validation split"
    parts = ["# distpose pipeline report", "", *header, "", "## Comparison", "",
             "PCK in original image pixels, normalised by the longer side of the ground-truth box; AP/AR: "
             "COCO keypoint eval (pycocotools) with ground-truth boxes. samples/s: median training "
             "throughput of the run; wall time: its fit() time including Ray worker start-up and evaluations. "
             f"Intervals: 95%, percentile bootstrap over the {size} ({RESAMPLES} resamples).",
             "", comparison_table(results), "", "## Paired comparisons", "",
             f"Differences in {HEADLINE}, paired bootstrap over the same {size} ({RESAMPLES} resamples, 95% "
             "intervals). A run *beats* (or *trails*) the other only where the whole interval lies above (or "
             "below) zero.", "", comparisons_table(comparisons), "", *notes, "", "## Curves", ""]
    parts += [f"![{p}]({p})" for p in plots]
    parts += ["", "## Skeletons (first validation images, predicted joints with confidence > 0.1)", ""]
    for r in results:
        if r.skeletons:
            parts += [f"### {r.name}", "", f"![{r.name}]({r.skeletons})", ""]

    def interval_record(interval: Interval) -> list[float]:
        return [interval.estimate, interval.low, interval.high]

    atomic_write_bytes(out_dir / "results.json", json.dumps({
        "runs": [{"name": r.name, "description": r.description, "metrics": r.metrics, "wall_time": r.wall_time,
                  "samples_per_s": r.samples_per_s,
                  "intervals": {f"{kind}/{HEADLINE}": interval_record(i) for kind, i in r.intervals().items()}}
                 for r in results],
        "comparisons": [{"run": c.run, "against": c.against,
                         "differences": {f"{kind}/{HEADLINE}": interval_record(i) for kind, i in c.differences.items()}}
                        for c in comparisons],
    }, indent=1).encode())
    path = out_dir / "report.md"
    atomic_write_bytes(path, ("\n".join(parts) + "\n").encode())
    return path
