"""Settings shared by every test module."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_intra_op_thread():
    # The tests run small tensors under pytest-xdist, one worker per core: a second intra-op
    # thread per worker only oversubscribes the cores, and on a busy machine its spin-waits
    # make a step of a small network tens of times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
