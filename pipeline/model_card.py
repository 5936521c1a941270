"""The README.md of an exported model: Hub YAML metadata, then what the model is and how it did.

The metadata block is built with ``huggingface_hub.ModelCardData`` so the Hub parses it
(license, library, pipeline tag, tags, datasets, a ``model-index`` with the eval perplexity).
The body holds the per-segment perplexity table and plot, the training facts and how to load
and generate with plain transformers (``trust_remote_code=True``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import EvalResult as HubEvalResult
from huggingface_hub import ModelCardData

from pipeline.config import ExperimentConfig
from pipeline.ds_config import batch_plan

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")  # "gpt2", "org/name"; a path has more slashes or starts with / . ~

MEMORY_DESCRIPTIONS = {
    "rmt": "Recurrent Memory Transformer (Bulatov et al., 2022): {m} memory tokens are read at the "
           "start of every segment and written at its end; the written hidden states carry to the "
           "next segment.",
    "armt": "Associative Recurrent Memory Transformer (Rodkin et al., 2024): {m} memory tokens per "
            "segment write into a per-layer associative matrix memory (delta rule) that every token "
            "reads before each layer.",
    "none": "Segment-by-segment baseline without memory: each segment sees only itself.",
    "full": "Full attention over the whole sample (the upper reference for the memory models).",
}


@dataclass(frozen=True)
class TrainingFacts:
    """What the checkpoint says about how it was trained (from ``memtrain_state.json`` and ``ds_config.json``)."""

    step: int
    tokens_seen: int
    world_size: int
    zero_stage: int | None
    n_params: int
    dtype: str
    vocab_size: int


@dataclass(frozen=True)
class CardEvaluation:
    """The evaluation shown on the card, already rendered by pipeline.report."""

    step: int
    split: str
    n_samples: int
    perplexity: float
    segment_perplexity: tuple[float, ...]
    table_markdown: str
    plot_file: str | None  # relative to the exported folder


def hub_dataset_ids(source: str) -> list[str]:
    """``hf:deepmind/pg19`` -> ``["deepmind/pg19"]``; local and synthetic sources name no Hub dataset."""
    return [source[len("hf:"):]] if source.startswith("hf:") else []


def public_source(source: str) -> str:
    """data.source as a public card may show it: a Hub id or ``synthetic:N``, never a local path."""
    return source if source.startswith(("hf:", "synthetic:")) else "local files"


def base_model_id(cfg: ExperimentConfig) -> str | None:
    """``export.base_model``, else the Hub id model.pretrained was saved from (its ``_name_or_path``)."""
    if cfg.export.base_model or not cfg.model.pretrained:
        return cfg.export.base_model
    try:
        name = json.loads((Path(cfg.model.pretrained) / "config.json").read_text()).get("_name_or_path", "")
    except (OSError, json.JSONDecodeError):
        return None
    return name if isinstance(name, str) and HUB_ID.fullmatch(name) and not Path(name).exists() else None


def card_tags(cfg: ExperimentConfig) -> list[str]:
    tags = ["memtrain", "memory-augmented", f"memory-{cfg.memory.kind}", cfg.model.arch, "long-context"]
    return list(dict.fromkeys([*tags, *cfg.export.tags]))


def babilong_results(rows: list[dict]) -> list[HubEvalResult]:
    """One model-index entry per (task, context length) of a ``memtrain eval --task babilong`` JSON."""
    return [HubEvalResult(task_type="question-answering", dataset_type="RMT-team/babilong",
                          dataset_name=f"BABILong {r['task']} ({r['length_tokens']} tokens)", dataset_config=r["task"],
                          metric_type="accuracy", metric_value=r["accuracy"],
                          metric_name=f"BABILong {r['task']} accuracy at {r['length_tokens']} tokens")
            for r in rows if r.get("accuracy") is not None]


def card_metadata(cfg: ExperimentConfig, model_name: str, evaluation: CardEvaluation | None, facts: TrainingFacts,
                  babilong: list[dict] | None = None) -> ModelCardData:
    datasets = cfg.export.datasets or hub_dataset_ids(cfg.data.source)
    results = None
    if evaluation is not None and evaluation.step == facts.step:
        dataset_type = datasets[0] if datasets else public_source(cfg.data.source).split(":")[0]
        split = {"val": "validation"}.get(evaluation.split, evaluation.split)
        dataset_name = public_source(cfg.data.source) if not cfg.export.datasets else datasets[0]
        common = dict(task_type="text-generation", dataset_type=dataset_type, dataset_name=dataset_name,
                      dataset_split=split, metric_type="perplexity")
        results = [
            HubEvalResult(**common, metric_value=round(evaluation.perplexity, 4), metric_name="Perplexity"),
            HubEvalResult(**common, metric_value=round(evaluation.segment_perplexity[-1], 4),
                          metric_name="Perplexity (last segment)"),
        ]
    if babilong:
        results = [*(results or []), *babilong_results(babilong)]
    return ModelCardData(
        license=cfg.export.license,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=card_tags(cfg),
        datasets=datasets or None,
        language=cfg.export.language or None,
        base_model=base_model_id(cfg),
        model_name=model_name,
        eval_results=results,
    )


def _base_description(cfg: ExperimentConfig) -> str:
    model = cfg.model
    if model.pretrained:
        base = base_model_id(cfg)
        return f"`{model.arch}` initialised from " + (f"`{base}`" if base else "a pretrained checkpoint")
    return (f"`{model.arch}` from scratch ({model.num_layers} layers, hidden size {model.hidden_size}, "
            f"{model.num_heads} heads)")


def _facts_table(cfg: ExperimentConfig, facts: TrainingFacts) -> str:
    memory = cfg.memory
    depth = "full" if memory.bptt_depth < 0 else f"{memory.bptt_depth} segments"
    train = cfg.train
    plan = batch_plan(train, facts.world_size)
    rows = [
        ("Base model", _base_description(cfg)),
        ("Memory", f"`{memory.kind}`, {memory.num_tokens} memory tokens, BPTT depth {depth}"),
        ("Segments", f"{cfg.data.n_segments} x {cfg.data.segment_len} tokens per sample"),
        ("Parameters", f"{facts.n_params:,}"),
        ("Weights dtype", facts.dtype),
        ("Vocabulary", f"{facts.vocab_size:,} tokens"),
        ("Training steps", f"{facts.step:,}"),
        ("Tokens seen", f"{facts.tokens_seen:,}"),
        ("World size", f"{facts.world_size} ranks"),
        ("DeepSpeed", f"ZeRO stage {facts.zero_stage}" if facts.zero_stage is not None else "unknown"),
        ("Batch", f"{plan.micro} per rank x {plan.accum} accumulation steps x {plan.world} ranks = "
                  f"{plan.global_batch} samples"),
        ("Learning rate", f"{train.lr:g} (min {train.min_lr:g}, {train.warmup_steps} warmup steps)"),
        ("Data source", f"`{public_source(cfg.data.source)}`"),
    ]
    return "\n".join(["| | |", "|---|---|", *(f"| {name} | {value} |" for name, value in rows)])


def _evaluation_section(evaluation: CardEvaluation | None, step: int) -> str:
    if evaluation is None:
        return ("No evaluation was recorded for this checkpoint. Run "
                "`memtrain eval --checkpoint <train.output_dir>` before exporting to add one.")
    lines = []
    if evaluation.step != step:
        lines.append(f"> Measured on the checkpoint of step {evaluation.step}, not on this one (step {step}).\n")
    lines.append(f"Per-segment perplexity on the `{evaluation.split}` split ({evaluation.n_samples} samples). "
                 f"Segment k scores the predictions made from segment k's positions, so a model that uses "
                 f"its memory gets better as k grows. Overall perplexity: **{evaluation.perplexity:.4f}**.\n")
    lines.append(evaluation.table_markdown)
    if evaluation.plot_file:
        lines.append(f"\n![Per-segment perplexity]({evaluation.plot_file})")
    return "\n".join(lines)


def _usage(model_name: str, cfg: ExperimentConfig) -> str:
    sample_len = cfg.data.segment_len * cfg.data.n_segments
    return f"""```python
from transformers import AutoModelForCausalLM, AutoTokenizer

tokenizer = AutoTokenizer.from_pretrained("{model_name}", trust_remote_code=True)  # no custom-code prompt
model = AutoModelForCausalLM.from_pretrained("{model_name}", trust_remote_code=True)

prompt = tokenizer("A long book ...", return_tensors="pt").input_ids
output = model.generate(prompt, max_new_tokens=50)
print(tokenizer.decode(output[0, prompt.shape[1]:]))
```

`generate()` (transformers' own: sampling flags, stopping criteria, beams, left-padded batches,
`pipeline("text-generation", ..., trust_remote_code=True)`) reads the prompt segment by segment
({cfg.data.segment_len} tokens each), carrying the memory across segments, and keeps writing memory
as the generated text crosses segment boundaries.

Per-segment negative log-likelihood: pass `labels` (-100 = not a target; any length, trained on
{sample_len} tokens) and optionally an `attention_mask`; the output holds `loss`, `segment_nll`
(NLL sums per segment) and `segment_tokens` (target counts), so
`exp(segment_nll / segment_tokens)` is the per-segment perplexity."""


def render_model_card(cfg: ExperimentConfig, model_name: str, facts: TrainingFacts,
                      evaluation: CardEvaluation | None, babilong: list[dict] | None = None) -> str:
    """The full README.md text: YAML front matter, then the markdown body."""
    metadata = card_metadata(cfg, model_name, evaluation, facts, babilong).to_yaml()
    description = MEMORY_DESCRIPTIONS[cfg.memory.kind].format(m=cfg.memory.num_tokens)
    return f"""---
{metadata}
---

# {model_name}

A memory-augmented decoder trained with `memtrain` (DeepSpeed) on long documents.
{description}

## Evaluation

{_evaluation_section(evaluation, facts.step)}

## Training

{_facts_table(cfg, facts)}

## How to use

The modeling code ships with the weights: loading needs `transformers`, `torch` and
`trust_remote_code=True`, not memtrain.

{_usage(model_name, cfg)}
"""
