"""Training throughput and per-rank memory: 2-rank ZeRO-3 against 1-rank plain PyTorch (CPU).

Both train the same memory model (RMT, GPT-2 base) on the same synthetic shards with the same
global batch and micro-batch size (the single process accumulates what the second rank would do).
Reported per run: tokens/s over the timed steps, peak RSS of each rank, and the bytes of parameters
plus optimizer state each rank holds (ZeRO-3 measured at world size 2 and at world size 1, whose
ratio is what sharding saves; plain PyTorch for reference).

    python bench/train_throughput.py [--steps 12] [--warmup 3]

Ends with ``RESULT zero3_tok_s=... plain_tok_s=... zero3_vs_plain=... shard_bytes_ratio=...``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

CONFIG = {
    "data": {"source": "synthetic:24", "segment_len": 32, "n_segments": 4, "vocab_size": 512,
             "val_fraction": 0.1, "test_fraction": 0.0, "tokenizer_threads": 1, "tokenizer_sample_sentences": 2000,
             "synthetic": {"words_per_book": 1500, "facts_per_book": 4, "min_recall_distance_segments": 1}},
    "model": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "max_positions": 64},
    "memory": {"kind": "rmt", "num_tokens": 4},
    "train": {"micro_batch_size": 2, "global_batch_size": 8, "max_steps": 1000, "warmup_steps": 10},
    "tracking": {"enabled": False},
}


def unique_bytes(tensors) -> int:
    """Bytes of the distinct storages behind ``tensors`` (a flat buffer and its views count once)."""
    seen: dict[int, int] = {}
    for tensor in tensors:
        if tensor is None or tensor.numel() == 0:
            continue
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def optimizer_state_tensors(optimizer) -> list:
    import torch

    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


def timed_steps(step_fn, steps: int, warmup: int, tokens_per_step: int) -> float:
    for _ in range(warmup):
        step_fn()
    started = time.perf_counter()
    for _ in range(steps):
        step_fn()
    return tokens_per_step * steps / (time.perf_counter() - started)


def worker(kind: str, config: str, steps: int, warmup: int, out: Path) -> None:
    import warnings

    import torch

    from pipeline import launch
    from pipeline.config import load_config
    from pipeline.data import TrainBatches, open_train_split, segments_for_step
    from pipeline.ds_config import batch_plan
    from pipeline.optim import make_optimizer, set_lr
    from pipeline.engine import build_partitioned_model
    from pipeline.train import preflight

    warnings.filterwarnings("ignore", category=FutureWarning)
    cfg = load_config(config)
    env = launch.setup()
    checks = preflight(cfg, env.world_size)
    plan = batch_plan(cfg.train, env.world_size)
    batches = TrainBatches(open_train_split(cfg.data.output_dir), plan, env.rank, cfg.data.segment_len, cfg.train.seed)
    tokens_per_step = plan.global_batch * cfg.data.n_segments * cfg.data.segment_len
    step = 0

    if kind == "zero3":
        import deepspeed

        deepspeed.init_distributed()
        model, keep_alive = build_partitioned_model(cfg, checks, checks.ds_config)
        engine, *_ = deepspeed.initialize(model=model, optimizer=make_optimizer(model, cfg.train),
                                          config=checks.ds_config)

        def one_step() -> None:
            nonlocal step
            set_lr(engine.optimizer, cfg.train, step)
            for micro in batches.next_step(segments_for_step(cfg.train, step, cfg.data.n_segments, plan.accum)):
                engine.backward(engine(input_ids=micro.input_ids, labels=micro.labels).loss)
                engine.step()
            step += 1

        tok_s = timed_steps(one_step, steps, warmup, tokens_per_step)
        params = [p.ds_tensor for p in engine.module.parameters()]
        inner = engine.optimizer
        state_bytes = unique_bytes([*inner.fp32_partitioned_groups_flat, *optimizer_state_tensors(inner.optimizer)])
        full_params = sum(p.ds_numel for p in engine.module.parameters())
    else:
        from pipeline.models import build_model

        manifest = checks.manifest
        torch.manual_seed(cfg.train.seed)
        model = build_model(cfg, vocab_size=checks.vocab_size, bos_token_id=manifest["bos_token_id"],
                            eos_token_id=manifest["eos_token_id"], pad_token_id=manifest["pad_token_id"])
        optimizer = make_optimizer(model, cfg.train)

        def one_step() -> None:
            nonlocal step
            set_lr(optimizer, cfg.train, step)
            for micro in batches.next_step(segments_for_step(cfg.train, step, cfg.data.n_segments, plan.accum)):
                (model(input_ids=micro.input_ids, labels=micro.labels).loss / plan.accum).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1

        tok_s = timed_steps(one_step, steps, warmup, tokens_per_step)
        params = list(model.parameters())
        state_bytes = unique_bytes(optimizer_state_tensors(optimizer))
        full_params = sum(p.numel() for p in model.parameters())
    result = {
        "kind": kind, "rank": env.rank, "world": env.world_size, "tok_s": tok_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "param_bytes": unique_bytes(params), "optim_bytes": state_bytes, "model_params": full_params,
    }
    (out / f"{kind}-w{env.world_size}-r{env.rank}.json").write_text(json.dumps(result))


def launch_worker(kind: str, nproc: int, config: Path, args: argparse.Namespace, out: Path) -> None:
    script = [str(Path(__file__).resolve()), "--worker", kind, "--config", str(config), "--steps", str(args.steps),
              "--warmup", str(args.warmup), "--out", str(out)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *script]
    else:
        cmd = [sys.executable, *script]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{kind} (world {nproc}) failed:\n{proc.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--worker", choices=["zero3", "plain"])
    parser.add_argument("--config")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.config, args.steps, args.warmup, Path(args.out))
        return

    from data_prep import prepare
    from pipeline.config import load_config

    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        root = Path(tmp)
        tree = {**CONFIG, "data": {**CONFIG["data"], "output_dir": str(root / "data")},
                "train": {**CONFIG["train"], "output_dir": str(root / "train")}}
        config = root / "bench.yaml"
        config.write_text(yaml.safe_dump(tree))
        prepare(load_config(config))
        for kind, nproc in (("plain", 1), ("zero3", 2), ("zero3", 1)):
            launch_worker(kind, nproc, config, args, root)
        runs = {}
        for path in sorted(root.glob("*-w*-r*.json")):
            run = json.loads(path.read_text())
            runs.setdefault((run["kind"], run["world"]), []).append(run)

    print(f"model: {runs[('plain', 1)][0]['model_params']:,} parameters; global batch "
          f"{CONFIG['train']['global_batch_size']} x {CONFIG['data']['n_segments'] * CONFIG['data']['segment_len']} "
          f"tokens; {args.steps} timed steps after {args.warmup}")
    print(f"{'run':<14}{'rank':>5}{'tokens/s':>11}{'peak RSS MB':>13}{'param MB':>10}{'optim MB':>10}{'total MB':>10}")
    totals = {}
    for (kind, world), ranks in sorted(runs.items()):
        for run in sorted(ranks, key=lambda r: r["rank"]):
            total = run["param_bytes"] + run["optim_bytes"]
            totals.setdefault((kind, world), []).append(total)
            print(f"{kind + ' w' + str(world):<14}{run['rank']:>5}{run['tok_s']:>11.0f}{run['peak_rss_mb']:>13.0f}"
                  f"{run['param_bytes'] / 2**20:>10.3f}{run['optim_bytes'] / 2**20:>10.3f}{total / 2**20:>10.3f}")
    zero3_tok_s = runs[("zero3", 2)][0]["tok_s"]
    plain_tok_s = runs[("plain", 1)][0]["tok_s"]
    shard_ratio = max(totals[("zero3", 2)]) / totals[("zero3", 1)][0]
    plain_ratio = max(totals[("zero3", 2)]) / totals[("plain", 1)][0]
    print(f"per-rank param+optimizer bytes: ZeRO-3 world 2 / world 1 = {shard_ratio:.3f}; "
          f"ZeRO-3 world 2 / plain = {plain_ratio:.3f}")
    print(f"RESULT zero3_tok_s={zero3_tok_s:.0f} plain_tok_s={plain_tok_s:.0f} "
          f"zero3_vs_plain={zero3_tok_s / plain_tok_s:.3f} shard_bytes_ratio={shard_ratio:.3f}")


if __name__ == "__main__":
    main()
