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


# Session fixtures that cost a training run or a cluster. `make test TEST_WORKERS=2` runs two
# pytest-xdist workers, each with its own session: the tests that use one of these are kept on one worker, which builds it
# once, by the scheduler below (xdist's own --dist loadgroup cannot do it under pytest 9: it renames
# items through Item._nodeid, which no longer exists). The local SLURM cluster must not run twice
# (it edits /etc/hosts). Every other file is one unit of work, as with --dist loadfile.
XDIST_GROUPS: dict[str, tuple[str, ...]] = {
    "slurm": ("tests/integration/slurm/",),
    "shared_run": ("tests/integration/demo/test_demo.py", "tests/integration/evaluate/",
                   "tests/integration/export/", "tests/integration/tracking/test_checkpoint_run_records.py"),
    "train_runs": ("tests/integration/train/test_train_bf16.py", "tests/integration/train/test_train_zero3.py",
                   "tests/integration/train/test_train_reliability.py"),
}
GROUPED_FIXTURES = {"slurm_cluster": "slurm", "trained_run": "shared_run", "exports": "shared_run",
                    "reference_run": "train_runs", "preempted_run": "train_runs"}


def xdist_group(nodeid: str) -> str:
    """The unit of work a test belongs to: its group, else its file."""
    path = nodeid.split("::", 1)[0]
    return next((group for group, prefixes in XDIST_GROUPS.items() if path.startswith(prefixes)), path)


@pytest.hookimpl(optionalhook=True)  # xdist's hook: unknown when pytest runs without xdist (-p no:xdist)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    from xdist.scheduler import LoadFileScheduling  # lazy: only a run with -n N imports xdist's scheduler

    class GroupScheduling(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_group(nodeid)

    return GroupScheduling(config, log)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """A test using a grouped fixture from a file outside its group would build it on a second worker."""
    for item in items:
        for fixture, group in GROUPED_FIXTURES.items():
            if fixture in item.fixturenames and xdist_group(item.nodeid) != group:
                raise pytest.UsageError(f"{item.nodeid} uses the session fixture {fixture}: add its file to "
                                        f"XDIST_GROUPS[{group!r}] in tests/conftest.py")


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT
