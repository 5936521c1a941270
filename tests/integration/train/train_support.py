"""Helpers of the training tests: the tiny experiment, `memtrain train` as a process, its log, kill -9."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import yaml

REPO_ROOT = Path(__file__).resolve().parents[3]

# ~13k parameters, 4 segments of 16 tokens, 16 steps of a 4-sample global batch: seconds per run.
TINY = {
    "data": {"source": "synthetic:12", "segment_len": 16, "n_segments": 4, "vocab_size": 320,
             "val_fraction": 0.2, "test_fraction": 0.0, "samples_per_shard": 64, "tokenizer_threads": 1,
             "tokenizer_sample_sentences": 1000,
             "synthetic": {"words_per_book": 600, "facts_per_book": 3, "min_recall_distance_segments": 1}},
    "model": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "max_positions": 64,
              "segment_checkpointing": False},
    "memory": {"kind": "rmt", "num_tokens": 2},
    "train": {"max_steps": 16, "save_every": 4, "keep_last": 3, "micro_batch_size": 2, "global_batch_size": 4,
              "lr": 3e-3, "warmup_steps": 2, "log_every": 1,
              # 2 segments, then 4 from step 8: the curriculum grows the sequence mid-run
              "curriculum": [{"from_step": 0, "n_segments": 2}, {"from_step": 8, "n_segments": 4}]},
    "eval": {"max_samples": 4, "batch_size": 2},
}


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
    tree = {**TINY, "data": {**TINY["data"], "output_dir": str(data_dir)},
            "train": {**TINY["train"], "output_dir": str(output_dir)},
            "tracking": {"uri": tracking_uri, "experiment": "train-tests"} if tracking_uri else {"enabled": False}}
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def env() -> dict[str, str]:
    # one thread per process: two ranks (or a rank and the machine's other work) share 2 cores
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def start_train(config: Path, *extra: str, log: Path) -> subprocess.Popen:
    """``memtrain train --config C EXTRA...`` in the background, stdout+stderr into ``log``."""
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "train", "--config", str(config), *extra],
                                cwd=REPO_ROOT, env=env(), stdout=out, stderr=subprocess.STDOUT)


def run_train(config: Path, *extra: str, log: Path, timeout: float = 300) -> int:
    proc = start_train(config, *extra, log=log)
    try:
        return proc.wait(timeout)
    finally:
        kill_tree(proc)


def tail(log: Path, chars: int = 4000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else "(no log)"


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


def kill_tree(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    """Signal the process and its descendants by pid (torchrun's ranks run in sessions of their own)."""
    try:
        family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for member in family:
        try:
            member.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    proc.wait(30)
