"""The six recipes: named configs that each train one model, and which recipe each one starts from.

A recipe is a config file (configs/quick/<name>.yaml, configs/coco/<name>.yaml) with a training mode
(train.mode: backbone, crf or joint), a network and a parent whose final model it starts from: a crf recipe
its backbone's, a joint recipe the crf recipe's (backbone and CRF: the staged schedule of Tompson et al. 2014,
detector, then the spatial model on frozen features, then both together). The pipeline trains them in this
order and a sweep runs them in this order, so the dependency is written once, here.
"""

from __future__ import annotations

from typing import NamedTuple

from distpose.config import ConfigError, Mode


class Recipe(NamedTuple):
    name: str  # the config file's stem and the run's suffix
    mode: Mode  # the train.mode its config must have
    network: str  # the backbone family: cnn or hrnet
    parent: str | None  # the recipe whose final model this one starts from
    description: str


RECIPES = (
    Recipe("cnn", "backbone", "cnn", None, "backbone mode, CNN"),
    Recipe("hrnet", "backbone", "hrnet", None, "backbone mode, HRNet"),
    Recipe("cnn_crf", "crf", "cnn", "cnn", "CRF on the frozen CNN"),
    Recipe("cnn_joint", "joint", "cnn", "cnn_crf", "CNN + CRF jointly, from cnn_crf"),
    Recipe("hrnet_crf", "crf", "hrnet", "hrnet", "CRF on the frozen HRNet"),
    Recipe("hrnet_joint", "joint", "hrnet", "hrnet_crf", "HRNet + CRF jointly, from hrnet_crf"),
)
RECIPE_NAMES = tuple(r.name for r in RECIPES)
_BY_NAME = {r.name: r for r in RECIPES}


def recipe(name: str, source: str = "recipe") -> Recipe:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ConfigError(f"{source}: unknown recipe {name!r} (known: {', '.join(RECIPE_NAMES)})") from None


def backbone_recipe(name: str) -> str | None:
    """The backbone recipe a crf or joint recipe ultimately starts from (None for a backbone recipe)."""
    parent = recipe(name).parent
    while parent is not None and recipe(parent).parent is not None:
        parent = recipe(parent).parent
    return parent


def check_recipe_mode(name: str, train_mode: str, source: str) -> None:
    """A recipe's config must train in the recipe's mode: cnn_crf.yaml with train.mode=joint is a mistake."""
    expected = recipe(name, source).mode
    if train_mode != expected:
        raise ConfigError(f"{source}: config key 'train.mode' is {train_mode!r}, but recipe {name!r} trains "
                          f"in mode {expected!r}")
