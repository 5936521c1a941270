"""``memtrain prep`` of ``data.source: babilong:<tasks>``: tokenizer, QA sample shards, manifest.

One process does it all (generating is cheap next to training on it), so the output is the same for
any ``data.workers``. Shards: ``<split>/len-NNNN.arrow``, one per (split, length), rows padded to the
longest length (``pad_token_id``, loss_mask 0) with the usual columns plus ``n_segments``, ``task``,
``question`` and ``target``; ``recall_mask`` marks the answer tokens. ``loss_mask`` is the answer
tokens (``data.babilong.loss: answer``) or every real token (``lm+answer``).
"""

from __future__ import annotations

import hashlib
import json
import time
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from data_prep import plan as plans
from data_prep.atomic import write_json
from data_prep.babi import TASKS, generate_stories, parse_tasks
from data_prep.babilong import (PROMPT, Sample, SampleMaker, background_texts, load_backgrounds, question_prompt,
                                split_stories)
from data_prep.errors import UserError
from data_prep.manifest import MANIFEST, SCHEMA_VERSION
from data_prep.result import PrepResult
from data_prep.samples import SPLITS
from data_prep.shards import arrow_schema, write_shard
from data_prep.tokenizer import Encoder, describe, install_tokenizer, train_sentencepiece, training_lines

EXTRA_COLUMNS = (("n_segments", "int32"), ("task", "string"), ("question", "string"), ("target", "string"))


def qa_schema(sample_len: int):
    """The shard schema plus the QA columns (HF feature metadata included)."""
    base = arrow_schema(sample_len)
    meta = json.loads(base.metadata[b"huggingface"])
    for name, dtype in EXTRA_COLUMNS:
        base = base.append(pa.field(name, getattr(pa, dtype)()))
        meta["info"]["features"][name] = {"dtype": dtype, "_type": "Value"}
    return base.with_metadata({"huggingface": json.dumps(meta)})


def shard_payload(samples: list[Sample], sample_len: int, pad_id: int, answer_only: bool) -> bytes:
    n = len(samples)
    ids = np.full((n, sample_len), pad_id, dtype=np.int32)
    loss = np.zeros((n, sample_len), dtype=np.int8)
    answer = np.zeros((n, sample_len), dtype=np.int8)
    for row, s in enumerate(samples):
        length = len(s.input_ids)
        ids[row, :length] = s.input_ids
        answer[row, :length] = s.answer_mask
        loss[row, :length] = s.answer_mask if answer_only else 1
    fixed = lambda a: pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), sample_len)  # noqa: E731
    schema = qa_schema(sample_len)
    table = pa.Table.from_arrays([
        fixed(ids), fixed(loss), fixed(answer), pa.array([s.book_id for s in samples], pa.string()),
        pa.array(np.arange(n, dtype=np.int32)), pa.array([s.n_segments for s in samples], pa.int32()),
        pa.array([s.task for s in samples], pa.string()), pa.array([s.question for s in samples], pa.string()),
        pa.array([s.target for s in samples], pa.string()),
    ], schema=schema)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as writer:
        writer.write_table(table, max_chunksize=1024)
    return sink.getvalue().to_pybytes()


def prepare_babilong(cfg, shard_index: int | None, num_shards: int | None):
    """The whole babilong prep of ``cfg``; returns a ``PrepResult``."""
    started = time.perf_counter()
    data, bl = cfg.data, cfg.data.babilong
    if num_shards not in (None, 1):
        raise UserError("babilong prep runs as one job (it generates its samples); drop --num-shards")
    tasks = parse_tasks(data.source.partition(":")[2])
    data_dir = Path(data.output_dir)
    settings = plans.settings_of(data)
    existing = plans.check_output_dir(data_dir, settings)
    if existing is not None and (data_dir / MANIFEST).is_file():
        manifest = json.loads((data_dir / MANIFEST).read_text())
        return PrepResult(data_dir, manifest, manifest, manifest["shards"], seconds=time.perf_counter() - started)

    needs = {"train": bl.train_samples * len(bl.lengths), "val": bl.val_samples * len(bl.lengths),
             "test": bl.test_samples * len(bl.lengths)}
    books = list(background_texts(data))
    stories = split_stories(data, tasks, {"train": needs["train"]})["train"]
    tokenizer_dir = data_dir / "tokenizer"
    data_dir.mkdir(parents=True, exist_ok=True)
    if data.tokenizer is not None:
        install_tokenizer(data.tokenizer, tokenizer_dir)
    else:
        # the train stories plus a fixed sample of every task: bAbI's words get pieces of their own
        vocabulary = [s for task in TASKS for s in islice(generate_stories(task, 0, 2, 10), 400)]
        pool = [s for pool in stories.values() for s in pool[:5000]] + vocabulary
        story_text = "\n".join(" ".join([*s.facts, question_prompt(s.question), s.answer + "."]) for s in pool)
        texts = [story_text] + [text for split, _, text in books if split == "train"]
        train_sentencepiece(training_lines(texts), data, tokenizer_dir)
    info = describe(tokenizer_dir)
    encoder = Encoder(tokenizer_dir)
    backgrounds = load_backgrounds(data, encoder.encode_many, books=books)
    maker = SampleMaker(data, encoder.encode_many, info.eos_token_id, backgrounds)

    records, counts, tokens = [], {}, 0
    for split in SPLITS:
        count = {"train": bl.train_samples, "val": bl.val_samples, "test": bl.test_samples}[split]
        if count == 0:
            continue
        samples = list(maker.samples(split, bl.lengths, count, data.segment_len))
        for n in bl.lengths:
            mine = [s for s in samples if s.n_segments == n]
            payload = shard_payload(mine, data.sample_len, info.pad_token_id, bl.loss == "answer")
            n_tokens = int(sum(len(s.input_ids) for s in mine))
            tokens += n_tokens
            record = {"split": split, "n_samples": len(mine), "n_tokens": n_tokens, "recall_samples": len(mine),
                      "n_segments": n}
            records.append(write_shard(data_dir, f"{split}/len-{n:04d}.arrow", payload, record))
            counts.setdefault(split, {})[str(n)] = len(mine)
    manifest = _manifest(data, settings, info, records, counts, books, tasks)
    write_json(data_dir / MANIFEST, manifest)
    return PrepResult(data_dir, manifest, manifest, records, written=len(records), tokens_encoded=tokens,
                      seconds=time.perf_counter() - started)


def _manifest(data, settings: dict[str, Any], info, records: list[dict[str, Any]], counts: dict[str, dict[str, int]],
              books: list[tuple[str, str, str]], tasks: list[str]) -> dict[str, Any]:
    fingerprint = hashlib.sha256()
    for split, book_id, text in books:
        fingerprint.update(f"{split}\0{book_id}\0{hashlib.sha256(text.encode()).hexdigest()}\n".encode())
    fingerprint.update(json.dumps(data.babilong.model_dump()).encode())
    per_split = lambda key: {s: sum(r[key] for r in records if r["split"] == s) for s in SPLITS}  # noqa: E731
    return {
        "schema_version": SCHEMA_VERSION, "segment_len": data.segment_len, "n_segments": data.n_segments,
        "sample_len": data.sample_len, "tail": data.tail, "vocab_size": info.vocab_size,
        "bos_token_id": info.bos_token_id, "eos_token_id": info.eos_token_id, "pad_token_id": info.pad_token_id,
        "tokenizer_hash": info.hash, "tokenizer_kind": info.kind,
        "counts": per_split("n_samples"), "tokens": per_split("n_tokens"), "recall_samples": per_split("n_samples"),
        "books": {"read": len(books), "used": len(books), "skipped": {}},
        "shards": [{k: r[k] for k in ("split", "path", "n_samples", "n_tokens", "sha256", "bytes", "n_segments")}
                   for r in records],
        "source": data.source, "source_fingerprint": fingerprint.hexdigest(), "settings": settings,
        "babilong": {"tasks": tasks, "lengths": data.babilong.lengths, "counts": counts, "prompt": PROMPT,
                     "generator": data.babilong.model_dump(),
                     "background_books": {s: sum(1 for b in books if b[0] == s) for s in SPLITS}},
    }
