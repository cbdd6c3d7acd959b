"""Monte-Carlo errors of ensemble metrics: the batch jackknife against known answers."""

import math

import numpy as np
import pytest

from bayesflat import predictive

PHI = 0.5
CHAINS, DRAWS, BATCH = 4, 1600, 40
REPS = 400


def _ar1(rng, reps, chains, draws, phi=PHI):
    """Stationary AR(1) chains, unit innovations: marginal variance 1 / (1 - phi^2)."""
    x = np.empty((reps, chains, draws))
    x[..., 0] = rng.normal(size=(reps, chains)) / math.sqrt(1 - phi**2)
    for t in range(1, draws):
        x[..., t] = phi * x[..., t - 1] + rng.normal(size=(reps, chains))
    return x


def _var_of_mean(n, phi=PHI):
    """Exact variance of the mean of n consecutive draws of the stationary AR(1)."""
    k = np.arange(1, n)
    return (1 + 2 * np.sum((1 - k / n) * phi**k)) / ((1 - phi**2) * n)


def _mean(avg):
    return {"mean": float(avg["x"])}


def test_jackknife_of_a_mean_is_the_batch_means_standard_error():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 50))
    got = predictive.estimate({"x": x}, _mean, batch_size=7)["mean"]
    batches = x[:, 50 - 7 * 7 :].reshape(3, 7, 7).mean(axis=2).ravel()
    assert got.value == pytest.approx(x.mean(), rel=1e-12)
    assert got.mc_error == pytest.approx(batches.std(ddof=1) / math.sqrt(batches.size), rel=1e-10)


def test_batch_error_of_an_ar1_mean_matches_its_known_variance():
    rng = np.random.default_rng(1)
    x = _ar1(rng, REPS, CHAINS, DRAWS)
    est_var = np.array(
        [predictive.estimate({"x": xr}, _mean, batch_size=BATCH)["mean"].mc_error ** 2 for xr in x]
    )
    truth = _var_of_mean(DRAWS) / CHAINS
    # Batch means is biased by the correlation across batch boundaries; its exact expectation:
    # E = (v_L - v_{bL} / C) / (K - 1) for K = C b batches of length L.
    batches = CHAINS * DRAWS // BATCH
    expected = (_var_of_mean(BATCH) - _var_of_mean(DRAWS) / CHAINS) / (batches - 1)
    se = est_var.std(ddof=1) / math.sqrt(REPS)
    assert abs(est_var.mean() - expected) < 4 * se
    assert abs(est_var.mean() - truth) < abs(expected - truth) + 4 * se
    assert abs(expected / truth - 1) < 0.05  # the bias at L = 40 draws, tau = 3 draws
    # Errors that ignore the autocorrelation are sqrt(3) too small here (tau = 3).
    iid = (x.var(axis=(1, 2), ddof=1) / (CHAINS * DRAWS)).mean()
    assert truth / iid == pytest.approx((1 + PHI) / (1 - PHI), rel=0.05)
    assert est_var.mean() / iid > 2.5


@pytest.mark.slow
def test_batch_error_of_a_bma_nll_matches_its_spread_over_replications():
    rng = np.random.default_rng(2)
    reps, n = 300, 20
    z = _ar1(rng, reps, CHAINS, DRAWS)
    shift = rng.normal(size=n)
    p_true = 1 / (1 + np.exp(-(shift + z[..., None])))  # (reps, chain, draw, n)
    probs = np.stack([p_true, 1 - p_true], axis=-1)
    labels = np.zeros(n, dtype=int)

    def nll(avg):
        return {"nll": float(-np.log(avg["p"][np.arange(n), labels]).mean())}

    values, errors = [], []
    for r in range(reps):
        e = predictive.estimate({"p": probs[r]}, nll, batch_size=2 * BATCH)["nll"]
        values.append(e.value)
        errors.append(e.mc_error)
    spread = np.std(values, ddof=1)
    ratio = math.sqrt(np.mean(np.square(errors))) / spread
    # spread's relative standard error is 1 / sqrt(2 (reps - 1)) = 4.1 %; batching bias < 2 %
    assert ratio == pytest.approx(1.0, abs=4 / math.sqrt(2 * (reps - 1)) + 0.03)


def test_batch_length_follows_the_autocorrelation_time():
    rng = np.random.default_rng(3)
    x = _ar1(rng, 1, CHAINS, 10_000, phi=0.9)[0]
    # tau = (1 + phi) / (1 - phi) = 19; the ESS-based estimate has a relative error of about
    # sqrt(4 M / n) = 8 % for a truncation lag M of 3 tau and n = 40,000 draws
    assert predictive.batch_length(x)[1] == pytest.approx(19.0, rel=0.3)
    for phi, draws in ((0.98, 1600), (0.0, 1600), (0.999, 30)):
        x = _ar1(rng, 1, CHAINS, draws, phi=phi)[0]
        length, tau = predictive.batch_length(x)
        assert length == min(draws, max(math.isqrt(draws), math.ceil(tau)))


def test_batch_size_is_validated():
    x = np.zeros((2, 10))
    with pytest.raises(ValueError, match="batch_size must be in"):
        predictive.estimate({"x": x}, _mean, batch_size=11)
    assert predictive.estimate({"x": x[:1]}, _mean, batch_size=10)["mean"].mc_error is None
