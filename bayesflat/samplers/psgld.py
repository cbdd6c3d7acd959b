"""Preconditioned SGLD (pSGLD) and its flatness-aware variant.

Li, Chen, Carlson, Carin, "Preconditioned stochastic gradient Langevin dynamics for deep
neural networks", AAAI 2016. An RMSprop preconditioner rescales both the drift and the noise,
in mean-loss units (elementwise operations):

    V     <- alpha V + (1 - alpha) g * g
    G     =  1 / (lambda + sqrt(V))
    theta <- theta - lr G g + sqrt(2 lr T / N * G) xi,      xi ~ N(0, I).

Two ways to run it (``preconditioner=``):

- ``"frozen"`` (default): ``V`` is estimated during the first ``adapt_steps`` steps (the
  first half of the burn-in unless given) and then held fixed; the rest of the burn-in lets
  the chain settle under the fixed mass, since its state at the freeze still carries the
  adaptive phase's bias (on digits, draws taken straight after a freeze at the end of the
  burn-in gave 1.12 for the prior-only ``E[theta^2]`` below, against 1.01 with the settling
  half). With a constant ``G`` the chain is
  Langevin dynamics with a constant diagonal mass: the paper's correction term
  ``Gamma(theta) = sum_j d G_ij / d theta_j`` is exactly zero, and the stationary law is
  ``exp(-N L / T)`` up to the ``O(lr)`` discretisation error every Langevin chain has.
- ``"adaptive"``: ``V`` follows the gradients at every step and ``Gamma`` is dropped, as in
  the paper's experiments. The law it samples is *not* ``exp(-N L / T)``: ``G`` is correlated
  with the current position and ``Gamma`` is missing, a bias on top of the step-size error,
  and far larger than ``1 - alpha``. Measured on the
  random 3-d Gaussian of ``tests/test_psgld.py`` (20,000 chains, SE 0.01): the variances come
  out 1.12-1.16x the posterior's at ``alpha = 0.99`` and 1.49-1.59x at ``alpha = 0.9``, where
  the frozen form at the same step gives 1.03-1.05x (its exact discrete law); a coordinate
  whose only force is the prior ``N(0, s^2)`` gets ``E[theta^2]`` 1.20x ``T s^2`` (1.68x at
  0.9), the frozen form 1.00x. On the digits MLP (prior ``N(0, 1)``, ``lr = 3e-3``, 2 chains,
  burn-in 3000, 100 draws thinned by 20), the 512 first-layer weights on always-zero pixels,
  whose posterior is the prior: ``E[theta^2]`` = 1.57 +- 0.03 adaptive, 1.01 +- 0.02 frozen.

The average never starts from zero: its first value is the first squared gradient (entries
where that is exactly 0 take the tensor's mean squared gradient). An average started at 0
gives ``G = 1 / lambda`` on the first step, a noise kick of ``sqrt(2 lr T / (N lambda))``
(thousands of parameter units at ``lambda = 1e-8``), from which a chain does not recover.

With ``T = 0`` no noise is drawn and the step is ``torch.optim.RMSprop(lr, alpha,
eps=lambda)`` with its average started at the first squared gradient, to the last bit (and
``alpha = 1`` from step ``adapt_steps`` on in the frozen mode).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from bayesflat._checks import check_choice, check_int, check_positive
from bayesflat.samplers.base import Dynamics, PlainGradient, Sampler
from bayesflat.samplers.fsgld import CoupledPerturbation
from bayesflat.samplers.langevin import langevin_noise_scale

__all__ = [
    "FPSGLD",
    "PRECONDITIONERS",
    "PSGLD",
    "PreconditionedLangevinDynamics",
    "first_square_avg",
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


PRECONDITIONERS = ("frozen", "adaptive")


def first_square_avg(grad: Tensor) -> Tensor:
    """Starting value of ``V`` for one tensor: ``g * g``, with exact zeros set to its mean.

    A zero entry would give ``G = 1 / lambda`` (see the module docstring); the tensor's mean
    squared gradient is the scale it is given instead.
    """
    square = grad * grad
    return torch.where(square > 0, square, square.mean())


class PreconditionedLangevinDynamics(Dynamics):
    """RMSprop-preconditioned Langevin move.

    Per-group hyperparameters: ``alpha`` (decay of ``V``), ``eps`` (``lambda``),
    ``preconditioner`` (``"frozen"`` or ``"adaptive"``) and ``adapt_steps`` (steps during which
    a frozen preconditioner is still estimated; ``None`` until bound to the run's burn-in).
    ``V`` is kept as ``state[p]["square_avg"]`` (the name ``torch.optim.RMSprop`` uses), so a
    checkpoint holds it; whether it is frozen follows from the group's ``step`` and
    ``adapt_steps``, which the checkpoint holds too. One batched normal draw per step; the
    preconditioner is formed in a flat workspace.
    """

    name = "preconditioned_langevin"
    defaults: dict[str, Any] = {
        "alpha": 0.99,
        "eps": 1e-8,
        "preconditioner": "frozen",
        "adapt_steps": None,
    }

    def validate(self, group: dict[str, Any]) -> None:
        """Check ``0 <= alpha <= 1``, ``eps > 0``, the mode and ``adapt_steps >= 1``."""
        alpha = group["alpha"]
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 <= alpha <= 1:
            raise ValueError(f"alpha must lie in [0, 1] (the decay of V), got {alpha!r}")
        group["alpha"] = float(alpha)
        group["eps"] = check_positive(group["eps"], "eps")
        check_choice(group["preconditioner"], "preconditioner", PRECONDITIONERS)
        if group["adapt_steps"] is not None:
            group["adapt_steps"] = check_int(group["adapt_steps"], "adapt_steps", 1)

    def bind_schedule(self, sampler: Sampler, burn_in: int, draws: int, thin: int) -> None:
        """A frozen preconditioner with ``adapt_steps=None`` is estimated during the first half
        of the burn-in (at least one step); the second half lets the chain settle under it.
        """
        for group in sampler.param_groups:
            if group["preconditioner"] != "frozen" or group["adapt_steps"] is not None:
                continue
            if burn_in < 1:
                raise ValueError(
                    "a frozen preconditioner is estimated during the burn-in, and burn_in is 0; "
                    "give burn_in >= 1, an explicit adapt_steps, or preconditioner='adaptive'"
                )
            group["adapt_steps"] = max(1, burn_in // 2)

    @staticmethod
    def adapting(group: dict[str, Any]) -> bool:
        """Whether this step still updates ``V`` (always, in the adaptive mode)."""
        if group["preconditioner"] == "adaptive":
            return True
        if group["adapt_steps"] is None:
            raise ValueError(
                "the frozen preconditioner needs adapt_steps (the number of burn-in steps that "
                "estimate it); pass adapt_steps=..., run through bayesflat.sample (which sets "
                "it to burn_in), or pass preconditioner='adaptive'"
            )
        return group["step"] < group["adapt_steps"]

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
            adapting = self.adapting(group)
            square_avgs = []
            for p, g in zip(params, grads, strict=True):
                state = sampler.state[p]
                if "square_avg" not in state:
                    state["square_avg"] = first_square_avg(g)
                square_avgs.append(state["square_avg"])
            if adapting:
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
        of ``lr``; ``G`` has the units of inverse gradient). ``preconditioner_frozen`` is 1 when
        the last step moved with the frozen ``V`` (first param group), else 0.
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
        group = sampler.param_groups[0]
        frozen = group["preconditioner"] == "frozen" and group["adapt_steps"] is not None
        out = {"preconditioner_frozen": float(frozen and group["step"] > group["adapt_steps"])}
        if count == 0:
            return {"preconditioner_mean": math.nan, "preconditioner_max": math.nan, **out}
        return {"preconditioner_mean": total / count, "preconditioner_max": largest, **out}


class PSGLD(Sampler):
    """Preconditioned SGLD (Li, Chen, Carlson, Carin, AAAI 2016).

    Update rule, in mean-loss units (elementwise products and quotients):

        g     = grad L_B(theta)
        V     <- alpha V + (1 - alpha) g * g
        G     =  1 / (eps + sqrt(V))
        theta <- theta - lr G g + sqrt(2 lr T / N * G) xi,   xi ~ N(0, I)

    By default ``V`` is updated only during the first ``adapt_steps`` steps and frozen after:
    the sampling phase is Langevin dynamics with the constant diagonal mass ``G``, whose law is
    ``exp(-N L / T)`` up to the usual ``O(lr)`` error. ``preconditioner="adaptive"`` keeps
    updating ``V`` and drops the paper's correction ``Gamma(theta)``; that chain carries a bias
    of its own (variances 1.12-1.16x too large on a Gaussian at ``alpha = 0.99``;
    see the module docstring).

    Parameters
    ----------
    params : iterable
        Parameters or param groups.
    lr : float or callable, default 1e-3
        Step size (``> 0``) or a schedule ``step -> lr``. The drift ``lr G g`` moves each
        coordinate by about ``lr`` a step whatever its gradient scale, so ``lr`` is an
        absolute parameter step: ``1e-3``-``3e-3`` suits the digits MLP, and at ``0.1`` a frozen
        preconditioner diverges there within a few dozen steps of the freeze (a constant mass
        has a stability limit ``lr G lambda < 2``; the adaptive form escapes it by growing
        ``V``, which is where its bias comes from).
    num_data : int
        Training-set size ``N``.
    temperature : float or callable, default 1.0
        ``T >= 0``; ``T = 0`` gives ``torch.optim.RMSprop(lr, alpha=alpha, eps=eps)`` exactly.
    alpha : float, default 0.99
        Decay of the squared-gradient average ``V``, in ``[0, 1]`` (the paper's and torch's
        0.99). ``V`` starts at the first squared gradient, never at 0.
    eps : float, default 1e-8
        ``lambda``, the regulariser of ``G`` (``> 0``, gradient units). The default is torch's;
        the paper's ``lambda = 1e-5`` refers to gradients of the summed potential ``N L``,
        which is ``1e-5 / N`` here (``1e-8`` for ``N = 1000``).
    preconditioner : {"frozen", "adaptive"}, default "frozen"
        Freeze ``V`` after ``adapt_steps`` steps (exact constant-mass Langevin afterwards), or
        keep adapting it at every step (the paper's form, biased).
    adapt_steps : int, optional
        Steps (from the first, ``>= 1``) that estimate a frozen ``V``. ``None`` takes half
        the burn-in of the run (:func:`bayesflat.sample` binds it); a sampler stepped by hand
        needs it given. Draws kept before step ``adapt_steps`` come from a moving ``V``.
    generator : torch.Generator, optional
        Randomness of this chain.

    Notes
    -----
    Sample statistics: ``preconditioner_mean`` and ``preconditioner_max`` of ``G``,
    ``preconditioner_frozen`` (1 once ``V`` is fixed).
    State: ``state[p]["square_avg"]`` (``V``), as in ``torch.optim.RMSprop``; the group's
    ``step`` and ``adapt_steps`` (in ``state_dict()["param_groups"]``) say whether it is
    frozen, so a checkpoint resumes in the right phase.

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
        preconditioner: str = "frozen",
        adapt_steps: int | None = None,
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
            preconditioner=preconditioner,
            adapt_steps=adapt_steps,
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
    preconditioner, adapt_steps
        Frozen after the burn-in (default) or adaptive, as for :class:`PSGLD`.
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
    Sample statistics: ``sigma``, ``preconditioner_mean``, ``preconditioner_max``,
    ``preconditioner_frozen``.

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
        preconditioner: str = "frozen",
        adapt_steps: int | None = None,
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
            preconditioner=preconditioner,
            adapt_steps=adapt_steps,
            sigma=sigma,
            eta=eta,
        )
