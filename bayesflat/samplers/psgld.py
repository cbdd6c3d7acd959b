"""Preconditioned SGLD (pSGLD) and its flatness-aware variant.

Li, Chen, Carlson, Carin, "Preconditioned stochastic gradient Langevin dynamics for deep
neural networks", AAAI 2016. An RMSprop preconditioner rescales both the drift and the noise,
in mean-loss units (elementwise operations):

    V     <- alpha V + (1 - alpha) g * g
    G     =  1 / (lambda + sqrt(V))
    theta <- theta - lr G g + sqrt(2 lr T / N * G) xi,      xi ~ N(0, I).

The paper's correction term ``Gamma(theta) = sum_j d G_ij / d theta_j`` is dropped, as in the
paper's own experiments: it is ``O(1 - alpha)``. The stationary law is therefore
``exp(-N L / T)`` only up to that bias; with a *fixed* preconditioner (``alpha = 1`` after
``V`` has been set, e.g. loaded from a state dict) the correction vanishes identically and
the chain is a Langevin chain with constant diagonal mass.

With ``T = 0`` no noise is drawn and the step is ``torch.optim.RMSprop(lr, alpha, eps=lambda)``
to the last bit: the same operations in the same order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from bayesflat._checks import check_positive
from bayesflat.samplers.base import Dynamics, PlainGradient, Sampler
from bayesflat.samplers.fsgld import CoupledPerturbation
from bayesflat.samplers.langevin import langevin_noise_scale

__all__ = [
    "FPSGLD",
    "PSGLD",
    "PreconditionedLangevinDynamics",
    "state_tensors",
]


def state_tensors(
    sampler: Sampler,
    params: list[Tensor],
    key: str,
    init: Callable[[Tensor], Tensor] = torch.zeros_like,
) -> list[Tensor]:
    """Per-parameter state ``sampler.state[p][key]`` for ``params``, created by ``init(p)``.

    The state lives in the optimizer state, so it is part of ``state_dict()``.
    """
    out = []
    for p in params:
        state = sampler.state[p]
        value = state.get(key)
        if value is None:
            value = state[key] = init(p.detach())
        out.append(value)
    return out


class PreconditionedLangevinDynamics(Dynamics):
    """RMSprop-preconditioned Langevin move; per-group ``alpha`` (decay) and ``eps`` (lambda).

    ``V`` is kept as ``state[p]["square_avg"]`` (the name ``torch.optim.RMSprop`` uses).
    One batched normal draw per step; the preconditioner is formed in a flat workspace.
    """

    name = "preconditioned_langevin"
    defaults: dict[str, Any] = {"alpha": 0.99, "eps": 1e-8}

    def validate(self, group: dict[str, Any]) -> None:
        """Check ``0 <= alpha <= 1`` and ``eps > 0``."""
        alpha = group["alpha"]
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 <= alpha <= 1:
            raise ValueError(f"alpha must lie in [0, 1] (the decay of V), got {alpha!r}")
        group["alpha"] = float(alpha)
        group["eps"] = check_positive(group["eps"], "eps")

    def update(self, sampler: Sampler) -> None:
        hot = any(g["temperature"] > 0 for g in sampler.param_groups)
        noise = sampler.buffer("noise") if hot else None
        if noise is not None:
            noise.normal_(sampler.generator)
        workspace = sampler.buffer("preconditioner")
        for group in sampler.param_groups:
            params, grads = sampler.grads_of(group)
            if not params:
                continue
            square_avgs = state_tensors(sampler, params, "square_avg")
            torch._foreach_mul_(square_avgs, group["alpha"])
            torch._foreach_addcmul_(square_avgs, grads, grads, value=1 - group["alpha"])
            avg = workspace.of(params)
            torch._foreach_copy_(avg, square_avgs)
            torch._foreach_sqrt_(avg)
            torch._foreach_add_(avg, group["eps"])
            torch._foreach_addcdiv_(params, grads, avg, value=-group["lr"])
            if group["temperature"] > 0 and noise is not None:
                # sqrt(2 lr T / N * G) xi = scale * xi / sqrt(lambda + sqrt(V))
                torch._foreach_sqrt_(avg)
                scale = langevin_noise_scale(group["lr"], group["temperature"], group["num_data"])
                torch._foreach_addcdiv_(params, noise.of(params), avg, value=scale)

    def stats(self, sampler: Sampler) -> dict[str, float]:
        """``preconditioner_mean`` and ``preconditioner_max``: mean and largest entry of ``G``.

        ``lr * G`` is the effective step size of each coordinate (dimensionless multiplier
        of ``lr``; ``G`` has the units of inverse gradient).
        """
        total, count, largest = 0.0, 0, 0.0
        for group in sampler.param_groups:
            square_avgs = [
                sampler.state[p]["square_avg"]
                for p in group["params"]
                if "square_avg" in sampler.state[p]
            ]
            if not square_avgs:
                continue
            inv = torch._foreach_sqrt(square_avgs)
            torch._foreach_add_(inv, group["eps"])
            torch._foreach_reciprocal_(inv)
            total += float(torch.stack(torch._foreach_norm(inv, 1)).sum())
            largest = max(largest, float(torch.stack(torch._foreach_norm(inv, math.inf)).max()))
            count += sum(t.numel() for t in inv)
        if count == 0:
            return {"preconditioner_mean": math.nan, "preconditioner_max": math.nan}
        return {"preconditioner_mean": total / count, "preconditioner_max": largest}


class PSGLD(Sampler):
    """Preconditioned SGLD (Li, Chen, Carlson, Carin, AAAI 2016).

    Update rule, in mean-loss units (elementwise products and quotients):

        g     = grad L_B(theta)
        V     <- alpha V + (1 - alpha) g * g
        G     =  1 / (eps + sqrt(V))
        theta <- theta - lr G g + sqrt(2 lr T / N * G) xi,   xi ~ N(0, I)

    The correction ``Gamma(theta)`` of the paper is dropped (as in its experiments): the bias it
    leaves is ``O(1 - alpha)``.

    Parameters
    ----------
    params : iterable
        Parameters or param groups.
    lr : float or callable, default 1e-3
        Step size (``> 0``) or a schedule ``step -> lr``.
    num_data : int
        Training-set size ``N``.
    temperature : float or callable, default 1.0
        ``T >= 0``; ``T = 0`` gives ``torch.optim.RMSprop(lr, alpha=alpha, eps=eps)`` exactly.
    alpha : float, default 0.99
        Decay of the squared-gradient average ``V``, in ``[0, 1]`` (the paper's and torch's
        0.99). ``alpha = 1`` freezes ``V`` at its current value: a fixed preconditioner for a
        ``V`` loaded from a state dict (a fresh ``V`` is 0, giving ``G = 1 / eps``).
    eps : float, default 1e-8
        ``lambda``, the regulariser of ``G`` (``> 0``, gradient units). The default is torch's;
        the paper's ``lambda = 1e-5`` refers to gradients of the summed potential ``N L``,
        which is ``1e-5 / N`` here (``1e-8`` for ``N = 1000``).
    generator : torch.Generator, optional
        Randomness of this chain.

    Notes
    -----
    Sample statistics: ``preconditioner_mean`` and ``preconditioner_max`` of ``G``.
    State: ``state[p]["square_avg"]`` (``V``), as in ``torch.optim.RMSprop``.

    References
    ----------
    C. Li, C. Chen, D. Carlson, L. Carin. Preconditioned stochastic gradient Langevin dynamics
    for deep neural networks. AAAI 2016.
    """

    name = "psgld"

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Callable[[int], float] = 1e-3,
        *,
        num_data: int,
        temperature: float | Callable[[int], float] = 1.0,
        alpha: float = 0.99,
        eps: float = 1e-8,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(
            params,
            estimator=PlainGradient(),
            dynamics=PreconditionedLangevinDynamics(),
            lr=lr,
            num_data=num_data,
            temperature=temperature,
            generator=generator,
            alpha=alpha,
            eps=eps,
        )


class FPSGLD(Sampler):
    """Flatness-aware pSGLD: the fSGLD gradient with the pSGLD preconditioner.

    Update rule, in mean-loss units (elementwise products and quotients):

        eps_k ~ N(0, I) (or Rademacher),  k = 1..n  (and -eps_k with antithetic pairs)
        g     = mean_k grad L_B(theta + sigma * eps_k)
        V     <- alpha V + (1 - alpha) g * g
        G     =  1 / (eps + sqrt(V))
        theta <- theta - lr G g + sqrt(2 lr T / N * G) xi,   xi ~ N(0, I)

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
        ``torch.optim.RMSprop`` exactly.
    alpha, eps : float
        Preconditioner decay and regulariser, as for :class:`PSGLD`.
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
    Sample statistics: ``sigma``, ``preconditioner_mean``, ``preconditioner_max``.

    References
    ----------
    Bruno, Hwang, An, Sabanis, Lim. Flatness-aware stochastic gradient Langevin dynamics.
    arXiv:2510.02174 (ICML 2026). Li, Chen, Carlson, Carin. AAAI 2016.
    """

    name = "fpsgld"

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Callable[[int], float] = 1e-3,
        *,
        num_data: int,
        temperature: float | Callable[[int], float] = 1.0,
        alpha: float = 0.99,
        eps: float = 1e-8,
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
            dynamics=PreconditionedLangevinDynamics(),
            lr=lr,
            num_data=num_data,
            temperature=temperature,
            generator=generator,
            alpha=alpha,
            eps=eps,
            sigma=sigma,
            eta=eta,
        )
