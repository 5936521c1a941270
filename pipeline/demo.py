"""``memtrain demo``: the whole pipeline on the built-in synthetic books, stage by stage.

    prep -> train rmt (2 ZeRO-3 ranks) -> train the `none` baseline -> eval both on the same
    samples -> export to a Hugging Face folder -> generate from the export

Each stage is the ``memtrain`` command a user would type (printed before it runs), so the demo
shows the real interface. Every stage skips finished work: a rerun resumes or returns at once.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

from pipeline.config import ExperimentConfig, config_from_args
from pipeline.errors import UserError
from pipeline.eval_result import EvalResult, NllRow
from pipeline.run_dir import RunDir
from pipeline.tracking import connect

DEMO_RANKS = 2


def _stage(title: str, argv: list[str]) -> None:
    print(f"\n=== {title}\n$ memtrain {shlex.join(argv)}", flush=True)
    started = time.monotonic()
    code = subprocess.call([sys.executable, "-m", "pipeline.cli", *argv])
    if code != 0:
        raise UserError(f"demo stage '{title}' failed with exit code {code}")
    print(f"--- {title}: {time.monotonic() - started:.0f} s", flush=True)


def _config_args(args: argparse.Namespace, *extra: str) -> list[str]:
    overrides = [*args.overrides, *extra]
    return ["--config", args.config, *(["--set", *overrides] if overrides else [])]


def generate_from_export(export_dir: Path, cfg: ExperimentConfig) -> str:
    """Load the export with plain transformers and continue a validation prompt longer than one segment."""
    import torch  # lazy: seconds of import, off the CLI dispatch path
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from data_prep.shards import open_split

    tokenizer = AutoTokenizer.from_pretrained(export_dir, trust_remote_code=True)
    model = AutoModelForCausalLM.from_pretrained(export_dir, trust_remote_code=True).eval()
    prompt_len = cfg.data.segment_len * 2 + cfg.data.segment_len // 2
    prompt = open_split(cfg.data.output_dir, "val")[0]["input_ids"][:prompt_len]
    output = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False)
    return tokenizer.decode(output[0, prompt_len:].tolist())


def memory_effect(result: EvalResult) -> str:
    """Segments 1.. (where memory has something to carry), with memory and without: one line."""
    if result.baseline is None or len(result.segments) < 2:
        return "(no baseline or a single segment: nothing to compare)"
    memory, baseline = NllRow.combine(result.segments[1:]), NllRow.combine(result.baseline.segments[1:])
    return (f"Segments 1-{len(result.segments) - 1}, recall tokens (places only memory can know): ppl "
            f"{memory.recall_ppl:.2f} with memory vs {baseline.recall_ppl:.2f} without; all tokens: "
            f"{memory.ppl:.3f} vs {baseline.ppl:.3f}")


def run_demo(args: argparse.Namespace) -> int:
    cfg = config_from_args(args)
    # the baseline is the demo's own, beside the run; it is passed to eval, never saved in the run's config
    baseline = cfg.eval.baseline or f"{cfg.train.output_dir.rstrip('/')}-none"
    run_root = Path(cfg.train.output_dir).parent
    export_dir = run_root / "export"
    started = time.monotonic()

    _stage("1/6 data: synthetic books -> tokenizer -> shards", ["prep", *_config_args(args)])
    _stage(f"2/6 train {cfg.memory.kind} on {DEMO_RANKS} ZeRO-3 ranks",
           ["train", "--nproc", str(DEMO_RANKS), *_config_args(args)])
    _stage(f"3/6 train the no-memory baseline on {DEMO_RANKS} ranks",
           ["train", "--nproc", str(DEMO_RANKS),
            *_config_args(args, "memory.kind=none", f"train.output_dir={baseline}")])
    eval_json = run_root / "eval.json"
    _stage("4/6 per-segment evaluation, memory vs baseline on the same samples",
           ["eval", "--checkpoint", cfg.train.output_dir, "--json", str(eval_json), "--set", f"eval.baseline={baseline}"])
    _stage("5/6 export to a Hugging Face folder",
           ["export", "--checkpoint", cfg.train.output_dir, "--out", str(export_dir), "--force"])

    print("\n=== 6/6 generate from the export (plain transformers, trust_remote_code)", flush=True)
    print(repr(generate_from_export(export_dir, cfg)))

    plots = sorted(RunDir.of(cfg.train.output_dir).eval_dir.glob("*.png"))
    result = EvalResult.from_json(eval_json)
    _, tracking = connect(cfg.tracking.uri, cfg.tracking.connect_timeout_s)  # the store the runs logged to
    print(f"\nDemo finished in {time.monotonic() - started:.0f} s. Per-segment perplexity on {result.n_samples} "
          f"validation samples ({cfg.memory.kind} vs the no-memory baseline):")
    print(result.format_table())
    print(memory_effect(result))
    print(f"Per-segment plot: {plots[-1] if plots else '(none written)'}")
    print(f"Exported model:   {export_dir}")
    print(f"Open the runs:    mlflow ui --backend-store-uri {tracking} --port 5000")
    return 0
