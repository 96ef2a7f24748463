"""The benchmark scripts run end to end on tiny sizes and write their JSON, and each faster
path gives the same results as the plain one it is compared with. No test asserts a time."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_util

from benchmarks import (data_pipeline, evaluation, gpu_check, host_syncs, inference, lever_table, merge_scaling,
                        postprocess, predict_memory, prediction_caps, rle_reading, step_time, streaming, train_memory)
import devices
from checkpoint import load_checkpoint, save_checkpoint
from errors import UsageError
from model import build_model
import training

TINY_ROIS = ["--rpn_post_nms_top_n_train", "100", "--box_batch_size_per_image", "32"]
# Worker processes build the shallow ResNet of tests/shallow.py: the benchmarks start them through it.
SHALLOW_LAUNCHER = str(Path(__file__).resolve().parent / "shallow.py")


def _written(path: Path, *keys: str) -> dict:
    payload = json.loads(path.read_text())
    for key in ("benchmark", "environment", "settings", *keys):
        assert key in payload, key
    return payload


def test_data_pipeline_same_targets(tmp_path: Path) -> None:
    out = tmp_path / "data.json"
    result = data_pipeline.main(["--samples", "2", "--size", "96", "112", "--cells", "8", "12", "--epochs", "2",
                                 "--batch_size", "2", "--json", str(out)])
    payload = _written(out, "epochs", "stages", "construct_seconds", "identical_targets", "targets_met")
    assert [row["epoch"] for row in payload["epochs"]] == [1, 2]
    assert {"baseline_samples_per_s", "ours_samples_per_s", "speedup"} <= payload["epochs"][0].keys()
    assert result["identical_targets"], "decoding on every access must not change the targets"
    windowed = data_pipeline.main(["--samples", "2", "--size", "96", "112", "--cells", "8", "12", "--epochs", "1",
                                   "--crop", "64", "--json", str(tmp_path / "crop.json")])
    assert windowed["identical_targets"] and windowed["stages"] == []


def test_train_memory_stock_and_lean_losses_equal(tmp_path: Path) -> None:
    out = tmp_path / "memory.json"
    train_memory.main(["--counts", "15", "--size", "64", "80", "--steps", "1", "--device", "cpu", *TINY_ROIS,
                       "--json", str(out), "--launcher", SHALLOW_LAUNCHER])
    payload = _written(out, "rows", "targets_met", "memory_unit")
    (row,) = payload["rows"]
    for key in ("stock_step_peak_mb", "ours_step_peak_mb", "peak_ratio", "stock_step_s", "ours_step_s", "time_ratio"):
        assert row[key] is not None, key
    assert row["stock"]["losses"].keys() == row["ours"]["losses"].keys() and len(row["ours"]["losses"]) == 5
    assert row["losses_equal"], row["max_loss_diff"]
    assert payload["isolated"]


def test_inference_plain_loop_and_ours_identical(tmp_path: Path, shallow: None) -> None:
    out = tmp_path / "inference.json"
    inference.main(["--images", "2", "--size", "96", "96", "--cells", "10", "--detections_per_img", "15",
                    "--rpn_post_nms_top_n_test", "100", "--batch_sizes", "1", "--amp", "off", "--device", "cpu",
                    "--json", str(out)])
    payload = _written(out, "rows", "targets_met")
    plain, floor, ours = payload["rows"]
    assert (plain["path"], floor["path"], ours["path"]) == ("plain loop", "forward only", "ours")
    assert ours["detections"] == plain["detections"] == 30
    assert ours["identical"] and ours["match_rate"] == 1.0 and ours["precision"] == "float32"


def test_inference_agreement_counts_partners() -> None:
    mask = np.zeros((8, 8), dtype=np.uint8, order="F")
    mask[2:6, 2:6] = 1
    rle = mask_util.encode(mask)
    square = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
    reference = [{"image_id": 1, "category_id": 1, "score": 0.9, "segmentation": square},
                 {"image_id": 1, "category_id": 2, "score": 0.5, "segmentation": square}]
    changed = [dict(reference[0], score=0.895), dict(reference[1], category_id=3)]
    result = inference.agreement(reference, changed)
    assert not result["identical"] and result["match_rate"] == 0.5
    assert inference.agreement(reference, reference)["identical"]


def test_truth_ranking_and_classing_use_each_detections_best_iou() -> None:
    from benchmarks import accuracy
    from dataloader import Instances

    crops = [np.ones((4, 4), dtype=bool), np.ones((2, 6), dtype=bool)]
    truth = Instances(np.array([1, 2]), np.array([[0, 0, 4, 4], [2, 6, 8, 8]]), crops, 10, 10)
    coco_gt = accuracy.build_coco_gt([truth, Instances(np.zeros(0, dtype=np.int64), np.zeros((0, 4)), [], 10, 10)],
                                     [1, 2])
    half = np.zeros((10, 10), dtype=np.uint8, order="F")
    half[0:4, 0:2] = 1  # half of the first cell: IoU 0.5
    first = coco_gt.loadAnns([1])[0]["segmentation"]
    rle = mask_util.encode(half)
    dets = [{"image_id": 1, "category_id": 1, "score": 0.1, "segmentation": first},
            {"image_id": 1, "category_id": 1, "score": 0.9, "segmentation": {**rle, "counts": rle["counts"].decode()}},
            {"image_id": 1, "category_id": 3, "score": 0.9, "segmentation": first},  # the right cell, wrong class
            {"image_id": 2, "category_id": 1, "score": 0.9, "segmentation": first}]  # an image without cells
    ranked = accuracy.truth_ranked(coco_gt, dets)
    assert [r["score"] for r in ranked] == pytest.approx([1.0, 0.5, 0.0, 0.0])
    sliver = np.zeros((10, 10), dtype=np.uint8, order="F")
    sliver[0:4, 0:1] = 1  # a quarter of the first cell: IoU 0.25, too little to take its class
    rle = mask_util.encode(sliver)
    dets.append({"image_id": 1, "category_id": 2, "score": 0.5,
                 "segmentation": {**rle, "counts": rle["counts"].decode()}})
    classed = accuracy.truth_classed(coco_gt, dets)
    # image by image: the wrong class corrected, the sliver and the image without cells kept as they were
    assert [(r["image_id"], r["category_id"], r["score"]) for r in classed] == [
        (1, 1, 0.1), (1, 1, 0.9), (1, 1, 0.9), (1, 2, 0.5), (2, 1, 0.9)]
    top = accuracy.ceiling(coco_gt)
    assert top["segm_AP50"] == top["segm_AP50_class1"] == top["segm_AP50_class2_1000"] == top["f1_class2"] == 1.0
    assert math.isnan(top["segm_AP50_class3"]) and math.isnan(top["f1_class4"])  # no cell of classes 3 and 4


def test_rle_reading_paints_and_checks_as_decoding_does(tmp_path: Path) -> None:
    out = rle_reading.main(["--size", "120", "96", "--cells", "30", "--repeats", "1", "--json", str(tmp_path / "r.json")])
    assert [row["job"] for row in out["rows"]] == ["paint", "check"]
    assert all(row["same_result"] for row in out["rows"])
    assert json.loads((tmp_path / "r.json").read_text())["settings"]["cells"] == 30


def test_evaluation_libraries_agree(tmp_path: Path) -> None:
    out = tmp_path / "evaluation.json"
    evaluation.main(["--images", "3", "--size", "96", "96", "--gt_per_image", "15", "--dets_per_image", "25",
                     "--json", str(out)])
    payload = _written(out, "rows", "targets_met", "stat_names")
    reference = payload["rows"][0]
    assert reference["library"] == "pycocotools" and len(reference["stats"]) == 12
    assert 0.0 < reference["stats"][1] < 1.0, "the generated detections should give a non-trivial AP50"
    if payload["targets_met"]["faster_installed"]:
        for row in payload["rows"][1:]:
            assert row["stats_agree"] and row["class_metrics_agree"], row["library"]
    else:
        pytest.skip("faster-coco-eval not installed: only pycocotools was measured")


def test_postprocess_ours_keeps_the_cap_and_the_baseline_runs(tmp_path: Path) -> None:
    out = tmp_path / "post.json"
    postprocess.main(["--size", "200", "--tile", "96", "--detections", "60", "--cells", "40", "--cap", "30",
                      "--json", str(out)])
    rows = _written(out, "rows")["rows"]
    assert [row["detections_in"] for row in rows] == [9 * 60, 36 * 60]
    for row in rows:
        assert 0 < row["ours_kept"] <= 30 < row["baseline_kept"]  # the old path had no per-image cap


def test_step_time_rows_and_ratios(tmp_path: Path, shallow: None) -> None:
    out = tmp_path / "step.json"
    step_time.main(["--size", "64", "64", "--cells", "6", "--backbones", "resnet101", "--attn", "both",
                    "--heads", "none", "mask_iou+cascade", "--warmup", "0", "--steps", "1", "--device", "cpu",
                    *TINY_ROIS, "--json", str(out)])
    payload = _written(out, "rows", "sample", "attention_error")
    rows = payload["rows"]
    assert [(r["backbone"], r["use_attn"], r["heads"]) for r in rows] == [
        ("resnet101", False, "none"), ("resnet101", False, "mask_iou+cascade"),
        ("resnet101", True, "none"), ("resnet101", True, "mask_iou+cascade")]
    assert rows[0]["ratio_vs_resnet101"] == 1.0
    assert rows[1]["params_m"] > rows[0]["params_m"] + 20  # the Mask Scoring head and two box stages
    if payload["attention_error"]:
        assert "skipped" in rows[2]["note"]
    else:
        assert rows[2]["step_s"] > 0 and rows[2]["ratio_vs_resnet101"] is not None
    step_time.main(["--size", "32", "32", "--cells", "2", "--backbones", "resnet101", "--attn", "off", "--warmup", "0",
                    "--steps", "1", "--device", "cpu", "--compare_amp", *TINY_ROIS, "--json", str(out)])
    (row,) = _written(out, "rows")["rows"]
    assert len(row["amp_all_s"]) == 1 and row["amp_vs_fp32"] == pytest.approx(row["amp_step_s"] / row["step_s"])
    assert isinstance(json.loads(out.read_text())["environment"]["native_bf16"], bool)


def test_accuracy_scores_raw_ema_and_post_variants(tmp_path: Path, shallow: None) -> None:
    from benchmarks import accuracy
    from synthetic import make_dataset

    # 64 px images, one 64 px tile each: the post variants' views, not their tiles, are what multiplies the work
    tiny_dataset = make_dataset(tmp_path / "data", n_train=3, n_test=1, size=(64, 64), cells=(4, 8), seed=6)
    out, runs = tmp_path / "accuracy.json", tmp_path / "runs"
    manifest = tmp_path / "manifest.json"  # two source images: samples 0 and 1 are patches of one
    manifest.write_text(json.dumps([{"name": f"sample_00{i}", "source_image": "ab"[i // 2]} for i in range(3)]))

    def study(*post: str, seeds: tuple[str, ...] = ("0",)) -> dict:
        return accuracy.main(["--train_dir", str(tiny_dataset["train_dir"]), "--configs", "cells", "--seeds", *seeds,
                              "--epochs", "1", "--crop", "64", "--post", *post, "--json", str(out), "--ensemble",
                              "--keep_dir", str(runs), "--split_groups", str(manifest), "--extra", "--min_size", "64", "--max_size", "128",
                              "--detections_per_img", "20", "--rpn_post_nms_top_n_test", "100", *TINY_ROIS])

    both = study("tile+tta", seeds=("0", "1"))  # two runs, and the two as one ensemble
    assert set(both["mean"]) == {"cells", "cells+ema", "cells+tile+tta", "cells+ensemble+tile+tta", "ceiling"}
    assert len(both["runs"]["cells+tile+tta"]) == 2 and len(both["runs"]["cells+ensemble+tile+tta"]) == 1
    assert len(both["runs"]["ceiling"]) == 1  # one split: one ceiling
    held = json.loads((runs / "cells_0/split.json").read_text())["val"]
    assert held in (["sample_000", "sample_001"], ["sample_002"])  # one whole source image
    result = study("tile")  # one seed: no ensemble
    assert set(result["mean"]) == {"cells", "cells+ema", "cells+tile", "ceiling"}
    assert json.loads(out.read_text())["mean"] == result["mean"]
    history = json.loads((runs / "cells_0/history.json").read_text())
    assert result["runs"]["cells+tile"][0]["step_seconds"] == round(history[-1]["step_seconds"], 3) > 0  # one epoch
    assert all(result["mean"]["ceiling"][m] == 1.0 for m in accuracy.METRICS)  # 8 cells at most: all count
    for row in result["mean"].values():
        assert all(0.0 <= row[m] <= 1.0 for m in accuracy.METRICS)
    present = set(result["mean"]["ceiling"]) & set(accuracy.CLASS_METRICS)  # the classes with held-out cells
    assert {"segm_AP50_1000", "segm_AP50_class1", "segm_AP50_class1_1000", "f1_class1", "f1cell_class1"} <= present
    assert present <= set(result["mean"]["cells+tile"])  # the per-class keys, at both maxDets, on the post rows
    assert {"segm_AP50_class1", "f1_class1"} <= set(result["mean"]["cells"])  # the history row: at --eval_max_dets
    stamp = (runs / "cells_0/last.pth").stat().st_mtime_ns  # --keep_dir keeps the run...
    again = study("tile+mask0.6", "tile+tta+avg", "tile+types")
    assert (runs / "cells_0/last.pth").stat().st_mtime_ns == stamp  # ...and scores it again without training
    assert again["mean"]["cells"] == result["mean"]["cells"]
    assert {"cells+tile+mask0.6", "cells+tile+tta+avg", "cells+tile+types"} < set(again["mean"])
    assert 0.0 <= again["mean"]["cells+tile+types"]["segm_AP50"] <= 1.0  # the same cells, rescored by their types
    state = load_checkpoint(runs / "cells_0/last.pth")
    del state["args"]["repeat_thresh"]  # a run from before the flag existed, which is at its default
    save_checkpoint(runs / "cells_0/last.pth", state)
    stamp = (runs / "cells_0/last.pth").stat().st_mtime_ns
    assert set(study()["mean"]) == {"cells", "cells+ema"}  # no --post: the whole images only
    assert (runs / "cells_0/last.pth").stat().st_mtime_ns == stamp
    state["args"]["detections_per_class"] = 0  # trained before a default changed: named, never trained over
    save_checkpoint(runs / "cells_0/last.pth", state)
    stamp = (runs / "cells_0/last.pth").stat().st_mtime_ns
    with pytest.raises(UsageError, match=r"cells_0: a finished run trained with other flags \(--detections_per_class "
                                         r"0 there, 100 here\); pass its values after --extra"):
        study()
    assert (runs / "cells_0/last.pth").stat().st_mtime_ns == stamp


def test_accuracy_held_out_prediction_continues_after_a_kill(tmp_path: Path, shallow: None,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """A scoring stopped part-way keeps the images it predicted: the same call predicts only the
    rest, and its results equal an uninterrupted call's; the record is gone once all are done."""
    from benchmarks import accuracy
    from conftest import random_checkpoint
    from dataloader import LabelledImages, list_samples
    from predictor import Settings
    from synthetic import make_dataset

    paths = make_dataset(tmp_path / "data", n_train=3, n_test=0, size=(64, 64), cells=(3, 6), seed=4)
    samples = list_samples(paths["train_dir"])
    dataset = LabelledImages(samples, [5, 6, 7], desc="x")
    run = tmp_path / "run"
    run.mkdir()
    models = [accuracy.load_model(random_checkpoint(run / "last.pth"))[0]]
    settings = Settings(tile=64, tta_scales=(1.0,))
    whole, _ = accuracy.held_out_predictions(models, [run], dataset, settings, desc="x")
    assert {r["image_id"] for r in whole} <= {5, 6, 7} and whole
    assert not list(run.glob("*.partial"))
    real, predicted = accuracy.predict_each, []

    def killed_after_one(*args: Any, **kwargs: Any) -> Any:
        for image_id, found in real(*args, **kwargs):
            predicted.append(image_id)
            yield image_id, found
            raise KeyboardInterrupt  # the image above is recorded before the next is predicted

    monkeypatch.setattr(accuracy, "predict_each", killed_after_one)
    with pytest.raises(KeyboardInterrupt):
        accuracy.held_out_predictions(models, [run], dataset, settings, desc="x")
    assert len(list(run.glob("held-out-*.partial"))) == 1 and predicted == [5]
    rest: list[int] = []

    def counted(*args: Any, **kwargs: Any) -> Any:
        for image_id, found in real(*args, **kwargs):
            rest.append(image_id)
            yield image_id, found

    monkeypatch.setattr(accuracy, "predict_each", counted)
    other = Settings(tile=64, tta_scales=(1.0,), mask_thresh=0.6)  # other settings: not the stopped call's images
    accuracy.held_out_predictions(models, [run], dataset, other, desc="x")
    assert rest == [5, 6, 7] and len(list(run.glob("held-out-*.partial"))) == 1
    rest.clear()
    again, seconds = accuracy.held_out_predictions(models, [run], dataset, settings, desc="x")
    assert rest == [6, 7] and seconds > 0  # the stopped call's image is not predicted again
    assert sorted(map(json.dumps, again)) == sorted(map(json.dumps, whole))
    assert not list(run.glob("*.partial"))


def test_accuracy_continues_a_stopped_run_rather_than_training_it_again(tmp_path: Path, shallow: None,
                                                                       monkeypatch: pytest.MonkeyPatch,
                                                                       capsys: pytest.CaptureFixture) -> None:
    from benchmarks import accuracy
    from synthetic import make_dataset

    tiny_dataset = make_dataset(tmp_path / "data", n_train=3, n_test=1, size=(64, 64), cells=(4, 8), seed=6)
    runs = tmp_path / "runs"
    argv = ["--train_dir", str(tiny_dataset["train_dir"]), "--configs", "cells", "--seeds", "0", "--epochs", "2",
            "--crop", "64", "--json", str(tmp_path / "accuracy.json"), "--keep_dir", str(runs), "--ema_decay", "0",
            "--extra", "--min_size", "64", "--max_size", "128", "--detections_per_img", "20",
            "--rpn_post_nms_top_n_test", "100", *TINY_ROIS]
    real_epoch = training.run_epoch

    def stopped_in_epoch_2(*args: Any) -> dict | None:
        epoch, stop = args[5], args[8]
        stop.requested = stop.requested or epoch == 2  # as if SIGTERM came at the second epoch's start
        return real_epoch(*args)

    def stop_in_epoch_2(run_argv: list[str]) -> None:
        with monkeypatch.context() as patch, pytest.raises(SystemExit) as stopped:
            patch.setattr(training, "run_epoch", stopped_in_epoch_2)
            accuracy.main(run_argv)
        assert stopped.value.code == training.EXIT_INTERRUPTED

    other_crop = [*argv[:argv.index("--crop") + 1], "48", *argv[argv.index("--crop") + 2:]]
    stop_in_epoch_2(other_crop)
    stop_in_epoch_2(argv)  # a stopped run of other data is moved aside, the new one trained from its start
    assert len(list(runs.glob("cells_0/previous-*"))) == 1
    first = load_checkpoint(runs / "cells_0/last.pth")
    assert first["epoch"] == 1 and first["partial"]["epoch"] == 2 and first["args"]["crop"] == 64
    epoch_1 = json.loads((runs / "cells_0/history.json").read_text())
    assert [row["epoch"] for row in epoch_1] == [1]

    capsys.readouterr()
    argv += ["--box_nms_thresh", "0.6"]  # a limit --resume takes (as the out-of-memory advice asks): the same run
    result = accuracy.main(argv)
    assert "a stopped run of the same data and model, continued" in capsys.readouterr().out
    history = json.loads((runs / "cells_0/history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2] and history[0] == epoch_1[0]  # epoch 1 not trained again
    assert len(list(runs.glob("cells_0/previous-*"))) == 1  # nothing more moved aside: the same run
    assert load_checkpoint(runs / "cells_0/last.pth")["epoch"] == 2
    assert 0.0 <= result["mean"]["cells"]["segm_AP50"] <= 1.0
    stamp = (runs / "cells_0/last.pth").stat().st_mtime_ns
    accuracy.main(argv)  # the continued run, saved with --resume, is a finished run with these flags
    assert (runs / "cells_0/last.pth").stat().st_mtime_ns == stamp
    (tmp_path / "linked").mkdir()
    (tmp_path / "linked/cells_0").symlink_to(runs / "cells_0")  # the same run seen from another --keep_dir
    accuracy.main([*argv[:argv.index("--keep_dir") + 1], str(tmp_path / "linked"), *argv[argv.index("--keep_dir") + 2:]])
    assert (runs / "cells_0/last.pth").stat().st_mtime_ns == stamp


def test_host_syncs_do_not_grow_with_instances_and_losses_agree(tmp_path: Path, shallow: None) -> None:
    out = tmp_path / "syncs.json"
    host_syncs.main(["--counts", "4", "12", "--size", "48", "56", "--steps", "0", "--part_reps", "1", *TINY_ROIS,
                     "--take_all", "--predict_size", "96", "--rpn_post_nms_top_n_test", "100", "--detections_per_img", "20",
                     "--json", str(out)])
    payload = _written(out, "rows", "parts", "targets_met", "read_every")
    rows = {(r["variant"], r["instances"]): r for r in payload["rows"]}
    (few, many) = sorted({n for _, n in rows})
    assert rows["ours", few]["syncs_per_step"] == rows["ours", many]["syncs_per_step"]
    assert rows["before", many]["syncs_per_step"] > rows["before", few]["syncs_per_step"]  # per-instance reads
    assert rows["ours", many]["syncs_per_step"] < rows["stock", many]["syncs_per_step"]
    assert payload["targets_met"]["ours_syncs_at_most_10"] and payload["targets_met"]["losses_equal_before"]
    assert rows["ours", many]["copies_per_step"] == 0 < rows["stock", many]["copies_per_step"]  # blocking h2d copies
    assert payload["targets_met"]["ours_copies_at_most_10"]
    assert all(r["step_s"] is None and r["time_vs_before"] is None for r in payload["rows"])  # --steps 0: no timing
    assert payload["targets_met"]["time_at_most_1.02x_before"] is None
    stock, ours = payload["prediction"]
    assert (stock["detector"], ours["detector"]) == ("torchvision", "ours") and ours["views"] == 4
    assert ours["syncs_per_image"] < stock["syncs_per_image"] and ours["detections"] == stock["detections"] > 0
    assert ours["copies_per_image"] == 0 < stock["copies_per_image"]
    assert all(r["max_loss_rel_diff_vs_before"] <= 1e-6 for r in payload["rows"] if r["variant"] == "ours")
    assert all(p["resize_equal"] and p["mask_targets_max_diff"] < 1e-5 for p in payload["parts"])


def test_predict_memory_holds_the_budget_with_the_same_detections(tmp_path: Path, shallow: None) -> None:
    """Past the feature budget the views are detected again instead of kept: the features held
    stop growing with the image, the unbounded ones grow, and the detections are identical."""
    out = tmp_path / "memory.json"
    predict_memory.main(["--sizes", "96", "128", "--tile", "64", "--budget_mb", "0.5", "--batch_size", "4",
                         "--detections_per_img", "20", "--rpn_post_nms_top_n_test", "100", "--device", "cpu", "--same_process",
                         "--json", str(out)])
    payload = _written(out, "rows", "targets_met")
    rows = {(r["size"], r["variant"]): r for r in payload["rows"]}
    assert rows[128, "unbounded"]["kept_mb"] > rows[96, "unbounded"]["kept_mb"] > rows[96, "budget"]["kept_mb"]
    per_chunk = rows[128, "unbounded"]["kept_mb"] / rows[128, "unbounded"]["views"] * 4  # --batch_size views
    assert rows[128, "budget"]["kept_mb"] <= 0.5 + per_chunk + 0.05  # the budget and the one chunk detected
    assert payload["targets_met"]["identical_detections"] and rows[128, "budget"]["same_as_unbounded"]


def test_prediction_caps_runs_each_cap_through_the_cli_path(tmp_path: Path, shallow: None) -> None:
    """Every variant predicts through the CLI path: the image caps bound the detections, the class
    cap never keeps more than the image cap, and capping before the merge never keeps more than
    after it (one 128 px image: 64 detections, so no cap binds here; the benchmark's real runs
    are in RESULTS.md)."""
    out = tmp_path / "caps.json"
    payload = prediction_caps.main(["--images", "1", "--size", "128", "128", "--cells", "10", "--device", "cpu",
                                    "--json", str(out)])
    assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(payload["rows"]))
    rows = {r["variant"]: r for r in payload["rows"]}
    assert set(rows) == set(prediction_caps.VARIANTS) and rows["image 1000"]["speedup"] == 1.0
    assert 0 < rows["image 400"]["detections_per_image"] <= 400
    capped = rows["image 1000, class 100"]["detections_per_image"]
    assert 0 < capped <= min(400, rows["image 1000"]["detections_per_image"])
    assert all(r["seconds_per_image"] > 0 for r in rows.values())
    assert 0 < rows["class 100 before the merge"]["detections_per_image"] <= capped  # never more after the merge


def test_streaming_keeps_every_known_cell_once_as_the_whole_image_does(tmp_path: Path) -> None:
    out = tmp_path / "streaming.json"
    streaming.main(["--sizes", "300", "700", "--window", "400", "--tile", "32", "--spacing", "30", "--radius", "4", "11",
                    "--same_process", "--json", str(out)])
    payload = _written(out, "rows", "targets_met")
    rows = {(r["size"], r["variant"]): r for r in payload["rows"]}
    assert rows[700, "streamed"]["windows"] > 1 and rows[700, "streamed"]["cells"] == (700 // 30) ** 2
    assert rows[700, "streamed"]["same_as_whole"] and rows[700, "streamed"]["kept_all"]
    assert payload["targets_met"]["every_cell_kept"] and payload["targets_met"]["streamed_equals_whole"]


def test_merge_scaling_finds_the_same_pairs_both_ways_and_skips_dense_past_its_cap(tmp_path: Path) -> None:
    out = tmp_path / "merge_scaling.json"
    merge_scaling.main(["--sizes", "300", "900", "--window", "256", "--dense_max", "300", "--json", str(out)])
    rows = {r["detections"]: r for r in _written(out, "rows")["rows"]}
    assert rows[300]["same"] and rows[300]["pairs"] > 300  # 8 copies a cell overlap
    assert "dense_s" not in rows[900] and rows[900]["pairs"] > rows[300]["pairs"] and rows[900]["merge_s"] >= 0


def test_gpu_check_calibrates_frozen_norms_into_fp16_range() -> None:
    # Random weights in the ImageNet layout overflow fp16 (every AMP step skipped on the H100);
    # the check's calibrated model keeps its features well inside it.
    torch.manual_seed(0)
    model = build_model({"backbone": "resnet101", "weights": "imagenet"}, load_weights=False).train()
    image = torch.rand(3, 64, 64)
    with torch.no_grad():
        tensors = model.transform([image])[0].tensors
        raw = max(float(v.abs().max()) for v in model.backbone(tensors).values())
        assert gpu_check.calibrate_norms(model, image) is model and model.training  # its mode is kept
        fitted = max(float(v.abs().max()) for v in model.backbone(tensors).values())
    assert raw > torch.finfo(torch.float16).max > 1000 * fitted


def test_gpu_check_dry_run_runs_every_section(tmp_path: Path, shallow: None) -> None:
    out = tmp_path / "gpu_check.json"
    gpu_check.main(["--dry_run", "--json", str(out), "--launcher", SHALLOW_LAUNCHER, "--sections", "nms"])
    assert json.loads(out.read_text())["sections"]["nms"]["ok"]  # a section in a process of its own
    threads, draws = torch.get_num_threads(), torch.get_rng_state()
    gpu_check.main(["--dry_run", "--json", str(out), "--launcher", SHALLOW_LAUNCHER, "--in_process"])
    assert torch.get_num_threads() == threads  # the sections' single thread and seeds are theirs only
    assert torch.equal(torch.get_rng_state(), draws)
    with pytest.raises(SystemExit):  # on a GPU each section keeps its own process
        gpu_check.main(["--in_process", "--json", str(out)])
    payload = json.loads(out.read_text())
    sections = payload["sections"]
    assert set(sections) == set(gpu_check.SECTIONS)
    assert all(s["ok"] for s in sections.values()), {k: s.get("error") for k, s in sections.items()}
    assert {(r["backbone"], r["use_attn"]) for r in sections["amp_train"]["result"]} == {
        (b, a) for b in ("resnet101", "effnet_v2_m") for a in (False, True)}
    assert all(r["trained_steps"] > 0 for r in sections["amp_train"]["result"])  # a CPU: no scaler to skip steps
    assert {r["precision"] for r in sections["amp_train"]["result"]} == {
        devices.precision(torch.device("cpu"), True)}  # bf16, or float32 without bf16 instructions
    assert sections["ddp"]["result"]["backend"] == "gloo" and sections["ddp"]["result"]["all_reduce_ok"]
    assert sections["syncs"]["result"]["train_step"]["copies"] == 0
    assert sections["syncs"]["result"]["train_step"]["syncs"] <= 10
    assert sections["predict_memory"]["result"]["detections"] > 0
    assert set(sections["predict_memory"]["result"]["fp32_vs_one_view"]) == {"one_view", "flips", "dihedral"}
    assert all(s > 0 for s in sections["predict_memory"]["result"]["fp32_seconds"].values())
    assert sections["nms"]["result"]["same_kept"]
    assert sections["resume_amp"]["result"]["epochs"] == 2
    assert not list(tmp_path.glob("gpu_check.*.json"))  # the sections' own files are folded in


def test_accuracy_table_keeps_a_long_names_numbers_apart(capsys: pytest.CaptureFixture[str]) -> None:
    import argparse

    from benchmarks import accuracy

    name = "cells+paste+tile+dihedral+consensus+img400+cls100"  # 49 characters: wider than the old 20-wide column
    row = {**{m: 0.25 for m in accuracy.METRICS}, **{f"segm_AP50_class{c}": 0.125 for c in range(1, 5)}}
    accuracy.print_table({name: row, "ceiling": row}, {name: dict.fromkeys(accuracy.METRICS, 0.0),
                                                      "ceiling": dict.fromkeys(accuracy.METRICS, 0.0)},
                         argparse.Namespace(seeds=["0"], epochs=4, crop=256))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(name)]
    assert len(lines) == 2  # the mean table's row and the per-class row
    assert all(line[len(name)] == " " for line in lines)
    assert lines[1].split()[1:5] == ["0.125"] * 4  # the name, then class 1..4 at maxDets 100


def _accuracy_json(path: Path, config: str, split_seed: int, seeds: list[int], means: list[float],
                   epochs: int = 4, train_dir: str = "data/train") -> Path:
    """A file in accuracy.py's layout: per seed, class c's AP50 is c × the mean, at 1000 twice the mean."""
    runs = [{"segm_AP50": m, "segm_AP50_1000": 2 * m, **{f"segm_AP50_class{c}": c * m for c in range(1, 5)}}
            for m in means]
    for run in runs:
        run["step_seconds"] = 2.0 if "+" in config else 1.6
    settings = {"seeds": seeds, "split_seed": split_seed, "epochs": epochs, "train_dir": train_dir, "extra": ["--x"]}
    path.write_text(json.dumps({"settings": settings, "runs": {f"{config}+tile": runs, "ceiling": []}}))
    return path


def test_lever_table_pairs_runs_by_split_and_seed(tmp_path: Path) -> None:
    base = [_accuracy_json(tmp_path / "b0.json", "cells", 0, [0, 1], [0.20, 0.21]),
            _accuracy_json(tmp_path / "b1.json", "cells", 1, [0], [0.30], train_dir="/abs/data/train")]
    lever = [_accuracy_json(tmp_path / "l1.json", "cells+x", 1, [0], [0.25]),
             _accuracy_json(tmp_path / "l0.json", "cells+x", 0, [1], [0.24])]
    flags = ["--post", "tile", "--lever_config", "cells+x", "--base", *map(str, base), "--lever"]
    rows = lever_table.main([*flags, *map(str, lever)])
    assert [(r["split"], r["seed"]) for r in rows] == [(0, 1), (1, 0)]
    assert [r["change"] for r in rows] == pytest.approx([0.03, -0.05])
    assert [r["class 4"] for r in rows] == pytest.approx([0.12, -0.2])
    assert [r["change at 1000"] for r in rows] == pytest.approx([0.06, -0.1])
    assert [r["step ×"] for r in rows] == [1.25, 1.25]
    with pytest.raises(UsageError, match="no baseline run for split 2 seed 0"):
        lever_table.main([*flags, str(_accuracy_json(tmp_path / "l2.json", "cells+x", 2, [0], [0.2]))])
    with pytest.raises(UsageError, match="in both"):
        lever_table.main([*flags, str(lever[0]), str(_accuracy_json(tmp_path / "again.json", "cells+x", 1, [0], [0.2]))])
    with pytest.raises(UsageError, match="different epochs"):
        lever_table.main([*flags, str(_accuracy_json(tmp_path / "e.json", "cells+x", 1, [0], [0.2], epochs=8))])
    with pytest.raises(UsageError, match="different train_dir"):
        lever_table.main([*flags, str(_accuracy_json(tmp_path / "d.json", "cells+x", 1, [0], [0.2], train_dir="o/train"))])
    with pytest.raises(UsageError, match="cannot be told apart by seed"):
        lever_table.main([*flags, str(_accuracy_json(tmp_path / "two.json", "cells+x", 1, [0], [0.2, 0.3]))])
    with pytest.raises(UsageError, match="no row 'cells\\+y\\+tile'"):
        lever_table.main([*flags[:3], "cells+y", *flags[4:], str(lever[0])])
    (tmp_path / "bare.json").write_text("[]")
    with pytest.raises(UsageError, match="bare.json: no settings"):
        lever_table.main([*flags, str(tmp_path / "bare.json")])
