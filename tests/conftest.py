"""Fixtures shared by test modules."""

import pytest


@pytest.fixture(scope="module")
def one_torch_thread():
    """torch on one thread for the module (restored after): on a shared 2-core machine the
    simulator's small tensor ops are several times slower with two."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
