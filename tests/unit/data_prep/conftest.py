"""Fixtures of the data-prep tests; the corpora themselves live in prep_corpora.py."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
from prep_corpora import LONG_WORDS, tiny_config, write_books

from pipeline.config import ExperimentConfig


@pytest.fixture
def config(tmp_path: Path) -> Callable[..., ExperimentConfig]:
    return lambda **data: tiny_config(tmp_path, **data)


@pytest.fixture(scope="session")
def trained_tokenizer(tmp_path_factory) -> Path:
    """A tokenizer trained once by prep on a small book folder (reused through data.tokenizer)."""
    from data_prep import prepare

    root = tmp_path_factory.mktemp("tokenizer")
    books = root / "books"
    write_books(books, 6, n_words=800, seed=1)
    (books / "words.txt").write_text(" ".join(LONG_WORDS * 40) + "\n")
    prepare(tiny_config(root, source=str(books), vocab_size=600, output_dir=str(root / "out")))
    return root / "out" / "tokenizer"
