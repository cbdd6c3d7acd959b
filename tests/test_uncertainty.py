"""Monte-Carlo standard errors of ensemble metrics against analytic binomial values."""

import numpy as np
import pytest
import torch

from bayesflat.metrics import bootstrap_metric, ece, per_chain_spread

Q = 0.7  # probability that a draw classifies an example correctly


def one_hot_members(correct):
    """(C, D, n, 2) one-hot predictions: class 0 (the label) where `correct`, else class 1."""
    return np.stack([correct, ~correct], axis=-1).astype(np.float64)


def mean_true_class_probability(probs):
    """Mean BMA probability of the true class 0 = mean accuracy of the one-hot draws."""
    return float(probs[:, 0].mean())


def test_iid_draws_match_binomial_standard_error():
    rng = np.random.default_rng(0)
    chains, draws, n = 4, 250, 20
    members = one_hot_members(rng.random((chains, draws, n)) < Q)
    analytic = np.sqrt(Q * (1 - Q) / (chains * draws * n))
    estimate, se = bootstrap_metric(members, mean_true_class_probability, block="draw")
    assert estimate == pytest.approx(members[..., 0].mean(), abs=1e-12)
    assert estimate == pytest.approx(Q, abs=4 * analytic)
    assert se == pytest.approx(analytic, rel=0.15)


def test_autocorrelated_chains_need_chain_blocks():
    # Every chain repeats one draw D times: draw resampling sees no variation at all, while
    # resampling chains (or the spread across chains) recovers the binomial SE over chains.
    rng = np.random.default_rng(1)
    chains, draws, n = 40, 10, 20
    per_chain = rng.random((chains, 1, n)) < Q
    members = one_hot_members(np.repeat(per_chain, draws, axis=1))
    analytic = np.sqrt(Q * (1 - Q) / (chains * n))
    _, se_draw = bootstrap_metric(members, mean_true_class_probability, block="draw")
    assert se_draw < 1e-12
    _, se_chain = bootstrap_metric(members, mean_true_class_probability, block="chain")
    assert se_chain == pytest.approx(analytic, rel=0.25)
    _, se_spread = per_chain_spread(members, mean_true_class_probability)
    assert se_spread == pytest.approx(analytic, rel=0.25)


def test_per_chain_spread_is_standard_error_of_chain_means():
    rng = np.random.default_rng(2)
    members = one_hot_members(rng.random((6, 30, 10)) < Q)
    estimate, se = per_chain_spread(members, mean_true_class_probability)
    chain_values = members[..., 0].mean(axis=(1, 2))
    assert estimate == pytest.approx(chain_values.mean(), abs=1e-12)
    assert se == pytest.approx(chain_values.std(ddof=1) / np.sqrt(6), abs=1e-12)


def test_bootstrap_is_deterministic_and_takes_nonlinear_metrics():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(3, 8, 100, 4))
    members = torch.softmax(torch.from_numpy(logits), dim=-1)
    labels = rng.integers(0, 4, 100)
    metric = lambda p: ece(p, labels, n_bins=5)  # noqa: E731
    first = bootstrap_metric(members, metric, n_boot=50, seed=7)
    assert first == bootstrap_metric(members, metric, n_boot=50, seed=7)
    assert first[0] == pytest.approx(metric(members.numpy().mean(axis=(0, 1))), abs=1e-12)
    assert first[1] > 0


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: bootstrap_metric(m[:1], np.mean), "block='chain' needs at least 2 chains"),
        (lambda m: bootstrap_metric(m, np.mean, block="moving"), "block must be one of"),
        (lambda m: bootstrap_metric(m, np.mean, n_boot=1), "n_boot must be an integer >= 2"),
        (lambda m: bootstrap_metric(m[0], np.mean), r"member_probs must have shape \(chain"),
        (lambda m: per_chain_spread(m[:1], np.mean), "needs at least 2 chains"),
    ],
)
def test_validation_names_the_argument(call, message):
    members = np.full((2, 3, 4, 2), 0.5)
    with pytest.raises(ValueError, match=message):
        call(members)
