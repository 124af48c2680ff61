"""The optimizer step shared by the DeepSpeed worker and the plain benchmark loop."""

import pytest
import torch

from distpose.config import Config, load_config
from distpose.data.codec import HeatmapCodec
from distpose.models.losses import heatmap_mse
from distpose.models.pose import PoseOutput
from distpose.train.modes import ModeLoss
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
    loss = micro_batch_loss(model, batch, ModeLoss(cfg), torch.device("cpu"))
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    images = ((batch["image"].double() / 255 - mean.double()) / std.double()).permute(0, 3, 1, 2)
    target, weight = codec.encode(batch["joints"], batch["visible"])
    expected = heatmap_mse(model.double().net(images), target.double(), weight)
    assert loss.requires_grad and torch.allclose(loss.double(), expected, rtol=1e-4)


def test_the_joint_loss_adds_the_weighted_heatmap_mse_and_trains_the_heatmap_head(tmp_path):
    from distpose.models.losses import crf_marginal_loss
    from distpose.models.model_file import save_model_file
    from distpose.train.modes import parameter_groups, run_model

    torch.manual_seed(0)
    backbone = Config()
    save_model_file(tmp_path / "b.pt", run_model(backbone).state_dict(), backbone)
    joint = ["train.mode=joint", f"train.backbone_checkpoint={tmp_path / 'b.pt'}", "model.crf_window=2"]
    plain, weighted = (load_config(None, [*joint, f"train.heatmap_loss_weight={w}"]) for w in (0, 250))
    height, width = plain.data.input_size
    joints, visible = torch.rand(2, 17, 2) * torch.tensor([width, height]), torch.rand(2, 17) > 0.3
    model = run_model(plain)
    output = model(torch.randn(2, 3, height, width))
    crf_target, crf_weight = HeatmapCodec(plain.data.input_size, plain.data.heatmap_size,
                                          plain.model.crf_target_sigma).encode(joints, visible)
    hm_target, hm_weight = HeatmapCodec(plain.data.input_size, plain.data.heatmap_size,
                                        plain.data.sigma).encode(joints, visible)
    ce = crf_marginal_loss(output.log_marginals, crf_target, crf_weight)
    mse = heatmap_mse(output.heatmaps.float(), hm_target, hm_weight)
    assert torch.equal(ModeLoss(plain)(output, joints, visible), ce)
    torch.testing.assert_close(ModeLoss(weighted)(output, joints, visible), ce + 250 * mse)
    head = set(model.backbone.final_layer.parameters())
    def trained(cfg):
        return {p for group in parameter_groups(model, cfg.train) for p in group["params"]}
    assert not head & trained(plain) and head <= trained(weighted)


@pytest.mark.parametrize("mode", ["crf", "joint"])
def test_each_parameter_learns_at_its_groups_rate(tmp_path, mode):
    from distpose.models.model_file import save_model_file
    from distpose.train.modes import parameter_groups, run_model

    backbone = Config()
    save_model_file(tmp_path / "b.pt", run_model(backbone).state_dict(), backbone)
    cfg = load_config(None, [f"train.mode={mode}", f"train.backbone_checkpoint={tmp_path / 'b.pt'}",
                             "model.crf_window=2", "model.crf_gains=true", "train.lr=0.002",
                             "train.backbone_lr_scale=0.1", "train.crf_gain_lr_scale=30"])
    model = run_model(cfg)
    rate = {id(p): group["lr"] for group in parameter_groups(model, cfg.train) for p in group["params"]}
    assert sum(len(g["params"]) for g in parameter_groups(model, cfg.train)) == len(rate)  # none twice
    assert parameter_groups(model, cfg.train)[0]["lr"] == pytest.approx(0.002)  # the rate the run logs (group 0)
    crf = model.crf
    for parameter in (crf.log_temperature, crf.log_edge_weight):
        assert rate[id(parameter)] == pytest.approx(0.06)
    for parameter in (crf.pairwise, crf.unary_head.weight):
        assert rate[id(parameter)] == pytest.approx(0.002)
    head = set(model.backbone.final_layer.parameters())  # trains only with train.heatmap_loss_weight
    backbone_rates = [rate.get(id(p)) for p in model.backbone.parameters() if p not in head]
    if mode == "joint":
        assert backbone_rates == pytest.approx([0.0002] * len(backbone_rates))
    else:
        assert backbone_rates == [None] * len(backbone_rates)
