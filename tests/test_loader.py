"""Streaming loader: exact evaluation passes, equal training epochs, augmentation, corrupt samples."""

import dataclasses
import gc
import json
import multiprocessing
import os
import time

import cv2
import numpy as np
import pytest
import torch
from helpers import corrupt_jpeg_in_shard, truncate_jpeg_in_shard, truncate_shard

from distpose.config import AugmentConfig, DataConfig
from distpose.data.coco import annotation_path, load_split
from distpose.data.codec import HeatmapCodec
from distpose.data.loader import RING_SLOTS, CorruptSampleCounter, eval_loader, train_loader
from distpose.data.shards import decode_image, iter_tar_samples, parse_sample, read_manifest, write_shards
from distpose.data.transforms import TopDownTransform
from distpose.errors import DataError
from distpose.keypoints import FLIP_INDEX

NO_AUG = AugmentConfig(flip_prob=0, half_body_prob=0, scale_factor=0, rotation_prob=0)


def data_cfg(shards, **overrides) -> DataConfig:
    base = DataConfig(shards=str(shards), input_size=(128, 96), heatmap_size=(32, 24), batch_size=4,
                      loader_workers=2, batches_per_epoch=3, sample_shuffle=8, instance_shuffle=8)
    return dataclasses.replace(base, **overrides)


def usable_ids(root, split):
    doc = json.loads(annotation_path(root, split).read_text())
    return sorted(a["id"] for a in doc["annotations"] if a["num_keypoints"] > 0 and not a.get("iscrowd"))


def eval_ids(cfg, ranks, split=None):
    seen = []
    for rank in range(ranks):
        for batch in eval_loader(cfg, rank, ranks, split):
            seen += batch["instance_id"].tolist()
    return seen


@pytest.mark.parametrize("ranks, workers", [(2, 2), (3, 2), (4, 1), (1, 0)])
def test_eval_pass_sees_every_instance_exactly_once(synth_root, synth_shards, ranks, workers):
    seen = eval_ids(data_cfg(synth_shards, loader_workers=workers), ranks)
    assert len(seen) == len(set(seen))
    assert sorted(seen) == usable_ids(synth_root, "val")


def test_eval_pass_exact_on_real_coco(coco_mini, tmp_path):
    write_shards(coco_mini, "val2017", tmp_path, samples_per_shard=1, progress=False)
    seen = eval_ids(data_cfg(tmp_path, loader_workers=2), 2, "val2017")
    assert sorted(seen) == usable_ids(coco_mini, "val2017") and len(seen) == 12


def test_train_epochs_equal_per_rank_with_uneven_shards(synth_shards):
    manifest = read_manifest(synth_shards, "train")
    assert len({s["instances"] for s in manifest["shards"]}) > 1  # the shards really are uneven
    cfg = data_cfg(synth_shards)
    # Splitting these shards between two ranks, as evaluation does, gives the ranks different
    # step counts: the collectives of training would hang on that.
    one_worker = dataclasses.replace(cfg, loader_workers=1)
    plain = [sum(1 for _ in eval_loader(one_worker, rank, 2, "train")) for rank in range(2)]
    assert plain[0] != plain[1]
    first_batches = []
    for rank in range(2):
        loader = train_loader(cfg, rank, 2)
        counts = []
        for _ in range(3):
            batches = list(loader)
            counts.append(len(batches))
            assert all(len(b["instance_id"]) == cfg.batch_size for b in batches)
        assert counts == [3, 3, 3]
        first_batches.append(batches[0]["instance_id"].tolist())
    assert first_batches[0] != first_batches[1]  # ranks are seeded apart


def test_small_dataset_with_default_shuffle_buffers_trains(mini_shards):
    """4 one-image shards and a 256-image shuffle buffer: filling it takes 64 shard reads before the
    first person comes out, which must not be mistaken for corrupt data."""
    cfg = dataclasses.replace(DataConfig(), shards=str(mini_shards), train_split="val2017", loader_workers=0,
                              batch_size=4)
    assert cfg.sample_shuffle == 256
    assert len(next(iter(train_loader(cfg)))["instance_id"]) == 4


def test_train_stream_is_reproducible(synth_shards):
    cfg = data_cfg(synth_shards, loader_workers=1)
    a, b = next(iter(train_loader(cfg))), next(iter(train_loader(cfg)))
    assert a["instance_id"].tolist() == b["instance_id"].tolist()
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["joints"], b["joints"])


def test_dropped_train_loader_stops_its_workers(synth_shards):
    """A training stream never ends, so its workers stop only when the loader is dropped. Dropping it
    must shut them down at once: left to the garbage collector (a reference cycle), the DataLoader's
    queues are closed before its shutdown runs, the workers never get the stop signal, and each
    costs the shutdown's 5-s join timeout."""
    before = set(multiprocessing.active_children())
    loader = train_loader(data_cfg(synth_shards, loader_workers=2))
    assert len(list(loader)) == 3
    workers = [p for p in multiprocessing.active_children() if p not in before]
    assert len(workers) == 2
    gc.disable()  # so only reference counting can release the loader
    try:
        del loader
        for worker in workers:
            worker.join(timeout=60)
    finally:
        gc.enable()
    assert [w.exitcode for w in workers] == [0, 0]


def test_loader_workers_are_not_forks_of_a_threaded_caller(synth_shards):
    """A fork copies every other thread's locks and native state as they are at that instant (a Ray driver's gRPC
    threads, the S3 client's, OpenCV's pool), and loader workers forked from the test process died of SIGABRT in
    CI. With the caller running a second thread, each worker must come from a process that runs one thread."""
    import threading

    import psutil

    release = threading.Event()
    busy = threading.Thread(target=release.wait, daemon=True)
    busy.start()
    try:
        batches = iter(eval_loader(data_cfg(synth_shards)).dataloader)
        workers = list(batches._workers)
        parents = {psutil.Process(w.pid).parent() for w in workers}
        del batches  # shuts the workers down
        for worker in workers:
            worker.join(timeout=60)
    finally:
        release.set()
    assert len(workers) == 2
    print(f"\nloader workers' parent: {[(p.pid, p.num_threads()) for p in parents]}, this process: "
          f"{psutil.Process().pid} with {psutil.Process().num_threads()} threads")
    assert all(p.pid != psutil.Process().pid and p.num_threads() == 1 for p in parents), parents


class _EnvironmentProbe(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield os.environ.get("DISTPOSE_PROBE", "unset")


def test_loader_workers_see_the_environment_of_the_moment_the_loader_is_made(synth_shards, monkeypatch):
    """The forkserver keeps the environment it started with; workers must see the caller's as it is when the
    loader is made, as forks would (the S3 endpoint and keys set after a first loader were missing once, and every
    shard of the bucket was skipped as unreadable)."""
    list(eval_loader(data_cfg(synth_shards)))  # a first loader: the forkserver is up with the environment of now
    monkeypatch.setenv("DISTPOSE_PROBE", "set after the first loader")
    made = eval_loader(data_cfg(synth_shards)).dataloader
    probe = torch.utils.data.DataLoader(_EnvironmentProbe(), batch_size=None, num_workers=1,
                                        multiprocessing_context=made.multiprocessing_context,
                                        worker_init_fn=made.worker_init_fn)
    assert list(probe) == ["set after the first loader"]


def test_eval_batch_is_the_plain_crop_with_consistent_targets(synth_shards):
    cfg = data_cfg(synth_shards, loader_workers=0)
    batch = next(iter(eval_loader(cfg)))
    assert batch["image"].dtype == torch.uint8 and tuple(batch["image"].shape) == (4, 128, 96, 3)
    assert tuple(batch["joints"].shape) == (4, 17, 2) and batch["visible"].dtype == torch.bool

    # The eval crop is exactly the un-augmented transform of the decoded image.
    raw = next(iter_tar_samples(synth_shards / "val-000000.tar"))
    sample = parse_sample(raw)
    person = next(p for p in sample.persons if p.usable)
    keypoints = np.asarray(person.keypoints, np.float32).reshape(17, 3)
    crop = TopDownTransform(cfg.input_size)(decode_image(sample), person.bbox, keypoints)
    row = batch["instance_id"].tolist().index(person.id)
    assert np.array_equal(batch["image"][row].numpy(), crop.image)
    np.testing.assert_allclose(batch["joints"][row].numpy(), crop.joints, atol=1e-4)
    assert batch["visible"][row].tolist() == (keypoints[:, 2] > 0).tolist()

    # Targets rendered from the batch decode back onto the labelled keypoints.
    codec = HeatmapCodec(cfg.input_size, cfg.heatmap_size, cfg.sigma)
    heatmaps, weight = codec.encode(batch["joints"], batch["visible"])
    assert torch.all(heatmaps[weight == 0] == 0) and torch.all(heatmaps[weight == 1].amax(dim=(1, 2)) > 0.5)
    decoded, _ = codec.decode(heatmaps, batch["image_to_crop"])
    labelled = weight > 0
    error = (decoded[labelled] - batch["keypoints"][..., :2][labelled].double()).norm(dim=-1)
    # Half a heatmap pixel per axis at most (the quarter step is skipped on the map's edge).
    image_px_per_crop_px = (1 / batch["image_to_crop"][:, 0, :2].norm(dim=-1))[:, None].expand_as(weight)
    assert torch.all(error <= 0.5 * 2**0.5 * (95 / 23) * image_px_per_crop_px[labelled] + 1e-3)
    assert error.mean() < 0.3 * (95 / 23) * image_px_per_crop_px[labelled].mean()


def test_a_batch_from_workers_is_the_consumers_own_while_the_workers_refill_their_ring(synth_shards):
    """Workers write every batch into a ring of shared buffers, over and over; the consumer copies each out. A
    batch it keeps must not change as the ring is refilled, nor share the workers' memory."""
    loader = train_loader(data_cfg(synth_shards, loader_workers=2, batches_per_epoch=3 * RING_SLOTS))
    kept = [(batch, {name: t.clone() for name, t in batch.items()}) for batch in loader]
    assert len(kept) == 3 * RING_SLOTS
    assert all(torch.equal(batch[name], t) for batch, snapshot in kept for name, t in snapshot.items())
    assert not any(t.is_shared() for batch, _ in kept for t in batch.values())
    assert len({batch["image"].sum().item() for batch, _ in kept}) == len(kept)  # no slot read twice


def _person_with_many_joints(coco_mini):
    with load_split(coco_mini, "val2017") as split:
        records = list(split)
    for record in records:
        for p in record.persons:
            if p.num_keypoints >= 12:
                image = cv2.imread(str(split.image_dir / record.file_name))
                return image, p.bbox, np.asarray(p.keypoints, np.float32).reshape(17, 3)
    raise AssertionError("no well-labelled person")


def test_flip_mirrors_crop_and_swaps_joints(coco_mini):
    image, bbox, kps = _person_with_many_joints(coco_mini)
    plain = TopDownTransform((128, 96))(image, bbox, kps)
    flip = TopDownTransform((128, 96), augment=dataclasses.replace(NO_AUG, flip_prob=1.0))
    flipped = flip(image, bbox, kps, np.random.default_rng(0))
    assert np.abs(flipped.image.astype(int) - plain.image[:, ::-1].astype(int)).mean() < 1.0  # HWC: mirror W
    swap = list(FLIP_INDEX)
    np.testing.assert_allclose(flipped.joints[:, 0], 95 - plain.joints[swap, 0], atol=1e-6)
    np.testing.assert_allclose(flipped.joints[:, 1], plain.joints[swap, 1], atol=1e-6)
    assert flipped.visible.tolist() == plain.visible[swap].tolist()


def test_rotation_and_scale_keep_the_skeleton_shape(coco_mini):
    image, bbox, kps = _person_with_many_joints(coco_mini)
    labelled = kps[:, 2] > 0
    plain = TopDownTransform((128, 96))(image, bbox, kps)
    aug = dataclasses.replace(NO_AUG, rotation_prob=1.0, rotation_factor=30.0, scale_factor=0.3)
    out = TopDownTransform((128, 96), augment=aug)(image, bbox, kps, np.random.default_rng(5))

    def spread(joints):
        pts = joints[labelled]
        return np.linalg.norm(pts[:, None] - pts[None], axis=-1)

    ratio = spread(out.joints)[spread(plain.joints) > 0] / spread(plain.joints)[spread(plain.joints) > 0]
    assert np.ptp(ratio) < 1e-6  # a similarity transform: one scale for every distance
    assert 1 / 1.3 - 1e-6 <= ratio[0] <= 1 / 0.7 + 1e-6
    rotation = np.degrees(np.arctan2(out.image_to_crop[1, 0], out.image_to_crop[0, 0]))
    assert 0 < abs(rotation) <= 60


def test_half_body_zooms_on_half_the_joints(coco_mini):
    image, bbox, kps = _person_with_many_joints(coco_mini)
    plain = TopDownTransform((128, 96))(image, bbox, kps)
    half = TopDownTransform((128, 96), augment=dataclasses.replace(NO_AUG, half_body_prob=1.0))
    out = half(image, bbox, kps, np.random.default_rng(1))
    assert abs(np.linalg.det(out.image_to_crop[:, :2])) > abs(np.linalg.det(plain.image_to_crop[:, :2]))


# -- corrupt data in the stream --------------------------------------------------------------------


@pytest.fixture
def mini_shards(coco_mini, tmp_path):
    write_shards(coco_mini, "val2017", tmp_path, samples_per_shard=1, progress=False)
    return tmp_path


def _instances_in(shard):
    return sum(p.usable for raw in iter_tar_samples(shard) for p in parse_sample(raw).persons)


@pytest.mark.parametrize("damage, reasons", [
    (corrupt_jpeg_in_shard, {"corrupt JPEG": 1}),
    (truncate_jpeg_in_shard, {"corrupt JPEG": 1}),
])
def test_eval_loader_skips_and_counts_bad_sample(mini_shards, damage, reasons):
    shard = sorted(mini_shards.glob("*.tar"))[1]
    lost = _instances_in(shard)
    damage(shard)
    loader = eval_loader(data_cfg(mini_shards, loader_workers=2), split="val2017")
    seen = [i for b in loader for i in b["instance_id"].tolist()]
    assert len(seen) == 12 - lost and dict(loader.skipped) == reasons


def test_eval_loader_survives_truncated_tar(mini_shards):
    shard = sorted(mini_shards.glob("*.tar"))[2]
    truncate_shard(shard, keep=0.3)
    loader = eval_loader(data_cfg(mini_shards, loader_workers=2), split="val2017")
    seen = [i for b in loader for i in b["instance_id"].tolist()]
    assert 0 < len(seen) < 12
    assert sum(loader.skipped.values()) >= 1
    assert any(reason.startswith("unreadable shard") for reason in loader.skipped)


def test_train_loader_keeps_full_epochs_despite_corruption(mini_shards):
    corrupt_jpeg_in_shard(sorted(mini_shards.glob("*.tar"))[0])
    cfg = data_cfg(mini_shards, loader_workers=1, train_split="val2017", batches_per_epoch=4)
    loader = train_loader(cfg)
    assert len(list(loader)) == 4
    assert loader.skipped["corrupt JPEG"] >= 1


def test_train_loader_stops_when_every_shard_is_bad(mini_shards):
    for shard in mini_shards.glob("*.tar"):
        truncate_shard(shard, keep=0.001)
    loader = train_loader(data_cfg(mini_shards, loader_workers=0, train_split="val2017"))
    with pytest.raises(DataError, match="no usable sample in 20 shard reads in a row"):
        next(iter(loader))


def test_skip_handler_logs_and_never_sleeps(mini_shards, monkeypatch, caplog):
    def no_sleep(_):
        raise AssertionError("the corrupt-sample handler must not sleep")

    monkeypatch.setattr(time, "sleep", no_sleep)
    key = corrupt_jpeg_in_shard(sorted(mini_shards.glob("*.tar"))[0])
    loader = eval_loader(data_cfg(mini_shards, loader_workers=0), split="val2017")
    with caplog.at_level("WARNING"):
        assert sum(len(b["instance_id"]) for b in loader) > 0
    assert loader.skipped == {"corrupt JPEG": 1}
    assert any(key in r.getMessage() and "val2017-000000.tar" in r.getMessage() for r in caplog.records)
    counter = CorruptSampleCounter()
    assert all(counter(OSError("disk")) for _ in range(3)) and counter.counts == {"unreadable shard (OSError)": 3}


def test_missing_shard_dir_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="no manifest for split 'train'"):
        train_loader(data_cfg(tmp_path))
