"""Shared test settings: CPU DeepSpeed, quiet warnings, the repository root.

Helpers every test folder can import (tests/support is on pytest's pythonpath; import them by
module name, never from a conftest):

- tiny.py: the one tiny experiment (TINY) and its variants: ``experiment(root, **changes)``,
  ``write_experiment``, ``as_overrides`` (the same tree as `--set` items); ``tiny_config(variant)``, the
  validated config of one of its VARIANTS ("model", "eval", "zero3", "prep") for in-process tests.
- processes.py: `memtrain` as a subprocess: ``memtrain(...)`` (wait, fail with both streams),
  ``start_memtrain(..., log=)`` (background), ``kill_tree``, ``tail``, ``process_env``.
- clean_python.py: ``run_without_project(code, *args, tmp=)``, a python that cannot import memtrain
  (for loading exports as a Hub user would); clean_load.py is the export scorer it runs.
- shared_run.py: the session's one tiny `memtrain demo` run (fixtures ``trained_run``, ``exports``
  in tests/integration/conftest.py) for integration tests that only need *a* trained run.
- model_support.py: tiny in-process models for the model tests; plain_training.py: the plain
  PyTorch reference loop of the trainer (ZeRO-3 equality, demo settings).
"""

import os
from pathlib import Path

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]


# Session fixtures that cost a training run or a server (most expensive first): under pytest-xdist
# (`make test` runs two workers with --dist loadgroup) every test using one of them goes to the same
# worker, which builds it once. A test using several joins the first group listed.
SHARED_FIXTURE_GROUPS = {
    "trained_run": "shared_run", "exports": "shared_run",  # tests/integration/conftest.py
    "slurm_cluster": "slurm",  # one local cluster (it edits /etc/hosts; its jobs want the cores)
    "reference_run": "train_runs", "preempted_run": "train_runs",  # tests/integration/train/conftest.py
    "mlflow_server": "mlflow_server",  # tests/integration/tracking/conftest.py
}


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the xdist_group marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        group = next((g for f, g in SHARED_FIXTURE_GROUPS.items() if f in item.fixturenames), None)
        if group:
            item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT
