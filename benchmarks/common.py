"""What every benchmark shares: the CLI flags, the environment record, timing, tables and JSON.

Each benchmark measures ours and the straightforward alternative in the same run, so a ratio
taken on a busy or slow machine still means something; the environment (CPU, threads, load
average) is written next to the numbers so a reader can judge how busy the machine was.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from argtypes import HelpFormatter

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"


def base_parser(description: str) -> argparse.ArgumentParser:
    """The flags every benchmark has: device, JSON path, seed and thread count."""
    parser = argparse.ArgumentParser(description=description, formatter_class=HelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where the model runs")
    parser.add_argument("--json", default=None, help="results file (default: benchmarks/results/<name>.json)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated data and of the model init")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    return parser


def add_launcher_arg(parser: argparse.ArgumentParser) -> None:
    """--launcher: the worker processes a benchmark starts run through this script."""
    parser.add_argument("--launcher", default=None, metavar="SCRIPT",
                        help="start each worker process as 'python SCRIPT <worker script> ...' (the tests pass "
                             "tests/shallow.py, which builds a shallow ResNet in place of ResNet-101)")


def worker_script(launcher: str | None, script: str | Path) -> list[str]:
    """The command-line head of a worker: ``script``, behind ``launcher`` when one is given,
    for ``python`` or ``torchrun`` to run."""
    return [*([str(Path(launcher).resolve())] if launcher else []), str(Path(script).resolve())]


def setup(args: argparse.Namespace) -> torch.device:
    """Seed everything and fix the thread count; returns the torch device."""
    if args.threads:
        torch.set_num_threads(args.threads)
    seed_all(args.seed)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here; use --device cpu.")
    return torch.device(args.device)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def environment(device: torch.device) -> dict[str, Any]:
    """Where the numbers were taken; the load average says whether others shared the CPU."""
    import torchvision

    env = {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "device": str(device),
        "load_average_1m": round(os.getloadavg()[0], 2),
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def synchronize(device: torch.device | None) -> None:
    """Wait for queued GPU work, so wall-clock times cover it."""
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device | None = None) -> tuple[Any, float]:
    """(result, seconds) of one call, GPU work included."""
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return result, time.perf_counter() - start


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either is missing or the denominator is zero."""
    if numerator is None or denominator in (None, 0):
        return None
    return numerator / denominator


def print_table(title: str, rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A plain fixed-width table (also returned, for logs)."""
    cells = [[_fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = [title, "  ".join(c.rjust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def write_results(args: argparse.Namespace, name: str, payload: dict[str, Any]) -> Path:
    """Write the results JSON (creating benchmarks/results/ on demand); returns the path."""
    path = Path(args.json) if args.json else RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(payload), indent=1, allow_nan=False))
    print(f"results -> {path}")
    return path


def augment_defaults() -> argparse.Namespace:
    """The augmentation flags at their training defaults (what a plain train run uses)."""
    from augment import add_augment_args

    parser = argparse.ArgumentParser()
    add_augment_args(parser)
    return parser.parse_args([])


def reset_peak_rss_kb() -> int:
    """Start a fresh peak-RSS count and return the resident kB now. Linux keeps ``ru_maxrss``
    across fork and exec (a child starts at its parent's peak), so the peak is the kernel's
    per-process high-water mark (``VmHWM``), reset here (``clear_refs`` 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _status_kb("VmRSS")
    except OSError:  # not Linux: ru_maxrss, which may include the parent's peak
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def peak_rss_kb() -> int:
    """The process's peak resident kB since the last ``reset_peak_rss_kb``."""
    try:
        return _status_kb("VmHWM")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise OSError(f"no {field} in /proc/self/status")


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def _jsonable(value: Any) -> Any:
    """Strict JSON: numpy scalars become Python numbers, NaN/inf become null."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, Path):
        return str(value)
    return value


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
