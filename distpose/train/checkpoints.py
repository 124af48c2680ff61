"""Training checkpoints (DeepSpeed state of every rank + our metadata), and the weights a run exports.

A checkpoint directory (`checkpoint_step<N>` in the run directory, local or on object storage) holds
DeepSpeed's files under the tag `state` (each rank writes its own ZeRO partitions; Ray merges the ranks'
directories), `meta.json` (the config, the world size, the epoch and step reached, the metrics of that
epoch, the best score so far) and, written last by each rank, `rank<r>.files.json`: the files that rank
wrote, with their sizes. A checkpoint is complete when every rank's list is there and each file in it has
its size. Resuming takes the newest complete checkpoint on storage, whether or not Ray registered it (a
rank killed between its upload and Ray's registration would otherwise cost a checkpoint interval), and
removes incomplete ones. ZeRO partitions written by another number of ranks are converted to DeepSpeed's
universal checkpoint (per-parameter fp32 weights and optimizer state), which loads at any world size.

A run also exports model files, best.pt and final.pt (models/model_file.py: fp32 weights + config), which
load without Ray or DeepSpeed; consolidated_state_dict gathers their weights from the ZeRO partitions.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from distpose.errors import DataError
from distpose.files import atomic_write_bytes, file_sizes, join, read_bytes, remove_tree, subdirectories

log = logging.getLogger(__name__)

DEEPSPEED_TAG = "state"
META_FILE = "meta.json"
CHECKPOINT_PREFIX = "checkpoint_"
RANK_FILES = "rank{rank}.files.json"
PARTIAL_CHECKPOINT_PREFIX = ".partial-checkpoint-"  # a rank's save before Ray copies it into the run
BEST_MODEL = "best.pt"
FINAL_MODEL = "final.pt"


@dataclass
class TrainState:
    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps completed
    epoch_step: int = 0  # steps completed of the epoch under way (a checkpoint between epoch ends)
    epoch_loss: float = 0.0  # the sum of those steps' losses, for the epoch's mean
    epoch_instances: int = 0  # instances those steps trained on, over all ranks
    epoch_digest: int = 0  # and their passes.instance_digest: which ones, whatever the order
    best_score: float | None = None  # the best of eval's selection metric so far
    best_epoch: int | None = None
    metrics: dict[str, float] = field(default_factory=dict)  # of the last completed epoch


@dataclass
class CheckpointMeta:
    state: TrainState
    config: dict[str, Any]
    world_size: int  # of the run that wrote it: its ZeRO partitions are one per rank

    @property
    def zero_stage(self) -> int:
        return int(self.config.get("train", {}).get("zero_stage", 0))


def write_meta(directory: Path, state: TrainState, config: dict[str, Any], world_size: int) -> None:
    doc = {"config": config, "world_size": world_size, "state": asdict(state)}
    atomic_write_bytes(directory / META_FILE, json.dumps(doc, indent=1).encode())


def _meta_of(doc: dict[str, Any]) -> CheckpointMeta:
    return CheckpointMeta(TrainState(**doc["state"]), doc["config"], int(doc["world_size"]))


def read_meta(directory: str | Path) -> CheckpointMeta:
    """`directory`'s meta.json (local or on object storage)."""
    return _meta_of(json.loads(read_bytes(join(directory, META_FILE))))


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}step{step:08d}"


def save_checkpoint(engine, directory: Path, state: TrainState, config: dict[str, Any]) -> None:
    """This rank's part of the checkpoint, into its own `directory` (Ray merges the ranks' directories):
    DeepSpeed's state, meta.json (rank 0), then the list of the files this rank wrote."""
    from deepspeed.checkpoint.constants import (
        UNIVERSAL_CHECKPOINT_INFO,
        UNIVERSAL_CHECKPOINT_VERSION_KEY,
        UNIVERSAL_CHECKPOINT_VERSION_VALUE,
    )

    rank, world = engine.global_rank, engine.world_size
    # What DeepSpeed's universal conversion requires of a checkpoint (a client-state entry).
    info = {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
    engine.save_checkpoint(str(directory), tag=DEEPSPEED_TAG, client_state=info)
    if rank == 0:
        write_meta(directory, state, config, world)
    listing = {"world_size": world, "files": file_sizes(directory)}
    atomic_write_bytes(directory / RANK_FILES.format(rank=rank), json.dumps(listing, indent=1).encode())


class OlderCheckpoint(Exception):
    """A checkpoint whose meta.json an older distpose wrote (no world size, no rank file lists)."""


def inspect_checkpoint(location: str | Path) -> tuple[CheckpointMeta | None, str | None]:
    """(its meta, None) for a complete checkpoint at `location`, else (None, why it is not complete). Raises
    OlderCheckpoint for one written by an older distpose: complete or not, it cannot be told, and it is not
    ours to remove."""
    present = file_sizes(location)
    try:
        doc = json.loads(read_bytes(join(location, META_FILE)))
    except (FileNotFoundError, OSError, ValueError) as exc:
        return None, f"no readable {META_FILE} ({type(exc).__name__})"
    if isinstance(doc, dict) and "epoch" in doc and "state" not in doc:
        raise OlderCheckpoint(location)
    try:
        meta = _meta_of(doc)
    except (ValueError, KeyError, TypeError) as exc:
        return None, f"no readable {META_FILE} ({type(exc).__name__})"
    for rank in range(meta.world_size):
        name = RANK_FILES.format(rank=rank)
        try:
            listed = json.loads(read_bytes(join(location, name)))["files"]
        except (FileNotFoundError, OSError, ValueError, KeyError) as exc:
            return None, f"no readable {name} ({type(exc).__name__})"
        for path, size in listed.items():
            if present.get(path) != size:
                return None, f"{path}: {present.get(path, 'missing')} bytes, rank {rank} wrote {size}"
    return meta, None


def checkpoints_on_storage(run_dir: str | Path) -> list[str]:
    """The checkpoint directories of a run (local or object storage), oldest first."""
    return [join(run_dir, name) for name in subdirectories(run_dir) if name.startswith(CHECKPOINT_PREFIX)]


def complete_checkpoints(run_dir: str | Path, remove_incomplete: bool = False) -> list[tuple[str, CheckpointMeta]]:
    """The run's complete checkpoints with their meta, fewest steps first; with `remove_incomplete`, the
    incomplete ones are deleted (nothing writes to a run's storage while its workers start). Checkpoints of
    an older distpose are left alone."""
    complete = []
    for location in checkpoints_on_storage(run_dir):
        try:
            meta, reason = inspect_checkpoint(location)
        except OlderCheckpoint:
            log.warning("left alone: %s, written by an older distpose (resume from it is not supported)", location)
            continue
        if meta is not None:
            complete.append((location, meta))
        elif remove_incomplete:
            log.warning("removing incomplete checkpoint %s: %s", location, reason)
            remove_tree(location)
    return sorted(complete, key=lambda found: found[1].state.step)


def newest_complete_checkpoint(run_dir: str | Path, remove_incomplete: bool = False) -> str | None:
    """The complete checkpoint with the most steps (see complete_checkpoints)."""
    complete = complete_checkpoints(run_dir, remove_incomplete)
    return complete[-1][0] if complete else None


def prune_checkpoints(run_dir: str | Path, keep: int) -> list[str]:
    """Delete all but the `keep` newest complete checkpoints (Ray keeps count of the ones it registered only;
    one written but never registered would stay forever). Returns what was deleted."""
    complete = [location for location, _ in complete_checkpoints(run_dir)]
    surplus = complete[:-keep] if keep > 0 else []
    for location in surplus:
        remove_tree(location)
    return surplus


def needs_conversion(meta: CheckpointMeta, world_size: int) -> bool:
    """ZeRO 1-3 partitions are one per rank of the run that wrote them; stage 0 state is whole on rank 0."""
    return meta.zero_stage >= 1 and meta.world_size != world_size


def convert_to_universal(source: Path, target: Path) -> None:
    """DeepSpeed's ds_to_universal on one tag directory, in this process (DeepSpeed is imported already; a
    subprocess would spend seconds importing it again), one worker each for extracting and merging (its
    process pools do not belong in a Ray worker), its console output kept out of the rank's log."""
    from deepspeed.checkpoint import ds_to_universal

    argv = ["--input_folder", str(source), "--output_folder", str(target),
            "--num_extract_workers", "1", "--num_merge_workers", "1"]
    saved, sys.argv = sys.argv, ["ds_to_universal", *argv]
    try:
        args = ds_to_universal.parse_arguments()  # its defaults for the options not given, whatever the version
    finally:
        sys.argv = saved
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        ds_to_universal.main(args)


@contextlib.contextmanager
def loadable_checkpoint(directory: Path, world_size: int) -> Iterator[tuple[Path, CheckpointMeta, bool]]:
    """(the directory to give DeepSpeed's load_checkpoint, the checkpoint's meta, whether it is a universal
    checkpoint). The conversion runs DeepSpeed's own converter on this rank, into a temporary directory
    removed afterwards (each rank converts for itself: ranks on other nodes share no disk)."""
    meta = read_meta(directory)
    if not needs_conversion(meta, world_size):
        yield directory, meta, False
        return
    with tempfile.TemporaryDirectory(prefix="distpose-universal-") as converted:
        try:
            convert_to_universal(Path(directory) / DEEPSPEED_TAG, Path(converted) / DEEPSPEED_TAG)
        except Exception as exc:  # the converter's own assertions and errors, whatever their type
            reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
            raise DataError(f"checkpoint {directory}: DeepSpeed could not convert its {meta.world_size}-rank "
                            f"ZeRO state for {world_size} ranks: {reason}") from None
        log.info("converted %s (%d ranks, ZeRO %d) to a universal checkpoint for %d ranks",
                 directory, meta.world_size, meta.zero_stage, world_size)
        yield Path(converted), meta, True


def consolidated_state_dict(engine) -> dict[str, torch.Tensor]:
    """The full fp32 weights and buffers, on the CPU. Collective under ZeRO-3: every rank must call it.

    Trained parameters come from DeepSpeed's fp32 master copy where it keeps one (ZeRO 1-3, bf16),
    so a bf16 run exports its full-precision weights, not their bf16 rounding.
    """
    import deepspeed
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    named = dict(module.named_parameters())
    with deepspeed.zero.GatheredParameters(list(named.values()), enabled=engine.zero_optimization_stage() == 3):
        state = {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().clone()
                 for k, v in module.state_dict().items()}
    for name, param in named.items():
        if param.requires_grad:
            master = safe_get_full_fp32_param(param)
            if master is not None:
                state[name] = master.detach().float().cpu().reshape(state[name].shape)
    return state

