"""``data.source`` -> an ordered stream of book references; a worker turns a reference into clean text.

Sources and their book ids (the split hashes the id, so ids must be stable):

* ``synthetic:N``: N generated books (data_prep/synthetic.py), ids ``synthetic-00000``...
* a folder: every ``*.txt`` / ``*.txt.gz`` below it, sorted; id = path relative to the folder.
* a ``.txt``/``.txt.gz`` file: one book.
* a ``.jsonl`` file: one book per line in ``data.text_field``; id ``<file name>:<line number>``.
* a ``.parquet`` file (PG-19 schema: short_book_title, publication_date, url, text) and
  ``hf:<dataset id or local folder>[:split]``: one book per row; id = the row's ``url`` when
  present, else ``<name>:<row>``.

An ``hf:`` source is loaded the way ``datasets`` loads by default: downloaded once into the HF
cache (``HF_DATASETS_CACHE``, under ``HF_HOME``) and read from there, memory-mapped, by every later
pass and every array task (task 0 makes the cache while planning; the other tasks only open the
source after its plan.json exists). ``data.hf_streaming: true`` streams it instead, with no disk
copy, at the price of one full download per pass and per task.

A reference carries what a worker needs (a path, the text itself, or a synthetic index) so the
expensive part (read, decompress, clean, tokenize) runs in the workers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pyarrow.parquet as pq

from data_prep.clean import EMPTY, INVALID_JSON, SkipBook, clean_text, read_book_file
from data_prep.errors import UserError

SYNTHETIC, FILE, TEXT, BROKEN = "synthetic", "file", "text", "broken"


@dataclass(frozen=True)
class BookRef:
    index: int  # position in the source, stable across runs
    book_id: str
    kind: str  # SYNTHETIC | FILE | TEXT | BROKEN
    payload: object  # synthetic index | path | raw text | skip reason


def check_source(data) -> None:
    """Fail early, with one line, on a source that cannot hold any book."""
    source = data.source
    if source.startswith("synthetic:"):
        _synthetic_count(source)
    elif source.startswith("hf:"):
        if not source[3:]:
            raise UserError("data.source hf: needs a dataset id, e.g. hf:deepmind/pg19")
    else:
        path = Path(source)
        if not path.exists():
            raise UserError(f"data.source {source} does not exist")
        if path.is_dir() and not any(_book_files(path)):
            raise UserError(f"data.source {source} holds no .txt or .txt.gz books")
        if path.is_file() and not _kind_of_file(path):
            raise UserError(f"data.source {source}: expected a folder, .txt, .txt.gz, .jsonl or .parquet")


def iter_refs(data, wanted: set[int] | None = None) -> Iterator[BookRef]:
    """The source's books in order; with ``wanted``, only those indices (others are not parsed)."""
    source = data.source
    if source.startswith("synthetic:"):
        refs = (BookRef(i, f"synthetic-{i:05d}", SYNTHETIC, i) for i in range(_synthetic_count(source)))
    elif source.startswith("hf:"):
        name, _, split = source[3:].partition(":")
        rows = _hf_rows(name, split or "train", data.text_field, data.hf_streaming, wanted)
        refs = _record_refs(rows, name, data.text_field)
    else:
        path = Path(source)
        kind = "folder" if path.is_dir() else _kind_of_file(path)
        if kind == "folder":
            refs = (BookRef(i, p.relative_to(path).as_posix(), FILE, str(p)) for i, p in enumerate(_book_files(path)))
        elif kind == "txt":
            refs = iter([BookRef(0, path.name, FILE, str(path))])
        elif kind == "jsonl":
            refs = _jsonl_refs(path, data.text_field, wanted)
        else:
            refs = _record_refs(enumerate(_parquet_records(path, data.text_field)), path.name, data.text_field)
    for ref in refs:
        if wanted is None or ref.index in wanted:
            yield ref


def load_text(ref: BookRef) -> str:
    """Clean text of a non-synthetic book, or SkipBook."""
    if ref.kind == FILE:
        return read_book_file(ref.payload)
    if ref.kind == TEXT:
        return clean_text(ref.payload)
    raise SkipBook(ref.payload)


def _synthetic_count(source: str) -> int:
    try:
        n = int(source.split(":", 1)[1])
    except ValueError:
        n = 0
    if n < 1:
        raise UserError(f"data.source {source}: expected synthetic:N with N >= 1 books")
    return n


def _kind_of_file(path: Path) -> str | None:
    name = path.name.lower()
    for suffix, kind in ((".txt", "txt"), (".txt.gz", "txt"), (".jsonl", "jsonl"), (".parquet", "parquet")):
        if name.endswith(suffix):
            return kind
    return None


def _book_files(folder: Path) -> Iterator[Path]:
    files = (p for p in folder.rglob("*") if p.is_file() and p.name.lower().endswith((".txt", ".txt.gz")))
    return iter(sorted(files, key=lambda p: p.relative_to(folder).as_posix()))


def _jsonl_refs(path: Path, field: str, wanted: set[int] | None) -> Iterator[BookRef]:
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip() or (wanted is not None and line_no not in wanted):
                continue
            book_id = f"{path.name}:{line_no}"
            try:
                record = json.loads(line)
            except ValueError:
                yield BookRef(line_no, book_id, BROKEN, INVALID_JSON)
                continue
            text = record.get(field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                yield BookRef(line_no, book_id, BROKEN, f"no {field!r} field" if isinstance(record, dict) else INVALID_JSON)
            else:
                yield BookRef(line_no, book_id, TEXT, text)


def _record_refs(rows: Iterator[tuple[int, dict]], name: str, field: str) -> Iterator[BookRef]:
    """One ref per (row, record)."""
    for row, record in rows:
        url = record.get("url")
        book_id = url if isinstance(url, str) and url else f"{name}:{row}"
        text = record.get(field)
        yield BookRef(row, book_id, TEXT, text) if isinstance(text, str) else BookRef(row, book_id, BROKEN, EMPTY)


def _parquet_records(path: Path, field: str) -> Iterator[dict]:
    try:
        pf = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a bad file
        raise UserError(f"data.source {path} is not a readable Parquet file: {str(err).splitlines()[0]}") from None
    names = pf.schema_arrow.names
    if field not in names:
        raise UserError(f"data.source {path} has no column {field!r} (columns: {', '.join(names)})")
    columns = [field] + (["url"] if "url" in names else [])
    for batch in pf.iter_batches(batch_size=64, columns=columns):
        yield from batch.to_pylist()


def _hf_rows(name: str, split: str, field: str, streaming: bool, wanted: set[int] | None) -> Iterator[tuple[int, dict]]:
    """(row, record) of a Hugging Face dataset (a hub id, or a local folder of data files): from the HF
    cache, downloaded on first use (only the ``wanted`` rows are read), or streamed."""
    import datasets  # lazy: only an hf: source needs it (seconds of import)

    try:
        dataset = datasets.load_dataset(name, split=split, streaming=streaming)
    except Exception as err:  # hub, network and format errors all end here
        raise UserError(f"data.source hf:{name}: cannot load split {split!r}: {str(err).splitlines()[0]}") from None
    names = dataset.column_names
    if names is not None and field not in names:
        raise UserError(f"data.source hf:{name} has no column {field!r} (columns: {', '.join(names)})")
    if names is not None:
        dataset = dataset.select_columns([c for c in (field, "url") if c in names])
    if streaming:
        yield from enumerate(dataset)
        return
    rows = range(len(dataset)) if wanted is None else sorted(r for r in wanted if 0 <= r < len(dataset))
    if wanted is not None:
        dataset = dataset.select(rows)
    yield from zip(rows, dataset)
