"""Tokens/s of `memtrain prep` (2 workers) against raw SentencePiece and against datasets.map.

Builds a >= 50 MB corpus of generated books under /tmp, trains the tokenizer once (not timed),
then times, on the same texts and the same 2 cores:
  prep      data_prep.prepare with data.tokenizer = that tokenizer, data.workers = 2
            (plan pass, cleaning, encoding, samples, Arrow shards, manifest: everything);
  ceiling   SentencePiece encode of the same cleaned texts, nothing else: the faster of two
            processes (one half of the books each) and one process with num_threads=2;
  map       datasets.Dataset.map(num_proc=2) with the saved HF tokenizer (AutoTokenizer).

    .venv/bin/python bench/prep_throughput.py [--mb 50] [--workdir /tmp/memtrain-prep-bench]
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import random
import shutil
import time
from pathlib import Path

from data_prep import prepare
from data_prep.clean import read_book_file
from data_prep.tokenizer import split_for_encoding
from pipeline.config import build_config


def make_corpus(folder: Path, megabytes: int, book_kb: int = 512, seed: int = 0) -> list[Path]:
    """Books of prose-like text over a Zipf-distributed vocabulary of made-up words."""
    rng = random.Random(seed)
    syllables = ["ka", "ro", "mi", "ten", "sa", "lo", "ve", "dra", "nu", "qui", "por", "el", "an", "ist", "ber", "u"]
    vocab = sorted({"".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(6000)})
    cum_weights = list(itertools.accumulate(1.0 / (rank + 1) for rank in range(len(vocab))))
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(-(-megabytes * 1000 // book_kb)):
        sentences, size = [], 0
        while size < book_kb * 1000:
            sentence = " ".join(rng.choices(vocab, cum_weights=cum_weights, k=rng.randint(5, 25))).capitalize() + rng.choice(".,;!?.")
            sentences.append(sentence + ("\n" if rng.random() < 0.15 else " "))
            size += len(sentences[-1])
        text = "".join(sentences)
        path = folder / f"book{i:04d}.txt"
        path.write_text(text)
        paths.append(path)
    return paths


def _encode_share(args: tuple[str, list[str]]) -> int:
    import sentencepiece as spm

    model, texts = args
    sp = spm.SentencePieceProcessor(model_file=model)
    return sum(len(ids) for text in texts for ids in sp.encode(list(split_for_encoding(text)), num_threads=1))


def ceiling(model: str, texts: list[str]) -> tuple[float, int]:
    """Best tokens/s of raw SentencePiece on 2 cores (texts already in memory)."""
    import sentencepiece as spm

    halves = [texts[0::2], texts[1::2]]
    with multiprocessing.get_context("fork").Pool(2) as pool:
        pool.map(_encode_share, [(model, ["warm up"])] * 2)
        t0 = time.perf_counter()
        tokens = sum(pool.map(_encode_share, [(model, h) for h in halves]))
        two_procs = tokens / (time.perf_counter() - t0)
    sp = spm.SentencePieceProcessor(model_file=model)
    chunks = [c for text in texts for c in split_for_encoding(text)]
    t0 = time.perf_counter()
    threaded = sum(len(ids) for ids in sp.encode(chunks, num_threads=2)) / (time.perf_counter() - t0)
    return max(two_procs, threaded), tokens


def datasets_map(tokenizer_dir: str, texts: list[str]) -> float:
    import datasets
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ds = datasets.Dataset.from_dict({"text": texts})
    t0 = time.perf_counter()
    out = ds.map(lambda batch: {"input_ids": tokenizer(batch["text"], add_special_tokens=False)["input_ids"]},
                 batched=True, batch_size=8, num_proc=2, remove_columns=["text"])
    tokens = sum(len(ids) for ids in out["input_ids"])
    return tokens / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=50)
    parser.add_argument("--workdir", default="/tmp/memtrain-prep-bench")
    parser.add_argument("--vocab-size", type=int, default=8000)
    args = parser.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    paths = make_corpus(work / "books", args.mb)
    size_mb = sum(p.stat().st_size for p in paths) / 1e6
    data = {"source": str(work / "books"), "segment_len": 512, "n_segments": 4, "vocab_size": args.vocab_size,
            "tokenizer_sample_sentences": 200_000, "workers": 2, "val_fraction": 0.05, "test_fraction": 0.05}

    t0 = time.perf_counter()
    prepare(build_config({"data": {**data, "output_dir": str(work / "with-training")}}))
    train_s = time.perf_counter() - t0
    tokenizer_dir = str(work / "with-training" / "tokenizer")

    result = prepare(build_config({"data": {**data, "output_dir": str(work / "timed"), "tokenizer": tokenizer_dir}}))
    prep_rate = result.tokens_encoded / result.seconds

    texts = [read_book_file(str(p)) for p in paths]
    ceiling_rate, ceiling_tokens = ceiling(str(Path(tokenizer_dir) / "spm.model"), texts)
    map_rate = datasets_map(tokenizer_dir, texts)

    print(f"corpus: {len(paths)} books, {size_mb:.1f} MB; tokenizer: SentencePiece BPE {args.vocab_size} "
          f"(first prep incl. training: {train_s:.1f} s)")
    print(f"{'what':<38}{'tokens/s':>14}{'ratio':>10}")
    for name, rate in [("memtrain prep (2 workers, end to end)", prep_rate),
                       ("raw SentencePiece encode, 2 cores", ceiling_rate),
                       ("datasets.map(num_proc=2), HF tokenizer", map_rate)]:
        print(f"{name:<38}{rate:>14,.0f}{rate / ceiling_rate:>10.3f}")
    print(f"prep stages (s): {', '.join(f'{k} {v:.2f}' for k, v in result.timings.items())}; "
          f"total {result.seconds:.2f}; tokens prep {result.tokens_encoded:,} vs raw {ceiling_tokens:,}")
    print(f"RESULT prep_tok_per_s={prep_rate:.0f} ceiling_ratio={prep_rate / ceiling_rate:.3f} "
          f"vs_datasets_map={prep_rate / map_rate:.3f}")


if __name__ == "__main__":
    main()
