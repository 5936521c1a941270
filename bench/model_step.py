"""Training-step speed and peak memory of the memory models against n_segments (CPU, fp32, 1 process).

For rmt, armt, none and full (full only while the whole sample fits the positions), with and
without segment checkpointing, n_segments in {1, 2, 4, 8, 16, 32}, all the same GPT-2-style size;
plus the PyPI package recurrent-memory-transformer-pytorch at a matched size (dim, depth, heads,
feed-forward, memory tokens, segment length, vocabulary; no XL memories, no hyper-connections) as a
peer, with plain backprop and with its memory-replay backprop (its answer to checkpointing).

A step is forward + backward + AdamW on one batch. Each configuration runs in a child forked from
a lean parent (libraries imported, nothing computed). Memory: the child resets its peak-RSS mark
(/proc/self/clear_refs), builds the model and runs one warm-up step; "peak MB" is VmHWM minus
the starting RSS (model, gradients, AdamW state, activations). For that step glibc's mmap
threshold is 16 KiB: at its default, freed activations under 128 KiB stay in a heap fragmented by
long-lived autograd nodes, and RSS grows with the segment count while live tensors do not
(measured: +3.7 MB per segment at 8 layers, +0.4 MB at 16 KiB); at 16 KiB freed tensors go back
to the OS, as a GPU caching allocator's peak would count them. Time: the median of the following
steps, with the threshold back up (32 MiB, glibc's own ceiling) so allocation costs what it
usually does.
mfu = rmt's model FLOP/s (matmuls and attention counted
from the architecture, 3x forward for a training step, recomputation not counted) over the fp32
matmul peak of this machine, measured here with torch.mm on the same threads.

    .venv/bin/python bench/model_step.py [--hidden 128 --layers 4 --segment-len 64 --memory 4 --threads 1]
"""

from __future__ import annotations

import argparse
import ctypes
import multiprocessing
import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.config import load_config
from pipeline.models import build_model

SEGMENTS = (1, 2, 4, 8, 16, 32)
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
KINDS = ("rmt", "armt", "none", "full")


@dataclass(frozen=True)
class Spec:
    model: str  # a memory kind, or "peer"
    checkpointing: bool
    n_segments: int


def _proc_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _build_ours(spec: Spec, args: argparse.Namespace):
    cfg = load_config(None, [
        f"memory.kind={spec.model}", "model.arch=gpt2", f"model.hidden_size={args.hidden}",
        f"model.num_layers={args.layers}", f"model.num_heads={args.heads}", f"model.max_positions={args.max_positions}",
        f"data.segment_len={args.segment_len}", f"data.n_segments={spec.n_segments}",
        f"memory.num_tokens={args.memory}", f"model.segment_checkpointing={str(spec.checkpointing).lower()}"])
    model = build_model(cfg, args.vocab, 1, 2, 0).train()

    def step(ids: torch.Tensor) -> None:
        model(ids, labels=ids).loss.backward()

    return model, step


def _build_peer(spec: Spec, args: argparse.Namespace):
    from recurrent_memory_transformer_pytorch import RecurrentMemoryTransformer, RecurrentMemoryTransformerWrapper

    model = RecurrentMemoryTransformerWrapper(RecurrentMemoryTransformer(
        num_tokens=args.vocab, dim=args.hidden, depth=args.layers, heads=args.heads,
        dim_head=args.hidden // args.heads, num_memory_tokens=args.memory, seq_len=args.segment_len,
        use_xl_memories=False, num_residual_streams=1, use_flash_attn=True)).train()

    def step(ids: torch.Tensor) -> None:
        ids = torch.cat([ids, ids[:, :1]], dim=1)  # the peer predicts x[1:] from x[:-1]
        if spec.checkpointing:
            model(ids, memory_replay_backprop=True)  # runs its own backward
        else:
            model(ids, return_loss=True)[0].backward()

    return model, step


def _run(spec: Spec, args: argparse.Namespace, conn) -> None:
    warnings.filterwarnings("ignore")
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(M_MMAP_THRESHOLD, 16 * 1024)
    Path("/proc/self/clear_refs").write_text("5")
    start_kb = _proc_kb("VmRSS")
    torch.manual_seed(0)
    model, step = (_build_peer if spec.model == "peer" else _build_ours)(spec, args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(3, args.vocab, (args.batch, spec.n_segments * args.segment_len))

    def train_step() -> float:
        started = time.perf_counter()
        step(ids)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.perf_counter() - started

    train_step()  # warm-up, and the memory measurement
    peak_mb = (_proc_kb("VmHWM") - start_kb) / 1024
    libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)
    times = [train_step() for _ in range(args.steps)]
    conn.send({"step_s": statistics.median(times), "peak_mb": peak_mb})


def _peak_flops(conn, size: int = 2048, repeats: int = 5) -> None:
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b)) for _ in range(repeats))
    conn.send(2 * size**3 / best)


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def in_child(target, *args):
    """Run target(*args, conn) in a forked child and return what it sends."""
    receive, send = multiprocessing.Pipe(duplex=False)
    child = multiprocessing.get_context("fork").Process(target=target, args=(*args, send))
    child.start()
    send.close()  # the child holds the only write end: its death ends recv() instead of hanging it
    try:
        return receive.recv()
    except EOFError:
        raise RuntimeError(f"{target.__name__}{args[:1]} died (exit code {child.join() or child.exitcode})") from None
    finally:
        child.join()


def rmt_flops(args: argparse.Namespace, n_segments: int) -> float:
    """Model FLOPs of one rmt training step (3x forward): matmuls, attention scores and mixing, LM head."""
    d, m, length = args.hidden, args.memory, args.segment_len
    total = 0.0
    for k in range(n_segments):
        seq = length + (2 * m if k < n_segments - 1 else m)  # the last segment writes nothing
        per_layer = 2 * seq * 12 * d * d + 4 * seq * seq * d
        total += args.layers * per_layer + 2 * length * d * args.vocab
    return 3 * args.batch * total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4000)
    parser.add_argument("--segment-len", type=int, default=64)
    parser.add_argument("--memory", type=int, default=4)
    parser.add_argument("--max-positions", type=int, default=512)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per configuration (after 1 warm-up); median")
    parser.add_argument("--threads", type=int, default=1,
                        help="intra-op threads (1: on a shared machine, OpenMP barriers over busy cores make "
                             "multi-thread timings erratic)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    peak = in_child(_peak_flops)
    specs = [Spec(model, ckpt, n) for model in (*KINDS, "peer") for ckpt in (False, True) for n in SEGMENTS
             if model != "full" or n * args.segment_len <= args.max_positions]
    print(f"size: GPT-2 style d={args.hidden} x{args.layers} layers, {args.heads} heads, vocab {args.vocab}, "
          f"segment {args.segment_len}, memory {args.memory}, batch {args.batch}; {args.threads} threads, "
          f"fp32 matmul peak {peak / 1e9:.1f} GFLOP/s")
    print(f"{'model':<6}{'ckpt':>6}{'n_seg':>7}{'tokens':>8}{'step s':>9}{'tok/s':>9}{'peak MB':>9}")
    results = {}
    for spec in specs:
        result = results[spec] = in_child(_run, spec, args)
        tokens = args.batch * spec.n_segments * args.segment_len
        print(f"{spec.model:<6}{'on' if spec.checkpointing else 'off':>6}{spec.n_segments:>7}{tokens:>8}"
              f"{result['step_s']:>9.3f}{tokens / result['step_s']:>9.0f}{result['peak_mb']:>9.0f}", flush=True)

    def total_time(model: str, ckpt: bool, segments=SEGMENTS) -> float:
        return sum(results[Spec(model, ckpt, n)]["step_s"] for n in segments)

    tokens_all = args.batch * args.segment_len * sum(SEGMENTS)
    full_max = max(n for n in SEGMENTS if n * args.segment_len <= args.max_positions)
    mem_ratio = results[Spec("rmt", True, 32)]["peak_mb"] / results[Spec("rmt", True, 2)]["peak_mb"]
    rmt_vs_none = total_time("rmt", True) / total_time("none", True)
    rmt_vs_peer = total_time("peer", False) / total_time("rmt", False)
    full_vs_rmt = results[Spec("full", True, full_max)]["step_s"] / results[Spec("rmt", True, full_max)]["step_s"]
    mfu = sum(rmt_flops(args, n) for n in SEGMENTS) / total_time("rmt", False) / peak
    print(f"rmt: {tokens_all / total_time('rmt', False):.0f} tok/s without checkpointing, "
          f"{tokens_all / total_time('rmt', True):.0f} with; peer {tokens_all / total_time('peer', False):.0f} "
          f"(memory-replay {tokens_all / total_time('peer', True):.0f}); full at {full_max} segments is the "
          f"widest sample the {args.max_positions} positions allow")
    print(f"RESULT mem_ratio_32_vs_2={mem_ratio:.3f} rmt_vs_none_time={rmt_vs_none:.3f} "
          f"rmt_vs_peer_tok_s={rmt_vs_peer:.3f} full_vs_rmt_time_at_max={full_vs_rmt:.3f} mfu={mfu:.3f}")


if __name__ == "__main__":
    main()
