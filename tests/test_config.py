"""Config schema: YAML files, overrides, and one-line errors with exit code 2."""

import io
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from distpose.config import PACKAGED_CONFIGS, Config, ConfigError, dump_yaml, find_config, load_config

# Training configs; configs/tune/ holds sweep files (tests/test_tune.py loads those).
CONFIGS = sorted(p for p in (Path(__file__).parent.parent / "configs").rglob("*.yaml") if p.parent.name != "tune")


def test_defaults_and_overrides():
    cfg = load_config(None, ["data.input_size=[256,192]", "data.heatmap_size=[64,48]", "train.zero_stage=3",
                             "data.augment.flip_prob=0", "train.lr=5e-4", "model.backbone=hrnet_w32"])
    assert cfg.data.input_size == (256, 192) and cfg.train.zero_stage == 3
    assert cfg.data.augment.flip_prob == 0.0 and isinstance(cfg.data.augment.flip_prob, float)
    assert cfg.train.lr == 5e-4 and cfg.model.backbone == "hrnet_w32"
    assert load_config(None) == Config()


def test_yaml_roundtrip(tmp_path):
    cfg = load_config(None, ["data.batch_size=7", "train.mode=joint", "train.backbone_checkpoint=b.pt"])
    path = tmp_path / "c.yaml"
    path.write_text(dump_yaml(cfg))
    assert load_config(path) == cfg


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_shipped_configs_load(path):
    load_config(path)


@pytest.mark.parametrize("override, message", [
    ("data.foo=1", "unknown config key 'data.foo' (allowed: data.source, data.shards,"),
    ("bogus.x=1", "unknown config key 'bogus' (allowed: data, model, train, eval, monitor)"),
    ("train.mode=crff", "config key 'train.mode': got 'crff', expected one of 'backbone', 'crf', 'joint'"),
    ("train.zero_stage=4", "expected one of 0, 1, 2, 3"),
    ("data.batch_size=abc", "config key 'data.batch_size': got 'abc', expected an integer"),
    ("data.batch_size=0", "config key 'data.batch_size': got 0, expected an integer >= 1"),
    ("data.input_size=[256]", "expected a list of 2 values (an integer, an integer)"),
    ("data.augment.flip_prob=1.5", "expected a probability in [0, 1]"),
    ("data.heatmap_size=[64,48]", "'data.heatmap_size': got [64, 48], expected data.input_size / 4 = [32, 24]"),
    ("data.input_size=[100,72]", "expected multiples of 8 for model.backbone='cnn_small'"),
    ("train.use_gpu=maybe", "expected true or false"),
    ("data.batch_size.x=1", "is a value, not a section"),
    ("novalue", "is not of the form key.sub=value"),
    ("train.mode=crf", "config key 'train.backbone_checkpoint': got '', expected the trained backbone's checkpoint"),
    ("train.precision=fp16", "DeepSpeed has no fp16 on CPU"),
    ("train.precision=bf16", "config key 'train.zero_stage': got 0, expected 1, 2 or 3 with train.precision=bf16"),
    ("train.workers=3", "'data.batch_size': got 32, expected a multiple of train.workers x train.grad_accum"),
    ("monitor.host=10.0.0.7", "config key 'monitor.host': got '10.0.0.7', expected one of '127.0.0.1', '0.0.0.0'"),
    ("train.run_name=", "config key 'train.run_name': got '', expected a name of letters"),
    ("train.run_name=../escape", "config key 'train.run_name': got '../escape', expected a name"),
    ("train.run_name=..", "config key 'train.run_name': got '..', expected a name"),
    ("train.lr_steps=[200,170]", "config key 'train.lr_steps': got [200, 170], expected increasing epochs >= 1"),
    ("train.lr_steps=[0]", "config key 'train.lr_steps': got [0], expected increasing epochs >= 1"),
    ("train.lr_steps=[3,3]", "config key 'train.lr_steps': got [3, 3], expected increasing"),
    ("train.start_timeout_s=0", "config key 'train.start_timeout_s': got 0.0, expected a number of seconds > 0"),
    ("train.checkpoint_every_steps=-1", "config key 'train.checkpoint_every_steps': got -1, expected an integer >= 0"),
    ("train.checkpoint_every_minutes=30",
     "config key 'train.checkpoint_every_minutes': got 30.0, expected 0 unless train.checkpoint_every_steps > 0"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_yaml_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  batch_size: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("data:\n  batch_size: 8\ntrain:\n  lr: 1.0e-3\n  epochs: 3\n  lr: 1.0e-2\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert str(info.value) == f"config file {bad}: not valid YAML (line 6: duplicate key 'lr')"
    bad.write_text("data:\n  augment:\n    flip: 0.5\n")
    with pytest.raises(ConfigError, match="unknown config key 'data.augment.flip'"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_cli_exit_code_2_and_one_line():
    proc = subprocess.run([sys.executable, "-m", "distpose", "config", "train.mode=nope"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "distpose: error: config key 'train.mode': got 'nope', expected one of 'backbone', 'crf', 'joint'"]


def test_a_config_that_is_not_text_fails_in_one_line(tmp_path):
    picture = tmp_path / "some.png"
    picture.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    with pytest.raises(ConfigError) as info:
        load_config(picture)
    assert str(info.value) == f"config file {picture}: not a text file (byte 0x89 at offset 0 is not UTF-8)"
    proc = subprocess.run([sys.executable, "-m", "distpose", "config", str(picture)],
                          capture_output=True, text=True, check=False, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [f"distpose: error: {info.value}"]


def test_packaged_configs_are_found_by_name_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert find_config("quick/cnn") == PACKAGED_CONFIGS / "quick" / "cnn.yaml"
    assert load_config("quick/cnn") == load_config(PACKAGED_CONFIGS / "quick" / "cnn.yaml")
    assert find_config("quick", directory=True) == PACKAGED_CONFIGS / "quick"
    with pytest.raises(ConfigError) as info:
        load_config("quick/cnnn")
    assert "config quick/cnnn does not exist (not a path, nor a packaged config: coco/base, coco/cnn, coco/cnn_crf" \
        in str(info.value)
    with pytest.raises(ConfigError, match="is a directory, expected a YAML file"):
        load_config(PACKAGED_CONFIGS / "quick")
    # A file of the same name in the working directory comes first: a path is a path.
    (tmp_path / "quick").mkdir()
    (tmp_path / "quick" / "cnn.yaml").write_text("train:\n  epochs: 3\n")
    assert load_config("quick/cnn.yaml").train.epochs == 3


def test_a_built_wheel_ships_the_configs(tmp_path):
    """A non-editable install finds its configs by name: they are package data."""
    root = Path(__file__).parent.parent
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(root)], check=True, capture_output=True, timeout=300)
    wheel, = tmp_path.glob("distpose-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"distpose/configs/{p.relative_to(PACKAGED_CONFIGS)}" for p in PACKAGED_CONFIGS.rglob("*.yaml")}
    assert len(shipped) == 16 and shipped <= names  # 12 recipes, their 2 base files, 2 sweep files


def test_quiet_and_verbose_go_anywhere_on_the_line(capsys):
    from distpose.commands import main

    assert main(["config", "quick/cnn", "train.epochs=3", "-q"]) == 0
    assert "epochs: 3" in capsys.readouterr().out
    assert main(["-v", "config", "quick/cnn"]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:  # both after the subcommand: argparse's own exclusion
        main(["config", "-q", "-v"])
    assert exit_info.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    assert main(["-q", "config", "-v"]) == 2  # one on each side
    assert capsys.readouterr().err == "distpose: error: -q and -v exclude each other\n"


def test_console_log_goes_to_the_stderr_of_the_moment(monkeypatch):
    """The console handler follows sys.stderr: a stream swapped in for one call (a test's capture, a notebook's)
    and closed after it never receives the next call's records."""
    import logging

    from distpose.commands import main

    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    assert main(["config", "quick/cnn", "-q"]) == 0
    first.close()
    second = io.StringIO()
    monkeypatch.setattr(sys, "stderr", second)
    logging.getLogger("distpose").warning("after the first call")
    assert second.getvalue() == "distpose: warning: after the first call\n"
