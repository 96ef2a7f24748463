"""Preemption, non-finite losses and bad inputs to the training run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import engine
import training
import train_resnet
from checkpoint import load_checkpoint
from errors import DivergenceError
from conftest import ROOT
from synthetic import make_dataset

SMALL = ["--min_size", "64", "--max_size", "96", "--input_scale", "0", "--detections_per_img", "10", "--num_workers", "0",
         "--weights", "none", "--warmup_epochs", "1", "--rpn_pre_nms_top_n_train", "200",
         "--rpn_post_nms_top_n_train", "100", "--rpn_pre_nms_top_n_test", "200", "--rpn_post_nms_top_n_test", "50",
         "--box_batch_size_per_image", "32", "--use_cosine"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return make_dataset(tmp_path_factory.mktemp("faults"), n_train=4, n_test=1, size=(72, 80), cells=(3, 6), seed=1)


def _args(data: dict, out: Path, *extra: str) -> list[str]:
    return ["--train_dir", str(data["train_dir"]), "--output_dir", str(out), "--batch_size", "1", *SMALL, *extra]


def test_sigterm_mid_epoch_then_resume_continues(data: dict, tmp_path: Path, shallow: None) -> None:
    """SIGTERM as torchrun and Slurm send it, to the whole process group: the loader's workers
    get it too, and must leave the stop to the main process rather than die under it."""
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "tests/shallow.py"), "train_resnet.py",
           *_args(data, out, "--epochs", "2", "--val_split", "0.25", "--num_workers", "2")]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    lines = []
    for line in proc.stdout:  # the signal handler is installed before "data:" is printed
        lines.append(line)
        if line.startswith("data:"):
            break
    time.sleep(1.0)  # a few steps of the shallow model (a stop before the first step resumes just as well)
    os.killpg(proc.pid, signal.SIGTERM)
    rest, _ = proc.communicate(timeout=300)
    log = "".join(lines) + rest
    assert proc.returncode == training.EXIT_INTERRUPTED, log
    assert "SIGTERM" in log and "--resume" in log
    stopped = load_checkpoint(out / "last.pth")
    steps_per_epoch = 3  # 4 samples, 1 held out, batch 1
    done = (stopped["epoch"]) * steps_per_epoch + (stopped["partial"] or {"batches": 0})["batches"]
    assert stopped["scheduler"]["steps"] == done
    assert not list(out.glob(".*.tmp"))

    summary = train_resnet.main(_args(data, out, "--epochs", "2", "--val_split", "0.25", "--resume", str(out / "last.pth")))
    final = load_checkpoint(out / "last.pth")
    assert summary["best_epoch"] >= 1 and final["epoch"] == 2 and final["partial"] is None
    assert final["scheduler"]["steps"] == 2 * steps_per_epoch
    assert {int(s["step"]) for s in final["optimizer"]["state"].values()} == {2 * steps_per_epoch}
    history = json.loads((out / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2]


def test_non_finite_loss_is_skipped_and_counted(data: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                shallow: None) -> None:
    real = engine._forward_losses
    calls = {"n": 0}

    def one_nan(*args, **kwargs):
        losses = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            losses["loss_mask"] = losses["loss_mask"] * float("nan")
        return losses

    monkeypatch.setattr(engine, "_forward_losses", one_nan)
    out = tmp_path / "nan"
    train_resnet.main(_args(data, out, "--epochs", "1", "--val_split", "0"))
    row = json.loads((out / "history.json").read_text())[0]
    assert row["skipped_steps"] == 1 and row["train_loss"] is not None
    params = load_checkpoint(out / "last.pth")["model"]
    assert all(torch.isfinite(v).all() for v in params.values() if v.is_floating_point())


def test_many_non_finite_losses_stop_the_run(data: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             shallow: None) -> None:
    real = engine._forward_losses
    calls = iter(range(1_000))
    steps_per_epoch = 4  # 4 samples, none held out, batch 1
    monkeypatch.setattr(engine, "MAX_BAD_STEPS", 2)
    def losses(*args, **kwargs) -> dict:  # epoch 1 finite, then infinite
        scale = 1.0 if next(calls) < steps_per_epoch else float("inf")
        return {key: value * scale for key, value in real(*args, **kwargs).items()}

    monkeypatch.setattr(engine, "_forward_losses", losses)
    out = tmp_path / "inf"
    with pytest.raises(DivergenceError, match=r"epoch 2: 2 non-finite losses in a row; lower --lr.*; then --resume "
                                              r".*inf/last.pth continues from its last finished epoch\.$"):
        train_resnet.main(_args(data, out, "--epochs", "2", "--val_split", "0"))
    kept = load_checkpoint(out / "last.pth")  # the diverged weights did not replace epoch 1's
    assert kept["epoch"] == 1 and kept["partial"] is None
    calls = iter(range(steps_per_epoch, 1_000))  # every loss infinite: no epoch to fall back on
    # --use_amp is named where it changes the precision (here as if bf16; float32 where it does not)
    monkeypatch.setattr(training, "amp_dtype", lambda device, use_amp: torch.bfloat16 if use_amp else None)
    monkeypatch.setattr(training, "precision", lambda device, use_amp: "bfloat16")
    with pytest.raises(DivergenceError, match=r"epoch 1: 2 non-finite losses in a row; .*named above .*, or drop "
                                              r"--use_amp \(bfloat16 here\)\.$"):
        train_resnet.main(_args(data, tmp_path / "inf0", "--epochs", "1", "--val_split", "0", "--use_amp"))


def test_unwritable_output_dir(data: dict, tmp_path: Path) -> None:
    if os.geteuid() == 0:
        blocker = tmp_path / "file"
        blocker.write_text("x")
        target = blocker / "out"  # a folder inside a file can never be created, even by root
    else:
        target = tmp_path / "ro" / "out"
        (tmp_path / "ro").mkdir(mode=0o500)
    with pytest.raises(PermissionError, match="not writable"):
        train_resnet.main(_args(data, target, "--epochs", "1"))


def test_checkpoint_from_another_model_is_refused(data: dict, tmp_path: Path, shallow: None) -> None:
    bad = tmp_path / "other.pth"
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}, "config": {"backbone": "resnet101"}}, bad)
    from checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="weights do not fit"):
        train_resnet.main(_args(data, tmp_path / "ft", "--epochs", "1", "--checkpoint", str(bad)))


def test_out_of_memory_on_another_rank_names_what_is_saved(tmp_path: Path) -> None:
    """Rank 0 saves the epoch's steps; another rank cannot, and says what --resume will find."""
    from distributed import DistInfo

    saved = []
    main = training._memory_resume(lambda: saved.append(1) or tmp_path / "last.pth", tmp_path, DistInfo())
    assert saved == [1] and f"--resume {tmp_path / 'last.pth'}" in main and "kept" in main
    other = DistInfo(rank=1, world_size=2)
    assert "before any epoch was saved" in training._memory_resume(pytest.fail, tmp_path, other)
    (tmp_path / "last.pth").touch()
    message = training._memory_resume(pytest.fail, tmp_path, other)
    assert "steps are lost" in message and f"--resume {tmp_path / 'last.pth'}, its last finished epoch" in message


@pytest.mark.parametrize("failure", ["DeviceMemoryError", "DatasetError", "KeyboardInterrupt"])
def test_a_failed_prediction_after_training_points_to_inference(failure: str, data: dict, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture) -> None:
    """The train command again would train anew: whatever stops the test folder's prediction
    (out of memory, a bad image, Ctrl-C), the user is given the inference.py command."""
    import errors
    kind = getattr(errors, failure, KeyboardInterrupt)

    def fails(*args: object, **kwargs: object) -> None:
        raise kind(f"{data['test_dir']}: out of memory predicting; pass --batch_size 1.")

    monkeypatch.setattr(training, "train", lambda *a: {"best.pth": tmp_path / "best.pth"})
    monkeypatch.setattr(training, "predict_folder", fails)
    with pytest.raises(kind) as caught:
        train_resnet.main(_args(data, tmp_path, "--test_dir", str(data["test_dir"])))
    command = (f"python inference.py --checkpoint {tmp_path / 'best.pth'} --test_dir {data['test_dir']} --output "
               f"{tmp_path / 'test-results.json'} --window 0 --tile_overlap 0.25")
    message = capsys.readouterr().err if failure == "KeyboardInterrupt" else str(caught.value)
    assert f"Training is finished and saved: predict with {command}" in message
    if failure != "KeyboardInterrupt":
        assert message.startswith(f"{data['test_dir']}: out of memory predicting; pass --batch_size 1. Training")


def test_torchrun_with_more_processes_than_gpus_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    from distributed import init_distributed
    from errors import UsageError

    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", pytest.fail)
    with pytest.raises(UsageError, match="this node, which has 2 GPU"):
        init_distributed(None)


def test_a_skipped_update_counts_once_over_the_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every rank skips the update together: two ranks' sums count one skipped step."""
    from distributed import DistInfo

    meter = engine.EpochMeter(sums={"loss": 3.0}, steps=3, skipped=1, batches=3)
    monkeypatch.setattr(engine, "sum_across", lambda values, info, device: {k: 2 * v for k, v in values.items()})
    row = meter.summary(DistInfo(rank=0, world_size=2), torch.device("cpu"))
    assert row["skipped_steps"] == 1 and row["train_loss"] == pytest.approx(1.0)


def test_the_printed_inference_command_continues_trainings_prediction(data: dict, tmp_path: Path) -> None:
    """The command the out-of-memory message gives predicts as training's end did, so its crash
    record (the same key) keeps the images already predicted."""
    import inference
    from flags import checkpoint_overrides, prediction_settings, validation_settings

    parser = training.build_parser("resnet101", "")
    for tiles in ([], ["--tile", "48", "--tile_overlap", "0.4"]):  # the crop's tile; a tile of its own
        trained = parser.parse_args(_args(data, tmp_path, "--test_dir", str(data["test_dir"]), *tiles))
        trained.tile = trained.crop if trained.tile is None else trained.tile  # as training.main sets it
        given = inference.build_parser().parse_args(["--checkpoint", "best.pth", "--test_dir", str(data["test_dir"]),
                                                     "--output", "x.json", "--window", "0",
                                                     "--tile_overlap", str(trained.tile_overlap)])
        state, device = {"args": vars(trained)}, torch.device("cpu")
        assert (prediction_settings(given).resolved(device, state).what_it_predicts()
                == validation_settings(trained).resolved(device, state).what_it_predicts())
        assert given.window == 0 and not any(v is not None for v in checkpoint_overrides(given).values())
