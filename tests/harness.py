"""Shared statistical harness for sampler tests.

Every sampler is tested the same way: a sampler factory and a potential go in, draws come out,
and the draws are compared with an analytic law using tolerances from sampling theory.

Many chains in one optimiser
----------------------------
A parameter ``W`` of shape ``(K, d)`` whose potential is the *sum* over rows of a per-chain
potential, ``sum_k L(w_k)``, holds ``K`` independent chains: the gradient of the sum with
respect to row ``k`` is ``grad L(w_k)``, and the Langevin noise (and any weight perturbation)
is drawn independently for every element. The sum must not be divided by ``K``: row ``k`` has
to see ``L(w_k)`` in mean-loss units exactly. After a burn-in of many mixing times the ``K``
rows at one time are iid draws from the chain's stationary law, so standard errors follow
from normal, Wishart and binomial theory with no autocorrelation correction.

Tolerances
----------
A check of ``m`` statistics at family-wise level ``alpha`` uses the two-sided Bonferroni bound
``z = Phi^{-1}(1 - alpha / (2 m))`` on each standardised error (:func:`z_bound`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from numpy.polynomial.hermite_e import hermegauss
from scipy import integrate, linalg, stats
from torch import Tensor, nn

from bayesflat.samplers import Sampler

__all__ = [
    "GaussianLaw",
    "GridLaw",
    "RowwiseLinear",
    "SamplerFactory",
    "assert_gaussian_moments",
    "burn_in_steps",
    "binomial_z",
    "cov_zscores",
    "expected_cov_zscores",
    "gauss_hermite_smoothing",
    "ks_statistic",
    "langevin_gaussian_law",
    "linear_recursion_law",
    "mean_zscores",
    "posterior_gaussian_law",
    "propagate_gaussian_law",
    "rows_closure",
    "run_chains",
    "sample_rows",
    "z_bound",
]

SamplerFactory = Callable[[list[Tensor]], Sampler]
"""Builds the sampler under test for a list of parameters (``[W]``)."""


# -- running many chains --------------------------------------------------------------------------


class RowwiseLinear(nn.Module):
    """``K`` linear models ``f_k(x) = x . w_k`` as the rows of one weight ``(K, d)``.

    ``forward(x)`` returns ``(n, K)``: one output dimension per chain. With targets expanded
    to ``(n, K)``, a per-example likelihood that sums over output dimensions (as
    :class:`~bayesflat.target.torch.GaussianLikelihood` does) gives ``sum_k NLL_i(w_k)``.
    """

    def __init__(self, init: Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(init.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight.T


def rows_closure(weights: Tensor, potential: Callable[[Tensor], Tensor]) -> Callable[[], Tensor]:
    """Closure evaluating ``sum_k L(w_k)`` for a per-row potential ``L``.

    ``potential(weights)`` returns the per-row potentials ``(K,)`` (mean-loss units) or their
    sum; the closure back-propagates the sum, as a :class:`~bayesflat.target.torch.Posterior`
    closure does.
    """

    def closure() -> Tensor:
        loss = potential(weights).sum()
        loss.backward()
        return loss.detach()

    return closure


def run_chains(
    make_sampler: SamplerFactory,
    weights: Tensor,
    closure: Callable[[], Tensor],
    *,
    num_steps: int,
) -> np.ndarray:
    """Move ``weights`` (a leaf ``(K, d)``) ``num_steps`` times; return the rows as float64."""
    sampler = make_sampler([weights])
    for _ in range(num_steps):
        sampler.step(closure)
    return weights.detach().to(torch.float64).cpu().numpy().copy()


def sample_rows(
    make_sampler: SamplerFactory,
    potential: Callable[[Tensor], Tensor],
    init: Tensor,
    *,
    num_steps: int,
) -> np.ndarray:
    """``K = init.shape[0]`` independent chains of one sampler on a per-row potential.

    Returns the ``(K, d)`` states after ``num_steps`` steps, one iid draw per chain once the
    chains have mixed.
    """
    weights = init.detach().clone().requires_grad_(True)
    return run_chains(make_sampler, weights, rows_closure(weights, potential), num_steps=num_steps)


# -- tolerances -----------------------------------------------------------------------------------


def z_bound(num_checks: int, alpha: float = 1e-4) -> float:
    """Two-sided Bonferroni bound: each of ``num_checks`` z-scores within it, at level ``alpha``."""
    return float(stats.norm.isf(alpha / (2 * num_checks)))


def binomial_z(count: int, total: int, p: float) -> float:
    """Standardised error of a proportion, ``(count/total - p) / sqrt(p (1 - p) / total)``."""
    return (count / total - p) / np.sqrt(p * (1.0 - p) / total)


def ks_statistic(
    draws: np.ndarray, cdf: Callable[[np.ndarray], np.ndarray], *, alpha: float = 1e-3
) -> tuple[float, float]:
    """Kolmogorov–Smirnov distance of iid ``draws`` to ``cdf``, and its critical value.

    The critical value is the exact ``1 - alpha`` quantile of the one-sample KS statistic for
    ``len(draws)`` observations from ``cdf`` (``scipy.stats.kstwo``).
    """
    x = np.asarray(draws).ravel()
    return float(stats.kstest(x, cdf).statistic), float(stats.kstwo.ppf(1.0 - alpha, x.size))


# -- Gaussian laws --------------------------------------------------------------------------------


@dataclass(frozen=True)
class GaussianLaw:
    """A Gaussian law ``N(mean, cov)`` in parameter units."""

    mean: np.ndarray
    cov: np.ndarray


def posterior_gaussian_law(
    hessian: np.ndarray, b: np.ndarray, *, temperature: float, num_data: int
) -> GaussianLaw:
    """Tempered posterior of the quadratic potential ``L(w) = w'Hw/2 - b'w`` (mean-loss units).

    ``exp(-N L / T)`` is ``N(H^{-1} b, (T / N) H^{-1})``.
    """
    return GaussianLaw(
        linalg.solve(hessian, b, assume_a="pos"),
        temperature / num_data * linalg.inv(hessian),
    )


def langevin_gaussian_law(
    hessian: np.ndarray,
    b: np.ndarray,
    *,
    lr: float,
    temperature: float,
    num_data: int,
    grad_noise_cov: np.ndarray | None = None,
) -> GaussianLaw:
    """Exact stationary law of the discretised Langevin chain on a quadratic potential.

    The chain ``w <- w - lr (H w - b + zeta) + sqrt(2 lr T / N) xi`` with ``xi ~ N(0, I)`` and
    gradient noise ``zeta`` of covariance ``C`` (independent of ``xi`` and of the past) is the
    linear recursion ``w <- M w + lr b + noise``, ``M = I - lr H``, noise covariance
    ``Q = (2 lr T / N) I + lr^2 C``. For ``rho(M) < 1`` its stationary mean is ``H^{-1} b``
    and its stationary covariance ``S`` solves the discrete Lyapunov equation
    ``S = M S M' + Q``. ``S`` is ``(T / N) H^{-1} + O(lr)``.
    """
    eye = np.eye(hessian.shape[0])
    q = 2.0 * lr * temperature / num_data * eye
    if grad_noise_cov is not None:
        q = q + lr**2 * grad_noise_cov
    return linear_recursion_law(eye - lr * hessian, lr * np.asarray(b), q)


def linear_recursion_law(
    transition: np.ndarray, offset: np.ndarray, noise_cov: np.ndarray
) -> GaussianLaw:
    """Stationary law of the linear Gaussian recursion ``z <- A z + c + e``, ``e ~ N(0, Q)``.

    Every sampler on a quadratic potential is such a recursion in its full state (weights,
    momentum, auxiliary variables). For ``rho(A) < 1`` the stationary mean solves
    ``(I - A) m = c`` and the covariance the discrete Lyapunov equation ``S = A S A' + Q``.
    """
    if np.max(np.abs(linalg.eigvals(transition))) >= 1:
        raise ValueError("the recursion is unstable: rho(A) >= 1")
    eye = np.eye(transition.shape[0])
    return GaussianLaw(
        linalg.solve(eye - transition, offset),
        linalg.solve_discrete_lyapunov(transition, noise_cov),
    )


def propagate_gaussian_law(
    law: GaussianLaw, transition: np.ndarray, offset: np.ndarray, noise_cov: np.ndarray
) -> GaussianLaw:
    """Law after one step ``z <- A z + c + e``, ``e ~ N(0, Q)`` independent of ``z``.

    ``N(m, S)`` goes to ``N(A m + c, A S A' + Q)``; a sequence of steps with time-varying
    ``A, c, Q`` (step-size schedules, phases) gives the exact finite-time law of a chain.
    """
    return GaussianLaw(
        transition @ law.mean + offset, transition @ law.cov @ transition.T + noise_cov
    )


def mean_zscores(draws: np.ndarray, law: GaussianLaw) -> np.ndarray:
    """``(mean_hat - mean) / sqrt(diag(cov) / K)`` per coordinate, for ``K`` iid rows."""
    k = draws.shape[0]
    return (draws.mean(axis=0) - law.mean) / np.sqrt(np.diag(law.cov) / k)


def expected_cov_zscores(cov: np.ndarray, claimed: np.ndarray, num_chains: int) -> np.ndarray:
    """Standardised covariance errors that ``num_chains`` draws of law ``cov`` show on average
    when tested against ``claimed`` (upper triangle): how sharply :func:`cov_zscores` separates
    the two laws.
    """
    diag = np.diag(claimed)
    se = np.sqrt((np.outer(diag, diag) + claimed**2) / (num_chains - 1))
    return ((cov - claimed) / se)[np.triu_indices(claimed.shape[0])]


def cov_zscores(draws: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """Standardised errors of the sample covariance entries ``i <= j`` (upper triangle).

    For ``K`` iid Gaussian rows the unbiased sample covariance has ``E[S_ij] = cov_ij`` and
    ``Var(S_ij) = (cov_ii cov_jj + cov_ij^2) / (K - 1)`` (Wishart). For a law with negative
    excess kurtosis (e.g. a Gaussian convolved with Rademacher terms) the variance is smaller,
    so the bound stays conservative.
    """
    sample = np.cov(draws, rowvar=False, ddof=1).reshape(cov.shape)
    return expected_cov_zscores(sample, cov, draws.shape[0])


def assert_gaussian_moments(draws: np.ndarray, law: GaussianLaw, *, alpha: float = 1e-4) -> None:
    """Assert the mean and covariance of iid ``draws`` agree with ``law``.

    ``d`` mean coordinates and ``d (d + 1) / 2`` covariance entries are each held to
    :func:`z_bound` at family-wise level ``alpha``.
    """
    zm, zc = mean_zscores(draws, law), cov_zscores(draws, law.cov)
    bound = z_bound(zm.size + zc.size, alpha)
    assert np.all(np.abs(zm) < bound) and np.all(np.abs(zc) < bound), (
        f"moments disagree with the law beyond {bound:.2f} SE: "
        f"mean z = {np.round(zm, 2)}, covariance z (upper triangle) = {np.round(zc, 2)}"
    )


# -- one-dimensional laws on a grid ---------------------------------------------------------------


def gauss_hermite_smoothing(
    potential: Callable[[np.ndarray], np.ndarray], sigma: float, x: np.ndarray, *, nodes: int = 80
) -> np.ndarray:
    """Randomly smoothed potential ``v(x) = E[L(x + sigma eps)]``, ``eps ~ N(0, 1)``.

    Gauss–Hermite quadrature with the probabilists' weight ``exp(-e^2 / 2)``; exact for
    polynomials of degree ``< 2 nodes``, exponentially accurate for analytic ``L``.
    """
    e, w = hermegauss(nodes)
    w = w / np.sqrt(2.0 * np.pi)
    x = np.asarray(x, dtype=np.float64)
    return potential(x[..., None] + sigma * e) @ w


@dataclass(frozen=True)
class GridLaw:
    """A one-dimensional law with density ``∝ exp(-beta U(x))`` tabulated on a fine grid.

    The grid must cover all but a negligible tail mass. The CDF is the cumulative trapezoid
    rule of the normalised density, linearly interpolated.
    """

    grid: np.ndarray
    cdf_values: np.ndarray

    @classmethod
    def gibbs(cls, grid: np.ndarray, potential_values: np.ndarray, beta: float) -> GridLaw:
        """The Gibbs law ``exp(-beta U)`` of the potential values ``U(grid)``."""
        log_p = -beta * (potential_values - potential_values.min())
        cumulative = integrate.cumulative_trapezoid(np.exp(log_p), grid, initial=0.0)
        return cls(grid, cumulative / cumulative[-1])

    def cdf(self, x: np.ndarray) -> np.ndarray:
        """``P(X <= x)``."""
        return np.interp(x, self.grid, self.cdf_values, left=0.0, right=1.0)

    def mass_below(self, cut: float) -> float:
        """``P(X < cut)``."""
        return float(self.cdf(np.asarray(cut)))


def burn_in_steps(
    hessian: np.ndarray,
    lr: float,
    *,
    start: np.ndarray,
    law: GaussianLaw,
    num_chains: int,
    fraction: float = 0.01,
) -> int:
    """Steps after which chains started at the point ``start`` are ``fraction`` SE from ``law``.

    On a quadratic potential the moments obey the linear recursions of
    :func:`langevin_gaussian_law`: after ``t`` steps the mean error is ``M^t (start - mean)``
    and the covariance error ``-M^t S M^t`` (``S_0 = 0``), with ``M = I - lr H`` symmetric, so
    their norms are at most ``rho^t |start - mean|`` and ``rho^(2t) |S|_2``,
    ``rho = max_i |1 - lr lambda_i|``. Both are held below ``fraction`` times the smallest
    standard error of a mean coordinate / covariance entry for ``num_chains`` rows.
    """
    rho = float(np.max(np.abs(1.0 - lr * linalg.eigvalsh(hessian))))
    smallest_var = float(np.min(np.diag(law.cov)))
    se_mean = np.sqrt(smallest_var / num_chains)
    se_cov = smallest_var / np.sqrt(num_chains - 1)
    mean_gap = float(np.linalg.norm(np.asarray(start) - law.mean))
    cov_gap = float(np.linalg.norm(law.cov, 2))
    steps_mean = np.log(max(mean_gap / (fraction * se_mean), 1.0)) / -np.log(rho)
    steps_cov = np.log(max(cov_gap / (fraction * se_cov), 1.0)) / (-2.0 * np.log(rho))
    return int(np.ceil(max(steps_mean, steps_cov)))
