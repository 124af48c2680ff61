"""HRNet for top-down pose (Sun et al., CVPR 2019), the official pose_hrnet architecture.

Stem of two stride-2 3x3 convs; stage 1: four bottlenecks to 256 channels; stages 2-4 add a branch
each at half the resolution and twice the width, and every module ends by fusing all branches
into each other. The last module keeps only the highest-resolution branch, and a 1x1 conv maps it
to the joint heatmaps. W32 has 28.54M parameters, W48 63.60M, as published.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

BN_MOMENTUM = 0.1


def conv3x3(in_ch: int, out_ch: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)


def conv_bn(in_ch: int, out_ch: int, kernel: int, stride: int = 1, relu: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [
        nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(out_ch, momentum=BN_MOMENTUM),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3x3(in_ch, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes, momentum=BN_MOMENTUM)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes, momentum=BN_MOMENTUM)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + residual)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes, momentum=BN_MOMENTUM)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes, momentum=BN_MOMENTUM)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion, momentum=BN_MOMENTUM)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + residual)


def make_layer(block: type[BasicBlock | Bottleneck], in_ch: int, planes: int, blocks: int,
               stride: int = 1) -> nn.Sequential:
    """`blocks` residual blocks; the first projects the input when its shape changes."""
    downsample = None
    if stride != 1 or in_ch != planes * block.expansion:
        downsample = conv_bn(in_ch, planes * block.expansion, 1, stride, relu=False)
    layers = [block(in_ch, planes, stride, downsample)]
    layers += [block(planes * block.expansion, planes) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class FuseLayer(nn.Module):
    """Output branch i = relu(sum over input branches j of branch j brought to i's resolution and width):
    1x1 conv + nearest upsampling from lower resolutions, strided 3x3 convs from higher ones."""

    def __init__(self, channels: list[int], out_branches: int):
        super().__init__()
        self.paths = nn.ModuleList()
        for i in range(out_branches):
            row = nn.ModuleList()
            for j, c_j in enumerate(channels):
                if j > i:
                    row.append(nn.Sequential(conv_bn(c_j, channels[i], 1, relu=False),
                                             nn.Upsample(scale_factor=2 ** (j - i), mode="nearest")))
                elif j == i:
                    row.append(nn.Identity())
                else:
                    steps = [conv_bn(c_j, c_j, 3, 2) for _ in range(i - j - 1)]
                    steps.append(conv_bn(c_j, channels[i], 3, 2, relu=False))
                    row.append(nn.Sequential(*steps))
            self.paths.append(row)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        return [self.relu(sum(path(x) for path, x in zip(row, xs))) for row in self.paths]


class HighResolutionModule(nn.Module):
    def __init__(self, channels: list[int], blocks: int, multi_scale_output: bool):
        super().__init__()
        self.branches = nn.ModuleList(make_layer(BasicBlock, c, c, blocks) for c in channels)
        self.fuse = FuseLayer(channels, len(channels) if multi_scale_output else 1)

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.fuse([branch(x) for branch, x in zip(self.branches, xs)])


@dataclass(frozen=True)
class HRNetSpec:
    width: int  # channels of the highest-resolution branch; branch b has width * 2**b
    modules: tuple[int, int, int] = (1, 4, 3)  # modules in stages 2, 3, 4
    blocks: int = 4  # basic blocks per branch per module
    stem_blocks: int = 4  # bottlenecks in stage 1
    stem_planes: int = 64  # their inner width (x4 out)


def heatmap_head(in_ch: int, num_joints: int, std: float = 0.001) -> nn.Conv2d:
    """The final 1x1 conv to joint heatmaps, drawn from N(0, std) with zero bias as in HRNet's own
    initialisation. Nothing normalises its output, so it sets the first heatmaps: near zero, where almost
    every target pixel is. With PyTorch's default initialisation HRNet's summed branches start with
    heatmaps far larger than the targets in [0, 1] and spend hundreds of steps unlearning them. The
    layers before it keep PyTorch's default: BatchNorm follows each of them, and on a short schedule
    they learn faster from it than from HRNet's N(0, 0.001) (benchmarks/README.md, Initialising the
    heatmap head)."""
    head = nn.Conv2d(in_ch, num_joints, 1)
    nn.init.normal_(head.weight, std=std)
    nn.init.zeros_(head.bias)
    return head


class HRNet(nn.Module):
    """Backbone + final 1x1 conv: images [B, 3, H, W] -> heatmaps [B, num_joints, H/4, W/4]."""

    def __init__(self, spec: HRNetSpec, num_joints: int = 17):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(3, 64, 3, 2), conv_bn(64, 64, 3, 2))
        self.layer1 = make_layer(Bottleneck, 64, spec.stem_planes, spec.stem_blocks)
        previous = [spec.stem_planes * Bottleneck.expansion]
        self.transitions = nn.ModuleList()
        self.stages = nn.ModuleList()
        for stage, modules in enumerate(spec.modules, start=2):
            channels = [spec.width * 2**b for b in range(stage)]
            self.transitions.append(self._transition(previous, channels))
            last_stage = stage == 1 + len(spec.modules)
            self.stages.append(nn.Sequential(*(
                HighResolutionModule(channels, spec.blocks, multi_scale_output=not (last_stage and m == modules - 1))
                for m in range(modules)
            )))
            previous = channels
        self.feature_channels = spec.width
        self.final_layer = heatmap_head(spec.width, num_joints)

    @staticmethod
    def _transition(previous: list[int], channels: list[int]) -> nn.ModuleList:
        """Adapt existing branches whose width changes, and start the new branch from the lowest one."""
        layers = nn.ModuleList()
        for b, c in enumerate(channels):
            if b < len(previous):
                layers.append(conv_bn(previous[b], c, 3) if previous[b] != c else nn.Identity())
            else:
                layers.append(conv_bn(previous[-1], c, 3, 2))
        return layers

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The highest-resolution branch after the last fusion: [B, width, H/4, W/4]."""
        xs = [self.layer1(self.stem(images))]
        for transition, stage in zip(self.transitions, self.stages):
            xs = [layer(xs[min(b, len(xs) - 1)]) for b, layer in enumerate(transition)]
            xs = stage(xs)
        return xs[0]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.final_layer(self.features(images))


def hrnet_w32(num_joints: int = 17) -> HRNet:
    return HRNet(HRNetSpec(width=32), num_joints)


def hrnet_w48(num_joints: int = 17) -> HRNet:
    return HRNet(HRNetSpec(width=48), num_joints)


def hrnet_small(num_joints: int = 17) -> HRNet:
    """HRNet-W18-Small-v1's layout (one 32-plane bottleneck in stage 1; one module of two basic blocks per
    branch in stages 2-4, widths 16/32/64/128) with the pose head: trains on a CPU in minutes."""
    return HRNet(HRNetSpec(width=16, modules=(1, 1, 1), blocks=2, stem_blocks=1, stem_planes=32), num_joints)
