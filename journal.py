"""A crash-safe record of the images a prediction run has finished, so that running the same
command again after a crash, a Ctrl-C or a lost machine continues where it stopped instead of
predicting every image again (hours for a folder of whole slides on a CPU).

The record is ``<submission>.partial``, JSON Lines beside the submission, appended and flushed
as the run goes: a header per run, the results of each image (a streamed image: one line per
window, never all of a slide's cells in memory), and a line marking the image finished. A line
cut off by the crash is skipped. The record is used only by a run with the same checkpoints
(path, size, time) and settings (``run_key``; how the run computes, its batch size, AMP or
device, may differ: those are the out-of-memory fixes); any other run starts over. Each image
``inference.py`` finishes is recorded with its stamp (name, size, time): an image replaced under
its name (the fix for a bad one) is predicted again alone, not the whole folder. (Without an id
map the images are numbered by name, so adding or removing a file renumbers, and predicts
again, the images after it.) It is deleted
once the submission is complete. ``visualization.py`` keeps its record of drawn images
(``.drawing.partial`` beside the PNGs), and ``benchmarks/accuracy.py`` its held-out predictions
(``held-out-<key>.partial`` beside the run), the same way, with the images in their key.
Standard library only.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

SUFFIX = ".partial"
SYNC_SECONDS = 5.0


def _as_json(value: Any) -> Any:
    """``value`` as it reads back from the record (tuples become lists)."""
    return json.loads(json.dumps(value))


def file_stamp(path: Path) -> tuple[int, int]:
    """An input file's size and modification time: a file replaced under its name is another input."""
    stat = Path(path).stat()
    return stat.st_size, stat.st_mtime_ns


def run_key(checkpoints: list[str | Path], **settings: Any) -> str:
    """What makes two runs' results interchangeable: each checkpoint file as it is on disk and
    every setting given (images, prediction settings, thresholds), as one digest."""
    files = []
    for path in checkpoints:
        files.append([str(Path(path).resolve()), *file_stamp(path)])
    if "overrides" in settings:  # checkpoint overrides: a flag not given (None), or none at all, is no override
        settings["overrides"] = {k: v for k, v in (settings["overrides"] or {}).items() if v is not None}
    text = json.dumps({"checkpoints": files, **settings}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class PredictionJournal:
    """``with PredictionJournal(path, key) as journal``: ``done`` holds the ids of images an
    earlier run with this key finished, ``replay`` gives their results back, ``add`` and
    ``finish`` record this run's, ``discard`` deletes the record once the submission is written."""

    def __init__(self, path: Path, key: str) -> None:
        self.path, self.key = Path(path), key
        self.done: dict[int, int] = {}  # image id -> the run that finished it
        self._stamps: dict[int, Any] = {}  # image id -> the stamp it was finished with
        self.stale = False  # a record of another run was there (and is replaced)
        self._runs = 0
        self._handle: Any = None
        self._synced = time.monotonic()
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        for item in self._records():
            if "key" in item:
                if item["key"] != self.key:
                    self.stale, self.done, self._runs = True, {}, 0
                    return
                self._runs += 1
            elif "done" in item:
                self.done[int(item["done"])] = int(item["run"])
                self._stamps[int(item["done"])] = item.get("stamp")

    def _records(self) -> Iterator[dict]:
        """The record's lines, read one at a time; a line cut off by a crash is skipped."""
        with open(self.path, encoding="utf-8") as handle:
            for line in handle:
                try:
                    yield json.loads(line)
                except ValueError:
                    continue

    def __enter__(self) -> "PredictionJournal":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mode = "w" if self.stale or not self.path.exists() else "a"
        self._handle = open(self.path, mode, encoding="utf-8")
        if mode == "a" and self.path.stat().st_size and not _ends_with_newline(self.path):
            self._handle.write("\n")  # the cut line stays a line of its own, skipped on reading
        self._runs += 1
        self._write({"key": self.key, "run": self._runs})
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.close()

    def replay(self, ids: set[int]) -> Iterator[list[dict]]:
        """The recorded results of the finished images among ``ids``, one line (an image, or a
        window of a streamed one) at a time, from the run that finished each."""
        wanted = {i: self.done[i] for i in ids if i in self.done}
        if not wanted:
            return
        for item in self._records():
            if "results" in item and wanted.get(int(item["image"])) == item["run"]:
                yield item["results"]

    def add(self, image_id: int, results: list[dict]) -> None:
        """Results of one image, or of one window of a streamed image."""
        self._write({"image": int(image_id), "run": self._runs, "results": results})

    def finished(self, image_id: int, stamp: Any = None) -> bool:
        """Whether an earlier run finished this image as it is now (``stamp``, as ``finish`` got it)."""
        return image_id in self.done and self._stamps.get(image_id) == _as_json(stamp)

    def finish(self, image_id: int, stamp: Any = None) -> None:
        """Mark an image complete, with ``stamp`` (JSON: what identifies the image's file).
        Flushed at once, so it survives the process; forced to the disk (against a machine's
        crash) at most every SYNC_SECONDS, which many small images predicted fast on a network
        file system would otherwise wait on."""
        self._write({"done": int(image_id), "run": self._runs, "stamp": _as_json(stamp)})
        if time.monotonic() - self._synced > SYNC_SECONDS:
            os.fsync(self._handle.fileno())
            self._synced = time.monotonic()

    def discard(self) -> None:
        """The submission is complete: the record is no longer needed."""
        self.path.unlink(missing_ok=True)

    def _write(self, item: dict) -> None:
        self._handle.write(json.dumps(item, separators=(",", ":")) + "\n")
        self._handle.flush()


def _ends_with_newline(path: Path) -> bool:
    with open(path, "rb") as handle:
        handle.seek(-1, os.SEEK_END)
        return handle.read(1) == b"\n"
