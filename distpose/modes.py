"""The product's six named runs of its five training modes, and which run each one starts from.

The pipeline trains them in this order, a sweep runs its modes in this order, and a crf/joint run
starts from its parent's final checkpoint. One table, so that the dependency is written once.
"""

from __future__ import annotations

from typing import NamedTuple

from distpose.config import ConfigError, Mode


class NamedMode(NamedTuple):
    name: str  # the config file's stem (configs/quick/<name>.yaml) and the run's suffix
    mode: Mode  # train.mode
    network: str  # the backbone family: cnn or hrnet
    parent: str | None  # the named mode whose final checkpoint this one starts from
    description: str


MODES = (
    NamedMode("cnn", "backbone", "cnn", None, "backbone mode, CNN"),
    NamedMode("hrnet", "backbone", "hrnet", None, "backbone mode, HRNet"),
    NamedMode("cnn_crf", "crf", "cnn", "cnn", "CRF on the frozen CNN"),
    NamedMode("cnn_joint", "joint", "cnn", "cnn", "CNN + CRF jointly"),
    NamedMode("hrnet_crf", "crf", "hrnet", "hrnet", "CRF on the frozen HRNet"),
    NamedMode("hrnet_joint", "joint", "hrnet", "hrnet", "HRNet + CRF jointly"),
)
NAMES = tuple(m.name for m in MODES)
_BY_NAME = {m.name: m for m in MODES}


def named_mode(name: str, source: str = "mode") -> NamedMode:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ConfigError(f"{source}: unknown mode {name!r} (known: {', '.join(NAMES)})") from None


def crf_sibling(name: str) -> str | None:
    """For a joint mode, the crf mode on the same network (the comparison the joint mode must win)."""
    joint = named_mode(name)
    if joint.mode != "joint":
        return None
    return next((m.name for m in MODES if m.mode == "crf" and m.network == joint.network), None)


def check_mode(name: str, train_mode: str, source: str) -> None:
    """A named mode's config must train in that mode: cnn_crf.yaml with train.mode=joint is a mistake."""
    expected = named_mode(name, source).mode
    if train_mode != expected:
        raise ConfigError(f"{source}: config key 'train.mode' is {train_mode!r}, but the {name!r} mode trains "
                          f"in mode {expected!r}")
