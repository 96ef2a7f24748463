"""Writing outputs so that a crash or a wrong path costs nothing: folders checked before any
work starts, JSON replaced atomically. Standard library only, for fast tool start-up.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


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


def write_json(path: Path, payload: Any, indent: int | None = None) -> None:
    """JSON written atomically: a crash never leaves half a submission or history."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as handle:
        json.dump(payload, handle, indent=indent, separators=None if indent else (",", ":"))
    os.replace(tmp, path)
