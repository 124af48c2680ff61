"""A sweep's results: the best trial per recipe scored again with 95% intervals and compared with its parent's,
as leaderboard.md/.csv, every trial as trials.csv, and each recipe's best model as best/<recipe>.pt."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path
from typing import Any

from distpose.eval.bootstrap import RESAMPLES
from distpose.eval.evaluate import flat_metrics
from distpose.eval.report import HEADLINE, KINDS, RunResult, compare
from distpose.eval.scoring import score_model_file
from distpose.files import read_bytes, within, write_bytes
from distpose.train.sweep_file import Sweep, sweep_dir


def best_trials(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Each recipe's best trial among those that completed or were stopped by ASHA: a failed trial's model is
    never a recipe's best, nor the parent of another recipe's trials."""
    best: dict[str, dict[str, Any]] = {}
    for r in records:
        if r["status"] in ("completed", "early-stopped") and r.get("score") is not None and \
                not math.isnan(r["score"]) and \
                (r["recipe"] not in best or r["score"] > best[r["recipe"]]["score"]):
            best[r["recipe"]] = r
    return best


def score_best(best: dict[str, dict[str, Any]]) -> dict[str, RunResult]:
    """Each recipe's best model scored again on its validation split, for intervals and paired comparisons."""
    scored = {}
    for name, record in best.items():
        metrics, predictions, _ = score_model_file(record["checkpoint"])
        scored[name] = RunResult(name, "", flat_metrics(metrics), predictions=predictions)
    return scored


def write_leaderboard(sweep: Sweep, records: list[dict[str, Any]], scored: dict[str, RunResult],
                      parents: dict[str, str | None]) -> Path | str:
    """leaderboard.md/.csv (the best trial per recipe, with 95% intervals and each crf/joint recipe's paired
    difference from its parent: a crf recipe's backbone, a joint recipe's crf recipe), trials.csv (every trial),
    best/<recipe>.pt."""
    directory = sweep_dir(sweep)
    best = best_trials(records)
    shown = [sweep.metric] + [m for m in ("visible/pck@0.1", "occluded/pck@0.1", "AP") if m != sweep.metric]
    intervals = [f"{kind}/{HEADLINE} [95%]" for kind in KINDS]
    against = [f"{kind}/{HEADLINE} minus its parent's [95%]" for kind in KINDS]
    columns = ["recipe", "trial", *shown, *intervals, *against, "best_epoch", "trials", "params", "checkpoint"]
    rows = []
    for name in sweep.recipes:
        ours = [r for r in records if r["recipe"] == name]
        counts = "/".join(str(sum(r["status"] == s for r in ours)) for s in ("completed", "early-stopped", "failed"))
        r = best.get(name)
        if r is None:
            rows.append({"recipe": name, "trials": counts, "trial": "-", "params": "no trial produced a model file"})
            continue
        exported = within(directory, "best", f"{name}.pt")
        write_bytes(exported, read_bytes(r["checkpoint"]))
        cells = {column: interval.format() for column, interval in zip(intervals, scored[name].intervals().values())}
        parent = parents.get(name)
        if parent in scored:
            differences = compare(scored[name], scored[parent]).differences.values()
            cells |= {column: f"{d.format(signed=True)} ({d.verdict()})" for column, d in zip(against, differences)}
        rows.append({"recipe": name, "trial": r["trial"], **{m: r["scores"].get(m) for m in shown}, **cells,
                     "best_epoch": r["best_epoch"], "trials": counts,
                     "params": " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                        for k, v in sorted(r["params"].items())),
                     "checkpoint": str(exported)})
    write_bytes(within(directory, "leaderboard.csv"), _csv(columns, rows))
    trial_columns = ["recipe", "trial", "status", "attempts", "epochs", "score", "best_epoch", "params", "checkpoint",
                     "error"]
    write_bytes(within(directory, "trials.csv"), _csv(trial_columns, [
        {**r, "params": json.dumps(r["params"], sort_keys=True)} for r in records]))

    def cell(value: Any) -> str:
        return f"{value:.3f}" if isinstance(value, float) else "-" if value is None else str(value)

    lines = [f"# Sweep {sweep.name}", "",
             f"`{sweep.source}`: {len(records)} trials, {sweep.search} search, ASHA on val/{sweep.metric} "
             f"(grace {sweep.grace_period} epoch(s), reduction factor {sweep.reduction_factor}), seed {sweep.seed}. "
             "Best trial per recipe, scored on the validation split at its best epoch; trials = "
             "completed/early-stopped/failed. Every trial: `trials.csv`. Intervals: 95% bootstrap over the "
             f"validation instances ({RESAMPLES} resamples); a crf/joint recipe's difference from its parent's best "
             "trial (a crf recipe's backbone, a joint recipe's crf recipe) is paired over the same instances and "
             "called beats/trails only where its interval excludes zero.", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    path = within(directory, "leaderboard.md")
    write_bytes(path, ("\n".join(lines) + "\n").encode())
    return path


def _csv(columns: list[str], rows: list[dict[str, Any]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().encode()
