"""End to end on tiny corpora: the contract other stages read, determinism, arrays, reruns."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prep_corpora import write_books

from data_prep import prepare
from data_prep.clean import read_book_file
from data_prep.manifest import merge, read_manifest
from data_prep.shards import open_split
from pipeline.errors import UserError

SPLITS = ("train", "val", "test")


def shard_files(data_dir: Path) -> dict[str, bytes]:
    names = ["manifest.json"] + [f"{s}/{p.name}" for s in SPLITS for p in sorted((data_dir / s).glob("shard-*"))]
    names += [f"tokenizer/{p.name}" for p in sorted((data_dir / "tokenizer").iterdir())]
    return {name: (data_dir / name).read_bytes() for name in names}


def book_streams(data_dir: Path) -> dict[str, list[int]]:
    """Each book's real tokens, samples concatenated in order."""
    streams: dict[str, list[int]] = {}
    for split in SPLITS:
        for row in open_split(data_dir, split).with_format("numpy"):
            streams.setdefault(row["book_id"], []).extend(row["input_ids"][row["loss_mask"] == 1].tolist())
    return streams


def test_synthetic_contract(config) -> None:
    cfg = config(source="synthetic:6", vocab_size=800)
    prepare(cfg)
    data_dir = Path(cfg.data.output_dir)
    manifest = read_manifest(data_dir)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(data_dir / "tokenizer"))
    assert manifest["vocab_size"] == len(tok) == cfg.data.vocab_size
    assert (manifest["bos_token_id"], manifest["eos_token_id"], manifest["pad_token_id"]) == \
        (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    assert sum(manifest["counts"].values()) > 0 and all(manifest["counts"][s] > 0 for s in SPLITS)
    for split in SPLITS:
        ds = open_split(data_dir, split, verify=True)
        assert len(ds) == manifest["counts"][split]
        rows = ds.with_format("numpy")[:]
        assert rows["input_ids"].shape == (len(ds), cfg.data.sample_len)
        assert ds.features["input_ids"].feature.dtype == "int32" and ds.features["recall_mask"].feature.dtype == "int8"
        assert ds.features["sample_index"].dtype == "int32"
        assert (rows["loss_mask"] == 1).all()  # tail: drop
        for book in set(rows["book_id"]):
            assert rows["sample_index"][rows["book_id"] == book].tolist() == list(range((rows["book_id"] == book).sum()))
    assert manifest["recall_sample_fraction"]["train"] > 0
    with pytest.raises(UserError, match="no split"):
        open_split(data_dir, "dev")


def test_hf_tokenizer_gives_the_ids_prep_wrote(config, tmp_path) -> None:
    """AutoTokenizer on each cleaned book (bos added) + eos == the book's samples (tail: pad)."""
    paths = write_books(tmp_path / "books", 6)
    cfg = config(source=str(tmp_path / "books"), tail="pad", n_segments=2)
    prepare(cfg)
    from transformers import AutoTokenizer

    data_dir = Path(cfg.data.output_dir)
    tok = AutoTokenizer.from_pretrained(str(data_dir / "tokenizer"))
    streams = book_streams(data_dir)
    assert len(streams) == len(paths)
    for path in paths:
        text = read_book_file(str(path))
        assert "PROJECT GUTENBERG" not in text and "\r" not in text and "\ufeff" not in text
        expected = tok(text)["input_ids"] + [tok.eos_token_id]
        assert streams[path.relative_to(tmp_path / "books").as_posix()] == expected
        assert tok.decode(expected, skip_special_tokens=True) == text


def test_foreign_hf_tokenizer_folder_gives_same_shards(config, tmp_path, trained_tokenizer) -> None:
    """data.tokenizer = a plain HF folder (no spm.model): encoded through transformers, same ids."""
    write_books(tmp_path / "books", 4)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (foreign / name).write_bytes((trained_tokenizer / name).read_bytes())
    via_spm = config(source=str(tmp_path / "books"), tokenizer=str(trained_tokenizer), output_dir=str(tmp_path / "a"))
    via_hf = config(source=str(tmp_path / "books"), tokenizer=str(foreign), output_dir=str(tmp_path / "b"))
    prepare(via_spm)
    prepare(via_hf)
    assert read_manifest(tmp_path / "b")["tokenizer_kind"] == "hf"
    assert book_streams(tmp_path / "a") == book_streams(tmp_path / "b")


def test_output_is_identical_for_any_worker_count(config, tmp_path) -> None:
    write_books(tmp_path / "books", 8)
    one = config(source=str(tmp_path / "books"), workers=1, output_dir=str(tmp_path / "w1"))
    two = config(source=str(tmp_path / "books"), workers=2, output_dir=str(tmp_path / "w2"))
    prepare(one)
    prepare(two)
    assert shard_files(tmp_path / "w1") == shard_files(tmp_path / "w2")
    assert len(read_manifest(tmp_path / "w1")["shards"]) > 3


def test_array_tasks_then_merge_equal_a_single_run(config, tmp_path, trained_tokenizer) -> None:
    import threading

    single = config(output_dir=str(tmp_path / "single"), source="synthetic:10")
    array = config(output_dir=str(tmp_path / "array"), source="synthetic:10")
    prepare(single)
    results: dict[int, object] = {}
    waiter = threading.Thread(target=lambda: results.setdefault(2, prepare(array, 2, 3)))
    waiter.start()  # task 2 starts first and waits for task 0's plan
    time.sleep(0.5)
    results[0] = prepare(array, 0, 3)
    waiter.join(timeout=60)
    assert results[0].manifest is None and 2 in results
    with pytest.raises(UserError, match="not done"):
        merge(tmp_path / "array")
    prepare(array, 1, 3)
    merge(tmp_path / "array")
    assert shard_files(tmp_path / "single") == shard_files(tmp_path / "array")


def test_rerun_skips_good_shards_and_redoes_bad_ones(config, tmp_path) -> None:
    cfg = config(source="synthetic:8", samples_per_shard=2)
    prepare(cfg)
    data_dir = Path(cfg.data.output_dir)
    reference = shard_files(data_dir)
    shards = sorted(data_dir.glob("train/shard-*.arrow"))
    assert len(shards) >= 3
    kept, corrupted, removed = shards[0], shards[1], shards[2]
    kept_stat = kept.stat()
    with open(corrupted, "r+b") as f:
        f.seek(100)
        f.write(b"\xff\xff")
    removed.unlink()
    (data_dir / "manifest.json").unlink()
    result = prepare(cfg)
    assert result.written == 2
    assert kept.stat().st_mtime_ns == kept_stat.st_mtime_ns and kept.stat().st_ino == kept_stat.st_ino
    assert shard_files(data_dir) == reference


def test_killed_prep_leaves_no_acceptable_shard_and_rerun_finishes(config, tmp_path, trained_tokenizer) -> None:
    cfg = config(source="synthetic:60", tokenizer=str(trained_tokenizer), samples_per_shard=2,
                 synthetic={"words_per_book": 2000, "facts_per_book": 4, "min_recall_distance_segments": 2})
    data_dir = Path(cfg.data.output_dir)
    config_file = tmp_path / "c.yaml"
    config_file.write_text(cfg.to_yaml())
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "prep", "--config", str(config_file)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 60
    while not list(data_dir.glob("train/shard-00001.json")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (data_dir / "manifest.json").exists(), "prep finished before it could be killed"
    with pytest.raises(UserError, match="no manifest.json"):
        open_split(data_dir, "train")
    import datasets

    for shard in data_dir.glob("*/shard-*.arrow"):  # whatever is visible is whole
        record = json.loads(shard.with_suffix(".json").read_text()) if shard.with_suffix(".json").exists() else None
        assert len(datasets.Dataset.from_file(str(shard))) == (record or {}).get("n_samples", len(datasets.Dataset.from_file(str(shard))))
    result = prepare(cfg)
    assert result.written < len(result.records)
    reference = config(source="synthetic:60", tokenizer=str(trained_tokenizer), samples_per_shard=2,
                       output_dir=str(tmp_path / "clean"),
                       synthetic={"words_per_book": 2000, "facts_per_book": 4, "min_recall_distance_segments": 2})
    prepare(reference)
    assert shard_files(data_dir) == shard_files(tmp_path / "clean")


def test_parquet_and_hf_sources(config, tmp_path, monkeypatch) -> None:
    """PG-19 schema parquet, and the same rows through datasets.load_dataset (into an HF cache of the test's own)."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from prep_corpora import prose
    import random

    rng = random.Random(3)
    rows = [{"short_book_title": f"Book {i}", "publication_date": 1900 + i, "url": f"http://books/{i}",
             "text": prose(rng, 500)} for i in range(5)]
    folder = tmp_path / "pg19"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(rows), folder / "train-00000.parquet")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    prepare(config(source=str(folder / "train-00000.parquet"), output_dir=str(tmp_path / "pq")))
    prepare(config(source=f"hf:{folder}", output_dir=str(tmp_path / "hf")))
    streams = book_streams(tmp_path / "pq")
    assert set(streams) == {r["url"] for r in rows}
    assert streams == book_streams(tmp_path / "hf")


def test_a_split_without_books_opens_empty(config, trained_tokenizer) -> None:
    cfg = config(source="synthetic:3", tokenizer=str(trained_tokenizer), val_fraction=0.0, test_fraction=0.0)
    prepare(cfg)
    manifest = read_manifest(cfg.data.output_dir)
    assert manifest["counts"]["val"] == manifest["counts"]["test"] == 0 and manifest["counts"]["train"] > 0
    empty = open_split(cfg.data.output_dir, "val")
    assert len(empty) == 0 and empty.features == open_split(cfg.data.output_dir, "train").features
