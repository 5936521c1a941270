"""One book's tokens -> fixed-length samples, and the book -> split assignment.

A book's token stream is ``bos + text + eos``; sample k holds tokens ``[k*S, (k+1)*S)`` of that
stream (S = n_segments * segment_len), so samples never cross into another book. The last partial
sample is dropped (``tail: drop``) or padded with ``pad_token_id`` and ``loss_mask`` 0 (``tail: pad``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

SPLITS = ("train", "val", "test")


@dataclass
class BookSamples:
    input_ids: np.ndarray  # int32 [n, S]
    loss_mask: np.ndarray  # int8 [n, S]
    recall_mask: np.ndarray  # int8 [n, S]

    def __len__(self) -> int:
        return len(self.input_ids)


def split_of(book_id: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    """Stable split of a book: a hash of (seed, book id) mapped to [0, 1)."""
    u = split_score(book_id, seed)
    if u < test_fraction:
        return "test"
    if u < test_fraction + val_fraction:
        return "val"
    return "train"


def split_score(book_id: str, seed: int) -> float:
    digest = hashlib.sha256(f"{seed}:{book_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def book_samples(ids: np.ndarray, recall: np.ndarray | None, sample_len: int, tail: str,
                 pad_id: int) -> BookSamples:
    """Cut one book's full token stream (bos/eos included) into samples."""
    n_full, rest = divmod(len(ids), sample_len)
    n = n_full + (1 if tail == "pad" and rest else 0)
    input_ids = np.full((n, sample_len), pad_id, dtype=np.int32)
    loss_mask = np.zeros((n, sample_len), dtype=np.int8)
    recall_mask = np.zeros((n, sample_len), dtype=np.int8)
    used = min(len(ids), n * sample_len)
    input_ids.reshape(-1)[:used] = ids[:used]
    loss_mask.reshape(-1)[:used] = 1
    if recall is not None:
        recall_mask.reshape(-1)[:used] = recall[:used]
    return BookSamples(input_ids, loss_mask, recall_mask)
