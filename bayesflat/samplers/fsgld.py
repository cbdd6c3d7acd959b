"""fSGLD: flatness-aware stochastic gradient Langevin dynamics.

Bruno, Hwang, An, Sabanis, Lim, "Flatness-aware stochastic gradient Langevin dynamics",
arXiv:2510.02174 (ICML 2026). SGLD whose gradient is taken at randomly perturbed weights:

    theta <- theta - lr * grad L_B(theta + sigma * eps) + sqrt(2 * lr * T / N) * xi,
    eps, xi ~ N(0, I), fresh every step.

For small ``lr`` the chain targets ``exp(-beta * v(theta))`` with ``beta = N / T`` and the
randomly smoothed potential ``v(theta) = E_eps[L(theta + sigma eps)] ≈ L + sigma^2/2 tr H``,
a posterior biased toward flat basins. The paper couples the perturbation to the
temperature, ``sigma = beta^(-(1 + eta)/4) = (T / N)^((1 + eta)/4)``, ``eta`` in ``(0, 1)``.

How the coupling scales. ``sigma`` is in parameter units and shrinks only like
``(T / N)^0.275`` (``eta = 0.1``): at ``T = 1`` it is 0.139 for ``N = 1,293`` (digits), 0.051
for ``N = 50,000`` (CIFAR-10) and 0.022 for ``N = 1,000,000``; at ``T = 1e-4`` and
``N = 50,000`` it is 0.0041 (the authors' own CIFAR runs set ``sigma = 1e-3`` there). Compare it
with the prior std of the weights: an isotropic ``N(0, 1)`` prior is far wider, but a
fan-in-scaled prior (``s = 1 / sqrt(fan_in)``: 0.125 for 64 inputs, 0.044 for 512) is not, and
once ``sigma`` exceeds ``s`` the perturbed points leave the region the prior holds (on digits,
fSGLD at the coupled sigma fell to accuracy 0.54 where SGLD with the same prior reached 0.93).
:func:`bayesflat.sample` warns (:class:`~bayesflat.samplers.perturbation.ScaleWarning`) when
that happens, and the report shows ``sigma`` beside the smallest prior std. In the target
``exp(-(N / T) v)``, the flatness term ``(N / T) sigma^2 tr H / 2`` weighs
``(N / T)^((1 - eta) / 2) tr H / 2`` under the coupling: it grows with ``N / T``, but more
slowly than the data term ``(N / T) L``, so the flatness bias fades as data accumulate or the
posterior is cooled.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from bayesflat._checks import check_positive, validate_num_data, validate_temperature
from bayesflat.samplers.base import Sampler
from bayesflat.samplers.langevin import LangevinDynamics
from bayesflat.samplers.perturbation import PerturbedGradient

__all__ = ["FSGLD", "CoupledPerturbation", "coupled_sigma", "validate_eta"]


def validate_eta(eta: object) -> float:
    """Return ``eta`` as a float after checking ``0 < eta < 1``."""
    if isinstance(eta, bool) or not isinstance(eta, int | float) or not 0 < eta < 1:
        raise ValueError(f"eta must lie in the open interval (0, 1), got {eta!r}")
    return float(eta)


def coupled_sigma(temperature: float, num_data: int, eta: float = 0.1) -> float:
    """The paper's perturbation scale ``sigma = (T / N)^((1 + eta) / 4)``.

    Parameters
    ----------
    temperature : float
        ``T >= 0``.
    num_data : int
        ``N``; ``beta = N / T`` is the inverse temperature of the paper.
    eta : float
        Exponent parameter in ``(0, 1)``.

    Returns
    -------
    float
        ``sigma`` in parameter units; ``0`` when ``T = 0``.
    """
    t = validate_temperature(temperature)
    n = validate_num_data(num_data)
    e = validate_eta(eta)
    if t == 0:
        return 0.0
    return (t / n) ** ((1.0 + e) / 4.0)


class CoupledPerturbation(PerturbedGradient):
    """Perturbed gradient whose ``sigma=None`` means the temperature coupling."""

    name = "coupled_perturbation"
    defaults: dict[str, Any] = {"sigma": None, "eta": 0.1, "perturb": True}

    def validate(self, group: dict[str, Any]) -> None:
        """Check ``0 < eta < 1`` and ``sigma`` (``None`` or ``>= 0``)."""
        group["eta"] = validate_eta(group["eta"])
        if group["sigma"] is not None:
            group["sigma"] = check_positive(group["sigma"], "sigma", allow_zero=True)

    def resolve_sigma(self, group: dict[str, Any]) -> float:
        """``group["sigma"]`` if set, else ``(T / N)^((1 + eta) / 4)`` of the group.

        The group's values were checked when they were set (at construction, and whenever a
        schedule is resolved), so the coupling is evaluated here without validating again:
        this runs every step.
        """
        sigma = group["sigma"]
        if sigma is not None:
            return float(sigma)
        temperature = group["temperature"]
        if temperature == 0:
            return 0.0
        return (temperature / group["num_data"]) ** ((1.0 + group["eta"]) / 4.0)


class FSGLD(Sampler):
    """Flatness-aware SGLD (Bruno, Hwang, An, Sabanis, Lim; arXiv:2510.02174, ICML 2026).

    Update rule, in mean-loss units:

        eps_k ~ N(0, I) (or Rademacher),  k = 1..n  (and -eps_k with antithetic pairs)
        g     = mean_k grad L_B(theta + sigma * eps_k)
        theta <- theta - lr * g + sqrt(2 * lr * T / N) * xi,    xi ~ N(0, I)

    Parameters
    ----------
    params : iterable
        Parameters or param groups. A group with ``"perturb": False`` is not perturbed
        (e.g. BatchNorm, see :func:`~bayesflat.samplers.perturbation.exclude_from_perturbation`).
    lr : float or callable, default 1e-3
        Step size (``> 0``) or a schedule ``step -> lr``.
    num_data : int
        Training-set size ``N``.
    temperature : float or callable, default 1.0
        ``T >= 0``.
    sigma : float, optional
        Perturbation scale (parameter units). ``None`` (default) uses the paper's coupling
        ``sigma = (T / N)^((1 + eta) / 4)``; an explicit value overrides it.
    eta : float, default 0.1
        Coupling exponent in ``(0, 1)``.
    num_perturbations : int, default 1
        Perturbation draws per step; the gradients are averaged.
    antithetic : bool, default False
        Evaluate each draw at ``+eps`` and ``-eps``.
    perturbation : {"gaussian", "rademacher"}, default "gaussian"
        Distribution of ``eps``.
    generator : torch.Generator, optional
        Randomness of this chain.

    Notes
    -----
    With ``T = 0`` and ``sigma = 0`` a step is bit-for-bit ``torch.optim.SGD``; with ``T = 0``
    and ``sigma > 0`` the weights move only by ``-lr * g``: the perturbation is undone by
    copying the saved weights back. Cost per step: one extra forward/backward per additional
    evaluation, one parameter-sized backup buffer.
    """

    name = "fsgld"

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Callable[[int], float] = 1e-3,
        *,
        num_data: int,
        temperature: float | Callable[[int], float] = 1.0,
        sigma: float | Callable[[int], float] | None = None,
        eta: float = 0.1,
        num_perturbations: int = 1,
        antithetic: bool = False,
        perturbation: str = "gaussian",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(
            params,
            estimator=CoupledPerturbation(num_perturbations, antithetic, perturbation),
            dynamics=LangevinDynamics(),
            lr=lr,
            num_data=num_data,
            temperature=temperature,
            generator=generator,
            sigma=sigma,
            eta=eta,
        )

    def effective_sigma(self, group_index: int = 0) -> float:
        """The perturbation scale the next step of group ``group_index`` will use."""
        group = self.param_groups[group_index]
        sigma = self.estimator.resolve_sigma(group)
        return sigma if group["perturb"] and math.isfinite(sigma) else 0.0
