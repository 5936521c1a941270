"""Atomic writes: fill a hidden temporary sibling, then rename it into place.

A killed process leaves at most a ``.NAME.tmp-XXXXXXXX`` file or folder, never a half-written
file under the real name.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")


def write_bytes(path: Path, payload: bytes) -> None:
    tmp = _temporary(path)
    try:
        with open(tmp, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, payload: Any) -> None:
    write_bytes(path, (json.dumps(payload, indent=1, sort_keys=True) + "\n").encode())


def replace_dir(path: Path, fill: Callable[[Path], Any]) -> None:
    """Build a folder with ``fill(tmp)``, then swap it in for ``path``."""
    tmp = _temporary(path)
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
