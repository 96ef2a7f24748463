"""Train -> resume -> predict -> score on tiny generated data: the EfficientNetV2-M run here,
the ResNet-101 one in test_paper_cli.py (the paper's commands). The other tests of the loop use
the shallow ResNet of tests/shallow.py: they test the loop, not the backbone."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from pycocotools.coco import COCO

import inference
import train_effnet_v2
import train_resnet
from checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from model import build_model
from synthetic import make_dataset

SMALL = ["--min_size", "96", "--max_size", "128", "--input_scale", "0", "--detections_per_img", "20", "--batch_size", "2",
         "--num_workers", "0", "--weights", "none", "--warmup_epochs", "1", "--rpn_pre_nms_top_n_train", "300",
         "--rpn_post_nms_top_n_train", "200", "--rpn_pre_nms_top_n_test", "300", "--rpn_post_nms_top_n_test", "100",
         "--box_batch_size_per_image", "64", "--use_cosine"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three training samples (two train, one validates: one step per epoch), two test images."""
    return make_dataset(tmp_path_factory.mktemp("e2e"), n_train=3, n_test=2, size=(80, 96), cells=(4, 8), seed=5)


def _train(script, data: dict, out: Path, *extra: str) -> dict:
    return script.main(["--train_dir", str(data["train_dir"]), "--output_dir", str(out), *SMALL, *extra])


def _test_args(data: dict, output: Path) -> list[str]:
    return ["--test_dir", str(data["test_dir"]), "--id_map_json", str(data["id_map_json"]), "--output", str(output),
            "--num_workers", "0"]


def _assert_submission(path: Path, data: dict) -> list[dict]:
    """Every result names a test image and its size, and pycocotools loads the file."""
    results = json.loads(Path(path).read_text())
    entries = {e["id"]: e for e in json.loads(Path(data["id_map_json"]).read_text())}
    for r in results:
        assert r["image_id"] in entries
        assert r["segmentation"]["size"] == [entries[r["image_id"]]["height"], entries[r["image_id"]]["width"]]
    if results:
        gt = COCO()
        gt.dataset = {"images": [{"id": i, "height": e["height"], "width": e["width"]} for i, e in entries.items()],
                      "annotations": [], "categories": [{"id": c} for c in range(1, 5)]}
        gt.createIndex()
        assert set(gt.loadRes(str(path)).getImgIds()) <= set(entries)
    return results


def test_train_resume_predict_effnet(data: dict, tmp_path: Path) -> None:
    out = tmp_path / "run"
    _train(train_effnet_v2, data, out, "--epochs", "1")
    for name in ("best.pth", "last.pth", "history.json", "split.json"):
        assert (out / name).exists(), name
    history = json.loads((out / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1]
    row = history[0]
    for key in ("train_loss_classifier", "train_loss_box_reg", "train_loss_mask", "train_loss_objectness",
                "train_loss_rpn_box_reg", "train_loss", "val_loss", "segm_AP50", "segm_AP", "bbox_AP75", "lr"):
        assert key in row and row[key] is not None, key
    first = load_checkpoint(out / "last.pth")
    assert first["epoch"] == 1 and first["config"]["backbone"] == "effnet_v2_m"
    assert first["config"]["effnet_taps"] == [2, 3, 4, 6] and not first["config"]["use_attn"]
    steps = first["scheduler"]["steps"]

    _train(train_effnet_v2, data, out, "--epochs", "2", "--resume", str(out / "last.pth"))
    resumed = load_checkpoint(out / "last.pth")
    assert resumed["epoch"] == 2 and resumed["scheduler"]["steps"] == 2 * steps
    assert [row["epoch"] for row in resumed["history"]] == [1, 2]
    assert json.dumps(resumed["history"][0], sort_keys=True) == json.dumps(first["history"][0], sort_keys=True)
    opt_steps = {int(s["step"]) for s in resumed["optimizer"]["state"].values()}
    assert opt_steps == {2 * steps}

    submission = inference.main(["--checkpoint", str(out / "best.pth"), *_test_args(data, tmp_path / "sub.json"),
                                 "--batch_size", "2", "--no_tta"])
    _assert_submission(submission, data)


def test_tiles_of_tta_views_in_the_submission(data: dict, tmp_path: Path, shallow: None) -> None:
    """The heaviest prediction path, once: 4 flips of every tile, merged back to whole images."""
    torch.manual_seed(0)
    config = {"backbone": "resnet101", "weights": "none", "min_size": 96, "max_size": 128, "input_scale": 0.0,
              "detections_per_img": 20, "rpn_pre_nms_top_n_test": 300, "rpn_post_nms_top_n_test": 100}
    save_checkpoint(tmp_path / "c.pth", {"model": build_model(config).state_dict(), "config": config})
    tiled = inference.main(["--checkpoint", str(tmp_path / "c.pth"), *_test_args(data, tmp_path / "tiled.json"),
                            "--tile", "64", "--tile_overlap", "0.3", "--tta", "--detections_per_img", "7",
                            "--batch_size", "3"])
    results = _assert_submission(tiled, data)
    assert results  # an untrained model still detects something
    per_image = [sum(r["image_id"] == e["id"] for r in results) for e in json.loads(data["id_map_json"].read_text())]
    assert max(per_image) <= 7  # the cap holds after the tile and view merges


def test_images_no_larger_than_a_tile_share_forward_passes(data: dict, tmp_path: Path, shallow: None,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """--batch_size counts tiles x views: two test images of one tile each go through the network
    together, with the detections they get one at a time."""
    import predictor

    torch.manual_seed(0)
    config = {"backbone": "resnet101", "weights": "none", "min_size": 96, "max_size": 128, "input_scale": 0.0,
              "detections_per_img": 20, "rpn_pre_nms_top_n_test": 300, "rpn_post_nms_top_n_test": 100}
    save_checkpoint(tmp_path / "c.pth", {"model": build_model(config).state_dict(), "config": config})
    passes, detect = [], predictor.MaskRCNNStages.detect
    monkeypatch.setattr(predictor.MaskRCNNStages, "detect",
                        lambda self, crops, *rest: passes.append(len(crops)) or detect(self, crops, *rest))
    bars, progress = [], predictor.progress
    monkeypatch.setattr(predictor, "progress", lambda iterable, desc, **kwargs: bars.append(progress(
        iterable, desc, **kwargs)) or bars[-1] if "tiles and views" not in desc else iterable)  # the images' bar
    found = {}
    for batch in ("1", "2"):
        out = inference.main(["--checkpoint", str(tmp_path / "c.pth"), *_test_args(data, tmp_path / f"b{batch}.json"),
                              "--tile", "128", "--batch_size", batch])
        found[batch] = sorted((r["image_id"], r["category_id"], round(r["score"], 4)) for r in _assert_submission(out, data))
    assert passes == [1, 1, 2]  # one image a pass, then both in one
    assert [(bar.total, bar.n) for bar in bars] == [(2, 2), (2, 2)]  # the bar counts images, not batches
    assert found["1"] == found["2"] and found["1"]


def test_resume_with_other_settings_is_refused_and_bf16_trains(data: dict, tmp_path: Path, shallow: None,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import devices

    monkeypatch.setattr(devices, "native_bf16", lambda: True)  # bf16 even on a CPU where --use_amp runs float32
    computed, amp_dtype = [], devices.amp_dtype
    monkeypatch.setattr(devices, "amp_dtype", lambda *args: computed.append(amp_dtype(*args)) or computed[-1])
    out = tmp_path / "run"
    # one step of smaller images and fewer RoIs: bf16 convolutions are ~10x slower on a CPU without bf16 instructions
    _train(train_resnet, data, out, "--epochs", "1", "--val_split", "0", "--use_amp", "--class_names", "e", "l", "n", "m",
           "--batch_size", "3", "--min_size", "64", "--max_size", "80", "--box_batch_size_per_image", "32")
    assert torch.bfloat16 in computed  # the training steps ran under bf16 autocast
    row = json.loads((out / "history.json").read_text())[0]
    assert torch.isfinite(torch.tensor(row["train_loss"])) and row["skipped_steps"] == 0  # bf16 on a CPU
    assert (out / "best.pth").exists()  # without validation the training loss selects it
    with pytest.raises(CheckpointError, match="resnet101 backbone; continue it with train_resnet.py"):
        _train(train_effnet_v2, data, out, "--epochs", "2", "--resume", str(out / "last.pth"))
    with pytest.raises(CheckpointError, match="use_attn"):
        _train(train_resnet, data, out, "--epochs", "2", "--resume", str(out / "last.pth"), "--use_attn")
    test_args = ["--test_dir", str(data["test_dir"]), "--id_map_json", str(data["id_map_json"])]
    with pytest.raises(CheckpointError, match="contradicts"):
        inference.main(["--checkpoint", str(out / "last.pth"), "--backbone", "effnet", *test_args])
    with pytest.raises(CheckpointError, match="use_attn"):
        inference.main(["--checkpoint", str(out / "last.pth"), "--use_attn", *test_args])
    with pytest.raises(CheckpointError, match="trained with no --use_attn, model built with --use_attn"):
        _train(train_resnet, data, tmp_path / "ft", "--epochs", "1", "--val_split", "0", "--use_attn",
               "--checkpoint", str(out / "last.pth"))
    # a random-init run fine-tuned without repeating --weights none: its GroupNorm layout is kept, nothing downloaded
    _train(train_resnet, data, tmp_path / "ft", "--epochs", "1", "--val_split", "0", "--weights", "imagenet",
           "--checkpoint", str(out / "last.pth"))
    fine_tuned = load_checkpoint(tmp_path / "ft" / "last.pth")
    assert fine_tuned["config"]["weights"] == "none"
    assert fine_tuned["args"]["class_names"] == ["e", "l", "n", "m"]  # its cells' names, as --class_names' help says


def test_ema_repeat_factor_sampling_and_eval_every(data: dict, tmp_path: Path, shallow: None) -> None:
    out = tmp_path / "ema"
    _train(train_resnet, data, out, "--epochs", "3", "--ema_decay", "0.9", "--repeat_thresh", "0.9",
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


def test_tiles_at_the_training_crop_and_one_view_unless_told(
        data: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shallow: None) -> None:
    import engine

    tiles, views, merges = [], [], []

    def record(model: Any, loader: Any, device: Any, settings: Any, desc: str = "") -> list:
        tiles.append(settings.tile)
        views.append(settings.tta_scales)
        merges.append(settings.merge)
        return []

    monkeypatch.setattr(engine, "predict", record)
    out = tmp_path / "crop"
    _train(train_resnet, data, out, "--epochs", "1", "--crop", "64", "--class_balance", "--transpose_p", "0.5",
           "--hed_p", "0.5", "--copy_paste", "1", "--copy_paste_rare")  # the rare-class levers train too
    assert tiles == [64] and views == [None]  # validation: one view, cheap enough for every epoch
    monkeypatch.setattr(inference, "predict_each", lambda *args, **kwargs: iter(record(*args, **kwargs)))
    test_args = _test_args(data, tmp_path / "r.json")
    inference.main(["--checkpoint", str(out / "last.pth"), *test_args])
    inference.main(["--checkpoint", str(out / "last.pth"), "--tile", "0", "--tta", *test_args])
    inference.main(["--checkpoint", str(out / "last.pth"), "--tta", "--merge", "max", *test_args])
    assert tiles == [64, 64, 0, 64] and views == [None, None, (1.0,), (1.0,)]  # submissions: one view unless --tta
    assert merges == [None, None, None, "max"]  # None: Settings decides (averaged with views)
    from predictor import training_tile  # a run given its own --tile validated with it: inference.py too

    assert training_tile({"args": {"crop": 64, "tile": 96}}) == 96 and training_tile({"args": {"crop": 64}}) == 64
