"""What a worker process does with one book, and the pool that runs it in order.

Results come back in source order whatever ``data.workers`` is (``imap``), so the output bytes do
not depend on the worker count. With one worker everything runs in this process.
"""

from __future__ import annotations

import hashlib
import multiprocessing
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from data_prep.clean import SkipBook
from data_prep.samples import BookSamples, book_samples
from data_prep.sources import SYNTHETIC, BookRef, load_text
from data_prep.synthetic import generate_book, recall_mask
from data_prep.tokenizer import Encoder, describe

_STATE: dict = {}


@dataclass
class PlannedBook:
    index: int
    book_id: str
    reason: str | None  # None = usable
    sha256: str = ""
    n_bytes: int = 0


@dataclass
class EncodedBook:
    index: int
    sha256: str
    samples: BookSamples | None  # None: the book became unusable since the plan
    reason: str | None = None
    n_tokens: int = 0  # tokens encoded, bos/eos included (a dropped tail counts too)


def init(data, tokenizer_dir: str | None) -> None:
    """Per-process state: the data config and, once it exists, the tokenizer."""
    _STATE.clear()
    _STATE["data"] = data
    if tokenizer_dir is not None:
        _STATE["encoder"] = Encoder(Path(tokenizer_dir))
        _STATE["info"] = describe(Path(tokenizer_dir))


def book_text(ref: BookRef) -> str:
    """Clean text (SkipBook if unusable); synthetic books are generated."""
    if ref.kind == SYNTHETIC:
        return _synthetic(ref).text
    return load_text(ref)


def plan_book(ref: BookRef) -> PlannedBook:
    try:
        text = book_text(ref)
    except SkipBook as skip:
        return PlannedBook(ref.index, ref.book_id, skip.reason)
    raw = text.encode()
    return PlannedBook(ref.index, ref.book_id, None, hashlib.sha256(raw).hexdigest(), len(raw))


def text_or_none(ref: BookRef) -> str | None:
    try:
        return book_text(ref)
    except SkipBook:
        return None


def encode_book(ref: BookRef) -> EncodedBook:
    data, encoder, info = _STATE["data"], _STATE["encoder"], _STATE["info"]
    recall = None
    try:
        if ref.kind == SYNTHETIC:
            book = _synthetic(ref)
            text = book.text
            ids, starts, ends = encoder.encode_with_offsets(text)
            recall = recall_mask(book, starts, ends, 1, data.sample_len, data.segment_len,
                                 data.synthetic.min_recall_distance_segments, len(ids) + 2)
        else:
            text = load_text(ref)
            ids = encoder.encode(text)
    except SkipBook as skip:
        return EncodedBook(ref.index, "", None, skip.reason)
    stream = np.concatenate([[info.bos_token_id], ids, [info.eos_token_id]]).astype(np.int32)
    samples = book_samples(stream, recall, data.sample_len, data.tail, info.pad_token_id)
    return EncodedBook(ref.index, hashlib.sha256(text.encode()).hexdigest(), samples, n_tokens=len(stream))


def _synthetic(ref: BookRef):
    data = _STATE["data"]
    return generate_book(data.synthetic, ref.payload, data.segment_len, data.n_segments)


@contextmanager
def pool(data, tokenizer_dir: str | None) -> Iterator[Callable[[Callable, Iterable], Iterator]]:
    """``imap(fn, items)`` over ``data.workers`` processes (or this one), results in order."""
    if data.workers == 1:
        init(data, tokenizer_dir)
        yield lambda fn, items: map(fn, items)
        return
    context = multiprocessing.get_context("fork")
    with context.Pool(data.workers, initializer=init, initargs=(data, tokenizer_dir)) as workers:
        yield lambda fn, items: workers.imap(fn, items, chunksize=1)
