"""Diagnostics recorded per draw through bayesflat.sample: values, cost, temperatures."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

import bayesflat
from bayesflat import trace as btrace
from bayesflat.diagnostics import (
    DIAGNOSTIC_NAMES,
    Budget,
    HessianOperator,
    diagnostic_stats,
    recorded_names,
)
from bayesflat.diagnostics.report import diagnose
from bayesflat.target.torch import Posterior


def _toy(n: int = 48, d: int = 3, k: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x @ torch.randn(d, k, generator=g) + 0.5 * torch.randn(n, k, generator=g)).argmax(1)
    return x, y


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))  # d = 31


BUDGET = Budget(subsample=32, hutchinson_probes=6, lanczos_steps=8, rwp_samples=3)


def _run(stats_fns=None, **kw):
    x, y = _toy()
    args = dict(sampler="fsgld", chains=2, burn_in=10, draws=3, thin=2, batch_size=16, seed=1,
                progress=False, lr=0.05, stats_fns=stats_fns)  # fmt: skip
    args.update(kw)
    return bayesflat.sample(_model(), (x, y), **args)


def _load_draw(model: nn.Module, posterior, chain: int, draw: int) -> nn.Module:
    state = {k: torch.from_numpy(np.asarray(posterior[k].values[chain, draw])) for k in
             model.state_dict()}  # fmt: skip
    model.load_state_dict(state)
    return model


def test_recorded_through_sample_with_the_right_shapes_and_cost():
    x, y = _toy()
    fns = diagnostic_stats(data=(x, y), budget=BUDGET, seed=2)
    assert list(fns) == list(recorded_names())
    stats = btrace.groups(_run(fns))["sample_stats"]
    for name in recorded_names():
        values = stats[name].transpose("chain", "draw").values
        assert values.shape == (2, 3), name
        assert np.all(np.isfinite(values)), name
    assert np.all(stats["theta_dot_grad_dim"].values == 31)
    assert np.all(stats["hessian_trace_stderr"].values > 0)
    # fSGLD's own perturbation scale is used for the gap
    np.testing.assert_array_equal(stats["rwp_sigma"].values, stats["sigma"].values)
    assert BUDGET.hvps(DIAGNOSTIC_NAMES) == 6 + 8
    assert np.all(stats["diagnostic_hvps"].values == 6 + 8)
    assert BUDGET.cost(DIAGNOSTIC_NAMES) == {"hvps": 14, "forward_passes": 7, "gradients": 1}


def test_budget_bounds_the_hessian_vector_products(monkeypatch):
    calls = []
    matvec = HessianOperator.matvec

    def counting(self, v):
        calls.append(self.dim)
        return matvec(self, v)

    monkeypatch.setattr(HessianOperator, "matvec", counting)
    x, y = _toy()
    for names, per_draw in [(("hessian_trace",), 6), (("top_eigenvalue", "rwp_gap"), 8),
                            (("configurational_temperature",), 0)]:  # fmt: skip
        calls.clear()
        stats = btrace.groups(_run(diagnostic_stats(names, data=(x, y), budget=BUDGET)))
        assert len(calls) == 2 * 3 * per_draw == 2 * 3 * BUDGET.hvps(names), names
        assert np.all(stats["sample_stats"]["diagnostic_hvps"].values == per_draw)


def test_recording_leaves_the_chain_unchanged():
    x, y = _toy()
    plain = btrace.groups(_run())["weights"]
    recorded = btrace.groups(_run(diagnostic_stats(data=(x, y), budget=BUDGET)))["weights"]
    for name in plain.data_vars:
        np.testing.assert_array_equal(plain[name].values, recorded[name].values)


def test_recorded_values_match_the_draws():
    x, y = _toy()
    budget = Budget(subsample=None, hutchinson_probes=8, lanczos_steps=31, rwp_samples=2)
    groups = btrace.groups(_run(diagnostic_stats(data=(x, y), budget=budget, prior=2.0),
                                prior=2.0))  # fmt: skip
    stats, posterior = groups["sample_stats"], groups["weights"]
    for c in range(2):
        for s in range(3):
            model = _load_draw(_model(), posterior, c, s)
            # theta . grad L of the full potential, prior N(0, 2^2) included, N = 48
            loss = Posterior(model, num_data=48, prior=2.0).potential(x, y)
            params = list(model.parameters())
            grads = torch.autograd.grad(loss, params)
            dot = sum(float((p.detach() * g).sum()) for p, g in zip(params, grads, strict=True))
            assert stats["theta_dot_grad"].values[c, s] == pytest.approx(dot, rel=1e-5, abs=1e-7)
            hess = HessianOperator(model, (x, y)).dense()
            eig = np.linalg.eigvalsh(hess)
            # Lanczos run to d = 31 steps is exact up to round-off
            assert stats["top_eigenvalue"].values[c, s] == pytest.approx(eig[-1], rel=1e-6)
            # Hutchinson with Rademacher probes: variance 2 (||H||_F^2 - sum H_ii^2) / probes
            se = math.sqrt(2 * (np.sum(hess**2) - np.sum(np.diag(hess) ** 2)) / 8)
            assert abs(stats["hessian_trace"].values[c, s] - np.trace(hess)) <= 4 * se


def test_rwp_gap_needs_a_scale_when_the_sampler_does_not_perturb():
    x, y = _toy()
    fns = diagnostic_stats(("rwp_gap",), data=(x, y), budget=BUDGET)
    with pytest.raises(bayesflat.SamplingError, match="draw 0 failed: ValueError: .*rwp_sigma"):
        _run(fns, sampler="sgld")
    fns = diagnostic_stats(("rwp_gap",), data=(x, y), budget=Budget(rwp_sigma=0.01))
    stats = btrace.groups(_run(fns, sampler="sgld"))["sample_stats"]
    assert np.all(stats["rwp_sigma"].values == 0.01)
    assert np.all(np.isfinite(stats["rwp_gap"].values))


def test_bad_arguments_name_the_fix():
    x, y = _toy()
    with pytest.raises(ValueError, match="names must be"):
        diagnostic_stats(("hessian_trace", "sharpness"), data=(x, y))
    with pytest.raises(ValueError, match="Budget.hutchinson_probes"):
        Budget(hutchinson_probes=1)
    with pytest.raises(ValueError, match="Budget.rwp_sigma"):
        Budget(rwp_sigma=-1.0)
    with pytest.raises(TypeError, match="data must be"):
        diagnostic_stats(data=x)
    with pytest.raises(TypeError, match="budget must be a Budget"):
        diagnostic_stats(data=(x, y), budget={"subsample": 10})
    with pytest.raises(ValueError, match="likelihood"):
        diagnostic_stats(data=(x, y), likelihood="poisson")


def test_configurational_temperature_on_the_gaussian_posterior():
    # Bayesian linear regression, unit noise, prior N(0, I), no intercept: the tempered
    # posterior is Gaussian with precision Lam / T, Lam = X'X + I. Full-batch SGLD on the
    # mean loss has drift matrix A = Lam / N; its exact stationary law (a discrete Lyapunov
    # equation, diagonal in A's eigenbasis a_i) has covariance (T / N) / (a_i (1 - lr a_i/2))
    # around the posterior mean, so E[N theta . grad L / d] = T mean_i 1 / (1 - lr a_i / 2).
    n, d, temperature, lr = 400, 32, 0.5, 0.02
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=g)
    y = torch.randn(n, 1, generator=g)  # true weights 0: a small posterior mean, low variance
    torch.manual_seed(0)
    model = nn.Linear(d, 1, bias=False)
    fns = diagnostic_stats(("configurational_temperature",), data=(x, y),
                           likelihood="gaussian", prior=1.0)  # fmt: skip
    trace = bayesflat.sample(
        model, (x, y), sampler="sgld", chains=4, burn_in=200, draws=250, thin=10,
        batch_size=n, lr=lr, temperature=temperature, likelihood="gaussian", prior=1.0,
        progress=False, seed=0, stats_fns=fns,
    )  # fmt: skip
    a = np.linalg.eigvalsh((x.T @ x).double().numpy() + np.eye(d)) / n
    expected = temperature * np.mean(1.0 / (1.0 - lr * a / 2.0))
    assert expected == pytest.approx(temperature, rel=0.02)  # discretisation bias below 2%
    (row,) = diagnose(trace).section("temperature")
    assert row.name == "configurational"
    t_conf, mcse = row.values["estimate"], row.values["mcse"]
    assert 0 < mcse < 0.05 * temperature
    assert abs(t_conf - expected) <= 4 * mcse
    assert row.verdict == "pass"
