"""Attention add-ons for Mask R-CNN: a transformer neck between the FPN and the RPN, and a
spatial-channel attention block at the entrance of the mask head."""
from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import DeformConv2d

LAYER_SCALE_INIT = 0.1


class FPNTransformer(nn.Module):
    """Lets every FPN level see every other position and scale before the RPN and RoI heads.

    Each level is pooled to ``pool_size`` x ``pool_size`` tokens so attention costs the same
    for any image size; the transformer's output and a softmax-gated fusion of all levels
    are added back to the levels as residuals, so shapes and keys never change.
    """

    def __init__(self, *, in_channels: int = 256, num_levels: int = 5, pool_size: int = 14, num_heads: int = 8,
                 num_layers: int = 2, dim_feedforward: int = 1024, dropout: float = 0.1) -> None:
        super().__init__()
        if in_channels % 4:
            raise ValueError(f"in_channels must be divisible by 4 for the 2-D sine encoding, got {in_channels}")
        self.in_channels = in_channels
        self.num_levels = num_levels
        self.pool_size = pool_size
        # shared across levels: the level embedding already tells them apart
        self.proj_in = nn.Conv2d(in_channels, in_channels, 1)
        self.proj_out = nn.Conv2d(in_channels, in_channels, 1)
        self.level_embed = nn.Parameter(torch.empty(num_levels, in_channels))
        nn.init.normal_(self.level_embed, std=0.02)
        layer = nn.TransformerEncoderLayer(in_channels, num_heads, dim_feedforward, dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers, norm=nn.LayerNorm(in_channels),
                                             enable_nested_tensor=False)
        self.gate = nn.Conv2d(num_levels * in_channels, num_levels, 1)
        self.attn_scale = nn.Parameter(torch.full((in_channels,), LAYER_SCALE_INIT))
        self.fuse_scale = nn.Parameter(torch.full((in_channels,), LAYER_SCALE_INIT))
        self._pos_cache: dict[tuple[int, torch.device, torch.dtype], Tensor] = {}

    def forward(self, features: OrderedDict[str, Tensor]) -> OrderedDict[str, Tensor]:
        if len(features) != self.num_levels:
            raise ValueError(f"FPNTransformer was built for {self.num_levels} levels but got {len(features)} "
                             f"({list(features)}); set num_levels to the FPN's level count")
        names, levels = list(features), list(features.values())
        levels = self._attend(levels)
        levels = self._fuse(levels)
        return OrderedDict(zip(names, levels))

    def positional_encoding(self, device: torch.device, dtype: torch.dtype) -> Tensor:
        """[pool_size**2, C] encoding, cached per device and dtype: it never changes, and
        rebuilding it every forward would cost a host-side build and a copy per step."""
        key = (self.pool_size, torch.device(device), dtype)
        if key not in self._pos_cache:
            self._pos_cache[key] = _sine_encoding_2d(self.pool_size, self.in_channels, device).to(dtype)
        return self._pos_cache[key]

    def _attend(self, levels: list[Tensor]) -> list[Tensor]:
        r = self.pool_size
        # pooling and a 1x1 conv commute, so project the r x r grid, not the full map
        grids = [self.proj_in(F.adaptive_avg_pool2d(level, r)) for level in levels]
        pos = self.positional_encoding(grids[0].device, grids[0].dtype)
        tokens = torch.cat([grid.flatten(2).transpose(1, 2) + pos + self.level_embed[i].to(grid.dtype)
                            for i, grid in enumerate(grids)], dim=1)
        tokens = self.encoder(tokens)
        out = []
        for level, chunk in zip(levels, tokens.split(r * r, dim=1)):
            grid = self.proj_out(chunk.transpose(1, 2).reshape(level.shape[0], -1, r, r))
            out.append(level + _channel_scale(self.attn_scale, _resize(grid, level.shape[-2:])))
        return out

    def _fuse(self, levels: list[Tensor]) -> list[Tensor]:
        descriptors = torch.cat([level.mean(dim=(2, 3)) for level in levels], dim=1)
        weights = self.gate(descriptors[:, :, None, None]).softmax(dim=1)
        reference = levels[len(levels) // 2].shape[-2:]
        fused = sum(weights[:, i:i + 1] * _resize(level, reference) for i, level in enumerate(levels))
        return [level + _channel_scale(self.fuse_scale, _resize(fused, level.shape[-2:])) for level in levels]


class BackboneWithAttention(nn.Module):
    """A BackboneWithFPN whose maps pass through the neck, so the RPN and the RoI heads both
    see the enhanced features; ``out_channels`` is what MaskRCNN reads from a backbone."""

    def __init__(self, backbone: nn.Module, neck: FPNTransformer) -> None:
        super().__init__()
        if backbone.out_channels != neck.in_channels:
            raise ValueError(f"backbone gives {backbone.out_channels} channels but the neck expects {neck.in_channels}")
        self.backbone = backbone
        self.neck = neck
        self.out_channels: int = backbone.out_channels

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        return self.neck(self.backbone(x))


class SpatialChannelTransformer(nn.Module):
    """Reweights RoI features by channel (ECA) and by a deformable spatial gate that can follow
    irregular cell outlines, then mixes channels with a 1x1 feed-forward; both stages are
    residual so the stock mask head behind it starts from features close to its usual ones."""

    def __init__(self, channels: int = 256, eca_kernel: int | None = None, deform_kernel: int = 3,
                 ffn_ratio: int = 2, dropout: float = 0.1) -> None:
        super().__init__()
        eca_kernel = _eca_kernel_size(channels) if eca_kernel is None else eca_kernel
        for name, k in (("eca_kernel", eca_kernel), ("deform_kernel", deform_kernel)):
            if k < 1 or k % 2 == 0:
                raise ValueError(f"{name} must be a positive odd number to keep the size, got {k}")
        self.channels = channels
        self.eca = nn.Conv1d(1, 1, eca_kernel, padding=eca_kernel // 2, bias=False)
        self.offset = nn.Conv2d(channels, 2 * deform_kernel * deform_kernel, deform_kernel, padding=deform_kernel // 2)
        # zero offsets start as a plain conv; the bilinear sampling still gives them gradients
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)
        self.deform = DeformConv2d(channels, channels, deform_kernel, padding=deform_kernel // 2)
        self.norm = nn.BatchNorm2d(channels)
        self.ffn = nn.Sequential(
            nn.Conv2d(channels, channels * ffn_ratio, 1), nn.GELU(), nn.Dropout(dropout),
            nn.Conv2d(channels * ffn_ratio, channels, 1),
        )
        self.attn_scale = nn.Parameter(torch.full((channels,), LAYER_SCALE_INIT))
        self.ffn_scale = nn.Parameter(torch.full((channels,), LAYER_SCALE_INIT))

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[0] == 0:
            return _touch_parameters(self, x) + self._empty_norm(x)
        channel = self._channel_attention(x)
        gated = channel * self._spatial_gate(channel)
        x = x + _channel_scale(self.attn_scale, self.norm(gated))
        return x + _channel_scale(self.ffn_scale, self.ffn(x))

    def _empty_norm(self, x: Tensor) -> Tensor:
        """The norm of no RoIs: it still runs, since under --sync_bn it is a collective every
        other rank waits in, and its statistics are put back (on the device), since with no RoI
        on any rank SyncBatchNorm would pull them toward zero."""
        stats = [s for s in (self.norm.running_mean, self.norm.running_var) if s is not None]
        saved = [s.clone() for s in stats]
        out = self.norm(x)
        with torch.no_grad():
            for stat, value in zip(stats, saved):
                stat.copy_(value)
        return out

    def _channel_attention(self, x: Tensor) -> Tensor:
        descriptor = x.mean(dim=(2, 3))[:, None, :]
        return x * self.eca(descriptor).sigmoid().transpose(1, 2)[..., None]

    def _spatial_gate(self, x: Tensor) -> Tensor:
        """Run in float32: deformable convolution kernels lack low-precision support, and
        offsets are sampling positions that bf16 would round to whole pixels."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            x32 = x.float()
            gate = self.deform(x32, self.offset(x32)).sigmoid()
        return gate.to(x.dtype)


def count_parameters(module: nn.Module) -> int:
    """Parameter count, shared tensors once (the same rule as ``module.parameters()``)."""
    return sum(p.numel() for p in module.parameters())


def _sine_encoding_2d(size: int, channels: int, device: torch.device | str,
                      temperature: float = 10000.0) -> Tensor:
    """DETR's sine encoding on a size x size grid: y in the first half of the channels, x in
    the second, sin/cos interleaved; returned flattened row-major as [size*size, channels]."""
    feats = channels // 2
    coords = (torch.arange(size, device=device, dtype=torch.float32) + 0.5) / size * 2 * math.pi
    dim_t = temperature ** (2 * (torch.arange(feats, device=device) // 2).float() / feats)
    angles = coords[:, None] / dim_t
    enc = torch.stack((angles[:, 0::2].sin(), angles[:, 1::2].cos()), dim=2).flatten(1)
    y = enc[:, None, :].expand(size, size, feats)
    x = enc[None, :, :].expand(size, size, feats)
    return torch.cat((y, x), dim=2).reshape(size * size, channels)


def _resize(x: Tensor, size: torch.Size | tuple[int, int]) -> Tensor:
    """Average when shrinking both sides (bilinear would skip pixels and their gradients),
    bilinear otherwise."""
    size = tuple(size)
    if x.shape[-2:] == size:
        return x
    if size[0] <= x.shape[-2] and size[1] <= x.shape[-1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def _channel_scale(scale: Tensor, x: Tensor) -> Tensor:
    return scale.to(x.dtype)[None, :, None, None] * x


def _eca_kernel_size(channels: int, gamma: int = 2, b: int = 1) -> int:
    """ECA-Net's adaptive kernel: wider channel neighbourhoods for wider layers."""
    t = int(abs((math.log2(channels) + b) / gamma))
    return t if t % 2 else t + 1


def _touch_parameters(module: nn.Module, x: Tensor) -> Tensor:
    """``x`` unchanged but tied to every parameter with a zero gradient, so DDP without
    find_unused_parameters still gets a gradient for each of them when there are no RoIs."""
    return x + sum(p.sum() for p in module.parameters()) * 0
