"""Samplers and optimisers, each a gradient estimator composed with a dynamics.

Every method is reachable by name through one registry::

    from bayesflat import samplers
    cls = samplers.get("fsgld")
    opt = cls(model.parameters(), lr=1e-3, num_data=N, temperature=1.0)

All registered classes accept ``(params, lr, *, num_data, temperature, generator, **options)``.
"""

from __future__ import annotations

from dataclasses import dataclass

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
    "exclude_from_perturbation",
    "fit_swag",
    "get",
    "langevin_noise_scale",
    "register",
    "swa_from_trace",
]


@dataclass(frozen=True)
class RegistryEntry:
    """A registered method: its class, a one-line summary and the paper it comes from."""

    name: str
    cls: type[Sampler]
    summary: str
    reference: str
    is_sampler: bool = True


_REGISTRY: dict[str, RegistryEntry] = {}


def register(
    name: str, cls: type[Sampler], *, summary: str, reference: str, is_sampler: bool = True
) -> None:
    """Register ``cls`` under ``name``.

    ``is_sampler=False`` marks an optimiser (its chain of iterates is recorded like draws,
    at ``T = 0``).
    """
    if not isinstance(name, str) or not name or name != name.lower():
        raise ValueError(f"sampler name must be a non-empty lower-case string, got {name!r}")
    if name in _REGISTRY and _REGISTRY[name].cls is not cls:
        raise ValueError(f"a sampler named {name!r} is already registered")
    _REGISTRY[name] = RegistryEntry(name, cls, summary, reference, is_sampler)


def entry(name: str) -> RegistryEntry:
    """The registry entry for ``name``; unknown names raise a ``ValueError`` listing all."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown sampler {name!r}; available: {', '.join(available())}") from None


def get(name: str) -> type[Sampler]:
    """The sampler class registered under ``name``."""
    return entry(name).cls


def available() -> list[str]:
    """Registered names, in registration order."""
    return list(_REGISTRY)


def describe() -> list[RegistryEntry]:
    """Every registry entry, in registration order."""
    return list(_REGISTRY.values())


register(
    "sgd",
    SGD,
    summary="stochastic gradient descent; the T = 0 limit of SGLD (point-estimate baseline)",
    reference="Robbins & Monro, Ann. Math. Stat. 1951",
    is_sampler=False,
)
register(
    "sgld",
    SGLD,
    summary="stochastic gradient Langevin dynamics",
    reference="Welling & Teh, ICML 2011",
)
register(
    "fsgld",
    FSGLD,
    summary="flatness-aware SGLD: gradient at randomly perturbed weights, sigma coupled to T",
    reference="Bruno, Hwang, An, Sabanis, Lim, arXiv:2510.02174 (ICML 2026)",
)
register(
    "psgld",
    PSGLD,
    summary="preconditioned SGLD: RMSprop mass estimated in burn-in, then frozen (exact)",
    reference="Li, Chen, Carlson, Carin, AAAI 2016",
)
register(
    "fpsgld",
    FPSGLD,
    summary="flatness-aware pSGLD: perturbed-weight gradient with the RMSprop preconditioner",
    reference="Bruno et al., arXiv:2510.02174 (ICML 2026); Li et al., AAAI 2016",
)
register(
    "sghmc",
    SGHMC,
    summary="stochastic gradient Hamiltonian Monte Carlo, momentum form (friction alpha)",
    reference="Chen, Fox, Guestrin, ICML 2014",
)
register(
    "fsghmc",
    FSGHMC,
    summary="flatness-aware SGHMC: perturbed-weight gradient driving SGHMC dynamics",
    reference="Bruno et al., arXiv:2510.02174 (ICML 2026); Chen et al., ICML 2014",
)
register(
    "csgld",
    CSGLD,
    summary="cyclical SGLD: cosine step-size cycles, SGD exploration then sampling phases",
    reference="Zhang, Li, Zhang, Chen, Wilson, ICLR 2020",
)
register(
    "csghmc",
    CSGHMC,
    summary="cyclical SGHMC: cosine step-size cycles, momentum-SGD exploration then sampling",
    reference="Zhang, Li, Zhang, Chen, Wilson, ICLR 2020",
)
register(
    "cfsgld",
    CFSGLD,
    summary="cyclical fSGLD: cosine step-size cycles, SGD exploration then fSGLD sampling",
    reference="Zhang et al., ICLR 2020; Bruno et al., arXiv:2510.02174 (ICML 2026)",
)
register(
    "emcmc",
    EMCMC,
    summary="entropy-MCMC: Langevin on weights coupled to a flat-basin guide theta_a",
    reference="Li & Zhang, ICLR 2024",
)
register(
    "sam",
    SAM,
    summary="sharpness-aware minimisation: gradient at theta + rho g/||g|| (two passes)",
    reference="Foret, Kleiner, Mobahi, Neyshabur, ICLR 2021",
    is_sampler=False,
)
register(
    "rwp",
    RWP,
    summary="random weight perturbation: gradient at theta + sigma eps (absolute or per filter)",
    reference="Bisla, Wang, Choromanska, AISTATS 2022; Li et al., TMLR 2024",
    is_sampler=False,
)
register(
    "nso",
    NSO,
    summary="noise stability optimisation: mean gradient over antithetic pairs theta +/- U",
    reference="Zhang, Li, Ju, TMLR 2024",
    is_sampler=False,
)
register(
    "escape",
    Escape,
    summary="randomly smoothed perturbation: adds the projected gradient at theta + rho u",
    reference="Ahn, Jadbabaie, Sra, ICML 2024 (Algorithm 1)",
    is_sampler=False,
)
register(
    "escape_sam",
    EscapeSAM,
    summary="sharpness-aware perturbation: as escape with u = +/- g/||g||",
    reference="Ahn, Jadbabaie, Sra, ICML 2024 (Algorithm 2)",
    is_sampler=False,
)
register(
    "swa",
    SWA,
    summary="averaged SGD / SWA: running mean of constant-step SGD iterates, BatchNorm recomputed",
    reference="Izmailov et al., UAI 2018; Nitanda, Kikuchi, Maeda, Wu, AISTATS 2024",
    is_sampler=False,
)
register(
    "swag",
    SWAG,
    summary="SWAG: diagonal plus low-rank Gaussian fitted to SGD iterates, draws as the chain",
    reference="Maddox, Izmailov, Garipov, Vetrov, Wilson, NeurIPS 2019",
    is_sampler=False,
)
