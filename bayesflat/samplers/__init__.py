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

_MODULES = frozenset({
    "base", "cyclical", "emcmc", "escape", "fsgld", "langevin", "perturbation", "psgld",
    "registry", "rwp", "sam", "sghmc", "swa",
})  # fmt: skip

_LAZY: dict[str, str] = {
    **dict.fromkeys(
        ("Dynamics", "FlatBuffer", "GradientEstimator", "PlainGradient", "Sampler"), "base"
    ),
    **dict.fromkeys(("CFSGLD", "CSGHMC", "CSGLD", "Cyclical"), "cyclical"),
    **dict.fromkeys(("EMCMC", "EntropyLangevinDynamics"), "emcmc"),
    **dict.fromkeys(("Escape", "EscapeSAM", "RandomlySmoothedPerturbation"), "escape"),
    **dict.fromkeys(("FSGLD", "CoupledPerturbation", "coupled_sigma"), "fsgld"),
    **dict.fromkeys(("SGD", "SGLD", "LangevinDynamics", "langevin_noise_scale"), "langevin"),
    **dict.fromkeys(("PerturbedGradient", "exclude_from_perturbation"), "perturbation"),
    **dict.fromkeys(("FPSGLD", "PSGLD", "PreconditionedLangevinDynamics"), "psgld"),
    **dict.fromkeys(("NSO", "RWP"), "rwp"),
    **dict.fromkeys(("SAM", "SharpnessAwareGradient"), "sam"),
    **dict.fromkeys(("FSGHMC", "SGHMC", "SGHMCDynamics"), "sghmc"),
    **dict.fromkeys(("SWA", "SWAG", "SWAGFit", "SWAGMoments", "fit_swag", "swa_from_trace"), "swa"),
}
"""Public name -> the module of this package that defines it."""


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, _MODULES)
