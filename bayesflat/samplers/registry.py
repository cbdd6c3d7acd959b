"""The registry of samplers and optimisers: names, summaries, papers and defaults.

The built-in methods are described by a static table, :data:`BUILTIN`, that imports nothing
heavier than the standard library: ``bayesflat samplers`` and the command line's checks of a
sampler name read it without loading torch. A class is imported when it is first asked for
(:attr:`RegistryEntry.cls`, :func:`get`). The test suite checks every row of the table against
its class (import path, ``name``, keyword defaults), so the two cannot drift apart.
"""

from __future__ import annotations

import importlib
import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bayesflat.samplers.base import Sampler

__all__ = [
    "BUILTIN",
    "RegistryEntry",
    "available",
    "class_defaults",
    "describe",
    "entry",
    "get",
    "register",
]

_NOT_HYPERPARAMETERS = frozenset({"self", "params", "num_data", "generator"})


def class_defaults(cls: type) -> dict[str, Any]:
    """The keyword arguments of ``cls(...)`` that have defaults, with those defaults.

    ``params``, ``num_data`` (always given) and ``generator`` (randomness, not a
    hyperparameter) are left out; ``lr`` and ``temperature`` are kept.
    """
    return {
        name: p.default
        for name, p in inspect.signature(cls).parameters.items()
        if name not in _NOT_HYPERPARAMETERS
        and p.default is not inspect.Parameter.empty
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


@dataclass(frozen=True)
class RegistryEntry:
    """A registered method: its class, a one-line summary and the paper it comes from.

    Parameters
    ----------
    name : str
        Registry name (lower case).
    target : type or str
        The class, or its import path ``"module:Class"`` (imported on first use of
        :attr:`cls`).
    summary : str
        One line saying what the method does.
    reference : str
        The paper it comes from.
    is_sampler : bool
        ``False`` for an optimiser (its chain of iterates is recorded like draws, at
        ``T = 0``).
    defaults : Mapping[str, Any] or None
        Keyword arguments of the class with their defaults (:func:`class_defaults`);
        ``None`` reads them from the class.
    """

    name: str
    target: type[Sampler] | str
    summary: str
    reference: str
    is_sampler: bool = True
    defaults: Mapping[str, Any] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        defaults = self.defaults
        if defaults is None:
            defaults = class_defaults(self.cls)
        object.__setattr__(self, "defaults", MappingProxyType(dict(defaults)))

    @property
    def cls(self) -> type[Sampler]:
        """The sampler class (imported on first use for the built-in methods)."""
        if isinstance(self.target, str):
            module, _, attribute = self.target.partition(":")
            return getattr(importlib.import_module(module), attribute)
        return self.target

    @property
    def options(self) -> dict[str, Any]:
        """The method's own options with their defaults: :attr:`defaults` less ``lr`` and
        ``temperature``, which every method takes."""
        return {k: v for k, v in (self.defaults or {}).items() if k not in ("lr", "temperature")}


def _builtin(
    name: str, target: str, summary: str, reference: str, is_sampler: bool, **options: Any
) -> RegistryEntry:
    # Every built-in class defaults to lr = 1e-3 and to T = 1 (samplers) or T = 0 (optimisers).
    defaults = {"lr": 1e-3, "temperature": 1.0 if is_sampler else 0.0, **options}
    return RegistryEntry(name, target, summary, reference, is_sampler, defaults)


_FSGLD = {
    "sigma": None, "eta": 0.1, "num_perturbations": 1, "antithetic": False,
    "perturbation": "gaussian",
}  # fmt: skip
_PSGLD = {"alpha": 0.99, "eps": 1e-8, "preconditioner": "frozen", "adapt_steps": None}
_CYCLES = {"cycles": 4, "exploration": 0.8, "total_steps": None}
_S = "bayesflat.samplers."

BUILTIN: tuple[RegistryEntry, ...] = (
    _builtin(
        "sgd", _S + "langevin:SGD",
        "stochastic gradient descent; the T = 0 limit of SGLD (point-estimate baseline)",
        "Robbins & Monro, Ann. Math. Stat. 1951", False,
    ),
    _builtin(
        "sgld", _S + "langevin:SGLD",
        "stochastic gradient Langevin dynamics",
        "Welling & Teh, ICML 2011", True,
    ),
    _builtin(
        "fsgld", _S + "fsgld:FSGLD",
        "flatness-aware SGLD: gradient at randomly perturbed weights, sigma coupled to T",
        "Bruno, Hwang, An, Sabanis, Lim, arXiv:2510.02174 (ICML 2026)", True, **_FSGLD,
    ),
    _builtin(
        "psgld", _S + "psgld:PSGLD",
        "preconditioned SGLD: RMSprop mass estimated in burn-in, then frozen (exact)",
        "Li, Chen, Carlson, Carin, AAAI 2016", True, **_PSGLD,
    ),
    _builtin(
        "fpsgld", _S + "psgld:FPSGLD",
        "flatness-aware pSGLD: perturbed-weight gradient with the RMSprop preconditioner",
        "Bruno et al., arXiv:2510.02174 (ICML 2026); Li et al., AAAI 2016", True,
        **_PSGLD, **_FSGLD,
    ),
    _builtin(
        "sghmc", _S + "sghmc:SGHMC",
        "stochastic gradient Hamiltonian Monte Carlo, momentum form (friction alpha)",
        "Chen, Fox, Guestrin, ICML 2014", True, alpha=0.1,
    ),
    _builtin(
        "fsghmc", _S + "sghmc:FSGHMC",
        "flatness-aware SGHMC: perturbed-weight gradient driving SGHMC dynamics",
        "Bruno et al., arXiv:2510.02174 (ICML 2026); Chen et al., ICML 2014", True,
        alpha=0.1, **_FSGLD,
    ),
    _builtin(
        "csgld", _S + "cyclical:CSGLD",
        "cyclical SGLD: cosine step-size cycles, SGD exploration then sampling phases",
        "Zhang, Li, Zhang, Chen, Wilson, ICLR 2020", True, **_CYCLES,
    ),
    _builtin(
        "csghmc", _S + "cyclical:CSGHMC",
        "cyclical SGHMC: cosine step-size cycles, momentum-SGD exploration then sampling",
        "Zhang, Li, Zhang, Chen, Wilson, ICLR 2020", True, alpha=0.1, **_CYCLES,
    ),
    _builtin(
        "cfsgld", _S + "cyclical:CFSGLD",
        "cyclical fSGLD: cosine step-size cycles, SGD exploration then fSGLD sampling",
        "Zhang et al., ICLR 2020; Bruno et al., arXiv:2510.02174 (ICML 2026)", True,
        **_FSGLD, **_CYCLES,
    ),
    _builtin(
        "emcmc", _S + "emcmc:EMCMC",
        "entropy-MCMC: Langevin on weights coupled to a flat-basin guide theta_a",
        "Li & Zhang, ICLR 2024", True, coupling=4e-4,
    ),
    _builtin(
        "sam", _S + "sam:SAM",
        "sharpness-aware minimisation: gradient at theta + rho g/||g|| (two passes)",
        "Foret, Kleiner, Mobahi, Neyshabur, ICLR 2021", False, rho=0.05, model=None,
    ),
    _builtin(
        "rwp", _S + "rwp:RWP",
        "random weight perturbation: gradient at theta + sigma eps (absolute or per filter)",
        "Bisla, Wang, Choromanska, AISTATS 2022; Li et al., TMLR 2024", False,
        sigma=0.01, filter_normalised=False, num_perturbations=1, clean_weight=0.0,
        perturbation="gaussian",
    ),
    _builtin(
        "nso", _S + "rwp:NSO",
        "noise stability optimisation: mean gradient over antithetic pairs theta +/- U",
        "Zhang, Li, Ju, TMLR 2024", False, sigma=0.01, num_pairs=1, clean_weight=0.0,
    ),
    _builtin(
        "escape", _S + "escape:Escape",
        "randomly smoothed perturbation: adds the projected gradient at theta + rho u",
        "Ahn, Jadbabaie, Sra, ICML 2024 (Algorithm 1)", False,
        rho=0.05, eps0=math.inf, direction="sphere", model=None,
    ),
    _builtin(
        "escape_sam", _S + "escape:EscapeSAM",
        "sharpness-aware perturbation: as escape with u = +/- g/||g||",
        "Ahn, Jadbabaie, Sra, ICML 2024 (Algorithm 2)", False,
        rho=0.05, eps0=math.inf, model=None,
    ),
    _builtin(
        "swa", _S + "swa:SWA",
        "averaged SGD / SWA: running mean of constant-step SGD iterates, BatchNorm recomputed",
        "Izmailov et al., UAI 2018; Nitanda, Kikuchi, Maeda, Wu, AISTATS 2024", False,
        start=None, every=1,
    ),
    _builtin(
        "swag", _S + "swa:SWAG",
        "SWAG: diagonal plus low-rank Gaussian fitted to SGD iterates, draws as the chain",
        "Maddox, Izmailov, Garipov, Vetrov, Wilson, NeurIPS 2019", False,
        max_rank=20, scale=0.5, start=None, every=None,
    ),
)  # fmt: skip
"""The built-in methods, in registry order, described without importing them."""

_REGISTRY: dict[str, RegistryEntry] = {e.name: e for e in BUILTIN}


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
