"""bAbI tasks qa1-qa5 (Weston et al. 2015): memtrain's own generator, and stories in ``facebook/babi_qa``'s schema.

The generator simulates a small world and states it in the surface forms of the ``facebook/babi_qa``
data (actors, places, objects, verbs and question forms), so a model trained on it can be scored on
the official BABILong files:

* qa1 (single supporting fact): actors move ("Mary travelled to the office."); "Where is Mary?"
* qa2 (two supporting facts): actors also pick up and drop objects; "Where is the football?"
* qa3 (three supporting facts): "Where was the football before the kitchen?"
* qa4 (two-argument relations): "The kitchen is north of the hallway."; "What is north of the hallway?"
  or "What is the kitchen north of?"
* qa5 (three-argument relations): objects change hands ("Fred gave the milk to Bill."); "Who gave the
  milk to Bill?", "Who received the milk?", "What did Fred give to Bill?", "Who did Fred give the milk to?"

Every answer is computed from the simulated state, so it is right by construction, and it is always one
of the task's labels (``TASK_LABELS``, the official scorer's label sets).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from data_prep.errors import UserError

PLACES = ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office")
ACTORS = ("Mary", "John", "Daniel", "Sandra")
GIVERS = ("Bill", "Fred", "Jeff", "Mary")
OBJECTS = ("apple", "football", "milk")
MOVES = ("moved to", "went to", "journeyed to", "travelled to", "went back to")
TAKES = ("got", "grabbed", "picked up", "took")
DROPS = ("dropped", "discarded", "put down", "left")
GIVES = ("gave", "handed", "passed")
OPPOSITE = {"north": "south", "south": "north", "east": "west", "west": "east"}

TASK_LABELS: dict[str, tuple[str, ...]] = {
    "qa1": PLACES, "qa2": PLACES, "qa3": PLACES, "qa4": PLACES,
    "qa5": ("Bill", "Fred", "Jeff", "Mary", "apple", "football", "milk"),
}
TASKS = tuple(TASK_LABELS)


@dataclass(frozen=True)
class Story:
    """One bAbI question: the story sentences before it (in order), the question and its one-word answer."""

    task: str
    facts: tuple[str, ...]
    question: str
    answer: str

    def key(self) -> str:
        """What makes two stories the same story (the split is a hash of it)."""
        return json.dumps([self.task, list(self.facts), self.question, self.answer])


def parse_tasks(spec: str) -> list[str]:
    """``qa1,qa2`` -> ["qa1", "qa2"]; UserError on an unknown or repeated name."""
    names = [t.strip() for t in spec.split(",") if t.strip()]
    unknown = [t for t in names if t not in TASK_LABELS]
    if not names or unknown:
        raise UserError(f"unknown bAbI task {unknown[0] if unknown else spec!r}: memtrain generates "
                        f"{', '.join(TASKS)} (e.g. data.source=babilong:qa1,qa2)")
    if len(set(names)) != len(names):
        raise UserError(f"babilong:{spec} names a task twice")
    return names


def _move(rng: np.random.Generator, actor: str, place: str) -> str:
    return f"{actor} {MOVES[rng.integers(len(MOVES))]} the {place}."


def _qa1(rng: np.random.Generator, n_facts: int) -> Story:
    where: dict[str, str] = {}
    facts = []
    for _ in range(n_facts):
        actor, place = ACTORS[rng.integers(len(ACTORS))], PLACES[rng.integers(len(PLACES))]
        where[actor] = place
        facts.append(_move(rng, actor, place))
    actor = sorted(where)[rng.integers(len(where))]
    return Story("qa1", tuple(facts), f"Where is {actor}?", where[actor])


class _World:
    """Actors moving and carrying objects (qa2, qa3): the place history of every object."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.actor_at: dict[str, str] = {}
        self.holder: dict[str, str] = {}  # object -> actor carrying it
        self.object_at: dict[str, str] = {}  # object -> place where it lies
        self.trail: dict[str, list[str]] = {}  # object -> places it was in, in order
        self.facts: list[str] = []

    def _note(self, obj: str, place: str) -> None:
        trail = self.trail.setdefault(obj, [])
        if not trail or trail[-1] != place:
            trail.append(place)

    def act(self) -> None:
        rng = self.rng
        actor = ACTORS[rng.integers(len(ACTORS))]
        here = self.actor_at.get(actor)
        carried = [o for o, a in self.holder.items() if a == actor]
        takeable = [o for o in OBJECTS if o not in self.holder and self.object_at.get(o, here) == here]
        roll = rng.random()
        if here is not None and carried and roll < 0.2:
            obj = carried[rng.integers(len(carried))]
            del self.holder[obj]
            self.object_at[obj] = here
            self.facts.append(f"{actor} {DROPS[rng.integers(len(DROPS))]} the {obj}.")
        elif here is not None and takeable and roll < 0.45:
            obj = takeable[rng.integers(len(takeable))]
            self.holder[obj] = actor
            self.object_at.pop(obj, None)
            self._note(obj, here)
            self.facts.append(f"{actor} {TAKES[rng.integers(len(TAKES))]} the {obj} there.")
        else:
            place = PLACES[rng.integers(len(PLACES))]
            self.actor_at[actor] = place
            for obj in carried:
                self._note(obj, place)
            self.facts.append(_move(rng, actor, place))

    def location(self, obj: str) -> str | None:
        if obj in self.holder:
            return self.actor_at.get(self.holder[obj])
        return self.object_at.get(obj)


def _qa2(rng: np.random.Generator, n_facts: int) -> Story | None:
    world = _World(rng)
    for _ in range(n_facts):
        world.act()
    known = [o for o in OBJECTS if o in world.trail and world.location(o) is not None]
    if not known:
        return None
    obj = known[rng.integers(len(known))]
    return Story("qa2", tuple(world.facts), f"Where is the {obj}?", world.location(obj))


def _qa3(rng: np.random.Generator, n_facts: int) -> Story | None:
    world = _World(rng)
    for _ in range(n_facts):
        world.act()
    choices = [(o, i) for o, trail in sorted(world.trail.items()) for i in range(1, len(trail))
               if trail.count(trail[i]) == 1]  # a place the object entered once: "before" is unambiguous
    if not choices:
        return None
    obj, i = choices[rng.integers(len(choices))]
    trail = world.trail[obj]
    return Story("qa3", tuple(world.facts), f"Where was the {obj} before the {trail[i]}?", trail[i - 1])


def _qa4(rng: np.random.Generator, n_facts: int) -> Story:
    a, b, c = (PLACES[i] for i in rng.permutation(len(PLACES))[:3])
    d1, d2 = (list(OPPOSITE)[i] for i in rng.integers(4, size=2))
    facts = (f"The {a} is {d1} of the {b}.", f"The {c} is {d2} of the {a}.")
    pick = rng.integers(4)
    if pick == 0:
        return Story("qa4", facts, f"What is {d1} of the {b}?", a)
    if pick == 1:
        return Story("qa4", facts, f"What is the {a} {d1} of?", b)
    if pick == 2:
        return Story("qa4", facts, f"What is {d2} of the {a}?", c)
    return Story("qa4", facts, f"What is the {c} {d2} of?", a)


def _qa5(rng: np.random.Generator, n_facts: int) -> Story | None:
    holder: dict[str, str] = {}
    facts, last = [], None
    for _ in range(n_facts):
        actor = GIVERS[rng.integers(len(GIVERS))]
        mine = [o for o, a in holder.items() if a == actor]
        free = [o for o in OBJECTS if o not in holder]
        roll = rng.random()
        if mine and roll < 0.5:
            obj = mine[rng.integers(len(mine))]
            receiver = [g for g in GIVERS if g != actor][rng.integers(len(GIVERS) - 1)]
            holder[obj] = receiver
            last = (actor, obj, receiver)
            facts.append(f"{actor} {GIVES[rng.integers(len(GIVES))]} the {obj} to {receiver}.")
        elif free and roll < 0.8:
            obj = free[rng.integers(len(free))]
            holder[obj] = actor
            facts.append(f"{actor} {TAKES[rng.integers(len(TAKES))]} the {obj} there.")
        else:
            facts.append(_move(rng, actor, PLACES[rng.integers(len(PLACES))]))
    if last is None:
        return None
    giver, obj, receiver = last  # the latest transfer: every question about it has one answer
    forms = ((f"Who gave the {obj} to {receiver}?", giver), (f"Who received the {obj}?", receiver),
             (f"What did {giver} give to {receiver}?", obj), (f"Who did {giver} give the {obj} to?", receiver))
    question, answer = forms[rng.integers(len(forms))]
    return Story("qa5", tuple(facts), question, answer)


GENERATORS: dict[str, Callable[[np.random.Generator, int], Story | None]] = {
    "qa1": _qa1, "qa2": _qa2, "qa3": _qa3, "qa4": _qa4, "qa5": _qa5}


def generate_stories(task: str, seed: int, min_facts: int, max_facts: int) -> Iterator[Story]:
    """An endless, seeded stream of ``task`` stories (qa4 always has its two relation sentences)."""
    rng = np.random.default_rng([seed, TASKS.index(task)])
    while True:
        story = GENERATORS[task](rng, int(rng.integers(min_facts, max_facts + 1)))
        if story is not None:
            yield story


# --- facebook/babi_qa ----------------------------------------------------------------------------


def stories_from_babi_qa(rows: Iterator[dict], task: str) -> Iterator[Story]:
    """Rows of ``facebook/babi_qa`` (``{"story": {"type": [0 context | 1 question], "text": [...],
    "answer": [...]}}``) -> one Story per question, its facts every context sentence before it."""
    for n, row in enumerate(rows):
        story = row.get("story") if isinstance(row, dict) else None
        if not isinstance(story, dict) or not all(k in story for k in ("type", "text", "answer")):
            raise UserError(f"bAbI row {n} is not in facebook/babi_qa's schema (story.type, story.text, story.answer)")
        facts: list[str] = []
        for kind, text, answer in zip(story["type"], story["text"], story["answer"]):
            if int(kind) == 0:
                facts.append(text.strip())
            else:
                yield Story(task, tuple(facts), text.strip(), answer.strip())


def babi_qa_rows(source: str, task: str, streaming: bool = False) -> Iterator[dict]:
    """``hf:facebook/babi_qa`` (config ``en-10k-<task>``, train split; downloaded once into the HF cache,
    or streamed with ``streaming``: ``data.hf_streaming``) or a local .jsonl in that schema (rows may
    carry a ``task`` field; rows of other tasks are skipped)."""
    if source.startswith("hf:"):
        import datasets  # lazy: only an hf: facts source needs it (seconds of import)

        yield from datasets.load_dataset(source[3:], f"en-10k-{task}", split="train", streaming=streaming)
        return
    path = Path(source)
    if not path.is_file():
        raise UserError(f"data.babilong.facts {source} does not exist")
    with path.open() as f:
        for n, line in enumerate(f):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise UserError(f"{source} line {n + 1} is not JSON") from None
            if row.get("task", task) == task:
                yield row
