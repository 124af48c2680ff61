"""Shards on object storage and over http(s): `data shard --out s3://`, `data verify`, and the loaders, against
a real S3-compatible server (moto's, started by the object_store fixture) and a real HTTP server, both on
127.0.0.1. Corrupt and missing objects get the same one-line errors and skip counts as local files."""

import dataclasses
import functools
import http.server
import io
import itertools
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from distpose.commands import main
from distpose.config import DataConfig, load_config
from distpose.data.loader import eval_loader, train_loader
from distpose.data.passes import pass_loader
from distpose.data.shards import read_manifest, verify_shards
from distpose.files import join, open_input
from distpose.train.checkpoints import newest_complete_checkpoint, read_meta
from distpose.train.driver import train


def objects(store, prefix: str) -> dict[str, int]:
    """The objects under `prefix`, less the empty directory markers pyarrow leaves when it deletes a
    directory's last object."""
    listing = store.client().list_objects_v2(Bucket=store.bucket, Prefix=prefix)
    return {o["Key"].removeprefix(prefix): o["Size"] for o in listing.get("Contents", [])
            if not o["Key"].endswith("/")}


def put(store, key: str, data: bytes) -> None:
    store.client().put_object(Bucket=store.bucket, Key=key, Body=data)


def get(store, key: str) -> bytes:
    return store.client().get_object(Bucket=store.bucket, Key=key)["Body"].read()


@pytest.fixture(scope="module")
def s3_shards(object_store, synth_root):
    """The synthetic set sharded straight to the bucket by the CLI (train in 5 shards, val in 5)."""
    out = object_store.uri("shards")
    for split, per_shard in (("train", 5), ("val", 4)):
        assert main(["data", "shard", "--coco-root", str(synth_root), "--split", split, "--out", out,
                     "--samples-per-shard", str(per_shard)]) == 0
    return out


def data_cfg(shards: str) -> DataConfig:
    return DataConfig(shards=shards, input_size=(64, 48), heatmap_size=(16, 12), batch_size=4, loader_workers=2,
                      batches_per_epoch=2, sample_shuffle=4, instance_shuffle=4)


def eval_batches(shards: str) -> list[dict]:
    return list(eval_loader(data_cfg(shards)))


def test_shards_written_to_s3_are_the_local_shards(object_store, s3_shards, synth_shards, capsys):
    stored = objects(object_store, "shards/")
    local = {p.name: p.stat().st_size for p in synth_shards.iterdir()}
    assert stored.keys() == local.keys()  # 10 shards, 2 manifests, nothing staged left behind
    for name in stored:
        if name.endswith(".tar"):  # same input, same bytes
            assert get(object_store, f"shards/{name}") == (synth_shards / name).read_bytes(), name
    assert read_manifest(s3_shards, "val")["shards"] == read_manifest(synth_shards, "val")["shards"]

    assert main(["data", "verify", s3_shards]) == 0
    out = capsys.readouterr().out
    print(out)
    assert "train: 5 shards" in out and "val: 5 shards" in out and "verify ok" in out


def test_the_loaders_read_s3_as_they_read_local_files(s3_shards, synth_shards):
    remote, local = eval_batches(s3_shards), eval_batches(str(synth_shards))
    assert [b["instance_id"].tolist() for b in remote] == [b["instance_id"].tolist() for b in local]
    assert all(torch.equal(r["image"], m["image"]) for r, m in zip(remote, local))
    batch = next(iter(train_loader(data_cfg(s3_shards))))
    assert batch["image"].shape == (4, 64, 48, 3)  # uint8 HWC; normalised on the device


def test_overwriting_a_split_on_s3_removes_its_stale_shards(object_store, synth_root, capsys):
    out = object_store.uri("resharded")
    args = ["data", "shard", "--coco-root", str(synth_root), "--split", "val", "--out", out]
    assert main([*args, "--samples-per-shard", "4"]) == 0
    capsys.readouterr()
    assert main([*args, "--samples-per-shard", "4"]) == 0  # the same split again: nothing to do
    assert "nothing to do" in capsys.readouterr().err
    assert main([*args, "--samples-per-shard", "9"]) == 2
    assert "already exists (from another source, shard size or role); pass --overwrite" in capsys.readouterr().err
    assert main([*args, "--samples-per-shard", "9", "--overwrite"]) == 0
    assert sorted(objects(object_store, "resharded/")) == ["val-000000.tar", "val-000001.tar", "val.manifest.json"]


def test_corrupt_and_missing_objects_are_named_by_verify_and_skipped_by_the_loader(object_store, synth_root,
                                                                                   capsys):
    out = object_store.uri("damaged")
    assert main(["data", "shard", "--coco-root", str(synth_root), "--split", "val", "--out", out,
                 "--samples-per-shard", "4"]) == 0
    manifest = json.loads(get(object_store, "damaged/val.manifest.json"))
    first, second = (s["name"] for s in manifest["shards"][:2])
    data = get(object_store, f"damaged/{first}")
    put(object_store, f"damaged/{first}", data[: len(data) // 2])  # an upload cut short
    object_store.client().delete_object(Bucket=object_store.bucket, Key=f"damaged/{second}")

    assert main(["data", "verify", out]) == 1
    report = capsys.readouterr()
    print(report.out)
    assert f"BAD val: shard {first}: {len(data) // 2} bytes, manifest says {len(data)}" in report.out
    assert f"BAD val: shard {second}: file missing" in report.out
    assert "verify failed" in report.err

    loader = eval_loader(data_cfg(out))
    seen = sum(len(b["instance_id"]) for b in loader)
    intact = sum(s["instances"] for s in manifest["shards"][2:])
    assert intact <= seen < manifest["instances"]  # the rest read, the damage skipped and counted:
    print(dict(loader.skipped))
    assert loader.skipped["unreadable shard (FileNotFoundError)"] == 1 and loader.skipped.total() >= 2


def test_bench_loader_measures_s3_against_the_same_shards_on_local_disk(object_store, s3_shards, synth_shards,
                                                                       synth_root, capsys):
    small = [f"data.shards={synth_shards}", "data.input_size=[64,48]", "data.heatmap_size=[16,12]",
             "data.batch_size=4", "--images", "8", "--batches", "2", "--warmup", "1"]
    assert main(["bench", "loader", *small, "--remote", s3_shards]) == 0
    result = json.loads(capsys.readouterr().out)
    remote, local = result["remote_1_worker_instances_per_s"], result["local_1_worker_instances_per_s"]
    assert remote > 0 and local > 0 and result["ratio_remote_vs_local"] == pytest.approx(remote / local, abs=2e-3)

    other = object_store.uri("resharded")  # the same images in other shards: not comparable
    assert main(["data", "shard", "--coco-root", str(synth_root), "--split", "train", "--out", other,
                 "--samples-per-shard", "7"]) == 0
    capsys.readouterr()
    assert main(["bench", "loader", *small, "--remote", other]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "shards are not those of data.shards" in err


def test_a_missing_split_or_bucket_is_one_line(object_store, capsys):
    assert main(["data", "verify", object_store.uri("nothing-here")]) == 1
    assert capsys.readouterr().err.strip().endswith("no *.manifest.json found; run `distpose data shard` first")
    with pytest.raises(Exception, match="no manifest for split 'val'"):
        read_manifest(object_store.uri("nothing-here"), "val")


@pytest.fixture(scope="module")
def http_shards(synth_shards):
    """The local shard directory served by a real HTTP server on 127.0.0.1."""
    handler = functools.partial(QuietHandler, directory=str(synth_shards))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class RangeHandler(QuietHandler):
    """Serves `Range: bytes=N-` with 206 Partial Content, as web servers and CDNs do (the standard library's
    handler sends the whole file)."""

    def send_head(self):
        asked = self.headers.get("Range", "")
        if not asked.startswith("bytes=") or not asked.endswith("-"):
            return super().send_head()
        path = Path(self.translate_path(self.path))
        data = path.read_bytes()[int(asked[len("bytes="):-1]):]
        self.send_response(206)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        return io.BytesIO(data)


@pytest.fixture(scope="module")
def http_ranges(synth_shards):
    """The local shard directory served by an HTTP server that answers byte ranges."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(RangeHandler,
                                                                                 directory=str(synth_shards)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("where", ["local", "s3", "http with ranges", "http without"])
def test_a_shard_opens_at_a_samples_offset(where, synth_shards, s3_shards, http_ranges, http_shards):
    """The pass order starts a reader at the sample holding its first instance (the manifest's sample_offsets)."""
    base = {"local": str(synth_shards), "s3": s3_shards, "http with ranges": http_ranges, "http without": http_shards}
    shard = read_manifest(synth_shards, "train")["shards"][1]
    offset = shard["sample_offsets"][2]
    with open_input(join(base[where], shard["name"]), offset) as stream:
        assert stream.read() == (synth_shards / shard["name"]).read_bytes()[offset:]


def test_the_pass_order_reads_s3_and_http_as_it_reads_local_files(s3_shards, http_ranges, synth_shards):
    def pass_batches(shards: str) -> list[dict]:
        cfg = dataclasses.replace(data_cfg(shards), order="pass", batch_size=6, batches_per_epoch=8,
                                  loader_workers=0)
        loader = pass_loader(cfg, start_step=5)
        batches = list(itertools.islice(iter(loader), 6))
        loader.close()
        return batches

    local = pass_batches(str(synth_shards))
    for remote in (pass_batches(s3_shards), pass_batches(http_ranges)):
        assert all(torch.equal(r[k], m[k]) for r, m in zip(remote, local, strict=True) for k in m)


def test_shards_read_over_http(http_shards, synth_shards, capsys):
    remote, local = eval_batches(http_shards), eval_batches(str(synth_shards))
    assert [b["instance_id"].tolist() for b in remote] == [b["instance_id"].tolist() for b in local]
    assert verify_shards(http_shards, splits=["val"], progress=False)["problems"] == []
    assert main(["data", "verify", http_shards]) == 2
    assert "cannot be listed; name its splits with --split" in capsys.readouterr().err
    with pytest.raises(Exception, match="no manifest for split 'test'.*cannot list an http"):
        read_manifest(http_shards, "test")


# ---------------------------------------------------------------------------------------------
# a training run on object storage


@pytest.mark.integration
def test_a_run_on_s3_survives_a_killed_driver_and_its_final_model_evaluates_from_the_bucket(
        ray_session, object_store, s3_shards, synth_root, tmp_path, capsys):
    """Shards and run storage in the bucket: SIGKILL the driver once a checkpoint is complete there, run the
    same command again (it resumes from the bucket), then `distpose eval` and `distpose predict` the bucket's
    final.pt. (~65 s: a driver process of its own, then the rerun.)"""
    epochs, per_epoch = 3, 4
    overrides = ["model.backbone=cnn_small", "data.input_size=[64,48]", "data.heatmap_size=[16,12]",
                 "data.loader_workers=0", "eval.every_epochs=0", "train.log_every=1000", "train.cpus_per_worker=1",
                 "data.source=shards", f"data.shards={s3_shards}", "data.batch_size=8", "train.workers=2",
                 f"train.epochs={epochs}", f"data.batches_per_epoch={per_epoch}",
                 f"train.storage={object_store.uri('runs')}", "train.run_name=on_s3"]
    run = object_store.uri("runs/on_s3")
    address = ray_session.get_runtime_context().gcs_address
    driver = subprocess.Popen([sys.executable, "-m", "distpose", "train", *overrides, "--address", address],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 240
        while newest_complete_checkpoint(run) is None:
            assert driver.poll() is None, driver.stdout.read()
            assert time.monotonic() < deadline, "no checkpoint reached the bucket in 240 s"
            time.sleep(0.2)
        driver.kill()
        killed_at = time.time()
        driver.wait(30)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    uploaded = read_meta(newest_complete_checkpoint(run)).state

    outcome = train(load_config(None, overrides))
    assert outcome.trained and outcome.final_model == f"{run}/final.pt"
    lines = [json.loads(line) for line in get(object_store, "runs/on_s3/metrics.jsonl").splitlines()]
    starts = [r for r in lines if r["kind"] == "start"]
    assert starts[0]["resumed_from"] == "fresh start" and len(starts) == 2
    assert starts[1]["resumed_from"].startswith(f"latest checkpoint of this run ({run}/checkpoint_step")
    assert starts[1]["step"] >= uploaded.step >= per_epoch
    steps = [r["step"] for r in lines if r["kind"] == "step"]
    assert sorted(set(steps)) == list(range(1, epochs * per_epoch + 1)) and steps[-1] == epochs * per_epoch
    before = [r for r in lines[: lines.index(starts[1])] if r["kind"] == "step"]
    first_after = next(r for r in lines[lines.index(starts[1]):] if r["kind"] == "step")
    print(f"\n[s3] driver killed after step {before[-1]['step'] if before else 0} (epoch {uploaded.epoch} checkpoint "
          f"in the bucket); the rerun resumed at step {starts[1]['step']}, its first step "
          f"{first_after['time'] - killed_at:.1f} s after the kill; steps on record before the kill: {len(before)}")

    out = tmp_path / "eval"
    assert main(["eval", "--checkpoint", outcome.final_model, "--data", s3_shards, "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["instances"] == read_manifest(s3_shards, "val")["instances"]
    assert "wrote" in capsys.readouterr().out
    image = sorted((synth_root / "val").glob("*.jpg"))[0]
    assert main(["predict", "--checkpoint", outcome.final_model, str(image), "--out", str(tmp_path / "pred")]) == 0
    assert "1 person in 1 image" in capsys.readouterr().out  # one whole-image box: one person
