"""Prometheus metrics, scraped over HTTP from the real endpoints while a real run trains, and the shipped
Grafana dashboard checked against what the project exports."""

import json
import re
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import psutil
import pytest
from helpers import corrupt_jpeg_in_shard

from distpose.monitor.metrics import EXPORTED_NAMES, RUN_STATES, metrics_endpoints, scrape

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "launch" / "grafana" / "distpose.json"

TINY = ["model.backbone=cnn_small", "data.input_size=[64,48]", "data.heatmap_size=[16,12]", "data.loader_workers=0",
        "train.log_every=1000", "train.cpus_per_worker=1", "eval.flip_test=false"]


def series(samples: list, name: str, **labels: str) -> dict[tuple, float]:
    """Values of metric `name` whose labels include `labels`, summed per rank (over worker processes)."""
    out: dict[tuple, float] = defaultdict(float)
    for s in samples:
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            out[s.labels.get("rank"), s.labels.get("le")] += s.value
    return dict(out)


def run_states(samples: list, run: str) -> dict[str, float]:
    """The run's state gauge, by state."""
    return {s.labels["state"]: s.value for s in samples
            if s.name == "ray_distpose_run_state" and s.labels["run"] == run}


# ---------------------------------------------------------------------------------------------- endpoint


@pytest.mark.integration
def test_scraped_metrics_grow_per_rank_while_training(ray_session, synth_shards, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(synth_shards, shards)
    broken = corrupt_jpeg_in_shard(sorted(shards.glob("train-*.tar"))[0])
    run = "monitored"
    overrides = [*TINY, f"data.shards={shards}", f"train.storage={tmp_path / 'runs'}", f"train.run_name={run}",
                 "train.workers=2", "data.batch_size=8", "train.epochs=3", "data.batches_per_epoch=40"]
    # `distpose train --address` in its own process, as on a cluster. (A driver thread in this process hung in
    # CI on a logging lock that an earlier test's aborted loader worker had left held.)
    command = [sys.executable, "-m", "distpose", "train", *overrides,
               "--address", ray_session.get_runtime_context().gcs_address]
    log_path = tmp_path / "driver.log"
    with open(log_path, "w") as log:
        driver = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        endpoints = metrics_endpoints()
        assert endpoints, "no node reports a metrics endpoint"
        samples_seen: dict[str, list[float]] = defaultdict(list)  # rank -> counter values, scrape by scrape
        states_seen: list[dict[str, float]] = []
        last: list = []
        while driver.poll() is None:
            scraped = [s for url in endpoints for s in scrape(url)]
            counters = series(scraped, "ray_distpose_train_samples_total", run=run)
            if counters:
                last = scraped
                for (rank, _), value in counters.items():
                    samples_seen[rank].append(value)
                states_seen.append(run_states(scraped, run))
            time.sleep(0.5)
    finally:
        if driver.poll() is None:  # the test failed: do not leave a run training on the session's cluster
            driver.kill()
    assert driver.wait() == 0, log_path.read_text()[-3000:]
    # The driver waited for its final state to reach the endpoint before it disconnected (the series then
    # lingers there for about 20 s).
    final = run_states([s for url in endpoints for s in scrape(url)], run)
    assert final == {state: float(state == "finished") for state in RUN_STATES}, final

    print(f"\nsample counter per rank, scrape by scrape: { {r: sorted(set(v)) for r, v in samples_seen.items()} }")
    assert set(samples_seen) == {"0", "1"}
    for rank, values in samples_seen.items():
        assert len(set(values)) >= 2 and values == sorted(values), f"rank {rank}'s sample counter did not grow"
        assert all(v % 4 == 0 for v in values), "each step adds the rank's micro-batch of 4"

    for name in ("ray_distpose_train_step_seconds", "ray_distpose_train_data_wait_seconds"):
        buckets = series(last, f"{name}_bucket", run=run)
        counts = series(last, f"{name}_count", run=run)
        for rank in ("0", "1"):
            count = counts[rank, None]
            assert count > 0, f"{name} is empty for rank {rank}"
            cumulative = [v for (r, le), v in sorted(buckets.items(), key=lambda kv: float(kv[0][1]))
                          if r == rank]
            assert cumulative == sorted(cumulative) and cumulative[-1] == count, f"{name} buckets, rank {rank}"
            assert cumulative[0] < count or name.endswith("data_wait_seconds"), f"{name}: all in the first bucket"
    for gauge in ("ray_distpose_train_loss", "ray_distpose_train_lr"):
        assert set(r for r, _ in series(last, gauge, run=run)) == {"0", "1"}, gauge

    # The corrupt JPEG is skipped by whichever rank reads that shard, and counted by reason.
    skipped = [s for s in last if s.name == "ray_distpose_train_skipped_samples_total" and s.labels["run"] == run]
    assert skipped and sum(s.value for s in skipped) >= 1, f"sample {broken} was not counted as skipped"
    # The controller exports the evaluation, the driver the run state.
    evals = {s.labels["metric"]: s.value for s in last if s.name == "ray_distpose_eval" and s.labels["run"] == run}
    assert 0.0 <= evals["visible/pck@0.1"] <= 1.0 and "AP" in evals, sorted(evals)
    assert {state: float(state == "running") for state in RUN_STATES} in states_seen, states_seen

    # CUDA only; after a worker failure
    optional = {"ray_distpose_gpu_memory_bytes", "ray_distpose_worker_group_failures_total"}
    missing = EXPORTED_NAMES - optional - {s.name for s in last}
    assert not missing, f"declared but never exported: {sorted(missing)}"


@pytest.mark.integration
def test_local_run_serves_metrics_on_loopback_only(synth_shards, tmp_path):
    """`distpose train` starting its own Ray keeps the metrics endpoint on 127.0.0.1 (monitor.host default)."""
    command = [sys.executable, "-m", "distpose", "train", *TINY, f"data.shards={synth_shards}",
               f"train.storage={tmp_path}", "train.run_name=loopback", "train.epochs=1", "eval.every_epochs=0",
               "data.batches_per_epoch=5", "data.batch_size=4"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=REPO)
    banner = ""
    for line in process.stdout:
        if "Prometheus metrics:" in line:
            banner = line
            break
    urls = re.findall(r"http://([\d.]+):(\d+)/metrics", banner)
    assert urls and urls[0][0] == "127.0.0.1", banner
    port = int(urls[0][1])
    deadline, addresses = time.monotonic() + 30, set()
    while not addresses and time.monotonic() < deadline:
        addresses = {c.laddr.ip for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == port}
        time.sleep(0.2)
    rest, _ = process.communicate(timeout=300)
    assert process.returncode == 0, banner + rest
    assert addresses == {"127.0.0.1"}, f"port {port} listens on {addresses}"


# --------------------------------------------------------------------------------------------- dashboard

_PROMQL_WORDS = {"sum", "min", "max", "avg", "count", "by", "without", "on", "ignoring", "group_left",
                 "group_right", "and", "or", "unless", "bool", "offset", "inf", "nan"}


def promql_metric_names(expression: str) -> set[str]:
    """The metric names a PromQL expression reads: its identifiers, less functions (followed by a
    parenthesis), keywords, and what sits in label matchers, grouping lists, strings and ranges."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expression)
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\$\w+", " ", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    names = set()
    for match in re.finditer(r"(?<![\w.])[a-zA-Z_:][a-zA-Z0-9_:]*", text):
        if not text[match.end():].lstrip().startswith("(") and match.group().lower() not in _PROMQL_WORDS:
            names.add(match.group())
    return names


def test_promql_metric_names_reads_what_an_expression_queries():
    expression = ('histogram_quantile(0.95, sum by (le, rank) (rate(ray_distpose_train_step_seconds_bucket'
                  '{run=~"$run", mode!="x"}[5m]))) / on (run) group_left sum(ray_distpose_train_lr offset 1h) * 1e3')
    assert promql_metric_names(expression) == {"ray_distpose_train_step_seconds_bucket", "ray_distpose_train_lr"}


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for row in dashboard["panels"] for p in [row, *row.get("panels", [])]]
    expressions = [t["expr"] for p in panels for t in p.get("targets", [])]
    expressions += [v["query"]["query"] if isinstance(v.get("query"), dict) else v.get("query", "")
                    for v in dashboard.get("templating", {}).get("list", []) if v.get("type") == "query"]
    return expressions


def test_every_dashboard_expression_reads_exported_metrics():
    expressions = dashboard_expressions()
    assert len(expressions) >= 10
    for expression in expressions:
        names = {n for n in promql_metric_names(re.sub(r"label_values\((\w+).*", r"\1", expression))}
        assert names, f"dashboard expression names no metric: {expression}"
        assert names <= EXPORTED_NAMES, f"{expression} reads {sorted(names - EXPORTED_NAMES)}, not exported"
    read = set().union(*(promql_metric_names(e) for e in expressions))
    wanted = {"ray_distpose_train_samples_total", "ray_distpose_train_step_seconds_bucket",
              "ray_distpose_train_data_wait_seconds_sum", "ray_distpose_train_loss", "ray_distpose_train_lr",
              "ray_distpose_eval", "ray_distpose_train_skipped_samples_total"}
    assert wanted <= read, f"the dashboard shows none of {sorted(wanted - read)}"
