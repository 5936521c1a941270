"""An ``hf:`` source is read once: the first pass fills the HF datasets cache, every later pass and every
SLURM array task reads the cache; ``data.hf_streaming`` reads the source in full on every pass instead.

No Hub here: the source is a local folder of PG-19-schema Parquet files, which ``datasets.load_dataset``
reads through the same Parquet builder as a Hub dataset's files. A pass over the source is one run of
that builder's ``_generate_tables`` over a data file (what streams rows over the network for a Hub id);
an audit hook counts them by reading the call stack at each ``open`` of the source's files, in this
process and in its forked prep workers (each pass is a line appended to a file).
"""

from __future__ import annotations

import random
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest
from prep_corpora import prose

from data_prep import prepare
from data_prep.manifest import merge

_ACTIVE: list[tuple[str, str]] = []  # (source folder, log of passes) while counting
_HOOKED = False


def _audit(event: str, args: tuple) -> None:
    if event != "open" or not _ACTIVE:
        return
    folder, log = _ACTIVE[-1]
    path = args[0]
    if not isinstance(path, str) or not path.startswith(folder):
        return
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "_generate_tables":  # datasets' Parquet builder reading rows
            with open(log, "a") as f:  # opens the log, not the source: no recursion
                f.write(path + "\n")
            return
        frame = frame.f_back


@contextmanager
def passes_over(folder: Path, log: Path) -> Iterator[list[str]]:
    """The data files read (one entry per file per pass) while the block runs, filled in when it ends."""
    global _HOOKED
    if not _HOOKED:  # an audit hook cannot be removed: one for the session, idle outside this block
        sys.addaudithook(_audit)
        _HOOKED = True
    log.write_text("")
    passes: list[str] = []
    _ACTIVE.append((str(folder), str(log)))
    try:
        yield passes
    finally:
        _ACTIVE.pop()
        passes.extend(log.read_text().splitlines())


def shard_files(data_dir: Path) -> dict[str, bytes]:
    return {p.relative_to(data_dir).as_posix(): p.read_bytes() for p in sorted(data_dir.rglob("*"))
            if p.is_file() and (p.name == "manifest.json" or p.parent.name == "tokenizer" or p.name.startswith("shard-"))}


@pytest.fixture
def pg19_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Two Parquet files of 4 books each in the PG-19 schema, and an empty HF cache of this test's own."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    rng = random.Random(5)
    folder = tmp_path / "pg19"
    folder.mkdir()
    for part in range(2):
        rows = [{"short_book_title": f"Book {part}-{i}", "publication_date": 1900 + i, "url": f"http://books/{part}/{i}",
                 "text": prose(rng, 500)} for i in range(4)]
        pq.write_table(pa.Table.from_pylist(rows), folder / f"train-0000{part}-of-00002.parquet")
    return folder


def test_hf_source_is_read_once_by_every_pass_and_array_task(config, pg19_folder: Path, tmp_path: Path) -> None:
    cached = config(source=f"hf:{pg19_folder}", output_dir=str(tmp_path / "cached"))
    assert cached.data.hf_streaming is False  # the default
    with passes_over(pg19_folder, tmp_path / "passes-1.log") as task0:
        prepare(cached, shard_index=0, num_shards=2)  # plan, tokenizer, its shards
    with passes_over(pg19_folder, tmp_path / "passes-2.log") as task1:
        prepare(cached, shard_index=1, num_shards=2)  # after task 0's plan.json, as in the array
    merge(cached.data.output_dir)
    assert sorted(task0) == sorted(str(p) for p in pg19_folder.glob("*.parquet"))  # each file once
    assert task1 == []

    streamed = config(source=f"hf:{pg19_folder}", output_dir=str(tmp_path / "streamed"), hf_streaming=True)
    with passes_over(pg19_folder, tmp_path / "passes-3.log") as stream0:
        prepare(streamed, shard_index=0, num_shards=2)
    with passes_over(pg19_folder, tmp_path / "passes-4.log") as stream1:
        prepare(streamed, shard_index=1, num_shards=2)
    merge(streamed.data.output_dir)
    # what main did: plan, tokenizer, its check, the shard-size estimate and task 0's shards each read the
    # source again (the last three stop early on some files), and task 1 reads it all again for its shards
    assert len(stream0) >= 3 * 2 and len(stream1) == 2, (stream0, stream1)
    print(f"passes over the 2 source files: cached task0={len(task0)} task1={len(task1)}; "
          f"streamed task0={len(stream0)} task1={len(stream1)}")

    # the same shards either way (hf_streaming is not part of what the shards depend on)
    assert shard_files(tmp_path / "cached") == shard_files(tmp_path / "streamed")


def test_workers_read_no_source_of_their_own(config, pg19_folder: Path, tmp_path: Path) -> None:
    """With data.workers > 1 the parent reads the rows and hands the text to the workers: still one pass."""
    cfg = config(source=f"hf:{pg19_folder}", output_dir=str(tmp_path / "workers"), workers=2)
    with passes_over(pg19_folder, tmp_path / "passes-5.log") as passes:
        prepare(cfg)
    assert len(passes) == 2, passes
