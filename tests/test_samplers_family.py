"""The Langevin family: pSGLD, SGHMC, their fSGLD variants, cyclical SG-MCMC and Entropy-MCMC.

Every sampler is checked three ways:

- at ``T = 0`` it is its optimiser, bit for bit (``torch.equal``) against ``torch.optim``;
- on a Gaussian target (quadratic potential ``L(w) = w'Hw/2 - b'w`` in mean-loss units) each
  step is a linear Gaussian recursion ``z <- A z + c + e``, so the law of the chain is known
  exactly: the stationary law for the time-homogeneous samplers, the finite-time law for the
  cyclical ones. Thousands of independent chains (rows of one weight, see ``harness``) are
  compared with it at Bonferroni-corrected z-bounds;
- it runs through the driver and the command line, with its own sample statistics.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from harness import (
    GaussianLaw,
    assert_gaussian_moments,
    linear_recursion_law,
    posterior_gaussian_law,
    propagate_gaussian_law,
    rows_closure,
    run_chains,
    sample_rows,
    z_bound,
)
from scipy import linalg
from torch import nn

import bayesflat
from bayesflat import cli, samplers
from bayesflat import trace as btrace
from bayesflat.report import build_report
from bayesflat.samplers import coupled_sigma
from bayesflat.target.torch import Posterior

NEW_NAMES = ("psgld", "fpsgld", "sghmc", "fsghmc", "csgld", "csghmc", "cfsgld", "emcmc")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The tensors are tiny: a second intra-op thread only oversubscribes the shared cores.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# The Gaussian target: mean-loss Hessian H, linear term b, N examples, T = 1.
H = np.array([[2.0, 0.6], [0.6, 1.0]])
B = np.array([1.0, -0.5])
N = 50
T = 1.0
CHAINS = 4000
D = 2
EYE = np.eye(D)


def _potential(w: torch.Tensor) -> torch.Tensor:
    h = torch.as_tensor(H, dtype=w.dtype)
    b = torch.as_tensor(B, dtype=w.dtype)
    return 0.5 * ((w @ h) * w).sum(dim=1) - w @ b


def _init() -> torch.Tensor:
    return torch.zeros(CHAINS, D, dtype=torch.float64)


def _stationary_law(transition, offset, noise) -> tuple[GaussianLaw, int]:
    """Stationary law of a recursion, and steps after which chains from 0 have reached it.

    The step count makes ``rho(A)^n < e^-20``; the exact law after that many steps from the
    origin (propagated step by step) is checked to agree with the stationary one to ``1e-6``
    of its scale, so the draws may be compared with either.
    """
    law = linear_recursion_law(transition, offset, noise)
    rho = float(np.max(np.abs(linalg.eigvals(transition))))
    steps = math.ceil(20.0 / -math.log(rho))
    now = GaussianLaw(np.zeros_like(law.mean), np.zeros_like(law.cov))
    for _ in range(steps):
        now = propagate_gaussian_law(now, transition, offset, noise)
    scale = float(np.min(np.diag(law.cov)))
    assert np.max(np.abs(now.mean - law.mean)) < 1e-6 * math.sqrt(scale)
    assert np.max(np.abs(now.cov - law.cov)) < 1e-6 * scale
    return law, steps


def _marginal(law: GaussianLaw, index: slice) -> GaussianLaw:
    return GaussianLaw(law.mean[index], law.cov[index, index])


# -- linear recursions of each dynamics on the quadratic -------------------------------------------


def _preconditioned_recursion(lr: float, g: np.ndarray, temperature: float, grad_cov=None):
    """pSGLD, fixed diagonal ``G``: ``w <- w - lr G (Hw - b + zeta) + sqrt(2 lr T G/N) xi``."""
    gm = np.diag(g)
    q = 2.0 * lr * temperature / N * gm
    if grad_cov is not None:
        q = q + lr**2 * gm @ grad_cov @ gm
    return EYE - lr * gm @ H, lr * gm @ B, q


def _sghmc_recursion(lr: float, alpha: float, temperature: float, grad_cov=None):
    """SGHMC in torch's momentum units, state ``z = (theta, b)``.

    ``b <- (1 - alpha) b + (H theta - b_vec + zeta) + k xi``, ``theta <- theta - lr b``, with
    ``k = sqrt(2 alpha T / (N lr))``: the kicks on ``(theta, b)`` are ``(-lr u, u)`` for
    ``u = zeta + k xi``.
    """
    m = 1.0 - alpha
    transition = np.block([[EYE - lr * H, -lr * m * EYE], [H, m * EYE]])
    offset = np.concatenate([lr * B, -B])
    u = 2.0 * alpha * temperature / (N * lr) * EYE
    if grad_cov is not None:
        u = u + grad_cov
    noise = np.block([[lr**2 * u, -lr * u], [-lr * u, u]])
    return transition, offset, noise


def _emcmc_recursion(lr: float, coupling: float, temperature: float):
    """Entropy-MCMC, state ``z = (theta, theta_a)``, ``c = 1 / (eta N)``."""
    c = 1.0 / (coupling * N)
    transition = np.block(
        [[EYE - lr * (H + c * EYE), lr * c * EYE], [lr * c * EYE, (1 - lr * c) * EYE]]
    )
    offset = np.concatenate([lr * B, np.zeros(D)])
    return transition, offset, 2.0 * lr * temperature / N * np.eye(2 * D)


# -- registry --------------------------------------------------------------------------------------


def test_registry_holds_the_family():
    names = samplers.available()
    for name in NEW_NAMES:
        assert name in names
        entry = samplers.entry(name)
        assert entry.is_sampler and entry.summary and entry.reference
        assert entry.cls.name == name
        assert entry.cls.__doc__ and "References" in entry.cls.__doc__


# -- T = 0 is the optimiser, bit for bit -----------------------------------------------------------


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=g)
    y = torch.randint(0, 3, (64,), generator=g)
    return x, y


def _net() -> nn.Module:
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def _cosine(lr0: float, t: int, length: int) -> float:
    return lr0 * (0.5 * (math.cos(math.pi * (t % length) / length) + 1.0))


LR = 0.05

T0_CASES = {
    # name: (sampler options, torch optimiser on the same parameters, lr at step t)
    # (psgld and fpsgld start their average at the first squared gradient: test_psgld.py)
    "sghmc": ({}, lambda p: torch.optim.SGD(p, lr=LR, momentum=0.9), None),
    "fsghmc": ({"alpha": 0.3}, lambda p: torch.optim.SGD(p, lr=LR, momentum=0.7), None),
    "csgld": ({"total_steps": 24, "cycles": 3},
              lambda p: torch.optim.SGD(p, lr=LR), lambda t: _cosine(LR, t, 8)),
    "csghmc": ({"total_steps": 24, "cycles": 3},
               lambda p: torch.optim.SGD(p, lr=LR, momentum=0.9), lambda t: _cosine(LR, t, 8)),
    "cfsgld": ({"total_steps": 24, "cycles": 3},
               lambda p: torch.optim.SGD(p, lr=LR), lambda t: _cosine(LR, t, 8)),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(T0_CASES))
def test_zero_temperature_is_the_optimiser(name):
    options, make_reference, lr_at = T0_CASES[name]
    x, y = _data()
    ours, theirs = _net(), _net()
    gen = torch.Generator().manual_seed(5)
    opt = samplers.get(name)(
        ours.parameters(), lr=LR, num_data=64, temperature=0.0, generator=gen, **options
    )
    ref = make_reference(theirs.parameters())
    post_ours = Posterior(ours, num_data=64, temperature=0.0)
    post_ref = Posterior(theirs, num_data=64, temperature=0.0)
    state = gen.get_state()
    for t in range(30):  # beyond total_steps for the cyclical ones: the cycles repeat
        xb, yb = x[16 * (t % 4) : 16 * (t % 4 + 1)], y[16 * (t % 4) : 16 * (t % 4 + 1)]
        opt.step(post_ours.closure(xb, yb))
        if lr_at is not None:
            for group in ref.param_groups:
                group["lr"] = lr_at(t)
        ref.zero_grad()
        post_ref.potential(xb, yb).backward()
        ref.step()
        for a, b in zip(ours.parameters(), theirs.parameters(), strict=True):
            assert torch.equal(a, b), f"{name} departs from its optimiser at step {t}"
    assert torch.equal(gen.get_state(), state), "T = 0 must draw no noise"


def test_emcmc_zero_temperature_is_sgd_on_the_joint_potential():
    # Flat prior: with a Gaussian prior autograd would sum three gradient terms of theta in an
    # order of its own, so the last bit could differ while the arithmetic is the same.
    x, y = _data()
    ours, theirs = _net(), _net()
    guide = copy.deepcopy(theirs)
    coupling = 3e-3
    opt = samplers.EMCMC(ours.parameters(), lr=LR, num_data=64, temperature=0.0,
                         coupling=coupling)  # fmt: skip
    ref = torch.optim.SGD([*theirs.parameters(), *guide.parameters()], lr=LR)
    post_ours = Posterior(ours, num_data=64, temperature=0.0, prior=None)
    post_ref = Posterior(theirs, num_data=64, temperature=0.0, prior=None)
    half_c = 0.5 / (coupling * 64)
    for t in range(30):
        xb, yb = x[16 * (t % 4) : 16 * (t % 4 + 1)], y[16 * (t % 4) : 16 * (t % 4 + 1)]
        opt.step(post_ours.closure(xb, yb))
        ref.zero_grad()
        joint = post_ref.potential(xb, yb) + half_c * sum(
            ((p - q) ** 2).sum()
            for p, q in zip(theirs.parameters(), guide.parameters(), strict=True)
        )
        joint.backward()
        ref.step()
    for p, q, g in zip(ours.parameters(), theirs.parameters(), guide.parameters(), strict=True):
        assert torch.equal(p, q)
        assert torch.equal(opt.state[p]["guide"], g)
    assert opt.stats()["guide_distance"] > 0


# -- stationary laws on the Gaussian target --------------------------------------------------------


def _fixed_preconditioner(cls, g_diag: np.ndarray, lr: float):
    """A pSGLD-type sampler whose ``V`` is fixed at ``(1/g - eps)^2`` from the first step.

    ``alpha = 1`` keeps the one adapting step (``adapt_steps=1``) from moving it.
    """
    eps = 1e-8
    v = torch.as_tensor((1.0 / g_diag - eps) ** 2, dtype=torch.float64)

    def make(params):
        opt = cls(params, lr=lr, num_data=N, temperature=T, alpha=1.0, eps=eps, adapt_steps=1,
                  generator=torch.Generator().manual_seed(11))  # fmt: skip
        opt.state[params[0]]["square_avg"] = v.expand(CHAINS, D).clone()
        return opt

    return make


def test_psgld_with_fixed_preconditioner_has_the_exact_lyapunov_law():
    # With V frozen the Gamma term vanishes and the chain is w <- w - lr G (Hw - b) +
    # sqrt(2 lr T/N G) xi: stationary mean H^-1 b, covariance from S = A S A' + 2 lr T/N G.
    g = np.array([0.5, 2.0])
    lr = 0.1
    transition, offset, noise = _preconditioned_recursion(lr, g, T)
    law, steps = _stationary_law(transition, offset, noise)
    draws = sample_rows(_fixed_preconditioner(samplers.PSGLD, g, lr), _potential, _init(),
                        num_steps=steps)  # fmt: skip
    assert_gaussian_moments(draws, law)
    # Drift lr G g with noise variance 2 lr T G / N targets the posterior: as lr -> 0 the
    # law tends to N(H^-1 b, T/N H^-1) (a noise scale of G instead of sqrt(G) would not).
    limit = linear_recursion_law(*_preconditioned_recursion(1e-4, g, T))
    post = posterior_gaussian_law(H, B, temperature=T, num_data=N)
    np.testing.assert_allclose(limit.mean, post.mean, rtol=1e-10)
    np.testing.assert_allclose(limit.cov, post.cov, rtol=1e-3)


def test_fpsgld_with_fixed_preconditioner_adds_the_perturbation_noise():
    # Perturbed gradient on a quadratic: H (w + sigma eps) - b, gradient noise sigma^2 H^2,
    # with the coupled sigma = (T/N)^((1 + eta)/4).
    g = np.array([0.5, 2.0])
    lr = 0.1
    sigma = coupled_sigma(T, N, 0.1)
    transition, offset, noise = _preconditioned_recursion(lr, g, T, sigma**2 * H @ H)
    law, steps = _stationary_law(transition, offset, noise)
    draws = sample_rows(_fixed_preconditioner(samplers.FPSGLD, g, lr), _potential, _init(),
                        num_steps=steps)  # fmt: skip
    assert_gaussian_moments(draws, law)
    without = linear_recursion_law(*_preconditioned_recursion(lr, g, T))
    assert np.all(np.diag(law.cov) > 1.05 * np.diag(without.cov))  # the check has power


def test_sghmc_stationary_law_and_kinetic_temperature():
    lr, alpha = 0.02, 0.1
    law, steps = _stationary_law(*_sghmc_recursion(lr, alpha, T))
    made = []

    def make(params):
        made.append(samplers.SGHMC(params, lr=lr, num_data=N, temperature=T, alpha=alpha,
                                   generator=torch.Generator().manual_seed(12)))  # fmt: skip
        return made[0]

    weights = _init().requires_grad_(True)
    draws = run_chains(make, weights, rows_closure(weights, _potential), num_steps=steps)
    opt = made[0]
    momentum = opt.state[weights]["momentum_buffer"].numpy()
    joint = np.concatenate([draws, momentum], axis=1)
    assert_gaussian_moments(joint, law)
    # kinetic_temperature = N (2 - alpha) mean(v^2) / (2 lr), v = -lr b: its expectation from
    # the exact law, its standard error from the iid rows.
    per_row = N * (2 - alpha) * lr * (momentum**2).mean(axis=1) / 2
    expected = N * (2 - alpha) * lr * np.mean(np.diag(law.cov)[D:]) / 2
    stat = opt.stats()["kinetic_temperature"]
    assert stat == pytest.approx(per_row.mean(), rel=1e-9)
    z = (stat - expected) / (per_row.std(ddof=1) / math.sqrt(CHAINS))
    assert abs(z) < z_bound(1), f"kinetic temperature {stat:.4f} vs {expected:.4f} (z = {z:.2f})"
    # ... which is T (2 - alpha) / (2 - alpha - lr k / 2) averaged over the curvatures k of H,
    # the discretisation bias stated by diagnostics.convergence.kinetic_temperature.
    bias = np.mean((2 - alpha) / (2 - alpha - lr * np.linalg.eigvalsh(H) / 2))
    assert expected == pytest.approx(T * bias, rel=1e-9)


def test_fsghmc_stationary_law_includes_the_perturbation_noise():
    lr, alpha = 0.02, 0.2
    sigma = coupled_sigma(T, N, 0.1)
    joint, steps = _stationary_law(*_sghmc_recursion(lr, alpha, T, sigma**2 * H @ H))
    law = _marginal(joint, slice(0, D))

    def make(params):
        return samplers.FSGHMC(params, lr=lr, num_data=N, temperature=T, alpha=alpha,
                               generator=torch.Generator().manual_seed(13))  # fmt: skip

    assert_gaussian_moments(sample_rows(make, _potential, _init(), num_steps=steps), law)


def test_emcmc_joint_stationary_law():
    lr, coupling = 0.15, 0.02
    law, steps = _stationary_law(*_emcmc_recursion(lr, coupling, T))
    made = []

    def make(params):
        made.append(samplers.EMCMC(params, lr=lr, num_data=N, temperature=T, coupling=coupling,
                                   generator=torch.Generator().manual_seed(14)))  # fmt: skip
        return made[0]

    weights = _init().requires_grad_(True)
    draws = run_chains(make, weights, rows_closure(weights, _potential), num_steps=steps)
    guide = made[0].state[weights]["guide"].numpy()
    assert_gaussian_moments(np.concatenate([draws, guide], axis=1), law)
    distance = made[0].stats()["guide_distance"]
    assert distance == pytest.approx(np.linalg.norm(draws - guide), rel=1e-9)


def test_emcmc_law_tends_to_the_posterior_and_its_smoothed_guide():
    # As lr -> 0: theta ~ N(H^-1 b, T/N H^-1) exactly (the posterior is theta's marginal),
    # theta_a ~ the posterior convolved with N(0, eta T I).
    coupling = 0.02
    law = linear_recursion_law(*_emcmc_recursion(1e-4, coupling, T))
    post = posterior_gaussian_law(H, B, temperature=T, num_data=N)
    np.testing.assert_allclose(law.mean, np.concatenate([post.mean, post.mean]), atol=1e-10)
    np.testing.assert_allclose(law.cov[:D, :D], post.cov, rtol=2e-3)
    np.testing.assert_allclose(law.cov[D:, D:], post.cov + coupling * T * EYE, rtol=2e-3)
    np.testing.assert_allclose(law.cov[:D, D:], post.cov, rtol=2e-3)


# -- cyclical SG-MCMC: finite-time laws ------------------------------------------------------------


CYCLE_K, CYCLE_M, CYCLE_BETA = 240, 3, 0.5
# Cycles of 80 steps; the last sampling phase starts at step 200. Three steps into it the law
# still remembers the noiseless exploration, so a noisy exploration would be detected.
CYCLE_STOP = 203


def _cyclical_law(step_recursion, state_dim: int, *, noisy_exploration: bool = False):
    """Exact law after ``CYCLE_STOP`` steps from the origin (T = 0 while exploring)."""
    length = math.ceil(CYCLE_K / CYCLE_M)
    law = GaussianLaw(np.zeros(state_dim), np.zeros((state_dim, state_dim)))
    for t in range(CYCLE_STOP):
        sampling = noisy_exploration or (t % length) / length >= CYCLE_BETA
        law = propagate_gaussian_law(law, *step_recursion(t, length, T if sampling else 0.0))
    return _marginal(law, slice(0, D))


def _assert_cyclical_law(make, recursion, state_dim: int) -> None:
    law = _cyclical_law(recursion, state_dim)
    draws = sample_rows(make, _potential, _init(), num_steps=CYCLE_STOP)
    assert_gaussian_moments(draws, law)
    wrong = _cyclical_law(recursion, state_dim, noisy_exploration=True)
    se = np.diag(law.cov) * math.sqrt(2.0 / (CHAINS - 1))
    assert np.max(np.abs(np.diag(wrong.cov) - np.diag(law.cov)) / se) > 3 * z_bound(5)


def test_csgld_finite_time_law():
    lr0 = 0.2

    def recursion(t, length, temperature):
        lr = _cosine(lr0, t, length)
        return EYE - lr * H, lr * B, 2.0 * lr * temperature / N * EYE

    def make(params):
        return samplers.CSGLD(params, lr=lr0, num_data=N, temperature=T, cycles=CYCLE_M,
                              exploration=CYCLE_BETA, total_steps=CYCLE_K,
                              generator=torch.Generator().manual_seed(15))  # fmt: skip

    _assert_cyclical_law(make, recursion, D)


def test_csghmc_finite_time_law():
    lr0, alpha = 0.05, 0.1

    def recursion(t, length, temperature):
        return _sghmc_recursion(_cosine(lr0, t, length), alpha, temperature)

    def make(params):
        return samplers.CSGHMC(params, lr=lr0, num_data=N, temperature=T, alpha=alpha,
                               cycles=CYCLE_M, exploration=CYCLE_BETA, total_steps=CYCLE_K,
                               generator=torch.Generator().manual_seed(16))  # fmt: skip

    _assert_cyclical_law(make, recursion, 2 * D)


# -- cyclical SG-MCMC: phases, planning, the driver ------------------------------------------------


def test_exploration_is_sgd_and_draws_no_noise():
    # Cycles of 10 steps, beta = 0.8: steps 0..7 explore (T = 0), 8 and 9 sample at T = 1.
    x, y = _data()
    ours, theirs = _net(), _net()
    gen = torch.Generator().manual_seed(3)
    opt = samplers.CSGLD(ours.parameters(), lr=LR, num_data=64, temperature=1.0,
                         total_steps=40, cycles=4, generator=gen)  # fmt: skip
    ref = torch.optim.SGD(theirs.parameters(), lr=LR)
    post_ours, post_ref = Posterior(ours, num_data=64), Posterior(theirs, num_data=64)
    state = gen.get_state()
    for t in range(8):
        opt.step(post_ours.closure(x[:16], y[:16]))
        assert not opt.collecting()
        assert opt.stats()["temperature"] == 0.0 and opt.stats()["cycle_phase"] == t / 10
        ref.param_groups[0]["lr"] = _cosine(LR, t, 10)
        ref.zero_grad()
        post_ref.potential(x[:16], y[:16]).backward()
        ref.step()
    assert all(
        torch.equal(a, b) for a, b in zip(ours.parameters(), theirs.parameters(), strict=True)
    )
    assert torch.equal(gen.get_state(), state)
    opt.step(post_ours.closure(x[:16], y[:16]))
    assert opt.collecting() and opt.stats()["temperature"] == 1.0
    assert not torch.equal(gen.get_state(), state)


def _csgld(**options):
    w = torch.zeros(3, requires_grad=True)
    return samplers.CSGLD([w], lr=0.1, num_data=10, **options)


def test_planned_steps_fix_the_cycle_length():
    # 2 draws, thin 1, burn-in 5, M = 4, beta = 0.8 (the command-line smoke budget): the
    # shortest cycle with enough sampling steps after step 5 is L = 5 (sampling at j = 4).
    opt = _csgld()
    assert opt.planned_steps(5, 2, 1) == 15  # sampling steps 9 and 14
    assert opt.total_steps == 20
    # 100 draws x thin 10 over 4 cycles at beta = 0.8: 250 sampling steps per cycle.
    opt = _csgld()
    planned = opt.planned_steps(0, 100, 10)
    assert opt.total_steps == 4 * 1250 and planned == 5000
    assert sum(opt.is_sampling(t) for t in range(planned)) == 1000


def test_planned_steps_with_explicit_total_repeat_the_cycles():
    opt = _csgld(total_steps=20, cycles=2, exploration=0.5)  # L = 10, sampling j = 5..9
    assert opt.planned_steps(0, 5, 1) == 10
    assert opt.planned_steps(0, 12, 1) == 27  # 10 in cycles 0-1, two more in the repeat
    assert opt.planned_steps(12, 3, 1) == 18
    assert opt.total_steps == 20


def test_sample_keeps_draws_only_in_sampling_phases():
    x, y = _data()
    tr = bayesflat.sample(_net(), (x, y), sampler="csgld", chains=2, burn_in=0, draws=8,
                         thin=3, batch_size=16, progress=False, lr=LR, temperature=1.0)  # fmt: skip
    stats = btrace.groups(tr)["sample_stats"]
    steps = stats["step"].values.astype(int)
    # 24 sampling steps over 4 cycles at beta = 0.8: L = 30, sampling j = 24..29.
    length, beta = 30, 0.8
    assert np.all((steps % length) / length >= beta)
    np.testing.assert_array_equal(steps[0], [26, 29, 56, 59, 86, 89, 116, 119])
    np.testing.assert_array_equal(stats["cycle"].values[0], [0, 0, 1, 1, 2, 2, 3, 3])
    np.testing.assert_allclose(stats["cycle_phase"].values, (steps % length) / length)
    np.testing.assert_allclose(
        stats["step_size"].values, LR * 0.5 * (np.cos(np.pi * (steps % length) / length) + 1)
    )
    assert np.all(stats["temperature"].values == 1.0)
    attrs = btrace.trace_attrs(tr)
    assert attrs["cycles"] == 4 and attrs["exploration"] == 0.8 and attrs["base_lr"] == LR


def test_cyclical_rejects_bad_settings():
    with pytest.raises(ValueError, match="exploration"):
        _csgld(exploration=1.0)
    with pytest.raises(ValueError, match="cycles"):
        _csgld(cycles=0)
    with pytest.raises(ValueError, match="no sampling step"):
        _csgld(total_steps=8, cycles=4)  # cycles of 2 steps, j / 2 >= 0.8 never holds
    with pytest.raises(ValueError, match="lr must be a number"):
        w = torch.zeros(2, requires_grad=True)
        samplers.CSGLD([w], lr=lambda t: 0.1, num_data=10)
    opt = _csgld()
    with pytest.raises(ValueError, match="planned_steps"):
        opt.step(lambda: torch.zeros(()))


@pytest.mark.parametrize("name", ["csgld", "csghmc", "cfsgld"])
def test_cyclical_refuses_a_torch_lr_scheduler(name):
    x, y = _data()
    model = _net()
    post = Posterior(model, num_data=64)
    opt = samplers.get(name)(model.parameters(), lr=LR, num_data=64, total_steps=24, cycles=3)
    torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="lr_scheduler.*overridden silently"):
        opt.step(post.closure(x, y))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before, strict=True))
    # an lr written by hand between steps is refused the same way
    fresh = samplers.get(name)(model.parameters(), lr=LR, num_data=64, total_steps=24, cycles=3)
    fresh.step(post.closure(x, y))
    fresh.param_groups[0]["lr"] = 0.5 * fresh.param_groups[0]["lr"]
    with pytest.raises(ValueError, match="changed from outside"):
        fresh.step(post.closure(x, y))


def test_torch_lr_scheduler_drives_a_numeric_lr():
    # the composition users want: a sampler with a number for lr follows the scheduler
    x, y = _data()
    model = _net()
    post = Posterior(model, num_data=64)
    opt = samplers.SGLD(model.parameters(), lr=LR, num_data=64)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for t in range(5):
        opt.step(post.closure(x, y))
        assert opt.stats()["step_size"] == LR * 0.5 ** (t // 2)
        scheduler.step()


# -- checkpoints, guide weights, validation --------------------------------------------------------


@pytest.mark.parametrize("name", NEW_NAMES)
def test_resuming_from_state_dict_continues_the_chain_exactly(name):
    x, y = _data()
    model = _net()
    first = samplers.get(name)(model.parameters(), lr=LR, num_data=64,
                               generator=torch.Generator().manual_seed(21))  # fmt: skip
    first.planned_steps(0, 10, 2)
    first.bind_schedule(16, 10, 2)  # pSGLD's preconditioner freezes after step 8, after resuming
    post = Posterior(model, num_data=64)
    for t in range(6):
        first.step(post.closure(x[8 * t : 8 * t + 8], y[8 * t : 8 * t + 8]))
    resumed_model = copy.deepcopy(model)
    second = samplers.get(name)(resumed_model.parameters(), lr=LR, num_data=64,
                                generator=torch.Generator().manual_seed(99))  # fmt: skip
    second.load_state_dict(copy.deepcopy(first.state_dict()))
    post2 = Posterior(resumed_model, num_data=64)
    for t in range(6, 14):
        xb, yb = x[4 * t : 4 * t + 4], y[4 * t : 4 * t + 4]
        first.step(post.closure(xb, yb))
        second.step(post2.closure(xb, yb))
    for a, b in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_emcmc_guide_state_dict_loads_into_a_model_copy():
    x, y = _data()
    model = _net()
    opt = samplers.EMCMC(model.parameters(), lr=LR, num_data=64, coupling=1e-3)
    post = Posterior(model, num_data=64)
    for _ in range(5):
        opt.step(post.closure(x, y))
    guide_weights = opt.guide_state_dict(model)
    assert list(guide_weights) == list(model.state_dict())
    guide = copy.deepcopy(model)
    guide.load_state_dict(guide_weights)
    for p, q in zip(model.parameters(), guide.parameters(), strict=True):
        assert torch.equal(q, opt.state[p]["guide"])
        assert not torch.equal(p, q)
    pairs = zip(model.parameters(), guide.parameters(), strict=True)
    squared = sum(float((p - q).detach().pow(2).sum()) for p, q in pairs)
    assert opt.stats()["guide_distance"] == pytest.approx(math.sqrt(squared), rel=1e-6)
    with pytest.raises(ValueError, match="no parameter"):
        opt.guide_state_dict(_net())


@pytest.mark.parametrize(
    "name, options, match",
    [
        ("psgld", {"alpha": 1.5}, "alpha"),
        ("psgld", {"eps": 0.0}, "eps"),
        ("fpsgld", {"eta": 1.0}, "eta"),
        ("sghmc", {"alpha": 0.0}, "alpha"),
        ("fsghmc", {"sigma": -0.1}, "sigma"),
        ("csghmc", {"alpha": 2.0}, "alpha"),
        ("emcmc", {"coupling": -1.0}, "coupling"),
    ],
)
def test_bad_hyperparameters_are_refused(name, options, match):
    w = torch.zeros(2, requires_grad=True)
    with pytest.raises(ValueError, match=match):
        samplers.get(name)([w], lr=0.1, num_data=10, **options)


# -- the command line ------------------------------------------------------------------------------


OWN_STATS = {
    "psgld": ("preconditioner_mean", "preconditioner_max"),
    "fpsgld": ("preconditioner_mean", "sigma"),
    "sghmc": ("kinetic_temperature",),
    "fsghmc": ("kinetic_temperature", "sigma"),
    "csgld": ("cycle", "cycle_phase"),
    "csghmc": ("cycle", "cycle_phase", "kinetic_temperature"),
    "cfsgld": ("cycle", "cycle_phase", "sigma"),
    "emcmc": ("guide_distance",),
}


@pytest.mark.parametrize("name", NEW_NAMES)
def test_command_line_runs_every_sampler(name, tmp_path):
    out = tmp_path / name
    budget = ["--chains", "1", "--draws", "2", "--burn-in", "5", "--thin", "1", "--replicates", "2"]
    # RMSprop-scaled steps: the generic lr 0.1 moves every weight by about 0.1 a step, and a
    # frozen preconditioner diverges there on the MLP (the adaptive one grows V instead).
    lr = ["--lr", "1e-3"] if name in ("psgld", "fpsgld") else []
    # The figures do not depend on the sampler (test_cli draws them for sgd and fsgld): the run
    # writes metrics.json only, and the page is rendered here without them.
    code = cli.main(["run", "--sampler", name, *budget, *lr, "--no-progress", "--no-report",
                     "--output", str(out)])  # fmt: skip
    assert code == 0
    tr = btrace.load(out / "trace.nc")
    assert name in build_report(tr, figures=False).to_html()
    stats = btrace.groups(tr)["sample_stats"]
    for key in OWN_STATS[name]:
        assert np.all(np.isfinite(stats[key].values)), key
    assert btrace.trace_attrs(tr)["sampler"] == name
