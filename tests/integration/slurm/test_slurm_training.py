"""A training job on the real cluster: 2 CPU ranks on two (virtual) nodes over gloo, submitted with
``memtrain submit``, and preempted twice while it runs, once by each path a real cluster uses:

1. SIGUSR2 to the ranks (``scancel --signal=USR2``, as ``--signal=USR2@lead`` sends it before the
   time limit): the ranks save and exit 85, and the batch script requeues the job itself;
2. ``scontrol requeue`` (an admin or a preempting job): SLURM sends SIGTERM, the ranks save within
   KillWait, and SLURM requeues the job.

The job must still finish, with its checkpoint and ONE MLflow run holding every step once.
One job serves both tests: each run of it costs tens of seconds of start-up on this machine.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

from pipeline.checkpoint import read_state

pytestmark = pytest.mark.slow

MAX_STEPS = 30


def logged_steps(train_dir: Path) -> list[int]:
    """The steps rank 0 logged, in order, over every run of the job (log_every is 1)."""
    log = train_dir / "logs" / "train.log"
    return [int(s) for s in re.findall(r" step (\d+)/", log.read_text())] if log.exists() else []


def wait_for_step(train_dir: Path, beyond: int, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = logged_steps(train_dir)
        if steps and steps[-1] > beyond:
            return steps[-1]
        time.sleep(0.2)
    raise AssertionError(f"training never went beyond step {beyond}: {logged_steps(train_dir)}")


def wait_for_restart(cluster, job: str, count: int, timeout: float) -> None:
    """Until the job was requeued ``count`` times and runs again (or already finished)."""
    deadline = time.monotonic() + timeout
    while not (cluster.job_field(job, "Restarts") == str(count)
               and cluster.job_field(job, "JobState") in {"RUNNING", "COMPLETED"}):
        assert time.monotonic() < deadline, f"job {job} not restarted {count}x: {cluster.job_states(job)}"
        time.sleep(0.5)


@pytest.fixture(scope="module")
def preempted_job(slurm_cluster, reference_data, config_writer, tmp_path_factory) -> tuple[Path, str]:
    """The job, preempted by SIGUSR2 and then by scontrol requeue, run to its end: (root dir, job id)."""
    root = tmp_path_factory.mktemp("train-job")
    config = config_writer(root, data={"output_dir": str(reference_data)},
                           train={"max_steps": MAX_STEPS, "save_every": 20})
    job = slurm_cluster.submit(config, "train")["train"]
    train_dir = root / "train"

    first = wait_for_step(train_dir, beyond=3, timeout=180)
    assert slurm_cluster.run("scancel", "--signal=USR2", job).returncode == 0
    wait_for_restart(slurm_cluster, job, 1, timeout=120)
    wait_for_step(train_dir, beyond=first + 3, timeout=180)
    assert slurm_cluster.run("scontrol", "requeue", job).returncode == 0
    wait_for_restart(slurm_cluster, job, 2, timeout=120)
    state = slurm_cluster.wait(job, timeout=240)
    assert state == "COMPLETED", slurm_cluster.logs(root / "logs")
    return root, job


def read_mlflow(root: Path) -> list:
    """Every run of the test experiment, with the full history of its ``loss`` metric."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("slurm-test")
    runs = client.search_runs([experiment.experiment_id]) if experiment else []
    return [(run, client.get_metric_history(run.info.run_id, "loss")) for run in runs]


def test_two_rank_job_completes_with_checkpoint_and_mlflow_run(slurm_cluster, preempted_job) -> None:
    root, job = preempted_job
    job_log = slurm_cluster.logs(root / "logs")
    assert f"job {job} restart 0 on node[1-2]: 2 tasks" in job_log, job_log  # one rank on each node
    latest = (root / "train" / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{MAX_STEPS:08d}"
    facts = read_state(root / "train" / "checkpoints" / latest)
    assert facts["step"] == MAX_STEPS and facts["world_size"] == 2
    [(run, _)] = read_mlflow(root)
    assert run.info.status == "FINISHED" and run.info.run_id == facts["mlflow_run_id"]
    assert run.data.tags["slurm.job_id"] == job and run.data.tags["world_size"] == "2"


def test_preempted_job_saves_requeues_and_resumes_once(slurm_cluster, preempted_job) -> None:
    root, job = preempted_job
    job_log = slurm_cluster.logs(root / "logs")
    train_log = (root / "train" / "logs" / "train.log").read_text()
    assert slurm_cluster.job_field(job, "Restarts") == "2"
    assert f"job {job} restart 2 on node[1-2]" in job_log
    # after SIGUSR2 the script itself requeued the job (after scontrol requeue SLURM may kill the
    # shell before it gets there: the job is requeued either way)
    assert "requeueing job" in job_log, job_log
    saves = re.findall(r"step_(\d{8}) \(preempted\)", train_log)
    resumes = re.findall(r"resumed from step_(\d{8})", train_log)
    assert len(saves) == 2 and resumes == saves and int(saves[-1]) < MAX_STEPS, train_log
    # every step ran exactly once over the three runs, and MLflow holds one run with each step once
    assert logged_steps(root / "train") == list(range(1, MAX_STEPS + 1))
    [(run, history)] = read_mlflow(root)
    assert sorted(point.step for point in history) == list(range(1, MAX_STEPS + 1))
