from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn
from torchvision.models.detection import MaskRCNN

from attention_modules import BackboneWithAttention, FPNTransformer, SpatialChannelTransformer, count_parameters

NAMES = ("0", "1", "2", "3", "pool")
ODD_SIZES = ((25, 37), (13, 19), (7, 10), (4, 5), (2, 3))
SMALL = {"in_channels": 32, "pool_size": 4, "num_heads": 4, "num_layers": 1, "dim_feedforward": 64}


def _levels(channels: int, sizes=ODD_SIZES, batch: int = 2) -> OrderedDict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return OrderedDict((n, torch.randn(batch, channels, h, w, generator=gen)) for n, (h, w) in zip(NAMES, sizes))


def _rois(count: int, channels: int = 16) -> torch.Tensor:
    return torch.randn(count, channels, 14, 14, generator=torch.Generator().manual_seed(1))


def _assert_every_parameter_learns(module: nn.Module) -> None:
    for name, p in module.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert p.grad.abs().sum() > 0, f"{name} got an all-zero gradient"


class FakeBackbone(nn.Module):
    out_channels = 256

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return OrderedDict((n, x.mean(1, keepdim=True).expand(-1, 256, -1, -1)[..., ::2 ** (i + 2), ::2 ** (i + 2)])
                           for i, n in enumerate(NAMES))


def test_neck_at_defaults_keeps_keys_and_odd_shapes() -> None:
    features = _levels(256)
    out = FPNTransformer().eval()(features)
    assert list(out) == list(NAMES)
    assert {k: v.shape for k, v in out.items()} == {k: v.shape for k, v in features.items()}


@pytest.mark.parametrize("sizes", [((5, 7), (3, 5), (2, 3), (1, 2), (1, 1)), ((9, 9), (5, 5), (3, 3), (2, 2), (1, 1))])
def test_neck_handles_levels_smaller_than_pool_size(sizes) -> None:
    features = _levels(32, sizes, batch=3)
    for train in (True, False):
        out = FPNTransformer(**SMALL).train(train)(features)
        assert all(out[k].shape == features[k].shape and torch.isfinite(out[k]).all() for k in NAMES)


def test_neck_rejects_wrong_level_count() -> None:
    features = _levels(32)
    del features["pool"]
    with pytest.raises(ValueError, match="5 levels but got 4"):
        FPNTransformer(**SMALL)(features)


def test_every_neck_parameter_gets_a_gradient() -> None:
    neck = FPNTransformer(**{**SMALL, "num_layers": 2}, dropout=0.0).train()
    out = neck(_levels(32))
    sum((v * torch.randn_like(v)).sum() for v in out.values()).backward()
    _assert_every_parameter_learns(neck)


def test_every_mask_attention_parameter_gets_a_gradient() -> None:
    block = SpatialChannelTransformer(16, dropout=0.0).train()
    out = block(_rois(3))
    (out * torch.randn_like(out)).sum().backward()
    _assert_every_parameter_learns(block)
    assert block.offset.weight.grad.abs().sum() > 0  # zero-initialised, still learns


@pytest.mark.parametrize("train", [True, False])
def test_mask_attention_with_no_rois(train: bool) -> None:
    """No RoIs: the BatchNorm still runs once (under --sync_bn it is a collective the other
    ranks wait in), its statistics unchanged, and every parameter gets a (zero) gradient."""
    block = SpatialChannelTransformer().train(train)
    running, spread = block.norm.running_mean.clone(), block.norm.running_var.clone()
    calls = []
    block.norm.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    out = block(torch.zeros(0, 256, 14, 14))
    assert out.shape == (0, 256, 14, 14)
    assert calls == [0]
    assert torch.equal(block.norm.running_mean, running) and torch.equal(block.norm.running_var, spread)
    if train:
        out.sum().backward()
        assert all(p.grad is not None for p in block.parameters())


def test_mask_attention_single_roi_in_train_mode_and_defaults() -> None:
    assert SpatialChannelTransformer().train()(_rois(1, 256)).shape == (1, 256, 14, 14)
    assert SpatialChannelTransformer(16, eca_kernel=3).eca.kernel_size == (3,)
    with pytest.raises(ValueError):
        SpatialChannelTransformer(16, eca_kernel=4)


def test_eval_is_deterministic() -> None:
    neck, block = FPNTransformer(**SMALL).eval(), SpatialChannelTransformer(16).eval()
    features, rois = _levels(32), _rois(4)
    with torch.no_grad():
        first, second = neck(features), neck(features)
        assert all(torch.equal(first[k], second[k]) for k in NAMES)
        assert torch.equal(block(rois), block(rois))


@pytest.mark.parametrize("train", [True, False])
def test_bf16_autocast_is_finite(train: bool) -> None:
    neck, block = FPNTransformer(**SMALL).train(train), SpatialChannelTransformer(16).train(train)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = neck(_levels(32))
        rois = block(_rois(4))
    assert all(torch.isfinite(v).all() for v in out.values())
    assert rois.shape == (4, 16, 14, 14) and torch.isfinite(rois).all()
    if train:
        (sum(v.float().sum() for v in out.values()) + rois.float().sum()).backward()
        assert torch.isfinite(block.offset.weight.grad).all()


def test_positional_encoding_is_cached_outside_the_state_dict() -> None:
    neck = FPNTransformer(**SMALL).eval()
    features = _levels(32)
    neck(features)
    cached = neck.positional_encoding(torch.device("cpu"), torch.float32)
    neck(features)
    assert neck.positional_encoding(torch.device("cpu"), torch.float32) is cached
    assert len(neck._pos_cache) == 1
    assert cached.shape == (SMALL["pool_size"] ** 2, 32)
    assert not any("pos" in k for k in neck.state_dict())


def test_backbone_wrapper_keeps_out_channels_and_feeds_mask_rcnn() -> None:
    wrapped = BackboneWithAttention(FakeBackbone(), FPNTransformer(pool_size=4, num_layers=1))
    assert wrapped.out_channels == 256
    features = wrapped(torch.randn(1, 3, 64, 96))
    assert list(features) == list(NAMES) and features["0"].shape == (1, 256, 16, 24)
    assert any(k.startswith("neck.") for k in wrapped.state_dict())
    model = MaskRCNN(wrapped, num_classes=2, min_size=64, max_size=64).eval()
    model.roi_heads.mask_head = nn.Sequential(SpatialChannelTransformer(), model.roi_heads.mask_head)
    with torch.no_grad():
        (result,) = model([torch.rand(3, 64, 64)])
    assert result["masks"].shape[1:] == (1, 64, 64)


def test_backbone_wrapper_rejects_channel_mismatch() -> None:
    with pytest.raises(ValueError, match="channels"):
        BackboneWithAttention(FakeBackbone(), FPNTransformer(**SMALL))


def test_count_parameters_counts_shared_tensors_once() -> None:
    shared = nn.Linear(3, 4)  # 3 x 4 weights + 4 biases
    assert count_parameters(nn.Sequential(shared, nn.ReLU(), shared)) == 16
    assert count_parameters(nn.Sequential(shared, nn.Linear(4, 2))) == 16 + 10
    total = count_parameters(FPNTransformer()) + count_parameters(SpatialChannelTransformer())
    assert 2_000_000 <= total <= 3_500_000
