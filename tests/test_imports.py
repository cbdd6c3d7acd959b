"""The packages that load their submodules on first use: importing them costs nothing heavy,
and every public name still resolves."""

import importlib
import types

import pytest
from conftest import python_output

LAZY_PACKAGES = ("bayesflat.diagnostics", "bayesflat.run", "bayesflat.samplers", "bayesflat.trace")
HEAVY = ("torch", "xarray", "pandas", "scipy", "arviz", "matplotlib", "sklearn", "h5netcdf")


def test_importing_the_packages_loads_none_of_the_heavy_dependencies():
    code = (
        "import sys\n"
        f"for name in {LAZY_PACKAGES!r}:\n"
        "    __import__(name)\n"
        "import bayesflat.diagnostics.divergence, bayesflat.run.lock, bayesflat.trace.schema\n"
        f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    assert python_output(code).strip() == "[]"


@pytest.mark.parametrize("name", LAZY_PACKAGES)
def test_every_public_name_resolves_and_is_listed(name):
    package = importlib.import_module(name)
    for public in package.__all__:
        value = getattr(package, public)
        # the object itself, never a submodule that happens to share its name
        assert not isinstance(value, types.ModuleType), public
        assert getattr(value, "__name__", public) == public, public
    assert set(package.__all__) <= set(dir(package))
    with pytest.raises(AttributeError, match=rf"module '{name}' has no attribute 'nonexistent'"):
        package.nonexistent  # noqa: B018


def test_the_embedded_data_loads_without_importing_scikit_learn():
    """The digits split and its generated OOD sets (what ``bayesflat run`` loads) read
    scikit-learn's files without importing it: that import costs as much as torch's."""
    code = (
        "import sys\n"
        "from bayesflat import data\n"
        "split = data.load_digits_split(val_size=0.1)\n"
        "sets = data.ood_sets(split)\n"
        "print(len(split.x_train), list(sets), 'sklearn' in sys.modules)\n"
    )
    assert python_output(code).split() == ["1293", "['patches',", "'noise']", "False"]
