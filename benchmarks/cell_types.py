"""A second opinion on each detected cell's class, from its shape and stain: the experiment
behind ``accuracy.py``'s ``+types`` (benchmarks/RESULTS.md: it lost, so it is no option).

``+trueclass`` (benchmarks/RESULTS.md) showed that the four-class gap is classification: the
model finds the rare cells and calls them something else. Cell types differ in what a few
numbers capture (inflammatory nuclei are small, dark and round, spindle nuclei elongated,
epithelial ones large and pale), which is how QuPath's object classifiers type cells. This
module measures those numbers for a batch of masks at once and fits a small classifier on the
training cells; a detection's score for class c then becomes the model's probability times the
classifier's (a product of the two experts, which within one class ranks the cells the way
their combined posterior does, up to each cell's normaliser).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

RING = 3  # pixels of surroundings measured around each cell (its contrast with them)
FEATURES = 19


def cell_features(image: torch.Tensor, masks: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    """[N, FEATURES] shape and stain measurements of the cells ``masks`` (bool [N, H, W]) of
    ``image`` (float [3, H, W], 0-1), in this order: log area, elongation (minor / major axis),
    log variances along the two axes, ellipse fill, circularity, intensity spread, mean RGB,
    and mean optical density (the linear span of H&E's stains) inside each cell, in a ring
    around it, and their difference. Batched over ``chunk`` cells at a time: each full-image
    temporary holds ``chunk`` masks, not N."""
    if len(masks) > chunk:
        return torch.cat([cell_features(image, masks[k:k + chunk], chunk) for k in range(0, len(masks), chunk)])
    n, h, w = masks.shape
    if n == 0:
        return image.new_zeros((0, FEATURES))
    m = masks.to(image.dtype)
    area = m.sum((1, 2)).clamp(min=1.0)
    ys = torch.arange(h, dtype=image.dtype, device=image.device)
    xs = torch.arange(w, dtype=image.dtype, device=image.device)
    rows, cols = m.sum(2), m.sum(1)  # [N, H], [N, W]
    cy, cx = rows @ ys / area, cols @ xs / area
    dy, dx = ys - cy[:, None], xs - cx[:, None]  # central moments: no cancellation of large squares
    myy, mxx = (rows * dy * dy).sum(1) / area, (cols * dx * dx).sum(1) / area
    mxy = torch.einsum("nhw,nh,nw->n", m, dy, dx) / area
    half, det = (mxx + myy) / 2, mxx * myy - mxy * mxy
    disc = (half * half - det).clamp(min=0).sqrt()
    major, minor = (half + disc).clamp(min=1 / 12), (half - disc).clamp(min=1 / 12)  # a pixel's own variance
    eroded = -F.max_pool2d(-m[:, None], 3, 1, 1)[:, 0]
    # boundary pixels, not edges: a large disc's circularity is about pi^2 / 16, a tiny cell's more
    perimeter = (m - eroded).sum((1, 2)).clamp(min=1.0)
    ring = F.max_pool2d(m[:, None], 2 * RING + 1, 1, RING)[:, 0] - m
    ring_area = ring.sum((1, 2)).clamp(min=1.0)
    density = -torch.log(image.clamp(min=1 / 255))  # optical density: stains add up linearly in it
    rgb = torch.einsum("nhw,chw->nc", m, image) / area[:, None]
    gray = image.mean(0)
    level = m.flatten(1) @ gray.flatten() / area
    spread = torch.einsum("nhw,nhw->n", m, (gray - level[:, None, None]) ** 2) / area
    inside = torch.einsum("nhw,chw->nc", m, density) / area[:, None]
    around = torch.einsum("nhw,chw->nc", ring, density) / ring_area[:, None]
    shape = torch.stack([area.log(), (minor / major).sqrt(), major.log(), minor.log(),
                         area / (4 * math.pi * (major * minor).sqrt()), 4 * math.pi * area / perimeter ** 2,
                         spread.sqrt()], 1)
    return torch.cat([shape, rgb, inside, around, inside - around], 1)


class CellTypeClassifier(nn.Module):
    """A small MLP over standardised ``cell_features``: class probabilities [N, classes]."""

    def __init__(self, classes: int, hidden: int = 64) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(FEATURES))
        self.register_buffer("std", torch.ones(FEATURES))
        self.net = nn.Sequential(nn.Linear(FEATURES, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, classes))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net((features - self.mean) / self.std).softmax(1)

    def fit(self, features: torch.Tensor, labels: torch.Tensor, steps: int = 500, seed: int = 0) -> float:
        """Full-batch Adam on the cross-entropy of ``labels`` (0-based); the final training
        loss. Seeded, so one training set gives one classifier."""
        self.mean.copy_(features.mean(0))
        self.std.copy_(features.std(0).clamp(min=1e-6))
        generator = torch.Generator().manual_seed(seed)
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                bound = 1 / math.sqrt(layer.in_features)
                with torch.no_grad():
                    layer.weight.copy_(torch.rand(layer.weight.shape, generator=generator) * 2 * bound - bound)
                    layer.bias.zero_()
        optimiser = torch.optim.Adam(self.net.parameters(), lr=1e-2, weight_decay=1e-4)
        x = (features - self.mean) / self.std
        for _ in range(steps):
            optimiser.zero_grad()
            loss = F.cross_entropy(self.net(x), labels)
            loss.backward()
            optimiser.step()
        return float(loss.detach())


def rescored(scores: torch.Tensor, labels: torch.Tensor, probs: torch.Tensor, power: float = 1.0) -> torch.Tensor:
    """Each detection's score times the classifier's probability of its class (labels 1-based),
    to ``power`` (0: unchanged)."""
    return scores * probs.gather(1, (labels - 1)[:, None])[:, 0].clamp(min=1e-6) ** power
