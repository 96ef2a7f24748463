"""Parameter table of the Mask R-CNN variants: total and trainable, part by part.

Trainable counts are those of a real run: with ``--weights imagenet`` (default) the model is
built in its pretrained layout (frozen BatchNorm, frozen early stages) without downloading
anything; ``--weights none`` shows the from-scratch layout, where everything trains.
    python cal_param.py --backbone resnet --use_attn
    python cal_param.py --all --json params.json
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Iterable, Sequence

from torch import nn
from torchvision.models.detection import MaskRCNN
from torchvision.models.detection.backbone_utils import BackboneWithFPN

from argtypes import HelpFormatter, chance
from cli import run_cli
from dataloader import num_classes_arg
from files import writable_file, write_json
from model import DEFAULT_CONFIG, backbone_name, build_model, context_factor, weights_to_be_loaded

PARTS = ("backbone body", "FPN", "neck attention", "RPN", "box head", "mask head")
ALL_CONFIGS = (("resnet101", False), ("resnet101", True), ("effnet_v2_m", False), ("effnet_v2_m", True))
MISSING_ATTN = "n/a (attention_modules.py missing)"


def weights_layout(text: str) -> str:
    """An argparse type: the train scripts' ``--weights`` values, where a typo ("None", "imagnet")
    would otherwise be counted silently as the pretrained layout."""
    if text in ("imagenet", "none") or Path(text).is_file():
        return text
    raise argparse.ArgumentTypeError(f"must be imagenet, none or a weights file, got {text}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--backbone", type=backbone_name, default=None, help="resnet or effnet (default: resnet)")
    parser.add_argument("--use_attn", action="store_true", help="with the FPNTransformer neck and mask-head attention")
    parser.add_argument("--mask_iou", action="store_true", help="with the Mask Scoring head (mask_scoring.py)")
    parser.add_argument("--cascade", action="store_true", help="with the two later Cascade box stages (cascade.py)")
    parser.add_argument("--context_roi", type=context_factor, default=0.0, metavar="F",
                        help="with the box heads pooling each RoI's surroundings too (train scripts' --context_roi)")
    parser.add_argument("--type_map", type=chance, default=0.0, metavar="W",
                        help="with the cell-type map head (type_map.py) where W > 0, as the train scripts' "
                             "--type_map W (W itself changes no parameter)")
    parser.add_argument("--all", action="store_true",
                        help="all four backbone x attention configurations (instead of --backbone and --use_attn)")
    parser.add_argument("--num_classes", type=num_classes_arg, default=DEFAULT_CONFIG["num_classes"],
                        help="classes including background")
    parser.add_argument("--weights", type=weights_layout, default="imagenet",
                        help="layout to count, as the train scripts' --weights: imagenet or a local state dict's "
                             "path (pretrained: frozen stages, nothing read) or none (from scratch: all trainable)")
    parser.add_argument("--json", default=None, help="also save the table here")
    return parser


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.all and (args.backbone or args.use_attn):
        parser.error("--all counts every backbone with and without attention; drop --backbone and --use_attn, "
                     "or drop --all")
    if args.json:  # checked before the work, not at its end
        writable_file(args.json, "--json", "params.json")
    configs = ALL_CONFIGS if args.all else ((args.backbone or "resnet101", args.use_attn),)
    rows = [count_config(backbone, attn, args.num_classes, args.weights, args.mask_iou, args.cascade,
                         args.context_roi, args.type_map > 0)
            for backbone, attn in configs]
    print(f"parameters in millions (--weights {args.weights}, num_classes {args.num_classes})")
    print(format_table(rows))
    if args.json:
        write_json(args.json, {"weights": args.weights, "num_classes": args.num_classes, "configs": rows}, indent=1)
        print(f"saved {args.json}")
    return rows


def count_config(backbone: str, use_attn: bool, num_classes: int, weights: str,
                 mask_iou: bool = False, cascade: bool = False, context_roi: float = 0.0,
                 type_map: bool = False) -> dict[str, Any]:
    """One table column; an attention model whose module file is absent gets a status line
    instead of counts, so the other columns still print."""
    row: dict[str, Any] = {"backbone": backbone, "use_attn": use_attn, "mask_iou": mask_iou, "cascade": cascade,
                           "context_roi": context_roi, "type_map": type_map}
    config = {"backbone": backbone, "use_attn": use_attn, "num_classes": num_classes, "weights": weights,
              "mask_iou": mask_iou, "cascade": cascade, "context_roi": context_roi,
              "type_map": 0.5 if type_map else 0.0}  # W changes no parameter
    try:
        with weights_to_be_loaded():  # counted, never used
            model = build_model(config, load_weights=False)
    except ModuleNotFoundError as err:
        if err.name != "attention_modules":
            raise
        return {**row, "status": MISSING_ATTN}
    return {**row, "status": "ok", **count_parts(model, use_attn)}


def count_parts(model: MaskRCNN, use_attn: bool) -> dict[str, Any]:
    """Counts per part; the parts partition the model, and "mask attention" is the share of
    the mask head that sits at its entrance."""
    fpn_backbone = next(m for m in model.backbone.modules() if isinstance(m, BackboneWithFPN))
    modules = {
        "backbone body": [fpn_backbone.body],
        "FPN": [fpn_backbone.fpn],
        "RPN": [model.rpn],
        "box head": [model.roi_heads.box_head, model.roi_heads.box_predictor],
        "mask head": [model.roi_heads.mask_head, model.roi_heads.mask_predictor],
    }
    if getattr(model.roi_heads, "mask_iou_head", None) is not None:
        modules["mask IoU head"] = [model.roi_heads.mask_iou_head]
    if getattr(model.roi_heads, "cascade", None) is not None:
        modules["cascade stages"] = [model.roi_heads.cascade]
    if getattr(model.roi_heads, "type_head", None) is not None:
        modules["type map"] = [model.roi_heads.type_head]
    parts = {name: count(_params(mods).values()) for name, mods in modules.items()}
    inner = _params([fpn_backbone])
    parts["neck attention"] = count(p for p in model.backbone.parameters() if id(p) not in inner)
    parts = {name: parts[name] for name in (*PARTS, "mask IoU head", "cascade stages", "type map") if name in parts}
    counted = _params([model.backbone, *(m for mods in modules.values() for m in mods)])
    rest = count(p for p in model.parameters() if id(p) not in counted)
    if rest["total"]:
        parts["other"] = rest
    mask_attn = count(model.roi_heads.mask_head[0].parameters() if use_attn else [])
    return {"parts": parts, "mask attention": mask_attn, "total": count(model.parameters())}


def count(params: Iterable[nn.Parameter]) -> dict[str, int]:
    params = list(params)
    return {"total": sum(p.numel() for p in params), "trainable": sum(p.numel() for p in params if p.requires_grad)}


def format_table(rows: list[dict[str, Any]]) -> str:
    """Configurations as lines (total, then trainable), parts as columns."""
    parts = list(dict.fromkeys(p for r in rows if r["status"] == "ok" for p in r["parts"])) or list(PARTS)
    columns = parts + ["(mask attention)", "total"]
    widths = [max(len(c) + 2, 10) for c in columns]
    names = [(f"{row['backbone']}{' +attn' if row['use_attn'] else ''}{' +iou' if row.get('mask_iou') else ''}"
              f"{' +cascade' if row.get('cascade') else ''}"
              f"{' +context' if row.get('context_roi') else ''}{' +types' if row.get('type_map') else ''}")
             for row in rows]
    first = max(19, *(len(n) + 2 for n in names))
    lines = [f"{'configuration':<{first}}{'count':<10}" + "".join(f"{c:>{w}}" for c, w in zip(columns, widths))]
    for row, name in zip(rows, names):
        if row["status"] != "ok":
            lines.append(f"{name:<{first}}{row['status']}")
            continue
        counts = [row["parts"].get(p, {"total": 0, "trainable": 0}) for p in parts]
        counts += [row["mask attention"], row["total"]]
        for kind, label in (("total", name), ("trainable", "")):
            values = "".join(f"{c[kind] / 1e6:>{w}.3f}" for c, w in zip(counts, widths))
            lines.append(f"{label:<{first}}{kind:<10}{values}")
    return "\n".join(lines)


def _params(modules: list[nn.Module]) -> dict[int, nn.Parameter]:
    return {id(p): p for m in modules for p in m.parameters()}


if __name__ == "__main__":
    run_cli(main)
