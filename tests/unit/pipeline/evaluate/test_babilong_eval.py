"""BABILong eval: the official scorer's edge cases, the official-schema loaders, the length pools of
training, and the eval loop on a real (untrained) model: every row, both models, positions respected."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import datasets
import pytest
import torch

from data_prep import prepare
from pipeline.babilong_eval import default_lengths, evaluate_runs, format_table
from pipeline.babilong_qa import official_records, prep_samples, score_answer
from pipeline.checkpoint import TrainedModel
from pipeline.config import load_config
from pipeline.data import LengthPools, make_train_batches
from pipeline.ds_config import BatchPlan
from pipeline.errors import UserError

PLACES = ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office")
SEG = 32


@pytest.mark.parametrize("output, target, question, right", [
    ("kitchen", "kitchen", "Where is Mary?", True),
    (" The Kitchen is where", "kitchen", "Where is Mary?", True),  # case-insensitive
    ("kitchen or office", "kitchen", "Where is Mary?", False),  # another label
    ("office. kitchen", "office", "Where is Mary?", True),  # only the first sentence counts
    ("office. kitchen", "kitchen", "Where is Mary?", False),
    ("hallway, not the kitchen", "hallway", "Where was the apple before the kitchen?", True),  # asked label
    ("", "kitchen", "Where is Mary?", False),
    ("office<context>kitchen", "office", "Where is Mary?", True),
    ("Fred", "Fred", "Who gave the football to Mary?", True),
    ("Fred and Mary", "Fred", "Who gave the milk to Bill?", False),
])
def test_official_scoring(output: str, target: str, question: str, right: bool) -> None:
    labels = ("Bill", "Fred", "Jeff", "Mary", "apple", "football", "milk") if target == "Fred" else PLACES
    assert score_answer(output, target, question, labels) is right


def test_official_files_parquet_and_jsonl(tmp_path: Path) -> None:
    records = [{"input": f"Mary went to the {p}.", "question": "Where is Mary?", "target": p} for p in PLACES]
    datasets.Dataset.from_list(records).to_parquet(tmp_path / "qa1_4k.parquet")
    (tmp_path / "any.jsonl").write_text("".join(json.dumps({**r, "task": "qa2"}) + "\n" for r in records))
    parquet = list(official_records(str(tmp_path / "qa1_4k.parquet"), [], []))
    assert [(task, r["target"]) for task, _, r in parquet] == [("qa1", p) for p in PLACES]
    assert {task for task, _, _ in official_records(str(tmp_path / "any.jsonl"), [], [])} == {"qa2"}


def test_official_file_bad_inputs(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text(json.dumps({"input": "x", "question": "Where is Mary?"}) + "\n")
    with pytest.raises(UserError, match="record 0 lacks target"):
        list(official_records(str(tmp_path / "bad.jsonl"), [], []))
    with pytest.raises(UserError, match="does not exist"):
        list(official_records(str(tmp_path / "none.parquet"), [], []))
    (tmp_path / "x.csv").write_text("input,question,target\n")
    with pytest.raises(UserError, match="expected a .parquet or .jsonl"):
        list(official_records(str(tmp_path / "x.csv"), [], []))


def test_default_lengths_reach_16x_training() -> None:
    assert default_lengths(4) == [1, 2, 4, 8, 16, 32, 64] and default_lengths(1) == [1, 2, 4, 8, 16]


# --- a real prep, the length pools and the eval loop -----------------------------------------------


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> TrainedModel:
    root = tmp_path_factory.mktemp("babilong-eval")
    cfg = load_config(None, ["data.source=babilong:qa1", f"data.output_dir={root / 'data'}", f"data.segment_len={SEG}",
                             "data.n_segments=4", "data.vocab_size=400", "data.val_fraction=0.2",
                             "data.test_fraction=0.2", 'data.babilong={"lengths": [1, 2, 4], "train_samples": 12, '
                             '"val_samples": 4, "test_samples": 4, "min_facts": 1, "max_facts": 2}',
                             "model.max_positions=64", "memory.num_tokens=2"])
    prepare(cfg)
    run_dir = root / "run"
    shutil.copytree(root / "data" / "tokenizer", run_dir / "tokenizer")
    manifest = json.loads((root / "data" / "manifest.json").read_text())
    from pipeline.models import build_model

    torch.manual_seed(0)
    model = build_model(cfg, vocab_size=manifest["vocab_size"], bos_token_id=manifest["bos_token_id"],
                        eos_token_id=manifest["eos_token_id"], pad_token_id=manifest["pad_token_id"]).eval()
    return TrainedModel(cfg, run_dir, run_dir, {"step": 0}, manifest, model=model)


def test_length_pools_take_samples_of_the_stage_length_and_resume(run: TrainedModel) -> None:
    from pipeline.data import open_train_split

    split = open_train_split(run.cfg.data.output_dir)
    batches = make_train_batches(split, BatchPlan(4, 1, 1), 0, SEG, seed=0, saved=None)
    assert isinstance(batches, LengthPools)
    for n in (1, 2, 4, 2):
        (micro,) = batches.next_step([n])
        assert micro.input_ids.shape == (4, n * SEG)
        assert (micro.labels[:, -2:] != -100).all()  # the answer (word + eos) ends every truncated row
    saved = batches.position.as_dict()
    again = make_train_batches(split, BatchPlan(4, 1, 1), 0, SEG, seed=0, saved=saved)
    assert torch.equal(again.next_step([2])[0].input_ids, batches.next_step([2])[0].input_ids)
    with pytest.raises(UserError, match="no training samples of 3 segments"):
        batches.next_step([3])


def test_eval_rows_for_model_and_full_baseline(run: TrainedModel) -> None:
    bl = run.cfg.eval.babilong.model_copy(update={"lengths": [1, 2, 4], "samples": 3})
    full_cfg = run.cfg.model_copy(update={"memory": run.cfg.memory.model_copy(update={"kind": "full"}),
                                          "data": run.cfg.data.model_copy(update={"n_segments": 2})})
    from pipeline.models import build_model

    m = run.manifest
    full = TrainedModel(full_cfg, run.run_dir, run.run_dir, {"step": 0}, m,
                        model=build_model(full_cfg, vocab_size=m["vocab_size"], bos_token_id=m["bos_token_id"],
                                          eos_token_id=m["eos_token_id"], pad_token_id=m["pad_token_id"]).eval())
    rows = evaluate_runs(run, full, bl)
    assert [(r["task"], r["length_tokens"], r["samples"]) for r in rows] == [("qa1", n * SEG, 3) for n in (1, 2, 4)]
    for r in rows:
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["tf_accuracy"] <= 1
    # full attention reaches 64 positions: the 128-token context is out of its reach, not scored as wrong
    assert rows[-1]["baseline_accuracy"] is None and rows[0]["baseline_accuracy"] is not None
    assert "qa1" in format_table(rows, "full").splitlines()[-1]


def test_prep_folder_source(run: TrainedModel) -> None:
    samples = prep_samples(run.cfg.data.output_dir, [2], SEG, limit=10)
    assert len(samples) == 4 and all(len(s.prompt) + len(s.answer) == 2 * SEG for s in samples)
    assert all(s.answer[-1] == run.manifest["eos_token_id"] for s in samples)


def test_a_run_not_trained_on_babilong_needs_a_source(run: TrainedModel) -> None:
    from pipeline.babilong_eval import load_samples

    cfg = run.cfg.model_copy(update={"data": run.cfg.data.model_copy(update={"source": "synthetic:4"})})
    with pytest.raises(UserError, match="was not trained on babilong data: set eval.babilong.source"):
        load_samples(replace(run, cfg=cfg), cfg.eval.babilong, run.run_dir / "tokenizer")


class Oracle(torch.nn.Module):
    """Logits that put the next token (``shift`` 1) or the current one (``shift`` 0) first: position
    alignment of the teacher-forced accuracies, checked with a model that is all right or all wrong."""

    def __init__(self, shift: int, vocab: int) -> None:
        super().__init__()
        self.shift, self.vocab, self.weight = shift, vocab, torch.nn.Parameter(torch.zeros(1))
        self.config = type("C", (), {"segment_len": SEG, "memory_kind": "rmt", "max_positions": 64})()

    def forward(self, input_ids):
        target = torch.roll(input_ids, -self.shift, dims=1)
        return type("O", (), {"logits": torch.nn.functional.one_hot(target, self.vocab).float()})()


@pytest.mark.parametrize("shift, expected", [(1, 1.0), (0, 0.0)])
def test_teacher_forced_accuracies_align_positions(run: TrainedModel, shift: int, expected: float) -> None:
    from data_prep.shards import open_split
    from pipeline.babilong_qa import _teacher_forced, answer_accuracy_by_task

    oracle = Oracle(shift, run.manifest["vocab_size"])
    split = open_split(run.cfg.data.output_dir, "test").with_format("numpy")
    assert answer_accuracy_by_task(oracle, split, SEG, batch_size=3, per_length=10) == {"qa1": expected}
    samples = [s for s in prep_samples(run.cfg.data.output_dir, [2], SEG, limit=10)]
    by_len = {}
    for s in samples:
        by_len.setdefault(len(s.prompt), []).append(s)
    forced = [ok for group in by_len.values() for ok in _teacher_forced(oracle, group, run.manifest["pad_token_id"])]
    assert forced and all(ok == bool(expected) for ok in forced)


def test_export_model_index_entries() -> None:
    from pipeline.model_card import babilong_results

    rows = [{"task": "qa1", "length_tokens": 128, "accuracy": 0.9}, {"task": "qa1", "length_tokens": 4096,
                                                                       "accuracy": None}]
    (entry,) = babilong_results(rows)
    assert (entry.metric_type, entry.metric_value, entry.dataset_config) == ("accuracy", 0.9, "qa1")
    assert "128 tokens" in entry.metric_name


def test_metrics_go_to_the_checkpoints_mlflow_run_with_length_as_step(run: TrainedModel, tmp_path: Path) -> None:
    from mlflow import MlflowClient

    from pipeline.babilong_eval import log_to_run

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("babilong")).info.run_id
    cfg = run.cfg.model_copy(update={"tracking": run.cfg.tracking.model_copy(update={"uri": uri})})
    rows = [{"task": "qa1", "length_tokens": n, "accuracy": a, "tf_accuracy": a, "baseline_accuracy": 0.2}
            for n, a in ((32, 0.9), (512, 0.7))]
    (tmp_path / "t.json").write_text("{}")
    log_to_run(replace(run, cfg=cfg, state={"mlflow_run_id": run_id}), rows, [tmp_path / "t.json"])
    history = client.get_metric_history(run_id, "babilong/qa1_accuracy")
    assert sorted((p.step, p.value) for p in history) == [(32, 0.9), (512, 0.7)]
    assert [a.path for a in client.list_artifacts(run_id, "eval/babilong")] == ["eval/babilong/t.json"]
