"""Reading images and their instance labels into torchvision detection samples.

Layout (the task's, served for any dataset in it): ``train/<sample>/image.tif`` +
``class1.tif``..``class4.tif`` (label images), ``test_release/*.tif`` and ``test_image_name_to_ids.json``. Every label TIFF is decoded
once per run, when the dataset is built, so that bad input fails before training starts;
the images are kept too (in their stored dtype), so later epochs only pay for the
augmentation and for rendering the target.
"""
from __future__ import annotations

import json
import random
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import tifffile
import torch
from PIL import Image
from scipy import ndimage
from torch.utils.data import Dataset

from argtypes import checked
from errors import DatasetError
from files import write_json
from masks import PackedMasks
from progress import progress

NUM_CLASSES = 4
CLASS_FILES = {c: f"class{c}.tif" for c in range(1, NUM_CLASSES + 1)}
# --num_classes: the background and at least one class, at most one per class file (a class of
# its own beyond them would never see a cell and would name no output)
num_classes_arg = checked(int, lambda v: 2 <= v <= NUM_CLASSES + 1,
                      f"2 to {NUM_CLASSES + 1} (the background and classes of class1..class{NUM_CLASSES}.tif)")
IMAGE_FILE = "image.tif"
ID_MAP_FILE = "test_image_name_to_ids.json"
TIFF_SUFFIXES = (".tif", ".tiff")
IMAGE_SUFFIXES = (*TIFF_SUFFIXES, ".png", ".jpg", ".jpeg")  # what a folder to predict may hold


def map_beside(path: str | Path) -> Path:
    """The id map beside a test folder or a submission file, where the task's layout keeps it:
    prediction looks there for a folder's map and writes the numbered one there, and
    ``check_stats.py`` checks it, so all three agree on one place."""
    return Path(path).parent / ID_MAP_FILE


@dataclass
class Instances:
    """The instances of one image, stored compactly: each mask only inside its box.

    Full-image masks of 800 cells at 1000x1000 would take 800 MB per image; the crops
    take a few hundred kilobytes and are pasted into full masks only when needed.
    """

    labels: np.ndarray  # int64 [N], 1..NUM_CLASSES
    boxes: np.ndarray  # int64 [N, 4], x1, y1, x2, y2 with exclusive max
    crops: list[np.ndarray]  # bool [y2 - y1, x2 - x1] per instance
    height: int
    width: int

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def areas(self) -> np.ndarray:
        return np.array([c.sum() for c in self.crops], dtype=np.float32)

    def in_window(self, y0: int, x0: int, y1: int, x1: int) -> "Instances":
        """The instances seen through a window, in window coordinates: cut masks get tight
        boxes, instances left with no pixel are dropped."""
        kept = []
        for label, (bx0, by0, bx1, by1), crop in zip(self.labels, self.boxes, self.crops):
            cx0, cy0, cx1, cy1 = max(bx0, x0), max(by0, y0), min(bx1, x1), min(by1, y1)
            if cx1 <= cx0 or cy1 <= cy0:
                continue
            part = crop[cy0 - by0:cy1 - by0, cx0 - bx0:cx1 - bx0]
            kept.append((label, *_tight(part, cx0 - x0, cy0 - y0)))
        return Instances.from_parts([k for k in kept if k[2] is not None], y1 - y0, x1 - x0)

    def flipped(self, horizontal: bool) -> "Instances":
        """Mirrored left-right (or top-bottom): crops become reversed views and boxes are
        mirrored, so a flip costs nothing however many full-image masks it stands for."""
        boxes = self.boxes.copy()
        if horizontal:
            boxes[:, [0, 2]] = self.width - self.boxes[:, [2, 0]]
            crops = [c[:, ::-1] for c in self.crops]
        else:
            boxes[:, [1, 3]] = self.height - self.boxes[:, [3, 1]]
            crops = [c[::-1] for c in self.crops]
        return Instances(self.labels, boxes, crops, self.height, self.width)

    def transposed(self) -> "Instances":
        """Rows and columns swapped (a 90 degree turn with a flip): crops become transposed
        views, boxes swap their axes, height and width trade places."""
        return Instances(self.labels, self.boxes[:, [1, 0, 3, 2]].copy(), [c.T for c in self.crops], self.width,
                         self.height)

    def erased(self, x0: int, y0: int, x1: int, y1: int, shape: np.ndarray | None = None) -> "Instances":
        """The region [x0, x1) x [y0, y1) wiped from every mask (only its ``shape`` pixels, a
        bool [y1 - y0, x1 - x0], when given: a cell pasted over them): touched instances are
        re-boxed tight (a box never outlives its mask), emptied ones dropped, the rest shared."""
        b = self.boxes
        touched = (b[:, 0] < x1) & (b[:, 2] > x0) & (b[:, 1] < y1) & (b[:, 3] > y0)
        if not touched.any():
            return self
        parts = []
        for i, (label, (bx0, by0, bx1, by1), crop) in enumerate(zip(self.labels, b, self.crops)):
            if touched[i]:
                crop = crop.copy()
                cy0, cy1, cx0, cx1 = max(y0, by0), min(y1, by1), max(x0, bx0), min(x1, bx1)
                region = (slice(cy0 - by0, cy1 - by0), slice(cx0 - bx0, cx1 - bx0))
                crop[region] = False if shape is None else crop[region] & ~shape[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
                parts.append((label, *_tight(crop, bx0, by0)))
            else:
                parts.append((label, (bx0, by0, bx1, by1), crop))
        return Instances.from_parts([p for p in parts if p[2] is not None], self.height, self.width)

    def with_cell(self, label: int, x0: int, y0: int, crop: np.ndarray) -> "Instances":
        """These instances and one more, ``crop`` (bool, tight) placed at (x0, y0), on top:
        the pixels it covers leave the instances below it."""
        height, width = crop.shape
        below = self.erased(x0, y0, x0 + width, y0 + height, crop)
        parts = [*zip(below.labels, below.boxes, below.crops), (label, (x0, y0, x0 + width, y0 + height), crop)]
        return Instances.from_parts(parts, self.height, self.width)

    @staticmethod
    def from_parts(parts: Sequence[tuple], height: int, width: int) -> "Instances":
        """Instances from (label, box, crop) triples."""
        return Instances(np.asarray([p[0] for p in parts], dtype=np.int64),
                         np.asarray([p[1] for p in parts], dtype=np.int64).reshape(-1, 4),
                         [p[2] for p in parts], height, width)

    def packed(self) -> PackedMasks:
        """The masks as the training target carries them."""
        return PackedMasks.from_crops(self.crops, self.boxes, (self.height, self.width))

    def masks(self) -> np.ndarray:
        """Full-image uint8 masks [N, H, W]."""
        return self.packed().full().numpy()


def read_image(path: Path) -> np.ndarray:
    """Decode any image (grey, RGB, RGBA, 8/16-bit, float) to float32 [H, W, 3] in [0, 1]."""
    return to_float_rgb(read_raw_image(path), path)


def read_raw_image(path: Path) -> np.ndarray:
    """The image's pixels as shown (``tiff_values``), [H, W, 1] (grey) or [H, W, 3]: the compact
    form the training set keeps in memory (alpha carries no stain information)."""
    pixels = raw_pixels(_read_pixels(path), path)
    note_dim_pixels(pixels, path)
    return pixels


_DIM_NOTED: set[str] = set()  # the dtypes already noted in this process: one line, not one per image


def note_dim_pixels(pixels: np.ndarray, path: Path) -> None:
    """Say once per dtype and process when a whole image of more than 8 bits uses under 1/16 of
    the range it is scaled by (``full_range``): a 12-bit camera's pixels in uint16, or float
    pixels a little over 1 (divided by 255). Such images reach the model nearly black, with no
    other sign. A loader's workers say it too (prediction reads every image in one), so a
    run may print it once per worker."""
    if not pixels.size or pixels.dtype.itemsize == 1 or pixels.dtype.name in _DIM_NOTED:
        return  # 8-bit (or said already): no pass over the pixels for their peak
    if np.issubdtype(pixels.dtype, np.floating):
        note_dim_range(pixels.dtype, float_peak(pixels) or 0.0, path)
    elif np.issubdtype(pixels.dtype, np.integer):
        note_dim_range(pixels.dtype, int(pixels.max()), path)


def note_dim_range(dtype: np.dtype, peak: float, path: Path) -> None:
    """``note_dim_pixels`` once the image's peak is known (a streamed float image's, found in
    bands; a streamed integer image is not scanned for it)."""
    top = full_range(dtype, peak)
    if peak < top / 16 and np.dtype(dtype).name not in _DIM_NOTED and np.dtype(dtype).itemsize > 1:
        _DIM_NOTED.add(np.dtype(dtype).name)
        print(f"note: {path}: {dtype} pixels peak at {peak:g} of the {top:g} they are scaled by, so they reach "
              f"at most {peak / top:.3f} and look dark to the model (said once); rescale such images to "
              "0..1 (float) or their type's full range (or save them 8-bit) for training and prediction alike")


def full_range(dtype: np.dtype, peak: float | None = None) -> float:
    """The value pixels of this dtype are divided by to reach [0, 1]: an integer type's maximum,
    else (float) 1, 255 or 65535, whichever first holds the image's ``peak``, else the peak."""
    if np.issubdtype(dtype, np.integer):
        return float(np.iinfo(dtype).max)
    peak = peak or 0.0
    return 1.0 if peak <= 1.0 else 255.0 if peak <= 255.0 else 65535.0 if peak <= 65535.0 else peak


def raw_pixels(array: np.ndarray, path: Path) -> np.ndarray:
    """Decoded pixels (2-D, channels last or, as some TIFFs store them, first) as
    ``read_raw_image`` returns them; also serves one window of an image read lazily."""
    planes = channels_first(array.shape)
    array = _to_hwc(array, path)
    if planes and array.shape[2] == 2 and array[:, :, 1].min() != array[:, :, 1].max():
        raise DatasetError(f"{path}: 2 channels stored as planes (a 2-channel stack, e.g. ImageJ's CYX), not grey + "
                           "alpha; the model reads colour (RGB) or grey images: save the channel to segment, or an "
                           "RGB composite, as the image.")
    if array.shape[2] == 2:  # grey + alpha
        array = array[:, :, :1]
    elif array.shape[2] > 3:
        array = array[:, :, :3]
    return np.ascontiguousarray(array)


def float_peak(array: np.ndarray) -> float | None:
    """The brightest finite value of float pixels, which decides their scale (``to_float_rgb``);
    None for integer pixels, scaled by their dtype's range."""
    if not np.issubdtype(array.dtype, np.floating):
        return None
    finite = array[np.isfinite(array)]
    return float(finite.max()) if finite.size else 0.0


def to_float_rgb(array: np.ndarray, path: Path, peak: float | None = None) -> np.ndarray:
    """Raw pixels to float32 [H, W, 3] in [0, 1], scaled by dtype; grey repeated to RGB. Float
    pixels are scaled by their ``peak`` (default: this array's), which a window of a larger
    image takes from the whole image so that every window is scaled alike."""
    array = _scale_by_dtype(array, path, peak)
    return np.repeat(array, 3, axis=2) if array.shape[2] == 1 else array


def read_label_image(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """Decode a label image (any integer or integer-valued float dtype) to int64 [H, W]: its stored
    values, which are ids even where a colour table (palette) shows them in colour."""
    label = _read_pixels(path, shown=False)
    if label.ndim == 3 and 1 in (label.shape[0], label.shape[-1]):
        label = np.squeeze(label)
    if label.ndim != 2:
        raise DatasetError(f"{path}: a label image must be 2-D (H, W), got shape {label.shape}.")
    if label.shape != tuple(shape):
        raise DatasetError(
            f"{path}: label image is {label.shape[0]}x{label.shape[1]} but its image.tif is "
            f"{shape[0]}x{shape[1]}; re-export the class file at the size of its image."
        )
    if np.issubdtype(label.dtype, np.floating):
        if not np.isfinite(label).all() or not np.array_equal(label, np.round(label)):
            raise DatasetError(
                f"{path}: label image has non-integer values; it must hold 0 for background "
                "and one integer id per instance (was it resized with interpolation?)."
            )
    elif not np.issubdtype(label.dtype, np.integer) and label.dtype != bool:
        raise DatasetError(f"{path}: unsupported label dtype {label.dtype}; save it as integers (or integer-valued floats).")
    lowest = label.min() if label.size else 0
    if lowest < 0:
        raise DatasetError(f"{path}: label image has negative values; use 0 for background and ids above 0.")
    if lowest > 0:
        raise DatasetError(f"{path}: label image has no 0 (background) pixel, so its background would train as one "
                           "cell; use 0 for background and ids above 0.")
    _refuse_binary_mask(label, path)
    return label.astype(np.int64, copy=False)


# One value in this many separate regions, each at least BINARY_MASK_SHARE of the largest, is a
# mask of all the cells, not one cell's id (which may carry specks: an annotation tool's slips).
BINARY_MASK_PIECES = 3
BINARY_MASK_SHARE = 0.1


def _refuse_binary_mask(label: np.ndarray, path: Path) -> None:
    """A class file holding one value (0/1, 0/255, bool: a semantic mask) would train every cell
    of the class as a single instance, whose box covers them all."""
    inside = label != 0
    cells = label[inside]
    if not cells.size or cells.min() != cells.max():
        return
    regions, _ = ndimage.label(inside)
    sizes = np.bincount(regions.ravel())[1:]
    pieces = int((sizes >= BINARY_MASK_SHARE * sizes.max()).sum())
    if pieces >= BINARY_MASK_PIECES:
        raise DatasetError(f"{path}: one value ({cells.max()}) marks {pieces} separate regions: a mask of all the "
                           "cells, not one id per cell; give each cell its own id (e.g. skimage.measure.label) "
                           "and save it again.")


# A file named like a class's label image: one that is not exactly a CLASS_FILES name is refused,
# not read as "no cells of that class" (its cells would train as background).
LABEL_LIKE = re.compile(r"^class[ _-]?\d+\.(tiff?|png)$", re.IGNORECASE)


def decode_instances(sample_dir: Path, shape: tuple[int, int]) -> Instances:
    """All instances of one sample, across its class files (missing class files are fine; a
    label image under another name is refused, ``LABEL_LIKE``)."""
    read = [sample_dir / name for name in CLASS_FILES.values() if (sample_dir / name).exists()]
    for path in sample_dir.iterdir():
        if LABEL_LIKE.match(path.name) and not any(path.samefile(r) for r in read):  # macOS: Class1.tif is class1.tif
            raise DatasetError(f"{path}: not read: label images are named {CLASS_FILES[1]} ... "
                               f"{CLASS_FILES[NUM_CLASSES]}, one per class; rename it (or move it out of the folder).")
    labels, boxes, crops = [], [], []
    for class_id, name in CLASS_FILES.items():
        path = sample_dir / name
        if not path.exists():
            continue
        for box, crop in _instances_of(read_label_image(path, shape)):
            labels.append(class_id)
            boxes.append(box)
            crops.append(crop)
    return Instances(
        labels=np.asarray(labels, dtype=np.int64),
        boxes=np.asarray(boxes, dtype=np.int64).reshape(-1, 4),
        crops=crops,
        height=shape[0],
        width=shape[1],
    )


def sample_folders(folder: Path) -> list[Path]:
    """The sub-folders of ``folder`` sorted by name: the samples of the training layout in the
    one order that training, scoring and prediction all number them in, never the file system's.
    Hidden folders are none (``.<sample>.tmp``: a label folder a crashed prediction left)."""
    return sorted(p for p in Path(folder).iterdir() if p.is_dir() and not p.name.startswith("."))


def list_samples(train_dir: Path, flag: str = "--train_dir") -> list[Path]:
    """Sample folders sorted by name (``sample_folders``), each checked to hold its image;
    ``flag``: the option that named the folder, which a missing one's message asks to fix."""
    train_dir = Path(train_dir)
    if not train_dir.is_dir():
        if flag != "--train_dir":
            raise DatasetError(f"{train_dir}: folder not found; pass {flag} <a folder of <sample>/image.tif>.")
        raise DatasetError(f"{train_dir}: training folder not found; pass --train_dir <dataset>/train.")
    samples = sample_folders(train_dir)
    if not samples:
        raise DatasetError(f"{train_dir}: no sample folders; expected {train_dir}/<sample>/image.tif.")
    for sample in samples:
        if not (sample / IMAGE_FILE).exists():
            raise DatasetError(f"{sample}: missing {IMAGE_FILE}; add it or move the folder out of the training set.")
    return samples


def split_samples(names: Sequence[str], val_split: float, seed: int,
                  groups: dict[str, str] | None = None) -> tuple[list[str], list[str]]:
    """Seeded train/val split of sample names; the order of ``names`` does not matter.

    With ``groups`` (sample name -> group, e.g. the slide a patch was cut from) whole groups
    are held out, about ``val_split`` of the groups, so no held-out sample shares pixels or
    a source with a training one; a name missing from ``groups`` is its own group."""
    names = sorted(names)
    if not 0.0 <= val_split < 1.0:
        raise ValueError(f"--val_split must be in [0, 1), got {val_split}.")
    group_of = {n: (groups or {}).get(n, n) for n in names}
    shuffled = sorted(set(group_of.values()))
    random.Random(seed).shuffle(shuffled)
    n_val = int(round(len(shuffled) * val_split))
    if val_split > 0 and len(shuffled) > 1:
        n_val = min(max(n_val, 1), len(shuffled) - 1)
    val = set(shuffled[:n_val])
    return [n for n in names if group_of[n] not in val], [n for n in names if group_of[n] in val]


def sample_groups(spec: str, names: Sequence[str]) -> dict[str, str]:
    """Sample name -> group for ``--split_groups``: ``spec`` is a JSON manifest (a list of
    ``{name, source_image}``, or an object holding one under ``samples``) or a regular
    expression whose first group, else whole match, names a sample's group."""
    path = Path(spec)
    if path.suffix == ".json" or path.is_file():
        try:
            payload = json.loads(path.read_text())
            entries = payload["samples"] if isinstance(payload, dict) else payload
            groups = {str(e["name"]): str(e["source_image"]) for e in entries}
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise DatasetError(f"{spec}: not a manifest of {{name, source_image}} entries ({type(err).__name__}: "
                               f"{err}); pass such a JSON file or a regular expression.") from err
        missing = [n for n in names if n not in groups]
        if missing:
            raise DatasetError(f"{spec}: {len(missing)} sample(s) missing, e.g. {missing[:3]}; list every sample "
                               "of --train_dir in the manifest.")
        return groups
    try:
        pattern = re.compile(spec)
    except re.error as err:
        raise DatasetError(f"--split_groups {spec!r}: neither a manifest file nor a valid regular expression "
                           f"({err}); pass e.g. '^(.*)_[0-9]+$' to group 'slide1_003' under 'slide1'.") from err
    groups = {}
    for name in names:
        match = pattern.search(name)
        if match is None:
            raise DatasetError(f"--split_groups {spec!r}: sample {name!r} does not match; use a pattern every "
                               "sample name matches.")
        groups[name] = match.group(1) if pattern.groups and match.group(1) is not None else match.group(0)
    return groups


class LabelledImages(Dataset):
    """Training/validation samples with labels (and, by default, images) decoded once, at
    construction.

    ``transforms`` act on ``(image [3, H, W], Instances)`` before any full-image mask exists
    (``augment.build_train_transforms``); the target dict is rendered after them, so flips
    and CutOut cost the same for 10 cells or 800. ``image_ids`` are stable across runs (the
    sample's position in the sorted sample list, plus one), so validation ground truth and
    predictions always refer to the same ids.
    """

    def __init__(
        self,
        sample_dirs: Sequence[Path],
        image_ids: Sequence[int],
        transforms: Callable[[torch.Tensor, Instances], tuple[torch.Tensor, Instances]] | None = None,
        decode_workers: int = 2,
        desc: str = "decode labels",
        crop_window: Callable[[int, int], tuple[int, int, int, int]] | None = None,
        cache_images: bool = True,
    ) -> None:
        self.sample_dirs = [Path(p) for p in sample_dirs]
        self.image_ids = list(image_ids)
        self.transforms = transforms
        self.crop_window = crop_window
        decode = partial(_decode_sample, keep_image=cache_images)
        with ThreadPoolExecutor(max(1, decode_workers)) as pool:
            jobs = pool.map(decode, self.sample_dirs)
            decoded = list(progress(jobs, desc, total=len(self.sample_dirs)))
        self.images: list[np.ndarray | None] = [image for image, _, _ in decoded]
        self.instances: list[Instances] = [inst for _, inst, _ in decoded]
        # a float image's brightest value: its crops are scaled as the whole image is, at prediction too
        self.peaks: list[float | None] = [peak for _, _, peak in decoded]
        self.empty = [p.name for p, inst in zip(self.sample_dirs, self.instances) if len(inst) == 0]

    def __len__(self) -> int:
        return len(self.sample_dirs)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, dict]:
        """Sample ``key``, or ``(index, seed)``: its window and augmentation drawn from torch's
        generator seeded with ``seed`` (``sampling.SeededDraws``), the caller's left as it was."""
        if isinstance(key, tuple):
            index, seed = key
            with torch.random.fork_rng(devices=[]):  # the CPU generator only: augmentation's
                torch.default_generator.manual_seed(seed)
                return self[index]
        index = key
        inst = self.instances[index]
        window = self.crop_window(inst.height, inst.width) if self.crop_window else None
        image, inst = self.raw(index, window)
        if self.transforms is not None:
            image, inst = self.transforms(image, inst)
        return image, render_target(inst, self.image_ids[index])

    def donor(self) -> tuple[torch.Tensor, Instances]:
        """A random sample's training window (``crop_window``) with its instances: what
        ``augment.CopyPaste`` pastes cells from."""
        index = int(torch.randint(0, len(self), ()))
        inst = self.instances[index]
        return self.raw(index, self.crop_window(inst.height, inst.width) if self.crop_window else None)

    def name_of(self, image_id: int) -> str:
        """The sample folder behind an image id, for error messages."""
        return self.sample_dirs[self.image_ids.index(image_id)].name

    def load(self, index: int, window: tuple[int, int, int, int] | None = None) -> tuple[torch.Tensor, dict]:
        """The sample as the model takes it, before any augmentation."""
        image, inst = self.raw(index, window)
        return image, render_target(inst, self.image_ids[index])

    def raw(self, index: int, window: tuple[int, int, int, int] | None = None) -> tuple[torch.Tensor, Instances]:
        """The image [3, H, W] and its compact instances; with a window (y0, x0, y1, x1) only
        that part, so a dense 2000 px image costs what the window does."""
        inst = self.instances[index]
        image = self.images[index]
        if image is None:
            image = read_raw_image(self.sample_dirs[index] / IMAGE_FILE)
        if window is not None:
            inst = inst.in_window(*window)
            image = image[window[0]:window[2], window[1]:window[3]]
        image = to_float_rgb(image, self.sample_dirs[index] / IMAGE_FILE, self.peaks[index])
        return torch.from_numpy(image).permute(2, 0, 1).contiguous(), inst


def render_target(inst: Instances, image_id: int) -> dict:
    """torchvision's target dict from compact instances; ``masks`` stay packed per box
    (``masks.PackedMasks``, ``.full()`` for the [N, H, W] tensor), which is all the model reads."""
    return {
        "boxes": torch.from_numpy(inst.boxes).float(),
        "masks": inst.packed(),
        "labels": torch.from_numpy(inst.labels),
        "area": torch.from_numpy(inst.areas),
        "iscrowd": torch.zeros(len(inst), dtype=torch.int64),
        "image_id": image_id,
    }


class UnlabelledImages(Dataset):
    """The images of a folder with their ids: from an id map (``test_image_name_to_ids.json``),
    or without one the folder's images numbered 1..N (``number_images``)."""

    def __init__(self, test_dir: Path, id_map_json: Path | None) -> None:
        self.test_dir = Path(test_dir)
        self.entries = read_id_map(id_map_json, self.test_dir) if id_map_json else number_images(self.test_dir)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        entry = self.entries[index]
        path = self.test_dir / entry["file_name"]
        image = torch.from_numpy(read_image(path)).permute(2, 0, 1).contiguous()
        return image, {"image_id": int(entry["id"]), "file_name": entry["file_name"]}


def find_id_map(test_dir: Path, id_map_json: str | Path | None) -> Path | None:
    """The id map to use: the one given, else ``test_image_name_to_ids.json`` beside the test
    folder (the task's layout) where it names any of that folder's images, else None (the
    images get numbered): a folder of one's own beside the task's test folder is not mapped
    by the task's map. A map beside the folder that names some of its images but not exactly
    them is refused by ``read_id_map`` (which names the differences), never silently replaced
    by numbering: the submission's ids would all be wrong."""
    if id_map_json:
        return Path(id_map_json)
    beside = map_beside(test_dir)
    if not beside.is_file() or not Path(test_dir).is_dir():
        return None
    fix = f"it was found beside {test_dir} and is used by default: mend it or move it away"
    named = {e["file_name"] for e in read_id_entries(beside, fix)}
    if not named & set(folder_images(Path(test_dir))):
        return None
    try:
        read_id_map(beside, Path(test_dir))  # the same images, or a one-line error naming the differences
    except DatasetError as err:
        raise DatasetError(f"{str(err).rstrip('.')} ({beside} was found beside the folder and is used by default: "
                           "pass --id_map_json with this folder's map, or move the map or the folder away to "
                           "number the images 1..N).") from err
    return beside


def folder_images(folder: Path) -> list[str]:
    """The images of a folder to predict, as names relative to it: its image files (TIFF, PNG,
    JPEG; hidden ones are none) sorted by file name, or, where it holds none, each
    ``<sample>/image.tif`` (the training layout) in ``sample_folders``' order, so a labelled
    held-out folder predicts as it is and scores with ``evaluate.py``, whose default ids number its samples in that order; a
    folder without an image is skipped, not an error as in training."""
    files = sorted(p.name for p in folder.iterdir()  # hidden files (macOS's ._x.tif) are not images
                   if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".") and p.is_file())
    if files:
        return files
    return [f"{p.name}/{IMAGE_FILE}" for p in sample_folders(folder) if (p / IMAGE_FILE).is_file()]


def sample_name(file_name: str) -> str:
    """The sample an image is: ``X`` for ``X.tif`` and for ``X/image.tif`` (the training
    layout). Outputs are named by it, and scoring matches ids to a labelled folder's samples by it."""
    path = Path(file_name)
    return path.parent.name if path.name == IMAGE_FILE and path.parent.name else path.stem


def number_images(folder: Path) -> list[dict]:
    """An id map for a folder without one: its images (``folder_images``), ids 1..N, with
    their sizes."""
    if not folder.is_dir():
        raise DatasetError(f"{folder}: folder not found; pass the folder of your images as --test_dir.")
    files = folder_images(folder)
    if not files:
        raise DatasetError(f"{folder}: no image ({', '.join(IMAGE_SUFFIXES)}) in this folder, nor a <sample>/"
                           f"{IMAGE_FILE}; pass the folder of your images as --test_dir.")
    return [{"file_name": name, "id": i, **dict(zip(("height", "width"), image_size(folder / name)))}
            for i, name in enumerate(files, start=1)]


def read_id_map(id_map_json: Path, test_dir: Path) -> list[dict]:
    """The id map, checked against the test folder in both directions."""
    id_map_json, test_dir = Path(id_map_json), Path(test_dir)
    if not test_dir.is_dir():
        raise DatasetError(f"{test_dir}: test folder not found; pass --test_dir <dataset>/test_release.")
    entries = read_id_entries(id_map_json, "pass --id_map_json <dataset>/test_image_name_to_ids.json")
    named = {e["file_name"] for e in entries}
    files = set(folder_images(test_dir))
    without_id = sorted(files - named)
    without_file = sorted(named - files)
    if without_id:
        raise DatasetError(f"{test_dir}: {len(without_id)} test file(s) have no id in {id_map_json.name}: "
                           f"{few(without_id)}; pass the id map of this test folder.")
    if without_file:
        raise DatasetError(f"{id_map_json}: {len(without_file)} id(s) name files missing from {test_dir}: "
                           f"{few(without_file)}; pass the test folder of this id map.")
    return sorted(entries, key=lambda e: e["id"])


def read_json(path: Path, fix: str) -> Any:
    """A JSON file the user named; one that is missing, unreadable (a folder, no permission) or
    not JSON (or not text: a TIFF passed by mistake) stops with the one-line error and ``fix``."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError as err:
        raise DatasetError(f"{path}: file not found; {fix}.") from err
    except OSError as err:
        raise DatasetError(f"{path}: cannot be read ({err.strerror or type(err).__name__}); {fix}.") from err
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"{path}: not valid JSON ({err}); {fix}.") from err


def read_id_entries(path: Path, fix: str) -> list[dict]:
    """An id map's entries with whole-number ids: the one check of its shape (a list of
    ``{file_name, id}`` objects) for inference.py and evaluate.py, each giving its own ``fix``."""
    entries = read_json(path, fix)
    if not isinstance(entries, list) or not all(isinstance(e, dict) and isinstance(e.get("file_name"), str)
                                                and "id" in e for e in entries):
        raise DatasetError(f"{path}: not a list of {{file_name, id}} objects; {fix}.")
    entries = [{**e, "id": whole_id(e, path)} for e in entries]
    for key in ("file_name", "id"):  # two images under one id would merge in the submission
        counts = Counter(e[key] for e in entries)
        twice = sorted(str(v) for v, n in counts.items() if n > 1)
        if twice:
            raise DatasetError(f"{path}: {len(twice)} {key}(s) listed more than once: {few(twice)}; give each image "
                               "one entry and its own id.")
    return entries


def is_whole(value: object) -> bool:
    """A JSON whole number (an int, never a bool): an image id, a category, a size."""
    return isinstance(value, int) and not isinstance(value, bool)


def whole_valued(value: object) -> bool:
    """A number naming a whole one: ``1`` or ``1.0``, as tools that write tables give ids and
    counts (never a bool)."""
    return is_whole(value) or (isinstance(value, float) and value.is_integer())


def whole_id(entry: dict, id_map_json: Path) -> int:
    """An id map entry's id as the int the submission writes, in inference.py and evaluate.py
    alike: tools that write maps from a table give ``1.0`` or ``"1"``, which name the same
    image; anything else (``1.5``, ``"a"``) cannot be an image id."""
    value = entry["id"]
    if isinstance(value, str) and value.strip().lstrip("+").isdigit():
        return int(value)
    if whole_valued(value):
        return int(value)
    raise DatasetError(f"{id_map_json}: the id of {entry['file_name']!r} is {value!r}, not a whole number; "
                       "give every image an integer id.")


def collate_fn(batch: list) -> tuple:
    """Detection batches are lists: images differ in size and instance count."""
    return tuple(zip(*batch))


def write_split(path: Path, train: list[str], val: list[str], seed: int, val_split: float,
                **where: str | None) -> None:
    """split.json: the held-out sample names and how they were chosen (``where``: the
    ``split_groups`` spec, or the ``val_dir`` they come from)."""
    payload = {"seed": seed, "val_split": val_split, "train": train, "val": val,
               **{k: v for k, v in where.items() if v}}
    write_json(Path(path), payload, indent=1)  # atomic: a crash never leaves half a split


def _decode_sample(sample_dir: Path, keep_image: bool) -> tuple[np.ndarray | None, Instances, float | None]:
    """The image (when kept), its instances and, for float pixels, the peak that scales them."""
    image = read_raw_image(sample_dir / IMAGE_FILE)
    return (image if keep_image else None), decode_instances(sample_dir, image.shape[:2]), float_peak(image)


def _tight(crop: np.ndarray, x0: int, y0: int) -> tuple[tuple[int, int, int, int] | None, np.ndarray | None]:
    """A crop trimmed to its pixels and its box (exclusive max) with the crop placed at
    (x0, y0); (None, None) when no pixel is left."""
    rows, cols = np.flatnonzero(crop.any(axis=1)), np.flatnonzero(crop.any(axis=0))
    if len(rows) == 0:
        return None, None
    box = (x0 + int(cols[0]), y0 + int(rows[0]), x0 + int(cols[-1]) + 1, y0 + int(rows[-1]) + 1)
    return box, crop[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def _instances_of(label: np.ndarray):
    """(box, crop) per instance id; ids need not be contiguous, 0 is background."""
    ids, inverse = np.unique(label, return_inverse=True)
    inverse = inverse.reshape(label.shape).astype(np.int32)
    if ids[0] != 0:
        inverse += 1
    for k, sl in enumerate(ndimage.find_objects(inverse), start=1):
        if sl is None:
            continue
        crop = inverse[sl] == k
        yield (sl[1].start, sl[0].start, sl[1].stop, sl[0].stop), crop


def _read_pixels(path: Path, shown: bool = True) -> np.ndarray:
    """The pixels of a TIFF (tifffile; converted by ``tiff_values`` where ``shown``, stored values
    for a label image) or a PNG/JPEG (Pillow, which matplotlib needs anyway)."""
    if not path.exists():
        raise DatasetError(f"{path}: file not found; check the dataset folder.")
    tiff = path.suffix.lower() in TIFF_SUFFIXES
    try:
        if tiff:
            with tifffile.TiffFile(path) as stored:
                as_pixels = tiff_values(stored, path) if shown else as_stored
                return as_pixels(stored.asarray())
        with Image.open(path) as image:
            if _sixteen_bit_colour(image):  # Pillow would cut these to 8 bits (a 12-bit camera's: near black)
                import imagecodecs  # here: a missing install fails on such a PNG, with the hint, not every script

                return imagecodecs.png_decode(path.read_bytes())
            if shown and image.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV"):  # palette or other spaces: as RGB(A)
                image = image.convert("RGBA" if "A" in image.mode or "transparency" in image.info else "RGB")
            return np.asarray(image)
    except Image.DecompressionBombError as err:
        raise _too_many_pixels(path, err) from err
    except DatasetError:
        raise
    except Exception as err:  # tifffile and Pillow raise many types for corrupt files
        raise undecodable(path, err, tiff) from err


def _sixteen_bit_colour(image: Image.Image) -> bool:
    """Whether a PNG holds 16-bit colour or grey+alpha, which Pillow decodes to 8 bits (keeping
    the high byte) while it keeps 16-bit grey: imagecodecs decodes all of them as stored."""
    return image.format == "PNG" and image.mode != "I;16" and bool(image.tile) \
        and str(image.tile[0][3]).endswith(";16B")


def as_stored(values: np.ndarray) -> np.ndarray:
    """Pixels whose stored values are what a viewer shows (``tiff_values``'s usual answer)."""
    return values


def undecodable(path: Path, err: Exception, tiff: bool = True) -> DatasetError:
    """The one-line error for an image file its reader cannot decode."""
    hint = " Install imagecodecs (pip install imagecodecs) to read compressed TIFFs." if "imagecodecs" in str(err) else ""
    return DatasetError(f"{path}: cannot decode {'TIFF' if tiff else 'image'} ({type(err).__name__}: {err}); the file "
                        f"may be truncated or of another format. Re-export it or remove it.{hint}")


def tiff_pixels(path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """``tiff_values`` of a TIFF file, from its header."""
    try:
        with tifffile.TiffFile(path) as stored:
            return tiff_values(stored, path)
    except DatasetError:
        raise
    except Exception as err:  # tifffile raises many types for corrupt files
        raise undecodable(path, err) from err


# Series axes a 2-D image may have: rows, columns, samples, channels, and tifffile's names for
# pages of unknown meaning (I, Q: kept, as planes of colour, as before). Any other axis of more
# than one plane (Z, T, spectral L, mosaic M, ...) is a stack.
IMAGE_AXES = "YXSCIQ"
JPEG_COMPRESSIONS = {6, 7, 33007, 34892}  # a YCbCr TIFF of these is decoded to RGB by tifffile
NOT_RGB = {8: "CIELab", 9: "ICCLab", 10: "ITULab", 32844: "LogL", 32845: "LogLuv"}


def tiff_values(stored: tifffile.TiffFile, path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """How an image TIFF's stored values become the pixels a viewer shows, for the whole image or
    any window of it (``streaming.LazyImage``): tifffile returns what is stored, so a palette
    image came back as its colour indices, a MinIsWhite one inverted, a CMYK one as four inks and
    a 4-bit one nearly black, each read without a word as a wrong picture. Those are converted
    (channels last); a stack of planes that are not colours, and colour spaces with no
    conversion here, are refused. Label images keep their stored values (``read_label_image``)."""
    series = stored.series[0]
    page = series.keyframe
    stack = {axis: n for axis, n in zip(series.axes, series.shape) if axis not in IMAGE_AXES and n > 1}
    if stack:
        raise DatasetError(f"{path}: a stack of {' x '.join(f'{n} {axis}' for axis, n in stack.items())} planes "
                           f"(axes {series.axes}); the model reads one 2-D colour or grey image: save one plane, or "
                           "a projection, as the image.")
    photometric, dtype, bits = int(page.photometric), page.dtype, int(page.bitspersample)
    if photometric in NOT_RGB or (photometric == tifffile.PHOTOMETRIC.YCBCR
                                  and int(page.compression) not in JPEG_COMPRESSIONS):
        name = NOT_RGB.get(photometric, "uncompressed YCbCr")
        raise DatasetError(f"{path}: a {name} TIFF, which is not converted here; save it as RGB.")
    planar = page.samplesperpixel > 1 and int(page.planarconfig) == tifffile.PLANARCONFIG.SEPARATE
    if photometric == tifffile.PHOTOMETRIC.PALETTE and not (stored.is_imagej and _display_ramp(page.colormap)):
        return _palette_values(page, path)
    if photometric == tifffile.PHOTOMETRIC.SEPARATED:
        return _cmyk_values(page, path, planar)
    if dtype == np.bool_:
        return np.logical_not if photometric == tifffile.PHOTOMETRIC.MINISWHITE else as_stored
    white = (1 << bits) - 1
    gain = 255 // white if np.issubdtype(dtype, np.unsignedinteger) and bits < 8 else 1  # 2- or 4-bit: to 0..255
    if photometric == tifffile.PHOTOMETRIC.MINISWHITE:
        if not np.issubdtype(dtype, np.unsignedinteger):
            raise DatasetError(f"{path}: a {dtype} MinIsWhite TIFF (0 = white); save it with 0 = black "
                               "(MinIsBlack), or as RGB.")
        return lambda values: ((white - values.clip(0, white)) * gain).astype(values.dtype)
    return (lambda values: values * np.uint8(gain)) if gain > 1 else as_stored


def _display_ramp(colours: Any) -> bool:
    """Whether a colour map only ramps up (ImageJ's Grays, Green, Red... display LUTs of a grey
    image, whose indices are the intensities), unlike the table of an indexed-colour image (ImageJ's
    "8-bit Color"), whose indices mean nothing without it."""
    return colours is not None and np.ndim(colours) == 2 and bool((np.diff(np.asarray(colours, np.int64)) >= 0).all())


def _palette_values(page: Any, path: Path) -> Callable[[np.ndarray], np.ndarray]:
    """Colour indices to RGB through the TIFF's colour map, 8-bit where the map holds 8-bit
    colours (stored x 257 by most writers, x 256 by Pillow, or plain 0..255), else 16-bit."""
    colours = page.colormap
    if colours is None or np.ndim(colours) != 2 or len(colours) != 3:
        raise DatasetError(f"{path}: a palette TIFF without a readable colour map; save it as RGB.")
    colours = np.asarray(colours)
    if colours.max() <= 255:
        colours = colours.astype(np.uint8)
    elif not (colours % 257).any() or not (colours % 256).any():
        colours = (colours >> 8).astype(np.uint8)
    table = np.ascontiguousarray(colours.T)  # [entries, 3]

    def shown(indices: np.ndarray) -> np.ndarray:
        if indices.ndim == 3:  # an index and an alpha sample: the colour only
            indices = indices[..., 0]
        return table[np.minimum(indices, len(table) - 1)]
    return shown


def _cmyk_values(page: Any, path: Path, planar: bool) -> Callable[[np.ndarray], np.ndarray]:
    """Four CMYK inks (chunky, or planar: channels first) to RGB, channels last."""
    dtype, inkset = page.dtype, page.tags.valueof(332, 1)  # InkSet: 1 = CMYK
    if page.samplesperpixel != 4 or inkset != 1 or not np.issubdtype(dtype, np.unsignedinteger):
        raise DatasetError(f"{path}: a separated (ink) TIFF of {page.samplesperpixel} {dtype} inks that is not "
                           "plain CMYK; save it as RGB.")
    full = float((1 << int(page.bitspersample)) - 1)

    def shown(inks: np.ndarray) -> np.ndarray:
        inks = (np.moveaxis(inks, 0, -1) if planar else inks).astype(np.float32) / full
        return np.rint((1 - inks[..., :3]) * (1 - inks[..., 3:4]) * full).astype(dtype)
    return shown


def _too_many_pixels(path: Path, err: Exception) -> DatasetError:
    """Pillow's guard against decompression bombs stops a PNG or JPEG of a whole slide; the fix
    is a TIFF, which prediction reads window by window (the guard stays as Pillow sets it)."""
    return DatasetError(f"{path}: more pixels than Pillow opens in a PNG or JPEG ({err}); save it as a TIFF "
                        "(tiled, for a whole slide), which is read window by window.")


def image_size(path: Path) -> tuple[int, int]:
    """(height, width) of an image file, from its header (no pixel is decoded). A TIFF the model
    cannot read (a Z or T stack, a colour space not converted) is refused here, from its header,
    so prediction stops on it before any image is predicted, not when its turn comes."""
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            with tifffile.TiffFile(path) as tiff:
                tiff_values(tiff, path)
                shape = tiff.series[0].shape
                return (shape[-2], shape[-1]) if channels_first(shape) else (shape[0], shape[1])
        with Image.open(path) as image:
            return image.height, image.width
    except Image.DecompressionBombError as err:
        raise _too_many_pixels(path, err) from err
    except DatasetError:
        raise
    except Exception as err:
        raise DatasetError(f"{path}: cannot read the image header ({type(err).__name__}: {err}); re-export it "
                           "or remove it.") from err


def channels_first(shape: Sequence[int]) -> bool:
    """Whether pixels of this shape are stored (C, H, W), as some TIFFs are, not (H, W, C)."""
    return len(shape) == 3 and shape[2] > 4 and shape[0] <= 4


def _to_hwc(array: np.ndarray, path: Path) -> np.ndarray:
    if array.ndim == 2:
        return array[:, :, None]
    if array.ndim == 3:
        if channels_first(array.shape):
            return np.moveaxis(array, 0, 2)
        if array.shape[2] <= 4:
            return array
    raise DatasetError(f"{path}: expected a grey, RGB or RGBA image, got shape {array.shape}; re-export it.")


def _scale_by_dtype(array: np.ndarray, path: Path, peak: float | None = None) -> np.ndarray:
    if array.dtype == bool:
        return array.astype(np.float32)
    if np.issubdtype(array.dtype, np.integer):
        return (array.astype(np.float32) / full_range(array.dtype)).clip(0, 1)
    if np.issubdtype(array.dtype, np.floating):
        if peak is None:
            peak = float_peak(array)
        array = np.nan_to_num(array.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)  # no value: dark
        return (array / full_range(array.dtype, peak)).clip(0, 1)
    raise DatasetError(f"{path}: unsupported image dtype {array.dtype}; save it as 8/16-bit or float.")


def few(names: Sequence[Any], k: int = 5) -> str:
    """The first ``k`` of a list for a one-line message, and how many more."""
    return ", ".join(map(str, names[:k])) + (f" and {len(names) - k} more" if len(names) > k else "")
