"""A sweep file: the recipes' configs, the recipes, the overrides and the search space of a `distpose tune` run,
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
from distpose.recipes import RECIPE_NAMES, check_recipe_mode

DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint")
SEARCHES = ("random", "grid", "optuna", "hyperopt")

@dataclass(frozen=True)
class Dimension:
    key: str  # a config key, e.g. train.lr
    kind: str  # one of DISTRIBUTIONS
    values: tuple[Any, ...]  # choice: the values; the others: (low, high)
    recipes: tuple[str, ...] = ()  # the recipes it applies to; () = all


@dataclass(frozen=True)
class Sweep:
    name: str
    configs: str  # directory holding <recipe>.yaml for each recipe
    recipes: tuple[str, ...]
    space: tuple[Dimension, ...] = ()
    overrides: tuple[str, ...] = ()  # applied to every trial, before the sampled values
    recipe_overrides: Mapping[str, tuple[str, ...]] = field(default_factory=dict)  # per recipe, after `overrides`
    trials_per_recipe: int = 2  # samples per recipe (grid: every combination once)
    search: str = "random"
    metric: str = "visible/pck@0.1"  # validation score to maximise; ASHA stops on it, best.pt keeps its best
    grace_period: int = 1  # ASHA: epochs every trial gets
    reduction_factor: int = 2  # ASHA: keep the top 1/reduction_factor at each rung
    max_failures: int = 1  # Tune retries of a failed trial before it is recorded as failed
    storage: str = "sweeps"
    seed: int = 0  # random, optuna and hyperopt sample the same trials for the same seed (each recipe its own)
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
    """The sweep file with `key=value` overrides of its top-level keys (e.g. trials_per_recipe=3)."""
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
    for key in ("name", "configs", "recipes"):
        if key not in raw:
            raise _sweep_error(source, key, "missing")
    if not isinstance(raw["configs"], str):
        raise _sweep_error(source, "configs", f"got {raw['configs']!r}, expected a directory path")
    # Relative to the sweep file, as a config names files of its own; data and output paths stay relative
    # to the working directory.
    configs = (path.parent / raw["configs"]).resolve()
    if not configs.is_dir():
        raise _sweep_error(source, "configs", f"{configs} is not a directory of recipe configs (it is taken "
                                              f"relative to the sweep file)")
    recipes = raw["recipes"]
    if not isinstance(recipes, list) or not recipes or not all(isinstance(r, str) for r in recipes):
        raise _sweep_error(source, "recipes", f"got {recipes!r}, expected a list of recipe names")
    for name in recipes:
        if not _has_config(configs, name):
            raise _sweep_error(source, "recipes", f"{name!r} has no config {configs / (name + '.yaml')}")
        if name not in RECIPE_NAMES:
            raise _sweep_error(source, "recipes", f"{name!r} is not a recipe ({', '.join(RECIPE_NAMES)})")
    space = tuple(_dimension(source, key, spec, configs) for key, spec in (raw.get("space") or {}).items())
    overrides = _override_list(source, "overrides", raw.get("overrides"))
    per_recipe = raw.get("recipe_overrides") or {}
    if not isinstance(per_recipe, dict):
        raise _sweep_error(source, "recipe_overrides", f"got {per_recipe!r}, expected a mapping of recipe to "
                                                       "overrides")
    for name in per_recipe:  # against the configs, as space.<key>.recipes, so that recipes=[...] can narrow a sweep
        if not _has_config(configs, name):
            raise _sweep_error(source, f"recipe_overrides.{name}", f"no config {configs / (str(name) + '.yaml')}")
    recipe_overrides = {r: _override_list(source, f"recipe_overrides.{r}", v) for r, v in per_recipe.items()}
    special = ("space", "recipes", "overrides", "recipe_overrides")
    fields = {k: raw[k] for k in raw if k not in special} | {"configs": str(configs)}
    sweep = Sweep(**fields, recipes=tuple(recipes), space=space, overrides=overrides,
                  recipe_overrides=recipe_overrides, source=source)
    _check(sweep)
    return sweep


def _has_config(configs: Path, name: Any) -> bool:
    return (configs / f"{name}.yaml").is_file()


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
    only = spec.get("recipes", [])
    kinds = [k for k in spec if k != "recipes"]
    if len(kinds) != 1 or kinds[0] not in DISTRIBUTIONS:
        raise _sweep_error(source, where, f"got {sorted(spec)}, expected one of {', '.join(DISTRIBUTIONS)} "
                                          "(and optionally recipes)")
    kind, values = kinds[0], spec[kinds[0]]
    if not isinstance(values, list) or not values:
        raise _sweep_error(source, where, f"{kind}: got {values!r}, expected a list")
    if kind != "choice" and not (len(values) == 2 and all(isinstance(v, (int, float)) for v in values)
                                 and values[0] < values[1]):
        raise _sweep_error(source, where, f"{kind}: got {values!r}, expected [low, high] with low < high")
    if kind == "loguniform" and values[0] <= 0:
        raise _sweep_error(source, where, f"loguniform: got {values!r}, expected low > 0")
    # Checked against the configs, not the sweep's recipes, so that `recipes=[...]` can narrow a sweep file.
    unknown = [m for m in only if not _has_config(configs, m)]
    if unknown:
        raise _sweep_error(source, f"{where}.recipes", f"{unknown} have no config in {configs}")
    return Dimension(key, kind, tuple(values), tuple(only))


def _check(sweep: Sweep) -> None:
    def require(ok: bool, key: str, value: Any, expected: str) -> None:
        if not ok:
            raise _sweep_error(sweep.source, key, f"got {value!r}, expected {expected}")

    require(sweep.search in SEARCHES, "search", sweep.search, f"one of {', '.join(SEARCHES)}")
    for key in ("trials_per_recipe", "grace_period"):
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
    # Every recipe's config must load with the overrides and with each dimension's extreme values, so that
    # a typo in a key fails here, in one line, not in every trial.
    for name in sweep.recipes:
        base = base_config(sweep, name)
        check_recipe_mode(name, base.train.mode, f"{sweep.source}: recipe {name!r}")
        thresholds = base.eval.pck_thresholds
        require(sweep.metric in score_names(thresholds), "metric", sweep.metric,
                f"one of {', '.join(score_names(thresholds))}")
        trial_config(sweep, name, [])
        for dim in dimensions_of(sweep, name):
            for value in (dim.values if dim.kind == "choice" else dim.values[:2]):
                cfg_value = value if dim.kind != "randint" else int(value)
                trial_config(sweep, name, [f"{dim.key}={json.dumps(cfg_value)}"])


def dimensions_of(sweep: Sweep, recipe: str) -> list[Dimension]:
    return [d for d in sweep.space if not d.recipes or recipe in d.recipes]


def _overrides_of(sweep: Sweep, recipe: str) -> list[str]:
    return [*sweep.overrides, *sweep.recipe_overrides.get(recipe, ())]


def base_config(sweep: Sweep, recipe: str) -> Config:
    """The recipe's config file with the sweep's overrides: what every trial of the recipe shares."""
    return load_config(Path(sweep.configs) / f"{recipe}.yaml", _overrides_of(sweep, recipe))


def trial_config(sweep: Sweep, recipe: str, extra: list[str], backbone: str | None = None) -> Config:
    """The config of one trial: the recipe's file, the sweep's overrides (every recipe's, then this recipe's),
    then `extra` (sampled values, run name, storage). Trials evaluate every epoch (ASHA's signal) and keep
    best.pt by the sweep's metric; Tune, not Ray Train, retries them. Checkpoints come at epoch ends only: every
    report is one of ASHA's iterations, so a report between epoch ends would count as an epoch."""
    forced = ["eval.every_epochs=1", f"eval.best_metric={sweep.metric}", "train.max_failures=0",
              "train.checkpoint_every_steps=0", "train.checkpoint_every_minutes=0"]
    if backbone is not None:
        forced.append(f"train.backbone_checkpoint={backbone}")
    return load_config(Path(sweep.configs) / f"{recipe}.yaml", [*_overrides_of(sweep, recipe), *forced, *extra])


def sweep_dir(sweep: Sweep) -> Path | str:
    """Where the sweep's results go: a local directory, or a URI on object storage."""
    if is_uri(sweep.storage):
        return join(sweep.storage, sweep.name)
    return (Path(sweep.storage) / sweep.name).resolve()
