"""Typed configuration: one schema for data, model, train, eval and monitor settings.

A config is a YAML file whose sections mirror the dataclasses below, plus `key.sub=value`
overrides from the command line. A file may name one base file (`base: base.yaml`, relative to it) whose
sections it is merged over, key by key. Every key and value is checked against the schema: an unknown
key or a bad value raises ConfigError with one line naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from distpose.errors import UserError
from distpose.files import is_uri, read_bytes, within
from distpose.models.registry import BACKBONES

RUN_NAME = re.compile(r"[A-Za-z0-9._-]+")


class ConfigError(UserError):
    """An unknown config key or a value of the wrong type or range."""


Backbone = Literal[tuple(BACKBONES)]  # the registry's names, checked as any Literal is
Mode = Literal["backbone", "crf", "joint"]
# bf16 and fp16: DeepSpeed's, the model itself in half precision with fp32 master weights in the optimizer.
# bf16-mixed: autocast, fp32 weights with convolutions and matmuls computed in bf16, BatchNorm in fp32.
# auto: bf16-mixed where every rank's device computes bf16 natively (a GPU that supports it, a CPU with
# AVX512-BF16 or AMX), else fp32: a CPU without it emulates bf16, many times slower than fp32.
Precision = Literal["fp32", "bf16", "fp16", "bf16-mixed", "auto"]


@dataclass
class AugmentConfig:
    """HRNet's top-down training augmentation; all of it is off for evaluation."""

    flip_prob: float = 0.5
    half_body_prob: float = 0.3
    half_body_min_joints: int = 8  # more labelled joints than this, or no half-body crop
    scale_factor: float = 0.35  # scale ~ clip(1 + N(0,1) * f, 1 - f, 1 + f)
    rotation_factor: float = 45.0  # degrees; rotation ~ clip(N(0,1) * f, -2f, 2f)
    rotation_prob: float = 0.6
    # Synthetic occlusion (not in HRNet's recipe): the chance that a crop gets 1-3 solid shapes of random colour
    # pasted near its labelled joints. The CRF recipes use it so that the CRF trains on unaries that miss
    # joints the way they miss them on unseen images, not on a frozen backbone's confident memory of its own
    # training crops (docs/crf.md).
    occluder_prob: float = 0.0


@dataclass
class DataConfig:
    # "shards": stream the WebDataset shards. "random": seeded random crops and joints, the same
    # global batch for any number of workers (data-parallel checks, model-only throughput).
    source: Literal["shards", "random"] = "shards"
    shards: str = "data/shards"  # directory written by `distpose data shard`
    train_split: str = "train"
    val_split: str = "val"
    input_size: tuple[int, int] = (128, 96)  # (height, width) of the person crop
    heatmap_size: tuple[int, int] = (32, 24)  # (height, width) of the predicted heatmaps
    sigma: float = 2.0  # Gaussian target sigma, in heatmap pixels
    box_padding: float = 1.25
    # Global batch of one optimizer step: workers x accumulated micro-batches, at any world size. A loader
    # given this config directly (one rank, no accumulation) reads batches of this size.
    batch_size: int = 32
    loader_workers: int = 2  # DataLoader processes per rank
    batches_per_epoch: int = 50  # optimizer steps per epoch; fixed so every rank steps equally often
    # How training draws the shards. "resample": each rank's loader workers read shards drawn at random, with
    # replacement, through shuffle buffers; a resume at another world size draws another order. "pass": an epoch
    # is one pass without replacement in an order fixed by data.seed alone, the same global batch at every step
    # whatever the world size (distpose.data.passes; batches_per_epoch x batch_size must fit in the split).
    order: Literal["resample", "pass"] = "resample"
    sample_shuffle: int = 256  # shuffle buffer over images (compressed bytes)
    instance_shuffle: int = 64  # shuffle buffer over augmented person crops
    seed: int = 0
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    @property
    def aspect_ratio(self) -> float:
        """Width / height of the person box, that of the crop (0.75 at 256x192), as HRNet derives it."""
        return self.input_size[1] / self.input_size[0]


@dataclass
class ModelConfig:
    backbone: Backbone = "cnn_small"
    num_joints: int = 17
    # R: pairwise displacements lie in a (2R+1) x (2R+1) window. "auto": the smallest R that holds
    # crf_window_coverage of the training split's limbs (measured at heatmap resolution, augmented).
    crf_window: int | Literal["auto"] = "auto"
    crf_window_coverage: float = 0.99
    # Where the pairwise tables start. "data": the log-density of the training split's limb displacements
    # (distpose.data.limbs, models.crf.pairwise_from_displacements). "gaussian": a broad Gaussian (sigma R/2)
    # centred on zero displacement, which pulls every joint towards its parent.
    crf_pairwise_init: Literal["data", "gaussian"] = "data"
    # Displacement types per edge (Chen & Yuille 2014): that many tables per edge, from k-means on the training
    # split's displacements, mixed per instance with weights a head predicts from the features. 1: one table
    # per edge, shared by every instance.
    crf_pairwise_types: int = 1
    # A learned temperature per joint on its unary and a weight per edge on its pairwise log-potential, both
    # starting at 1 and learning at train.lr x train.crf_gain_lr_scale (models.crf.TreeCRF).
    crf_gains: bool = False
    # The crf/joint modes start the CRF's unary log-potentials as the backbone's heatmaps (values in [0, 1])
    # times this: at 1 the marginals are near flat (docs/crf.md, What each choice is worth, compares scales).
    crf_unary_scale: float = 30.0
    # Sigma (heatmap pixels) of the Gaussian whose normalised map is the CRF modes' cross-entropy target:
    # the joint's true position, blurred less than the heatmap targets (data.sigma).
    crf_target_sigma: float = 0.7
    # Local weights file for the backbone (ours, torchvision ResNet-50, or an official HRNet/SimpleBaseline
    # release), loaded where names and shapes match. Nothing is ever downloaded.
    pretrained: str = ""


@dataclass
class TrainConfig:
    mode: Mode = "backbone"
    run_name: str = "quick"
    storage: str = "runs"
    # Ray Train workers: a fixed count, or [min, max] for an elastic run that goes on with as few as min
    # (nodes lost) and grows back to max. The micro-batch is data.batch_size / (max x grad_accum); fewer
    # workers accumulate more micro-batches, so every step trains on data.batch_size samples.
    workers: int | tuple[int, int] = 1
    cpus_per_worker: int = 1  # Ray CPUs reserved per worker; also its torch thread count
    use_gpu: bool = False
    epochs: int = 2
    lr: float = 1e-3
    backbone_lr_scale: float = 1.0  # joint mode: the backbone learns at lr x this (the CRF at lr)
    crf_gain_lr_scale: float = 10.0  # with model.crf_gains: the CRF's temperatures and edge weights learn at lr x this
    lr_steps: tuple[int, ...] = (170, 200)  # epochs after which lr is multiplied by lr_factor
    lr_factor: float = 0.1
    warmup_steps: int = 0
    precision: Precision = "fp32"
    zero_stage: Literal[0, 1, 2, 3] = 0
    grad_accum: int = 1  # micro-batches per optimizer step at the most workers
    grad_clip: float = 0.0  # 0 disables clipping
    backbone_checkpoint: str = ""  # model file of the trained backbone: required by the crf and joint modes
    # Joint mode, the staged schedule: the CRF (window, unary head, pairwise tables) starts as the one in
    # backbone_checkpoint, a crf run's model file, instead of from the training split's limbs.
    crf_from_checkpoint: bool = False
    # Joint mode: the backbone's own heatmap MSE, times this, is added to the CRF's loss (its heatmap head
    # trains too), so the features under the unaries stay supervised as heatmaps.
    heatmap_loss_weight: float = 0.0
    keep_checkpoints: int = 2  # the latest N DeepSpeed checkpoints; the best model is kept apart as best.pt
    # Checkpoints come at the end of every epoch and, with this > 0, at every step that is a multiple of it: the
    # most steps a kill makes the run redo. The data stream restarts at each such step (seeded by the step), so
    # a run resumed there draws exactly what the unkilled run drew.
    checkpoint_every_steps: int = 0
    # With checkpoint_every_steps: save at such a step only if this many minutes have passed since the last save
    # (0: at every one). Saves stay on those steps, so a resume remains exact.
    checkpoint_every_minutes: float = 0.0
    max_failures: int = 1  # worker-group restarts from the latest checkpoint before the run fails
    # Seconds a start of the worker group may wait for its CPUs/GPUs (nodes joining, an autoscaler) before
    # it counts as a failure.
    start_timeout_s: float = 120.0
    # Elastic runs (train.workers: [min, max]) below max look for room to grow this often; growing restarts
    # the workers from the latest checkpoint.
    elastic_resize_interval_s: float = 60.0
    seed: int = 0
    log_every: int = 10  # steps between console lines (every step goes to metrics.jsonl)
    # Escape hatch: a DeepSpeed JSON whose keys override those derived from this config
    # (batch sizes excepted: they follow data.batch_size, workers and grad_accum).
    deepspeed_config: str = ""


@dataclass
class EvalConfig:
    every_epochs: int = 1  # evaluate on data.val_split every N epochs and after the last; 0: never
    flip_test: bool = True
    pck_thresholds: tuple[float, ...] = (0.05, 0.1, 0.2)
    boxes: str = "gt"  # "gt" or a COCO-results JSON of detector boxes
    best_metric: str = "AP"  # what best.pt maximises: a COCO stat, "accuracy" or "visible|occluded/pck@<t>"


@dataclass
class MonitorConfig:
    """Prometheus metrics (distpose/monitor). They are exported by each Ray node's metrics agent; host and
    port apply to the local Ray a run starts, a cluster's nodes take theirs from `ray start`."""

    enabled: bool = True
    # The local metrics endpoint listens on loopback only, or on every interface (Ray binds no single one).
    host: Literal["127.0.0.1", "0.0.0.0"] = "127.0.0.1"
    port: int = 0  # 0: Ray picks a free port


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)


_SCALAR_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0])}"
        return f"a list of {len(args)} values ({', '.join(_describe(a) for a in args)})"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    return _SCALAR_NAMES.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`; return it converted (ints to floats, lists to tuples)."""

    def bad() -> ConfigError:
        return ConfigError(f"config key '{key}': got {value!r}, expected {_describe(tp)}")

    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp) and type(value) in {type(a) for a in typing.get_args(tp)}:
            return value
        raise bad()
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad()
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(key, v, args[0]) for v in value)
        if len(value) != len(args):
            raise bad()
        return tuple(_coerce(key, v, a) for v, a in zip(value, args))
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(key, value, arg)
            except ConfigError:
                pass
        raise bad()
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise bad()
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad()
    raise TypeError(f"unsupported config annotation {tp!r} for '{key}'")


def _fields(cls: type) -> dict[str, tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls)}


def _set(obj: Any, dotted: str, value: Any, prefix: str = "") -> list[str]:
    """Set a key (dotted; a section takes a mapping, merged into it key by key); return the leaf keys set."""
    head, _, rest = dotted.partition(".")
    key = prefix + head
    fields = _fields(type(obj))
    if head not in fields:
        raise ConfigError(f"unknown config key '{key}' (allowed: {', '.join(prefix + n for n in fields)})")
    tp = fields[head][1]
    if dataclasses.is_dataclass(tp):
        if rest:
            return _set(getattr(obj, head), rest, value, key + ".")
        if isinstance(value, dict):
            section = getattr(obj, head)
            return [leaf for sub, subvalue in value.items() for leaf in _set(section, str(sub), subvalue, key + ".")]
        raise ConfigError(f"config key '{key}' is a section; got {value!r}, expected a mapping")
    if rest:
        raise ConfigError(f"config key '{key}' is a value, not a section: cannot set '{key}.{rest}'")
    setattr(obj, head, _coerce(key, value, tp))
    return [key]


def parse_override(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {text!r} is not of the form key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


class _StrictLoader(yaml.SafeLoader):
    """Safe YAML that refuses a key given twice in one mapping: PyYAML would keep the last one silently."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def read_yaml(text: str) -> Any:
    """A config or sweep file's YAML (safe types only; a duplicate key is an error)."""
    return yaml.load(text, Loader=_StrictLoader)


def yaml_problem(exc: yaml.YAMLError) -> str:
    """`line N: what` for a YAML error, as short as the parser allows."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"line {mark.line + 1}: {problem}" if mark is not None else problem


def config_from_dict(data: Any, source: str = "config") -> Config:
    """The defaults updated by a nested mapping of sections (as YAML or a checkpoint holds), validated."""
    cfg = _apply(Config(), data, source)
    validate(cfg)
    return cfg


def _apply(cfg: Config, data: Any, source: str) -> Config:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(data).__name__}")
    for key, value in data.items():
        _set(cfg, str(key), value)
    return cfg


PACKAGED_CONFIGS = Path(__file__).parent / "configs"


def find_config(name: str | Path, directory: bool = False) -> Path:
    """A config file (or, with `directory`, a directory of recipe configs) by path, else by its name among
    the packaged configs: `quick/cnn` is distpose/configs/quick/cnn.yaml, `quick` the directory."""
    path = Path(name)
    if path.exists():
        if path.is_dir() != directory:
            raise ConfigError(f"config {path} is {'a directory' if path.is_dir() else 'a file'}, expected "
                              f"{'a directory of recipe configs' if directory else 'a YAML file'}")
        return path
    packaged = PACKAGED_CONFIGS / (str(name) if directory or path.suffix else f"{name}.yaml")
    if packaged.exists() and packaged.is_dir() == directory:
        return packaged
    names = sorted(str(p.relative_to(PACKAGED_CONFIGS)).removesuffix(".yaml")
                   for p in PACKAGED_CONFIGS.glob("*" if directory else "*/*.yaml") if p.is_dir() == directory)
    raise ConfigError(f"config {name} does not exist (not a path, nor a packaged config: {', '.join(names)})")


def read_yaml_file(path: str | Path, what: str) -> Any:
    """A YAML file's content (a local path or a URI), or one line saying why it cannot be read: missing,
    not text, not YAML."""
    try:
        return read_yaml(read_bytes(path).decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot be read ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what} {path}: not a text file (byte 0x{exc.object[exc.start]:02x} at offset "
                          f"{exc.start} is not UTF-8)") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{what} {path}: not valid YAML ({yaml_problem(exc)})") from None


BASE_KEY = "base"


@dataclass
class ResolvedConfig:
    """A config and where each value came from: `files` are the YAML files read, the base first; `sources`
    maps a leaf key (`data.augment.flip_prob`) to the layer that set it last, a file's name or "override"."""

    config: Config
    files: list[str | Path]
    sources: dict[str, str]

    def source(self, key: str) -> str:
        return self.sources.get(key, "default")


def _config_files(path: str | Path) -> list[tuple[str | Path, dict[str, Any], str]]:
    """The YAML files a config is made of, the base it names (if any) first, each with its sections and the
    start of an error in it. One level only: a chain of bases is hard to follow, and what a config holds
    should be a glance away."""
    what = f"config file {path}"
    data = read_yaml_file(path, "config file") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what}: expected a mapping of sections, got {type(data).__name__}")
    if BASE_KEY not in data:
        return [(path, data, what)]
    name = data.pop(BASE_KEY)
    what += f": key '{BASE_KEY}'"
    if not isinstance(name, str) or not name:
        raise ConfigError(f"{what}: got {name!r}, expected a YAML file's path relative to this file")
    base = within(str(path).rsplit("/", 1)[0] if is_uri(path) else Path(path).parent, name)
    try:
        base_data = read_yaml_file(base, "base file") or {}
    except ConfigError as exc:
        raise ConfigError(f"{what}: {exc}") from None
    if not isinstance(base_data, dict):
        raise ConfigError(f"{what}: base file {base}: expected a mapping of sections, got {type(base_data).__name__}")
    if BASE_KEY in base_data:
        raise ConfigError(f"{what}: base file {base} names a base itself ({base_data[BASE_KEY]!r}); "
                          "a base file cannot have one")
    return [(base, base_data, f"{what}: base file {base}"), (path, data, f"config file {path}")]


def resolve_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> ResolvedConfig:
    """The defaults, updated by the YAML file at `path` (a path, a URI or a packaged config's name, if any)
    over its base file's, then by `key.sub=value` overrides; validated, with the layer each value came from."""
    cfg, files, sources = Config(), [], {}
    if path is not None:
        path = path if is_uri(path) else find_config(path)
        for location, data, what in _config_files(path):
            try:
                keys = [leaf for key, value in data.items() for leaf in _set(cfg, str(key), value)]
            except ConfigError as exc:
                raise ConfigError(f"{what}: {exc}") from None
            sources.update(dict.fromkeys(keys, Path(str(location)).name))
            files.append(location)
    for text in overrides:
        key, value = parse_override(text)
        if key.partition(".")[0] == BASE_KEY:
            raise ConfigError(f"override {text!r}: '{BASE_KEY}' is set in a config file, not on the command line")
        sources.update(dict.fromkeys(_set(cfg, key, value), "override"))
    validate(cfg)
    return ResolvedConfig(cfg, files, sources)


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """The defaults, updated by the YAML file at `path` (a path, a URI or a packaged config's name, if
    any) after its base file, then by `key.sub=value` overrides."""
    return resolve_config(path, overrides).config


def _require(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"config key '{key}': got {value!r}, expected {allowed}")


def validate(cfg: Config) -> None:
    """Range checks that types alone cannot express."""
    d = cfg.data
    for key, size in (("data.input_size", d.input_size), ("data.heatmap_size", d.heatmap_size)):
        _require(min(size) >= 4, key, list(size), "two sizes >= 4")
    multiple = BACKBONES[cfg.model.backbone].input_multiple
    _require(all(i % multiple == 0 for i in d.input_size), "data.input_size", list(d.input_size),
             f"multiples of {multiple} for model.backbone={cfg.model.backbone!r}")
    _require(tuple(d.heatmap_size) == (d.input_size[0] // 4, d.input_size[1] // 4), "data.heatmap_size",
             list(d.heatmap_size), f"data.input_size / 4 = {[d.input_size[0] // 4, d.input_size[1] // 4]}")
    _require(d.sigma > 0, "data.sigma", d.sigma, "a number > 0")
    _require(d.box_padding >= 1.0, "data.box_padding", d.box_padding, "a number >= 1")
    for key in ("batch_size", "batches_per_epoch"):
        _require(getattr(d, key) >= 1, f"data.{key}", getattr(d, key), "an integer >= 1")
    for key in ("loader_workers", "sample_shuffle", "instance_shuffle"):
        _require(getattr(d, key) >= 0, f"data.{key}", getattr(d, key), "an integer >= 0")
    a = d.augment
    for key in ("flip_prob", "half_body_prob", "rotation_prob", "occluder_prob"):
        _require(0.0 <= getattr(a, key) <= 1.0, f"data.augment.{key}", getattr(a, key), "a probability in [0, 1]")
    _require(0.0 <= a.scale_factor < 1.0, "data.augment.scale_factor", a.scale_factor, "a number in [0, 1)")
    _require(a.rotation_factor >= 0, "data.augment.rotation_factor", a.rotation_factor, "a number >= 0")
    _require(cfg.model.num_joints == 17, "model.num_joints", cfg.model.num_joints, "17 (COCO keypoints)")
    m = cfg.model
    _require(m.crf_target_sigma > 0, "model.crf_target_sigma", m.crf_target_sigma, "a number > 0")
    _require(m.crf_window == "auto" or m.crf_window >= 1, "model.crf_window", m.crf_window, "an integer >= 1 or 'auto'")
    _require(0 < m.crf_window_coverage <= 1, "model.crf_window_coverage", m.crf_window_coverage, "a fraction in (0, 1]")
    _require(m.crf_pairwise_types >= 1, "model.crf_pairwise_types", m.crf_pairwise_types, "an integer >= 1")
    # Equal tables under equal weights get equal gradients: only measured types can ever differ.
    _require(m.crf_pairwise_types == 1 or m.crf_pairwise_init == "data", "model.crf_pairwise_types",
             m.crf_pairwise_types, "1 with model.crf_pairwise_init=gaussian (types start from the measured limbs)")
    _require(cfg.model.crf_unary_scale > 0, "model.crf_unary_scale", cfg.model.crf_unary_scale, "a number > 0")
    t = cfg.train
    for key in ("cpus_per_worker", "epochs", "grad_accum", "keep_checkpoints", "log_every"):
        _require(getattr(t, key) >= 1, f"train.{key}", getattr(t, key), "an integer >= 1")
    fewest, most = worker_range(t)
    _require(1 <= fewest <= most, "train.workers", t.workers, "an integer >= 1, or [min, max] with 1 <= min <= max")
    _require(t.lr > 0, "train.lr", t.lr, "a number > 0")
    _require(t.backbone_lr_scale > 0, "train.backbone_lr_scale", t.backbone_lr_scale, "a number > 0")
    _require(t.crf_gain_lr_scale > 0, "train.crf_gain_lr_scale", t.crf_gain_lr_scale, "a number > 0")
    _require(t.max_failures >= 0, "train.max_failures", t.max_failures, "an integer >= 0")
    _require(t.checkpoint_every_steps >= 0, "train.checkpoint_every_steps", t.checkpoint_every_steps,
             "an integer >= 0 (0: at the end of each epoch only)")
    _require(t.checkpoint_every_minutes >= 0, "train.checkpoint_every_minutes", t.checkpoint_every_minutes,
             "a number of minutes >= 0")
    _require(t.checkpoint_every_minutes == 0 or t.checkpoint_every_steps > 0, "train.checkpoint_every_minutes",
             t.checkpoint_every_minutes, "0 unless train.checkpoint_every_steps > 0 (the steps a save may come at)")
    # A name, not a path: the run directory is train.storage/train.run_name.
    _require(bool(RUN_NAME.fullmatch(t.run_name)) and t.run_name not in (".", ".."), "train.run_name", t.run_name,
             "a name of letters, digits, '.', '_' and '-' (no '/')")
    # Epochs past train.epochs are allowed: they never apply, so `train.epochs=1` keeps a file's schedule.
    _require(all(step >= 1 for step in t.lr_steps) and list(t.lr_steps) == sorted(set(t.lr_steps)),
             "train.lr_steps", list(t.lr_steps), "increasing epochs >= 1")
    _require(t.start_timeout_s > 0, "train.start_timeout_s", t.start_timeout_s, "a number of seconds > 0")
    _require(t.elastic_resize_interval_s > 0, "train.elastic_resize_interval_s", t.elastic_resize_interval_s,
             "a number of seconds > 0")
    _require(t.warmup_steps >= 0, "train.warmup_steps", t.warmup_steps, "an integer >= 0")
    _require(t.grad_clip >= 0, "train.grad_clip", t.grad_clip, "a number >= 0 (0 disables clipping)")
    _require(0 < t.lr_factor <= 1, "train.lr_factor", t.lr_factor, "a number in (0, 1]")
    _require(d.batch_size % (most * t.grad_accum) == 0, "data.batch_size", d.batch_size,
             f"a multiple of train.workers x train.grad_accum = {most * t.grad_accum}")
    micro = d.batch_size // (most * t.grad_accum)
    uneven = next((n for n in range(fewest, most + 1) if d.batch_size % (n * micro)), None)
    _require(uneven is None, "data.batch_size", d.batch_size,
             f"a multiple of n x {micro} (the micro-batch) for every n in train.workers={list(worker_range(t))}: "
             f"{uneven} workers cannot share it in whole micro-batches")
    _require(t.precision != "fp16" or t.use_gpu, "train.precision", t.precision,
             "bf16 or fp32 on CPU (DeepSpeed has no fp16 on CPU; fp16 needs train.use_gpu=true)")
    _require(t.precision != "bf16" or t.zero_stage >= 1, "train.zero_stage", t.zero_stage,
             "1, 2 or 3 with train.precision=bf16 (at stage 0 DeepSpeed keeps no fp32 master weights)")
    _require(t.mode == "joint" or not t.crf_from_checkpoint, "train.crf_from_checkpoint", t.crf_from_checkpoint,
             "false outside train.mode=joint")
    _require(t.heatmap_loss_weight >= 0, "train.heatmap_loss_weight", t.heatmap_loss_weight, "a number >= 0")
    _require(t.mode == "joint" or not t.heatmap_loss_weight, "train.heatmap_loss_weight", t.heatmap_loss_weight,
             "0 outside train.mode=joint")
    _require(t.mode == "backbone" or bool(t.backbone_checkpoint), "train.backbone_checkpoint", t.backbone_checkpoint,
             f"the trained backbone's checkpoint: train.mode={t.mode!r} starts from one")
    if cfg.train.mode != "backbone" and d.source == "random":  # random joints have no limbs to measure
        _require(m.crf_window != "auto", "model.crf_window", m.crf_window, "an integer with data.source='random'")
        _require(m.crf_pairwise_init == "gaussian", "model.crf_pairwise_init", m.crf_pairwise_init,
                 "'gaussian' with data.source='random' (random joints have no limbs to measure)")
    _require(cfg.eval.every_epochs >= 0, "eval.every_epochs", cfg.eval.every_epochs, "an integer >= 0")
    scores = score_names(cfg.eval.pck_thresholds)
    _require(cfg.eval.best_metric in scores, "eval.best_metric", cfg.eval.best_metric, f"one of {', '.join(scores)}")
    _require(0 <= cfg.monitor.port < 65536, "monitor.port", cfg.monitor.port, "a port in [0, 65535]")


COCO_STATS = ("AP", "AP50", "AP75", "APm", "APl", "AR", "AR50", "AR75", "ARm", "ARl")


def score_names(pck_thresholds: tuple[float, ...]) -> list[str]:
    """The validation scores an evaluation reports (higher is better), as eval.best_metric names them."""
    return [*COCO_STATS, "accuracy", *(f"{kind}/pck@{t:g}" for kind in ("visible", "occluded") for t in pck_thresholds)]


def worker_range(t: TrainConfig) -> tuple[int, int]:
    """(fewest, most) Ray Train workers of a run: equal unless train.workers is [min, max] (elastic)."""
    return (t.workers, t.workers) if isinstance(t.workers, int) else (t.workers[0], t.workers[1])


def micro_batch_size(cfg: Config) -> int:
    """Samples per rank per forward/backward: the global batch split over the most workers and
    train.grad_accum accumulation steps. The same at every world size of an elastic run."""
    return cfg.data.batch_size // (worker_range(cfg.train)[1] * cfg.train.grad_accum)


def grad_accum_at(cfg: Config, world_size: int) -> int:
    """Micro-batches each of `world_size` ranks accumulates per optimizer step, so that a step trains on
    data.batch_size samples (train.grad_accum at the most workers)."""
    return cfg.data.batch_size // (world_size * micro_batch_size(cfg))


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (tuples as lists), suitable for YAML/JSON."""

    def plain(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        return v

    return plain(dataclasses.asdict(cfg))


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
