"""Arrow shard files: written atomically with a sidecar record, opened as one memory-mapped split.

A shard is an Arrow IPC stream with the HF ``datasets`` feature metadata, so
``datasets.Dataset.from_file`` memory-maps it. Columns: ``input_ids`` (int32 x S), ``loss_mask``
(int8 x S), ``recall_mask`` (int8 x S), ``book_id`` (string), ``sample_index`` (int32). Writing
goes to a hidden temporary file that is renamed into place; then ``shard-NNNNN.json`` records its
sha256 and counts. A shard counts as done only when both exist and the checksum matches.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from data_prep.atomic import write_bytes, write_json
from data_prep.errors import UserError
from data_prep.manifest import read_manifest
from data_prep.samples import BookSamples

BATCH_ROWS = 1024  # rows per Arrow record batch; fixed so the bytes never depend on the run


def arrow_schema(sample_len: int):
    """The shard schema, with the HF ``datasets`` features in its metadata (written by hand: prep
    does not import ``datasets``, seconds of import time)."""
    tokens = lambda dtype: {"feature": {"dtype": dtype, "_type": "Value"}, "length": sample_len, "_type": "List"}  # noqa: E731
    hf_features = {"input_ids": tokens("int32"), "loss_mask": tokens("int8"), "recall_mask": tokens("int8"),
                   "book_id": {"dtype": "string", "_type": "Value"},
                   "sample_index": {"dtype": "int32", "_type": "Value"}}
    return pa.schema([
        ("input_ids", pa.list_(pa.int32(), sample_len)), ("loss_mask", pa.list_(pa.int8(), sample_len)),
        ("recall_mask", pa.list_(pa.int8(), sample_len)), ("book_id", pa.string()), ("sample_index", pa.int32()),
    ], metadata={"huggingface": json.dumps({"info": {"features": hf_features}})})


def shard_bytes(books: list[tuple[str, BookSamples]], sample_len: int) -> bytes:
    """The Arrow stream of one shard holding ``books`` ([(book_id, samples)]) in order."""
    schema = arrow_schema(sample_len)
    cat = lambda name, dtype: np.concatenate(  # noqa: E731
        [getattr(s, name).reshape(-1) for _, s in books] or [np.zeros(0, dtype)])
    fixed = lambda name, dtype: pa.FixedSizeListArray.from_arrays(pa.array(cat(name, dtype)), sample_len)  # noqa: E731
    table = pa.Table.from_arrays([
        fixed("input_ids", np.int32), fixed("loss_mask", np.int8), fixed("recall_mask", np.int8),
        pa.array([book_id for book_id, s in books for _ in range(len(s))], pa.string()),
        pa.array(np.concatenate([np.arange(len(s), dtype=np.int32) for _, s in books] or [np.zeros(0, np.int32)])),
    ], schema=schema)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema) as writer:
        writer.write_table(table, max_chunksize=BATCH_ROWS)
    return sink.getvalue().to_pybytes()


def write_shard(data_dir: Path, rel_path: str, payload: bytes, record: dict[str, Any]) -> dict[str, Any]:
    """Atomically write the shard, then its sidecar; returns the record with sha256 and bytes."""
    record = {**record, "path": rel_path, "sha256": hashlib.sha256(payload).hexdigest(), "bytes": len(payload)}
    path = data_dir / rel_path
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(path, payload)
    write_json(sidecar_path(path), record)
    return record


def done_record(data_dir: Path, rel_path: str, unit_key: str) -> dict[str, Any] | None:
    """The sidecar record of a finished shard for this unit, or None if it must be (re)written."""
    path = data_dir / rel_path
    try:
        record = json.loads(sidecar_path(path).read_text())
    except (OSError, ValueError):
        return None
    if record.get("unit_key") != unit_key or not path.is_file() or path.stat().st_size != record.get("bytes"):
        return None
    return record if file_sha256(path) == record.get("sha256") else None


def sidecar_path(path: Path) -> Path:
    return path.with_suffix(".json")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def open_split(data_dir: str | Path, split: str, verify: bool = False):
    """The split's shards as one memory-mapped ``datasets.Dataset`` (checked against the manifest:
    every shard present with its recorded size and row count; ``verify`` also checks sha256)."""
    import datasets  # lazy: only reading needs it, prep never (seconds of import)

    data_dir = Path(data_dir)
    manifest = read_manifest(data_dir)
    if split not in manifest["counts"]:
        raise UserError(f"no split {split!r} in {data_dir} (splits: {', '.join(manifest['counts'])})")
    parts = []
    for shard in (s for s in manifest["shards"] if s["split"] == split):
        path = data_dir / shard["path"]
        if not path.is_file() or path.stat().st_size != shard["bytes"]:
            raise UserError(f"shard {path} is missing or has the wrong size; run memtrain prep again")
        if verify and file_sha256(path) != shard["sha256"]:
            raise UserError(f"shard {path} does not match its checksum in the manifest; run memtrain prep again")
        part = datasets.Dataset.from_file(str(path))
        if len(part) != shard["n_samples"]:
            raise UserError(f"shard {path} holds {len(part)} samples, the manifest says {shard['n_samples']}")
        parts.append(part)
    if not parts:
        empty = arrow_schema(manifest["sample_len"]).empty_table()
        return datasets.Dataset(empty)
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
