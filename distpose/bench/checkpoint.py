"""What a DeepSpeed checkpoint costs: one network's save and load at ZeRO 0, 2 and 3 on a gloo process group of
CPU ranks, as training writes it (train/checkpoints.save_checkpoint) and a resume reads it.

Each ZeRO stage runs in its own process (`checkpoint_pass`), which spawns the ranks: the caller measures that
process tree's peak RSS. Every rank trains one step first, so the Adam moments exist and are saved.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from distpose.config import load_config, to_dict
from distpose.files import atomic_write_bytes, file_sizes
from distpose.train.checkpoints import DEEPSPEED_TAG, TrainState, save_checkpoint


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _timed(fn) -> float:
    """Seconds of a collective step, from a barrier to a barrier: the slowest rank's time."""
    dist.barrier()
    start = time.perf_counter()
    fn()
    dist.barrier()
    return time.perf_counter() - start


def _rank(rank: int, world: int, port: int, backbone: str, stage: int, directory: str, out: str) -> None:
    from distpose.train.engine import build_engine
    from distpose.train.modes import parameter_groups, run_model

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))  # DeepSpeed reads these
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        cfg = load_config(None, [f"model.backbone={backbone}", "data.input_size=[256,192]", "data.heatmap_size=[64,48]",
                                 f"data.batch_size={world}", f"train.workers={world}", f"train.zero_stage={stage}",
                                 "data.source=random", "train.precision=fp32"])
        model = run_model(cfg)
        parameters = sum(p.numel() for p in model.parameters())  # before ZeRO 3 partitions them
        engine = build_engine(model, parameter_groups(model, cfg.train), cfg, world)
        engine.backward(engine(torch.randn(1, 3, 256, 192)).heatmaps.float().pow(2).mean())
        engine.step()
        save_s = _timed(lambda: save_checkpoint(engine, Path(directory), TrainState(epoch=1, step=1), to_dict(cfg)))
        del engine
        model = run_model(cfg)
        engine = build_engine(model, parameter_groups(model, cfg.train), cfg, world)
        load_s = _timed(lambda: engine.load_checkpoint(directory, tag=DEEPSPEED_TAG))
        if rank == 0:
            atomic_write_bytes(Path(out), json.dumps({"save_seconds": save_s, "load_seconds": load_s,
                                                      "parameters": parameters}).encode())
    finally:
        dist.destroy_process_group()


def checkpoint_pass(backbone: str, stage: int, world: int = 2) -> None:
    """Save and load one checkpoint at `stage` on `world` ranks; prints JSON with the seconds, the bytes written and
    the files."""
    with tempfile.TemporaryDirectory(prefix="distpose-bench-checkpoint-") as scratch:
        directory, out = Path(scratch) / "checkpoint", Path(scratch) / "result.json"
        mp.spawn(_rank, (world, _free_port(), backbone, stage, str(directory), str(out)), nprocs=world, join=True)
        sizes = file_sizes(directory)
        print(json.dumps({**json.loads(out.read_text()), "bytes_written": sum(sizes.values()), "files": len(sizes)}))
