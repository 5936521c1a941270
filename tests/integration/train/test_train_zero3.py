"""`memtrain train` on 2 ZeRO-3 CPU ranks over gloo, with the real model, data, DeepSpeed and MLflow."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from processes import REPO_ROOT, kill_tree, process_env, tail
from train_support import MAX_STEPS, Run, run_train, start_train, wait_for_step

from pipeline.checkpoint import find_latest, load_consolidated, read_state

pytestmark = pytest.mark.slow


def metric_history(tracking_uri: str, run_id: str, key: str) -> list[tuple[int, float]]:
    from mlflow import MlflowClient

    history = MlflowClient(tracking_uri).get_metric_history(run_id, key)
    return sorted((m.step, m.value) for m in history)


def run_id_of(run: Run) -> str:
    return read_state(find_latest(run.output_dir / "checkpoints"))["mlflow_run_id"]


def test_reference_run_learns_through_a_curriculum_step(reference_run: Run, tracking_uri: str) -> None:
    run_id = run_id_of(reference_run)
    losses = metric_history(tracking_uri, run_id, "loss")
    assert [step for step, _ in losses] == list(range(1, MAX_STEPS + 1))
    assert all(math.isfinite(value) for _, value in losses)
    segments = dict(metric_history(tracking_uri, run_id, "n_segments"))
    assert segments[8] == 2 and segments[9] == 4  # from_step 8 is the 9th step
    # compare like with like: the mean loss falls within each curriculum stage
    first, second = [v for s, v in losses if s <= 8], [v for s, v in losses if s > 8]
    assert sum(first[-3:]) < sum(first[:3]) and sum(second[-3:]) < sum(second[:3])
    state = read_state(reference_run.output_dir / "checkpoints" / f"step_{MAX_STEPS:08d}")
    assert state["world_size"] == 2 and state["n_segments"] == 4 and state["reason"] == "final"
    assert (reference_run.output_dir / "eval" / f"step_{MAX_STEPS:08d}.json").is_file()
    assert metric_history(tracking_uri, run_id, "final/ppl_by_segment")  # the curve against segment


def test_each_rank_holds_half_of_every_parameter(reference_run: Run) -> None:
    """Rank r's fp32 partition is, parameter after parameter, ceil(numel / 2) elements: ZeRO-3's layout."""
    tag_dir = find_latest(reference_run.output_dir / "checkpoints")
    model_states = torch.load(tag_dir / "zero_pp_rank_0_mp_rank_00_model_states.pt", weights_only=False)
    numels = [shape.numel() for group in model_states["param_shapes"] for shape in group.values()]
    total = sum(numels)
    for rank in (0, 1):
        optim = torch.load(tag_dir / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", weights_only=False)
        flat = optim["optimizer_state_dict"]["fp32_flat_groups"]
        held = sum(t.numel() for t in flat)
        assert held == sum(math.ceil(n / 2) for n in numels), (rank, held)
        assert 0.5 * total <= held <= 0.55 * total


def test_first_steps_equal_plain_pytorch_with_the_same_global_batch(reference_run: Run, tracking_uri: str) -> None:
    steps = 4
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "tests/support/plain_training.py"),
                           str(reference_run.config), str(steps)], cwd=REPO_ROOT, env=process_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    plain = json.loads(proc.stdout.strip().splitlines()[-1])
    zero3 = [value for _, value in metric_history(tracking_uri, run_id_of(reference_run), "loss")[:steps]]
    assert zero3 == pytest.approx(plain, abs=1e-4)


def test_sigusr2_saves_on_every_rank_and_exits_85(preempted_run: tuple[Run, object]) -> None:
    from pipeline.train import EXIT_PREEMPTED

    run, _ = preempted_run
    assert run.returncode == EXIT_PREEMPTED == 85, tail(run.log)
    tag_dir = find_latest(run.output_dir / "checkpoints")
    state = read_state(tag_dir)
    assert state["reason"] == "preempted" and 2 <= state["step"] < MAX_STEPS
    for rank in (0, 1):
        for kind in ("model", "optim"):
            assert (tag_dir / f"zero_pp_rank_{rank}_mp_rank_00_{kind}_states.pt").is_file()


def test_kill_9_then_resume_ends_bitwise_equal_to_the_uninterrupted_run(
        preempted_run: tuple[Run, object], reference_run: Run, tracking_uri: str) -> None:
    run, _ = preempted_run
    offset = run.train_log.stat().st_size
    proc = start_train(run.config, "--nproc", "2", log=run.log)
    try:
        wait_for_step(run.train_log, 10, proc, offset=offset)  # past the step-8 checkpoint, not done
    finally:
        kill_tree(proc)  # kill -9 of the launcher and both ranks
    latest = read_state(find_latest(run.output_dir / "checkpoints"))
    assert latest["step"] < MAX_STEPS, "the run finished before it could be killed"

    assert run_train(run.config, "--nproc", "2", log=run.log) == 0, tail(run.log)
    resumed, _, _ = load_consolidated(run.output_dir)
    reference, _, _ = load_consolidated(reference_run.output_dir)
    assert resumed.keys() == reference.keys()
    for key in reference:
        assert torch.equal(resumed[key], reference[key]), key
    steps = [step for step, _ in metric_history(tracking_uri, run_id_of(run), "loss")]
    assert steps == list(range(1, MAX_STEPS + 1))  # every step exactly once across three jobs


def test_two_rank_checkpoint_resumes_on_one_rank(preempted_run: tuple[Run, object], reference_run: Run) -> None:
    run, snapshot = preempted_run
    log = snapshot.parent / "one-rank.log"
    code = run_train(run.config, "--set", f"train.output_dir={snapshot}", "tracking.enabled=false", log=log)
    assert code == 0, tail(log)
    assert "global batch was" not in log.read_text()  # train.global_batch_size keeps it: nothing to say
    assert (snapshot / "checkpoints" / "universal").is_dir()
    final = read_state(find_latest(snapshot / "checkpoints"))
    assert final["step"] == MAX_STEPS and final["world_size"] == 1
    # same global batch, same samples, same optimizer state: the 2-rank trajectory, up to the order of
    # float sums (a lost Adam step count or weight-decay setting would be ~1e-3 off here)
    resumed, _, _ = load_consolidated(snapshot)
    reference, _, _ = load_consolidated(reference_run.output_dir)
    for key in reference:
        torch.testing.assert_close(resumed[key], reference[key], rtol=0, atol=1e-5)


def test_resuming_on_one_rank_at_another_global_batch_says_so_in_one_line(reference_run: Run, tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(reference_run.output_dir, copy)
    log = tmp_path / "one-rank.log"
    # no train.global_batch_size: 2 samples x 1 accumulation x 1 rank, where the checkpoint's was 4 on 2
    code = run_train(reference_run.config, "--set", f"train.output_dir={copy}", "tracking.enabled=false",
                     "train.global_batch_size=null", f"train.max_steps={MAX_STEPS + 1}", log=log)
    assert code == 0, tail(log)
    said = [line for line in log.read_text().splitlines() if "global batch" in line and "checkpoint" in line]
    assert len(said) == 1 and "the checkpoint's global batch was 4 on 2 rank(s), now 2" in said[0], tail(log)
    assert read_state(find_latest(copy / "checkpoints"))["global_batch"] == 2
