"""``plan.json``: every book's fate (used, or skipped and why), its split, and the shard it goes to.

The plan is made once (by a single run, or by array task 0 while the other tasks wait for it) and
fixes the output: shard k of a split always holds the same books, so any set of tasks writes
the same files. It also records the settings the shards depend on, which is how an output
folder made with another tokenizer, sample shape or source is recognised.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Iterable, NamedTuple

from data_prep.atomic import write_json
from data_prep.clean import DUPLICATE
from data_prep.errors import UserError
from data_prep.samples import SPLITS, split_of, split_score
from data_prep.tokenizer import TokenizerInfo, folder_hash
from data_prep.work import PlannedBook

PLAN, FAILED = "plan.json", "plan.failed"


def settings_of(data) -> dict[str, Any]:
    """What the shards depend on, in three groups that errors can name."""
    if data.tokenizer is not None:
        tokenizer = {"folder": folder_hash(Path(data.tokenizer)) if Path(data.tokenizer).is_dir() else data.tokenizer}
    else:
        tokenizer = {k: getattr(data, k) for k in ("vocab_size", "tokenizer_type", "byte_fallback",
                                                   "tokenizer_sample_sentences", "tokenizer_threads", "seed")}
    corpus = {k: getattr(data, k) for k in ("source", "text_field", "seed", "val_fraction", "test_fraction",
                                            "samples_per_shard")}
    if data.source.startswith("synthetic:"):
        corpus["synthetic"] = data.synthetic.model_dump()
    if data.source.startswith("babilong:"):
        corpus["babilong"] = data.babilong.model_dump()
    shape = {"segment_len": data.segment_len, "n_segments": data.n_segments, "sample_len": data.sample_len,
             "tail": data.tail}
    return {"shape": shape, "tokenizer": tokenizer, "corpus": corpus}


def check_output_dir(data_dir: Path, settings: dict[str, Any]) -> dict[str, Any] | None:
    """The existing plan if it was made with these settings; UserError if the folder holds shards
    made otherwise; None for a fresh folder."""
    existing = _existing_settings(data_dir)
    if existing is None:
        return None
    if existing["shape"] != settings["shape"]:
        old = existing["shape"]
        raise UserError(f"{data_dir} holds shards of another sample shape (segment_len={old['segment_len']}, "
                        f"n_segments={old['n_segments']}, tail={old['tail']}); use another data.output_dir or delete it")
    if existing["tokenizer"] != settings["tokenizer"]:
        raise UserError(f"{data_dir} holds shards made with another tokenizer; use another data.output_dir or delete it")
    if existing["corpus"] != settings["corpus"]:
        raise UserError(f"{data_dir} holds shards of another source or split settings "
                        f"({existing['corpus']['source']}); use another data.output_dir or delete it")
    try:
        return read_plan(data_dir)
    except UserError:
        return None


def read_plan(data_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((data_dir / PLAN).read_text())
    except (OSError, ValueError):
        raise UserError(f"no readable {PLAN} in {data_dir}: run memtrain prep first") from None


def build_plan(books: Iterable[PlannedBook], data, settings: dict[str, Any]) -> dict[str, Any]:
    """Dedup, skip reasons, splits and source fingerprint from the plan pass (no shards yet)."""
    seen: set[str] = set()
    skipped: dict[str, int] = {}
    used: list[dict[str, Any]] = []
    fingerprint = hashlib.sha256()
    read = 0
    for book in books:
        read += 1
        reason = book.reason
        if reason is None and book.sha256 in seen:
            reason = DUPLICATE
        fingerprint.update(f"{book.book_id}\0{book.sha256}\0{reason}\n".encode())
        if reason is not None:
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        seen.add(book.sha256)
        split = split_of(book.book_id, data.seed, data.val_fraction, data.test_fraction)
        used.append({"index": book.index, "book_id": book.book_id, "sha256": book.sha256,
                     "n_bytes": book.n_bytes, "split": split})
    if not used:
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(skipped.items())) or "none found"
        raise UserError(f"no usable books in {data.source}: {read} read, all skipped ({reasons})")
    _ensure_eval_splits(used, data)
    return {"settings": settings, "source_fingerprint": fingerprint.hexdigest(),
            "books": {"read": read, "used": len(used), "skipped": dict(sorted(skipped.items()))}, "used": used}


def _ensure_eval_splits(used: list[dict[str, Any]], data) -> None:
    """With a val/test fraction > 0 and at least 3 books, each such split gets at least one book:
    the train book whose hash lies nearest to it (so tiny corpora still evaluate)."""
    if len(used) < 3:
        return
    for split, fraction in (("test", data.test_fraction), ("val", data.val_fraction)):
        if fraction > 0 and not any(b["split"] == split for b in used):
            train = [b for b in used if b["split"] == "train"]
            if len(train) > 1:
                min(train, key=lambda b: split_score(b["book_id"], data.seed))["split"] = split


class ShardBook(NamedTuple):
    """One book of a shard unit in plan.json. Stored as the JSON list ``[index, book_id, sha256]``
    (a NamedTuple serialises to exactly that), which is part of the unit's key."""

    index: int
    book_id: str
    sha256: str

    @classmethod
    def of(cls, entry: list[Any], plan_path: Path) -> "ShardBook":
        """A plan.json entry, checked: a malformed plan is one line, not an IndexError later."""
        if not (isinstance(entry, (list, tuple)) and len(entry) == 3 and isinstance(entry[0], int)
                and all(isinstance(x, str) for x in entry[1:])):
            raise UserError(f"{plan_path} is damaged (shard book entry {entry!r}); delete it and run memtrain prep")
        return cls(*entry)


def assign_shards(plan: dict[str, Any], tokenizer: TokenizerInfo, tokens_per_byte: float, data) -> None:
    """Group each split's books, in source order, into shards of about samples_per_shard samples."""
    plan["tokenizer"] = {"kind": tokenizer.kind, "vocab_size": tokenizer.vocab_size, "hash": tokenizer.hash,
                         "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                         "pad_token_id": tokenizer.pad_token_id}
    plan["tokens_per_byte"] = round(tokens_per_byte, 6)
    shards = []
    for split in SPLITS:
        group: list[ShardBook] = []
        estimate = 0.0
        for book in (b for b in plan["used"] if b["split"] == split):
            group.append(ShardBook(book["index"], book["book_id"], book["sha256"]))
            estimate += (book["n_bytes"] * tokens_per_byte + 2) / data.sample_len
            if estimate >= data.samples_per_shard:
                shards.append(_unit(plan, split, len([s for s in shards if s["split"] == split]), group))
                group, estimate = [], 0.0
        if group:
            shards.append(_unit(plan, split, len([s for s in shards if s["split"] == split]), group))
    plan["shards"] = shards


def _unit(plan: dict[str, Any], split: str, k: int, books: list[ShardBook]) -> dict[str, Any]:
    path = f"{split}/shard-{k:05d}.arrow"
    key = json.dumps([plan["settings"], plan["tokenizer"]["hash"], path, books], sort_keys=True)
    return {"split": split, "path": path, "books": books, "unit_key": hashlib.sha256(key.encode()).hexdigest()}


def write_plan(data_dir: Path, plan: dict[str, Any]) -> None:
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / FAILED).unlink(missing_ok=True)
    write_json(data_dir / PLAN, plan)


def record_failure(data_dir: Path, message: str) -> None:
    """Tell waiting array tasks that task 0 failed (so they stop with the same line)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    write_json(data_dir / FAILED, {"error": message, "job": os.environ.get("SLURM_ARRAY_JOB_ID")})


def clear_failure(data_dir: Path) -> None:
    (data_dir / FAILED).unlink(missing_ok=True)


def wait_for_plan(data_dir: Path, settings: dict[str, Any], timeout_s: float, poll_s: float = 2.0) -> dict[str, Any]:
    """Array tasks > 0: wait for task 0's plan (and tokenizer) to appear."""
    started = time.time()
    job = os.environ.get("SLURM_ARRAY_JOB_ID")
    while True:
        plan = check_output_dir(data_dir, settings)
        if plan is not None and "shards" in plan:
            return plan
        failed = data_dir / FAILED
        if failed.is_file():
            info = json.loads(failed.read_text())
            if (job is not None and info.get("job") == job) or (job is None and failed.stat().st_mtime >= started):
                raise UserError(f"array task 0 failed: {info['error']}")
        if time.time() - started > timeout_s:
            raise UserError(f"no {PLAN} in {data_dir} after {timeout_s:.0f} s: did array task 0 "
                            f"(memtrain prep --shard-index 0) start? (data.plan_wait_s)")
        time.sleep(poll_s)


def _existing_settings(data_dir: Path) -> dict[str, Any] | None:
    for name in (PLAN, "manifest.json"):
        try:
            return json.loads((data_dir / name).read_text())["settings"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None
