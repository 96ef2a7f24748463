"""Expected bad input answers in one line, ``error: <file>: <what>; <fix>``, with exit status 2
and no traceback, in every script; ``CELLSEG_DEBUG=1`` brings the traceback back."""
from __future__ import annotations

import json
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

from cli import DEBUG_ENV, describe
from conftest import ROOT
from dataloader import DatasetError
from synthetic import make_dataset

ONE_LINE = re.compile(r"^error: [^;\n]+: [^;\n]+; [^\n]+$")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_dataset(tmp_path_factory.mktemp("errors"), n_train=2, n_test=1, size=(48, 56), cells=(2, 4), seed=4)


def run_script(script: str, argv: list[str], capsys: pytest.CaptureFixture,
               monkeypatch: pytest.MonkeyPatch) -> str:
    """The script as ``python <script> ...`` runs it (its ``__main__`` line), in this process;
    returns the one error line after checking exit status 2 and no traceback."""
    monkeypatch.setattr(sys, "argv", [script, *argv])
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / script), run_name="__main__")
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and ONE_LINE.match(lines[0]), err
    return lines[0]


def broken_copy(data: dict[str, Path], tmp_path: Path, damage) -> Path:
    """A copy of the training folder with one sample damaged by ``damage(sample_dir)``."""
    train = tmp_path / "train"
    import shutil

    shutil.copytree(data["train_dir"], train)
    damage(sorted(train.iterdir())[0])
    return train


def _truncate(sample: Path) -> None:
    path = sample / "image.tif"
    path.write_bytes(path.read_bytes()[:300])


def _other_size(sample: Path) -> None:
    name = next(p.name for p in sample.glob("class*.tif"))
    tifffile.imwrite(sample / name, np.zeros((10, 12), dtype=np.float64))


def _fractional(sample: Path) -> None:
    path = next(sample.glob("class*.tif"))
    tifffile.imwrite(path, tifffile.imread(path) + 0.5)


@pytest.mark.parametrize("damage, expected", [
    (lambda s: (s / "image.tif").unlink(), "missing image.tif"),
    (_truncate, "cannot decode TIFF"),
    (_other_size, "label image is 10x12 but its image.tif is 48x56"),
    (_fractional, "non-integer values"),
], ids=["missing-image", "truncated-tiff", "class-file-size", "non-integer-labels"])
def test_bad_dataset(damage, expected: str, data: dict, tmp_path: Path, capsys, monkeypatch) -> None:
    train = broken_copy(data, tmp_path, damage)
    line = run_script("train_resnet.py", ["--train_dir", str(train), "--output_dir", str(tmp_path / "out"),
                                          "--weights", "none", "--num_workers", "0"], capsys, monkeypatch)
    assert expected in line and str(train) in line


def test_bad_id_map_checkpoint_and_output_folder(data: dict, tmp_path: Path, capsys, monkeypatch) -> None:
    bad_map = tmp_path / "ids.json"
    bad_map.write_text("{not json")
    test = ["--test_dir", str(data["test_dir"]), "--num_workers", "0"]
    line = run_script("inference.py", ["--checkpoint", "none.pth", "--id_map_json", str(bad_map), *test],
                      capsys, monkeypatch)
    assert line.startswith(f"error: {bad_map}: not valid JSON")
    entries = json.loads(Path(data["id_map_json"]).read_text())
    (tmp_path / "short.json").write_text(json.dumps(entries[1:]))
    line = run_script("inference.py", ["--checkpoint", "none.pth", "--id_map_json", str(tmp_path / "short.json"),
                                       *test], capsys, monkeypatch)
    assert "test file(s) have no id in short.json" in line
    line = run_script("check_stats.py", ["--train_dir", str(tmp_path / "nowhere")], capsys, monkeypatch)
    assert "training folder not found" in line
    truncated = tmp_path / "best.pth"
    truncated.write_bytes(b"PK\x03\x04 not a whole checkpoint")
    ids = ["--id_map_json", str(data["id_map_json"])]
    for script in ("inference.py", "visualization.py"):
        line = run_script(script, ["--checkpoint", str(truncated), *ids, *test[:2]], capsys, monkeypatch)
        assert line.startswith(f"error: {truncated}: unreadable or truncated checkpoint"), line
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a folder inside a file can never be created, even by root
    line = run_script("train_resnet.py", ["--train_dir", str(data["train_dir"]), "--output_dir", str(blocker / "out")],
                      capsys, monkeypatch)
    assert line.startswith(f"error: {blocker / 'out'}: not writable")
    line = run_script("inference.py", ["--checkpoint", str(truncated), "--output_dir", str(blocker / "o"), *ids,
                                       *test], capsys, monkeypatch)
    assert "not writable" in line and "--output_dir" in line
    for flag in ("--output", "--save_csv"):  # refused before the checkpoint is even read
        monkeypatch.setattr(sys, "argv", ["inference.py", "--checkpoint", "none.pth", *test, flag, str(tmp_path)])
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(ROOT / "inference.py"), run_name="__main__")
        assert exit_info.value.code == 2 and f"{flag} {tmp_path} is a folder" in capsys.readouterr().err
    line = run_script("plot_curve.py", ["--output_dir", str(tmp_path)], capsys, monkeypatch)
    assert "history.json: not found; train first" in line
    line = run_script("train_effnet_v2.py", ["--train_dir", str(data["train_dir"]), "--output_dir", str(tmp_path / "w"),
                                             "--weights", str(tmp_path / "missing.pth"), "--num_workers", "0"],
                      capsys, monkeypatch)
    assert "no such weights file" in line
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}, "config": {"backbone": "resnet101", "weights": "none"}},
               tmp_path / "other.pth")
    line = run_script("inference.py", ["--checkpoint", str(tmp_path / "other.pth"), *ids, *test], capsys, monkeypatch)
    assert "weights do not fit a resnet101 model" in line
    line = run_script("cal_param.py", ["--json", str(blocker / "p.json"), "--backbone", "resnet"], capsys, monkeypatch)
    assert line.startswith(f"error: {blocker / 'p.json'}") or line.startswith(f"error: {blocker}")


def test_python_oserrors_name_the_path_and_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        open("/nonexistent/x.json")
    except OSError as err:
        assert describe(err) == "/nonexistent/x.json: no such file or directory; check the path."
    # a file this user may not read is an input: advice to write elsewhere would not help
    history = tmp_path / "history.json"
    history.write_text("[]")
    denied = PermissionError(13, "Permission denied", str(history))
    assert describe(denied).endswith("; choose a path you can write to, or change its permissions.")  # readable
    monkeypatch.setattr(os, "access", lambda path, mode: mode != os.R_OK)  # as for another user's 0600 file
    assert describe(denied) == (f"{history}: permission denied; change its permissions so that you can read it, "
                                "or copy it somewhere you can.")


def test_an_error_in_a_data_loader_worker_is_its_own_one_line() -> None:
    """A DataLoader worker's error is raised again in the main process (``ExceptionWrapper``,
    what every worker uses) with the worker's traceback as its text; the line printed is the
    worker's own message. (A real worker process is not used: under pytest-xdist its shutdown
    after the error is interrupted.)"""
    from torch._utils import ExceptionWrapper

    try:
        raise DatasetError("a.tif: pixels cut short; export the image again.")
    except DatasetError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(DatasetError, match="Original Traceback") as raised:
        wrapped.reraise()
    assert describe(raised.value) == "a.tif: pixels cut short; export the image again."


@pytest.mark.parametrize("failure", [KeyboardInterrupt, torch.OutOfMemoryError])
def test_inference_interrupted_or_out_of_memory_says_so_in_one_line(failure: type, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture) -> None:
    import inference
    from cli import run_cli

    def load_model(*args, **kwargs):  # the first step of predict_folder after the id map
        raise failure("CUDA out of memory. Tried to allocate 8.00 GiB")

    test = tmp_path / "test"
    test.mkdir()
    tifffile.imwrite(test / "a.tif", np.zeros((8, 8, 3), np.uint8))
    monkeypatch.setattr(inference, "load_model", load_model)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(inference.main, ["--checkpoint", str(tmp_path / "best.pth"), "--test_dir", str(tmp_path / "test")],
                on_interrupt="run the same command again")
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and "Traceback" not in line
    if failure is KeyboardInterrupt:
        assert exit_info.value.code == 130 and line == "interrupted; run the same command again"
    else:
        assert exit_info.value.code == 2 and line.startswith(f"error: {tmp_path / 'test'}: out of memory predicting; "
                                                             "pass --batch_size 1")


def test_debug_variable_shows_the_traceback(data: dict, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(sys, "argv", ["check_stats.py", "--train_dir", str(tmp_path / "nowhere")])
    monkeypatch.setenv(DEBUG_ENV, "1")
    with pytest.raises(DatasetError, match="training folder not found"):
        runpy.run_path(str(ROOT / "check_stats.py"), run_name="__main__")


def test_a_real_interpreter_prints_one_line(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "check_stats.py"), "--train_dir", str(tmp_path / "nowhere")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == (f"error: {tmp_path / 'nowhere'}: training folder not found; "
                                   "pass --train_dir <dataset>/train.")


@pytest.mark.parametrize("script, argv", [
    ("train", ["--num_classes", "1"]), ("train", ["--anchor_sizes", "8", "16", "0", "64", "128"]),
    ("train", ["--box_nms_thresh", "1.5"]), ("train", ["--rpn_post_nms_top_n_test", "0"]),
    ("inference", ["--checkpoint", "x", "--score_thresh", "-0.1"]),
    ("inference", ["--checkpoint", "x", "--min_size", "0"]),
    ("evaluate", ["--data_dir", "d", "--submission", "s", "--iou_thresh", "0"]),
    ("cal_param", ["--num_classes", "0"]), ("visualization", ["--checkpoint", "x", "--max_labels", "-1"]),
])
def test_out_of_range_flags_stop_while_parsing(script: str, argv: list[str], capsys) -> None:
    import cal_param
    import evaluate
    import inference
    import training
    import visualization

    parsers = {"train": lambda: training.build_parser("resnet101", "train"), "inference": inference.build_parser,
               "evaluate": evaluate.build_parser, "cal_param": cal_param.build_parser,
               "visualization": visualization.build_parser}
    with pytest.raises(SystemExit) as exit_info:
        parsers[script]().parse_args(argv)
    assert exit_info.value.code == 2 and "must be" in capsys.readouterr().err


@pytest.mark.parametrize("device, expected", [
    ("gpu", "use cpu, cuda or cuda:N"), ("meta", "not supported"), ("cuda", "no usable CUDA GPU"),
    ("cuda:4", "has 2 GPU(s), cuda:0 to cuda:1"),
])
def test_a_device_this_machine_lacks_stops_while_parsing(device: str, expected: str, capsys,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import inference
    import training

    if device == "cuda:4":  # a two-GPU machine, whatever this one has
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    else:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for parser, argv in ((training.build_parser("resnet101", "train"), []),
                         (inference.build_parser(), ["--checkpoint", "x"])):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args([*argv, "--device", device])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and expected in err and "--device" in err, err
    assert inference.build_parser().parse_args(["--checkpoint", "x", "--device", "cpu"]).device == "cpu"


def test_help_shows_defaults_of_zero() -> None:
    import training

    text = " ".join(training.build_parser("resnet101", "train").format_help().split())
    assert "dropped inside the model (AP likes 0) (default: 0.0)" in text
    assert "training epochs (default: 40)" in text and "--use_attn add the" in text  # a switch shows no default


def test_demo_keeps_the_flags_typed_abbreviated_or_with_equals() -> None:
    import training

    parser = training.build_parser("resnet101", "train")
    argv = ["--demo", "--epoch", "5", "--lr=0.1", "--use_amp"]
    args = parser.parse_args(argv)
    assert args.epochs == 5 and training.typed_flags(parser, argv, args) == {"demo", "epochs", "lr", "use_amp"}
