"""BABILong samples: a bAbI story's sentences scattered, in order, through background text; then the question.

A sample of n segments is exactly ``n * segment_len`` tokens::

    background ... fact 1 ... background ... fact k ... background  " Question: Q Answer:"  " A" </s>

The facts go between background sentences at sorted random slots (several may share a slot; their
order is kept); the background starts at a random sentence of a random book of the sample's split,
runs on into the next books of that split, and is cut to the exact token count (so only the last
background sentence may be cut short). The question and the answer therefore always sit at the end of
the last segment. ``answer_mask`` marks the answer tokens (the word and the closing eos).

Splits: a background book's split is a hash of its id (the filler has books of its own per split);
a story's split is a hash of its text, so train, val and test never share a story or a book.
Everything is a function of ``data.babilong``, ``data.seed`` and the sample's (split, length, index).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, Iterable, Iterator

import numpy as np

from data_prep.babi import Story, babi_qa_rows, generate_stories, parse_tasks, stories_from_babi_qa
from data_prep.clean import SkipBook
from data_prep.errors import UserError
from data_prep.samples import SPLITS, split_of
from data_prep.sources import check_source, iter_refs, load_text

PROMPT = " Question: {question} Answer:"
FILLER_WORDS_PER_BOOK = 4000
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")

_SUBJECTS = ("the old clock", "a quiet wind", "the river", "the grey sky", "a distant bell", "the lamp",
             "the long road", "a small boat", "the village", "the autumn rain", "a letter", "the tower",
             "the meadow", "a thin mist", "the harbour", "the market", "a dusty book", "the orchard")
_VERBS = ("waited", "drifted", "glowed", "rested", "turned", "faded", "shimmered", "stood still",
          "creaked", "grew silent", "seemed older", "carried on")
_TAILS = ("for a while", "in the evening", "without a sound", "as the hours passed", "under the clouds",
          "near the old bridge", "before the storm", "all through the night", "beyond the hills",
          "at the edge of town", "in the pale light", "as it always had")


def question_prompt(question: str) -> str:
    """The text that follows the context and precedes the answer (generated samples and official files)."""
    return PROMPT.format(question=question.strip())


def filler_book(seed: int, split: str, index: int) -> str:
    """A book of neutral sentences (no bAbI actor, place or object), the offline default background."""
    rng = np.random.default_rng([seed, SPLITS.index(split), index, 7])
    sentences, words = [], 0
    while words < FILLER_WORDS_PER_BOOK:
        sentence = " ".join((_SUBJECTS[rng.integers(len(_SUBJECTS))], _VERBS[rng.integers(len(_VERBS))],
                             _TAILS[rng.integers(len(_TAILS))]))
        sentences.append(sentence[0].upper() + sentence[1:] + ".")
        words += sentence.count(" ") + 1
    return " ".join(sentences)


def background_texts(data) -> Iterator[tuple[str, str, str]]:
    """(split, book id, text) of every background book, in source order."""
    bl = data.babilong
    if bl.background == "filler":
        for split in SPLITS:
            for i in range(bl.filler_books):
                yield split, f"filler-{split}-{i:05d}", filler_book(data.seed, split, i)
        return

    source = SimpleNamespace(source=bl.background, text_field=data.text_field, hf_streaming=data.hf_streaming)
    if bl.background.startswith(("babilong:", "synthetic:")):
        raise UserError(f"data.babilong.background {bl.background}: expected `filler` or a book source "
                        f"(folder, .jsonl, .parquet, hf:ID)")
    check_source(source)
    for ref in iter_refs(source):
        try:
            text = load_text(ref)
        except SkipBook:
            continue
        yield split_of(ref.book_id, data.seed, data.val_fraction, data.test_fraction), ref.book_id, text


@dataclass
class Background:
    """One split's background: every book's sentences as token arrays, books in source order."""

    sentences: list[np.ndarray]
    book_of: list[str]  # book id of each sentence
    total: int  # tokens

    @classmethod
    def build(cls, books: list[tuple[str, str]], encode_many: Callable[[list[str]], list[np.ndarray]]) -> "Background":
        sentences, book_of = [], []
        for book_id, text in books:
            parts = [" " + s for s in _SENTENCE_END.split(" ".join(text.split())) if s]
            for ids in encode_many(parts) if parts else []:
                if len(ids):
                    sentences.append(ids)
                    book_of.append(book_id)
        return cls(sentences, book_of, sum(len(s) for s in sentences))


@dataclass
class Sample:
    task: str
    n_segments: int
    input_ids: np.ndarray  # int32 [n_segments * segment_len]
    answer_mask: np.ndarray  # int8, 1 at the answer tokens (the last ones)
    book_id: str
    question: str
    target: str


def split_stories(data, tasks: list[str], needs: dict[str, int]) -> dict[str, dict[str, list[Story]]]:
    """split -> task -> the first stories whose hash falls in that split; task k of T gets every T-th
    of the ``needs[split]`` samples. UserError when a finite story source runs short."""
    out: dict[str, dict[str, list[Story]]] = {s: {} for s in needs}
    for k, task in enumerate(tasks):
        share = {s: len(range(k, n, len(tasks))) for s, n in needs.items()}
        got: dict[str, list[Story]] = {s: [] for s in needs}
        full = lambda: all(len(got[s]) >= share[s] for s in share)  # noqa: E731
        for story in ([] if full() else _story_stream(data, task, sum(share.values()))):
            split = split_of(story.key(), data.seed, data.val_fraction, data.test_fraction)
            if split in share and len(got[split]) < share[split]:
                got[split].append(story)
                if full():
                    break
        if not full():
            short = next(s for s in share if len(got[s]) < share[s])
            raise UserError(f"not enough {task} stories for the {short} split ({len(got[short])} of {share[short]}) "
                            f"from {data.babilong.facts or 'the generator'}; lower data.babilong.{short}_samples")
        for split in needs:
            out[split][task] = got[split]
    return out


def _story_stream(data, task: str, needed: int) -> Iterator[Story]:
    bl = data.babilong
    if bl.facts is None:  # endless, but bounded here: a split fraction of 0 would never fill
        stream = generate_stories(task, data.seed, bl.min_facts, bl.max_facts)
        return (story for _, story in zip(range(200 * needed + 10_000), stream))
    return stories_from_babi_qa(babi_qa_rows(bl.facts, task, data.hf_streaming), task)


class SampleMaker:
    """Stories + background of each split + a tokenizer -> samples of exact lengths."""

    def __init__(self, data, encode_many: Callable[[list[str]], list[np.ndarray]], eos_id: int,
                 backgrounds: dict[str, Background]) -> None:
        self.data, self.encode_many, self.eos_id, self.backgrounds = data, encode_many, eos_id, backgrounds
        self.tasks = parse_tasks(data.source.partition(":")[2])

    def samples(self, split: str, lengths: list[int], count: int, segment_len: int) -> Iterator[Sample]:
        """``count`` samples of each length (lengths in order), tasks taking turns."""
        pools = split_stories(self.data, self.tasks, {split: count * len(lengths)})[split]
        cursor = dict.fromkeys(self.tasks, 0)
        for k, n in enumerate(lengths):
            for i in range(count):
                task = self.tasks[(k * count + i) % len(self.tasks)]
                story = pools[task][cursor[task]]
                cursor[task] += 1
                rng = np.random.default_rng([self.data.seed, SPLITS.index(split), n, i])
                yield self.assemble(story, split, n, segment_len, rng)

    def assemble(self, story: Story, split: str, n_segments: int, segment_len: int,
                 rng: np.random.Generator) -> Sample:
        n_tokens = n_segments * segment_len
        facts = self.encode_many([" " + f for f in story.facts]) if story.facts else []
        prompt, answer = self.encode_many([question_prompt(story.question), " " + story.answer])
        answer = np.append(answer, self.eos_id).astype(np.int32)
        budget = n_tokens - sum(len(f) for f in facts) - len(prompt) - len(answer)
        if budget < 0:
            raise UserError(f"a {story.task} story with its question and answer needs {n_tokens - budget} tokens, "
                            f"more than a {n_segments}-segment sample holds ({n_tokens}); raise data.segment_len or "
                            f"the shortest of data.babilong.lengths, or lower data.babilong.max_facts")
        pieces, book_id = self._background(split, budget, rng)
        slots = np.sort(rng.integers(0, len(pieces) + 1, size=len(facts)))
        parts: list[np.ndarray] = []
        fact_iter = iter(zip(slots, facts))
        pending = next(fact_iter, None)
        for j in range(len(pieces) + 1):
            while pending is not None and pending[0] == j:
                parts.append(pending[1])
                pending = next(fact_iter, None)
            if j < len(pieces):
                parts.append(pieces[j])
        ids = np.concatenate([*parts, prompt, answer]).astype(np.int32)
        mask = np.zeros(n_tokens, dtype=np.int8)
        mask[n_tokens - len(answer):] = 1
        assert len(ids) == n_tokens
        return Sample(story.task, n_segments, ids, mask, book_id, story.question, story.answer)

    def _background(self, split: str, budget: int, rng: np.random.Generator) -> tuple[list[np.ndarray], str]:
        """Consecutive background sentences from a random start, exactly ``budget`` tokens in all."""
        bg = self.backgrounds.get(split)
        if bg is None or bg.total < budget:
            have = 0 if bg is None else bg.total
            raise UserError(f"data.babilong.background {self.data.babilong.background}: the {split} split has "
                            f"{have} tokens of background, a sample needs {budget}; add books or shorten "
                            f"data.babilong.lengths")
        if budget == 0:
            return [], bg.book_of[0]
        start = int(rng.integers(len(bg.sentences)))
        pieces, used, k = [], 0, start
        while used < budget:
            piece = bg.sentences[k % len(bg.sentences)][:budget - used]
            pieces.append(piece)
            used += len(piece)
            k += 1
        return pieces, bg.book_of[start]


def load_backgrounds(data, encode_many: Callable[[list[str]], list[np.ndarray]],
                     splits: tuple[str, ...] = SPLITS,
                     books: Iterable[tuple[str, str, str]] | None = None) -> dict[str, Background]:
    """The background of each split in ``splits`` (splits without books are left out) from ``books``
    ((split, id, text), default: read ``data.babilong.background``)."""
    by_split: dict[str, list[tuple[str, str]]] = {s: [] for s in splits}
    for split, book_id, text in background_texts(data) if books is None else books:
        if split in by_split:
            by_split[split].append((book_id, text))
    return {s: Background.build(b, encode_many) for s, b in by_split.items() if b}
