"""The pose model factory, weights files (ours and official names), model files, and flip test."""

import argparse
import re

import numpy as np
import pytest
import torch

from distpose.commands import main
from distpose.config import Config, ConfigError, load_config
from distpose.data.codec import HeatmapCodec
from distpose.data.transforms import apply_affine, box_to_center_scale, crop_matrix
from distpose.errors import UserError
from distpose.keypoints import FLIP_INDEX
from distpose.models import pose, weights
from distpose.models.crf import TreeCRF
from distpose.models.factory import build_backbone
from distpose.models.model_file import load_model_file, save_model_file
from distpose.models.pose import PoseModel, build_pose_model, flip_back
from distpose.models.weights import load_backbone_weights, official_to_ours, read_torch_file
from distpose.train.modes import run_model


def quick_config(**overrides) -> Config:
    return load_config(None, [f"{k}={v}" for k, v in overrides.items()])


def test_modes_build_the_right_heads_and_outputs():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 128, 96)
    model = run_model(quick_config()).eval()
    assert model.crf is None
    out = model(images)
    assert tuple(out.heatmaps.shape) == (2, 17, 32, 24) and out.log_marginals is None


def test_crf_modes_need_and_load_a_backbone_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="train.backbone_checkpoint"):
        quick_config(**{"train.mode": "crf"})
    trained = run_model(quick_config())
    save_model_file(tmp_path / "backbone.pt", trained.state_dict(), quick_config())
    for mode in ("crf", "joint"):
        model = run_model(quick_config(**{"train.mode": mode, "train.backbone_checkpoint":
                                                 str(tmp_path / "backbone.pt"), "model.crf_window": 3}))
        for name, value in trained.backbone.state_dict().items():
            assert torch.equal(model.backbone.state_dict()[name], value), name
        scale = quick_config().model.crf_unary_scale
        assert torch.equal(model.crf.unary_head.weight, trained.backbone.final_layer.weight * scale)
        assert model.crf.radius == 3
    out = model(torch.randn(1, 3, 128, 96))
    torch.testing.assert_close(out.log_marginals.exp().sum((2, 3)), torch.ones(1, 17), atol=1e-5, rtol=0)


def test_a_staged_joint_run_starts_from_the_crf_runs_whole_model(tmp_path, monkeypatch):
    from distpose.train.crf_prior import with_crf_prior

    torch.manual_seed(0)
    backbone_cfg = quick_config()
    save_model_file(tmp_path / "backbone.pt", run_model(backbone_cfg).state_dict(), backbone_cfg)
    crf_cfg = quick_config(**{"train.mode": "crf", "train.backbone_checkpoint": str(tmp_path / "backbone.pt"),
                              "model.crf_window": 3})
    crf_run = run_model(crf_cfg)
    with torch.no_grad():  # a trained CRF differs from any fresh start
        for p in crf_run.crf.parameters():
            p.add_(torch.randn_like(p))
    save_model_file(tmp_path / "crf.pt", crf_run.state_dict(), crf_cfg)
    staged = {"train.mode": "joint", "train.backbone_checkpoint": str(tmp_path / "crf.pt"),
              "train.crf_from_checkpoint": "true"}
    cfg, prior = with_crf_prior(quick_config(**staged))  # the window comes from the file, nothing is measured
    assert cfg.model.crf_window == 3 and prior.record()["pairwise_init"] == "checkpoint" and prior.limbs == 0
    reads = []
    for module in (pose, weights):
        monkeypatch.setattr(module, "read_torch_file", lambda path: reads.append(path) or read_torch_file(path))
    model = run_model(cfg)
    assert reads == [str(tmp_path / "crf.pt")]  # once for the backbone and the CRF: each worker reads it
    for name, value in crf_run.state_dict().items():
        assert torch.equal(model.state_dict()[name], value), name
    with pytest.raises(ConfigError, match="model.crf_window': 4, but the CRF of .*crf.pt .* has R=3"):
        with_crf_prior(quick_config(**staged, **{"model.crf_window": 4}))
    without = {**staged, "train.backbone_checkpoint": str(tmp_path / "backbone.pt")}
    with pytest.raises(ConfigError, match="backbone.pt holds no CRF, but train.crf_from_checkpoint=true"):
        with_crf_prior(quick_config(**without))
    with pytest.raises(ConfigError, match="crf_from_checkpoint': got True, expected false outside train.mode=joint"):
        quick_config(**{**staged, "train.mode": "crf"})


def test_an_unresolved_auto_window_is_refused(tmp_path):
    cfg = quick_config()
    save_model_file(tmp_path / "b.pt", run_model(cfg).state_dict(), cfg)
    with pytest.raises(ConfigError, match="model.crf_window': 'auto' is chosen from the training data"):
        run_model(quick_config(**{"train.mode": "crf", "train.backbone_checkpoint": str(tmp_path / "b.pt")}))


def test_crf_mode_rejects_a_checkpoint_of_another_backbone(tmp_path):
    other = run_model(quick_config(**{"model.backbone": "hrnet_small"}))
    save_model_file(tmp_path / "hrnet.pt", other.state_dict(), quick_config(**{"model.backbone": "hrnet_small"}))
    with pytest.raises(ConfigError, match="train.backbone_checkpoint': .* does not hold a complete 'cnn_small'"):
        run_model(quick_config(**{"train.mode": "crf", "train.backbone_checkpoint": str(tmp_path / "hrnet.pt")}))


def test_the_builder_takes_the_model_config_and_explicit_arguments(tmp_path):
    """No training config: the CRF and the starting weights are arguments."""
    model_cfg = quick_config(**{"model.crf_window": 2}).model
    trained = build_pose_model(model_cfg)
    save_model_file(tmp_path / "b.pt", trained.state_dict(), quick_config())
    pairwise = torch.randn(17, 5, 5)
    model = build_pose_model(model_cfg, with_crf=True, backbone_weights=tmp_path / "b.pt", pairwise=pairwise)
    assert model.crf.radius == 2 and torch.equal(model.crf.pairwise.data, pairwise)
    assert all(torch.equal(v, model.backbone.state_dict()[k]) for k, v in trained.backbone.state_dict().items())
    assert build_pose_model(model_cfg).crf is None
    # train.mode: backbone, but the weights say there is a CRF
    save_model_file(tmp_path / "crf.pt", model.state_dict(), quick_config(**{"model.crf_window": 2}))
    assert load_model_file(tmp_path / "crf.pt")[0].crf is not None


def test_checkpoint_round_trip_gives_identical_predictions(tmp_path):
    cfg = quick_config(**{"train.mode": "joint", "train.backbone_checkpoint": "unused", "model.crf_window": 2})
    torch.manual_seed(1)
    backbone = build_backbone("cnn_small")
    model = PoseModel(backbone, TreeCRF(backbone.feature_channels, radius=2)).eval()
    with torch.no_grad():
        model.crf.pairwise.normal_()
    save_model_file(tmp_path / "model.pt", model.state_dict(), cfg, {"epoch": 3})
    loaded, loaded_cfg, meta = load_model_file(tmp_path / "model.pt")
    assert meta == {"epoch": 3} and loaded_cfg.train.mode == "joint" and loaded_cfg.model.crf_window == 2
    images = torch.randn(2, 3, 128, 96)
    with torch.no_grad():
        torch.testing.assert_close(loaded.keypoint_maps(images, True), model.keypoint_maps(images, True),
                                   atol=0, rtol=0)
    assert not list(tmp_path.glob(".*tmp*"))  # written under a temporary name, then renamed


@pytest.mark.parametrize("content, message", [
    (b"not a torch file", "not a readable torch file"),
    (None, "does not exist"),
])
def test_unreadable_weights_are_one_line_errors(tmp_path, content, message):
    path = tmp_path / "w.pt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(UserError, match=f"^model file {path}:? {message}"):
        load_model_file(path)
    with pytest.raises(UserError, match=f"^weights file {path}:? {message}"):
        load_backbone_weights(build_backbone("cnn_small"), "cnn_small", path)


def test_a_file_with_pickled_objects_is_refused_without_advice_to_unpickle_it(tmp_path, capsys):
    torch.save({"format": "distpose.pose/1", "config": argparse.Namespace(a=1)}, tmp_path / "objects.pt")
    assert main(["eval", "--checkpoint", str(tmp_path / "objects.pt"), "--data", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"distpose: error: model file {tmp_path / 'objects.pt'}: holds Python objects besides tensors "
                   "and plain containers; distpose loads weights only, never a file's pickled code"]


def test_weights_file_that_is_not_a_model_file(tmp_path):
    torch.save({"tensors": [1, 2]}, tmp_path / "list.pt")
    with pytest.raises(UserError, match="holds no state dict"):
        load_backbone_weights(build_backbone("cnn_small"), "cnn_small", tmp_path / "list.pt")
    torch.save(build_backbone("cnn_small").state_dict(), tmp_path / "bare.pt")
    with pytest.raises(UserError, match="not a distpose model file"):
        load_model_file(tmp_path / "bare.pt")
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="none of its 1 tensors fit backbone 'cnn_small'"):
        load_backbone_weights(build_backbone("cnn_small"), "cnn_small", tmp_path / "other.pt")


def test_imagenet_style_file_loads_the_backbone_and_reports_the_rest(tmp_path):
    source = build_backbone("cnn_small")
    state = {f"module.{k}": v for k, v in source.state_dict().items() if not k.startswith("final_layer")}
    state["module.fc.weight"] = torch.zeros(1000, 96)  # a classifier the pose model does not have
    state["module.stem.0.0.weight"] = torch.zeros(24, 3, 5, 5)  # same name, another shape
    torch.save({"state_dict": state}, tmp_path / "imagenet.pth")
    target = build_backbone("cnn_small")
    report = load_backbone_weights(target, "cnn_small", tmp_path / "imagenet.pth")
    assert report.unexpected == ["fc.weight"]
    assert len(report.mismatched) == 1 and report.mismatched[0].startswith("stem.0.0.weight [24, 3, 5, 5]")
    assert sorted(report.missing) == ["final_layer.bias", "final_layer.weight", "stem.0.0.weight"]
    assert torch.equal(target.state_dict()["body.1.0.conv2.weight"], source.state_dict()["body.1.0.conv2.weight"])
    assert report.loaded == len(source.state_dict()) - 3


# Official parameter names (torchvision ResNet-50, SimpleBaseline's pose_resnet, HRNet's pose_hrnet)
# and their shapes, which follow from the published architectures.
OFFICIAL_RESNET50 = {
    "conv1.weight": (64, 3, 7, 7),
    "bn1.running_var": (64,),
    "layer1.0.downsample.0.weight": (256, 64, 1, 1),
    "layer3.5.bn2.weight": (256,),
    "layer4.2.conv3.weight": (2048, 512, 1, 1),
    "deconv_layers.0.weight": (2048, 256, 4, 4),
    "deconv_layers.4.running_mean": (256,),
    "deconv_layers.6.weight": (256, 256, 4, 4),
    "final_layer.weight": (17, 256, 1, 1),
}
OFFICIAL_HRNET_W32 = {
    "conv2.weight": (64, 64, 3, 3),
    "bn2.bias": (64,),
    "layer1.3.conv3.weight": (256, 64, 1, 1),
    "transition1.0.0.weight": (32, 256, 3, 3),  # existing branch, width changes
    "transition1.1.0.0.weight": (64, 256, 3, 3),  # new branch
    "transition1.1.0.1.running_mean": (64,),
    "transition3.3.0.0.weight": (256, 128, 3, 3),
    "stage2.0.branches.1.3.conv2.weight": (64, 64, 3, 3),
    "stage2.0.fuse_layers.0.1.0.weight": (32, 64, 1, 1),  # upsampling path
    "stage2.0.fuse_layers.0.1.1.running_var": (32,),
    "stage3.3.fuse_layers.2.0.0.0.weight": (32, 32, 3, 3),  # two-step downsampling path
    "stage3.3.fuse_layers.2.0.1.1.weight": (128,),
    "stage4.2.fuse_layers.0.3.0.weight": (32, 256, 1, 1),
    "final_layer.weight": (17, 32, 1, 1),
}


@pytest.mark.parametrize("name, official", [("resnet50", OFFICIAL_RESNET50), ("hrnet_w32", OFFICIAL_HRNET_W32)])
def test_official_names_translate_to_tensors_of_the_published_shape(name, official):
    own = build_backbone(name).state_dict()
    for key, shape in official.items():
        ours = official_to_ours(key, name)
        assert ours in own, f"{key} -> {ours}"
        assert tuple(own[ours].shape) == shape, key
        assert official_to_ours(ours, name) == ours  # our own names pass through unchanged


def _official_name(ours: str, name: str) -> str:
    """The inverse of the loader's translation, written from the official code's module names: HRNet's
    conv1/bn1/conv2/bn2 stem, transition{k} (a new branch one Sequential deeper), stage{s}.{m}.fuse_layers
    with flat upsampling paths; pose_resnet's conv1/bn1/layer{i}, and one flat deconv_layers Sequential."""
    if name == "resnet50":
        ours = re.sub(r"^stem\.0\.0\.", "conv1.", ours)
        ours = re.sub(r"^stem\.0\.1\.", "bn1.", ours)
        ours = re.sub(r"^resnet\.(\d)\.", lambda m: f"layer{int(m[1]) + 1}.", ours)
        return re.sub(r"^deconv\.(\d)\.(\d)\.", lambda m: f"deconv_layers.{3 * int(m[1]) + int(m[2])}.", ours)
    ours = re.sub(r"^stem\.(\d)\.0\.", lambda m: f"conv{int(m[1]) + 1}.", ours)
    ours = re.sub(r"^stem\.(\d)\.1\.", lambda m: f"bn{int(m[1]) + 1}.", ours)
    # transition k adds branch k (0-based) to the k branches before it
    ours = re.sub(r"^transitions\.(\d)\.(\d)\.",
                  lambda m: f"transition{int(m[1]) + 1}.{m[2]}." + ("0." if int(m[2]) > int(m[1]) else ""), ours)
    ours = re.sub(r"fuse\.paths\.(\d)\.(\d)\.0\.([01])\.", lambda m: f"fuse_layers.{m[1]}.{m[2]}.{m[3]}."
                  if int(m[2]) > int(m[1]) else m[0].replace("fuse.paths", "fuse_layers"), ours)
    ours = ours.replace("fuse.paths", "fuse_layers")
    return re.sub(r"^stages\.(\d)\.", lambda m: f"stage{int(m[1]) + 2}.", ours)


@pytest.mark.parametrize("name, official", [("resnet50", OFFICIAL_RESNET50), ("hrnet_w32", OFFICIAL_HRNET_W32)])
def test_convert_an_official_pose_model_file(name, official, tmp_path):
    """A state dict under the official names and shapes (as the released .pth files hold it) converts into a
    model file that `eval` loads and that predicts what the network it came from predicts."""
    torch.manual_seed(0)
    source = build_backbone(name).eval()
    state = {_official_name(k, name): v for k, v in source.state_dict().items()}
    assert len(state) == len(source.state_dict())
    for key, shape in official.items():  # the independently known official names are among them
        assert tuple(state[key].shape) == shape, key
    torch.save(state, tmp_path / "official.pth")
    assert main(["convert", str(tmp_path / "official.pth"), str(tmp_path / "model.pt"), "--arch", name]) == 0
    model, cfg, meta = load_model_file(tmp_path / "model.pt")
    assert cfg.model.backbone == name and cfg.data.input_size == (256, 192) and cfg.data.heatmap_size == (64, 48)
    assert meta["kind"] == "converted"
    images = torch.randn(1, 3, 256, 192)
    with torch.no_grad():
        torch.testing.assert_close(model(images).heatmaps, source(images), rtol=0, atol=0)


def test_convert_refuses_a_file_that_is_not_the_whole_network(tmp_path, capsys):
    state = {_official_name(k, "hrnet_w32"): v for k, v in build_backbone("hrnet_w32").state_dict().items()
             if not k.startswith("final_layer")}  # an ImageNet file: no heatmap head
    torch.save(state, tmp_path / "imagenet.pth")
    assert main(["convert", str(tmp_path / "imagenet.pth"), str(tmp_path / "model.pt"), "--arch", "hrnet_w32"]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("distpose: error: ")]
    assert len(errors) == 1 and "does not hold a complete 'hrnet_w32' backbone (2 tensors missing" in errors[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "model.pt").exists()


def test_flip_back_is_exact_under_the_codec_alignment():
    """Heatmaps of a mirrored crop, flipped back, equal the heatmaps of the crop: no pixel shift."""
    codec = HeatmapCodec((256, 192), (64, 48), sigma=2.0)
    rng = np.random.default_rng(0)
    joints = rng.uniform([100, 80], [300, 400], size=(17, 2))
    center, scale = box_to_center_scale([90, 70, 220, 340], 0.75, 1.25)
    plain = apply_affine(joints, crop_matrix(center, scale, 10.0, (256, 192)))
    mirrored = apply_affine(joints, crop_matrix(center, scale, 10.0, (256, 192), flip=True))[list(FLIP_INDEX)]
    visible = torch.ones(17, dtype=torch.bool)
    expected, _ = codec.encode(torch.from_numpy(plain), visible)
    from_mirror, _ = codec.encode(torch.from_numpy(mirrored), visible)
    torch.testing.assert_close(flip_back(from_mirror[None])[0], expected, atol=1e-5, rtol=0)
    # HRNet's one-pixel shift would move every peak by a pixel here.
    shifted = flip_back(from_mirror[None])[0].roll(1, dims=-1)
    assert (shifted - expected).abs().max() > 0.1


def test_crf_keypoint_maps_are_local_marginal_mass(tmp_path):
    cfg = quick_config()
    save_model_file(tmp_path / "b.pt", run_model(cfg).state_dict(), cfg)
    model = run_model(quick_config(**{"train.mode": "crf", "train.backbone_checkpoint": str(tmp_path / "b.pt"),
                                             "model.crf_window": 3}))
    images = torch.randn(1, 3, 128, 96)
    with torch.no_grad():
        maps = model.keypoint_maps(images)
        probs = model(images).log_marginals.exp()
    assert maps.min() >= 0 and maps.max() <= 1 + 1e-5
    r, (h, w) = model.score_radius, probs.shape[-2:]
    assert r >= 1
    # Around joint 0's most probable pixel (kept off the border), where the sums are far from zero.
    y, x = divmod(int(probs[0, 0].argmax()), w)
    y, x = min(max(y, r), h - r - 1), min(max(x, r), w - r - 1)
    window = probs[0, :, y - r:y + r + 1, x - r:x + r + 1].sum((1, 2))
    assert window[0] > 0.01
    torch.testing.assert_close(maps[0, :, y, x], window)
    torch.testing.assert_close(maps[0, :, 0, 0], probs[0, :, :r + 1, :r + 1].sum((1, 2)))  # a corner sees less
