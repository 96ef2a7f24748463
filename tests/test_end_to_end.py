"""Train -> resume -> predict -> score on tiny generated data, for both backbones."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from pycocotools.coco import COCO

import inference
import train_effnet_v2
import train_resnet
from checkpoint import CheckpointError, load_checkpoint

SMALL = ["--min_size", "96", "--max_size", "128", "--input_scale", "0", "--detections_per_img", "20", "--batch_size", "2",
         "--num_workers", "0", "--weights", "none", "--warmup_epochs", "1", "--rpn_pre_nms_top_n_train", "300",
         "--rpn_post_nms_top_n_train", "200", "--rpn_pre_nms_top_n_test", "300", "--rpn_post_nms_top_n_test", "100",
         "--box_batch_size_per_image", "64", "--use_cosine"]


def _train(script, data: dict, out: Path, *extra: str) -> dict:
    return script.main(["--train_dir", str(data["train_dir"]), "--output_dir", str(out), *SMALL, *extra])


@pytest.mark.parametrize("attn", [[], ["--use_attn"]], ids=["plain", "attn"])
@pytest.mark.parametrize("script", [train_resnet, train_effnet_v2], ids=["resnet", "effnet"])
def test_train_resume_predict(script, attn: list, tiny_dataset: dict, tmp_path: Path) -> None:
    out = tmp_path / "run"
    _train(script, tiny_dataset, out, "--epochs", "1", *attn)
    for name in ("best.pth", "last.pth", "history.json", "split.json"):
        assert (out / name).exists(), name
    history = json.loads((out / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1]
    row = history[0]
    for key in ("train_loss_classifier", "train_loss_box_reg", "train_loss_mask", "train_loss_objectness",
                "train_loss_rpn_box_reg", "train_loss", "val_loss", "segm_AP50", "segm_AP", "bbox_AP75", "lr"):
        assert key in row and row[key] is not None, key
    first = load_checkpoint(out / "last.pth")
    assert first["epoch"] == 1 and first["config"]["backbone"] in ("resnet101", "effnet_v2_m")
    steps = first["scheduler"]["steps"]

    assert first["config"]["use_attn"] == bool(attn) and bool(first["config"]["attn"]) == bool(attn)
    _train(script, tiny_dataset, out, "--epochs", "2", "--resume", str(out / "last.pth"), *attn)
    resumed = load_checkpoint(out / "last.pth")
    assert resumed["epoch"] == 2 and resumed["scheduler"]["steps"] == 2 * steps
    assert [row["epoch"] for row in resumed["history"]] == [1, 2]
    assert json.dumps(resumed["history"][0], sort_keys=True) == json.dumps(first["history"][0], sort_keys=True)
    opt_steps = {int(s["step"]) for s in resumed["optimizer"]["state"].values()}
    assert opt_steps == {2 * steps}

    submission = inference.main(["--checkpoint", str(out / "best.pth"), "--test_dir", str(tiny_dataset["test_dir"]),
                                 "--id_map_json", str(tiny_dataset["id_map_json"]), "--output",
                                 str(tmp_path / "sub.json"), "--num_workers", "0", "--batch_size", "2", "--no_tta"])
    results = json.loads(Path(submission).read_text())
    entries = json.loads(Path(tiny_dataset["id_map_json"]).read_text())
    gt = COCO()
    gt.dataset = {"images": [{"id": e["id"], "height": e["height"], "width": e["width"]} for e in entries],
                  "annotations": [], "categories": [{"id": c} for c in range(1, 5)]}
    gt.createIndex()
    if script is train_resnet and not attn:  # tiles of TTA views: the heaviest prediction path, once
        tiled = inference.main(["--checkpoint", str(out / "best.pth"), "--test_dir", str(tiny_dataset["test_dir"]),
                                "--id_map_json", str(tiny_dataset["id_map_json"]), "--output",
                                str(tmp_path / "tiled.json"), "--num_workers", "0", "--tile", "64",
                                "--tile_overlap", "0.3", "--tta", "--detections_per_img", "7", "--batch_size", "3"])
        tiled_results = json.loads(Path(tiled).read_text())
        for r in tiled_results:
            assert r["segmentation"]["size"] == [96, 112] and r["image_id"] in {e["id"] for e in entries}
        per_image = [sum(r["image_id"] == e["id"] for r in tiled_results) for e in entries]
        assert max(per_image) <= 7 and sum(per_image) > 0  # the cap holds after the tile and view merges
    if results:
        dt = gt.loadRes(str(submission))
        assert set(dt.getImgIds()) <= {e["id"] for e in entries}
        assert all(r["segmentation"]["size"] == [e["height"], e["width"]]
                   for r in results for e in entries if e["id"] == r["image_id"])


def test_resume_with_other_settings_is_refused(tiny_dataset: dict, tmp_path: Path) -> None:
    out = tmp_path / "run"
    _train(train_resnet, tiny_dataset, out, "--epochs", "1", "--val_split", "0")
    with pytest.raises(CheckpointError, match="other settings"):
        _train(train_effnet_v2, tiny_dataset, out, "--epochs", "2", "--resume", str(out / "last.pth"))
    with pytest.raises(CheckpointError, match="use_attn"):
        _train(train_resnet, tiny_dataset, out, "--epochs", "2", "--resume", str(out / "last.pth"), "--use_attn")
    test_args = ["--test_dir", str(tiny_dataset["test_dir"]), "--id_map_json", str(tiny_dataset["id_map_json"])]
    with pytest.raises(CheckpointError, match="contradicts"):
        inference.main(["--checkpoint", str(out / "last.pth"), "--backbone", "effnet", *test_args])
    with pytest.raises(CheckpointError, match="use_attn"):
        inference.main(["--checkpoint", str(out / "last.pth"), "--use_attn", *test_args])
    with pytest.raises(CheckpointError, match="trained without --use_attn but the model is built with it"):
        _train(train_resnet, tiny_dataset, tmp_path / "ft", "--epochs", "1", "--val_split", "0", "--use_attn",
               "--checkpoint", str(out / "last.pth"))


def test_bf16_amp_train_step_on_cpu(tiny_dataset: dict, tmp_path: Path) -> None:
    out = tmp_path / "amp"
    _train(train_resnet, tiny_dataset, out, "--epochs", "1", "--use_amp", "--val_split", "0")
    row = json.loads((out / "history.json").read_text())[0]
    assert torch.isfinite(torch.tensor(row["train_loss"])) and row["skipped_steps"] == 0
    assert (out / "best.pth").exists()  # without validation the training loss selects it


def test_ema_repeat_factor_sampling_and_eval_every(tiny_dataset: dict, tmp_path: Path) -> None:
    out = tmp_path / "ema"
    _train(train_resnet, tiny_dataset, out, "--epochs", "3", "--ema_decay", "0.9", "--repeat_thresh", "0.9",
           "--eval_every", "2")
    last = load_checkpoint(out / "last.pth")
    assert last["ema"]["updates"] == last["scheduler"]["steps"] > 0 and last["epoch"] == 3
    history = json.loads((out / "history.json").read_text())
    assert [("val_loss" in row, "ema_segm_AP50" in row) for row in history] == [(False, False), (True, True),
                                                                                 (True, True)]
    best = load_checkpoint(out / "best.pth")
    assert best["weights"] in ("raw", "ema") and best["epoch"] in (2, 3)
    if best["weights"] == "ema":
        assert "raw_model" in best


def test_tiles_at_the_training_crop_and_flipped_submission_views_unless_told(
        tiny_dataset: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import engine

    tiles, views = [], []
    record = lambda *a, **k: tiles.append(k["tile"]) or views.append(k.get("tta_scales")) or []  # noqa: E731
    monkeypatch.setattr(engine, "predict", record)
    out = tmp_path / "crop"
    _train(train_resnet, tiny_dataset, out, "--epochs", "1", "--crop", "64")
    assert tiles == [64] and views == [None]  # validation: one view, cheap enough for every epoch
    monkeypatch.setattr(inference, "predict", record)
    test_args = ["--test_dir", str(tiny_dataset["test_dir"]), "--id_map_json", str(tiny_dataset["id_map_json"]),
                 "--num_workers", "0", "--output", str(tmp_path / "r.json")]
    inference.main(["--checkpoint", str(out / "last.pth"), *test_args])
    inference.main(["--checkpoint", str(out / "last.pth"), "--tile", "0", "--no_tta", *test_args])
    assert tiles == [64, 64, 0] and views == [None, [1.0], None]  # the submission: TTA unless --no_tta
