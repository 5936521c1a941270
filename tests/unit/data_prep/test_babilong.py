"""BABILong prep: bAbI answers right by construction, facts in order, exact lengths, disjoint splits,
the same bytes for any worker count, and one clear line for each bad input."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from data_prep import prepare
from data_prep.babi import GIVERS, OPPOSITE, PLACES, TASK_LABELS, generate_stories, parse_tasks, stories_from_babi_qa
from data_prep.manifest import read_manifest
from data_prep.shards import open_split
from data_prep.tokenizer import Encoder
from pipeline.cli import main
from pipeline.config import load_config
from pipeline.errors import UserError

SEG = 64


def babilong_config(tmp_path: Path, **babilong):
    lengths = babilong.pop("lengths", [2, 3, 4])
    overrides = babilong.pop("overrides", [])
    source = babilong.pop("source", "babilong:qa1,qa2,qa3,qa4,qa5")
    tree = {"train_samples": 24, "val_samples": 8, "test_samples": 8, "max_facts": 3, "lengths": lengths, **babilong}
    return load_config(None, [f"data.source={source}",
                              f"data.output_dir={tmp_path / 'out'}", f"data.segment_len={SEG}",
                              f"data.n_segments={max(lengths)}", "data.vocab_size=400",
                              "data.val_fraction=0.2", "data.test_fraction=0.2",
                              "data.babilong=" + json.dumps(tree), *overrides])


@pytest.fixture(scope="module")
def prepped(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("babilong")
    prepare(babilong_config(root))
    return root / "out"


# --- the bAbI generator: answers recomputed by an independent reading of the facts -----------------


def solve(task: str, facts: tuple[str, ...], question: str) -> str:
    """Answer a story from its sentences alone (a second, simpler implementation of the world)."""
    at, holder, lies, trail = {}, {}, {}, {}
    relations = []
    last_give = None
    for fact in facts:
        words = fact.rstrip(".").split()
        if m := re.fullmatch(r"(\w+) (?:moved|went|journeyed|travelled|went back) to the (\w+)\.", fact):
            at[m[1]] = m[2]
            for obj, who in holder.items():
                if who == m[1] and (not trail.get(obj) or trail[obj][-1] != m[2]):
                    trail.setdefault(obj, []).append(m[2])
        elif m := re.fullmatch(r"(\w+) (?:got|grabbed|picked up|took) the (\w+) there\.", fact):
            holder[m[2]] = m[1]
            lies.pop(m[2], None)
            if m[1] in at and (not trail.get(m[2]) or trail[m[2]][-1] != at[m[1]]):
                trail.setdefault(m[2], []).append(at[m[1]])
        elif m := re.fullmatch(r"(\w+) (?:dropped|discarded|put down|left) the (\w+)\.", fact):
            del holder[m[2]]
            lies[m[2]] = at[m[1]]
        elif m := re.fullmatch(r"(\w+) (?:gave|handed|passed) the (\w+) to (\w+)\.", fact):
            holder[m[2]] = m[3]
            last_give = (m[1], m[2], m[3])
        elif m := re.fullmatch(r"The (\w+) is (\w+) of the (\w+)\.", fact):
            relations.append((m[1], m[2], m[3]))
        else:
            raise AssertionError(f"unknown sentence form: {fact} ({words})")
    if m := re.fullmatch(r"Where is (\w+)\?", question):
        return at[m[1]]
    if m := re.fullmatch(r"Where is the (\w+)\?", question):
        return at[holder[m[1]]] if m[1] in holder else lies[m[1]]
    if m := re.fullmatch(r"Where was the (\w+) before the (\w+)\?", question):
        return trail[m[1]][trail[m[1]].index(m[2]) - 1]
    if m := re.fullmatch(r"What is (\w+) of the (\w+)\?", question):
        return next(a for a, d, b in relations if d == m[1] and b == m[2])
    if m := re.fullmatch(r"What is the (\w+) (\w+) of\?", question):
        return next(b for a, d, b in relations if a == m[1] and d == m[2])
    giver, obj, receiver = last_give
    if re.fullmatch(r"Who gave the \w+ to \w+\?|Who did \w+ give the \w+ to\?|Who received the \w+\?", question):
        return giver if question.startswith("Who gave") else receiver
    assert re.fullmatch(r"What did \w+ give to \w+\?", question)
    return obj


@pytest.mark.parametrize("task", ["qa1", "qa2", "qa3", "qa4", "qa5"])
def test_generated_answers_are_right_and_in_the_task_labels(task: str) -> None:
    stream = generate_stories(task, seed=3, min_facts=2, max_facts=12)
    for _ in range(300):
        story = next(stream)
        assert story.answer in TASK_LABELS[task]
        assert solve(task, story.facts, story.question) == story.answer, story
    assert set(OPPOSITE) == {"north", "south", "east", "west"} and "Mary" in GIVERS and "office" in PLACES


def test_same_seed_same_stories_other_seed_other_stories() -> None:
    take = lambda seed: [next(s) for s in [generate_stories("qa2", seed, 2, 8)] for _ in range(50)]  # noqa: E731
    assert take(1) == take(1) and take(1) != take(2)


def test_babi_qa_schema_rows_become_one_story_per_question() -> None:
    row = {"story": {"id": ["1", "2", "3", "4", "5"], "type": [0, 0, 1, 0, 1],
                     "text": ["Mary moved to the bathroom.", "John went to the hallway.", "Where is Mary?",
                              "Mary went to the office.", "Where is Mary?"],
                     "supporting_ids": [[], [], ["1"], [], ["4"]], "answer": ["", "", "bathroom", "", "office"]}}
    stories = list(stories_from_babi_qa(iter([row]), "qa1"))
    assert [(len(s.facts), s.answer) for s in stories] == [(2, "bathroom"), (3, "office")]
    with pytest.raises(UserError, match="facebook/babi_qa's schema"):
        list(stories_from_babi_qa(iter([{"text": "no story"}]), "qa1"))


def test_unknown_or_repeated_task_is_a_user_error() -> None:
    with pytest.raises(UserError, match="unknown bAbI task 'qa9'"):
        parse_tasks("qa1,qa9")
    with pytest.raises(UserError, match="twice"):
        parse_tasks("qa1,qa1")


# --- samples ---------------------------------------------------------------------------------------


def test_samples_are_exact_facts_in_order_question_and_answer_at_the_end(prepped: Path) -> None:
    manifest = read_manifest(prepped)
    assert manifest["babilong"]["tasks"] == ["qa1", "qa2", "qa3", "qa4", "qa5"]
    assert manifest["babilong"]["counts"]["train"] == {"2": 24, "3": 24, "4": 24}
    encoder = Encoder(prepped / "tokenizer")
    eos = manifest["eos_token_id"]
    for split in ("train", "val", "test"):
        rows = open_split(prepped, split).with_format("numpy")
        assert sorted(set(rows["task"])) == ["qa1", "qa2", "qa3", "qa4", "qa5"]
        for row in rows:
            n = int(row["n_segments"]) * SEG
            ids, answer = row["input_ids"], row["recall_mask"].astype(bool)
            assert (row["loss_mask"][:n] == row["recall_mask"][:n]).all() and not row["loss_mask"][n:].any()
            assert answer[:n].nonzero()[0].tolist() == list(range(n - answer.sum(), n))  # the last tokens
            assert ids[n - 1] == eos and encoder.decode(ids[answer][:-1].tolist()).strip() == row["target"]
            text = encoder.decode(ids[:n][~answer[:n]].tolist())
            assert text.endswith(f" Question: {row['question']} Answer:")
            story = [m for m in re.findall(r"[A-Z][a-z]+ (?:moved|went|journeyed|travelled|got|grabbed|picked|took|"
                                           r"dropped|discarded|put|left|gave|handed|passed)[^.]*\.|The \w+ is \w+ of"
                                           r" the \w+\.", text)]
            assert story and solve(row["task"], tuple(story), row["question"]) == row["target"]


def test_splits_share_no_story_and_no_background_book(prepped: Path) -> None:
    books = {split: set(open_split(prepped, split)["book_id"]) for split in ("train", "val", "test")}
    for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not books[a] & books[b]
    # the story stream itself: every story's split is a hash of its text, so a text maps to one split
    from data_prep.babilong import split_stories

    cfg = babilong_config(Path("/nonexistent"))
    pools = split_stories(cfg.data, ["qa1"], {"train": 400, "val": 40, "test": 40})
    texts = {s: {story.key() for story in pools[s]["qa1"]} for s in pools}
    assert not texts["train"] & texts["val"] and not texts["train"] & texts["test"] and not texts["val"] & texts["test"]


def test_output_is_byte_identical_for_any_worker_count(tmp_path: Path, prepped: Path) -> None:
    prepare(babilong_config(tmp_path, overrides=["data.workers=2"]))
    a, b = read_manifest(prepped), read_manifest(tmp_path / "out")
    assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]


def babi_qa1_jsonl(path: Path) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in babi_qa1_rows()))
    return path


def babi_qa1_rows(n: int = 60) -> list[dict]:
    """Rows in facebook/babi_qa's schema (its en-10k-qa1 config)."""
    rows = []
    for i in range(n):
        place, other = PLACES[i % 6], PLACES[(i + 1) % 6]
        rows.append({"story": {"type": [0, 0, 1], "text": [f"Mary went to the {other}.", f"Mary moved to the {place}.",
                                                             "Where is Mary?"], "answer": ["", "", place]}})
    return rows


def prep_from_facts(root: Path, facts: str, *overrides: str) -> Path:
    prepare(babilong_config(root, source="babilong:qa1", facts=facts, train_samples=4, val_samples=1,
                            test_samples=1, lengths=[2], overrides=list(overrides)))
    return root / "out"


def test_babi_qa_file_facts(tmp_path: Path) -> None:
    split = open_split(prep_from_facts(tmp_path, str(babi_qa1_jsonl(tmp_path / "babi.jsonl"))), "train")
    assert set(split["target"]) <= set(PLACES) and split["question"] == ["Where is Mary?"] * 4


HUB_CARD = """---
configs:
- config_name: en-10k-qa1
  data_files:
  - split: train
    path: en-10k-qa1/train-*.parquet
---
"""


@pytest.mark.parametrize("streaming", [False, True])
def test_hf_babi_qa_facts_are_downloaded_once_or_streamed(tmp_path: Path, monkeypatch, streaming: bool) -> None:
    """``hf:facebook/babi_qa`` through the real loader: here a local folder laid out as that Hub repo (a
    card naming the en-10k-qa1 config, Parquet rows in its schema). The same samples as the same rows
    in a .jsonl; by default the rows land in the HF cache (read once, then from disk), with
    data.hf_streaming they never do."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(cache))
    repo = tmp_path / "babi_qa"
    (repo / "en-10k-qa1").mkdir(parents=True)
    (repo / "README.md").write_text(HUB_CARD)
    pq.write_table(pa.Table.from_pylist(babi_qa1_rows()), repo / "en-10k-qa1" / "train-00000-of-00001.parquet")
    from_hub = prep_from_facts(tmp_path / "hub", f"hf:{repo}", f"data.hf_streaming={str(streaming).lower()}")
    from_file = prep_from_facts(tmp_path / "file", str(babi_qa1_jsonl(tmp_path / "babi.jsonl")))
    for split in ("train", "val", "test"):
        assert open_split(from_hub, split).to_dict() == open_split(from_file, split).to_dict(), split
    cached = list(cache.rglob("*.arrow"))  # none (and no folder) when streamed
    assert bool(cached) is not streaming, cached


# --- bad inputs: one line, exit code 2 ----------------------------------------------------------------


def run_prep(tmp_path: Path, capsys, *overrides: str) -> tuple[int, str]:
    code = main(["prep", "--config", str(_write_config(tmp_path)), "--set", *overrides])
    err = capsys.readouterr().err.strip().splitlines()
    return code, (err[-1] if err else "")


def _write_config(tmp_path: Path) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(babilong_config(tmp_path, source="babilong:qa1", lengths=[1, 2]).to_yaml())
    return path


def test_unknown_task(tmp_path: Path, capsys) -> None:
    code, line = run_prep(tmp_path, capsys, "data.source=babilong:qa1,qa42")
    assert code == 2 and line.startswith("memtrain prep: error: unknown bAbI task 'qa42'")


def test_lengths_that_do_not_fit(tmp_path: Path, capsys) -> None:
    code, line = run_prep(tmp_path, capsys, "data.segment_len=16")
    assert code == 2 and "more than a 1-segment sample holds (16)" in line
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_background_too_short(tmp_path: Path, capsys) -> None:
    books = tmp_path / "books.jsonl"
    books.write_text("".join(json.dumps({"text": f"A short book number {i}. It ends."}) + "\n" for i in range(12)))
    code, line = run_prep(tmp_path, capsys, f"data.babilong.background={books}")
    assert code == 2 and "tokens of background, a sample needs" in line


def test_curriculum_length_without_samples(tmp_path: Path, capsys) -> None:
    code, line = run_prep(tmp_path, capsys, "train.curriculum=[{from_step: 0, n_segments: 1}]",
                          "data.babilong.lengths=[2]", "data.n_segments=2")
    assert code == 2 and "has no samples of that length" in line
