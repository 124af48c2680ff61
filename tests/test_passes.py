"""The pass order (data.order: pass): partitions that split a pass exactly, a global batch per step that is the
same at every world size and loader-worker count, every instance of an epoch once, resumes at any step, skips
counted once, and a too-long epoch refused before Ray. (~40 s: real loader workers.)"""

import json
import random
import shutil
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from helpers import corrupt_jpeg_in_shard, cut_first_annotation_in_shard, truncate_jpeg_in_shard

from distpose.commands import main
from distpose.config import ConfigError, grad_accum_at, load_config
from distpose.data import passes
from distpose.data.passes import ShardIndex, instance_digest, partitions, split_instances
from distpose.data.shards import iter_tar_samples, parse_sample
from distpose.train import driver
from distpose.train.batches import TrainingBatches

BATCH = 6


def test_partitions_split_the_shuffled_pass_into_equal_runs():
    """Against the definition, case by case: the partitions laid end to end read every shard whole and in order,
    each shard once, and their lengths are N // B or N // B + 1, the longer ones where floor(k N / B) puts them."""
    draw = random.Random(0)
    for _ in range(200):
        sizes = {f"s{i}.tar": draw.choice([0, 1, 3, 7, 40]) for i in range(draw.randint(1, 9))}
        total = sum(sizes.values())
        parts = draw.randint(1, max(1, total))
        plan = partitions(tuple(ShardIndex(url, n) for url, n in sizes.items()), parts, seed=draw.randint(0, 9),
                          epoch=draw.randint(0, 9))
        assert [sum(s.end - s.first for s in p) for p in plan] == \
            [(k + 1) * total // parts - k * total // parts for k in range(parts)]
        read = [(s.shard.url, i) for p in plan for s in p for i in range(s.first, s.end)]
        order = list(dict.fromkeys(url for url, _ in read))  # the shards, in the order the pass reads them
        assert read == [(url, i) for url in order for i in range(sizes[url])]
        assert set(order) == {url for url, n in sizes.items() if n}


def test_a_new_epoch_reads_the_shards_in_another_order():
    shards = tuple(ShardIndex(f"s{i}.tar", 10) for i in range(8))
    firsts = {tuple(p[0].shard.url for p in partitions(shards, 8, seed=0, epoch=e)) for e in range(5)}
    assert len(firsts) == 5


def _cfg(shards: Path, workers: str, loader_workers: int, steps: int, *extra: str):
    return load_config(None, [f"data.shards={shards}", f"data.batch_size={BATCH}", f"data.batches_per_epoch={steps}",
                              "data.order=pass", f"train.workers={workers}", f"data.loader_workers={loader_workers}",
                              *extra])


def _global_batches(shards: Path, workers: str, world: int, loader_workers: int, start: int, stop: int, steps: int
                    ) -> dict[int, dict[str, torch.Tensor]]:
    """Each step's global batch, its ranks' micro-batches concatenated in rank order."""
    cfg = _cfg(shards, workers, loader_workers, steps)
    accum = grad_accum_at(cfg, world)
    parts: dict[int, list[dict[str, torch.Tensor]]] = {s: [] for s in range(start, stop)}
    for rank in range(world):
        batches = TrainingBatches(cfg, rank, world, start)
        for step in range(start, stop):
            parts[step] += [next(batches) for _ in range(accum)]
        batches.loader.close()
    return {s: {k: torch.cat([p[k] for p in ps]) for k in ps[0]} for s, ps in parts.items()}


def _split_instances(shards: Path) -> list[tuple[int, int]]:
    """(image id, instance id) of every usable person of the split, read straight from the tars."""
    found = []
    for tar in sorted(shards.glob("train-*.tar")):
        for raw in iter_tar_samples(tar):
            sample = parse_sample(raw)
            found += [(sample.image_id, p.id) for p in sample.persons if p.usable]
    return found


def test_every_world_size_trains_on_the_same_global_batches_and_each_instance_once_an_epoch(synth_shards):
    """Two epochs of the longest length a pass allows: on 2 ranks from step 0; on 1 rank (2 micro-batches a step);
    on 3 ranks with 2 loader workers each, started mid-epoch as a resume would be. Every tensor of every step's
    global batch is equal across them, and each epoch holds S x B distinct instances of the split."""
    instances = _split_instances(synth_shards)
    steps = len(instances) // BATCH
    two = _global_batches(synth_shards, "[1,2]", 2, 0, 0, 2 * steps, steps)
    one = _global_batches(synth_shards, "[1,2]", 1, 0, 0, 2 * steps, steps)
    three = _global_batches(synth_shards, "3", 3, 2, steps // 2, steps + 2, steps)
    for step, batch in two.items():
        for other in (one, three):
            if step in other:
                assert all(torch.equal(batch[k], other[step][k]) for k in batch), step
    for epoch in range(2):
        seen = [pair for s in range(epoch * steps, (epoch + 1) * steps)
                for pair in zip(two[s]["image_id"].tolist(), two[s]["instance_id"].tolist())]
        print(f"\n[pass] epoch {epoch + 1}: {len(seen)} instances trained, {len(set(seen))} distinct, of "
              f"{len(instances)} in the split ({steps} steps of {BATCH})")
        assert len(seen) == len(set(seen)) == steps * BATCH and set(seen) <= set(instances)
    assert [two[s]["instance_id"].tolist() for s in range(steps)] != \
        [two[s]["instance_id"].tolist() for s in range(steps, 2 * steps)]


def test_the_sample_index_spares_reads_and_changes_nothing(synth_shards, tmp_path, monkeypatch):
    """Shards whose manifest has no sample index (written before it) give the same batches, bit for bit: the
    index only lets a reader start at the sample that holds its first instance instead of the shard's start."""
    bare = tmp_path / "bare"
    shutil.copytree(synth_shards, bare)
    manifest = json.loads((bare / "train.manifest.json").read_text())
    for shard in manifest["shards"]:
        del shard["sample_offsets"], shard["sample_instances"]
    (bare / "train.manifest.json").write_text(json.dumps(manifest))
    parsed = Counter()

    def counting(raw, check_jpeg=True):
        parsed[current] += 1
        return parse_sample(raw, check_jpeg)

    monkeypatch.setattr(passes, "parse_sample", counting)
    steps = manifest["instances"] // BATCH
    runs = {}
    for current in ("indexed", "bare"):
        runs[current] = _global_batches(synth_shards if current == "indexed" else bare, "[1,2]", 2, 0, 0, 2 * steps,
                                         steps)
    print(f"\n[pass] samples parsed over 2 epochs, 2 ranks: {dict(parsed)}")
    assert all(torch.equal(runs["indexed"][s][k], runs["bare"][s][k]) for s in runs["bare"] for k in runs["bare"][s])
    assert parsed["indexed"] < parsed["bare"]


def test_a_restart_where_the_pass_stream_stands_keeps_it_and_elsewhere_starts_another(synth_shards):
    cfg = _cfg(synth_shards, "1", 0, 4)
    batches = TrainingBatches(cfg, 0, 1, 0)
    next(batches)
    loader = batches.loader
    batches.restart(1)
    assert batches.loader is loader
    batches.restart(3)
    assert batches.loader is not loader and batches.loader.position == 3
    batches.loader.close()


def _first_shard_damaged(synth_shards: Path, tmp_path: Path, damage) -> tuple[Path, int, int]:
    """A copy of the shards with `damage` done to the first shard's first sample: (shards, its image id, its
    usable persons)."""
    shards = tmp_path / "shards"
    shutil.copytree(synth_shards, shards)
    first = sorted(shards.glob("train-*.tar"))[0]
    persons = sum(p.usable for p in parse_sample(next(iter_tar_samples(first))).persons)
    key = damage(first)
    # A damage that rewrote the tar moved its samples: their offsets, as `data shard` would have written them.
    manifest = json.loads((shards / "train.manifest.json").read_text())
    with tarfile.open(first) as tar:
        manifest["shards"][0]["sample_offsets"] = [m.offset for m in tar.getmembers() if m.name.endswith(".jpg")]
    (shards / "train.manifest.json").write_text(json.dumps(manifest))
    return shards, int(key), persons


def _epoch(shards: Path) -> tuple[list[dict[str, torch.Tensor]], TrainingBatches]:
    steps = json.loads((shards / "train.manifest.json").read_text())["instances"] // BATCH
    batches = TrainingBatches(_cfg(shards, "1", 0, steps), 0, 1, 0)
    rows = [next(batches) for _ in range(steps)]
    batches.loader.close()
    return rows, batches


@pytest.mark.parametrize("damage", [truncate_jpeg_in_shard, corrupt_jpeg_in_shard], ids=["undecodable", "bad-crc"])
def test_a_bad_image_is_counted_once_and_trains_as_empty_rows(synth_shards, tmp_path, damage):
    """A JPEG cut short (its crc matches: only the decoder finds out) or one whose bytes fail their crc: its
    instances keep their slots, with no joint labelled (no weight in the loss), so the order stands; it is counted
    once, by the reader that trains on it, not by the readers that pass over its shard."""
    shards, image, persons = _first_shard_damaged(synth_shards, tmp_path, damage)
    rows, batches = _epoch(shards)
    of_image = [b["visible"][b["image_id"] == image] for b in rows]
    trained, empty = sum(len(v) for v in of_image), sum(int((~v.any(dim=1)).sum()) for v in of_image)
    print(f"\n[pass] image {image} ({damage.__name__}): {persons} persons, {trained} in this epoch, {empty} of them "
          f"trained as empty rows; skipped {dict(batches.skipped)}")
    assert empty == trained >= 1 and batches.skipped == Counter({"corrupt JPEG": 1})
    clean, _ = _epoch(synth_shards)
    assert all(torch.equal(r["instance_id"], c["instance_id"]) for r, c in zip(rows, clean, strict=True))


def test_a_sample_whose_labels_do_not_parse_is_counted_once_and_left_out(synth_shards, tmp_path):
    """Its instances cannot be placed: they are not trained on, it is counted once, and the epoch still has its
    steps (the partition it leaves short starts over to fill them)."""
    shards, image, persons = _first_shard_damaged(synth_shards, tmp_path, cut_first_annotation_in_shard)
    rows, batches = _epoch(shards)
    print(f"\n[pass] image {image} with unreadable labels: {persons} persons; skipped {dict(batches.skipped)}")
    assert batches.skipped == Counter({"malformed annotation": 1})
    assert all(image not in b["image_id"].tolist() for b in rows)


def test_the_instance_digest_is_order_free_and_tells_sets_apart():
    images, ids = torch.arange(100), torch.arange(1000, 1100)
    whole = instance_digest(images, ids)
    order = torch.randperm(100)
    assert instance_digest(images[order], ids[order]) == whole
    assert instance_digest(images[:50], ids[:50]) + instance_digest(images[50:], ids[50:]) == whole
    assert instance_digest(images[:99], ids[:99]) != whole
    assert instance_digest(torch.cat([images[:99], images[:1]]), torch.cat([ids[:99], ids[:1]])) != whole


def test_an_epoch_longer_than_a_pass_is_refused_before_ray(synth_shards, tmp_path, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started for a config the driver should have refused")

    monkeypatch.setattr(driver, "ray_cluster", refuse)
    total = sum(s.instances for s in split_instances(str(synth_shards), "train"))
    argv = ["train", "quick/cnn", f"data.shards={synth_shards}", "data.order=pass", "data.batch_size=8",
            f"data.batches_per_epoch={total // 8 + 1}", f"train.storage={tmp_path / 'runs'}"]
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    print(f"\n[pass] {lines}")
    assert len(lines) == 1 and lines[0].startswith("distpose: error: config key 'data.batches_per_epoch': ")
    assert f"a pass over split 'train' has {total}: at most {total // 8} steps" in lines[0]
    assert not (tmp_path / "runs").exists()


def test_an_unknown_order_is_refused_naming_the_key():
    with pytest.raises(ConfigError, match="config key 'data.order': got 'sorted'"):
        load_config(None, ["data.order=sorted"])
