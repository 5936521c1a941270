"""The synthetic books: deterministic, and recall_mask exactly where only memory can know the value."""

import itertools
import re
from pathlib import Path

import numpy as np

from data_prep import prepare
from data_prep.shards import open_split
from data_prep.synthetic import NAMES, OBJECTS, PLACES, generate_book


def test_books_are_deterministic_and_seeded(config) -> None:
    synthetic = config().data.synthetic
    assert generate_book(synthetic, 3, 16, 8) == generate_book(synthetic, 3, 16, 8)
    assert generate_book(synthetic, 3, 16, 8).text != generate_book(synthetic, 4, 16, 8).text
    other = synthetic.model_copy(update={"seed": 1})
    assert generate_book(other, 3, 16, 8).text != generate_book(synthetic, 3, 16, 8).text


def test_mentions_point_at_the_facts_value(config) -> None:
    synthetic = config().data.synthetic
    book = generate_book(synthetic, 0, 16, 8)
    values: dict[int, str] = {}
    for m in book.mentions:
        word = book.text[m.start:m.end]
        assert word in PLACES and values.setdefault(m.fact, word) == word
        sentence = book.text[book.text.rfind(".", 0, m.start) + 1:m.end + 1]
        assert sum(name in sentence.split() or f"{name}'s" in sentence for name in NAMES) == 1
    filler = re.sub(r"[^.\n]*\b(" + "|".join(PLACES) + r")\.", "", book.text)
    assert not any(re.search(rf"\b{w}\b", filler) for w in NAMES + OBJECTS + PLACES)


def test_recall_mask_marks_values_only_memory_can_predict(config, tmp_path) -> None:
    """Checked on the decoded shards, independently of how the mask was computed: each marked
    span is a place word ending a fact sentence whose previous statement (same name and object)
    lies in this sample >= min distance segments earlier, and nowhere in between."""
    cfg = config(source="synthetic:6", vocab_size=800)
    prepare(cfg)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(Path(cfg.data.output_dir) / "tokenizer"))
    seg, k = cfg.data.segment_len, cfg.data.synthetic.min_recall_distance_segments
    rows = open_split(cfg.data.output_dir, "train").with_format("numpy")[:]
    marked = 0
    for ids, recall in zip(rows["input_ids"], rows["recall_mask"]):
        words = [t.replace("\u2581", " ") for t in tok.convert_ids_to_tokens(ids.tolist())]
        pieces = list(itertools.accumulate(words))  # text up to and including each token (ASCII books)
        for start in np.flatnonzero(np.diff(np.concatenate([[0], recall])) == 1):
            stop = start + np.argmax(recall[start:] == 0) if (recall[start:] == 0).any() else len(ids)
            marked += 1
            before = pieces[start - 1]
            value = pieces[stop - 1][len(before):].strip()
            assert value in PLACES
            sentence = before[before.rfind(".") + 1:]
            name = next(n for n in NAMES if re.search(rf"\b{n}\b", sentence))
            obj = next(o for o in OBJECTS if re.search(rf"\b{o}\b", sentence))
            # the last earlier statement of this fact: in the sample, >= k segments before
            earlier = [i for i in range(start) if pieces[i].endswith(f" {value}")
                       and re.search(rf"\b{name}\b", pieces[i][pieces[i][:-len(value) - 1].rfind(".") + 1:])]
            assert earlier, "the fact's introduction must be in the same sample"
            assert start // seg - earlier[-1] // seg >= k
    assert marked > 0
