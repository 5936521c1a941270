"""Fixtures of the pipeline unit tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a 2-core machine: intra-op threads only add contention (up to 10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
