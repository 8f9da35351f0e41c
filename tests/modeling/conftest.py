"""Fixtures of the model tests: deterministic seeding (the tiny models are in tests/conftest.py)."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
