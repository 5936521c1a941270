"""Fixtures of the model tests; the tiny models themselves are in tests/support/model_support.py."""

import pytest
import torch
from model_support import random_ids


@pytest.fixture
def ids() -> torch.Tensor:
    return random_ids(2, 4)
