"""Writing outputs so that a crash or a wrong path costs nothing: folders checked before any
work starts, JSON replaced atomically. Standard library only, for fast tool start-up.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any, Sequence


def writable_dir(path: str | Path, flag: str = "--output_dir") -> Path:
    """An output folder, created and checked for writing before any work is done."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write_test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise PermissionError(f"{out}: not writable ({(err.strerror or str(err)).lower()}); pass another {flag} "
                              "or change its permissions.") from err
    return out


def writable_file(path: str | Path, flag: str, example: str) -> Path:
    """An output file's path, checked before any work: not a folder, in a writable folder.
    Otherwise the work runs first and the final rename fails on a hidden temporary name.
    ``example``: the file name suggested inside a folder given by mistake."""
    target = Path(path)
    if target.is_dir():
        raise IsADirectoryError(f"{flag} {target} is a folder; pass a file path, e.g. {target / example}")
    writable_dir(target.parent, flag)
    return target


def set_aside(folder: Path, names: Sequence[str]) -> Path | None:
    """Move the files ``names`` present in ``folder`` into a new ``folder/previous-<time>``, so a
    fresh run in a used folder replaces no earlier result (links between them stay links);
    returns that folder, or None when none of them was there."""
    present = [name for name in names if (Path(folder) / name).exists()]
    if not present:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = Path(folder) / f"previous-{stamp}"
    n = 1
    while aside.exists():  # two fresh runs within a second
        n += 1
        aside = Path(folder) / f"previous-{stamp}-{n}"
    aside.mkdir()
    for name in present:
        os.replace(Path(folder) / name, aside / name)
    return aside


def hidden(path: Path) -> Path:
    """Where ``path`` is written until it is complete: ``.<name>.tmp`` beside it."""
    return Path(path).with_name(f".{Path(path).name}.tmp")


def write_figure(fig: Any, path: Path, **savefig: Any) -> Path:
    """A matplotlib figure saved under ``hidden(path)`` and renamed: a crash or Ctrl-C while it
    is written never leaves a truncated PNG under the final name."""
    path = Path(path)
    tmp = hidden(path)
    try:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", **savefig)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)
    return path


def hidden_folder(final: Path) -> Path:
    """An empty ``hidden(final)`` to write a folder's files into (a crashed run's removed)."""
    tmp = hidden(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def publish_folder(tmp: Path, final: Path) -> None:
    """A folder written under ``tmp`` becomes ``final``, so a folder of files only ever appears
    complete; an earlier ``final`` (the same command's last output) is renamed aside first and
    removed only after the swap."""
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)


def write_json(path: Path, payload: Any, indent: int | None = None) -> None:
    """Strict JSON written atomically: a crash never leaves half a submission or history, and a
    metric that is NaN (a class absent from the data) is written null, which every JSON reader
    (jq, a browser) parses, where Python's bare NaN is not JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = hidden(path)
    try:
        with open(tmp, "w") as handle:
            json.dump(_finite(payload), handle, indent=indent, separators=None if indent else (",", ":"),
                      allow_nan=False)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # after a failure; after the rename it is gone already


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float inside lists and dicts made None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


class JsonArrayWriter:
    """A JSON list written item by item (a whole slide's 50,000 results never sit in memory
    together), under a hidden name until complete: the final path appears, atomically, only
    when every item is written; a crash leaves the items so far in ``.<name>.tmp``. ``head``
    and ``tail`` wrap the list in an object (a GeoJSON FeatureCollection's features)."""

    def __init__(self, path: Path, head: str = "[", tail: str = "]") -> None:
        self.path = Path(path)
        self.tmp = hidden(self.path)
        self.head, self.tail = head, tail
        self.count = 0

    def __enter__(self) -> "JsonArrayWriter":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._handle = open(self.tmp, "w")
        self._handle.write(self.head)
        return self

    def extend(self, items: list[Any]) -> None:
        for item in items:
            self._handle.write(("," if self.count else "") + json.dumps(item, separators=(",", ":")))
            self.count += 1

    def __exit__(self, kind: type | None, *exc: object) -> None:
        self._handle.write(self.tail)
        self._handle.close()
        if kind is None:
            os.replace(self.tmp, self.path)
