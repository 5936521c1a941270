"""`memtrain train` where the batch script itself is not a rank: a job of 2 tasks that calls it
without srun stops at once with one line that says to use srun (it used to become rank 0 of 2
and wait for a peer that never starts), while the srun tasks of such a job are its ranks. ~10 s."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
REPO_ROOT = Path(__file__).resolve().parents[3]


def run_two_task_job(cluster, command: str, out: Path) -> str:
    """sbatch a 2-task, 2-node job whose script runs ``command`` in the repository; its final state."""
    script = (f"#!/bin/bash\n#SBATCH --ntasks=2\n#SBATCH --nodes=2\n#SBATCH --output={out}\n#SBATCH --time=00:02:00\n"
              f"cd {REPO_ROOT}\nexport DS_ACCELERATOR=cpu\n{command}\n")
    submitted = cluster.run("sbatch", "--parsable", input_text=script)
    assert submitted.returncode == 0, submitted.stderr
    return cluster.wait(submitted.stdout.strip().split(";")[0], timeout=120)


def test_train_in_a_multi_task_batch_script_without_srun_is_refused(slurm_cluster, make_config, reference_data,
                                                                    tmp_path) -> None:
    config = make_config(data={"output_dir": str(reference_data)})  # real data: nothing else stops it first
    out = tmp_path / "bare.out"
    state = run_two_task_job(slurm_cluster, f"{sys.executable} -m pipeline.cli train --config {config}", out)
    assert state == "FAILED", out.read_text() if out.exists() else "(no output)"
    lines = [line for line in out.read_text().splitlines() if line.strip()]
    assert lines[-1].startswith("memtrain train: error: this is the batch script of SLURM job"), lines
    assert "srun memtrain train" in lines[-1] and "Traceback" not in out.read_text()


def test_srun_tasks_of_the_same_job_are_the_ranks(slurm_cluster, tmp_path) -> None:
    probe = ("import pathlib; from pipeline.launch import detect; d = detect(); "
             f"pathlib.Path('{tmp_path}', str(d.rank)).write_text(f'{{d.rank}} {{d.world_size}} {{d.launcher}}')")
    out = tmp_path / "srun.out"
    state = run_two_task_job(slurm_cluster, f"srun {sys.executable} -c \"{probe}\"", out)
    assert state == "COMPLETED", out.read_text() if out.exists() else "(no output)"
    assert sorted(p.read_text() for p in tmp_path.iterdir() if p.name.isdigit()) == ["0 2 srun", "1 2 srun"]
