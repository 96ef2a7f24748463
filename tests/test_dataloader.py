from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch

import dataloader
from conftest import mask_boxes, shared
from dataloader import (DatasetError, UnlabelledImages, LabelledImages, decode_instances, folder_images, list_samples,
                        image_size, read_id_map, read_image, sample_groups, split_samples)
from synthetic import write_rgba_lzw


def _sample(root: Path, image: np.ndarray, labels: dict[int, np.ndarray], **kw) -> Path:
    sample = root / "s"
    sample.mkdir(parents=True, exist_ok=True)
    tifffile.imwrite(sample / "image.tif", image, **kw)
    for c, lab in labels.items():
        tifffile.imwrite(sample / f"class{c}.tif", lab)
    return sample


def test_rgba_lzw_image_drops_alpha_and_scales(tmp_path: Path) -> None:
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    write_rgba_lzw(tmp_path / "a.tif", rgb)
    with tifffile.TiffFile(tmp_path / "a.tif") as tif:
        assert tif.pages[0].compression == 5  # LZW
    out = read_image(tmp_path / "a.tif")
    assert out.shape == (20, 30, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out, rgb / 255.0, atol=1e-6)


@pytest.mark.parametrize("dtype,peak", [(np.uint8, 255), (np.uint16, 65535)])
def test_grey_and_16bit_scale_by_dtype(tmp_path: Path, dtype: type, peak: int) -> None:
    grey = np.zeros((8, 9), dtype=dtype)
    grey[2, 3] = peak // 2
    grey[4, 4] = peak
    tifffile.imwrite(tmp_path / "g.tif", grey)
    out = read_image(tmp_path / "g.tif")
    assert out.shape == (8, 9, 3)
    assert out[4, 4].tolist() == [1.0, 1.0, 1.0]
    assert abs(out[2, 3, 0] - (peak // 2) / peak) < 1e-6


def test_a_float_images_crops_are_scaled_as_the_whole_image(tmp_path: Path) -> None:
    """A float32 image in 0..4095 (a 12-bit image converted): a training crop whose own peak is
    under 255 gets the whole image's scale, the one prediction uses; an infinite pixel darkens
    nothing else."""
    rng = np.random.default_rng(0)
    image = rng.uniform(0, 200, (40, 50)).astype(np.float32)
    image[35:, 45:] = 4095.0
    image[0, 0] = np.inf
    label = np.zeros((40, 50), np.uint16)
    label[5:12, 5:12] = 1
    sample = _sample(tmp_path, image, {1: label})
    whole = read_image(sample / "image.tif")
    np.testing.assert_allclose(whole[1:30, 1:30, 0], image[1:30, 1:30] / 65535.0, rtol=1e-6)
    assert whole[0, 0, 0] == 0.0
    data = LabelledImages([sample], [1], desc="t")
    crop, _ = data.raw(0, (0, 0, 30, 30))  # peaks under 255 in itself
    np.testing.assert_allclose(crop[0].numpy(), whole[:30, :30, 0], rtol=1e-6)


@pytest.mark.parametrize("kind", ["bool", "0/255", "background 7"])
def test_a_class_file_that_is_not_instance_ids_is_refused(tmp_path: Path, kind: str) -> None:
    """A semantic mask (one value, many separate cells) or a label without 0 background would
    train as one huge cell: refused, naming the file; one cell in two pieces is still one cell."""
    mask = np.zeros((30, 40), bool)
    for x in (2, 12, 22):
        mask[5:10, x:x + 5] = True
    label = {"bool": mask, "0/255": mask.astype(np.uint8) * 255,
             "background 7": np.where(mask, 3, 7).astype(np.uint16)}[kind]
    sample = _sample(tmp_path, np.zeros((30, 40, 3), np.uint8), {1: label})
    with pytest.raises(DatasetError, match="class1.tif: " + ("label image has no 0" if kind == "background 7"
                                                              else "one value .* marks 3 separate regions")):
        decode_instances(sample, (30, 40))
    two = np.zeros((30, 40), np.uint8)
    two[5:10, 2:7] = two[5:10, 12:17] = 9  # one cell cut in two by the annotation
    tifffile.imwrite(sample / "class1.tif", two)
    assert len(decode_instances(sample, (30, 40))) == 1
    two[20, 30] = two[25, 35] = two[28, 2] = 9  # and three one-pixel specks of its id: still one cell
    tifffile.imwrite(sample / "class1.tif", two)
    assert len(decode_instances(sample, (30, 40))) == 1


def test_a_two_channel_stack_is_refused_not_read_as_grey_and_alpha(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    stack = rng.integers(0, 65535, (2, 20, 30), dtype=np.uint16)  # nuclear + membrane planes
    tifffile.imwrite(tmp_path / "stack.tif", stack)
    with pytest.raises(DatasetError, match="stack.tif: 2 channels stored as planes"):
        read_image(tmp_path / "stack.tif")
    stack[1] = 65535  # an opaque alpha plane: grey + alpha, read as grey
    tifffile.imwrite(tmp_path / "grey.tif", stack)
    np.testing.assert_allclose(read_image(tmp_path / "grey.tif")[:, :, 1], stack[0] / 65535, rtol=1e-6)


def test_palette_min_is_white_cmyk_and_4_bit_tiffs_read_as_shown_in_whole_and_in_windows(tmp_path: Path) -> None:
    """tifffile returns stored values: colour indices, inverted grey, inks, 0..15. Each must reach
    the model as the picture a viewer shows, whole (training) and window by window (streaming)."""
    from streaming import LazyImage

    rng = np.random.default_rng(3)
    indices = rng.integers(0, 256, (40, 50), dtype=np.uint8)
    palette = rng.integers(0, 256, (3, 256))
    grey = rng.integers(0, 256, (40, 50), dtype=np.uint8)
    inks = rng.integers(0, 256, (40, 50, 4), dtype=np.uint8)
    nibbles = rng.integers(0, 16, (40, 50), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "palette.tif", indices, photometric="palette", colormap=palette * 257)
    tifffile.imwrite(tmp_path / "pillow.tif", indices, photometric="palette", colormap=palette * 256)  # Pillow's
    tifffile.imwrite(tmp_path / "white.tif", 255 - grey, photometric="miniswhite")
    tifffile.imwrite(tmp_path / "cmyk.tif", inks, photometric="separated", compression="lzw")
    tifffile.imwrite(tmp_path / "planar.tif", np.moveaxis(inks, 2, 0), photometric="separated",
                     planarconfig="separate")
    tifffile.imwrite(tmp_path / "4bit.tif", nibbles, photometric="minisblack", bitspersample=4)
    cmyk = inks.astype(np.float64) / 255
    shown_inks = np.rint((1 - cmyk[..., :3]) * (1 - cmyk[..., 3:]) * 255) / 255
    expected = {"palette.tif": palette.T[indices] / 255, "pillow.tif": palette.T[indices] / 255,
                "white.tif": np.repeat(grey[:, :, None], 3, 2) / 255, "cmyk.tif": shown_inks,
                "planar.tif": shown_inks, "4bit.tif": np.repeat(nibbles[:, :, None], 3, 2) * 17 / 255}
    for name, pixels in expected.items():
        np.testing.assert_allclose(read_image(tmp_path / name), pixels, atol=1e-6, err_msg=name)
        with LazyImage(tmp_path / name) as lazy:
            window = dataloader.to_float_rgb(lazy.read(5, 7, 30, 41), tmp_path / name)
        np.testing.assert_allclose(window, pixels[5:30, 7:41], atol=1e-6, err_msg=name)


def test_a_label_with_a_colour_table_keeps_its_ids_and_an_imagej_lut_keeps_the_grey(tmp_path: Path) -> None:
    """Label maps saved with a colour table (MorphoLibJ's glasbey) hold ids, not colours; an
    ImageJ 8-bit image with a display LUT (a ramp) holds intensities, one in "8-bit Color" does not."""
    label = np.zeros((12, 14), np.uint8)
    label[2:5, 3:7], label[7:10, 1:4] = 3, 200
    table = np.random.default_rng(5).integers(0, 256, (3, 256)) * 257
    tifffile.imwrite(tmp_path / "class1.tif", label, photometric="palette", colormap=table)
    assert np.array_equal(dataloader.read_label_image(tmp_path / "class1.tif", (12, 14)), label)
    green = np.zeros((3, 256), np.uint16)
    green[1] = np.arange(256) * 257  # ImageJ's "Green" display LUT: the indices are intensities
    tifffile.imwrite(tmp_path / "lut.tif", label, imagej=True, colormap=green)
    np.testing.assert_allclose(read_image(tmp_path / "lut.tif")[:, :, 0], label / 255, atol=1e-6)
    tifffile.imwrite(tmp_path / "indexed.tif", label, imagej=True, colormap=table)  # ImageJ's "8-bit Color"
    np.testing.assert_allclose(read_image(tmp_path / "indexed.tif"), table.T[label] / 65535, atol=1e-6)


def test_a_stack_of_planes_that_are_not_colours_is_refused(tmp_path: Path) -> None:
    planes = np.random.default_rng(4).integers(0, 256, (3, 20, 30), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "z.tif", planes, imagej=True, metadata={"axes": "ZYX"})
    tifffile.imwrite(tmp_path / "t.tif", planes[:2], imagej=True, metadata={"axes": "TYX"})
    tifffile.imwrite(tmp_path / "c.tif", planes, imagej=True, metadata={"axes": "CYX"})
    for read in (read_image, lambda path: __import__("streaming").LazyImage(path), image_size):  # image_size: before any prediction
        with pytest.raises(DatasetError, match=r"z.tif: a stack of 3 Z planes \(axes ZYX\).*save one plane"):
            read(tmp_path / "z.tif")
        with pytest.raises(DatasetError, match=r"t.tif: a stack of 2 T planes"):
            read(tmp_path / "t.tif")
    np.testing.assert_allclose(read_image(tmp_path / "c.tif"), np.moveaxis(planes, 0, 2) / 255, atol=1e-6)  # RGB


def test_a_12_bit_image_in_uint16_is_noted_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(dataloader, "_DIM_NOTED", set())
    for name, peak in (("full.tif", 65535), ("camera.tif", 4095), ("again.tif", 4000)):
        tifffile.imwrite(tmp_path / name, np.full((4, 5), peak, np.uint16))
        assert read_image(tmp_path / name)[0, 0, 0] == pytest.approx(peak / 65535)  # scaled alike, dark or not
    out = capsys.readouterr().out
    assert "camera.tif: uint16 pixels peak at 4095 of the 65535 they are scaled by" in out and out.count("note:") == 1
    tifffile.imwrite(tmp_path / "dark8.tif", np.full((4, 5), 3, np.uint8))  # an 8-bit image is what it is
    read_image(tmp_path / "dark8.tif")
    assert capsys.readouterr().out == ""


def test_a_float_image_a_little_over_1_is_noted_even_in_a_loader_worker(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture) -> None:
    """Float pixels peaking at 1.01 are divided by 255 (0..255 data), so they reach the model
    near black: said, also from a DataLoader worker, where prediction reads every image."""
    monkeypatch.setattr(dataloader, "_DIM_NOTED", set())
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: object())  # as inside a worker
    tifffile.imwrite(tmp_path / "unit.tif", np.full((4, 5), 0.9, np.float32))
    assert read_image(tmp_path / "unit.tif")[0, 0, 0] == pytest.approx(0.9)
    assert capsys.readouterr().out == ""  # 0..1 data: as it is
    tifffile.imwrite(tmp_path / "over.tif", np.full((4, 5), 1.01, np.float32))
    assert read_image(tmp_path / "over.tif")[0, 0, 0] == pytest.approx(1.01 / 255)
    assert "over.tif: float32 pixels peak at 1.01 of the 255 they are scaled by" in capsys.readouterr().out


def test_float64_labels_noncontiguous_ids_and_one_pixel_instances(tmp_path: Path) -> None:
    label = np.zeros((10, 12), dtype=np.float64)
    label[2:5, 3:7] = 17.0     # 3x4 block
    label[8, 0:12] = 1000.0    # one pixel high, full width
    label[0, 11] = 3.0         # a single pixel
    sample = _sample(tmp_path, np.zeros((10, 12, 3), np.uint8), {2: label})
    inst = decode_instances(sample, (10, 12))
    assert inst.labels.tolist() == [2, 2, 2]
    boxes = {tuple(b) for b in inst.boxes.tolist()}
    assert boxes == {(11, 0, 12, 1), (3, 2, 7, 5), (0, 8, 12, 9)}  # exclusive max
    assert sorted(inst.areas.tolist()) == [1.0, 12.0, 12.0]
    masks = inst.masks()
    assert masks.shape == (3, 10, 12) and masks.dtype == np.uint8
    assert (masks.sum(0) == (label > 0)).all()


def test_dataset_target_contract(tiny_dataset: dict) -> None:
    samples = list_samples(tiny_dataset["train_dir"])
    ds = LabelledImages(samples[:2], [1, 2])
    image, target = ds[1]
    assert image.shape[0] == 3 and image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1
    n = len(target["labels"])
    assert n > 0 and target["boxes"].shape == (n, 4) and target["boxes"].dtype == torch.float32
    masks = target["masks"].full()
    assert target["masks"].shape == masks.shape == (n, *image.shape[1:]) and masks.dtype == torch.uint8
    assert target["image_id"] == 2
    w = target["boxes"][:, 2] - target["boxes"][:, 0]
    h = target["boxes"][:, 3] - target["boxes"][:, 1]
    assert (w > 0).all() and (h > 0).all()
    assert torch.equal(target["area"], masks.flatten(1).sum(1).float())
    assert set(target["labels"].tolist()) <= {1, 2, 3, 4}


def test_labels_decoded_once(tiny_dataset: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = LabelledImages(list_samples(tiny_dataset["train_dir"])[:2], [1, 2])
    import dataloader

    def fail(*a, **k):
        raise AssertionError("label TIFF decoded again")

    monkeypatch.setattr(dataloader, "read_label_image", fail)
    for _ in range(2):
        ds[0], ds[1]


def test_images_cached_unless_asked_not_to(tiny_dataset: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    samples = list_samples(tiny_dataset["train_dir"])[:2]
    cached, uncached = LabelledImages(samples, [1, 2]), LabelledImages(samples, [1, 2], cache_images=False)
    assert cached.images[0].dtype == np.uint8 and cached.images[0].shape[2] == 3  # alpha dropped, stored dtype
    assert uncached.images == [None, None]
    import dataloader

    reads = []
    monkeypatch.setattr(dataloader, "_read_pixels", lambda path: reads.append(path) or tifffile.imread(path))
    for index in range(2):
        image, target = cached.load(index)
        again, target_again = uncached.load(index)
        assert torch.equal(image, again) and torch.equal(target["masks"].full(), target_again["masks"].full())
    assert len(reads) == 2  # only the uncached dataset read its images


def test_split_is_seeded_and_order_free() -> None:
    names = [f"n{i}" for i in range(10)]
    train, val = split_samples(names, 0.2, seed=3)
    assert len(val) == 2 and len(train) == 8 and not set(train) & set(val)
    assert split_samples(list(reversed(names)), 0.2, seed=3) == (train, val)
    assert split_samples(names, 0.2, seed=4) != (train, val)


def test_grouped_split_holds_out_whole_groups(tmp_path: Path) -> None:
    """Patches of one slide never straddle the split, from a manifest or a name pattern, and
    the share counts groups; a bad manifest or a name the pattern misses is a one-line error."""
    names = [f"slide{s}_{p:03d}" for s in range(6) for p in range(4 if s else 1)]  # slide0 holds one patch
    by_pattern = sample_groups(r"^(slide\d+)_", names)
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"samples": [{"name": n, "source_image": n.split("_")[0]} for n in names]}))
    assert sample_groups(str(manifest), names) == by_pattern
    for seed in range(5):
        train, val = split_samples(names, 0.34, seed, by_pattern)
        held = {by_pattern[n] for n in val}
        assert len(held) == 2 and not held & {by_pattern[n] for n in train}  # 2 of 6 slides, whole
        assert sorted(train + val) == sorted(names)
    assert split_samples(names, 0.34, 0, by_pattern) != split_samples(names, 0.34, 1, by_pattern)
    with pytest.raises(DatasetError, match="does not match"):
        sample_groups(r"^slide\d+_00[0-2]$", names)
    manifest.write_text(json.dumps({"samples": [{"name": "slide1_000", "source_image": "slide1"}]}))
    with pytest.raises(DatasetError, match="missing"):
        sample_groups(str(manifest), names)


def test_missing_image(tmp_path: Path) -> None:
    """Training stops on a sample folder without its image; prediction skips it, numbering the
    others in the same order as training."""
    for name in ("b", "a", "c"):
        (tmp_path / "train" / name).mkdir(parents=True)
    for name in ("b", "c"):
        write_rgba_lzw(tmp_path / "train" / name / "image.tif", np.zeros((8, 8, 3), np.uint8))
    assert folder_images(tmp_path / "train") == ["b/image.tif", "c/image.tif"]
    with pytest.raises(DatasetError, match=r"a: missing image.tif"):
        list_samples(tmp_path / "train")
    write_rgba_lzw(tmp_path / "train" / "a" / "image.tif", np.zeros((8, 8, 3), np.uint8))
    assert [f"{p.name}/image.tif" for p in list_samples(tmp_path / "train")] == folder_images(tmp_path / "train")


def test_truncated_tiff_named(tmp_path: Path) -> None:
    write_rgba_lzw(tmp_path / "x.tif", np.zeros((64, 64, 3), np.uint8))
    data = (tmp_path / "x.tif").read_bytes()
    (tmp_path / "x.tif").write_bytes(data[: len(data) // 3])
    with pytest.raises(DatasetError, match="x.tif: cannot decode TIFF"):
        read_image(tmp_path / "x.tif")


def test_label_size_mismatch_named(tmp_path: Path) -> None:
    sample = _sample(tmp_path, np.zeros((10, 12, 3), np.uint8), {1: np.ones((10, 11))})
    with pytest.raises(DatasetError, match=r"class1.tif: label image is 10x11 but its image.tif is 10x12"):
        LabelledImages([sample], [1])


@pytest.mark.parametrize("name", ["class4.tiff", "Class2.tif", "class_1.tif", "class5.tif"])
def test_a_label_image_under_another_name_is_refused_not_read_as_no_cells(tmp_path: Path, name: str) -> None:
    sample = _sample(tmp_path, np.zeros((10, 12, 3), np.uint8), {1: np.ones((10, 12))})
    if name == "class5.tif":  # a fifth class: the layout has four
        tifffile.imwrite(sample / name, np.ones((10, 12)))
    else:
        (sample / "class1.tif").rename(sample / name)
    (sample / "notes_class.txt").write_text("not a label")
    with pytest.raises(DatasetError, match=rf"{name}: not read: label images are named class1.tif ... class4.tif"):
        LabelledImages([sample], [1])


def test_non_integer_labels_named(tmp_path: Path) -> None:
    sample = _sample(tmp_path, np.zeros((10, 12, 3), np.uint8), {3: np.full((10, 12), 0.5)})
    with pytest.raises(DatasetError, match=r"class3.tif: label image has non-integer values"):
        LabelledImages([sample], [1])


def test_empty_sample_reported_not_crash(tmp_path: Path) -> None:
    sample = _sample(tmp_path, np.zeros((10, 12, 3), np.uint8), {})
    ds = LabelledImages([sample], [1])
    assert ds.empty == ["s"]
    _, target = ds[0]
    assert target["boxes"].shape == (0, 4) and target["masks"].shape == (0, 10, 12)


def test_id_map_checked_both_ways(tiny_dataset: dict, tmp_path: Path) -> None:
    entries = json.loads(Path(tiny_dataset["id_map_json"]).read_text())
    assert len(UnlabelledImages(tiny_dataset["test_dir"], tiny_dataset["id_map_json"])) == len(entries)
    short = tmp_path / "short.json"
    short.write_text(json.dumps(entries[1:]))
    with pytest.raises(DatasetError, match="have no id"):
        read_id_map(short, tiny_dataset["test_dir"])
    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps(entries + [{"file_name": "ghost.tif", "id": 99}]))
    with pytest.raises(DatasetError, match="ghost.tif"):
        read_id_map(extra, tiny_dataset["test_dir"])
    for form in (str, float):  # maps written from a table: the same ids
        other = tmp_path / f"{form.__name__}_ids.json"
        other.write_text(json.dumps([{**e, "id": form(e["id"])} for e in entries]))
        assert read_id_map(other, tiny_dataset["test_dir"]) == sorted(entries, key=lambda e: e["id"])
    fraction = tmp_path / "fraction.json"
    fraction.write_text(json.dumps([{**entries[0], "id": 1.5}] + entries[1:]))
    with pytest.raises(DatasetError, match=f"the id of '{entries[0]['file_name']}' is 1.5, not a whole number"):
        read_id_map(fraction, tiny_dataset["test_dir"])
    a_tiff = tmp_path / "image.json"
    a_tiff.write_bytes(b"II*\x00\x08\x00\x00\x00\xff\xfe\x80")  # a TIFF passed by mistake: never UTF-8
    with pytest.raises(DatasetError, match="not valid JSON"):
        read_id_map(a_tiff, tiny_dataset["test_dir"])
    fix = r"pass --id_map_json <dataset>/test_image_name_to_ids.json\.$"
    with pytest.raises(DatasetError, match="absent.json: file not found; " + fix):
        read_id_map(tmp_path / "absent.json", tiny_dataset["test_dir"])
    unnamed = tmp_path / "unnamed.json"
    unnamed.write_text(json.dumps([{"id": 1}]))
    with pytest.raises(DatasetError, match=r"unnamed.json: not a list of \{file_name, id\} objects; " + fix):
        read_id_map(unnamed, tiny_dataset["test_dir"])
    twice = tmp_path / "twice.json"  # the same id for two images, as "1" and 1.0
    twice.write_text(json.dumps([{**entries[0], "id": "7"}, {**entries[1], "id": 7.0}, *entries[2:]]))
    with pytest.raises(DatasetError, match=r"twice.json: 1 id\(s\) listed more than once: 7; give each image"):
        read_id_map(twice, tiny_dataset["test_dir"])
    twice.write_text(json.dumps([*entries, {**entries[0], "id": 99}]))
    with pytest.raises(DatasetError, match=f"file_name\\(s\\) listed more than once: {entries[0]['file_name']}"):
        read_id_map(twice, tiny_dataset["test_dir"])


def test_real_hw3_sample() -> None:
    train = shared("hw3_official_sample", "train")
    ds = LabelledImages(list_samples(train), [1])
    image, target = ds[0]
    assert image.shape == (3, 397, 482)
    counts = np.bincount(target["labels"].numpy(), minlength=5)
    assert counts[1] == 2 and counts[2] == 159


def test_real_id_map_parses() -> None:
    path = shared("hw3_official_sample", "test_image_name_to_ids.json")
    entries = json.loads(path.read_text())
    assert len(entries) == 101 and all({"file_name", "id", "height", "width"} <= set(e) for e in entries)


def test_window_renders_only_what_it_sees(tiny_dataset: dict) -> None:
    from augment import RandomWindow

    samples = list_samples(tiny_dataset["train_dir"])
    full = LabelledImages(samples[:1], [1])
    image, target = full.load(0)
    window = (10, 20, 60, 90)
    crop_image, crop_target = full.load(0, window)
    assert crop_image.shape == (3, 50, 70)
    assert torch.equal(crop_image, image[:, 10:60, 20:90])
    expected = target["masks"].full()[:, 10:60, 20:90]
    expected = expected[expected.flatten(1).bool().any(1)]
    got = crop_target["masks"].full()
    assert got.shape == expected.shape
    assert {m.numpy().tobytes() for m in got} == {m.numpy().tobytes() for m in expected}
    boxes, nonempty = mask_boxes(got)
    assert nonempty.all() and torch.equal(crop_target["boxes"].as_subclass(torch.Tensor), boxes)
    assert torch.equal(crop_target["area"], got.flatten(1).sum(1).float())
    cropped = LabelledImages(samples[:1], [1], crop_window=RandomWindow(64))
    assert cropped[0][0].shape == (3, 64, 64)
    assert LabelledImages(samples[:1], [1], crop_window=RandomWindow(500))[0][0].shape == image.shape


def test_a_missing_folder_names_the_flag_that_named_it(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="training folder not found; pass --train_dir"):
        list_samples(tmp_path / "nowhere")
    with pytest.raises(DatasetError, match="nowhere: folder not found; pass --val_dir"):
        list_samples(tmp_path / "nowhere", "--val_dir")
