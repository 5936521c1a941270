"""The memory allocator of CPU ranks: peak RSS flat in the number of segments, at full speed.

With segment checkpointing the live tensors of a training step are nearly flat in the segment
count, but glibc's malloc keeps freed activation-sized blocks (tens of KiB to a few MiB) in heaps
fragmented by the long-lived tensors that cross segments, so a rank's peak RSS grows with the
segment count all the same. Measured (``bench/model_step.py``, rmt with segment checkpointing,
GPT-2 4x256, vocab 8000, 128-token segments, batch 1, peak RSS over the model's start, 2 -> 32
segments): glibc defaults 153 -> 431 MB (2.8x); a fixed 1 MiB mmap threshold 2.7x; 256 KiB +
1 MiB trim threshold 1.7x; a 16 KiB mmap threshold 1.17x, but every large tensor then costs an
mmap, fresh zeroed pages and a munmap (0.86x the tokens per CPU-second of glibc's defaults at 8
segments); jemalloc 138 -> 156 MB (1.13x) at 1.33x glibc's tokens per CPU-second. So a CPU rank
preloads jemalloc where it is installed (Debian: ``libjemalloc2``; optional, detected, never
required) and otherwise gets the 16 KiB glibc threshold (flat, slower).

Environment variables act when a process starts, so ``cpu_rank_environment`` is applied to the
ranks ``memtrain train --nproc N`` starts (``pipeline.launch``); a single-process CPU run tunes
its own glibc at start (``tune_this_process``; a preload is too late there). A user's own choice
wins: nothing is changed when the environment already sets an allocator variable (or
``MEMTRAIN_ALLOCATOR=system``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Mapping

OPT_OUT = "MEMTRAIN_ALLOCATOR"  # "system": leave the allocator as it is
GLIBC_MMAP_THRESHOLD = 16 * 1024
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
VARIABLES = ("LD_PRELOAD", "MALLOC_CONF", "GLIBC_TUNABLES", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_",
             "MALLOC_ARENA_MAX", "MALLOC_TOP_PAD_")


def jemalloc() -> str | None:
    """The installed jemalloc shared library (soname, loadable by LD_PRELOAD), or None."""
    return ctypes.util.find_library("jemalloc")


def _user_chose(environ: Mapping[str, str]) -> bool:
    preload = environ.get("LD_PRELOAD", "")
    return (environ.get(OPT_OUT) == "system" or "malloc" in preload
            or any(environ.get(name) for name in VARIABLES if name != "LD_PRELOAD"))


def cpu_rank_environment(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """Variables to add to a CPU rank's environment before it starts ({} when the user chose)."""
    if _user_chose(environ):
        return {}
    library = jemalloc()
    if library is None:
        return {"MALLOC_MMAP_THRESHOLD_": str(GLIBC_MMAP_THRESHOLD)}
    preload = environ.get("LD_PRELOAD", "")
    return {"LD_PRELOAD": f"{library}:{preload}" if preload else library}


def describe(environ: Mapping[str, str] = os.environ) -> str:
    """One line: what ``cpu_rank_environment`` would set."""
    added = cpu_rank_environment(environ)
    return " ".join(f"{k}={v}" for k, v in added.items()) or "none (the environment already chose)"


def tune_this_process(environ: Mapping[str, str] = os.environ) -> bool:
    """Give this (already started) glibc process the 16 KiB mmap threshold; True if it was set."""
    if _user_chose(environ):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, GLIBC_MMAP_THRESHOLD))
    except (OSError, AttributeError):  # not glibc
        return False
