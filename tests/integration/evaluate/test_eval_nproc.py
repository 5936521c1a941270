"""`memtrain eval --nproc 2`: the session's 2-rank run scored on 2 ZeRO-3 ranks (each loads its own
shards, as a resumed training does) gives the table of a one-process `memtrain eval` (a plain model,
consolidated), baseline and history protocol included, on an odd number of samples (rank 1 pads its
share with a masked copy); one table, one MLflow record, and a bad input is one line with exit code 2."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from processes import memtrain, process_env
from shared_run import TrainedRun

from pipeline.checkpoint import find_latest
from pipeline.evaluate import EvalResult

pytestmark = pytest.mark.slow

REL = 1e-5  # ZeRO-3 over 2 gloo ranks vs one plain process, fp32 (measured: ~4e-8)


def private_copy(trained_run: TrainedRun, root: Path) -> tuple[Path, str]:
    """The trained run and its MLflow store copied: this eval's files and records land in the copies
    (the session's run is read by other tests). Returns the run folder and the store's URI."""
    run, store = root / "train", root / "mlflow.db"
    shutil.copytree(trained_run.output_dir, run)
    shutil.copy2(trained_run.tracking_db, store)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["tracking"]["uri"] = f"sqlite:///{store}"
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    return run, f"sqlite:///{store}"


def eval_records(uri: str, run: Path) -> int:
    """How many checkpoint_eval/ppl points the run's MLflow run holds."""
    state = json.loads((find_latest(run / "checkpoints") / "memtrain_state.json").read_text())
    return len(MlflowClient(uri).get_metric_history(state["mlflow_run_id"], "checkpoint_eval/ppl"))


def assert_same_table(got: EvalResult, expected: EvalResult) -> None:
    assert (got.split, got.n_samples, got.segment_len) == (expected.split, expected.n_samples, expected.segment_len)
    assert (got.history is None, got.baseline is None) == (expected.history is None, expected.baseline is None)
    pairs = list(zip(got.segments + (got.history or []), expected.segments + (expected.history or []), strict=True))
    if expected.baseline is not None:
        pairs += list(zip(got.baseline.segments, expected.baseline.segments, strict=True))
    for a, b in pairs:
        assert (a.tokens, a.recall_tokens) == (b.tokens, b.recall_tokens)
        assert a.nll_sum == pytest.approx(b.nll_sum, rel=REL)
        assert a.recall_nll_sum == pytest.approx(b.recall_nll_sum, rel=REL)


def test_two_ranks_give_the_one_process_table(trained_run: TrainedRun, tmp_path: Path) -> None:
    run, uri = private_copy(trained_run, tmp_path)
    before = eval_records(uri, run)
    # 7 samples in batches of 2 on 2 ranks: rank 1 pads its share; the history windows add forward calls
    settings = ["--set", f"eval.baseline={trained_run.baseline_dir}", "eval.max_samples=7", "eval.batch_size=2",
                "eval.history_target=true"]
    one, out = tmp_path / "one.json", tmp_path / "eval.json"
    memtrain("eval", "--checkpoint", str(run), "--json", str(one), *settings, cwd=tmp_path)
    proc = memtrain("eval", "--nproc", "2", "--checkpoint", str(run), "--json", str(out), *settings, cwd=tmp_path)

    expected = EvalResult.from_json(one)
    assert expected.n_samples == 7 and expected.history and expected.baseline is not None
    assert_same_table(EvalResult.from_json(out), expected)
    assert EvalResult.from_json(run / "eval" / "step_00000004.json") == EvalResult.from_json(out)
    lines = proc.stdout.splitlines()
    assert sum(line.startswith("segment ") for line in lines) == 1, proc.stdout  # rank 0 alone prints
    assert sum(" step 4: " in line for line in lines) == 1 and sum(line.startswith("wrote ") for line in lines) == 1
    assert eval_records(uri, run) == before + 2  # one record per eval: rank 0 alone logs
    assert "error" not in proc.stderr.lower(), proc.stderr


def test_another_world_size_than_the_checkpoints_gives_the_same_table(trained_run: TrainedRun, tmp_path: Path) -> None:
    """3 ranks on a 2-rank checkpoint: rank 0 writes DeepSpeed's universal conversion beside it, every
    rank loads its share of that; 5 samples in batches of 2 leave rank 2 a padded share."""
    run, _ = private_copy(trained_run, tmp_path)
    settings = ["--set", "eval.max_samples=5", "eval.batch_size=2"]
    one, out = tmp_path / "one.json", tmp_path / "eval.json"
    memtrain("eval", "--checkpoint", str(run), "--json", str(one), *settings, cwd=tmp_path)
    memtrain("eval", "--nproc", "3", "--checkpoint", str(run), "--json", str(out), *settings, cwd=tmp_path)
    assert_same_table(EvalResult.from_json(out), EvalResult.from_json(one))
    tag = find_latest(run / "checkpoints").name
    assert (run / "checkpoints" / "universal" / tag).is_dir()


def one_error_line(proc, command: str = "memtrain eval") -> str:
    errors = [line for line in proc.stderr.splitlines() if line.startswith(f"{command}: error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return errors[0]


def test_bad_inputs_are_one_line_and_exit_2(trained_run: TrainedRun, tmp_path: Path) -> None:
    assert "--nproc must be >= 1, got 0" in one_error_line(
        memtrain("eval", "--nproc", "0", "--checkpoint", str(trained_run.output_dir), check=False))

    tag_dir = find_latest(trained_run.output_dir / "checkpoints")
    damaged = tmp_path / "train" / "checkpoints" / tag_dir.name
    shutil.copytree(trained_run.output_dir, tmp_path / "train", ignore=shutil.ignore_patterns("step_*"))
    shutil.copytree(tag_dir, damaged)
    next(damaged.glob("*zero_pp_rank_1_*optim_states.pt")).unlink()
    line = one_error_line(memtrain("eval", "--nproc", "2", "--checkpoint", str(damaged), check=False))
    assert "is incomplete" in line and "zero_pp_rank_1_" in line  # said by the launcher, before any rank starts

    # under an outside launcher each rank finds it; rank 0 alone says it
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "pipeline.cli", "eval", "--checkpoint", str(damaged)]
    ranks = subprocess.run(torchrun, capture_output=True, text=True, env=process_env(), timeout=300)
    assert sum("memtrain eval: error: " in line for line in ranks.stderr.splitlines()) == 1, ranks.stderr
    assert "is incomplete" in ranks.stderr and ranks.returncode != 0
