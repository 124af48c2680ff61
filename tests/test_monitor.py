"""Monitoring end to end: a real Prometheus server, with the shipped scrape config and alert rules, follows the
session's Ray discovery file and scrapes a real 2-rank run; its HTTP API then answers for each rank's series, the
run's final state and scores, every Grafana panel over the run, and the stalled-rank alert a frozen rank fires.
The alert rules' promtool unit tests, and the dashboard's expressions checked against the exported names."""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from helpers import corrupt_jpeg_in_shard, truncate_shard
from local_ray import ListeningSockets, watched_temporary_directory
from prometheus_server import Prometheus, scaled_rule

from distpose.config import load_config
from distpose.metrics_log import read_records
from distpose.models.model_file import save_model_file
from distpose.monitor.prometheus import EXPORTED_NAMES, RUN_STATES
from distpose.train.modes import run_model

REPO = Path(__file__).resolve().parents[1]
DASHBOARD = REPO / "launch" / "grafana" / "distpose.json"

TINY = ["model.backbone=cnn_small", "data.input_size=[64,48]", "data.heatmap_size=[16,12]", "data.loader_workers=0",
        "train.log_every=1000", "train.cpus_per_worker=1", "eval.flip_test=false"]


# ---------------------------------------------------------------------------------- a real Prometheus server

RUN = "monitored"
STALL_AFTER_STEP = 50  # in epoch 2 of 3 x 40 steps
# The stalled-rank alert as shipped, with 600 s and 1 minute shortened: the healthy run's longest pause between
# progress reports (an evaluation, a checkpoint) is a few seconds here.
STALL_RULE = scaled_rule("DistposeRankStalled", {"> 600": "> 10", "for: 1m": "for: 2s"})
CUDA_ONLY_PANELS = {"GPU memory per rank"}  # its series exist only on CUDA devices


def firing(prometheus: Prometheus, alert: str) -> list[dict]:
    return [a for a in prometheus.alerts()
            if a["labels"]["alertname"] == alert and a["labels"].get("run") == RUN and a["state"] == "firing"]


@dataclass
class MonitoredRun:
    prometheus: Prometheus
    start: float
    end: float
    stalled_at: float
    fired: list[dict]  # the stalled-rank alerts firing once rank 1's is
    fired_after: float  # seconds from the stall
    broken_sample: str
    cut_shard: Path  # a validation shard cut short
    console: str  # what the driver printed
    run_dir: Path


@pytest.fixture(scope="module")
def monitored(ray_session, synth_shards, tmp_path_factory):
    """Prometheus (the shipped config and alerts, on this Ray's discovery file) scrapes a 2-rank run with a corrupt
    JPEG in its training shards and a validation shard cut short. In epoch 2, rank 0 is frozen (SIGSTOP) until the
    stalled-rank alert fires, then thawed: the run goes on to its end. ~60 s."""
    import ray

    root = tmp_path_factory.mktemp("monitored")
    discovery = Path(ray._private.worker._global_node.get_session_dir_path()) / "prom_metrics_service_discovery.json"
    prometheus = Prometheus(root / "prometheus", discovery, extra_rules=[STALL_RULE])
    try:
        deadline = time.monotonic() + 60
        while not any(t["health"] == "up" for t in prometheus.targets()):
            assert time.monotonic() < deadline, f"no target of {discovery} is up: {prometheus.targets()}"
            time.sleep(0.5)
        shards = root / "shards"
        shutil.copytree(synth_shards, shards)
        broken = corrupt_jpeg_in_shard(sorted(shards.glob("train-*.tar"))[0])
        cut = sorted(shards.glob("val-*.tar"))[2]
        truncate_shard(cut, keep=0.3)
        overrides = [*TINY, f"data.shards={shards}", f"train.storage={root / 'runs'}", f"train.run_name={RUN}",
                     "train.workers=2", "data.batch_size=8", "train.epochs=3", "data.batches_per_epoch=40"]
        # `distpose train --address` in its own process, as on a cluster.
        command = [sys.executable, "-m", "distpose", "train", *overrides,
                   "--address", ray_session.get_runtime_context().gcs_address]
        directory, log_path = root / "runs" / RUN, root / "driver.log"
        start = time.time()
        with open(log_path, "w") as log:
            driver = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        try:
            deadline = time.monotonic() + 240
            while not any(r["step"] >= STALL_AFTER_STEP for r in read_records(directory, "step")):
                assert driver.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
                time.sleep(0.1)
            rank0 = psutil.Process(read_records(directory, "start")[0]["pid"])
            stalled_at = time.time()
            rank0.suspend()
            try:
                # Rank 1, alive and waiting in a collective for rank 0, reports its progress time getting older:
                # its alert is the one to wait for (rank 0's may come a moment earlier, until its series expires).
                while True:
                    fired = firing(prometheus, "DistposeRankStalled")
                    if any(a["labels"]["rank"] == "1" for a in fired):
                        break
                    assert time.time() - stalled_at < 90, f"no stalled-rank alert for rank 1: {prometheus.alerts()}"
                    time.sleep(0.5)
                fired_after = time.time() - stalled_at
            finally:
                rank0.resume()
            assert driver.wait(timeout=300) == 0, log_path.read_text()[-3000:]
        finally:
            if driver.poll() is None:  # the test failed: do not leave a run training on the session's cluster
                driver.kill()
        # The driver waits for its final state to reach the endpoint; one more scrape brings it to Prometheus.
        deadline = time.monotonic() + 30
        while not prometheus.query(f'ray_distpose_run_state{{run="{RUN}", state="finished"}} == 1'):
            assert time.monotonic() < deadline, "the final state never reached Prometheus"
            time.sleep(0.5)
        yield MonitoredRun(prometheus, start, time.time(), stalled_at, fired, fired_after, broken, cut,
                           log_path.read_text(), directory)
    finally:
        prometheus.stop()


@pytest.mark.integration
def test_prometheus_has_each_ranks_training_series_and_its_counters_only_grow(monitored):
    prometheus = monitored.prometheus
    selector = f'{{run="{RUN}"}}'
    samples = prometheus.query_range(f"ray_distpose_train_samples_total{selector}", monitored.start, monitored.end)
    per_rank = {s["metric"]["rank"]: [v for _, v in s["values"]] for s in samples}
    print(f"\n[prometheus] sample counter per rank: { {r: (len(v), v[0], v[-1]) for r, v in per_rank.items()} } "
          "(points, first, last)")
    assert sorted(per_rank) == ["0", "1"]
    for s in samples:
        labels = s["metric"]
        assert labels["job"] == "ray" and labels["mode"] == "backbone" and labels["instance"], labels
        values = per_rank[labels["rank"]]
        assert values == sorted(values) and len(set(values)) >= 3, f"rank {labels['rank']}: {values}"
        assert all(v % 4 == 0 for v in values), "each step adds the rank's micro-batch of 4"
    # No counter of the run ever went down (a reset would show a process restarted or a series mixed up).
    window = f"{int(monitored.end - monitored.start) + 1}s"
    for name in ("ray_distpose_train_samples_total", "ray_distpose_train_step_seconds_count",
                 "ray_distpose_train_data_wait_seconds_count", "ray_distpose_train_skipped_samples_total"):
        resets = prometheus.query(f"resets({name}{selector}[{window}])", at=monitored.end)
        assert resets and all(r["value"] == 0 for r in resets), (name, resets)
    for gauge in ("ray_distpose_train_loss", "ray_distpose_train_lr", "ray_distpose_train_epoch",
                  "ray_distpose_train_progress_timestamp_seconds", "ray_distpose_train_checkpoint_timestamp_seconds"):
        ranks = {s["metric"]["rank"] for s in prometheus.query_range(f"{gauge}{selector}", monitored.start,
                                                                      monitored.end)}
        assert ranks == {"0", "1"}, gauge


@pytest.mark.integration
def test_prometheus_has_the_final_state_the_scores_and_the_skipped_sample(monitored):
    prometheus, at = monitored.prometheus, monitored.end
    states = {r["metric"]["state"]: r["value"] for r in prometheus.query(
        f'max by (state) (ray_distpose_run_state{{run="{RUN}"}})', at=at)}
    assert states == {state: float(state == "finished") for state in RUN_STATES}, states
    scores = {r["metric"]["metric"]: r["value"] for r in prometheus.query(
        f'max by (metric) (ray_distpose_eval{{run="{RUN}"}})', at=at)}
    print(f"\n[prometheus] evaluation: { {k: round(v, 3) for k, v in sorted(scores.items())} }")
    assert 0.0 <= scores["visible/pck@0.1"] <= 1.0 and "AP" in scores, sorted(scores)
    skipped = prometheus.query(f'sum by (reason) (ray_distpose_train_skipped_samples_total{{run="{RUN}"}})', at=at)
    print(f"[prometheus] skipped samples: {[(r['metric']['reason'], r['value']) for r in skipped]}")
    assert sum(r["value"] for r in skipped) >= 1, f"sample {monitored.broken_sample} was not counted as skipped"
    # Every series the project declares reached Prometheus, but those only a GPU or a failure brings.
    names = {r["metric"]["__name__"] for r in prometheus.query_range(
        f'{{__name__=~"ray_distpose_.+", run="{RUN}"}}', monitored.start, at, step=5)}
    missing = EXPORTED_NAMES - {"ray_distpose_gpu_memory_bytes"} - names
    assert not missing, f"declared but never scraped: {sorted(missing)}"
    failures = prometheus.query(f'max by (run) (ray_distpose_worker_group_failures{{run="{RUN}"}})', at=at)
    assert [r["value"] for r in failures] == [0.0]


@pytest.mark.integration
def test_the_console_says_what_validation_lost_to_an_unreadable_shard(monitored):
    """Each evaluation line names the shard and counts the instances it cost. The console once said only how many
    training samples were skipped; the shard's name was in logs/rank0.log alone."""
    total = json.loads((monitored.cut_shard.parent / "val.manifest.json").read_text())["instances"]
    evaluations = read_records(monitored.run_dir, "eval")
    lines = [line for line in monitored.console.splitlines() if line.startswith("eval after epoch")]
    print(f"\n[console] {lines[-1]}")
    assert len(lines) == len(evaluations) == 3
    for line, record in zip(lines, evaluations):
        lost = total - int(record["val/instances"])
        assert lost > 0 and record["val/lost_instances"] == lost
        assert (f"; validation: {lost} of the split's instances not scored: unreadable shard(s) "
                f"{monitored.cut_shard.name}") in line, line


def grafana_expression(expression: str, seconds: float) -> str:
    """A panel's PromQL as Grafana sends it for this run: $run and $eval_metric as the run and All, the rate
    window at 4 scrape intervals (Grafana's $__rate_interval at a 1-s scrape), $__range the run's length."""
    return (expression.replace("$run", RUN).replace("$eval_metric", ".+").replace("$__rate_interval", "4s")
            .replace("$__range", f"{int(seconds)}s"))


@pytest.mark.integration
def test_every_dashboard_panel_answers_over_the_run(monitored):
    prometheus = monitored.prometheus
    dashboard = json.loads(DASHBOARD.read_text())
    seconds = monitored.end - monitored.start
    answered, failed = {}, []
    for panel in dashboard_panels(dashboard):
        if panel["title"] in CUDA_ONLY_PANELS:  # the run trains on CPU
            answered[panel["title"]] = "not evaluated: CUDA runs only"
            continue
        for target in panel["targets"]:
            result = prometheus.query_range(grafana_expression(target["expr"], seconds), monitored.start,
                                            monitored.end)
            values = [v for s in result for _, v in s["values"]]
            good = [v for v in values if math.isfinite(v)]
            name = f"{panel['title']} [{target['refId']}]"
            answered[name] = f"{len(result)} series, {len(good)}/{len(values)} values finite"
            if not good or any(math.isinf(v) for v in values):
                failed.append(f"panel {panel['title']!r} ({target['expr']}): {len(result)} series, "
                              f"{len(good)} finite of {len(values)} values")
    print("\n[prometheus] panels over the run:\n  " + "\n  ".join(f"{k}: {v}" for k, v in answered.items()))
    assert not failed, "\n".join(failed)
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            metric, label = re.fullmatch(r"label_values\((\w+), (\w+)\)", variable["query"]["query"]).groups()
            values = prometheus.api(f"label/{label}/values", **{"match[]": metric})
            assert values, f"variable {variable['name']}: no values"
            assert variable["name"] != "run" or RUN in values, values


@pytest.mark.integration
def test_a_stalled_rank_fires_its_alert_and_the_shipped_rules_evaluate(monitored):
    prometheus = monitored.prometheus
    ranks = sorted(a["labels"]["rank"] for a in monitored.fired)
    print(f"\n[prometheus] rank 0 frozen: DistposeRankStalled firing for ranks {ranks} "
          f"{monitored.fired_after:.1f} s after the freeze (rule: {STALL_RULE['expr']} for {STALL_RULE['for']})")
    assert "1" in ranks and monitored.fired_after < 60, monitored.fired
    # Before the freeze the rule was never even pending: the healthy run does not trip it.
    early = prometheus.query_range(f'ALERTS{{alertname="DistposeRankStalled", run="{RUN}"}}', monitored.start,
                                   monitored.stalled_at)
    assert not early, early
    rules = prometheus.rules()
    print("[prometheus] rules: " + ", ".join(f"{r['group']}/{r['name']} {r['health']}" for r in rules))
    shipped = {r["name"] for r in rules if r["group"] == "distpose"}
    assert shipped == {"DistposeRankStalled", "DistposeRunWithoutWorkers", "DistposeDataWaitHigh",
                       "DistposeNoCheckpoint", "DistposeRestartsClimbing", "DistposeLossNotFinite"}, shipped
    assert all(r["health"] == "ok" and not r.get("lastError") for r in rules), rules
    # The loss stayed finite, the run checkpointed every epoch and never failed.
    never = prometheus.query_range('ALERTS{alertname=~"DistposeLossNotFinite|DistposeNoCheckpoint|'
                                   f'DistposeRestartsClimbing", run="{RUN}"}}', monitored.start, monitored.end)
    assert not never, never


def promtool(*args: str) -> subprocess.CompletedProcess:
    binary = shutil.which("promtool") or pytest.fail("promtool is not installed: `make test` installs it")
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=60, check=False)


def test_the_shipped_alert_rules_pass_their_promtool_unit_tests():
    """tests/alerts_test.yml: each alert fires on the series it is about, at the time it should, and not on a
    healthy run's."""
    result = promtool("test", "rules", str(Path(__file__).parent / "alerts_test.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_shipped_scrape_config_is_valid_as_it_is():
    """launch/prometheus.yml as a user runs it, its rule file found beside it."""
    result = promtool("check", "config", str(REPO / "launch" / "prometheus.yml"))
    assert result.returncode == 0 and "1 rule files found" in result.stdout, result.stdout + result.stderr


def local_commands(shards: Path, root: Path, tmp: Path) -> dict[str, list[str]]:
    """Each command that starts a local Ray, at a tiny size. Those that train are stopped
    with Ctrl-C once their first run trains: by then every kind of endpoint is open."""
    model = tmp / "model.pt"
    cfg = load_config(None, TINY)
    save_model_file(model, run_model(cfg).state_dict(), cfg)
    # More steps than the Ctrl-C leaves time for: a run that ended first would not show the stop.
    data = [f"data.shards={shards}", *TINY, "data.batch_size=4", "data.batches_per_epoch=100", "train.epochs=1"]
    return {
        "train": ["train", *data, f"train.storage={tmp / 'runs'}", "eval.every_epochs=0"],
        "eval --workers 2": ["eval", "--checkpoint", str(model), "--data", str(shards), "--workers", "2"],
        "pipeline": ["pipeline", "quick", "--data", str(root), "--report", str(tmp / "report"), *data,
                     f"train.storage={tmp / 'runs'}"],
    }


STOPPED_EARLY = ("train", "pipeline")


@pytest.mark.integration
@pytest.mark.parametrize("command", ["train", "eval --workers 2", "pipeline"])
def test_a_local_ray_listens_on_loopback_only_and_leaves_no_temporary_files(command, synth_shards, synth_root,
                                                                           tmp_path):
    """Every server of a command that starts its own Ray (the metrics endpoint, Ray's own, the workers') listens on
    127.0.0.1 (monitor.host's default). `eval --workers 2` once listened on every interface: ray was imported before
    distpose set Ray's one-machine switch. The one exception is torch.distributed's rendezvous store on rank 0,
    which binds every interface whatever its host (docs/clusters.md). Nothing is left in the temporary directory
    but Ray's own folder (each command left about three pymp-* folders). `tune`: the sweep interrupt test
    (test_tune.py)."""
    argv = local_commands(synth_shards, synth_root, tmp_path)[command]
    with watched_temporary_directory() as temporary:
        env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "TMPDIR": str(temporary)}
        process = subprocess.Popen([sys.executable, "-m", "distpose", *argv], stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True, cwd=tmp_path, env=env, start_new_session=True)
        sockets, deadline = ListeningSockets(process.pid), time.monotonic() + 240
        try:
            while process.poll() is None and time.monotonic() < deadline:
                sockets.look()
                if command in STOPPED_EARLY and any(tmp_path.glob("**/metrics.jsonl")):
                    time.sleep(1)
                    sockets.look()
                    os.killpg(process.pid, signal.SIGINT)
                    break
                time.sleep(0.2)
            output, _ = process.communicate(timeout=120)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
        sockets.check_loopback_only(command)
        assert process.returncode == (130 if command in STOPPED_EARLY else 0), output[-3000:]
        assert any("metrics" in line and "http://127.0.0.1:" in line for line in output.splitlines()), output[-3000:]
        assert "warning" not in output.lower() or "every interface" not in output, output[-3000:]


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


def dashboard_panels(dashboard: dict) -> list[dict]:
    """Every panel with queries, those inside collapsed rows included."""
    return [p for row in dashboard["panels"] for p in [row, *row.get("panels", [])] if p.get("targets")]


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [t["expr"] for p in dashboard_panels(dashboard) for t in p["targets"]]
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
