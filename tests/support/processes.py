"""``memtrain`` as a subprocess, the one way tests start it (and end it).

    memtrain("eval", "--checkpoint", run, cwd=tmp)            # waits; AssertionError with both streams on failure
    proc = start_memtrain("train", "--config", c, log=log)    # background, stdout+stderr appended to ``log``
    kill_tree(proc)                                           # the launcher and its ranks, by pid

Every child gets ``process_env()``: CPU DeepSpeed, unbuffered output and one OpenMP thread per
process unless the caller's environment sets OMP_NUM_THREADS (two ranks already share 2 cores; an
explicit value lets a thread-count check reach the ranks).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil

REPO_ROOT = Path(__file__).resolve().parents[2]


def process_env(**extra: str) -> dict[str, str]:
    return {"OMP_NUM_THREADS": "1", **os.environ, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1",
            "TOKENIZERS_PARALLELISM": "false", **extra}


def memtrain(*args: str, cwd: Path = REPO_ROOT, env: dict[str, str] | None = None, check: bool = True,
             timeout: float = 900) -> subprocess.CompletedProcess:
    """Run ``memtrain ARGS`` to the end (stdin closed, output captured); with ``check``, a failure is an AssertionError."""
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env=process_env(**(env or {})), stdin=subprocess.DEVNULL, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"memtrain {' '.join(args)} exited {proc.returncode}:\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def start_memtrain(*args: str, log: Path, cwd: Path = REPO_ROOT) -> subprocess.Popen:
    """``memtrain ARGS`` in the background, stdout+stderr appended to ``log``."""
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, env=process_env(),
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


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


def tail(log: Path, chars: int = 4000) -> str:
    return log.read_text(errors="replace")[-chars:] if log.exists() else "(no log)"
