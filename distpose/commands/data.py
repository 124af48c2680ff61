"""`distpose data synth|shard|verify`: build and check the WebDataset shards."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from distpose.commands.arguments import log, plural, positive

SHOWN_CORRUPT = 10  # corrupt source images named on the console; the manifest names all


def _progress() -> bool:
    """Progress bars follow the console's level (-q turns them off), as every other progress line does."""
    return log.isEnabledFor(logging.INFO)


def run_data_synth(args: argparse.Namespace) -> int:
    from distpose.data.synth import generate_synthetic_coco

    summary = generate_synthetic_coco(
        Path(args.out), num_train=args.train, num_val=args.val, seed=args.seed,
        workers=args.workers, progress=_progress(), overwrite=args.overwrite,
    )
    print(json.dumps(summary, indent=2))
    return 0


def run_data_shard(args: argparse.Namespace) -> int:
    from distpose.data.shards import write_shards

    manifest = write_shards(
        args.coco_root, args.split, args.out, samples_per_shard=args.samples_per_shard,
        workers=args.workers, role=args.role, overwrite=args.overwrite, progress=_progress(),
    )
    skipped = ", ".join(f"{n} {why}" for why, n in manifest["skipped"].items()) or "none"
    repairs = ", ".join(f"{n} x {why}" for why, n in manifest["repairs"].items()) or "none"
    print(f"{args.split}: {plural(manifest['samples'], 'image')}, {plural(manifest['instances'], 'person instance')} "
          f"in {plural(len(manifest['shards']), 'shard')} under {args.out} ({manifest['role']} split)")
    print(f"skipped: {skipped}; repairs: {repairs}")
    corrupt = manifest["corrupt_images"]
    for name, problem in list(corrupt.items())[:SHOWN_CORRUPT]:
        print(f"corrupt source image {name}: {problem}")
    if len(corrupt) > SHOWN_CORRUPT:
        print(f"... and {len(corrupt) - SHOWN_CORRUPT} more: the manifest's corrupt_images names them all")
    return 0


def run_data_verify(args: argparse.Namespace) -> int:
    from distpose.data.shards import verify_shards

    report = verify_shards(args.dir, workers=args.workers, progress=_progress(), splits=args.split)
    for split, counts in report["splits"].items():
        print(f"{split}: {plural(counts['shards'], 'shard')}, {plural(counts['samples'], 'sample')}, "
              f"{plural(counts['instances'], 'instance')} (manifest: {plural(counts['manifest_samples'], 'sample')}, "
              f"{plural(counts['manifest_instances'], 'instance')}), {plural(counts['bad_shards'], 'bad shard')}")
    for problem in report["problems"]:
        print(f"BAD {problem}")
    if report["problems"]:
        print(f"verify failed: {plural(len(report['problems']), 'problem')}", file=sys.stderr)
        return 1
    print("verify ok")
    return 0


def register(commands: argparse._SubParsersAction) -> None:
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
    synth.add_argument("--train", type=positive, default=1000, help="training images (default 1000)")
    synth.add_argument("--val", type=positive, default=100, help="validation images (default 100)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    synth.add_argument("--workers", type=positive, default=1, help="processes (default 1)")
    synth.add_argument("--overwrite", action="store_true", help="replace an existing dataset at --out")
    synth.set_defaults(func=run_data_synth)

    shard = data_cmds.add_parser(
        "shard", help="write a COCO split as WebDataset tar shards",
        description="Write one COCO split as equal-sized WebDataset shards, one sample per image "
        "(the JPEG unchanged + a JSON of its person annotations), and OUT/<split>.manifest.json with "
        "sample/instance counts, bytes and sha256 per shard. Training splits skip images without "
        "usable keypoint annotations (counted). Files are written under temporary names and renamed.",
    )
    shard.add_argument("--coco-root", required=True, help="COCO root (annotations/ and <split>/ inside)")
    shard.add_argument("--split", required=True, help="split name, e.g. train2017, val2017, train, val")
    shard.add_argument("--out", required=True, help="output directory for shards and manifest: a local path or "
                       "s3://bucket/prefix (AWS credentials and AWS_ENDPOINT_URL from the environment)")
    shard.add_argument("--samples-per-shard", type=positive, default=1000, help="images per shard (default 1000)")
    shard.add_argument("--workers", type=positive, default=1, help="processes writing shards (default 1)")
    shard.add_argument("--role", choices=("auto", "train", "eval"), default="auto",
                       help="train skips images without usable keypoints; auto: train if the split "
                       "name starts with 'train' (default auto)")
    shard.add_argument("--overwrite", action="store_true", help="replace this split's existing shards")
    shard.set_defaults(func=run_data_shard)

    verify = data_cmds.add_parser(
        "verify", help="check every shard and sample in a shard directory",
        description="Read every sample of every shard: manifest sizes and sha256, tar structure, "
        "annotation schema, JPEG crc32 and full decode at the annotated size. Exits 1 naming each bad "
        "shard and sample.",
    )
    verify.add_argument("dir", help="directory written by `distpose data shard`: a local path, s3://bucket/prefix "
                        "or an http(s):// URL")
    verify.add_argument("--split", action="append", help="check this split only (repeatable; default every "
                        "split with a manifest; required for http(s), which cannot be listed)")
    verify.add_argument("--workers", type=positive, default=1, help="processes (default 1)")
    verify.set_defaults(func=run_data_verify)
