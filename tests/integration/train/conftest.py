"""Tiny shards made once, one uninterrupted 2-rank ZeRO-3 run (the reference for several tests),
and one 2-rank run stopped by SIGUSR2 (the start of the resume tests)."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest
from processes import kill_tree, tail
from train_support import Run, run_train, start_train, wait_for_step, write_config

from pipeline.config import load_config


@pytest.fixture(scope="session")
def train_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("train")


@pytest.fixture(scope="session")
def tiny_data(train_root: Path) -> Path:
    from data_prep import prepare

    data_dir = train_root / "data"
    prepare(load_config(write_config(train_root / "data.yaml", data_dir, train_root / "unused", None)))
    return data_dir


@pytest.fixture(scope="session")
def tracking_uri(train_root: Path) -> str:
    return f"sqlite:///{train_root / 'mlflow.db'}"


@pytest.fixture(scope="session")
def reference_run(train_root: Path, tiny_data: Path, tracking_uri: str) -> Run:
    out = train_root / "reference"
    config = write_config(train_root / "reference.yaml", tiny_data, out, tracking_uri)
    log = train_root / "reference.log"
    code = run_train(config, "--nproc", "2", log=log)
    assert code == 0, tail(log)
    return Run(config, out, log, code)


@pytest.fixture(scope="session")
def preempted_run(train_root: Path, tiny_data: Path, tracking_uri: str) -> tuple[Run, Path]:
    """A 2-rank run sent SIGUSR2 after step 2, and a copy of its output dir as it was left then."""
    out = train_root / "preempted"
    config = write_config(train_root / "preempted.yaml", tiny_data, out, tracking_uri)
    log = train_root / "preempted.log"
    proc = start_train(config, "--nproc", "2", log=log)
    try:
        wait_for_step(out / "logs" / "train.log", 2, proc)
        proc.send_signal(signal.SIGUSR2)  # like SLURM's --signal=USR2: the launcher forwards it to the ranks
        code = proc.wait(120)
    finally:
        kill_tree(proc)
    snapshot = train_root / "preempted-snapshot"
    shutil.copytree(out, snapshot)
    return Run(config, out, log, code), snapshot
