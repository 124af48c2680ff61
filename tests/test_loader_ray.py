"""The eval split under real Ray Train ranks: 2 ranks x 2 DataLoader workers, every instance once."""

import json

import pytest

from distpose.config import DataConfig

pytestmark = pytest.mark.integration


def test_ray_train_ranks_split_eval_exactly(ray_session, synth_root, synth_shards, tmp_path):
    from ray.train import RunConfig, ScalingConfig

    from distpose.cluster import fit, torch_trainer

    cfg = DataConfig(shards=str(synth_shards), input_size=(64, 48), heatmap_size=(16, 12), batch_size=3,
                     loader_workers=2)
    out = tmp_path / "seen"
    out.mkdir()

    def per_worker(config):
        # Runs inside each Ray Train worker; the rank comes from Ray, not from the test.
        import ray.train

        from distpose.data.loader import eval_loader

        context = ray.train.get_context()
        rank, world = context.get_world_rank(), context.get_world_size()
        ids = [i for batch in eval_loader(config["data"], rank, world) for i in batch["instance_id"].tolist()]
        (config["out"] / f"rank{rank}.json").write_text(json.dumps({"world": world, "ids": ids}))

    trainer = torch_trainer(
        per_worker, train_loop_config={"data": cfg, "out": out},
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name="loader_ranks", storage_path=str(tmp_path / "ray")),
    )
    fit(trainer)  # and the SIGINT handler back: Ray's would keep the run's controller alive

    reports = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["world"] == 2 for r in reports)
    assert all(r["ids"] for r in reports)  # both ranks had work
    seen = reports[0]["ids"] + reports[1]["ids"]
    doc = json.loads((synth_root / "annotations" / "person_keypoints_val.json").read_text())
    expected = sorted(a["id"] for a in doc["annotations"] if a["num_keypoints"] > 0)
    assert len(seen) == len(set(seen)) and sorted(seen) == expected
