"""Neighbour class context (``--class_context``): a detection's score weighed by how much the
cells around it are detected as its class.

Cells of one type cluster in tissue (epithelium in glands, lymphocytes in infiltrates,
spindle cells in stroma), while the box head classifies each cell from a 7 x 7 window of its
own features. On held-out CoNSeP, giving the same detections their true classes would lift
class-mean AP50 from 0.22 to 0.36 (``benchmarks/accuracy.py --post ...+trueclass``), so the
classes, not the cells, are what is missing; this uses what the image itself says about them.

Every detection is one class hypothesis of a cell (the model keeps each RoI once per class
above ``--box_score_thresh``), so the hypotheses of a neighbour, weighed by their scores, are
its class distribution. For detection k of class c:

    agreement_k = (sum_j w_jk s_j [label_j = c] + 1 / C) / (sum_j w_jk s_j + 1)
    score_k    <- score_k * agreement_k ** strength

over the detections j that are not the same cell (box IoU below ``SAME_CELL``, which also
leaves out k's own hypotheses of the other classes), with w_jk = exp(-d_jk^2 / 2 (reach r_k)^2),
d the distance between box centres and r_k the geometric mean side of k's box: the
neighbourhood scales with the cell, so the flag means the same at any input scale. The
pseudo-count of 1 makes an isolated cell's agreement 1 / C, the same for every class: context
speaks only where there are neighbours. Scores only fall (agreement <= 1), so thresholds on
them keep their meaning as upper bounds.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torchvision.ops import box_iou

SAME_CELL = 0.5  # box IoU at which two detections are taken as hypotheses of one cell
CHUNK = 1024  # detections rescored per pass: a [CHUNK, N] weight matrix, bounded memory on a whole slide


def rescore(boxes: Tensor, labels: Tensor, scores: Tensor, classes: int, strength: float,
            reach: float = 3.0) -> Tensor:
    """``scores`` [N] of one image's detections (``boxes`` [N, 4] x1 y1 x2 y2, ``labels`` [N] in
    1..``classes``) times their neighbours' agreement with their class to the power
    ``strength`` (0: unchanged). All on the detections' device, without a host sync."""
    if strength == 0 or len(scores) == 0:
        return scores
    boxes, weights = boxes.float(), scores.float()
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    sides = (boxes[:, 2:] - boxes[:, :2]).clamp(min=1e-3)
    radius = reach * sides.prod(dim=1).sqrt()
    votes = torch.zeros((len(scores), classes), device=scores.device)
    votes[torch.arange(len(scores), device=scores.device), labels - 1] = weights  # [N, C]: each hypothesis' score
    agreement = []
    for start in range(0, len(scores), CHUNK):  # chunks of detections: N is a shape, no sync
        part = slice(start, start + CHUNK)
        near = torch.exp(-torch.cdist(centres[part], centres).square() / (2 * radius[part, None].square()))
        near = near * (box_iou(boxes[part], boxes) < SAME_CELL)
        evidence = near @ votes  # [chunk, C]: the neighbours' score mass per class
        own = evidence.gather(1, (labels[part] - 1)[:, None]).squeeze(1)
        agreement.append((own + 1 / classes) / (evidence.sum(dim=1) + 1))
    return scores * torch.cat(agreement).pow(strength).to(scores.dtype)
