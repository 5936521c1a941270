"""A real one-host SLURM cluster for this folder's tests, started once and always stopped.

slurm/local-cluster/start.sh installs slurm-wlm + munge with apt-get when they are missing (CI is a
fresh machine) and runs two virtual nodes on 127.0.0.1, so that "multi-node" jobs really span two
slurmd. A cluster that cannot start fails the tests with the script's own message; nothing is
skipped. stop.sh runs at the end of the session whatever happened.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from ports import free_ports
from processes import memtrain
from tiny import experiment, merged, write_experiment

REPO_ROOT = Path(__file__).resolve().parents[3]
CLUSTER_SCRIPTS = REPO_ROOT / "slurm" / "local-cluster"
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}

# tiny and fast: 2 CPU ranks, a few dozen steps, small synthetic books (tests/support/tiny.py's TINY, with these changes)
SLURM_TINY: dict[str, Any] = {
    "data": {"source": "synthetic:10", "n_segments": 2, "vocab_size": 400, "val_fraction": 0.2, "test_fraction": 0.1,
             "samples_per_shard": 32, "synthetic": {"words_per_book": 500, "facts_per_book": 2}},
    "model": {"num_layers": 1, "max_positions": 128},
    "memory": {"num_tokens": 2},
    "train": {"max_steps": 20, "save_every": 10, "warmup_steps": 2, "log_every": 1},
    "eval": {"batch_size": 4, "max_samples": 4},
    "slurm": {"nodes": 2, "gpus_per_node": 0, "tasks_per_node": 1, "cpus_per_task": 1, "time": "00:10:00",
              "prep_array_tasks": 2, "job_name": "memtrain-test",
              # memtrain from the test's own environment, appended so that the tools found first stay the
              # ones every other process here sees (another `ninja` would rebuild DeepSpeed's shm op);
              # on CPU DeepSpeed needs DS_ACCELERATOR=cpu
              "setup": [f"export PATH=$PATH:{Path(sys.executable).parent}", "export DS_ACCELERATOR=cpu"]},
}


class Cluster:
    """The running cluster: its environment (SLURM_CONF) and the few commands the tests need."""

    def __init__(self, env: dict[str, str]) -> None:
        self.env = env

    def run(self, *cmd: str, input_text: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=self.env, input=input_text, capture_output=True, text=True, timeout=timeout)

    def memtrain(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return self.run(sys.executable, "-m", "pipeline.cli", *args, timeout=timeout)

    def submit(self, config: Path, what: str, *overrides: str) -> dict[str, str]:
        """``memtrain submit``; returns {job name: job id} from its ``name: id`` lines."""
        proc = self.memtrain("submit", "--config", str(config), "--what", what,
                             *(["--set", *overrides] if overrides else []))
        assert proc.returncode == 0, proc.stderr
        return dict(re.findall(r"^(\w+): (\d+)", proc.stdout, re.MULTILINE))

    def job_states(self, job_id: str) -> list[str]:
        """JobState of the job (one per task for an array)."""
        return re.findall(r"\bJobState=(\S+)", self.run("scontrol", "show", "job", job_id).stdout)

    def job_field(self, job_id: str, field: str) -> str:
        match = re.search(rf"\b{field}=(\S+)", self.run("scontrol", "show", "job", job_id).stdout)
        return match.group(1) if match else ""

    def wait(self, job_id: str, timeout: float) -> str:
        """Poll until the job (every task of an array) reaches a final state; return it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = self.job_states(job_id)
            if states and all(s in FINAL_STATES for s in states):
                return ",".join(sorted(set(states)))
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} not finished after {timeout:.0f} s: {self.job_states(job_id)}")

    @staticmethod
    def logs(log_dir: Path) -> str:
        """Every SLURM output file of a test, for assertion messages."""
        return "\n".join(f"==> {p.name}\n{p.read_text()}" for p in sorted(log_dir.glob("*.out")))


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[Cluster]:
    """Start the cluster once for the folder; stop it at the end whatever happened."""
    if os.geteuid() != 0:
        pytest.fail("the SLURM tests start a local cluster and must run as root (slurm/local-cluster/start.sh)")
    # not under pytest's 0700 tmp dirs: munged wants every directory above its socket searchable
    cluster_dir = Path(tempfile.mkdtemp(prefix="memtrain-slurm-test-", dir="/tmp"))
    env = {**os.environ, "MEMTRAIN_SLURM_DIR": str(cluster_dir), "MEMTRAIN_SLURM_NODES": "2",
           "MEMTRAIN_SLURM_CPUS": "2", "MEMTRAIN_SLURM_CTLD_PORT": str(free_ports(3))}
    try:
        started = subprocess.run([str(CLUSTER_SCRIPTS / "start.sh")], env=env, capture_output=True, text=True,
                                 timeout=600)
        if started.returncode != 0:
            pytest.fail(f"could not start the local SLURM cluster:\n{started.stdout}\n{started.stderr}")
        yield Cluster({**env, "SLURM_CONF": str(cluster_dir / "etc" / "slurm.conf")})
    finally:
        subprocess.run([str(CLUSTER_SCRIPTS / "stop.sh"), "--quiet", "--purge"], env=env, timeout=120, check=False)


def write_config(root: Path, **sections: dict[str, Any]) -> Path:
    """SLURM_TINY with per-section updates and every output under ``root``, as root/config.yaml."""
    tree = experiment(root, **merged(SLURM_TINY, {
        "tracking": {"enabled": True, "uri": f"sqlite:///{root / 'mlflow.db'}", "experiment": "slurm-test"},
        "slurm": {"log_dir": str(root / "logs")}}))
    return write_experiment(root / "config.yaml", merged(tree, sections))


@pytest.fixture
def make_config(tmp_path: Path) -> Callable[..., Path]:
    return lambda **sections: write_config(tmp_path, **sections)


@pytest.fixture(scope="session")
def config_writer() -> Callable[..., Path]:
    """``write_config(root, **sections)``, for fixtures that outlive one test."""
    return write_config


@pytest.fixture(scope="session")
def reference_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny data set made by one plain ``memtrain prep`` (no SLURM): the prep array's reference
    and the training jobs' input."""
    root = tmp_path_factory.mktemp("reference-prep")
    memtrain("prep", "--config", str(write_config(root)), timeout=300)
    return root / "data"
