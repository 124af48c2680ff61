"""CNN pose networks: SimpleBaseline (Xiao et al., ECCV 2018) on ResNet-50, and a small CNN for CPU runs.

Both end like HRNet: `features()` gives a stride-4 map and `final_layer` (1x1 conv) the heatmaps,
so a CRF head can replace or refine the last step without knowing which backbone it sits on.
"""

from __future__ import annotations

import torch
from torch import nn

from distpose.models.hrnet import BN_MOMENTUM, BasicBlock, Bottleneck, conv_bn, heatmap_head, make_layer


def deconv_bn(in_ch: int, out_ch: int) -> nn.Sequential:
    """4x4 transposed conv doubling the resolution, as SimpleBaseline's head."""
    return nn.Sequential(
        nn.ConvTranspose2d(in_ch, out_ch, 4, stride=2, padding=1, bias=False),
        nn.BatchNorm2d(out_ch, momentum=BN_MOMENTUM),
        nn.ReLU(inplace=True),
    )


class SimpleBaseline(nn.Module):
    """ResNet-50 (stride 32) + three deconvolutions of 256 channels (back to stride 4) + 1x1 to joints.
    34.00M parameters with 17 joints."""

    def __init__(self, num_joints: int = 17, layers: tuple[int, int, int, int] = (3, 4, 6, 3)):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 64, 7, 2), nn.MaxPool2d(3, stride=2, padding=1))
        widths, in_ch, stages = (64, 128, 256, 512), 64, []
        for i, (width, blocks) in enumerate(zip(widths, layers)):
            stages.append(make_layer(Bottleneck, in_ch, width, blocks, stride=1 if i == 0 else 2))
            in_ch = width * Bottleneck.expansion
        self.resnet = nn.Sequential(*stages)
        self.deconv = nn.Sequential(deconv_bn(in_ch, 256), deconv_bn(256, 256), deconv_bn(256, 256))
        self.feature_channels = 256
        self.final_layer = heatmap_head(256, num_joints)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.deconv(self.resnet(self.stem(images)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.final_layer(self.features(images))


def resnet50(num_joints: int = 17) -> SimpleBaseline:
    return SimpleBaseline(num_joints)


class SmallCNN(nn.Module):
    """A few residual conv blocks down to stride 8 and one deconvolution back to stride 4:
    the SimpleBaseline shape at about 1/50 of its size, quick enough to train on a CPU."""

    def __init__(self, num_joints: int = 17, width: int = 48):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, width // 2, 3, 2), conv_bn(width // 2, width, 3, 2))
        self.body = nn.Sequential(
            make_layer(BasicBlock, width, width, 2),
            make_layer(BasicBlock, width, 2 * width, 2, stride=2),
        )
        self.up = deconv_bn(2 * width, width)
        self.feature_channels = width
        self.final_layer = heatmap_head(width, num_joints)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.up(self.body(self.stem(images)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.final_layer(self.features(images))


def cnn_small(num_joints: int = 17) -> SmallCNN:
    return SmallCNN(num_joints)
