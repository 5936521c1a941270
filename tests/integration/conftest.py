"""Session fixtures of the integration tests: the shared trained run (tests/support/shared_run.py)."""

from __future__ import annotations

import pytest
from shared_run import Exports, TrainedRun, demo_run, score_exports


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> TrainedRun:
    return demo_run(tmp_path_factory.mktemp("demo_run"))


@pytest.fixture(scope="session")
def exports(trained_run: TrainedRun, tmp_path_factory: pytest.TempPathFactory) -> Exports:
    return score_exports(trained_run, tmp_path_factory.mktemp("exports"))
