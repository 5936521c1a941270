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
            assert (start - 1) // seg - earlier[-1] // seg >= k  # counted in the segment that predicts it
    assert marked > 0


SCENES = {"places": 6, "scene_share": 0.5, "active_facts": 1, "facts_per_book": 3, "min_recall_distance_segments": 1}


def test_scene_sentences_happen_at_the_place_of_the_fact_mentioned_last(config) -> None:
    synthetic = config().data.synthetic.model_copy(update={**SCENES, "words_per_book": 4000})
    book = generate_book(synthetic, 0, 16, 8)
    spans = {(m.start, m.end): m.fact for m in book.mentions}
    scene, facts, scene_sentences, filler_sentences = None, {}, 0, 0
    offset = 0
    for sentence in re.split(r"(?<=\.)[ \n]", book.text):
        start = book.text.index(sentence, offset)
        offset = start + len(sentence)
        place = next((p for p in PLACES if re.search(rf"\b{p}\b", sentence)), None)
        name = next((n for n in NAMES if re.search(rf"\b{n}\b", sentence)), None)
        if name is not None:  # a fact mention: it sets the scene
            facts.setdefault(name, place)
            assert facts[name] == place and place in PLACES[:SCENES["places"]]
            scene = place
        elif scene is not None:
            filler_sentences += 1
            if place is not None:
                scene_sentences += 1
                assert place == scene and f"near the {place}" in sentence
        else:
            assert place is None, "no scene before the first fact"
        if place is not None:  # every occurrence of a place is a mention of its fact
            at = start + sentence.rindex(place) if name else start + sentence.index(f"near the {place}") + 9
            assert (at, at + len(place)) in spans
    assert len(spans) == len(book.mentions) and len(facts) == SCENES["facts_per_book"]
    assert 0.35 < scene_sentences / filler_sentences < 0.65


def test_scene_recalls_are_places_not_seen_in_the_current_segment(config, tmp_path) -> None:
    """On the decoded shards: each marked span is the scene's place, absent from the segment that
    predicts it and present in an earlier segment of the same sample: without memory it is unknowable."""
    cfg = config(vocab_size=700, synthetic={**SCENES, "words_per_book": 1500})
    prepare(cfg)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(Path(cfg.data.output_dir) / "tokenizer"))
    seg = cfg.data.segment_len
    rows = open_split(cfg.data.output_dir, "train").with_format("numpy")[:]
    assert len(rows["input_ids"]) > 0
    marked = 0
    for ids, recall in zip(rows["input_ids"], rows["recall_mask"]):
        words = [t.replace("\u2581", " ") for t in tok.convert_ids_to_tokens(ids.tolist())]
        pieces = list(itertools.accumulate(words))
        for start in np.flatnonzero(np.diff(np.concatenate([[0], recall])) == 1):
            marked += 1
            value = words[start].strip()
            assert value in PLACES[:SCENES["places"]], words[start - 3:start + 2]
            segment_start = (start - 1) - (start - 1) % seg  # the segment that predicts the place
            so_far = pieces[start - 1][len(pieces[segment_start - 1]) if segment_start else 0:]
            assert not re.search(rf"\b{value}\b", so_far), "the place is already in this segment"
            assert re.search(rf"\b{value}\b", pieces[segment_start - 1]), "the place is in no earlier segment"
    assert marked >= len(rows["input_ids"])
