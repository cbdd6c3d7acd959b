"""Stochastic gradient Hamiltonian Monte Carlo (SGHMC) and its flatness-aware variant.

Chen, Fox, Guestrin, "Stochastic gradient Hamiltonian Monte Carlo", ICML 2014, in the
momentum form used for deep networks, in mean-loss units with friction ``alpha``:

    v     <- (1 - alpha) v - lr g + sqrt(2 alpha lr T / N) xi,      xi ~ N(0, I)
    theta <- theta + v

(Section 3.3 of the paper with its learning rate ``eta = lr / N``, since its gradient is that of
the summed potential ``N L``, and the gradient-noise estimate ``beta-hat = 0``).
For small ``lr`` the stationary law of ``theta`` is ``exp(-N L / T)``, and where the potential
is locally flat each coordinate of ``v`` has variance ``2 lr T / (N (2 - alpha))``
(:func:`bayesflat.diagnostics.convergence.kinetic_temperature`).

The momentum is stored as ``torch.optim.SGD`` stores it, in gradient units, ``b = -v / lr``:

    b     <- (1 - alpha) b + g + sqrt(2 alpha T / (N lr)) xi
    theta <- theta - lr b

so with ``T = 0`` a step is ``torch.optim.SGD(lr, momentum=1 - alpha)`` to the last bit: the
same operations in the same order. For a constant ``lr`` the two forms are the same chain. Under
a step-size schedule the momentum keeps its gradient units, as torch's does:
``v_t = (1 - alpha) (lr_t / lr_{t-1}) v_{t-1} - lr_t g + sqrt(2 alpha lr_t T / N) xi``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from bayesflat.samplers.base import Dynamics, PlainGradient, Sampler
from bayesflat.samplers.fsgld import CoupledPerturbation
from bayesflat.samplers.psgld import state_tensors

__all__ = ["FSGHMC", "SGHMC", "SGHMCDynamics"]


class SGHMCDynamics(Dynamics):
    """Underdamped Langevin (SGHMC) move with per-group friction ``alpha``.

    The momentum ``b = -v / lr`` is ``state[p]["momentum_buffer"]`` (torch's name and units).
    One batched normal draw per step.
    """

    name = "sghmc"
    defaults: dict[str, Any] = {"alpha": 0.1}

    def validate(self, group: dict[str, Any]) -> None:
        """Check ``0 < alpha <= 1`` (``alpha = 1``: no momentum, SGLD)."""
        alpha = group["alpha"]
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 < alpha <= 1:
            raise ValueError(
                f"alpha must lie in (0, 1] (friction; the momentum is 1 - alpha), got {alpha!r}"
            )
        group["alpha"] = float(alpha)

    def update(self, sampler: Sampler) -> None:
        hot = any(g["temperature"] > 0 for g in sampler.param_groups)
        noise = sampler.buffer("noise") if hot else None
        if noise is not None:
            noise.normal_(sampler.generator)
        for group in sampler.param_groups:
            params, grads = sampler.grads_of(group)
            if not params:
                continue
            lr = group["lr"]
            buffers = state_tensors(sampler, params, "momentum_buffer")
            torch._foreach_mul_(buffers, 1 - group["alpha"])
            torch._foreach_add_(buffers, grads)
            if group["temperature"] > 0 and noise is not None:
                # -lr times this kick is the velocity kick sqrt(2 alpha lr T / N) xi
                kick = math.sqrt(
                    2.0 * group["alpha"] * group["temperature"] / (group["num_data"] * lr)
                )
                torch._foreach_add_(buffers, noise.of(params), alpha=kick)
            torch._foreach_add_(params, buffers, alpha=-lr)

    def stats(self, sampler: Sampler) -> dict[str, float]:
        """``kinetic_temperature``: ``N (2 - alpha) mean(v^2) / (2 lr)`` of the last step.

        ``v = -lr b`` is the last displacement of ``theta``; the mean runs over all
        coordinates. Its expectation is ``T`` at stationarity on a locally flat potential
        (dimensionless; see :func:`bayesflat.diagnostics.convergence.kinetic_temperature`).
        """
        total, count = 0.0, 0
        for group in sampler.param_groups:
            buffers = [
                sampler.state[p]["momentum_buffer"]
                for p in group["params"]
                if "momentum_buffer" in sampler.state[p]
            ]
            if not buffers:
                continue
            square_sum = float(torch.stack(torch._foreach_norm(buffers)).square().sum())
            # v = -lr b, so N (2 - alpha) v^2 / (2 lr) = N (2 - alpha) lr b^2 / 2
            total += group["num_data"] * (2.0 - group["alpha"]) * group["lr"] * square_sum / 2.0
            count += sum(b.numel() for b in buffers)
        return {"kinetic_temperature": total / count if count else math.nan}


class SGHMC(Sampler):
    """Stochastic gradient Hamiltonian Monte Carlo (Chen, Fox, Guestrin, ICML 2014).

    Update rule, in mean-loss units, with friction ``alpha`` (momentum ``1 - alpha``):

        v     <- (1 - alpha) v - lr grad L_B(theta) + sqrt(2 alpha lr T / N) xi,   xi ~ N(0, I)
        theta <- theta + v

    stored in torch's convention ``b = -v / lr`` (see the module notes), which makes ``T = 0``
    exactly ``torch.optim.SGD(lr, momentum=1 - alpha)`` (no dampening, no Nesterov).

    Parameters
    ----------
    params : iterable
        Parameters or param groups.
    lr : float or callable, default 1e-3
        Step size (``> 0``) or a schedule: the gradient's weight in ``v``.
    num_data : int
        Training-set size ``N``.
    temperature : float or callable, default 1.0
        ``T >= 0``.
    alpha : float, default 0.1
        Friction in ``(0, 1]``; momentum ``1 - alpha`` (0.9 by default, the deep-learning
        convention). ``alpha = 1`` is SGLD. The mixing time of ``v`` is about ``1 / alpha``
        steps.
    generator : torch.Generator, optional
        Randomness of this chain.

    Notes
    -----
    Sample statistic: ``kinetic_temperature`` (should read ``T`` at stationarity, up to the
    ``O(lr * curvature)`` discretisation bias). State: ``state[p]["momentum_buffer"]`` (``b``).

    References
    ----------
    T. Chen, E. B. Fox, C. Guestrin. Stochastic gradient Hamiltonian Monte Carlo. ICML 2014.
    """

    name = "sghmc"

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Callable[[int], float] = 1e-3,
        *,
        num_data: int,
        temperature: float | Callable[[int], float] = 1.0,
        alpha: float = 0.1,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(
            params,
            estimator=PlainGradient(),
            dynamics=SGHMCDynamics(),
            lr=lr,
            num_data=num_data,
            temperature=temperature,
            generator=generator,
            alpha=alpha,
        )


class FSGHMC(Sampler):
    """Flatness-aware SGHMC: the fSGLD gradient driving SGHMC dynamics.

    Update rule, in mean-loss units:

        eps_k ~ N(0, I) (or Rademacher),  k = 1..n  (and -eps_k with antithetic pairs)
        g     = mean_k grad L_B(theta + sigma * eps_k)
        v     <- (1 - alpha) v - lr g + sqrt(2 alpha lr T / N) xi,   xi ~ N(0, I)
        theta <- theta + v

    with ``sigma = (T / N)^((1 + eta) / 4)`` unless given (Bruno et al.'s coupling).

    Parameters
    ----------
    params : iterable
        Parameters or param groups (``"perturb": False`` leaves a group unperturbed).
    lr : float or callable, default 1e-3
        Step size (``> 0``) or a schedule.
    num_data : int
        Training-set size ``N``.
    temperature : float or callable, default 1.0
        ``T >= 0``. At ``T = 0`` the coupled ``sigma`` is 0 and the step is
        ``torch.optim.SGD(lr, momentum=1 - alpha)`` exactly.
    alpha : float, default 0.1
        Friction in ``(0, 1]``.
    sigma : float, optional
        Perturbation scale (parameter units); ``None`` uses the coupling.
    eta : float, default 0.1
        Coupling exponent in ``(0, 1)``.
    num_perturbations : int, default 1
        Perturbation draws per step.
    antithetic : bool, default False
        Evaluate each draw at ``+eps`` and ``-eps``.
    perturbation : {"gaussian", "rademacher"}, default "gaussian"
        Distribution of ``eps``.
    generator : torch.Generator, optional
        Randomness of this chain.

    Notes
    -----
    Sample statistics: ``sigma``, ``kinetic_temperature``.

    References
    ----------
    Bruno, Hwang, An, Sabanis, Lim. Flatness-aware stochastic gradient Langevin dynamics.
    arXiv:2510.02174 (ICML 2026). Chen, Fox, Guestrin. ICML 2014.
    """

    name = "fsghmc"

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Callable[[int], float] = 1e-3,
        *,
        num_data: int,
        temperature: float | Callable[[int], float] = 1.0,
        alpha: float = 0.1,
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
            dynamics=SGHMCDynamics(),
            lr=lr,
            num_data=num_data,
            temperature=temperature,
            generator=generator,
            alpha=alpha,
            sigma=sigma,
            eta=eta,
        )
