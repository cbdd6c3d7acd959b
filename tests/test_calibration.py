"""Calibration metrics against independent references (torchmetrics, scikit-learn, one-hot
formulas) and hand-made cases with known values."""

import numpy as np
import pytest
import torch
from scipy.special import log_softmax, softmax
from sklearn.metrics import brier_score_loss, log_loss
from torchmetrics.classification import MulticlassCalibrationError

from bayesflat.metrics import (
    PROB_FLOOR,
    accuracy,
    apply_temperature,
    brier_score,
    calibration_summary,
    classwise_ece,
    ece,
    fit_temperature,
    mce,
    nll,
    reliability_curve,
)


def random_predictions(seed, n=1000, k=10, scale=2.0, float32=True):
    """Probabilities (float32-representable by default, so torchmetrics sees the same
    confidences) and labels that agree with the argmax more often than chance."""
    rng = np.random.default_rng(seed)
    probs = softmax(scale * rng.standard_normal((n, k)), axis=1)
    if float32:
        probs = probs.astype(np.float32).astype(np.float64)
    labels = np.where(rng.random(n) < 0.6, probs.argmax(axis=1), rng.integers(0, k, n))
    return probs, labels


def sample_labels(rng, probs):
    u = rng.random(probs.shape[0])[:, None]
    return np.minimum((np.cumsum(probs, axis=1) < u).sum(axis=1), probs.shape[1] - 1)


def torchmetrics_ce(probs, labels, n_bins, norm):
    metric = MulticlassCalibrationError(num_classes=probs.shape[1], n_bins=n_bins, norm=norm)
    return float(metric(torch.from_numpy(probs).float(), torch.from_numpy(labels)))


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("n_bins", [1, 5, 10, 15, 20])
def test_ece_mce_match_torchmetrics(seed, n_bins):
    probs, labels = random_predictions(seed)
    assert ece(probs, labels, n_bins=n_bins) == pytest.approx(
        torchmetrics_ce(probs, labels, n_bins, "l1"), abs=1e-6
    )
    assert mce(probs, labels, n_bins=n_bins) == pytest.approx(
        torchmetrics_ce(probs, labels, n_bins, "max"), abs=1e-6
    )


def test_interior_bin_edge_goes_to_upper_bin_like_torchmetrics():
    # Confidences exactly on the edges 0.25, 0.5, 0.75 of 4 bins (exact in float32 too).
    probs = np.array(
        [
            [0.25, 0.25, 0.25, 0.25],
            [0.5, 0.5, 0.0, 0.0],
            [0.75, 0.25, 0.0, 0.0],
            [0.5, 0.25, 0.25, 0.0],
        ]
    )
    labels = np.array([1, 0, 0, 2])
    curve = reliability_curve(probs, labels, n_bins=4)
    np.testing.assert_array_equal(curve.count, [0, 1, 2, 1])
    assert ece(probs, labels, n_bins=4) == pytest.approx(
        torchmetrics_ce(probs, labels, 4, "l1"), abs=1e-7
    )
    assert mce(probs, labels, n_bins=4) == pytest.approx(
        torchmetrics_ce(probs, labels, 4, "max"), abs=1e-7
    )


def test_confidence_one_stays_in_last_bin():
    # torchmetrics counts confidence 1.0 in a hidden extra bin (Lightning-AI/torchmetrics#3510),
    # which would give 0.5 * |1 - 0.95| + 0.5 * |0 - 1| = 0.525; one closed last bin gives
    # |0.5 - 0.975| = 0.475.
    probs = np.array([[0.95, 0.05], [1.0, 0.0]])
    labels = np.array([0, 1])
    curve = reliability_curve(probs, labels, n_bins=15)
    assert curve.count[-1] == 2 and curve.count.sum() == 2
    assert ece(probs, labels, n_bins=15) == pytest.approx(0.475, abs=1e-12)


def test_nll_matches_sklearn_and_log_space():
    probs, labels = random_predictions(2, float32=False)
    ref = log_loss(labels, probs, labels=np.arange(probs.shape[1]))
    assert nll(probs, labels) == pytest.approx(ref, abs=1e-6)
    assert nll(np.log(probs), labels, log_input=True) == pytest.approx(ref, abs=1e-12)


def test_nll_floor_is_finite_and_documented():
    probs = np.array([[1.0, 0.0], [0.5, 0.5]])
    labels = np.array([1, 0])
    expected = (-np.log(PROB_FLOOR) + np.log(2.0)) / 2
    assert nll(probs, labels) == pytest.approx(expected, rel=1e-12)
    with np.errstate(divide="ignore"):
        log_probs = np.log(probs)
    assert nll(log_probs, labels, log_input=True) == pytest.approx(expected, rel=1e-12)
    # Log space keeps a true-class probability that underflows in float64.
    tiny = np.array([[0.0, -1000.0]])
    assert nll(tiny, np.array([1]), log_input=True) == pytest.approx(-np.log(PROB_FLOOR))


def test_brier_matches_one_hot_and_sklearn_one_vs_rest():
    probs, labels = random_predictions(3)
    one_hot = np.eye(probs.shape[1])[labels]
    direct = np.mean(np.sum((probs - one_hot) ** 2, axis=1))
    assert brier_score(probs, labels) == pytest.approx(direct, abs=1e-12)
    one_vs_rest = sum(
        brier_score_loss((labels == k).astype(int), probs[:, k]) for k in range(probs.shape[1])
    )
    assert brier_score(probs, labels) == pytest.approx(one_vs_rest, abs=1e-6)


def test_brier_binary_is_twice_sklearn():
    rng = np.random.default_rng(4)
    p1 = rng.random(1000)
    probs = np.stack([1 - p1, p1], axis=1)
    labels = (rng.random(1000) < p1).astype(int)
    assert brier_score(probs, labels) == pytest.approx(2 * brier_score_loss(labels, p1), abs=1e-6)


def test_accuracy_matches_argmax():
    probs, labels = random_predictions(5)
    assert accuracy(probs, labels) == np.mean(probs.argmax(axis=1) == labels)


def constant_confidence(conf, n_correct, n=10, k=5):
    """n rows whose top class 0 has probability `conf`; the first `n_correct` labels are 0."""
    probs = np.full((n, k), (1 - conf) / (k - 1))
    probs[:, 0] = conf
    labels = np.where(np.arange(n) < n_correct, 0, 1)
    return probs, labels


@pytest.mark.parametrize("binning", ["uniform", "quantile"])
def test_known_ece(binning):
    probs, labels = constant_confidence(0.8, 8)
    assert ece(probs, labels, binning=binning) == pytest.approx(0.0, abs=1e-12)
    probs, labels = constant_confidence(0.9, 5)
    assert ece(probs, labels, binning=binning) == pytest.approx(0.4, abs=1e-12)
    assert mce(probs, labels, binning=binning) == pytest.approx(0.4, abs=1e-12)


def test_quantile_bins_have_equal_counts():
    probs, labels = random_predictions(6, n=1500)
    curve = reliability_curve(probs, labels, n_bins=15, binning="quantile")
    np.testing.assert_array_equal(curve.count, np.full(15, 100))
    assert np.all(np.diff(curve.edges) >= 0) and curve.edges[0] == 0 and curve.edges[-1] == 1
    assert np.all(np.diff(curve.confidence) > 0)
    uneven = reliability_curve(probs[:1000], labels[:1000], n_bins=15, binning="quantile")
    assert uneven.count.sum() == 1000 and np.ptp(uneven.count) <= 1


def test_quantile_bins_keep_ties_together_and_ignore_order():
    # 100 confidences of 0.5 and 200 of 0.9: inner edges are the values of rank 100 and 200,
    # both 0.9, so all ties stay together and the middle bin is empty.
    probs, labels = constant_confidence(0.5, 60, n=100, k=3)
    probs_hi, labels_hi = constant_confidence(0.9, 150, n=200, k=3)
    probs, labels = np.concatenate([probs, probs_hi]), np.concatenate([labels, labels_hi])
    curve = reliability_curve(probs, labels, n_bins=3, binning="quantile")
    np.testing.assert_array_equal(curve.count, [100, 0, 200])
    np.testing.assert_allclose(curve.edges, [0.0, 0.9, 0.9, 1.0])
    expected = (100 * abs(0.6 - 0.5) + 200 * abs(0.75 - 0.9)) / 300
    order = np.random.default_rng(0).permutation(300)
    for idx in (np.arange(300), order):
        assert ece(probs[idx], labels[idx], n_bins=3, binning="quantile") == pytest.approx(
            expected, abs=1e-12
        )


@pytest.mark.parametrize("binning", ["uniform", "quantile"])
@pytest.mark.parametrize("n_bins", [1, 7, 15])
def test_reliability_curve_consistent_with_ece(binning, n_bins):
    probs, labels = random_predictions(7)
    curve = reliability_curve(probs, labels, n_bins=n_bins, binning=binning)
    assert curve.count.sum() == len(labels)
    assert curve.edges.shape == (n_bins + 1,) and curve.confidence.shape == (n_bins,)
    full = curve.count > 0
    assert np.all(np.isnan(curve.accuracy[~full])) and np.all(np.isnan(curve.confidence[~full]))
    lo, hi = curve.edges[:-1][full], curve.edges[1:][full]
    assert np.all((curve.confidence[full] >= lo) & (curve.confidence[full] <= hi))
    weighted = np.sum(curve.count[full] * np.abs(curve.accuracy - curve.confidence)[full]) / 1000
    assert ece(probs, labels, n_bins=n_bins, binning=binning) == pytest.approx(weighted, abs=1e-12)
    if n_bins == 1:
        gap = abs(accuracy(probs, labels) - probs.max(axis=1).mean())
        assert ece(probs, labels, n_bins=1, binning=binning) == pytest.approx(gap, abs=1e-12)


def test_classwise_ece_matches_direct_loop():
    probs, labels = random_predictions(8, k=4)
    n_bins = 10
    edges = np.linspace(0, 1, n_bins + 1)
    per_class = []
    for k in range(4):
        p, hit = probs[:, k], labels == k
        total = 0.0
        for b in range(n_bins):
            upper = p <= edges[b + 1] if b == n_bins - 1 else p < edges[b + 1]
            members = (p >= edges[b]) & upper
            if members.any():
                total += members.sum() / len(p) * abs(hit[members].mean() - p[members].mean())
        per_class.append(total)
    assert classwise_ece(probs, labels, n_bins=n_bins) == pytest.approx(np.mean(per_class), 1e-12)


def test_classwise_ece_zero_for_calibrated_constant_prediction():
    probs = np.tile([0.5, 0.3, 0.2], (10, 1))
    labels = np.array([0] * 5 + [1] * 3 + [2] * 2)
    assert classwise_ece(probs, labels) == pytest.approx(0.0, abs=1e-12)


def test_summary_matches_functions_and_accepts_torch():
    probs, labels = random_predictions(9)
    summary = calibration_summary(torch.from_numpy(probs), torch.from_numpy(labels), n_bins=10)
    assert summary == pytest.approx(
        {
            "accuracy": accuracy(probs, labels),
            "nll": nll(probs, labels),
            "brier_score": brier_score(probs, labels),
            "ece": ece(probs, labels, n_bins=10),
            "mce": mce(probs, labels, n_bins=10),
            "classwise_ece": classwise_ece(probs, labels, n_bins=10),
        },
        abs=1e-12,
    )


@pytest.mark.parametrize(
    ("probs", "labels", "kwargs", "message"),
    [
        (np.full((3, 2), 0.6), [0, 1, 0], {}, "probs rows must sum to 1"),
        (np.full(4, 0.25), [0], {}, r"probs must have shape \(n, K\)"),
        (np.full((2, 2), 0.5), [0, 2], {}, r"labels must lie in \[0, 2\)"),
        (np.full((2, 2), 0.5), [0, 1, 1], {}, r"labels must have shape \(2,\)"),
        (np.full((2, 2), 0.5), [0, 1], {"n_bins": 0}, "n_bins must be an integer >= 1"),
        (np.full((2, 2), 0.5), [0, 1], {"binning": "equal"}, "binning must be one of"),
        (np.array([[1.5, -0.5], [0.5, 0.5]]), [0, 1], {}, "probs must be non-negative"),
    ],
)
def test_validation_names_the_argument(probs, labels, kwargs, message):
    with pytest.raises(ValueError, match=message):
        ece(probs, np.asarray(labels), **kwargs)


def test_float_labels_are_rejected():
    with pytest.raises(TypeError, match="labels must hold integer"):
        accuracy(np.full((2, 2), 0.5), np.array([0.0, 1.0]))


@pytest.mark.parametrize("true_temperature", [0.5, 2.0])
def test_fit_temperature_recovers_known_temperature(true_temperature):
    rng = np.random.default_rng(10)
    logits = 3.0 * rng.standard_normal((20_000, 10))
    labels = sample_labels(rng, softmax(logits / true_temperature, axis=1))
    fitted = fit_temperature(logits, labels)
    assert fitted == pytest.approx(true_temperature, rel=0.05)
    # Logits and log-probabilities give the same temperature (softmax is shift invariant).
    assert fit_temperature(log_softmax(logits, axis=1), labels) == pytest.approx(fitted, rel=1e-6)


@pytest.mark.parametrize(("scale", "seed"), [(0.3, 11), (1.0, 12), (4.0, 13), (10.0, 14)])
def test_temperature_never_increases_nll_on_fitting_split(scale, seed):
    rng = np.random.default_rng(seed)
    logits = scale * rng.standard_normal((2000, 10))
    labels = sample_labels(rng, softmax(logits, axis=1))
    log_probs = log_softmax(logits, axis=1)
    fitted = fit_temperature(log_probs, labels)
    before = nll(apply_temperature(log_probs, 1.0), labels)
    assert nll(apply_temperature(log_probs, fitted), labels) <= before + 1e-12
    assert fitted == pytest.approx(1.0, rel=0.1)  # labels drawn from the model itself


def test_temperature_of_bma_log_probs_and_zero_probabilities():
    rng = np.random.default_rng(15)
    members = softmax(5.0 * rng.standard_normal((8, 500, 3)), axis=-1)
    bma = members.mean(axis=0)
    labels = sample_labels(rng, bma)
    bma[0], labels[0] = [1.0, 0.0, 0.0], 0
    with np.errstate(divide="ignore"):
        log_bma = np.log(bma)
    fitted = fit_temperature(log_bma, labels)
    scaled = apply_temperature(log_bma, fitted)
    np.testing.assert_allclose(scaled.sum(axis=1), 1.0, atol=1e-12)
    assert np.all(scaled[0, 1:] == 0.0)
    expected = bma ** (1 / fitted) / np.sum(bma ** (1 / fitted), axis=1, keepdims=True)
    np.testing.assert_allclose(scaled, expected, rtol=1e-9, atol=1e-300)


def test_separable_split_warns_at_bound():
    logits = np.array([[5.0, 0.0], [0.0, 5.0]] * 50)
    labels = np.array([0, 1] * 50)
    with pytest.warns(RuntimeWarning, match="at the bound"):
        fitted = fit_temperature(logits, labels)
    assert fitted == 1e-2
    before = nll(apply_temperature(logits, 1.0), labels)
    assert nll(apply_temperature(logits, fitted), labels) <= before


def test_temperature_validation():
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        apply_temperature(np.zeros((2, 2)), 0.0)
    with pytest.raises(ValueError, match="bounds must satisfy"):
        fit_temperature(np.zeros((2, 2)), np.array([0, 1]), bounds=(2.0, 10.0))
    with pytest.raises(ValueError, match="logits must not contain NaN"):
        fit_temperature(np.array([[np.nan, 0.0]]), np.array([0]))
