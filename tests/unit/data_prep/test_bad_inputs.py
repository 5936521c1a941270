"""Each bad input: one clear line, exit code 2 when nothing usable remains, never a traceback."""

import gzip
import json
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from prep_corpora import LONG_WORDS, write_books

from data_prep.manifest import read_manifest
from pipeline.cli import main


def run_prep(cfg, tmp_path: Path, capsys) -> tuple[int, str]:
    config_file = tmp_path / "config.yaml"
    config_file.write_text(cfg.to_yaml())
    code = main(["prep", "--config", str(config_file)])
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


def test_missing_path(config, tmp_path, capsys) -> None:
    code, line = run_prep(config(source=str(tmp_path / "nowhere")), tmp_path, capsys)
    assert code == 2 and "does not exist" in line


def test_empty_folder(config, tmp_path, capsys) -> None:
    (tmp_path / "empty").mkdir()
    code, line = run_prep(config(source=str(tmp_path / "empty")), tmp_path, capsys)
    assert code == 2 and "holds no .txt" in line


def test_folder_of_binary_files(config, tmp_path, capsys) -> None:
    (tmp_path / "bin").mkdir()
    for i in range(3):
        (tmp_path / "bin" / f"b{i}.txt").write_bytes(bytes(range(256)) * 40)
    code, line = run_prep(config(source=str(tmp_path / "bin")), tmp_path, capsys)
    assert code == 2 and "no usable books" in line and "3 binary" in line


def test_corrupt_gzip_and_non_utf8_books_are_skipped_and_counted(config, tmp_path, capsys) -> None:
    write_books(tmp_path / "books", 4)
    whole = gzip.compress((tmp_path / "books" / "book000.txt").read_bytes())
    (tmp_path / "books" / "broken.txt.gz").write_bytes(whole[: len(whole) // 2])
    (tmp_path / "books" / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me ".encode("latin-1") * 100)
    (tmp_path / "books" / "zz-copy.txt").write_bytes((tmp_path / "books" / "book000.txt").read_bytes() + b"\n")
    cfg = config(source=str(tmp_path / "books"))
    code, _ = run_prep(cfg, tmp_path, capsys)
    assert code == 0
    books = read_manifest(cfg.data.output_dir)["books"]
    assert books["skipped"] == {"corrupt gzip": 1, "duplicate": 1, "not utf-8": 1} and books["used"] == 4


def test_only_corrupt_gzip(config, tmp_path, capsys) -> None:
    (tmp_path / "gz").mkdir()
    (tmp_path / "gz" / "a.txt.gz").write_bytes(b"\x1f\x8b\x08\x00garbage")
    code, line = run_prep(config(source=str(tmp_path / "gz")), tmp_path, capsys)
    assert code == 2 and "1 corrupt gzip" in line


def test_vocabulary_too_large_for_the_corpus(config, tmp_path, capsys) -> None:
    write_books(tmp_path / "books", 1, n_words=100)
    code, line = run_prep(config(source=str(tmp_path / "books"), vocab_size=5000), tmp_path, capsys)
    assert code == 2 and "data.vocab_size=5000 is more than this corpus supports" in line


def test_books_shorter_than_one_sample(config, tmp_path, capsys, trained_tokenizer) -> None:
    (tmp_path / "short").mkdir()
    for i in range(3):
        (tmp_path / "short" / f"s{i}.txt").write_text(f"A short book number {i}.")
    code, line = run_prep(config(source=str(tmp_path / "short"), tokenizer=str(trained_tokenizer)), tmp_path, capsys)
    assert code == 2 and "shorter than one sample" in line and "data.tail=pad" in line
    write_books(tmp_path / "short", 3)  # with usable books next to them, they are counted
    cfg = config(source=str(tmp_path / "short"), output_dir=str(tmp_path / "out2"), tokenizer=str(trained_tokenizer))
    assert run_prep(cfg, tmp_path, capsys)[0] == 0
    assert read_manifest(cfg.data.output_dir)["books"]["skipped"] == {"shorter than one sample": 3}


def test_jsonl_line_that_is_not_json(config, tmp_path, capsys) -> None:
    books = [p.read_text() for p in write_books(tmp_path / "src", 3)[:3:2]]  # plain-text ones
    lines = [json.dumps({"text": books[0]}), "{not json", json.dumps({"title": "no text"}), json.dumps({"text": books[1]})]
    (tmp_path / "books.jsonl").write_text("\n".join(lines) + "\n")
    cfg = config(source=str(tmp_path / "books.jsonl"))
    assert run_prep(cfg, tmp_path, capsys)[0] == 0
    manifest = read_manifest(cfg.data.output_dir)
    assert manifest["books"] == {"read": 4, "used": 2, "skipped": {"invalid json": 1, "no 'text' field": 1}}


def test_output_dir_with_shards_of_another_shape_or_tokenizer(config, tmp_path, capsys, trained_tokenizer) -> None:
    cfg = config(source="synthetic:4", tokenizer=str(trained_tokenizer))
    assert run_prep(cfg, tmp_path, capsys)[0] == 0
    code, line = run_prep(config(source="synthetic:4", tokenizer=str(trained_tokenizer), segment_len=32), tmp_path, capsys)
    assert code == 2 and "another sample shape" in line and "segment_len=16" in line
    code, line = run_prep(config(source="synthetic:4"), tmp_path, capsys)  # trains its own tokenizer
    assert code == 2 and "another tokenizer" in line


@pytest.mark.slow
def test_fifty_megabyte_single_line_book(config, tmp_path, trained_tokenizer) -> None:
    """Bounded memory (chunked encoding) and a correct result: a run in a child process.
    (~25 s on an idle 2-core machine: SentencePiece itself needs that long for 50 MB.)"""
    line = " ".join(LONG_WORDS[i % 7 * 3 % len(LONG_WORDS)] for i in range(200_000))
    (tmp_path / "books").mkdir()
    with open(tmp_path / "books" / "big.txt", "w") as f:
        while f.tell() < 50_000_000:
            f.write(line + " ")
    cfg = config(source=str(tmp_path / "books"), tokenizer=str(trained_tokenizer), segment_len=256, n_segments=8,
                 samples_per_shard=100_000)
    (tmp_path / "c.yaml").write_text(cfg.to_yaml())
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "prep", "--config", str(tmp_path / "c.yaml")],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    assert peak_mb < 1200 or peak_mb == before / 1024, f"prep of a 50 MB line peaked at {peak_mb:.0f} MB"
    manifest = read_manifest(cfg.data.output_dir)
    assert manifest["books"]["used"] == 1 and sum(manifest["tokens"].values()) > 5_000_000
