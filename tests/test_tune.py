"""`distpose tune`: sweep-file errors before Ray, ASHA stopping a trial that trails, a failing trial retried then
recorded (on S3), and a sweep whose driver is killed finished by --resume without repeating finished trials. The
shipped quick sweep itself, its leaderboard and its sampling are checked where the README runs it
(tests/test_docs.py)."""

import csv
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from local_ray import ListeningSockets, watched_temporary_directory

from distpose.commands import main
from distpose.config import ConfigError
from distpose.files import read_bytes
from distpose.metrics_log import read_records
from distpose.train.checkpoints import complete_checkpoints
from distpose.train.sweep_file import base_config, load_sweep, sweep_dir, trial_config
from distpose.train.tune import DONE_FILE, run_sweep

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "quick"
ALL_RECIPES = ["cnn", "hrnet", "cnn_crf", "cnn_joint", "hrnet_crf", "hrnet_joint"]


def tiny_overrides(shards: Path) -> list[str]:
    return [f"data.shards={shards}", "train.workers=1", "train.cpus_per_worker=1", "data.batch_size=4",
            "data.loader_workers=0", "data.batches_per_epoch=2", "train.epochs=2", "train.lr_steps=[]",
            "train.log_every=1000"]


def write_sweep(path: Path, **fields) -> Path:
    fields = {"configs": str(CONFIGS), "storage": str(path.parent / "sweeps"), **fields}
    path.write_text(yaml.safe_dump(fields))
    return path


# ---------------------------------------------------------------------------------------------
# sweep-file errors: one line, before Ray


@pytest.mark.parametrize(("fields", "message"), [
    ({"recipes": ["cnn"], "colour": 1}, "sweep key 'colour': unknown"),
    ({"recipes": ["cnn", "vit"]}, "sweep key 'recipes': 'vit' has no config"),
    ({"recipes": ["cnn"], "space": {"train.lr": {"gaussian": [0, 1]}}}, "sweep key 'space.train.lr'"),
    ({"recipes": ["cnn"], "space": {"train.lr": {"uniform": [0.1, 0.01]}}}, "expected [low, high] with low < high"),
    ({"recipes": ["cnn"], "space": {"train.lrr": {"choice": [0.1]}}}, "config key 'train.lrr'"),
    ({"recipes": ["cnn"], "space": {"train.lr": {"choice": [-1.0]}}}, "config key 'train.lr': got -1.0"),
    ({"recipes": ["cnn"], "search": "grid", "space": {"train.lr": {"uniform": [0.01, 0.1]}}},
     "only choice dimensions"),
    ({"recipes": ["cnn"], "metric": "loss"}, "sweep key 'metric': got 'loss'"),
    ({"recipes": ["cnn"], "space": {"model.crf_window": {"choice": [3], "recipes": ["cnn_crff"]}}},
     "['cnn_crff'] have no config in"),
    ({"recipes": ["cnn"], "overrides": {"train.lr": 0.1}}, "sweep key 'overrides': got {'train.lr': 0.1}, expected"),
    ({"recipes": ["cnn"], "recipe_overrides": {"vit": ["train.lr=0.1"]}},
     "sweep key 'recipe_overrides.vit': no config"),
    ({"recipes": ["cnn"], "recipe_overrides": {"cnn": "train.lr=0.1"}}, "sweep key 'recipe_overrides.cnn': got"),
    ({"recipes": ["cnn"], "recipe_overrides": {"cnn": ["train.lrr=0.1"]}}, "config key 'train.lrr'"),
    ({"recipes": ["cnn_crf"], "recipe_overrides": {"cnn_crf": ["train.mode=joint"]}},
     "recipe 'cnn_crf': config key 'train.mode' is 'joint', but recipe 'cnn_crf' trains in mode 'crf'"),
])
def test_bad_sweep_files_fail_in_one_line(tmp_path, capsys, fields, message):
    sweep = write_sweep(tmp_path / "sweep.yaml", name="bad", **fields)
    assert main(["tune", str(sweep)]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in out + err, err
    assert not (tmp_path / "sweeps").exists()


def test_a_key_given_twice_fails_in_one_line(tmp_path, capsys):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"name: twice\nconfigs: {CONFIGS}\nrecipes: [cnn]\nspace:\n  train.lr: {{choice: [0.1]}}\n"
                     "  train.lr: {choice: [0.2]}\n")
    assert main(["tune", str(sweep)]) == 2
    assert capsys.readouterr().err == (f"distpose: error: sweep file {sweep}: not valid YAML "
                                       f"(line 6: duplicate key 'train.lr')\n")


def test_an_override_that_is_not_yaml_is_a_string_as_in_a_config_override(tmp_path, capsys):
    """Sweep overrides parse as config overrides do: a value that is not YAML is taken as a string, and a
    string where the key wants a list fails in one line naming the key."""
    sweep = write_sweep(tmp_path / "sweep.yaml", name="bad", recipes=["cnn"])
    assert load_sweep(sweep, ["name=[x"]).name == "[x"
    assert main(["tune", str(sweep), "overrides=[train.lr_steps=[3],x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "sweep key 'overrides': got '[train.lr_steps=[3],x', expected a list" in err


def test_recipe_overrides_apply_after_the_common_ones_to_their_recipe_only(tmp_path):
    path = write_sweep(tmp_path / "sweep.yaml", name="lengths", recipes=["cnn", "cnn_crf"],
                       overrides=["train.epochs=4", "data.batch_size=16"],
                       recipe_overrides={"cnn": ["train.epochs=6", "train.lr_steps=[5]"]})
    sweep = load_sweep(path)
    cnn, crf = base_config(sweep, "cnn"), base_config(sweep, "cnn_crf")
    assert (cnn.train.epochs, cnn.train.lr_steps, cnn.data.batch_size) == (6, (5,), 16)
    assert (crf.train.epochs, crf.data.batch_size) == (4, 16)
    assert trial_config(sweep, "cnn", ["train.lr=0.002"]).train.epochs == 6


def test_trials_checkpoint_at_epoch_ends_only_whatever_the_sweep_asks(tmp_path):
    """Every report is one of ASHA's iterations (its time attribute): a checkpoint between epoch ends would count
    as an epoch."""
    path = write_sweep(tmp_path / "sweep.yaml", name="often", recipes=["cnn"],
                       overrides=["train.checkpoint_every_steps=5", "train.checkpoint_every_minutes=10"])
    sweep = load_sweep(path)
    assert base_config(sweep, "cnn").train.checkpoint_every_steps == 5
    trial = trial_config(sweep, "cnn", []).train
    assert (trial.checkpoint_every_steps, trial.checkpoint_every_minutes) == (0, 0)


def test_missing_shards_fail_in_one_line_before_ray(tmp_path, capsys):
    missing = tmp_path / "no_shards"
    sweep = write_sweep(tmp_path / "sweep.yaml", name="unsharded", recipes=["cnn"],
                        overrides=[f"data.shards={missing}"])
    assert main(["tune", str(sweep)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"recipe 'cnn': config key 'data.shards': {missing}" in err, err
    assert not (tmp_path / "sweeps").exists()


def test_a_finished_sweep_name_is_not_overwritten(tmp_path, capsys):
    sweep = write_sweep(tmp_path / "sweep.yaml", name="taken", recipes=["cnn"])
    (tmp_path / "sweeps" / "taken" / "cnn").mkdir(parents=True)
    assert main(["tune", str(sweep)]) == 2
    assert "add --resume" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# sweeps on the session's Ray (tests/test_docs.py runs `distpose tune quick` and checks its leaderboard, the
# crf recipes' start from the best backbone trial and the seeded sampling)


def read_csv(location: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(read_bytes(location).decode())))


def test_asha_stops_a_trial_that_trails_at_the_first_rung(ray_session, synth_shards, tmp_path):
    """Two grid trials, one at a time (a trial's worker asks for the session's 4 CPUs). The first learns (lr 5e-3)
    and records the first rung's score; the second barely leaves its initial weights (lr 1e-7), scores below
    that after its first epoch, and ASHA (grace 1 epoch, reduction factor 2) stops it there."""
    overrides = [*tiny_overrides(synth_shards), "train.cpus_per_worker=4", "data.input_size=[64,48]",
                 "data.heatmap_size=[16,12]", "data.batch_size=8", "data.batches_per_epoch=30", "train.epochs=2"]
    path = write_sweep(tmp_path / "sweep.yaml", name="asha", recipes=["cnn"], search="grid", overrides=overrides,
                       space={"train.lr": {"choice": [5.0e-3, 1.0e-7]}}, grace_period=1, reduction_factor=2,
                       max_failures=0)
    run_sweep(load_sweep(path))
    directory = sweep_dir(load_sweep(path))
    trials = {json.loads(t["params"])["train.lr"]: t for t in csv.DictReader((directory / "trials.csv").open())}
    first_rung = {lr: read_records(directory / "cnn" / "runs" / t["trial"], "eval")[0]["val/visible/pck@0.1"]
                  for lr, t in trials.items()}
    print(f"\n[tune asha] visible PCK@0.1 after epoch 1: {first_rung}; "
          f"statuses: { {lr: (t['status'], t['epochs']) for lr, t in trials.items()} }")
    assert first_rung[1.0e-7] < first_rung[5.0e-3]
    assert (trials[5.0e-3]["status"], trials[5.0e-3]["epochs"]) == ("completed", "2")
    assert (trials[1.0e-7]["status"], trials[1.0e-7]["epochs"]) == ("early-stopped", "1")
    rows = list(csv.DictReader((directory / "leaderboard.csv").open()))
    assert rows[0]["trials"] == "1/1/0" and float(rows[0]["visible/pck@0.1"]) == pytest.approx(
        float(trials[5.0e-3]["score"]))


# ---------------------------------------------------------------------------------------------
# failures and resume


def test_failing_trial_is_retried_then_recorded_and_the_sweep_completes(ray_session, object_store, synth_shards,
                                                                        tmp_path):
    """The sweep keeps its directory in the S3 bucket: Tune's experiment, the trials' runs, trials.csv and the
    leaderboard."""
    missing = tmp_path / "no_shards"
    path = write_sweep(tmp_path / "sweep.yaml", name="failing", recipes=["cnn"], search="grid",
                       overrides=tiny_overrides(synth_shards), storage=object_store.uri("sweeps"),
                       space={"data.shards": {"choice": [str(synth_shards), str(missing)]}}, max_failures=1)
    run_sweep(load_sweep(path))
    directory = sweep_dir(load_sweep(path))
    assert directory == object_store.uri("sweeps/failing")
    trials = {json.loads(t["params"])["data.shards"]: t for t in read_csv(f"{directory}/trials.csv")}
    assert trials[str(synth_shards)]["status"] == "completed"
    failed = trials[str(missing)]
    assert failed["status"] == "failed" and failed["attempts"] == "2", failed  # 1 try + max_failures=1 retry
    assert "data.shards" in failed["error"] and str(missing) in failed["error"]
    rows = read_csv(f"{directory}/leaderboard.csv")
    assert [r["recipe"] for r in rows] == ["cnn"] and rows[0]["trials"] == "1/0/1"
    assert read_bytes(f"{directory}/best/cnn.pt")  # the completed trial's model file, exported to the bucket


# The killed sweep's trial under way at the kill, which comes once its fourth epoch has begun and Tune has saved
# the short trial as done: in its epochs 4 to 6 here.
LONG_TRIAL_EPOCHS = 10


def _ready_to_kill(directory: Path) -> bool:
    """Tune has recorded a finished trial, and the long trial's run is past its first epoch."""
    finished = any("TERMINATED" in p.read_text() for p in directory.glob("cnn/experiment/experiment_state-*.json"))
    for log in directory.glob("cnn/runs/*/metrics.jsonl"):
        if yaml.safe_load((log.parent / "config.yaml").read_text())["train"]["epochs"] == LONG_TRIAL_EPOCHS:
            return finished and any(r["epoch"] >= 3 for r in read_records(log.parent, "step"))
    return False


def test_shipped_sweeps_load_by_path_and_by_name_from_any_directory(tmp_path, monkeypatch):
    """`configs:` is taken relative to the sweep file, so a sweep loads from anywhere, and a packaged sweep
    is found by its name."""
    monkeypatch.chdir(tmp_path)
    paths = sorted((CONFIGS.parent / "tune").glob("*.yaml"))
    assert [p.stem for p in paths] == ["coco", "quick"]
    for path in paths:
        sweep = load_sweep(path)
        assert set(sweep.recipes) == set(ALL_RECIPES) and sweep.trials_per_recipe >= 2, path
        assert Path(sweep.configs) == (CONFIGS.parent / path.stem).resolve()
        assert load_sweep(path.stem) == sweep


def test_sweep_configs_relative_to_the_file_and_a_missing_one_named(tmp_path, monkeypatch):
    monkeypatch.chdir(CONFIGS.parent)  # where `configs: quick` would resolve against the working directory
    (tmp_path / "sweeps").mkdir()
    path = write_sweep(tmp_path / "sweeps" / "s.yaml", name="relative", recipes=["cnn"], configs="../quick")
    with pytest.raises(ConfigError, match=rf"sweep key 'configs': {tmp_path / 'quick'} is not a directory"):
        load_sweep(path)
    shutil.copytree(CONFIGS, tmp_path / "quick")
    assert load_sweep(path).configs == str(tmp_path / "quick")


@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n\x00\x00", b"name: [unclosed"])
def test_a_sweep_file_that_is_not_yaml_text_fails_in_one_line(tmp_path, capsys, content):
    path = tmp_path / "picture.png"
    path.write_bytes(content)
    assert main(["tune", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"distpose: error: sweep file {path}: not "), err


def test_killed_sweep_resumes_without_repeating_finished_trials(ray_session, synth_shards, tmp_path):
    """A 1-epoch and a 10-epoch trial; the driver is SIGKILLed once Tune has recorded the first as finished
    and the second is under way. `--resume` must finish the second (its run resuming from its checkpoint)
    and leave the first alone. Then `--resume` once more, on Tune's state of the kill: the second trial's run
    is found finished, and its scores reach Tune."""
    path = write_sweep(tmp_path / "sweep.yaml", name="killed", recipes=["cnn"], search="grid",
                       overrides=[*tiny_overrides(synth_shards), f"train.epochs={LONG_TRIAL_EPOCHS}"],
                       space={"train.epochs": {"choice": [1, LONG_TRIAL_EPOCHS]}}, max_failures=0,
                       grace_period=LONG_TRIAL_EPOCHS)
    address = ray_session.get_runtime_context().gcs_address
    argv = [sys.executable, "-m", "distpose", "tune", str(path), "--address", address]
    directory = tmp_path / "sweeps" / "killed"
    # Tune saves its experiment state at most every 10 s by default: the long trial could finish in that time,
    # before the state showed the short one finished.
    env = {**os.environ, "TUNE_GLOBAL_CHECKPOINT_S": "1"}
    with (tmp_path / "first.log").open("w") as log:
        first = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            deadline = time.monotonic() + 240
            while time.monotonic() < deadline and first.poll() is None and not _ready_to_kill(directory):
                time.sleep(0.2)
            assert first.poll() is None, "the sweep ended before it could be killed:\n" + \
                (tmp_path / "first.log").read_text()[-3000:]
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=30)
        finally:
            if first.poll() is None:
                first.kill()
    assert not (directory / "leaderboard.md").exists()
    finished = list(directory.glob("cnn/runs/*/final.pt"))
    assert len(finished) == 1, f"killed too late to test a resume: the long trial had finished too: {finished}"
    reached = max(r["epoch"] for run in directory.glob("cnn/runs/*/") for r in read_records(run, "step"))
    print(f"[tune resume] killed in epoch {reached + 1} of {LONG_TRIAL_EPOCHS}")
    experiment = directory / "cnn" / "experiment"
    shutil.copytree(experiment, tmp_path / "experiment_at_the_kill")

    second = subprocess.run([*argv, "--resume"], capture_output=True, text=True, timeout=400, check=False)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    trials = list(csv.DictReader((directory / "trials.csv").open()))
    assert sorted(json.loads(t["params"])["train.epochs"] for t in trials) == [1, LONG_TRIAL_EPOCHS]
    runs = directory / "cnn" / "runs"
    for t in trials:
        assert t["status"] == "completed", t
        starts = read_records(runs / t["trial"], "start")
        epochs = json.loads(t["params"])["train.epochs"]
        print(f"[tune resume] {epochs}-epoch trial: {t['attempts']} attempt(s), starts "
              f"{[s['resumed_from'].split(' (')[0] for s in starts]}")
        if epochs == 1:  # finished before the kill: not run again
            assert t["attempts"] == "1" and len(starts) == 1
        else:  # killed mid-run: run again, picking up from its own latest checkpoint
            assert t["attempts"] == "2" and len(starts) == 2
            assert starts[1]["resumed_from"].startswith("latest checkpoint of this run"), starts[1]
    assert (directory / "leaderboard.md").is_file()

    # Tune's state as the kill left it, though the long run has finished since: as if the driver had died after
    # the run's last epoch, before Tune saved the trial as done. The trial runs again, trains nothing, and
    # reports the finished run's scores to Tune.
    from ray.tune import ExperimentAnalysis

    long_trial = next(t["trial"] for t in trials if json.loads(t["params"])["train.epochs"] == LONG_TRIAL_EPOCHS)
    shutil.rmtree(experiment)
    shutil.copytree(tmp_path / "experiment_at_the_kill", experiment)
    (directory / "cnn" / DONE_FILE).unlink()
    third = subprocess.run([*argv, "--resume"], capture_output=True, text=True, timeout=400, check=False)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    attempts = next(t["attempts"] for t in read_csv(str(directory / "trials.csv")) if t["trial"] == long_trial)
    starts = read_records(runs / long_trial, "start")
    last = next(t.last_result for t in ExperimentAnalysis(str(experiment)).trials if t.trial_id == long_trial)
    print(f"[tune resume] with Tune's state of the kill: {attempts} attempts, {len(starts)} run starts, "
          f"Tune's last result is of epoch {last['epoch']}")
    assert attempts == "3" and len(starts) == 2
    assert last["epoch"] == LONG_TRIAL_EPOCHS and "val/visible/pck@0.1" in last


@pytest.mark.integration  # starts its own Ray, twice
def test_one_ctrl_c_stops_the_sweep_and_resume_trains_every_recipe_to_its_end(synth_shards, tmp_path):
    """`distpose -q tune` in its own process group with its own local Ray, as from a terminal: one SIGINT to the
    group once the cnn trial's first checkpoint is complete. The sweep exits 130 within seconds, says how to go on
    (the one line -q leaves) and records nothing as done; `-q tune --resume`, silent, then finishes that trial from
    its checkpoint and trains cnn_crf from it. (Tune's own handler ended only the cnn experiment: its half-trained
    trial was recorded early-stopped, became cnn_crf's parent, the sweep exited 0, and --resume found every recipe
    done. -q left Tune's tables, 73 lines a trial.) The first run's servers listen on loopback only, and it leaves
    nothing in the temporary directory, as for the other commands that start their own Ray (test_monitor.py)."""
    epochs = 10  # enough that the cnn trial is still training when the SIGINT lands: seeing the first checkpoint (and
    # listing the sockets) took about as long as the 2 epochs left of a 3-epoch trial (1 s each), and a trial that
    # finished first left --resume nothing to resume (2 attempts, 1 start).
    overrides = [*tiny_overrides(synth_shards), f"train.epochs={epochs}", "data.batches_per_epoch=30"]
    path = write_sweep(tmp_path / "sweep.yaml", name="interrupted", recipes=["cnn", "cnn_crf"], overrides=overrides,
                       trials_per_recipe=1, grace_period=3)
    argv = [sys.executable, "-m", "distpose", "tune", str(path)]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    directory = tmp_path / "sweeps" / "interrupted"
    # -q: Tune's tables once printed 73 lines for a trial
    with (tmp_path / "first.log").open("w") as log, watched_temporary_directory() as temporary:
        first = subprocess.Popen([*argv, "-q"], stdout=log, stderr=subprocess.STDOUT,
                                 env={**env, "TMPDIR": str(temporary)}, start_new_session=True)
        sockets = ListeningSockets(first.pid)
        try:
            deadline = time.monotonic() + 240
            # A complete checkpoint, not the first eval record: the epoch's checkpoint is written after its
            # eval, and a SIGINT in between left nothing to resume from when the machine was loaded.
            while time.monotonic() < deadline and first.poll() is None and not any(
                    complete_checkpoints(run) for run in directory.glob("cnn/runs/*/")):
                sockets.look()
                time.sleep(0.2)
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            sockets.look()
            interrupted_at = time.monotonic()
            os.killpg(first.pid, signal.SIGINT)
            code = first.wait(timeout=60)
            stop_time = time.monotonic() - interrupted_at
        finally:
            if first.poll() is None:
                os.killpg(first.pid, signal.SIGKILL)
    sockets.check_loopback_only("tune")
    output = (tmp_path / "first.log").read_text()
    print(f"\n[tune interrupt] one SIGINT: exit code {code} after {stop_time:.1f} s")
    assert code == 130 and stop_time < 20, output[-3000:]
    assert output.strip().splitlines() == ["distpose: interrupted; rerun the same command with --resume to go on: "
                                           "each unfinished trial resumes from its latest checkpoint, finished ones "
                                           "are kept"], output[-3000:]
    assert not list(directory.glob("*/" + DONE_FILE)) and not (directory / "leaderboard.md").exists()
    assert not list(directory.glob("cnn_crf/runs/*/"))

    second = subprocess.run([*argv, "--resume", "-q"], capture_output=True, text=True, timeout=400, check=False,
                            env=env)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert not (second.stdout + second.stderr).strip(), second.stdout[-3000:] + second.stderr[-3000:]
    trials = {t["recipe"]: t for t in read_csv(str(directory / "trials.csv"))}
    for name, t in trials.items():
        starts = read_records(directory / name / "runs" / t["trial"], "start")
        print(f"[tune interrupt] resumed: {name} {t['status']}, {t['epochs']} epochs, {t['attempts']} attempt(s), "
              f"starts {[s['resumed_from'].split(' (')[0] for s in starts]}")
        assert t["status"] == "completed" and t["epochs"] == str(epochs), t
    cnn_starts = read_records(directory / "cnn" / "runs" / trials["cnn"]["trial"], "start")
    assert trials["cnn"]["attempts"] == "2" and len(cnn_starts) == 2
    assert cnn_starts[1]["resumed_from"].startswith("latest checkpoint of this run") and cnn_starts[1]["epoch"] >= 1
    assert trials["cnn_crf"]["attempts"] == "1"
    crf_run = directory / "cnn_crf" / "runs" / trials["cnn_crf"]["trial"]
    assert yaml.safe_load((crf_run / "config.yaml").read_text())["train"]["backbone_checkpoint"] == \
        trials["cnn"]["checkpoint"]
