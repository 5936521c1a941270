"""BABILong eval of a checkpoint: context-reading throughput at 4, 16 and 64 segments, accuracy per length.

Throughput: tokens of context read per second by ``generate`` (segment by segment with memory, then the
question and ``max_new_tokens``), on fresh test-split samples of the run's babilong generator; the ratio
64 vs 4 segments says whether the cost per token stays flat as the context grows (it should for a
recurrent memory). Accuracy: ``memtrain eval --task babilong`` rows at 1x and 16x the training length,
for the run and its baseline (``--baseline``, e.g. the demo's ``none`` run).

    .venv/bin/python bench/babilong_eval.py --checkpoint runs/babilong-demo/train \
        [--baseline runs/babilong-demo/train-none] [--samples 32]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from pipeline.babilong_eval import evaluate_runs
from pipeline.babilong_qa import generated_samples
from pipeline.checkpoint import load_trained_model


def read_speed(run, n_segments: int, samples: int) -> float:
    """Context tokens per second through generate (batch of every sample of one prompt length at a time)."""
    bl = run.cfg.eval.babilong
    qa = generated_samples(run.cfg.data, run.run_dir / "tokenizer", [n_segments], samples)
    groups: dict[int, list] = {}
    for s in qa:
        groups.setdefault(len(s.prompt), []).append(s.prompt)
    started = time.perf_counter()
    with torch.no_grad():
        for prompts in groups.values():
            run.model.generate(torch.as_tensor(np.stack(prompts), dtype=torch.long), max_new_tokens=bl.max_new_tokens)
    return sum(len(s.prompt) for s in qa) / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--baseline", default=None)
    parser.add_argument("--samples", type=int, default=32, help="samples per length")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run = load_trained_model(args.checkpoint)
    baseline = load_trained_model(args.baseline) if args.baseline else None
    train_segments = max([run.cfg.data.n_segments, *(s.n_segments for s in run.cfg.train.curriculum)])

    speeds = {n: read_speed(run, n, args.samples) for n in (4, 16, 64)}
    print("segments  context tokens/s")
    for n, speed in speeds.items():
        print(f"{n:8d}  {speed:16,.0f}")
    print(f"ratio 64 vs 4 segments: {speeds[64] / speeds[4]:.2f} (1.00 = flat cost per token)")

    lengths = [1, train_segments, 16 * train_segments]
    bl = run.cfg.eval.babilong.model_copy(update={"lengths": sorted(set(lengths)), "samples": args.samples})
    rows = evaluate_runs(run, baseline, bl)
    print("task  tokens  accuracy  tf_accuracy" + ("  baseline_accuracy" if baseline else ""))
    for r in rows:
        print(f"{r['task']}  {r['length_tokens']:6d}  {r['accuracy']:8.3f}  {r['tf_accuracy']:11.3f}"
              + (f"  {r['baseline_accuracy']:17.3f}" if baseline else ""))

    def mean(key: str, n: int) -> float:
        values = [r[key] for r in rows if r["n_segments"] == n and r.get(key) is not None]
        return sum(values) / len(values) if values else float("nan")

    long = 16 * train_segments
    print(f"RESULT acc_1x={mean('accuracy', train_segments):.3f} acc_16x={mean('accuracy', long):.3f} "
          f"none_acc_16x={mean('baseline_accuracy', long):.3f} eval_tok_s={speeds[16]:.0f} "
          f"read_64_vs_4={speeds[64] / speeds[4]:.2f}")


if __name__ == "__main__":
    main()
