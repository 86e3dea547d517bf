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


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps one AcceleratorState per process: a learner built with bf16 in one test would refuse a
    learner without it in the next test of the same worker process (which tests share a worker depends on
    pytest-xdist's schedule). Each test starts from a fresh state, as each spawned learner process does."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
