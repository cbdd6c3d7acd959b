r"""Predictive ensembles of a trace: the Bayesian model average and its uncertainty.

The draws :math:`\theta^{(c,d)}` of C chains with D draws each give per-draw class
probabilities :math:`p^{(c,d)}(y \mid x)`. The Bayesian model average (BMA) averages
*probabilities*, never logits:

.. math:: \bar p(y \mid x) = \frac{1}{CD} \sum_{c=1}^{C} \sum_{d=1}^{D} p^{(c,d)}(y \mid x).

An :class:`Ensemble` holds those per-draw probabilities for one input set, read from a trace's
``predictions`` group (:func:`from_trace`) or recomputed from the stored weights
(:func:`predict`). :func:`decompose_uncertainty` splits the predictive entropy into its
aleatoric and epistemic parts; :func:`estimate` attaches a Monte-Carlo error over the posterior
draws to any metric of the ensemble, and :func:`calibration` and :func:`ood_detection` use it for
the calibration and OOD-detection metrics of :mod:`bayesflat.metrics`.

Two ways of averaging, the ``ensemble`` argument of the metric functions:

- ``"bma"``: the metric of the BMA of all draws; its Monte-Carlo error comes from a jackknife
  over batches of consecutive draws, which accounts for autocorrelation within chains, see
  :func:`estimate`;
- ``"final"``: a point estimate per chain (the last draw of each chain, e.g. the final iterate
  of an optimiser run); the metric is computed for each chain separately and reported as the
  mean over chains with the standard error of that mean.

OOD convention, as everywhere in bayesflat: OOD is the positive class and a higher score means
more OOD.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bayesflat import metrics
from bayesflat import trace as _trace
from bayesflat._checks import check_choice
from bayesflat._draws import DrawReducer, DrawSums
from bayesflat.metrics._validation import check_probs, class_reduce

__all__ = [
    "ENSEMBLES",
    "MC_METHODS",
    "Ensemble",
    "Estimate",
    "Uncertainty",
    "batch_length",
    "bma",
    "calibration",
    "chain_bma",
    "decompose_uncertainty",
    "estimate",
    "eval_sets",
    "from_trace",
    "StoredEnsemble",
    "calibration_fn",
    "estimate_prefix",
    "estimate_sums",
    "feature_slabs",
    "nest_scores",
    "nll_per_draw_of",
    "ood_fn",
    "scores_of",
    "set_features",
    "softmax",
    "stored_probabilities",
    "ood_detection",
    "ood_scores",
    "predict",
    "state_dict_at",
    "variation_ratio",
]

MAX_REPLICATES = 100_000
"""Most bootstrap replicates :func:`estimate` accepts."""

ENSEMBLES = ("bma", "final")
"""Ways of turning the draws into a prediction: BMA of all draws, or the last draw per chain."""

MC_METHODS = ("batch", "bootstrap", "spread")
"""Monte-Carlo error estimators of :func:`estimate`."""

CALIBRATION_METRICS = ("accuracy", "nll", "brier_score", "ece", "mce")
OOD_METRICS = ("auroc", "aupr_in", "aupr_out", "fpr95")


@dataclass(frozen=True, eq=False, repr=False)
class Ensemble:
    """Per-draw class probabilities of one input set.

    Attributes
    ----------
    probs : ndarray, shape (chain, draw, n, K)
        Class probabilities of every draw, float32 or float64, rows summing to 1.
    labels : ndarray of int, shape (n,), or None
        True classes, when the set is labelled.
    logits : ndarray, shape (chain, draw, n, K), or None
        Logits of every draw, when they were stored (needed by the energy score).
    name : str
        Name of the input set (e.g. ``"test"``, ``"ood_patches"``).
    """

    probs: np.ndarray
    labels: np.ndarray | None = None
    logits: np.ndarray | None = None
    name: str = ""

    def __post_init__(self) -> None:
        probs = np.asarray(self.probs)
        if probs.ndim != 4:
            raise ValueError(
                f"Ensemble.probs must have shape (chain, draw, n, K), got {probs.shape}; "
                "for S draws of one chain pass probs[None]"
            )
        object.__setattr__(self, "probs", probs)
        if self.labels is not None:
            labels = np.asarray(self.labels)
            if labels.shape != (probs.shape[2],) or labels.dtype.kind not in "iu":
                raise ValueError(
                    f"Ensemble.labels must be integers of shape ({probs.shape[2]},), got "
                    f"{labels.dtype} {labels.shape}"
                )
            object.__setattr__(self, "labels", labels.astype(np.intp, copy=False))
        if self.logits is not None:
            logits = np.asarray(self.logits)
            if logits.shape != probs.shape:
                raise ValueError(
                    f"Ensemble.logits must have the shape of probs {probs.shape}, got "
                    f"{logits.shape}"
                )
            object.__setattr__(self, "logits", logits)

    @property
    def chains(self) -> int:
        """Number of chains C."""
        return int(self.probs.shape[0])

    @property
    def draws(self) -> int:
        """Draws per chain D."""
        return int(self.probs.shape[1])

    @property
    def size(self) -> int:
        """Number of inputs n."""
        return int(self.probs.shape[2])

    @property
    def classes(self) -> int:
        """Number of classes K."""
        return int(self.probs.shape[3])

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities and logits (or None) of draws ``start .. stop - 1`` of every chain,
        as :meth:`StoredEnsemble.read` gives them."""
        logits = None if self.logits is None else self.logits[:, start:stop]
        return self.probs[:, start:stop], logits

    def mean(self) -> np.ndarray:
        """The pooled BMA over all chains and draws, float64 ``(n, K)`` (see :func:`bma`)."""
        return bma(self.probs)

    def chain_mean(self) -> np.ndarray:
        """The BMA of each chain, float64 ``(C, n, K)`` (see :func:`chain_bma`)."""
        return chain_bma(self.probs)

    def uncertainty(self) -> Uncertainty:
        """Per-input uncertainty decomposition of all draws (see :func:`decompose_uncertainty`)."""
        return decompose_uncertainty(self.probs)

    def head(self, draws: int) -> Ensemble:
        """The first ``draws`` draws of every chain."""
        if not 1 <= draws <= self.draws:
            raise ValueError(f"draws must be in [1, {self.draws}], got {draws}")
        logits = None if self.logits is None else self.logits[:, :draws]
        return Ensemble(self.probs[:, :draws], self.labels, logits, self.name)

    def final(self, chain: int | None = None) -> Ensemble:
        """The last draw of every chain, ``(C, 1, n, K)``: one point estimate per chain.

        With ``chain`` given, only that chain's last draw, ``(1, 1, n, K)``.
        """
        rows = slice(None) if chain is None else slice(chain, chain + 1)
        if chain is not None and not 0 <= chain < self.chains:
            raise ValueError(f"chain must be in [0, {self.chains}), got {chain}")
        logits = None if self.logits is None else self.logits[rows, -1:]
        return Ensemble(self.probs[rows, -1:], self.labels, logits, self.name)

    def __repr__(self) -> str:
        labelled = "labelled" if self.labels is not None else "unlabelled"
        logits = ", logits" if self.logits is not None else ""
        return (
            f"Ensemble({self.name!r}: {self.chains} chains x {self.draws} draws, "
            f"{self.size} inputs, {self.probs.shape[3]} classes, {labelled}{logits})"
        )


@dataclass(frozen=True)
class Estimate:
    """A number with its Monte-Carlo error over the posterior draws.

    Attributes
    ----------
    value : float
        The estimate, in the metric's units.
    mc_error : float or None
        Its Monte-Carlo standard error, same units; None where it cannot be estimated (one
        chain with ``ensemble="final"`` or ``method="spread"``).
    """

    value: float
    mc_error: float | None

    def to_dict(self) -> dict[str, float | None]:
        """``{"value": ..., "mc_error": ...}``, non-finite numbers as None (JSON null)."""
        return {"value": _finite_or_none(self.value), "mc_error": _finite_or_none(self.mc_error)}

    def format(self, digits: int = 4) -> str:
        """``"value ± mc_error"`` with ``digits`` decimals, ``"n/a"`` for a missing number."""
        value = _finite_or_none(self.value)
        if value is None:
            return "n/a"
        error = _finite_or_none(self.mc_error)
        text = f"{value:.{digits}f}"
        return text if error is None else f"{text} ± {error:.{digits}f}"

    def __str__(self) -> str:
        return self.format()


@dataclass(frozen=True)
class Uncertainty:
    r"""Per-input uncertainty of an ensemble of S members, every array of shape ``(n,)``.

    Attributes
    ----------
    total : ndarray
        Predictive entropy :math:`H[\bar p]` of the BMA, nats.
    aleatoric : ndarray
        Expected entropy :math:`\frac1S \sum_s H[p^{(s)}]`, nats.
    epistemic : ndarray
        Mutual information between label and parameters,
        :math:`H[\bar p] - \frac1S \sum_s H[p^{(s)}] \ge 0`, nats; ``total = aleatoric +
        epistemic`` up to rounding (the mutual information is clipped at 0).
    variation_ratio : ndarray
        :math:`1 - f_{mode} / S`, the fraction of members that do not vote for the most voted
        class, in ``[0, 1 - 1/K]``.
    max_prob : ndarray
        Confidence of the BMA, :math:`\max_k \bar p_k`, in ``[1/K, 1]``.
    """

    total: np.ndarray
    aleatoric: np.ndarray
    epistemic: np.ndarray
    variation_ratio: np.ndarray
    max_prob: np.ndarray


def _finite_or_none(x: float | None) -> float | None:
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _members(member_probs: Any) -> np.ndarray:
    """Float64 members ``(S, n, K)`` from ``(S, n, K)``, ``(C, D, n, K)`` or an Ensemble."""
    if isinstance(member_probs, Ensemble):
        member_probs = member_probs.probs
    p = check_probs(member_probs, "member_probs", ndim=-3)
    return p.reshape(-1, *p.shape[-2:])


def _renormalise(p: np.ndarray) -> np.ndarray:
    # An average of float32 rows sums to 1 only within ~1e-7; metrics expect exact sums.
    return p / p.sum(axis=-1, keepdims=True)


def bma(member_probs: Any) -> np.ndarray:
    r"""Bayesian model average of per-draw class probabilities.

    .. math:: \bar p_{ik} = \frac1S \sum_s p^{(s)}_{ik}

    Probabilities are averaged, not logits: the average of softmaxes is the posterior
    predictive, the softmax of averaged logits is not.

    Parameters
    ----------
    member_probs : array_like or Ensemble
        Per-draw probabilities ``(S, n, K)`` or ``(chain, draw, n, K)``; all leading axes are
        pooled into the S members.

    Returns
    -------
    ndarray, shape (n, K)
        float64 probabilities, rows summing to 1.
    """
    return _renormalise(_members(member_probs).mean(axis=0))


def chain_bma(member_probs: Any) -> np.ndarray:
    r"""Bayesian model average of each chain, :math:`\bar p_c = \frac1D \sum_d p^{(c,d)}`.

    Parameters
    ----------
    member_probs : array_like or Ensemble
        Per-draw probabilities ``(chain, draw, n, K)``.

    Returns
    -------
    ndarray, shape (chain, n, K)
        float64 probabilities, rows summing to 1.
    """
    if isinstance(member_probs, Ensemble):
        member_probs = member_probs.probs
    p = check_probs(member_probs, "member_probs", ndim=4)
    return _renormalise(p.mean(axis=1))


def variation_ratio(member_probs: Any) -> np.ndarray:
    r"""Variation ratio of the members' top-1 votes, OOD-positive.

    .. math:: \mathrm{VR}_i = 1 - \frac{1}{S} \max_k \sum_s \mathbb 1[\arg\max_j p^{(s)}_{ij} = k]

    0 when every member predicts the same class; OOD is the positive class and a higher value
    means more OOD.

    Parameters
    ----------
    member_probs : array_like or Ensemble
        Per-draw probabilities ``(S, n, K)`` or ``(chain, draw, n, K)``.

    Returns
    -------
    ndarray, shape (n,)
        Dimensionless, in ``[0, 1 - 1/K]`` (ties of the argmax go to the lowest class).
    """
    p = _members(member_probs)
    votes = np.zeros(p.shape[1:], dtype=np.int64)
    np.add.at(votes, (np.arange(p.shape[1])[None, :], p.argmax(axis=-1)), 1)
    return 1.0 - votes.max(axis=1) / p.shape[0]


def decompose_uncertainty(member_probs: Any) -> Uncertainty:
    r"""Split the predictive entropy of an ensemble into aleatoric and epistemic parts.

    .. math:: \underbrace{H\Big[\frac1S \sum_s p^{(s)}\Big]}_{\text{total}}
       = \underbrace{\frac1S \sum_s H\big[p^{(s)}\big]}_{\text{aleatoric}}
       + \underbrace{I(y; \theta \mid x)}_{\text{epistemic}}

    computed with :func:`bayesflat.metrics.entropy_score`,
    :func:`~bayesflat.metrics.expected_entropy_score` and
    :func:`~bayesflat.metrics.mutual_information_score` (entropies in nats), plus the
    :func:`variation_ratio` and the BMA confidence. Every part is zero-or-positive and
    OOD-positive except ``max_prob``, which is higher for in-distribution inputs.

    Parameters
    ----------
    member_probs : array_like or Ensemble
        Per-draw probabilities ``(S, n, K)`` or ``(chain, draw, n, K)``.

    Returns
    -------
    Uncertainty
        Arrays of shape ``(n,)``.
    """
    p = _members(member_probs)
    # Not renormalised: the parts then add up exactly, as in mutual_information_score.
    mean = p.mean(axis=0)
    return Uncertainty(
        total=metrics.entropy_score(mean),
        aleatoric=metrics.expected_entropy_score(p),
        epistemic=metrics.mutual_information_score(p),
        variation_ratio=variation_ratio(p),
        max_prob=mean.max(axis=1),
    )


def eval_sets(trace: Any) -> dict[str, bool]:
    """The evaluation sets whose predictions a trace holds, and whether each is labelled.

    Logits stored by ``sample(..., store_logits=True)`` as ``<set>_logits`` belong to
    ``<set>`` and are not sets of their own.

    Parameters
    ----------
    trace : arviz.InferenceData or xarray.DataTree

    Returns
    -------
    dict of str to bool
        Set name to ``True`` when ``observed_data`` holds its labels, in stored order.
    """
    predictions = _trace.get_group(trace, "predictions")
    if predictions is None:
        raise ValueError(
            "the trace has no predictions group; sample with eval_sets=... to store predictions"
        )
    observed = _trace.get_group(trace, "observed_data")
    labelled = set() if observed is None else set(observed.data_vars)
    return {
        _trace.decode_name(name): name in labelled
        for name in _stored_sets(predictions, _trace.trace_attrs(trace))
    }


def _stored_sets(predictions: Any, attrs: Mapping[str, Any]) -> dict[str, tuple[str, str | None]]:
    """Per stored set variable ``<set>``: the variable holding its probabilities (or, in a
    trace stored with ``store_probabilities=False``, its logits) and its logits variable."""
    names = [str(v) for v in predictions.data_vars]
    logits_only = attrs.get("store_probabilities", True) in (False, 0, "False", "false")
    sets: dict[str, tuple[str, str | None]] = {}
    for name in names:
        if logits_only:
            if name.endswith("_logits"):
                sets[name[: -len("_logits")]] = (name, name)
            continue
        if name.endswith("_logits") and name[: -len("_logits")] in names:
            continue
        sets[name] = (name, f"{name}_logits" if f"{name}_logits" in names else None)
    return sets


def softmax(logits: Any) -> np.ndarray:
    r"""Class probabilities from logits, in float32: the operation every stored probability
    of bayesflat comes from.

    .. math:: p_k = \frac{e^{z_k - m}}{\sum_j e^{z_j - m}}, \qquad m = \max_j z_j,

    over the last axis, each row computed on its own in float32 (for up to 32 classes the
    maximum and the sum are folded in class order). The sampling driver stores probabilities
    with it and readers recompute them with it from stored logits, so a trace that keeps
    logits only gives the same numbers, bit for bit, as one that stored probabilities; it
    needs NumPy only, so reading a trace does not import torch.

    Parameters
    ----------
    logits : array_like, shape (..., K)
        Unnormalised log-probabilities (any float dtype; computed in float32).

    Returns
    -------
    ndarray, shape (..., K), float32
        Rows on the probability simplex (to float32 rounding).
    """
    z = np.array(logits, dtype=np.float32, order="C", copy=True)
    z -= class_reduce(np.maximum, z)[..., None]
    np.exp(z, out=z)
    z /= class_reduce(np.add, z)[..., None]
    return z


def stored_probabilities(trace: Any, name: str) -> np.ndarray:
    """Class probabilities of evaluation set ``name``, ``(chain, draw, n, class)``: as stored,
    or the softmax of the stored logits when the trace keeps logits only."""
    predictions = _trace.get_group(trace, "predictions")
    var = _trace.encode_name(name)
    sets = {} if predictions is None else _stored_sets(predictions, _trace.trace_attrs(trace))
    if var not in sets:
        raise ValueError(f"the trace has no predictions for the evaluation set {name!r}")
    probs_var, logits_var = sets[var]
    if probs_var == logits_var:
        return softmax(predictions[logits_var].values)
    return predictions[probs_var].values


def _kept_draws(trace: Any, chains: int, draws: int) -> tuple[list[int], int]:
    """Chains and leading draws that hold values (a stopped run leaves NaN behind)."""
    kept = _trace.trace_attrs(trace).get("draws_kept")
    if kept is None:
        return list(range(chains)), draws
    kept = [int(k) for k in np.atleast_1d(kept)][:chains]
    full = [c for c, k in enumerate(kept) if k > 0]
    if not full:
        raise ValueError("the trace holds no completed draw (draws_kept is 0 for every chain)")
    return full, min(kept[c] for c in full)


def from_trace(trace: Any, name: str = "test") -> Ensemble:
    """The stored predictions of one evaluation set as an :class:`Ensemble`.

    A trace of a run that stopped early keeps the chains with at least one draw, cut to the
    draw count of the shortest of them. For traces larger than memory, :class:`StoredEnsemble`
    reads the same predictions slab by slab.

    Parameters
    ----------
    trace : arviz.InferenceData or xarray.DataTree
        A trace with a ``predictions`` group (``sample(..., eval_sets=...)``).
    name : str, default "test"
        Evaluation set; its labels come from ``observed_data`` and its logits from
        ``predictions[f"{name}_logits"]`` when present.

    Returns
    -------
    Ensemble
    """
    return StoredEnsemble(trace, name).load()


class StoredEnsemble:
    """The predictions of one evaluation set of a trace, read slab by slab of draws.

    The lazy counterpart of :func:`from_trace`: the same chains and draws, labels and
    probabilities (the softmax of stored logits when the trace keeps logits only), but nothing
    is read until :meth:`read` asks for a range of draws. With a lazily opened trace
    (``bayesflat.load(path, lazy=True)``, or what ``bayesflat.sample(..., output=DIR)``
    returns) the memory an estimate needs then does not grow with the number of draws.

    Parameters
    ----------
    trace : arviz.InferenceData or xarray.DataTree
    name : str, default "test"
        Evaluation set.
    """

    def __init__(self, trace: Any, name: str = "test") -> None:
        sets = eval_sets(trace)
        if name not in sets:
            raise ValueError(
                f"the trace has no predictions for the evaluation set {name!r}; it holds "
                f"{list(sets)}"
            )
        predictions = _trace.get_group(trace, "predictions")
        var = _trace.encode_name(name)
        probs_var, logits_var = _stored_sets(predictions, _trace.trace_attrs(trace))[var]
        self.name = name
        self._probs = predictions[probs_var].transpose("chain", "draw", ...)
        self._logits = (
            None if logits_var is None else predictions[logits_var].transpose("chain", "draw", ...)
        )
        self._softmax = probs_var == logits_var
        kept, self._draws = _kept_draws(trace, *self._probs.shape[:2])
        self._chains: Any = slice(None) if kept == list(range(self._probs.shape[0])) else kept
        self._n_chains = len(kept)
        self.labels = None
        if sets[name]:
            labels = np.asarray(_trace.get_group(trace, "observed_data")[var].values)
            self.labels = labels.astype(np.intp, copy=False)

    @property
    def chains(self) -> int:
        """Number of chains C."""
        return self._n_chains

    @property
    def draws(self) -> int:
        """Draws per chain D."""
        return self._draws

    @property
    def size(self) -> int:
        """Number of inputs n."""
        return int(self._probs.shape[2])

    @property
    def classes(self) -> int:
        """Number of classes K."""
        return int(self._probs.shape[3])

    @property
    def has_logits(self) -> bool:
        """Whether the trace holds the logits of this set."""
        return self._logits is not None

    def read(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Probabilities and logits (or None) of draws ``start .. stop - 1`` of every chain,
        each ``(C, stop - start, n, K)``."""
        where = {"chain": self._chains, "draw": slice(start, stop)}
        logits = None if self._logits is None else np.asarray(self._logits[where].values)
        probs = softmax(logits) if self._softmax else np.asarray(self._probs[where].values)
        return probs, logits

    def load(self) -> Ensemble:
        """Every draw in memory, as an :class:`Ensemble`."""
        probs, logits = self.read(0, self.draws)
        return Ensemble(probs, self.labels, logits, self.name)

    def __repr__(self) -> str:
        labelled = "labelled" if self.labels is not None else "unlabelled"
        return (
            f"StoredEnsemble({self.name!r}: {self.chains} chains x {self.draws} draws, "
            f"{self.size} inputs, {self.classes} classes, {labelled})"
        )


def feature_slabs(
    sources: Mapping[str, Any],
    kinds: Mapping[str, Sequence[str]],
    *,
    chunk_bytes: int | None = None,
) -> Iterator[dict[tuple[str, str], np.ndarray]]:
    """Per-draw features of several sets of the same draws, slab by slab of draws.

    Parameters
    ----------
    sources : mapping of str to StoredEnsemble or Ensemble
        Sets sharing ``(chains, draws)``, keyed by the name their features get.
    kinds : mapping of str to sequence of str
        Features of each set (:func:`set_features`).
    chunk_bytes : int, optional
        Bound on the float64 features of one slab (default
        :data:`bayesflat.trace.build.CHUNK_BYTES`).

    Yields
    ------
    dict
        ``{(key, kind): array (C, d, ...)}`` for the next ``d`` draws.
    """
    first = next(iter(sources.values()))
    n_chains, n_draws = first.chains, first.draws
    for key, src in sources.items():
        if (src.chains, src.draws) != (n_chains, n_draws):
            raise ValueError(
                f"set {key!r} has {src.chains} chains x {src.draws} draws but "
                f"{next(iter(sources))!r} has {n_chains} x {n_draws}; both must come from the "
                "same draws"
            )
    per_draw = sum(
        n_chains * src.size * src.classes * (1 + sum(k in ("probs", "votes") for k in kinds[key]))
        for key, src in sources.items()
    )
    step = _trace.build.slab_draws(per_draw, chunk_bytes)
    for d0 in range(0, n_draws, step):
        slab: dict[tuple[str, str], np.ndarray] = {}
        for key, src in sources.items():
            probs, logits = src.read(d0, min(n_draws, d0 + step))
            slab.update(set_features(key, probs, logits, kinds[key]))
        yield slab


def nll_per_draw_of(src: Any, *, chunk_bytes: int | None = None) -> np.ndarray:
    """Test NLL of each draw of a labelled set, ``(chain, draw)`` nats per example, read slab
    by slab (:func:`bayesflat.diagnostics.convergence.nll_per_draw`)."""
    from bayesflat.diagnostics.convergence import nll_per_draw

    parts = [nll_per_draw(slab[src.name, "probs"], src.labels)
             for slab in feature_slabs({src.name: src}, {src.name: ("probs",)},
                                       chunk_bytes=chunk_bytes)]  # fmt: skip
    return np.concatenate(parts, axis=1)


def state_dict_at(trace: Any, chain: int, draw: int) -> dict[str, Any]:
    """The stored weights of one draw, keyed like ``model.state_dict()``.

    Load it with ``model.load_state_dict(state_dict_at(trace, c, d), strict=False)`` (strict
    when every ``state_dict`` entry was stored).

    Parameters
    ----------
    trace : arviz.InferenceData or xarray.DataTree
        A trace with a ``weights`` group.
    chain, draw : int
        Indices into the ``chain`` and ``draw`` dimensions.

    Returns
    -------
    dict of str to torch.Tensor
        float32 CPU tensors.
    """
    import torch

    posterior = _trace.get_group(trace, "weights")
    if posterior is None:
        raise ValueError(
            "the trace has no weights group; it stores no weights (sample with store_weights=True)"
        )
    chains, draws = posterior.sizes["chain"], posterior.sizes["draw"]
    if not (0 <= chain < chains and 0 <= draw < draws):
        raise ValueError(
            f"chain={chain}, draw={draw} is outside the trace's {chains} chains x {draws} draws"
        )
    return {
        _trace.decode_name(str(name)): torch.from_numpy(
            np.ascontiguousarray(posterior[name].values[chain, draw])
        )
        for name in posterior.data_vars
    }


def predict(
    trace: Any,
    model: Any,
    x: Any,
    *,
    batch_size: int = 1024,
    labels: Any = None,
    device: Any = None,
    name: str = "inputs",
) -> Ensemble:
    r"""Class probabilities of new inputs under every stored draw of a trace.

    For every chain c and draw d the stored weights are loaded into a copy of ``model`` (one
    draw's ``state_dict`` at a time) and ``x`` is passed through in batches of ``batch_size``
    in eval mode without gradients:
    :math:`p^{(c,d)} = \operatorname{softmax}(f_{\theta^{(c,d)}}(x))`, computed by
    :func:`softmax` in float32, as the sampling driver stores them.

    Parameters
    ----------
    trace : arviz.InferenceData or xarray.DataTree
        A trace whose ``posterior`` holds every floating ``state_dict`` entry of ``model``
        (``sample(..., store_weights=True)``, the default).
    model : torch.nn.Module
        The network the trace was sampled with; it is copied, not modified. Integer buffers
        (which the trace does not store) keep the model's values.
    x : torch.Tensor or ndarray, shape (n, ...)
        Inputs.
    batch_size : int, default 1024
        Inputs per forward pass.
    labels : array_like of int, shape (n,), optional
        True classes, attached to the result.
    device : torch.device or str, optional
        Where to evaluate; default the device of the model's parameters.
    name : str, default "inputs"
        Name of the result.

    Returns
    -------
    Ensemble
        ``probs`` and ``logits`` float32 ``(chain, draw, n, K)``; memory ``2 * C * D * n * K``
        floats.
    """
    import torch

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if x.ndim < 1 or x.shape[0] < 1:
        raise ValueError(f"x must hold at least one input along its first axis, got {x.shape}")
    if x.is_floating_point() and x.dtype == torch.float64:
        x = x.float()
    posterior = _trace.get_group(trace, "weights")
    if posterior is None:
        raise ValueError(
            "the trace has no weights group; it stores no weights (sample with store_weights=True)"
        )
    net = copy.deepcopy(model)
    if device is None:
        params = list(net.parameters())
        device = params[0].device if params else torch.device("cpu")
    net.to(device).eval()
    state = net.state_dict()
    stored = {_trace.decode_name(str(v)): str(v) for v in posterior.data_vars}
    missing = [k for k, v in state.items() if v.is_floating_point() and k not in stored]
    if missing:
        raise ValueError(
            f"the trace does not store the weights {missing} of this model; sample with "
            "store_weights=True, or pass the model the trace was sampled with"
        )
    keys = [k for k in state if k in stored]
    for key in keys:
        shape = posterior[stored[key]].shape[2:]
        if tuple(shape) != tuple(state[key].shape):
            raise ValueError(
                f"stored weight {key!r} has shape {tuple(shape)} but the model's has "
                f"{tuple(state[key].shape)}; pass the model the trace was sampled with"
            )
    arrays = {key: posterior[stored[key]].values for key in keys}
    chains, n_draws = _kept_draws(trace, *next(iter(arrays.values())).shape[:2])
    probs = logits = None
    with torch.no_grad():
        for i, c in enumerate(chains):
            for d in range(n_draws):
                net.load_state_dict(
                    {
                        key: torch.from_numpy(np.ascontiguousarray(a[c, d]))
                        for key, a in arrays.items()
                    },
                    strict=False,
                )
                out = torch.cat(
                    [
                        net(x[s : s + batch_size].to(device))
                        for s in range(0, x.shape[0], batch_size)
                    ]
                ).float()
                if probs is None:
                    shape = (len(chains), n_draws, *out.shape)
                    probs, logits = np.empty(shape, np.float32), np.empty(shape, np.float32)
                logits[i, d] = out.cpu().numpy()
                probs[i, d] = softmax(logits[i, d])
    return Ensemble(probs, labels, logits, name)


def estimate(
    features: Mapping[str, Any],
    fn: Callable[[dict[str, np.ndarray]], Mapping[str, float]],
    *,
    ensemble: str = "bma",
    method: str = "batch",
    n_boot: int = 200,
    seed: int = 0,
    batch_size: int | None = None,
) -> dict[str, Estimate]:
    r"""Metrics of an ensemble with their Monte-Carlo errors over the posterior draws.

    ``features`` are per-draw arrays ``(C, D, ...)`` (class probabilities, member entropies,
    energies...); ``fn`` maps their averages over draws to named metrics. With
    :math:`\bar F = \frac{1}{CD} \sum_{c,d} w_{cd} F^{(c,d)}` for multiplicities :math:`w`:

    - ``ensemble="bma"``, ``method="batch"`` (the default): value :math:`f(\bar F)` with all
      :math:`w = 1`; error from a jackknife over batches of consecutive draws. Each chain's last
      :math:`bL` draws are cut into :math:`b = \lfloor D / L \rfloor` batches of :math:`L`
      (``batch_size``, default :math:`\lfloor\sqrt D\rfloor`), :math:`K = Cb` batches in all;
      :math:`f_{(-k)}` is the metric of the average of those draws without batch :math:`k`, and

      .. math:: \mathrm{MCSE}^2 = \frac{K-1}{K} \sum_{k=1}^{K}
                \big(f_{(-k)} - \bar f_{(\cdot)}\big)^2 .

      For a mean (``f`` linear) this is exactly the batch-means standard error
      :math:`\operatorname{sd}_k(m_k) / \sqrt K` of the batch means :math:`m_k`, which
      accounts for the autocorrelation within chains once :math:`L` exceeds the
      integrated autocorrelation time (its relative bias is about
      :math:`-2\sum_{t \ge 1} t\rho_t / (L \sum_t \rho_t)`). Unlike the delta method
      (MCSE of the per-draw influence :math:`\nabla f \cdot F^{(c,d)}` from its ESS), it also
      serves metrics that are piecewise constant in :math:`\bar F` (accuracy, ECE, AUROC),
      whose gradient vanishes almost everywhere; unlike a bootstrap over chains it has
      :math:`K - 1` degrees of freedom rather than :math:`C - 1`. None when :math:`K < 2`;
    - ``ensemble="bma"``, ``method="bootstrap"``: value :math:`f(\bar F)` with all
      :math:`w = 1`; error the standard deviation (ddof = 1) of :math:`f(\bar F^{(b)})` over
      ``n_boot`` replicates that resample whole chains with replacement (with one chain: draws
      within it). The replicate weights are those of
      :func:`bayesflat.metrics.bootstrap_metric`, so for ``F = probs`` and a scalar metric both
      give the same number; here ``fn`` may return several metrics and depend on any per-draw
      feature (e.g. the mutual information needs member entropies);
    - ``ensemble="bma"``, ``method="spread"``: value :math:`f(\bar F)`; error
      :math:`\operatorname{std}_c f(\bar F_c) / \sqrt C` from the per-chain averages, as
      :func:`bayesflat.metrics.per_chain_spread` (None for one chain);
    - ``ensemble="final"``: :math:`f` of the last draw of each chain; value the mean over
      chains, error its standard error :math:`\operatorname{std}_c / \sqrt C` (None for one
      chain); ``method`` is not used.

    Parameters
    ----------
    features : mapping of str to array_like, shape (C, D, ...)
        Per-draw arrays sharing ``(C, D)``.
    fn : callable
        ``fn(averages) -> {metric: float}``; ``averages`` maps each feature name to its float64
        average over draws, shape ``(...)``.
    ensemble : {"bma", "final"}, default "bma"
    method : {"batch", "bootstrap", "spread"}, default "batch"
    n_boot : int, default 200
        Bootstrap replicates, >= 2.
    seed : int, default 0
        Seed of the bootstrap.
    batch_size : int, optional
        Draws per batch ``L`` of ``method="batch"``, in [1, D] (default
        :math:`\lfloor\sqrt D\rfloor`); make it longer than the autocorrelation time of the
        draws (:func:`batch_length` chooses it from the ESS of a per-draw functional).

    Returns
    -------
    dict of str to Estimate
        One entry per metric ``fn`` returns.
    """
    check_choice(ensemble, "ensemble", ENSEMBLES)
    check_choice(method, "method", MC_METHODS)
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 2:
        raise ValueError(f"n_boot must be an integer >= 2, got {n_boot!r}")
    if n_boot > MAX_REPLICATES:
        raise ValueError(
            f"n_boot must be <= {MAX_REPLICATES} (the Monte-Carlo error of an error bar from "
            f"{MAX_REPLICATES} replicates is already below 1%), got {n_boot!r}"
        )
    arrays = {k: np.asarray(v) for k, v in features.items()}
    if not arrays:
        raise ValueError("features is empty; pass at least one per-draw array")
    lead = next(iter(arrays.values())).shape[:2]
    for key, value in arrays.items():
        if value.ndim < 2 or value.shape[:2] != lead:
            raise ValueError(
                f"features[{key!r}] has shape {value.shape}; every feature must start with "
                f"the (chain, draw) shape {lead}"
            )
    n_chains, n_draws = lead
    reducer = _reducer(n_chains, n_draws, ensemble, method, n_boot, seed, batch_size)
    step = _trace.build.slab_draws(sum(v[:, :1].size for v in arrays.values()))
    for d0 in range(0, n_draws, step):
        reducer.add({k: v[:, d0 : d0 + step] for k, v in arrays.items()})
    return estimate_sums(reducer.result(), fn, ensemble=ensemble, method=method, n_boot=n_boot,
                         seed=seed)  # fmt: skip


def _check_batch_size(batch_size: Any, n_draws: int) -> int:
    length = math.isqrt(n_draws) if batch_size is None else batch_size
    if isinstance(length, bool) or not isinstance(length, int | np.integer):
        raise TypeError(f"batch_size must be an integer or None, got {batch_size!r}")
    if not 1 <= length <= n_draws:
        raise ValueError(f"batch_size must be in [1, {n_draws}] (draws per chain), got {length}")
    return int(length)


def _boot_weights(n_boot: int, seed: int, n_chains: int, n_draws: int) -> np.ndarray:
    """Replicate weights: whole chains resampled (``(R, C)`` counts), or with one chain its
    draws (``(R, 1, D)``); the multinomial draws of :func:`bayesflat.metrics.bootstrap_metric`,
    in the same order."""
    rng = np.random.default_rng(seed)
    if n_chains >= 2:
        return np.stack([rng.multinomial(n_chains, np.full(n_chains, 1 / n_chains))
                         for _ in range(n_boot)]).astype(np.float64)  # fmt: skip
    rows = [rng.multinomial(n_draws, np.full(n_draws, 1 / n_draws), size=1).ravel()
            for _ in range(n_boot)]  # fmt: skip
    return np.stack(rows).astype(np.float64)[:, None, :]


def _reducer(
    n_chains: int, n_draws: int, ensemble: str, method: str, n_boot: int, seed: int,
    batch_size: int | None, *, points: Sequence[int] = (), point_keys: Any = None,
) -> DrawReducer:  # fmt: skip
    """A reducer keeping what :func:`estimate_sums` needs for ``ensemble`` and ``method``."""
    length = None
    weights = None
    if ensemble == "bma" and method == "batch":
        length = _check_batch_size(batch_size, n_draws)
    if ensemble == "bma" and method == "bootstrap" and n_chains == 1:
        weights = _boot_weights(n_boot, seed, n_chains, n_draws)
    return DrawReducer(n_chains, n_draws, batch_length=length, boot_weights=weights,
                       points=points, point_keys=point_keys)  # fmt: skip


def estimate_sums(
    sums: DrawSums,
    fn: Callable[[dict[Any, np.ndarray]], Mapping[str, float]],
    *,
    ensemble: str = "bma",
    method: str = "batch",
    n_boot: int = 200,
    seed: int = 0,
) -> dict[str, Estimate]:
    """:func:`estimate` from the sums a :class:`bayesflat._draws.DrawReducer` accumulated.

    The reducer must have kept what ``ensemble`` and ``method`` need (batch sums of the batch
    length for ``"batch"``, bootstrap weights for ``"bootstrap"`` with one chain); the numbers
    are those of :func:`estimate` on the same draws.
    """

    def evaluate(avg: dict[Any, np.ndarray]) -> dict[str, float]:
        return {k: float(v) for k, v in fn(avg).items()}

    n_chains, n_draws = sums.chains, sums.draws
    if ensemble == "final":
        return _mean_and_se(
            [evaluate({k: v[c] for k, v in sums.last.items()}) for c in range(n_chains)]
        )
    value = evaluate(sums.total())
    if method == "batch":
        return _batch_jackknife(sums, evaluate, value)
    if method == "spread":
        per_chain = [
            evaluate({k: v[c] / n_draws for k, v in sums.chain.items()}) for c in range(n_chains)
        ]
        errors = _mean_and_se(per_chain)
        return {k: Estimate(v, errors[k].mc_error) for k, v in value.items()}
    if n_chains >= 2:
        counts = _boot_weights(n_boot, seed, n_chains, n_draws)
        replicate_sums = {k: np.tensordot(counts, v, axes=1) for k, v in sums.chain.items()}
    else:
        replicate_sums = sums.boot
    replicates: dict[str, list[float]] = {k: [] for k in value}
    for r in range(n_boot):
        avg = {k: v[r] / (n_chains * n_draws) for k, v in replicate_sums.items()}
        for key, metric in evaluate(avg).items():
            replicates[key].append(metric)
    return {
        key: Estimate(val, float(np.std(replicates[key], ddof=1))) for key, val in value.items()
    }


def estimate_prefix(
    sums: DrawSums,
    draws: int,
    fn: Callable[[dict[Any, np.ndarray]], Mapping[str, float]],
    *,
    ensemble: str = "bma",
) -> dict[str, Estimate]:
    """:func:`estimate` with ``method="spread"`` on the first ``draws`` draws of every chain,
    from the prefix sums a reducer kept at that draw count."""

    def evaluate(avg: dict[Any, np.ndarray]) -> dict[str, float]:
        return {k: float(v) for k, v in fn(avg).items()}

    n_chains = sums.chains
    if ensemble == "final":
        at = sums.at[draws]
        return _mean_and_se([evaluate({k: v[c] for k, v in at.items()}) for c in range(n_chains)])
    prefix = sums.prefix[draws]
    value = evaluate({k: v.sum(axis=0) / (n_chains * draws) for k, v in prefix.items()})
    per_chain = [evaluate({k: v[c] / draws for k, v in prefix.items()}) for c in range(n_chains)]
    errors = _mean_and_se(per_chain)
    return {k: Estimate(v, errors[k].mc_error) for k, v in value.items()}


def _batch_jackknife(
    sums: DrawSums,
    evaluate: Callable[[dict[Any, np.ndarray]], dict[str, float]],
    value: Mapping[str, float],
) -> dict[str, Estimate]:
    """Delete-one-batch jackknife over batches of consecutive draws (see :func:`estimate`)."""
    if not sums.batch_length:
        return {k: Estimate(v, None) for k, v in value.items()}
    length = sums.batch_length
    n_batches = next(iter(sums.batch.values())).shape[0]
    totals = {k: v.sum(axis=0) for k, v in sums.batch.items()}
    rest = n_batches * length - length
    replicates: dict[str, list[float]] = {k: [] for k in value}
    for b in range(n_batches):
        metrics_b = evaluate({k: (totals[k] - sums.batch[k][b]) / rest for k in sums.batch})
        for key, metric in metrics_b.items():
            replicates[key].append(metric)
    out = {}
    for key, val in value.items():
        reps = np.asarray(replicates[key])
        var = (n_batches - 1) / n_batches * np.sum((reps - reps.mean()) ** 2)
        out[key] = Estimate(val, float(np.sqrt(var)))
    return out


def batch_length(per_draw: Any, *, factor: float = 1.0) -> tuple[int, float]:
    r"""Batch length for ``method="batch"`` from the autocorrelation of a per-draw functional.

    The integrated autocorrelation time :math:`\tau = CD / \mathrm{ESS}_\mathrm{bulk}` of the
    functional (``arviz.ess``, rank-normalised bulk ESS, in draws) sets the batch length

    .. math:: L = \min\big(D,\ \max(\lfloor \sqrt D \rfloor,\ \lceil
              \mathrm{factor} \cdot \tau \rceil)\big),

    so batches are at least as long as :math:`\tau` (up to whole chains, which reduces the
    jackknife to one over chains).

    Parameters
    ----------
    per_draw : array, shape (chain, draw)
        A scalar functional of each draw, e.g. the test NLL of each draw.
    factor : float, default 1
        Multiple of :math:`\tau` a batch must span.

    Returns
    -------
    (L, tau)
        Batch length in draws and :math:`\tau` in draws (NaN when the ESS cannot be computed;
        then ``L`` is :math:`\lfloor\sqrt D\rfloor`).
    """
    import arviz as az

    x = np.asarray(per_draw, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"per_draw must have shape (chain, draw), got {x.shape}")
    n_chains, n_draws = x.shape
    tau = math.nan
    if n_draws >= 4 and np.all(np.isfinite(x)) and np.ptp(x) > 0:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ess = float(az.ess(az.convert_to_dataset({"f": x}), method="bulk")["f"])
        if math.isfinite(ess) and ess > 0:
            tau = n_chains * n_draws / ess
    length = math.isqrt(n_draws)
    if math.isfinite(tau):
        length = max(length, math.ceil(factor * tau))
    return max(1, min(n_draws, length)), tau


def _mean_and_se(per_chain: list[dict[str, float]]) -> dict[str, Estimate]:
    out = {}
    for key in per_chain[0]:
        values = np.array([row[key] for row in per_chain])
        error = float(np.std(values, ddof=1) / np.sqrt(values.size)) if values.size > 1 else None
        out[key] = Estimate(float(values.mean()), error)
    return out


def _log(p: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.log(p)


def _check_labelled(ens: Any, argname: str) -> Ensemble:
    if not isinstance(ens, Ensemble):
        raise TypeError(
            f"{argname} must be an Ensemble (from_trace, predict, or Ensemble(probs, labels)), "
            f"got {type(ens).__name__}"
        )
    if ens.labels is None:
        raise ValueError(f"{argname} ({ens.name!r}) has no labels; calibration needs them")
    return ens


def calibration(
    test: Ensemble,
    val: Ensemble | None = None,
    *,
    n_bins: int = 15,
    ensemble: str = "bma",
    method: str = "batch",
    n_boot: int = 200,
    seed: int = 0,
    batch_size: int | None = None,
) -> dict[str, Estimate]:
    r"""Accuracy, NLL, Brier, ECE and MCE of an ensemble, before and after temperature scaling.

    Raw metrics: :func:`bayesflat.metrics.accuracy`, :func:`~bayesflat.metrics.nll` (nats per
    example), :func:`~bayesflat.metrics.brier_score`, :func:`~bayesflat.metrics.ece` and
    :func:`~bayesflat.metrics.mce` (``n_bins`` equal-width bins) of the averaged prediction
    :math:`\bar p` on ``test``. With ``val``, the temperature
    :math:`\hat T = \arg\min_T \mathrm{NLL}_{val}(\operatorname{softmax}(\log \bar p_{val} / T))`
    (:func:`~bayesflat.metrics.fit_temperature`) is fitted on the validation ensemble and the
    same metrics are reported for :math:`\operatorname{softmax}(\log \bar p_{test} / \hat T)`
    under the keys ``"scaled_<metric>"``, with ``"temperature"`` itself. Each jackknife or
    bootstrap replicate takes the same draws of both sets and refits :math:`\hat T`, so the
    error of the scaled metrics includes that of :math:`\hat T`.

    Parameters
    ----------
    test : Ensemble
        Labelled ensemble the metrics are reported on.
    val : Ensemble, optional
        Labelled held-out ensemble of the same draws, for temperature scaling; never the test
        set.
    n_bins : int, default 15
        Bins of ECE and MCE.
    ensemble, method, n_boot, seed, batch_size
        See :func:`estimate`.

    Returns
    -------
    dict of str to Estimate
        ``accuracy``, ``nll``, ``brier_score``, ``ece``, ``mce``; with ``val`` also
        ``temperature`` and ``scaled_<metric>`` for each of them.
    """
    test = _check_labelled(test, "test")
    sources = {"test": test}
    if val is not None:
        val = _check_labelled(val, "val")
        if val.probs.shape[:2] != test.probs.shape[:2]:
            raise ValueError(
                f"val has {val.probs.shape[:2]} (chain, draw) but test has "
                f"{test.probs.shape[:2]}; both must come from the same draws"
            )
        sources["val"] = val
    fn = calibration_fn(test.labels, "test", None if val is None else (val.labels, "val"), n_bins)
    features: dict[Any, np.ndarray] = {}
    for role, ens in sources.items():
        features.update(set_features(role, ens.probs, None, ("probs",)))
    return estimate(features, fn, ensemble=ensemble, method=method, n_boot=n_boot, seed=seed,
                    batch_size=batch_size)  # fmt: skip


def calibration_fn(
    labels: np.ndarray, key: str, val: tuple[np.ndarray, str] | None, n_bins: int
) -> Callable[[Mapping[Any, np.ndarray]], dict[str, float]]:
    """The metric function of :func:`calibration` on averaged features (see :func:`estimate`):
    the BMA of set ``key``, and with ``val = (labels, key)`` its temperature-scaled version."""

    def fn(avg: Mapping[Any, np.ndarray]) -> dict[str, float]:
        p = _renormalise(avg[key, "probs"])
        out = _calibration_scalars(p, labels, n_bins)
        if val is not None:
            t = _fit_temperature(_renormalise(avg[val[1], "probs"]), val[0])
            scaled = metrics.apply_temperature(_log(p), t)
            out["temperature"] = t
            for name, v in _calibration_scalars(scaled, labels, n_bins).items():
                out[f"scaled_{name}"] = v
        return out

    return fn


def _fit_temperature(p: np.ndarray, labels: np.ndarray) -> float:
    """:func:`bayesflat.metrics.fit_temperature` of averaged probabilities (a zero among them
    is a log of -inf, not a warning)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return metrics.fit_temperature(_log(p), labels)


def _calibration_scalars(p: np.ndarray, labels: np.ndarray, n_bins: int) -> dict[str, float]:
    return {
        "accuracy": metrics.accuracy(p, labels),
        "nll": metrics.nll(p, labels),
        "brier_score": metrics.brier_score(p, labels),
        "ece": metrics.ece(p, labels, n_bins=n_bins),
        "mce": metrics.mce(p, labels, n_bins=n_bins),
    }


OOD_SCORES = ("max_softmax", "entropy", "mutual_information", "energy")
"""OOD scores of :func:`ood_scores`, each OOD-positive."""


FEATURES = ("probs", "entropy", "votes", "energy")
"""Per-draw features :func:`set_features` computes."""


def set_features(
    key: str, probs: np.ndarray, logits: np.ndarray | None, kinds: Sequence[str]
) -> dict[tuple[str, str], np.ndarray]:
    r"""Per-draw features of one input set, keyed ``(key, kind)``.

    ``probs`` :math:`p^{(s)}`; ``entropy`` :math:`H[p^{(s)}]` (nats); ``votes`` the one-hot
    class each draw predicts; ``energy`` :math:`-\log\sum_k e^{z^{(s)}_k}` (only with logits).

    Parameters
    ----------
    key : str
        Name under which the features are keyed.
    probs : ndarray, shape (chain, draw, n, K)
    logits : ndarray of the same shape, or None
    kinds : sequence of str
        Features to compute, from :data:`FEATURES`.
    """
    c, d, n, k = probs.shape
    out: dict[tuple[str, str], np.ndarray] = {}
    if "probs" in kinds:
        out[key, "probs"] = probs
    if "entropy" in kinds:
        out[key, "entropy"] = metrics.entropy_score(probs.reshape(-1, k)).reshape(c, d, n)
    if "votes" in kinds:
        votes = np.zeros(probs.shape, dtype=np.float32)
        np.put_along_axis(votes, probs.argmax(axis=-1)[..., None], 1.0, axis=-1)
        out[key, "votes"] = votes
    if "energy" in kinds and logits is not None:
        out[key, "energy"] = metrics.energy_score(logits.reshape(-1, k)).reshape(c, d, n)
    return out


def scores_of(avg: Mapping[Any, np.ndarray], key: str, members: int) -> dict[str, np.ndarray]:
    """OOD scores of set ``key`` from its averaged features (see :func:`ood_scores`)."""
    # Entropy and confidence of the same BMA as ``Ensemble.mean``: float32 members sum to one
    # only to ~1e-7, which moves the entropy by as much and can reorder near-tied inputs. The
    # mutual information keeps the raw average, as :func:`metrics.mutual_information_score`
    # does, so both of its terms carry the same rounding.
    p = _renormalise(avg[key, "probs"])
    scores = {"max_softmax": metrics.max_softmax_score(p), "entropy": metrics.entropy_score(p)}
    if members > 1:
        total = metrics.entropy_score(avg[key, "probs"])
        scores["mutual_information"] = np.maximum(total - avg[key, "entropy"], 0.0)
    if (key, "energy") in avg:
        scores["energy"] = avg[key, "energy"]
    return scores


def ood_fn(
    key_in: str, key_out: str, members: int
) -> Callable[[Mapping[Any, np.ndarray]], dict[str, float]]:
    """The metric function of :func:`ood_detection`: ``"<score>.<metric>"`` for every score
    both sets have."""

    def fn(avg: Mapping[Any, np.ndarray]) -> dict[str, float]:
        s_in, s_out = scores_of(avg, key_in, members), scores_of(avg, key_out, members)
        return {
            f"{score}.{metric}": value
            for score in s_in
            if score in s_out
            for metric, value in metrics.ood_summary(s_in[score], s_out[score]).items()
        }

    return fn


def nest_scores(flat: Mapping[str, Estimate]) -> dict[str, dict[str, Estimate]]:
    """``{"<score>.<metric>": e}`` as ``{score: {metric: e}}``."""
    out: dict[str, dict[str, Estimate]] = {}
    for key, value in flat.items():
        score, metric = key.split(".")
        out.setdefault(score, {})[metric] = value
    return out


def ood_scores(ens: Ensemble) -> dict[str, np.ndarray]:
    r"""Per-input OOD scores of an ensemble, OOD-positive (a higher score means more OOD).

    - ``max_softmax``: :math:`1 - \max_k \bar p_k` (:func:`bayesflat.metrics.max_softmax_score`);
    - ``entropy``: :math:`H[\bar p]`, nats (:func:`~bayesflat.metrics.entropy_score`);
    - ``mutual_information``: :math:`H[\bar p] - \frac1S\sum_s H[p^{(s)}]`, nats
      (:func:`~bayesflat.metrics.mutual_information_score`); left out for a single member;
    - ``energy``: the members' mean free energy :math:`\frac1S \sum_s -\log\sum_k
      e^{z^{(s)}_k}`, logit units (:func:`~bayesflat.metrics.energy_score`); only when the
      ensemble holds logits.

    Parameters
    ----------
    ens : Ensemble
        All its draws are the members; pass ``ens.final(chain)`` for one point estimate.

    Returns
    -------
    dict of str to ndarray, shape (n,)
    """
    if not isinstance(ens, Ensemble):
        raise TypeError(f"ens must be an Ensemble, got {type(ens).__name__}")
    feats = set_features("set", ens.probs, ens.logits, ("probs", "entropy", "energy"))
    avg = {k: v.astype(np.float64).mean(axis=(0, 1)) for k, v in feats.items()}
    return scores_of(avg, "set", ens.chains * ens.draws)


def ood_detection(
    ens_in: Ensemble,
    ens_out: Ensemble,
    *,
    ensemble: str = "bma",
    method: str = "batch",
    n_boot: int = 200,
    seed: int = 0,
    batch_size: int | None = None,
) -> dict[str, dict[str, Estimate]]:
    """AUROC, AUPR-in, AUPR-out and FPR@95 of every OOD score, with Monte-Carlo errors.

    For each score of :func:`ood_scores` computed on the in-distribution ensemble ``ens_in``
    and the OOD ensemble ``ens_out`` (the same draws), :func:`bayesflat.metrics.ood_summary`
    gives the four detection metrics; OOD is the positive class and a higher score means more
    OOD. Each jackknife or bootstrap replicate takes the same draws of both sets (see
    :func:`estimate`).

    Parameters
    ----------
    ens_in, ens_out : Ensemble
        In-distribution (usually the test set) and OOD ensembles.
    ensemble, method, n_boot, seed, batch_size
        See :func:`estimate`. With ``ensemble="final"`` there is one member per chain and the
        mutual information is left out.

    Returns
    -------
    dict
        ``{score: {"auroc" | "aupr_in" | "aupr_out" | "fpr95": Estimate}}``; the energy score
        only when both ensembles hold logits.
    """
    for ens, argname in ((ens_in, "ens_in"), (ens_out, "ens_out")):
        if not isinstance(ens, Ensemble):
            raise TypeError(f"{argname} must be an Ensemble, got {type(ens).__name__}")
    if ens_in.probs.shape[:2] != ens_out.probs.shape[:2]:
        raise ValueError(
            f"ens_in has {ens_in.probs.shape[:2]} (chain, draw) but ens_out has "
            f"{ens_out.probs.shape[:2]}; both must come from the same draws"
        )
    kinds = ("probs", "entropy", "energy") if ens_in.logits is not None and \
        ens_out.logits is not None else ("probs", "entropy")  # fmt: skip
    features = {
        **set_features("in", ens_in.probs, ens_in.logits, kinds),
        **set_features("out", ens_out.probs, ens_out.logits, kinds),
    }
    members = 1 if ensemble == "final" else ens_in.chains * ens_in.draws
    flat = estimate(features, ood_fn("in", "out", members), ensemble=ensemble, method=method,
                    n_boot=n_boot, seed=seed, batch_size=batch_size)  # fmt: skip
    return nest_scores(flat)
