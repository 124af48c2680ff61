"""Ray Tune sweeps over the recipes (`distpose tune`; the sweep file: sweep_file.py; the results:
leaderboard.py).

Each recipe gets its own Tune experiment, so ASHA compares trials of one recipe with each other and a
model-based searcher models one objective at a time. Recipes run in the order of recipes.RECIPES; a crf or
joint recipe starts every trial from the best trial of its parent recipe (or from its config's own
train.backbone_checkpoint when the parent is not swept).

A trial is a function trainable that fits a TorchTrainer (Ray Train V2's way to meet Tune), reporting
each epoch's validation scores through TuneReportCallback. Tune retries a failed trial up to
`max_failures` times (the TorchTrainer resumes from the trial's latest checkpoint) and then records it
as failed; the sweep goes on. `max_concurrent_trials` is what the cluster's CPUs (GPUs) hold, so no
trial's workers wait for resources another trial holds.

    <storage>/<name>/<recipe>/          Tune's experiment (restorable) and runs/<trial>/ (distpose runs)
    <storage>/<name>/<recipe>/done.json the recipe's trials, once its experiment has finished
    <storage>/<name>/leaderboard.md|csv, trials.csv, best/<recipe>.pt
"""

from __future__ import annotations

import _thread
import contextlib
import dataclasses
import json
import logging
import os
import signal
import threading
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from distpose.cluster import environment, quiet, ray_cluster
from distpose.config import Config, ConfigError, load_config, worker_range
from distpose.errors import UserError
from distpose.files import append_bytes, exists, file_sizes, holds_anything, read_bytes, within, write_bytes
from distpose.metrics_log import parse_records, read_records
from distpose.models.model_file import read_model_file
from distpose.recipes import RECIPES, recipe
from distpose.train.checkpoints import BEST_MODEL
from distpose.train.driver import RUN_CONFIG, check_model_files, check_shards, train, with_absolute_paths
from distpose.train.leaderboard import best_trials, score_best, write_leaderboard
from distpose.train.sweep_file import Sweep, base_config, dimensions_of, sweep_dir, trial_config

log = logging.getLogger(__name__)

DONE_FILE = "done.json"
TRIAL_MEMORY = 256 * 2**20  # bytes reserved for a trial's driver process
TRIAL_CLEANUP_ENV, TRIAL_CLEANUP_S = "TUNE_FORCE_TRIAL_CLEANUP_S", 60
TUNE_SIGINT_ENV = "TUNE_DISABLE_SIGINT_HANDLER"
TUNE_OUTPUT_ENV = "RAY_AIR_NEW_OUTPUT"
ATTEMPTS_SUFFIX = ".attempts.jsonl"  # runs/<trial>.attempts.jsonl: one line per attempt, one per error


def _say(text: str) -> None:
    log.info("[tune] %s", text)


# ------------------------------------------------------------------------------------------------
# one recipe's experiment


def _search_space(sweep: Sweep, name: str) -> dict[str, Any]:
    from ray import tune

    make = {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint}
    space = {}
    for dim in dimensions_of(sweep, name):
        if dim.kind == "choice":
            space[dim.key] = (tune.grid_search if sweep.search == "grid" else tune.choice)(list(dim.values))
        else:
            space[dim.key] = make[dim.kind](*dim.values)
    return space


def recipe_seed(sweep: Sweep, name: str) -> int:
    """The search seed of one recipe's experiment: fixed by the sweep's seed and the recipe's name, so narrowing a
    sweep to fewer recipes samples the same trials for those that remain."""
    return (sweep.seed * 1_000_003 + zlib.crc32(name.encode())) % 2**31


def _searcher(sweep: Sweep, name: str, concurrent: int = 0):
    """The recipe's seeded searcher, running at most `concurrent` trials at once (0: no limit). The limit is the
    searcher's own: Tune ignores max_concurrent_trials for its basic generator."""
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    seed = recipe_seed(sweep, name)
    if sweep.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        searcher = OptunaSearch(seed=seed)
    elif sweep.search == "hyperopt":
        from ray.tune.search.hyperopt import HyperOptSearch

        searcher = HyperOptSearch(random_state_seed=seed)
    else:  # random samples, grid_search expanded
        return BasicVariantGenerator(random_state=seed, max_concurrent=concurrent)
    return ConcurrencyLimiter(searcher, max_concurrent=concurrent) if concurrent else searcher


def _make_trial(sweep: Sweep, name: str, runs: Path | str, backbone: str | None):
    cwd = Path.cwd()  # Tune runs each trial in its own directory: relative config paths mean the driver's

    def run_trial(values: dict[str, Any]) -> None:
        from ray import tune
        from ray.tune.integration.ray_train import TuneReportCallback

        trial = tune.get_context().get_trial_id()
        attempts = within(runs, f"{trial}{ATTEMPTS_SUFFIX}")
        _append_json_line(attempts, {"start": time.time()})
        try:
            extra = [f"{key}={json.dumps(value)}" for key, value in values.items()]
            # JSON-quoted: YAML would read a trial id such as 87919_00000 as the integer 8791900000.
            names = [f"train.run_name={json.dumps(trial)}", f"train.storage={json.dumps(str(runs))}"]
            cfg = trial_config(sweep, name, [*extra, *names], backbone)
            outcome = train(with_absolute_paths(cfg, cwd), callbacks=[TuneReportCallback()])
            if not outcome.trained:  # a driver killed after the run finished, before Tune recorded the trial
                tune.report({key: value for key, value in outcome.metrics.items() if isinstance(value, (int, float))})
        except Exception as exc:
            _append_json_line(attempts, {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:500]})
            raise

    return run_trial


def _append_json_line(location: Path | str, record: dict[str, Any]) -> None:
    append_bytes(location, (json.dumps(record) + "\n").encode())


def _json_lines(location: Path | str) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (complete lines); none if there is no such file."""
    try:
        return parse_records(read_bytes(location))
    except FileNotFoundError:
        return []


def trials_that_fit(cfg: Config) -> int:
    """How many of this config's trials the cluster holds at once (its workers' CPUs and GPUs)."""
    import ray

    total = ray.cluster_resources()
    workers = worker_range(cfg.train)[1]  # an elastic trial at its most
    fits = int(total.get("CPU", 0) // (workers * cfg.train.cpus_per_worker))
    if cfg.train.use_gpu:
        fits = min(fits, int(total.get("GPU", 0) // workers))
    if fits < 1:
        raise ConfigError(f"config key 'train.workers': one trial needs {workers} workers x "
                          f"{cfg.train.cpus_per_worker} CPUs{' and a GPU each' if cfg.train.use_gpu else ''}, "
                          f"more than the cluster's {total.get('CPU', 0):g} CPUs / {total.get('GPU', 0):g} GPUs")
    return fits


def run_recipe(sweep: Sweep, name: str, backbone: str | None, resume: bool) -> list[dict[str, Any]]:
    """Run (or restore and finish) one recipe's Tune experiment; return a record per trial."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    directory = within(sweep_dir(sweep), name)
    runs = within(directory, "runs")
    cfg = trial_config(sweep, name, [], backbone)
    # The trial's own process only drives the TorchTrainer: it reserves no CPU (Tune needs some resource
    # in its bundle, so a little memory), leaving every CPU to the trial's workers.
    trainable = tune.with_resources(_make_trial(sweep, name, runs, backbone), {"CPU": 0, "memory": TRIAL_MEMORY})
    experiment = within(directory, "experiment")
    if resume and tune.Tuner.can_restore(str(experiment)):
        _say(f"{name}: resuming the experiment in {experiment} (finished trials are not rerun)")
        tuner = tune.Tuner.restore(str(experiment), trainable, resume_unfinished=True, resume_errored=False,
                                   restart_errored=False)
        # A restored experiment keeps the RunConfig it was started with: this command's -q (or not) holds.
        run_config = getattr(getattr(tuner, "_local_tuner", None), "_run_config", None)
        if run_config is not None:
            run_config.verbose = 0 if quiet() else 1
    else:
        concurrent = trials_that_fit(cfg)
        _say(f"{name}: {sweep.trials_per_recipe if sweep.search != 'grid' else 'grid of'} trial(s) of "
             f"{cfg.train.epochs} epochs, {sweep.search} search, ASHA on val/{sweep.metric}, "
             f"{concurrent} at a time")
        scheduler = ASHAScheduler(time_attr="training_iteration", max_t=cfg.train.epochs,
                                  grace_period=min(sweep.grace_period, cfg.train.epochs),
                                  reduction_factor=sweep.reduction_factor)
        tuner = tune.Tuner(
            trainable,
            param_space=_search_space(sweep, name),
            tune_config=tune.TuneConfig(
                metric=f"val/{sweep.metric}", mode="max", scheduler=scheduler,
                search_alg=_searcher(sweep, name, concurrent),
                num_samples=1 if sweep.search == "grid" else sweep.trials_per_recipe),
            run_config=tune.RunConfig(
                name="experiment", storage_path=str(directory),
                failure_config=tune.FailureConfig(max_failures=sweep.max_failures),
                verbose=0 if quiet() else 1),  # Tune's trial tables
        )
    # -q: none of Tune's output. Its newer output engine prints the experiment's settings and a TensorBoard hint
    # even at verbose=0; the older one prints nothing at verbose=0.
    with stopped_by_ctrl_c() as interrupted, environment(TUNE_OUTPUT_ENV, "0" if quiet() else None):
        results = tuner.fit()
    if interrupted.is_set():
        raise KeyboardInterrupt
    statuses = _tune_statuses(results)
    records = [_trial_record(sweep, name, runs, result, cfg.train.epochs, statuses) for result in results]
    unfinished = [r["trial"] for r in records if r["status"] == "interrupted"]
    if unfinished:  # never recorded as done: --resume goes on with them
        raise TrainingInterrupted(f"{name}: Tune ended with trial(s) {', '.join(unfinished)} unfinished")
    write_bytes(within(directory, DONE_FILE), json.dumps(records, indent=1).encode())
    return records


class TrainingInterrupted(UserError):
    """A recipe's experiment ended with trials that neither finished nor failed (exit code 1)."""

    exit_code = 1


# How long the first Ctrl-C lets Tune take to save its experiment state and stop the trials (it waits up to 5 s
# for them) before the sweep leaves anyway.
GRACEFUL_STOP_S = 30.0


@contextlib.contextmanager
def stopped_by_ctrl_c() -> Iterator[threading.Event]:
    """While Tune runs an experiment: the first Ctrl-C has Tune stop it as Tune does on SIGUSR1 (its state saved,
    so that --resume continues each unfinished trial), and sets the event; the caller then stops the sweep. If Tune
    has not returned after GRACEFUL_STOP_S, or at a second Ctrl-C, the sweep leaves at once. Tune's own Ctrl-C
    handler would end only the running experiment and return as if it had finished."""
    interrupted = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield interrupted
        return

    def leave_unless_stopped() -> None:
        if not stopped.wait(GRACEFUL_STOP_S):
            _thread.interrupt_main()

    def on_ctrl_c(signum: int, frame: Any) -> None:
        if interrupted.is_set():
            raise KeyboardInterrupt
        interrupted.set()
        _say("stopping at Ctrl-C: every trial ends now, at its latest checkpoint (Ctrl-C again to leave at once)")
        os.kill(os.getpid(), signal.SIGUSR1)
        threading.Thread(target=leave_unless_stopped, name="distpose-tune-stop", daemon=True).start()

    stopped = threading.Event()
    previous_handler = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        with environment(TUNE_SIGINT_ENV, "1"):
            yield interrupted
    finally:
        stopped.set()
        signal.signal(signal.SIGINT, previous_handler)


def _tune_statuses(results: Any) -> dict[str, str]:
    """Tune's status of each trial of a finished experiment (TERMINATED, ERROR, or RUNNING/PENDING/PAUSED for
    one it did not finish), by trial id. A result's own error can be missing for a trial Tune counts as errored."""
    analysis = getattr(results, "_experiment_analysis", None)
    return {trial.trial_id: trial.status for trial in getattr(analysis, "trials", None) or []}


def _trial_record(sweep: Sweep, name: str, runs: Path | str, result: Any, epochs: int,
                  statuses: dict[str, str]) -> dict[str, Any]:
    """What the leaderboard says of one trial: completed, early-stopped (by ASHA, after a finished epoch), failed
    (with its error), or interrupted. The scores are best.pt's, i.e. the trial's best epoch."""
    trial = _trial_id(runs, result)
    run = within(runs, trial)
    log = _json_lines(within(runs, f"{trial}{ATTEMPTS_SUFFIX}"))
    if exists(within(run, RUN_CONFIG)):  # the trial's own epochs: the space may set train.epochs
        epochs = load_config(within(run, RUN_CONFIG)).train.epochs
    # Epochs the run itself finished (ASHA's stop can reach a trial after its last epoch).
    evaluated = [r["epoch"] for r in read_records(run, "eval")]
    record: dict[str, Any] = {"recipe": name, "trial": trial, "params": dict(result.config or {}),
                              "epochs": max(evaluated, default=0), "max_epochs": epochs,
                              "attempts": sum("start" in line for line in log)}
    best = within(run, BEST_MODEL)
    tune_status = statuses.get(trial, "ERROR" if result.error is not None else "TERMINATED")
    if result.error is not None or tune_status == "ERROR":
        errors = [line["error"] for line in log if "error" in line]
        record |= {"status": "failed", "error": errors[-1] if errors else
                   str(result.error or "failed (Tune recorded no error)").strip().splitlines()[-1][:500]}
    elif tune_status != "TERMINATED":
        record["status"] = "interrupted"
    else:
        record["status"] = "completed" if record["epochs"] >= epochs else "early-stopped"
    if exists(best):
        meta = read_model_file(best)["meta"]
        record |= {"checkpoint": str(best), "best_epoch": meta.get("epoch"),
                   "scores": {k[4:]: v for k, v in meta.items() if k.startswith("val/")}}
        record["score"] = record["scores"].get(sweep.metric)
    return record


def _trial_id(runs: Path | str, result: Any) -> str:
    """The Tune trial id of a result, which names its distpose run (runs/<id>/, runs/<id>.attempts.jsonl)."""
    trial_id = (result.metrics or {}).get("trial_id")
    if trial_id:
        return trial_id
    # A trial that never reported: Tune's directory for it is named <trainable>_<trial id>_<params>.
    name = Path(result.path or "").name
    known = [name.removesuffix(ATTEMPTS_SUFFIX) for name in file_sizes(runs, recursive=False)
             if name.endswith(ATTEMPTS_SUFFIX)]
    return next((t for t in known if f"_{t}_" in f"{name}_"), name or "?")


# ------------------------------------------------------------------------------------------------
# the sweep


def parent_recipe(sweep: Sweep, name: str) -> str | None:
    """The swept recipe whose best trial a crf/joint recipe starts from; None if that recipe is not swept (then
    the recipe config's own train.backbone_checkpoint)."""
    parent = recipe(name).parent
    return parent if parent in sweep.recipes else None


def parent_backbone(sweep: Sweep, name: str, best: dict[str, dict[str, Any]]) -> str | None:
    """The model file a crf/joint recipe starts from: the best trial of its parent_recipe, else None."""
    other = parent_recipe(sweep, name)
    if other is None:
        return None
    if other not in best:
        raise ConfigError(f"{sweep.source}: recipe {name!r} starts from the best {other!r} trial, "
                          f"but no {other!r} trial produced a model file")
    return best[other]["checkpoint"]


def run_sweep(sweep: Sweep, address: str | None = None, resume: bool = False) -> Path | str:
    directory = sweep_dir(sweep)
    if not resume and holds_anything(directory):
        raise ConfigError(f"{sweep.source}: sweep directory {directory} already exists: add --resume to finish "
                          "that sweep, or choose another name (name=...)")
    for name in sweep.recipes:  # missing shards or weights would fail every trial, after Ray has started
        try:
            cfg = trial_config(sweep, name, [])
            check_shards(cfg)
            check_model_files(cfg)
        except UserError as exc:
            raise ConfigError(f"{sweep.source}: recipe {name!r}: {exc}") from None
    write_bytes(within(directory, "sweep.json"), json.dumps(dataclasses.asdict(sweep), indent=1).encode())
    order = [r.name for r in RECIPES if r.name in sweep.recipes]  # every parent before its children
    # Tune waits this long for a stopped trial's actor to exit before killing it (600 s by default), and a
    # trial's run can hang in its shutdown on a busy cluster, holding up the whole sweep meanwhile.
    os.environ.setdefault(TRIAL_CLEANUP_ENV, str(TRIAL_CLEANUP_S))
    records: list[dict[str, Any]] = []
    with ray_cluster(address, base_config(sweep, order[0]).monitor):
        for name in order:
            done = within(directory, name, DONE_FILE)
            if resume and exists(done):
                _say(f"{name}: finished earlier ({done})")
                recipe_records = json.loads(read_bytes(done))
            else:
                backbone = parent_backbone(sweep, name, best_trials(records))
                if backbone:
                    _say(f"{name}: every trial starts from {backbone}")
                recipe_records = run_recipe(sweep, name, backbone, resume)
            records += recipe_records
            _say(f"{name}: " + ", ".join(f"{status} {sum(r['status'] == status for r in recipe_records)}"
                                         for status in ("completed", "early-stopped", "failed")))
    scored = score_best(best_trials(records))
    path = write_leaderboard(sweep, records, scored, {r: parent_recipe(sweep, r) for r in sweep.recipes})
    _say(f"leaderboard: {path}")
    return path


