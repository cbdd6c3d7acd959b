"""Gradients taken at randomly perturbed weights (fSGLD, random weight perturbation, NSO).

The estimator evaluates the closure at ``theta + s * sigma * eps_k`` for draws
``eps_k ~ N(0, I)`` (or Rademacher), ``s = +1`` (and ``s = -1`` for antithetic pairs),
and averages the gradients:

    g = (1 / (n * |S|)) * sum_k sum_{s in S} grad L_B(theta + s * sigma * eps_k).

``E[g] = grad E_eps[L_B(theta + sigma eps)]``, the gradient of the randomly smoothed
potential. The parameters are restored *exactly* afterwards: they are copied to a backup
buffer before the first perturbation and copied back, never subtracted.

Two options serve the random-weight-perturbation optimisers:

- ``clean_weight = w`` mixes in the gradient at the unperturbed weights,
  ``g_w = w * grad L_B(theta) + (1 - w) * g`` (one more evaluation per step);
- ``filter_normalised = True`` scales the noise of every filter by its norm (LPF-SGD, Bisla et al.,
  AISTATS 2022): for a weight ``W`` of shape ``(n_out, ...)`` the slice ``W_i`` is perturbed
  by ``sigma * ||W_i|| * eps_i``; a one-dimensional tensor (bias, normalisation scale) is one
  filter, ``sigma * ||W|| * eps``.

BatchNorm: every evaluation at perturbed weights runs inside
:meth:`~bayesflat.samplers.base.GradientEstimator.away_from_theta`, so the running statistics
of the watched model are left alone (only the ``clean_weight`` pass, at ``theta``, updates
them, once per step); the run engine recomputes them at every kept draw.

Memory: one backup buffer the size of the parameters; the perturbation is drawn into the
same buffer the Langevin noise uses; ``filter_normalised`` adds one more parameter-sized buffer.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from bayesflat._checks import check_positive
from bayesflat.samplers.base import (
    Closure,
    FlatBuffer,
    GradientEstimator,
    Sampler,
)

__all__ = [
    "PERTURBATIONS",
    "PerturbedGradient",
    "ScaleWarning",
    "exclude_from_perturbation",
    "sigma_above_prior",
]

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


def _filter_index(buf: FlatBuffer) -> list[tuple[Tensor, int]]:
    """Per chunk of ``buf``: the filter id of every element and the number of filters.

    A tensor of two or more dimensions has one filter per slice along its first dimension;
    any other tensor is a single filter. Ids are contiguous within a chunk, so per-filter sums
    over the whole buffer are one ``index_add_`` per chunk.
    """
    out = []
    for chunk in buf.chunks:
        ids = torch.zeros(chunk.numel(), dtype=torch.long, device=chunk.device)
        base, size, count = chunk.data_ptr(), chunk.element_size(), 0
        for p in buf.params:
            view = buf.views[id(p)]
            if view.numel() == 0 or (view.device, view.dtype) != (chunk.device, chunk.dtype):
                continue
            start = (view.data_ptr() - base) // size
            rows = p.shape[0] if p.dim() >= 2 else 1
            filters = torch.arange(count, count + rows, device=chunk.device)
            ids[start : start + p.numel()] = filters.repeat_interleave(p.numel() // rows)
            count += rows
        out.append((ids, count))
    return out


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
    clean_weight : float, default 0.0
        Weight ``w`` in ``[0, 1)`` of the gradient at the unperturbed weights:
        ``g_w = w grad L_B(theta) + (1 - w) g``. ``w > 0`` costs one more evaluation and the
        returned potential is the same mixture of the evaluated potentials.
    filter_normalised : bool, default False
        ``False``: the perturbation is ``sigma * eps`` in parameter units. ``True``: every
        filter ``W_i`` is perturbed by ``sigma * ||W_i|| * eps_i`` (norms taken at the current
        weights, once per step), so ``sigma`` is a relative scale.

    Notes
    -----
    Per-group hyperparameters: ``sigma`` (the scale; see :meth:`resolve_sigma`) and
    ``perturb`` (``False`` leaves the group unperturbed).
    """

    name = "perturbed"
    defaults: dict[str, Any] = {"sigma": 0.0, "perturb": True}
    moves_weights = True

    def __init__(
        self,
        num_perturbations: int = 1,
        antithetic: bool = False,
        perturbation: str = "gaussian",
        *,
        clean_weight: float = 0.0,
        filter_normalised: bool = False,
    ) -> None:
        if isinstance(num_perturbations, bool) or not isinstance(num_perturbations, int):
            raise ValueError(
                f"num_perturbations must be a positive integer, got {num_perturbations!r}"
            )
        if num_perturbations < 1:
            raise ValueError(f"num_perturbations must be >= 1, got {num_perturbations!r}")
        if perturbation not in PERTURBATIONS:
            raise ValueError(f"perturbation must be one of {PERTURBATIONS}, got {perturbation!r}")
        if not isinstance(filter_normalised, bool):
            raise ValueError(f"filter_normalised must be True or False, got {filter_normalised!r}")
        if (
            isinstance(clean_weight, bool)
            or not isinstance(clean_weight, int | float)
            or not 0 <= clean_weight < 1
        ):
            raise ValueError(f"clean_weight must be a number in [0, 1), got {clean_weight!r}")
        self.num_perturbations = num_perturbations
        self.antithetic = bool(antithetic)
        self.perturbation = perturbation
        self.clean_weight = float(clean_weight)
        self.filter_normalised = filter_normalised
        self._sigma = 0.0
        self._filters: tuple[FlatBuffer, list[tuple[Tensor, int]]] | None = None

    def validate(self, group: dict[str, Any]) -> None:
        """Check ``sigma >= 0``."""
        group["sigma"] = check_positive(group["sigma"], "sigma", allow_zero=True)

    def resolve_sigma(self, group: dict[str, Any]) -> float:
        """Perturbation scale of ``group`` (parameter units); 0 disables the perturbation."""
        return float(group["sigma"])

    def _filter_scales(self, sampler: Sampler, params: list[Tensor]) -> list[Tensor]:
        """``||W_i||`` on every element of filter ``i``, as views matching ``params``."""
        buf = sampler.buffer("filter_scale")
        if self._filters is None or self._filters[0] is not buf:
            for chunk in buf.chunks:
                chunk.zero_()  # slots of unperturbed groups stay finite
            self._filters = (buf, _filter_index(buf))
        views = buf.of(params)
        torch._foreach_copy_(views, params)
        for chunk, (ids, count) in zip(buf.chunks, self._filters[1], strict=True):
            sq = torch.zeros(count, dtype=chunk.dtype, device=chunk.device)
            norms = sq.index_add_(0, ids, chunk * chunk).sqrt_()
            torch.index_select(norms, 0, ids, out=chunk)
        return views

    def estimate(self, sampler: Sampler, closure: Closure) -> Tensor:
        sampler.zero_grad(set_to_none=True)
        active = []
        for group in sampler.param_groups:
            if group["perturb"] and group["params"]:
                sigma = self.resolve_sigma(group)
                if sigma > 0:
                    active.append((group, sigma))
        self._sigma = active[0][1] if active else 0.0
        if not active:
            with torch.enable_grad():
                return closure()

        noise = sampler.buffer("noise")
        backup_buf = sampler.buffer("backup")
        if len(active) == 1:
            params = active[0][0]["params"]
            backup = backup_buf.of_group(active[0][0])
        else:
            params = [p for group, _ in active for p in group["params"]]
            backup = backup_buf.of(params)
        moves = [(group["params"], noise.of_group(group), sigma) for group, sigma in active]
        scales = self._filter_scales(sampler, params) if self.filter_normalised else None
        signs = (1.0, -1.0) if self.antithetic else (1.0,)
        num_evals = self.num_perturbations * len(signs)
        w = self.clean_weight
        clean = None
        if w > 0:
            with torch.enable_grad():
                clean = closure()
            # Pre-scaled so that the final 1/num_evals average leaves weight w on it.
            torch._foreach_mul_(sampler.gradients(), w * num_evals / (1.0 - w))
        torch._foreach_copy_(backup, params)
        losses = []
        for _ in range(self.num_perturbations):
            if self.perturbation == "gaussian":
                noise.normal_(sampler.generator)
            else:
                noise.rademacher_(sampler.generator)
            if scales is not None:
                torch._foreach_mul_(noise.of(params), scales)
            for sign in signs:
                if losses:
                    torch._foreach_copy_(params, backup)
                for plist, eps, sigma in moves:
                    torch._foreach_add_(plist, eps, alpha=sign * sigma)
                with self.away_from_theta(), torch.enable_grad():
                    losses.append(closure())
        torch._foreach_copy_(params, backup)
        if num_evals > 1 or clean is not None:
            torch._foreach_mul_(sampler.gradients(), (1.0 - w) / num_evals)
        perturbed = torch.stack(losses).mean(dim=0) if len(losses) > 1 else losses[0]
        if clean is None:
            return perturbed
        return w * clean + (1.0 - w) * perturbed

    def stats(self, sampler: Sampler) -> dict[str, float]:
        """``sigma``: the perturbation scale used in the last step (first perturbed group)."""
        return {"sigma": self._sigma}

    def config(self) -> dict[str, Any]:
        return {
            "estimator": self.name,
            "num_perturbations": self.num_perturbations,
            "antithetic": self.antithetic,
            "perturbation": self.perturbation,
            "clean_weight": self.clean_weight,
            "filter_normalised": self.filter_normalised,
        }


class ScaleWarning(UserWarning):
    """A perturbation scale ``sigma`` larger than the prior std of the parameters it perturbs."""


def sigma_above_prior(
    sampler: Sampler, named_params: Iterable[tuple[str, Tensor]], scale_for: Any
) -> tuple[float, list[tuple[str, float]]]:
    """The perturbation scale of a sampler and the parameters whose prior std is below it.

    ``sigma`` perturbs every weight by ``sigma * eps`` with ``eps ~ N(0, 1)`` (parameter units).
    Where a weight's Gaussian prior std ``s`` is below ``sigma``, the perturbed point lies
    further from ``theta`` than the prior's own typical spread, so the smoothed potential the
    sampler targets is dominated by weights the prior considers implausible. Filter-normalised
    perturbations (``sigma`` relative to each filter's norm) and non-perturbing estimators give
    ``(0.0, [])``.

    Parameters
    ----------
    sampler : Sampler
        The sampler, after construction (its groups resolved).
    named_params : iterable of (str, Tensor)
        ``module.named_parameters()``, in the order the sampler holds them.
    scale_for : callable
        ``scale_for(name) -> float``: the prior std of a parameter
        (:meth:`bayesflat.target.torch.GaussianPrior.scale_for`).

    Returns
    -------
    (sigma, [(name, prior std), ...])
        ``sigma`` of the first perturbed group and the parameters it perturbs whose prior std
        is below it.
    """
    estimator = sampler.estimator
    if not isinstance(estimator, PerturbedGradient) or estimator.filter_normalised:
        return 0.0, []
    names = {id(p): name for name, p in named_params}
    sigma, below = 0.0, []
    for group in sampler.param_groups:
        value = estimator.resolve_sigma(group) if group["perturb"] else 0.0
        if value <= 0:
            continue
        sigma = sigma or value
        for p in group["params"]:
            name = names.get(id(p))
            if name is not None and value > (scale := float(scale_for(name))):
                below.append((name, scale))
    return sigma, below
