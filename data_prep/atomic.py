"""Atomic writes, the project's one way to write a file: fill a hidden temporary sibling, fsync it,
rename it into place (and fsync the folder, so the rename survives a crash too).

A killed process or a full disk leaves at most a ``.NAME.tmp-XXXXXXXX`` file or folder, never a
half-written file under the real name: the previous version stays usable.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator


def temporary(path: Path) -> Path:
    """The temporary sibling ``path`` is built in (unique: concurrent writers never share one)."""
    return path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")


@contextmanager
def replacing(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write (by any means: a library's ``save(tmp)`` too); on success it is
    fsynced and renamed over ``path``, on failure removed. Creates ``path``'s folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary(path)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        tmp.replace(path)
        _fsync_dir(path.parent)
    except OSError as err:
        if err.errno == errno.ENOSPC and not err.filename:  # say where: a bare write() error names nothing
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from err
        raise
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes(path: str | Path, payload: bytes) -> Path:
    with replacing(path) as tmp:
        tmp.write_bytes(payload)
    return Path(path)


def write_text(path: str | Path, text: str) -> Path:
    return write_bytes(path, text.encode())


def write_json(path: str | Path, payload: Any, indent: int = 1) -> Path:
    return write_bytes(path, (json.dumps(payload, indent=indent, sort_keys=True) + "\n").encode())


def replace_dir(path: Path, fill: Callable[[Path], Any]) -> None:
    """Build a folder with ``fill(tmp)``, then swap it in for ``path``."""
    tmp = temporary(path)
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def is_disk_full(err: BaseException) -> bool:
    """A full disk, however the library reports it: errno ENOSPC, safetensors' "No space left on
    device", torch.save's "unexpected pos N vs M"."""
    return getattr(err, "errno", None) == errno.ENOSPC or any(
        text in str(err) for text in ("No space left on device", "unexpected pos"))


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
