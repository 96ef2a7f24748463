from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import engine
import training
import optimisation
import predictor
import inference
from checkpoint import CheckpointError, link_checkpoint, load_checkpoint, load_model, save_checkpoint, saved_args
from dataloader import write_split
from engine import losses_mode
from errors import UsageError
from flags import prediction_settings
from optimisation import LRSchedule, warmup_cosine
from ema import ModelEMA
from training import _run_config, build_parser
from history import LOSS_KEYS
from model import DEFAULT_CONFIG, build_model, config_from_args

TINY = {"backbone": "resnet101", "weights": "none", "min_size": 64, "max_size": 64, "input_scale": 0.0,
        "detections_per_img": 10}


def test_warmup_is_linear_from_zero_then_cosine_to_eta_min() -> None:
    lrs = [warmup_cosine(s, 10, 110, 1e-3, 1e-5) for s in range(1, 111)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a <= b for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[-1] == pytest.approx(1e-5)
    assert lrs[59] == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5))  # step 60: half-way through the decay


def _schedule(cosine: bool, patience: int = 3) -> tuple[LRSchedule, torch.optim.Optimizer]:
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1e-3)
    args = argparse.Namespace(lr=1e-3, eta_min=1e-5, use_cosine=cosine, warmup_epochs=1, epochs=4, patience=patience)
    return LRSchedule(opt, args, steps_per_epoch=5), opt


def test_schedule_state_round_trip_and_plateau() -> None:
    sched, opt = _schedule(cosine=True)
    for _ in range(7):
        sched.step()
    lr = opt.param_groups[0]["lr"]
    again, opt2 = _schedule(cosine=True)
    again.load_state_dict(sched.state_dict())
    again.step()
    sched.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(opt.param_groups[0]["lr"]) and lr > 0
    plateau, popt = _schedule(cosine=False)
    for _ in range(6):
        plateau.step()
    assert popt.param_groups[0]["lr"] == pytest.approx(1e-3)
    for _ in range(5):
        plateau.epoch_end(0.1)
    assert popt.param_groups[0]["lr"] == pytest.approx(5e-4)


def test_resume_with_more_steps_an_epoch_keeps_the_place_in_the_schedule() -> None:
    """Stopped after 1.4 of 4 epochs at 5 steps an epoch, resumed at 20 (a quarter of the batch
    size, or a quarter of the GPUs): the rates are those of an uninterrupted run at 20 steps."""
    sched, _ = _schedule(cosine=True)
    for _ in range(7):
        sched.step()
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1e-3)
    args = argparse.Namespace(lr=1e-3, eta_min=1e-5, use_cosine=True, warmup_epochs=1, epochs=4, patience=3)
    resumed, straight = LRSchedule(opt, args, steps_per_epoch=20), LRSchedule(opt, args, steps_per_epoch=20)
    resumed.load_state_dict(sched.state_dict())
    for _ in range(28):
        straight.step()
    assert resumed.steps == straight.steps == 28
    resumed.step()
    expected = warmup_cosine(29, 20, 80, 1e-3, 1e-5)
    assert opt.param_groups[0]["lr"] == pytest.approx(expected) and expected < 1e-3  # past warm-up, decaying
    older = {k: v for k, v in sched.state_dict().items() if k != "steps_per_epoch"}  # saved before it was recorded
    resumed.load_state_dict(older)
    assert resumed.steps == 7
    model = nn.Linear(2, 2)
    ema = ModelEMA(model, 0.9, warmup_steps=resumed.warmup_steps)
    whole = optimisation.Optimisation(opt, resumed, torch.amp.GradScaler("cuda", enabled=False), ema, 0.0)
    whole.load_state_dict({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "scaler": None,
                           "ema": {"module": model.state_dict(), "updates": 7}})
    assert ema.updates == 28  # the EMA's warm-up ramp moved with the schedule


def test_lr_given_on_resume_scales_the_plateau_rate() -> None:
    plateau, popt = _schedule(cosine=False)
    for _ in range(6):
        plateau.step()
    for _ in range(5):
        plateau.epoch_end(0.1)  # halved once: 5e-4
    state, saved_optimizer = plateau.state_dict(), popt.state_dict()
    again = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=1e-3)
    args = argparse.Namespace(lr=2e-4, eta_min=1e-5, use_cosine=False, warmup_epochs=1, epochs=4, patience=3)
    resumed = LRSchedule(again, args, steps_per_epoch=5)
    again.load_state_dict(saved_optimizer)  # as Optimisation.load_state_dict: the optimizer's saved rate first
    resumed.load_state_dict(state)
    assert again.param_groups[0]["lr"] == pytest.approx(1e-4)  # the typed 2e-4, halved as the run had been
    same, same_opt = _schedule(cosine=False)
    same_opt.load_state_dict(saved_optimizer)
    same.load_state_dict(state)
    assert same_opt.param_groups[0]["lr"] == pytest.approx(5e-4)


def test_patience_is_the_plateau_patience_and_wins_on_resume() -> None:
    def halvings(patience: int, state: dict | None = None) -> tuple[list[float], dict]:
        sched, opt = _schedule(cosine=False, patience=patience)
        if state:
            sched.load_state_dict(state)
        for _ in range(6):
            sched.step()
        lrs = []
        for _ in range(6):
            sched.epoch_end(0.1)
            lrs.append(opt.param_groups[0]["lr"])
        return lrs, sched.state_dict()

    assert halvings(1)[0] == pytest.approx([1e-3, 1e-3, 5e-4, 5e-4, 2.5e-4, 2.5e-4])
    assert halvings(5)[0] == pytest.approx([1e-3] * 6)
    _, saved = halvings(3)
    assert halvings(1, saved)[1]["plateau"]["patience"] == 1


def test_losses_mode_leaves_batchnorm_stats_alone() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Dropout(0.5)).eval()
    before = net[1].running_mean.clone()
    with losses_mode(net):
        assert net.training and not net[1].training and not net[2].training
        net(torch.randn(2, 3, 5, 5) + 3)
    assert torch.equal(net[1].running_mean, before)
    assert not net.training


def test_checkpoint_round_trip_and_errors(tmp_path: Path, shallow: None) -> None:
    model = build_model(TINY)
    path = tmp_path / "c.pth"
    legacy = {k: v for k, v in TINY.items() if k != "input_scale"}
    save_checkpoint(path, {"model": model.state_dict(), "config": legacy})
    fills = nn.init.normal_, nn.init.kaiming_uniform_
    loaded, config, _ = load_model(path)  # built without random fills: every weight must come from the file
    for (k, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    assert (nn.init.normal_, nn.init.kaiming_uniform_) == fills  # and later builds are random again
    with pytest.raises(CheckpointError, match="contradicts the checkpoint"):
        load_model(path, {"backbone": "effnet_v2_m"})
    assert config["input_scale"] == 0.0  # written before the key existed: trained without it
    scaled = tmp_path / "s.pth"
    save_checkpoint(scaled, {"model": model.state_dict(), "config": {**TINY, "input_scale": 2.0}})
    assert load_model(scaled)[0].transform.scale_for(20, 30) == 2.0  # the training scale travels
    assert load_model(scaled, {"input_scale": 1.5})[0].transform.scale_for(20, 30) == 1.5
    truncated = tmp_path / "t.pth"
    truncated.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(truncated)
    other = tmp_path / "o.pth"
    torch.save({"weights": 1}, other)
    with pytest.raises(CheckpointError, match="not a checkpoint"):
        load_checkpoint(other)


def test_interrupted_save_keeps_the_good_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "last.pth"
    save_checkpoint(path, {"model": {}, "config": {"epoch": 1}})

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, {"model": {}, "config": {"epoch": 2}})
    monkeypatch.undo()
    assert load_checkpoint(path)["config"] == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pth"]


def test_a_linked_checkpoint_keeps_its_content_when_the_other_name_is_saved_again(tmp_path: Path) -> None:
    best, last = tmp_path / "best.pth", tmp_path / "last.pth"
    save_checkpoint(best, {"model": {}, "config": {"epoch": 1}})
    link_checkpoint(best, last)
    assert last.samefile(best) and load_checkpoint(last)["config"] == {"epoch": 1}
    save_checkpoint(last, {"model": {}, "config": {"epoch": 2}})  # the next epoch, not better
    assert load_checkpoint(best)["config"] == {"epoch": 1} and load_checkpoint(last)["config"] == {"epoch": 2}
    link_checkpoint(last, best)  # over an existing file
    link_checkpoint(last, best)  # and again, already the same file
    assert best.samefile(last) and sorted(p.name for p in tmp_path.iterdir()) == ["best.pth", "last.pth"]


def test_early_stop_is_a_number_of_epochs_and_patience_the_plateaus(tmp_path: Path) -> None:
    parser = training.build_parser("resnet101", "x")
    args = parser.parse_args(["--early_stop", "10", "--patience", "4"])
    assert (args.early_stop, args.patience) == (10, 4)
    assert (parser.parse_args([]).early_stop, parser.parse_args([]).patience) == (0, 3)  # 0: never stop early
    with pytest.raises(SystemExit):
        parser.parse_args(["--early_stop", "--patience", "4"])  # the old switch is no number
    with pytest.raises(SystemExit):
        parser.parse_args(["--val_split", "1"])
    old = {"model": {}, "config": {}, "args": {"early_stop": True, "patience": 7, "crop": 64}}
    assert saved_args(old) == {"early_stop": 7, "patience": 3, "crop": 64}
    assert saved_args({"args": {"early_stop": False, "patience": 10}}) == {"early_stop": 0, "patience": 3}
    assert saved_args({"args": {"early_stop": 5, "patience": 2}}) == {"early_stop": 5, "patience": 2}


def test_early_stop_ends_the_run_n_epochs_after_the_best(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                         tiny_dataset: dict, shallow: None) -> None:
    scores = iter([0.1, 0.3, 0.3, 0.2, 0.9, 0.9])

    def fake_epoch(net, loaders, opt, device, args, epoch, *rest) -> dict:
        return {"epoch": epoch, "lr": 1e-4, "train_loss": 1.0, "val_loss": 1.0, "segm_AP50": next(scores),
                "seconds": 0.0, "step_seconds": 0.0}

    monkeypatch.setattr(training, "run_epoch", fake_epoch)
    out = tmp_path / "run"
    argv = ["--train_dir", str(tiny_dataset["train_dir"]), "--output_dir", str(out), "--weights", "none",
            "--num_workers", "0", "--epochs", "6", "--early_stop", "2", "--patience", "5"]
    summary = training.main(argv, "resnet101", "x")
    state = load_checkpoint(out / "last.pth")
    assert summary["best_epoch"] == 2 and state["epoch"] == 4  # epochs 3 and 4 brought nothing: stop
    assert [row["best_epoch"] for row in state["history"]] == [1, 2, 2, 2]  # what plot_curve.py marks
    assert load_checkpoint(out / "best.pth")["epoch"] == 2 and not (out / "best.pth").samefile(out / "last.pth")
    assert state["scheduler"]["plateau"]["patience"] == 5 and state["args"]["early_stop"] == 2
    old = {**state, "args": {**state["args"], "early_stop": True, "patience": 10}, "epoch": 1, "history": []}
    save_checkpoint(out / "old.pth", old)  # a run from before --early_stop N resumes
    (out / "history.json").write_text('[{"epoch": 1}]')  # its own history: later epochs would be refused
    scores = iter([0.5, 0.6])
    training.main([*argv[:-6], "--epochs", "3", "--resume", str(out / "old.pth")], "resnet101", "x")
    assert load_checkpoint(out / "last.pth")["epoch"] == 3
    assert (out / "best.pth").samefile(out / "last.pth")  # epoch 3 is the best: one file written, two names


def test_parser_has_the_contract_flags() -> None:
    parser = training.build_parser("resnet101", "x")
    args = parser.parse_args([])
    for flag in ("train_dir", "output_dir", "epochs", "batch_size", "lr", "weight_decay", "val_split",
                 "num_workers", "seed", "patience", "early_stop", "num_classes", "checkpoint", "use_attn",
                 "use_amp", "use_cosine", "eta_min", "warmup_epochs", "weights", "device", "resume",
                 "select_metric", "min_size", "max_size", "detections_per_img", "demo"):
        assert hasattr(args, flag), flag
    assert (args.lr, args.weight_decay, args.batch_size, args.epochs, args.warmup_epochs, args.eta_min) == \
        (2e-4, 1e-4, 2, 40, 5, 5e-6)
    assert args.select_metric == "segm_AP50"


class SoftBlob(nn.Module):
    """Two-stage stub (``predictor.MaskRCNNStages``' interface): one detection per view whose
    28x28 mask probability falls from 1 at the centre to 0 at the edge, so the mask area
    depends on the threshold alone."""

    detections_per_img = 100

    def __init__(self) -> None:
        super().__init__()
        grid = torch.linspace(-1, 1, 28)
        self.mask = (1 - torch.sqrt(grid[None, :] ** 2 + grid[:, None] ** 2)).clamp(min=0)

    def detect(self, crops: list[torch.Tensor], cap: int, per_class: int = 0) -> tuple[None, list[dict]]:
        return None, [{"boxes": torch.tensor([[8.0, 8.0, 40.0, 40.0]]), "scores": torch.tensor([0.9]),
                       "labels": torch.tensor([1])} for _ in crops]

    def masks(self, state: None, picks: list[torch.Tensor]) -> torch.Tensor:
        return self.mask.expand(sum(len(p) for p in picks), 28, 28)


@pytest.mark.parametrize("views", [{}, {"tile": 48, "tile_overlap": 0.5}, {"tta_scales": (1.0,)}])
def test_mask_thresh_sets_the_mask_extent_in_every_prediction_path(views: dict) -> None:
    from pycocotools import mask as mask_utils

    loader = [([torch.zeros(3, 48, 48)], [{"image_id": 7}])]
    areas = []
    for thresh in (0.2, 0.5, 0.8):
        results = predictor.predict(SoftBlob(), loader, torch.device("cpu"), predictor.Settings(mask_thresh=thresh, **views))
        assert [r["image_id"] for r in results] == [7]
        areas.append(int(mask_utils.area(results[0]["segmentation"])))
    assert 0 < areas[2] < areas[1] < areas[0] < 32 * 32


def test_inference_prediction_flags() -> None:
    """TTA is off unless --tta (the flips lost on a second held-out split); --mask_thresh must lie inside (0, 1)."""
    parse = inference.build_parser().parse_args
    assert parse(["--checkpoint", "x"]).tta is None and parse(["--checkpoint", "x", "--no_tta"]).no_tta
    assert parse(["--checkpoint", "x", "--tta"]).tta == "flips"
    assert parse(["--checkpoint", "x", "--tta", "dihedral"]).tta == "dihedral"
    views = lambda *flags: prediction_settings(parse(["--checkpoint", "x", *flags])).tta_scales  # noqa: E731
    assert views() is None and views("--tta") == (1.0,) and views("--tta_scales", "0.8", "1") == (0.8, 1.0)
    assert views("--tta_scales", "0.8", "1", "--no_tta") is None and views("--tta", "dihedral", "--no_tta") is None
    assert not prediction_settings(parse(["--checkpoint", "x", "--tta", "dihedral", "--no_tta"])).dihedral
    assert parse(["--checkpoint", "x", "--mask_thresh", "0.4"]).mask_thresh == 0.4
    assert parse(["--checkpoint", "x"]).detections_per_class is None  # the checkpoint's
    assert prediction_settings(parse(["--checkpoint", "x", "--detections_per_class", "100"])).detections_per_class == 100
    context = prediction_settings(parse(["--checkpoint", "x", "--class_context", "1", "--class_context_reach", "2"]))
    assert (context.class_context, context.context_reach) == (1.0, 2.0)
    assert prediction_settings(parse(["--checkpoint", "x"])).class_context == 0.0
    scored = lambda *flags: prediction_settings(parse(["--checkpoint", "x", *flags])).means_scores  # noqa: E731
    assert scored("--tta") and scored("--tta", "--consensus") and not scored("--tta", "--no_consensus")
    assert not scored() and not scored("--tta", "--no_tta")  # one view: its own scores
    for bad in (["--mask_thresh", "1"], ["--class_context", "-1"], ["--class_context_reach", "0"]):
        with pytest.raises(SystemExit):
            parse(["--checkpoint", "x", *bad])


def test_resume_of_a_run_from_before_input_scale_keeps_its_scale() -> None:
    args = build_parser("resnet101", "").parse_args(["--train_dir", "x", "--anchor_sizes", "8", "16", "32", "64", "128"])
    old = {k: v for k, v in config_from_args(args, "resnet101").items() if k not in ("input_scale",
                                                                                      "detections_per_class")}
    assert _run_config(args, "resnet101", {"config": old})["input_scale"] == 0.0
    assert _run_config(args, "resnet101", {"config": old})["detections_per_class"] == 0  # no class cap then
    assert _run_config(args, "resnet101", None)["input_scale"] == DEFAULT_CONFIG["input_scale"]
    assert _run_config(args, "resnet101", None)["detections_per_class"] == 100


class _NanAt(nn.Module):
    """The model, with a NaN mask loss on one call (a bad step to skip)."""

    def __init__(self, model: nn.Module, bad_call: int) -> None:
        super().__init__()
        self.model, self.bad_call, self.calls = model, bad_call, 0

    def forward(self, images: list, targets: list) -> dict:
        losses = self.model(images, targets)
        self.calls += 1
        if self.calls == self.bad_call:
            losses["loss_mask"] = losses["loss_mask"] * float("nan")
        return losses


def test_epoch_losses_equal_the_per_step_reads_of_before(tmp_path: Path, shallow: None) -> None:
    """train_one_epoch (losses read every READ_EVERY steps, fused AdamW skipping on a device
    flag) against the plain loop (every loss read and a finiteness check per step, the step
    skipped on the host: tests/baselines.py), from the same weights, seed and AdamW kernel, a
    NaN step included: the same steps counted and skipped, the same sums to 1e-4 (float
    rounding of the two loops grows over six steps; a step lost, added or updated from a NaN
    would move a sum by far more). (The AdamW kernels' agreement is the next test's.)"""
    from torch.utils.data import DataLoader

    from baselines import per_step_read_step
    from dataloader import LabelledImages, collate_fn, list_samples
    from distributed import DistInfo, StopRequest
    from synthetic import make_dataset

    paths = make_dataset(tmp_path, n_train=3, n_test=0, size=(48, 56), cells=(3, 6), seed=2)
    dataset = LabelledImages(list_samples(paths["train_dir"]), [1, 2, 3], decode_workers=1, desc="x")
    loader = DataLoader(dataset, batch_size=1, shuffle=False, collate_fn=collate_fn)
    args = argparse.Namespace(lr=1e-4, eta_min=1e-6, use_cosine=True, warmup_epochs=0, epochs=2, use_amp=False,
                              patience=3)
    config = {**TINY, "input_scale": 2.0, "max_size": 128, "rpn_post_nms_top_n_train": 100,
              "box_batch_size_per_image": 32}
    torch.manual_seed(0)
    start = build_model(config).state_dict()
    runs = {}
    for variant in ("before", "ours"):
        model = build_model(config)
        model.load_state_dict(start)
        net = _NanAt(model, bad_call=2)
        params = [p for p in model.parameters() if p.requires_grad]
        torch.manual_seed(1)
        if variant == "ours":
            optimizer = optimisation.fused_adamw(params, args.lr, 1e-4)
            opt = optimisation.Optimisation(optimizer, LRSchedule(optimizer, args, 3), torch.amp.GradScaler("cuda", enabled=False),
                                      None, 10.0)
            meter = engine.EpochMeter()
            for epoch in (1, 2):
                engine.train_one_epoch(net, loader, opt, torch.device("cpu"), args, epoch, meter, StopRequest(), DistInfo())
            runs[variant] = (meter.sums, meter.steps, meter.skipped)
            continue
        optimizer = optimisation.fused_adamw(params, args.lr, 1e-4)
        schedule, sums, steps = LRSchedule(optimizer, args, 3), dict.fromkeys(LOSS_KEYS + ("loss",), 0.0), 0
        for _ in (1, 2):
            for images, targets in loader:
                schedule.step()
                read = per_step_read_step(net, images, targets, optimizer, 10.0, torch.device("cpu"))
                if all(v == v for v in read.values()):
                    steps += 1
                    for key in LOSS_KEYS:
                        sums[key] += read[key]
                    sums["loss"] += sum(read.values())
        runs[variant] = (sums, steps, 6 - steps)
    (before, steps_before, skipped_before), (ours, steps_ours, skipped_ours) = runs["before"], runs["ours"]
    assert (steps_ours, skipped_ours) == (steps_before, skipped_before) == (5, 1)
    for key, value in before.items():
        assert ours[key] == pytest.approx(value, rel=1e-4), key


def test_fused_adamw_updates_like_the_foreach_kernel() -> None:
    """``optimisation.fused_adamw`` is AdamW: five steps on the same weights and gradients give the
    foreach kernel's weights to float32 rounding, and a step flagged ``found_inf`` changes
    neither the weights nor the step count."""
    torch.manual_seed(0)
    start = [torch.randn(64, 32), torch.randn(32)]
    grads = [[torch.randn_like(w) for w in start] for _ in range(5)]
    results = []
    for make in (lambda ps: optimisation.fused_adamw(ps, 1e-3, 1e-4),
                 lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=1e-4, foreach=True)):
        params = [torch.nn.Parameter(w.clone()) for w in start]
        optimizer = make(params)
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.clone()
            optimizer.step()
        results.append([p.detach().clone() for p in params])
    for fused, foreach in zip(*results):
        assert not torch.equal(fused, start[0] if fused.dim() == 2 else start[1])
        torch.testing.assert_close(fused, foreach, rtol=1e-5, atol=1e-6)
    params = [torch.nn.Parameter(w.clone()) for w in start]
    optimizer = optimisation.fused_adamw(params, 1e-3, 1e-4)
    for p in params:
        p.grad = torch.ones_like(p)
    optimisation.step_if_finite(optimizer, torch.tensor(float("inf")))
    assert all(torch.equal(p.detach(), w) for p, w in zip(params, start))
    assert all(float(s["step"]) == 0 and not s["exp_avg"].any() for s in optimizer.state.values())


def test_amp_resumes_a_run_saved_without_amp_and_back() -> None:
    """A disabled GradScaler saves ``{}``, which an enabled one refuses: --use_amp on resume
    then starts a fresh scale; a run saved with a scale resumes it, or drops it without AMP."""
    args = argparse.Namespace(lr=1e-3, eta_min=0.0, use_cosine=True, warmup_epochs=0, epochs=1, patience=3)

    def built(enabled: bool, scale: float = 65536.0) -> optimisation.Optimisation:
        optimizer = optimisation.fused_adamw(list(torch.nn.Linear(2, 2).parameters()), 1e-3, 0.0)
        scaler = torch.amp.GradScaler("cpu", init_scale=scale, enabled=enabled)
        return optimisation.Optimisation(optimizer, LRSchedule(optimizer, args, 3), scaler, None, 0.0)

    without = built(False).state_dict()
    assert without["scaler"] == {}
    amp = built(True)
    amp.load_state_dict(without)
    assert amp.scaler.get_scale() == 65536.0
    resumed = built(True)
    resumed.load_state_dict(built(True, scale=1024.0).state_dict())
    assert resumed.scaler.get_scale() == 1024.0
    built(False).load_state_dict(built(True, scale=1024.0).state_dict())  # AMP dropped: no error


def test_rng_state_restores_the_gpus_the_machine_has(monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint from a machine with more GPUs restores the RNG of each device present."""
    from checkpoint import rng_state, set_rng_state

    saved = {**{k: v for k, v in rng_state().items() if k != "cuda"},
             "cuda": [torch.full((8,), 1, dtype=torch.uint8), torch.full((8,), 2, dtype=torch.uint8)]}
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: restored.append((state, device)))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("restores every saved device"))
    set_rng_state(saved)
    assert len(restored) == 1 and restored[0][1] == 0 and torch.equal(restored[0][0], saved["cuda"][0])


def test_overflowed_amp_steps_are_counted_as_skipped() -> None:
    """Under AMP a step whose gradients overflow is skipped by the scaler: ``Optimisation.step``
    returns the flag (on the device), the weights stay, and the meter counts it as skipped
    while its finite losses still enter the sums."""
    args = argparse.Namespace(lr=1e-3, eta_min=0.0, use_cosine=True, warmup_epochs=0, epochs=1, patience=3)
    layer = torch.nn.Linear(2, 1)
    optimizer = optimisation.fused_adamw(list(layer.parameters()), 1e-3, 0.0)
    opt = optimisation.Optimisation(optimizer, LRSchedule(optimizer, args, 3),
                              torch.amp.GradScaler("cpu", init_scale=2.0 ** 16, enabled=True), None, 10.0)
    meter = engine.EpochMeter()
    start = [p.detach().clone() for p in layer.parameters()]
    for scale in (3e38, 1.0):  # the first loss is finite, its scaled gradient is not
        loss = layer(torch.ones(1, 2)).sum() * scale
        losses = dict.fromkeys(LOSS_KEYS, loss / len(LOSS_KEYS))
        skipped = opt.step(layer, loss)
        assert skipped.dtype == torch.bool
        meter.add(losses, loss, [1], skipped)
        if scale > 1:
            assert all(torch.equal(p, s) for p, s in zip(layer.parameters(), start))
    meter.read(1)
    assert (meter.steps, meter.skipped) == (2, 1)
    assert opt.scaler.get_scale() == 2.0 ** 15  # the scaler backed off once
    assert not all(torch.equal(p, s) for p, s in zip(layer.parameters(), start))  # the second step updated


@pytest.mark.parametrize("flags", [["--tile_overlap", "1"], ["--ema_decay", "1"], ["--epochs", "0"],
                                   ["--detections_per_class", "-1"], ["--tile", "-5"], ["--lr", "-1"]])
def test_training_flags_are_range_checked_when_read(flags: list[str], capsys: pytest.CaptureFixture) -> None:
    """A value a run would only trip over later (at the first validation, or at start with a
    traceback) stops argparse at once: one line naming the flag, exit status 2."""
    with pytest.raises(SystemExit) as stop:
        build_parser("resnet101", "x").parse_args(flags)
    assert stop.value.code == 2
    assert flags[0] in capsys.readouterr().err


def test_out_of_memory_names_the_images_in_one_line() -> None:
    from cli import describe
    from errors import EXPECTED_ERRORS

    class Exhausted(nn.Module):  # runs out in the backward pass, where a step needs the most memory
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(1))

        def forward(self, images, targets):
            return {"loss": self.weight.sum()}

    class Names:
        def name_of(self, image_id: int) -> str:
            return f"sample_{image_id}"

    class Opt:
        def step(self, model, loss):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has 1 GiB free")

    box = torch.tensor([[1.0, 1.0, 9.0, 9.0]])
    targets = [{"image_id": 3, "labels": torch.ones(5), "boxes": box.repeat(5, 1)},
               {"image_id": 7, "labels": torch.ones(2), "boxes": box.repeat(2, 1)}]
    with pytest.raises(EXPECTED_ERRORS) as raised:
        engine.train_step(Exhausted(), [torch.zeros(3, 40, 50)] * 2, targets, Opt(), None, torch.device("cpu"),
                          False, Names())
    line = describe(raised.value)
    assert line.startswith("sample_3 (40x50, 5 cells), sample_7 (40x50, 2 cells): out of memory in a training step "
                           "(Tried to allocate 2.00 GiB); try") and "--batch_size 1" in line and "\n" not in line


def test_a_checkpoint_of_another_code_base_is_refused_in_one_line(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import sys
    import types

    ghost = types.ModuleType("ghost_detector")

    class Head:
        pass

    Head.__module__, Head.__qualname__ = "ghost_detector", "Head"
    ghost.Head = Head
    monkeypatch.setitem(sys.modules, "ghost_detector", ghost)
    torch.save({"model": Head(), "config": {}}, tmp_path / "other.pth")
    monkeypatch.delitem(sys.modules, "ghost_detector")
    with pytest.raises(CheckpointError, match="other.pth: needs code that is not installed here .*ghost_detector"):
        load_checkpoint(tmp_path / "other.pth")


def test_resume_keeps_the_run_s_data_flags_and_takes_new_limits(capsys: pytest.CaptureFixture) -> None:
    from model import config_from_args

    parser = build_parser("resnet101", "")
    first = parser.parse_args(["--train_dir", "data/train", "--val_split", "0.2", "--max_size", "1024"])
    resume = {"config": config_from_args(first, "resnet101"), "args": vars(first)}

    def resumed(*flags: str) -> dict:
        argv = ["--resume", "r/last.pth", *flags]
        args = parser.parse_args(argv)
        return _run_config(args, "resnet101", resume, typed=training.typed_flags(parser, argv, args))

    with pytest.raises(CheckpointError, match="trained with --val_split 0.2, now --val_split 0.3"):
        resumed("--train_dir", "data/train", "--val_split", "0.3")
    with pytest.raises(CheckpointError, match=f"--split_seed {first.seed}, now --split_seed 7"):
        resumed("--train_dir", "data/train", "--split_seed", "7")
    with pytest.raises(CheckpointError, match="--eval_max_dets 100, now --eval_max_dets 1000"):  # what best means
        resumed("--train_dir", "data/train", "--eval_max_dets", "1000")
    same = resumed("--train_dir", "./data/../data/train", "--split_seed", str(first.seed))  # the same split
    assert same["max_size"] == 1024 and "note" not in capsys.readouterr().out  # not typed: the run's own
    smaller = resumed("--train_dir", "data/train", "--max_size", "512", "--batch_size", "1")  # the out-of-memory advice
    assert smaller["max_size"] == 512 and "--max_size 512 (was 1024)" in capsys.readouterr().out
    native = resumed("--train_dir", "data/train", "--input_scale", "1", "--min_size", "600")  # --resume's help: typed wins
    assert (native["input_scale"], native["min_size"]) == (1.0, 600)
    assert f"--input_scale 1.0 (was {resume['config']['input_scale']})" in capsys.readouterr().out


def test_a_moved_dataset_resumes_when_its_samples_split_alike(tiny_dataset: dict, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture) -> None:
    parser = build_parser("resnet101", "")
    shutil.copytree(tiny_dataset["train_dir"], tmp_path / "old" / "train")
    first = parser.parse_args(["--train_dir", str(tmp_path / "old" / "train"), "--val_split", "0.34"])
    (tmp_path / "run").mkdir()
    _, train_names, val_names, _ = training.split_of(first)
    write_split(tmp_path / "run" / "split.json", train_names, val_names, first.seed, first.val_split)
    resume = {"config": config_from_args(first, "resnet101"), "args": vars(first)}
    shutil.copytree(tmp_path / "old", tmp_path / "copy")
    args = parser.parse_args(["--resume", str(tmp_path / "run" / "last.pth"), "--train_dir",
                              str(tmp_path / "copy" / "train"), "--val_split", "0.34"])
    with pytest.raises(CheckpointError, match="other data"):  # the run's own folder is still there: another one
        _run_config(args, "resnet101", resume)
    (tmp_path / "old").rename(tmp_path / "new")
    moved = tmp_path / "new" / "train"
    args = parser.parse_args(["--resume", str(tmp_path / "run" / "last.pth"), "--train_dir", str(moved),
                              "--val_split", "0.34"])
    _run_config(args, "resnet101", resume)
    assert f"samples read from --train_dir {moved}" in capsys.readouterr().out
    shutil.rmtree(moved / val_names[0])  # one held-out sample fewer: other data
    with pytest.raises(CheckpointError, match="other data .*--train_dir"):
        _run_config(args, "resnet101", resume)


def test_resume_takes_the_run_s_own_flags_unless_typed(capsys: pytest.CaptureFixture) -> None:
    parser = build_parser("resnet101", "")
    first = parser.parse_args(["--train_dir", "d", "--use_cosine", "--lr", "0.001", "--ema_decay", "0",
                               "--output_dir", "r", "--hflip_p", "0", "--use_amp", "--num_workers", "8"])
    argv = ["--resume", "r/last.pth", "--epochs", "60", "--output_dir", "elsewhere"]
    args = parser.parse_args(argv)
    training.resume_flags(args, vars(first), training.typed_flags(parser, argv, args))
    assert (args.use_cosine, args.lr, args.ema_decay, args.hflip_p, args.train_dir) == (True, 0.001, 0, 0, "d")
    assert (args.epochs, args.resume, args.output_dir) == (60, "r/last.pth", "elsewhere")  # typed, or this call's
    assert (args.use_amp, args.num_workers) == (False, parser.get_default("num_workers"))  # this machine's
    assert "resumed with the run's own --hflip_p 0.0, --lr 0.001, --train_dir d, --use_cosine" in capsys.readouterr().out
    argv = ["--resume", "r/last.pth", "--lr", "0.0005"]
    args = parser.parse_args(argv)
    training.resume_flags(args, vars(first), training.typed_flags(parser, argv, args))
    assert (args.lr, args.use_cosine, args.epochs) == (0.0005, True, first.epochs)


def test_a_run_of_the_other_backbone_is_sent_to_its_script() -> None:
    args = build_parser("resnet101", "").parse_args(["--train_dir", "x", "--resume", "r/last.pth"])
    resume = {"config": {**DEFAULT_CONFIG, "backbone": "effnet_v2_m"}, "args": {}}
    with pytest.raises(CheckpointError, match="effnet_v2_m backbone; continue it with train_effnet_v2.py --resume r/"):
        training._run_config(args, "resnet101", resume)
    assert training._run_config(args, "effnet_v2_m", resume)["backbone"] == "effnet_v2_m"


def test_resume_writes_into_the_resumed_run_and_refuses_weights_only(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    seen = []
    monkeypatch.setattr(training, "train", lambda args, *_: seen.append(args.output_dir) or {"interrupted": 0})
    training.main(["--train_dir", "x", "--resume", str(tmp_path / "a" / "last.pth")], "resnet101", "")
    training.main(["--train_dir", "x", "--resume", str(tmp_path / "a" / "last.pth"), "--output_dir", "b"],
                  "resnet101", "")
    assert seen == [str(tmp_path / "a"), "b"]
    monkeypatch.undo()
    save_checkpoint(tmp_path / "weights.pth", {"model": {}, "config": dict(DEFAULT_CONFIG)})
    with pytest.raises(CheckpointError, match="holds weights only.*--checkpoint"):
        training.main(["--train_dir", "x", "--output_dir", str(tmp_path / "c"), "--resume",
                       str(tmp_path / "weights.pth")], "resnet101", "")
    run = tmp_path / "run"  # best.pth of epoch 2 in a run whose history goes on to epoch 3
    run.mkdir()
    save_checkpoint(run / "best.pth", {"model": {}, "config": dict(DEFAULT_CONFIG), "epoch": 2, "optimizer": {},
                                       "rng": {}})
    (run / "history.json").write_text('[{"epoch": 1}, {"epoch": 2}, {"epoch": 3}]')
    with pytest.raises(CheckpointError, match=r"epoch 2 of a run .* to epoch 3; .*--resume \S+last.pth"):
        training.main(["--train_dir", "x", "--resume", str(run / "best.pth")], "resnet101", "")
    assert (run / "history.json").read_text().count("epoch") == 3  # nothing rewound


def test_fewer_classes_than_the_labels_hold_stop_before_training(tiny_dataset: dict, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"cells of class \d but --num_classes 2 .*pass --num_classes [3-5]"):
        training.main(["--train_dir", str(tiny_dataset["train_dir"]), "--output_dir", str(tmp_path / "o"),
                       "--num_classes", "2", "--num_workers", "0", "--weights", "none"], "resnet101", "")


def test_more_classes_than_the_class_files_are_refused(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):  # a class6 would never see a cell, and would name no output
        build_parser("resnet101", "").parse_args(["--train_dir", "x", "--num_classes", "6"])
    assert "must be 2 to 5 (the background and classes of class1..class4.tif), got 6" in capsys.readouterr().err
    assert build_parser("resnet101", "").parse_args(["--train_dir", "x", "--num_classes", "5"]).num_classes == 5


def test_flags_that_defeat_each_other_are_noted() -> None:
    parser = build_parser("resnet101", "")
    assert training.schedule_notes(parser.parse_args(["--train_dir", "x"])) == []
    short = training.schedule_notes(parser.parse_args(["--train_dir", "x", "--epochs", "3"]))
    assert len(short) == 1 and "--warmup_epochs 5 >= --epochs 3" in short[0]
    early = training.schedule_notes(parser.parse_args(["--train_dir", "x", "--early_stop", "4"]))
    assert len(early) == 1 and "--early_stop 4 stops the run before the plateau" in early[0]
    assert training.schedule_notes(parser.parse_args(["--train_dir", "x", "--early_stop", "4", "--use_cosine"])) == []
    assert training.schedule_notes(parser.parse_args(["--train_dir", "x", "--early_stop", "5"])) == []
    (rare,) = training.schedule_notes(parser.parse_args(["--train_dir", "x", "--copy_paste_rare", "--use_cosine"]))
    assert "--copy_paste is 0: nothing is pasted" in rare
    assert training.schedule_notes(parser.parse_args(["--train_dir", "x", "--copy_paste_rare", "--copy_paste", "0.5",
                                                      "--use_cosine"])) == []


def test_a_fresh_run_sets_an_earlier_run_aside(tiny_dataset: dict, tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "run"
    out.mkdir()
    save_checkpoint(out / "best.pth", {"model": {}, "config": dict(DEFAULT_CONFIG), "epoch": 7})
    (out / "history.json").write_text("[]")
    with pytest.raises(UsageError):  # fine-tunes from the earlier best.pth; stops on its data, after the files moved
        training.main(["--train_dir", str(tiny_dataset["train_dir"]), "--output_dir", str(out), "--num_classes", "2",
                       "--num_workers", "0", "--weights", "none", "--checkpoint", str(out / "best.pth")],
                      "resnet101", "")
    (aside,) = out.glob("previous-*")
    assert load_checkpoint(aside / "best.pth")["epoch"] == 7 and (aside / "history.json").exists()
    assert not (out / "best.pth").exists() and f"its files are kept in {aside}" in capsys.readouterr().out


def test_use_amp_on_a_cpu_without_bf16_instructions_runs_float32_and_says_so_once(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    import devices

    cpu = torch.device("cpu")
    for native, said in ((True, 0), (False, 1)):
        monkeypatch.setattr(devices, "_BF16_NOTED", [])
        monkeypatch.setattr(devices, "native_bf16", lambda: native)
        for _ in range(3):
            with devices.autocast(cpu, True):
                assert torch.is_autocast_enabled("cpu") == native
                assert torch.get_autocast_dtype("cpu") == torch.bfloat16 or not native
        with devices.autocast(cpu, True, even_if_slow=True):  # step_time.py --compare_amp measures the cost
            assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        with devices.autocast(cpu, False):
            assert not torch.is_autocast_enabled("cpu")
        assert capsys.readouterr().out.count("so --use_amp computes in float32 here") == said
        assert devices.precision(cpu, True) == ("bfloat16" if native else "float32")
        assert capsys.readouterr().out == ""  # a query says nothing
    assert devices.amp_dtype(torch.device("cuda")) == torch.float16  # no CUDA needed to decide
    assert devices.amp_dtype(torch.device("cuda"), enabled=False) is None


def _tiny_run(tiny_dataset: dict, out: Path, *flags: str) -> list[str]:
    return ["--train_dir", str(tiny_dataset["train_dir"]), "--output_dir", str(out), "--weights", "none",
            "--num_workers", "0", *flags]


def test_a_stop_in_the_last_validation_ends_interrupted_without_predicting(tmp_path: Path, tiny_dataset: dict,
                                                                            monkeypatch: pytest.MonkeyPatch,
                                                                            shallow: None) -> None:
    """Ctrl-C while the last epoch validates used to end the loop as if nothing happened: the
    test folder was then predicted and the run exited 0. The epoch is saved and the run stops,
    exit status 3. A fresh run also sets an earlier run's curves aside with its history."""
    def fake_epoch(net, loaders, opt, device, args, epoch, coco_gt, meter, stop, info) -> dict:
        stop.requested = True  # the signal arrived during validation
        return {"epoch": epoch, "lr": 1e-4, "train_loss": 1.0, "val_loss": 1.0, "segm_AP50": 0.5, "seconds": 0.0,
                "step_seconds": 0.0}

    monkeypatch.setattr(training, "run_epoch", fake_epoch)
    out = tmp_path / "run"
    out.mkdir()
    (out / "loss_curve.png").write_bytes(b"an earlier run's curve")
    with pytest.raises(SystemExit) as stopped:
        training.main(_tiny_run(tiny_dataset, out, "--epochs", "1", "--test_dir", str(tiny_dataset["test_dir"])),
                      "resnet101", "x")
    assert stopped.value.code == training.EXIT_INTERRUPTED
    assert load_checkpoint(out / "last.pth")["epoch"] == 1 and not (out / "test-results.json").exists()
    assert not (out / "loss_curve.png").exists() and len(list(out.glob("previous-*/loss_curve.png"))) == 1


def test_a_resumed_run_applies_a_typed_weight_decay_and_averages_its_own_weights(tmp_path: Path, tiny_dataset: dict,
                                                                                monkeypatch: pytest.MonkeyPatch,
                                                                                capsys: pytest.CaptureFixture,
                                                                                shallow: None) -> None:
    """The optimizer's saved groups used to keep the run's decay over a typed --weight_decay, and
    an --ema_decay new to the run averaged the random weights the model was built with. A
    resume with no epoch left to train says so."""
    seen = []

    def fake_epoch(net, loaders, opt, device, args, epoch, *rest) -> dict:
        if opt.ema is None:  # trained: the saved weights are not those the model is built with
            next(net.parameters()).data.add_(1.0)
        same = opt.ema is not None and all(torch.equal(a, b) for a, b in zip(opt.ema.module.state_dict().values(),
                                                                             net.state_dict().values()))
        seen.append((opt.optimizer.param_groups[0]["weight_decay"], same))
        return {"epoch": epoch, "lr": 1e-4, "train_loss": 1.0, "val_loss": 1.0, "segm_AP50": 0.5, "seconds": 0.0,
                "step_seconds": 0.0}

    monkeypatch.setattr(training, "run_epoch", fake_epoch)
    out = tmp_path / "run"
    training.main(_tiny_run(tiny_dataset, out, "--epochs", "1"), "resnet101", "x")
    training.main(_tiny_run(tiny_dataset, out, "--epochs", "2", "--resume", str(out / "last.pth"), "--weight_decay",
                            "0.05", "--ema_decay", "0.9"), "resnet101", "x")
    assert seen == [(1e-4, False), (0.05, True)]
    capsys.readouterr()
    training.main(_tiny_run(tiny_dataset, out, "--epochs", "2", "--resume", str(out / "last.pth")), "resnet101", "x")
    assert len(seen) == 2 and "the run has done 2 epochs, --epochs is 2: nothing to train; pass --epochs 3" in \
        capsys.readouterr().out


def test_held_out_samples_without_a_cell_stop_before_training(tmp_path: Path, tiny_dataset: dict) -> None:
    import tifffile

    from errors import DatasetError
    sample = tmp_path / "val" / "empty"
    sample.mkdir(parents=True)
    tifffile.imwrite(sample / "image.tif", np.zeros((32, 32, 3), np.uint8))
    tifffile.imwrite(sample / "class1.tif", np.zeros((32, 32)))
    with pytest.raises(DatasetError, match="held-out sample.* hold no cell, so no epoch can be scored"):
        training.main(_tiny_run(tiny_dataset, tmp_path / "run", "--val_dir", str(tmp_path / "val"), "--epochs", "1"),
                      "resnet101", "x")


def test_a_val_dir_that_is_the_train_dir_is_refused_and_shared_names_noted(tmp_path: Path, tiny_dataset: dict,
                                                                           capsys: pytest.CaptureFixture) -> None:
    from errors import DatasetError

    train = Path(tiny_dataset["train_dir"])
    args = argparse.Namespace(train_dir=str(train), val_dir=str(train / ".." / train.name))  # another spelling
    with pytest.raises(DatasetError, match="--val_dir is --train_dir, so every held-out sample also trains"):
        training.split_of(args)
    copy, first = tmp_path / "val", sorted(p.name for p in train.iterdir())[0]
    shutil.copytree(train / first, copy / "again")
    shutil.copytree(train / first, copy / first)  # a copy under its name: most likely the same image
    _, names, val_names, _ = training.split_of(argparse.Namespace(train_dir=str(train), val_dir=str(copy)))
    assert len(val_names) == 2 and len(names) == len(list(train.iterdir()))
    assert "note: 1 of --val_dir's 2 samples have names also in --train_dir" in capsys.readouterr().out


def test_out_of_memory_validating_keeps_the_epoch_and_resume_validates_it(tmp_path: Path, tiny_dataset: dict,
                                                                         monkeypatch: pytest.MonkeyPatch,
                                                                         shallow: None) -> None:
    """It was a raw traceback after a whole epoch of training, nothing saved."""
    from errors import DeviceMemoryError

    def exhausted(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")

    monkeypatch.setattr(engine, "validation_loss", exhausted)
    out = tmp_path / "run"
    flags = _tiny_run(tiny_dataset, out, "--epochs", "1", "--crop", "64", "--max_size", "256")
    with pytest.raises(DeviceMemoryError, match=r"out of memory validating epoch 1 .*--tile.*--resume .*last.pth"):
        training.main(flags, "resnet101", "x")
    saved = load_checkpoint(out / "last.pth")
    assert saved["epoch"] == 0 and saved["partial"]["epoch"] == 1 and saved["partial"]["batches"] > 0
    monkeypatch.undo()
    calls = []
    monkeypatch.setattr(engine, "train_step", lambda *a, **k: calls.append(1))  # no step left to train
    training.main([*flags, "--resume", str(out / "last.pth")], "resnet101", "x")
    history = load_checkpoint(out / "last.pth")["history"]
    assert calls == [] and len(history) == 1 and "val_loss" in history[0] and "segm_AP50" in history[0]
