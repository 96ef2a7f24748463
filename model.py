"""The one model builder every script uses: backbone + FPN + Mask R-CNN settings + attention.

``config`` is a plain dict saved in every checkpoint, so inference and visualisation rebuild
exactly the trained architecture without repeating flags.
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import math
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import nn
from torchvision.models import EfficientNet_V2_M_Weights, ResNet101_Weights, efficientnet_v2_m, resnet101
from torchvision.models.detection import MaskRCNN, MaskRCNN_ResNet50_FPN_Weights
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

from argtypes import chance, checked, positive, positive_int
from cascade import CascadeHeads
from dataloader import num_classes_arg
from detector import CellTransform, ContextRoIAlign, FrozenBatchNorm2d, use_cell_detector
from errors import WeightsError
from mask_scoring import MaskIoUHead
from type_map import TypeMapHead

BACKBONES = ("resnet101", "effnet_v2_m")
BACKBONE_ALIASES = {"resnet": "resnet101", "effnet": "effnet_v2_m", "resnet101": "resnet101",
                    "effnet_v2_m": "effnet_v2_m", "efficientnet_v2_m": "effnet_v2_m"}

# Defaults chosen from the real task statistics and measured on held-out images (benchmarks/RESULTS.md).
DEFAULT_CONFIG: dict[str, Any] = {
    "backbone": "resnet101",
    "num_classes": 5,
    "weights": "imagenet",
    "init_detector": None,
    "trainable_layers": 3,
    "use_attn": False,
    "mask_iou": False,
    "cascade": False,
    "context_roi": 0.0,
    "type_map": 0.0,
    "attn": {},
    "min_size": 1024,
    "max_size": 2048,
    "max_upscale": 1.0,
    "input_scale": 2.0,
    "anchor_sizes": [16, 32, 64, 128, 256],
    "aspect_ratios": [0.5, 1.0, 2.0],
    "rpn_pre_nms_top_n_train": 4000,
    "rpn_post_nms_top_n_train": 2000,
    "rpn_pre_nms_top_n_test": 4000,
    "rpn_post_nms_top_n_test": 2000,
    "rpn_batch_size_per_image": 256,
    "box_batch_size_per_image": 512,
    "box_score_thresh": 0.0,
    "box_nms_thresh": 0.5,
    "detections_per_img": 1000,
    "detections_per_class": 100,
    "effnet_taps": [2, 3, 4, 6],
    "effnet_frozen": 2,
}

UNLIMITED = 1 << 40  # "no limit" as a count: top-k and slicing take it as it is

# What a checkpoint written before a key existed was trained with (its config lacks the key).
LEGACY_CONFIG: dict[str, Any] = {"input_scale": 0.0, "effnet_taps": [2, 3, 5, 7], "effnet_frozen": 3,
                                  "detections_per_class": 0, "mask_iou": False, "cascade": False,
                                  "context_roi": 0.0, "type_map": 0.0}
# The optional heads: each one's config key (its flag) and where its weights sit in a state dict.
# A checkpoint from before one existed was trained without it.
HEADS = {"mask_iou": "roi_heads.mask_iou_head.", "cascade": "roi_heads.cascade.", "type_map": "roi_heads.type_head."}
# Keys that change the architecture (or which weights train): a checkpoint's values always win.
ARCH_KEYS = ("backbone", "num_classes", "use_attn", "mask_iou", "cascade", "context_roi", "type_map", "attn",
             "anchor_sizes", "aspect_ratios", "effnet_taps", "effnet_frozen")
# Of ARCH_KEYS, those the train scripts take as flags.
ARCH_FLAGS = ("num_classes", "use_attn", "mask_iou", "cascade", "context_roi", "type_map", "anchor_sizes")


def saved_config(saved: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's config, completed with what it was trained with for keys added since:
    an old run must not pick up a later default (it would predict or resume at another scale)."""
    return {**LEGACY_CONFIG, **saved}


def shape_differences(saved: dict[str, Any], config: dict[str, Any]) -> list[str]:
    """The architecture keys in which a checkpoint's config ``saved`` and a model's ``config``
    differ in a way that changes a weight's shape (anchor sizes and --context_roi's factor do
    not; whether there is a context branch does). The heads of ``HEADS`` are not among them:
    a model may add one to weights trained without it."""
    keys = ["backbone", "num_classes", "use_attn", "context_roi"]
    if saved.get("backbone") == config.get("backbone") == "effnet_v2_m":
        keys.append("effnet_taps")

    def shaping(key: str, value: Any) -> Any:  # what of the value decides the shapes
        return bool(value) if key == "context_roi" else value
    return [k for k in keys if k in saved and shaping(k, saved[k]) != shaping(k, config.get(k))]


def arch_flags(config: dict[str, Any], keys: Sequence[str]) -> str:
    """``keys`` of ``config`` as the train scripts' flags spell them ("no --use_attn" for a switch
    off; keys without a flag as key=value), for errors about an architecture mismatch."""
    parts = []
    for key in keys:
        value = config.get(key)
        if key == "attn" and "use_attn" in keys:  # the attention modules' settings, derived from --use_attn
            continue
        if key not in ARCH_FLAGS:
            parts.append(f"{key}={value}")
        elif isinstance(value, bool):
            parts.append(f"--{key}" if value else f"no --{key}")
        else:
            parts.append(f"--{key} {' '.join(map(str, value)) if isinstance(value, (list, tuple)) else value}")
    return ", ".join(parts)


# Output channels of EfficientNetV2-M's `features` blocks 2..7 (strides 4, 8, 16, 16, 32, 32).
# The paper's FPN taps 2/3/4/6 (Table 3's 54.16 M); checkpoints from before it tapped 2/3/5/7.
_EFFNET_CHANNELS = {2: 48, 3: 80, 4: 160, 5: 176, 6: 304, 7: 512}


def add_model_args(parser: argparse.ArgumentParser, backbone: str | None = None) -> None:
    """Model flags; every default lives in DEFAULT_CONFIG."""
    d = DEFAULT_CONFIG
    group = parser.add_argument_group("model")
    if backbone is None:
        group.add_argument("--backbone", type=backbone_name, default=None,
                           help="resnet or effnet (inference/visualisation: must match the checkpoint if given)")
    group.add_argument("--num_classes", type=num_classes_arg, default=d["num_classes"],
                       help="classes including background")
    group.add_argument("--weights", default=d["weights"],
                       help="backbone init: 'imagenet' (torchvision download), 'none' (random, trainable "
                            "GroupNorm) or a path to a local ImageNet state dict of the backbone")
    group.add_argument("--init_detector", default=None,
                       help="initialise FPN, RPN, box and mask heads from torchvision's COCO Mask R-CNN R50-FPN: "
                            "'coco' (download) or a path to its state dict; class-specific layers start fresh")
    group.add_argument("--use_attn", action="store_true", help="add the FPNTransformer neck and the mask-head attention")
    group.add_argument("--mask_iou", action="store_true",
                       help="Mask Scoring: a head predicts each mask's IoU with its cell, and detections are ranked "
                            "by class probability x predicted IoU (mask_scoring.py)")
    group.add_argument("--cascade", action="store_true",
                       help="Cascade R-CNN: two more box stages, trained at IoU 0.6 and 0.7 on the previous stage's "
                            "boxes; scores are the stages' mean class probability, boxes and masks the last "
                            "stage's (cascade.py)")
    group.add_argument("--context_roi", type=context_factor, default=d["context_roi"], metavar="F",
                       help="the box heads also pool each RoI's box enlarged F times about its centre (its "
                            "surroundings: cell type depends on them), concatenated with its own features; +12.8 M "
                            "parameters at 256 channels (0: off)")
    group.add_argument("--type_map", type=chance, default=d["type_map"], metavar="W",
                       help="a cell-type map: a head on the finest pyramid level learns every pixel's class, and "
                            "each detection's class probabilities become the box classifier's and the map's in its "
                            "box, mixed as p_box^(1-W) x p_map^W (0: off; type_map.py)")
    group.add_argument("--min_size", type=positive_int, default=d["min_size"],
                       help="with --input_scale 0: shorter side is scaled to this (never up beyond --max_upscale)")
    group.add_argument("--max_size", type=positive_int, default=d["max_size"],
                       help="longer side is scaled down to at most this")
    group.add_argument("--max_upscale", type=positive, default=d["max_upscale"],
                       help="with --input_scale 0: largest factor a small image is scaled up by (1 = native)")
    group.add_argument("--input_scale", type=scale_factor, default=d["input_scale"],
                       help="resize every training crop, tile and image by exactly this factor, so cells have one "
                            "size in pixels from training to prediction (at 2, 256 px crops become 512 px; 0: off, "
                            "--min_size and --max_upscale decide); --max_size still caps whole images; scale "
                            "--anchor_sizes with it")
    group.add_argument("--anchor_sizes", type=positive_int, nargs=5, default=d["anchor_sizes"],
                       help="anchor side per pyramid level P2..P6, in input pixels")
    for stage in ("train", "test"):
        pre, post = f"rpn_pre_nms_top_n_{stage}", f"rpn_post_nms_top_n_{stage}"
        group.add_argument(f"--{pre}", type=positive_int, default=d[pre],
                           help=f"RPN proposals per pyramid level kept before the NMS ({stage})")
        group.add_argument(f"--{post}", type=positive_int, default=d[post],
                           help=f"RPN proposals per image kept after the NMS ({stage})")
    group.add_argument("--box_batch_size_per_image", type=positive_int, default=d["box_batch_size_per_image"],
                       help="RoIs sampled per image for the box and mask heads")
    group.add_argument("--box_score_thresh", type=chance, default=d["box_score_thresh"],
                       help="detections below this score are dropped inside the model (AP likes 0)")
    group.add_argument("--box_nms_thresh", type=chance, default=d["box_nms_thresh"],
                       help="IoU above which a detection of a class suppresses a weaker one of that class")


def image_cap(detections_per_img: int) -> int:
    """The detections an image keeps: ``detections_per_img``, or every one for 0 (a whole-slide
    image holds tens of thousands of cells; each tile and view still keeps at most what its
    area can hold, ``predictor.MaskRCNNStages.view_cap``)."""
    return int(detections_per_img) if detections_per_img > 0 else UNLIMITED


context_factor = checked(float, lambda v: v == 0.0 or v >= 1.0, "0 (off) or at least 1")  # --context_roi


def backbone_name(name: str) -> str:
    """Canonical backbone name from a short alias (argparse type)."""
    if name not in BACKBONE_ALIASES:
        raise argparse.ArgumentTypeError(f"unknown backbone {name!r}; choose resnet or effnet")
    return BACKBONE_ALIASES[name]


def scale_factor(text: str) -> float:
    """argparse type for --input_scale: a negative factor means nothing, 0 switches it off."""
    value = float(text)
    if value < 0.0:
        raise argparse.ArgumentTypeError(f"must be 0 (off) or above, got {text}")
    return value


def config_from_args(args: argparse.Namespace, backbone: str) -> dict[str, Any]:
    """The model config from parsed flags (train scripts)."""
    config = dict(DEFAULT_CONFIG)
    for key in config:
        if hasattr(args, key) and getattr(args, key) is not None:
            config[key] = getattr(args, key)
    config["backbone"] = backbone
    config["anchor_sizes"] = list(config["anchor_sizes"])
    config["attn"] = attention_defaults() if config["use_attn"] else {}
    return config


def attention_defaults() -> dict[str, dict[str, Any]]:
    """The attention modules' hyperparameters, written into the config so a checkpoint
    records exactly what was built."""
    from attention_modules import FPNTransformer, SpatialChannelTransformer

    def defaults(cls: type) -> dict[str, Any]:
        params = inspect.signature(cls.__init__).parameters.values()
        return {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}

    return {"neck": defaults(FPNTransformer), "mask": defaults(SpatialChannelTransformer)}


_RANDOM_FILLS = ("uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
                 "xavier_normal_", "orthogonal_")


@contextlib.contextmanager
def weights_to_be_loaded() -> Iterator[None]:
    """Modules built inside skip their random initialisation (``torch.nn.init`` fills), for a
    model whose every weight a strict ``load_state_dict`` overwrites next, or whose weights
    are only counted: the fills of ResNet-101 and its box head cost more than building it."""
    saved = {name: getattr(nn.init, name) for name in _RANDOM_FILLS}
    for name in saved:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fill in saved.items():
            setattr(nn.init, name, fill)


def build_model(config: dict[str, Any], load_weights: bool = True) -> MaskRCNN:
    """Mask R-CNN from ``config``; ``load_weights=False`` skips the backbone's pretrained
    weights (a checkpoint will overwrite them anyway) but keeps its pretrained layout."""
    config = {**DEFAULT_CONFIG, **config}
    if config["backbone"] not in BACKBONES:
        raise ValueError(f"unknown backbone {config['backbone']!r}; choose one of {BACKBONES}")
    if config["backbone"] == "resnet101":
        backbone = _resnet_fpn(config["weights"], config["trainable_layers"], load_weights)
    else:
        backbone = _effnet_fpn(config["weights"], load_weights, config["effnet_taps"], config["effnet_frozen"])
    if config["use_attn"]:
        from attention_modules import BackboneWithAttention, FPNTransformer

        backbone = BackboneWithAttention(backbone, FPNTransformer(**_attn_kwargs(config, "neck")))
    anchors = AnchorGenerator(
        sizes=tuple((s,) for s in config["anchor_sizes"]),
        aspect_ratios=(tuple(config["aspect_ratios"]),) * len(config["anchor_sizes"]),
    )
    model = MaskRCNN(
        backbone,
        num_classes=config["num_classes"],
        rpn_anchor_generator=anchors,
        rpn_pre_nms_top_n_train=config["rpn_pre_nms_top_n_train"],
        rpn_post_nms_top_n_train=config["rpn_post_nms_top_n_train"],
        rpn_pre_nms_top_n_test=config["rpn_pre_nms_top_n_test"],
        rpn_post_nms_top_n_test=config["rpn_post_nms_top_n_test"],
        rpn_batch_size_per_image=config["rpn_batch_size_per_image"],
        box_batch_size_per_image=config["box_batch_size_per_image"],
        box_score_thresh=config["box_score_thresh"],
        box_nms_thresh=config["box_nms_thresh"],
        box_detections_per_img=image_cap(config["detections_per_img"]),
    )
    use_cell_detector(model, config)
    if config["use_attn"]:
        from attention_modules import SpatialChannelTransformer

        head = model.roi_heads.mask_head
        model.roi_heads.mask_head = nn.Sequential(SpatialChannelTransformer(**_attn_kwargs(config, "mask")), head)
    if config["mask_iou"]:
        model.roi_heads.mask_iou_head = MaskIoUHead(backbone.out_channels, config["num_classes"])
    side = model.roi_heads.box_roi_pool.output_size[0]
    box_features = backbone.out_channels * side * side
    if config.get("context_roi"):  # the box heads see each RoI and its surroundings: twice the features
        model.roi_heads.box_roi_pool = ContextRoIAlign(model.roi_heads.box_roi_pool, config["context_roi"])
        box_features *= 2
        model.roi_heads.box_head = TwoMLPHead(box_features, model.roi_heads.box_head.fc7.out_features)
    if config["cascade"]:
        model.roi_heads.cascade = CascadeHeads(box_features, config["num_classes"])
    if config.get("type_map"):
        model.roi_heads.type_head = TypeMapHead(backbone.out_channels, config["num_classes"], weight=config["type_map"])
    if config["init_detector"] and load_weights:
        init_detector(model, config["init_detector"])
    return model


def init_detector(model: MaskRCNN, source: str) -> dict[str, int]:
    """Copy the class-agnostic detector layers of torchvision's COCO Mask R-CNN R50-FPN into
    ``model``: FPN, RPN, box head, mask head and the mask deconvolution. Tensors whose shape
    differs (an EfficientNet's FPN inputs, the class-specific predictors) keep their init."""
    state = _load_state(source, MaskRCNN_ResNet50_FPN_Weights.COCO_V1)
    targets = {"backbone.fpn.": _find(model.backbone, FeaturePyramidNetwork), "rpn.": model.rpn,
               "roi_heads.box_head.": model.roi_heads.box_head,
               "roi_heads.mask_head.": _find(model.roi_heads.mask_head, MaskRCNNHeads),
               "roi_heads.mask_predictor.conv5_mask.": model.roi_heads.mask_predictor.conv5_mask}
    counts = {"loaded": 0, "skipped": 0}
    for prefix, module in targets.items():
        own = module.state_dict()
        part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        fitting = {k: v for k, v in part.items() if k in own and own[k].shape == v.shape}
        module.load_state_dict(fitting, strict=False)
        counts["loaded"] += len(fitting)
        counts["skipped"] += len(part) - len(fitting)
    if counts["loaded"] == 0:
        raise WeightsError(f"{source}: no tensor fits a Mask R-CNN R50-FPN (--init_detector); pass torchvision's "
                           "maskrcnn_resnet50_fpn COCO state dict.")
    print(f"init_detector: {counts['loaded']} tensors from {source}, {counts['skipped']} kept fresh (shape differs)")
    return counts


def apply_runtime_settings(model: MaskRCNN, config: dict[str, Any]) -> None:
    """Settings that change no weights (input size, detection limits) can differ at inference."""
    model.transform = CellTransform.from_config(config)
    model.roi_heads.score_thresh = config["box_score_thresh"]
    model.roi_heads.nms_thresh = config["box_nms_thresh"]
    model.roi_heads.detections_per_img = image_cap(config["detections_per_img"])
    model.roi_heads.detections_per_class = int(config.get("detections_per_class") or 0)
    model.rpn._pre_nms_top_n["testing"] = config["rpn_pre_nms_top_n_test"]
    model.rpn._post_nms_top_n["testing"] = config["rpn_post_nms_top_n_test"]


def _resnet_fpn(weights: str, trainable_layers: int, load_weights: bool) -> BackboneWithFPN:
    pretrained = weights != "none"
    # From scratch: zero-init the last norm of each block so 33 random residual blocks start as identity.
    body = resnet101(weights=None, norm_layer=FrozenBatchNorm2d if pretrained else _group_norm,
                     zero_init_residual=not pretrained)
    if pretrained and load_weights:
        _load_backbone_weights(body, weights, ResNet101_Weights.IMAGENET1K_V2)
    layers = ["layer4", "layer3", "layer2", "layer1", "conv1"][: trainable_layers if pretrained else 5]
    for name, param in body.named_parameters():
        param.requires_grad_(any(name.startswith(layer) for layer in layers) or not pretrained)
    return BackboneWithFPN(
        body,
        return_layers={"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"},
        in_channels_list=[256, 512, 1024, 2048],
        out_channels=256,
        extra_blocks=LastLevelMaxPool(),
    )


def _effnet_fpn(weights: str, load_weights: bool, taps: list[int], frozen: int) -> BackboneWithFPN:
    """``features`` blocks ``taps`` feed the FPN (blocks after the last never run); the first
    ``frozen`` blocks keep their ImageNet weights (the paper: stem and stage 1)."""
    pretrained = weights != "none"
    net = efficientnet_v2_m(weights=None)
    if pretrained and load_weights:
        _load_backbone_weights(net, weights, EfficientNet_V2_M_Weights.IMAGENET1K_V1)
    features = net.features
    # Pretrained: frozen statistics (batches of 2 would wreck them); random: GroupNorm that learns.
    _replace_batchnorm(features, _frozen_from if pretrained else lambda bn: _group_norm(bn.num_features))
    if not pretrained:
        _zero_init_residuals(features)
    if pretrained:
        features[:frozen].requires_grad_(False)
    return BackboneWithFPN(
        features,
        return_layers={str(block): str(level) for level, block in enumerate(taps)},
        in_channels_list=[_EFFNET_CHANNELS[block] for block in taps],
        out_channels=256,
        extra_blocks=LastLevelMaxPool(),
    )


def _load_backbone_weights(net: nn.Module, weights: str, enum: Any) -> None:
    """torchvision's ImageNet weights for 'imagenet', or a local state dict for a path."""
    state = _load_state(weights, enum)
    own = net.state_dict()
    wrong = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    if wrong or missing:
        raise WeightsError(f"{weights}: not a {type(net).__name__} ImageNet state dict ({len(missing)} missing keys, "
                           f"{len(wrong)} of another shape, e.g. {(wrong + missing)[:3]}); pass torchvision's "
                           "ImageNet weights of that network to --weights.")
    net.load_state_dict(state, strict=False)


def _zero_init_residuals(features: nn.Module) -> None:
    """Start every residual MBConv block as identity, as zero_init_residual does for ResNet:
    without it, dozens of random blocks add up to huge activations and losses."""
    for block in features.modules():
        if getattr(block, "use_res_connect", False):
            nn.init.zeros_(block.block[-1][1].weight)


def _load_state(source: str, enum: Any) -> dict[str, torch.Tensor]:
    """torchvision's weights for the named source ('imagenet', 'coco'), or a local file; the
    download error says how to work offline."""
    if source in ("imagenet", "coco"):
        try:
            return enum.get_state_dict(progress=True, check_hash=True)
        except Exception as err:  # offline clusters: URLError, OSError, RuntimeError...
            raise WeightsError(
                f"{enum.url}: could not download {enum} ({type(err).__name__}: {err}); offline? Download it on a "
                f"machine with internet and pass its path instead of '{source}'."
            ) from err
    path = Path(source)
    if not path.is_file():
        raise WeightsError(f"{source}: no such weights file; pass 'imagenet'/'coco', 'none' or a state-dict path.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, not a torch file, or pickled objects weights_only refuses
        raise WeightsError(f"{source}: not a readable state dict ({type(err).__name__}); pass a torch.save'd state "
                           "dict, or a best.pth/last.pth of this project as --checkpoint.") from err
    return state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state


def _find(root: nn.Module, kind: type) -> nn.Module:
    """The first submodule of a type (the FPN inside an attention wrapper, the stock mask
    head behind the attention module)."""
    for module in root.modules():
        if isinstance(module, kind):
            return module
    raise LookupError(f"no {kind.__name__} in {type(root).__name__}")


def _attn_kwargs(config: dict[str, Any], part: str) -> dict[str, Any]:
    return dict(config.get("attn", {}).get(part, {}))


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)


def _frozen_from(bn: nn.BatchNorm2d) -> FrozenBatchNorm2d:
    frozen = FrozenBatchNorm2d(bn.num_features, eps=bn.eps)
    frozen.weight.copy_(bn.weight.detach())
    frozen.bias.copy_(bn.bias.detach())
    frozen.running_mean.copy_(bn.running_mean)
    frozen.running_var.copy_(bn.running_var)
    return frozen


def _replace_batchnorm(module: nn.Module, make: Any) -> None:
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, make(child))
        else:
            _replace_batchnorm(child, make)
