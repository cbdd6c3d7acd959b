"""Overdamped Langevin dynamics: SGLD, and SGD as its zero-temperature limit.

SGLD (Welling & Teh, ICML 2011, "Bayesian learning via stochastic gradient Langevin
dynamics"), in mean-loss units:

    theta <- theta - lr * g + sqrt(2 * lr * T / N) * xi,     xi ~ N(0, I),

with ``g`` the gradient estimate (``grad L_B(theta)`` for SGLD). Its stationary law for small
``lr`` is ``exp(-N L / T)``. With ``T = 0`` no noise is drawn and the update is
``theta <- theta - lr * g``, the same floating-point operation as ``torch.optim.SGD``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from bayesflat.samplers.base import Dynamics, PlainGradient, Sampler

__all__ = ["SGD", "SGLD", "LangevinDynamics", "langevin_noise_scale"]


def langevin_noise_scale(lr: float, temperature: float, num_data: int) -> float:
    """Standard deviation of the Langevin kick, ``sqrt(2 lr T / N)`` (parameter units)."""
    return math.sqrt(2.0 * lr * temperature / num_data)


class LangevinDynamics(Dynamics):
    """``theta <- theta - lr * g + sqrt(2 lr T / N) xi``; one batched normal draw per step."""

    name = "langevin"

    def update(self, sampler: Sampler) -> None:
        groups = sampler.param_groups
        noise = None
        for group in groups:
            if group["temperature"] > 0:
                noise = sampler.buffer("noise")
                noise.normal_(sampler.generator)
                break
        for group in groups:
            params, grads = sampler.grads_of(group)
            if not params:
                continue
            lr = group["lr"]
            torch._foreach_add_(params, grads, alpha=-lr)
            temperature = group["temperature"]
            if temperature > 0 and noise is not None:
                views = noise.of_group(group) if params is group["params"] else noise.of(params)
                scale = math.sqrt(2.0 * lr * temperature / group["num_data"])
                torch._foreach_add_(params, views, alpha=scale)


class SGLD(Sampler):
    """Stochastic gradient Langevin dynamics (Welling & Teh, ICML 2011).

    Update rule, in mean-loss units (``L_B`` the minibatch potential):

        theta <- theta - lr * grad L_B(theta) + sqrt(2 * lr * T / N) * xi,   xi ~ N(0, I).

    Parameters
    ----------
    params : iterable
        Parameters or param groups.
    lr : float or callable
        Step size (``> 0``) or a schedule ``step -> lr``. Default ``1e-3``.
    num_data : int
        Training-set size ``N``.
    temperature : float or callable, default 1.0
        ``T >= 0``; ``T = 0`` gives ``torch.optim.SGD`` exactly.
    generator : torch.Generator, optional
        Randomness of this chain.

    References
    ----------
    M. Welling and Y. W. Teh. Bayesian learning via stochastic gradient Langevin dynamics.
    ICML 2011.
    """

    name = "sgld"

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Callable[[int], float] = 1e-3,
        *,
        num_data: int,
        temperature: float | Callable[[int], float] = 1.0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(
            params,
            estimator=PlainGradient(),
            dynamics=LangevinDynamics(),
            lr=lr,
            num_data=num_data,
            temperature=temperature,
            generator=generator,
        )


class SGD(Sampler):
    """Stochastic gradient descent, the ``T = 0`` member of the Langevin family.

    ``theta <- theta - lr * grad L_B(theta)``; bit-for-bit ``torch.optim.SGD`` without
    momentum or weight decay (the prior enters through ``L_B``). Its chain of iterates is
    recorded like any sampler's draws, as a point-estimate baseline.

    Parameters
    ----------
    params : iterable
        Parameters or param groups.
    lr : float or callable
        Step size (``> 0``) or a schedule.
    num_data : int
        Training-set size ``N`` (recorded; sets the prior weight in ``L_B``).
    temperature : float, default 0.0
        Must be 0: SGD injects no noise.
    generator : torch.Generator, optional
        Unused by the update; accepted so every registry entry takes the same arguments.
    """

    name = "sgd"

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Callable[[int], float] = 1e-3,
        *,
        num_data: int,
        temperature: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        if temperature != 0:
            raise ValueError(
                f"temperature must be 0 for the 'sgd' optimiser, got {temperature!r}; "
                "use 'sgld' to sample at T > 0"
            )
        super().__init__(
            params,
            estimator=PlainGradient(),
            dynamics=LangevinDynamics(),
            lr=lr,
            num_data=num_data,
            temperature=0.0,
            generator=generator,
        )
