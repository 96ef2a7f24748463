"""evaluate.py and the label images of inference.py --save_labels, on generated data."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from pycocotools import mask as mask_util
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

import evaluate
from cell_outputs import write_cell_outputs
from coco import build_coco_gt, matching_metrics
from dataloader import IMAGE_FILE, DatasetError, UnlabelledImages, LabelledImages, list_samples
from flags import DEFAULT_CLASS_NAMES
from synthetic import make_dataset


@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Ground truth of 3 generated samples and a noisy submission of them: cells shifted,
    some missed, some invented, random scores."""
    root = tmp_path_factory.mktemp("eval")
    train = make_dataset(root / "data", n_train=3, n_test=0, size=(64, 80), cells=(8, 12), seed=3)["train_dir"]
    samples = list_samples(train)
    truth = LabelledImages(samples, [1, 2, 3], cache_images=False)
    rng = np.random.default_rng(0)
    results = []
    for image_id, inst in zip([1, 2, 3], truth.instances):
        for label, box, crop in zip(inst.labels, inst.boxes, inst.crops):
            if rng.random() < 0.2:
                continue  # missed
            full = np.zeros((inst.height, inst.width), np.uint8, order="F")
            x1, y1, x2, y2 = (int(v) + int(rng.integers(-1, 2)) for v in box)
            x1, y1 = max(x1, 0), max(y1, 0)
            full[y1:y1 + crop.shape[0], x1:x1 + crop.shape[1]] = crop[:inst.height - y1, :inst.width - x1]
            rle = mask_util.encode(full)
            results.append({"image_id": image_id, "category_id": int(label), "score": float(rng.random()),
                            "bbox": [float(v) for v in mask_util.toBbox(rle)],
                            "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode()}})
    path = root / "submission.json"
    path.write_text(json.dumps(results))
    return {"train": train, "samples": samples, "truth": truth, "results": results, "submission": path, "root": root}


def test_coco_metrics_equal_pycocotools_at_100_and_1000(scored: dict, tmp_path: Path) -> None:
    metrics = evaluate.main(["--data_dir", str(scored["train"]), "--submission", str(scored["submission"]),
                             "--json", str(tmp_path / "m.json")])
    written = json.loads((tmp_path / "m.json").read_text(), parse_constant=pytest.fail)  # strict JSON: no NaN
    assert written == pytest.approx({k: None if v != v else v for k, v in metrics.items()})  # NaN (no cell) is null
    gt = COCO()
    gt.dataset = build_coco_gt(scored["truth"].instances, [1, 2, 3]).dataset
    gt.createIndex()
    for iou_type in ("segm", "bbox"):
        for max_dets, suffix in ((100, ""), (1000, "_1000")):
            ref = COCOeval(gt, gt.loadRes([dict(r) for r in scored["results"]]), iou_type)
            ref.params.maxDets = [1, 10, max_dets]
            ref.evaluate()
            ref.accumulate()
            precision = ref.eval["precision"][:, :, :, 0, 2]  # [iou, recall, class], all areas, maxDets[2]
            for name, rows in (("AP", slice(None)), ("AP50", slice(0, 1)), ("AP75", slice(5, 6))):
                p = precision[rows]
                expected = p[p > -1].mean()  # what summarize() reports (its maxDets=100 is fixed here)
                assert abs(metrics[f"{iou_type}_{name}{suffix}"] - expected) < 1e-6, (iou_type, name, suffix)
            for k, cat_id in enumerate(ref.params.catIds):  # AP50 of each class, at both maxDets
                p = precision[0, :, k]
                expected = p[p > -1].mean() if (p > -1).any() else float("nan")
                assert metrics[f"{iou_type}_AP50_class{cat_id}{suffix}"] == pytest.approx(expected, abs=1e-6,
                                                                                         nan_ok=True)
    assert 0 < metrics["segm_AP50"] < 1 and 0 < metrics["f1"] < 1 and 0 < metrics["pq"] < metrics["f1"]
    assert {"segm_AP50_class1", "precision", "recall"} <= set(metrics)


def test_matching_metrics_count_one_to_one_matches() -> None:
    from dataloader import Instances

    crops = [np.ones((4, 4), bool), np.ones((4, 4), bool)]
    inst = Instances(labels=np.array([1, 1]), boxes=np.array([[0, 0, 4, 4], [10, 10, 14, 14]]), crops=crops,
                     height=20, width=20)
    gt = build_coco_gt([inst], [1])
    pred = np.zeros((20, 20), np.uint8, order="F")
    pred[0:4, 0:3] = 1  # IoU 0.75 with the first cell
    rle = mask_util.encode(pred)
    one = [{"image_id": 1, "category_id": 1, "score": 0.9, "segmentation": {"size": [20, 20],
                                                                           "counts": rle["counts"].decode()}}]
    m = matching_metrics(gt, one)
    assert (m["precision"], m["recall"]) == (1.0, 0.5)
    assert m["f1"] == pytest.approx(2 / 3) and m["pq"] == pytest.approx(0.75 * 2 / 3)
    assert matching_metrics(gt, [dict(one[0], score=0.3)])["recall"] == 0.0  # below --score_thresh
    assert m["f1_class1"] == m["f1"] and math.isnan(m["f1_class3"])  # class 3: neither predicted nor present
    other = matching_metrics(gt, [dict(one[0], category_id=2)])
    assert other["f1"] == 0.0 and other["f1_class1"] == 0.0 and other["f1_class2"] == 0.0  # another class is no match


def _rle(rows: slice, cols: slice, size: int = 20) -> dict:
    mask = np.zeros((size, size), np.uint8, order="F")
    mask[rows, cols] = 1
    return {"size": [size, size], "counts": mask_util.encode(mask)["counts"].decode()}


def test_a_cell_whose_classes_share_its_probability_counts_under_summed_evidence() -> None:
    from dataloader import Instances

    from coco import scored_cells

    inst = Instances(labels=np.array([2, 1]), boxes=np.array([[0, 0, 6, 6], [10, 10, 16, 16]]),
                     crops=[np.ones((6, 6), bool), np.ones((6, 6), bool)], height=20, width=20)
    gt = build_coco_gt([inst], [1])
    dets = [{"image_id": 1, "category_id": 2, "score": 0.35, "segmentation": _rle(slice(0, 6), slice(0, 6))},
            {"image_id": 1, "category_id": 3, "score": 0.3, "segmentation": _rle(slice(0, 6), slice(0, 5))},
            {"image_id": 1, "category_id": 4, "score": 0.2, "segmentation": _rle(slice(0, 6), slice(3, 12))},  # 1/3 inside
            {"image_id": 1, "category_id": 1, "score": 0.5, "segmentation": _rle(slice(10, 16), slice(10, 16))},
            {"image_id": 1, "category_id": 2, "score": 0.2, "segmentation": _rle(slice(10, 16), slice(10, 16))},
            {"image_id": 1, "category_id": 1, "score": 0.3, "segmentation": _rle(slice(10, 15), slice(10, 16))}]
    cells = scored_cells(dets, 20, 20)
    assert [(c["category_id"], c["class_score"]) for c in cells] == [(1, 0.5), (2, 0.35), (4, 0.2)]  # best first
    # the first cell: its class 1 once (its best, 0.5, not 0.5 + 0.3) and class 2; the second: classes 2 and 3,
    # not the class 4 detection lying mostly outside it; that one is a cell of its own
    assert [c["score"] for c in cells] == [0.7, 0.65, 0.2]
    assert [c["score"] for c in scored_cells(dets, 20, 20, 0.65)] == [0.7, 0.65]
    assert scored_cells([{**d, "score": d["score"] + 0.3} for d in dets], 20, 20)[0]["score"] == 1.0  # at most 1
    by_score, by_cell = matching_metrics(gt, dets), matching_metrics(gt, dets, cells=True)
    assert (by_score["f1_class1"], by_score["f1_class2"]) == (1.0, 0.0)  # no detection of the second cell at 0.5
    assert (by_cell["f1_class1"], by_cell["f1_class2"], by_cell["recall"]) == (1.0, 1.0, 1.0)
    assert scored_cells([], 20, 20) == []


def test_label_evidence_counts_a_cell_split_over_two_classes(scored: dict, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    """Each true cell that overlaps no other, submitted twice on its pixels, 0.4 of its class and
    0.3 of another: none is found at --score_thresh 0.5 under --label_rule score, and under the
    default --label_rule evidence each one is, of its own class, as if submitted once at 0.7."""
    from coco import build_coco_gt

    truth = build_coco_gt(scored["truth"].instances, [1, 2, 3]).dataset["annotations"]
    alone = [a for a in truth if not any(b is not a and b["image_id"] == a["image_id"] and mask_util.iou(
        [a["segmentation"]], [b["segmentation"]], [0])[0, 0] > 0 for b in truth)]
    split = [{"image_id": a["image_id"], "category_id": c, "score": s, "segmentation": a["segmentation"]}
             for a in alone for s, c in ((0.4, a["category_id"]), (0.3, a["category_id"] % 4 + 1))]
    (tmp_path / "split.json").write_text(json.dumps(split))
    (tmp_path / "once.json").write_text(json.dumps([{**r, "score": 0.7} for r in split[::2]]))
    common = ["--data_dir", str(scored["train"]), "--submission"]
    plain = evaluate.main([*common, str(tmp_path / "split.json"), "--label_rule", "score"])
    summed = evaluate.main([*common, str(tmp_path / "split.json")])
    once = evaluate.main([*common, str(tmp_path / "once.json")])
    assert len(alone) > 10 and plain["recall"] == 0.0
    assert (summed["f1"], summed["precision"], summed["recall"]) == (once["f1"], 1.0, once["recall"]) and once["f1"] > 0.7
    assert summed["segm_AP50"] == plain["segm_AP50"]  # AP ranks the detections as they are
    # inference.py's name for the threshold: at 0.3 each cell's 0.4 detection of its class is found
    lower = evaluate.main([*common, str(tmp_path / "split.json"), "--label_rule", "score", "--label_thresh", "0.3"])
    assert lower["recall"] == once["recall"] > 0.0
    # every cell of a label image counts: no rule or threshold applies, and none is ignored silently
    for flag, value in (("--label_rule", "evidence"), ("--label_rule", "score"), ("--score_thresh", "0.9"),
                        ("--label_thresh", "0.5")):
        with pytest.raises(SystemExit):
            evaluate.main(["--data_dir", str(scored["train"]), "--labels", str(tmp_path), flag, value])
        assert f"{flag} applies to a --submission" in capsys.readouterr().err


def test_saved_labels_read_back_as_data_and_score_like_the_json(scored: dict) -> None:
    root = scored["root"]
    labels = root / "labels"
    write_cell_outputs(scored["results"], _as_test_set(scored, "as_test"), 0.5, DEFAULT_CLASS_NAMES, labels,
                       evidence=False)
    reread = LabelledImages(list_samples(labels), [1, 2, 3], cache_images=False)  # the loader takes them as data
    kept = [r for r in scored["results"] if r["score"] >= 0.5]
    assert 0 < sum(len(i) for i in reread.instances) <= len(kept)
    from_labels = evaluate.main(["--data_dir", str(scored["train"]), "--labels", str(labels)])
    from_json = evaluate.main(["--data_dir", str(scored["train"]), "--submission", str(scored["submission"])])
    for key in ("f1", "precision", "recall", "pq"):  # both rasterised the same way
        assert from_labels[key] == pytest.approx(from_json[key]), key
    only_kept = root / "kept.json"
    only_kept.write_text(json.dumps(kept))
    kept_json = evaluate.main(["--data_dir", str(scored["train"]), "--submission", str(only_kept)])
    assert from_labels["segm_AP50"] == pytest.approx(kept_json["segm_AP50"], abs=0.05)  # up to the overlaps


def test_the_table_names_the_matching_iou_used(scored: dict, capsys: pytest.CaptureFixture) -> None:
    argv = ["--data_dir", str(scored["train"]), "--submission", str(scored["submission"])]
    loose = evaluate.main(argv)
    assert "matching at IoU 0.5: " in capsys.readouterr().out
    strict = evaluate.main([*argv, "--iou_thresh", "0.75"])
    assert "matching at IoU 0.75: " in capsys.readouterr().out
    assert strict["f1"] < loose["f1"]  # the flag reached the matching, not only the printout


def test_empty_label_images_score_zero_and_missing_ones_are_named(scored: dict, tmp_path: Path) -> None:
    """A model that drew no cell above --label_thresh wrote empty label images: a valid
    prediction scoring zero, not an error; a folder without any label image is the error."""
    labels = tmp_path / "labels"
    write_cell_outputs(scored["results"], _as_test_set(scored, "as_test_empty"), 2.0, DEFAULT_CLASS_NAMES, labels,
                       evidence=False)
    assert len(list(labels.glob("*/class1.tif"))) == 3
    metrics = evaluate.main(["--data_dir", str(scored["train"]), "--labels", str(labels)])
    assert metrics["segm_AP50"] == 0.0 and metrics["recall"] == 0.0 and metrics["f1"] == 0.0
    (tmp_path / "nothing").mkdir()
    with pytest.raises(DatasetError, match="no label image"):
        evaluate.main(["--data_dir", str(scored["train"]), "--labels", str(tmp_path / "nothing")])


def _as_test_set(scored: dict, name: str) -> UnlabelledImages:
    """The scored samples' images as a test folder with an id map (ids 1..N, as training numbers them)."""
    test_dir = scored["root"] / name
    test_dir.mkdir(exist_ok=True)
    entries = []
    for image_id, sample in enumerate(scored["samples"], start=1):
        (test_dir / f"{sample.name}.tif").write_bytes((sample / IMAGE_FILE).read_bytes())
        entries.append({"file_name": f"{sample.name}.tif", "id": image_id})
    (scored["root"] / f"{name}.json").write_text(json.dumps(entries))
    return UnlabelledImages(test_dir, scored["root"] / f"{name}.json")


def test_evaluate_reads_ids_as_inference_writes_them(scored: dict, tmp_path: Path) -> None:
    from scoring import image_ids

    samples = scored["samples"]
    as_floats = tmp_path / "floats.json"
    as_floats.write_text(json.dumps([{"file_name": f"{s.name}.tif", "id": float(i)} for i, s in enumerate(samples, 5)]))
    assert image_ids(samples, str(as_floats)) == [5, 6, 7]
    halves = tmp_path / "halves.json"
    halves.write_text(json.dumps([{"file_name": f"{s.name}.tif", "id": i + 0.5} for i, s in enumerate(samples)]))
    with pytest.raises(DatasetError, match="is 0.5, not a whole number"):
        image_ids(samples, str(halves))


def test_unreadable_id_maps_and_submissions_name_the_file_and_the_fix(scored: dict, tmp_path: Path) -> None:
    from scoring import image_ids, read_submission

    samples, broken, scalar = scored["samples"], tmp_path / "broken.json", tmp_path / "scalar.json"
    broken.write_text("{not json")
    scalar.write_text("3")
    with pytest.raises(DatasetError, match="broken.json: not valid JSON .*; pass the id map the submission"):
        image_ids(samples, str(broken))
    with pytest.raises(DatasetError, match="scalar.json: not a list of {file_name, id} objects; pass the id map"):
        image_ids(samples, str(scalar))
    with pytest.raises(DatasetError, match="absent.json: file not found; pass the id map"):
        image_ids(samples, str(tmp_path / "absent.json"))
    with pytest.raises(DatasetError, match=": cannot be read .*; pass the id map"):
        image_ids(samples, str(tmp_path))  # a folder
    unnamed = tmp_path / "unnamed.json"
    unnamed.write_text(json.dumps([{"file_name": 3, "id": 1}]))
    with pytest.raises(DatasetError, match="unnamed.json: not a list of {file_name, id} objects"):
        image_ids(samples, str(unnamed))
    shapes = {i: (t.height, t.width) for i, t in zip([1, 2, 3], scored["truth"].instances)}
    with pytest.raises(DatasetError, match="broken.json: not valid JSON .*; pass inference.py's JSON"):
        read_submission(broken, shapes)
    with pytest.raises(DatasetError, match="absent.json: file not found; pass inference.py's JSON"):
        read_submission(tmp_path / "absent.json", shapes)
    with pytest.raises(DatasetError, match="scalar.json: expected a list of COCO results"):
        read_submission(scalar, shapes)
    assert len(read_submission(scored["submission"], shapes)) == len(scored["results"])
    good = scored["results"][0]
    polygon = [[1.0, 1.0, 9.0, 1.0, 9.0, 9.0]]
    rewrite = "write the submission with inference"
    for change, problem in (({"image_id": "1"}, f"image_id '1'.* not an integer; {rewrite}"),
                            ({"category_id": 7}, rf"category_id 7, not one of \[1, 2, 3, 4\]; {rewrite}"),
                            ({"score": None}, f"score None, not a finite number; {rewrite}"),
                            ({"segmentation": polygon}, rf"not an RLE .*\(polygons are not scored\); {rewrite}"),
                            ({"segmentation": {**good["segmentation"], "size": 64}},
                             rf"RLE size 64, not \[height, width\]; {rewrite}"),
                            ({"segmentation": {**good["segmentation"], "counts": "zzzz!!"}},  # cut short
                             "RLE whose counts are neither a COCO string nor whole numbers"),
                            ({"segmentation": {**good["segmentation"], "counts": "05"}},  # 5 pixels: COCO's IoU hangs
                             rf"runs cover 5 pixels, not {shapes[1][0]} x {shapes[1][1]}"),
                            ({"segmentation": {"size": list(shapes[1]), "counts": [0, 5]}},
                             rf"runs cover 5 pixels, not {shapes[1][0]} x {shapes[1][1]}"),
                            ({"segmentation": {"size": list(shapes[1]), "counts": [0, shapes[1][0] * shapes[1][1] + 5]}},
                             "runs cover"),
                            ({"segmentation": {"size": list(shapes[1]), "counts": [-5, 5 + shapes[1][0] * shapes[1][1]]}},
                             r"a negative run \(-5\)"),
                            ({"segmentation": {"size": list(shapes[1]), "counts": [0, 2 ** 70]}},
                             "RLE whose counts are neither a COCO string nor whole numbers"),
                            ({"segmentation": {"size": list(shapes[1]), "counts": [0, 1.5]}},
                             "RLE whose counts are neither a COCO string nor whole numbers"),
                            ({"segmentation": {**good["segmentation"], "size": [32, 32]}},  # another image's mask
                             rf"mask of size \[32, 32\] on an image of \[{shapes[1][0]}, {shapes[1][1]}\] \(height, "
                             r"width\); it is of other images, .*pass the --data_dir it was predicted on")):
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps([good, {**good, **change}]))
        with pytest.raises(DatasetError, match=f"bad.json: result 1 .*{problem}"):
            read_submission(bad, shapes)
    # As pandas and COCO's other writers give them: float ids, runs as a list of lengths
    height, width = shapes[1]
    runs = [0.0, float(height * width)]  # every pixel of image 1, written as a table tool writes numbers
    table = tmp_path / "table.json"
    unboxed = {k: v for k, v in good.items() if k != "bbox"}
    table.write_text(json.dumps([{**unboxed, "image_id": 1.0, "category_id": 2.0,
                                  "segmentation": {"size": [height, width], "counts": runs}}]))
    (read,) = read_submission(table, shapes)
    assert (read["image_id"], read["category_id"]) == (1, 2) and type(read["image_id"]) is int
    assert isinstance(read["segmentation"]["counts"], str) and read["bbox"] == [0.0, 0.0, width, height]


def test_images_a_submission_says_nothing_about_are_noted_and_a_folder_without_cells_refused(
        scored: dict, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    data = ["--data_dir", str(scored["train"]), "--submission"]
    shifted = tmp_path / "shifted.json"  # image 1's results under id 7, an image the data folder lacks
    shifted.write_text(json.dumps([{**r, "image_id": 7} if r["image_id"] == 1 else r for r in scored["results"]]))
    evaluate.main([*data, str(shifted)])
    out = capsys.readouterr().out
    n = sum(r["image_id"] == 1 for r in scored["results"])
    assert f"shifted.json: {n} results of image ids not in the data folder (7) are left out" in out
    assert f"1 of 3 images have no detection in {shifted} ({scored['samples'][0].name})" in out
    (tmp_path / "none.json").write_text("[]")
    assert evaluate.main([*data, str(tmp_path / "none.json")])["segm_AP50"] == 0
    assert "none.json holds no detection: every score is 0" in capsys.readouterr().out
    evaluate.main([*data, str(scored["submission"])])
    assert "note" not in capsys.readouterr().out
    empty = make_dataset(tmp_path / "empty", n_train=2, n_test=0, size=(32, 32), cells=(1, 2), seed=1)["train_dir"]
    for label in empty.glob("*/class*.tif"):
        label.unlink()  # absent class files: no cells of any class
    with pytest.raises(DatasetError, match=r"empty/train: no labelled cell in any sample \(<sample>/class1.tif ... "
                                           r"class4.tif, one id per cell\); pass the labelled folder as --data_dir"):
        evaluate.main(["--data_dir", str(empty), "--submission", str(tmp_path / "none.json")])


def test_a_missing_data_folder_names_data_dir(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="nowhere: folder not found; pass --data_dir"):
        evaluate.main(["--data_dir", str(tmp_path / "nowhere"), "--submission", str(tmp_path / "s.json")])
