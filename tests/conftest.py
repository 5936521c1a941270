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


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT
