"""Synthetic long-range books: facts stated early, stated again segments later, amid varied filler.

Structure of one book (deterministic from ``data.synthetic.seed`` and the book's index):

* Filler: sentences from a few templates over word lists ("the old miller walked slowly along
  the river while the dogs barked."), grouped into paragraphs separated by ``\\n``. Filler never
  uses a name or an object of the facts, nor a place other than the current scene's (below).
* Facts: "<name>'s <object> is in the <place>", e.g. "Mara put the key in the cellar." with 32
  names, 12 objects and ``places`` (at most 24) places. ``active_facts`` facts are in play at a
  time; each is mentioned again and again (with one of several phrasings, always cue first, place
  last): 60% of the gaps are ``min_recall_distance_segments - 0.5`` to ``+ 0.9`` segments (the
  scored recalls), 40% are short (0.3 segments up to that minimum: unscored, they let memory be
  learnt over short distances first). Gaps are spaced in words at an estimated 1.12 tokens a word
  (right for vocabularies of ~1000 and more; smaller ones stretch them); the active facts'
  mentions interleave, so that most samples hold a fact twice far enough apart. After a few
  mentions a fact retires and a new one (another name) replaces it; ``facts_per_book`` facts in
  all, a name is never reused in a book.
* Scene: the place of the fact mentioned last. A ``scene_share`` of the filler sentences happen
  there ("the baker waited near the barn"), so the place recurs between mentions and is the
  kind of thing a reader of a real book carries from page to page.
* Every occurrence of a place (in a mention or a scene sentence) is attributed to its fact. Its
  tokens are recall tokens (``recall_mask`` = 1) when the same fact's previous occurrence lies in
  the same sample and at least ``min_recall_distance_segments`` segments earlier (segment of the
  position that predicts this place's first token minus the segment of the previous place's last
  token: evaluation counts a target in the segment that predicts it). Memory resets per
  sample, so only then is the place known to a model with memory and unknowable (1 of
  ``places``) to one without: no other occurrence of it is in the current segment, and the cue
  (a name and object, or "near the" for the scene of the fact mentioned last) is unambiguous.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np

NAMES = ("Mara", "Tomas", "Elena", "Victor", "Ada", "Hugo", "Lena", "Oscar", "Nina", "Felix", "Clara",
         "Bruno", "Iris", "Anton", "Vera", "Emil", "Rosa", "Karl", "Lotte", "Paul", "Greta", "Ivan",
         "Sofia", "Otto", "Mila", "Jonas", "Hanna", "Leo", "Ruth", "Max", "Edith", "Simon")
OBJECTS = ("key", "ring", "letter", "map", "coin", "lamp", "knife", "cup", "watch", "scarf", "bell", "pipe")
PLACES = ("cellar", "attic", "garden", "chest", "drawer", "barn", "tower", "well", "stable", "chapel",
          "kitchen", "cupboard", "wagon", "boat", "cave", "mill", "orchard", "forge", "vault", "pantry",
          "study", "hall", "shed", "basket")
MENTIONS = ("{n} put the {o} in the", "The {o} of {n} is in the", "{n}'s {o} is in the",
            "{n} remembered that the {o} was in the", "Everyone knew that the {o} of {n} lay in the")

_SUBJECTS = ("the old miller", "a young girl", "the soldier", "the baker", "a tired horse", "the priest",
             "the children", "a stranger", "the farmer", "the widow", "the captain", "two sailors",
             "the blacksmith", "a grey cat", "the teacher", "the shepherd", "an old woman", "the guards")
_VERBS = ("walked", "waited", "sang", "worked", "slept", "talked", "laughed", "stood", "rested", "watched",
          "wandered", "prayed", "listened", "rode", "hurried", "lingered")
_ADVERBS = ("slowly", "quietly", "for a while", "all day", "again", "alone", "in silence", "once more",
            "without a word", "until noon")
_WHERE = ("along the river", "near the bridge", "under the trees", "in the rain", "at dawn",
          "by the fire", "on the hill", "in the market", "beside the road", "across the fields",
          "behind the church", "at the harbour", "in the square", "through the forest", "by the gate")
_CLAUSES = ("while the dogs barked", "and the wind was cold", "as the bells rang", "though nobody came",
            "because the day was long", "and the sky grew dark", "while the snow fell",
            "as the sun went down", "and the road was empty", "while the river rose")
_REMARKS = ("Nothing else happened that day.", "The village was quiet.", "Night came early.",
            "It was the end of summer.", "Somewhere a door closed.", "The bread was still warm.",
            "Few people passed that way.", "The weather did not change.")
TOKENS_PER_WORD = 1.12  # estimate used only to space mentions
SHORT_GAP_SHARE = 0.4  # mentions that follow the previous one closely (0.3 segments to the minimum)


@dataclass(frozen=True)
class Mention:
    fact: int
    start: int  # character span of the place word in the book text
    end: int


@dataclass(frozen=True)
class SyntheticBook:
    text: str
    mentions: tuple[Mention, ...]


def generate_book(cfg, index: int, segment_len: int, n_segments: int) -> SyntheticBook:
    """Book ``index`` for ``cfg`` (a SyntheticConfig), spaced for samples of n_segments x segment_len."""
    rng = random.Random(f"memtrain-synthetic:{cfg.seed}:{index}")
    dist = cfg.min_recall_distance_segments
    short = (0.3 * segment_len, max(dist - 0.5, 0.3) * segment_len)  # gaps in tokens
    far = ((dist - 0.5) * segment_len, (dist + 0.9) * segment_len)

    def gap() -> int:
        """Words to the fact's next mention: near (a curriculum for memory) or far (scored)."""
        lo, hi = short if rng.random() < SHORT_GAP_SHARE else far
        return int(rng.uniform(lo, hi) / TOKENS_PER_WORD)

    mean_gap = (SHORT_GAP_SHARE * sum(short) + (1 - SHORT_GAP_SHARE) * sum(far)) / 2 / TOKENS_PER_WORD
    mentions_per_fact = max(2, math.ceil(cfg.words_per_book * cfg.active_facts / (mean_gap * cfg.facts_per_book)))

    names = rng.sample(NAMES, len(NAMES))
    places = PLACES[:cfg.places]
    facts: list[tuple[str, str, str]] = []
    active: list[list[int]] = []  # [fact index, next mention at word, mentions left]

    def new_fact(at_word: int) -> None:
        if len(facts) >= min(cfg.facts_per_book, len(names)):
            return
        facts.append((names[len(facts)], rng.choice(OBJECTS), rng.choice(places)))
        active.append([len(facts) - 1, at_word, mentions_per_fact])

    for k in range(cfg.active_facts):
        new_fact(int(k * mean_gap / cfg.active_facts) + rng.randint(5, 30))

    parts: list[str] = []
    mentions: list[Mention] = []
    length = words = 0
    scene: int | None = None  # the fact mentioned last
    sentences_left = rng.randint(3, 8)
    while words < cfg.words_per_book:
        due = min(active, key=lambda a: a[1]) if active else None
        if due is not None and due[1] <= words:
            fact, place = due[0], facts[due[0]][2]
            name, obj, _ = facts[fact]
            cue = rng.choice(MENTIONS).format(n=name, o=obj)
            sentence, place_at = f"{cue} {place}.", len(cue) + 1
            scene = fact
            due[1], due[2] = words + gap(), due[2] - 1
            if due[2] == 0:
                active.remove(due)
                new_fact(words + rng.randint(20, 60))
        elif cfg.scene_share and scene is not None and rng.random() < cfg.scene_share:
            fact, place = scene, facts[scene][2]
            sentence = _filler_sentence(rng, place)
            place_at = sentence.index(f" near the {place}") + len(" near the ")
        else:
            sentence, place_at = _filler_sentence(rng), None
        piece = sentence if not parts or parts[-1].endswith("\n") else " " + sentence
        if place_at is not None:
            start = length + len(piece) - len(sentence) + place_at
            mentions.append(Mention(fact, start, start + len(facts[fact][2])))
        sentences_left -= 1
        if sentences_left == 0:
            piece += "\n"
            sentences_left = rng.randint(3, 8)
        parts.append(piece)
        length += len(piece)
        words += sentence.count(" ") + 1
    return SyntheticBook("".join(parts).rstrip("\n"), tuple(mentions))


def _filler_sentence(rng: random.Random, place: str | None = None) -> str:
    """A filler sentence; with ``place``, one that happens "near the <place>" (never a bare remark)."""
    kind = rng.random()
    if kind < 0.1 and place is None:
        return rng.choice(_REMARKS)
    sentence = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_ADVERBS)} "
    sentence += f"near the {place}" if place else rng.choice(_WHERE)
    if kind < 0.55:
        sentence += f" {rng.choice(_CLAUSES)}"
    return sentence[0].upper() + sentence[1:] + "."


def recall_mask(book: SyntheticBook, starts: np.ndarray, ends: np.ndarray, offset: int,
                sample_len: int, segment_len: int, min_distance: int, n_tokens: int) -> np.ndarray:
    """int8 mask over the book's ``n_tokens`` token positions (text token t sits at t + offset,
    ``starts``/``ends`` are its character offsets): 1 on the recall tokens defined above."""
    mask = np.zeros(n_tokens, dtype=np.int8)
    last: dict[int, tuple[int, int]] = {}  # fact -> token span of its previous mention
    for m in book.mentions:
        first = int(np.searchsorted(ends, m.start, side="right")) + offset
        stop = int(np.searchsorted(starts, m.end, side="left")) + offset
        prev = last.get(m.fact)
        last[m.fact] = (first, stop)
        if prev is None or stop <= first:
            continue
        reader = first - 1  # the position whose prediction is the place's first token
        sample = first // sample_len
        if prev[0] // sample_len != sample or (stop - 1) // sample_len != sample or reader // sample_len != sample:
            continue  # memory resets per sample: the previous mention must lie in this one
        if reader // segment_len - (prev[1] - 1) // segment_len >= min_distance:
            mask[first:stop] = 1
    return mask
