"""Per-segment perplexity of rmt, armt, none and full on real text, same budget, one run.

The real text is the King James Bible (Debian package bible-kjv), one document per book
(data_prep/kjv.py). Each model trains with the plain-PyTorch copy of the trainer's loop
(tests/support/plain_training.py: the trainer's batches, schedule, clipping and AdamW; ZeRO-3 ==
plain PyTorch is tested elsewhere), one thread per model, two models at a time, then is scored on
the same validation samples. Ends with the markdown table and a RESULT line (ratios against none).

    .venv/bin/python bench/real_text_memory.py [--config configs/kjv.yaml] [--set data.segment_len=128 ...]
"""

from __future__ import annotations

import argparse
import sys
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "support"))

from plain_training import train_and_evaluate  # noqa: E402

from data_prep import prepare  # noqa: E402
from data_prep.kjv import write_books  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.evaluate import EvalResult, NllRow  # noqa: E402

KINDS = ("rmt", "armt", "none", "full")


def table(results: dict[str, EvalResult]) -> list[str]:
    n = len(next(iter(results.values())).segments)
    lines = ["| segment | " + " | ".join(results) + " |", "| ---: |" + " ---: |" * len(results)]
    for k in range(n):
        lines.append(f"| {k} | " + " | ".join(f"{r.segments[k].ppl:.1f}" for r in results.values()) + " |")
    later = [NllRow.combine(r.segments[1:]).ppl for r in results.values()]
    lines.append(f"| 1-{n - 1} | " + " | ".join(f"{ppl:.1f}" for ppl in later) + " |")
    lines.append("| all | " + " | ".join(f"{r.ppl:.1f}" for r in results.values()) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "kjv.yaml"))
    parser.add_argument("--set", nargs="*", default=[], dest="overrides", metavar="KEY=VALUE")
    parser.add_argument("--kinds", default=",".join(KINDS), help="memory kinds (or kind:key=value,... variants)")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    if not Path(cfg.data.source).exists():  # make kjv-books writes it too; never overwrite a folder
        write_books(Path(cfg.data.source))
    prepare(cfg)
    # One process per model: the global batch is the micro-batch (train.global_batch_size, unless set).
    base = [*args.overrides]
    if cfg.train.global_batch_size is None:
        base.append(f"train.global_batch_size={cfg.train.micro_batch_size * cfg.train.grad_accum}")
    names, runs = [], []
    for spec in args.kinds.split(","):
        kind, _, extra = spec.partition(":")
        names.append(spec)
        runs.append([*base, f"memory.kind={kind}", *(extra.split("+") if extra else [])])
        if kind == "full" and cfg.data.sample_len > cfg.model.max_positions:
            runs[-1].append(f"model.max_positions={cfg.data.sample_len}")
    with ProcessPoolExecutor(2, mp_context=get_context("spawn")) as pool:
        dicts = pool.map(train_and_evaluate, [args.config] * len(runs), runs)
        results = dict(zip(names, map(EvalResult.from_dict, dicts)))
    print("\n".join(table(results)))
    if "none" in results:
        none = results["none"]
        others = {name: r for name, r in results.items() if name != "none"}
        ratios = {f"{name}_seg0": r.segments[0].ppl / none.segments[0].ppl for name, r in others.items()}
        ratios |= {f"{name}_later": NllRow.combine(r.segments[1:]).ppl / NllRow.combine(none.segments[1:]).ppl
                   for name, r in others.items()}
        print("RESULT " + " ".join(f"{key}={value:.3f}" for key, value in ratios.items()))


if __name__ == "__main__":
    main()
