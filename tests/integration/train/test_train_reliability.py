"""Nothing lost, nothing silently wrong (issue 17), on real 2-rank ZeRO-3 runs: a failing final eval
keeps the final checkpoint, a diverged run never leaves a poisoned `latest`, eval and export refuse
non-finite or mismatched checkpoints, one writer per run folder, ranks die with their launcher, eval
works on a read-only run folder, Ctrl-C saves and ends the MLflow run KILLED (the resume continues it), a full
disk at export is one line (at checkpoint save: test_train_disk_full.py)."""

from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path

import psutil
import pytest
import torch
import processes
from processes import kill_tree, tail
from train_support import Run, run_train, start_train, tmpfs, wait_for_step, write_config

from pipeline.checkpoint import find_latest, read_state
from pipeline.run_dir import RunDir

pytestmark = pytest.mark.slow


def memtrain(*args: str) -> subprocess.CompletedProcess:
    return processes.memtrain(*args, check=False, timeout=300)


def one_error_line(proc: subprocess.CompletedProcess, command: str) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith(f"memtrain {command}: error:")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


@pytest.fixture(scope="module")
def failed_eval_run(train_root: Path, tiny_data: Path) -> Run:
    """3 steps, no periodic save, and a final eval that cannot write its files (eval/ is a file)."""
    out = train_root / "failed-eval"
    out.mkdir()
    (out / "eval").write_text("in the way")
    config = write_config(train_root / "failed-eval.yaml", tiny_data, out, None)
    log = train_root / "failed-eval.log"
    code = run_train(config, "--nproc", "2", "--set", "train.max_steps=3", "train.save_every=100", log=log)
    return Run(config, out, log, code)


def test_a_failed_final_eval_never_costs_the_final_checkpoint(failed_eval_run: Run) -> None:
    assert failed_eval_run.returncode != 0, tail(failed_eval_run.log)
    latest = find_latest(failed_eval_run.output_dir / "checkpoints")
    assert latest is not None and read_state(latest)["step"] == 3, tail(failed_eval_run.log)


@pytest.fixture()
def run_copy(failed_eval_run: Run, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(failed_eval_run.output_dir, copy)
    (copy / "eval").unlink()
    return copy


def test_eval_and_export_refuse_non_finite_weights(run_copy: Path, tmp_path: Path) -> None:
    tag_dir = find_latest(run_copy / "checkpoints")
    optim = tag_dir / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    states = torch.load(optim, weights_only=False)
    with torch.no_grad():
        states["optimizer_state_dict"]["fp32_flat_groups"][0][3] = float("nan")
    torch.save(states, optim)
    assert "holds non-finite weights" in one_error_line(memtrain("eval", "--checkpoint", str(run_copy)), "eval")
    export = memtrain("export", "--checkpoint", str(run_copy), "--out", str(tmp_path / "hf"))
    assert "holds non-finite weights" in one_error_line(export, "export")
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("content", ["", "data:\n  segment_len: 32\n"])
def test_a_replaced_config_yaml_is_refused(content: str, run_copy: Path, tmp_path: Path) -> None:
    (run_copy / "config.yaml").write_text(content)  # empty: defaults would give segment_len 128
    export = memtrain("export", "--checkpoint", str(run_copy), "--out", str(tmp_path / "hf"))
    assert "config.yaml" in one_error_line(export, "export")


def test_eval_names_a_damaged_val_shard(run_copy: Path, tiny_data: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    victim = next((data / "val").glob("*.arrow"))
    payload = bytearray(victim.read_bytes())
    payload[len(payload) // 2] ^= 0x01
    victim.write_bytes(bytes(payload))
    config = run_copy / "config.yaml"
    config.write_text(config.read_text().replace(str(tiny_data), str(data)))
    line = one_error_line(memtrain("eval", "--checkpoint", str(run_copy)), "eval")
    assert f"shard {victim} is damaged" in line


def test_eval_of_a_read_only_run_folder_prints_and_writes_json(run_copy: Path, tmp_path: Path) -> None:
    if subprocess.run(["mount", "--bind", str(run_copy), str(run_copy)], capture_output=True).returncode != 0:
        pytest.skip("cannot bind-mount here (needs root)")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(run_copy)], check=True)
        proc = memtrain("eval", "--checkpoint", str(run_copy), "--json", str(tmp_path / "eval.json"))
    finally:
        subprocess.run(["umount", str(run_copy)], check=True)
    assert proc.returncode == 0, proc.stderr
    assert "not saved beside the run" in proc.stderr and "Traceback" not in proc.stderr
    assert (tmp_path / "eval.json").is_file() and not (run_copy / "eval").exists()


def test_eval_elsewhere_names_the_keys_that_fix_the_run_s_paths(run_copy: Path, tiny_data: Path, tmp_path: Path) -> None:
    """A run made elsewhere (relative data dir, a demo copy's baked baseline) evaluated from another folder:
    one line naming the key to set, and with those keys set it evaluates."""
    import yaml

    tree = yaml.safe_load((run_copy / "config.yaml").read_text())
    tree["data"]["output_dir"] = "data"  # relative to the folder it was trained from
    tree["eval"]["baseline"] = "runs/demo/train-none"
    (run_copy / "config.yaml").write_text(yaml.safe_dump(tree))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def evaluate(*overrides: str) -> subprocess.CompletedProcess:
        args = ["eval", "--checkpoint", str(run_copy), *(["--set", *overrides] if overrides else [])]
        return processes.memtrain(*args, cwd=elsewhere, check=False, timeout=300)

    line = one_error_line(evaluate(), "eval")
    assert "eval.baseline runs/demo/train-none does not exist" in line and "--set eval.baseline=null" in line
    line = one_error_line(evaluate("eval.baseline=null"), "eval")
    assert f"data.output_dir data holds no shards seen from {elsewhere}" in line and "--set data.output_dir=" in line
    proc = evaluate("eval.baseline=null", f"data.output_dir={tiny_data}")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr


def test_sighup_saves_at_the_step_boundary_and_exits_85(train_root: Path, tiny_data: Path) -> None:
    out = train_root / "hangup"
    config = write_config(train_root / "hangup.yaml", tiny_data, out, None)
    log = train_root / "hangup.log"
    proc = start_train(config, "--nproc", "2", "--set", "train.max_steps=100000", "train.save_every=100000", log=log)
    try:
        wait_for_step(out / "logs" / "train.log", 1, proc)
        proc.send_signal(signal.SIGHUP)  # the terminal closed
        assert proc.wait(120) == 85, tail(log)
    finally:
        kill_tree(proc)
    state = read_state(find_latest(out / "checkpoints"))
    assert state["reason"] == "preempted" and state["step"] >= 1


def test_a_diverged_run_leaves_no_poisoned_latest(train_root: Path, tiny_data: Path) -> None:
    out = train_root / "diverged"
    config = write_config(train_root / "diverged.yaml", tiny_data, out, None)
    log = train_root / "diverged.log"
    code = run_train(config, "--nproc", "2", "--set", "train.lr=1e9", "train.warmup_steps=0", "train.save_every=1",
                     "train.max_steps=6", log=log)
    assert code != 0, tail(log)
    assert "training diverged at step" in tail(log)
    latest = find_latest(out / "checkpoints")
    if latest is not None:  # whatever is left to resume, evaluate or export from is finite
        proc = memtrain("eval", "--checkpoint", str(out))
        assert proc.returncode == 0, proc.stderr
    assert list((out / "checkpoints").glob("poisoned-step_*")), tail(log)


def mlflow_runs(tracking_uri: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    return client.search_runs([exp.experiment_id for exp in client.search_experiments()])


def test_weights_made_non_finite_by_the_update_are_never_saved(failed_eval_run: Run, run_copy: Path) -> None:
    """One NaN in AdamW's first moment (rank 1's partition): the next step's loss, computed before the
    update, and its grad norm are finite, and the update makes a weight NaN. Only the check of the
    updated weights stops that step's save."""
    optim = find_latest(run_copy / "checkpoints") / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    states = torch.load(optim, weights_only=False)
    states["optimizer_state_dict"]["optimizer_state_dict"]["state"][0]["exp_avg"][3] = float("nan")
    torch.save(states, optim)
    log = run_copy.parent / "poisoned-moment.log"
    code = run_train(failed_eval_run.config, "--nproc", "2", "--set", f"train.output_dir={run_copy}",
                     "train.max_steps=6", "train.save_every=1", log=log)
    assert code == 2, tail(log)
    assert "training diverged at step 4 (non-finite weights after the update)" in tail(log)
    assert sorted(p.name for p in (run_copy / "checkpoints").glob("*step_*")) == ["step_00000003"], tail(log)


def test_a_rank_shard_missing_from_the_latest_checkpoint_resumes_from_the_previous(reference_run: Run,
                                                                                     tmp_path: Path) -> None:
    copy = tmp_path / "run"
    shutil.copytree(reference_run.output_dir, copy)
    latest = find_latest(copy / "checkpoints")
    (latest / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()  # lost with a node-local disk
    log = tmp_path / "resume.log"
    code = run_train(reference_run.config, "--nproc", "2", "--set", f"train.output_dir={copy}", "tracking.enabled=false",
                     "train.max_steps=13", log=log)
    assert code == 0, tail(log)
    text = log.read_text()
    warning = f"memtrain: warning: checkpoint {latest} lacks zero_pp_rank_1_mp_rank_00_optim_states.pt; using step_00000012 instead"
    assert text.count(warning) == 1, text[-4000:]  # once for the job, not once per rank and look-up
    assert "resumed from step_00000012" in text
    assert read_state(find_latest(copy / "checkpoints"))["step"] == 13


def test_one_writer_ctrl_c_saves_and_ranks_die_with_their_launcher(train_root: Path, tiny_data: Path) -> None:
    out = train_root / "locked"
    tracking_uri = f"sqlite:///{train_root / 'locked-mlflow.db'}"  # a store of its own: this test's runs only
    config = write_config(train_root / "locked.yaml", tiny_data, out, tracking_uri)
    log = train_root / "locked.log"
    endless = ["--set", "train.max_steps=100000", "train.save_every=100000"]
    first = start_train(config, "--nproc", "2", *endless, log=log)
    try:
        wait_for_step(out / "logs" / "train.log", 1, first)
        second = memtrain("train", "--config", str(config), "--nproc", "2")
        assert f"train.output_dir {out} is in use by another memtrain train (pid {first.pid}" in \
            one_error_line(second, "train")
        first.send_signal(signal.SIGINT)  # Ctrl-C: save at the step boundary, exit 85
        assert first.wait(120) == 85, tail(log)
    finally:
        kill_tree(first)
    state = read_state(find_latest(out / "checkpoints"))
    assert state["reason"] == "preempted"
    [run] = mlflow_runs(tracking_uri)  # the refused second writer started none
    assert (run.info.run_id, run.info.status) == (state["mlflow_run_id"], "KILLED")

    offset = (out / "logs" / "train.log").stat().st_size
    again = start_train(config, "--nproc", "2", *endless, log=log)  # the lock was released
    try:
        wait_for_step(out / "logs" / "train.log", 1, again, offset=offset)
        ranks = [p for p in psutil.Process(again.pid).children(recursive=True) if "pipeline.cli" in " ".join(p.cmdline())]
        assert len(ranks) == 2
        again.kill()  # kill -9 of the launcher alone
        again.wait(30)
        _, alive = psutil.wait_procs(ranks, timeout=30)
        assert not alive, f"ranks outlived their launcher: {alive}"
    finally:
        kill_tree(again)
    RunDir.of(out).lock().acquire().release()  # not left stuck by the kill
    [run] = mlflow_runs(tracking_uri)  # the resume reattached to the same run (RUNNING again) instead of a new one
    assert (run.info.run_id, run.info.status) == (state["mlflow_run_id"], "RUNNING")


def test_a_full_disk_at_export_is_one_line_and_leaves_out_as_it_was(run_copy: Path, tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", "48k") as disk:
        (disk / "hf").mkdir()
        (disk / "hf" / "previous.txt").write_text("an earlier export")
        proc = memtrain("export", "--checkpoint", str(run_copy), "--out", str(disk / "hf"), "--force")
        assert "no space left" in one_error_line(proc, "export")
        assert [p.name for p in disk.iterdir()] == ["hf"]  # no staging folder left behind
        assert (disk / "hf" / "previous.txt").read_text() == "an earlier export"
