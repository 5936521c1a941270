"""``prepare(cfg)``: books -> plan -> tokenizer -> shards -> manifest.

Passes over the corpus (each in ``data.workers`` processes, results in source order):
1. plan: read and clean every book, hash it (dedup, skip reasons, source fingerprint), assign
   splits;
2. tokenizer (only when training): SentencePiece on lines of the used books;
3. encode: tokenize the books of the shards still to write, cut samples, write shards.
A single run then merges (writes manifest.json). With ``--shard-index i --num-shards N``, task 0
makes the plan and the tokenizer while the other tasks wait for ``plan.json``; task i writes
shards i, i+N, ... and its partial manifest; ``memtrain prep merge DIR`` writes the manifest.
"""

from __future__ import annotations

import time
from itertools import islice
from pathlib import Path
from typing import Any, Callable

from data_prep import plan as plans
from data_prep.babilong_prep import prepare_babilong
from data_prep.manifest import merge, write_part
from data_prep.plan import ShardBook
from data_prep.result import PrepResult
from data_prep.samples import SPLITS
from data_prep.shards import done_record, shard_bytes, write_shard
from data_prep.sources import check_source, iter_refs
from data_prep.tokenizer import (Encoder, check_agreement, describe, install_tokenizer, train_sentencepiece,
                                 training_lines)
from data_prep import work
from data_prep.errors import UserError

ESTIMATE_BYTES = 1 << 18  # text encoded to estimate tokens per byte for the shard layout


Progress = Callable[[str, int | None], Callable[[int], None]]


def _no_progress(stage: str, total: int | None) -> Callable[[int], None]:
    return lambda n: None


def prepare(cfg, shard_index: int | None = None, num_shards: int | None = None,
            progress: Progress = _no_progress) -> PrepResult:
    """Run prep for ``cfg`` (an ExperimentConfig); the whole corpus, or one array task's slice."""
    if cfg.data.source.startswith("babilong:"):
        return prepare_babilong(cfg, shard_index, num_shards)
    started = time.perf_counter()
    data = cfg.data
    task, tasks = _check_array_args(shard_index, num_shards)
    data_dir = Path(data.output_dir)
    check_source(data)
    settings = plans.settings_of(data)
    timings: dict[str, float] = {}
    if task == 0:
        plan = plans.check_output_dir(data_dir, settings)
        if plan is None:
            try:
                plan = _make_plan(data, data_dir, settings, progress, timings)
            except UserError as err:
                if tasks > 1:
                    plans.record_failure(data_dir, str(err))
                raise
            plans.write_plan(data_dir, plan)
        plans.clear_failure(data_dir)
    else:
        plan = plans.wait_for_plan(data_dir, settings, data.plan_wait_s)

    t0 = time.perf_counter()
    mine = [unit for k, unit in enumerate(plan["shards"]) if k % tasks == task]
    records, written, tokens = _write_shards(data, data_dir, mine, progress)
    write_part(data_dir, task, tasks, records)
    timings["encode"] = time.perf_counter() - t0
    manifest = merge(data_dir) if tasks == 1 else None
    return PrepResult(data_dir, plan, manifest, records, written, tokens, time.perf_counter() - started, timings)


def _check_array_args(shard_index: int | None, num_shards: int | None) -> tuple[int, int]:
    if (shard_index is None) != (num_shards is None):
        raise UserError("--shard-index and --num-shards go together")
    if num_shards is None:
        return 0, 1
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise UserError(f"--shard-index must be in [0, --num-shards); got {shard_index} of {num_shards}")
    return shard_index, num_shards


def _make_plan(data, data_dir: Path, settings: dict[str, Any], progress: Progress,
               timings: dict[str, float]) -> dict[str, Any]:
    t0 = time.perf_counter()
    with work.pool(data, None) as imap:
        tick = progress("read", None)
        books = (tick(1) or b for b in imap(work.plan_book, iter_refs(data)))
        plan = plans.build_plan(books, data, settings)
        timings["plan"] = time.perf_counter() - t0
        tokenizer_dir = data_dir / "tokenizer"
        data_dir.mkdir(parents=True, exist_ok=True)
        wanted = {b["index"] for b in plan["used"]}
        t0 = time.perf_counter()
        if data.tokenizer is not None:
            install_tokenizer(data.tokenizer, tokenizer_dir)
        else:
            tick = progress("tokenizer", len(wanted))
            texts = (tick(1) or t for t in imap(work.text_or_none, iter_refs(data, wanted)) if t is not None)
            train_sentencepiece(training_lines(texts), data, tokenizer_dir)
            _check_tokenizer(data, tokenizer_dir, wanted)
        timings["tokenizer"] = time.perf_counter() - t0
    info = describe(tokenizer_dir)
    plans.assign_shards(plan, info, _tokens_per_byte(data, tokenizer_dir, wanted), data)
    return plan


def _check_tokenizer(data, tokenizer_dir: Path, wanted: set[int]) -> None:
    work.init(data, None)
    texts = (work.text_or_none(ref) for ref in iter_refs(data, wanted))
    lines = list(islice(training_lines(t for t in texts if t is not None), 2000))
    check_agreement(tokenizer_dir, lines)


def _tokens_per_byte(data, tokenizer_dir: Path, wanted: set[int]) -> float:
    """Tokens per UTF-8 byte on the first ~256 KB of the corpus (only used to size shards)."""
    work.init(data, None)
    encoder = Encoder(tokenizer_dir)
    n_bytes = n_tokens = 0
    for ref in iter_refs(data, wanted):
        text = work.text_or_none(ref)
        if text is None:
            continue
        text = text[:ESTIMATE_BYTES]
        n_bytes += len(text.encode())
        n_tokens += len(encoder.encode(text))
        if n_bytes >= ESTIMATE_BYTES:
            break
    return n_tokens / max(n_bytes, 1)


def _write_shards(data, data_dir: Path, units: list[dict[str, Any]],
                  progress: Progress) -> tuple[list[dict[str, Any]], int, int]:
    """Encode and write the shards among ``units`` that are not already done; their records."""
    records: dict[str, dict[str, Any]] = {}
    todo = []
    for unit in units:
        record = done_record(data_dir, unit["path"], unit["unit_key"])
        if record is None:
            todo.append(unit)
        else:
            records[unit["path"]] = record
    plan_path = data_dir / plans.PLAN
    books_of = {unit["path"]: [ShardBook.of(entry, plan_path) for entry in unit["books"]] for unit in todo}
    owner = {book.index: unit for unit in todo for book in books_of[unit["path"]]}
    planned_of = {book.index: book for books in books_of.values() for book in books}
    pending = {unit["path"]: [] for unit in todo}
    written = tokens = 0
    tick = progress("encode", len(owner))
    if owner:
        with work.pool(data, str(data_dir / "tokenizer")) as imap:
            for book in imap(work.encode_book, iter_refs(data, set(owner))):
                tick(1)
                unit = owner[book.index]
                planned = planned_of[book.index]
                if book.samples is None or book.sha256 != planned.sha256:
                    raise UserError(f"book {planned.book_id} changed since {data_dir / plans.PLAN} was made "
                                    f"({book.reason or 'new content'}); delete {data_dir} and prepare again")
                done = pending[unit["path"]]
                done.append((planned.book_id, book.samples))
                tokens += book.n_tokens
                if len(done) == len(unit["books"]):
                    records[unit["path"]] = _write_unit(data, data_dir, unit, done)
                    del pending[unit["path"]]
                    written += 1
    if pending:
        raise UserError(f"{len(pending)} shards got no books from {data.source}; did the source change?")
    return [records[unit["path"]] for unit in units], written, tokens


def _write_unit(data, data_dir: Path, unit: dict[str, Any], books: list) -> dict[str, Any]:
    record = {
        "split": unit["split"], "unit_key": unit["unit_key"], "n_books": len(books),
        "n_samples": sum(len(s) for _, s in books),
        "n_tokens": int(sum(int(s.loss_mask.sum()) for _, s in books)),
        "too_short": sum(1 for _, s in books if len(s) == 0),
        "recall_samples": int(sum(int(s.recall_mask.any(axis=1).sum()) for _, s in books)),
    }
    return write_shard(data_dir, unit["path"], shard_bytes(books, data.sample_len), record)


def summary_line(result: PrepResult) -> str:
    """One line: books read/used/skipped by reason, tokens, samples per split, tokens/s."""
    source = result.manifest or result.plan
    books = source["books"]
    skipped = ", ".join(f"{n} {reason}" for reason, n in books["skipped"].items())
    counts = {s: sum(r["n_samples"] for r in result.records if r["split"] == s) for s in SPLITS}
    recall = sum(r["recall_samples"] for r in result.records)
    total = sum(counts.values())
    rate = result.tokens_encoded / result.seconds if result.seconds else 0.0
    parts = [f"books: {books['read']} read, {books['used']} used" + (f", skipped {skipped}" if skipped else ""),
             f"tokens: {sum(r['n_tokens'] for r in result.records):,}",
             "samples: " + " ".join(f"{s}={counts[s]}" for s in SPLITS)]
    if recall:
        parts.append(f"samples with recall tokens: {recall / max(total, 1):.1%}")
    parts.append(f"{result.written} shards written, {len(result.records) - result.written} already done")
    parts.append(f"{rate:,.0f} tokens/s ({result.seconds:.1f} s)")
    return "; ".join(parts) + f" -> {result.data_dir}"
