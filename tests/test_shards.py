"""Sharding and verification: format, atomicity, counts, bad input and corruption."""

import hashlib
import json
import random
import shutil
import tarfile
from collections import Counter

import cv2
import numpy as np
import pytest
from helpers import corrupt_jpeg_in_shard, scramble_jpeg, scramble_jpeg_in_shard, truncate_jpeg_in_shard, truncate_shard

from distpose.commands import main
from distpose.data.coco import annotation_path, check_person, load_split
from distpose.data.shards import _ordered_map, iter_tar_samples, read_manifest, write_shards


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def copy_coco(src, dst):
    shutil.copytree(src, dst)
    return dst


def edit_annotations(root, split, edit):
    path = annotation_path(root, split)
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def test_synth_shard_verify_cli(tmp_path, capsys):
    root, shards = tmp_path / "synth", tmp_path / "shards"
    assert run_cli(capsys, "data", "synth", "--out", str(root), "--train", "11", "--val", "5")[0] == 0
    for split, per_shard in (("train", 4), ("val", 2)):
        code, out, _ = run_cli(capsys, "data", "shard", "--coco-root", str(root), "--split", split,
                               "--out", str(shards), "--samples-per-shard", str(per_shard))
        assert code == 0 and f"{split}: " in out
    code, out, _ = run_cli(capsys, "data", "verify", str(shards))
    assert code == 0 and "verify ok" in out
    manifest = read_manifest(shards, "train")
    sizes = [s["samples"] for s in manifest["shards"]]
    assert sum(sizes) == manifest["samples"] == 11 and len(sizes) == 3 and max(sizes) - min(sizes) <= 1
    gt = json.loads(annotation_path(root, "train").read_text())
    assert manifest["instances"] == sum(1 for a in gt["annotations"] if a["num_keypoints"] > 0)
    assert not list(shards.glob(".*"))  # no temporary files left behind


def test_real_coco_shard_keeps_bytes_and_checksums(coco_mini, tmp_path):
    manifest = write_shards(coco_mini, "val2017", tmp_path, samples_per_shard=3, progress=False)
    assert manifest["samples"] == 4 and manifest["instances"] == 12 and manifest["role"] == "eval"
    seen = {}
    for shard in manifest["shards"]:
        path = tmp_path / shard["name"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == shard["sha256"]
        assert path.stat().st_size == shard["bytes"]
        for sample in iter_tar_samples(path):
            meta = json.loads(sample["json"])
            seen[meta["file_name"]] = sample["jpg"]
            assert {"image_id", "width", "height", "persons", "jpg_crc32"} <= meta.keys()
    for name, data in seen.items():
        assert data == (coco_mini / "val2017" / name).read_bytes()
    assert len(seen) == 4


def test_streamed_index_gives_what_reading_the_whole_file_gives(tmp_path, capsys):
    """load_split streams the annotation file and keeps the persons on disk. It must give what reading the
    whole file at once gives: images in id order, each with its persons in file order, repaired alike."""
    root = tmp_path / "synth"
    assert run_cli(capsys, "data", "synth", "--out", str(root), "--train", "40", "--val", "1")[0] == 0

    def scramble(doc):
        random.Random(0).shuffle(doc["annotations"])
        doc["images"].reverse()
        doc["annotations"][0]["bbox"][2] = 0  # dropped and counted
        doc["annotations"].append({**doc["annotations"][1], "id": 10**9, "category_id": 2})  # not a person

    edit_annotations(root, "train", scramble)
    doc = json.loads(annotation_path(root, "train").read_text())
    sizes = {image["id"]: (image["width"], image["height"]) for image in doc["images"]}
    expected, repairs = {image_id: [] for image_id in sizes}, Counter()
    for raw in doc["annotations"]:
        if raw["category_id"] == 1:
            person, fixes = check_person(raw, *sizes[raw["image_id"]], "reference")
            repairs.update(fixes)
            if person is not None:
                expected[raw["image_id"]].append(person)
    with load_split(root, "train") as split:
        records = list(split)
        assert split.repairs == repairs and sum(repairs.values()) == 1
        assert split.usable_persons.tolist() == [sum(p.usable for p in expected[r.id]) for r in records]
    assert [r.id for r in records] == sorted(sizes)
    assert all((r.width, r.height) == sizes[r.id] and r.persons == expected[r.id] for r in records)


def test_parallel_map_draws_tasks_only_a_few_ahead_of_its_results():
    """Sharding builds each shard's records as its task is drawn: drawing them all at once held the split."""
    drawn = []

    def tasks():
        for i in range(50):
            drawn.append(i)
            yield i, 2

    results = _ordered_map(pow, tasks(), workers=2)
    assert next(results) == 0 and len(drawn) <= 5
    assert list(results) == [i * i for i in range(1, 50)]


def test_train_role_skips_images_without_keypoints(coco_mini, tmp_path):
    root = copy_coco(coco_mini, tmp_path / "coco")

    def strip_first_image(doc):
        first = doc["images"][0]["id"]
        for ann in doc["annotations"]:
            if ann["image_id"] == first:
                ann["keypoints"], ann["num_keypoints"] = [0] * 51, 0

    edit_annotations(root, "val2017", strip_first_image)
    train = write_shards(root, "val2017", tmp_path / "a", role="train", progress=False)
    evaluation = write_shards(root, "val2017", tmp_path / "b", progress=False)
    assert train["samples"] == 3 and train["skipped"] == {"image without usable keypoint annotations": 1}
    assert evaluation["samples"] == 4 and evaluation["skipped"] == {}


def test_existing_output_is_kept_when_the_same_and_needs_overwrite_otherwise(coco_mini, tmp_path, capsys):
    args = ["data", "shard", "--coco-root", str(coco_mini), "--split", "val2017", "--out", str(tmp_path)]
    assert run_cli(capsys, *args, "--samples-per-shard", "1")[0] == 0
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.iterdir()}
    code, out, err = run_cli(capsys, *args, "--samples-per-shard", "1")  # the same again: nothing to do
    assert code == 0 and "nothing to do" in err and "val2017: 4 images" in out
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.iterdir()} == before
    code, _, err = run_cli(capsys, *args)  # another shard size
    assert code == 2 and "pass --overwrite" in err and len(err.strip().splitlines()) == 1
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.iterdir()} == before
    # Overwriting with fewer, larger shards removes the stale ones.
    assert run_cli(capsys, *args, "--overwrite", "--samples-per-shard", "3")[0] == 0
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["val2017-000000.tar", "val2017-000001.tar"]
    assert run_cli(capsys, "data", "verify", str(tmp_path))[0] == 0


def _first_ann(doc):
    return next(a for a in doc["annotations"] if a["num_keypoints"] > 0)


@pytest.mark.parametrize("edit, message", [
    (lambda doc: _first_ann(doc).update(keypoints=[1, 2, 2] * 16), "field 'keypoints' has 48 values, expected 51"),
    (lambda doc: _first_ann(doc)["keypoints"].__setitem__(0, "12"), "holds '12', expected finite numbers"),
    (lambda doc: _first_ann(doc)["keypoints"].__setitem__(0, 10**400), "malformed JSON (parse error: integer overflow"),
    (lambda doc: _first_ann(doc).update(bbox=[1, 2, True, 4]), "field 'bbox' is [1, 2, True, 4]"),
    # NaN is not JSON, though Python's json module writes and reads it.
    (lambda doc: _first_ann(doc)["keypoints"].__setitem__(0, float("nan")), "malformed JSON (lexical error"),
    (lambda doc: doc["images"].append({**doc["images"][0], "file_name": doc["images"][1]["file_name"]}),
     "image id 785 appears twice"),
    (lambda doc: _first_ann(doc).update(image_id=[785]), "refers to image_id [785]"),
    (lambda doc: _first_ann(doc).pop("bbox"), "annotation lacks field 'bbox'"),
    (lambda doc: _first_ann(doc).update(bbox=[1, 2, "x", 4]), "field 'bbox' is [1, 2, 'x', 4]"),
    (lambda doc: _first_ann(doc).update(image_id=-5), "refers to image_id -5"),
    (lambda doc: doc.pop("annotations"), "expected an 'annotations' list"),
])
def test_malformed_annotations_fail_with_one_line(coco_mini, tmp_path, capsys, edit, message):
    root = copy_coco(coco_mini, tmp_path / "coco")
    edit_annotations(root, "val2017", edit)
    code, _, err = run_cli(capsys, "data", "shard", "--coco-root", str(root), "--split", "val2017",
                           "--out", str(tmp_path / "out"))
    assert code == 1
    assert len(err.strip().splitlines()) == 1 and message in err and "person_keypoints_val2017.json" in err
    assert not (tmp_path / "out").exists()


def test_bad_paths_and_json(coco_mini, tmp_path, capsys):
    """A path that does not exist is a mistake in the command (exit 2); data that is there but incomplete or
    malformed exits 1."""
    code, _, err = run_cli(capsys, "data", "shard", "--coco-root", str(tmp_path / "nope"), "--split", "val2017",
                           "--out", str(tmp_path / "o"))
    assert code == 2 and "is not a directory" in err
    root = copy_coco(coco_mini, tmp_path / "coco")
    code, _, err = run_cli(capsys, "data", "shard", "--coco-root", str(root), "--split", "train2017",
                           "--out", str(tmp_path / "o"))
    assert code == 1 and "person_keypoints_train2017.json: annotation file not found" in err
    (root / "val2017" / "000000000785.jpg").unlink()
    code, _, err = run_cli(capsys, "data", "shard", "--coco-root", str(root), "--split", "val2017",
                           "--out", str(tmp_path / "o"))
    assert code == 1 and "000000000785.jpg: image listed in person_keypoints_val2017.json not found" in err
    annotation_path(root, "val2017").write_text('{"images": [')
    code, _, err = run_cli(capsys, "data", "shard", "--coco-root", str(root), "--split", "val2017",
                           "--out", str(tmp_path / "o"))
    assert code == 1 and "malformed JSON" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "data", "verify", str(tmp_path / "missing"))
    assert code == 2 and "shard directory not found" in err


def test_bad_boxes_and_outside_keypoints_are_repaired_and_counted(coco_mini, tmp_path):
    root = copy_coco(coco_mini, tmp_path / "coco")
    doc = json.loads(annotation_path(root, "val2017").read_text())
    usable = [a for a in doc["annotations"] if a["num_keypoints"] > 0]
    bad_box_id, outside_id = usable[0]["id"], usable[1]["id"]

    def damage(doc):
        anns = {a["id"]: a for a in doc["annotations"]}
        anns[bad_box_id]["bbox"][2] = 0.0
        image = next(i for i in doc["images"] if i["id"] == anns[outside_id]["image_id"])
        k = next(j for j in range(17) if anns[outside_id]["keypoints"][3 * j + 2] > 0)
        anns[outside_id]["keypoints"][3 * k] = image["width"] + 50.0

    edit_annotations(root, "val2017", damage)
    manifest = write_shards(root, "val2017", tmp_path / "out", progress=False)
    assert manifest["repairs"] == {"instance dropped: zero or negative box": 1,
                                   "keypoint unlabelled: outside the image": 1}
    assert manifest["instances"] == 11


def test_corrupt_source_jpeg_is_skipped_and_counted(coco_mini, tmp_path):
    root = copy_coco(coco_mini, tmp_path / "coco")
    jpg = root / "val2017" / "000000040083.jpg"
    jpg.write_bytes(jpg.read_bytes()[: jpg.stat().st_size // 2])
    manifest = write_shards(root, "val2017", tmp_path / "out", progress=False)
    assert manifest["samples"] == 3
    assert manifest["skipped"] == {"corrupt source image": 1}
    assert manifest["corrupt_images"] == {"000000040083.jpg": "JPEG truncated (no end-of-image marker)"}


def test_scrambled_source_jpeg_is_skipped_and_named(coco_mini, tmp_path, capsys):
    """Entropy-coded data scrambled after byte 2000: start and end markers intact, OpenCV decodes it (to grey,
    with libjpeg's 'Corrupt JPEG data' warning), the strict decoder refuses it."""
    root = copy_coco(coco_mini, tmp_path / "coco")
    jpg = root / "val2017" / "000000040083.jpg"
    jpg.write_bytes(scramble_jpeg(jpg.read_bytes()))
    assert cv2.imdecode(np.frombuffer(jpg.read_bytes(), np.uint8), cv2.IMREAD_COLOR) is not None
    code, out, _ = run_cli(capsys, "data", "shard", "--coco-root", str(root), "--split", "val2017",
                           "--out", str(tmp_path / "out"))
    assert code == 0
    assert "3 images" in out and "skipped: 1 corrupt source image" in out
    assert "corrupt source image 000000040083.jpg: JPEG data corrupt" in out
    manifest = read_manifest(tmp_path / "out", "val2017")
    assert list(manifest["corrupt_images"]) == ["000000040083.jpg"]


# -- corruption after sharding -------------------------------------------------------------------


def test_verify_names_truncated_shard(coco_mini, tmp_path, capsys):
    write_shards(coco_mini, "val2017", tmp_path, samples_per_shard=2, progress=False)
    truncate_shard(tmp_path / "val2017-000001.tar")
    code, out, err = run_cli(capsys, "data", "verify", str(tmp_path))
    assert code == 1
    bad = [line for line in out.splitlines() if line.startswith("BAD")]
    assert bad and all("val2017-000001.tar" in line for line in bad)
    assert any("unreadable tar" in line for line in bad) and "verify failed" in err


@pytest.mark.parametrize("damage, problem", [
    (corrupt_jpeg_in_shard, "JPEG bytes do not match their crc32 (corrupt)"),
    (truncate_jpeg_in_shard, "JPEG truncated (no end-of-image marker)"),
    (scramble_jpeg_in_shard, "JPEG data corrupt"),
])
def test_verify_names_bad_jpeg_sample(coco_mini, tmp_path, capsys, damage, problem):
    write_shards(coco_mini, "val2017", tmp_path, samples_per_shard=2, progress=False)
    key = damage(tmp_path / "val2017-000000.tar")
    code, out, _ = run_cli(capsys, "data", "verify", str(tmp_path))
    assert code == 1
    bad = [line for line in out.splitlines() if line.startswith("BAD")]
    assert any(line.startswith(f"BAD val2017: shard val2017-000000.tar: sample {key}: {problem}") for line in bad), bad
    assert "BAD val2017: shard val2017-000000.tar: sha256 differs from the manifest" in bad
    assert all("val2017-000000.tar" in line for line in bad)  # the intact shard is not blamed


@pytest.mark.parametrize("field", ["sample_offsets", "sample_instances"])
def test_verify_names_a_sample_index_that_does_not_match_its_shard(coco_mini, tmp_path, capsys, field):
    write_shards(coco_mini, "val2017", tmp_path, samples_per_shard=2, progress=False)
    manifest_file = tmp_path / "val2017.manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest["shards"][1][field][-1] += 512
    manifest_file.write_text(json.dumps(manifest))
    code, out, _ = run_cli(capsys, "data", "verify", str(tmp_path))
    bad = [line for line in out.splitlines() if line.startswith("BAD")]
    assert code == 1 and bad == [f"BAD val2017: shard {manifest['shards'][1]['name']}: its sample index in the "
                                 "manifest does not match it (the pass order would misplace its readers): write the "
                                 "split again with `distpose data shard ... --overwrite`"], bad


def test_verify_parallel_matches_serial(synth_shards, capsys):
    code, out, _ = run_cli(capsys, "data", "verify", str(synth_shards), "--workers", "2")
    assert code == 0 and "train: 5 shards, 24 samples" in out and "val: 5 shards, 18 samples" in out


def test_manifest_must_exist_for_split(tmp_path):
    from distpose.errors import DataError

    with pytest.raises(DataError, match="no manifest for split 'val'"):
        read_manifest(tmp_path, "val")
    (tmp_path / "val.manifest.json").write_text("{}")
    with pytest.raises(DataError, match="malformed manifest"):
        read_manifest(tmp_path, "val")


def test_tar_writer_is_deterministic(coco_mini, tmp_path):
    a = write_shards(coco_mini, "val2017", tmp_path / "a", progress=False)
    b = write_shards(coco_mini, "val2017", tmp_path / "b", workers=2, progress=False)
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
    with tarfile.open(tmp_path / "a" / "val2017-000000.tar") as tar:
        assert all(m.mtime == 0 for m in tar.getmembers())


def test_overwrite_leaves_other_splits_alone(coco_mini, tmp_path, capsys):
    """A split named `val2017` must not claim the shards of a split named `val2017-small`."""
    root = copy_coco(coco_mini, tmp_path / "coco")
    shutil.copy(annotation_path(root, "val2017"), annotation_path(root, "val2017-small"))
    shutil.copytree(root / "val2017", root / "val2017-small")
    out = tmp_path / "out"
    write_shards(root, "val2017-small", out, samples_per_shard=1, progress=False)
    small = {p.name: p.read_bytes() for p in out.glob("val2017-small*")}
    write_shards(root, "val2017", out, samples_per_shard=2, progress=False)  # not refused: a new split
    write_shards(root, "val2017", out, samples_per_shard=4, overwrite=True, progress=False)
    assert {p.name: p.read_bytes() for p in out.glob("val2017-small*")} == small
    assert run_cli(capsys, "data", "verify", str(out))[0] == 0


def test_failed_rewrite_keeps_the_old_split_and_leaves_no_partial_files(coco_mini, tmp_path, monkeypatch):
    import distpose.data.shards as shards

    write_shards(coco_mini, "val2017", tmp_path, samples_per_shard=1, progress=False)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    calls = []

    def failing_sample_json(record, jpg):
        calls.append(record.id)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return original(record, jpg)

    original = shards.sample_json
    monkeypatch.setattr(shards, "sample_json", failing_sample_json)
    with pytest.raises(OSError, match="No space left"):
        write_shards(coco_mini, "val2017", tmp_path, samples_per_shard=2, overwrite=True, progress=False)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_partial_shards_of_a_killed_run_are_removed(coco_mini, tmp_path):
    (tmp_path / ".val2017-000000.tar.partial").write_bytes(b"half a shard")
    (tmp_path / ".other-000000.tar.partial").write_bytes(b"not ours")
    write_shards(coco_mini, "val2017", tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.glob(".*")) == [".other-000000.tar.partial"]


@pytest.mark.parametrize("edit, message", [
    (lambda m: m["shards"][0].update(name=5), "field 'name' is 5, expected str"),
    (lambda m: m.update(shards=[]), "'shards' is not a non-empty list"),
    (lambda m: m.pop("samples"), "field 'samples' is None, expected int"),
])
def test_malformed_manifest_is_one_clear_error(coco_mini, tmp_path, capsys, edit, message):
    write_shards(coco_mini, "val2017", tmp_path, progress=False)
    path = tmp_path / "val2017.manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    code, _, err = run_cli(capsys, "data", "verify", str(tmp_path))
    assert code == 1 and "malformed manifest" in err and message in err and len(err.strip().splitlines()) == 1


def test_os_errors_are_one_line(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    code, _, err = run_cli(capsys, "data", "synth", "--out", str(a_file), "--train", "1", "--val", "1")
    assert code == 1 and err.startswith("distpose: error: ") and len(err.strip().splitlines()) == 1
    code, _, err = run_cli(capsys, "bench", "loader", "--out", str(tmp_path))
    assert code == 2 and "is a directory; give a file name" in err
