"""Training checkpoints: which one a run resumes from (the newest complete one on storage), and ZeRO state
written by N ranks resumed on M (DeepSpeed's universal conversion), compared exactly with the state saved."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_port

from distpose.config import load_config, to_dict
from distpose.train.checkpoints import (
    DEEPSPEED_TAG,
    RANK_FILES,
    TrainState,
    checkpoint_name,
    inspect_checkpoint,
    loadable_checkpoint,
    newest_complete_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    write_meta,
)

# ---------------------------------------------------------------------------------------------
# complete or not


def fake_checkpoint(run_dir: Path, step: int, world: int = 2) -> Path:
    """A checkpoint as Ray leaves it after merging `world` ranks' directories: each rank's files, rank 0's
    meta.json, and each rank's list of what it wrote."""
    directory = run_dir / checkpoint_name(step)
    for rank in range(world):
        files = {f"state/part{rank}.pt": bytes(100 + rank)}
        if rank == 0:
            write_meta(directory if directory.is_dir() else _mkdir(directory), TrainState(step=step), {}, world)
            files["meta.json"] = (directory / "meta.json").read_bytes()
        for name, data in files.items():
            (directory / name).parent.mkdir(parents=True, exist_ok=True)
            (directory / name).write_bytes(data)
        listing = {"world_size": world, "files": {name: len(data) for name, data in files.items()}}
        (directory / RANK_FILES.format(rank=rank)).write_text(json.dumps(listing))
    return directory


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def test_a_complete_checkpoint_has_every_ranks_files_at_their_sizes(tmp_path):
    directory = fake_checkpoint(tmp_path, 10)
    assert inspect_checkpoint(directory)[1] is None

    (directory / "state/part1.pt").write_bytes(bytes(50))  # an upload cut short
    assert inspect_checkpoint(directory)[1] == "state/part1.pt: 50 bytes, rank 1 wrote 101"
    (directory / "state/part1.pt").unlink()
    assert inspect_checkpoint(directory)[1] == "state/part1.pt: missing bytes, rank 1 wrote 101"

    directory = fake_checkpoint(tmp_path, 20)
    (directory / "rank1.files.json").unlink()  # rank 1 never finished its part
    assert inspect_checkpoint(directory)[1] == "no readable rank1.files.json (FileNotFoundError)"
    directory = fake_checkpoint(tmp_path, 30)
    (directory / "meta.json").write_text('{"config": {')
    assert inspect_checkpoint(directory)[1] == "no readable meta.json (JSONDecodeError)"


def test_resume_takes_the_newest_complete_checkpoint_and_removes_the_incomplete(tmp_path):
    for step in (10, 20, 30):
        fake_checkpoint(tmp_path, step)
    (tmp_path / checkpoint_name(30) / "rank0.files.json").unlink()
    (tmp_path / ".partial-checkpoint-x").mkdir()  # not a checkpoint: left alone

    assert newest_complete_checkpoint(tmp_path) == str(tmp_path / checkpoint_name(20))
    assert (tmp_path / checkpoint_name(30)).is_dir()  # only looked at
    assert newest_complete_checkpoint(tmp_path, remove_incomplete=True) == str(tmp_path / checkpoint_name(20))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".partial-checkpoint-x", checkpoint_name(10),
                                                          checkpoint_name(20)]
    assert newest_complete_checkpoint(tmp_path / "no-such-run") is None


def test_a_checkpoint_of_an_older_distpose_is_neither_resumed_nor_removed(tmp_path):
    fake_checkpoint(tmp_path, 10)
    older = tmp_path / "checkpoint_2026-11-01_10-00-00.000000"  # Ray's own name, our old meta.json
    (older / "state").mkdir(parents=True)
    (older / "meta.json").write_text(json.dumps({"config": {}, "epoch": 9, "step": 90}))
    assert newest_complete_checkpoint(tmp_path, remove_incomplete=True) == str(tmp_path / checkpoint_name(10))
    assert (older / "meta.json").is_file()
    assert prune_checkpoints(tmp_path, keep=1) == []


def test_pruning_keeps_the_newest_complete_checkpoints(tmp_path):
    for step in (5, 10, 15, 20):
        fake_checkpoint(tmp_path, step)
    assert prune_checkpoints(tmp_path, keep=2) == [str(tmp_path / checkpoint_name(s)) for s in (5, 10)]
    assert sorted(p.name for p in tmp_path.iterdir()) == [checkpoint_name(15), checkpoint_name(20)]


# ---------------------------------------------------------------------------------------------
# across world sizes

STAGES = (0, 2, 3)


def _config(world: int, stage: int):
    return load_config(None, ["model.backbone=cnn_small", "data.input_size=[64,48]", "data.heatmap_size=[16,12]",
                              "data.batch_size=4", f"train.workers={world}", f"train.zero_stage={stage}",
                              "data.source=random"])


def _full_state(engine) -> dict[str, torch.Tensor]:
    """Every trained parameter's fp32 master weights and Adam moments, whole, plus the step counters.
    Collective under ZeRO (every rank calls it)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    out: dict[str, torch.Tensor] = {}
    adam = engine.optimizer if engine.zero_optimization_stage() == 0 else None
    for name, param in engine.module.named_parameters():
        if adam is None:
            out[f"{name}.fp32"] = safe_get_full_fp32_param(param).detach().cpu().clone()
            for key in ("exp_avg", "exp_avg_sq"):
                out[f"{name}.{key}"] = safe_get_full_optimizer_state(param, key).detach().cpu().clone()
        else:
            out[f"{name}.fp32"] = param.detach().float().cpu().clone()
            for key in ("exp_avg", "exp_avg_sq", "step"):
                out[f"{name}.{key}"] = adam.state[param][key].detach().cpu().clone()
    if adam is None:
        base = engine.optimizer.optimizer
        steps = {float(s["step"]) for s in base.state.values()}
        assert len(steps) == 1, steps
        out["adam.step"] = torch.tensor(steps.pop())
    out["global_steps"] = torch.tensor(engine.global_steps)
    out["lr_schedule.last_epoch"] = torch.tensor(engine.lr_scheduler.last_epoch)
    return out


def _rank_main(rank: int, world: int, port: int, jobs: list[tuple[int, str, str]]) -> None:
    """One rank of a gloo process group: for each (stage, directory, action) build the engine and either
    train 3 steps and save (this rank's part under directory/rank<r>), or load directory/merged."""
    import deepspeed

    from distpose.train.engine import build_engine
    from distpose.train.modes import parameter_groups, run_model

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))  # DeepSpeed reads these
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        for stage, directory, action in jobs:
            directory = Path(directory)
            cfg = _config(world, stage)
            torch.manual_seed(0)
            model = run_model(cfg)
            groups = parameter_groups(model, cfg.train)
            if action == "save":
                engine = build_engine(model, groups, cfg, world)
                data = torch.Generator().manual_seed(rank)
                for _ in range(3):
                    x = torch.randn(4 // world, 3, 64, 48, generator=data)
                    engine.backward(engine(x).heatmaps.float().pow(2).mean())
                    engine.step()
                save_checkpoint(engine, directory / f"rank{rank}", TrainState(epoch=1, step=3), to_dict(cfg))
                state, name = _full_state(engine), "saved.pt"
            else:
                with loadable_checkpoint(directory / "merged", world) as (source, meta, universal):
                    engine = build_engine(model, groups, cfg, world, load_universal=universal)
                    engine.load_checkpoint(str(source), tag=DEEPSPEED_TAG)
                state, name = {**_full_state(engine), "universal": torch.tensor(universal),
                               # DeepSpeed's CPU shared-memory op (for inference only) is neither compiled nor loaded:
                               "shm_op_loaded": torch.tensor(deepspeed.comm.comm.cdb.shm_comm_op is not None),
                               "meta.world_size": torch.tensor(meta.world_size),
                               "meta.step": torch.tensor(meta.state.step)}, "loaded.pt"
            if rank == 0:
                torch.save(state, directory / name)
            dist.barrier()
    finally:
        dist.destroy_process_group()


def _run_ranks(world: int, jobs: list[tuple[int, str, str]]) -> None:
    mp.spawn(_rank_main, (world, free_port(), jobs), nprocs=world, join=True)


@pytest.mark.integration
@pytest.mark.parametrize(("saved", "loaded"), [(2, 1), (1, 2)], ids=["2_to_1_ranks", "1_to_2_ranks"])
def test_zero_checkpoint_resumes_at_another_world_size_with_the_same_state(tmp_path, saved, loaded):
    """ZeRO 0, 2 and 3: the fp32 master weights, both Adam moments and the step counters after loading at M
    ranks equal, bit for bit, what N ranks saved. (~40 s: four process groups, two conversions per case.)"""
    directories = {stage: tmp_path / f"zero{stage}" for stage in STAGES}
    _run_ranks(saved, [(stage, str(d), "save") for stage, d in directories.items()])
    for d in directories.values():  # what Ray does with the ranks' directories
        for part in sorted(d.glob("rank*")):
            shutil.copytree(part, d / "merged", dirs_exist_ok=True)
        assert inspect_checkpoint(d / "merged")[1] is None
    _run_ranks(loaded, [(stage, str(d), "load") for stage, d in directories.items()])

    for stage, d in directories.items():
        expected, got = torch.load(d / "saved.pt"), torch.load(d / "loaded.pt")
        assert not bool(got.pop("shm_op_loaded"))
        assert bool(got.pop("universal")) == (stage > 0), stage  # stage 0 state is whole: loaded as it is
        assert int(got.pop("meta.world_size")) == saved and int(got.pop("meta.step")) == 3
        assert got.keys() == expected.keys()
        differ = [k for k in expected if not torch.equal(got[k], expected[k])]
        assert not differ, f"ZeRO {stage}, {saved} -> {loaded} ranks: {len(differ)} differ, e.g. {differ[:3]}"
        assert int(got["global_steps"]) == 3 and int(got["lr_schedule.last_epoch"]) == 3
        moments = [v for k, v in expected.items() if k.endswith(".exp_avg_sq")]
        assert moments and all(bool((m > 0).any()) for m in moments)  # trained state, not zeros equal to zeros
        print(f"\n[zero {stage}] {saved} -> {loaded} ranks: {len(expected)} tensors equal")
