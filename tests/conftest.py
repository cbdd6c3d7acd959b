"""Settings shared by every test module."""

import subprocess
import sys

import pytest
import torch


def pytest_collection_modifyitems(items):
    """Run the tests marked ``slow`` first, each group in collection order.

    Under ``-n 2`` a free worker takes the next test, so a long test dispatched last keeps one
    worker busy while the other idles; started first, the long tests overlap the many short
    ones. None of them shares a module-scoped fixture with a test left behind.
    """
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(autouse=True, scope="session")
def _one_intra_op_thread():
    # The tests run small tensors under pytest-xdist, one worker per core: a second intra-op
    # thread per worker only oversubscribes the cores, and on a busy machine its spin-waits
    # make a step of a small network tens of times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
"""Devices the device-parametrised tests run on: the CPU, and CUDA where it is available."""


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    """Each device of :data:`DEVICES` in turn (tests that can run on a GPU take this)."""
    return torch.device(request.param)


ARVIZ_1 = int(__import__("importlib.metadata").metadata.version("arviz").split(".")[0]) >= 1
"""Whether the installed ArviZ is 1.x (traces are xarray.DataTree, results new classes)."""


def elpd_loo(loo):
    """``elpd_loo`` of an ``az.loo`` result on either ArviZ."""
    return loo.elpd if ARVIZ_1 else loo.elpd_loo


def p_loo(loo):
    """``p_loo`` of an ``az.loo`` result on either ArviZ."""
    return loo.p if ARVIZ_1 else loo.p_loo


def as_dataset(group):
    """A group of what ``az.from_netcdf`` returns, as an xarray.Dataset, on either ArviZ."""
    return group.to_dataset() if hasattr(group, "to_dataset") else group


def python_output(code: str) -> str:
    """Standard output of ``python -c code`` in a fresh interpreter, which must exit 0."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout
