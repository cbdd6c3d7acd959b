r"""Calibration of a classifier's predictive distribution.

Every function takes

- ``probs``: array ``(n, K)`` of class probabilities, rows summing to 1 (within 1e-4). For a
  posterior ensemble these are the Bayesian-model-averaged (BMA) probabilities
  :math:`\bar p_{ik} = \frac1S \sum_s p_{ik}^{(s)}`, not those of a single draw;
- ``labels``: integer array ``(n,)`` with values in ``[0, K)``.

NumPy arrays and torch tensors (any device and float dtype) are accepted; all arithmetic is in
float64 and every metric returns a Python ``float``.

The top-label quantities use the predicted class :math:`\hat y_i = \arg\max_k \bar p_{ik}`
(ties go to the lowest class index, as ``numpy.argmax``) and its confidence
:math:`c_i = \max_k \bar p_{ik}`, the convention of torchmetrics' ``MulticlassCalibrationError``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from bayesflat._checks import check_choice, check_int

from ._validation import check_labels, check_logits, check_probs, logsumexp_rows

# SciPy (about a second to import) is imported in the functions that use it: sampling
# processes import this module through bayesflat.predictive but never fits a temperature there.

__all__ = [
    "PROB_FLOOR",
    "ReliabilityCurve",
    "accuracy",
    "apply_temperature",
    "brier_score",
    "calibration_summary",
    "classwise_ece",
    "ece",
    "fit_temperature",
    "mce",
    "nll",
    "reliability_curve",
]

PROB_FLOOR = float(np.finfo(np.float64).tiny)
"""Smallest probability used inside a logarithm (``2.2e-308``): a predicted probability of 0 for
the true class costs ``-log(PROB_FLOOR) = 708.4`` nats instead of infinity."""

_LOG_PROB_FLOOR = float(np.log(PROB_FLOOR))
_BINNINGS = ("uniform", "quantile")


@dataclass(frozen=True)
class ReliabilityCurve:
    """Per-bin statistics of a reliability diagram.

    Attributes
    ----------
    confidence : ndarray, shape (n_bins,)
        Mean predicted probability of the examples in each bin; NaN for an empty bin.
    accuracy : ndarray, shape (n_bins,)
        Fraction of the examples in each bin whose event happened (top label correct, or
        ``y == k`` for a class-wise curve); NaN for an empty bin.
    count : ndarray of int, shape (n_bins,)
        Number of examples in each bin; sums to ``n``.
    edges : ndarray, shape (n_bins + 1,)
        Bin boundaries, ``edges[0] = 0`` and ``edges[-1] = 1``. Bin ``b`` holds the confidences
        in ``[edges[b], edges[b + 1])``; the last bin also holds ``1``.
    """

    confidence: np.ndarray
    accuracy: np.ndarray
    count: np.ndarray
    edges: np.ndarray


def _bin(conf: np.ndarray, hit: np.ndarray, n_bins: int, binning: str) -> ReliabilityCurve:
    """Bin ``conf`` (values in [0, 1]) and average ``conf`` and the 0/1 ``hit`` per bin."""
    n = conf.shape[0]
    if binning == "uniform":
        edges = np.linspace(0.0, 1.0, n_bins + 1)
        # Left-closed bins, torchmetrics' `torch.bucketize(..., right=True) - 1`. The last bin
        # is closed so a confidence of exactly 1 (saturated float32 softmax) stays in it;
        # torchmetrics counts it in a hidden (n_bins + 1)-th bin (Lightning-AI/torchmetrics#3510).
        index = np.minimum(np.searchsorted(edges, conf, side="right") - 1, n_bins - 1)
    else:
        # Equal mass: inner edges at the confidences of rank ceil(b * n / n_bins). Binning by
        # value rather than by rank keeps tied confidences together, so the result does not
        # depend on the order of the examples.
        ranked = np.sort(conf)
        first_rank = -(-np.arange(1, n_bins) * n // n_bins)
        inner = np.where(first_rank < n, ranked[np.minimum(first_rank, n - 1)], 1.0)
        edges = np.concatenate([[0.0], inner, [1.0]])
        index = np.searchsorted(inner, conf, side="right")
    count = np.bincount(index, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        confidence = np.bincount(index, weights=conf, minlength=n_bins) / count
        accuracy = np.bincount(index, weights=hit, minlength=n_bins) / count
    return ReliabilityCurve(confidence=confidence, accuracy=accuracy, count=count, edges=edges)


def _weighted_gap(curve: ReliabilityCurve) -> float:
    full = curve.count > 0
    gap = np.abs(curve.accuracy[full] - curve.confidence[full])
    return float(np.sum(curve.count[full] * gap) / np.sum(curve.count))


def _max_gap(curve: ReliabilityCurve) -> float:
    full = curve.count > 0
    return float(np.max(np.abs(curve.accuracy[full] - curve.confidence[full])))


def _top_label(probs, labels) -> tuple[np.ndarray, np.ndarray]:
    p = check_probs(probs)
    y = check_labels(labels, *p.shape)
    return p.max(axis=1), (p.argmax(axis=1) == y).astype(np.float64)


def accuracy(probs, labels) -> float:
    r"""Top-1 accuracy of the averaged prediction.

    .. math:: \mathrm{acc} = \frac1n \sum_i \mathbb 1[\arg\max_k \bar p_{ik} = y_i]

    Parameters
    ----------
    probs : array_like, shape (n, K)
        Class probabilities (BMA for an ensemble).
    labels : array_like of int, shape (n,)
        True classes.

    Returns
    -------
    float
        Fraction in [0, 1]; ties in the argmax go to the lowest class index.
    """
    _, hit = _top_label(probs, labels)
    return float(hit.mean())


def nll(probs, labels, *, log_input: bool = False) -> float:
    r"""Mean negative log-likelihood of the true labels under the averaged prediction.

    .. math:: \mathrm{NLL} = -\frac1n \sum_i \log \max(\bar p_{i y_i}, \epsilon),
       \qquad \epsilon = \texttt{PROB\_FLOOR} = 2.2\times10^{-308}

    The floor only bounds the loss of an example at 708.4 nats when its true class has
    probability 0 (or below the smallest normal double); otherwise the value is exact. For a BMA
    this is the negative log pointwise predictive density, :math:`-\frac1n \sum_i
    \log \frac1S \sum_s p(y_i \mid x_i, \theta_s)`, not the mean NLL of the draws.

    Parameters
    ----------
    probs : array_like, shape (n, K)
        Class probabilities, or log-probabilities when ``log_input=True``.
    labels : array_like of int, shape (n,)
        True classes.
    log_input : bool, default False
        Treat ``probs`` as natural-log probabilities (``-inf`` allowed, rows must log-sum-exp to
        0 within 1e-4). Pass the log-BMA computed with ``logsumexp`` to keep precision for true
        classes whose probability underflows in float64.

    Returns
    -------
    float
        Mean NLL in nats per example, :math:`\ge 0`.
    """
    if log_input:
        lp = check_logits(probs, "probs", normalized=True)
        y = check_labels(labels, *lp.shape)
        log_p_true = np.maximum(lp[np.arange(lp.shape[0]), y], _LOG_PROB_FLOOR)
    else:
        p = check_probs(probs)
        y = check_labels(labels, *p.shape)
        log_p_true = np.log(np.maximum(p[np.arange(p.shape[0]), y], PROB_FLOOR))
    return float(-np.mean(log_p_true) + 0.0)  # + 0.0 turns -0.0 into 0.0


def brier_score(probs, labels) -> float:
    r"""Multi-class Brier score of the averaged prediction.

    .. math:: \mathrm{BS} = \frac1n \sum_i \sum_{k=1}^K (\bar p_{ik} - \mathbb 1[y_i = k])^2

    Dimensionless, in [0, 2]; 0 for a certain correct prediction. This is the sum over classes of
    the one-vs-rest binary Brier scores, ``sum_k sklearn.metrics.brier_score_loss(labels == k,
    probs[:, k])``; for K = 2 it is therefore twice scikit-learn's binary Brier score
    ``brier_score_loss(labels, probs[:, 1])`` (Brier's original definition, which scikit-learn
    halves in the binary case).

    Parameters
    ----------
    probs : array_like, shape (n, K)
        Class probabilities (BMA for an ensemble).
    labels : array_like of int, shape (n,)
        True classes.

    Returns
    -------
    float
    """
    p = check_probs(probs)
    y = check_labels(labels, *p.shape)
    per_example = np.sum(p**2, axis=1) - 2.0 * p[np.arange(p.shape[0]), y] + 1.0
    return float(np.mean(per_example))


def reliability_curve(
    probs, labels, *, n_bins: int = 15, binning: str = "uniform"
) -> ReliabilityCurve:
    r"""Top-label reliability diagram: per-bin mean confidence, accuracy and count.

    The confidences :math:`c_i = \max_k \bar p_{ik}` are split into ``n_bins`` bins
    :math:`B_b`; the curve holds :math:`\mathrm{conf}_b = \frac{1}{|B_b|}\sum_{i\in B_b} c_i`,
    :math:`\mathrm{acc}_b = \frac{1}{|B_b|}\sum_{i\in B_b} \mathbb 1[\hat y_i = y_i]` and
    :math:`|B_b|`.

    Parameters
    ----------
    probs : array_like, shape (n, K)
        Class probabilities (BMA for an ensemble).
    labels : array_like of int, shape (n,)
        True classes.
    n_bins : int, default 15
        Number of bins, >= 1.
    binning : {"uniform", "quantile"}, default "uniform"
        ``"uniform"``: equal-width bins ``[b/n_bins, (b+1)/n_bins)``, the last one closed at 1;
        identical to torchmetrics' ``MulticlassCalibrationError(n_bins)`` binning (a confidence
        exactly on an interior edge goes to the upper bin), except that torchmetrics puts a
        confidence of exactly 1 in an extra bin of its own.
        ``"quantile"``: equal-mass bins; the inner edges are the confidences of rank
        ``ceil(b * n / n_bins)`` (0-based, ascending), ``b = 1 .. n_bins - 1``, with the same
        left-closed rule. Without ties the counts differ by at most one (equal when ``n_bins``
        divides ``n``); tied confidences stay in one bin, so with many ties bins are uneven or
        empty, and the result never depends on the order of the examples.

    Returns
    -------
    ReliabilityCurve
        Empty bins have ``count = 0`` and NaN confidence and accuracy.
    """
    n_bins = check_int(n_bins, "n_bins", 1)
    binning = check_choice(binning, "binning", _BINNINGS)
    conf, hit = _top_label(probs, labels)
    return _bin(conf, hit, n_bins, binning)


def ece(probs, labels, *, n_bins: int = 15, binning: str = "uniform") -> float:
    r"""Top-label expected calibration error.

    .. math:: \mathrm{ECE} = \sum_{b} \frac{|B_b|}{n}\,
       \lvert \mathrm{acc}_b - \mathrm{conf}_b \rvert

    with the bins of :func:`reliability_curve`. Equals torchmetrics'
    ``MulticlassCalibrationError(num_classes=K, n_bins=n_bins, norm="l1")`` for
    ``binning="uniform"`` whenever no confidence is exactly 1 (see :func:`reliability_curve`).

    Parameters
    ----------
    probs : array_like, shape (n, K)
        Class probabilities (BMA for an ensemble).
    labels : array_like of int, shape (n,)
        True classes.
    n_bins : int, default 15
        Number of bins, >= 1.
    binning : {"uniform", "quantile"}, default "uniform"
        Equal-width or equal-mass bins.

    Returns
    -------
    float
        Probability units, in [0, 1].
    """
    return _weighted_gap(reliability_curve(probs, labels, n_bins=n_bins, binning=binning))


def mce(probs, labels, *, n_bins: int = 15, binning: str = "uniform") -> float:
    r"""Top-label maximum calibration error over the non-empty bins.

    .. math:: \mathrm{MCE} = \max_{b:\,|B_b|>0} \lvert \mathrm{acc}_b - \mathrm{conf}_b \rvert

    with the bins of :func:`reliability_curve`; torchmetrics' ``norm="max"`` counterpart of
    :func:`ece`.

    Parameters
    ----------
    probs : array_like, shape (n, K)
        Class probabilities (BMA for an ensemble).
    labels : array_like of int, shape (n,)
        True classes.
    n_bins : int, default 15
        Number of bins, >= 1.
    binning : {"uniform", "quantile"}, default "uniform"
        Equal-width or equal-mass bins.

    Returns
    -------
    float
        Probability units, in [0, 1].
    """
    return _max_gap(reliability_curve(probs, labels, n_bins=n_bins, binning=binning))


def classwise_ece(probs, labels, *, n_bins: int = 15, binning: str = "uniform") -> float:
    r"""Class-wise expected calibration error (Kull et al., 2019).

    .. math:: \mathrm{cwECE} = \frac1K \sum_{k=1}^K \sum_b \frac{|B_{kb}|}{n}
       \left\lvert \frac{1}{|B_{kb}|}\sum_{i\in B_{kb}} \mathbb 1[y_i = k]
       - \frac{1}{|B_{kb}|}\sum_{i\in B_{kb}} \bar p_{ik} \right\rvert

    where the bins :math:`B_{kb}` split the n values :math:`\bar p_{ik}` of class k (all
    examples, not only those predicting k) as in :func:`reliability_curve`.

    Parameters
    ----------
    probs : array_like, shape (n, K)
        Class probabilities (BMA for an ensemble).
    labels : array_like of int, shape (n,)
        True classes.
    n_bins : int, default 15
        Number of bins per class, >= 1.
    binning : {"uniform", "quantile"}, default "uniform"
        Equal-width or equal-mass bins.

    Returns
    -------
    float
        Probability units, in [0, 1].
    """
    n_bins = check_int(n_bins, "n_bins", 1)
    binning = check_choice(binning, "binning", _BINNINGS)
    p = check_probs(probs)
    y = check_labels(labels, *p.shape)
    per_class = [
        _weighted_gap(_bin(p[:, k], (y == k).astype(np.float64), n_bins, binning))
        for k in range(p.shape[1])
    ]
    return float(np.mean(per_class))


def fit_temperature(logits, labels, *, bounds: tuple[float, float] = (1e-2, 1e2)) -> float:
    r"""Fit the post-hoc temperature that minimises the NLL on a held-out split.

    .. math:: \hat T = \arg\min_{T \in [T_{lo}, T_{hi}]} -\frac1n \sum_i
       \log \operatorname{softmax}(z_i / T)_{y_i}

    The objective is convex in :math:`1/T`, so the bounded Brent search over :math:`\log T`
    (``scipy.optimize.minimize_scalar``, deterministic) finds the global minimum in the bounds.
    The result is the best of Brent's point, :math:`T = 1` and the two bounds (ties go to
    :math:`T = 1`, then to the bounds), so the fitted temperature never increases the NLL of the
    fitting split.

    For a posterior ensemble pass ``z = log(BMA probabilities)`` (best computed as
    ``logsumexp(log p_s) - log S``): scaling is applied to the log of the averaged
    probabilities, :math:`p_k(T) \propto \bar p_k^{1/T}`, not to the logits of each draw. Since
    softmax is shift invariant, logits and log-probabilities give the same :math:`\hat T`.

    Fit on a split that is not used to report the calibrated metrics.

    Parameters
    ----------
    logits : array_like, shape (n, K)
        Logits or natural-log probabilities (``-inf`` allowed). Log-probabilities below
        ``log(PROB_FLOOR) = -708.4`` are raised to it, as in :func:`nll`.
    labels : array_like of int, shape (n,)
        True classes of the held-out split.
    bounds : (float, float), default (0.01, 100)
        Search interval ``(T_lo, T_hi)`` with ``0 < T_lo < 1 < T_hi``. A ``RuntimeWarning`` is
        issued when a bound is returned (e.g. a perfectly separated split, whose NLL keeps
        falling as T -> 0 until it rounds to 0).

    Returns
    -------
    float
        Temperature :math:`\hat T > 0` (dimensionless); > 1 softens over-confident
        predictions, < 1 sharpens under-confident ones.
    """
    lo, hi = (float(b) for b in bounds)
    if not 0.0 < lo < 1.0 < hi < np.inf:
        raise ValueError(f"bounds must satisfy 0 < T_lo < 1 < T_hi < inf, got {bounds!r}")
    from scipy.optimize import minimize_scalar
    from scipy.special import log_softmax

    z = check_logits(logits, "logits")
    y = check_labels(labels, *z.shape)
    z = np.maximum(log_softmax(z, axis=1), _LOG_PROB_FLOOR)
    z_true = z[np.arange(z.shape[0]), y]

    def mean_nll(log_t: float) -> float:
        inv_t = np.exp(-log_t)
        return float(np.mean(logsumexp_rows(z * inv_t) - z_true * inv_t))

    result = minimize_scalar(
        mean_nll, bounds=(np.log(lo), np.log(hi)), method="bounded", options={"xatol": 1e-9}
    )
    # Brent never evaluates the bounds, and rounding makes the objective of a (nearly)
    # separable split flat, so the bounds and T = 1 are compared explicitly; ties prefer T = 1.
    candidates = [1.0, lo, hi, float(np.exp(result.x))]
    best = candidates[int(np.argmin([mean_nll(np.log(t)) for t in candidates]))]
    if best in (lo, hi):
        warnings.warn(
            f"fit_temperature: the NLL minimum lies at the bound T = {best:.4g}; "
            "the split may be (nearly) separable or the bounds too narrow",
            RuntimeWarning,
            stacklevel=2,
        )
    return best


def apply_temperature(log_probs, temperature: float) -> np.ndarray:
    r"""Temperature-scale log-probabilities and renormalise.

    .. math:: p_{ik}(T) = \frac{\exp(z_{ik}/T)}{\sum_j \exp(z_{ij}/T)}
       = \frac{\bar p_{ik}^{1/T}}{\sum_j \bar p_{ij}^{1/T}}

    For a posterior ensemble ``log_probs`` is the log of the BMA probabilities (see
    :func:`fit_temperature`).

    Parameters
    ----------
    log_probs : array_like, shape (n, K)
        Logits or natural-log probabilities (``-inf`` allowed: it stays probability 0).
    temperature : float
        T > 0, e.g. from :func:`fit_temperature`.

    Returns
    -------
    ndarray, shape (n, K)
        Probabilities, float64, rows summing to 1.
    """
    if not (isinstance(temperature, int | float | np.number) and 0 < temperature < np.inf):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    from scipy.special import softmax

    z = check_logits(log_probs, "log_probs")
    return softmax(z / float(temperature), axis=1)


def calibration_summary(
    probs, labels, *, n_bins: int = 15, binning: str = "uniform"
) -> dict[str, float]:
    """All calibration scalars of one set of averaged predictions.

    Parameters
    ----------
    probs : array_like, shape (n, K)
        Class probabilities (BMA for an ensemble).
    labels : array_like of int, shape (n,)
        True classes.
    n_bins : int, default 15
        Bins for the ECE-type metrics.
    binning : {"uniform", "quantile"}, default "uniform"
        Equal-width or equal-mass bins.

    Returns
    -------
    dict
        ``accuracy`` (fraction), ``nll`` (nats per example), ``brier_score``, ``ece``, ``mce``
        and ``classwise_ece`` (probability units), each as returned by the function of that name.
    """
    p = check_probs(probs)
    y = check_labels(labels, *p.shape)
    curve = reliability_curve(p, y, n_bins=n_bins, binning=binning)
    return {
        "accuracy": accuracy(p, y),
        "nll": nll(p, y),
        "brier_score": brier_score(p, y),
        "ece": _weighted_gap(curve),
        "mce": _max_gap(curve),
        "classwise_ece": classwise_ece(p, y, n_bins=n_bins, binning=binning),
    }
