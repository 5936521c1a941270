"""Shard verification at train and eval start: every shard of the splits a run reads is the file the
manifest recorded (size and sha256), holds as many samples of the manifest's length as it says, and
only token ids inside the vocabulary.

Hashing a large corpus takes minutes, so each shard's verdict is recorded in ``.verified.json``
beside the manifest, keyed by the shard's recorded sha256 and its current size and mtime: a shard is
read again only when it changed. A data folder that cannot be written (shared, read-only) is simply
verified every time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.compute as pc

from data_prep.atomic import write_json
from data_prep.errors import UserError
from data_prep.shards import file_sha256

VERIFIED = ".verified.json"
REPREP = "run memtrain prep again with the same config (it rewrites only the damaged shards)"


def verify_splits(data_dir: str | Path, manifest: dict[str, Any], splits: Iterable[str], vocab_size: int) -> None:
    """UserError naming the first damaged shard of ``splits``; records the verdicts it computed."""
    data_dir = Path(data_dir)
    if manifest["segment_len"] * manifest["n_segments"] != manifest["sample_len"]:
        raise UserError(f"{data_dir / 'manifest.json'} is inconsistent: segment_len {manifest['segment_len']} x "
                        f"n_segments {manifest['n_segments']} != sample_len {manifest['sample_len']}; {REPREP}")
    cache_path = data_dir / VERIFIED
    cache = _read_cache(cache_path)
    wanted = set(splits)
    fresh = False
    for shard in manifest["shards"]:
        if shard["split"] not in wanted:
            continue
        path = data_dir / shard["path"]
        try:
            stat = path.stat()
        except OSError:
            raise UserError(f"shard {path} is missing; {REPREP}") from None
        if stat.st_size != shard["bytes"]:
            raise UserError(f"shard {path} is damaged: {stat.st_size} bytes, the manifest says {shard['bytes']}; "
                            f"{REPREP}")
        key = [shard["sha256"], stat.st_size, stat.st_mtime_ns]
        facts = cache.get(shard["path"])
        if facts is None or facts.get("key") != key:
            facts = {"key": key, **_read_facts(path, shard["sha256"])}
            cache[shard["path"]] = facts
            fresh = True
        _check_facts(path, facts, shard, manifest["sample_len"], vocab_size)
    if fresh:
        try:
            write_json(cache_path, cache)
        except OSError:
            pass  # a read-only data folder: verified again next time


def _read_facts(path: Path, sha256: str) -> dict[str, Any]:
    """sha256 verdict, rows, sample length and largest token id of one shard (one full read)."""
    if file_sha256(path) != sha256:
        raise UserError(f"shard {path} is damaged: its sha256 does not match the manifest; {REPREP}")
    with pa.memory_map(str(path)) as source:
        table = pa.ipc.open_stream(source).read_all()
    column = table.column("input_ids")
    max_id = pc.max(pc.list_flatten(column)).as_py() if table.num_rows else -1
    return {"rows": table.num_rows, "sample_len": column.type.list_size, "max_token_id": max_id}


def _check_facts(path: Path, facts: dict[str, Any], shard: dict[str, Any], sample_len: int, vocab_size: int) -> None:
    if facts["rows"] != shard["n_samples"]:
        raise UserError(f"shard {path} holds {facts['rows']} samples, the manifest says {shard['n_samples']}; {REPREP}")
    if facts["sample_len"] != sample_len:
        raise UserError(f"shard {path} holds samples of {facts['sample_len']} tokens, the manifest says "
                        f"sample_len={sample_len}; {REPREP}")
    if facts["max_token_id"] >= vocab_size:
        raise UserError(f"shard {path} holds token id {facts['max_token_id']}, outside the tokenizer's "
                        f"{vocab_size} tokens; {REPREP}")


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}
