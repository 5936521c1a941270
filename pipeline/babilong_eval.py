"""``memtrain eval --task babilong``: accuracy per (task, context length), for a run and its baseline.

Samples (``eval.babilong.source``): unset = fresh test-split samples of the run's own babilong generator
at ``eval.babilong.lengths`` segments (default 1, 2, 4, ... up to 16x the training length); a babilong
prep folder (its test split); ``hf:RMT-team/babilong`` (``eval.babilong.configs`` x tasks); or a local
.parquet/.jsonl in the official schema (scored as it is, whatever its length). The baseline
(``eval.baseline``, e.g. a ``none`` run) answers the same samples. Output: a table, ``--json OUT``
(``{"babilong": [{"task", "length_tokens", "accuracy", "samples", ...}]}``), ``eval/babilong_step_N.json``
and ``.png`` in the run folder, and on the run's MLflow run a metric per task with step = context length.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from data_prep.atomic import replacing, write_text
from data_prep.babi import TASKS
from data_prep.tokenizer import Encoder
from pipeline.babilong_qa import (QASample, answer_model, generated_samples, official_records, official_samples,
                                  prep_samples)
from pipeline.checkpoint import load_trained_model
from pipeline.errors import UserError
from pipeline.run_dir import RunDir
from pipeline.tracking import connect

STEM = "babilong_step_{step:08d}"


def default_lengths(train_segments: int) -> list[int]:
    """1, 2, 4, ... up to 16x the training length (in segments)."""
    lengths, n = [], 1
    while n <= 16 * train_segments:
        lengths.append(n)
        n *= 2
    return lengths


def load_samples(run, bl, tokenizer_dir: Path) -> list[QASample]:
    data = run.cfg.data
    source = bl.source
    if source is None:
        if not data.source.startswith("babilong:"):
            raise UserError(f"{run.run_dir} was not trained on babilong data: set eval.babilong.source "
                            f"(a babilong prep folder, hf:RMT-team/babilong, or a .parquet/.jsonl file)")
        train_segments = max([data.n_segments, *(s.n_segments for s in run.cfg.train.curriculum)])
        return generated_samples(data, tokenizer_dir, bl.lengths or default_lengths(train_segments), bl.samples)
    if Path(source).is_dir():
        return prep_samples(source, bl.lengths, data.segment_len, bl.samples)
    encoder = Encoder(tokenizer_dir)
    tasks = bl.tasks or list(TASKS)
    return official_samples(official_records(source, bl.configs, tasks), encoder.encode, encoder.encode_many,
                            bl.samples)


def summarize(samples: list[QASample], answers: dict[str, list[tuple[bool | None, bool | None]]],
              segment_len: int) -> list[dict[str, Any]]:
    """One row per (task, length): accuracy and teacher-forced accuracy of every model."""
    groups: dict[tuple[str, int], list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault((s.task, s.length), []).append(i)
    rows = []
    for (task, length), members in sorted(groups.items()):
        row: dict[str, Any] = {"task": task, "length_tokens": length, "n_segments": -(-length // segment_len),
                               "samples": len(members)}
        for name, results in answers.items():
            prefix = "" if name == "model" else f"{name}_"
            for k, key in enumerate(("accuracy", "tf_accuracy")):
                values = [results[i][k] for i in members]
                row[prefix + key] = None if None in values else round(sum(values) / len(values), 4)
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]], baseline: str | None) -> str:
    """task x length; each cell `accuracy` or `accuracy / baseline accuracy`."""
    lengths = sorted({r["length_tokens"] for r in rows})
    tasks = sorted({r["task"] for r in rows})
    cell = {(r["task"], r["length_tokens"]): r for r in rows}
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731

    def text(task: str, length: int) -> str:
        row = cell.get((task, length))
        if row is None:
            return ""
        return fmt(row["accuracy"]) + (f" / {fmt(row['baseline_accuracy'])}" if baseline else "")

    header = ["task \\ tokens", *map(str, lengths)]
    body = [[task, *(text(task, n) for n in lengths)] for task in tasks]
    widths = [max(len(line[c]) for line in [header, *body]) for c in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in [header, *body]]
    legend = "accuracy (generation, official scoring)" + (f" / baseline {baseline}" if baseline else "")
    return legend + "\n" + "\n".join(lines)


def plot(rows: list[dict[str, Any]], path: Path, names: dict[str, str]) -> Path:
    """Accuracy against context length (log x), one line per (model, task)."""
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for name, label in names.items():
        key = "accuracy" if name == "model" else f"{name}_accuracy"
        for task in sorted({r["task"] for r in rows}):
            points = [(r["length_tokens"], r[key]) for r in rows if r["task"] == task and r[key] is not None]
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o", linestyle="-" if name == "model" else "--", label=f"{label} {task}")
    ax.set(xscale="log", xlabel="context length (tokens)", ylabel="accuracy", ylim=(-0.02, 1.02),
           title="BABILong accuracy against context length")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    with replacing(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path


def log_to_run(run, rows: list[dict[str, Any]], files: list[Path]) -> None:
    """A metric per task (step = context length) and the files, on the checkpoint's MLflow run. Best effort."""
    cfg, run_id = run.cfg, run.state.get("mlflow_run_id")
    if not (cfg.tracking.enabled and run_id):
        return

    try:
        client, _ = connect(cfg.tracking.uri, cfg.tracking.connect_timeout_s)
        for row in rows:
            for key in ("accuracy", "tf_accuracy", "baseline_accuracy"):
                if row.get(key) is not None:
                    client.log_metric(run_id, f"babilong/{row['task']}_{key}", row[key], step=row["length_tokens"])
        for path in files:
            client.log_artifact(run_id, str(path), artifact_path="eval/babilong")
    except Exception as err:  # noqa: BLE001 - the results are on disk already
        print(f"memtrain eval: warning: not logged to MLflow run {run_id}: {type(err).__name__}: "
              f"{(str(err).splitlines() or [''])[0][:200]}", file=sys.stderr)


def evaluate_runs(run, baseline, bl) -> list[dict[str, Any]]:
    """Rows of :func:`summarize` for ``run`` (and ``baseline``) on the samples of ``bl`` (eval.babilong)."""
    tokenizer_dir = run.run_dir / "tokenizer"
    samples = load_samples(run, bl, tokenizer_dir)
    if not samples:
        raise UserError("no BABILong samples to score (check eval.babilong.lengths / tasks / source)")
    encoder = Encoder(tokenizer_dir)
    manifest = run.manifest
    answers = {}
    for name, trained in (("model", run), ("baseline", baseline)):
        if trained is not None:
            answers[name] = answer_model(trained.model, samples, run.cfg.eval.batch_size, bl.max_new_tokens,
                                         encoder.decode, manifest["eos_token_id"], manifest["pad_token_id"])
    return summarize(samples, answers, run.cfg.data.segment_len)


def run_babilong_eval(args: argparse.Namespace, run, cfg) -> int:
    """The ``--task babilong`` half of ``memtrain eval`` (``run`` is the loaded checkpoint, ``cfg`` its eval config)."""
    baseline = load_trained_model(cfg.eval.baseline) if cfg.eval.baseline else None
    if baseline is not None and baseline.manifest.get("tokenizer_hash") != run.manifest.get("tokenizer_hash"):
        raise UserError(f"eval.baseline {cfg.eval.baseline} has another tokenizer than {args.checkpoint}")
    rows = evaluate_runs(replace(run, cfg=cfg), baseline, cfg.eval.babilong)
    names = {"model": run.cfg.memory.kind}
    if baseline is not None:
        names["baseline"] = baseline.cfg.memory.kind
    print(f"{run.run_dir} step {run.step}: BABILong, {sum(r['samples'] for r in rows)} samples")
    print(format_table(rows, names.get("baseline")))
    payload = json.dumps({"babilong": rows, "models": names, "step": run.step}, indent=2) + "\n"
    stem = STEM.format(step=run.step)
    eval_dir = RunDir.of(run.run_dir).eval_dir
    files = [write_text(eval_dir / f"{stem}.json", payload), plot(rows, eval_dir / f"{stem}.png", names)]
    if args.json:
        files.insert(0, write_text(args.json, payload))
    log_to_run(run, rows, files)
    print("wrote " + ", ".join(str(p) for p in files))
    return 0

