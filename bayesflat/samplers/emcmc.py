"""Entropy-MCMC: sampling from flat basins with a guiding variable.

Li & Zhang, "Entropy-MCMC: sampling from flat basins with ease", ICLR 2024. The chain moves
the weights ``theta`` together with a guide ``theta_a`` under the joint potential, in mean-loss
units,

    L(theta, theta_a) = L(theta) + ||theta - theta_a||^2 / (2 eta N),

targeting

    exp(-N L(theta, theta_a) / T) = exp(-(N L(theta) + ||theta - theta_a||^2 / (2 eta)) / T),

the paper's ``exp(-U(theta) - ||theta - theta_a||^2 / (2 eta))`` at ``T = 1``. Integrating out
``theta_a`` leaves ``exp(-N L / T)``: the weights keep the tempered posterior as their marginal.
Given ``theta``, ``theta_a ~ N(theta, eta T I)``; its marginal is the posterior convolved with
that Gaussian, a local-entropy (flatness-favouring) law that pulls ``theta`` toward wide
basins. Both move by Langevin steps with the same step size and independent noise:

    d     = theta - theta_a
    theta   <- theta   - lr (grad L_B(theta) + d / (eta N)) + sqrt(2 lr T / N) xi
    theta_a <- theta_a + lr d / (eta N)                     + sqrt(2 lr T / N) xi_a

With ``T = 0`` no noise is drawn and the step is gradient descent on the joint potential
(``torch.optim.SGD`` on ``(theta, theta_a)`` to the last bit).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

from bayesflat._checks import check_positive
from bayesflat.samplers.base import Dynamics, PlainGradient, Sampler
from bayesflat.samplers.langevin import langevin_noise_scale
from bayesflat.samplers.psgld import state_tensors

__all__ = ["EMCMC", "EntropyLangevinDynamics"]


def _copy_of(p: Tensor) -> Tensor:
    return p.clone()


class EntropyLangevinDynamics(Dynamics):
    """Joint Langevin move of ``theta`` and its guide ``theta_a`` (per-group ``coupling`` eta).

    The guide is ``state[p]["guide"]``, started at ``theta`` on the first step. Two batched
    normal draws per step (one for ``theta``, one for the guide).
    """

    name = "entropy_langevin"
    defaults: dict[str, Any] = {"coupling": 4e-4}

    def validate(self, group: dict[str, Any]) -> None:
        """Check ``coupling > 0``."""
        group["coupling"] = check_positive(group["coupling"], "coupling")

    def update(self, sampler: Sampler) -> None:
        hot = any(g["temperature"] > 0 for g in sampler.param_groups)
        noise = sampler.buffer("noise") if hot else None
        guide_noise = sampler.buffer("guide_noise") if hot else None
        if noise is not None and guide_noise is not None:
            noise.normal_(sampler.generator)
            guide_noise.normal_(sampler.generator)
        workspace = sampler.buffer("guide_force")
        for group in sampler.param_groups:
            params, grads = sampler.grads_of(group)
            if not params:
                continue
            lr = group["lr"]
            guides = state_tensors(sampler, params, "guide", init=_copy_of)
            force = workspace.of(params)
            torch._foreach_copy_(force, params)
            torch._foreach_sub_(force, guides)
            torch._foreach_mul_(force, 1.0 / (group["coupling"] * group["num_data"]))
            # The guide moves with the force at the old theta (a simultaneous update).
            torch._foreach_add_(guides, force, alpha=lr)
            torch._foreach_add_(force, grads)
            torch._foreach_add_(params, force, alpha=-lr)
            if group["temperature"] > 0 and noise is not None and guide_noise is not None:
                scale = langevin_noise_scale(lr, group["temperature"], group["num_data"])
                torch._foreach_add_(params, noise.of(params), alpha=scale)
                torch._foreach_add_(guides, guide_noise.of(params), alpha=scale)

    def stats(self, sampler: Sampler) -> dict[str, float]:
        """``guide_distance``: ``||theta - theta_a||`` over all parameters (parameter units).

        Given ``theta`` its expectation is about ``sqrt(eta T d)`` for ``d`` coordinates.
        """
        square_sum, found = 0.0, False
        for group in sampler.param_groups:
            state = sampler.state
            pairs = [(p, state[p]["guide"]) for p in group["params"] if "guide" in state[p]]
            if not pairs:
                continue
            found = True
            diffs = torch._foreach_sub([p.detach() for p, _ in pairs], [g for _, g in pairs])
            square_sum += float(torch.stack(torch._foreach_norm(diffs)).square().sum())
        return {"guide_distance": math.sqrt(square_sum) if found else math.nan}


class EMCMC(Sampler):
    """Entropy-MCMC (Li & Zhang, ICLR 2024): Langevin on weights coupled to a flat-basin guide.

    Update rule, in mean-loss units, for the weights ``theta`` and the guide ``theta_a``:

        d       = theta - theta_a
        theta   <- theta   - lr (grad L_B(theta) + d / (eta N)) + sqrt(2 lr T / N) xi
        theta_a <- theta_a + lr d / (eta N)                     + sqrt(2 lr T / N) xi_a

    the Langevin chain of ``exp(-(N L(theta) + ||theta - theta_a||^2 / (2 eta)) / T)``. The
    marginal of ``theta`` is the tempered posterior; ``theta_a | theta ~ N(theta, eta T I)``.
    ``theta`` is what the driver records as the draw; the guide stays in the optimizer state
    (``state[p]["guide"]``, so it is in ``state_dict()``) and :meth:`guide_state_dict` turns it
    into model weights.

    Parameters
    ----------
    params : iterable
        Parameters or param groups.
    lr : float or callable, default 1e-3
        Step size (``> 0``) or a schedule, shared by ``theta`` and ``theta_a``. The guide's
        relaxation rate per step is ``lr / (eta N)``, which must stay below 2.
    num_data : int
        Training-set size ``N``.
    temperature : float or callable, default 1.0
        ``T >= 0``. ``T = 0`` is gradient descent on the joint potential.
    coupling : float, default 4e-4
        ``eta > 0``, the paper's coupling variance (parameter units squared at ``T = 1``).
        4e-4 is the value of the authors' CIFAR-10 experiments; smaller values tie the guide
        closer to the weights.
    generator : torch.Generator, optional
        Randomness of this chain.

    Notes
    -----
    Sample statistic: ``guide_distance``, ``||theta - theta_a||``. The guide starts at the
    initial weights.

    References
    ----------
    B. Li, R. Zhang. Entropy-MCMC: sampling from flat basins with ease. ICLR 2024.
    """

    name = "emcmc"

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Callable[[int], float] = 1e-3,
        *,
        num_data: int,
        temperature: float | Callable[[int], float] = 1.0,
        coupling: float = 4e-4,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(
            params,
            estimator=PlainGradient(),
            dynamics=EntropyLangevinDynamics(),
            lr=lr,
            num_data=num_data,
            temperature=temperature,
            generator=generator,
            coupling=coupling,
        )

    def guide_state_dict(self, model: nn.Module) -> dict[str, Tensor]:
        """``model.state_dict()`` with every sampled parameter replaced by its guide ``theta_a``.

        Load it into a copy of the model to evaluate the flat-basin guide. Parameters that
        have not been stepped yet (no guide) keep their current values, as do buffers.

        Raises
        ------
        ValueError
            If no parameter of ``model`` is optimised by this sampler.
        """
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        mine = {id(p) for g in self.param_groups for p in g["params"]}
        named = [(n, p) for n, p in model.named_parameters() if id(p) in mine]
        if not named:
            raise ValueError(
                "model has no parameter optimised by this sampler; pass the module whose "
                "parameters the sampler was built with"
            )
        out = model.state_dict()
        for name, p in named:
            guide = self.state[p].get("guide")
            if guide is not None:
                out[name] = guide.detach().clone()
        return out
