"""Helpers of the training tests: their variant of the tiny experiment, `memtrain train` as a process, its log,
and a real small disk (``tmpfs``) that ``fill`` makes full."""

from __future__ import annotations

import errno
import os
import re
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

from processes import kill_tree, start_memtrain
from tiny import experiment, merged, write_experiment

# ~13k parameters, 4 segments of 16 tokens, 16 steps of a 4-sample global batch: seconds per run.
TRAIN_TINY = {
    "data": {"source": "synthetic:12", "segment_len": 16, "vocab_size": 320, "val_fraction": 0.2,
             "samples_per_shard": 64, "tokenizer_sample_sentences": 1000, "synthetic": {"words_per_book": 600}},
    "model": {"num_layers": 1, "segment_checkpointing": False},
    "memory": {"num_tokens": 2},
    "train": {"max_steps": 16, "save_every": 4, "keep_last": 3, "global_batch_size": 4, "lr": 3e-3,
              "warmup_steps": 2, "log_every": 1,
              # 2 segments, then 4 from step 8: the curriculum grows the sequence mid-run
              "curriculum": [{"from_step": 0, "n_segments": 2}, {"from_step": 8, "n_segments": 4}]},
    "eval": {"max_samples": 4, "batch_size": 2},
}
MAX_STEPS = TRAIN_TINY["train"]["max_steps"]


@dataclass(frozen=True)
class Run:
    config: Path
    output_dir: Path
    log: Path  # the launcher's stdout+stderr
    returncode: int

    @property
    def train_log(self) -> Path:
        return self.output_dir / "logs" / "train.log"


def write_config(path: Path, data_dir: Path, output_dir: Path, tracking_uri: str | None) -> Path:
    tree = experiment(path.parent, **TRAIN_TINY)
    tree = merged(tree, {"data": {"output_dir": str(data_dir)}, "train": {"output_dir": str(output_dir)},
                         "tracking": {"enabled": True, "uri": tracking_uri, "experiment": "train-tests"}
                         if tracking_uri else {"enabled": False}})
    return write_experiment(path, tree)


def start_train(config: Path, *extra: str, log: Path) -> subprocess.Popen:
    """``memtrain train --config C EXTRA...`` in the background, stdout+stderr into ``log``."""
    return start_memtrain("train", "--config", str(config), *extra, log=log)


def run_train(config: Path, *extra: str, log: Path, timeout: float = 300) -> int:
    proc = start_train(config, *extra, log=log)
    try:
        return proc.wait(timeout)
    finally:
        kill_tree(proc)


def wait_for_step(train_log: Path, step: int, proc: subprocess.Popen, offset: int = 0, timeout: float = 240) -> None:
    """Block until rank 0's train.log (past ``offset`` bytes) reports a step >= ``step``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if train_log.exists():
            text = train_log.read_bytes()[offset:].decode(errors="replace")
            done = [int(m) for m in re.findall(r"\bstep (\d+)/", text)]
            if done and max(done) >= step:
                return
        if proc.poll() is not None:
            raise AssertionError(f"training exited with {proc.returncode} before step {step}")
        time.sleep(0.02)
    raise AssertionError(f"no step {step} within {timeout} s")


@contextmanager
def tmpfs(path: Path, size: str, inodes: int | None = None) -> Iterator[Path]:
    """A real tmpfs of ``size`` (mount's syntax: "4m", "48k"), at most ``inodes`` files and folders if
    given, mounted at ``path`` for the block; the test is skipped where mounting is not permitted."""
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (f",nr_inodes={inodes}" if inodes else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", str(path)], check=True)  # a file still open: detach now, free later


def fill(disk: Path, leave: int = 0, leave_inodes: int | None = None) -> Path:
    """Fill the file system of ``disk`` until ``leave`` bytes (and, if given, ``leave_inodes`` inodes)
    are free, with files in ``disk/filler``: delete that folder to free the space again."""
    filler = disk / "filler"
    filler.mkdir(exist_ok=True)
    stats = os.statvfs(disk)
    block = stats.f_frsize
    to_write = max(0, stats.f_bavail * block - leave) // block * block
    with (filler / "bytes").open("ab", buffering=0) as out:
        try:
            while to_write > 0:
                chunk = min(to_write, 1 << 20)
                to_write -= out.write(b"\0" * chunk)
        except OSError as err:
            if err.errno != errno.ENOSPC:
                raise
    if leave_inodes is not None:
        for index in range(max(0, os.statvfs(disk).f_favail - leave_inodes)):
            (filler / f"inode-{index}").touch()
    free = os.statvfs(disk)
    assert free.f_bavail * block < leave + block, "the disk did not fill"
    assert leave_inodes is None or free.f_favail == leave_inodes, "the disk's inodes did not fill"
    return filler
