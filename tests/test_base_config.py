"""Base config files: a config names one base (`base: base.yaml`, relative to itself) whose sections it is
merged over key by key; `distpose config` says which layer set each value, and its output loads back."""

from pathlib import Path

import pytest
import yaml

from distpose.commands import main
from distpose.config import (
    PACKAGED_CONFIGS,
    Config,
    ConfigError,
    config_from_dict,
    load_config,
    resolve_config,
    to_dict,
)

RECIPES = sorted(str(p.relative_to(PACKAGED_CONFIGS).with_suffix("")) for d in ("quick", "coco")
                 for p in (PACKAGED_CONFIGS / d).glob("*.yaml") if p.name != "base.yaml")


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_the_file_merges_over_its_base_key_by_key_and_overrides_over_both(tmp_path, monkeypatch):
    write(tmp_path / "sub" / "base.yaml", "data:\n  batch_size: 16\n  sigma: 3.0\n  loader_workers: 3\n"
          "  augment:\n    flip_prob: 0.25\n    scale_factor: 0.1\ntrain:\n  epochs: 4\n")
    write(tmp_path / "sub" / "a.yaml", "base: base.yaml\ndata:\n  sigma: 2.5\n  augment:\n    scale_factor: 0.3\n")
    monkeypatch.chdir(tmp_path)  # the base is found beside the file, not in the working directory
    resolved = resolve_config("sub/a.yaml", ["data.loader_workers=0"])
    data = resolved.config.data
    assert data.batch_size == 16 and resolved.config.train.epochs == 4  # only the base sets them
    assert data.sigma == 2.5  # the file over the base
    assert data.loader_workers == 0  # the command line over both
    assert data.augment.flip_prob == 0.25 and data.augment.scale_factor == 0.3  # a nested mapping, key by key
    assert data.augment.rotation_prob == Config().data.augment.rotation_prob
    assert resolved.files == [Path("sub/base.yaml"), Path("sub/a.yaml")]
    assert resolved.sources == {"data.batch_size": "base.yaml", "train.epochs": "base.yaml",
                                "data.augment.flip_prob": "base.yaml", "data.sigma": "a.yaml",
                                "data.augment.scale_factor": "a.yaml", "data.loader_workers": "override"}
    assert resolved.source("data.seed") == "default"


def test_a_base_cannot_name_a_base(tmp_path):
    first = write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: c.yaml\ndata:\n  sigma: 3.0\n")
    write(tmp_path / "c.yaml", "data:\n  sigma: 4.0\n")
    with pytest.raises(ConfigError) as info:
        load_config(first)
    assert str(info.value) == (f"config file {first}: key 'base': base file {tmp_path / 'b.yaml'} names a base "
                               "itself ('c.yaml'); a base file cannot have one")


@pytest.mark.parametrize(("base_line", "files", "expected"), [
    ("base: missing.yaml", {}, "key 'base': base file {tmp}/missing.yaml does not exist"),
    ("base: broken.yaml", {"broken.yaml": "data: [1,\n"}, "key 'base': base file {tmp}/broken.yaml: not valid YAML "
                                                          "(line 2"),
    ("base: [b.yaml]", {}, "key 'base': got ['b.yaml'], expected a YAML file's path relative to this file"),
    ("base: typo.yaml", {"typo.yaml": "data:\n  sigmaa: 3.0\n"}, "key 'base': base file {tmp}/typo.yaml: unknown "
                                                                 "config key 'data.sigmaa'"),
])
def test_a_missing_or_unusable_base_names_the_file_and_the_key(tmp_path, base_line, files, expected):
    for name, text in files.items():
        write(tmp_path / name, text)
    config = write(tmp_path / "a.yaml", base_line + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(config)
    assert str(info.value).startswith(f"config file {config}: " + expected.format(tmp=tmp_path))


@pytest.mark.parametrize("override", ["base=other.yaml", "base.x=1"])
def test_base_is_not_an_override(override, capsys):
    with pytest.raises(ConfigError, match=f"override '{override}': 'base' is set in a config file"):
        load_config("quick/cnn", [override])
    assert main(["config", "quick/cnn", override]) == 2
    assert capsys.readouterr().err.count("\n") == 1


def annotations(text: str) -> dict[str, str]:
    """`data.augment.flip_prob` -> the comment after its value, read from `distpose config`'s output."""
    found: dict[str, str] = {}
    sections: list[str] = []
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        depth = (len(line) - len(line.lstrip())) // 2
        key, _, rest = line.strip().partition(":")
        del sections[depth:]
        if rest.strip():
            found[".".join([*sections, key])] = rest.rsplit("# ", 1)[1] if "# " in rest else ""
        else:
            sections.append(key)
    return found


def leaf_keys(mapping: dict, prefix: str = "") -> set[str]:
    return {k for key, value in mapping.items()
            for k in (leaf_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else [prefix + key])}


def test_distpose_config_names_the_layer_of_every_value(capsys):
    assert main(["config", "quick/cnn", "data.batch_size=16"]) == 0
    out = capsys.readouterr().out
    found = annotations(out)
    assert set(found) == leaf_keys(to_dict(Config()))  # every value has its source
    assert found["data.shards"] == "base.yaml"  # only the base sets it
    assert found["data.augment.scale_factor"] == "base.yaml"
    assert found["data.batches_per_epoch"] == "cnn.yaml" and found["train.run_name"] == "cnn.yaml"
    assert found["data.batch_size"] == "override"  # the base sets it too, the command line last
    assert found["data.box_padding"] == "default"
    header = [line for line in out.splitlines() if line.startswith("#")]
    assert [line.split() for line in header[1:]] == [
        ["#", "default", "(the", "schema,", "distpose/config.py)"],
        ["#", "base.yaml", str(PACKAGED_CONFIGS / "quick" / "base.yaml")],
        ["#", "cnn.yaml", str(PACKAGED_CONFIGS / "quick" / "cnn.yaml")],
        ["#", "override", "(the", "command", "line)"]]


@pytest.mark.parametrize("name, overrides", [
    *(pytest.param(n, [], id=n) for n in RECIPES),
    pytest.param("quick/cnn", ["data.batch_size=16", 'train.storage="a b\\nc # d"'], id="odd-string"),
])
def test_the_printed_config_loads_back(name, overrides, tmp_path, capsys):
    """`distpose config quick/cnn > my.yaml; distpose train my.yaml` trains what quick/cnn would."""
    assert main(["config", name, *overrides]) == 0
    out = capsys.readouterr().out
    found = annotations(out)  # one line per value, even a string with a line break
    assert set(found) == leaf_keys(to_dict(Config())) and all(found.values())
    printed = write(tmp_path / "my.yaml", out)
    assert load_config(printed) == load_config(name, overrides)
    assert "base" not in yaml.safe_load(printed.read_text())  # the whole config, usable anywhere


def deep_merge(base: dict, over: dict) -> dict:
    merged = dict(base)
    for key, value in over.items():
        both = isinstance(value, dict) and isinstance(merged.get(key), dict)
        merged[key] = deep_merge(merged[key], value) if both else value
    return merged


def test_the_recipes_are_the_twelve_shipped():
    assert len(RECIPES) == 12 and {r.split("/")[0] for r in RECIPES} == {"quick", "coco"}


@pytest.mark.parametrize("name", RECIPES)
def test_a_recipe_is_its_base_with_its_own_keys_over_it(name):
    path = PACKAGED_CONFIGS / f"{name}.yaml"
    own = yaml.safe_load(path.read_text())
    assert own.pop("base") == "base.yaml"
    base = yaml.safe_load((path.parent / "base.yaml").read_text())
    assert load_config(name) == config_from_dict(deep_merge(base, own))
    assert load_config(name) != config_from_dict(own)  # the base matters


def test_a_config_on_object_storage_finds_its_base_beside_it(object_store):
    from distpose.files import write_bytes

    uri = object_store.uri("configs/base-test/a.yaml")
    write_bytes(object_store.uri("configs/base-test/base.yaml"), b"data:\n  batch_size: 16\n  sigma: 3.0\n")
    write_bytes(uri, b"base: base.yaml\ndata:\n  sigma: 2.5\n")
    resolved = resolve_config(uri)
    assert (resolved.config.data.batch_size, resolved.config.data.sigma) == (16, 2.5)
    assert resolved.files == [object_store.uri("configs/base-test/base.yaml"), uri]
    assert resolved.sources == {"data.batch_size": "base.yaml", "data.sigma": "a.yaml"}
