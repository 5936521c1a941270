"""Helpers of the training tests: their variant of the tiny experiment, `memtrain train` as a process, its log."""

from __future__ import annotations

import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

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
