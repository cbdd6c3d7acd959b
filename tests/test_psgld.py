"""pSGLD: the preconditioner estimated during burn-in and then frozen, against the adaptive form.

Target: a random 3-d Gaussian (random mean, random covariance) plus one coordinate whose only
force is the prior ``N(0, s^2)``, as the weights on always-zero input pixels of a network are.
In mean-loss units

    L(w) = (w_{1:3} - m)' P (w_{1:3} - m) / 2 + w_4^2 / (2 N s^2),

whose tempered posterior is ``N(m, (T/N) P^-1) x N(0, T s^2)``. Thousands of chains run as the
rows of one weight (``harness``); every element has its own RMSprop average, so the rows stay
independent chains.

With ``V`` frozen, chain ``k`` is the linear recursion ``w <- A_k w + c_k + e`` with
``A_k = I - lr G_k H``, ``Q_k = 2 lr T / N G_k``: its exact stationary law ``N(mu, S_k)`` follows
from its own ``G_k`` (read from the sampler state), so ``z_k = S_k^{-1/2} (w_k - mu)`` are iid
``N(0, I)`` draws and every tolerance is a normal or Wishart standard error.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from harness import (
    GaussianLaw,
    assert_gaussian_moments,
    linear_recursion_law,
    sample_rows,
    z_bound,
)
from scipy import linalg
from torch import nn

from bayesflat import cli, samplers
from bayesflat import trace as btrace
from bayesflat.samplers.psgld import first_square_avg
from bayesflat.target.torch import Posterior


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


N_DATA = 20
TEMPERATURE = 1.0
PRIOR_SD = 0.5
LR = 0.01
EPS = 1e-8
CHAINS = 3000
ADAPT = 400
STEPS = 1600  # the slowest frozen chain relaxes its variance in < 100 steps (checked below)

_rng = np.random.default_rng(0)
_A = _rng.normal(size=(3, 3))
COV_UNIT = _A @ _A.T / 3 + 0.3 * np.eye(3)  # (N / T) x the posterior covariance of w_{1:3}
PRECISION = np.linalg.inv(COV_UNIT)
MEAN = _rng.normal(size=3)
HESSIAN = linalg.block_diag(PRECISION, [[1.0 / (N_DATA * PRIOR_SD**2)]])
MU = np.append(MEAN, 0.0)
POSTERIOR = GaussianLaw(MU, TEMPERATURE / N_DATA * np.linalg.inv(HESSIAN))

# The adaptive form's bias on this target at LR, from one run of 20,000 chains (seed 17): the
# variance of each of w_{1:3} over its posterior variance, and E[w_4^2] / (T s^2). Each is a
# variance ratio with relative standard error sqrt(2 / 20,000) = 0.01. (The frozen form at
# the same step: 1.04, 1.03, 1.05 and 1.00, its exact discrete law.)
REFERENCE_CHAINS = 20_000
ADAPTIVE_BIAS = {
    0.99: (np.array([1.126, 1.115, 1.155]), 1.202),
    0.9: (np.array([1.494, 1.491, 1.590]), 1.679),
}


def _potential(w: torch.Tensor) -> torch.Tensor:
    h = torch.as_tensor(HESSIAN, dtype=w.dtype)
    d = w - torch.as_tensor(MU, dtype=w.dtype)
    return 0.5 * ((d @ h) * d).sum(dim=1)


def _start() -> torch.Tensor:
    # Chains start at prior-like draws, each with its own gradient (a chain at mu would have
    # g = 0 everywhere).
    g = torch.Generator().manual_seed(1)
    return torch.randn(CHAINS, 4, generator=g, dtype=torch.float64)


def _run(preconditioner: str, alpha: float = 0.99, seed: int = 3):
    made: list[samplers.PSGLD] = []

    def make(params):
        made.append(
            samplers.PSGLD(
                params, lr=LR, num_data=N_DATA, temperature=TEMPERATURE, alpha=alpha, eps=EPS,
                preconditioner=preconditioner, adapt_steps=ADAPT,
                generator=torch.Generator().manual_seed(seed),
            )
        )  # fmt: skip
        return made[0]

    draws = sample_rows(make, _potential, _start(), num_steps=STEPS)
    opt = made[0]
    v = opt.state[opt.param_groups[0]["params"][0]]["square_avg"].numpy()
    return draws, 1.0 / (EPS + np.sqrt(v)), opt


def _chain_law(g: np.ndarray, lr: float = LR) -> GaussianLaw:
    gm = np.diag(g)
    return linear_recursion_law(
        np.eye(4) - lr * gm @ HESSIAN,
        lr * gm @ HESSIAN @ MU,
        2.0 * lr * TEMPERATURE / N_DATA * gm,
    )


def test_frozen_preconditioner_samples_its_exact_constant_mass_law():
    draws, g, opt = _run("frozen")
    assert opt.stats()["preconditioner_frozen"] == 1.0
    # every chain has relaxed: the slowest rate lr G lambda over all chains and directions
    # gives the steps a covariance needs to come within e^-12 after the freeze
    rates = [
        np.min(np.abs(1.0 - linalg.eigvals(np.eye(4) - LR * np.diag(gk) @ HESSIAN)))
        for gk in g[:: CHAINS // 50]
    ]
    assert (STEPS - ADAPT) * 2.0 * min(rates) > 12.0, min(rates)
    z = np.empty_like(draws)
    limit_error = 0.0
    scale = np.sqrt(np.outer(np.diag(POSTERIOR.cov), np.diag(POSTERIOR.cov)))
    for k in range(CHAINS):
        law = _chain_law(g[k])
        z[k] = linalg.solve_triangular(np.linalg.cholesky(law.cov), draws[k] - law.mean, lower=True)
        if k < 20:  # the same mass at a small step: the posterior, whatever G_k is
            small = _chain_law(g[k], LR / 100)
            limit_error = max(limit_error, np.max(np.abs(small.cov - POSTERIOR.cov) / scale))
    assert_gaussian_moments(z, GaussianLaw(np.zeros(4), np.eye(4)))
    assert limit_error < 0.01
    # the prior-only coordinate: E[theta^2] = T s^2 / (1 - lr G lambda / 2) per chain, which is
    # the prior variance within 0.5 standard errors at this step
    lam = HESSIAN[3, 3]
    expected = np.mean(1.0 / (1.0 - LR * g[:, 3] * lam / 2.0))
    se = math.sqrt(2.0 / CHAINS)
    assert abs(expected - 1.0) < 0.5 * se
    ratio = np.mean(draws[:, 3] ** 2) / (TEMPERATURE * PRIOR_SD**2)
    assert abs(ratio - 1.0) < z_bound(1) * se, ratio


@pytest.mark.parametrize("alpha", sorted(ADAPTIVE_BIAS))
def test_adaptive_preconditioner_has_its_documented_bias(alpha):
    draws, _, opt = _run("adaptive", alpha=alpha)
    assert opt.stats()["preconditioner_frozen"] == 0.0
    block, prior_only = ADAPTIVE_BIAS[alpha]
    var_ratio = np.var(draws[:, :3], axis=0, ddof=1) / np.diag(POSTERIOR.cov)[:3]
    second_moment = np.mean(draws[:, 3] ** 2) / (TEMPERATURE * PRIOR_SD**2)
    measured = np.append(var_ratio, second_moment)
    documented = np.append(block, prior_only)
    # Each ratio is a variance estimate over a fixed value, here and in the reference: relative
    # SE sqrt(2 / K) (a Gaussian's, which the nearly Gaussian draws respect).
    se = documented * np.sqrt(2.0 / CHAINS + 2.0 / REFERENCE_CHAINS)
    bound = z_bound(8)
    assert np.all(np.abs(measured - documented) < bound * se), (measured, documented)
    # ... and the bias is real: the prior-only coordinate rejects the posterior's value (1),
    # and every variance is too large
    assert (measured[3] - 1.0) / se[3] > bound and np.all(measured > 1.0)


# -- the first step, zero temperature, checkpoints ---------------------------------------------


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(64, 5, generator=g), torch.randint(0, 3, (64,), generator=g)


def _net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def test_average_starts_at_the_first_squared_gradient():
    grad = torch.tensor([[3.0, 0.0], [-1.0, 2.0]])
    np.testing.assert_array_equal(first_square_avg(grad), [[9.0, 3.5], [1.0, 4.0]])
    # At T = 0 the first step moves every coordinate by lr |g| / (eps + |g|) <= lr, which is
    # lr for all but vanishing gradients; an average started at 0 would move it by
    # lr / sqrt(1 - alpha) = 10 lr.
    model = _net()
    before = [p.detach().clone() for p in model.parameters()]
    opt = samplers.PSGLD(model.parameters(), lr=0.01, num_data=64, temperature=0.0,
                         adapt_steps=5)  # fmt: skip
    x, y = _data()
    opt.step(Posterior(model, num_data=64, temperature=0.0).closure(x, y))
    for p, b in zip(model.parameters(), before, strict=True):
        moved = (b - p.detach()).abs()
        assert torch.all(moved <= 0.01 * (1 + 1e-6)) and moved.max() > 0.0099


@pytest.mark.parametrize("name", ["psgld", "fpsgld"])
@pytest.mark.parametrize("preconditioner", ["adaptive", "frozen"])
def test_zero_temperature_is_rmsprop_started_at_the_first_squared_gradient(name, preconditioner):
    # torch.optim.RMSprop with its average pre-set to the first squared gradient; in the
    # frozen mode its alpha becomes 1 at step adapt_steps (V * 1 + 0 * g^2 = V exactly).
    lr, alpha, adapt = 0.05, 0.9, 7
    x, y = _data()
    ours, theirs = _net(), _net()
    opt = samplers.get(name)(ours.parameters(), lr=lr, num_data=64, temperature=0.0,
                             alpha=alpha, preconditioner=preconditioner,
                             adapt_steps=adapt)  # fmt: skip
    ref = torch.optim.RMSprop(theirs.parameters(), lr=lr, alpha=alpha, eps=1e-8)
    post_ours = Posterior(ours, num_data=64, temperature=0.0)
    post_ref = Posterior(theirs, num_data=64, temperature=0.0)
    for t in range(20):
        xb, yb = x[16 * (t % 4) : 16 * (t % 4 + 1)], y[16 * (t % 4) : 16 * (t % 4 + 1)]
        opt.step(post_ours.closure(xb, yb))
        ref.zero_grad()
        post_ref.potential(xb, yb).backward()
        if t == 0:
            for p in theirs.parameters():
                ref.state[p] = {"step": torch.tensor(0.0), "square_avg": first_square_avg(p.grad)}
        if preconditioner == "frozen" and t == adapt:
            ref.param_groups[0]["alpha"] = 1.0
        ref.step()
        for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
            assert torch.equal(a, b), f"departs from RMSprop at step {t}"


def test_frozen_average_does_not_move_after_adapt_steps():
    model = _net()
    opt = samplers.PSGLD(model.parameters(), lr=0.01, num_data=64, adapt_steps=3,
                         generator=torch.Generator().manual_seed(0))  # fmt: skip
    x, y = _data()
    post = Posterior(model, num_data=64)
    frozen = None
    for t in range(8):
        opt.step(post.closure(x[8 * t : 8 * t + 8], y[8 * t : 8 * t + 8]))
        avgs = [opt.state[p]["square_avg"].clone() for p in model.parameters()]
        if t == 2:
            frozen = avgs
        assert opt.stats()["preconditioner_frozen"] == float(t >= 3)
        if t > 2:
            assert all(torch.equal(a, b) for a, b in zip(avgs, frozen, strict=True))


def test_frozen_mode_needs_adapt_steps_and_a_burn_in():
    w = torch.zeros(2, requires_grad=True)
    opt = samplers.PSGLD([w], lr=0.1, num_data=10)

    def closure():
        (w**2).sum().backward()
        return torch.zeros(())

    with pytest.raises(ValueError, match="adapt_steps"):
        opt.step(closure)
    with pytest.raises(ValueError, match="burn_in"):
        opt.bind_schedule(0, 10, 1)
    opt.bind_schedule(25, 10, 1)  # the first half of the burn-in adapts, the rest settles
    assert opt.param_groups[0]["adapt_steps"] == 12
    assert opt.config()["adapt_steps"] == 12
    explicit = samplers.PSGLD([w], lr=0.1, num_data=10, adapt_steps=7)
    explicit.bind_schedule(25, 10, 1)
    assert explicit.param_groups[0]["adapt_steps"] == 7
    adaptive = samplers.PSGLD([w], lr=0.1, num_data=10, preconditioner="adaptive")
    adaptive.bind_schedule(0, 10, 1)
    assert adaptive.param_groups[0]["adapt_steps"] is None
    with pytest.raises(ValueError, match="preconditioner"):
        samplers.PSGLD([w], lr=0.1, num_data=10, preconditioner="fixed")
    with pytest.raises(ValueError, match="adapt_steps"):
        samplers.PSGLD([w], lr=0.1, num_data=10, adapt_steps=0)


def test_run_engine_binds_adapt_steps_to_half_the_burn_in(tmp_path):
    out = tmp_path / "run"
    budget = ["--chains", "1", "--draws", "3", "--burn-in", "4", "--thin", "1", "--lr", "1e-3"]
    assert cli.main(["run", "--sampler", "psgld", *budget, "--no-progress", "--no-report",
                     "--replicates", "2", "--output", str(out)]) == 0  # fmt: skip
    tr = btrace.load(out / "trace.nc")
    assert btrace.trace_attrs(tr)["adapt_steps"] == 2
    assert btrace.trace_attrs(tr)["preconditioner"] == "frozen"
    frozen = btrace.groups(tr)["sample_stats"]["preconditioner_frozen"].values
    assert np.all(frozen == 1.0)
