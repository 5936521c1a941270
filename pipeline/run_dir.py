"""One run folder (``train.output_dir``): where each of its files lives, and the lock that keeps a
second writer out.

    config.yaml  ds_config.json  data_manifest.json  model_config.json  tokenizer/
    checkpoints/step_XXXXXXXX/ (+ latest, universal/)  eval/step_XXXXXXXX.{json,csv,png}
    logs/train.log  mlflow_spool.jsonl  .memtrain.lock

The lock is an ``flock`` on ``.memtrain.lock`` held for the training's lifetime by the process
that owns the run: the ``--nproc`` launcher, or rank 0 under an outside launcher. The kernel drops
it when that process dies, however it dies, so a killed job never leaves it stuck; the file's
content (the holder's pid and host) is only for the message.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from pipeline.errors import UserError

LOCK_NAME = ".memtrain.lock"
LOCK_OWNER_ENV = "MEMTRAIN_RUN_LOCK_PID"  # set by the --nproc launcher for the ranks it starts


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


@dataclass(frozen=True)
class RunDir:
    root: Path

    @classmethod
    def of(cls, path: str | Path) -> "RunDir":
        return cls(Path(path))

    @classmethod
    def of_tag_dir(cls, tag_dir: Path) -> "RunDir":
        """The run folder of ``<root>/checkpoints/<tag>``."""
        return cls(tag_dir.parent.parent)

    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def ds_config(self) -> Path:
        return self.root / "ds_config.json"

    @property
    def data_manifest(self) -> Path:
        return self.root / "data_manifest.json"

    @property
    def model_config(self) -> Path:
        """The HF config of the model the training built (eval and export rebuild it without model.pretrained)."""
        return self.root / "model_config.json"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    @property
    def train_log(self) -> Path:
        return self.root / "logs" / "train.log"

    @property
    def spool(self) -> Path:
        return self.root / "mlflow_spool.jsonl"

    def tag_dir(self, step: int) -> Path:
        return self.checkpoints / tag_for(step)

    def lock(self) -> "RunLock":
        return RunLock(self.root / LOCK_NAME)


class RunLock:
    """The run folder's single-writer lock (see the module docstring)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[str] | None = None

    def acquire(self) -> "RunLock":
        """Take the lock or raise a one-line UserError naming its holder; creates the run folder."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle = open(self.path, "a+")
        except OSError as err:
            raise UserError(f"cannot create train.output_dir {self.path.parent}: {err.strerror}") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise UserError(f"train.output_dir {self.path.parent} is in use by another memtrain train ({holder}); "
                            "wait for it, stop it, or use another train.output_dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        handle.flush()
        self._file = handle
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the descriptor drops the flock
            self._file = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def lock_held_by_parent() -> bool:
    """True in a rank started by ``--nproc``: its launcher holds the run's lock for it."""
    return os.environ.get(LOCK_OWNER_ENV) == str(os.getppid())


def die_with_parent() -> None:
    """Linux: this process gets SIGKILL when its parent (the ``--nproc`` launcher) dies, so that a
    killed launcher never leaves ranks training on, as a second writer, re-parented to PID 1."""
    PR_SET_PDEATHSIG = 1
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGKILL)
