"""Sharpness-aware minimisation (SAM) as a gradient estimator composed with T = 0 Langevin.

Foret, Kleiner, Mobahi, Neyshabur, "Sharpness-aware minimization for efficiently improving
generalization", ICLR 2021. SAM minimises ``max_{||e|| <= rho} L(theta + e)``; to first order
the maximiser is ``e = rho g / ||g||`` and the update takes the gradient there:

    g     = grad L_B(theta)                          (first pass)
    e     = rho * g / ||g||                          (global Euclidean norm)
    g_SAM = grad L_B(theta + e)                      (second pass, same minibatch)
    theta <- theta - lr * g_SAM                      (+ sqrt(2 lr T / N) xi when T > 0)

BatchNorm running statistics are updated by the first pass only: the second pass runs inside
:meth:`~bayesflat.samplers.base.GradientEstimator.away_from_theta`, as every pass away from
``theta`` of every estimator does, so the watched model's BatchNorm layers stop tracking them
(their forward pass is otherwise unchanged: they normalise with the batch statistics). The
weights are restored exactly after the second pass (copied back from a backup buffer).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from bayesflat._checks import check_positive
from bayesflat.samplers.base import (
    Closure,
    GradientEstimator,
    Sampler,
    batchnorm_layers,
    frozen_batchnorm,
)
from bayesflat.samplers.langevin import LangevinDynamics

__all__ = [
    "SAM",
    "SecondPassGradient",
    "SecondPassOptimiser",
    "SharpnessAwareGradient",
    "batchnorm_layers",
    "frozen_batchnorm",
]


class SecondPassGradient(GradientEstimator):
    """Base of the estimators that take a second gradient at ``theta`` moved by ``rho``.

    Holds the per-group radius ``rho`` (checked ``>= 0``) and the BatchNorm layers whose
    running statistics the second pass must leave alone (:meth:`away_from_theta`).
    """

    defaults: dict[str, Any] = {"rho": 0.05, "perturb": True}
    moves_weights = True

    def __init__(self, model: nn.Module | None = None) -> None:
        self.watch(model)

    def validate(self, group: dict[str, Any]) -> None:
        """Check ``rho >= 0``."""
        group["rho"] = check_positive(group["rho"], "rho", allow_zero=True)


class SecondPassOptimiser(Sampler):
    """A sampler whose estimator is a :class:`SecondPassGradient`."""

    estimator: SecondPassGradient


class SharpnessAwareGradient(SecondPassGradient):
    """The SAM gradient ``grad L_B(theta + rho g / ||g||)``, ``g = grad L_B(theta)``.

    Per-group hyperparameters: ``rho`` (ascent radius, parameter units; ``0`` gives the plain
    gradient with a single pass) and ``perturb`` (``False`` keeps the group at ``theta`` in the
    second pass; its gradient is still taken there). ``||g||`` is the norm over all perturbed
    parameters.

    Parameters
    ----------
    model : nn.Module, optional
        Module whose BatchNorm layers stop tracking running statistics in the second pass. The
        driver sets it for every chain (see :meth:`watch`).
    """

    name = "sharpness_aware"

    def __init__(self, model: nn.Module | None = None) -> None:
        super().__init__(model)
        self._radius = 0.0
        self._sharpness = 0.0

    def estimate(self, sampler: Sampler, closure: Closure) -> Tensor:
        sampler.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = closure()
        self._radius, self._sharpness = 0.0, 0.0
        active = []
        for group in sampler.param_groups:
            if group["perturb"] and group["rho"] > 0:
                params, grads = sampler.grads_of(group)
                if params:
                    active.append((params, grads, float(group["rho"])))
        if not active:
            return loss
        group_norms = [
            torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
            for _, grads, _ in active
        ]
        grad_norm = float(torch.linalg.vector_norm(torch.stack(group_norms)))
        if grad_norm == 0.0:
            return loss
        params = [p for plist, _, _ in active for p in plist]
        backup = sampler.buffer("backup").of(params)
        torch._foreach_copy_(backup, params)
        for plist, grads, rho in active:
            torch._foreach_add_(plist, grads, alpha=rho / grad_norm)
        # Drop every reference to the first-pass gradients so the second backward can reuse
        # their memory: the step then peaks at SGD's footprint.
        rhos = [rho for _, _, rho in active]
        del active, grads
        sampler.zero_grad(set_to_none=True)
        with self.away_from_theta(), torch.enable_grad():
            perturbed = closure()
        torch._foreach_copy_(params, backup)
        ascent_sq = sum((rho * float(n)) ** 2 for rho, n in zip(rhos, group_norms, strict=True))
        self._radius = math.sqrt(ascent_sq) / grad_norm
        self._sharpness = float(perturbed) - float(loss)
        return loss

    def stats(self, sampler: Sampler) -> dict[str, float]:
        """``sigma`` and ``ascent_radius``: ``||e||`` of the last step (0 when no ascent was
        taken); ``sharpness``: ``L_B(theta + e) - L_B(theta)``, the second-pass potential minus
        the first-pass one (``lp``)."""
        return {
            "sigma": self._radius,
            "ascent_radius": self._radius,
            "sharpness": self._sharpness,
        }


class SAM(SecondPassOptimiser):
    """Sharpness-aware minimisation (Foret, Kleiner, Mobahi, Neyshabur; ICLR 2021).

    Update rule, in mean-loss units (two forward/backward passes on the same minibatch):

        g     = grad L_B(theta)
        e     = rho * g / ||g||                       (global norm over perturbed parameters)
        theta <- theta - lr * grad L_B(theta + e) + sqrt(2 * lr * T / N) * xi

    ``lp`` is the first-pass potential ``L_B(theta)``; ``ascent_radius`` is ``||e||`` and
    ``sharpness`` is ``L_B(theta + e) - L_B(theta)``.

    Parameters
    ----------
    params : iterable
        Parameters or param groups; a group with ``"perturb": False`` is not moved by ``e``.
    lr : float or callable, default 1e-3
        Step size (``> 0``) or a schedule ``step -> lr``.
    num_data : int
        Training-set size ``N``.
    temperature : float or callable, default 0.0
        ``T >= 0``. ``T = 0`` is SAM with plain SGD as its base optimiser; ``T > 0`` adds
        Langevin noise.
    rho : float or callable, default 0.05
        Ascent radius in parameter units (the paper's default); ``0`` gives ``torch.optim.SGD``
        exactly, with one pass per step.
    model : nn.Module, optional
        Module whose BatchNorm running statistics are frozen in the second pass (set by the
        driver for each chain).
    generator : torch.Generator, optional
        Source of the Langevin noise when ``T > 0``.

    References
    ----------
    P. Foret, A. Kleiner, H. Mobahi, B. Neyshabur. Sharpness-aware minimization for efficiently
    improving generalization. ICLR 2021.
    """

    name = "sam"

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Callable[[int], float] = 1e-3,
        *,
        num_data: int,
        temperature: float | Callable[[int], float] = 0.0,
        rho: float | Callable[[int], float] = 0.05,
        model: nn.Module | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(
            params,
            estimator=SharpnessAwareGradient(model),
            dynamics=LangevinDynamics(),
            lr=lr,
            num_data=num_data,
            temperature=temperature,
            generator=generator,
            rho=rho,
        )
