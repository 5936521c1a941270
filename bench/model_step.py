"""Training-step speed and peak memory of the memory models against n_segments (CPU, fp32, 1 process).

For rmt, armt, none and full (full only while the whole sample fits the positions), with and
without segment checkpointing, n_segments in {1, 2, 4, 8, 16, 32}, all the same GPT-2-style size;
plus rmt with segment checkpointing and the plain (unfused) LM head, which the backward recomputes;
plus rmt with selective segment checkpointing (``model.checkpoint_policy=save_matmuls``: matmul and
attention outputs kept, pointwise ops recomputed);
plus the PyPI package recurrent-memory-transformer-pytorch at a matched size (dim, depth, heads,
feed-forward, memory tokens, segment length, vocabulary; no XL memories, no hyper-connections) as a
peer, with plain backprop and with its memory-replay backprop (its answer to checkpointing); plus armt
inference (a forward with labels, no gradients, eval mode, batch 1) in sequential and in diagonal order
(``memory.armt_schedule``) at 8, 32 and 64 segments, with how far apart their per-segment NLLs are.

A step is forward + backward + AdamW on one batch. Each configuration runs in a child forked from
a lean worker (libraries imported, nothing computed). The workers are started with an allocator
set-up, as users run it: ``project`` is what memtrain gives its CPU ranks
(``pipeline.allocator``), ``glibc`` is plain glibc with its defaults; everything runs under the
project's set-up, and rmt with checkpointing at 2 and 32 segments also under plain glibc. "peak
MB" is the child's VmHWM over its warm-up and timed steps minus its starting RSS (model,
gradients, AdamW state, activations and whatever the allocator keeps). Time: the median of the
steps after the warm-up, in CPU seconds of the child when it runs one thread (its compute time,
robust on a shared machine where wall-clock time depends on the neighbours), else wall-clock.
mfu = rmt's model FLOP/s (matmuls and attention counted from the architecture, 3x forward for a
training step, recomputation not counted) over the fp32 matmul peak of this machine, measured
here with torch.mm on the same threads and the same clock.

    .venv/bin/python bench/model_step.py [--hidden 128 --layers 4 --segment-len 64 --memory 4 --threads 1]
    .venv/bin/python bench/model_step.py --armt-diag-only [--arch llama]   # just the armt schedules (a minute)
    .venv/bin/python bench/model_step.py --ckpt-policy-only   # just rmt: no / full / selective checkpointing
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

SEGMENTS = (1, 2, 4, 8, 16, 32)
KINDS = ("rmt", "armt", "none", "full")
RSS_SEGMENTS = (2, 32)
DIAG_SEGMENTS = (8, 32, 64)
SCHEDULES = ("sequential", "diagonal")


@dataclass(frozen=True)
class Spec:
    model: str  # a memory kind, or "peer"
    checkpointing: bool
    n_segments: int
    fused_head: bool = True
    policy: str = "full"  # model.checkpoint_policy (with checkpointing)
    allocator: str = "project"  # "project" (memtrain's CPU-rank set-up) or "glibc"
    schedule: str | None = None  # armt's inference order: an eval forward at batch 1 instead of a training step


def _proc_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _build_ours(spec: Spec, args: argparse.Namespace):
    from pipeline.config import load_config
    from pipeline.models import build_model

    cfg = load_config(None, [
        f"memory.kind={spec.model}", f"model.arch={args.arch}", f"model.hidden_size={args.hidden}",
        f"model.num_layers={args.layers}", f"model.num_heads={args.heads}", f"model.max_positions={args.max_positions}",
        f"data.segment_len={args.segment_len}", f"data.n_segments={spec.n_segments}",
        f"memory.num_tokens={args.memory}", f"model.segment_checkpointing={str(spec.checkpointing).lower()}",
        f"model.checkpoint_policy={spec.policy}",
        f"memory.armt_schedule={spec.schedule or 'sequential'}"])
    model = build_model(cfg, args.vocab, 1, 2, 0).train()
    model.config.fused_head = spec.fused_head

    def step(ids):
        model(ids, labels=ids).loss.backward()

    return model, step


def _build_inference(spec: Spec, args: argparse.Namespace):
    """armt in eval mode, its value projections random (zero at init: an empty memory would make the
    two orders trivially equal); the step returns the per-segment NLL sums."""
    import torch

    model, _ = _build_ours(spec, args)
    model.eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("write_value"):
                param.normal_(0.0, model.memory.init_std)

    @torch.no_grad()
    def step(ids):
        return model(ids, labels=ids).segment_nll.tolist()

    return model, step


def _build_peer(spec: Spec, args: argparse.Namespace):
    from recurrent_memory_transformer_pytorch import RecurrentMemoryTransformer, RecurrentMemoryTransformerWrapper
    import torch

    model = RecurrentMemoryTransformerWrapper(RecurrentMemoryTransformer(
        num_tokens=args.vocab, dim=args.hidden, depth=args.layers, heads=args.heads,
        dim_head=args.hidden // args.heads, num_memory_tokens=args.memory, seq_len=args.segment_len,
        use_xl_memories=False, num_residual_streams=1, use_flash_attn=True)).train()

    def step(ids):
        ids = torch.cat([ids, ids[:, :1]], dim=1)  # the peer predicts x[1:] from x[:-1]
        if spec.checkpointing:
            model(ids, memory_replay_backprop=True)  # runs its own backward
        else:
            model(ids, return_loss=True)[0].backward()

    return model, step


def _run(spec: Spec, args: argparse.Namespace, conn) -> None:
    import torch

    warnings.filterwarnings("ignore")
    Path("/proc/self/clear_refs").write_text("5")
    start_kb = _proc_kb("VmRSS")
    torch.manual_seed(0)
    ids = torch.randint(3, args.vocab, (args.batch, spec.n_segments * args.segment_len))
    if spec.schedule:
        model, step = _build_inference(spec, args)
        ids, clock = ids[:1], _clock(args.threads)
        outputs = step(ids)  # warm-up
        times = [_timed(lambda: step(ids), clock) for _ in range(args.steps)]
        conn.send({"step_s": statistics.median(times), "peak_mb": (_proc_kb("VmHWM") - start_kb) / 1024,
                   "segment_nll": outputs})
        return
    model, step = (_build_peer if spec.model == "peer" else _build_ours)(spec, args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step() -> float:
        return _timed(lambda: (step(ids), optimizer.step(), optimizer.zero_grad(set_to_none=True)), _clock(args.threads))

    train_step()  # warm-up
    times = [train_step() for _ in range(args.steps)]
    conn.send({"step_s": statistics.median(times), "peak_mb": (_proc_kb("VmHWM") - start_kb) / 1024})


def _peak_flops(threads: int, conn, size: int = 2048, repeats: int = 5) -> None:
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = min(_timed(lambda: torch.mm(a, b), _clock(threads)) for _ in range(repeats))
    conn.send(2 * size**3 / best)


def _clock(threads: int):
    """CPU seconds of this process with one thread (robust to a shared machine), else wall-clock."""
    return time.process_time if threads == 1 else time.perf_counter


def _timed(fn, clock) -> float:
    started = clock()
    fn()
    return clock() - started


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


def worker(args: argparse.Namespace) -> None:
    """Run the specs on stdin (JSON lines), one forked child each; one JSON result line each on stdout."""
    import torch

    import pipeline.models  # noqa: F401  (imported once here, shared by the forked children)

    torch.set_num_threads(args.threads)
    for line in sys.stdin:
        request = json.loads(line)
        result = in_child(_peak_flops, args.threads) if request == "peak" else in_child(_run, Spec(**request), args)
        print(json.dumps(result), flush=True)


def start_worker(allocator: str, argv: list[str]) -> subprocess.Popen:
    """A worker process under an allocator set-up (environment variables act at process start)."""
    from pipeline import allocator as alloc

    env = dict(os.environ)
    for name in alloc.VARIABLES:
        env.pop(name, None)
    if allocator == "project":
        env.update(alloc.cpu_rank_environment(env))
    return subprocess.Popen([sys.executable, __file__, "--worker", *argv], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=env)


def ask(proc: subprocess.Popen, request) -> dict | float:
    proc.stdin.write(json.dumps(request) + "\n")
    proc.stdin.flush()
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"the benchmark worker died on {request}")
    return json.loads(line)


def rmt_flops(args: argparse.Namespace, n_segments: int) -> float:
    """Model FLOPs of one rmt training step (3x forward): matmuls, attention scores and mixing, LM head."""
    d, m, length = args.hidden, args.memory, args.segment_len
    total = 0.0
    for k in range(n_segments):
        seq = length + (2 * m if k < n_segments - 1 else m)  # the last segment writes nothing
        per_layer = 2 * seq * 12 * d * d + 4 * seq * seq * d
        total += args.layers * per_layer + 2 * length * d * args.vocab
    return 3 * args.batch * total


def armt_schedules(results: dict[Spec, dict], args: argparse.Namespace) -> str:
    """Print the table of armt's inference orders; their RESULT figures."""
    print(f"armt inference, batch 1 (forward with labels, no gradients, eval mode); {args.threads} threads")
    print(f"{'n_seg':>7}{'tokens':>8}{'seq s':>9}{'diag s':>9}{'speedup':>9}{'seq MB':>8}{'diag MB':>9}"
          f"{'max rel NLL diff':>18}")
    speedups, diffs = {}, []
    for n in DIAG_SEGMENTS:
        sequential, diagonal = (results[Spec("armt", False, n, schedule=schedule)] for schedule in SCHEDULES)
        speedups[n] = sequential["step_s"] / diagonal["step_s"]
        diffs.append(max(abs(a - b) / abs(a) for a, b in zip(sequential["segment_nll"], diagonal["segment_nll"])))
        print(f"{n:>7}{n * args.segment_len:>8}{sequential['step_s']:>9.3f}{diagonal['step_s']:>9.3f}"
              f"{speedups[n]:>9.2f}{sequential['peak_mb']:>8.0f}{diagonal['peak_mb']:>9.0f}{diffs[-1]:>18.1e}")
    return (" ".join(f"armt_diag_speedup_{n}={speedups[n]:.3f}" for n in DIAG_SEGMENTS)
            + f" armt_diag_max_rel_nll_diff={max(diffs):.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="gpt2", help="memtrain's decoder (the peer is GPT-2 style whatever this is)")
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
    parser.add_argument("--armt-diag-only", action="store_true",
                        help="only armt's inference in sequential and diagonal order")
    parser.add_argument("--ckpt-policy-only", action="store_true",
                        help="only rmt without, with full and with selective segment checkpointing")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args, argv = parser.parse_args(), [a for a in sys.argv[1:] if a != "--worker"]
    if args.worker:
        return worker(args)

    from pipeline import allocator as alloc

    workers = {name: start_worker(name, argv) for name in ("project", "glibc")}
    peak = ask(workers["project"], "peak")
    specs = [Spec(model, ckpt, n) for model in (*KINDS, "peer") for ckpt in (False, True) for n in SEGMENTS
             if model != "full" or n * args.segment_len <= args.max_positions]
    specs += [Spec("rmt", True, n, fused_head=False) for n in SEGMENTS]
    selective = [Spec("rmt", True, n, policy="save_matmuls") for n in SEGMENTS]
    specs += selective
    specs += [Spec("rmt", True, n, allocator="glibc") for n in RSS_SEGMENTS]
    diag_specs = [Spec("armt", False, n, schedule=schedule) for n in DIAG_SEGMENTS for schedule in SCHEDULES]
    if args.armt_diag_only:
        specs = diag_specs
    elif args.ckpt_policy_only:  # rmt without and with full checkpointing (also in specs), then selective
        specs = [Spec("rmt", ckpt, n) for ckpt in (False, True) for n in SEGMENTS] + selective
    else:
        specs += diag_specs
    print(f"size: {args.arch} d={args.hidden} x{args.layers} layers, {args.heads} heads, vocab {args.vocab}, "
          f"segment {args.segment_len}, memory {args.memory}, batch {args.batch}; {args.threads} threads, "
          f"fp32 matmul peak {peak / 1e9:.1f} GFLOP/s; project allocator set-up: {alloc.describe()}")
    if not args.armt_diag_only:
        print(f"{'model':<6}{'ckpt':>13}{'head':>7}{'alloc':>9}{'n_seg':>7}{'tokens':>8}{'step s':>9}{'tok/s':>9}"
              f"{'peak MB':>9}")
    results = {}
    try:
        for spec in specs:
            result = results[spec] = ask(workers[spec.allocator], asdict(spec))
            if spec.schedule:
                continue
            tokens = args.batch * spec.n_segments * args.segment_len
            head = "-" if spec.model == "peer" else "fused" if spec.fused_head else "plain"
            print(f"{spec.model:<6}{spec.policy if spec.checkpointing else 'off':>13}{head:>7}{spec.allocator:>9}"
                  f"{spec.n_segments:>7}{tokens:>8}{result['step_s']:>9.3f}{tokens / result['step_s']:>9.0f}"
                  f"{result['peak_mb']:>9.0f}", flush=True)
    finally:
        for proc in workers.values():
            proc.stdin.close()
            proc.wait()

    if args.armt_diag_only:
        print(f"RESULT {armt_schedules(results, args)}")
        return

    def total_time(model: str, ckpt: bool, fused: bool = True, policy: str = "full") -> float:
        return sum(results[Spec(model, ckpt, n, fused, policy)]["step_s"] for n in SEGMENTS)

    def peak_ratio(**spec_fields: str) -> float:
        """rmt's peak memory at the most segments over the fewest (checkpointed; Spec's defaults unless given)."""
        low, high = (results[Spec("rmt", True, n, **spec_fields)]["peak_mb"] for n in RSS_SEGMENTS)
        return high / low

    policies = (f"selective_vs_full_ckpt_tok_s={total_time('rmt', True) / total_time('rmt', True, policy='save_matmuls'):.3f} "
                f"selective_vs_nockpt_tok_s={total_time('rmt', False) / total_time('rmt', True, policy='save_matmuls'):.3f} "
                f"selective_peak_ratio_32_vs_2={peak_ratio(policy='save_matmuls'):.3f} full_peak_ratio_32_vs_2={peak_ratio():.3f}")
    if args.ckpt_policy_only:
        print(f"RESULT ckpt_vs_nockpt_tok_s={total_time('rmt', False) / total_time('rmt', True):.3f} {policies}")
        return
    diag = armt_schedules(results, args)

    tokens_all = args.batch * args.segment_len * sum(SEGMENTS)
    full_max = max(n for n in SEGMENTS if n * args.segment_len <= args.max_positions)
    rmt_vs_none = total_time("rmt", True) / total_time("none", True)
    rmt_vs_peer = total_time("peer", False) / total_time("rmt", False)
    ckpt_vs_nockpt = total_time("rmt", False) / total_time("rmt", True)
    fused_vs_plain = total_time("rmt", True, fused=False) / total_time("rmt", True)
    full_vs_rmt = results[Spec("full", True, full_max)]["step_s"] / results[Spec("rmt", True, full_max)]["step_s"]
    mfu = sum(rmt_flops(args, n) for n in SEGMENTS) / total_time("rmt", False) / peak
    print(f"rmt: {tokens_all / total_time('rmt', False):.0f} tok/s without checkpointing, "
          f"{tokens_all / total_time('rmt', True):.0f} with (fused head), "
          f"{tokens_all / total_time('rmt', True, fused=False):.0f} with the plain head; "
          f"peer {tokens_all / total_time('peer', False):.0f} (memory-replay {tokens_all / total_time('peer', True):.0f}); "
          f"full at {full_max} segments is the widest sample the {args.max_positions} positions allow")
    print(f"RESULT rss_ratio_32_vs_2_default={peak_ratio():.3f} rss_ratio_32_vs_2_glibc={peak_ratio(allocator='glibc'):.3f} "
          f"ckpt_vs_nockpt_tok_s={ckpt_vs_nockpt:.3f} fused_vs_plain_ckpt_tok_s={fused_vs_plain:.3f} "
          f"rmt_vs_none_time={rmt_vs_none:.3f} rmt_vs_peer_tok_s={rmt_vs_peer:.3f} "
          f"full_vs_rmt_time_at_max={full_vs_rmt:.3f} mfu={mfu:.3f} {policies} {diag}")


if __name__ == "__main__":
    main()
