"""Rank 0's training log: a tqdm bar (loss, tokens/s, ETA) on a terminal, plain lines otherwise,
and always plain lines in ``train.output_dir/logs/train.log``. Other ranks stay silent."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, TextIO


class Progress:
    def __init__(self, log_path: Path, start_step: int, max_steps: int, log_every: int, enabled: bool) -> None:
        self.enabled = enabled
        self.log_every = log_every
        self.start_step, self.max_steps = start_step, max_steps
        self.started = time.perf_counter()
        self.bar: Any = None
        self.file: TextIO | None = None
        if not enabled:
            return
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self.file = log_path.open("a", buffering=1)
        if sys.stderr.isatty():
            from tqdm import tqdm  # lazy: only a terminal shows a bar; batch jobs never load it

            self.bar = tqdm(total=max_steps, initial=start_step, unit="step", dynamic_ncols=True, file=sys.stderr)

    def info(self, message: str) -> None:
        if not self.enabled:
            return
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}"
        assert self.file is not None
        self.file.write(line + "\n")
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)

    def step(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}", refresh=False)
        if step % self.log_every and step != self.max_steps:
            return
        done = step - self.start_step
        elapsed = time.perf_counter() - self.started
        eta = elapsed / done * (self.max_steps - step) if done else 0.0
        line = (f"step {step}/{self.max_steps} loss {metrics['loss']:.4f} lr {metrics['lr']:.3g} "
                f"grad_norm {metrics['grad_norm']:.3g} tokens/s {metrics['tokens_per_s']:.0f}")
        if "tflops_per_s" in metrics:
            line += f" TFLOP/s {metrics['tflops_per_s']:.3g}"
        if "mfu" in metrics:
            line += f" mfu {100 * metrics['mfu']:.1f}%"
        if "peak_memory_gib" in metrics:
            line += f" mem {metrics['peak_memory_gib']:.2f} GiB"
        line += f" eta {eta:.0f}s"
        if self.bar is None:
            self.info(line)
        else:
            assert self.file is not None
            self.file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}\n")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()
