"""Neighbour class context (``--class_context``): each cell's class hypotheses re-weighed by the
classes the cells around it are detected as.

Cells of one type cluster in tissue (epithelium in glands, lymphocytes in infiltrates,
spindle cells in stroma), while the box head classifies each cell from a 7 x 7 window of its
own features. On held-out CoNSeP, giving the same detections their true classes would lift
class-mean AP50 from 0.22 to 0.36 (``benchmarks/accuracy.py --post ...+trueclass``), so the
classes, not the cells, are what is missing; this uses what the image itself says about them.

Every detection is one class hypothesis of a cell: the model keeps each RoI once per class
above ``--box_score_thresh``, and the merge drops duplicates of a class only. Detections with
box IoU >= ``SAME_CELL`` are taken as one cell; the score mass of a cell's hypotheses per class
is its class distribution, and the neighbours' (the other cells, weighed by distance) is a
prior for it. Each hypothesis then gets its share of its cell's mass under the posterior:

    prior_k(c) = (sum_j w_jk mass_j(c) + 1 / C) / (sum_j w_jk mass_j + 1)     j: hypotheses not of k's cell
    score_k   <- score_k * prior_k(label_k) ** a / sum_c share_k(c) prior_k(c) ** a

with w_jk = exp(-d_jk^2 / 2 (reach r_k)^2), d the distance between box centres, r_k the
geometric mean side of k's box (so the neighbourhood scales with the cell, the same at any
input scale), share_k(c) the part of k's cell's score mass in class c, and a the strength.
A cell's hypotheses keep their total, moved between classes: an isolated cell (prior 1 / C
for every class, the pseudo-count) and a cell with one hypothesis are unchanged, and a score
above 1 cannot arise from scores that summed to at most 1.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_iou

SAME_CELL = 0.5  # box IoU at which two detections are taken as hypotheses of one cell
CHUNK = 1024  # detections rescored per pass: [CHUNK, N] matrices, bounded memory on a whole slide


def rescore(boxes: Tensor, labels: Tensor, scores: Tensor, classes: int, strength: float,
            reach: float = 3.0) -> Tensor:
    """``scores`` [N] of one image's detections (``boxes`` [N, 4] x1 y1 x2 y2, ``labels`` [N] in
    1..``classes``) moved between each cell's class hypotheses by its neighbours' classes, to
    the power ``strength`` (0: unchanged). All on the detections' device, without a host sync."""
    if strength == 0 or len(scores) == 0:
        return scores
    boxes = boxes.float()
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    sides = (boxes[:, 2:] - boxes[:, :2]).clamp(min=1e-3)
    radius = reach * sides.prod(dim=1).sqrt()
    mass = torch.zeros((len(scores), classes), device=scores.device)
    mass[torch.arange(len(scores), device=scores.device), labels - 1] = scores.float()  # [N, C]: each hypothesis
    factors = []
    for start in range(0, len(scores), CHUNK):  # chunks of detections: N is a shape, no sync
        part = slice(start, start + CHUNK)
        same = box_iou(boxes[part], boxes) >= SAME_CELL  # [chunk, N], k's own hypotheses included
        near = torch.exp(-torch.cdist(centres[part], centres).square() / (2 * radius[part, None].square()))
        evidence = (near * ~same) @ mass  # [chunk, C]: the neighbours' score mass per class
        prior = ((evidence + 1 / classes) / (evidence.sum(dim=1, keepdim=True) + 1)).pow(strength)
        cell = same.float() @ mass  # [chunk, C]: k's cell's score mass per class
        expected = (cell * prior).sum(dim=1) / cell.sum(dim=1).clamp(min=1e-12)
        factors.append(prior.gather(1, (labels[part] - 1)[:, None]).squeeze(1) / expected.clamp(min=1e-12))
    return scores * torch.cat(factors).to(scores.dtype)
