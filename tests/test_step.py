"""The optimizer step shared by the DeepSpeed worker and the plain benchmark loop."""

import torch

from distpose.config import Config
from distpose.data.codec import HeatmapCodec
from distpose.models.losses import heatmap_mse
from distpose.models.pose import PoseOutput
from distpose.train.step import micro_batch_loss, optimizer_step


def test_an_optimizer_step_averages_its_micro_batches_and_hands_each_loss_to_backward():
    batches = iter([{"x": torch.tensor(1.0)}, {"x": torch.tensor(2.0)}, {"x": torch.tensor(6.0)}])
    handed = []
    loss, waited = optimizer_step(batches, 3, lambda b: b["x"] * 2, handed.append)
    assert [float(v) for v in handed] == [2.0, 4.0, 12.0]
    assert float(loss) == 6.0 and waited >= 0.0
    assert next(batches, None) is None  # exactly `accum` batches drawn


class HeatmapsOf(torch.nn.Module):
    """A stand-in network: a 1x1 conv pooled to the heatmap size, returned as the pose model returns it."""

    def __init__(self, heatmap_size):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 17, 1), torch.nn.AdaptiveAvgPool2d(tuple(heatmap_size)))

    def forward(self, images):
        return PoseOutput(self.net(images))


def test_the_micro_batch_loss_is_the_mse_on_normalised_images_and_encoded_targets():
    cfg = Config()
    height, width = cfg.data.input_size
    codec = HeatmapCodec(cfg.data.input_size, cfg.data.heatmap_size, cfg.data.sigma)
    generator = torch.Generator().manual_seed(0)
    batch = {"image": torch.randint(0, 255, (2, height, width, 3), dtype=torch.uint8, generator=generator),
             "joints": torch.rand(2, 17, 2, generator=generator) * torch.tensor([width, height]),
             "visible": torch.ones(2, 17)}
    model = HeatmapsOf(cfg.data.heatmap_size)
    loss = micro_batch_loss(model, batch, codec, "backbone", torch.device("cpu"))
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    images = ((batch["image"].double() / 255 - mean.double()) / std.double()).permute(0, 3, 1, 2)
    target, weight = codec.encode(batch["joints"], batch["visible"])
    expected = heatmap_mse(model.double().net(images), target.double(), weight)
    assert loss.requires_grad and torch.allclose(loss.double(), expected, rtol=1e-4)
