"""Stationary laws of SGLD and fSGLD against analytic targets.

Thousands of independent chains run as the rows of one weight (see ``harness``); the rows at
one time are iid draws, so every tolerance is a standard error from normal, Wishart or binomial
theory, or an exact Kolmogorov–Smirnov quantile.

- Gaussian target (Bayesian linear regression, full-batch gradient): on a quadratic potential
  the discretised chain is a linear Gaussian recursion whose stationary law ``N(mu, S)`` is
  known exactly, ``S = M S M' + Q``. The draws must match ``S``, and at a large step must
  reject the continuous-time posterior ``(T/N) H^-1``; at a small step they match the
  posterior.
- Flat bias (one-dimensional double well): fSGLD targets ``exp(-beta v)`` with the smoothed
  potential ``v = E[L(theta + sigma eps)]``, SGLD targets ``exp(-beta L)``; both laws are
  computed by quadrature and the two samplers must each hit their own and miss the other.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from harness import (
    GaussianLaw,
    GridLaw,
    RowwiseLinear,
    SamplerFactory,
    assert_gaussian_moments,
    binomial_z,
    burn_in_steps,
    cov_zscores,
    expected_cov_zscores,
    gauss_hermite_smoothing,
    ks_statistic,
    langevin_gaussian_law,
    posterior_gaussian_law,
    run_chains,
    sample_rows,
    z_bound,
)
from scipy import stats
from torch import Tensor

from bayesflat.samplers import FSGLD, SGLD, Sampler, coupled_sigma
from bayesflat.target.torch import GaussianLikelihood, GaussianPrior, Posterior

# -- Gaussian target: Bayesian linear regression ---------------------------------------------------

N_DATA = 12
DIM = 3
TEMPERATURE = 1.0
NOISE_STD = 1.0
PRIOR_STD = 1.0
W_TRUE = (1.0, -0.5, 0.25)
# X'X / N is fixed to this Gram matrix (eigenvalues 0.44, 1.12, 1.44): the condition number of
# H, hence the number of steps to mix at a small step size, stays small.
GRAM = np.array([[1.2, 0.35, -0.25], [0.35, 0.8, 0.2], [-0.25, 0.2, 1.0]])
SIGMA = coupled_sigma(TEMPERATURE, N_DATA)  # FSGLD's default sigma=None, eta=0.1
CHAINS = 20_000


@dataclass(frozen=True)
class Regression:
    """Data and the potential ``L(w) = w'Hw/2 - b'w + c`` it defines (float64).

    The chains run in float32: its rounding is ~1e-7 of the Langevin noise, and float64 normal
    draws cost several times more.
    """

    x: Tensor
    y: Tensor
    hessian: np.ndarray
    b: np.ndarray

    @property
    def top_curvature(self) -> float:
        return float(np.linalg.eigvalsh(self.hessian)[-1])

    def posterior(self) -> GaussianLaw:
        return posterior_gaussian_law(
            self.hessian, self.b, temperature=TEMPERATURE, num_data=N_DATA
        )

    def chain_law(self, lr: float, *, perturbed: bool) -> GaussianLaw:
        """Exact stationary law; a Gaussian or Rademacher perturbation ``sigma eps`` (identity
        covariance) adds gradient noise ``sigma H eps``, of covariance ``sigma^2 H H'``.
        """
        noise = SIGMA**2 * self.hessian @ self.hessian.T if perturbed else None
        return langevin_gaussian_law(
            self.hessian,
            self.b,
            lr=lr,
            temperature=TEMPERATURE,
            num_data=N_DATA,
            grad_noise_cov=noise,
        )


@pytest.fixture(scope="module")
def regression() -> Regression:
    g = torch.Generator().manual_seed(2024)
    z = torch.randn(N_DATA, DIM, generator=g, dtype=torch.float64)
    whiten = torch.linalg.cholesky(z.T @ z / N_DATA)
    x = torch.linalg.solve_triangular(whiten, z.T, upper=False).T
    x = x @ torch.linalg.cholesky(torch.as_tensor(GRAM)).T
    y = x @ torch.tensor(W_TRUE, dtype=torch.float64)
    y = y + NOISE_STD * torch.randn(N_DATA, generator=g, dtype=torch.float64)
    xn, yn = x.numpy(), y.numpy()
    # Gaussian likelihood and prior in mean-loss units: grad L(w) = H w - b.
    hessian = (xn.T @ xn / NOISE_STD**2 + np.eye(DIM) / PRIOR_STD**2) / N_DATA
    b = xn.T @ yn / (NOISE_STD**2 * N_DATA)
    return Regression(x.float(), y.float(), hessian, b)


def regression_draws(
    reg: Regression,
    make_sampler: SamplerFactory,
    *,
    start: np.ndarray,
    num_chains: int,
    num_steps: int,
) -> np.ndarray:
    """Rows of a :class:`RowwiseLinear` moved by ``make_sampler`` under the bayesflat Posterior."""
    init = torch.as_tensor(start, dtype=torch.float32).expand(num_chains, DIM)
    model = RowwiseLinear(init)
    posterior = Posterior(
        model,
        num_data=N_DATA,
        temperature=TEMPERATURE,
        likelihood=GaussianLikelihood(NOISE_STD),
        prior=GaussianPrior(PRIOR_STD),
    )
    # Every chain sees every example: the likelihood sums over the K output columns and the
    # prior over the K rows, so the potential is sum_k L(w_k), not its mean.
    targets = reg.y[:, None].expand(N_DATA, num_chains)
    closure = posterior.closure(reg.x, targets)
    return run_chains(make_sampler, model.weight, closure, num_steps=num_steps)


def sampler_factory(name: str, lr: float, seed: int) -> SamplerFactory:
    gen = torch.Generator().manual_seed(seed)
    common = {"lr": lr, "num_data": N_DATA, "temperature": TEMPERATURE, "generator": gen}
    options = {
        "sgld": {},
        "fsgld": {},
        "fsgld-rademacher": {"perturbation": "rademacher"},
        "fsgld-antithetic": {"antithetic": True},
    }[name]
    if name == "sgld":
        return lambda params: SGLD(params, **common)
    return lambda params: FSGLD(params, **common, **options)


# Whether the sampler's gradient carries the perturbation noise sigma H eps. Antithetic pairs
# cancel it exactly on a quadratic: (grad L(w + s eps) + grad L(w - s eps)) / 2 = H w - b.
PERTURBED = {"sgld": False, "fsgld": True, "fsgld-rademacher": True, "fsgld-antithetic": False}


def test_rowwise_posterior_is_the_sum_of_per_chain_potentials(regression):
    g = torch.Generator().manual_seed(5)
    w = torch.randn(6, DIM, generator=g, dtype=torch.float64)
    model = RowwiseLinear(w)
    posterior = Posterior(
        model,
        num_data=N_DATA,
        likelihood=GaussianLikelihood(NOISE_STD),
        prior=GaussianPrior(PRIOR_STD),
    )
    x, y = regression.x.double(), regression.y.double()
    loss = posterior.closure(x, y[:, None].expand(N_DATA, 6))()
    expected_grad = w.numpy() @ regression.hessian - regression.b
    np.testing.assert_allclose(model.weight.grad.numpy(), expected_grad, rtol=1e-6, atol=1e-6)
    # value: sum over rows of L(w_k), each the mean NLL plus the prior over N
    single = [
        Posterior(
            RowwiseLinear(w[k : k + 1]),
            num_data=N_DATA,
            likelihood=GaussianLikelihood(NOISE_STD),
            prior=GaussianPrior(PRIOR_STD),
        ).potential(x, y)
        for k in range(6)
    ]
    assert float(loss) == pytest.approx(float(torch.stack(single).sum().detach()), rel=1e-12)


LARGE_STEP = 0.5  # lr * lambda_max: S is (1 - lr lambda / 2)^-1 (T/N)/lambda along each axis


@pytest.mark.parametrize("name", list(PERTURBED))
def test_draws_follow_the_exact_discrete_law_at_a_large_step(regression, name):
    lr = LARGE_STEP / regression.top_curvature
    law = regression.chain_law(lr, perturbed=PERTURBED[name])
    start = np.zeros(DIM)
    steps = burn_in_steps(regression.hessian, lr, start=start, law=law, num_chains=CHAINS)
    draws = regression_draws(
        regression,
        sampler_factory(name, lr, seed=11),
        start=start,
        num_chains=CHAINS,
        num_steps=steps,
    )
    assert_gaussian_moments(draws, law)

    # The check is sharp: the continuous-time posterior, and the law with (without) the
    # perturbation noise, are each many SE away and rejected by the same draws.
    bound = z_bound(DIM + DIM * (DIM + 1) // 2)
    rivals = {
        "posterior": regression.posterior(),
        "other noise": regression.chain_law(lr, perturbed=not PERTURBED[name]),
    }
    for rival_name, rival in rivals.items():
        separation = np.max(np.abs(expected_cov_zscores(law.cov, rival.cov, CHAINS)))
        assert separation > 2 * bound, (rival_name, separation)
        rejected = np.max(np.abs(cov_zscores(draws, rival.cov)))
        assert rejected > bound, f"{rival_name} not rejected: max |z| = {rejected:.2f}"


@pytest.mark.parametrize("perturbed", [False, True])
def test_discrete_law_approaches_the_posterior_at_rate_lr(regression, perturbed):
    posterior = regression.posterior()
    lrs = 0.1 / regression.top_curvature / 2.0 ** np.arange(7)
    errors = np.array(
        [
            np.linalg.norm(regression.chain_law(lr, perturbed=perturbed).cov - posterior.cov)
            for lr in lrs
        ]
    ) / np.linalg.norm(posterior.cov)
    # S(lr) = (T/N) H^-1 + lr A + O(lr^2): halving lr halves the error.
    np.testing.assert_allclose(errors[1:] / errors[:-1], 0.5, atol=0.03)
    assert errors[-1] < 2e-3


# Small steps: the O(lr) gap to the posterior is held below 0.5 SE so that the check is about
# Monte Carlo error. fSGLD's perturbation noise makes its gap larger at equal lr (along an axis
# of curvature lambda it is lr lambda (1 + sigma^2 N lambda / T) / 2, against lr lambda / 2 for
# SGLD), so it runs at a smaller step with fewer rows.
SMALL_STEPS = [("sgld", 0.025, 5_000), ("fsgld", 0.006, 2_000)]


@pytest.mark.parametrize(("name", "step", "num_chains"), SMALL_STEPS)
def test_draws_match_the_posterior_at_a_small_step(regression, name, step, num_chains):
    lr = step / regression.top_curvature
    posterior = regression.posterior()
    law = regression.chain_law(lr, perturbed=PERTURBED[name])
    gap = np.max(np.abs(expected_cov_zscores(law.cov, posterior.cov, num_chains)))
    assert gap < 0.5, gap
    # Started at the posterior mean, the chains' mean stays exact; the covariance has to grow
    # from 0 to (T/N) H^-1, which takes the mixing time of the slowest direction.
    start = posterior.mean
    steps = burn_in_steps(regression.hessian, lr, start=start, law=law, num_chains=num_chains)
    draws = regression_draws(
        regression,
        sampler_factory(name, lr, seed=12),
        start=start,
        num_chains=num_chains,
        num_steps=steps,
    )
    assert_gaussian_moments(draws, posterior)


# -- flat bias: a double well with a flat and a sharp basin ---------------------------------------

WELL_DATA = 4  # beta = N / T = 4: sigma = (T/N)^0.275 = 0.68 is larger than the sharp well's sd
WELL_TEMPERATURE = 1.0
BETA = WELL_DATA / WELL_TEMPERATURE
CENTRES = (-1.5, 1.5)
WIDTHS = (1.0, 0.5)  # flat, sharp
WELL_SIGMA = coupled_sigma(WELL_TEMPERATURE, WELL_DATA)
WELL_CHAINS = 10_000
BARRIER = 0.3545  # the maximum of L between the wells (checked below)


def double_well(x: np.ndarray | Tensor) -> np.ndarray | Tensor:
    """``L(x) = -log(exp(-q_1) + exp(-q_2)) / beta``, ``q_i = (x - m_i)^2 / (2 s_i^2)``.

    Mean-loss units. ``exp(-beta L)`` is a two-component Gaussian mixture with equal peak
    heights, so the wells have equal depth (up to the ``e^-4.5`` overlap of the components)
    and curvatures ``1 / (beta s_i^2)`` in the ratio 1 : 4.
    """
    q1 = (x - CENTRES[0]) ** 2 / (2.0 * WIDTHS[0] ** 2)
    q2 = (x - CENTRES[1]) ** 2 / (2.0 * WIDTHS[1] ** 2)
    soft = F.softplus(q1 - q2) if isinstance(x, Tensor) else np.logaddexp(0.0, q1 - q2)
    return (q1 - soft) / BETA


def mixture_cdf(x: np.ndarray) -> np.ndarray:
    """CDF of ``exp(-beta L)``: the mixture with weights proportional to ``s_i``."""
    (m1, m2), (s1, s2) = CENTRES, WIDTHS
    return (s1 * stats.norm.cdf(x, m1, s1) + s2 * stats.norm.cdf(x, m2, s2)) / (s1 + s2)


@pytest.fixture(scope="module")
def well_laws() -> dict[str, GridLaw]:
    grid = np.linspace(-9.0, 7.0, 16_001)
    values = double_well(grid)
    smoothed = gauss_hermite_smoothing(double_well, WELL_SIGMA, grid, nodes=120)
    # converged: more nodes change the density exp(-beta v) by less than 1e-7 relative
    more = gauss_hermite_smoothing(double_well, WELL_SIGMA, grid, nodes=160)
    assert BETA * np.max(np.abs(smoothed - more)) < 1e-7
    laws = {"sgld": GridLaw.gibbs(grid, values, BETA), "fsgld": GridLaw.gibbs(grid, smoothed, BETA)}
    # the grid integration reproduces the closed-form law of SGLD's target
    assert np.max(np.abs(laws["sgld"].cdf(grid) - mixture_cdf(grid))) < 1e-6
    between = (grid > CENTRES[0]) & (grid < CENTRES[1])
    assert grid[between][np.argmax(values[between])] == pytest.approx(BARRIER, abs=1e-3)
    return laws


def test_flat_bias_targets_are_far_apart(well_laws):
    sgld, fsgld = (well_laws[k].mass_below(BARRIER) for k in ("sgld", "fsgld"))
    assert sgld == pytest.approx(0.649, abs=1e-3)
    assert fsgld == pytest.approx(0.716, abs=1e-3)
    # the smoothed target moves mass into the flat well by many binomial SE of a run
    assert binomial_z(round(fsgld * WELL_CHAINS), WELL_CHAINS, sgld) > 10
    grid = well_laws["sgld"].grid
    sup = np.max(np.abs(well_laws["sgld"].cdf(grid) - well_laws["fsgld"].cdf(grid)))
    assert sup > 3 * stats.kstwo.ppf(1 - 1e-3, WELL_CHAINS)


# Step sizes and run lengths, from the exact transition kernel of each chain on a fine grid
# (development check): the flat-well mass is biased by +0.0007 (0.15 binomial SE) at these
# steps and by +0.00035 at half of them (O(lr)); the sup CDF error is below 0.0015 (KS critical
# value 0.0195). Relaxation times are 840 (fSGLD) and 720 (SGLD) steps; the runs are 7
# relaxation times, leaving a start-up transient of 0.0002 in the mass. Simulated with 40 000
# chains at these steps and at half of them, the masses agree within Monte Carlo error.
WELL_RUNS: dict[str, tuple[type[Sampler], float, int]] = {
    "fsgld": (FSGLD, 0.0125, 6000),
    "sgld": (SGLD, 0.025, 5000),
}


@pytest.mark.parametrize("name", list(WELL_RUNS))
def test_double_well_draws_follow_the_flat_biased_target(well_laws, name):
    cls, lr, steps = WELL_RUNS[name]
    gen = torch.Generator().manual_seed(7)
    made: list = []

    def make(params):
        made.append(
            cls(params, lr=lr, num_data=WELL_DATA, temperature=WELL_TEMPERATURE, generator=gen)
        )
        return made[0]

    init = torch.full((WELL_CHAINS, 1), BARRIER)  # every chain starts on the barrier top
    draws = sample_rows(make, double_well, init, num_steps=steps).ravel()

    law, rival = well_laws[name], well_laws["sgld" if name == "fsgld" else "fsgld"]
    in_flat = int(np.sum(draws < BARRIER))
    z = binomial_z(in_flat, WELL_CHAINS, law.mass_below(BARRIER))
    assert abs(z) < 4, f"flat-well mass {in_flat / WELL_CHAINS:.4f}: z = {z:.2f}"
    ks, critical = ks_statistic(draws, law.cdf)
    assert ks < critical, f"KS {ks:.4f} >= {critical:.4f}"

    # ... and misses the other sampler's target. With both masses within 4 SE of their own
    # targets, 14 SE apart, fSGLD's flat-well mass exceeds SGLD's.
    z_rival = binomial_z(in_flat, WELL_CHAINS, rival.mass_below(BARRIER))
    assert (z_rival if name == "fsgld" else -z_rival) > 4
    assert ks_statistic(draws, rival.cdf)[0] > critical
    assert made[0].stats()["sigma"] == (WELL_SIGMA if name == "fsgld" else 0.0)
