"""The pipeline report: a comparison table, loss and PCK curves, and a skeleton grid per mode."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distpose.files import atomic_write_bytes

PCK_COLUMNS = ("pck@0.05", "pck@0.1", "pck@0.2")


@dataclass
class ModeResult:
    name: str  # cnn, hrnet, cnn_crf, ...
    description: str
    metrics: dict[str, float]  # flat metrics of the final model
    wall_time: float | None = None  # seconds of training (fit), None for the floor
    samples_per_s: float | None = None  # median over the run's steps
    steps: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl step records
    evals: list[dict[str, Any]] = field(default_factory=list)  # metrics.jsonl eval records
    skeletons: str | None = None  # grid image, relative to the report directory


def read_run_log(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(step records, eval records) of a run's metrics.jsonl, the last attempt's record kept for a
    step or epoch that a resumed attempt redid."""
    steps: dict[int, dict[str, Any]] = {}
    evals: dict[int, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == "step":
            steps[record["step"]] = record
        elif record["kind"] == "eval":
            evals[record["epoch"]] = record
    return [steps[k] for k in sorted(steps)], [evals[k] for k in sorted(evals)]


def _cell(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def comparison_table(results: list[ModeResult]) -> str:
    head = ["mode"] + [f"visible {c}" for c in PCK_COLUMNS] + [f"occluded {c}" for c in PCK_COLUMNS] + \
        ["AP", "AR", "samples/s", "wall time (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        m = r.metrics
        row = [f"{r.name} ({r.description})"]
        row += [_cell(m.get(f"visible/{c}")) for c in PCK_COLUMNS]
        row += [_cell(m.get(f"occluded/{c}")) for c in PCK_COLUMNS]
        row += [_cell(m.get("AP")), _cell(m.get("AR")), _cell(r.samples_per_s, 1), _cell(r.wall_time, 1)]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def plot_curves(results: list[ModeResult], out_dir: Path) -> list[str]:
    """loss.png (training loss per step; the CRF modes' cross-entropy on its own axis) and pck.png
    (validation PCK@0.1 of visible joints per epoch). Returns the file names."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trained = [r for r in results if r.steps]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, crf, title in ((axes[0], False, "heatmap MSE (backbone modes)"),
                           (axes[1], True, "CRF marginal cross-entropy (crf, joint modes)")):
        for r in trained:
            if ("crf" in r.name or "joint" in r.name) == crf:
                ax.plot([s["step"] for s in r.steps], [s["loss"] for s in r.steps], label=r.name, linewidth=1)
        ax.set(title=title, xlabel="optimizer step", ylabel="loss", yscale="log")
        ax.legend()
    fig.tight_layout()
    _save_figure(fig, out_dir / "loss.png")

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
    _save_figure(fig, out_dir / "pck.png")
    plt.close("all")
    return ["loss.png", "pck.png"]


def _save_figure(fig: Any, path: Path) -> None:
    import io

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    atomic_write_bytes(path, buffer.getvalue())


def crf_comparison(results: list[ModeResult]) -> list[str]:
    """One line per CRF mode: its PCK@0.1 against its own backbone's, visible and occluded joints."""
    by_name = {r.name: r for r in results}
    lines = []
    for r in results:
        base = by_name.get(r.name.split("_")[0])
        if "_" not in r.name or base is None:
            continue
        deltas = []
        for kind in ("visible", "occluded"):
            ours, theirs = r.metrics.get(f"{kind}/pck@0.1"), base.metrics.get(f"{kind}/pck@0.1")
            if ours is not None and theirs is not None:
                verdict = "beats" if ours > theirs else "does not beat"
                deltas.append(f"{kind}: {ours:.3f} vs {theirs:.3f} ({ours - theirs:+.3f}, {verdict} {base.name})")
        lines.append(f"- **{r.name}**: " + "; ".join(deltas))
    return lines


def write_report(out_dir: Path, results: list[ModeResult], header: list[str], notes: list[str]) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = plot_curves(results, out_dir)
    parts = ["# distpose pipeline report", "", *header, "", "## Comparison", "",
             "PCK in original image pixels, normalised by the longer side of the ground-truth box; AP/AR: "
             "COCO keypoint eval (pycocotools) with ground-truth boxes. samples/s: median training "
             "throughput of the run; wall time: its fit() time including Ray worker start-up and evaluations.",
             "", comparison_table(results), "", "## CRF modes against their backbones (PCK@0.1)", "",
             *crf_comparison(results), "", *notes, "", "## Curves", ""]
    parts += [f"![{p}]({p})" for p in plots]
    parts += ["", "## Skeletons (first validation images, predicted joints with confidence > 0.1)", ""]
    for r in results:
        if r.skeletons:
            parts += [f"### {r.name}", "", f"![{r.name}]({r.skeletons})", ""]
    atomic_write_bytes(out_dir / "results.json",
                       json.dumps([{"name": r.name, "description": r.description, "metrics": r.metrics,
                                    "wall_time": r.wall_time, "samples_per_s": r.samples_per_s}
                                   for r in results], indent=1).encode())
    path = out_dir / "report.md"
    atomic_write_bytes(path, ("\n".join(parts) + "\n").encode())
    return path
