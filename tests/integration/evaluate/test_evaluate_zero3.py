"""evaluate_model on 2 ZeRO-3 ranks (torchrun, gloo) gives the numbers of one plain process, and
`memtrain eval` on the checkpoint those ranks save reproduces them, baseline included."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import as_overrides, experiment

from data_prep import prepare
from data_prep.manifest import read_manifest
from data_prep.shards import open_split
from pipeline.config import load_config
from pipeline.evaluate import EvalResult, evaluate_model, run_eval
from pipeline.models import build_model

N_SAMPLES = 7  # on 2 ranks in batches of 2: rank 1 pads its share, and the history windows add calls


def overrides(root: Path) -> list[str]:
    return as_overrides(experiment(
        root, data={"source": "synthetic:8", "segment_len": 16, "n_segments": 3, "vocab_size": 384},
        memory={"num_tokens": 2}, model={"hidden_size": 16, "max_positions": 32}, tracking={"enabled": True},
        eval={"batch_size": 2, "max_samples": N_SAMPLES, "history_target": True}))


def assert_close(got: EvalResult, expected: EvalResult, rel: float) -> None:
    assert got.n_samples == expected.n_samples and len(got.history) == len(expected.history)
    for a, b in zip(got.segments + got.history, expected.segments + expected.history):
        assert (a.tokens, a.recall_tokens) == (b.tokens, b.recall_tokens)
        assert a.nll_sum == pytest.approx(b.nll_sum, rel=rel)
        assert a.recall_nll_sum == pytest.approx(b.recall_nll_sum, rel=rel)


@pytest.mark.slow
def test_two_zero3_ranks_equal_one_process_and_memtrain_eval(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = load_config(None, overrides(tmp_path))
    prepare(cfg)
    manifest = read_manifest(cfg.data.output_dir)
    torch.manual_seed(0)
    model = build_model(cfg, manifest["vocab_size"], manifest["bos_token_id"], manifest["eos_token_id"],
                        manifest["pad_token_id"])
    torch.save(model.state_dict(), tmp_path / "state.pt")
    val = open_split(cfg.data.output_dir, "val")
    assert len(val) > N_SAMPLES
    expected = evaluate_model(model, val, cfg)

    job = {"overrides": overrides(tmp_path), "state": str(tmp_path / "state.pt"), "out": str(tmp_path)}
    (tmp_path / "job.json").write_text(json.dumps(job))
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(Path(__file__).with_name("zero3_eval_rank.py")), str(tmp_path / "job.json")],
                          env={**os.environ, "DS_ACCELERATOR": "cpu"}, cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    for rank in range(2):
        assert_close(EvalResult.from_json(tmp_path / f"rank{rank}.json"), expected, rel=1e-5)

    train_dir = tmp_path / "train"
    args = argparse.Namespace(checkpoint=str(train_dir), json=str(tmp_path / "eval.json"), config=None,
                              overrides=[f"eval.baseline={train_dir}"])
    assert run_eval(args) == 0
    assert "baseline ppl" in capsys.readouterr().out
    reported = EvalResult.from_json(tmp_path / "eval.json")
    assert_close(reported, expected, rel=1e-5)
    assert reported.baseline.segments == reported.segments and reported.baseline.history == reported.history
    assert EvalResult.from_json(train_dir / "eval" / "step_00000001.json") == reported
    assert (train_dir / "eval" / "step_00000001.png").is_file()
