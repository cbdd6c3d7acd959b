"""OOD scores and detection metrics: orientation (OOD positive, higher = more OOD), brute-force
references and scikit-learn's ROC curve."""

import numpy as np
import pytest
import torch
from scipy.special import softmax
from sklearn.metrics import roc_curve

from bayesflat.metrics import (
    aupr_in,
    aupr_out,
    auroc,
    energy_score,
    entropy_score,
    expected_entropy_score,
    fpr_at_tpr,
    max_softmax_score,
    mutual_information_score,
    ood_summary,
)


def overlapping_scores(seed, n_in=700, n_out=400, ties=False):
    rng = np.random.default_rng(seed)
    s_in, s_out = rng.normal(0.0, 1.0, n_in), rng.normal(1.0, 1.0, n_out)
    if ties:
        s_in, s_out = np.round(s_in, 1), np.round(s_out, 1)
    return s_in, s_out


def pairwise_auroc(s_in, s_out):
    diff = s_out[:, None] - s_in[None, :]
    return np.mean(diff > 0) + 0.5 * np.mean(diff == 0)


def brute_force_average_precision(scores, positive):
    """AP = sum over distinct thresholds t (descending) of (R_t - R_prev) * P_t."""
    ap, recall_prev = 0.0, 0.0
    for t in np.unique(scores)[::-1]:
        detected = scores >= t
        recall = np.sum(detected & positive) / np.sum(positive)
        ap += (recall - recall_prev) * np.sum(detected & positive) / np.sum(detected)
        recall_prev = recall
    return ap


def brute_force_fpr(s_in, s_out, tpr):
    """Scan the thresholds upwards; the first one keeping >= tpr of ID sets the FPR."""
    for t in np.unique(np.concatenate([s_in, s_out])):
        if np.mean(s_in <= t) >= tpr:
            return np.mean(s_out <= t)
    raise AssertionError("unreachable")


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_metrics_match_brute_force(seed, ties):
    s_in, s_out = overlapping_scores(seed, ties=ties)
    pooled = np.concatenate([s_in, s_out])
    is_ood = np.r_[np.zeros(s_in.size, bool), np.ones(s_out.size, bool)]
    assert auroc(s_in, s_out) == pytest.approx(pairwise_auroc(s_in, s_out), abs=1e-12)
    assert aupr_out(s_in, s_out) == pytest.approx(
        brute_force_average_precision(pooled, is_ood), abs=1e-12
    )
    assert aupr_in(s_in, s_out) == pytest.approx(
        brute_force_average_precision(-pooled, ~is_ood), abs=1e-12
    )
    for tpr in (0.5, 0.8, 0.95, 1.0):
        assert fpr_at_tpr(s_in, s_out, tpr=tpr) == brute_force_fpr(s_in, s_out, tpr)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("n_in", [100, 999, 1000])
def test_fpr95_matches_sklearn_roc_curve(n_in, ties):
    s_in, s_out = overlapping_scores(2, n_in=n_in, ties=ties)
    is_in = np.r_[np.ones(s_in.size), np.zeros(s_out.size)]
    fpr, tpr, _ = roc_curve(is_in, -np.concatenate([s_in, s_out]), drop_intermediate=False)
    # Where a TPR level is first reached, the ROC point with the smallest FPR.
    levels, first_point = np.unique(tpr, return_index=True)
    level_fpr = fpr[first_point]
    j = int(np.searchsorted(levels, 0.95))
    ours = fpr_at_tpr(s_in, s_out)
    assert ours == level_fpr[j]
    # Linear interpolation of the ROC curve (used by some OOD benchmarks) lies between the
    # two points around TPR = 0.95, and equals ours when a point sits at exactly 0.95.
    interpolated = np.interp(0.95, levels, level_fpr)
    assert level_fpr[j - 1] <= interpolated <= ours
    if levels[j] == 0.95:
        assert interpolated == ours


def test_fpr_threshold_counts_exact_fraction():
    # 100 ID scores 0..99: keeping 95 % means threshold 94 (95 kept), not 95.
    s_in = np.arange(100.0)
    s_out = np.array([94.0, 94.5, 95.0, 200.0])
    assert fpr_at_tpr(s_in, s_out) == 0.25  # only the tie at 94 is accepted


def test_separable_flipped_and_tied_scores():
    s_in, s_out = np.linspace(0, 1, 50), np.linspace(2, 3, 30)
    separable = ood_summary(s_in, s_out)
    assert separable == pytest.approx({"auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0, "fpr95": 0.0})
    assert separable["auroc"] == 1.0 and separable["fpr95"] == 0.0
    flipped = ood_summary(-s_in, -s_out)
    assert flipped["auroc"] == 0.0 and flipped["fpr95"] == 1.0
    tied_in, tied_out = np.zeros(50), np.zeros(30)
    tied = ood_summary(tied_in, tied_out)
    assert tied["auroc"] == 0.5 and tied["fpr95"] == 1.0
    assert tied["aupr_out"] == pytest.approx(30 / 80) and tied["aupr_in"] == pytest.approx(50 / 80)


def test_summary_matches_functions():
    s_in, s_out = overlapping_scores(3)
    assert ood_summary(torch.from_numpy(s_in), s_out.tolist()) == {
        "auroc": auroc(s_in, s_out),
        "aupr_in": aupr_in(s_in, s_out),
        "aupr_out": aupr_out(s_in, s_out),
        "fpr95": fpr_at_tpr(s_in, s_out, tpr=0.95),
    }


def test_probability_scores_orientation_and_values():
    confident = np.array([[0.98, 0.01, 0.01]])
    uniform = np.full((1, 3), 1 / 3)
    assert max_softmax_score(confident)[0] == pytest.approx(0.02)
    assert max_softmax_score(uniform)[0] == pytest.approx(2 / 3)
    assert entropy_score(uniform)[0] == pytest.approx(np.log(3))
    assert entropy_score(np.array([[1.0, 0.0, 0.0]]))[0] == 0.0
    # ID-like (confident) inputs score lower than OOD-like (uniform) ones.
    assert auroc(max_softmax_score(confident), max_softmax_score(uniform)) == 1.0
    assert auroc(entropy_score(confident), entropy_score(uniform)) == 1.0


def test_energy_score_sign_and_formula():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=(20, 5))
    for temperature in (1.0, 2.5):
        expected = -temperature * np.log(np.sum(np.exp(logits / temperature), axis=1))
        np.testing.assert_allclose(
            energy_score(logits, temperature=temperature), expected, rtol=1e-12
        )
    confident_id = np.array([[12.0, 0.0, 0.0]])
    flat_ood = np.zeros((1, 3))
    assert energy_score(confident_id)[0] < energy_score(flat_ood)[0]
    assert auroc(energy_score(confident_id), energy_score(flat_ood)) == 1.0
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        energy_score(logits, temperature=-1.0)


def test_mutual_information_zero_when_members_agree():
    rng = np.random.default_rng(5)
    probs = softmax(rng.normal(size=(40, 4)), axis=1)
    agree = np.broadcast_to(probs, (6, 40, 4))
    np.testing.assert_allclose(mutual_information_score(agree), 0.0, atol=1e-12)
    np.testing.assert_allclose(expected_entropy_score(agree), entropy_score(probs), rtol=1e-12)


def test_mutual_information_decomposition_and_disagreement():
    rng = np.random.default_rng(6)
    members = softmax(3 * rng.normal(size=(2, 5, 40, 4)), axis=-1)  # (chain, draw, n, K)
    bma = members.mean(axis=(0, 1))
    mi = mutual_information_score(members)
    assert mi.shape == (40,) and np.all(mi > 0)
    np.testing.assert_allclose(mi + expected_entropy_score(members), entropy_score(bma), rtol=1e-10)
    np.testing.assert_allclose(mi, mutual_information_score(members.reshape(10, 40, 4)))
    # Two certain members that disagree: MI = log 2, expected entropy 0.
    split = np.array([[[1.0, 0.0]], [[0.0, 1.0]]])
    assert mutual_information_score(split)[0] == pytest.approx(np.log(2))
    assert expected_entropy_score(split)[0] == 0.0


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: auroc([], [1.0]), "scores_in must be a non-empty 1-D array"),
        (lambda: aupr_out([0.0], [np.nan]), "scores_out must be finite"),
        (lambda: fpr_at_tpr([0.0], [1.0], tpr=0.0), r"tpr must be a number in \(0, 1\]"),
        (lambda: mutual_information_score(np.full((3, 2), 0.5)), "member_probs must have shape"),
        (lambda: entropy_score(np.full((3, 2), 0.7)), "probs rows must sum to 1"),
    ],
)
def test_validation_names_the_argument(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_rank_based_auroc_and_ap_equal_sklearn_with_ties():
    from sklearn.metrics import average_precision_score, roc_auc_score

    from bayesflat.metrics import ood

    rng = np.random.default_rng(7)
    for _ in range(200):
        decimals = int(rng.integers(0, 3))  # 0 decimals: many ties
        s_in = np.round(rng.normal(size=int(rng.integers(1, 50))), decimals)
        s_out = np.round(rng.normal(0.5, size=int(rng.integers(1, 50))), decimals)
        y = np.r_[np.zeros(s_in.size), np.ones(s_out.size)]
        s = np.r_[s_in, s_out]
        assert abs(ood.auroc(s_in, s_out) - roc_auc_score(y, s)) < 1e-12
        assert abs(ood.aupr_out(s_in, s_out) - average_precision_score(y, s)) < 1e-12
        assert abs(ood.aupr_in(s_in, s_out) - average_precision_score(1 - y, -s)) < 1e-12


def test_roc_curve_equals_sklearn_and_its_area_is_auroc():
    from bayesflat.metrics import ood

    rng = np.random.default_rng(11)
    for _ in range(100):
        decimals = int(rng.integers(0, 3))  # 0 decimals: many ties, which form one point each
        s_in = np.round(rng.normal(size=int(rng.integers(1, 60))), decimals)
        s_out = np.round(rng.normal(0.7, size=int(rng.integers(1, 60))), decimals)
        y = np.r_[np.zeros(s_in.size), np.ones(s_out.size)]
        fpr, tpr, thresholds = ood.roc_curve(s_in, s_out)
        ref = roc_curve(y, np.r_[s_in, s_out], drop_intermediate=False)
        np.testing.assert_array_equal(fpr, ref[0])
        np.testing.assert_array_equal(tpr, ref[1])
        np.testing.assert_array_equal(thresholds, ref[2])
        assert np.trapezoid(tpr, fpr) == pytest.approx(ood.auroc(s_in, s_out), abs=1e-12)
