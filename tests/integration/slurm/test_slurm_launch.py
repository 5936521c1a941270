"""`memtrain train` where the batch script itself is not a rank: a job of 2 tasks that calls it
without srun stops at once with one line that says to use srun (it used to become rank 0 of 2
and wait for a peer that never starts). ~5 s of job time."""

from __future__ import annotations

import sys

import pytest

pytestmark = pytest.mark.slow


def test_train_in_a_multi_task_batch_script_without_srun_is_refused(slurm_cluster, make_config, tmp_path) -> None:
    config = make_config()
    out = tmp_path / "bare.out"
    script = (f"#!/bin/bash\n#SBATCH --ntasks=2\n#SBATCH --nodes=2\n#SBATCH --output={out}\n#SBATCH --time=00:02:00\n"
              f"export DS_ACCELERATOR=cpu\n{sys.executable} -m pipeline.cli train --config {config}\n")
    submitted = slurm_cluster.run("sbatch", "--parsable", input_text=script)
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip().split(";")[0]
    assert slurm_cluster.wait(job, timeout=120) == "FAILED", out.read_text() if out.exists() else "(no output)"
    lines = [line for line in out.read_text().splitlines() if line.strip()]
    assert lines[-1].startswith("memtrain train: error: this is the batch script of SLURM job"), lines
    assert "srun memtrain train" in lines[-1] and "Traceback" not in out.read_text()
