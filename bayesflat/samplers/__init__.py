"""Samplers and optimisers, each a gradient estimator composed with a dynamics.

Every method is reachable by name through one registry::

    from bayesflat import samplers
    cls = samplers.get("fsgld")
    opt = cls(model.parameters(), lr=1e-3, num_data=N, temperature=1.0)

All registered classes accept ``(params, lr, *, num_data, temperature, generator, **options)``.

The registry (:mod:`bayesflat.samplers.registry`) and this package import without torch; each
class is imported on first use, so listing the methods is immediate.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bayesflat._lazy import lazy_attributes
from bayesflat.samplers.registry import _REGISTRY as _REGISTRY  # tests register temporarily
from bayesflat.samplers.registry import (
    RegistryEntry,
    available,
    describe,
    entry,
    get,
    register,
)

if TYPE_CHECKING:
    from bayesflat.samplers.base import (
        Dynamics,
        FlatBuffer,
        GradientEstimator,
        PlainGradient,
        Sampler,
    )
    from bayesflat.samplers.cyclical import CFSGLD, CSGHMC, CSGLD, Cyclical
    from bayesflat.samplers.emcmc import EMCMC, EntropyLangevinDynamics
    from bayesflat.samplers.escape import Escape, EscapeSAM, RandomlySmoothedPerturbation
    from bayesflat.samplers.fsgld import FSGLD, CoupledPerturbation, coupled_sigma
    from bayesflat.samplers.langevin import SGD, SGLD, LangevinDynamics, langevin_noise_scale
    from bayesflat.samplers.perturbation import PerturbedGradient, exclude_from_perturbation
    from bayesflat.samplers.psgld import FPSGLD, PSGLD, PreconditionedLangevinDynamics
    from bayesflat.samplers.rwp import NSO, RWP
    from bayesflat.samplers.sam import SAM, SharpnessAwareGradient
    from bayesflat.samplers.sghmc import FSGHMC, SGHMC, SGHMCDynamics
    from bayesflat.samplers.swa import SWA, SWAG, SWAGFit, SWAGMoments, fit_swag, swa_from_trace

__all__ = [
    "CFSGLD",
    "CSGHMC",
    "CSGLD",
    "EMCMC",
    "FPSGLD",
    "FSGHMC",
    "FSGLD",
    "NSO",
    "PSGLD",
    "RWP",
    "SAM",
    "SGD",
    "SGHMC",
    "SGLD",
    "SWA",
    "SWAG",
    "CoupledPerturbation",
    "Cyclical",
    "Dynamics",
    "EntropyLangevinDynamics",
    "Escape",
    "EscapeSAM",
    "FlatBuffer",
    "GradientEstimator",
    "LangevinDynamics",
    "PerturbedGradient",
    "PlainGradient",
    "PreconditionedLangevinDynamics",
    "RandomlySmoothedPerturbation",
    "RegistryEntry",
    "SGHMCDynamics",
    "SWAGFit",
    "SWAGMoments",
    "Sampler",
    "SharpnessAwareGradient",
    "available",
    "coupled_sigma",
    "describe",
    "entry",
    "exclude_from_perturbation",
    "fit_swag",
    "get",
    "langevin_noise_scale",
    "register",
    "swa_from_trace",
]

_MODULES: dict[str, tuple[str, ...]] = {
    "base": ("Dynamics", "FlatBuffer", "GradientEstimator", "PlainGradient", "Sampler"),
    "cyclical": ("CFSGLD", "CSGHMC", "CSGLD", "Cyclical"),
    "emcmc": ("EMCMC", "EntropyLangevinDynamics"),
    "escape": ("Escape", "EscapeSAM", "RandomlySmoothedPerturbation"),
    "fsgld": ("FSGLD", "CoupledPerturbation", "coupled_sigma"),
    "langevin": ("SGD", "SGLD", "LangevinDynamics", "langevin_noise_scale"),
    "perturbation": ("PerturbedGradient", "exclude_from_perturbation"),
    "psgld": ("FPSGLD", "PSGLD", "PreconditionedLangevinDynamics"),
    "rwp": ("NSO", "RWP"),
    "sam": ("SAM", "SharpnessAwareGradient"),
    "sghmc": ("FSGHMC", "SGHMC", "SGHMCDynamics"),
    "swa": ("SWA", "SWAG", "SWAGFit", "SWAGMoments", "fit_swag", "swa_from_trace"),
}
"""Module of this package -> the public names it defines, imported on first use."""


__getattr__, __dir__ = lazy_attributes(__name__, _MODULES)
