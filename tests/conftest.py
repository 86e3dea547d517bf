"""Fixtures shared by several test files."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models on shared cores: a second torch thread that waits for a core stalls every op (measured in
    tests/test_world_model.py: imagination 20x slower with 2 threads than with 1; sft.py's --threads note)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
