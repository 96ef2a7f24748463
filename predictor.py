"""The predictor: whole images, tiles and TTA views of one or several models, predicted in
batches on the model's device and merged into one set of cells per image. Training's
validation, inference.py, visualization.py and the benchmarks all predict through it; it
reads no flag and writes no file.

Every tile and view is detected first (boxes only); the image's candidates are chosen across
all of them (``merging.select_candidates``); only those get masks, from the features kept of
their view; duplicates are then dropped by mask overlap.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

import torch
from torch import nn

from coco import detections_to_coco, paste_masks
from class_context import rescore
from detector import detect_boxes, group_ranks
from devices import autocast, counts, prediction_batch, scale_boxes
from masks import PackedMasks, mask_areas
from merging import (average_masks, consensus, greedy_mask_merge, merge_order, same_cell_copies,
                     same_cell_pairs, select_candidates, selected, take, votes)
from model import UNLIMITED, image_cap
from progress import progress
from tiling import Window, cut_flags, max_cover, tile_grid
from tta import View, apply_view, boxes_back, masks_back, views


# Settings of how a run computes rather than of what it predicts (AMP's rounding, and the padding
# of whole images batched together, move results only slightly): a run changing them (the
# out-of-memory fixes, another device) continues an earlier run's record of finished images.
HOW_IT_RUNS = ("batch_size", "use_amp", "feature_budget")


@dataclass(frozen=True)
class Settings:
    """How images are predicted: tiles, views, thresholds, limits and the merge; built from
    the flags by ``flags.prediction_settings`` (inference.py, visualization.py) and from the
    training flags for validation. ``None`` fields are decided by ``resolved``."""

    tile: int | None = 0  # None: the checkpoint's run's tile (``training_tile``)
    tile_overlap: float = 0.25
    tta_scales: tuple[float, ...] | None = None
    mask_thresh: float = 0.5
    batch_size: int | None = 1  # None: ``devices.prediction_batch`` of the device
    use_amp: bool = False  # autocast as devices.amp_dtype says
    detections_per_img: int | None = None  # None: the model's own limit
    detections_per_class: int | None = None  # per image and class (0: none); None: the model's own
    match_thresh: float = 0.5
    dihedral: bool = False  # with tta_scales: the 8 symmetries of a square, not the 4 flips
    vote_boost: float = 0.0  # a cell found by k views or models: its score (below) x (1 + vote_boost (k - 1))
    # A cell's score: its mean over views and models (``merging.consensus``) or its best copy's; None: the mean
    # with TTA views, the best copy's otherwise (``means_scores``).
    consensus: bool | None = None
    merge: str | None = None  # a cell's mask: its best copy's ("max") or the mean of its copies' ("avg")
    # With a --mask_iou model: rank by class probability x predicted mask IoU (False: by the former alone).
    mask_scoring: bool = True
    # With a --type_map model: its W, how much the map decides each detection's class (None: the checkpoint's).
    type_weight: float | None = None
    # --class_context: each cell's score moved between its class hypotheses by its neighbours' classes,
    # to this power (0: off), neighbours within about context_reach cell sides (``class_context.rescore``).
    class_context: float = 0.0
    context_reach: float = 3.0
    # Candidates of a class that get masks, as a multiple of the per-class cap: the mask merge then
    # drops fragments lying inside a kept cell (a box NMS keeps them), and the cap applies after it,
    # so a dense image still submits its cap of whole cells (1, the cap before the merge, cost
    # held-out CPM-15 0.024 AP50: benchmarks/RESULTS.md).
    class_pool: int = 2
    # Bytes of features kept between an image's detection pass and its mask pass; the views past
    # it are detected again for their masks, so a large image, --tta or an ensemble needs no more
    # device memory than this plus one batch.
    feature_budget: int = 1 << 30

    @property
    def averages(self) -> bool:
        """Whether a cell's mask is the mean of its copies': ``merge="avg"``, or by default with
        TTA views (the measurements behind it: benchmarks/RESULTS.md)."""
        return self.merge == "avg" or (self.merge is None and self.tta_scales is not None)

    @property
    def means_scores(self) -> bool:
        """Whether a cell scores its mean over views and models: ``consensus``, or by default
        with TTA views (4 of 4 held-out four-class runs: benchmarks/RESULTS.md)."""
        return self.consensus or (self.consensus is None and self.tta_scales is not None)

    def what_it_predicts(self) -> dict[str, Any]:
        """The settings that decide the results (``HOW_IT_RUNS`` left out): the key under which a
        stopped run's finished images are kept (``journal.run_key``; inference.py, visualization.py)."""
        return {k: v for k, v in asdict(self).items() if k not in HOW_IT_RUNS}

    def resolved(self, device: torch.device, state: dict[str, Any] | None = None) -> "Settings":
        """These settings with ``tile`` and ``batch_size`` decided for ``device`` and the
        checkpoint ``state`` (its training crop)."""
        tile = training_tile(state or {}) if self.tile is None else self.tile
        return replace(self, tile=tile, batch_size=prediction_batch(self.batch_size, device))


def training_tile(state: dict[str, Any]) -> int:
    """The tile a checkpoint predicts best with: the one its run validated with (its ``--tile``,
    by default its training ``--crop``; 0, whole images, if it had neither)."""
    args = state.get("args") or {}
    return int(args["tile"] if args.get("tile") is not None else args.get("crop") or 0)


def predict(model: nn.Module | Sequence[nn.Module], loader: Iterable, device: torch.device,
            settings: Settings = Settings(), desc: str | None = "predict") -> list[dict]:
    """COCO results (RLE) for every image of ``loader``; targets need only ``image_id``.

    ``settings.tile`` > 0 predicts images larger than a tile tile by tile (each tile then
    scaled by the model transform like a training crop); ``tta_scales`` adds the flips at each
    scale; several models are an ensemble, merged like views; ``batch_size`` views (tiles x
    flips, of one or several images) go through a network together; each image keeps at most
    ``detections_per_img`` detections (default: the models' limit) after all merges.
    """
    return [r for _, found in predict_each(model, loader, device, settings, desc) for r in found]


@torch.no_grad()
def predict_each(model: nn.Module | Sequence[nn.Module], loader: Iterable, device: torch.device,
                 settings: Settings = Settings(), desc: str | None = "predict") -> Iterator[tuple[int, list[dict]]]:
    """``predict``, one ``(image_id, results)`` per image as soon as its batch is done (an image
    without cells too), so a caller can record each image before the next is predicted.
    ``desc`` names the progress bar; None shows none (torchrun's other ranks)."""
    settings = settings.resolved(device)
    models = [getattr(m, "module", m) for m in (model if isinstance(model, (list, tuple)) else [model])]
    for net in models:  # DDP: predict with the wrapped model, no gradient sync
        net.eval()
    with progress(None, desc or "", total=_image_count(loader), show=desc is not None) as bar:  # images, not batches
        for images, targets in loader:
            images = [img.to(device, non_blocking=True) for img in images]
            with autocast(device, settings.use_amp):
                merged = predict_images(models, images, settings, show=desc is not None)
            for dets, target in zip(on_host(merged), targets):
                yield target["image_id"], detections_to_coco(dets, target["image_id"])
            bar.update(len(targets))


def _image_count(loader: Iterable) -> int | None:
    """How many images a loader gives (this rank's, under a distributed sampler), for the bar."""
    batches = getattr(loader, "batch_sampler", None)
    if isinstance(batches, list):
        return sum(map(len, batches))
    try:
        return len(getattr(batches, "sampler", None) or loader)  # a plain list of batches: its length
    except TypeError:
        return None


def on_host(found: list[dict]) -> list[dict]:
    """Merged detections (``predict_images``) moved to the host to be written: on CUDA every
    copy is queued at once (into pinned memory) and waited for once. Read one tensor at a time,
    a batch waited six times an image, each time behind all the work still queued."""
    device = found[0]["boxes"].device if found else torch.device("cpu")
    queued = device.type == "cuda"

    def host(t: torch.Tensor) -> torch.Tensor:
        return t.to("cpu", non_blocking=queued)

    moved = [{**d, "boxes": host(d["boxes"].float()), "scores": host(d["scores"].float()), "labels": host(d["labels"]),
              "masks": PackedMasks(host(d["masks"].data), host(d["masks"].boxes), host(d["masks"].offsets),
                                   d["masks"].size)} for d in found]
    if queued:
        torch.cuda.synchronize(device)  # host sync: the batch's results, once per batch
    return moved


def image_batches(sizes: Sequence[tuple[int, int]], settings: Settings, whole_together: bool = False) -> list[list[int]]:
    """Which images (positions in ``sizes``, in order) are predicted together: consecutive tiled
    images of one size are pooled while their tiles x views fill at most ``settings.batch_size``
    forward inputs (each model's passes apart), so a folder of equal patches no larger than a tile
    fills a GPU batch as one large image does. Images of other sizes are not pooled: padded to the
    largest, an image's cells would depend on its neighbours in the folder. Whole images
    (``settings.tile`` 0) are batched by count only with ``whole_together`` (an explicit
    ``--batch_size``), as asked."""
    if not settings.tile:
        step = settings.batch_size if whole_together and not settings.tta_scales else 1
        return [list(range(k, min(k + step, len(sizes)))) for k in range(0, len(sizes), step)]
    per_tile = len(views(settings.tta_scales, settings.dihedral))
    batches: list[list[int]] = []
    filled = 0
    for i, size in enumerate(sizes):
        jobs = len(tile_grid(*size, settings.tile, settings.tile_overlap)) * per_tile
        if not batches or filled + jobs > settings.batch_size or size != sizes[batches[-1][0]]:
            batches.append([])
            filled = 0
        batches[-1].append(i)
        filled += jobs
    return batches


class Job(NamedTuple):
    """One forward pass input: a window of an image, seen through a view by a model;
    ``source`` numbers the (model, view) pairs, whose agreement ``vote_boost`` and
    ``consensus`` count."""

    image: int
    window: Window
    view: View
    model: int
    source: int


MANY_JOBS = 64  # tiles x views x models of one call past which its detection pass gets its own progress bar


def predict_images(models: Any, images: list[torch.Tensor], settings: Settings, show: bool = True) -> list[dict]:
    """Merged detections of each image, ``{boxes, scores, labels, masks, image_size}`` with
    ``masks`` a ``PackedMasks`` (each binary mask inside its box), best score first.

    ``models`` is one model or a list (an ensemble). Every tile and view is detected first
    (boxes only), the image's candidates are chosen across all of them and all models
    (``merging.select_candidates``), and only those (and, when masks are averaged, their copies)
    get masks, from the features kept of their view (detected again past
    ``Settings.feature_budget``); then duplicates are dropped by mask overlap. ``show``: a bar
    over the tiles and views of a call with many (never on torchrun's other ranks).
    """
    stages = as_stages(models)
    for stage in stages:
        if isinstance(stage, MaskRCNNStages):
            stage.type_weight = settings.type_weight
    cap, per_class = limits(stages, settings)
    shown = views(settings.tta_scales, settings.dihedral)
    jobs = [Job(i, window, view, m, m * len(shown) + v) for m in range(len(stages)) for i, image in enumerate(images)
            for window in tile_grid(*image.shape[-2:], settings.tile, settings.tile_overlap)
            for v, view in enumerate(shown)]

    def detect(chunk: list[int]) -> tuple[Any, list[dict]]:
        crops = [apply_view(_window(images[jobs[k].image], jobs[k].window), jobs[k].view) for k in chunk]
        state, dets = stages[jobs[chunk[0]].model].detect(crops, cap, per_class)
        return state, [_to_image(d, jobs[k], crop.shape[-2:], images[jobs[k].image].shape[-2:])
                       for d, k, crop in zip(dets, chunk, crops)]

    passes, found, kept = [], [], 0
    chunks = _chunks(jobs, settings.batch_size)  # a large image's tiles and views: minutes on a CPU, so shown
    for chunk in progress(chunks, f"{len(jobs)} tiles and views", show=show and len(jobs) > MANY_JOBS):
        state, dets = detect(chunk)
        found.extend(dets)
        kept += state_bytes(state)
        passes.append((jobs[chunk[0]].model, state if kept <= settings.feature_budget else None, chunk))
        del state  # a dropped state is freed before the next chunk is detected
    by_image: list[list[int]] = [[] for _ in images]  # each image's jobs: a pass over views, not detections
    for k, job in enumerate(jobs):
        by_image[job.image].append(k)
    n_sources = len(stages) * len(shown)
    # Under a class cap the image's cap too is pooled: it applies again after the class cap (``_merge``),
    # as the model's own caps apply (each class first), so a frequent class cannot take a rare one's share.
    pool = cap * settings.class_pool if per_class > 0 else cap
    picks = [_candidates(found, jobs, mine, n_sources, pool, per_class * settings.class_pool, settings)
             for mine in by_image]
    masks, quality = _candidate_masks(stages, passes, jobs, picks, lambda chunk: detect(chunk)[0])
    if quality is not None and settings.mask_scoring:  # Mask Scoring: each candidate ranks by class probability x predicted mask IoU
        for pick, iou in zip(picks, quality):
            pick["scores"] = pick["scores"] * iou[:len(pick["scores"])].to(pick["scores"].dtype)
    probs = [_averaged(pick, prob) for pick, prob in zip(picks, masks)]
    classes = class_count(stages) if settings.class_context else 0
    return [_merge(pick, prob, tuple(image.shape[-2:]), settings, classes, per_class, cap)
            for image, pick, prob in zip(images, picks, probs)]


def limits(models: Any, settings: Settings) -> tuple[int, int]:
    """(per image, per image and class) detection caps of ``settings``, or where None the
    models' own (an ensemble: its strictest); 0 per class: none."""
    stages = as_stages(models)
    cap = (min(s.detections_per_img for s in stages) if settings.detections_per_img is None
           else image_cap(settings.detections_per_img))
    own = [c for c in (getattr(s, "detections_per_class", 0) for s in stages) if c > 0]
    return cap, min(own, default=0) if settings.detections_per_class is None else settings.detections_per_class


def as_stages(models: Any) -> list["MaskRCNNStages"]:
    """One model, a list (an ensemble) or their stages, as a list of ``MaskRCNNStages`` (a
    DistributedDataParallel wrapper unwrapped)."""
    return [m if hasattr(m, "detect") else MaskRCNNStages(getattr(m, "module", m))
            for m in (models if isinstance(models, (list, tuple)) else [models])]


def class_count(models: Any) -> int:
    """Classes (without the background) that ``models`` tell apart: an ensemble's largest.
    ``Settings.class_context`` weighs every class, seen or not in an image."""
    return max(s.num_classes for s in as_stages(models))


def state_bytes(state: Any) -> int:
    """Bytes of the tensors a detection pass keeps for its mask pass (the FPN features, mostly)."""
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    parts = state.values() if isinstance(state, dict) else state if isinstance(state, (list, tuple)) else []
    return sum(state_bytes(v) for v in parts)


def _chunks(jobs: list[Job], batch_size: int) -> list[list[int]]:
    """Consecutive jobs of one model, at most ``batch_size`` per forward pass."""
    chunks: list[list[int]] = []
    for k, job in enumerate(jobs):
        if not chunks or len(chunks[-1]) == batch_size or jobs[chunks[-1][0]].model != job.model:
            chunks.append([])
        chunks[-1].append(k)
    return chunks


def _window(image: torch.Tensor, window: Window) -> torch.Tensor:
    y0, x0, y1, x1 = window
    return image[:, y0:y1, x0:x1]


def _to_image(dets: dict, job: Job, view_size: tuple[int, int], size: tuple[int, int]) -> dict:
    """A view's detections in image coordinates, with the flag of boxes an inner tile edge may cut."""
    y0, x0, y1, x1 = job.window
    boxes = boxes_back(dets["boxes"].float(), job.view, tuple(view_size), (y1 - y0, x1 - x0))
    boxes[:, 0::2] += x0  # Python offsets: no host-to-device copy
    boxes[:, 1::2] += y0
    return {"boxes": boxes, "scores": dets["scores"].float(), "labels": dets["labels"],
            "cut": cut_flags(boxes, job.window, tuple(size))}


def _candidates(found: list[dict], jobs: list[Job], mine: list[int], n_sources: int, cap: int, per_class: int,
                settings: Settings) -> dict:
    """The candidates of one image, whose jobs are ``mine`` (``n_sources``: views times models),
    as (job, index within the job's detections), in selection order, and under ``vote_boost``
    their ``votes``, the sources that found each; under
    ``Settings.means_scores`` their ``scores`` are their means over the sources
    (``merging.consensus``). When masks are averaged (``Settings.averages``), ``job`` and
    ``index`` go on past the candidates (``scores`` and ``boxes`` stop there) with their copies,
    ``copy_of`` naming each copy's candidate."""
    parts = [found[k] for k in mine]
    boxes, scores, labels, cut = (torch.cat([p[key] for p in parts]) for key in ("boxes", "scores", "labels", "cut"))
    job_of = torch.cat([torch.full((len(p["scores"]),), k, dtype=torch.int64, device=boxes.device)
                        for k, p in zip(mine, parts)])
    source = torch.cat([torch.full((len(p["scores"]),), jobs[k].source, dtype=torch.int64, device=boxes.device)
                        for k, p in zip(mine, parts)])
    index = torch.cat([torch.arange(len(p["scores"]), device=boxes.device) for p in parts])
    if len(mine) == 1:  # one view: the model's own NMS and cap already chose
        keep = torch.arange(min(len(scores), cap), device=boxes.device)
    else:
        copies = max_cover([jobs[k].window for k in mine]) * len({jobs[k].source for k in mine})
        keep = select_candidates(boxes, scores, labels, cut, cap, copies, settings.match_thresh, per_class)
    pick = {"job": job_of[keep], "index": index[keep], "boxes": boxes[keep], "scores": scores[keep],
            "labels": labels[keep], "cut": cut[keep], "views": len(mine)}
    if len(mine) > 1 and (settings.vote_boost or settings.averages or settings.means_scores):  # one view: no copies
        cell, other = same_cell_pairs(boxes[keep], labels[keep], boxes, labels, settings.match_thresh)
        if settings.vote_boost:
            pick["votes"] = votes(cell, source[other], len(keep), n_sources)
        if settings.means_scores and n_sources > 1:
            own = torch.arange(len(keep), device=boxes.device)  # each candidate counts, even an empty box
            pick["scores"] = consensus(torch.cat([own, cell]), torch.cat([source[keep], source[other]]),
                                       torch.cat([scores[keep], scores[other]]), len(keep), n_sources)
        if settings.averages:
            cell, other = same_cell_copies(cell, other, scores, source, cut, source[keep], n_sources)
            pick.update(job=torch.cat([pick["job"], job_of[other]]), index=torch.cat([pick["index"], index[other]]),
                        copy_of=cell, copy_boxes=boxes[other])
    return pick


def _candidate_masks(stages: list, passes: list, jobs: list[Job], picks: list[dict],
                     redetect: Any) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
    """28x28 mask probabilities of every image's candidates, unflipped, in their order: one
    mask-head pass per forward-pass chunk, on the features kept from the detection pass, or
    (past ``Settings.feature_budget``) on those of the chunk detected again, ``redetect(chunk)``,
    one chunk at a time; a chunk without candidates is not. Beside them, where the models
    score their masks (``--mask_iou``), each candidate's predicted mask IoU, else None."""
    job = torch.cat([p["job"] for p in picks]).to(torch.int64)
    index = torch.cat([p["index"] for p in picks])
    order = torch.argsort(job, stable=True)
    per_job = counts(job, len(jobs))  # host sync: how many masks each view gets
    sorted_index = index[order].split(per_job)
    probs, quality, scored = [], [], False
    for model, state, chunk in passes:
        if state is None:
            if not any(per_job[k] for k in chunk):
                probs.extend(torch.zeros((0, 28, 28), device=job.device) for _ in chunk)
                quality.extend(torch.ones(0, device=job.device) for _ in chunk)
                continue
            state = redetect(chunk)
        got = stages[model].masks(state, [sorted_index[k] for k in chunk])
        if isinstance(got, tuple):  # (probabilities, predicted IoUs): a model with --mask_iou
            got, iou, scored = *got, True
        else:  # in an ensemble beside scoring models, an unscored mask counts as perfect
            iou = torch.ones(len(got), device=got.device)
        sizes = [per_job[k] for k in chunk]
        for k, part, part_iou in zip(chunk, got.split(sizes), iou.split(sizes)):
            probs.append(masks_back(part, jobs[k].view))
            quality.append(part_iou)
    sizes = [len(p["job"]) for p in picks]
    flat = torch.cat(probs) if probs else torch.zeros((0, 28, 28))
    restored = torch.empty_like(flat)
    restored[order] = flat
    if not scored:
        return list(restored.split(sizes)), None
    flat_iou = torch.cat(quality)
    restored_iou = torch.empty_like(flat_iou)
    restored_iou[order] = flat_iou
    return list(restored.split(sizes)), list(restored_iou.split(sizes))


def _averaged(pick: dict, probs: torch.Tensor) -> torch.Tensor:
    """The candidates' mask probabilities, each averaged with its copies' where they were chosen."""
    if "copy_of" not in pick:
        return probs
    kept = len(pick["scores"])
    return average_masks(probs[:kept], pick["boxes"], probs[kept:], pick["copy_boxes"], pick["copy_of"])


def _merge(pick: dict, probs: torch.Tensor, size: tuple[int, int], settings: Settings, classes: int,
           per_class: int = 0, cap: int = UNLIMITED) -> dict:
    """One image's candidates with masks pasted, duplicates by mask overlap dropped, scores
    raised by their votes and weighed by their neighbours' classes (of ``classes``), best first,
    at most ``per_class`` of a class (0: no limit), then, under a class cap, at most ``cap``."""
    masks = paste_masks(probs, pick["boxes"], size, settings.mask_thresh)
    merged = pick["views"] > 1
    if not merged:  # nothing to merge: one view's detections, as the model returned them
        kept, pixels = torch.arange(len(pick["scores"]), device=probs.device), masks.data.numel()
    else:
        sizes = masks.offsets.diff()  # pixels per mask: what the merges select
        key = merge_order(pick["boxes"], pick["scores"], pick["cut"], mask_areas(masks))
        keep = greedy_mask_merge(masks, pick["labels"], key, pick["cut"], settings.match_thresh)
        kept, pixels = selected(keep, sizes)  # host sync: the cells the image keeps and their pixels, once per image
    scores = pick["scores"][kept]
    if "votes" in pick:
        scores = scores * (1 + settings.vote_boost * (pick["votes"][kept] - 1))
    scores = rescore(pick["boxes"][kept], pick["labels"][kept], scores, classes, settings.class_context,
                     settings.context_reach)
    order = torch.argsort(scores, descending=True)
    kept, scores = kept[order], scores[order]
    if per_class > 0 and merged:  # one view: the model's own caps already hold
        within = group_ranks(scores, pick["labels"][kept]) < per_class
        within &= torch.cumsum(within, 0) <= cap  # then the image's cap, best first (the candidates were pooled for it)
        within, pixels = selected(within, sizes[kept])  # host sync: per image
        kept, scores = kept[within], scores[within]
    return {"boxes": pick["boxes"][kept], "scores": scores, "labels": pick["labels"][kept],
            "masks": take(masks, kept, pixels), "image_size": size}


class MaskRCNNStages:
    """A torchvision Mask R-CNN split where the merge needs it: ``detect`` runs the backbone,
    RPN and box head and keeps the features; ``masks`` runs the mask head on chosen detections;
    ``num_classes`` (without the background) serves ``Settings.class_context``."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.detections_per_img = int(model.roi_heads.detections_per_img)
        self.detections_per_class = int(getattr(model.roi_heads, "detections_per_class", 0))
        self.smallest_anchor = min(min(sizes) for sizes in model.rpn.anchor_generator.sizes)
        self.num_classes = int(model.roi_heads.box_predictor.cls_score.out_features) - 1  # without the background
        self.type_weight: float | None = None  # a --type_map model's W for the prediction under way (None: its own)

    def view_cap(self, input_size: tuple[int, int], cap: int) -> int:
        """What a view of ``input_size`` (network input pixels) can hold: one cell per square of
        the smallest anchor side, the smallest cell the anchors serve; never more than ``cap``."""
        return min(cap, math.ceil(input_size[0] * input_size[1] / self.smallest_anchor ** 2))

    def detect(self, crops: list[torch.Tensor], cap: int, per_class: int = 0) -> tuple[dict, list[dict]]:
        """Boxes, scores and labels of each crop, at most ``cap`` (and ``per_class`` of a class),
        and the state ``masks`` needs; ``type_weight`` (``Settings.type_weight``, set by
        ``predict_images``) replaces a ``--type_map`` model's W meanwhile."""
        model, heads = self.model, self.model.roi_heads
        batch, _ = model.transform(crops)
        features = model.backbone(batch.tensors)
        proposals, _ = model.rpn(batch, features)
        caps = [self.view_cap(size, cap) for size in batch.image_sizes]
        limits = heads.detections_per_img, getattr(heads, "detections_per_class", 0)
        heads.detections_per_img, heads.detections_per_class = max(caps), per_class
        types = getattr(heads, "type_head", None)
        weight = None if types is None else types.weight
        if types is not None and self.type_weight is not None:
            types.weight = self.type_weight
        try:
            boxes, scores, labels = detect_boxes(heads, features, proposals, batch.image_sizes)
        finally:
            heads.detections_per_img, heads.detections_per_class = limits
            if types is not None:
                types.weight = weight
        boxes, scores, labels = ([t[:c] for t, c in zip(ts, caps)] for ts in (boxes, scores, labels))
        state = {"features": features, "image_sizes": batch.image_sizes, "boxes": boxes, "labels": labels}
        dets = [{"boxes": scale_boxes(b, crop.shape[-1] / size[1], crop.shape[-2] / size[0]), "scores": s, "labels": lab}
                for b, s, lab, size, crop in zip(boxes, scores, labels, batch.image_sizes, crops)]
        return state, dets

    def masks(self, state: dict, picks: list[torch.Tensor]) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Mask probabilities [sum of picks, 28, 28] of the picked detections of each view, and
        with a Mask Scoring head (``--mask_iou``) their predicted IoUs [sum of picks] beside."""
        heads = self.model.roi_heads
        scorer = getattr(heads, "mask_iou_head", None)
        boxes = [b[p] for b, p in zip(state["boxes"], picks)]
        labels = torch.cat([lab[p] for lab, p in zip(state["labels"], picks)])
        if len(labels) == 0:
            empty = torch.zeros((0, 28, 28), device=labels.device)
            return empty if scorer is None else (empty, torch.zeros(0, device=labels.device))
        features = heads.mask_roi_pool(state["features"], boxes, state["image_sizes"])
        logits = heads.mask_predictor(heads.mask_head(features))
        chosen = logits[torch.arange(len(labels), device=labels.device), labels]
        if scorer is None:
            return chosen.sigmoid()
        return chosen.sigmoid(), scorer(features, chosen, labels).float().clamp(0.0, 1.0)
