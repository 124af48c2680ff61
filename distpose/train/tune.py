"""`distpose tune`: Ray Tune sweeps over the training modes.

A sweep file names a directory of mode configs (`cnn.yaml`, `cnn_crf.yaml`, ... as in configs/quick),
the modes to sweep, overrides for every trial (and per mode) and a search space. Each mode gets its own Tune
experiment, so ASHA compares trials of one mode with each other and a model-based searcher models one
objective at a time. Backbone modes run first; a crf or joint mode then starts every trial from the
best trial of the swept backbone mode with the same network (or from its config's own
train.backbone_checkpoint when that backbone is not swept).

A trial is a function trainable that fits a TorchTrainer (Ray Train V2's way to meet Tune), reporting
each epoch's validation scores through TuneReportCallback. Tune retries a failed trial up to
`max_failures` times (the TorchTrainer resumes from the trial's latest checkpoint) and then records it
as failed; the sweep goes on. `max_concurrent_trials` is what the cluster's CPUs (GPUs) hold, so no
trial's workers wait for resources another trial holds.

    <storage>/<name>/<mode>/          Tune's experiment (restorable) and runs/<trial>/ (distpose runs)
    <storage>/<name>/<mode>/done.json the mode's trials, once its experiment has finished
    <storage>/<name>/leaderboard.md|csv, trials.csv, best/<mode>.pt
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from distpose.config import Config, ConfigError, load_config, read_yaml, score_names, yaml_problem
from distpose.eval.bootstrap import RESAMPLES
from distpose.eval.evaluate import evaluate_checkpoint, flat_metrics
from distpose.eval.report import HEADLINE, KINDS, ModeResult, compare
from distpose.files import atomic_write_bytes
from distpose.train.checkpoints import BEST_MODEL, METRICS_LOG
from distpose.train.driver import check_shards, ray_cluster, train, with_absolute_paths

DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint")
SEARCHES = ("random", "grid", "optuna", "hyperopt")
DONE_FILE = "done.json"
TRIAL_MEMORY = 256 * 2**20  # bytes reserved for a trial's driver process
ATTEMPTS_SUFFIX = ".attempts.jsonl"  # runs/<trial>.attempts.jsonl: one line per attempt, one per error


@dataclass(frozen=True)
class Dimension:
    key: str  # a config key, e.g. train.lr
    kind: str  # one of DISTRIBUTIONS
    values: tuple[Any, ...]  # choice: the values; the others: (low, high)
    modes: tuple[str, ...] = ()  # the modes it applies to; () = all


@dataclass(frozen=True)
class Sweep:
    name: str
    configs: str  # directory holding <mode>.yaml for each mode
    modes: tuple[str, ...]
    space: tuple[Dimension, ...] = ()
    overrides: tuple[str, ...] = ()  # applied to every trial, before the sampled values
    mode_overrides: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # per mode, after `overrides`
    trials_per_mode: int = 2  # samples per mode (grid: every combination once)
    search: str = "random"
    metric: str = "visible/pck@0.1"  # validation score to maximise; ASHA stops on it, best.pt keeps its best
    grace_period: int = 1  # ASHA: epochs every trial gets
    reduction_factor: int = 2  # ASHA: keep the top 1/reduction_factor at each rung
    max_failures: int = 1  # Tune retries of a failed trial before it is recorded as failed
    storage: str = "sweeps"
    seed: int = 0  # random, optuna and hyperopt sample the same trials for the same seed (each mode its own)
    source: str = field(default="", compare=False)  # the file it came from, for error messages


def _sweep_error(source: str, key: str, problem: str) -> ConfigError:
    return ConfigError(f"{source}: sweep key '{key}': {problem}")


def load_sweep(path: str | Path, overrides: list[str] = ()) -> Sweep:
    """The sweep file with `key=value` overrides of its top-level keys (e.g. trials_per_mode=3)."""
    path = Path(path)
    try:
        raw = read_yaml(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the sweep file ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({yaml_problem(exc)})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a sweep file is a mapping of sweep keys")
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"sweep override {item!r}: expected key=value")
        try:
            raw[key] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"sweep override {item!r}: the value is not valid YAML "
                              f"({str(exc).splitlines()[0]})") from None
    source = str(path)
    known = {f.name for f in dataclasses.fields(Sweep)} - {"source"}
    for key in raw:
        if key not in known:
            raise _sweep_error(source, key, f"unknown (known: {', '.join(sorted(known))})")
    for key in ("name", "configs", "modes"):
        if key not in raw:
            raise _sweep_error(source, key, "missing")
    configs = Path(raw["configs"])
    if not configs.is_absolute():  # relative to the working directory, as every other path
        configs = Path.cwd() / configs
    modes = raw["modes"]
    if not isinstance(modes, list) or not modes or not all(isinstance(m, str) for m in modes):
        raise _sweep_error(source, "modes", f"got {modes!r}, expected a list of config names")
    for mode in modes:
        if not _has_config(configs, mode):
            raise _sweep_error(source, "modes", f"{mode!r} has no config {configs / (mode + '.yaml')}")
    space = tuple(_dimension(source, key, spec, configs) for key, spec in (raw.get("space") or {}).items())
    overrides = _override_list(source, "overrides", raw.get("overrides"))
    per_mode = raw.get("mode_overrides") or {}
    if not isinstance(per_mode, dict):
        raise _sweep_error(source, "mode_overrides", f"got {per_mode!r}, expected a mapping of mode to overrides")
    for mode in per_mode:  # against the configs, as space.<key>.modes, so that modes=[...] can narrow a sweep
        if not _has_config(configs, mode):
            raise _sweep_error(source, f"mode_overrides.{mode}", f"no config {configs / (str(mode) + '.yaml')}")
    mode_overrides = {m: _override_list(source, f"mode_overrides.{m}", v) for m, v in per_mode.items()}
    special = ("space", "modes", "overrides", "mode_overrides")
    fields = {k: raw[k] for k in raw if k not in special} | {"configs": str(configs)}
    sweep = Sweep(**fields, modes=tuple(modes), space=space, overrides=overrides, mode_overrides=mode_overrides,
                  source=source)
    _check(sweep)
    return sweep


def _has_config(configs: Path, mode: Any) -> bool:
    return (configs / f"{mode}.yaml").is_file()


def _override_list(source: str, key: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and "=" in v for v in value):
        raise _sweep_error(source, key, f"got {value!r}, expected a list of key=value config overrides")
    return tuple(value)


def _dimension(source: str, key: str, spec: Any, configs: Path) -> Dimension:
    where = f"space.{key}"
    if not isinstance(spec, dict):
        raise _sweep_error(source, where, f"got {spec!r}, expected e.g. {{loguniform: [1.0e-4, 1.0e-2]}}")
    only = spec.get("modes", [])
    kinds = [k for k in spec if k != "modes"]
    if len(kinds) != 1 or kinds[0] not in DISTRIBUTIONS:
        raise _sweep_error(source, where, f"got {sorted(spec)}, expected one of {', '.join(DISTRIBUTIONS)} "
                                          "(and optionally modes)")
    kind, values = kinds[0], spec[kinds[0]]
    if not isinstance(values, list) or not values:
        raise _sweep_error(source, where, f"{kind}: got {values!r}, expected a list")
    if kind != "choice" and not (len(values) == 2 and all(isinstance(v, (int, float)) for v in values)
                                 and values[0] < values[1]):
        raise _sweep_error(source, where, f"{kind}: got {values!r}, expected [low, high] with low < high")
    if kind == "loguniform" and values[0] <= 0:
        raise _sweep_error(source, where, f"loguniform: got {values!r}, expected low > 0")
    # Checked against the configs, not the sweep's modes, so that `modes=[...]` can narrow a sweep file.
    unknown = [m for m in only if not _has_config(configs, m)]
    if unknown:
        raise _sweep_error(source, f"{where}.modes", f"{unknown} have no config in {configs}")
    return Dimension(key, kind, tuple(values), tuple(only))


def _check(sweep: Sweep) -> None:
    def require(ok: bool, key: str, value: Any, expected: str) -> None:
        if not ok:
            raise _sweep_error(sweep.source, key, f"got {value!r}, expected {expected}")

    require(sweep.search in SEARCHES, "search", sweep.search, f"one of {', '.join(SEARCHES)}")
    for key in ("trials_per_mode", "grace_period"):
        require(isinstance(getattr(sweep, key), int) and getattr(sweep, key) >= 1, key, getattr(sweep, key),
                "an integer >= 1")
    require(isinstance(sweep.reduction_factor, int) and sweep.reduction_factor >= 2, "reduction_factor",
            sweep.reduction_factor, "an integer >= 2")
    require(isinstance(sweep.max_failures, int) and sweep.max_failures >= 0, "max_failures", sweep.max_failures,
            "an integer >= 0")
    require(isinstance(sweep.seed, int) and not isinstance(sweep.seed, bool) and sweep.seed >= 0, "seed", sweep.seed,
            "an integer >= 0")
    if sweep.search == "grid":
        ranged = [d.key for d in sweep.space if d.kind != "choice"]
        require(not ranged, "search", "grid", f"only choice dimensions in the space (ranges: {ranged})")
    if sweep.search in ("optuna", "hyperopt"):
        try:
            __import__(sweep.search)
        except ImportError:
            raise _sweep_error(sweep.source, "search", f"{sweep.search} is not installed "
                                                       f"(pip install {sweep.search})") from None
    # Every mode's config must load with the overrides and with each dimension's extreme values, so that
    # a typo in a key fails here, in one line, not in every trial.
    for mode in sweep.modes:
        thresholds = base_config(sweep, mode).eval.pck_thresholds
        require(sweep.metric in score_names(thresholds), "metric", sweep.metric,
                f"one of {', '.join(score_names(thresholds))}")
        mode_config(sweep, mode, [])
        for dim in _dimensions_of(sweep, mode):
            for value in (dim.values if dim.kind == "choice" else dim.values[:2]):
                cfg_value = value if dim.kind != "randint" else int(value)
                mode_config(sweep, mode, [f"{dim.key}={json.dumps(cfg_value)}"])


def _dimensions_of(sweep: Sweep, mode: str) -> list[Dimension]:
    return [d for d in sweep.space if not d.modes or mode in d.modes]


def _overrides_of(sweep: Sweep, mode: str) -> list[str]:
    return [*sweep.overrides, *sweep.mode_overrides.get(mode, ())]


def base_config(sweep: Sweep, mode: str) -> Config:
    """The mode's config file with the sweep's overrides: what every trial of the mode shares."""
    return load_config(Path(sweep.configs) / f"{mode}.yaml", _overrides_of(sweep, mode))


def mode_config(sweep: Sweep, mode: str, extra: list[str], backbone: str | None = None) -> Config:
    """The config of one trial: the mode's file, the sweep's overrides (every mode's, then this mode's), then
    `extra` (sampled values, run name, storage). Trials evaluate every epoch (ASHA's signal) and keep best.pt
    by the sweep's metric; Tune, not Ray Train, retries them."""
    forced = ["eval.every_epochs=1", f"eval.best_metric={sweep.metric}", "train.max_failures=0"]
    if backbone is not None:
        forced.append(f"train.backbone_checkpoint={backbone}")
    return load_config(Path(sweep.configs) / f"{mode}.yaml", [*_overrides_of(sweep, mode), *forced, *extra])


def sweep_dir(sweep: Sweep) -> Path:
    return (Path(sweep.storage) / sweep.name).resolve()


def _say(text: str) -> None:
    print(f"[tune] {text}", flush=True)


# ------------------------------------------------------------------------------------------------
# one mode's experiment


def _search_space(sweep: Sweep, mode: str) -> dict[str, Any]:
    from ray import tune

    make = {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}
    space = {}
    for dim in _dimensions_of(sweep, mode):
        if dim.kind == "choice":
            space[dim.key] = (tune.grid_search if sweep.search == "grid" else tune.choice)(list(dim.values))
        else:
            space[dim.key] = make[dim.kind](*dim.values)
    return space


def mode_seed(sweep: Sweep, mode: str) -> int:
    """The search seed of one mode's experiment: fixed by the sweep's seed and the mode's name, so narrowing a
    sweep to fewer modes samples the same trials for those that remain."""
    return (sweep.seed * 1_000_003 + zlib.crc32(mode.encode())) % 2**31


def _searcher(sweep: Sweep, mode: str, concurrent: int = 0):
    """The mode's seeded searcher, running at most `concurrent` trials at once (0: no limit). The limit is the
    searcher's own: Tune ignores max_concurrent_trials for its basic generator."""
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    seed = mode_seed(sweep, mode)
    if sweep.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        searcher = OptunaSearch(seed=seed)
    elif sweep.search == "hyperopt":
        from ray.tune.search.hyperopt import HyperOptSearch

        searcher = HyperOptSearch(random_state_seed=seed)
    else:  # random samples, grid_search expanded
        return BasicVariantGenerator(random_state=seed, max_concurrent=concurrent)
    return ConcurrencyLimiter(searcher, max_concurrent=concurrent) if concurrent else searcher


def _make_trial(sweep: Sweep, mode: str, runs: Path, backbone: str | None):
    cwd = Path.cwd()  # Tune runs each trial in its own directory: relative config paths mean the driver's

    def run_trial(values: dict[str, Any]) -> None:
        from ray import tune
        from ray.tune.integration.ray_train import TuneReportCallback

        trial = tune.get_context().get_trial_id()
        attempts = runs / f"{trial}{ATTEMPTS_SUFFIX}"
        _append_json_line(attempts, {"start": time.time()})
        try:
            extra = [f"{key}={json.dumps(value)}" for key, value in values.items()]
            # JSON-quoted: YAML would read a trial id such as 87919_00000 as the integer 8791900000.
            names = [f"train.run_name={json.dumps(trial)}", f"train.storage={json.dumps(str(runs))}"]
            cfg = mode_config(sweep, mode, [*extra, *names], backbone)
            train(with_absolute_paths(cfg, cwd), callbacks=[TuneReportCallback()])
        except Exception as exc:
            _append_json_line(attempts, {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:500]})
            raise

    return run_trial


def _append_json_line(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as log:
        log.write(json.dumps(record) + "\n")


def trials_that_fit(cfg: Config) -> int:
    """How many of this config's trials the cluster holds at once (its workers' CPUs and GPUs)."""
    import ray

    total = ray.cluster_resources()
    fits = int(total.get("CPU", 0) // (cfg.train.workers * cfg.train.cpus_per_worker))
    if cfg.train.use_gpu:
        fits = min(fits, int(total.get("GPU", 0) // cfg.train.workers))
    if fits < 1:
        raise ConfigError(f"config key 'train.workers': one trial needs {cfg.train.workers} workers x "
                          f"{cfg.train.cpus_per_worker} CPUs{' and a GPU each' if cfg.train.use_gpu else ''}, "
                          f"more than the cluster's {total.get('CPU', 0):g} CPUs / {total.get('GPU', 0):g} GPUs")
    return fits


def run_mode(sweep: Sweep, mode: str, backbone: str | None, resume: bool) -> list[dict[str, Any]]:
    """Run (or restore and finish) one mode's Tune experiment; return a record per trial."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    directory = sweep_dir(sweep) / mode
    runs = directory / "runs"
    cfg = mode_config(sweep, mode, [], backbone)
    # The trial's own process only drives the TorchTrainer: it reserves no CPU (Tune needs some resource
    # in its bundle, so a little memory), leaving every CPU to the trial's workers.
    trainable = tune.with_resources(_make_trial(sweep, mode, runs, backbone), {"CPU": 0, "memory": TRIAL_MEMORY})
    experiment = directory / "experiment"
    if resume and tune.Tuner.can_restore(str(experiment)):
        _say(f"{mode}: resuming the experiment in {experiment} (finished trials are not rerun)")
        tuner = tune.Tuner.restore(str(experiment), trainable, resume_unfinished=True, resume_errored=False,
                                   restart_errored=False)
    else:
        concurrent = trials_that_fit(cfg)
        _say(f"{mode}: {sweep.trials_per_mode if sweep.search != 'grid' else 'grid of'} trial(s) of "
             f"{cfg.train.epochs} epochs, {sweep.search} search, ASHA on val/{sweep.metric}, "
             f"{concurrent} at a time")
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=cfg.train.epochs,
                                  grace_period=min(sweep.grace_period, cfg.train.epochs),
                                  reduction_factor=sweep.reduction_factor)
        tuner = tune.Tuner(
            trainable,
            param_space=_search_space(sweep, mode),
            tune_config=tune.TuneConfig(
                metric=f"val/{sweep.metric}", mode="max", scheduler=scheduler,
                search_alg=_searcher(sweep, mode, concurrent),
                num_samples=1 if sweep.search == "grid" else sweep.trials_per_mode),
            run_config=tune.RunConfig(
                name="experiment", storage_path=str(directory),
                failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
                verbose=1),
        )
    results = tuner.fit()
    records = [_trial_record(sweep, mode, runs, result, cfg.train.epochs) for result in results]
    atomic_write_bytes(directory / DONE_FILE, json.dumps(records, indent=1).encode())
    return records


def _trial_record(sweep: Sweep, mode: str, runs: Path, result: Any, epochs: int) -> dict[str, Any]:
    """What the leaderboard says of one trial. The scores are best.pt's, i.e. the trial's best epoch."""
    trial = _trial_id(runs, result)
    run = runs / trial
    attempts_log = runs / f"{trial}{ATTEMPTS_SUFFIX}"
    log = [json.loads(line) for line in attempts_log.read_text().splitlines()] if attempts_log.is_file() else []
    if (run / "config.yaml").is_file():  # the trial's own epochs: the space may set train.epochs
        epochs = load_config(run / "config.yaml").train.epochs
    # Epochs the run itself finished (ASHA's stop can reach a trial after its last epoch).
    log_lines = (run / METRICS_LOG).read_text().splitlines() if (run / METRICS_LOG).is_file() else []
    evaluated = [r["epoch"] for r in map(json.loads, log_lines) if r["kind"] == "eval"]
    record: dict[str, Any] = {"mode": mode, "trial": trial, "params": dict(result.config or {}),
                              "epochs": max(evaluated, default=0), "max_epochs": epochs,
                              "attempts": sum("start" in line for line in log)}
    best = run / BEST_MODEL
    if result.error is not None:
        errors = [line["error"] for line in log if "error" in line]
        record |= {"status": "failed",
                   "error": errors[-1] if errors else str(result.error).strip().splitlines()[-1][:500]}
    else:
        record["status"] = "completed" if record["epochs"] >= epochs else "early-stopped"
    if best.is_file():
        from distpose.models.weights import read_pose_checkpoint

        meta = read_pose_checkpoint(best)["meta"]
        record |= {"checkpoint": str(best), "best_epoch": meta.get("epoch"),
                   "scores": {k[4:]: v for k, v in meta.items() if k.startswith("val/")}}
        record["score"] = record["scores"].get(sweep.metric)
    return record


def _trial_id(runs: Path, result: Any) -> str:
    """The Tune trial id of a result, which names its distpose run (runs/<id>/, runs/<id>.attempts.jsonl)."""
    trial_id = (result.metrics or {}).get("trial_id")
    if trial_id:
        return trial_id
    # A trial that never reported: Tune's directory for it is named <trainable>_<trial id>_<params>.
    name = Path(result.path or "").name
    known = [p.name.removesuffix(ATTEMPTS_SUFFIX) for p in runs.glob(f"*{ATTEMPTS_SUFFIX}")] if runs.is_dir() else []
    return next((t for t in known if f"_{t}_" in f"{name}_"), name or "?")


# ------------------------------------------------------------------------------------------------
# the sweep


def parent_mode(mode: str, bases: dict[str, Config]) -> str | None:
    """The swept backbone mode a crf/joint mode starts from: the one with the same network, or None (the mode
    config's own train.backbone_checkpoint). `bases`: base_config per mode of the sweep."""
    if bases[mode].train.mode == "backbone":
        return None
    return next((other for other, cfg in bases.items()
                 if cfg.train.mode == "backbone" and cfg.model.backbone == bases[mode].model.backbone), None)


def parent_backbone(sweep: Sweep, mode: str, bases: dict[str, Config], best: dict[str, dict[str, Any]]
                    ) -> str | None:
    """The checkpoint a crf/joint mode starts from: the best trial of its parent_mode, else None."""
    other = parent_mode(mode, bases)
    if other is None:
        return None
    if other not in best:
        raise ConfigError(f"{sweep.source}: mode {mode!r} starts from the best {other!r} trial, "
                          f"but no {other!r} trial produced a checkpoint")
    return best[other]["checkpoint"]


def best_trials(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    best: dict[str, dict[str, Any]] = {}
    for r in records:
        if r.get("score") is not None and not math.isnan(r["score"]) and \
                (r["mode"] not in best or r["score"] > best[r["mode"]]["score"]):
            best[r["mode"]] = r
    return best


def run_sweep(sweep: Sweep, address: str | None = None, resume: bool = False) -> Path:
    directory = sweep_dir(sweep)
    if directory.exists() and any(directory.iterdir()) and not resume:
        raise ConfigError(f"{sweep.source}: sweep directory {directory} already exists: add --resume to finish "
                          "that sweep, or choose another name (name=...)")
    for mode in sweep.modes:  # missing shards would fail every trial, after Ray has started
        try:
            check_shards(mode_config(sweep, mode, []))
        except ConfigError as exc:
            raise ConfigError(f"{sweep.source}: mode {mode!r}: {exc}") from None
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(directory / "sweep.json", json.dumps(dataclasses.asdict(sweep), indent=1).encode())
    bases = {m: base_config(sweep, m) for m in sweep.modes}
    is_backbone = {m: cfg.train.mode == "backbone" for m, cfg in bases.items()}
    order = [m for m in sweep.modes if is_backbone[m]] + [m for m in sweep.modes if not is_backbone[m]]
    records: list[dict[str, Any]] = []
    with ray_cluster(address, bases[order[0]].monitor):
        for mode in order:
            done = directory / mode / DONE_FILE
            if resume and done.is_file():
                _say(f"{mode}: finished earlier ({done})")
                mode_records = json.loads(done.read_text())
            else:
                backbone = None if is_backbone[mode] else parent_backbone(sweep, mode, bases, best_trials(records))
                if backbone:
                    _say(f"{mode}: every trial starts from {backbone}")
                mode_records = run_mode(sweep, mode, backbone, resume)
            records += mode_records
            _say(f"{mode}: " + ", ".join(f"{status} {sum(r['status'] == status for r in mode_records)}"
                                         for status in ("completed", "early-stopped", "failed")))
    scored = score_best(best_trials(records))
    path = write_leaderboard(sweep, records, scored, {m: parent_mode(m, bases) for m in sweep.modes})
    _say(f"leaderboard: {path}")
    return path


def score_best(best: dict[str, dict[str, Any]]) -> dict[str, ModeResult]:
    """Each mode's best checkpoint evaluated again on its validation split, for intervals and paired comparisons."""
    scored = {}
    for mode, record in best.items():
        metrics, predictions, _ = evaluate_checkpoint(record["checkpoint"])
        scored[mode] = ModeResult(mode, "", flat_metrics(metrics), predictions=predictions)
    return scored


def write_leaderboard(sweep: Sweep, records: list[dict[str, Any]], scored: dict[str, ModeResult],
                      parents: dict[str, str | None]) -> Path:
    """leaderboard.md/.csv (the best trial per mode, with 95% intervals and each crf/joint mode's paired
    difference from its backbone), trials.csv (every trial), best/<mode>.pt."""
    directory = sweep_dir(sweep)
    best = best_trials(records)
    (directory / "best").mkdir(exist_ok=True)
    shown = [sweep.metric] + [m for m in ("visible/pck@0.1", "occluded/pck@0.1", "AP") if m != sweep.metric]
    intervals = [f"{kind}/{HEADLINE} [95%]" for kind in KINDS]
    against = [f"{kind}/{HEADLINE} minus its backbone's [95%]" for kind in KINDS]
    columns = ["mode", "trial", *shown, *intervals, *against, "best_epoch", "trials", "params", "checkpoint"]
    rows = []
    for mode in sweep.modes:
        ours = [r for r in records if r["mode"] == mode]
        counts = "/".join(str(sum(r["status"] == s for r in ours)) for s in ("completed", "early-stopped", "failed"))
        r = best.get(mode)
        if r is None:
            rows.append({"mode": mode, "trials": counts, "trial": "-", "params": "no trial produced a checkpoint"})
            continue
        exported = directory / "best" / f"{mode}.pt"
        atomic_write_bytes(exported, Path(r["checkpoint"]).read_bytes())
        cells = {column: interval.format() for column, interval in zip(intervals, scored[mode].intervals().values())}
        parent = parents.get(mode)
        if parent in scored:
            differences = compare(scored[mode], scored[parent]).differences.values()
            cells |= {column: f"{d.format(signed=True)} ({d.verdict()})" for column, d in zip(against, differences)}
        rows.append({"mode": mode, "trial": r["trial"], **{m: r["scores"].get(m) for m in shown}, **cells,
                     "best_epoch": r["best_epoch"], "trials": counts,
                     "params": " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                        for k, v in sorted(r["params"].items())),
                     "checkpoint": str(exported)})
    atomic_write_bytes(directory / "leaderboard.csv", _csv(columns, rows))
    trial_columns = ["mode", "trial", "status", "attempts", "epochs", "score", "best_epoch", "params", "checkpoint",
                     "error"]
    atomic_write_bytes(directory / "trials.csv", _csv(trial_columns, [
        {**r, "params": json.dumps(r["params"], sort_keys=True)} for r in records]))

    def cell(value: Any) -> str:
        return f"{value:.3f}" if isinstance(value, float) else "-" if value is None else str(value)

    lines = [f"# Sweep {sweep.name}", "",
             f"`{sweep.source}`: {len(records)} trials, {sweep.search} search, ASHA on val/{sweep.metric} "
             f"(grace {sweep.grace_period} epoch(s), reduction factor {sweep.reduction_factor}), seed {sweep.seed}. "
             "Best trial per mode, scored on the validation split at its best epoch; trials = "
             "completed/early-stopped/failed. Every trial: `trials.csv`. Intervals: 95% bootstrap over the "
             f"validation instances ({RESAMPLES} resamples); a crf/joint mode's difference from its backbone's best "
             "trial is paired over the same instances and called beats/trails only where its interval excludes "
             "zero.", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    path = directory / "leaderboard.md"
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
    return path


def _csv(columns: list[str], rows: list[dict[str, Any]]) -> bytes:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().encode()

