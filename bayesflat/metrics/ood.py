r"""Out-of-distribution (OOD) scores and detection metrics.

Convention, everywhere in bayesflat: **OOD is the positive class and a higher score means more
OOD.** Every score below is oriented that way, and every metric takes the scores of the
in-distribution (ID) test set and of the OOD set separately, so the sign cannot invert silently.

Scores take arrays (NumPy or torch) of

- ``probs``: ``(n, K)`` predictive probabilities (the Bayesian model average for an ensemble);
- ``member_probs``: ``(S, n, K)`` per-draw probabilities, or ``(chain, draw, n, K)`` as in a
  trace's ``predictions`` group (all leading axes are pooled into the S members);
- ``logits``: ``(n, K)``.

Entropies are in nats.
"""

from __future__ import annotations

import numpy as np

from ._validation import check_logits, check_probs, check_scores, class_reduce, logsumexp_rows

# SciPy (about a second to import) is imported in the functions that use it: sampling
# processes import this module through bayesflat.predictive but never ranks OOD scores there.

__all__ = [
    "aupr_in",
    "aupr_out",
    "auroc",
    "energy_score",
    "entropy_score",
    "expected_entropy_score",
    "fpr_at_tpr",
    "max_softmax_score",
    "mutual_information_score",
    "ood_summary",
    "roc_curve",
]


def _entropy(p: np.ndarray) -> np.ndarray:
    from scipy.special import entr

    return class_reduce(np.add, entr(p))


def _members(member_probs) -> np.ndarray:
    p = check_probs(member_probs, "member_probs", ndim=-3)
    return p.reshape(-1, *p.shape[-2:])


def max_softmax_score(probs) -> np.ndarray:
    r"""Maximum-softmax-probability score (Hendrycks & Gimpel, 2017), OOD-positive.

    .. math:: s_i = 1 - \max_k p_{ik}

    OOD is the positive class; a higher score means more OOD (a less confident prediction).

    Parameters
    ----------
    probs : array_like, shape (n, K)
        Predictive probabilities (BMA for an ensemble).

    Returns
    -------
    ndarray, shape (n,)
        Values in [0, 1 - 1/K], dimensionless.
    """
    return 1.0 - check_probs(probs).max(axis=1)


def entropy_score(probs) -> np.ndarray:
    r"""Predictive entropy, OOD-positive.

    .. math:: s_i = H[p_i] = -\sum_k p_{ik} \log p_{ik}, \qquad 0 \log 0 = 0

    OOD is the positive class; a higher score means more OOD. For a BMA this is the total
    uncertainty = :func:`expected_entropy_score` + :func:`mutual_information_score`.

    Parameters
    ----------
    probs : array_like, shape (n, K)
        Predictive probabilities (BMA for an ensemble).

    Returns
    -------
    ndarray, shape (n,)
        Nats, in [0, log K].
    """
    return _entropy(check_probs(probs))


def mutual_information_score(member_probs) -> np.ndarray:
    r"""Mutual information between the label and the parameters (epistemic part), OOD-positive.

    .. math:: s_i = H\Big[\frac1S \sum_s p^{(s)}_i\Big] - \frac1S \sum_s H\big[p^{(s)}_i\big]

    (BALD; Houlsby et al., 2011). Zero when all members agree, positive when they disagree;
    tiny negative values from rounding are clipped to 0. OOD is the positive class; a higher
    score means more OOD.

    Parameters
    ----------
    member_probs : array_like, shape (S, n, K) or (chain, draw, n, K)
        Per-draw predictive probabilities; all leading axes are the S members.

    Returns
    -------
    ndarray, shape (n,)
        Nats, in [0, log K].
    """
    p = _members(member_probs)
    return np.maximum(_entropy(p.mean(axis=0)) - _entropy(p).mean(axis=0), 0.0)


def expected_entropy_score(member_probs) -> np.ndarray:
    r"""Expected entropy of the members (aleatoric part), OOD-positive.

    .. math:: s_i = \frac1S \sum_s H\big[p^{(s)}_i\big]

    OOD is the positive class; a higher score means more OOD.

    Parameters
    ----------
    member_probs : array_like, shape (S, n, K) or (chain, draw, n, K)
        Per-draw predictive probabilities; all leading axes are the S members.

    Returns
    -------
    ndarray, shape (n,)
        Nats, in [0, log K].
    """
    return _entropy(_members(member_probs)).mean(axis=0)


def energy_score(logits, *, temperature: float = 1.0) -> np.ndarray:
    r"""Free energy of the logits (Liu et al., 2020), OOD-positive.

    .. math:: s_i = E(x_i) = -T \log \sum_k \exp(z_{ik} / T)

    In-distribution inputs get large logits and hence low (very negative) energy, so the energy
    itself is OOD-positive: OOD is the positive class and a higher score means more OOD.

    Parameters
    ----------
    logits : array_like, shape (n, K)
        Unnormalised log-probabilities of one network. For an ensemble, average the per-draw
        energies or pass log-BMA probabilities (then the score is ``-T log sum_k p_k^{1/T}``,
        which is 0 at T = 1 and carries no information).
    temperature : float, default 1.0
        T > 0, in logit units.

    Returns
    -------
    ndarray, shape (n,)
        Logit units.
    """
    if not (isinstance(temperature, int | float | np.number) and 0 < temperature < np.inf):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    z = check_logits(logits, "logits")
    return -temperature * logsumexp_rows(z / temperature)


def _pooled(scores_in, scores_out) -> tuple[np.ndarray, np.ndarray]:
    s_in = check_scores(scores_in, "scores_in")
    s_out = check_scores(scores_out, "scores_out")
    is_ood = np.concatenate([np.zeros(s_in.size, dtype=int), np.ones(s_out.size, dtype=int)])
    return np.concatenate([s_in, s_out]), is_ood


def _threshold_counts(
    scores: np.ndarray, positive: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct scores, highest first, with the positives and negatives scoring at or above
    each: the points of the ROC and precision-recall curves (ties form one point)."""
    order = np.argsort(-scores, kind="mergesort")
    ranked, hits = scores[order], positive[order]
    ends = np.r_[np.flatnonzero(np.diff(ranked)), ranked.size - 1]
    tp = np.cumsum(hits)[ends]
    return ranked[ends], tp, ends + 1 - tp


def _average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    # Step-wise AP over the distinct score values, highest first (sklearn's definition);
    # written with numpy because bootstrap error bars call it hundreds of times per report.
    _, tp, fp = _threshold_counts(scores, positive)
    precision = tp / (tp + fp)
    recall = tp / tp[-1]
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def roc_curve(scores_in, scores_out) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""ROC curve for detecting OOD inputs: one point per distinct score threshold.

    An example is flagged as OOD when its score is :math:`\ge t`; for each threshold
    :math:`t` (the distinct pooled scores, highest first, after a leading :math:`+\infty`
    that flags nothing)

    .. math:: \mathrm{FPR}(t) = \frac1{n_{in}} \sum_i \mathbb 1[s^{in}_i \ge t], \qquad
       \mathrm{TPR}(t) = \frac1{n_{out}} \sum_j \mathbb 1[s^{out}_j \ge t].

    Equals ``sklearn.metrics.roc_curve(is_ood, scores, drop_intermediate=False)``; the
    trapezoidal area under it is :func:`auroc`.

    Parameters
    ----------
    scores_in : array_like, shape (n_in,)
        Scores of in-distribution examples.
    scores_out : array_like, shape (n_out,)
        Scores of OOD examples (the positive class; a higher score means more OOD).

    Returns
    -------
    fpr, tpr : ndarray, shape (m + 1,)
        False and true positive rates, non-decreasing from 0 to 1; ``m`` distinct scores.
    thresholds : ndarray, shape (m + 1,)
        ``+inf`` followed by the distinct scores in decreasing order.
    """
    scores, is_ood = _pooled(scores_in, scores_out)
    thresholds, tp, fp = _threshold_counts(scores, is_ood)
    fpr = np.r_[0.0, fp / fp[-1]]
    tpr = np.r_[0.0, tp / tp[-1]]
    return fpr, tpr, np.r_[np.inf, thresholds]


def auroc(scores_in, scores_out) -> float:
    r"""Area under the ROC curve for detecting OOD inputs.

    .. math:: \mathrm{AUROC} = P(s_{out} > s_{in}) + \tfrac12 P(s_{out} = s_{in})

    for independent random ID and OOD examples. OOD is the positive class; a higher score means
    more OOD. 1 = perfect detection, 0.5 = chance (or all scores tied), 0 = perfectly inverted.

    Parameters
    ----------
    scores_in : array_like, shape (n_in,)
        Scores of in-distribution examples.
    scores_out : array_like, shape (n_out,)
        Scores of OOD examples.

    Returns
    -------
    float
        In [0, 1]; equals ``sklearn.metrics.roc_auc_score``.
    """
    from scipy.stats import rankdata

    scores, is_ood = _pooled(scores_in, scores_out)
    # Mann-Whitney U from average ranks: ties count one half, as in roc_auc_score.
    ranks = rankdata(scores)
    n_out = int(is_ood.sum())
    n_in = is_ood.size - n_out
    u = ranks[is_ood == 1].sum() - n_out * (n_out + 1) / 2.0
    return float(u / (n_in * n_out))


def aupr_out(scores_in, scores_out) -> float:
    r"""Area under the precision-recall curve with OOD as the positive class.

    .. math:: \mathrm{AP} = \sum_j (R_j - R_{j-1})\, P_j

    over the thresholds :math:`j` of the score, where precision :math:`P_j` and recall
    :math:`R_j` count OOD examples with score >= threshold as detected
    (``sklearn.metrics.average_precision_score``, step-wise, no interpolation). OOD is the
    positive class and a higher score means more OOD. Chance level is the OOD fraction
    ``n_out / (n_in + n_out)``, which is also the value when all scores are tied.

    Parameters
    ----------
    scores_in : array_like, shape (n_in,)
        Scores of in-distribution examples.
    scores_out : array_like, shape (n_out,)
        Scores of OOD examples.

    Returns
    -------
    float
        In [0, 1].
    """
    scores, is_ood = _pooled(scores_in, scores_out)
    return _average_precision(scores, is_ood)


def aupr_in(scores_in, scores_out) -> float:
    r"""Area under the precision-recall curve with the in-distribution set as the positive class.

    Average precision (as in :func:`aupr_out`) of ID labels ranked by the negated score
    :math:`-s`. Scores follow the bayesflat convention (OOD is the positive class, a higher
    score means more OOD); this metric flips both internally. Chance level is
    ``n_in / (n_in + n_out)``.

    Parameters
    ----------
    scores_in : array_like, shape (n_in,)
        Scores of in-distribution examples.
    scores_out : array_like, shape (n_out,)
        Scores of OOD examples.

    Returns
    -------
    float
        In [0, 1].
    """
    scores, is_ood = _pooled(scores_in, scores_out)
    return _average_precision(-scores, 1 - is_ood)


def fpr_at_tpr(scores_in, scores_out, *, tpr: float = 0.95) -> float:
    r"""Fraction of OOD examples accepted as ID when a fraction ``tpr`` of ID examples is kept.

    "FPR at 95 % TPR" with the in-distribution set kept: an example is *kept* (accepted as ID)
    when its score is :math:`\le t`. The threshold is the smallest ID score that keeps at least
    ``tpr`` of the ID set,

    .. math:: t = s^{in}_{(k)}, \quad k = \min\{k : k / n_{in} \ge \mathrm{tpr}\},
       \qquad \mathrm{FPR} = \frac{1}{n_{out}} \sum_j \mathbb 1[s^{out}_j \le t]

    with :math:`s^{in}_{(k)}` the k-th smallest ID score. Ties are kept on both sides: OOD scores
    equal to :math:`t` count as accepted, and ID scores equal to :math:`t` may push the kept ID
    fraction above ``tpr``. This is the first point with TPR >= ``tpr`` of
    ``sklearn.metrics.roc_curve`` with ID as positive and :math:`-s` as its score (no
    interpolation between ROC points). OOD is the positive class of the scores and a higher
    score means more OOD; lower is better (0 = no OOD example accepted).

    Parameters
    ----------
    scores_in : array_like, shape (n_in,)
        Scores of in-distribution examples.
    scores_out : array_like, shape (n_out,)
        Scores of OOD examples.
    tpr : float, default 0.95
        Fraction of the ID set to keep, in (0, 1].

    Returns
    -------
    float
        In [0, 1].
    """
    if not (isinstance(tpr, int | float | np.number) and 0 < tpr <= 1):
        raise ValueError(f"tpr must be a number in (0, 1], got {tpr!r}")
    s_in = np.sort(check_scores(scores_in, "scores_in"))
    s_out = check_scores(scores_out, "scores_out")
    # k / n_in computed as roc_curve does, so k is exact at e.g. tpr = 0.95, n_in = 100.
    k = int(np.searchsorted(np.arange(1, s_in.size + 1) / s_in.size, tpr, side="left"))
    return float(np.mean(s_out <= s_in[k]))


def ood_summary(scores_in, scores_out) -> dict[str, float]:
    """All OOD-detection metrics for one score.

    OOD is the positive class and a higher score means more OOD.

    Parameters
    ----------
    scores_in : array_like, shape (n_in,)
        Scores of in-distribution examples.
    scores_out : array_like, shape (n_out,)
        Scores of OOD examples.

    Returns
    -------
    dict
        ``auroc``, ``aupr_in``, ``aupr_out`` and ``fpr95`` (:func:`fpr_at_tpr` at
        ``tpr=0.95``), each in [0, 1].
    """
    s_in = check_scores(scores_in, "scores_in")
    s_out = check_scores(scores_out, "scores_out")
    return {
        "auroc": auroc(s_in, s_out),
        "aupr_in": aupr_in(s_in, s_out),
        "aupr_out": aupr_out(s_in, s_out),
        "fpr95": fpr_at_tpr(s_in, s_out, tpr=0.95),
    }
