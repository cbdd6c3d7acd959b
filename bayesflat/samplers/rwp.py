"""Random weight perturbation (RWP, LPF-SGD) and noise stability optimisation (NSO).

Both take the gradient at randomly perturbed weights
(:class:`~bayesflat.samplers.perturbation.PerturbedGradient`) and move with the ``T = 0``
Langevin dynamics, i.e. SGD. They descend the randomly smoothed potential
``v(theta) = E_eps[L(theta + sigma eps)] ≈ L + sigma^2 / 2 tr H``, which is lower in flat basins:

- RWP evaluates one-sided perturbations ``theta + sigma eps``; with filter normalisation the
  scale of every filter is ``sigma * ||W_i||`` (LPF-SGD, Bisla, Wang, Choromanska,
  AISTATS 2022), and a weight on the clean gradient gives the mixed-loss form (Li, Tao, Yan,
  Wu, Lei, Fang, He, Huang, "Revisiting random weight perturbation for efficiently improving
  generalization", TMLR 2024).
- NSO (Zhang, Li, Ju, "Noise stability optimization for finding flat minima: a Hessian-based
  regularization approach", TMLR 2024) averages antithetic pairs ``theta ± U_k``: the
  first-order term of the Taylor expansion cancels, so on a quadratic the estimator is exact and
  in general ``E[g] = grad L + sigma^2 / 2 grad tr H + O(sigma^4)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from bayesflat.samplers.base import Sampler
from bayesflat.samplers.langevin import LangevinDynamics
from bayesflat.samplers.perturbation import PerturbedGradient

__all__ = ["NSO", "RWP"]


class _PerturbedOptimiser(Sampler):
    """A :class:`PerturbedGradient` with an explicit ``sigma`` driving Langevin dynamics."""

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        *,
        estimator: PerturbedGradient,
        lr: float | Callable[[int], float],
        num_data: int,
        temperature: float | Callable[[int], float],
        sigma: float | Callable[[int], float],
        generator: torch.Generator | None,
    ) -> None:
        super().__init__(
            params,
            estimator=estimator,
            dynamics=LangevinDynamics(),
            lr=lr,
            num_data=num_data,
            temperature=temperature,
            generator=generator,
            sigma=sigma,
        )


class RWP(_PerturbedOptimiser):
    """Random weight perturbation: SGD on the gradient at one-sided random perturbations.

    Update rule, in mean-loss units:

        eps_k ~ N(0, I) (or Rademacher),  k = 1..n
        u_k   = sigma * eps_k                          (absolute scale), or
        u_k,i = sigma * ||W_i|| * eps_k,i              (filter-normalised: filter i of W)
        g     = w * grad L_B(theta) + (1 - w) * mean_k grad L_B(theta + u_k)
        theta <- theta - lr * g + sqrt(2 * lr * T / N) * xi

    Parameters
    ----------
    params : iterable
        Parameters or param groups; ``"perturb": False`` leaves a group unperturbed.
    lr : float or callable, default 1e-3
        Step size (``> 0``) or a schedule.
    num_data : int
        Training-set size ``N``.
    temperature : float or callable, default 0.0
        ``T >= 0``; ``T = 0`` is the optimiser.
    sigma : float or callable, default 0.01
        Perturbation scale: parameter units, or relative to each filter's norm with
        ``filter_normalised``. ``0`` gives ``torch.optim.SGD`` exactly.
    filter_normalised : bool, default False
        Scale the noise of every filter by its norm (LPF-SGD): a weight of shape
        ``(n_out, ...)`` has ``n_out`` filters; a one-dimensional tensor is one filter.
    num_perturbations : int, default 1
        Draws ``n`` per step (LPF-SGD averages several).
    clean_weight : float, default 0.0
        Weight ``w`` in ``[0, 1)`` of the unperturbed gradient (mixed-loss RWP); ``w > 0`` costs
        one more forward/backward pass.
    perturbation : {"gaussian", "rademacher"}, default "gaussian"
        Distribution of ``eps``.
    generator : torch.Generator, optional
        Randomness of this chain.

    References
    ----------
    D. Bisla, J. Wang, A. Choromanska. Low-pass filtering SGD for recovering flat optima in the
    deep learning optimization landscape. AISTATS 2022.
    T. Li, Q. Tao, W. Yan, Y. Wu, Z. Lei, K. Fang, M. He, X. Huang. Revisiting random weight
    perturbation for efficiently improving generalization. TMLR 2024.
    """

    name = "rwp"

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Callable[[int], float] = 1e-3,
        *,
        num_data: int,
        temperature: float | Callable[[int], float] = 0.0,
        sigma: float | Callable[[int], float] = 0.01,
        filter_normalised: bool = False,
        num_perturbations: int = 1,
        clean_weight: float = 0.0,
        perturbation: str = "gaussian",
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(
            params,
            estimator=PerturbedGradient(
                num_perturbations,
                antithetic=False,
                perturbation=perturbation,
                clean_weight=clean_weight,
                filter_normalised=filter_normalised,
            ),
            lr=lr,
            num_data=num_data,
            temperature=temperature,
            sigma=sigma,
            generator=generator,
        )


class NSO(_PerturbedOptimiser):
    """Noise stability optimisation (Zhang, Li, Ju; TMLR 2024).

    Update rule, in mean-loss units, with ``k`` antithetic pairs per step:

        U_j   ~ N(0, sigma^2 I),  j = 1..k
        g     = w * grad L_B(theta)
                + (1 - w) / (2k) * sum_j [grad L_B(theta + U_j) + grad L_B(theta - U_j)]
        theta <- theta - lr * g + sqrt(2 * lr * T / N) * xi

    On a quadratic the pair average equals the exact gradient for every draw (the first-order
    terms cancel); in general ``E[g] = grad L + sigma^2 / 2 grad tr H + O(sigma^4)`` (``w = 0``),
    the gradient of the noise-stability objective ``E[L(theta + U)]``.

    Parameters
    ----------
    params : iterable
        Parameters or param groups; ``"perturb": False`` leaves a group unperturbed.
    lr : float or callable, default 1e-3
        Step size (``> 0``) or a schedule.
    num_data : int
        Training-set size ``N``.
    temperature : float or callable, default 0.0
        ``T >= 0``; ``T = 0`` is the optimiser.
    sigma : float or callable, default 0.01
        Standard deviation of ``U`` in parameter units (the paper's default); ``0`` gives
        ``torch.optim.SGD`` exactly.
    num_pairs : int, default 1
        Antithetic pairs ``k`` per step (``2k`` forward/backward passes).
    clean_weight : float, default 0.0
        Weight ``w`` in ``[0, 1)`` of the unperturbed gradient (one more pass when ``> 0``).
    generator : torch.Generator, optional
        Randomness of this chain.

    References
    ----------
    H. R. Zhang, D. Li, H. Ju. Noise stability optimization for finding flat minima: a
    Hessian-based regularization approach. TMLR 2024.
    """

    name = "nso"

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Callable[[int], float] = 1e-3,
        *,
        num_data: int,
        temperature: float | Callable[[int], float] = 0.0,
        sigma: float | Callable[[int], float] = 0.01,
        num_pairs: int = 1,
        clean_weight: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        if isinstance(num_pairs, bool) or not isinstance(num_pairs, int) or num_pairs < 1:
            raise ValueError(f"num_pairs must be an integer >= 1, got {num_pairs!r}")
        super().__init__(
            params,
            estimator=PerturbedGradient(
                num_pairs, antithetic=True, perturbation="gaussian", clean_weight=clean_weight
            ),
            lr=lr,
            num_data=num_data,
            temperature=temperature,
            sigma=sigma,
            generator=generator,
        )
