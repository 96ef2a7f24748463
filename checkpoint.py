"""The checkpoint format: one dict (``build_checkpoint``, the one place its keys are listed),
written atomically, read back with one-line errors.
"""
from __future__ import annotations

import os
import pickle
import random
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from errors import CheckpointError
from model import (ARCH_KEYS, DEFAULT_CONFIG, HEADS, apply_runtime_settings, arch_flags, build_model, saved_config,
                   shape_differences, weights_to_be_loaded)


def build_checkpoint(model: nn.Module, config: dict[str, Any], optimisation: dict[str, Any], run: dict[str, Any],
                     args: dict[str, Any], ema: nn.Module | None = None) -> dict[str, Any]:
    """The checkpoint dict, every key of it:

    - ``model``: the state dict inference and fine-tuning load: the weight average's when
      ``ema`` is given (it scored higher), else the trained weights;
    - ``raw_model``: with ``ema``, the trained weights, which a resume continues from;
    - ``weights``: ``"ema"`` or ``"raw"``, which of them ``model`` holds;
    - ``config``: everything ``model.build_model`` needs to rebuild the architecture;
    - ``optimizer``, ``scheduler``, ``scaler``, ``ema`` (``Optimisation.state_dict``): the
      optimiser state, the schedule's step and plateau state, the AMP scale, the average;
    - ``epoch``, ``best_metric``, ``best_epoch``, ``history`` and ``partial`` (``run``): the
      epochs done, the best validation score and its epoch, the history rows, and the steps
      of an epoch stopped by a signal (or None);
    - ``rng``: every random generator's state (``rng_state``);
    - ``args``: the training flags (the tile, crop and data folders later tools default to).
    """
    state = {"model": model.state_dict(), "weights": "raw", "config": config, **optimisation, "rng": rng_state(),
             "args": args, **{k: run[k] for k in ("epoch", "best_metric", "best_epoch", "history", "partial")}}
    if ema is not None:
        state.update(model=ema.state_dict(), raw_model=state["model"], weights="ema")
    return state


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write to a temporary file in the same folder, then rename: a crash mid-write never
    replaces a good checkpoint with half a file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(state, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def link_checkpoint(source: Path, path: Path) -> None:
    """``path`` becomes the same file as ``source`` without writing it again (a hard link,
    a copy where links are not supported). ``save_checkpoint`` replaces a file by renaming,
    so a later save to either name leaves the other one as it is."""
    source, path = Path(source), Path(path)
    if path.exists() and path.samefile(source):
        return
    tmp = path.with_name(f".{path.name}.link")
    tmp.unlink(missing_ok=True)
    try:
        os.link(source, tmp)
    except OSError:  # a file system without hard links: a copy, on disk before it replaces a good file
        shutil.copyfile(source, tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
    os.replace(tmp, path)


def load_checkpoint(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found; pass the best.pth or last.pth a train script wrote.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, OSError) as err:
        raise CheckpointError(f"{path}: unreadable or truncated checkpoint ({type(err).__name__}); "
                              "use last.pth/best.pth from a finished epoch.") from err
    except (ImportError, AttributeError) as err:  # pickled objects of another code base
        raise CheckpointError(f"{path}: needs code that is not installed here ({err}); install the package "
                              "versions it was written with (requirements.txt), or pass a best.pth or last.pth "
                              "a train script of this project wrote.") from err
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"{path}: not a checkpoint of this project (no 'model' and 'config'); pass the "
                              "best.pth or last.pth a train script wrote.")
    return state


def saved_args(state: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's training flags in today's meaning. Runs from before ``--early_stop N``
    saved ``early_stop`` as a switch with ``patience`` as its epoch count, while the plateau
    patience was fixed at 3."""
    args = dict(state.get("args") or {})
    if isinstance(args.get("early_stop"), bool):
        args["early_stop"] = int(args.get("patience", 10)) if args["early_stop"] else 0
        args["patience"] = 3
    return args


def load_model(path: Path, overrides: dict[str, Any] | None = None) -> tuple[nn.Module, dict[str, Any], dict]:
    """Rebuild the trained model from a checkpoint's config; ``overrides`` may change the
    runtime settings (input size, detection limits) but not the architecture."""
    state = load_checkpoint(path)
    config = {**DEFAULT_CONFIG, **saved_config(state["config"])}
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key in ARCH_KEYS and value != config[key]:
            raise CheckpointError(f"{path}: --{key} {value} contradicts the checkpoint ({key}={config[key]}); "
                                  f"drop the flag, the checkpoint already knows.")
        config[key] = value
    with weights_to_be_loaded():  # the strict load below sets every weight
        model = build_model(config, load_weights=False)
    load_weights(model, state["model"], path, config)
    apply_runtime_settings(model, config)
    return model, config, state


def load_weights(model: nn.Module, weights: dict[str, torch.Tensor], path: Path, config: dict,
                 saved: dict[str, Any] | None = None) -> None:
    """Strict load, except that a head the checkpoint lacks (``HEADS``: fine-tuning into
    ``--mask_iou`` or ``--cascade``) starts fresh. Where the weights do not fit, the error names
    every architecture setting that changes a weight's shape in which the checkpoint's config
    ``saved`` (fine-tuning: the checkpoint's, not the flags') differs from the model's
    ``config`` (``model.shape_differences``), and how to fix it."""
    own = model.state_dict()
    for key, prefix in HEADS.items():
        flag = arch_flags(saved, [key]) if saved and saved.get(key) else f"--{key}"  # with its value: --type_map W
        has_head = any(k.startswith(prefix) for k in weights)
        if has_head and not any(k.startswith(prefix) for k in own):
            raise CheckpointError(f"{path}: checkpoint was trained with {flag} but the model is built without it; "
                                  f"add {flag}.")
        if not has_head:  # the head added to a model trained without it: it starts fresh
            weights = {**{k: v for k, v in own.items() if k.startswith(prefix)}, **weights}
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        differ = shape_differences(saved or {}, config)
        if differ:
            raise CheckpointError(f"{path}: checkpoint trained with {arch_flags(saved, differ)}, model built with "
                                  f"{arch_flags(config, differ)}; fine-tune with the checkpoint's (the train script of "
                                  "its backbone, these flags as it had them).") from err
        first = str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else str(err)
        raise CheckpointError(f"{path}: weights do not fit a {config['backbone']} model with "
                              f"num_classes={config['num_classes']} ({first}); pass a checkpoint of this model.") from err


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        # A run resumed on a machine that sees fewer GPUs restores the devices it has.
        for index, device_state in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(device_state, index)
