"""The checks only a GPU can answer, in one run of at most a few minutes that writes one JSON.

Run it first on any lent GPU. Each section runs in a process of its own (a sticky CUDA error or
an out-of-memory in one cannot fail the next) and is written as soon as it ends:

1. ``amp_train``: fp16 AMP training steps of both backbones, with and without ``--use_attn``,
   in the layout users get with ImageNet weights (frozen BatchNorm; built without a download):
   step time, peak memory, the GradScaler's scale and its skipped steps;
2. ``ddp``: one process launched by ``torchrun --nproc_per_node 1`` joining an NCCL group,
   a few DDP training steps and an all-reduce;
3. ``syncs``: one training step and one ``inference.py --tta`` prediction under
   ``torch.cuda.set_sync_debug_mode``: every sync (reads and blocking copies) by call site
   (on a CPU: ``host_syncs.py``'s counters);
4. ``predict_memory``: peak device memory of ``inference.py --use_amp --tta`` on one
   2500x735 image (the task's largest) and its seconds; then the seconds of one view,
   ``--tta`` and ``--tta dihedral`` at the default precision;
5. ``nms``: float64 against float32 NMS on 8192 boxes, time and agreement;
6. ``resume_amp``: a run trained without AMP, resumed with ``--use_amp`` (end to end).

``--dry_run`` runs the same on the CPU at tiny sizes (gloo instead of NCCL; bf16, or float32 on a
CPU without bf16 instructions, as ``--use_amp`` computes there), so the test suite knows it starts;
with it, ``--in_process`` spares each section its process start.

    python benchmarks/gpu_check.py                      # on a GPU machine: benchmarks/results/gpu_check.json
    python benchmarks/gpu_check.py --dry_run --json /tmp/gpu_check.json
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import warnings  # noqa: E402
from collections import Counter  # noqa: E402
from typing import Any, Callable, Sequence  # noqa: E402

import torch  # noqa: E402
from torchvision.ops.misc import FrozenBatchNorm2d  # noqa: E402

import engine  # noqa: E402
from argtypes import HelpFormatter  # noqa: E402
import optimisation  # noqa: E402
import devices  # noqa: E402
from benchmarks import host_syncs  # noqa: E402
from benchmarks.common import (RESULTS_DIR, _jsonable, add_launcher_arg, augment_defaults, environment,  # noqa: E402
                               seed_all, timed, worker_script)
from checkpoint import rng_state, save_checkpoint, set_rng_state  # noqa: E402
from dataloader import LabelledImages, UnlabelledImages, list_samples  # noqa: E402
from model import BACKBONES, build_model  # noqa: E402
from synthetic import make_dataset  # noqa: E402

NAME = "gpu_check"
RESULT_MARK = "DDP_RESULT "
SECTIONS = ("amp_train", "ddp", "syncs", "predict_memory", "nms", "resume_amp")
# Per mode: training image side and cells, AMP steps, the predicted image, NMS boxes, model config,
# warm-up steps (the defaults on a GPU, tiny ones for the dry run).
SIZES = {
    "gpu": {"train_size": 256, "cells": 300, "steps": 5, "predict_size": [735, 2500], "predict_cells": 700,
            "nms_boxes": 8192, "config": {}, "warmup": 1, "resume_size": 128, "tta_tiles": 2},
    "dry": {"train_size": 40, "cells": 4, "steps": 1, "predict_size": [48, 96], "predict_cells": 6,
            "nms_boxes": 256, "warmup": 0, "resume_size": 40, "tta_tiles": 1,
            "config": {"rpn_pre_nms_top_n_train": 100, "rpn_post_nms_top_n_train": 50, "rpn_pre_nms_top_n_test": 100,
                       "rpn_post_nms_top_n_test": 50, "box_batch_size_per_image": 16, "detections_per_img": 10,
                       "attn": {"neck": {"pool_size": 4}}}},  # 80 attention tokens, not 980
}
TINY_FLAGS = ["--rpn_pre_nms_top_n_train", "100", "--rpn_post_nms_top_n_train", "50", "--rpn_pre_nms_top_n_test", "100",
              "--rpn_post_nms_top_n_test", "50", "--box_batch_size_per_image", "16", "--detections_per_img", "10"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--dry_run", action="store_true", help="CPU, tiny sizes: checks that the script runs")
    parser.add_argument("--json", default=None, help=f"results file (default: {RESULTS_DIR}/{NAME}.json)")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=SECTIONS)
    parser.add_argument("--timeout", type=int, default=300,
                        help="seconds one section may take (in a process of its own)")
    parser.add_argument("--in_process", action="store_true",
                        help="with --dry_run: run the sections one after another in this process, without "
                             "their start-up (a hard crash in one then ends the run; --timeout is not applied)")
    parser.add_argument("--section", default=None, help=argparse.SUPPRESS)  # run one section here (the child)
    add_launcher_arg(parser)
    parser.add_argument("--ddp_worker", default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.in_process and not args.dry_run:  # on a GPU a section's out-of-memory or sticky error must stay its own
        parser.error("--in_process is for --dry_run only")
    if args.ddp_worker:
        return ddp_worker(json.loads(args.ddp_worker))
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_check.py: no CUDA device here; run it on a GPU machine or pass --dry_run.")
    device = torch.device("cpu" if args.dry_run else "cuda")
    path = Path(args.json) if args.json else RESULTS_DIR / f"{NAME}.json"
    if args.section:
        return run_here(args.section, device, path, args.launcher)
    optimisation.enable_tf32(device)
    payload: dict[str, Any] = {"benchmark": NAME, "dry_run": args.dry_run, "environment": environment(device),
                               "sections": {}}
    for name in args.sections:
        payload["sections"][name] = run_section(name, args, path.with_name(f"{path.stem}.{name}.json"))
        _write(path, payload)
        print(f"{name}: {payload['sections'][name].get('seconds')} s, ok={payload['sections'][name]['ok']}",
              flush=True)
    print(f"results -> {path}")
    return payload


def run_section(name: str, args: argparse.Namespace, part: Path) -> dict[str, Any]:
    """One section, in a fresh process unless ``--in_process``: its result, wall time, and its
    error if it failed."""
    start = time.perf_counter()
    if args.in_process:
        threads, draws = torch.get_num_threads(), rng_state()  # the sections seed; the caller's draws stay its own
        try:
            run_here(name, torch.device("cpu"), part, args.launcher)
            result = {"ok": True, "result": json.loads(part.read_text())}  # as a child's, read back
        except (Exception, SystemExit):  # a failed section is its row, as it is from a child process
            result = {"ok": False, "error": traceback.format_exc()[-3000:]}
        finally:
            torch.set_num_threads(threads)  # run_here lowers it for the CPU
            set_rng_state(draws)
    else:
        result = _in_child(name, args, part)
    part.unlink(missing_ok=True)
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def _in_child(name: str, args: argparse.Namespace, part: Path) -> dict[str, Any]:
    command = [sys.executable, *worker_script(args.launcher, __file__), "--section", name, "--json", str(part),
               *(["--dry_run"] if args.dry_run else []), *(["--launcher", args.launcher] if args.launcher else [])]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, check=False)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {args.timeout} s"}
    if done.returncode == 0 and part.is_file():
        return {"ok": True, "result": json.loads(part.read_text())}
    return {"ok": False, "error": (done.stdout[-1000:] + done.stderr[-3000:]).strip()}


def run_here(name: str, device: torch.device, path: Path, launcher: str | None = None) -> dict[str, Any]:
    """One section here (in its child process, or in the caller with ``--in_process``), its
    result written to ``path``."""
    optimisation.enable_tf32(device)
    if device.type == "cpu":  # two busy-waiting threads on a shared small CPU can be many times slower than one
        torch.set_num_threads(1)
    sizes = SIZES["dry" if device.type == "cpu" else "gpu"]
    # On a CPU without bf16 instructions --use_amp computes in float32 (devices.amp_dtype): the dry
    # run's training steps then run without the casts; "amp" says which.
    amp = devices.amp_dtype(device) is not None
    sections: dict[str, Callable[[Path], Any]] = {
        "amp_train": lambda tmp: amp_train(sizes, device, tmp, amp),
        "ddp": lambda tmp: ddp_step(sizes, device, tmp, launcher),
        "syncs": lambda tmp: sync_sites(sizes, device, tmp, amp),
        "predict_memory": lambda tmp: predict_memory(sizes, device, tmp),
        "nms": lambda tmp: nms_precision(sizes, device),
        "resume_amp": lambda tmp: resume_amp(sizes, device, tmp),
    }
    with tempfile.TemporaryDirectory(prefix=f"gpu_check_{name}_") as tmp:
        result = sections[name](Path(tmp))
    _write(path, result)
    return result


def amp_train(sizes: dict[str, Any], device: torch.device, tmp: Path, amp: bool = True) -> list[dict[str, Any]]:
    """Step time, peak memory and the scaler per backbone and --use_attn, AMP on (fp16 on CUDA, bf16 on a CPU
    with bf16 instructions; ``amp`` False: float32)."""
    image, target = _train_sample(sizes, tmp)
    rows = []
    for backbone in BACKBONES:
        for use_attn in (False, True):
            rows.append({**train_steps(backbone, use_attn, image, target, sizes, device, amp), "amp": amp,
                         "precision": devices.precision(device, amp)})
            print(f"  {rows[-1]}", flush=True)
    return rows


def train_steps(backbone: str, use_attn: bool, image: torch.Tensor, target: dict, sizes: dict[str, Any],
                device: torch.device, amp: bool = True) -> dict[str, Any]:
    seed_all(0)
    config = {"backbone": backbone, "weights": "imagenet", "use_attn": use_attn, **sizes["config"]}
    model = calibrate_norms(build_model(config, load_weights=False), image).to(device).train()  # the frozen-BN layout
    opt = _optimisation(model, device)
    meter = engine.EpochMeter()
    images, targets = [image, image], [target, target]  # the default --batch_size 2
    for _ in range(sizes["warmup"]):  # cuDNN picks its kernels
        engine.train_step(model, images, targets, opt, meter, device, amp)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = [timed(lambda: engine.train_step(model, images, targets, opt, meter, device, amp), device)[1]
               for _ in range(sizes["steps"])]
    meter.read(0)
    return {"backbone": backbone, "use_attn": use_attn, "layout": "frozen BatchNorm", "batch": len(images),
            "input": list(image.shape[-2:]), "step_s": statistics.median(seconds), "all_s": seconds,
            "peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
            "mean_loss": meter.sums["loss"] / max(meter.steps, 1), "skipped": meter.skipped,
            "trained_steps": sizes["warmup"] + sizes["steps"] - meter.skipped,  # 0: forward and backward, no update
            "loss_scale": opt.scaler.get_scale() if opt.scaler.is_enabled() else None}


def ddp_step(sizes: dict[str, Any], device: torch.device, tmp: Path, launcher: str | None = None) -> dict[str, Any]:
    """``torchrun --nproc_per_node 1`` of this script's worker: NCCL (gloo on a CPU)."""
    paths = make_dataset(tmp / "data", n_train=1, n_test=0, size=(sizes["train_size"],) * 2,
                         cells=(sizes["cells"], sizes["cells"] + 1), seed=0)
    spec = {"sample": str(list_samples(paths["train_dir"])[0]), "device": device.type, "steps": sizes["steps"],
            "warmup": sizes["warmup"], "config": sizes["config"]}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
               *worker_script(launcher, __file__), "--ddp_worker", json.dumps(spec)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False,
                          env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
    for line in done.stdout.splitlines():
        if line.startswith(RESULT_MARK):
            return {"returncode": done.returncode, **json.loads(line[len(RESULT_MARK):])}
    raise RuntimeError(f"torchrun worker failed (exit {done.returncode}):\n{done.stdout[-1500:]}\n{done.stderr[-3000:]}")


def ddp_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Inside torchrun: join the group, train ``steps`` DDP steps, all-reduce a flag."""
    import torch.distributed as dist

    from distributed import DistInfo, any_rank, cleanup

    # Joined here, not by distributed.init_distributed: that one skips the group for one process.
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if spec["device"] == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if spec["device"] == "cuda" else "gloo")
    device = torch.device(f"cuda:{local_rank}" if spec["device"] == "cuda" else "cpu")
    try:
        image, target = LabelledImages([Path(spec["sample"])], [1], decode_workers=1, desc="sample").load(0)
        seed_all(0)
        model = build_model({"backbone": "resnet101", "weights": "none", **spec["config"]}).to(device).train()
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                        broadcast_buffers=False)
        use_amp = device.type == "cuda"
        opt, meter = _optimisation(net, device, use_amp), engine.EpochMeter()
        for _ in range(spec["warmup"]):
            engine.train_step(net, [image], [target], opt, meter, device, use_amp)
        seconds = [timed(lambda: engine.train_step(net, [image], [target], opt, meter, device, use_amp), device)[1]
                   for _ in range(spec["steps"])]
        meter.read(0)
        flag = any_rank(True, DistInfo(0, 2, 0), device)  # a real all-reduce (DistInfo says "distributed")
        result = {"backend": dist.get_backend(), "world_size": dist.get_world_size(), "step_s": statistics.median(seconds),
                  "all_s": seconds, "all_reduce_ok": flag, "steps": meter.steps, "skipped": meter.skipped}
    finally:
        cleanup()
    print(RESULT_MARK + json.dumps(result), flush=True)
    return result


def sync_sites(sizes: dict[str, Any], device: torch.device, tmp: Path, amp: bool = True) -> dict[str, Any]:
    """Syncs of one AMP training step (batch 2) and of one ``--tta`` prediction, by call site:
    on CUDA every one ``torch.cuda.set_sync_debug_mode`` reports (reads and blocking copies);
    on a CPU what host_syncs.py's counters see."""
    from flags import TTA_SCALES
    from predictor import Settings, predict_images
    from tiling import tile_grid

    image, target = _train_sample(sizes, tmp)
    seed_all(0)
    model = build_model({"backbone": "resnet101", "weights": "imagenet", **sizes["config"]}, load_weights=False)
    model = calibrate_norms(model, image).to(device).train()
    opt, meter = _optimisation(model, device), engine.EpochMeter()
    step = lambda: engine.train_step(model, [image, image], [target, target], opt, meter, device, amp)  # noqa: E731
    step()  # warm-up: optimizer state, anchors, pooler scales
    out = {"train_step": _syncs_of(step, device, [*model.parameters(), *model.buffers()])}
    model.eval()
    side = sizes["train_size"] * sizes["tta_tiles"]  # 2 x the tile: 3 x 3 tiles; the dry run: 1
    picture = torch.rand(3, side, side, device=device)
    settings = Settings(tile=sizes["train_size"], tta_scales=TTA_SCALES, batch_size=8)
    with torch.no_grad(), devices.autocast(device, amp):
        predict = lambda: predict_images([model], [picture], settings)  # noqa: E731
        predict()
        out["predict_tta"] = _syncs_of(predict, device, [*model.parameters(), *model.buffers(), picture])
    out["predict_tta"]["views"] = len(tile_grid(side, side, settings.tile, settings.tile_overlap)) * len(TTA_SCALES) * 4
    out["amp"] = amp
    return out


def _syncs_of(fn: Callable[[], Any], device: torch.device, device_tensors: list[torch.Tensor]) -> dict[str, Any]:
    if device.type == "cuda":
        sites: Counter[str] = Counter()

        def record(message: Any, category: Any, filename: str, lineno: int, *_: Any, **__: Any) -> None:
            if "synchroniz" in str(message):  # each sync's warning, where our code made it
                sites[_project_site(f"{filename}:{lineno}")] += 1

        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = record
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
            try:
                fn()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        return {"syncs": sum(sites.values()), "sites": dict(sites.most_common(20))}
    with host_syncs.CopyCounter(device_tensors) as copies, host_syncs.SyncCounter(device) as reads:
        fn()
    return {"syncs": reads.total() + copies.total(), "reads": reads.total(), "copies": copies.total(),
            "sites": {**reads.top_sites(), **dict(copies.sites.most_common(8))}}


def _project_site(warned_at: str) -> str:
    """file:line function of the innermost frame in the project's own code (not this script);
    with none on the stack (the first H100 run found one such sync a step), where the warning
    says it was raised and on which thread (autograd's backward runs on a thread of its own)."""
    root = str(Path(__file__).resolve().parents[1])
    frame = sys._getframe(1)
    while frame is not None:
        path = frame.f_code.co_filename
        if path.startswith(root) and ".venv" not in path and not path.endswith(("gpu_check.py", "common.py")):
            return f"{path[len(root) + 1:]}:{frame.f_lineno} {frame.f_code.co_name}"
        frame = frame.f_back
    return f"? warned at {warned_at}, thread {threading.current_thread().name}"


def predict_memory(sizes: dict[str, Any], device: torch.device, tmp: Path) -> dict[str, Any]:
    """Peak device memory and seconds of ``inference.py --use_amp --tta`` on one image of the
    task's largest size, from a random-weight checkpoint in the ImageNet layout; and the seconds
    of predicting it with one view, ``--tta`` and ``--tta dihedral`` (``view_seconds``): what
    deciding ``--tta dihedral`` as a default needs (11x one view's time on 2 CPU cores)."""
    import inference

    height, width = sizes["predict_size"]
    paths = make_dataset(tmp / "data", n_train=0, n_test=1, size=(height, width),
                         cells=(sizes["predict_cells"], sizes["predict_cells"] + 1), seed=0)
    seed_all(0)
    config = {"backbone": "resnet101", "weights": "imagenet", **sizes["config"]}
    checkpoint = tmp / "random.pth"
    model = calibrate_norms(build_model(config, load_weights=False), torch.rand(3, height, width))
    save_checkpoint(checkpoint, {"model": model.state_dict(), "config": config,
                                 "args": {"crop": augment_defaults().crop}})
    output = tmp / "test-results.json"
    argv = ["--checkpoint", str(checkpoint), "--test_dir", str(paths["test_dir"]), "--id_map_json",
            str(paths["id_map_json"]), "--output", str(output), "--device", device.type, "--num_workers", "0"]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    _, seconds = timed(lambda: inference.main([*argv, "--use_amp", "--tta"]), device)  # a whole run: loading too
    out = {"image": [height, width], "seconds": seconds, "detections": len(json.loads(output.read_text())),
           "peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None}
    out.update(view_seconds(checkpoint, argv, UnlabelledImages(paths["test_dir"], paths["id_map_json"])[0], device))
    return out


def view_seconds(checkpoint: Path, argv: list[str], sample: tuple[torch.Tensor, dict],
                 device: torch.device) -> dict[str, Any]:
    """Seconds of predicting one image (detection, merge and COCO encoding: what
    ``inference.py`` does per image, without its model load and file writes) with one view,
    ``--tta`` and ``--tta dihedral``, at ``inference.py``'s default precision (TF32 matmuls off,
    as PyTorch leaves them; this script turns them on for training). A random model's detections
    differ from a trained one's in number, and with them the merge's share."""
    import inference
    from checkpoint import load_model
    from flags import prediction_settings
    from predictor import predict_each

    model, _, state = load_model(checkpoint)
    model = model.to(device).eval()
    image, target = sample  # read as inference.py reads it, once: the timings hold no file reads
    parser = inference.build_parser()
    seconds: dict[str, float] = {}
    matmul_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for name, flags in (("warm_up", []), ("one_view", []), ("flips", ["--tta"]),
                            ("dihedral", ["--tta", "dihedral"])):
            settings = prediction_settings(parser.parse_args([*argv, *flags])).resolved(device, state)
            predict = lambda: list(predict_each(model, [([image], [target])], device, settings))  # noqa: E731
            seconds[name] = timed(predict, device)[1]  # the first call loads the fp32 kernels: not reported
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul_tf32
    del seconds["warm_up"]
    return {"fp32_seconds": seconds,
            "fp32_vs_one_view": {name: s / max(seconds["one_view"], 1e-9) for name, s in seconds.items()}}


def nms_precision(sizes: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """``detector.nms_segments`` with its offsets in float64 against float32 (8 segments of one
    1000 px image each, as the RPN packs a batch): time and whether they keep the same boxes."""
    from detector import nms_segments

    gen = torch.Generator().manual_seed(0)
    n = sizes["nms_boxes"]
    xy = torch.rand(n, 2, generator=gen) * 960
    boxes = torch.cat([xy, xy + 4 + torch.rand(n, 2, generator=gen) * 36], dim=1).to(device)
    scores = torch.rand(n, generator=gen).to(device)
    lengths = [n // 8] * 8
    out = {"boxes": n}
    for name, bound in (("float32", 1000.0), ("float64", 70000.0)):  # 8 x 70001 is past FLOAT32_OFFSETS
        nms_segments(boxes, scores, lengths, 0.5, bound)  # warm-up
        kept, seconds = timed(lambda: nms_segments(boxes, scores, lengths, 0.5, bound), device)
        out[f"{name}_ms"] = 1e3 * seconds
        out[f"{name}_kept"] = sorted(kept.tolist())
    out["same_kept"] = out.pop("float64_kept") == out.pop("float32_kept")
    out["float64_vs_float32"] = out["float64_ms"] / max(out["float32_ms"], 1e-9)
    return out


def resume_amp(sizes: dict[str, Any], device: torch.device, tmp: Path) -> dict[str, Any]:
    """A run saved without AMP, resumed with ``--use_amp``: the scaler starts fresh (it crashed before)."""
    import train_resnet

    size = sizes["resume_size"]
    paths = make_dataset(tmp / "data", n_train=3, n_test=0, size=(size, size), cells=(3, 6), seed=0)
    flags = ["--train_dir", str(paths["train_dir"]), "--output_dir", str(tmp / "run"), "--weights", "none",
             "--val_split", "0.34", "--num_workers", "0", "--crop", "0", "--input_scale", "0", "--min_size", str(size),
             "--max_size", str(size), "--warmup_epochs", "0", "--batch_size", "1", "--device", device.type, *TINY_FLAGS]
    train_resnet.main([*flags, "--epochs", "1"])
    summary = train_resnet.main([*flags, "--epochs", "2", "--use_amp", "--resume", str(tmp / "run" / "last.pth")])
    history = json.loads((tmp / "run" / "history.json").read_text())
    return {"epochs": len(history), "loss_scale": history[-1].get("loss_scale"),
            "skipped_steps": history[-1]["skipped_steps"], "best_epoch": summary["best_epoch"]}


def calibrate_norms(model: torch.nn.Module, image: torch.Tensor) -> torch.nn.Module:
    """Sets each frozen BatchNorm's statistics from one float32 pass over ``image`` (in place;
    the model is returned for chaining).

    Random weights in the layout ImageNet weights load into normalise nothing: ResNet-101's
    features then reach ~1.5e5, past fp16's 65504, so every AMP step was skipped and prediction
    found no cell (the first H100 run). Fitted layer by layer, in forward order, its features
    stay near 30 and its AMP steps train. EfficientNetV2-M's random heads still gave losses in
    the hundreds and skipped steps on the H100: ``amp_train`` reports how many steps trained."""
    def fit(norm: torch.nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0].float()
        norm.running_mean.copy_(x.mean(dim=(0, 2, 3)))
        norm.running_var.copy_(x.var(dim=(0, 2, 3)))

    handles = [m.register_forward_pre_hook(fit) for m in model.modules() if isinstance(m, FrozenBatchNorm2d)]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval().backbone(model.transform([image.float()])[0].tensors)
    finally:
        for handle in handles:
            handle.remove()
    return model.train(was_training)


def _optimisation(model: torch.nn.Module, device: torch.device, use_amp: bool = True) -> "optimisation.Optimisation":
    params = [p for p in model.parameters() if p.requires_grad]
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and device.type == "cuda")
    return optimisation.Optimisation(optimisation.fused_adamw(params, 1e-5, 1e-4), None, scaler, None, 10.0)


def _train_sample(sizes: dict[str, Any], tmp: Path) -> tuple[torch.Tensor, dict]:
    paths = make_dataset(tmp / "data", n_train=1, n_test=0, size=(sizes["train_size"],) * 2,
                         cells=(sizes["cells"], sizes["cells"] + 1), seed=0)
    return LabelledImages(list_samples(paths["train_dir"]), [1], decode_workers=1, desc="sample").load(0)


def _write(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(payload), indent=1, allow_nan=False))


if __name__ == "__main__":
    main()
