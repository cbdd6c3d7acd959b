"""Gradients taken at randomly perturbed weights (fSGLD, random weight perturbation, NSO).

The estimator evaluates the closure at ``theta + s * sigma * eps_k`` for draws
``eps_k ~ N(0, I)`` (or Rademacher), ``s = +1`` (and ``s = -1`` for antithetic pairs),
and averages the gradients:

    g = (1 / (n * |S|)) * sum_k sum_{s in S} grad L_B(theta + s * sigma * eps_k).

``E[g] = grad E_eps[L_B(theta + sigma eps)]``, the gradient of the randomly smoothed
potential. The parameters are restored *exactly* afterwards: they are copied to a backup
buffer before the first perturbation and copied back, never subtracted.

Memory: one backup buffer the size of the parameters; the perturbation is drawn into the
same buffer the Langevin noise uses.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from bayesflat.samplers.base import Closure, GradientEstimator, Sampler

__all__ = ["PERTURBATIONS", "PerturbedGradient", "exclude_from_perturbation"]

PERTURBATIONS = ("gaussian", "rademacher")

_NORM_TYPES = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.modules.instancenorm._InstanceNorm,
)


def exclude_from_perturbation(model: nn.Module, *, biases: bool = False) -> list[dict[str, Any]]:
    """Param groups that leave normalisation layers (and optionally biases) unperturbed.

    Returns ``[{"params": perturbed}, {"params": kept, "perturb": False}]`` (the second
    group omitted when empty), ready to pass to any bayesflat sampler. Unperturbed parameters
    still receive the gradient and the dynamics' noise; only the smoothing skips them.
    """
    kept: list[nn.Parameter] = []
    for module in model.modules():
        if isinstance(module, _NORM_TYPES):
            kept.extend(p for p in module.parameters(recurse=False) if p.requires_grad)
    if biases:
        kept.extend(p for n, p in model.named_parameters() if n.endswith("bias"))
    kept_ids = {id(p) for p in kept}
    perturbed = [p for p in model.parameters() if p.requires_grad and id(p) not in kept_ids]
    unique_kept = list({id(p): p for p in kept}.values())
    groups: list[dict[str, Any]] = [{"params": perturbed}]
    if unique_kept:
        groups.append({"params": unique_kept, "perturb": False})
    return groups


class PerturbedGradient(GradientEstimator):
    """Average gradient at randomly perturbed weights.

    Parameters
    ----------
    num_perturbations : int, default 1
        Number ``n`` of perturbation draws per step.
    antithetic : bool, default False
        Also evaluate at ``theta - sigma eps_k`` (``2 n`` evaluations). On a quadratic the
        first-order noise cancels exactly.
    perturbation : {"gaussian", "rademacher"}
        Distribution of ``eps`` (both have zero mean and identity covariance).

    Notes
    -----
    Per-group hyperparameters: ``sigma`` (the scale; see :meth:`resolve_sigma`) and
    ``perturb`` (``False`` leaves the group unperturbed).
    """

    name = "perturbed"
    defaults: dict[str, Any] = {"sigma": 0.0, "perturb": True}

    def __init__(
        self,
        num_perturbations: int = 1,
        antithetic: bool = False,
        perturbation: str = "gaussian",
    ) -> None:
        if isinstance(num_perturbations, bool) or not isinstance(num_perturbations, int):
            raise ValueError(
                f"num_perturbations must be a positive integer, got {num_perturbations!r}"
            )
        if num_perturbations < 1:
            raise ValueError(f"num_perturbations must be >= 1, got {num_perturbations!r}")
        if perturbation not in PERTURBATIONS:
            raise ValueError(f"perturbation must be one of {PERTURBATIONS}, got {perturbation!r}")
        self.num_perturbations = num_perturbations
        self.antithetic = bool(antithetic)
        self.perturbation = perturbation
        self._sigma = 0.0

    def resolve_sigma(self, group: dict[str, Any]) -> float:
        """Perturbation scale of ``group`` (parameter units); 0 disables the perturbation."""
        return float(group["sigma"])

    def estimate(self, sampler: Sampler, closure: Closure) -> Tensor:
        sampler.zero_grad(set_to_none=True)
        active = []
        for group in sampler.param_groups:
            sigma = self.resolve_sigma(group) if group["perturb"] else 0.0
            if sigma > 0 and group["params"]:
                active.append((list(group["params"]), sigma))
        self._sigma = active[0][1] if active else 0.0
        if not active:
            with torch.enable_grad():
                return closure()

        params = [p for plist, _ in active for p in plist]
        backup = sampler.buffer("backup").of(params)
        noise = sampler.buffer("noise")
        torch._foreach_copy_(backup, params)
        signs = (1.0, -1.0) if self.antithetic else (1.0,)
        losses = []
        for _ in range(self.num_perturbations):
            if self.perturbation == "gaussian":
                noise.normal_(sampler.generator)
            else:
                noise.rademacher_(sampler.generator)
            for sign in signs:
                if losses:
                    torch._foreach_copy_(params, backup)
                for plist, sigma in active:
                    torch._foreach_add_(plist, noise.of(plist), alpha=sign * sigma)
                with torch.enable_grad():
                    losses.append(closure())
        torch._foreach_copy_(params, backup)
        if len(losses) > 1:
            torch._foreach_mul_(sampler.gradients(), 1.0 / len(losses))
            return torch.stack(losses).mean()
        return losses[0]

    def stats(self, sampler: Sampler) -> dict[str, float]:
        """``sigma``: the perturbation scale used in the last step (first perturbed group)."""
        return {"sigma": self._sigma}

    def config(self) -> dict[str, Any]:
        return {
            "estimator": self.name,
            "num_perturbations": self.num_perturbations,
            "antithetic": self.antithetic,
            "perturbation": self.perturbation,
        }
