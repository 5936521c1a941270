"""``memtrain prep`` and ``memtrain prep merge``: progress bars on a terminal, one summary line."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from pipeline.config import config_from_args


def run_prep(args: argparse.Namespace) -> int:
    """``memtrain prep --config C [--set ...] [--shard-index i --num-shards N]``.

    In a SLURM array every task runs the same command with its own --shard-index: task 0 reads
    the corpus once to plan (dedup, splits) and trains the tokenizer, the other tasks wait for
    its plan.json (data.plan_wait_s), then each writes its slice of the shards and a partial
    manifest; ``memtrain prep merge DIR`` (a dependent job) writes manifest.json.
    """
    from data_prep.run import prepare, summary_line  # lazy: tokenizers and pyarrow cost CLI start-up time

    cfg = config_from_args(args)
    result = prepare(cfg, args.shard_index, args.num_shards, progress=_progress_bars())
    print(summary_line(result), flush=True)
    if result.manifest is None:
        print(f"array task {args.shard_index} of {args.num_shards} done; when all are, run: "
              f"memtrain prep merge {result.data_dir}", flush=True)
    return 0


def run_merge(args: argparse.Namespace) -> int:
    """``memtrain prep merge DIR``: check every planned shard is written, write manifest.json."""
    from data_prep.manifest import merge  # lazy: numpy and the tokenizers cost CLI start-up time

    manifest = merge(args.dir)
    counts = " ".join(f"{split}={n}" for split, n in manifest["counts"].items())
    print(f"merged {len(manifest['shards'])} shards ({counts} samples) -> {args.dir}/manifest.json", flush=True)
    return 0


def _progress_bars() -> Callable[[str, int | None], Callable[[int], None]]:
    """A tqdm bar per stage on a terminal; one plain line per stage in a batch log."""
    interactive = sys.stderr.isatty()
    bars: list = []

    def start(stage: str, total: int | None) -> Callable[[int], None]:
        for bar in bars:
            bar.close()
        bars.clear()
        if not interactive:
            print(f"prep: {stage}" + (f" ({total} books)" if total is not None else ""), file=sys.stderr, flush=True)
            return lambda n: None
        from tqdm import tqdm  # lazy: only a terminal shows bars

        bar = tqdm(total=total, desc=f"prep {stage}", unit="book", dynamic_ncols=True, file=sys.stderr)
        bars.append(bar)
        return bar.update

    return start
