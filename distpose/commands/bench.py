"""`distpose bench loader|train|crf|kernel|ablation|scale`: benchmarks, each printing JSON that names the machine."""

from __future__ import annotations

import argparse
import json
import sys

from distpose.commands.arguments import (
    add_address_argument,
    add_config_arguments,
    log,
    output_path,
    positive,
    write_json,
)
from distpose.files import atomic_write_bytes


def run_bench_crf(args: argparse.Namespace) -> int:
    from distpose.bench.crf import run

    out = output_path(args.out)
    write_json(run(batch=args.batch, radii=tuple(args.radius), repeats=args.repeats), out)
    return 0


def run_bench_kernel(args: argparse.Namespace) -> int:
    from distpose.bench.kernel import run

    out = output_path(args.out)
    write_json(run(batch=args.batch, radii=tuple(args.radius), full_window=not args.no_full_window,
                    repeats=args.repeats, impls=tuple(args.impl), tables=tuple(args.tables)), out)
    return 0


def run_bench_loader(args: argparse.Namespace) -> int:
    from distpose.bench.loader import run
    from distpose.config import load_config

    cfg = load_config(args.config, args.overrides)
    out = output_path(args.out)
    write_json(run(cfg.data, images=args.images, batches=args.batches, warmup=args.warmup, remote=args.remote), out)
    return 0


def run_bench_train(args: argparse.Namespace) -> int:
    from distpose.bench.train import run
    from distpose.config import load_config
    from distpose.train.driver import preflight

    cfg = load_config(args.config, args.overrides)
    preflight(cfg)
    out = output_path(args.out)
    write_json(run(cfg, warmup=args.warmup, steps=args.steps, address=args.address, plain_only=args.plain_only),
               out)
    return 0


def run_bench_ablation(args: argparse.Namespace) -> int:
    from distpose.bench.ablation import run

    out = output_path(args.out)
    result = run(args.config or "quick", args.network, tuple(args.overrides), args.address)
    print(result["table"], file=sys.stderr)
    write_json(result, out)
    return 0


def run_bench_scale(args: argparse.Namespace) -> int:
    from pathlib import Path

    from distpose.bench.scale import QUICK_SIZES, plot, run

    out = output_path(args.out)
    plot_path = output_path(args.plot)
    sizes = tuple(args.sizes) if args.sizes else QUICK_SIZES if args.quick else None

    def keep(partial: dict) -> None:  # an hour-long run keeps its points if a later one fails or is stopped
        if out:
            atomic_write_bytes(out, (json.dumps(partial, indent=2) + "\n").encode())
        log.info("scale: N=%d measured", partial["stages"][-1]["images"])

    result = run(Path(args.work), **({"sizes": sizes} if sizes else {}), input_size=tuple(args.input),
                 checkpoint_backbone="cnn_small" if args.quick else "hrnet_w32", on_point=keep)
    write_json(result, out)
    if plot_path:
        plot(result, plot_path)
        log.info("wrote %s", plot_path)
    return 0


def _add_crf_bench_arguments(parser: argparse.ArgumentParser, batch: int, repeats: int, example: str) -> None:
    parser.add_argument("--batch", type=positive, default=batch, help=f"batch size (default {batch})")
    parser.add_argument("--radius", type=positive, nargs="+", default=[7, 15], help="window radii (default 7 15)")
    parser.add_argument("--repeats", type=positive, default=repeats, help=f"timed runs, best kept (default {repeats})")
    parser.add_argument("--out", help=f"also write the JSON here, e.g. benchmarks/results/{example}")


def register(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser("bench", help="throughput benchmarks (JSON output)",
                                description="Throughput benchmarks; each prints JSON naming the machine.")
    bench_cmds = bench.add_subparsers(dest="bench_command", metavar="BENCHMARK", required=True)
    loader = bench_cmds.add_parser(
        "loader", help="training-loader instances/s against a raw decode + warp loop",
        description="Instances/s of the full training pipeline (tar, decode, crop, augment, batching, "
        "heatmap targets rendered by the consumer as in training) in process and with 1 and 2 "
        "DataLoader workers, next to a raw cv2.imdecode + cv2.warpAffine loop over the same images in "
        "the same run (one core), and their ratios. Reads the training shards named by data.shards "
        "and data.train_split.",
    )
    add_config_arguments(loader)
    loader.add_argument("--images", type=positive, default=300, help="images in the raw loop (default 300)")
    loader.add_argument("--batches", type=positive, default=60,
                        help="timed batches per pipeline run (default 60)")
    loader.add_argument("--warmup", type=positive, default=16,
                        help="untimed batches first, more than the DataLoader prefetches (default 16)")
    loader.add_argument("--out", help="also write the JSON here, e.g. "
                        "benchmarks/results/loader-<input size>-<machine>.json")
    loader.add_argument("--remote", metavar="LOCATION",
                        help="a copy of the same shards in object storage (s3://bucket/prefix, http(s)://): also "
                        "measures the 1-worker pipeline reading it, alternately with the local shards, and "
                        "their ratio")
    loader.set_defaults(func=run_bench_loader)

    train_bench = bench_cmds.add_parser(
        "train", help="training samples/s: Ray + DeepSpeed + WebDataset against a plain PyTorch loop",
        description="Samples/s of `distpose train` (Ray Train workers, DeepSpeed, the shard stream) at steady "
        "state, and of a plain single-process PyTorch loop (Adam, same model, loader, loss and precision) in "
        "the same run; their ratio, the overhead per worker, the data-wait share, and MFU on a GPU in bf16. "
        "Backbone, input size, batch, precision, ZeRO stage and workers are config keys, e.g. "
        "model.backbone=hrnet_w32 data.input_size=[256,192] data.heatmap_size=[64,48] train.precision=bf16. "
        "With train.checkpoint_every_steps=N, the distributed run is repeated with checkpoints at epoch ends only: "
        "the ratio of their step times is what the checkpoints cost.",
    )
    add_config_arguments(train_bench)
    add_address_argument(train_bench)
    train_bench.add_argument("--steps", type=positive, default=60, help="timed steps of each (default 60)")
    train_bench.add_argument("--warmup", type=positive, default=10,
                             help="untimed steps first (default 10)")
    train_bench.add_argument("--out", help="also write the JSON here, e.g. "
                             "benchmarks/results/train-<backbone>-<input size>-<machine>.json")
    train_bench.add_argument("--plain-only", action="store_true",
                             help="time the plain loop alone: no Ray, no DeepSpeed (benchmarks/gpu.sh)")
    train_bench.set_defaults(func=run_bench_train)

    crf = bench_cmds.add_parser(
        "crf", help="the reference tree CRF on the CPU: shift-and-accumulate against unfold + logsumexp",
        description="Forward (marginals) and forward + backward of the exact tree CRF at B x 17 joints x "
        "64x48 on the COCO tree, for each window radius, with both message formulations in the same run "
        "(best of --repeats), their speed ratio and their largest disagreement.",
    )
    _add_crf_bench_arguments(crf, batch=8, repeats=2, example="crf-reference-<machine>.json")
    crf.set_defaults(func=run_bench_crf)

    kernel = bench_cmds.add_parser(
        "kernel", help="the fused Triton CRF kernel against the PyTorch formulations and a conv2d baseline",
        description="Forward, forward + backward and max-product times of the tree CRF at B x 17 joints x "
        "64x48 for each window radius and the full-map window: the Triton kernel, the PyTorch shift and "
        "unfold formulations, and the probability-space conv2d speed baseline, in one run, with each one's "
        "error against a float64 reference and the kernel's exp rate against the exp unit's peak, with "
        "pairwise tables shared by the batch and per instance (as CRF displacement types make them). "
        "Meant for a GPU; on a CPU the Triton kernel is skipped unless TRITON_INTERPRET=1.",
    )
    _add_crf_bench_arguments(kernel, batch=64, repeats=5, example="crf-kernel-<gpu>.json")
    kernel.add_argument("--no-full-window", action="store_true", help="leave out the full-map window")
    kernel.add_argument("--impl", nargs="+", default=["triton", "shift", "unfold", "conv"],
                        choices=["triton", "shift", "unfold", "conv"], help="what to time (default all)")
    kernel.add_argument("--tables", nargs="+", default=["shared", "per-sample"], choices=["shared", "per-sample"],
                        help="pairwise tables shared by the batch, per instance, or both (default)")
    kernel.set_defaults(func=run_bench_kernel)

    ablation = bench_cmds.add_parser(
        "ablation", help="the CRF recipes' choices, one at a time, with paired 95%% intervals",
        description="Trains the crf and joint recipes of one network from the same backbone model file, each "
        "with one choice changed (pairwise start, window, unary scale, cross-entropy target, occluders, "
        "displacement types, learned gains; the joint mode's start, backbone learning rate and heatmap loss), "
        "and scores every run on the same validation instances: PCK@0.1 with 95% bootstrap intervals "
        "and paired differences from the recipe's shipped config and from the backbone. Prints a markdown table "
        "(stderr) and JSON.",
    )
    add_config_arguments(ablation, config_help="directory of recipe configs (a path or a packaged name; default quick)")
    add_address_argument(ablation)
    ablation.add_argument("--network", choices=["cnn", "hrnet"], default="cnn", help="which <network>_crf.yaml and "
                          "<network>_joint.yaml to vary (default cnn)")
    ablation.add_argument("--out", help="also write the JSON here, e.g. "
                          "benchmarks/results/crf-ablation-<network>-<machine>.json")
    ablation.set_defaults(func=run_bench_ablation)

    scale = bench_cmds.add_parser(
        "scale", help="how the data stages' costs grow with the number of images (JSON, plot)",
        description="At each N (default 1000, 8000, 64000 synthetic training images, COCO-sized photos with 1-4 "
        "people): `distpose data shard` with 1 and 2 workers, `distpose data verify`, one pass of the "
        "training loader with 1 and 2 loader workers, and the evaluation's scoring of a validation set in COCO's "
        "proportion (5k images at N=64k) with ground-truth and with 20 detector boxes an image, each run as its "
        "own process: seconds per item (image or "
        "instance), peak RSS of the process tree, bytes written, and whether per-item time and peak RSS stay "
        "flat from the smallest N to the largest. Once: HRNet-W32's DeepSpeed checkpoint saved and loaded at ZeRO "
        "0, 2 and 3 on 2 gloo ranks. Needs about 140 kB of disk per image of the largest N.",
    )
    scale.add_argument("--work", default="bench-scale", help="scratch directory for the sets and shards, emptied "
                       "point by point (default bench-scale)")
    scale.add_argument("--sizes", type=positive, nargs="+", help="training images per point (default 1000 8000 64000)")
    scale.add_argument("--quick", action="store_true",
                       help="the same stages at N = 40 and 160, the checkpoint of cnn_small (the test runs this)")
    scale.add_argument("--input", type=positive, nargs=2, default=[256, 192], metavar=("H", "W"),
                       help="the stream's crop size (default 256 192)")
    scale.add_argument("--out", help="also write the JSON here, e.g. benchmarks/results/scale-<machine>.json")
    scale.add_argument("--plot", help="also draw per-item cost and peak RSS against N into this PNG")
    scale.set_defaults(func=run_bench_scale)
