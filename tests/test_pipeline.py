"""`distpose pipeline` end to end on the session's Ray, shrunk to 2 steps per run on one worker: synthetic data, shards,
the six recipes in dependency order, evaluation and the report; a rerun retrains nothing.
The shards and the runs are in the S3 bucket (the object_store fixture), as on a cluster without a shared
filesystem; the report is written locally."""

import json
from pathlib import Path

import cv2
import pytest
import torch

from distpose.config import load_config
from distpose.eval.report import PCK_COLUMNS
from distpose.files import read_bytes
from distpose.metrics_log import read_records
from distpose.models.model_file import read_model_file
from distpose.pipeline import run_pipeline
from distpose.recipes import RECIPE_NAMES, RECIPES
from distpose.train.checkpoints import FINAL_MODEL

pytestmark = pytest.mark.integration

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "quick"


def starts(run: str) -> int:
    return len(read_records(run, "start"))


@pytest.fixture(scope="module")
def pipeline_run(ray_session, object_store, tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    runs = object_store.uri("pipeline/runs")
    overrides = (f"data.shards={object_store.uri('pipeline/shards')}", f"train.storage={runs}", "data.batch_size=4",
                 "train.epochs=1", "data.batches_per_epoch=2", "train.lr_steps=[]", "train.warmup_steps=0",
                 "eval.every_epochs=1", "train.workers=1",  # one worker: each of its processes costs ~3 s
                 "data.loader_workers=0")  # and no loader's forkserver (~2 s) in each (tests/test_loader.py has them)
    kwargs = dict(overrides=overrides, data_root=root / "synth", report_dir=root / "report", train_images=12,
                  val_images=6)
    report = run_pipeline(CONFIGS, **kwargs)
    return runs, report, kwargs


def test_report_has_every_recipe_and_the_floor(pipeline_run):
    _, report, _ = pipeline_run
    saved = json.loads((report.parent / "results.json").read_text())
    results = saved["runs"]
    assert [r["name"] for r in results] == ["mean pose", *RECIPE_NAMES]
    for r in results:  # every score with its interval, the estimate inside it
        for kind in ("visible", "occluded"):
            estimate, low, high = r["intervals"][f"{kind}/pck@0.1"]
            assert low <= estimate <= high and estimate == pytest.approx(r["metrics"][f"{kind}/pck@0.1"])
    # HRNet against the CNN, each CRF run against its backbone, each joint run against its network's crf run.
    assert [(c["run"], c["against"]) for c in saved["comparisons"]] == [
        ("hrnet", "cnn"), ("cnn_crf", "cnn"), ("cnn_joint", "cnn"), ("hrnet_crf", "hrnet"), ("hrnet_joint", "hrnet"),
        ("cnn_joint", "cnn_crf"), ("hrnet_joint", "hrnet_crf")]
    floor, runs = results[0], results[1:]
    assert floor["wall_time"] is None and 0 <= floor["metrics"]["visible/pck@0.1"] <= 1
    for r in runs:
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
    for name in RECIPE_NAMES:
        assert f"![{name}]({name}/" in text
    for picture in ["loss.png", "pck.png", *(f"{name}/skeletons.jpg" for name in RECIPE_NAMES)]:
        image = cv2.imread(str(report.parent / picture))
        assert image is not None and image.shape[0] > 100 and image.std() > 0, picture


def test_crf_runs_start_from_their_backbones_final_model(pipeline_run):
    runs, _, _ = pipeline_run
    for name, parent in ((r.name, r.parent) for r in RECIPES if r.parent is not None):
        cfg = load_config(f"{runs}/pipeline_{name}/config.yaml")
        assert cfg.train.backbone_checkpoint == f"{runs}/pipeline_{parent}/{FINAL_MODEL}"
        base = read_model_file(f"{runs}/pipeline_{parent}/{FINAL_MODEL}")["state_dict"]
        ours = read_model_file(f"{runs}/pipeline_{name}/{FINAL_MODEL}")["state_dict"]
        backbone = [k for k in base if k.startswith("backbone.")]
        assert backbone
        moved = [k for k in backbone if not torch.equal(ours[k], base[k])]
        # The window and the pairwise tables came from the training split's limbs (crf_prior.json).
        prior = json.loads(read_bytes(f"{runs}/pipeline_{name}/crf_prior.json"))
        assert prior["pairwise_init"] == "data" and cfg.model.crf_window == prior["radius"] >= 1
        assert prior["limbs"] > 0 and prior["coverage"] >= cfg.model.crf_window_coverage
        if cfg.train.mode == "crf":  # weights and BatchNorm statistics alike
            assert not moved, f"{name} changed its frozen backbone: {moved[:3]}"
        else:
            assert [k for k in moved if "running_" not in k and "num_batches" not in k], \
                f"{name} (joint) left the backbone's weights untrained"


def test_rerun_retrains_nothing(pipeline_run):
    runs, report, kwargs = pipeline_run
    before = {name: starts(f"{runs}/pipeline_{name}") for name in RECIPE_NAMES}
    first = json.loads((report.parent / "results.json").read_text())
    assert run_pipeline(CONFIGS, **kwargs) == report
    assert {name: starts(f"{runs}/pipeline_{name}") for name in RECIPE_NAMES} == before
    again = json.loads((report.parent / "results.json").read_text())
    # Same final models, same validation set: the same scores.
    assert [r["metrics"] for r in again["runs"]] == [r["metrics"] for r in first["runs"]]
