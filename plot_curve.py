"""Training curves from ``history.json``, saved as PNG next to it.

Training writes one history row per epoch (history.write_history); this turns a run into
``loss_curve.png``, ``map_curve.png`` and ``lr_curve.png`` without re-running anything:
    python plot_curve.py --output_dir outputs/resnet101
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from argtypes import HelpFormatter  # noqa: E402
from cli import run_cli  # noqa: E402
from errors import UsageError  # noqa: E402
from files import writable_dir, write_figure  # noqa: E402
from history import CURVE_FILES, HISTORY_FILE, LOGGED_LOSSES, LOSS_KEYS  # noqa: E402

LOSS_PANELS = ("loss",) + LOSS_KEYS
IOU_TYPES = ("segm", "bbox")
AP_NAMES = ("AP", "AP50", "AP75")
BEST_METRIC = "segm_AP50"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--output_dir", required=True, help="training output folder holding history.json")
    parser.add_argument("--plot_dir", default=None, help="where the PNGs go (default: --output_dir)")
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, Path | None]:
    args = build_parser().parse_args(argv)
    history = load_history(Path(args.output_dir))
    plot_dir = writable_dir(args.plot_dir or args.output_dir, "--plot_dir")
    paths = {
        "loss": plot_losses(history, plot_dir / CURVE_FILES["loss"]),
        "metrics": plot_metrics(history, plot_dir / CURVE_FILES["metrics"]),
        "lr": plot_lr(history, plot_dir / CURVE_FILES["lr"]),
    }
    print(f"{len(history)} epochs in {Path(args.output_dir) / HISTORY_FILE}")
    best = best_epoch(history)
    if best:
        print(f"{best_label(history)}: epoch {best[0]}, {best[1]} {best[2]:.4f}")
    for name, path in paths.items():
        print(f"  {name:>7}: {path if path else 'skipped (no validation metrics in the history)'}")
    return paths


def load_history(output_dir: Path) -> list[dict[str, Any]]:
    """The per-epoch rows; a missing file says which one and how to get it."""
    path = Path(output_dir) / HISTORY_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; train first (train_resnet.py or train_effnet_v2.py "
                                f"--output_dir {output_dir}), which writes {HISTORY_FILE} after every epoch.")
    try:
        history = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UsageError(f"{path}: not valid JSON ({err}); rerun an epoch with --resume to rewrite it.") from err
    if not isinstance(history, list) or not history:
        raise UsageError(f"{path}: expected a non-empty list of per-epoch rows; train at least one epoch.")
    if not all(isinstance(row, dict) and isinstance(row.get("epoch"), (int, float)) for row in history):
        raise UsageError(f"{path}: expected per-epoch rows, each an object with its epoch, as training writes them; "
                         "pass the history.json of a training run.")
    return history


def plot_losses(history: list[dict[str, Any]], path: Path) -> Path:
    """Total loss and each component, train and validation, one panel each, so a component
    that diverges is not hidden by the sum."""
    extra = [k for k in LOGGED_LOSSES if k not in LOSS_KEYS and any(row.get(f"train_{k}") for row in history)]
    panels = LOSS_PANELS + tuple(extra)  # a term only a model with its head has (--mask_iou), where it trained
    fig, axes = plt.subplots(2, math.ceil(len(panels) / 2), figsize=(13, 7), sharex=True, squeeze=False)
    for ax, key in zip(axes.flat, panels):
        for prefix, style in (("train_", "-o"), ("val_", "--s")):
            if _has_values(history, prefix + key):
                ax.plot(*_points(history, prefix + key), style, markersize=3, label=prefix.rstrip("_"))
        ax.set_title(key.replace("loss_", "") if key != "loss" else "total loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("epoch")
        _epoch_ticks(ax)
    fig.suptitle("losses per epoch")
    return _save(fig, path)


def plot_metrics(history: list[dict[str, Any]], path: Path) -> Path | None:
    """COCO AP, AP50 and AP75 for masks and boxes (dashed: the EMA weights', with --ema_decay),
    the epoch ``best.pth`` holds marked; None (nothing written) for a run without validation."""
    if not any(_has_values(history, f"{t}_{m}") for t in IOU_TYPES for m in AP_NAMES):
        return None
    class_keys = sorted({k for row in history for k in row if k.startswith(f"{BEST_METRIC}_class")})
    class_keys = [k for k in class_keys if _has_values(history, k)]
    fig, axes = plt.subplots(1, 3 if class_keys else 2, figsize=(15 if class_keys else 10, 4.5), squeeze=False)
    for ax, iou_type in zip(axes[0], IOU_TYPES):
        for name in AP_NAMES:
            line, = ax.plot(*_points(history, f"{iou_type}_{name}"), "-o", markersize=3, label=name)
            if _has_values(history, f"ema_{iou_type}_{name}"):  # best.pth may hold the EMA's weights: beside the raw
                ax.plot(*_points(history, f"ema_{iou_type}_{name}"), "--", color=line.get_color(), label=f"{name} (EMA)")
        ax.set_title(f"{iou_type} AP")
    if class_keys:
        for key in class_keys:
            axes[0][2].plot(*_points(history, key), "-o", markersize=3, label=key.rsplit("_", 1)[1])
        axes[0][2].set_title(f"{BEST_METRIC} per class")
    best = best_epoch(history)
    for ax in axes[0]:
        if best:
            ax.axvline(best[0], color="grey", linestyle=":",
                       label=f"{best_label(history)} (epoch {best[0]}, {best[1]})")
        ax.set_xlabel("epoch")
        ax.set_ylim(bottom=0)
        _epoch_ticks(ax)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if best and best[1].removeprefix("ema_") in (f"{t}_{m}" for t in IOU_TYPES[:1] for m in AP_NAMES):
        axes[0][0].annotate(f"{best[2]:.3f}", (best[0], best[2]), textcoords="offset points", xytext=(4, 6),
                            fontsize=8)  # a segm metric: a point of the first panel
        axes[0][0].plot([best[0]], [best[2]], "*", color="red", markersize=12)
    return _save(fig, path)


def plot_lr(history: list[dict[str, Any]], path: Path) -> Path:
    """The learning rate each epoch ended with, to check that warm-up, cosine decay or plateau
    halvings happened as asked."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(*_points(history, "lr"), "-o", markersize=3)
    ax.set_xlabel("epoch")
    _epoch_ticks(ax)
    ax.set_ylabel("learning rate (end of epoch)")
    ax.set_ylim(bottom=0)
    ax.set_title("learning rate")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
    ax.grid(alpha=0.3)
    return _save(fig, path)


def best_epoch(history: list[dict[str, Any]]) -> tuple[int, str, float] | None:
    """(epoch, metric, value) of the weights ``best.pth`` holds, as training recorded them
    (``best_epoch`` and ``--select_metric`` in each row; the EMA's value where it scored higher,
    as training chose); for a history from before that record, the highest segm AP50."""
    marked = [row for row in history if "best_epoch" in row]
    if marked:
        epoch, metric = marked[-1]["best_epoch"], marked[-1]["select_metric"]
        row = next((r for r in history if r.get("epoch") == epoch), {})
        values = [(row[k], k) for k in (metric, f"ema_{metric}") if _finite(row.get(k))]
        if values:
            value, key = max(values)
            return epoch, key, float(value)
    scored = [(row["epoch"], BEST_METRIC, row[BEST_METRIC]) for row in history if _finite(row.get(BEST_METRIC))]
    return max(scored, key=lambda item: item[2]) if scored else None


def best_label(history: list[dict[str, Any]]) -> str:
    """What the marked epoch is: the one ``best.pth`` holds where training recorded it, else
    (an older history) only the highest segm AP50, which ``best.pth`` need not hold."""
    return "best.pth" if any("best_epoch" in row for row in history) else f"best {BEST_METRIC}"


def _epoch_ticks(ax: plt.Axes) -> None:
    """Whole epochs on the x axis, one tick at least: a one-epoch run is not drawn at 0.95 ... 1.05."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


def _points(history: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """The epochs where ``key`` has a value, and those values: a metric scored every few epochs
    (``--eval_every``) is still drawn as a line through them, not as dots between gaps."""
    pairs = [(float(row["epoch"]), float(row[key])) for row in history
             if _finite(row.get(key)) and _finite(row.get("epoch"))]
    return [epoch for epoch, _ in pairs], [value for _, value in pairs]


def _has_values(history: list[dict[str, Any]], key: str) -> bool:
    return any(_finite(row.get(key)) for row in history)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    write_figure(fig, path, dpi=120)
    plt.close(fig)
    return Path(path)


if __name__ == "__main__":
    run_cli(main)
