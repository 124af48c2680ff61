"""`distpose train` refuses bad configs and missing files with one line before Ray starts; the
DeepSpeed JSON and the learning-rate schedule derived from the config. No Ray here."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distpose.commands import main
from distpose.config import ConfigError, load_config
from distpose.models.model_file import save_model_file
from distpose.models.pose import build_pose_model
from distpose.train import driver
from distpose.train.engine import BATCH_KEYS, deepspeed_config, lr_multiplier, with_precision_resolved

QUICK = str(Path(__file__).parent.parent / "configs" / "quick" / "cnn.yaml")
# Independent of whatever data/shards holds: random batches and no evaluation unless a case asks.
NO_DATA = ["data.source=random", "eval.every_epochs=0"]
# Random joints have no limbs to measure: a CRF on them takes a fixed window and the Gaussian.
RANDOM_CRF = ["model.crf_window=3", "model.crf_pairwise_init=gaussian"]


def bad_cases(tmp: Path) -> list[tuple[str, list[str], int, str]]:
    """(id, overrides, exit code, the text the one-line error must hold)."""
    return [
        ("unknown_mode", ["train.mode=foo"], 2, "config key 'train.mode': got 'foo'"),
        ("crf_without_backbone", ["train.mode=crf"], 2, "config key 'train.backbone_checkpoint'"),
        ("crf_backbone_missing", ["train.mode=crf", f"train.backbone_checkpoint={tmp / 'nope.pt'}", *RANDOM_CRF], 2,
         f"config key 'train.backbone_checkpoint': {tmp / 'nope.pt'} does not exist"),
        ("crf_auto_window_on_random_data", ["train.mode=crf", f"train.backbone_checkpoint={tmp / 'nope.pt'}"], 2,
         "config key 'model.crf_window': got 'auto', expected an integer with data.source='random'"),
        ("batch_not_divisible", ["data.batch_size=30", "train.workers=4"], 2,
         "config key 'data.batch_size': got 30, expected a multiple of train.workers x train.grad_accum = 4"),
        ("fp16_on_cpu", ["train.precision=fp16"], 2, "config key 'train.precision': got 'fp16'"),
        ("bf16_zero0", ["train.precision=bf16", "train.zero_stage=0"], 2, "config key 'train.zero_stage': got 0"),
        ("shards_missing", ["data.source=shards", f"data.shards={tmp / 'no_shards'}"], 2,
         f"config key 'data.shards': {tmp / 'no_shards'}"),
        ("pretrained_missing", [f"model.pretrained={tmp / 'w.pth'}"], 2,
         f"config key 'model.pretrained': {tmp / 'w.pth'} does not exist"),
        ("pretrained_not_weights", [f"model.pretrained={QUICK}"], 2,
         f"weights file {QUICK}: not a readable torch file"),
        ("boxes_missing", ["eval.every_epochs=1", f"eval.boxes={tmp / 'boxes.json'}"], 2,
         f"detections file {tmp / 'boxes.json'} does not exist"),
        ("more_cpus_than_the_machine", ["train.workers=64", "data.batch_size=64"], 2,
         "train.workers=64 x train.cpus_per_worker=1 needs 64 CPUs, but "),  # this machine, or a connected Ray
        ("cluster_unreachable", ["--address", "127.0.0.1:1"], 2,
         "cannot connect to the Ray cluster at 127.0.0.1:1: connection refused"),
    ]


CASE_IDS = [case[0] for case in bad_cases(Path("/x"))]


@pytest.fixture
def no_ray(monkeypatch):
    """Fail the test if the driver gets as far as connecting to (or starting) Ray."""
    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started for a config the driver should have refused")

    monkeypatch.setattr(driver, "ray_cluster", refuse)
    monkeypatch.setattr(driver, "_fit", refuse)


@pytest.mark.parametrize("case", CASE_IDS)
def test_cli_refuses_before_ray(case, tmp_path, capsys, no_ray):
    _, overrides, code, message = next(c for c in bad_cases(tmp_path) if c[0] == case)
    argv = ["train", QUICK, *NO_DATA, f"train.storage={tmp_path / 'runs'}", *overrides]
    assert main(argv) == code
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("distpose: error: "), err
    assert message in lines[0]
    assert "Traceback" not in out + err
    assert not (tmp_path / "runs").exists()  # nothing written either


GPU_REQUEST = ("gpu_on_a_machine_without", ["train.use_gpu=true"], 2,
               "train.use_gpu=true with train.workers=2 needs 2 GPUs, but this machine has 0")


@pytest.mark.parametrize("case", ["unknown_mode", "shards_missing", "cluster_unreachable", GPU_REQUEST[0]])
def test_cli_subprocess_one_line_no_ray(case, tmp_path):
    """The real command in a fresh interpreter, bounded at a minute: one line, the exit code, and no Ray
    output. (Asking for a GPU here once retried the worker-group start forever.)"""
    if case == GPU_REQUEST[0] and torch.cuda.device_count() >= 2:
        pytest.skip("this machine has the GPUs")
    _, overrides, code, message = next(c for c in [*bad_cases(tmp_path), GPU_REQUEST] if c[0] == case)
    proc = subprocess.run([sys.executable, "-m", "distpose", "train", QUICK, *NO_DATA,
                           f"train.storage={tmp_path / 'runs'}", *overrides],
                          capture_output=True, text=True, check=False, timeout=60)
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("distpose: error: ") and message in lines[0], proc.stderr
    assert not proc.stdout and "Traceback" not in proc.stderr


def test_resume_dir_without_meta_refused(tmp_path, capsys, no_ray):
    assert main(["train", QUICK, *NO_DATA, f"train.storage={tmp_path}", "--resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"--resume {tmp_path}: not a distpose training checkpoint" in err[0]
    (tmp_path / "meta.json").write_text(json.dumps({"config": {}, "epoch": 2, "step": 20}))  # an older version's
    assert main(["train", QUICK, *NO_DATA, f"train.storage={tmp_path}", "--resume", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "meta.json is not one this distpose writes" in err[0]


# ---------------------------------------------------------------------------------------------
# DeepSpeed config


def test_deepspeed_config_batch_keys_consistent():
    cfg = load_config(None, ["data.batch_size=24", "train.workers=2", "train.grad_accum=3", "train.zero_stage=2",
                             "train.grad_clip=1.5"])
    ds = deepspeed_config(cfg)
    assert ds["train_batch_size"] == 24
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 3
    assert ds["train_micro_batch_size_per_gpu"] * cfg.train.workers * ds["gradient_accumulation_steps"] == 24
    assert ds["zero_optimization"] == {"stage": 2} and ds["gradient_clipping"] == 1.5
    assert "bf16" not in ds and "fp16" not in ds and "data_types" not in ds


def test_deepspeed_config_precisions():
    ds = deepspeed_config(load_config(None, ["train.precision=bf16", "train.zero_stage=1"]))
    assert ds["bf16"] == {"enabled": True}
    assert ds["data_types"] == {"buffer_dtype": "bf16"}  # BatchNorm buffers follow the bf16 input on CPU
    ds = deepspeed_config(load_config(None, ["train.precision=fp16", "train.use_gpu=true"]))
    assert ds["fp16"]["enabled"] is True and "bf16" not in ds
    # Autocast at any ZeRO stage: fp32 weights and BatchNorm, gradients all-reduced in fp32.
    ds = deepspeed_config(load_config(None, ["train.precision=bf16-mixed", "train.zero_stage=0"]))
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    assert "bf16" not in ds and "fp16" not in ds


def test_precision_auto_is_bf16_mixed_only_where_the_cpu_computes_bf16_natively():
    # The reference is the kernel's own list of CPU features, not torch's.
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith(("flags", "Features")):
            flags |= set(line.split(":", 1)[1].split())
    native = bool(flags & {"avx512_bf16", "amx_bf16"})
    auto = with_precision_resolved(load_config(QUICK), torch.device("cpu"))
    assert load_config(QUICK).train.precision == "auto"
    assert auto.train.precision == ("bf16-mixed" if native else "fp32")
    for given in ("fp32", "bf16-mixed"):  # a precision the config names is kept, native or not
        cfg = load_config(QUICK, [f"train.precision={given}"])
        assert with_precision_resolved(cfg, torch.device("cpu")).train.precision == given


def test_deepspeed_override_merges_nested_keys(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"overlap_comm": True, "reduce_bucket_size": 1000},
                                "gradient_clipping": 2.0, "bf16": {"immediate_grad_update": True}}))
    cfg = load_config(None, ["train.zero_stage=2", "train.precision=bf16", f"train.deepspeed_config={path}"])
    ds = deepspeed_config(cfg)
    # Nested keys merge into ours (the stage is kept), scalars replace ours.
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True, "reduce_bucket_size": 1000}
    assert ds["bf16"] == {"enabled": True, "immediate_grad_update": True}
    assert ds["gradient_clipping"] == 2.0
    assert ds["train_batch_size"] == cfg.data.batch_size


@pytest.mark.parametrize("key", BATCH_KEYS)
def test_deepspeed_override_of_batch_keys_refused(tmp_path, key):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({key: 64}))
    cfg = load_config(None, [f"train.deepspeed_config={path}"])
    with pytest.raises(ConfigError) as info:
        deepspeed_config(cfg)
    text = str(info.value)
    assert text.startswith("config key 'train.deepspeed_config'") and f"sets {key}" in text
    assert "data.batch_size" in text and "\n" not in text


@pytest.mark.parametrize("content, message", [
    (None, "cannot read"),
    ("{not json", "is not valid JSON"),
    ("[1, 2]", "holds list, expected a JSON object"),
])
def test_deepspeed_override_unreadable(tmp_path, content, message):
    path = tmp_path / "ds.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError, match=message):
        deepspeed_config(load_config(None, [f"train.deepspeed_config={path}"]))


def test_cli_refuses_batch_key_override(tmp_path, capsys, no_ray):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_batch_size": 64}))
    assert main(["train", *NO_DATA, f"train.storage={tmp_path}", f"train.deepspeed_config={path}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sets train_batch_size" in err[0]


# ---------------------------------------------------------------------------------------------
# learning-rate schedule


def test_lr_multiplier_warmup_then_steps():
    cfg = load_config(None, ["train.warmup_steps=4", "data.batches_per_epoch=10", "train.lr_steps=[2,3]",
                             "train.lr_factor=0.1"])
    expected = {
        0: 0.25, 1: 0.5, 2: 0.75, 3: 1.0, 4: 1.0,  # linear warmup over 4 steps, (step + 1) / 4
        19: 1.0,  # last step of epoch 2 (epochs 0 and 1 in 0-based step // 10)
        20: 0.1, 29: 0.1,  # from the first step of 0-based epoch 2: x 0.1
        30: 0.01, 100: 0.01,  # from 0-based epoch 3: x 0.1 again
    }
    for step, value in expected.items():
        assert lr_multiplier(step, cfg) == pytest.approx(value, rel=1e-12), step


def test_lr_multiplier_no_warmup_and_factor():
    cfg = load_config(None, ["data.batches_per_epoch=5", "train.lr_steps=[1]", "train.lr_factor=0.5"])
    assert [lr_multiplier(s, cfg) for s in range(8)] == [1.0] * 5 + [0.5] * 3


def test_crf_modes_train_on_narrower_targets_than_the_heatmaps():
    from distpose.train.modes import ModeLoss

    backbone = load_config(None, ["data.sigma=2.0", "model.crf_target_sigma=0.5"])
    crf = load_config(None, ["data.sigma=2.0", "model.crf_target_sigma=0.5", "train.mode=crf",
                             "train.backbone_checkpoint=b.pt"])
    assert ModeLoss(backbone).heatmap_codec.sigma == 2.0 and ModeLoss(crf).crf_codec.sigma == 0.5
    assert ModeLoss(crf).crf_codec.heatmap_size == crf.data.heatmap_size


def test_a_coco_recipe_refuses_to_start_without_its_imagenet_weights(tmp_path, capsys, no_ray, monkeypatch):
    """The COCO configs start from ImageNet weights as the papers do: missing, the run stops before Ray and says
    how to train from scratch instead; saying so explicitly gets past that check (to the next: the shards)."""
    monkeypatch.chdir(tmp_path)
    assert main(["train", "coco/hrnet", f"train.storage={tmp_path / 'runs'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["distpose: error: config key 'model.pretrained': data/imagenet/hrnet_w32-36af842e.pth does not "
                   "exist (a local weights file, docs/coco.md; model.pretrained='' trains from scratch)"]
    assert main(["train", "coco/hrnet", "model.pretrained=''", f"train.storage={tmp_path / 'runs'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "config key 'data.shards'" in err[0], err


def test_a_rerun_with_another_model_is_refused_and_the_run_left_as_it_was(tmp_path):
    """A run directory holds one model. `distpose train quick/cnn model.backbone=hrnet_small ...` on a finished
    quick/cnn run used to print "already finished" and hand back the cnn's final.pt as the hrnet's (an unfinished
    run failed after Ray started, on a state-dict size mismatch, with config.yaml already rewritten)."""
    storage = tmp_path / "runs"
    cfg = load_config(QUICK, [*NO_DATA, f"train.storage={storage}"])
    run = driver.run_dir(cfg)
    run.mkdir(parents=True)
    (run / driver.RUN_CONFIG).write_text(driver.dump_yaml(cfg))
    save_model_file(run / "final.pt", build_pose_model(cfg.model).state_dict(), cfg, {"epoch": cfg.train.epochs})
    before = {p.name: p.read_bytes() for p in run.iterdir()}

    def rerun(*overrides: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "distpose", "train", QUICK, *NO_DATA,
                               f"train.storage={storage}", *overrides],
                              capture_output=True, text=True, check=False, timeout=60)

    other = rerun("model.backbone=hrnet_small", "data.input_size=[128,96]", "data.heatmap_size=[32,24]")
    lines = other.stderr.strip().splitlines()
    assert other.returncode == 2 and len(lines) == 1, other.stdout + other.stderr
    print(f"[rerun] {lines[0]}")
    assert lines[0].startswith(f"distpose: error: run {cfg.train.run_name} ")
    for key in ("model.backbone 'cnn_small' -> 'hrnet_small'", "data.input_size", "data.heatmap_size",
                "train.run_name="):
        assert key in lines[0]
    assert "model.crf" not in lines[0] and "train.epochs" not in lines[0]  # only what differs is named
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before

    # What a rerun may change: the schedule, the workers. A finished run is then left alone.
    same = rerun("train.lr=0.01", "train.workers=2", "data.batch_size=32")
    assert same.returncode == 0 and "already finished" in same.stdout + same.stderr, same.stderr
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
