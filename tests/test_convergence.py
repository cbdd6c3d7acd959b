import math

import numpy as np
import pytest
import scipy.signal
import xarray as xr

from bayesflat.diagnostics import (
    DEFAULT_THRESHOLDS,
    configurational_temperature,
    convergence_table,
    functionals,
    kinetic_temperature,
    nll_per_draw,
    rhat_nested,
    true_class_probability,
    weight_projections,
)


def ar1(rng, rho, chains, draws):
    """Stationary Gaussian AR(1) with unit variance, shape (chains, draws)."""
    eps = rng.standard_normal((chains, draws)) * math.sqrt(1.0 - rho**2)
    eps[:, 0] = rng.standard_normal(chains)
    return scipy.signal.lfilter([1.0], [1.0, -rho], eps, axis=1)


def row(rows, name):
    (r,) = [r for r in rows if r.name == name]
    return r


# ---------------------------------------------------------------- R-hat, ESS, MCSE


def test_iid_chains_pass_with_rhat_near_one_and_ess_near_draws():
    rng = np.random.default_rng(0)
    rows, used = convergence_table({"x": rng.standard_normal((4, 1000))})
    (r,) = rows
    assert r.rhat < 1.01
    assert 0.8 * 4000 <= r.ess_bulk <= 1.25 * 4000
    assert 0.8 * 4000 <= r.ess_tail <= 1.25 * 4000
    # MCSE of the mean of iid N(0, 1) is 1/sqrt(4000); ArviZ uses the ESS estimate.
    assert r.mcse_mean == pytest.approx(1 / math.sqrt(4000), rel=0.15)
    assert r.verdict == "pass"
    assert used == {"rhat": 1.01, "ess_per_chain": 100.0, "ess": 400.0}


@pytest.mark.parametrize("seed", range(5))
def test_ess_of_iid_draws_is_near_the_number_of_draws(seed):
    # Over 200 seeds the bulk-ESS / 4000 of 4 x 1000 iid draws had mean 0.99 and sd 0.04,
    # so [0.8, 1.25] is about 5 standard deviations wide on each side.
    x = np.random.default_rng(seed).standard_normal((4, 1000))
    (r,), _ = convergence_table({"x": x})
    assert 0.8 <= r.ess_bulk / 4000 <= 1.25


@pytest.mark.parametrize(("rho", "tol"), [(0.5, 0.15), (0.9, 0.25)])
def test_ess_of_ar1_matches_its_integrated_autocorrelation(rho, tol):
    # ESS of the mean of a stationary AR(1) is n (1 - rho) / (1 + rho). The estimator's
    # spread, measured over 200 seeds at 4 x 10000 draws: relative sd 0.028 (rho 0.5) and
    # 0.058 (rho 0.9), in line with Sokal's var(tau)/tau^2 ~ 2 (2 M + 1) / n for a window
    # M of a few tau. The tolerances are about 5 and 4 of those sds.
    x = ar1(np.random.default_rng(1), rho, 4, 10_000)
    (r,), _ = convergence_table({"x": x})
    expected = x.size * (1 - rho) / (1 + rho)
    assert r.ess_bulk == pytest.approx(expected, rel=tol)


def test_chains_stuck_in_different_modes_warn():
    rng = np.random.default_rng(2)
    modes = np.array([-3.0, -3.0, 3.0, 3.0])[:, None]
    rows, _ = convergence_table(
        {"stuck": modes + rng.standard_normal((4, 1000)), "mixed": rng.standard_normal((4, 1000))}
    )
    assert row(rows, "stuck").rhat > 1.1
    assert row(rows, "stuck").verdict == "warn"
    assert row(rows, "mixed").verdict == "pass"


def test_verdict_uses_the_thresholds_it_returns():
    x = ar1(np.random.default_rng(3), 0.9, 4, 1000)  # ESS about 4000 / 19 = 210 < 400
    (r,), used = convergence_table({"x": x})
    assert r.ess_bulk < used["ess"] == 400.0
    assert r.verdict == "warn"
    (r,), used = convergence_table({"x": x}, thresholds={"ess_per_chain": 25})
    assert used == {**DEFAULT_THRESHOLDS, "ess_per_chain": 25, "ess": 100}
    assert r.verdict == "pass"
    with pytest.raises(ValueError, match="unknown thresholds"):
        convergence_table({"x": x}, thresholds={"ess_total": 10})


def test_a_single_chain_cannot_pass():
    (r,), _ = convergence_table({"x": np.random.default_rng(4).standard_normal((1, 1000))})
    assert r.verdict == "warn"


def test_table_rejects_mixed_shapes():
    with pytest.raises(ValueError, match="one shape"):
        convergence_table({"a": np.zeros((4, 10)), "b": np.zeros((4, 11))})


# ---------------------------------------------------------------- nested R-hat


def nested_rhat_reference(x, superchain_ids):
    """Margossian et al.'s nested R-hat written out with loops, for a (chain, draw) array."""
    labels = sorted(set(superchain_ids))
    members = [[c for c, s in enumerate(superchain_ids) if s == k] for k in labels]
    n_super, n_per, n_draws = len(members), len(members[0]), x.shape[1]

    chain_means = [[sum(x[c, n] for n in range(n_draws)) / n_draws for c in m] for m in members]
    super_means = [sum(cm) / n_per for cm in chain_means]
    overall = sum(super_means) / n_super
    b_nu = sum((s - overall) ** 2 for s in super_means) / (n_super - 1)

    w_nu = 0.0
    for k, m in enumerate(members):
        b_k = 0.0
        if n_per > 1:
            b_k = sum((cm - super_means[k]) ** 2 for cm in chain_means[k]) / (n_per - 1)
        w_k = 0.0
        if n_draws > 1:
            for j, c in enumerate(m):
                w_k += sum((x[c, n] - chain_means[k][j]) ** 2 for n in range(n_draws)) / (
                    n_draws - 1
                )
            w_k /= n_per
        w_nu += (b_k + w_k) / n_super
    return math.sqrt(1.0 + b_nu / w_nu)


@pytest.mark.parametrize(
    ("n_super", "n_per", "n_draws"), [(4, 3, 7), (2, 1, 5), (3, 4, 1), (5, 2, 2)]
)
def test_nested_rhat_matches_its_formula(n_super, n_per, n_draws):
    rng = np.random.default_rng(5)
    n_chain = n_super * n_per
    x = rng.standard_normal((n_chain, n_draws)) + rng.standard_normal(n_chain)[:, None]
    ids = [f"s{k}" for k in range(n_super) for _ in range(n_per)]
    ids = [ids[i] for i in rng.permutation(n_chain)]
    assert float(rhat_nested(x, ids)) == pytest.approx(nested_rhat_reference(x, ids), abs=1e-12)


def test_nested_rhat_is_computed_per_trailing_element():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((6, 8, 2, 3))
    ids = [0, 1, 2, 0, 1, 2]
    got = rhat_nested(x, ids)
    assert got.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            assert got[i, j] == pytest.approx(nested_rhat_reference(x[:, :, i, j], ids), abs=1e-12)


def test_nested_rhat_is_near_one_for_iid_short_chains():
    # 8 super-chains x 16 chains x 10 draws: expectation about sqrt(1 + 1/160) = 1.003.
    x = np.random.default_rng(7).standard_normal((128, 10))
    value = float(rhat_nested(x, np.repeat(np.arange(8), 16)))
    assert 1.0 <= value < 1.01


def test_nested_rhat_is_large_when_super_chains_sit_in_different_modes():
    rng = np.random.default_rng(8)
    ids = np.repeat(np.arange(8), 16)
    modes = np.where(ids % 2 == 0, -3.0, 3.0)[:, None]
    assert float(rhat_nested(modes + rng.standard_normal((128, 10)), ids)) > 1.1


def test_nested_rhat_validates_its_grouping_and_flags_non_finite_draws():
    x = np.random.default_rng(9).standard_normal((6, 5))
    with pytest.raises(ValueError, match="same number of chains"):
        rhat_nested(x, [0, 0, 0, 1, 1, 2])
    with pytest.raises(ValueError, match="two super-chains"):
        rhat_nested(x, [0] * 6)
    with pytest.raises(ValueError, match="one label per chain"):
        rhat_nested(x, [0, 1])
    x[2, 3] = np.nan
    assert np.isnan(rhat_nested(x, [0, 1, 2, 0, 1, 2]))


# ---------------------------------------------------------------- temperatures


def random_spd(rng, d):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.5 * np.eye(d)


@pytest.mark.parametrize("center", [False, True])
def test_configurational_temperature_on_exact_gaussian_draws(center):
    # pi ∝ exp(-N L / T) with L = (theta - mu)' S^-1 (theta - mu) T / (2 N) is N(mu, S),
    # and grad L = T S^-1 (theta - mu) / N.
    rng = np.random.default_rng(10)
    d, num_data, temperature = 5, 1000, 0.5
    cov = random_spd(rng, d)
    mu = rng.standard_normal(d)
    theta = rng.multivariate_normal(mu, cov, size=(4, 2000))
    grad = temperature * (theta - mu) @ np.linalg.inv(cov) / num_data
    est = configurational_temperature(theta, grad, num_data=num_data, center=mu if center else None)
    assert abs(est.estimate - temperature) < 4 * est.mcse
    assert est.mcse < 0.05 * temperature

    hot = mu + math.sqrt(2.0) * (theta - mu)  # draws of N(mu, 2 S): twice as hot
    grad_hot = temperature * (hot - mu) @ np.linalg.inv(cov) / num_data
    est_hot = configurational_temperature(hot, grad_hot, num_data=num_data, center=mu)
    assert abs(est_hot.estimate - 2 * temperature) < 4 * est_hot.mcse


def simulate_sghmc(rng, curvature, *, lr, alpha, num_data, temperature, chains, burn, draws):
    """The package's SGHMC recursion on L = theta' K theta / 2, K = Q diag(curvature) Q'."""
    d = curvature.size
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    hessian = q @ np.diag(curvature) @ q.T
    noise = math.sqrt(2 * alpha * lr * temperature / num_data)
    theta = np.zeros((chains, d))
    v = np.zeros((chains, d))
    thetas = np.empty((chains, draws, d))
    vs = np.empty((chains, draws, d))
    for t in range(burn + draws):
        v = (1 - alpha) * v - lr * theta @ hessian + noise * rng.standard_normal((chains, d))
        theta = theta + v
        if t >= burn:
            thetas[:, t - burn] = theta
            vs[:, t - burn] = v
    return thetas, thetas @ hessian, vs


def test_kinetic_and_configurational_temperature_on_a_simulated_sghmc_run():
    # For a quadratic the recursion is linear; its stationary covariance (discrete
    # Lyapunov equation) gives, per eigen-direction with h = lr * k,
    #   Var(v) = 2 lr T / (N (2 - alpha - h/2)),  Var(theta) = T / (N k) * c(h),
    #   c(h) = (2 - alpha) / (2 - alpha - h/2),
    # so both estimators read T * mean_k c(h_k): the discretisation bias is accounted
    # for exactly, and the h -> 0 limit is the docstring's formula.
    rng = np.random.default_rng(11)
    lr, alpha, num_data, temperature = 0.1, 0.2, 100, 1.0
    curvature = np.array([0.1, 0.4, 1.0])
    theta, grad, v = simulate_sghmc(
        rng,
        curvature,
        lr=lr,
        alpha=alpha,
        num_data=num_data,
        temperature=temperature,
        chains=32,
        burn=2000,
        draws=20_000,
    )
    h = lr * curvature
    expected = temperature * np.mean((2 - alpha) / (2 - alpha - h / 2))

    kin = kinetic_temperature(v, lr=lr, alpha=alpha, num_data=num_data)
    assert abs(kin.estimate - expected) < 4 * kin.mcse
    # Precise enough to tell the exact expectation (1.014 T) from T itself ...
    assert abs(expected - temperature) > 4 * kin.mcse
    # ... and to reject the continuous-time formula N <v^2> / lr (it reads 1.13 T here).
    assert abs(kin.estimate * 2 / (2 - alpha) - expected) > 20 * kin.mcse

    conf = configurational_temperature(theta, grad, num_data=num_data)
    assert abs(conf.estimate - expected) < 4 * conf.mcse


def test_kinetic_temperature_is_t_for_a_small_step():
    rng = np.random.default_rng(12)
    lr, alpha, num_data, temperature = 1e-3, 0.1, 50, 0.3
    _, _, v = simulate_sghmc(
        rng,
        np.array([1.0, 3.0]),
        lr=lr,
        alpha=alpha,
        num_data=num_data,
        temperature=temperature,
        chains=16,
        burn=500,
        draws=5000,
    )
    kin = kinetic_temperature(v, lr=lr, alpha=alpha, num_data=num_data)
    assert abs(kin.estimate - temperature) < 4 * kin.mcse
    assert kin.mcse < 0.02 * temperature


def test_temperature_inputs_are_validated():
    v = np.zeros((2, 10, 3))
    with pytest.raises(ValueError, match="alpha"):
        kinetic_temperature(v, lr=0.1, alpha=0.0, num_data=10)
    with pytest.raises(ValueError, match="num_data"):
        kinetic_temperature(v, lr=0.1, alpha=0.1, num_data=0)
    with pytest.raises(ValueError, match=r"\(chain, draw, \.\.\.\)"):
        kinetic_temperature(np.zeros((2, 10)), lr=0.1, alpha=0.1, num_data=10)
    with pytest.raises(ValueError, match="shapes differ"):
        configurational_temperature(v, np.zeros((2, 10, 4)), num_data=10)
    with pytest.raises(ValueError, match="batch"):
        kinetic_temperature(np.ones((1, 10, 3)), lr=0.1, alpha=0.1, num_data=10, batch_size=6)


# ---------------------------------------------------------------- functionals


def fake_groups(rng, chains=4, draws=50, n=20, n_class=3):
    """Groups laid out as bayesflat.trace.groups returns them (TRACE_CONTRACT.md)."""
    logits = rng.standard_normal((chains, draws, n, n_class))
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    labels = rng.integers(0, n_class, size=n)
    weights = {
        "fc.weight": rng.standard_normal((chains, draws, 2, 3)),
        "fc.bias": rng.standard_normal((chains, draws, 2)),
    }
    posterior = xr.Dataset(
        {
            k: (("chain", "draw", *(f"{k}_dim_{i}" for i in range(w.ndim - 2))), w)
            for k, w in weights.items()
        }
    )
    return (
        {
            "weights": posterior,
            "sample_stats": xr.Dataset(
                {"lp": (("chain", "draw"), rng.standard_normal((chains, draws)))}
            ),
            "predictions": xr.Dataset(
                {"test": (("chain", "draw", "test_id", "class"), probs.astype(np.float32))}
            ),
            "observed_data": xr.Dataset({"test": (("test_id",), labels)}),
        },
        probs,
        labels,
        weights,
    )


def test_nll_and_true_class_probability():
    probs = np.array([[[[0.7, 0.3], [0.2, 0.8], [1.0, 0.0]]]])
    labels = np.array([0, 1, 1])
    np.testing.assert_allclose(true_class_probability(probs, labels, [0, 2]), [[[0.7, 0.0]]])
    expected = -(math.log(0.7) + math.log(0.8) + math.log(np.finfo(np.float32).tiny)) / 3
    np.testing.assert_allclose(nll_per_draw(probs, labels), [[expected]])
    with pytest.raises(ValueError, match="labels"):
        nll_per_draw(probs, labels[:2])


def test_weight_projections_follow_their_documented_definition():
    rng = np.random.default_rng(13)
    w = {"b": rng.standard_normal((2, 5, 3)), "a": rng.standard_normal((2, 5, 2, 2))}
    dirs = np.random.default_rng(7)
    u_a = dirs.standard_normal((4, 3))  # sorted order: "a" first
    u_b = dirs.standard_normal((3, 3))
    expected = (w["a"].reshape(2, 5, 4) @ u_a + w["b"] @ u_b) / math.sqrt(7)
    np.testing.assert_allclose(weight_projections(w, n_projections=3, seed=7), expected)
    assert not np.allclose(weight_projections(w, n_projections=3, seed=8), expected)


def test_functionals_of_a_trace_and_their_table():
    groups, probs, labels, weights = fake_groups(np.random.default_rng(14))
    f = functionals(groups, n_inputs=5, n_projections=2, seed=3)

    picked = np.sort(np.random.default_rng(3).choice(20, size=5, replace=False))
    assert list(f) == ["lp", "nll_test", *(f"p_true_test_{i}" for i in picked), "proj_0", "proj_1"]
    assert all(v.shape == (4, 50) for v in f.values())
    np.testing.assert_allclose(f["lp"], groups["sample_stats"]["lp"].values)
    np.testing.assert_allclose(
        f["nll_test"], -np.log(probs[:, :, np.arange(20), labels]).mean(-1), rtol=1e-6
    )
    np.testing.assert_allclose(
        f[f"p_true_test_{picked[1]}"], probs[:, :, picked[1], labels[picked[1]]], rtol=1e-6
    )
    np.testing.assert_allclose(
        np.stack([f["proj_0"], f["proj_1"]], -1), weight_projections(weights, 2, seed=3)
    )

    rows, used = convergence_table(groups, n_inputs=5, n_projections=2, seed=3)
    assert [r.name for r in rows] == list(f)
    assert used["ess"] == 400.0  # 50 draws per chain cannot reach 100 per chain
    assert all(r.verdict == "warn" for r in rows)


def test_functionals_of_a_built_trace_match_its_groups():
    trace_mod = pytest.importorskip("bayesflat.trace")
    groups, probs, labels, weights = fake_groups(np.random.default_rng(15))
    trace = trace_mod.build_trace(
        posterior=weights,
        sample_stats={"lp": groups["sample_stats"]["lp"].values},
        predictions={"test": probs},
        observed_data={"test": labels},
    )
    from_trace = functionals(trace)
    from_groups = functionals(trace_mod.groups(trace))
    assert list(from_trace) == list(from_groups)
    for k in from_trace:
        np.testing.assert_allclose(from_trace[k], from_groups[k])
    np.testing.assert_allclose(from_trace["nll_test"], nll_per_draw(probs, labels), rtol=1e-5)
