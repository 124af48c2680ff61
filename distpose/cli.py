"""The `distpose` command.

    distpose data synth|shard|verify   build and check the WebDataset shards
    distpose train CONFIG [k=v ...]    train with Ray Train + DeepSpeed (local Ray, or --address)
    distpose eval --checkpoint CKPT    PCK, COCO AP/AR and skeleton drawings of a trained model
    distpose predict --checkpoint CKPT IMAGE... --out DIR   keypoints for image files
    distpose pipeline [CONFIG_DIR]     data, all five modes, evaluation and a report (`make demo`)
    distpose tune SWEEP [k=v ...]      Ray Tune sweep over the modes: leaderboard and best checkpoints
    distpose config                    print a resolved config (YAML + key=value overrides)
    distpose model-info NAME           parameters and GMACs of a pose network
    distpose bench loader|train|crf|kernel|ablation   loader and training throughput; the CRF formulations;
                                             the kernel; the CRF modes' choices, one at a time

User mistakes (bad arguments, config keys, missing or corrupt files) print one line and exit non-zero.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import typing
from collections.abc import Sequence
from pathlib import Path

from distpose import __version__
from distpose.config import Backbone
from distpose.errors import UserError

log = logging.getLogger("distpose")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _output_path(out: str | None) -> Path | None:
    """Check an --out path before a long run, not after it."""
    if not out:
        return None
    path = Path(out)
    if path.is_dir():
        raise UserError(f"--out {path} is a directory; give a file name")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _write_json(doc: dict, path: Path | None) -> None:
    text = json.dumps(doc, indent=2)
    print(text)
    if path:
        from distpose.files import atomic_write_bytes

        atomic_write_bytes(path, (text + "\n").encode())
        log.info("wrote %s", path)


# ---------------------------------------------------------------------------------------------
# data


def cmd_data_synth(args: argparse.Namespace) -> int:
    from distpose.data.synth import generate_synthetic_coco

    summary = generate_synthetic_coco(
        Path(args.out), num_train=args.train, num_val=args.val, seed=args.seed,
        workers=args.workers, progress=not args.quiet, overwrite=args.overwrite,
    )
    print(json.dumps(summary, indent=2))
    return 0


def cmd_data_shard(args: argparse.Namespace) -> int:
    from distpose.data.shards import write_shards

    manifest = write_shards(
        args.coco_root, args.split, args.out, samples_per_shard=args.samples_per_shard,
        workers=args.workers, role=args.role, overwrite=args.overwrite, progress=not args.quiet,
    )
    skipped = ", ".join(f"{n} {why}" for why, n in manifest["skipped"].items()) or "none"
    repairs = ", ".join(f"{n} x {why}" for why, n in manifest["repairs"].items()) or "none"
    print(f"{args.split}: {manifest['samples']} images, {manifest['instances']} person instances in "
          f"{len(manifest['shards'])} shards under {args.out} ({manifest['role']} split)")
    print(f"skipped: {skipped}; repairs: {repairs}")
    return 0


def cmd_data_verify(args: argparse.Namespace) -> int:
    from distpose.data.shards import verify_shards

    report = verify_shards(args.dir, workers=args.workers, progress=not args.quiet)
    for split, counts in report["splits"].items():
        print(f"{split}: {counts['shards']} shards, {counts['samples']} samples, {counts['instances']} instances "
              f"(manifest: {counts['manifest_samples']} samples, {counts['manifest_instances']} instances), "
              f"{counts['bad_shards']} bad shards")
    for problem in report["problems"]:
        print(f"BAD {problem}")
    if report["problems"]:
        print(f"verify failed: {len(report['problems'])} problems", file=sys.stderr)
        return 1
    print("verify ok")
    return 0


# ---------------------------------------------------------------------------------------------
# train


def cmd_train(args: argparse.Namespace) -> int:
    from distpose.config import load_config
    from distpose.train.driver import train

    cfg = load_config(args.config, args.overrides)
    train(cfg, address=args.address, resume=args.resume)
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from distpose.train.tune import load_sweep, run_sweep

    run_sweep(load_sweep(args.sweep, args.overrides), address=args.address, resume=args.resume)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from distpose.eval.run import evaluate_checkpoint, summary_line

    out = Path(args.out) if args.out else Path(args.checkpoint).resolve().parent / f"eval-{Path(args.checkpoint).stem}"
    metrics = evaluate_checkpoint(args.checkpoint, args.data, args.split, args.boxes, out, args.workers, args.address)
    print(f"{metrics['instances']} instances: {summary_line(metrics)}")
    print(f"wrote {out}/metrics.json, results.json, skeletons.jpg")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from distpose.eval.predict import predict_images

    out = Path(args.out)
    counts = predict_images(args.checkpoint, args.images, out, args.boxes, args.min_box_score)
    skipped = f", {len(counts['skipped'])} unreadable image(s) skipped" if counts["skipped"] else ""
    print(f"{counts['people']} people in {counts['images']} image(s){skipped}: drawings and results.json in {out}")
    return 1 if counts["skipped"] and not counts["images"] else 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    from distpose.pipeline import run_pipeline

    run_pipeline(args.config or "configs/quick", tuple(args.overrides), data_root=args.data,
                 report_dir=args.report, train_images=args.train_images, val_images=args.val_images,
                 address=args.address)
    return 0


# ---------------------------------------------------------------------------------------------
# config and bench


def cmd_config(args: argparse.Namespace) -> int:
    from distpose.config import dump_yaml, load_config

    print(dump_yaml(load_config(args.config, args.overrides)), end="")
    return 0


def _size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW, e.g. 256x192, got {text!r}") from None
    if height < 32 or width < 32 or height % 32 or width % 32:
        # HRNet's lowest branch is at stride 32; its fusions need whole pixels there.
        raise argparse.ArgumentTypeError(f"expected HxW in multiples of 32, e.g. 256x192, got {text!r}")
    return height, width


def cmd_model_info(args: argparse.Namespace) -> int:
    from distpose.models.factory import ModelInfo, model_info

    info = model_info(args.name, args.input)
    print(f"{info.name}: {info.params / 1e6:.2f}M parameters ({info.params:,}), "
          f"{info.macs / 1e9:.2f} GMACs at {info.input_size[0]}x{info.input_size[1]}, "
          f"heatmaps {info.output_shape[1]}x{info.output_shape[2]}x{info.output_shape[3]}")
    print(f"counter: {ModelInfo.COUNTER}")
    return 0


def cmd_bench_crf(args: argparse.Namespace) -> int:
    from distpose.bench.crf import run

    out = _output_path(args.out)
    _write_json(run(batch=args.batch, radii=tuple(args.radius), repeats=args.repeats), out)
    return 0


def cmd_bench_kernel(args: argparse.Namespace) -> int:
    from distpose.bench.kernel import run

    out = _output_path(args.out)
    _write_json(run(batch=args.batch, radii=tuple(args.radius), full_window=not args.no_full_window,
                    repeats=args.repeats, impls=tuple(args.impl)), out)
    return 0


def cmd_bench_loader(args: argparse.Namespace) -> int:
    from distpose.bench.loader import run
    from distpose.config import load_config

    cfg = load_config(args.config, args.overrides)
    out = _output_path(args.out)
    _write_json(run(cfg.data, images=args.images, batches=args.batches, warmup=args.warmup), out)
    return 0


def cmd_bench_train(args: argparse.Namespace) -> int:
    from distpose.bench.train import run
    from distpose.config import load_config
    from distpose.train.driver import preflight

    cfg = load_config(args.config, args.overrides)
    preflight(cfg)
    out = _output_path(args.out)
    _write_json(run(cfg, warmup=args.warmup, steps=args.steps, address=args.address), out)
    return 0


def cmd_bench_ablation(args: argparse.Namespace) -> int:
    from distpose.bench.ablation import run

    out = _output_path(args.out)
    result = run(args.config or "configs/quick", args.network, tuple(args.overrides), args.address)
    print(result["table"], file=sys.stderr)
    _write_json(result, out)
    return 0


# ---------------------------------------------------------------------------------------------


def _add_crf_bench_arguments(parser: argparse.ArgumentParser, batch: int, repeats: int, example: str) -> None:
    parser.add_argument("--batch", type=_positive, default=batch, help=f"batch size (default {batch})")
    parser.add_argument("--radius", type=_positive, nargs="+", default=[7, 15], help="window radii (default 7 15)")
    parser.add_argument("--repeats", type=_positive, default=repeats, help=f"timed runs, best kept (default {repeats})")
    parser.add_argument("--out", help=f"also write the JSON here (e.g. benchmarks/results/{example})")


def _add_config_arguments(parser: argparse.ArgumentParser,
                          config_help: str = "YAML config file (default: built-in defaults)") -> None:
    parser.add_argument("config", nargs="?", help=config_help)
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")


def _add_address_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distpose",
        description="Distributed training of top-down 2D human-pose models on COCO keypoints "
        "(Ray Train + DeepSpeed + WebDataset).",
    )
    parser.add_argument("--version", action="version", version=f"distpose {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars or info logs")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    data = commands.add_parser("data", help="make, shard and verify datasets",
                               description="Make, shard and verify datasets.")
    data_cmds = data.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    synth = data_cmds.add_parser(
        "synth", help="generate a synthetic COCO-format keypoint dataset",
        description="Generate a synthetic person-keypoint dataset in the official COCO layout "
        "(OUT/annotations/person_keypoints_<split>.json, OUT/<split>/*.jpg): articulated figures, "
        "1-4 per image, with occluders; left limbs warm-coloured, right limbs cool. Same seed, same bytes.",
    )
    synth.add_argument("--out", required=True, help="output COCO root directory")
    synth.add_argument("--train", type=_positive, default=1000, help="training images (default 1000)")
    synth.add_argument("--val", type=_positive, default=100, help="validation images (default 100)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    synth.add_argument("--workers", type=_positive, default=1, help="processes (default 1)")
    synth.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --out")
    synth.set_defaults(func=cmd_data_synth)

    shard = data_cmds.add_parser(
        "shard", help="write a COCO split as WebDataset tar shards",
        description="Write one COCO split as equal-sized WebDataset shards, one sample per image "
        "(the JPEG unchanged + a JSON of its person annotations), and OUT/<split>.manifest.json with "
        "sample/instance counts, bytes and sha256 per shard. Training splits skip images without "
        "usable keypoint annotations (counted). Files are written under temporary names and renamed.",
    )
    shard.add_argument("--coco-root", required=True, help="COCO root (annotations/ and <split>/ inside)")
    shard.add_argument("--split", required=True, help="split name, e.g. train2017, val2017, train, val")
    shard.add_argument("--out", required=True, help="output directory for shards and manifest")
    shard.add_argument("--samples-per-shard", type=_positive, default=1000, help="images per shard (default 1000)")
    shard.add_argument("--workers", type=_positive, default=1, help="processes writing shards (default 1)")
    shard.add_argument("--role", choices=("auto", "train", "eval"), default="auto",
                       help="train skips images without usable keypoints; auto: train if the split "
                       "name starts with 'train' (default auto)")
    shard.add_argument("--overwrite", action="store_true", help="replace this split's existing shards")
    shard.set_defaults(func=cmd_data_shard)

    verify = data_cmds.add_parser(
        "verify", help="check every shard and sample in a shard directory",
        description="Read every sample of every shard: manifest sizes and sha256, tar structure, "
        "annotation schema, JPEG crc32 and full decode at the annotated size. Exits 1 naming each bad "
        "shard and sample.",
    )
    verify.add_argument("dir", help="directory written by `distpose data shard`")
    verify.add_argument("--workers", type=_positive, default=1, help="processes (default 1)")
    verify.set_defaults(func=cmd_data_verify)

    train = commands.add_parser(
        "train", help="train a pose model with Ray Train + DeepSpeed",
        description="Train on a Ray cluster: a local one by default, an existing one with --address or "
        "RAY_ADDRESS. Writes train.storage/train.run_name/: checkpoints (the latest train.keep_checkpoints), "
        "metrics.jsonl (every step and evaluation), best.pt and final.pt (inference checkpoints: fp32 "
        "weights + config). Rerunning a run name resumes it from its latest checkpoint; a finished run "
        "is not retrained.",
    )
    _add_config_arguments(train)
    _add_address_argument(train)
    train.add_argument("--resume", metavar="CHECKPOINT_DIR",
                       help="start from this training checkpoint (a checkpoint_* directory of any run)")
    train.set_defaults(func=cmd_train)

    tune = commands.add_parser(
        "tune", help="Ray Tune sweep over the training modes (ASHA), leaderboard and best checkpoints",
        description="Run the sweep file's trials: per mode a Tune experiment with ASHA on the validation "
        "metric; backbone modes first, then crf/joint trials from the best backbone of their network. Writes "
        "storage/name/: leaderboard.md and .csv (best trial per mode), trials.csv, best/<mode>.pt.",
    )
    tune.add_argument("sweep", help="sweep YAML (see configs/tune/)")
    tune.add_argument("overrides", nargs="*", metavar="key=value", help="override top-level sweep keys")
    _add_address_argument(tune)
    tune.add_argument("--resume", action="store_true",
                      help="finish an interrupted sweep of this name: finished modes and trials are not rerun")
    tune.set_defaults(func=cmd_tune)

    evaluate = commands.add_parser(
        "eval", help="score an inference checkpoint: PCK, HRNet accuracy, COCO AP/AR, drawings",
        description="Score an inference checkpoint (best.pt/final.pt of a run) on a split: PCK@thresholds for "
        "visible and occluded joints, HRNet's heatmap accuracy, COCO AP/AR via pycocotools. Writes "
        "metrics.json, results.json (COCO results) and skeletons.jpg (+ images/) to --out.",
    )
    evaluate.add_argument("--checkpoint", required=True, help="inference checkpoint (.pt)")
    evaluate.add_argument("--data", help="shard directory or COCO root (default: the checkpoint's data.shards)")
    evaluate.add_argument("--split", help="split name (default: the checkpoint's val split, or the only one)")
    evaluate.add_argument("--boxes", default="gt",
                          help="'gt' for ground-truth boxes (default) or a COCO-results JSON of person detections")
    evaluate.add_argument("--out", help="output directory (default: eval-<checkpoint name> beside the checkpoint)")
    evaluate.add_argument("--workers", type=_positive, default=1, help="Ray Train ranks (default 1: in process)")
    evaluate.add_argument("--address", help="Ray cluster address for --workers > 1 (default: local Ray)")
    evaluate.set_defaults(func=cmd_eval)

    predict = commands.add_parser(
        "predict", help="keypoints for image files: drawings and COCO-results JSON",
        description="Run an inference checkpoint on image files: person boxes from --boxes (COCO-results "
        "detections; image ids are the files' numeric names) or the whole image as one person. Writes one "
        "drawing per image and results.json (COCO keypoint results) to --out.",
    )
    predict.add_argument("images", nargs="+", help="image files")
    predict.add_argument("--checkpoint", required=True, help="inference checkpoint (.pt)")
    predict.add_argument("--boxes", help="COCO-results JSON of person detections (default: whole image)")
    predict.add_argument("--min-box-score", type=float, default=0.0, help="drop detections below this score")
    predict.add_argument("--out", required=True, help="output directory")
    predict.set_defaults(func=cmd_predict)

    pipeline = commands.add_parser(
        "pipeline", help="synthetic data, the five modes trained and evaluated, one report",
        description="Generate synthetic COCO data and its shards (if missing), train cnn and hrnet backbones, "
        "then cnn_crf, cnn_joint, hrnet_crf and hrnet_joint from them, evaluate each, and write a report "
        "(report.md, comparison table with the mean-pose floor, loss and PCK plots, skeleton grids). "
        "CONFIG is a directory holding cnn.yaml, hrnet.yaml, cnn_crf.yaml, cnn_joint.yaml, hrnet_crf.yaml "
        "and hrnet_joint.yaml (default configs/quick); overrides apply to every run. One Ray cluster "
        "serves all runs; rerunning resumes unfinished runs and skips finished ones.",
    )
    pipeline.add_argument("config", nargs="?", help="config directory (default configs/quick)")
    pipeline.add_argument("overrides", nargs="*", metavar="key.sub=value", help="overrides for every run")
    pipeline.add_argument("--data", default="data/synth", help="synthetic COCO root (default data/synth)")
    pipeline.add_argument("--train-images", type=_positive, default=1000, help="if generated (default 1000)")
    pipeline.add_argument("--val-images", type=_positive, default=250, help="if generated (default 250)")
    pipeline.add_argument("--report", default="reports/pipeline", help="report directory (default reports/pipeline)")
    _add_address_argument(pipeline)
    pipeline.set_defaults(func=cmd_pipeline)

    config = commands.add_parser(
        "config", help="print a resolved config",
        description="Print the config that a command would run with: defaults, then CONFIG, then "
        "key.sub=value overrides, checked against the schema.",
    )
    _add_config_arguments(config)
    config.set_defaults(func=cmd_config)

    info = commands.add_parser(
        "model-info", help="parameters and multiply-accumulates of a pose network",
        description="Build a pose network (no weights are loaded) and print its parameter count and the "
        "multiply-accumulates of one forward pass at the given input size.",
    )
    info.add_argument("name", choices=typing.get_args(Backbone), help="backbone name")
    info.add_argument("--input", type=_size, default=(256, 192), help="input HxW (default 256x192)")
    info.set_defaults(func=cmd_model_info)

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
    _add_config_arguments(loader)
    loader.add_argument("--images", type=_positive, default=300, help="images in the raw loop (default 300)")
    loader.add_argument("--batches", type=_positive, default=60,
                        help="timed batches per pipeline run (default 60)")
    loader.add_argument("--warmup", type=_positive, default=16,
                        help="untimed batches first, more than the DataLoader prefetches (default 16)")
    loader.add_argument("--out", help="also write the JSON here (e.g. benchmarks/results/loader-cpu.json)")
    loader.set_defaults(func=cmd_bench_loader)

    train_bench = bench_cmds.add_parser(
        "train", help="training samples/s: Ray + DeepSpeed + WebDataset against a plain PyTorch loop",
        description="Samples/s of `distpose train` (Ray Train workers, DeepSpeed, the shard stream) at steady "
        "state, and of a plain single-process PyTorch loop (Adam, same model, loader, loss and precision) in "
        "the same run; their ratio, the overhead per worker, the data-wait share, and MFU on a GPU in bf16. "
        "Backbone, input size, batch, precision, ZeRO stage and workers are config keys, e.g. "
        "model.backbone=hrnet_w32 data.input_size=[256,192] data.heatmap_size=[64,48] train.precision=bf16.",
    )
    _add_config_arguments(train_bench)
    _add_address_argument(train_bench)
    train_bench.add_argument("--steps", type=_positive, default=60, help="timed steps of each (default 60)")
    train_bench.add_argument("--warmup", type=_positive, default=10,
                             help="untimed steps first (default 10)")
    train_bench.add_argument("--out", help="also write the JSON here (e.g. benchmarks/results/train-cpu2.json)")
    train_bench.set_defaults(func=cmd_bench_train)

    crf = bench_cmds.add_parser(
        "crf", help="the reference tree CRF on the CPU: shift-and-accumulate against unfold + logsumexp",
        description="Forward (marginals) and forward + backward of the exact tree CRF at B x 17 joints x "
        "64x48 on the COCO tree, for each window radius, with both message formulations in the same run "
        "(best of --repeats), their speed ratio and their largest disagreement.",
    )
    _add_crf_bench_arguments(crf, batch=8, repeats=2, example="crf-reference-cpu2.json")
    crf.set_defaults(func=cmd_bench_crf)

    kernel = bench_cmds.add_parser(
        "kernel", help="the fused Triton CRF kernel against the PyTorch formulations and a conv2d baseline",
        description="Forward, forward + backward and max-product times of the tree CRF at B x 17 joints x "
        "64x48 for each window radius and the full-map window: the Triton kernel, the PyTorch shift and "
        "unfold formulations, and the probability-space conv2d speed baseline, in one run, with each one's "
        "error against a float64 reference and the kernel's exp rate against the exp unit's peak. "
        "Meant for a GPU; on a CPU the Triton kernel is skipped unless TRITON_INTERPRET=1.",
    )
    _add_crf_bench_arguments(kernel, batch=64, repeats=5, example="crf-kernel-h100.json")
    kernel.add_argument("--no-full-window", action="store_true", help="leave out the full-map window")
    kernel.add_argument("--impl", nargs="+", default=["triton", "shift", "unfold", "conv"],
                        choices=["triton", "shift", "unfold", "conv"], help="what to time (default all)")
    kernel.set_defaults(func=cmd_bench_kernel)

    ablation = bench_cmds.add_parser(
        "ablation", help="the CRF modes' choices, one at a time, with paired 95% intervals",
        description="Trains the crf and joint configs of one network from the same backbone checkpoint, each "
        "with one choice changed (pairwise start, window, unary scale, the joint mode's backbone learning "
        "rate), and scores every run on the same validation instances: PCK@0.1 with 95% bootstrap intervals "
        "and paired differences from the mode's shipped config and from the backbone. Prints a markdown table "
        "(stderr) and JSON.",
    )
    _add_config_arguments(ablation, config_help="directory of mode configs (default configs/quick)")
    _add_address_argument(ablation)
    ablation.add_argument("--network", choices=["cnn", "hrnet"], default="cnn", help="which <network>_crf.yaml and "
                          "<network>_joint.yaml to vary (default cnn)")
    ablation.add_argument("--out", help="also write the JSON here (e.g. benchmarks/results/crf-ablation-cpu2.json)")
    ablation.set_defaults(func=cmd_bench_ablation)
    return parser


def _split_overrides(args: argparse.Namespace) -> None:
    """argparse cannot tell an optional config path from the first override: `a=b` is an override."""
    config = getattr(args, "config", None)
    if config is not None and "=" in config and not Path(config).exists():
        args.overrides = [config, *args.overrides]
        args.config = None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO,
                        format="distpose: %(levelname)s: %(message)s", stream=sys.stderr)
    # Tune's TensorBoard logger renames every `pck@0.1`-style metric, one INFO line per name per trial.
    logging.getLogger("tensorboardX").setLevel(logging.WARNING)
    _split_overrides(args)
    try:
        return int(args.func(args))
    except UserError as exc:
        print(f"distpose: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # a path that is a file, unreadable, unwritable, or a full disk
        print(f"distpose: error: {exc.filename or ''}{': ' if exc.filename else ''}{exc.strerror or exc}",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("distpose: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
