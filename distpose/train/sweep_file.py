"""A sweep file: the mode configs, the modes, the overrides and the search space of a `distpose tune` run,
read and checked before Ray starts, and the config each trial trains with."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distpose.config import (
    PACKAGED_CONFIGS,
    Config,
    ConfigError,
    find_config,
    load_config,
    parse_override,
    read_yaml_file,
    score_names,
)
from distpose.files import is_uri, join
from distpose.modes import NAMES, check_mode

DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint")
SEARCHES = ("random", "grid", "optuna", "hyperopt")

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


def find_sweep(name: str | Path) -> Path:
    """A sweep file by path, else by name among the packaged ones: `quick` is configs/tune/quick.yaml."""
    if Path(name).exists():
        return find_config(name)
    try:
        return find_config(f"tune/{name}")
    except ConfigError:
        names = ", ".join(sorted(p.stem for p in (PACKAGED_CONFIGS / "tune").glob("*.yaml")))
        raise ConfigError(f"sweep file {name} does not exist (not a path, nor a packaged sweep: {names})") from None


def load_sweep(path: str | Path, overrides: list[str] = ()) -> Sweep:
    """The sweep file with `key=value` overrides of its top-level keys (e.g. trials_per_mode=3)."""
    path = find_sweep(path)
    raw = read_yaml_file(path, "sweep file") or {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a sweep file is a mapping of sweep keys")
    for item in overrides:
        key, value = parse_override(item)
        raw[key] = value
    source = str(path)
    known = {f.name for f in dataclasses.fields(Sweep)} - {"source"}
    for key in raw:
        if key not in known:
            raise _sweep_error(source, key, f"unknown (known: {', '.join(sorted(known))})")
    for key in ("name", "configs", "modes"):
        if key not in raw:
            raise _sweep_error(source, key, "missing")
    if not isinstance(raw["configs"], str):
        raise _sweep_error(source, "configs", f"got {raw['configs']!r}, expected a directory path")
    # Relative to the sweep file, as a config names files of its own; data and output paths stay relative
    # to the working directory.
    configs = (path.parent / raw["configs"]).resolve()
    if not configs.is_dir():
        raise _sweep_error(source, "configs", f"{configs} is not a directory of mode configs (it is taken "
                                              f"relative to the sweep file)")
    modes = raw["modes"]
    if not isinstance(modes, list) or not modes or not all(isinstance(m, str) for m in modes):
        raise _sweep_error(source, "modes", f"got {modes!r}, expected a list of config names")
    for mode in modes:
        if not _has_config(configs, mode):
            raise _sweep_error(source, "modes", f"{mode!r} has no config {configs / (mode + '.yaml')}")
        if mode not in NAMES:
            raise _sweep_error(source, "modes", f"{mode!r} is not a named mode ({', '.join(NAMES)})")
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
        base = base_config(sweep, mode)
        check_mode(mode, base.train.mode, f"{sweep.source}: mode {mode!r}")
        thresholds = base.eval.pck_thresholds
        require(sweep.metric in score_names(thresholds), "metric", sweep.metric,
                f"one of {', '.join(score_names(thresholds))}")
        mode_config(sweep, mode, [])
        for dim in dimensions_of(sweep, mode):
            for value in (dim.values if dim.kind == "choice" else dim.values[:2]):
                cfg_value = value if dim.kind != "randint" else int(value)
                mode_config(sweep, mode, [f"{dim.key}={json.dumps(cfg_value)}"])


def dimensions_of(sweep: Sweep, mode: str) -> list[Dimension]:
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


def sweep_dir(sweep: Sweep) -> Path | str:
    """Where the sweep's results go: a local directory, or a URI on object storage."""
    if is_uri(sweep.storage):
        return join(sweep.storage, sweep.name)
    return (Path(sweep.storage) / sweep.name).resolve()
