"""Pose networks: published parameter counts, shapes, and the MAC counter against hand computation."""

import typing

import pytest
import torch
from torch import nn

from distpose.cli import main
from distpose.config import Backbone
from distpose.models.factory import BACKBONES, build_backbone, count_macs, model_info

# Published parameter counts with 17 joints (HRNet paper, Table 1; SimpleBaseline as in its repo).
PUBLISHED_MILLIONS = {"hrnet_w32": 28.54, "hrnet_w48": 63.60, "resnet50": 34.00}


@pytest.mark.parametrize("name", sorted(PUBLISHED_MILLIONS))
def test_parameter_counts_match_the_papers(name):
    params = model_info(name, (128, 96)).params
    assert round(params / 1e6, 2) == PUBLISHED_MILLIONS[name]


def test_factory_covers_the_config_schema():
    assert set(BACKBONES) == set(typing.get_args(Backbone))


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
