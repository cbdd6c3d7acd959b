"""bayesflat: flatness-aware stochastic-gradient MCMC for Bayesian deep learning.

Sample posteriors of neural networks with fSGLD and its relatives, keep the draws as
ArviZ-compatible traces, and turn them into predictive ensembles, calibration and
out-of-distribution figures.

The public names are imported on first use (torch, xarray and ArviZ take seconds to load), so
``import bayesflat`` and the command line's help are immediate.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "Posterior": ("bayesflat.target.torch", "Posterior"),
    "SamplingError": ("bayesflat.run", "SamplingError"),
    "load": ("bayesflat.trace", "load"),
    "resume": ("bayesflat.run", "resume"),
    "sample": ("bayesflat.run", "sample"),
    "samplers": ("bayesflat.samplers", None),
    "save": ("bayesflat.trace", "save"),
}

__all__ = [
    "Posterior",
    "SamplingError",
    "__version__",
    "load",
    "resume",
    "sample",
    "samplers",
    "save",
]

if TYPE_CHECKING:
    from bayesflat import samplers
    from bayesflat.run import SamplingError, resume, sample
    from bayesflat.target.torch import Posterior
    from bayesflat.trace import load, save


_SUBPACKAGES = frozenset({
    "cli", "data", "diagnostics", "metrics", "models", "predictive", "report", "run",
    "schedules", "target", "trace",
})  # fmt: skip


def __getattr__(name: str) -> Any:
    """Import a public name or a sub-package on first use (PEP 562)."""
    if name in _SUBPACKAGES:
        return importlib.import_module(f"bayesflat.{name}")
    if name not in _LAZY:
        raise AttributeError(f"module 'bayesflat' has no attribute {name!r}")
    module_name, attribute = _LAZY[name]
    module = importlib.import_module(module_name)
    value = module if attribute is None else getattr(module, attribute)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
