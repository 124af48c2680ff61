"""Every `distpose` and `make` command in the code blocks of README.md and docs/*.md runs as written, in one scratch
working directory, in the order the docs give them (README.md first, then docs/ by name).

Only sizes change, through SIZES: image counts, epochs, steps, batch sizes, trials. Commands that need what this
machine lacks (GPUs, real COCO, a remote cluster, the network) are listed in CANNOT_RUN with the reason; they are still
parsed by distpose's argument parser, and the config they name is loaded with their overrides. Commands that start
Ray run on the test session's Ray, found through RAY_ADDRESS as on a cluster: their text is unchanged, and a sweep
never meets a second Ray instance on this machine (Tune's trials would wait for CPUs it cannot free).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import pytest
import torch

from distpose.commands import parse_arguments
from distpose.config import load_config
from distpose.eval.evaluate import evaluate_model, flat_metrics
from distpose.eval.report import PCK_COLUMNS
from distpose.metrics_log import read_records
from distpose.models.model_file import load_model_file, read_model_file
from distpose.recipes import RECIPE_NAMES, RECIPES, recipe
from distpose.train.checkpoints import FINAL_MODEL
from distpose.train.sweep_file import Sweep, load_sweep
from distpose.train.tune import _search_space, _searcher

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_BLOCKS = ("bash", "sh", "shell", "console")

REAL_COCO = "needs the real COCO download (docs/coco.md)"
COCO_ON_GPUS = "needs the real COCO shards and GPUs"
CLUSTER = "needs a multi-node GPU cluster at the address given"
OFFICIAL = "needs an official HRNet release file, downloaded by the user"
CANNOT_RUN = {
    "make install": "what `make test` does first; CI's .ci/run runs `make test` on a fresh clone",
    "make test": "the suite itself",
    "make test-integration": "the suite itself",
    "make install 'TORCH=torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128'":
        "downloads a CUDA build of torch; this machine reaches PyPI only",
    "distpose train configs/coco/hrnet.yaml data.shards=/shared/coco-shards train.storage=/shared/runs "
    "train.workers=16 train.use_gpu=true --address HEAD_IP:6379": CLUSTER,
    "distpose data shard --coco-root /data/coco --split train2017 --out s3://my-bucket/coco-shards": REAL_COCO,
    "distpose data shard --coco-root /data/coco --split val2017 --out s3://my-bucket/coco-shards": REAL_COCO,
    "distpose data verify s3://my-bucket/coco-shards": REAL_COCO,
    "distpose train configs/coco/hrnet.yaml data.shards=s3://my-bucket/coco-shards "
    "train.storage=s3://my-bucket/runs train.workers=16 train.use_gpu=true --address HEAD_IP:6379": CLUSTER,
    "distpose eval --checkpoint s3://my-bucket/runs/coco_hrnet/final.pt --data s3://my-bucket/coco-shards":
        COCO_ON_GPUS,
    "distpose tune coco storage=s3://my-bucket/sweeps --address HEAD_IP:6379": CLUSTER,
    "distpose data shard --coco-root '$COCO' --split train2017 --out data/coco_shards --workers 8": REAL_COCO,
    "distpose data shard --coco-root '$COCO' --split val2017 --out data/coco_shards --workers 8": REAL_COCO,
    "distpose data verify data/coco_shards --workers 8": REAL_COCO,
    "distpose train coco/hrnet data.shards=data/coco_shards train.storage=runs": COCO_ON_GPUS,
    "distpose train coco/hrnet train.workers=16 data.batch_size=512 data.shards=/shared/coco_shards "
    "train.storage=/shared/runs --address '<head-ip>:6379'": CLUSTER,
    "distpose eval --checkpoint runs/coco_hrnet/best.pt --data data/coco_shards --split val2017 "
    "--boxes data/coco/COCO_val2017_detections_AP_H_56_person.json": COCO_ON_GPUS,
    "distpose convert pose_hrnet_w32_256x192.pth runs/official/hrnet_w32.pt --arch hrnet_w32 --input 256x192":
        OFFICIAL,
    "distpose eval --checkpoint runs/official/hrnet_w32.pt --data data/coco_shards --split val2017 "
    "--boxes data/coco/COCO_val2017_detections_AP_H_56_person.json": OFFICIAL,
    "distpose predict --checkpoint runs/official/hrnet_w32.pt photo.jpg --out predictions/": OFFICIAL,
}

# What each command is given on top of its text so that it runs in seconds, by the start of its text: the words are
# appended (argparse keeps the last of a repeated option), or, for a path that holds a step count, replaced.
TINY_TRAINING = ["train.epochs=1", "data.batches_per_epoch=2", "data.batch_size=4"]
SIZES: dict[str, tuple[list[str], dict[str, str]]] = {
    # 60 validation images make two shards of the documented 50: a 2-worker run evaluates on both ranks.
    "distpose data synth": (["--train", "16", "--val", "60"], {}),
    "distpose train": (TINY_TRAINING, {"checkpoint_step00001200": "checkpoint_step00000002"}),
    "distpose pipeline": (["--train-images", "16", "--val-images", "8", *TINY_TRAINING], {}),
    # A sweep's sizes are in its override lists: these replace the shipped sweep's, whose other entries they keep.
    "distpose tune": (["trials_per_recipe=1", "recipe_overrides={}",
                       "overrides=[train.workers=1,data.batch_size=4,data.loader_workers=0,train.epochs=1,"
                       "data.batches_per_epoch=2]"], {}),
    "distpose bench loader": (["--images", "20", "--batches", "3", "--warmup", "2"], {}),
    "distpose bench train": (["--steps", "3", "--warmup", "2", "data.batch_size=4"], {}),
    "distpose bench crf": (["--batch", "1", "--radius", "2", "--repeats", "1"], {}),
}
# Started with the session's Ray, or reading what such a command wrote: minutes in all, so marked integration.
ON_RAY = ("distpose train", "distpose tune", "distpose pipeline", "distpose bench", "distpose eval",
          "distpose predict", "make demo")
TIMEOUT_S = 600


@dataclass(frozen=True)
class Command:
    doc: str  # README.md, docs/coco.md
    line: int
    text: str  # the words as written, continuation lines joined, the comment left out

    @property
    def words(self) -> list[str]:
        return shlex.split(self.text)

    def __str__(self) -> str:
        return f"{self.doc}:{self.line}: {self.text}"


def documented_commands() -> list[Command]:
    found = []
    for doc in DOCS:
        block, pending, start = None, "", 0
        for number, line in enumerate(doc.read_text().splitlines(), 1):
            if line.startswith("```"):
                block = line[3:].strip() if block is None else None
                continue
            if block not in SHELL_BLOCKS:
                continue
            if not pending:
                start = number
            pending += line.rstrip().removesuffix("\\") + " "
            if line.rstrip().endswith("\\"):
                continue
            words, pending = shlex.split(pending, comments=True), ""
            if words and words[0] in ("distpose", "make"):
                found.append(Command(str(doc.relative_to(ROOT)), start, shlex.join(words)))
    return found


COMMANDS = documented_commands()
RUNNABLE = [c for c in COMMANDS if c.text not in CANNOT_RUN]


def sized(command: Command) -> list[str]:
    text = command.text
    for prefix, (extra, replaced) in SIZES.items():
        if text == prefix or text.startswith(prefix + " "):
            for old, new in replaced.items():
                text = text.replace(old, new)
            return [*shlex.split(text), *extra]
    return command.words


def demo_command() -> list[str]:
    """What `make demo` runs, as make prints it (`make -n`), with the Makefile's paths made absolute."""
    printed = subprocess.run(["make", "-n", "demo"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    line = next(line for line in printed.splitlines() if " pipeline " in f" {line} ")
    words = shlex.split(line)
    return [str(ROOT / words[0]), *words[1:]]


def run(command: Command, scratch: Path, env: dict[str, str]) -> tuple[list[str], subprocess.CompletedProcess]:
    argv = sized(command)
    if argv[:2] == ["make", "demo"]:
        demo = demo_command()
        argv = [*demo, *sized(Command(command.doc, command.line, shlex.join(["distpose", *demo[1:]])))[len(demo):]]
    env = {**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"}
    try:
        done = subprocess.run(argv, cwd=scratch, env=env, capture_output=True, text=True, timeout=TIMEOUT_S,
                              check=False)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{command}: still running after {TIMEOUT_S} s (ran: {shlex.join(argv)})")
    output = (done.stdout + done.stderr)[-3000:]
    assert done.returncode == 0, f"{command}\nran: {shlex.join(argv)}\nexit {done.returncode}:\n{output}"
    assert "Traceback" not in done.stderr, f"{command}\n{output}"
    return argv, done


# ---------------------------------------------------------------------------------------------------------------
# What some commands must have written: the documented command is the end-to-end test of what it makes.


def check_pipeline(scratch: Path, argv: list[str], done, run_again) -> None:
    """`make demo`: the report has every recipe and the floor, each score inside its interval and the paired
    comparisons the recipes exist for; each crf run started from its backbone's final model and left it untouched,
    each joint run from its crf run's (backbone and CRF) and trained the backbone; a rerun retrains nothing and
    scores the same."""
    report, runs = scratch / "reports" / "pipeline" / "report.md", scratch / "runs"
    saved = json.loads((report.parent / "results.json").read_text())
    results = saved["runs"]
    assert [r["name"] for r in results] == ["mean pose", *RECIPE_NAMES]
    for r in results:
        for kind in ("visible", "occluded"):
            estimate, low, high = r["intervals"][f"{kind}/pck@0.1"]
            assert low <= estimate <= high and estimate == pytest.approx(r["metrics"][f"{kind}/pck@0.1"])
    assert [(c["run"], c["against"]) for c in saved["comparisons"]] == [
        ("hrnet", "cnn"), ("cnn_crf", "cnn"), ("cnn_joint", "cnn"), ("hrnet_crf", "hrnet"), ("hrnet_joint", "hrnet"),
        ("cnn_joint", "cnn_crf"), ("hrnet_joint", "hrnet_crf")]
    floor, trained = results[0], results[1:]
    assert floor["wall_time"] is None and 0 <= floor["metrics"]["visible/pck@0.1"] <= 1
    for r in trained:
        assert r["wall_time"] > 0 and r["samples_per_s"] > 0, r["name"]
        for kind in ("visible", "occluded"):
            for column in PCK_COLUMNS:
                assert 0 <= r["metrics"][f"{kind}/{column}"] <= 1, (r["name"], kind, column)
        assert -1 <= r["metrics"]["AP"] <= 1
    text = report.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert sum(line.startswith(("| mean pose (", *(f"| {name} (" for name in RECIPE_NAMES))) for line in rows) == 7
    for c in saved["comparisons"]:
        assert sum(line.startswith(f"| {c['run']} | {c['against']} |") for line in rows) == 1, text
    for picture in ["loss.png", "pck.png", *(f"{name}/skeletons.jpg" for name in RECIPE_NAMES)]:
        image = cv2.imread(str(report.parent / picture))
        assert image is not None and image.shape[0] > 100 and image.std() > 0, picture

    for name, parent in ((r.name, r.parent) for r in RECIPES if r.parent is not None):
        run_dir, parent_final = runs / f"pipeline_{name}", runs / f"pipeline_{parent}" / FINAL_MODEL
        cfg = load_config(run_dir / "config.yaml")
        assert Path(cfg.train.backbone_checkpoint) == parent_final.resolve()
        base, ours = read_model_file(parent_final)["state_dict"], read_model_file(run_dir / FINAL_MODEL)["state_dict"]
        moved = [k for k in base if k.startswith("backbone.") and not torch.equal(ours[k], base[k])]
        prior = json.loads((run_dir / "crf_prior.json").read_text())
        if cfg.train.mode == "joint":  # the staged schedule: the crf run's whole CRF, its window too
            assert cfg.train.crf_from_checkpoint and prior["pairwise_init"] == "checkpoint"
            assert cfg.model.crf_window == load_config(runs / f"pipeline_{parent}" / "config.yaml").model.crf_window
        else:
            assert prior["pairwise_init"] == "data" and cfg.model.crf_window == prior["radius"] >= 1
            assert prior["limbs"] > 0 and prior["coverage"] >= cfg.model.crf_window_coverage
        if cfg.train.mode == "crf":  # weights and BatchNorm statistics alike
            assert not moved, f"{name} changed its frozen backbone: {moved[:3]}"
        else:
            assert [k for k in moved if "running_" not in k and "num_batches" not in k], \
                f"{name} (joint) left the backbone's weights untrained"

    starts = {name: len(read_records(runs / f"pipeline_{name}", "start")) for name in RECIPE_NAMES}
    run_again()
    assert {name: len(read_records(runs / f"pipeline_{name}", "start")) for name in RECIPE_NAMES} == starts
    again = json.loads((report.parent / "results.json").read_text())
    assert [r["metrics"] for r in again["runs"]] == [r["metrics"] for r in results]  # same models, same scores


def resampled(sweep: Sweep, recipe: str, storage: Path) -> list[dict]:
    """The trials Tune samples for `recipe` with the sweep's space and searcher, on a trainable that does nothing."""
    from ray import tune

    config = tune.TuneConfig(search_alg=_searcher(sweep, recipe), num_samples=sweep.trials_per_recipe)
    tuner = tune.Tuner(lambda config: None, param_space=_search_space(sweep, recipe), tune_config=config,
                       run_config=tune.RunConfig(storage_path=str(storage), verbose=0))
    return sorted((r.config for r in tuner.fit()), key=json.dumps)


def check_sweep(scratch: Path, argv: list[str], done, run_again) -> None:
    """`distpose tune quick`: a leaderboard row per recipe whose score is what its exported model file scores
    again; every crf/joint trial started from the best trial of its parent; the same seed samples the same
    trials, another seed others."""
    if "--resume" in argv:
        return
    args = parse_arguments(argv[1:])
    cwd = Path.cwd()
    os.chdir(scratch)
    try:
        sweep = load_sweep(args.sweep, args.overrides)
    finally:
        os.chdir(cwd)
    directory = scratch / "sweeps" / sweep.name
    rows = list(csv.DictReader((directory / "leaderboard.csv").open()))
    assert [r["recipe"] for r in rows] == list(sweep.recipes)
    assert sweep.name != "quick" or list(sweep.recipes) == list(RECIPE_NAMES)
    for row in rows:
        model, cfg, meta = load_model_file(row["checkpoint"])
        assert Path(row["checkpoint"]) == directory / "best" / f"{row['recipe']}.pt"
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the trial's arithmetic (1 CPU per worker), so the scores match exactly
        try:
            again = flat_metrics(evaluate_model(model, cfg)[0])
        finally:
            torch.set_num_threads(threads)
        assert float(row[sweep.metric]) == pytest.approx(again[sweep.metric], abs=1e-6), row["recipe"]
        assert meta["kind"] == "best" and cfg.eval.best_metric == sweep.metric
    trials = list(csv.DictReader((directory / "trials.csv").open()))
    best = {r["recipe"]: r for r in rows}
    for t in trials:
        assert t["status"] == "completed" and t["attempts"] == "1", t
        parent = recipe(t["recipe"]).parent
        if parent is not None:
            _, cfg, _ = load_model_file(t["checkpoint"])
            parent_best = next(x for x in trials if x["recipe"] == parent and x["trial"] == best[parent]["trial"])
            assert cfg.train.backbone_checkpoint == parent_best["checkpoint"], t
    ran = {name: sorted((json.loads(t["params"]) for t in trials if t["recipe"] == name), key=json.dumps)
           for name in ("cnn", "cnn_crf") if name in sweep.recipes}
    for name, params in ran.items():
        assert resampled(sweep, name, scratch / "resampled") == params
    other = dataclasses.replace(sweep, seed=sweep.seed + 1)
    assert resampled(other, "cnn", scratch / "other") != ran["cnn"]


def check_train_benchmark(scratch: Path, argv: list[str], done, run_again) -> None:
    """`distpose bench train`: both paths timed, and the ratio and the overhead per worker follow from them."""
    report = json.loads(done.stdout)
    distributed, plain = report["distributed"], report["plain"]
    assert distributed["samples_per_s"] > 0 and plain["samples_per_s"] > 0
    assert report["ratio"] == pytest.approx(distributed["samples_per_s"] / plain["samples_per_s"])
    assert report["overhead"] == pytest.approx(1 - report["ratio"])  # one worker
    assert 0 <= distributed["data_wait_share"] < 1 and report["mfu"] is None  # no MFU without a GPU
    assert report["machine"]["device"] == "cpu"


def check_evaluation(scratch: Path, argv: list[str], done, run_again) -> None:
    """`distpose eval` of a run's final model on the run's own validation split scores exactly what the run's last
    evaluation scored: the same weights and BatchNorm statistics (each rank once scored its share with its own),
    the same preprocessing, and metrics that no batching changes (HRNet's accuracy once did)."""
    if "--data" in argv:
        return
    run_dir = scratch / "runs" / "quick_cnn"
    recorded = read_model_file(run_dir / FINAL_MODEL)["meta"]
    scored = json.loads((run_dir / "eval-final-val-gt" / "metrics.json").read_text())
    assert load_config(run_dir / "config.yaml").train.workers > 1
    compared = {key: (value, recorded[f"val/{key}"]) for key, value in scored.items() if f"val/{key}" in recorded}
    assert len(compared) > 10 and "accuracy" in compared, compared
    assert {key: pair for key, pair in compared.items() if pair[0] != pair[1]} == {}


CHECKS = {"make demo": check_pipeline, "distpose tune quick": check_sweep,
          "distpose eval --checkpoint runs/quick_cnn/final.pt": check_evaluation,
          "distpose bench train": check_train_benchmark}


@pytest.fixture(scope="module")
def scratch(tmp_path_factory) -> Path:
    """A working directory that reads like a fresh clone's root: the docs name files under configs/ and
    tests/data/; everything the commands write stays here."""
    directory = tmp_path_factory.mktemp("docs")
    for name in ("configs", "tests"):
        (directory / name).symlink_to(ROOT / name)
    return directory


def test_the_docs_have_commands_and_the_tables_name_only_documented_ones():
    assert len(COMMANDS) > 20
    texts = {c.text for c in COMMANDS}
    assert not set(CANNOT_RUN) - texts, f"CANNOT_RUN names commands the docs no longer have: {set(CANNOT_RUN) - texts}"
    if "make demo" in texts:
        texts.add(shlex.join(["distpose", *demo_command()[1:]]))
    for prefix in SIZES:
        assert any(t == prefix or t.startswith(prefix + " ") for t in texts), f"SIZES: no documented {prefix!r}"


@pytest.mark.parametrize("command", [c for c in COMMANDS if c.text in CANNOT_RUN], ids=str)
def test_what_cannot_run_here_still_parses(command):
    words = command.words
    if words[0] != "distpose":
        return
    args = parse_arguments(words[1:])
    if getattr(args, "config", None) and args.command in ("train", "config", "bench") and "=" not in args.config:
        cwd = Path.cwd()
        os.chdir(ROOT)  # a config named by its path in the repository
        try:
            load_config(args.config, args.overrides)
        finally:
            os.chdir(cwd)


@pytest.mark.parametrize("command", [c for c in RUNNABLE if not c.text.startswith(ON_RAY)], ids=str)
def test_documented_command_runs(command, scratch):
    run(command, scratch, dict(os.environ))


@pytest.mark.parametrize("command", [c for c in RUNNABLE if c.text.startswith(ON_RAY)], ids=str)
def test_documented_command_runs_on_ray(command, scratch, ray_session):
    env = {**os.environ, "RAY_ADDRESS": ray_session.get_runtime_context().gcs_address}
    argv, done = run(command, scratch, env)
    for prefix, check in CHECKS.items():
        if command.text == prefix or command.text.startswith(prefix + " "):
            check(scratch, argv, done, lambda: run(command, scratch, env))


def test_every_runnable_command_is_either_cheap_or_on_ray():
    """A command added to the docs is run by one of the two tests above: none falls between them."""
    cheap = [c for c in RUNNABLE if not c.text.startswith(ON_RAY)]
    assert all(re.match(r"distpose (data|config|model-info|convert)\b", c.text) for c in cheap), cheap


# A path the project names in its docs, configs, comments or help text: it must exist. Patterns with a placeholder
# (`<machine>`) are left alone; so are paths under runs/, data/ and the like, which commands write.
NAMED_PATH = re.compile(r"(?<![\w/.-])((?:tests|docs|benchmarks/results|launch|configs|distpose)/[\w./-]*[\w])")
TEXT_FILES = ("*.md", "*.py", "*.yml", "*.yaml", "*.sbatch", "*.sh", "Makefile")


def test_every_path_the_project_names_exists():
    tracked = subprocess.run(["git", "ls-files", *TEXT_FILES], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    missing = []
    for name in tracked:
        if name.startswith("tests/") and name.endswith(".py"):  # tests make files of their own
            continue
        for number, line in enumerate((ROOT / name).read_text(errors="replace").splitlines(), 1):
            for match in NAMED_PATH.finditer(line):
                path, after = match[1], line[match.end():].lstrip("-_./")[:1]
                if after in ("<", "{", "*") or (ROOT / path).exists() or (ROOT / name).parent.joinpath(path).exists():
                    continue
                missing.append(f"{name}:{number}: {path}")
    assert not missing, "named but not there:\n" + "\n".join(missing)
