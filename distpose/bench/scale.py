"""How the data path's costs grow with the number of images: each stage run as the command a user runs, at
several N, with its seconds per item, the peak RSS of its process tree and the bytes it wrote.

Stages, at each N (a synthetic set of N training images, COCO-sized photos with 1-4 people each):
    shard, 1 / 2 workers   `distpose data shard` of the training split (per image)
    evaluate               `distpose eval`'s scoring (PCK, rescoring, OKS-NMS, COCOeval) of predictions on a
                           validation set of N x 5000/64000 images (COCO's proportion), with ground-truth boxes
                           and with 20 detector boxes an image (per prediction)
    verify                 `distpose data verify` of those shards, 2 workers (per image)
    stream, 1 / 2 workers  one pass of the training loader over as many instances as the split holds, at the
                           benchmark's input size with the training transform (per instance)

Once, whatever N: a DeepSpeed checkpoint of HRNet-W32 (cnn_small with --quick) saved and loaded at ZeRO 0, 2
and 3 on 2 gloo ranks (seconds, bytes, files, peak RSS).

Flat means: per-item time within 20% from the smallest N to the largest, and peak RSS within 20% plus a
constant. The generation of each set is timed too, as setup.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from distpose.bench import machine
from distpose.data.shards import manifest_path
from distpose.errors import UserError
from distpose.files import file_sizes

POLL_S = 0.05
STOP_GRACE_S = 30  # for an interrupted stage to clean up: a shard pool finishes the shards it is writing
STAGE_TIMEOUT_S = 4 * 3600  # a bound on every wait, far above the longest stage (benchmarks/results/scale-cpu2.json)
FLAT_TIME = 0.2  # per-item time within 20% from the smallest N to the largest
FLAT_RSS = 0.2  # peak RSS within 20% ...
FLAT_RSS_CONSTANT = 64 << 20  # ... plus 64 MiB
SAMPLES_PER_SHARD = 1000
QUICK_SIZES = (40, 160)
SIZES = (1000, 8000, 64000)
# An evaluation stage scores a validation set in COCO's proportion to the training set (5,000 images to 64,115),
# and with detector boxes 20 an image: COCO's val2017 with a detector file of 100k boxes at the largest N.
VAL_PER_TRAIN_IMAGE = 5000 / 64000
VAL_MIN = 10
BOXES_PER_IMAGE = 20
ZERO_STAGES = (0, 2, 3)
DISK_PER_IMAGE = 140_000  # bytes: a COCO-sized JPEG in the set and again in its shards


def _tree_rss(process: psutil.Process) -> int:
    """RSS of a process and all its descendants now (pages shared between them count once per process)."""
    total = 0
    for p in (process, *process.children(recursive=True)):
        try:
            total += p.memory_info().rss
        except psutil.Error:  # exited between the listing and the read
            pass
    return total


def measure(argv: list[str], timeout_s: float = STAGE_TIMEOUT_S) -> dict[str, Any]:
    """Run a command to its end: its wall seconds and the peak RSS of its process tree, sampled every POLL_S."""
    start = time.perf_counter()
    # In its own process group, so that a Ctrl-C reaches the stage once, from _stop, whoever got it.
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, process_group=0)
    process = psutil.Process(child.pid)
    peak = 0
    stdout: list[str] = []
    stderr: list[str] = []
    readers = [threading.Thread(target=lambda: stdout.extend(child.stdout), daemon=True),
               threading.Thread(target=lambda: stderr.extend(child.stderr), daemon=True)]
    for reader in readers:
        reader.start()
    try:
        while child.poll() is None:
            peak = max(peak, _tree_rss(process))
            if time.perf_counter() - start > timeout_s:
                raise UserError(f"bench scale: {' '.join(argv[2:])} still running after {timeout_s:.0f} s: stopped")
            time.sleep(POLL_S)
    finally:
        _stop(child)
    seconds = time.perf_counter() - start
    for reader in readers:
        reader.join(timeout=10)
    if child.returncode != 0:
        tail = "".join(stderr).strip().splitlines()[-1:] or ["no output"]
        raise UserError(f"bench scale: {' '.join(argv[2:])} exited {child.returncode}: {tail[0]}")
    return {"seconds": round(seconds, 3), "peak_rss_bytes": peak, "stdout": "".join(stdout)}


def _stop(child: subprocess.Popen) -> None:
    """Interrupt a stage that is still running, as Ctrl-C would, so that it removes what it was writing; kill
    its process group if it has not exited after STOP_GRACE_S, and whatever of the group outlived it."""
    if child.poll() is None:
        child.send_signal(signal.SIGINT)
        try:
            child.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            print(f"bench scale: {' '.join(child.args[2:])} still running {STOP_GRACE_S:.0f} s after Ctrl-C: killed",
                  file=sys.stderr)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGKILL)
    child.wait()


def _distpose(*args: str) -> list[str]:
    return [sys.executable, "-m", "distpose", "-q", *args]


def stream_pass(shards: str, input_size: tuple[int, int], workers: int, batch_size: int = 32) -> None:
    """The training loader over as many instances as the training split holds. Prints JSON: the instances read,
    the seconds to the first batch (the loader's start, whatever N) and from it to the last."""
    from distpose.config import DataConfig
    from distpose.data.loader import train_loader
    from distpose.data.shards import read_manifest

    instances = read_manifest(shards, "train")["instances"]
    cfg = DataConfig(shards=shards, input_size=input_size, heatmap_size=(input_size[0] // 4, input_size[1] // 4),
                     batch_size=batch_size, loader_workers=workers,
                     batches_per_epoch=math.ceil(instances / batch_size))
    start = time.perf_counter()
    first_batch_s, first, read = 0.0, 0, 0
    for batch in train_loader(cfg):
        if not read:
            first_batch_s, first = time.perf_counter() - start, len(batch["instance_id"])
        read += len(batch["instance_id"])
    print(json.dumps({"instances": read, "first_batch_seconds": first_batch_s, "first_batch_instances": first,
                      "steady_seconds": time.perf_counter() - start - first_batch_s}))


def ground_truth_subset(annotation_file: Path, images: int, out: Path) -> int:
    """The first `images` images of a COCO keypoint file and their annotations, written to `out`: the validation
    set of an evaluation stage. Returns its person instances."""
    doc = json.loads(annotation_file.read_text())
    doc["images"] = doc["images"][:images]
    kept = {image["id"] for image in doc["images"]}
    doc["annotations"] = [a for a in doc["annotations"] if a["image_id"] in kept]
    out.write_text(json.dumps(doc))
    return len(doc["annotations"])


def _noisy_predictions(ground_truth: dict[str, Any], boxes_per_image: int | None, rng) -> Any:
    """Predictions as a model would leave them: each labelled person's joints moved by 5% of its box's longer side
    (ground-truth boxes), or `boxes_per_image` detections an image, each a jittered box of one of its people
    with joints moved so."""
    import numpy as np

    from distpose.eval.inference import Predictions
    from distpose.keypoints import NUM_JOINTS

    people: dict[int, list[dict[str, Any]]] = {}
    for a in ground_truth["annotations"]:
        people.setdefault(a["image_id"], []).append(a)
    detected = boxes_per_image is not None
    rows = []
    for image_id, persons in people.items():
        if detected:
            persons = [persons[i] for i in rng.integers(len(persons), size=boxes_per_image)]
        for person in persons:
            box = np.asarray(person["bbox"], np.float64) * (rng.uniform(0.85, 1.15, size=4) if detected else 1.0)
            gt = np.asarray(person["keypoints"], np.float64).reshape(NUM_JOINTS, 3)
            keypoints = gt[:, :2] + rng.normal(0.0, 0.05 * box[2:].max(), size=(NUM_JOINTS, 2))
            rows.append((keypoints, rng.uniform(0.1, 1.0, NUM_JOINTS), rng.uniform(0.3, 1.0) if detected else 1.0,
                         image_id, len(rows) if detected else person["id"], box, box[2] * box[3],
                         np.zeros_like(gt) if detected else gt))
    return Predictions(*(np.asarray(column) for column in zip(*rows)))


def evaluation_pass(annotation_file: str, boxes_per_image: int | None) -> None:
    """`distpose eval`'s scoring of one set's predictions (PCK, HRNet's rescoring, OKS-NMS for detector boxes,
    COCOeval), on predictions made from the ground truth; inference is the model's cost, measured elsewhere.
    Prints JSON: the predictions scored and the seconds scoring took."""
    import numpy as np

    from distpose.eval.evaluate import score

    ground_truth = json.loads(Path(annotation_file).read_text())
    predictions = _noisy_predictions(ground_truth, boxes_per_image, np.random.default_rng(0))
    start = time.perf_counter()
    score(predictions, ground_truth, (0.05, 0.1, 0.2), gt_boxes=boxes_per_image is None)
    print(json.dumps({"predictions": len(predictions), "seconds": time.perf_counter() - start}))


def startup_seconds(module: str, repeats: int = 3) -> float:
    """What starting a stage's process costs before it does any work: the interpreter and the imports."""
    return min(measure([sys.executable, "-c", f"import {module}"])["seconds"] for _ in range(repeats))


def _stage(name: str, n_images: int, items: int, item: str, result: dict[str, Any], startup: float,
           written: int, per_item: float | None = None) -> dict:
    """One stage's record; per item: (seconds - startup) / items unless given."""
    result = {k: v for k, v in result.items() if k != "stdout"}
    if per_item is None:
        per_item = max(result["seconds"] - startup, 0.0) / items
    return {"stage": name, "images": n_images, "items": items, "item": item, **result, "startup_seconds": startup,
            "seconds_per_item": per_item, "bytes_written": written}


def point(work: Path, n_images: int, input_size: tuple[int, int]) -> list[dict[str, Any]]:
    """Every stage at one N, in `work`/<N>/, removed afterwards."""
    root = work / str(n_images)
    if root.exists():
        shutil.rmtree(root)
    synth, shards = root / "synth", root / "shards"
    stages = []
    commands = startup_seconds("distpose.commands.data, distpose.data.shards, distpose.data.synth")
    setup = measure(_distpose("data", "synth", "--out", str(synth), "--train", str(n_images), "--val", "1",
                              "--seed", "0", "--workers", "2"))
    stages.append(_stage("synth (setup), 2 workers", n_images, n_images, "image", setup, commands,
                         sum(file_sizes(synth).values())))
    for workers in (1, 2):
        out = root / f"shards_{workers}"
        result = measure(_distpose("data", "shard", "--coco-root", str(synth), "--split", "train", "--out", str(out),
                                   "--samples-per-shard", str(SAMPLES_PER_SHARD), "--workers", str(workers)))
        stages.append(_stage(f"shard, {workers} worker{'s' * (workers > 1)}", n_images, n_images, "image", result,
                             commands, sum(file_sizes(out).values())))
        stages[-1]["manifest_bytes"] = Path(manifest_path(out, "train")).stat().st_size
        if workers == 1:
            shutil.rmtree(out)  # the 2-worker shards are the same bytes (tests/test_shards.py)
        else:
            out.rename(shards)
    val_images = max(VAL_MIN, round(n_images * VAL_PER_TRAIN_IMAGE))
    val_file = root / "val.json"
    val_instances = ground_truth_subset(synth / "annotations" / "person_keypoints_train.json", val_images, val_file)
    shutil.rmtree(synth)
    for boxes, label in ((None, "ground-truth boxes"), (BOXES_PER_IMAGE, f"{BOXES_PER_IMAGE} detector boxes an image")):
        result = measure([sys.executable, "-c", f"from distpose.bench.scale import evaluation_pass; "
                                                f"evaluation_pass({str(val_file)!r}, {boxes})"])
        scored = json.loads(result["stdout"])
        stages.append(_stage(f"evaluate {label}", n_images, scored["predictions"], "prediction", result,
                             round(result["seconds"] - scored["seconds"], 3), 0,
                             per_item=scored["seconds"] / scored["predictions"]))
        stages[-1] |= {"val_images": val_images, "val_instances": val_instances}
    result = measure(_distpose("data", "verify", str(shards), "--workers", "2"))
    stages.append(_stage("verify, 2 workers", n_images, n_images, "image", result, commands, 0))
    for workers in (1, 2):
        call = (f"from distpose.bench.scale import stream_pass; "
                f"stream_pass({str(shards)!r}, {tuple(input_size)!r}, {workers})")
        result = measure([sys.executable, "-c", call])
        stream = json.loads(result["stdout"])
        # Per instance at steady state: the loader's start (its workers' imports, the first shard) does not
        # grow with N, and is kept as startup_seconds.
        stages.append(_stage(
            f"stream {input_size[0]}x{input_size[1]}, {workers} loader worker{'s' * (workers > 1)}", n_images,
            stream["instances"], "instance", result, round(result["seconds"] - stream["steady_seconds"], 3), 0,
            per_item=stream["steady_seconds"] / (stream["instances"] - stream["first_batch_instances"])))
    shutil.rmtree(root)
    return stages


def flatness(stages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per stage, the smallest N's figures against the largest N's, and whether they meet the flatness goals."""
    out = []
    for name in dict.fromkeys(s["stage"] for s in stages):
        runs = sorted((s for s in stages if s["stage"] == name), key=lambda s: s["images"])
        small, large = runs[0], runs[-1]
        time_ratio = large["seconds_per_item"] / small["seconds_per_item"]
        rss_limit = small["peak_rss_bytes"] * (1 + FLAT_RSS) + FLAT_RSS_CONSTANT
        out.append({"stage": name, "from_images": small["images"], "to_images": large["images"],
                    "per_item_time_ratio": round(time_ratio, 3),
                    "peak_rss_ratio": round(large["peak_rss_bytes"] / small["peak_rss_bytes"], 3),
                    "time_flat": abs(time_ratio - 1) <= FLAT_TIME,
                    "rss_flat": large["peak_rss_bytes"] <= rss_limit})
    return out


def checkpoint_stages(backbone: str, world: int = 2) -> list[dict[str, Any]]:
    """Save and load of `backbone`'s DeepSpeed checkpoint at each ZeRO stage on `world` gloo ranks, each stage in
    its own process tree (bench/checkpoint.py)."""
    stages = []
    for zero in ZERO_STAGES:
        result = measure([sys.executable, "-c", f"from distpose.bench.checkpoint import checkpoint_pass; "
                                                f"checkpoint_pass({backbone!r}, {zero}, {world})"])
        timed = json.loads(result["stdout"].strip().splitlines()[-1])
        stages.append({"stage": f"checkpoint, ZeRO {zero}, {world} ranks", "backbone": backbone, "zero_stage": zero,
                       "ranks": world, **{k: v for k, v in result.items() if k != "stdout"}, **timed})
    return stages


def summary(sizes: tuple[int, ...], input_size: tuple[int, int], stages: list[dict[str, Any]],
            checkpoints: list[dict[str, Any]]) -> dict[str, Any]:
    return {"benchmark": "scale", "machine": machine(), "sizes": sorted(sizes), "input_size": list(input_size),
            "samples_per_shard": SAMPLES_PER_SHARD, "stages": stages, "flatness": flatness(stages),
            "checkpoints": checkpoints,
            "notes": "seconds: the whole command; seconds_per_item: less startup_seconds (shard, verify: the "
                     "interpreter and the stage's imports, timed alone in the same run; stream: everything up to "
                     "the first batch, the per-instance time being that of the rest); peak RSS: the process tree's "
                     "summed RSS, sampled every 50 ms (shared pages count once per process)"}


def run(work: str | Path, sizes: tuple[int, ...] = SIZES, input_size: tuple[int, int] = (256, 192),
        checkpoint_backbone: str = "hrnet_w32", on_point: Callable[[dict[str, Any]], None] | None = None
        ) -> dict[str, Any]:
    """The checkpoint stages, then every point, smallest N first; `on_point` gets the summary so far after each."""
    work = Path(work)
    if work.exists() and not work.is_dir():
        raise UserError(f"bench scale: --work {work} is a file, not a directory")
    existing = next(p for p in (work, *work.absolute().parents) if p.exists())
    needed, free = DISK_PER_IMAGE * max(sizes), shutil.disk_usage(existing).free
    if free < needed:
        raise UserError(f"bench scale: --work {work} has {free / 1e9:.1f} GB free; N={max(sizes)} needs about "
                        f"{needed / 1e9:.1f} GB (the set and its shards)")
    work.mkdir(parents=True, exist_ok=True)
    checkpoints = checkpoint_stages(checkpoint_backbone)
    stages: list[dict[str, Any]] = []
    for n_images in sorted(sizes):
        stages += point(work, n_images, input_size)
        if on_point is not None:
            on_point(summary(sizes, input_size, stages, checkpoints))
    return summary(sizes, input_size, stages, checkpoints)


def plot(result: dict[str, Any], path: Path) -> None:
    """Seconds per item and peak RSS of each stage against N, log-x."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from distpose.eval.report import save_figure

    fig, (cost, memory) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in dict.fromkeys(s["stage"] for s in result["stages"]):
        runs = sorted((s for s in result["stages"] if s["stage"] == name), key=lambda s: s["images"])
        sizes = [s["images"] for s in runs]
        cost.plot(sizes, [s["seconds_per_item"] * 1e3 for s in runs], marker="o",
                  label=f"{name} (per {runs[0]['item']})")
        memory.plot(sizes, [s["peak_rss_bytes"] / 2**20 for s in runs], marker="o", label=name)
    cost.set(title="cost per item", xlabel="training images (N)", ylabel="ms per item", xscale="log", yscale="log")
    memory.set(title="peak RSS of the process tree", xlabel="training images (N)", ylabel="MiB", xscale="log")
    cost.legend(fontsize=7)
    memory.legend(fontsize=7)
    fig.suptitle(f"distpose bench scale, {result['machine']['host_cpu']}, {result['machine']['cpu_cores']} cores")
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
