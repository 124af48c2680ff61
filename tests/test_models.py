"""Pose networks: published parameter counts, shapes, and the MAC counter against hand computation."""

import pytest
import torch
from torch import nn

from distpose.commands import main
from distpose.config import load_config
from distpose.data.codec import HeatmapCodec
from distpose.data.loader import eval_loader
from distpose.data.transforms import normalize_images
from distpose.models.factory import build_backbone, count_macs, model_info
from distpose.models.losses import heatmap_mse
from distpose.models.registry import BACKBONES

# Published parameter counts with 17 joints (HRNet paper, Table 1; SimpleBaseline as in its repo).
PUBLISHED_MILLIONS = {"hrnet_w32": 28.54, "hrnet_w48": 63.60, "resnet50": 34.00}


@pytest.mark.parametrize("name", sorted(PUBLISHED_MILLIONS))
def test_parameter_counts_match_the_papers(name):
    params = model_info(name, (128, 96)).params
    assert round(params / 1e6, 2) == PUBLISHED_MILLIONS[name]


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_registered_backbone_is_built_by_its_modules_function(name):
    """The registry names a module and the function of the backbone's name in it; the network it builds maps an
    input of the registry's input multiple to heatmaps at stride 4."""
    spec = BACKBONES[name]
    model = build_backbone(name).eval()
    assert type(model).__module__ == f"distpose.models.{spec.module}"
    size = 4 * spec.input_multiple
    with torch.no_grad():
        assert model(torch.zeros(1, 3, size, size)).shape[-2:] == (size // 4, size // 4)


@pytest.mark.parametrize("name", ["cnn_small", "hrnet_small", "resnet50"])
@pytest.mark.parametrize("size", [(128, 96), (256, 192)])
def test_heatmaps_at_stride_4_and_features_feed_the_final_layer(name, size):
    model = build_backbone(name).eval()
    images = torch.randn(2, 3, *size)
    with torch.no_grad():
        features = model.features(images)
        heatmaps = model(images)
    assert tuple(heatmaps.shape) == (2, 17, size[0] // 4, size[1] // 4)
    assert features.shape[1] == model.feature_channels
    torch.testing.assert_close(model.final_layer(features), heatmaps)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_fresh_heatmaps_start_near_zero(name):
    """Targets are Gaussians peaking at 1 on a background of 0: a fresh network's heatmaps must start
    near 0, not at the magnitude of the features (PyTorch's default final conv gives HRNet's summed
    branches heatmaps with an RMS above 1)."""
    torch.manual_seed(0)
    model = build_backbone(name).train()
    with torch.no_grad():
        heatmaps = model(torch.randn(2, 3, 64, 64))
    assert float(heatmaps.pow(2).mean().sqrt()) < 0.1  # a tenth of a target peak


@pytest.mark.parametrize("name", ["cnn_small", "hrnet_small"])
def test_a_fixed_batch_is_learned_in_forty_steps(name, synth_shards):
    """40 Adam steps (lr 1e-3, the paper's rate) on one batch of 8 real crops drive the heatmap loss below
    0.3 x the loss of all-zero heatmaps: the network learns where the joints are, not merely to shrink
    its output (from PyTorch's default initialisation it stayed above 0.36 x, HRNet above 1 x)."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    cfg = load_config(None, [f"data.shards={synth_shards}", "data.input_size=[96,64]", "data.heatmap_size=[24,16]",
                             "data.batch_size=8", "data.loader_workers=0"])
    batch = next(iter(eval_loader(cfg.data)))
    target, weight = HeatmapCodec(cfg.data.input_size, cfg.data.heatmap_size, cfg.data.sigma).encode(
        batch["joints"], batch["visible"])
    images = normalize_images(batch["image"])
    model = build_backbone(name).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(40):
        loss = heatmap_mse(model(images), target, weight)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    zero = heatmap_mse(torch.zeros_like(target), target, weight)
    assert weight.sum() > 0 and loss.item() < 0.3 * zero.item(), (loss.item(), zero.item())


def test_hrnet_w32_forward_shape():
    with torch.no_grad():
        assert tuple(build_backbone("hrnet_w32").eval()(torch.zeros(1, 3, 128, 96)).shape) == (1, 17, 32, 24)


def test_mac_counter_matches_hand_computation():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.ConvTranspose2d(8, 4, 4, stride=2, padding=1), nn.Flatten(), nn.Linear(4 * 32 * 32, 5))
    macs, out = count_macs(model, torch.zeros(2, 3, 32, 32))
    conv = 2 * 8 * 16 * 16 * (3 * 3 * 3)  # every output element: in_channels x kernel area
    deconv = 2 * 8 * 16 * 16 * (4 * 4 * 4)  # every input element reaches out_channels x kernel area
    linear = 2 * 5 * 4 * 32 * 32
    assert tuple(out.shape) == (2, 5) and macs == conv + deconv + linear


def test_macs_scale_with_the_input_area():
    small, large = model_info("hrnet_small", (128, 96)), model_info("hrnet_small", (256, 192))
    assert large.macs == 4 * small.macs


def test_model_info_cli(capsys):
    assert main(["model-info", "resnet50", "--input", "128x96"]) == 0
    out = capsys.readouterr().out
    assert "resnet50: 34.00M parameters (33,999,697)" in out and "counter: " in out
    with pytest.raises(SystemExit) as exit_info:
        main(["model-info", "resnet50", "--input", "250x190"])
    assert exit_info.value.code == 2
    # The quick configs train cnn_small at 96x72: multiples of its stride 8, not 32.
    assert main(["model-info", "cnn_small", "--input", "96x72"]) == 0
    assert "0.08 GMACs at 96x72, heatmaps 17x24x18" in capsys.readouterr().out
    assert main(["model-info", "hrnet_w32", "--input", "96x72"]) == 2
    assert capsys.readouterr().err.strip() == ("distpose: error: --input 96x72: hrnet_w32 needs multiples of 32 "
                                               "(its lowest-resolution stage is at stride 32)")
