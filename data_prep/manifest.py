"""``manifest.json``: what the shards hold, written last (so a half-done prep has none).

Partial manifests (``parts/part-IIIII-of-NNNNN.json``) list the shards one array task wrote;
``merge`` checks that every shard of the plan is there and writes the final manifest. A single
run goes through the same merge, so both give the same file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from data_prep.atomic import write_json
from data_prep.clean import TOO_SHORT
from data_prep.errors import UserError
from data_prep.plan import read_plan
from data_prep.samples import SPLITS

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


class ShardRecord(BaseModel):
    split: str
    path: str
    n_samples: int = Field(ge=0)
    n_tokens: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class Manifest(BaseModel):
    """The facts of ``manifest.json`` that train and eval rely on (other keys are descriptive).
    Readers keep the plain dict; this is its contract, checked on read."""

    model_config = ConfigDict(extra="allow")

    schema_version: Literal[1]
    segment_len: int = Field(ge=1)
    n_segments: int = Field(ge=1)
    sample_len: int = Field(ge=1)
    vocab_size: int = Field(ge=1)
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    tokenizer_hash: str
    counts: dict[str, int]
    shards: list[ShardRecord]
    source_fingerprint: str


def read_manifest(data_dir: str | Path) -> dict[str, Any]:
    """The manifest of a finished prep; UserError if it is missing, unreadable or incomplete."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise UserError(f"no {MANIFEST} in {data_dir}: run memtrain prep (or prep merge) first")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path} is not valid JSON: {err}") from None
    if isinstance(manifest, dict) and manifest.get("schema_version", SCHEMA_VERSION) != SCHEMA_VERSION:
        raise UserError(f"{path} has schema_version {manifest['schema_version']}, this memtrain reads {SCHEMA_VERSION}")
    try:
        Manifest.model_validate(manifest)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "file"
        what = "lacks" if first["type"] == "missing" else "has a bad"
        raise UserError(f"{path} {what} {where} ({first['msg']}); run memtrain prep again") from None
    return manifest


def part_path(data_dir: Path, shard_index: int, num_shards: int) -> Path:
    return data_dir / "parts" / f"part-{shard_index:05d}-of-{num_shards:05d}.json"


def write_part(data_dir: Path, shard_index: int, num_shards: int, records: list[dict[str, Any]]) -> None:
    path = part_path(data_dir, shard_index, num_shards)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, {"shard_index": shard_index, "num_shards": num_shards, "shards": records})


def merge(data_dir: str | Path) -> dict[str, Any]:
    """Check that every planned shard was written (by any task) and write ``manifest.json``."""
    data_dir = Path(data_dir)
    plan = read_plan(data_dir)
    written: dict[str, dict[str, Any]] = {}
    for part in sorted((data_dir / "parts").glob("part-*.json")):
        for record in json.loads(part.read_text())["shards"]:
            written[record["unit_key"]] = record
    records, missing = [], []
    for unit in plan["shards"]:
        record = written.get(unit["unit_key"])
        path = data_dir / unit["path"]
        if record is None or not path.is_file() or path.stat().st_size != record["bytes"]:
            missing.append(unit["path"])
        else:
            records.append(record)
    if missing:
        raise UserError(f"{len(missing)} of {len(plan['shards'])} shards are not done (first: {missing[0]}); "
                        f"run the missing prep array tasks again, then merge")
    manifest = build_manifest(plan, records)
    if not sum(manifest["counts"].values()):
        used = plan["books"]["used"]
        raise UserError(f"no samples: all {used} usable books are shorter than one sample "
                        f"({plan['settings']['shape']['sample_len']} tokens); lower data.n_segments or "
                        f"data.segment_len, or set data.tail=pad")
    write_json(data_dir / MANIFEST, manifest)
    return manifest


def build_manifest(plan: dict[str, Any], records: list[dict[str, Any]]) -> dict[str, Any]:
    shape, tok = plan["settings"]["shape"], plan["tokenizer"]
    per_split = lambda key: {s: sum(r[key] for r in records if r["split"] == s) for s in SPLITS}  # noqa: E731
    counts, recall = per_split("n_samples"), per_split("recall_samples")
    skipped = dict(plan["books"]["skipped"])
    too_short = sum(r["too_short"] for r in records)
    if too_short:
        skipped[TOO_SHORT] = too_short
    return {
        "schema_version": SCHEMA_VERSION,
        "segment_len": shape["segment_len"], "n_segments": shape["n_segments"],
        "sample_len": shape["sample_len"], "tail": shape["tail"],
        "vocab_size": tok["vocab_size"], "bos_token_id": tok["bos_token_id"],
        "eos_token_id": tok["eos_token_id"], "pad_token_id": tok["pad_token_id"],
        "tokenizer_hash": tok["hash"], "tokenizer_kind": tok["kind"],
        "counts": counts, "tokens": per_split("n_tokens"), "recall_samples": recall,
        "recall_sample_fraction": {s: round(recall[s] / counts[s], 4) if counts[s] else 0.0 for s in SPLITS},
        "books": {"read": plan["books"]["read"], "used": plan["books"]["used"] - too_short, "skipped": skipped},
        "shards": [{k: r[k] for k in ("split", "path", "n_samples", "n_tokens", "sha256", "bytes")} for r in records],
        "source": plan["settings"]["corpus"]["source"], "source_fingerprint": plan["source_fingerprint"],
        "settings": plan["settings"],
    }
