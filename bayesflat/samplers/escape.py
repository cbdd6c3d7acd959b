"""Escaping sharp minima with random perturbations (Ahn, Jadbabaie, Sra; ICML 2024).

"How to escape sharp minima with random perturbations" measures flatness by ``tr H`` and
shows that a gradient taken at a randomly perturbed point, with its component along the
current gradient projected out, is a descent direction for the trace of the Hessian near a
stationary point:

    g = grad L_B(x)
    if ||g|| <= eps0:
        u ~ Unif(unit sphere)                              (randomly smoothed perturbation)
        v = P_g^perp grad L_B(x + rho * u),   P_g^perp = I - g g' / ||g||^2
        x <- x - lr * (g + v)
    else:
        x <- x - lr * g

``E_u[grad L(x + rho u)] = grad L(x) + rho^2 / (2 d) grad tr H(x) + O(rho^3)`` (``d`` the
dimension), so away from the gradient direction ``v`` carries the flatness drift; its
first-order part ``rho P_g^perp H u`` is zero-mean noise scaled by the curvature.

The sharpness-aware variant (the paper's Algorithm 2) perturbs along a gradient direction
with a random sign instead of a uniform direction, ``u = s * g / ||g||``, ``s = ±1``. The paper
uses the gradient of one training example; a bayesflat closure evaluates a minibatch, so the
direction here is that of the minibatch gradient ``grad L_B``, which near a minimum is
dominated by its sampling noise and so also lies in the span of the per-example gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from bayesflat.samplers.base import Closure, Sampler
from bayesflat.samplers.langevin import LangevinDynamics
from bayesflat.samplers.sam import SecondPassGradient, SecondPassOptimiser

__all__ = ["DIRECTIONS", "Escape", "EscapeSAM", "RandomlySmoothedPerturbation"]

DIRECTIONS = ("sphere", "gradient")


def _global_norm(tensors: list[Tensor]) -> float:
    if not tensors:
        return 0.0
    return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(tensors))))


class RandomlySmoothedPerturbation(SecondPassGradient):
    """``g + P_g^perp grad L_B(x + rho u)`` when ``||g|| <= eps0``, else ``g``.

    Per-group hyperparameters: ``rho`` (perturbation radius, parameter units) and ``perturb``
    (``False`` keeps the group at ``x`` in the second pass). The threshold and the projection
    use the whole gradient; the direction ``u`` is a unit vector in the perturbed parameters.

    Parameters
    ----------
    eps0 : float
        Gradient-norm threshold (mean-loss units per parameter unit), ``> 0``; ``inf`` perturbs
        at every step.
    direction : {"sphere", "gradient"}
        ``"sphere"``: ``u`` uniform on the unit sphere (randomly smoothed perturbation).
        ``"gradient"``: ``u = s g / ||g||`` with a random sign ``s`` (sharpness-aware
        perturbation).
    model : nn.Module, optional
        Module whose BatchNorm running statistics are frozen in the second pass.
    """

    name = "randomly_smoothed_perturbation"

    def __init__(
        self, eps0: float, direction: str = "sphere", model: nn.Module | None = None
    ) -> None:
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        if isinstance(eps0, bool) or not isinstance(eps0, int | float) or not eps0 > 0:
            raise ValueError(f"eps0 must be a number > 0 (inf perturbs every step), got {eps0!r}")
        super().__init__(model)
        self.eps0 = float(eps0)
        self.direction = direction
        self._applied = 0.0
        self._rho = 0.0
        self._v_norm = 0.0
        self._clean_norm = 0.0

    def estimate(self, sampler: Sampler, closure: Closure) -> Tensor:
        sampler.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = closure()
        self._applied, self._rho, self._v_norm = 0.0, 0.0, 0.0
        params = [p for g in sampler.param_groups for p in g["params"] if p.grad is not None]
        grads = [p.grad for p in params]
        g_norm = _global_norm(grads)
        self._clean_norm = g_norm
        active = [
            ([p for p in group["params"] if p.grad is not None], float(group["rho"]))
            for group in sampler.param_groups
            if group["perturb"] and group["rho"] > 0
        ]
        active = [(plist, rho) for plist, rho in active if plist]
        if not active or g_norm > self.eps0:
            return loss
        saved = sampler.buffer("escape_grad")
        torch._foreach_copy_(saved.of(params), grads)
        if self.direction == "sphere":
            noise = sampler.buffer("noise")
            noise.normal_(sampler.generator)
            directions = [noise.of(plist) for plist, _ in active]
            sign = 1.0
        else:
            directions = [saved.of(plist) for plist, _ in active]
            gen = sampler.generator
            device = gen.device if gen is not None else torch.device("cpu")
            sign = 2.0 * float(torch.randint(2, (1,), generator=gen, device=device)) - 1.0
        u_norm = _global_norm([t for views in directions for t in views])
        if u_norm == 0.0:
            return loss
        moved = [p for plist, _ in active for p in plist]
        backup = sampler.buffer("backup").of(moved)
        torch._foreach_copy_(backup, moved)
        for (plist, rho), views in zip(active, directions, strict=True):
            torch._foreach_add_(plist, views, alpha=sign * rho / u_norm)
        # The clean gradient lives on in ``saved``; releasing it lets the second backward reuse
        # its memory.
        del grads
        sampler.zero_grad(set_to_none=True)
        with self.away_from_theta(), torch.enable_grad():
            closure()
        torch._foreach_copy_(moved, backup)
        h = [p.grad for p in params]
        if g_norm > 0:
            # <h, g> summed in float64 over one flat buffer: the projection is exact to rounding.
            work = sampler.buffer("escape_work")
            for chunk in work.chunks:
                chunk.zero_()
            products = work.of(params)
            torch._foreach_copy_(products, h)
            torch._foreach_mul_(products, saved.of(params))
            dot = sum(float(chunk.sum(dtype=torch.float64)) for chunk in work.chunks)
            torch._foreach_add_(h, saved.of(params), alpha=-dot / g_norm**2)
        self._v_norm = _global_norm(h)
        torch._foreach_add_(h, saved.of(params))
        self._applied = 1.0
        self._rho = active[0][1]
        return loss

    def stats(self, sampler: Sampler) -> dict[str, float]:
        """``perturbed``: 1 if the last step added ``v``, else 0; ``sigma``: its radius ``rho``
        (0 when not perturbed); ``perturbation_norm``: ``||v||``; ``clean_grad_norm``:
        ``||g||``, the norm compared with ``eps0``."""
        return {
            "sigma": self._rho,
            "perturbed": self._applied,
            "perturbation_norm": self._v_norm,
            "clean_grad_norm": self._clean_norm,
        }

    def config(self) -> dict[str, Any]:
        return {"estimator": self.name, "eps0": self.eps0, "direction": self.direction}


class Escape(SecondPassOptimiser):
    """Randomly smoothed perturbation (Ahn, Jadbabaie, Sra; ICML 2024, Algorithm 1).

    Update rule, in mean-loss units (a second forward/backward pass only when perturbing):

        g = grad L_B(x)
        if ||g|| <= eps0:
            u ~ Unif(S^{d-1});   v = (I - g g' / ||g||^2) grad L_B(x + rho u)
            x <- x - lr * (g + v) + sqrt(2 lr T / N) xi
        else:
            x <- x - lr * g + sqrt(2 lr T / N) xi

    Parameters
    ----------
    params : iterable
        Parameters or param groups; ``"perturb": False`` keeps a group unperturbed.
    lr : float or callable, default 1e-3
        Step size (``> 0``) or a schedule.
    num_data : int
        Training-set size ``N``.
    temperature : float or callable, default 0.0
        ``T >= 0``; ``T = 0`` is the optimiser of the paper.
    rho : float or callable, default 0.05
        Perturbation radius in parameter units; ``0`` gives ``torch.optim.SGD`` exactly.
    eps0 : float, default inf
        Gradient-norm threshold below which the perturbation is added. The default perturbs at
        every step; a finite value restricts it to approximately stationary points, as in the
        paper's analysis.
    direction : {"sphere", "gradient"}, default "sphere"
        ``"gradient"`` is the sharpness-aware variant (also registered as ``"escape_sam"``).
    model : nn.Module, optional
        Module whose BatchNorm running statistics are frozen in the second pass (set by the
        driver for each chain).
    generator : torch.Generator, optional
        Randomness of this chain.

    Notes
    -----
    Stats: ``perturbed`` (1 when ``v`` was added), ``perturbation_norm`` (``||v||``),
    ``clean_grad_norm`` (``||g||``); ``grad_norm`` is the norm of ``g + v``.

    References
    ----------
    K. Ahn, A. Jadbabaie, S. Sra. How to escape sharp minima with random perturbations.
    ICML 2024 (PMLR 235:597-618).
    """

    name = "escape"

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Callable[[int], float] = 1e-3,
        *,
        num_data: int,
        temperature: float | Callable[[int], float] = 0.0,
        rho: float | Callable[[int], float] = 0.05,
        eps0: float = math.inf,
        direction: str = "sphere",
        model: nn.Module | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(
            params,
            estimator=RandomlySmoothedPerturbation(eps0, direction, model),
            dynamics=LangevinDynamics(),
            lr=lr,
            num_data=num_data,
            temperature=temperature,
            generator=generator,
            rho=rho,
        )


class EscapeSAM(Escape):
    """Sharpness-aware perturbation (Ahn, Jadbabaie, Sra; ICML 2024, Algorithm 2).

    As :class:`Escape` with the perturbation along the gradient with a random sign:

        g = grad L_B(x)
        if ||g|| <= eps0:
            s ~ Unif{-1, +1};   v = (I - g g' / ||g||^2) grad L_B(x + rho s g / ||g||)
            x <- x - lr * (g + v) + sqrt(2 lr T / N) xi
        else:
            x <- x - lr * g + sqrt(2 lr T / N) xi

    The paper's direction is the gradient of one training example; here it is the minibatch
    gradient of the closure. Parameters are those of :class:`Escape` without ``direction``.
    """

    name = "escape_sam"

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Callable[[int], float] = 1e-3,
        *,
        num_data: int,
        temperature: float | Callable[[int], float] = 0.0,
        rho: float | Callable[[int], float] = 0.05,
        eps0: float = math.inf,
        model: nn.Module | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(
            params,
            lr,
            num_data=num_data,
            temperature=temperature,
            rho=rho,
            eps0=eps0,
            direction="gradient",
            model=model,
            generator=generator,
        )
