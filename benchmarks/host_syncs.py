"""Host synchronisations and dispatched ops per training step, and the step time beside them.

Three variants of one training step (forward, backward, clipping, AdamW) on the same image,
from the same initial weights and RNG state:

- ``stock``: torchvision's Mask R-CNN path (its transform, its mask targets from [N, H, W]
  masks, ``box_iou`` + ``Matcher``) in the training loop as it was before (``baseline_step``:
  an ``isfinite`` check and seven ``.item()`` per step, foreach AdamW);
- ``before``: our model as it was before (``baseline_resized``, ``baseline_project_masks_on_boxes``,
  copied below, and torchvision's RPN, RoI heads and pooling) in that loop: the reference for
  the step time;
- ``ours``: ``engine.train_step`` with ``optimisation.Optimisation`` (fused AdamW, losses kept on the
  device and read every ``engine.READ_EVERY`` steps) and detector.py's RPN, RoI heads and pooling.

The samplers of ``ours`` draw other random subsets than torchvision's from the same seed, so the
losses agree only with ``--take_all`` (every candidate sampled).

A sync is an op that makes the host wait for the device on CUDA, counted by a dispatch mode
(``SyncCounter``): ``.item()`` (``_local_scalar_dense``), ``nonzero``, boolean-mask indexing,
``masked_select``, ``unique``, ``repeat_interleave`` without ``output_size``, torchvision's
``nms``, ``equal`` and device-to-host copies. On a CPU every tensor is a host tensor, so the
count is an upper bound (an ``.item()`` of a host-side tensor counts too, except a non-fused
optimizer's step counters, which stay on the host on CUDA and are listed apart); ``sites``
lists where each one comes from. On CUDA only ops on device tensors count. The logging read of ``ours``
(``EpochMeter.read``, a ``tolist``) is added as 1 / READ_EVERY per step.

    python benchmarks/host_syncs.py                     # 100, 400, 800 cells, 256x256 at --input_scale 2
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import copy  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import weakref  # noqa: E402
from collections import Counter  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from typing import Any, Callable, Iterable, Iterator, Sequence  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torchvision.models.detection import roi_heads  # noqa: E402
from torchvision.ops import roi_align  # noqa: E402

import devices  # noqa: E402
import engine  # noqa: E402
import masks  # noqa: E402
import optimisation  # noqa: E402
from benchmarks.common import (base_parser, environment, print_table, ratio, seed_all, setup, synchronize,  # noqa: E402
                               timed, write_results)
from benchmarks.train_memory import use_stock_path  # noqa: E402
from detector import project_masks_on_boxes, use_torchvision_detector  # noqa: E402
from dataloader import LabelledImages, list_samples, read_image  # noqa: E402
from history import LOSS_KEYS  # noqa: E402
from masks import PackedMasks  # noqa: E402
from model import HEADS, build_model  # noqa: E402
from synthetic import make_dataset  # noqa: E402
from tiling import tile_grid  # noqa: E402
from tta import views  # noqa: E402

NAME = "host_syncs"
VARIANTS = ("stock", "before", "ours")
LOSS_RTOL = 1e-6  # before vs ours, first step from the same weights
_TORCH_DIR = str(Path(torch.__file__).resolve().parent) + "/"
_OPTIM_DIR = _TORCH_DIR + "optim/"
_ROOT = str(Path(__file__).resolve().parents[1])
HOST_COUNTER = "host item (optimizer step counter, not counted)"
_aten = torch.ops.aten
_INDEXING = {_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default, _aten._index_put_impl_.default}
_ALWAYS = {_aten._local_scalar_dense.default: "item", _aten.nonzero.default: "nonzero",
           _aten.masked_select.default: "masked_select", _aten._unique2.default: "unique",
           _aten.unique_dim.default: "unique", _aten.unique_consecutive.default: "unique",
           _aten.equal.default: "equal", _aten.bincount.default: "bincount (reads its range: 2 on CUDA)"}


def build_parser() -> argparse.ArgumentParser:
    parser = base_parser(__doc__)
    parser.add_argument("--counts", type=int, nargs="+", default=[100, 400, 800], help="cells per generated image")
    parser.add_argument("--size", type=int, nargs=2, default=[256, 256], metavar=("H", "W"), help="generated image size")
    parser.add_argument("--input_scale", type=float, default=2.0, help="as in training (2 resizes every mask)")
    parser.add_argument("--backbone", default="resnet101", choices=("resnet101", "effnet_v2_m"))
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per variant first")
    parser.add_argument("--steps", type=int, default=3,
                        help="timed steps per variant, interleaved across variants (0: count syncs only)")
    parser.add_argument("--use_amp", action="store_true",
                        help="autocast as --use_amp (devices.amp_dtype; fp16 + GradScaler on CUDA)")
    parser.add_argument("--part_reps", type=int, default=20, help="interleaved calls of each mask function alone")
    parser.add_argument("--rpn_post_nms_top_n_train", type=int, default=2000)
    parser.add_argument("--box_batch_size_per_image", type=int, default=512)
    parser.add_argument("--predict_size", type=int, default=384,
                        help="also count the syncs of predicting one generated image of this side with "
                             "inference.py's tiles of 256 px x the 4 flips of --tta, ours vs torchvision's detector "
                             "(0: skip)")
    parser.add_argument("--rpn_post_nms_top_n_test", type=int, default=2000, help="the prediction's proposals per view")
    parser.add_argument("--detections_per_img", type=int, default=1000, help="the prediction's cap")
    for head, text in (("mask_iou", "the Mask Scoring head"), ("cascade", "the Cascade box stages"),
                       ("type_map", "the cell-type map (W 0.5)")):
        parser.add_argument(f"--{head}", action="store_true",
                            help=f"build every model with {text} (only ours uses it: the baselines keep torchvision's "
                                 "RoI heads)")
    parser.add_argument("--take_all", action="store_true",
                        help="sample every RPN and RoI candidate: torchvision's samplers and ours then pick the same "
                             "sets, so the losses must agree (by default each draws its own random subset)")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    device = setup(args)
    rows, parts = [], []
    with tempfile.TemporaryDirectory(prefix="bench_syncs_") as tmp:
        for count in args.counts:
            sample = _sample(args, Path(tmp), count)
            rows.extend(measure_count(sample, args, device))
            parts.append(measure_parts(sample, args, device))
        prediction = measure_prediction(args, device, Path(tmp)) if args.predict_size else []
    payload = summarize(args, device, rows, parts)
    payload["prediction"] = prediction
    if prediction:
        print_table(f"predicting one {args.predict_size}x{args.predict_size} image, inference.py --tta", prediction,
                    ["detector", "views", "syncs_per_image", "syncs_per_view", "copies_per_image", "copies_per_view",
                     "ops", "seconds", "detections"])
    write_results(args, NAME, payload)
    return payload


def measure_count(sample: Path, args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """Every variant on one sample: syncs and ops of one step after warm-up, then timed steps
    interleaved across the variants (so a busy moment of the machine hits all of them)."""
    image, target = LabelledImages([sample], [1], decode_workers=1, desc="sample").load(0)
    steps = {v: make_step(v, image, target, args, device) for v in args.variants}
    rows = {}
    for variant, (step, last_losses, model) in steps.items():
        step()
        losses = last_losses()  # the first step, from the same weights in every variant
        for _ in range(args.warmup - 1):
            step()
        with CopyCounter(_device_tensors(model)) as copies, SyncCounter(device) as counter:
            step()
        extra = 1.0 / engine.READ_EVERY if variant == "ours" else 0.0  # EpochMeter.read's tolist
        rows[variant] = {"instances": int(len(target["labels"])), "variant": variant,
                         "syncs_per_step": counter.total() + extra, "copies_per_step": copies.total(),
                         "ops_per_step": counter.ops, "syncs_by_kind": dict(counter.kinds),
                         "copies_by_kind": dict(copies.kinds), "sites": counter.top_sites(),
                         "copy_sites": dict(copies.sites.most_common(12)), "losses": losses, "step_seconds": []}
    for _ in range(args.steps):
        for variant, (step, _, _) in steps.items():
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            rows[variant]["step_seconds"].append(time.perf_counter() - start)
    for row in rows.values():
        row["step_s"] = statistics.median(row["step_seconds"]) if row["step_seconds"] else None
    for row in rows.values():
        row["time_vs_before"] = ratio(row["step_s"], rows["before"]["step_s"]) if "before" in rows else None
        row["max_loss_rel_diff_vs_before"] = _loss_diff(row, rows.get("before"))
    return list(rows.values())


def measure_prediction(args: argparse.Namespace, device: torch.device, tmp: Path) -> list[dict[str, Any]]:
    """Syncs of ``predictor.predict_images`` on one image as ``inference.py --tta`` predicts it
    (256 px tiles, the 4 flips, batches of 4 views), with detector.py and with torchvision's detector,
    from the same random weights (which detect the most: every view's full cap)."""
    from flags import TTA_SCALES
    from predictor import Settings, predict_images

    paths = make_dataset(tmp / "predict", n_train=0, n_test=1, size=(args.predict_size,) * 2, cells=(40, 41),
                         seed=args.seed)
    image = torch.from_numpy(read_image(next(paths["test_dir"].glob("*.tif")))).permute(2, 0, 1)
    settings = Settings(tile=256, tta_scales=TTA_SCALES, batch_size=4)
    seed_all(args.seed)
    ours = build_model({"backbone": args.backbone, "weights": "none", "detections_per_img": args.detections_per_img,
                        "rpn_post_nms_top_n_test": args.rpn_post_nms_top_n_test, "mask_iou": args.mask_iou,
                        "cascade": args.cascade, "type_map": 0.5 if args.type_map else 0.0}).to(device).eval()
    stock = copy.deepcopy(ours)
    use_torchvision_detector(stock)
    for prefix in HEADS.values():  # torchvision's RoI heads predict without ours ("roi_heads.<name>.")
        name = prefix.split(".")[1]
        if hasattr(stock.roi_heads, name):
            delattr(stock.roi_heads, name)
    num_views = len(tile_grid(args.predict_size, args.predict_size, settings.tile, settings.tile_overlap)) * len(
        views(settings.tta_scales, settings.dihedral))
    rows = []
    for name, model in (("torchvision", stock), ("ours", ours)):
        with torch.no_grad():
            on_device = image.to(device)
            predict_images([model], [on_device], settings)  # warm-up: the poolers' scales, the anchors
            with CopyCounter([*_device_tensors(model), on_device]) as copies, SyncCounter(device) as counter:
                start = time.perf_counter()
                merged = predict_images([model], [on_device], settings)
                seconds = time.perf_counter() - start
        rows.append({"detector": name, "views": num_views, "syncs_per_image": counter.total(),
                     "syncs_per_view": counter.total() / num_views, "copies_per_image": copies.total(),
                     "copies_per_view": copies.total() / num_views, "ops": counter.ops, "seconds": seconds,
                     "detections": len(merged[0]["scores"]), "sites": counter.top_sites(),
                     "copy_sites": dict(copies.sites.most_common(12))})
    return rows


def _device_tensors(model: nn.Module) -> list[torch.Tensor]:
    """What lives on the device before a step: the weights, buffers and optimizer-free state."""
    return [*model.parameters(), *model.buffers()]


def measure_parts(sample: Path, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The two changed mask functions alone, before vs ours, interleaved ``--part_reps`` times:
    a finer view of the difference than whole steps on a busy CPU. The RoIs are the instances'
    boxes (resized), jittered, as many as the box head samples positives."""
    image, target = LabelledImages([sample], [1], decode_workers=1, desc="sample").load(0)
    packed = target["masks"].to(device)
    size = tuple(round((args.input_scale or 1.0) * s) for s in image.shape[-2:])
    gen = torch.Generator().manual_seed(args.seed)
    resized = packed.resized(size)
    matched = torch.randint(len(resized), (args.box_batch_size_per_image // 4,), generator=gen)
    rois = resized.boxes[matched].float() + torch.randn(len(matched), 4, generator=gen) * 2
    rois = rois.clamp(min=0).minimum(torch.tensor([size[1], size[0]] * 2, dtype=torch.float32))
    rois[:, 2:] = torch.maximum(rois[:, 2:], rois[:, :2] + 1)
    rois, matched = rois.to(device), matched.to(device)
    calls = {"resize": (lambda: baseline_resized(packed, size), lambda: packed.resized(size)),
             "mask_targets": (lambda: baseline_project_masks_on_boxes(resized, rois, matched, 28),
                              lambda: project_masks_on_boxes(resized, rois, matched, 28))}
    out: dict[str, Any] = {"instances": len(packed), "rois": len(rois)}
    for name, (before, ours) in calls.items():
        times: dict[str, list[float]] = {"before": [], "ours": []}
        for _ in range(args.part_reps):
            for variant, fn in (("before", before), ("ours", ours)):
                times[variant].append(timed(fn, device)[1])
        out[f"{name}_before_ms"] = 1e3 * statistics.median(times["before"])
        out[f"{name}_ours_ms"] = 1e3 * statistics.median(times["ours"])
        out[f"{name}_ratio"] = ratio(out[f"{name}_ours_ms"], out[f"{name}_before_ms"])
    out["resize_equal"] = torch.equal(baseline_resized(packed, size).full(), resized.full())
    out["mask_targets_max_diff"] = float((calls["mask_targets"][0]() - calls["mask_targets"][1]()).abs().max())
    return out


def make_step(variant: str, image: torch.Tensor, target: dict, args: argparse.Namespace,
              device: torch.device) -> tuple[Callable[[], None], Callable[[], dict[str, float]], nn.Module]:
    """One training step of ``variant`` as a closure, a function giving the losses of the
    last step (read outside the counted step for ``ours``), and the model."""
    height, width = image.shape[-2:]
    scale = args.input_scale or 1.0
    config = {"backbone": args.backbone, "weights": "none", "min_size": min(height, width),
              "max_size": round(scale * max(height, width)), "input_scale": args.input_scale,
              "rpn_post_nms_top_n_train": args.rpn_post_nms_top_n_train,
              "box_batch_size_per_image": args.box_batch_size_per_image, "mask_iou": args.mask_iou,
              "cascade": args.cascade, "type_map": 0.5 if args.type_map else 0.0}
    if args.take_all:
        config.update(rpn_batch_size_per_image=10 ** 6, box_batch_size_per_image=10 ** 6)
    seed_all(args.seed)
    model = build_model(config).to(device).train()
    if variant != "ours":
        use_torchvision_detector(model)  # its RPN, RoI heads and pooling, as before detector.py
    target = dict(target)
    if variant == "stock":
        use_stock_path(model, round(scale * height), round(scale * width))
        target["masks"] = target["masks"].full()
    images, targets = [image], [target]
    params = [p for p in model.parameters() if p.requires_grad]
    scaler = torch.amp.GradScaler("cuda", enabled=args.use_amp and device.type == "cuda")
    if variant == "ours":
        opt = optimisation.Optimisation(optimisation.fused_adamw(params, 1e-5, 1e-4), None, scaler, None, 10.0)
        meter, last = engine.EpochMeter(), []

        def step() -> None:
            torch.manual_seed(args.seed)  # the same RPN/RoI sampling in every variant
            engine.train_step(model, images, targets, opt, meter, device, args.use_amp)
            last[:] = [meter._pending[-1][0]]
            if meter.batches % engine.READ_EVERY == 0:  # as train_one_epoch reads
                meter.read(0)
        return step, lambda: dict(zip(LOSS_KEYS, last[0].tolist())), model
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-4, foreach=True)
    read: dict[str, float] = {}

    def old_step() -> None:
        torch.manual_seed(args.seed)
        with mask_path(variant):
            read.update(baseline_step(model, images, targets, optimizer, scaler, 10.0, device, args.use_amp))
    return old_step, lambda: dict(read), model


def baseline_step(model: nn.Module, images: list, targets: list, optimizer: torch.optim.Optimizer,
                  scaler: torch.amp.GradScaler, clip_grad: float, device: torch.device,
                  use_amp: bool) -> dict[str, float]:
    """The training step of engine.train_one_epoch before host syncs were removed (single
    process): the finiteness check and every loss read on the host, each step."""
    images, targets = engine.to_device(images, targets, device)
    with devices.autocast(device, use_amp):
        losses = model(images, targets)
    loss = sum(losses.values())
    finite = bool(torch.isfinite(loss))
    if finite:
        read = {k: v.item() for k, v in losses.items()}
        read["loss"] = loss.item()
        f"{loss.item():.3f}"  # the progress bar's read
    else:
        read = {k: float("nan") for k in losses}
        loss = sum(l.nan_to_num(0.0, 0.0, 0.0) * 0 for l in losses.values())
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if finite:
        if clip_grad > 0:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        scaler.step(optimizer)
        scaler.update()
    return {k: read[k] for k in LOSS_KEYS}


@contextmanager
def mask_path(variant: str) -> Iterator[None]:
    """While inside, for ``before``: the mask resize and targets as they were, with
    per-instance loops (its model has torchvision's RoI heads, which call torchvision's
    module-level target function, so that is what is swapped, and put back). ``stock`` and
    ``ours`` run as they are."""
    saved = masks.PackedMasks.resized, roi_heads.project_masks_on_boxes
    if variant == "before":
        masks.PackedMasks.resized = baseline_resized
        roi_heads.project_masks_on_boxes = baseline_project_masks_on_boxes
    try:
        yield
    finally:
        masks.PackedMasks.resized, roi_heads.project_masks_on_boxes = saved


def baseline_resized(self: PackedMasks, size: tuple[int, int]) -> PackedMasks:
    """PackedMasks.resized before: four searchsorted reads and one gather per instance."""
    rows = _baseline_sources(self.size[0], size[0], self.device)
    cols = _baseline_sources(self.size[1], size[1], self.device)
    crops, boxes = [], []
    for i, (x1, y1, x2, y2) in enumerate(self.boxes.tolist()):
        r0, r1 = int(torch.searchsorted(rows, y1)), int(torch.searchsorted(rows, y2))
        c0, c1 = int(torch.searchsorted(cols, x1)), int(torch.searchsorted(cols, x2))
        crop = self.crop(i)[rows[r0:r1] - y1][:, cols[c0:c1] - x1]
        crops.append(crop.reshape(-1))
        boxes.append((c0, r0, c1, r1))
    data = torch.cat(crops) if crops else self.data.new_zeros(0)
    offsets = torch.tensor([0] + [len(c) for c in crops], dtype=torch.int64).cumsum(0)
    return PackedMasks(data, torch.tensor(boxes, dtype=torch.int64).reshape(-1, 4), offsets, size)


def _baseline_sources(length: int, new_length: int, device: torch.device) -> torch.Tensor:
    ramp = torch.arange(length, dtype=torch.float64, device=device)[None, None, :, None]
    return torch.nn.functional.interpolate(ramp, size=(int(new_length), 1))[0, 0, :, 0].long()


def baseline_project_masks_on_boxes(gt_masks: torch.Tensor | PackedMasks, boxes: torch.Tensor,
                                    matched_idxs: torch.Tensor, size: int) -> torch.Tensor:
    """detector.project_masks_on_boxes before: per matched instance a nonzero, four reads, a
    host-to-device copy and its own roi_align."""
    out = boxes.new_zeros((len(boxes), size, size))
    height, width = gt_masks.shape[-2:]
    for j in matched_idxs.unique().tolist():
        sel = (matched_idxs == j).nonzero().flatten()
        rois = boxes[sel]
        x0 = max(int(rois[:, 0].min().floor()) - 2, 0)
        y0 = max(int(rois[:, 1].min().floor()) - 2, 0)
        x1 = min(int(rois[:, 2].max().ceil()) + 2, width)
        y1 = min(int(rois[:, 3].max().ceil()) + 2, height)
        crop = gt_masks.region(j, x0, y0, x1, y1) if isinstance(gt_masks, PackedMasks) else gt_masks[j, y0:y1, x0:x1]
        shifted = rois - rois.new_tensor([x0, y0, x0, y0])
        indexed = torch.cat([shifted.new_zeros(len(sel), 1), shifted], dim=1)
        out[sel] = roi_align(crop[None, None].to(boxes.dtype), indexed, (size, size), 1.0)[:, 0]
    return out


class SyncCounter(TorchDispatchMode):
    """Counts every dispatched op and the ones that wait for the device (see the module doc),
    with the first call site outside torch of each."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.host_only = device.type == "cpu"  # then every tensor is on the host: count them all
        self.ops = 0
        self.kinds: Counter[str] = Counter()
        self.sites: Counter[str] = Counter()

    def __enter__(self) -> "SyncCounter":
        # Tensor.tolist reads memory without dispatching an op on a CPU (on CUDA its copy to
        # the host is dispatched and counted below), so it is counted here, by a wrapper.
        self._tolist = read = torch.Tensor.tolist

        def counted_tolist(tensor: torch.Tensor) -> Any:
            self.kinds["tolist"] += 1
            self.sites[f"tolist @ {_call_site()}"] += 1
            with torch._C.DisableTorchFunction():  # a function mode (CopyCounter) would call this wrapper again
                return read(tensor)

        if self.host_only:
            torch.Tensor.tolist = counted_tolist
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        torch.Tensor.tolist = self._tolist
        super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        self.ops += 1
        kind = self._kind(func, args, kwargs)
        if kind:
            self.kinds[kind] += 2 if func is _aten.bincount.default else 1
            self.sites[f"{kind} @ {_call_site()}"] += 1
        return func(*args, **kwargs)

    def total(self) -> int:
        return sum(n for kind, n in self.kinds.items() if kind != HOST_COUNTER)

    def top_sites(self, n: int = 12) -> dict[str, int]:
        return dict(self.sites.most_common(n))

    def _kind(self, func: Any, args: tuple, kwargs: dict) -> str | None:
        tensors = [a for a in _flat(args, kwargs) if isinstance(a, torch.Tensor)]
        on_device = self.host_only or any(t.device.type != "cpu" for t in tensors)
        if func is _aten._local_scalar_dense.default and self.host_only and _in_optimizer():
            return HOST_COUNTER  # a non-fused optimizer's step counters live on the host on CUDA too
        if func in _ALWAYS:
            return _ALWAYS[func] if on_device else None
        if func in _INDEXING:
            masks_ = [i for i in (args[1] if len(args) > 1 else []) if isinstance(i, torch.Tensor)]
            return "bool-mask index" if on_device and any(i.dtype in (torch.bool, torch.uint8) for i in masks_) else None
        if func is _aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            return "repeat_interleave" if on_device else None
        if str(func.name()).startswith("torchvision::nms"):
            return "nms" if on_device else None
        if func in (_aten._to_copy.default, _aten.copy_.default):
            return _device_to_host(func, args, kwargs)
        return None


class CopyCounter(TorchFunctionMode):
    """Blocking host-to-device copies, which stall the GPU queue as a read does, counted at the
    torch API on any device: every tensor is labelled host or device as CUDA would place it.

    Device tensors: ``device_tensors`` (the model's weights and buffers), whatever a factory
    makes with ``device=``, whatever ``.to(<device>)`` returns, and every result of an op with
    a device tensor among its inputs. A blocking copy: ``torch.tensor``/``as_tensor`` of Python
    data or a host tensor with ``device=``, ``new_tensor`` of a device tensor, ``.to(<device>)``
    of a host tensor without ``non_blocking`` (with it, from the pinned memory of a CUDA
    DataLoader or ``devices.to_device``, it is asynchronous: listed apart, not counted), and a
    device tensor indexed with a Python list."""

    NON_BLOCKING = "h2d non_blocking (pinned: not counted)"

    def __init__(self, device_tensors: Iterable[torch.Tensor] = ()) -> None:
        super().__init__()
        self._device: dict[int, weakref.ref] = {}  # by id: a WeakSet would compare tensors with ==
        for t in device_tensors:
            self._label(t)
        self.kinds: Counter[str] = Counter()
        self.sites: Counter[str] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        kwargs = kwargs or {}
        kind = self._kind(func, args, kwargs)
        if kind:
            self.kinds[kind] += 1
            self.sites[f"{kind} @ {_call_site()}"] += 1
        out = func(*args, **kwargs)
        if kwargs.get("device") is not None or _to_device_target(func, args, kwargs) or any(
                self.on_device(t) for t in _flat(args, kwargs)):
            for t in _flat((out,), {}):
                self._label(t)
        return out

    def on_device(self, value: Any) -> bool:
        ref = self._device.get(id(value)) if isinstance(value, torch.Tensor) else None
        return ref is not None and ref() is value

    def _label(self, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            self._device[id(value)] = weakref.ref(value)

    def total(self) -> int:
        return sum(n for kind, n in self.kinds.items() if kind != self.NON_BLOCKING)

    def _kind(self, func: Any, args: tuple, kwargs: dict) -> str | None:
        source = args[0] if args else None
        if func in (torch.tensor, torch.as_tensor) and kwargs.get("device") is not None:
            if not isinstance(source, torch.Tensor):
                return f"{func.__name__}(python data, device=)"
            return None if self.on_device(source) else f"{func.__name__}(host tensor, device=)"
        if func is torch.Tensor.new_tensor and self.on_device(source):
            return "new_tensor"
        if _to_device_target(func, args, kwargs) and isinstance(source, torch.Tensor) and not self.on_device(source):
            return self.NON_BLOCKING if kwargs.get("non_blocking") else "to(device) of a host tensor"
        if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and self.on_device(source) and any(
                isinstance(i, list) for i in (args[1] if isinstance(args[1], tuple) else (args[1],))):
            return "index with a Python list"
        return None


def _to_device_target(func: Any, args: tuple, kwargs: dict) -> bool:
    """Whether ``func`` is ``Tensor.to``/``.cuda`` naming a device (a dtype alone moves nothing)."""
    if func is torch.Tensor.cuda:
        return True
    if func is not torch.Tensor.to:
        return False
    return kwargs.get("device") is not None or any(isinstance(a, (torch.device, str)) for a in args[1:2])


def _device_to_host(func: Any, args: tuple, kwargs: dict) -> str | None:
    if func is _aten._to_copy.default:
        target = kwargs.get("device")
        return "to host" if args[0].device.type != "cpu" and target is not None and target.type == "cpu" else None
    dst, src = args[0], args[1]
    return "to host" if src.device.type != "cpu" and dst.device.type == "cpu" else None


def _frames() -> Iterator[Any]:
    """The calling frames, innermost first: ``traceback.extract_stack`` also reads every
    frame's source line, which made counting a step with a thousand syncs take seconds."""
    frame = sys._getframe(1)
    while frame is not None:
        yield frame
        frame = frame.f_back


def _in_optimizer() -> bool:
    return any(f.f_code.co_filename.startswith(_OPTIM_DIR) for f in _frames())


def _flat(args: tuple, kwargs: dict) -> Iterator[Any]:
    for value in (*args, *kwargs.values()):
        if isinstance(value, (list, tuple)):
            yield from value
        else:
            yield value


def _call_site() -> str:
    """file:line function of the innermost frame outside torch and this file."""
    for frame in _frames():
        path = frame.f_code.co_filename
        if path.startswith(_TORCH_DIR) or path == __file__ or "contextlib" in path:
            continue
        short = path[len(_ROOT) + 1:] if path.startswith(_ROOT) else path.split("site-packages/")[-1]
        return f"{short}:{frame.f_lineno} {frame.f_code.co_name}"
    return "?"


def summarize(args: argparse.Namespace, device: torch.device, rows: list[dict[str, Any]],
              parts: list[dict[str, Any]]) -> dict[str, Any]:
    columns = ["instances", "variant", "syncs_per_step", "copies_per_step", "ops_per_step", "step_s", "time_vs_before",
               "max_loss_rel_diff_vs_before"]
    title = (f"one training step, {args.backbone} --weights none, {args.size[0]}x{args.size[1]} at --input_scale "
             f"{args.input_scale}, {device}, " + (f"median of {args.steps} interleaved steps" if args.steps else "not timed"))
    print_table(title, rows, columns)
    ours = [r for r in rows if r["variant"] == "ours"]
    targets = {
        "ours_syncs_same_at_every_count": len({r["syncs_per_step"] for r in ours}) <= 1,
        "ours_syncs_at_most_10": all(r["syncs_per_step"] <= 10 for r in ours),
        "ours_copies_at_most_10": all(r["copies_per_step"] <= 10 for r in ours),
        "time_at_most_1.02x_before": all(r["time_vs_before"] is not None and r["time_vs_before"] <= 1.02 for r in ours)
        if args.steps else None,  # --steps 0 times nothing
        # Only when every candidate is sampled: otherwise the samplers draw different random subsets.
        "losses_equal_before": all((r["max_loss_rel_diff_vs_before"] or 0.0) <= LOSS_RTOL for r in ours)
        if args.take_all else None,
    }
    print_table(f"the mask functions alone, median of {args.part_reps} interleaved calls, ms", parts,
                ["instances", "rois", "resize_before_ms", "resize_ours_ms", "resize_ratio", "mask_targets_before_ms",
                 "mask_targets_ours_ms", "mask_targets_ratio", "resize_equal", "mask_targets_max_diff"])
    print(f"targets met: {targets}")
    for row in ours[-1:]:
        print(f"ours at {row['instances']} instances, syncs by call site: {row['sites']}")
        print(f"ours at {row['instances']} instances, host-to-device copies by call site: {row['copy_sites']}")
    return {"benchmark": NAME, "environment": environment(device),
            "settings": {k: v for k, v in vars(args).items() if k != "json"},
            "read_every": engine.READ_EVERY, "rows": rows, "parts": parts, "targets_met": targets}


def _loss_diff(row: dict[str, Any], before: dict[str, Any] | None) -> float | None:
    if before is None or row is before:
        return None
    return max(abs(row["losses"][k] - v) / max(abs(v), 1e-12) for k, v in before["losses"].items())


def _sample(args: argparse.Namespace, tmp: Path, count: int) -> Path:
    paths = make_dataset(tmp / f"cells_{count}", n_train=1, n_test=0, size=tuple(args.size),
                         cells=(count, count + 1), seed=args.seed)
    return list_samples(paths["train_dir"])[0]


if __name__ == "__main__":
    main()
