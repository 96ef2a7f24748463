"""The checks only a GPU can answer, in one run (a few minutes) that writes one JSON.

1. ``amp_train``: fp16 AMP training steps (``engine.train_step``, GradScaler, fused AdamW) of
   both backbones, with and without ``--use_attn``: step time and peak memory;
2. ``ddp``: one process launched by ``torchrun --nproc_per_node 1`` joining an NCCL group,
   the model in DistributedDataParallel, a few training steps and an all-reduce;
3. ``inference``: images/s of ``inference.py`` at its defaults (its CLI only), on synthetic images;
4. ``host_syncs``: ``benchmarks/host_syncs.py`` on this device (syncs per step, ours vs stock).

Each section is timed and written as soon as it ends; a failing section records its error and
the others still run. ``--dry_run`` is the same script on the CPU at tiny sizes (gloo instead
of NCCL, no fp16), so the test suite knows it starts.

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
import time  # noqa: E402
import traceback  # noqa: E402
from typing import Any, Callable, Sequence  # noqa: E402

import torch  # noqa: E402

import engine  # noqa: E402
from benchmarks import host_syncs  # noqa: E402
from benchmarks.common import RESULTS_DIR, augment_defaults, environment, seed_all, timed, _jsonable  # noqa: E402
from checkpoint import save_checkpoint  # noqa: E402
from dataloader import HW3TrainDataset, list_samples  # noqa: E402
from model import BACKBONES, build_model  # noqa: E402
from synthetic import make_dataset  # noqa: E402

NAME = "gpu_check"
RESULT_MARK = "DDP_RESULT "
# Per mode: training image side and cells, AMP steps, inference images, host-sync counts, host_syncs.py flags
# (RoI budgets, the prediction count, variants), model config, warm-up steps
# (the defaults on a GPU, tiny ones for the dry run).
SIZES = {
    "gpu": {"train_size": 256, "cells": 300, "steps": 5, "test_images": 4, "test_size": 1000, "test_cells": 300,
            "sync_counts": [100, 400, 800], "sync_size": 256, "sync_steps": 1, "sync_args": ["--predict_size", "384"],
            "config": {}, "warmup": 1},
    "dry": {"train_size": 40, "cells": 4, "steps": 1, "test_images": 1, "test_size": 40, "test_cells": 4,
            "sync_counts": [3], "sync_size": 40, "sync_steps": 0, "warmup": 0,
            "sync_args": ["--rpn_post_nms_top_n_train", "50", "--box_batch_size_per_image", "16", "--predict_size", "64",
                     "--rpn_post_nms_top_n_test", "50", "--detections_per_img", "10", "--variants", "ours"],
            "config": {"rpn_pre_nms_top_n_train": 100, "rpn_post_nms_top_n_train": 50, "rpn_pre_nms_top_n_test": 100,
                       "rpn_post_nms_top_n_test": 50, "box_batch_size_per_image": 16, "detections_per_img": 10,
                       "attn": {"neck": {"pool_size": 4}}}},  # 80 attention tokens, not 980
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry_run", action="store_true", help="CPU, tiny sizes: checks that the script runs")
    parser.add_argument("--json", default=None, help=f"results file (default: {RESULTS_DIR}/{NAME}.json)")
    parser.add_argument("--sections", nargs="+", default=["amp_train", "ddp", "inference", "host_syncs"],
                        choices=["amp_train", "ddp", "inference", "host_syncs"])
    parser.add_argument("--ddp_worker", default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = build_parser().parse_args(argv)
    if args.ddp_worker:
        return ddp_worker(json.loads(args.ddp_worker))
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_check.py: no CUDA device here; run it on a GPU machine or pass --dry_run.")
    device = torch.device("cpu" if args.dry_run else "cuda")
    engine.enable_tf32(device)
    sizes = SIZES["dry" if args.dry_run else "gpu"]
    path = Path(args.json) if args.json else RESULTS_DIR / f"{NAME}.json"
    payload: dict[str, Any] = {"benchmark": NAME, "dry_run": args.dry_run, "environment": environment(device),
                               "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32,
                                        "cudnn": torch.backends.cudnn.allow_tf32}, "sections": {}}
    sections: dict[str, Callable[[Path], Any]] = {
        "amp_train": lambda tmp: amp_train(sizes, device, tmp),
        "ddp": lambda tmp: ddp_step(sizes, device, tmp),
        "inference": lambda tmp: inference_speed(sizes, device, tmp),
        "host_syncs": lambda tmp: syncs(sizes, device, tmp),
    }
    threads = torch.get_num_threads()
    if args.dry_run:  # two busy-waiting threads on a shared small CPU can be many times slower than one
        torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        for name in args.sections:
            payload["sections"][name] = run_section(sections[name], Path(tmp) / name)
            _write(path, payload)
            print(f"{name}: {payload['sections'][name].get('seconds')} s, ok={payload['sections'][name]['ok']}",
                  flush=True)
    torch.set_num_threads(threads)
    print(f"results -> {path}")
    return payload


def run_section(fn: Callable[[Path], Any], tmp: Path) -> dict[str, Any]:
    """One section's result, its wall time and its error (a traceback tail) if it failed."""
    tmp.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    try:
        result = {"ok": True, "result": fn(tmp)}
    except Exception:  # one broken section must not lose the others' numbers
        result = {"ok": False, "error": traceback.format_exc()[-3000:]}
    result["seconds"] = round(time.perf_counter() - start, 2)
    return result


def amp_train(sizes: dict[str, Any], device: torch.device, tmp: Path) -> list[dict[str, Any]]:
    """Step time and peak memory of fp16 AMP training (fp32 on a CPU) per backbone and --use_attn."""
    image, target = _train_sample(sizes, tmp)
    rows = []
    for backbone in BACKBONES:
        for use_attn in (False, True):
            rows.append(train_steps(backbone, use_attn, image, target, sizes, device))
            print(f"  {rows[-1]}", flush=True)
    return rows


def train_steps(backbone: str, use_attn: bool, image: torch.Tensor, target: dict, sizes: dict[str, Any],
                device: torch.device) -> dict[str, Any]:
    seed_all(0)
    config = {"backbone": backbone, "weights": "none", "use_attn": use_attn, **sizes["config"]}
    model = build_model(config).to(device).train()
    use_amp = device.type == "cuda"
    opt = _optimisation(model, use_amp)
    meter = engine.EpochMeter()
    images, targets = [image, image], [target, target]  # the default --batch_size 2
    for _ in range(sizes["warmup"]):  # cuDNN picks its kernels
        engine.train_step(model, images, targets, opt, meter, device, use_amp)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = [timed(lambda: engine.train_step(model, images, targets, opt, meter, device, use_amp), device)[1]
               for _ in range(sizes["steps"])]
    meter.read(0)
    return {"backbone": backbone, "use_attn": use_attn, "amp_fp16": use_amp, "batch": len(images),
            "input": list(image.shape[-2:]), "step_s": statistics.median(seconds), "all_s": seconds,
            "peak_memory_mb": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
            "mean_loss": meter.sums["loss"] / max(meter.steps, 1), "skipped": meter.skipped}


def ddp_step(sizes: dict[str, Any], device: torch.device, tmp: Path) -> dict[str, Any]:
    """``torchrun --nproc_per_node 1`` of this script's worker: NCCL (gloo on a CPU)."""
    paths = make_dataset(tmp / "data", n_train=1, n_test=0, size=(sizes["train_size"],) * 2,
                         cells=(sizes["cells"], sizes["cells"] + 1), seed=0)
    spec = {"sample": str(list_samples(paths["train_dir"])[0]), "device": device.type, "steps": sizes["steps"],
            "warmup": sizes["warmup"],
            "config": sizes["config"]}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
               str(Path(__file__).resolve()), "--ddp_worker", json.dumps(spec)]
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
        image, target = HW3TrainDataset([Path(spec["sample"])], [1], decode_workers=1, desc="sample").load(0)
        seed_all(0)
        model = build_model({"backbone": "resnet101", "weights": "none", **spec["config"]}).to(device).train()
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        use_amp = device.type == "cuda"
        opt, meter = _optimisation(net, use_amp), engine.EpochMeter()
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


def inference_speed(sizes: dict[str, Any], device: torch.device, tmp: Path) -> dict[str, Any]:
    """images/s of ``inference.main`` at its defaults (tiles of the training crop, one view), from a
    random-weight checkpoint that predicts the full --detections_per_img."""
    import inference

    paths = make_dataset(tmp / "data", n_train=0, n_test=sizes["test_images"], size=(sizes["test_size"],) * 2,
                         cells=(sizes["test_cells"], sizes["test_cells"] + 1), seed=0)
    seed_all(0)
    config = {"backbone": "resnet101", "weights": "none", **sizes["config"]}
    checkpoint = tmp / "random.pth"
    save_checkpoint(checkpoint, {"model": build_model(config).state_dict(), "config": config,
                                 "args": {"crop": augment_defaults().crop}})
    argv = ["--checkpoint", str(checkpoint), "--test_dir", str(paths["test_dir"]), "--id_map_json",
            str(paths["id_map_json"]), "--output", str(tmp / "test-results.json"), "--device", device.type]
    for _ in range(sizes["warmup"]):  # the model's first forward and cuDNN's choices
        inference.main(argv)
    _, seconds = timed(lambda: inference.main(argv), device)
    detections = len(json.loads((tmp / "test-results.json").read_text()))
    return {"images": sizes["test_images"], "size": sizes["test_size"], "seconds": seconds,
            "images_per_s": sizes["test_images"] / seconds, "detections": detections, "argv_defaults": True}


def syncs(sizes: dict[str, Any], device: torch.device, tmp: Path) -> dict[str, Any]:
    """benchmarks/host_syncs.py on this device: on CUDA only ops on device tensors count."""
    counts = [str(c) for c in sizes["sync_counts"]]
    argv = ["--counts", *counts, "--size", str(sizes["sync_size"]), str(sizes["sync_size"]), "--device", device.type,
            "--steps", str(sizes["sync_steps"]), "--part_reps", "3", "--threads", str(torch.get_num_threads()),
            *sizes["sync_args"],
            "--json", str(tmp / "host_syncs.json")]
    if device.type == "cuda":
        argv.append("--use_amp")
    payload = host_syncs.main(argv)
    keep = ("instances", "variant", "syncs_per_step", "ops_per_step", "syncs_by_kind", "step_s", "time_vs_before",
            "max_loss_rel_diff_vs_before")
    return {"rows": [{k: r[k] for k in keep} for r in payload["rows"]], "parts": payload["parts"],
            "prediction": payload["prediction"],
            "targets_met": payload["targets_met"], "sites_ours": payload["rows"][-1]["sites"]}


def _optimisation(model: torch.nn.Module, use_amp: bool) -> "engine.Optimisation":
    params = [p for p in model.parameters() if p.requires_grad]
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    return engine.Optimisation(engine.fused_adamw(params, 1e-5, 1e-4), None, scaler, None, 10.0)


def _train_sample(sizes: dict[str, Any], tmp: Path) -> tuple[torch.Tensor, dict]:
    paths = make_dataset(tmp / "data", n_train=1, n_test=0, size=(sizes["train_size"],) * 2,
                         cells=(sizes["cells"], sizes["cells"] + 1), seed=0)
    return HW3TrainDataset(list_samples(paths["train_dir"]), [1], decode_workers=1, desc="sample").load(0)


def _write(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(payload), indent=1, allow_nan=False))


if __name__ == "__main__":
    main()
