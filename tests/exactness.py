"""Whether two runs of `distpose train` ended bit for bit alike: weights, optimizer state, per-step losses."""

from collections import defaultdict
from pathlib import Path

import torch

from distpose.metrics_log import read_records
from distpose.models.model_file import read_model_file
from distpose.train.checkpoints import DEEPSPEED_TAG, checkpoint_name, convert_to_universal, read_meta


def _walk(value, key: str, found: dict[str, torch.Tensor]) -> None:
    if isinstance(value, torch.Tensor):
        found[key] = value.detach()
    elif isinstance(value, dict):
        for name, item in value.items():
            _walk(item, f"{key}/{name}", found)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _walk(item, f"{key}/{index}", found)


def checkpoint_tensors(checkpoint: Path, scratch: Path) -> dict[str, torch.Tensor]:
    """Every tensor of `checkpoint`'s DeepSpeed state, by file and place in it. ZeRO 1-3 keep each rank's optimizer
    state (fp32 weights, Adam's moments) as a flat partition padded to equal sizes, the padding uninitialised
    memory that differs between two unkilled runs too: those are compared per parameter, as DeepSpeed's universal
    converter extracts them, padding left out. The rest of the files (buffers, schedule, step counts) as they are."""
    found: dict[str, torch.Tensor] = {}
    stage = read_meta(checkpoint).zero_stage
    for path in sorted((checkpoint / DEEPSPEED_TAG).rglob("*.pt")):
        if not (stage >= 1 and path.name.endswith("optim_states.pt")):
            _walk(torch.load(path, map_location="cpu", weights_only=False), path.name, found)
    if stage >= 1:
        universal = scratch / f"universal-{checkpoint.parent.name}"
        convert_to_universal(checkpoint / DEEPSPEED_TAG, universal)
        for path in sorted((universal / "zero").glob("*/*.pt")):  # zero/<parameter>/{fp32,exp_avg,...}.pt
            _walk(torch.load(path, map_location="cpu", weights_only=False), str(path.relative_to(universal)), found)
    return found


def largest_difference(run: Path, reference: Path, last_step: int, scratch: Path) -> float:
    """The largest absolute difference between the two runs' final weights and the tensors of their checkpoints at
    `last_step`; inf where their names or shapes differ."""
    pairs, last = [], checkpoint_name(last_step)
    for load, where in ((lambda d: read_model_file(d / "final.pt")["state_dict"], "final.pt"),
                        (lambda d: checkpoint_tensors(d / last, scratch), last)):
        ours, theirs = load(run), load(reference)
        assert ours.keys() == theirs.keys(), where
        assert len(ours) > 0, where
        pairs += [(ours[k], theirs[k]) for k in ours]
    worst = 0.0
    for a, b in pairs:
        if a.shape != b.shape or a.dtype != b.dtype:
            return float("inf")
        if a.numel() and a.is_floating_point():
            worst = max(worst, float((a.double() - b.double()).abs().max()))
        elif not torch.equal(a, b):
            return float("inf")
    return worst


def step_losses(run: Path) -> dict[int, set[float]]:
    """Each step's losses on record: more than one record for the steps a resumed run redid."""
    losses: dict[int, set[float]] = defaultdict(set)
    for record in read_records(run, "step"):
        losses[record["step"]].add(record["loss"])
    return losses
