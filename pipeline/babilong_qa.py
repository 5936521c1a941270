"""BABILong question answering: the samples an eval scores, the official scorer, and the model loop.

Protocol (as the official BABILong evaluation): the context is read segment by segment (a short last
segment is allowed), then the question prompt, then greedy generation of ``max_new_tokens`` with the
memory; the output is lower-cased and cut at its first ".", and it is right when the target label is
in it and no other label of the task is (labels named in the question do not count). Also the
teacher-forced accuracy: the argmax at every answer token equals it (no generation needed).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import pyarrow.parquet as pq
import torch

from data_prep.babi import TASK_LABELS
from data_prep.babilong import SampleMaker, load_backgrounds, question_prompt
from data_prep.shards import open_split
from data_prep.tokenizer import Encoder, describe
from pipeline.errors import UserError

OFFICIAL_FIELDS = ("input", "question", "target")


@dataclass
class QASample:
    task: str
    prompt: np.ndarray  # int ids: context + question prompt
    answer: np.ndarray  # int ids of the answer (eos included for generated samples)
    question: str
    target: str
    length: int  # group key: context length in tokens (n x segment_len for generated samples)


def score_answer(output: str, target: str, question: str, labels: Iterable[str]) -> bool:
    """The official BABILong rule on one generated output."""
    text = output.lower().split(".")[0]
    for stop in ("<context>", "<example>"):
        text = text.split(stop)[0]
    target = target.lower().strip()
    asked = question.lower()
    others = {label.lower() for label in labels} - {target}
    others = {label for label in others if label not in asked}
    return target in text and not any(label in text for label in others)


def task_labels(task: str) -> tuple[str, ...]:
    return TASK_LABELS.get(task, ())


# --- samples -------------------------------------------------------------------------------------


def official_records(source: str, configs: list[str], tasks: list[str]) -> Iterable[tuple[str, str, dict[str, Any]]]:
    """(task, length config, record) from ``hf:RMT-team/babilong`` or a local .parquet/.jsonl in its schema
    (a local file's task is its ``task`` field, else the file name's qaN, else ``file``)."""
    if source.startswith("hf:"):
        import datasets  # lazy: only an hf: source needs it (seconds of import)

        for config in configs:
            for task in tasks:
                for record in datasets.load_dataset(source[3:], config, split=task):
                    yield task, config, record
        return
    path = Path(source)
    if not path.is_file():
        raise UserError(f"eval.babilong.source {source} does not exist (a babilong prep folder, hf:ID, .parquet or .jsonl)")
    if path.suffix == ".parquet":
        records = pq.read_table(path).to_pylist()
    elif path.suffix == ".jsonl":
        with path.open() as f:
            try:
                records = [json.loads(line) for line in f if line.strip()]
            except ValueError:
                raise UserError(f"eval.babilong.source {source} is not valid JSON lines") from None
    else:
        raise UserError(f"eval.babilong.source {source}: expected a .parquet or .jsonl file in the official schema")
    default_task = next((t for t in ("qa" + str(i) for i in range(20, 0, -1)) if t in path.stem), "file")
    for n, record in enumerate(records):
        missing = [f for f in OFFICIAL_FIELDS if f not in record]
        if missing:
            raise UserError(f"{source} record {n} lacks {', '.join(missing)} (official schema: input, question, target)")
        yield record.get("task", default_task), "file", record


def official_samples(records: Iterable[tuple[str, str, dict[str, Any]]], encode: Callable[[str], np.ndarray],
                     encode_many: Callable[[list[str]], list[np.ndarray]], limit: int) -> list[QASample]:
    """Official records -> samples; each (task, config) group keeps its first ``limit`` records and is
    keyed by its mean token length."""
    groups: dict[tuple[str, str], list[QASample]] = {}
    for task, config, record in records:
        group = groups.setdefault((task, config), [])
        if len(group) >= limit:
            continue
        context = encode(record["input"])
        prompt, answer = encode_many([question_prompt(record["question"]), " " + str(record["target"]).strip()])
        group.append(QASample(task, np.concatenate([context, prompt]), answer, record["question"],
                              str(record["target"]), len(context) + len(prompt) + len(answer)))
    out = []
    for group in groups.values():
        mean = round(sum(s.length for s in group) / len(group))
        out += [QASample(s.task, s.prompt, s.answer, s.question, s.target, mean) for s in group]
    return out


def prep_samples(data_dir: str, lengths: list[int] | None, segment_len: int, limit: int) -> list[QASample]:
    """The test split of a babilong prep folder (samples of ``lengths`` only, when given)."""
    split = open_split(data_dir, "test")
    if "n_segments" not in split.column_names:
        raise UserError(f"eval.babilong.source {data_dir} is not a babilong prep folder (its samples have no question)")
    counts: dict[tuple[str, int], int] = {}
    out = []
    for row in split.with_format("numpy"):
        n = int(row["n_segments"])
        key = (str(row["task"]), n)
        if (lengths and n not in lengths) or counts.get(key, 0) >= limit:
            continue
        counts[key] = counts.get(key, 0) + 1
        ids, answer_mask = row["input_ids"][:n * segment_len], row["recall_mask"][:n * segment_len].astype(bool)
        out.append(QASample(key[0], ids[~answer_mask], ids[answer_mask], str(row["question"]), str(row["target"]),
                            n * segment_len))
    return out


def generated_samples(data, tokenizer_dir: Path, lengths: list[int], count: int) -> list[QASample]:
    """Fresh test-split samples of the run's babilong generator at any lengths (segments)."""
    encoder = Encoder(tokenizer_dir)
    maker = SampleMaker(data, encoder.encode_many, describe(tokenizer_dir).eos_token_id,
                        load_backgrounds(data, encoder.encode_many, splits=("test",)))
    out = []
    for s in maker.samples("test", lengths, count, data.segment_len):
        mask = s.answer_mask.astype(bool)
        out.append(QASample(s.task, s.input_ids[~mask], s.input_ids[mask], s.question, s.target, len(s.input_ids)))
    return out


# --- the model loop ------------------------------------------------------------------------------


def answer_model(model, samples: list[QASample], batch_size: int, max_new_tokens: int,
                 decode: Callable[[list[int]], str], eos_id: int, pad_id: int) -> list[tuple[bool | None, bool | None]]:
    """(generation right, teacher-forced right) per sample; None where the model's positions do not
    reach (``full`` attention over a context longer than the decoder)."""
    results: list[tuple[bool | None, bool | None]] = [(None, None)] * len(samples)
    by_prompt: dict[int, list[int]] = {}
    for i, s in enumerate(samples):
        by_prompt.setdefault(len(s.prompt), []).append(i)
    with torch.no_grad():
        for prompt_len, members in sorted(by_prompt.items()):
            for start in range(0, len(members), batch_size):
                chunk = members[start:start + batch_size]
                prompts = torch.as_tensor(np.stack([samples[i].prompt for i in chunk]), dtype=torch.long)
                generated = _generate(model, prompts, max_new_tokens, eos_id)
                forced = _teacher_forced(model, [samples[i] for i in chunk], pad_id)
                for j, i in enumerate(chunk):
                    s = samples[i]
                    right = None
                    if generated is not None:
                        new = generated[j, prompt_len:].tolist()
                        new = new[:new.index(eos_id)] if eos_id in new else new
                        right = score_answer(decode(new), s.target, s.question, task_labels(s.task) or (s.target,))
                    results[i] = (right, None if forced is None else bool(forced[j]))
    return results


def _generate(model, prompts, max_new_tokens: int, eos_id: int):
    try:
        return model.generate(prompts, max_new_tokens=max_new_tokens, eos_token_id=eos_id)
    except ValueError as err:  # positions: full attention past max_positions
        if "position" in str(err):
            return None
        raise


def _teacher_forced(model, samples: list[QASample], pad_id: int):
    """[B] bool: argmax at every answer position is the answer token (rows share the prompt length)."""
    seg = model.config.segment_len
    total = max(len(s.prompt) + len(s.answer) for s in samples)
    if model.config.memory_kind == "full":
        if total > model.config.max_positions:
            return None
        padded = total
    else:
        padded = seg * math.ceil(total / seg)
    ids = torch.full((len(samples), padded), pad_id, dtype=torch.long)
    for j, s in enumerate(samples):
        ids[j, :len(s.prompt) + len(s.answer)] = torch.as_tensor(np.concatenate([s.prompt, s.answer]))
    predicted = model(input_ids=ids).logits.argmax(-1)
    right = []
    for j, s in enumerate(samples):
        p = len(s.prompt)
        right.append(bool((predicted[j, p - 1:p - 1 + len(s.answer)] == ids[j, p:p + len(s.answer)]).all()))
    return right


def answer_accuracy_by_task(model, dataset, segment_len: int, batch_size: int, per_length: int) -> dict[str, float]:
    """Teacher-forced answer accuracy per task on the first ``per_length`` QA samples of each length of a
    prep split (the periodic eval during training). Every rank makes the same calls on the same samples
    (ZeRO-3 gathers parameters collectively), so every rank gets the same numbers without a reduce."""
    lengths = np.asarray(dataset["n_segments"])
    right: dict[str, list[bool]] = {}
    device = getattr(model, "device", None) or next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for n in np.unique(lengths):
                members = np.flatnonzero(lengths == n)[:per_length].tolist()
                for start in range(0, len(members), batch_size):
                    rows = dataset[members[start:start + batch_size]]
                    ids = torch.as_tensor(np.stack(rows["input_ids"])[:, :n * segment_len], dtype=torch.long)
                    answer = torch.as_tensor(np.stack(rows["recall_mask"])[:, :n * segment_len]).bool()
                    predicted = model(input_ids=ids.to(device)).logits.argmax(-1).cpu()
                    hit = (predicted[:, :-1] == ids[:, 1:]) | ~answer[:, 1:]
                    for task, ok in zip(rows["task"], hit.all(dim=1).tolist()):
                        right.setdefault(str(task), []).append(ok)
    finally:
        model.train(was_training)
    return {task: sum(oks) / len(oks) for task, oks in sorted(right.items())}
