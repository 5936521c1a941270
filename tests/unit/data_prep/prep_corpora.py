"""Small corpora and configs for the data-prep tests (tiny vocabularies, short samples)."""

from __future__ import annotations

import gzip
import random
from pathlib import Path
from typing import Any

from tiny import tiny_config as tiny_variant

from pipeline.config import ExperimentConfig

LETTERS = "abcdefghijklmnopqrstuvwxyz"
# Long made-up words: the session tokenizer learns each as one token, so the 50 MB book stays cheap.
LONG_WORDS = ["".join(random.Random(i).sample(LETTERS, 11 + i % 4)) for i in range(24)]
COMMON = ("the of and a to in he was that it his her with as had for you not she but at on said him is "
          "my all me have be old house river night road morning letter garden").split()
ACCENTED = ["café", "naïve", "Zoë", "über", "déjà", "façade"]


def prose(rng: random.Random, n_words: int) -> str:
    """English-like text with punctuation, paragraphs, accents and the long words."""
    out, words = [], 0
    while words < n_words:
        sentence = [rng.choice(COMMON + ACCENTED + LONG_WORDS[:4]) for _ in range(rng.randint(4, 14))]
        text = " ".join(sentence).capitalize() + rng.choice([".", ".", "!", "?", ";"])
        out.append(text + ("\n" if rng.random() < 0.2 else " "))
        words += len(sentence)
    return "".join(out).strip()


def write_books(folder: Path, n: int, n_words: int = 600, seed: int = 0) -> list[Path]:
    """n books: plain, gzipped, with a Gutenberg header/footer, CRLF, a BOM, decomposed accents."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for i in range(n):
        text = prose(rng, n_words)
        if i % 4 == 1:
            text = ("The Project Gutenberg eBook of Book %d\n\n*** START OF THE PROJECT GUTENBERG EBOOK BOOK ***\n"
                    % i + text + "\n*** END OF THE PROJECT GUTENBERG EBOOK BOOK ***\nLicense text here.\n")
        if i % 4 == 2:
            text = "\ufeff" + text.replace("\n", "\r\n").replace("é", "e\u0301")
        path = folder / ("sub" if i % 2 else ".") / f"book{i:03d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        if i % 4 == 3:
            path = path.with_name(path.name + ".gz")
            path.write_bytes(gzip.compress(text.encode()))
        else:
            path.write_bytes(text.encode())
        paths.append(path)
    return paths


def tiny_config(tmp_path: Path, **data: Any) -> ExperimentConfig:
    """tiny.py's "prep" variant writing to ``tmp_path/out``, with ``data`` keys laid over its data section."""
    return tiny_variant("prep", data={"output_dir": str(tmp_path / "out"), **data})
