"""The tools (check_stats, cal_param, visualization, plot_curve) run through main() on tiny
generated data; their numbers are checked against independent computations."""
from __future__ import annotations

import importlib.util
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tifffile  # noqa: E402
import torch  # noqa: E402

import cal_param  # noqa: E402
import check_stats  # noqa: E402
import plot_curve  # noqa: E402
import visualization  # noqa: E402
from checkpoint import save_checkpoint  # noqa: E402
from dataloader import CLASS_FILES, ID_MAP_FILE, DatasetError, list_samples, split_samples, write_split  # noqa: E402
from history import LOSS_KEYS, write_history  # noqa: E402
from predictor import Settings, predict_images  # noqa: E402
from model import build_model  # noqa: E402
from shallow import shallow_resnet  # noqa: E402
from synthetic import make_dataset  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
TINY = {"backbone": "resnet101", "weights": "none", "min_size": 96, "max_size": 128, "input_scale": 0.0,
        "detections_per_img": 20, "rpn_pre_nms_top_n_test": 300, "rpn_post_nms_top_n_test": 100}  # 2000 proposals cost seconds on a CPU


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_dataset(tmp_path_factory.mktemp("data"), n_train=4, n_test=2, size=(96, 112), cells=(4, 8), seed=0)


@pytest.fixture(scope="module")
def run(data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """An untrained tiny checkpoint with the split.json a training run would leave beside it."""
    out = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    with shallow_resnet():  # the tests that load it request the `shallow` fixture
        model = build_model(TINY, load_weights=False)
    save_checkpoint(out / "best.pth", {"model": model.state_dict(), "config": TINY,
                                       "args": {"train_dir": str(data["train_dir"])}})
    train, val = split_samples([p.name for p in list_samples(data["train_dir"])], 0.5, seed=0)
    write_split(out / "split.json", train, val, seed=0, val_split=0.5)
    return out / "best.pth", val


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    pixels = plt.imread(path)
    assert pixels.ndim == 3 and min(pixels.shape[:2]) > 10, path


def test_check_stats_match_label_files(data: dict[str, Path], tmp_path: Path) -> None:
    stats = check_stats.main(["--train_dir", str(data["train_dir"]), "--test_dir", str(data["test_dir"]),
                              "--id_map_json", str(data["id_map_json"]), "--json", str(tmp_path / "s.json")])
    saved = json.loads((tmp_path / "s.json").read_text())
    assert saved == json.loads(json.dumps(stats))
    counts, areas, per_image = {c: 0 for c in CLASS_FILES}, [], []
    for sample in sorted(Path(data["train_dir"]).iterdir()):
        n = 0
        for c, name in CLASS_FILES.items():
            if (sample / name).exists():
                ids, pixels = np.unique(tifffile.imread(sample / name), return_counts=True)
                counts[c] += int((ids != 0).sum())
                areas.extend(pixels[ids != 0].tolist())
                n += int((ids != 0).sum())
        per_image.append(n)
    train = saved["train"]
    assert train["samples"] == 4 and train["empty_samples"] == [] and train["problems"] == {}
    for c, count in counts.items():
        assert train["classes"][f"class{c}"]["count"] == count
        assert train["classes"][f"class{c}"]["share"] == pytest.approx(count / sum(counts.values()))
    assert train["classes"]["all"]["area"]["p50"] == pytest.approx(np.median(areas))
    assert train["instances_per_image"] == {"min": min(per_image), "median": float(np.median(per_image)),
                                            "mean": pytest.approx(np.mean(per_image)), "max": max(per_image)}
    assert train["image_height"] == {"min": 96, "median": 96, "max": 96}
    assert train["image_width"] == {"min": 112, "median": 112, "max": 112}
    assert train["image_modes"] == {"RGB 4-channel uint8": 4} and train["label_dtypes"] == {"float64": sum(
        1 for s in Path(data["train_dir"]).iterdir() for n in CLASS_FILES.values() if (s / n).exists())}
    assert saved["test"]["consistent"] and saved["test"]["images"] == 2


def test_check_stats_lists_images_training_and_prediction_refuse(data: dict[str, Path], tmp_path: Path) -> None:
    """A Z stack and two channels stored as planes (what ImageJ saves) are refused by training
    and prediction; the check that runs before a day of training lists them too."""
    train, test = tmp_path / "train", tmp_path / "test"
    shutil.copytree(data["train_dir"], train)
    shutil.copytree(data["test_dir"], test)
    first, second = sorted(p for p in train.iterdir())[:2]
    planes = np.random.default_rng(0).integers(0, 256, (3, 96, 112), dtype=np.uint8)
    tifffile.imwrite(first / "image.tif", planes, imagej=True, metadata={"axes": "ZYX"})
    tifffile.imwrite(second / "image.tif", planes[:2], imagej=True, metadata={"axes": "CYX"})
    entries = json.loads(Path(data["id_map_json"]).read_text())
    tifffile.imwrite(test / entries[0]["file_name"], planes, imagej=True, metadata={"axes": "ZYX"})
    stats = check_stats.main(["--train_dir", str(train), "--test_dir", str(test),
                              "--id_map_json", str(data["id_map_json"])])
    problems = stats["train"]["problems"]
    assert sorted(problems) == [first.name, second.name] and stats["train"]["samples"] == 4
    assert "a stack of 3 Z planes" in problems[first.name] and "2 channels stored as planes" in problems[second.name]
    assert list(stats["test"]["unreadable"]) == [entries[0]["file_name"]] and not stats["test"]["consistent"]
    assert check_stats.found_problems(stats) == 3


def test_check_stats_reports_an_inconsistent_test_folder(data: dict[str, Path], tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    entries = json.loads(Path(data["id_map_json"]).read_text())
    wrong_size = [dict(entries[0], height=entries[0]["height"] + 1)] + entries[1:]
    (tmp_path / "sizes.json").write_text(json.dumps(wrong_size))
    (tmp_path / "short.json").write_text(json.dumps(entries[1:]))
    sizes = check_stats.test_stats(Path(data["test_dir"]), tmp_path / "sizes.json")
    assert not sizes["consistent"] and [m["file_name"] for m in sizes["size_mismatches"]] == [entries[0]["file_name"]]
    (tmp_path / "unsized.json").write_text(json.dumps([{"file_name": e["file_name"], "id": e["id"]} for e in entries]))
    unsized = check_stats.test_stats(Path(data["test_dir"]), tmp_path / "unsized.json")  # sizes are optional
    assert unsized["consistent"] and unsized["entries_without_size"] == len(entries)
    short = check_stats.test_stats(Path(data["test_dir"]), tmp_path / "short.json")
    assert not short["consistent"] and entries[0]["file_name"] in short["error"]
    for id_map, status in (("short.json", 1), (data["id_map_json"], None)):  # as a shell sees the script
        assert _check_stats_exit(["--train_dir", str(data["train_dir"]), "--test_dir", str(data["test_dir"]),
                                  "--id_map_json", str(tmp_path / id_map)], monkeypatch) == status


def test_check_stats_finds_the_id_map_beside_the_test_folder(data: dict[str, Path], tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """--test_dir alone reads test_image_name_to_ids.json beside it, as inference.py does, and reports
    one that does not fit among its findings; a folder with no map beside it, or a map without its
    folder, stops with a usage error naming what to pass."""
    assert Path(data["id_map_json"]).parent == Path(data["test_dir"]).parent  # the task's layout
    stats = check_stats.main(["--train_dir", str(data["train_dir"]), "--test_dir", str(data["test_dir"])])
    assert stats["test"]["consistent"] and stats["test"]["images"] == 2
    alone = tmp_path / "alone" / "images"
    shutil.copytree(data["test_dir"], alone)
    short = json.loads(Path(data["id_map_json"]).read_text())[1:]
    for argv, told in ((["--test_dir", str(alone)], "beside it; pass its map as --id_map_json"),
                       (["--id_map_json", str(data["id_map_json"])], "pass the folder it maps")):
        with pytest.raises(SystemExit) as stop:
            check_stats.main(["--train_dir", str(data["train_dir"]), *argv])
        assert stop.value.code == 2 and capsys.readouterr().err.splitlines()[-1].endswith(told)
    (alone.parent / ID_MAP_FILE).write_text(json.dumps(short))  # one image unnamed: reported, not raised
    stats = check_stats.main(["--train_dir", str(data["train_dir"]), "--test_dir", str(alone)])
    assert not stats["test"]["consistent"] and stats["train"]["samples"] == 4


def test_check_stats_reads_a_png_test_folder(data: dict[str, Path], tmp_path: Path) -> None:
    from PIL import Image

    pngs = tmp_path / "pngs"
    pngs.mkdir()
    entries = []
    for i, path in enumerate(sorted(Path(data["test_dir"]).iterdir()), start=1):
        pixels = tifffile.imread(path)[..., :3]
        Image.fromarray(pixels).save(pngs / f"{path.stem}.png")
        entries.append({"file_name": f"{path.stem}.png", "id": i, "height": pixels.shape[0], "width": pixels.shape[1]})
    (pngs / "broken.png").write_bytes(b"\x89PNG not an image")
    entries.append({"file_name": "broken.png", "id": len(entries) + 1, "height": 1, "width": 1})
    (tmp_path / "ids.json").write_text(json.dumps(entries))
    stats = check_stats.test_stats(pngs, tmp_path / "ids.json")
    assert stats["image_modes"] == {"PNG RGB": len(entries) - 1} and stats["size_mismatches"] == []
    assert list(stats["unreadable"]) == ["broken.png"] and not stats["consistent"]
    entries[0]["width"] += 1
    (tmp_path / "ids.json").write_text(json.dumps(entries))
    stats = check_stats.test_stats(pngs, tmp_path / "ids.json")
    assert [m["file_name"] for m in stats["size_mismatches"]] == [entries[0]["file_name"]]
    assert check_stats.found_problems({"train": {"problems": {}}, "test": stats}) == 2


def _check_stats_exit(argv: list[str], monkeypatch: pytest.MonkeyPatch) -> int | None:
    """check_stats.py's exit status as ``python check_stats.py ...`` ends (None: it returned, status 0)."""
    import runpy

    monkeypatch.setattr(sys, "argv", ["check_stats.py", *argv])
    try:
        runpy.run_path(str(Path(check_stats.__file__)), run_name="__main__")
    except SystemExit as done:
        return done.code
    return None


def _module_counts(*modules: torch.nn.Module) -> dict[str, int]:
    params = [p for m in modules for p in m.parameters()]
    return {"total": sum(p.numel() for p in params), "trainable": sum(p.numel() for p in params if p.requires_grad)}


def test_cal_param_matches_torchvision_modules(tmp_path: Path) -> None:
    cal_param.main(["--backbone", "resnet", "--json", str(tmp_path / "p.json")])
    row = json.loads((tmp_path / "p.json").read_text())["configs"][0]
    model = build_model({"backbone": "resnet101", "weights": "imagenet", "num_classes": 5}, load_weights=False)
    heads = model.roi_heads
    expected = {"backbone body": _module_counts(model.backbone.body), "FPN": _module_counts(model.backbone.fpn),
                "neck attention": {"total": 0, "trainable": 0}, "RPN": _module_counts(model.rpn),
                "box head": _module_counts(heads.box_head, heads.box_predictor),
                "mask head": _module_counts(heads.mask_head, heads.mask_predictor)}
    assert row["status"] == "ok" and row["parts"] == expected
    assert row["total"] == _module_counts(model)
    for kind in ("total", "trainable"):
        assert sum(part[kind] for part in row["parts"].values()) == row["total"][kind]
    assert row["total"]["trainable"] < row["total"]["total"]  # pretrained layout freezes the stem and layer1
    # The train scripts' values: a local weights file is the pretrained layout (never read); --type_map W adds its head.
    (tmp_path / "local.pth").write_bytes(b"")  # never read: only its layout is counted
    (mapped,) = cal_param.main(["--backbone", "resnet", "--weights", str(tmp_path / "local.pth"), "--type_map", "0.5"])
    assert mapped["type_map"] is True and mapped["parts"]["backbone body"] == expected["backbone body"]
    assert mapped["total"]["total"] > row["total"]["total"]
    with pytest.raises(SystemExit):  # a typo is refused, not counted as the pretrained layout
        cal_param.main(["--weights", "imagnet"])


def test_cal_param_all_refuses_one_configuration_s_flags(capsys: pytest.CaptureFixture) -> None:
    for extra in (["--backbone", "effnet"], ["--use_attn"]):
        with pytest.raises(SystemExit) as exit_info:
            cal_param.main(["--all", *extra])
        assert exit_info.value.code == 2 and "drop --backbone and --use_attn" in capsys.readouterr().err


def test_cal_param_all_configurations(tmp_path: Path) -> None:
    rows = cal_param.main(["--all", "--weights", "none", "--json", str(tmp_path / "all.json")])
    assert json.loads((tmp_path / "all.json").read_text())["configs"] == rows
    assert [(r["backbone"], r["use_attn"]) for r in rows] == list(cal_param.ALL_CONFIGS)
    has_attention = importlib.util.find_spec("attention_modules") is not None
    for row in rows:
        if row["use_attn"] and not has_attention:
            assert row["status"] == cal_param.MISSING_ATTN
            continue
        assert row["status"] == "ok" and row["total"]["trainable"] == row["total"]["total"]
        assert sum(part["total"] for part in row["parts"].values()) == row["total"]["total"]
        if row["use_attn"]:
            model = build_model({"backbone": row["backbone"], "weights": "none", "use_attn": True}, load_weights=False)
            assert row["total"] == _module_counts(model)
            assert row["mask attention"] == _module_counts(model.roi_heads.mask_head[0])
            assert row["parts"]["neck attention"]["total"] > 0
            assert 0 < row["mask attention"]["total"] < row["parts"]["mask head"]["total"]


def test_visualization_val_draws_each_validation_image(run: tuple[Path, list[str]], tmp_path: Path,
                                                       capsys: pytest.CaptureFixture, shallow: None) -> None:
    checkpoint, val = run
    paths = visualization.main(["--checkpoint", str(checkpoint), "--mode", "val", "--num_images", "0",
                                "--score_thresh", "0.0", "--draw_gt_mask", "--vis_dir", str(tmp_path / "vis"),
                                "--device", "cpu"])
    assert sorted(p.name for p in (tmp_path / "vis").glob("*.png")) == sorted(f"{n}.png" for n in val)
    assert sorted(paths) == sorted((tmp_path / "vis").glob("*.png"))
    for path in paths:
        assert_png(path)
    assert f"wrote {len(val)} PNG(s)" in capsys.readouterr().out


def test_visualization_continues_a_stopped_run(run: tuple[Path, list[str]], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture,
                                              shallow: None) -> None:
    """A Ctrl-C after the first figure: the same command draws only the second, and reports the
    instances of both; other settings draw everything again, and the finished run's record is gone."""
    checkpoint, val = run
    argv = ["--checkpoint", str(checkpoint), "--num_images", "0", "--score_thresh", "0", "--vis_dir",
            str(tmp_path), "--device", "cpu"]
    real, drawn = visualization.save_figure, []

    def save(image: np.ndarray, layers: list, path: Path, args: object, stop_at: int = 0) -> Path:
        drawn.append(path.name)
        if len(drawn) == stop_at:
            raise KeyboardInterrupt
        return real(image, layers, path, args)

    visualization.main(argv)
    whole = capsys.readouterr().out.splitlines()[-1]
    for changed in ([], ["--score_thresh", "0.5"]):
        monkeypatch.setattr(visualization, "save_figure", lambda *a: save(*a, stop_at=2))
        drawn.clear()
        with pytest.raises(KeyboardInterrupt):
            visualization.main(argv)
        assert (tmp_path / visualization.RECORD).is_file()
        monkeypatch.setattr(visualization, "save_figure", save)
        drawn.clear()
        capsys.readouterr()
        paths = visualization.main(argv + changed)
        assert sorted(p.name for p in paths) == sorted(f"{n}.png" for n in val)
        assert not (tmp_path / visualization.RECORD).exists()
        out = capsys.readouterr().out
        if changed:  # other settings: the record is another run's
            assert len(drawn) == 2 and "drawn by this command" not in out
        else:
            assert drawn == [f"{val[1]}.png"] and "1 of 2 image(s) were drawn by this command" in out
            assert out.splitlines()[-1] == whole  # the earlier run's instances counted


def test_visualization_val_reads_the_runs_val_dir(data: dict[str, Path], run: tuple[Path, list[str]],
                                                  tmp_path: Path, shallow: None) -> None:
    """A run given --val_dir held out another folder's samples: they are drawn from there."""
    import shutil

    held = tmp_path / "held"
    shutil.copytree(list_samples(data["train_dir"])[0], held / "only_here")
    write_split(tmp_path / "split.json", [], ["only_here"], 0, 0.0, val_dir=str(held))
    paths = visualization.main(["--checkpoint", str(run[0]), "--split_json", str(tmp_path / "split.json"),
                                "--vis_dir", str(tmp_path / "vis"), "--device", "cpu"])
    assert [p.name for p in paths] == ["only_here.png"]


def test_visualization_takes_inference_overrides(run: tuple[Path, list[str]], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture, shallow: None,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """--box_score_thresh drops detections inside the model, as it does for inference.py."""
    argv = ["--checkpoint", str(run[0]), "--num_images", "1", "--score_thresh", "0", "--vis_dir", str(tmp_path),
            "--device", "cpu"]
    visualization.main(argv)
    assert " 0 predictions" not in capsys.readouterr().out
    visualization.main([*argv, "--box_score_thresh", "1"])
    assert " 0 predictions" in capsys.readouterr().out
    legend, patch = [], visualization.Patch
    monkeypatch.setattr(visualization, "Patch", lambda **kwargs: legend.append(kwargs["label"]) or patch(**kwargs))
    visualization.main([*argv, "--class_names", "epi", "lym", "neu", "mac", "--vis_dir", str(tmp_path / "named")])
    assert [label.split()[0] for label in legend[:4]] == ["epi", "lym", "neu", "mac"]  # the legend names the classes


def test_visualization_test_names_pngs_by_image_id(data: dict[str, Path], run: tuple[Path, list[str]],
                                                   tmp_path: Path, shallow: None, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture) -> None:
    checkpoint, _ = run
    argv = ["--checkpoint", str(checkpoint), "--mode", "test", "--test_dir", str(data["test_dir"]),
            "--id_map_json", str(data["id_map_json"]), "--score_thresh", "0.0", "--device", "cpu"]
    visualization.main([*argv, "--vis_dir", str(tmp_path / "vis")])
    ids = {e["id"] for e in json.loads(Path(data["id_map_json"]).read_text())}
    assert {p.name for p in (tmp_path / "vis").glob("*.png")} == {f"{i}.png" for i in ids}
    for path in (tmp_path / "vis").glob("*.png"):
        assert_png(path)
    capsys.readouterr()
    monkeypatch.setattr(visualization, "MAX_DRAWN_SIDE", 16)  # as a whole slide is: skipped, never read whole
    monkeypatch.setattr(visualization, "predict_layer", pytest.fail)
    assert visualization.main([*argv, "--vis_dir", str(tmp_path / "slides")]) == []
    assert capsys.readouterr().out.count("too large to draw whole (over 16 px a side); skipped") == len(ids)


def test_num_images_draws_that_many_replacing_images_too_large(monkeypatch: pytest.MonkeyPatch) -> None:
    checked = []
    monkeypatch.setattr(visualization, "drawable", lambda path: checked.append(path) or not path.name.startswith("big"))
    names = ["big1", "a", "big2", "b", "c"]
    assert visualization._first_drawable(names, 2, Path) == ["a", "b"]
    assert checked == [Path(n) for n in names[:4]]  # no image past the second drawable one is read
    assert visualization._first_drawable(names, 0, Path) == ["a", "b", "c"]


def test_visualization_test_uses_the_runs_id_map_only_for_the_runs_folder(data: dict[str, Path],
                                                                         run: tuple[Path, list[str]],
                                                                         tmp_path: Path, shallow: None) -> None:
    import shutil

    from checkpoint import load_checkpoint

    entries = json.loads(Path(data["id_map_json"]).read_text())
    id_map = tmp_path / "elsewhere.json"  # not beside the folder: only the run's args name it
    id_map.write_text(json.dumps([{**e, "id": 100 + i} for i, e in enumerate(entries)]))
    state = load_checkpoint(run[0])
    state["args"] = {**state["args"], "test_dir": str(data["test_dir"]), "id_map_json": str(id_map)}
    save_checkpoint(tmp_path / "best.pth", state)
    shutil.copytree(data["test_dir"], tmp_path / "other")
    for folder, ids in ((data["test_dir"], {100 + i for i in range(len(entries))}),
                        (tmp_path / "other", set(range(1, len(entries) + 1)))):
        vis = tmp_path / f"vis_{Path(folder).name}"
        visualization.main(["--checkpoint", str(tmp_path / "best.pth"), "--mode", "test", "--test_dir", str(folder),
                            "--num_images", "0", "--vis_dir", str(vis), "--device", "cpu"])
        assert {p.stem for p in vis.glob("*.png")} == {str(i) for i in ids}


def test_visualization_predicts_tile_by_tile_like_the_submission(shallow: None) -> None:
    torch.manual_seed(0)
    model = build_model(TINY).eval()
    image = np.random.default_rng(0).random((96, 150, 3)).astype(np.float32)
    tiled = visualization.predict_layer(model, image, torch.device("cpu"), 0.0, Settings(tile=64, batch_size=3))
    with torch.no_grad():
        expected = predict_images(model, [torch.from_numpy(image).permute(2, 0, 1)], Settings(tile=64))[0]
    assert len(tiled.labels) == len(tiled.boxes) == len(tiled.masks) == len(expected["scores"]) > 0
    assert np.allclose(tiled.scores, expected["scores"].numpy())
    for x0, y0, crop in tiled.masks:
        assert 0 <= x0 and 0 <= y0 and x0 + crop.shape[1] <= 150 and y0 + crop.shape[0] <= 96
    whole = visualization.predict_layer(model, image, torch.device("cpu"), 0.0, Settings(detections_per_img=4))
    assert 0 < len(whole.labels) == len(whole.masks) <= 4


def test_visualization_draws_what_an_ensemble_of_checkpoints_predicts(run: tuple[Path, list[str]], tmp_path: Path,
                                                                       shallow: None, monkeypatch: pytest.MonkeyPatch,
                                                                       capsys: pytest.CaptureFixture) -> None:
    from checkpoint import load_checkpoint

    state = load_checkpoint(run[0])
    state["model"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in state["model"].items()}
    other = tmp_path / "other.pth"
    save_checkpoint(other, state)
    seen = []

    def record(models: list, images: list, settings: Settings) -> list[dict]:
        seen.append([next(m.parameters()).sum().item() for m in models])  # which weights predicted
        return predict_images(models, images, settings)

    monkeypatch.setattr(visualization, "predict_images", record)
    argv = ["--num_images", "1", "--score_thresh", "0", "--device", "cpu"]
    one = visualization.main(["--checkpoint", str(run[0]), *argv, "--vis_dir", str(tmp_path / "one")])
    both = visualization.main(["--checkpoint", str(run[0]), str(other), *argv, "--vis_dir", str(tmp_path / "both")])
    assert len(one) == len(both) == 1 and len(seen) == 2
    assert len(seen[0]) == 1 and len(seen[1]) == 2 and seen[1][0] == seen[0][0] != seen[1][1]
    assert_png(both[0])
    assert "note:" not in capsys.readouterr().out  # no split.json beside the other checkpoint: nothing known
    write_split(tmp_path / "split.json", run[1], run[1][1:], seed=0, val_split=0.5)  # trained on run[1][0]
    visualization.main(["--checkpoint", str(run[0]), str(other), *argv, "--vis_dir", str(tmp_path / "split")])
    assert f"note: 1 of the {len(run[1])} held-out images were training images of {other}'s run" in \
        capsys.readouterr().out
    args = {n: visualization.build_parser().parse_args(["--checkpoint", *paths]) for n, paths in
            (("one", [str(run[0])]), ("both", [str(run[0]), str(other)]))}
    for parsed in args.values():
        parsed.settings, parsed.class_names = Settings(), ["a", "b", "c", "d"]
    key = {n: visualization.drawing_key(parsed, [run[0]]) for n, parsed in args.items()}
    assert key["one"] != key["both"]  # a stopped drawing of one model is not continued by the ensemble


def test_visualization_without_split_says_where_it_looked(run: tuple[Path, list[str]], tmp_path: Path,
                                                          shallow: None) -> None:
    with pytest.raises(FileNotFoundError, match="split.json"):
        visualization.main(["--checkpoint", str(run[0]), "--split_json", str(tmp_path / "split.json"),
                            "--vis_dir", str(tmp_path / "vis")])


def test_a_split_json_that_is_not_one_names_the_file(tmp_path: Path) -> None:
    for text in ("{not json", json.dumps([{"file_name": "a.tif", "id": 1}])):
        path = tmp_path / "split.json"
        path.write_text(text)
        with pytest.raises(DatasetError, match="split.json"):
            visualization.validation_split(path)


def _history(with_val: bool) -> list[dict]:
    rows = []
    for epoch, ap50 in zip((1, 2, 3), (0.2, 0.5, 0.4)):
        row = {"epoch": epoch, "lr": 1e-4 * epoch, "train_loss": 3.0 / epoch,
               **{f"train_{k}": 0.6 / epoch for k in LOSS_KEYS}}
        if with_val:
            row.update({"val_loss": 3.5 / epoch, **{f"val_{k}": 0.7 / epoch for k in LOSS_KEYS}})
            for iou_type in ("segm", "bbox"):
                row.update({f"{iou_type}_AP": ap50 / 2, f"{iou_type}_AP50": ap50, f"{iou_type}_AP75": ap50 / 3,
                            f"{iou_type}_AP50_class1": ap50, f"{iou_type}_AP50_class2": float("nan")})
        rows.append(row)
    return rows


def test_plot_curve_writes_three_pngs(tmp_path: Path) -> None:
    write_history(tmp_path / "history.json", _history(with_val=True))
    paths = plot_curve.main(["--output_dir", str(tmp_path)])
    for name in ("loss_curve.png", "map_curve.png", "lr_curve.png"):
        assert_png(tmp_path / name)
    assert set(paths.values()) == {tmp_path / n for n in ("loss_curve.png", "map_curve.png", "lr_curve.png")}
    history = plot_curve.load_history(tmp_path)
    assert history[0]["segm_AP50_class2"] is None
    assert plot_curve.best_epoch(history) == (2, "segm_AP50", 0.5)  # a history from before the record
    assert plot_curve.best_label(history) == "best segm_AP50"  # a guess, not said to be best.pth
    for row, ema in zip(history, (0.1, 0.3, 0.45)):  # selected by bbox AP75, epoch 3's EMA weights the better
        row.update(best_epoch=3, select_metric="bbox_AP75", ema_bbox_AP75=ema)
    assert plot_curve.best_epoch(history) == (3, "ema_bbox_AP75", 0.45)
    assert plot_curve.best_label(history) == "best.pth"
    write_history(tmp_path / "history.json", history)
    assert plot_curve.main(["--output_dir", str(tmp_path)])["metrics"] == tmp_path / "map_curve.png"
    assert not list(tmp_path.glob(".*.tmp"))  # written under a hidden name, then renamed


def test_a_figure_that_fails_while_written_leaves_no_png(tmp_path: Path) -> None:
    from files import write_figure

    class Failing:
        def savefig(self, path: Path, **kwargs) -> None:
            Path(path).write_bytes(b"\x89PNG half")
            raise KeyboardInterrupt

    (tmp_path / "map_curve.png").write_bytes(b"earlier")
    with pytest.raises(KeyboardInterrupt):
        write_figure(Failing(), tmp_path / "map_curve.png")
    assert (tmp_path / "map_curve.png").read_bytes() == b"earlier"  # the earlier figure, never half a new one


def test_plot_curve_without_validation(tmp_path: Path) -> None:
    write_history(tmp_path / "history.json", _history(with_val=False))
    paths = plot_curve.main(["--output_dir", str(tmp_path), "--plot_dir", str(tmp_path / "plots")])
    assert paths["metrics"] is None and not (tmp_path / "plots" / "map_curve.png").exists()
    assert_png(tmp_path / "plots" / "loss_curve.png")
    assert_png(tmp_path / "plots" / "lr_curve.png")
    assert not plot_curve._has_values(plot_curve.load_history(tmp_path), "val_loss")


def test_plot_curve_joins_metrics_scored_every_few_epochs(tmp_path: Path) -> None:
    """--eval_every 2: the metric's line runs through the epochs that have one, not dots between gaps."""
    history = _history(with_val=True)
    history[0] = {k: v for k, v in history[0].items() if not k.startswith(("segm_", "bbox_", "val_"))}
    write_history(tmp_path / "history.json", history)
    assert plot_curve._points(plot_curve.load_history(tmp_path), "segm_AP50") == ([2.0, 3.0], [0.5, 0.4])
    assert plot_curve._points(plot_curve.load_history(tmp_path), "segm_AP50_class2") == ([], [])
    assert_png(plot_curve.main(["--output_dir", str(tmp_path)])["metrics"])


def test_plot_curve_without_history_says_train_first(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"history\.json: not found; train first"):
        plot_curve.main(["--output_dir", str(tmp_path)])
    from errors import UsageError

    for content, told in ((b"[1, 2]", "expected per-epoch rows, each an object with its epoch"),
                          (b'[{"train_loss": 1.0}]', "expected per-epoch rows"),
                          (b"\xff\xfe[]", "not valid JSON")):
        (tmp_path / "history.json").write_bytes(content)
        with pytest.raises(UsageError, match=told):
            plot_curve.main(["--output_dir", str(tmp_path)])


def test_a_one_epoch_history_is_drawn_on_whole_epochs(tmp_path: Path) -> None:
    write_history(tmp_path / "history.json", _history(with_val=True)[:1])
    plot_curve.main(["--output_dir", str(tmp_path)])
    fig, ax = plt.subplots()
    ax.plot([1], [0.5], "-o")
    plot_curve._epoch_ticks(ax)
    fig.canvas.draw()
    ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
    plt.close(fig)
    assert ticks == [1.0]


@pytest.mark.parametrize("tool", ["evaluate.py", "plot_curve.py"])
def test_tool_help_loads_no_model_stack(tool: str) -> None:
    """``--help`` of the scoring and plotting tools imports neither torch nor the project's
    model modules (torch alone takes seconds to import on a loaded machine)."""
    root = Path(__file__).resolve().parents[1]
    code = (f"import runpy, sys; sys.argv = [{tool!r}, '--help']\n"
            f"try:\n    runpy.run_path({tool!r}, run_name='__main__')\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'model', 'dataloader', 'coco')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True)
    assert "--help" in done.stdout or "usage:" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.parametrize("script,argv,example", [
    (check_stats, ["--train_dir", "{missing}"], "stats.json"),
    (cal_param, [], "params.json"),
    ("evaluate", ["--data_dir", "{missing}", "--submission", "{missing}"], "metrics.json"),
])
def test_json_output_that_is_a_folder_is_refused_before_the_work(script: object, argv: list[str], example: str,
                                                                 tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--json naming a folder stops at once (the survey or count never starts) and leaves nothing."""
    monkeypatch.setattr(cal_param, "count_config", pytest.fail)
    monkeypatch.setattr(check_stats, "train_stats", pytest.fail)
    if script == "evaluate":  # its data is read after the check: the folder given does not exist
        import evaluate as script
    with pytest.raises(IsADirectoryError, match=f"--json {tmp_path} is a folder; pass a file path, e.g. "
                                                f"{tmp_path / example}"):
        script.main([a.format(missing=tmp_path / "nothing") for a in argv] + ["--json", str(tmp_path)])
    assert list(tmp_path.iterdir()) == []
