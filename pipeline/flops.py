"""Throughput of training as torchtitan and Composer log it: tokens/s, achieved TFLOP/s and MFU per
device, and peak device memory.

FLOPs are counted once, on the forward passes of a process's first step, with PyTorch's own
``torch.utils.flop_counter.FlopCounterMode`` (matmuls, attention; exact for the shapes that ran, the
memory tokens included), and turned into FLOPs per trained token: a step's cost is linear in its
segments, so the count holds for every step whatever the curriculum does. A training step is 3x
its forward (the backward of a matmul is two matmuls of its size): model FLOPs, as MFU is defined,
so recomputation by activation checkpointing does not count, and a LoRA run (frozen weights
need no weight gradients) is overstated by up to half.

MFU = achieved FLOP/s per device / the device's peak: ``train.peak_tflops`` when set, else the dense
bf16/fp16 tensor-core peak of a known GPU (by its name) for a bf16/fp16 run. fp32 runs and CPUs
have no built-in peak (the GPU figures are tensor-core ones; a CPU's depends on its cores and
vector units): there, MFU is logged only with ``train.peak_tflops``.

Peak memory: ``torch.cuda.max_memory_allocated`` on a GPU, the process's peak RSS on a CPU.
"""

from __future__ import annotations

import re
import resource
import sys
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator

GIB = 2**30

# Dense (no sparsity) bf16/fp16 tensor-core peaks in TFLOP/s from the vendors' datasheets, matched in
# this order against the device name (torch.cuda.get_device_name: "NVIDIA H100 80GB HBM3", ...).
GPU_PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"GB200", 2500.0),
    (r"B200", 2250.0),
    (r"H200", 989.5),
    (r"H100 NVL", 835.5),
    (r"H100 PCIe", 756.5),
    (r"H100|H800", 989.5),  # SXM
    (r"A100|A800", 312.0),
    (r"L40S", 362.05),
    (r"L4\b", 121.0),
    (r"A6000", 154.8),
    (r"MI300X|MI325X", 1307.4),
    (r"MI250X", 383.0),
)


def builtin_peak_tflops(device_name: str | None, precision: str) -> float | None:
    """The built-in peak of ``device_name`` for a run in ``precision`` (bf16/fp16 only), or None."""
    if device_name is None or precision not in ("bf16", "fp16"):
        return None
    for pattern, peak in GPU_PEAK_TFLOPS:
        if re.search(rf"\b(?:{pattern})", device_name):
            return peak
    return None


def device_name() -> str | None:
    """The CUDA device's name, None on a CPU."""
    import torch  # lazy: seconds of import; train.py, which imports this module, also runs the --nproc launcher

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def peak_memory_bytes() -> int:
    """The most memory this process has held: allocated on its GPU, resident on a CPU."""
    import torch  # lazy: as in device_name

    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is KiB on Linux, bytes on macOS
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


@contextmanager
def counting_flops(totals: list[int]) -> Iterator[None]:
    """Count the FLOPs run inside the block (any thread's autograd-free dispatches) and append them to ``totals``."""
    from torch.utils.flop_counter import FlopCounterMode  # lazy: as in device_name

    counter = FlopCounterMode(display=False)
    with counter:
        yield
    totals.append(counter.get_total_flops())


class Throughput:
    """The throughput metrics of each step. Wrap a step's forward calls in ``forward()``; after the step,
    ``metrics(local_tokens, step_tokens, elapsed)`` gives what to log."""

    def __init__(self, world_size: int, peak_tflops: float | None) -> None:
        self.world_size = world_size
        self.peak_tflops = peak_tflops
        self.flops_per_token: float | None = None
        self._counted: list[int] = []

    @classmethod
    def for_run(cls, world_size: int, configured_peak: float | None, precision: str) -> tuple["Throughput", str]:
        """A Throughput with the run's peak, and one line saying where the peak comes from."""
        name = device_name()
        peak = configured_peak or builtin_peak_tflops(name, precision)
        where = (f"peak {peak:g} TFLOP/s per device ({'train.peak_tflops' if configured_peak else name}, {precision})"
                 if peak else f"no MFU: no built-in peak for {name or 'a CPU'} in {precision}; set train.peak_tflops")
        return cls(world_size, peak), where

    def forward(self) -> Any:
        """A context for one forward call: counts its FLOPs during the first step, nothing after."""
        return nullcontext() if self.flops_per_token is not None else counting_flops(self._counted)

    def metrics(self, local_tokens: int, step_tokens: int, elapsed_s: float) -> dict[str, float]:
        """tokens_per_s (all ranks), tflops_per_s and mfu (per device; mfu only with a peak), peak_memory_gib."""
        if self.flops_per_token is None and self._counted and local_tokens:
            self.flops_per_token = 3 * sum(self._counted) / local_tokens
        out = {"tokens_per_s": step_tokens / elapsed_s}
        if self.flops_per_token:
            achieved = self.flops_per_token * step_tokens / self.world_size / elapsed_s / 1e12
            out["tflops_per_s"] = achieved
            if self.peak_tflops:
                out["mfu"] = achieved / self.peak_tflops
        out["peak_memory_gib"] = peak_memory_bytes() / GIB
        return out
