"""Convergence diagnostics on scalar functionals of the draws, and sampler temperatures.

Weight-space R-hat of a neural network is meaningless: the posterior is symmetric
under permutations of hidden units, so two chains in equivalent modes disagree on
every weight. The diagnostics here are computed on scalar *functionals* that are
invariant to those symmetries (the potential, the test NLL, predicted
probabilities) plus a few random projections of the weights, which detect a chain
that is still drifting.

R-hat, bulk/tail ESS and MCSE are ArviZ's (Vehtari et al. 2021); nested R-hat
(Margossian et al.) is implemented here because ArviZ 0.x does not provide it.
The temperature estimators check the units convention of the package: the target
is ``pi(theta) ∝ exp(-N L(theta) / T)`` with ``L`` the mean loss (see DESIGN.md,
section 1); a correct sampler at stationarity has kinetic and configurational
temperatures equal to ``T``.

References
----------
Vehtari, Gelman, Simpson, Carpenter, Bürkner (2021). Rank-normalization, folding,
and localization: an improved R-hat for assessing convergence of MCMC. Bayesian
Analysis 16(2). arXiv:1903.08008.

Margossian, Hoffman, Sountsov, Riou-Durand, Vehtari, Gelman. Nested R-hat:
assessing the convergence of Markov chain Monte Carlo when running many short
chains. arXiv:2110.13017.

Wenzel et al. (2020). How good is the Bayes posterior in deep neural networks
really? ICML. arXiv:2002.02405 (kinetic and configurational temperature
diagnostics for SG-MCMC).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import arviz as az
import numpy as np
import xarray as xr

from bayesflat.trace.build import draw_chunks

__all__ = [
    "DEFAULT_THRESHOLDS",
    "ConvergenceRow",
    "Estimate",
    "configurational_temperature",
    "convergence_table",
    "functionals",
    "kinetic_temperature",
    "nll_per_draw",
    "rhat_nested",
    "true_class_probability",
    "weight_projections",
]

DEFAULT_THRESHOLDS: dict[str, float] = {"rhat": 1.01, "ess_per_chain": 100.0}
"""Vehtari et al. (2021): rank-normalised R-hat below 1.01; bulk-ESS and tail-ESS at
least 100 per chain (400 in total for the recommended four chains)."""

# Predictions are stored as float32; a probability below its smallest normal number
# is an underflow, not information, so it is floored there (-log gives about 87.3).
_PROB_FLOOR = float(np.finfo(np.float32).tiny)


class ConvergenceRow(NamedTuple):
    """One functional's diagnostics: see :func:`convergence_table`."""

    name: str
    rhat: float
    ess_bulk: float
    ess_tail: float
    mcse_mean: float
    verdict: str


class Estimate(NamedTuple):
    """A Monte Carlo estimate and its standard error (same units as the estimate)."""

    estimate: float
    mcse: float


# ---------------------------------------------------------------- functionals


def nll_per_draw(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    r"""Test negative log-likelihood of each draw.

    .. math:: \mathrm{NLL}_{c,s} = -\frac{1}{n} \sum_{i=1}^{n} \log p_{c,s}(y_i \mid x_i)

    Parameters
    ----------
    probs : array, shape (chain, draw, n, n_class)
        Predicted class probabilities of each draw.
    labels : int array, shape (n,)
        Observed labels.

    Returns
    -------
    ndarray, shape (chain, draw)
        Mean NLL in nats per example. Probabilities are floored at the smallest
        normal float32 (the storage precision of predictions), so an underflowed
        probability contributes about 87.3 nats rather than infinity.
    """
    p_true = true_class_probability(probs, labels)
    return -np.log(np.maximum(p_true, _PROB_FLOOR)).mean(axis=-1)


def true_class_probability(
    probs: np.ndarray, labels: np.ndarray, indices: Sequence[int] | np.ndarray | None = None
) -> np.ndarray:
    """Probability each draw assigns to the observed class, ``p_{c,s}(y_i | x_i)``.

    Parameters
    ----------
    probs : array, shape (chain, draw, n, n_class)
        Predicted class probabilities of each draw.
    labels : int array, shape (n,)
        Observed labels.
    indices : sequence of int, optional
        Inputs to keep (default: all ``n``).

    Returns
    -------
    ndarray, shape (chain, draw, len(indices))
        Probabilities (dimensionless, in [0, 1]), float64.
    """
    probs = np.asarray(probs)
    labels = np.asarray(labels)
    if probs.ndim != 4:
        raise ValueError(f"probs must have shape (chain, draw, n, n_class), got {probs.shape}")
    if labels.shape != (probs.shape[2],):
        raise ValueError(f"labels must have shape ({probs.shape[2]},), got {labels.shape}")
    idx = np.arange(probs.shape[2]) if indices is None else np.asarray(indices, dtype=int)
    return probs[:, :, idx, labels[idx]].astype(np.float64)


def weight_projections(
    weights: Mapping[str, np.ndarray], n_projections: int = 4, seed: int = 0
) -> np.ndarray:
    r"""Fixed random projections of the weights, ``<theta, u_j> / sqrt(d)``.

    The weight variables are taken in sorted name order, each flattened over its
    non-(chain, draw) dimensions and concatenated into ``theta`` of length ``d``.
    The directions ``u_j ~ N(0, I_d)`` come from ``numpy.random.default_rng(seed)``:
    for each variable in that order, a block of shape ``(size, n_projections)``.
    So the same seed and the same variables always give the same directions, and
    the variables are never concatenated in memory.

    .. math:: P_{c,s,j} = \frac{1}{\sqrt{d}} \sum_{k=1}^{d} \theta_{c,s,k}\, u_{j,k}

    Parameters
    ----------
    weights : mapping of str to array or xarray.DataArray, shape (chain, draw, ...)
        Weight draws, e.g. the ``weights`` group. DataArrays (with ``chain`` and ``draw``
        dimensions) are read slab by slab of draws, so a lazily opened trace is never held in
        memory whole.
    n_projections : int
        Number of directions.
    seed : int
        Seed of the directions.

    Returns
    -------
    ndarray, shape (chain, draw, n_projections)
        Projections in weight units (the ``1/sqrt(d)`` makes them O(rms weight)).
    """
    if not weights:
        raise ValueError("weight_projections needs at least one weight variable")
    rng = np.random.default_rng(seed)
    total = None
    dim = 0
    for name in sorted(weights):
        w = weights[name]
        if not isinstance(w, xr.DataArray):
            w = np.asarray(w)
            if w.ndim < 2:
                raise ValueError(
                    f"weight {name!r} must have shape (chain, draw, ...), got {w.shape}"
                )
            w = xr.DataArray(w, dims=("chain", "draw", *(f"d{i}" for i in range(w.ndim - 2))))
        size = int(np.prod([n for d, n in w.sizes.items() if d not in ("chain", "draw")]))
        u = rng.standard_normal((size, n_projections))
        if total is None:
            total = np.zeros((w.sizes["chain"], w.sizes["draw"], n_projections))
        for d0, slab in draw_chunks(w):
            flat = slab.reshape(slab.shape[0], slab.shape[1], -1).astype(np.float64)
            total[:, d0 : d0 + flat.shape[1]] += flat @ u
        dim += size
    return total / math.sqrt(dim)


def _is_array_mapping(data: Any) -> bool:
    return (
        isinstance(data, Mapping)
        and not isinstance(data, getattr(xr, "DataTree", ()))
        and all(isinstance(v, np.ndarray | xr.DataArray) for v in data.values())
    )


def _trace_groups(trace: Any) -> dict[str, xr.Dataset]:
    if isinstance(trace, Mapping) and all(isinstance(v, xr.Dataset) for v in trace.values()):
        return dict(trace)
    from bayesflat.trace import groups

    return groups(trace)


def functionals(
    trace: Any,
    *,
    n_inputs: int = 8,
    n_projections: int = 4,
    seed: int = 0,
    var_names: Sequence[str] | None = None,
    attrs: Mapping[str, Any] | None = None,
) -> dict[str, np.ndarray]:
    """Scalar functionals of a trace on which convergence is diagnosed.

    ``lp``
        The recorded log joint density estimate, ``sample_stats["lp"] = -N L_B`` (nats).
    ``nll_<set>``
        Test NLL of each draw on every evaluation set that has observed labels,
        :func:`nll_per_draw` (nats per example).
    ``p_true_<set>_<i>``
        Probability of the true class of ``n_inputs`` fixed inputs ``i`` of each such
        set, chosen without replacement by ``default_rng(seed)`` and sorted.
    ``proj_<j>``
        :func:`weight_projections` of the ``weights`` group (weight units).

    Parameters
    ----------
    trace : InferenceData, DataTree or mapping of str to xarray.Dataset
        A bayesflat trace, or its groups as returned by ``bayesflat.trace.groups``.
    n_inputs : int
        Inputs per evaluation set whose true-class probability is tracked.
    n_projections : int
        Number of random weight projections (0 for none).
    seed : int
        Seed of the input subset and of the projection directions.
    var_names : sequence of str, optional
        Stored weights to project (default: all).
    attrs : mapping, optional
        Root attributes of the trace when ``trace`` is a mapping of groups (they say whether
        ``predictions`` holds logits only, ``store_probabilities=False``).

    Returns
    -------
    dict of str to ndarray, shape (chain, draw)
        Functionals present in the trace; groups it lacks are skipped.
    """
    grp = _trace_groups(trace)
    out: dict[str, np.ndarray] = {}

    stats = grp.get("sample_stats")
    if stats is not None and "lp" in stats:
        out["lp"] = np.asarray(stats["lp"].transpose("chain", "draw").values, dtype=np.float64)

    preds = grp.get("predictions")
    observed = grp.get("observed_data")
    if preds is not None and observed is not None:
        from bayesflat.predictive import _stored_sets, softmax
        from bayesflat.trace import trace_attrs

        if attrs is None:  # a trace has root attributes; a plain mapping of groups has none
            attrs = trace_attrs(trace) if hasattr(trace, "attrs") else {}
        for name, (stored, logits) in _stored_sets(preds, attrs).items():
            if name not in observed:
                continue
            labels = np.asarray(observed[name].values, dtype=int)
            rng = np.random.default_rng(seed)
            picked = np.sort(
                rng.choice(labels.size, size=min(n_inputs, labels.size), replace=False)
            )
            nll, p_true = [], []
            dims = ("chain", "draw", preds[stored].dims[2], "class")
            for _, probs in draw_chunks(preds[stored].transpose(*dims)):
                probs = softmax(probs) if stored == logits else probs
                nll.append(nll_per_draw(probs, labels))
                p_true.append(true_class_probability(probs, labels, picked))
            out[f"nll_{name}"] = np.concatenate(nll, axis=1)
            p_true_all = np.concatenate(p_true, axis=1)
            for k, i in enumerate(picked):
                out[f"p_true_{name}_{i}"] = p_true_all[..., k]

    posterior = grp.get("weights")
    if posterior is not None and n_projections > 0 and posterior.data_vars:
        names = list(posterior.data_vars) if var_names is None else list(var_names)
        draws = {n: posterior[n] for n in names}
        proj = weight_projections(draws, n_projections=n_projections, seed=seed)
        for j in range(n_projections):
            out[f"proj_{j}"] = proj[..., j]
    return out


# ---------------------------------------------------------------- R-hat / ESS table


def convergence_table(
    data: Any, *, thresholds: Mapping[str, float] | None = None, **functional_kwargs: Any
) -> tuple[list[ConvergenceRow], dict[str, float]]:
    """R-hat, bulk/tail ESS and MCSE of the mean of each functional, with a verdict.

    All four numbers are ArviZ's: ``az.rhat`` (rank-normalised split R-hat, the
    maximum of the bulk and folded versions), ``az.ess(method="bulk")``,
    ``az.ess(method="tail")`` (minimum ESS of the 5% and 95% quantiles) and
    ``az.mcse(method="mean")``.

    Verdict ``"pass"`` when ``rhat < thresholds["rhat"]`` and both ESS are at least
    ``thresholds["ess_per_chain"] * n_chains``; ``"warn"`` otherwise, including when
    a statistic is NaN (e.g. a constant functional or a single chain). The
    defaults, :data:`DEFAULT_THRESHOLDS`, are Vehtari et al. (2021): R-hat < 1.01 and
    ESS >= 100 per chain (400 for four chains). For many short chains use
    :func:`rhat_nested`, and lower ``ess_per_chain`` to what the run can reach.

    Parameters
    ----------
    data : trace, or mapping of str to array of shape (chain, draw)
        A trace (then :func:`functionals` is applied with ``functional_kwargs``) or
        functionals already computed.
    thresholds : mapping, optional
        Overrides of ``"rhat"`` and/or ``"ess_per_chain"``.
    **functional_kwargs
        Passed to :func:`functionals` when ``data`` is a trace.

    Returns
    -------
    rows : list of ConvergenceRow
        ``(name, rhat, ess_bulk, ess_tail, mcse_mean, verdict)`` per functional, in
        the order of ``data``. ESS in draws; MCSE in the functional's units.
    thresholds : dict
        The thresholds used: ``rhat``, ``ess_per_chain`` and the total ``ess`` that
        was applied (``ess_per_chain * n_chains``).
    """
    if _is_array_mapping(data):
        arrays = {k: np.asarray(v, dtype=np.float64) for k, v in data.items()}
        if functional_kwargs:
            raise TypeError("functional keyword arguments need a trace, not computed arrays")
    else:
        arrays = functionals(data, **functional_kwargs)
    if not arrays:
        raise ValueError("no functionals to diagnose")
    shapes = {v.shape for v in arrays.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise ValueError(f"functionals must all have one shape (chain, draw), got {shapes}")

    unknown = set(thresholds or {}) - set(DEFAULT_THRESHOLDS)
    if unknown:
        raise ValueError(
            f"unknown thresholds {sorted(unknown)}; known: {sorted(DEFAULT_THRESHOLDS)}"
        )
    used = {**DEFAULT_THRESHOLDS, **(thresholds or {})}
    n_chains = next(iter(shapes))[0]
    used["ess"] = used["ess_per_chain"] * n_chains

    ds = az.convert_to_dataset(arrays)
    rhat = az.rhat(ds)
    ess_bulk = az.ess(ds, method="bulk")
    ess_tail = az.ess(ds, method="tail")
    mcse = az.mcse(ds, method="mean")

    rows = []
    for name in arrays:
        r, eb, et, m = (float(s[name]) for s in (rhat, ess_bulk, ess_tail, mcse))
        ok = r < used["rhat"] and eb >= used["ess"] and et >= used["ess"]
        rows.append(ConvergenceRow(name, r, eb, et, m, "pass" if ok else "warn"))
    return rows, used


# ---------------------------------------------------------------- nested R-hat


def rhat_nested(draws: np.ndarray, superchain_ids: Sequence[Any] | np.ndarray) -> np.ndarray:
    r"""Nested R-hat for many short chains grouped into super-chains.

    Margossian et al. (arXiv:2110.13017). ``K`` super-chains of ``M`` chains each
    (chains of a super-chain share their initialisation), ``N`` draws per chain,
    draws :math:`\theta^{(n m k)}`:

    .. math::

        \bar\theta^{(\cdot m k)} = \frac1N \sum_n \theta^{(n m k)}, \quad
        \bar\theta^{(\cdot\cdot k)} = \frac1M \sum_m \bar\theta^{(\cdot m k)}, \quad
        \bar\theta^{(\cdot\cdot\cdot)} = \frac1K \sum_k \bar\theta^{(\cdot\cdot k)}

        \hat B_\nu = \frac{1}{K-1} \sum_k
            \big(\bar\theta^{(\cdot\cdot k)} - \bar\theta^{(\cdot\cdot\cdot)}\big)^2

        \tilde B_k = \frac{1}{M-1} \sum_m
            \big(\bar\theta^{(\cdot m k)} - \bar\theta^{(\cdot\cdot k)}\big)^2
            \ (0 \text{ if } M = 1), \qquad
        \tilde W_k = \frac1M \sum_m \frac{1}{N-1} \sum_n
            \big(\theta^{(n m k)} - \bar\theta^{(\cdot m k)}\big)^2
            \ (0 \text{ if } N = 1)

        \hat W_\nu = \frac1K \sum_k \big(\tilde B_k + \tilde W_k\big), \qquad
        \hat R_\nu = \sqrt{1 + \hat B_\nu / \hat W_\nu}

    It is bounded below by 1, is computed on the raw draws (neither split nor rank
    normalised, as in the paper and in the ``posterior`` R package), and so with
    ``M = 1`` it is close to, but not equal to, classic R-hat. The paper suggests
    ``R_nu < 1.01``; with iid draws its expectation is about ``sqrt(1 + 1/(M N))``.
    ArviZ 0.x has no nested R-hat; arviz-stats (ArviZ 1.x) has ``rhat_nested``,
    whose default also rank-normalises the draws, so its numbers differ from these.

    Parameters
    ----------
    draws : array, shape (chain, draw, ...)
        Draws of one or more functionals; trailing dimensions are kept.
    superchain_ids : sequence, length chain
        Super-chain label of each chain; every super-chain must have the same
        number of chains, and there must be at least two super-chains.

    Returns
    -------
    ndarray, shape draws.shape[2:] (a 0-d array for a scalar functional)
        Nested R-hat (dimensionless). NaN where a draw is not finite or
        :math:`\hat W_\nu = 0`.
    """
    x = np.asarray(draws, dtype=np.float64)
    ids = np.asarray(superchain_ids)
    if x.ndim < 2:
        raise ValueError(f"draws must have shape (chain, draw, ...), got {x.shape}")
    if ids.shape != (x.shape[0],):
        raise ValueError(
            f"superchain_ids must have one label per chain ({x.shape[0]}), got {ids.shape}"
        )
    labels, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    if labels.size < 2:
        raise ValueError("nested R-hat needs at least two super-chains")
    if np.any(counts != counts[0]):
        raise ValueError(
            f"every super-chain needs the same number of chains, got {counts.tolist()}"
        )
    n_super, n_per, n_draws = labels.size, int(counts[0]), x.shape[1]

    # (K, M, N, ...) with chains of a super-chain in their original order
    order = np.argsort(inverse, kind="stable")
    x = x[order].reshape(n_super, n_per, n_draws, *x.shape[2:])

    chain_mean = x.mean(axis=2)
    super_mean = chain_mean.mean(axis=1)
    b_nu = super_mean.var(axis=0, ddof=1)
    b_k = chain_mean.var(axis=1, ddof=1) if n_per > 1 else np.zeros_like(super_mean)
    w_k = x.var(axis=2, ddof=1).mean(axis=1) if n_draws > 1 else np.zeros_like(super_mean)
    w_nu = (b_k + w_k).mean(axis=0)

    finite = np.isfinite(x).all(axis=(0, 1, 2))
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.sqrt(1.0 + b_nu / w_nu)
    return np.where(finite & (w_nu > 0), out, np.nan)


# ---------------------------------------------------------------- temperatures


def _as_chain_draw_param(name: str, a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if a.ndim < 3:
        raise ValueError(
            f"{name} must have shape (chain, draw, ...) with parameter dimensions last "
            f"(use a[..., None] for a scalar parameter), got {a.shape}"
        )
    return a.reshape(a.shape[0], a.shape[1], -1)


def _check_num_data(num_data: int) -> None:
    if num_data <= 0:
        raise ValueError(f"num_data must be a positive dataset size, got {num_data}")


def _batch_means(per_draw: np.ndarray, batch_size: int | None) -> Estimate:
    """Mean of a (chain, draw) statistic and its batch-means standard error.

    Each chain's last ``n_b * b`` draws are cut into ``n_b = draw // b`` batches of
    ``b`` (default ``floor(sqrt(draw))``); the MCSE is the standard deviation of all
    chains' batch means over the square root of their number.
    """
    n_chain, n_draw = per_draw.shape
    b = int(math.isqrt(n_draw)) if batch_size is None else int(batch_size)
    if b < 1 or n_draw // b * n_chain < 2:
        raise ValueError(f"batch size {b} leaves fewer than two batches for {per_draw.shape} draws")
    n_b = n_draw // b
    means = per_draw[:, n_draw - n_b * b :].reshape(n_chain, n_b, b).mean(axis=-1).ravel()
    return Estimate(float(per_draw.mean()), float(means.std(ddof=1) / math.sqrt(means.size)))


def configurational_temperature(
    theta: np.ndarray,
    grad: np.ndarray,
    *,
    num_data: int,
    center: np.ndarray | None = None,
    batch_size: int | None = None,
) -> Estimate:
    r"""Configurational temperature from parameters and potential gradients.

    For :math:`\pi(\theta) \propto \exp(-U(\theta)/T)` with :math:`U = N L`,
    integration by parts gives :math:`\langle (\theta_i - c_i)\, \partial_i U \rangle = T`
    for every coordinate ``i`` and any constant centre ``c`` (because
    :math:`\langle \partial_i U \rangle = 0`). Averaging over the ``d`` coordinates and
    the draws,

    .. math:: \hat T_\mathrm{conf} = \frac{N}{d}\,
              \big\langle (\theta - c) \cdot \nabla L(\theta) \big\rangle .

    ``grad`` may be a minibatch gradient: it is unbiased for :math:`\nabla L` given
    ``theta``, so the estimate stays unbiased (only noisier). It must be the gradient
    of the full potential in mean-loss units, prior term ``-log p(theta)/N`` included,
    evaluated at ``theta`` (not at a perturbed point).

    Parameters
    ----------
    theta : array, shape (chain, draw, ...)
        Parameter draws; trailing dimensions are flattened into ``d``.
    grad : array, same shape as ``theta``
        :math:`\nabla L(\theta)` at each draw (mean-loss units: loss per example per
        unit of theta).
    num_data : int
        Dataset size ``N``.
    center : array, shape theta.shape[2:], optional
        Centre ``c`` (default 0). A centre near the posterior mean lowers the variance.
    batch_size : int, optional
        Draws per batch for the batch-means MCSE (default ``floor(sqrt(draw))``);
        make it much longer than the autocorrelation time of the per-draw statistic.

    Returns
    -------
    Estimate
        ``(estimate, mcse)`` of ``T`` (dimensionless; 1 is the Bayes posterior).
    """
    _check_num_data(num_data)
    th = _as_chain_draw_param("theta", theta)
    g = _as_chain_draw_param("grad", grad)
    if th.shape != g.shape:
        raise ValueError(f"theta and grad shapes differ: {np.shape(theta)} vs {np.shape(grad)}")
    if center is not None:
        th = th - np.asarray(center, dtype=np.float64).reshape(-1)
    per_draw = num_data * np.einsum("cdi,cdi->cd", th, g) / th.shape[-1]
    return _batch_means(per_draw, batch_size)


def kinetic_temperature(
    momentum: np.ndarray,
    *,
    lr: float,
    alpha: float,
    num_data: int,
    batch_size: int | None = None,
) -> Estimate:
    r"""Kinetic temperature of the SGHMC momentum used in this package.

    The SGHMC step, in mean-loss units with friction ``alpha`` in (0, 2):

    .. math::

        v &\leftarrow (1 - \alpha)\, v - \mathrm{lr}\, \nabla L(\theta)
               + \sqrt{2 \alpha\, \mathrm{lr}\, T / N}\ \xi, \qquad \xi \sim N(0, I) \\
        \theta &\leftarrow \theta + v

    Where the potential is locally flat the gradient term drops and each coordinate
    is an AR(1) with coefficient ``1 - alpha``, so at stationarity
    :math:`\mathrm{Var}(v) = (1-\alpha)^2 \mathrm{Var}(v) + 2\alpha\,\mathrm{lr}\,T/N`, i.e.

    .. math:: \mathrm{Var}(v_i) = \frac{2 \alpha\, \mathrm{lr}\, T / N}{1 - (1 - \alpha)^2}
              = \frac{2\, \mathrm{lr}\, T}{N (2 - \alpha)},
              \qquad
              \hat T_\mathrm{kin} = \frac{N (2 - \alpha)}{2\, \mathrm{lr}}
              \,\frac{1}{d} \sum_i \langle v_i^2 \rangle .

    (For ``alpha -> 0`` this is the continuous-time ``T = N <v^2> / lr``, mass
    ``lr / N`` in these units.) For a quadratic ``L = theta' K theta / 2`` the exact
    stationary variance of the recursion (a discrete Lyapunov equation) is
    :math:`2\,\mathrm{lr}\,T / (N (2 - \alpha - h/2))` per eigen-direction of ``K``
    with ``h = lr * k``, so the estimator reads ``T (2 - alpha) / (2 - alpha - h/2)``:
    the discretisation bias is ``O(lr * curvature)``.

    Parameters
    ----------
    momentum : array, shape (chain, draw, ...)
        The momentum buffer ``v`` (parameter units: it is added to ``theta`` each
        step); trailing dimensions are flattened into ``d``.
    lr : float
        Learning rate ``lr`` of the recursion above.
    alpha : float
        Friction ``alpha`` (``1 - alpha`` is the momentum coefficient), in (0, 2).
    num_data : int
        Dataset size ``N``.
    batch_size : int, optional
        Draws per batch for the batch-means MCSE (default ``floor(sqrt(draw))``);
        make it much longer than ``1 / alpha`` steps.

    Returns
    -------
    Estimate
        ``(estimate, mcse)`` of ``T`` (dimensionless).
    """
    if not 0.0 < alpha < 2.0:
        raise ValueError(f"alpha must lie in (0, 2) for a stationary momentum, got {alpha}")
    if lr <= 0.0:
        raise ValueError(f"lr must be positive, got {lr}")
    _check_num_data(num_data)
    v = _as_chain_draw_param("momentum", momentum)
    per_draw = num_data * (2.0 - alpha) * np.mean(v**2, axis=-1) / (2.0 * lr)
    return _batch_means(per_draw, batch_size)
