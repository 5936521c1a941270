"""Helpers of the export tests: the tiny experiment, the `memtrain` CLI as a subprocess, a clean python."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

# A model of ~40k parameters on 16 short synthetic books: seconds per stage on 2 CPU cores.
TINY = {
    "data": {"source": "synthetic:16", "segment_len": 32, "n_segments": 4, "vocab_size": 512,
             "val_fraction": 0.25, "test_fraction": 0.0, "tokenizer_threads": 1,
             "synthetic": {"words_per_book": 1200, "facts_per_book": 3, "min_recall_distance_segments": 1}},
    "model": {"arch": "gpt2", "hidden_size": 32, "num_layers": 2, "num_heads": 2, "max_positions": 64},
    "memory": {"kind": "rmt", "num_tokens": 4},
    "train": {"max_steps": 4, "save_every": 4, "micro_batch_size": 2, "warmup_steps": 1, "log_every": 2},
    "eval": {"max_samples": 8, "batch_size": 4},
    "tracking": {"enabled": False},
    "export": {"max_shard_size": "50KB", "tags": ["tiny"]},
}


@dataclass(frozen=True)
class TrainedRun:
    config: Path  # the experiment YAML
    data_dir: Path
    output_dir: Path  # train.output_dir
    eval_json: Path  # what `memtrain eval --checkpoint output_dir` reported


def memtrain(*args: str, cwd: Path, env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "DS_ACCELERATOR": "cpu", **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"memtrain {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def clean_python_env(tmp: Path) -> dict[str, str]:
    """An environment whose python sees site-packages but not this project (nor its editable install)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "HF_", "DS_"))}
    env.update(PYTHONPATH=sysconfig.get_paths()["purelib"], HF_HOME=str(tmp / "hf_home"), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    return env


def run_clean(script: Path, *args: str, tmp: Path) -> dict:
    """Run ``script`` with plain transformers in a fresh interpreter outside the repository; its JSON stdout."""
    # -S skips site.py, so the .pth file of the editable install never puts the repo on sys.path.
    # stdin is closed: AutoTokenizer's "run custom code? [y/N]" prompt gets EOF (= no) at once.
    proc = subprocess.run([sys.executable, "-S", "-c", script.read_text(), *args], cwd=tmp, capture_output=True,
                          text=True, env=clean_python_env(tmp), stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.splitlines()[-1])
