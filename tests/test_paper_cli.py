"""The paper's Appendix (2): its four commands as written, and its flag list, on tiny data.

The commands run from a folder laid out as the paper's (``dataset/train``, ``dataset/test_release``,
``dataset/test_image_name_to_ids.json``, the checkpoint at ``path/to/resnet_best_model.pth``);
the only flags added make the run tiny (1 epoch, small images, random init). This is also the
ResNet-101 end-to-end run (with attention and AMP, as the paper trains).
"""
from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pytest
from pycocotools.coco import COCO

import cal_param
import check_stats
import evaluate
import inference
import plot_curve
import train_effnet_v2
import train_resnet
import visualization
from checkpoint import load_checkpoint
from conftest import ROOT
from synthetic import make_dataset

# Copied from the paper, line breaks joined.
TRAIN_B = ("python train_resnet.py --use_cosine --warmup_epochs 5 --eta_min 5e-6 --epochs 50 --use_amp "
           "--batch_size 2 --lr 2e-4 --use_attn")
INFERENCE_C = "python inference.py --backbone resnet --checkpoint path/to/resnet_best_model.pth --use_attn"
VISUALIZATION_D = ("python visualization.py --backbone resnet --checkpoint path/to/resnet_best_model.pth "
                   "--mode val --num_images 3 --use_attn --draw_gt_mask")
CAL_PARAM_E = "python cal_param.py --backbone effnet --num_classes 5 --use_attn"

TINY = ["--epochs", "1", "--weights", "none", "--num_workers", "0", "--min_size", "96", "--max_size", "128",
        "--input_scale", "0", "--detections_per_img", "20", "--rpn_pre_nms_top_n_train", "300",
        "--rpn_post_nms_top_n_train", "200", "--rpn_pre_nms_top_n_test", "300", "--rpn_post_nms_top_n_test", "100",
        "--box_batch_size_per_image", "64"]
CHECKPOINT = Path("path/to/resnet_best_model.pth")

# The paper's flag list, by the script that takes each flag, with a value where it takes one.
PAPER_FLAGS = {
    "train": ["--train_dir", "d", "--test_dir", "t", "--id_map_json", "m.json", "--output_dir", "o", "--epochs", "50",
              "--batch_size", "2", "--lr", "1e-4", "--weight_decay", "1e-4", "--val_split", "0.2",
              "--num_workers", "0", "--seed", "42", "--patience", "4", "--early_stop", "10", "--num_classes", "5",
              "--checkpoint", "c.pth", "--use_attn", "--use_amp", "--use_cosine", "--eta_min", "5e-6",
              "--warmup_epochs", "5"],
    "inference": ["--backbone", "effnet", "--checkpoint", "c.pth", "--test_dir", "t", "--id_map_json", "m.json",
                  "--output_dir", "o", "--batch_size", "2", "--num_workers", "0", "--num_classes", "5", "--use_attn",
                  "--use_amp", "--score_thresh", "0.5"],
    "visualization": ["--backbone", "resnet", "--checkpoint", "c.pth", "--mode", "test", "--num_images", "5",
                      "--use_attn", "--score_thresh", "0.5", "--draw_gt_mask", "--vis_dir", "v", "--output_dir", "o",
                      "--train_dir", "d", "--test_dir", "t", "--id_map_json", "m.json", "--num_classes", "5"],
    "cal_param": ["--backbone", "effnet", "--num_classes", "5", "--use_attn"],
}


def readme_commands() -> list[list[str]]:
    """Every ``python <script>.py`` and ``torchrun ... <script>.py`` command in the README's
    bash blocks, continuation lines joined and comments dropped."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            scripts = [i for i, w in enumerate(words) if w.endswith(".py")]
            if scripts and words[0] in ("python", "torchrun"):
                commands.append(words[scripts[0]:])
    return commands


def argv_of(command: str) -> list[str]:
    """The flags of a command as the paper prints it (``python script.py ...``)."""
    return shlex.split(command)[2:]


@pytest.fixture(scope="module")
def paper_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A working folder laid out as the paper's, trained once with command b."""
    root = tmp_path_factory.mktemp("paper")
    make_dataset(root / "dataset", n_train=3, n_test=1, size=(80, 96), cells=(4, 8), seed=3)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        train_resnet.main(argv_of(TRAIN_B) + TINY)
    (root / CHECKPOINT).parent.mkdir(parents=True)
    shutil.copy(root / "outputs/resnet101/best.pth", root / CHECKPOINT)
    shutil.copy(root / "outputs/resnet101/split.json", root / CHECKPOINT.parent / "split.json")
    return root


def test_b_train_as_written(paper_dir: Path) -> None:
    out = paper_dir / "outputs/resnet101"
    for name in ("best.pth", "last.pth", "history.json", "split.json"):
        assert (out / name).exists(), name
    (row,) = json.loads((out / "history.json").read_text())
    for key in ("train_loss_classifier", "train_loss_mask", "train_loss", "val_loss", "segm_AP50", "bbox_AP75", "lr"):
        assert row.get(key) is not None, key
    assert row["skipped_steps"] == 0  # no GradScaler on a CPU (bf16, or float32 without bf16 instructions)
    state = load_checkpoint(out / "last.pth")
    assert state["config"]["backbone"] == "resnet101" and state["config"]["use_attn"] and state["config"]["attn"]
    assert (state["args"]["use_cosine"], state["args"]["use_amp"], state["args"]["lr"]) == (True, True, 2e-4)
    assert (state["args"]["warmup_epochs"], state["args"]["eta_min"], state["args"]["early_stop"]) == (5, 5e-6, 0)


def test_c_inference_as_written(paper_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(paper_dir)
    submission = inference.main(argv_of(INFERENCE_C) + ["--num_workers", "0"])
    assert Path(submission).resolve() == (paper_dir / CHECKPOINT.parent / "test-results.json").resolve()
    entries = json.loads((paper_dir / "dataset/test_image_name_to_ids.json").read_text())
    results = json.loads(Path(submission).read_text())
    assert results  # score threshold 0: even a barely trained model submits detections
    for r in results:
        assert r["image_id"] in {e["id"] for e in entries} and r["segmentation"]["size"] == [80, 96]
    gt = COCO()
    gt.dataset = {"images": [{"id": e["id"], "height": e["height"], "width": e["width"]} for e in entries],
                  "annotations": [], "categories": [{"id": c} for c in range(1, 5)]}
    gt.createIndex()
    assert set(gt.loadRes(str(submission)).getImgIds()) <= {e["id"] for e in entries}
    # --output_dir: the submission goes into that folder; --output stays the exact file.
    into = inference.main(argv_of(INFERENCE_C) + ["--num_workers", "0", "--no_tta", "--output_dir", "subs"])
    assert Path(into) == Path("subs/test-results.json") and json.loads(Path(into).read_text()) is not None
    with pytest.raises(SystemExit):
        inference.main(argv_of(INFERENCE_C) + ["--output_dir", "subs", "--output", "x.json"])


def test_d_visualization_as_written(paper_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(paper_dir)
    val = json.loads((paper_dir / CHECKPOINT.parent / "split.json").read_text())["val"]
    paths = visualization.main(argv_of(VISUALIZATION_D) + ["--device", "cpu"])
    assert sorted(p.name for p in paths) == sorted(f"{n}.png" for n in val)
    assert all(p.parent == CHECKPOINT.parent / "vis" and p.read_bytes()[:4] == b"\x89PNG" for p in paths)
    assert f"wrote {len(val)} PNG(s)" in capsys.readouterr().out
    into = visualization.main(argv_of(VISUALIZATION_D) + ["--device", "cpu", "--output_dir", "pictures"])
    assert {p.parent for p in into} == {Path("pictures")} and all(p.exists() for p in into)
    from checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="contradicts the checkpoint"):
        visualization.main(argv_of(VISUALIZATION_D.replace("--backbone resnet", "--backbone effnet")))


def test_e_cal_param_as_written(capsys: pytest.CaptureFixture) -> None:
    (row,) = cal_param.main(argv_of(CAL_PARAM_E))
    assert (row["backbone"], row["use_attn"]) == ("effnet_v2_m", True)
    assert row["total"]["total"] == pytest.approx(56_761_925, rel=0.005)  # Table 3, EfficientNetV2 w/attn
    assert row["total"]["trainable"] == pytest.approx(56_745_533, rel=0.005)
    assert "effnet_v2_m +attn" in capsys.readouterr().out


@pytest.mark.parametrize("script, parse", [
    ("train", lambda argv: train_resnet.training.build_parser("resnet101", "").parse_args(argv)),
    ("train", lambda argv: train_effnet_v2.training.build_parser("effnet_v2_m", "").parse_args(argv)),
    ("inference", lambda argv: inference.build_parser().parse_args(argv)),
    ("visualization", lambda argv: visualization.build_parser().parse_args(argv)),
    ("cal_param", lambda argv: cal_param.build_parser().parse_args(argv)),
])
def test_every_flag_of_the_paper_is_accepted(script: str, parse) -> None:
    args = vars(parse(PAPER_FLAGS[script]))
    flags = [f[2:] for f in PAPER_FLAGS[script] if f.startswith("--")]
    unset = [f for f in flags if args[f] is None or args[f] is False]
    assert not unset, unset
    if script == "train":
        assert (args["early_stop"], args["patience"], args["val_split"]) == (10, 4, 0.2)


def test_every_readme_command_parses() -> None:
    parsers = {"train_resnet.py": train_resnet.training.build_parser("resnet101", ""),
               "train_effnet_v2.py": train_effnet_v2.training.build_parser("effnet_v2_m", ""),
               "inference.py": inference.build_parser(), "visualization.py": visualization.build_parser(),
               "cal_param.py": cal_param.build_parser(), "check_stats.py": check_stats.build_parser(),
               "plot_curve.py": plot_curve.build_parser(), "evaluate.py": evaluate.build_parser()}
    commands = readme_commands()
    assert {c[0] for c in commands} == set(parsers) - {"train_effnet_v2.py"}, commands
    for script, *argv in commands:
        parsers[script].parse_args(argv)  # SystemExit on an unknown flag or a bad value
