r"""Monte-Carlo error of metrics computed from a finite posterior ensemble.

A metric of the Bayesian model average (BMA) :math:`\bar p = \frac{1}{CD}\sum_{c,d} p^{(c,d)}`
over C chains of D draws is itself a random quantity: another run would give other draws. Its
standard error is not ``std(metric of each draw) / sqrt(CD)``, because the draws of one chain
are autocorrelated and most metrics (NLL, ECE, accuracy) are non-linear in :math:`\bar p`.

Which helper to use:

- :func:`per_chain_spread` — cheap (C + 1 metric evaluations). Chains are independent, so it is
  valid under any within-chain autocorrelation. Noisy for few chains (its relative error is about
  :math:`1/\sqrt{2(C-1)}`) and, for metrics that improve with ensemble size (NLL, ECE), it
  measures the spread of D-draw ensembles, a slight overestimate for the CD-draw ensemble. Use it
  for monitoring during sampling and quick error bars.
- :func:`bootstrap_metric` with ``block="chain"`` — resamples whole chains; valid under
  autocorrelation, resolves non-linear metrics; needs C >= 2 and is only as good as the number
  of chains (C >= 8 for a stable error bar). Use it for the error bars of reported metrics.
- :func:`bootstrap_metric` with ``block="draw"`` — resamples draws within each chain, treating
  them as independent; use it with one chain or with draws thinned to about one per integrated
  autocorrelation time. On autocorrelated draws it understates the error by about
  :math:`\sqrt{D / \mathrm{ESS}}`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from bayesflat._checks import check_choice, check_int

from ._validation import check_probs

__all__ = ["bootstrap_metric", "per_chain_spread"]


def bootstrap_metric(
    member_probs,
    fn: Callable[[np.ndarray], float],
    *,
    n_boot: int = 200,
    seed: int = 0,
    block: str = "chain",
) -> tuple[float, float]:
    r"""Bootstrap standard error of a metric of the BMA of a chain x draw ensemble.

    Each replicate b draws multiplicities :math:`w^{(b)}_{cd}` (resampling with replacement, see
    ``block``), forms :math:`\bar p^{(b)} = \frac{1}{CD}\sum_{c,d} w^{(b)}_{cd}\, p^{(c,d)}` and
    evaluates :math:`m_b = f(\bar p^{(b)})`. Returns

    .. math:: \hat m = f(\bar p), \qquad \mathrm{SE} = \operatorname{std}_b(m_b)
       \ \text{(ddof = 1)}

    Parameters
    ----------
    member_probs : array_like, shape (C, D, n, K)
        Per-draw class probabilities (a trace's ``predictions`` group); for a single chain
        pass ``probs[None]``.
    fn : callable
        ``fn(probs)`` with ``probs`` the float64 ``(n, K)`` BMA, returning a scalar; close over
        the labels, e.g. ``lambda p: ece(p, labels)``.
    n_boot : int, default 200
        Number of replicates, >= 2. The SE itself then has a relative Monte-Carlo error of
        about :math:`1/\sqrt{2\,n_{boot}}` (5 % at 200).
    seed : int, default 0
        Seed of the ``numpy.random.Generator``; the result is deterministic given it.
    block : {"chain", "draw"}, default "chain"
        ``"chain"``: resample C whole chains with replacement (a chain drawn twice counts
        twice); needs C >= 2. ``"draw"``: keep every chain and resample D draws with replacement
        within each. See the module docstring for when to use which.

    Returns
    -------
    estimate : float
        ``fn`` of the BMA of all draws, in the metric's units.
    standard_error : float
        Bootstrap standard error, in the metric's units.
    """
    p = check_probs(member_probs, "member_probs", ndim=4)
    n_boot = check_int(n_boot, "n_boot", minimum=2)
    block = check_choice(block, "block", ("chain", "draw"))
    n_chains, n_draws, n, k = p.shape
    if block == "chain" and n_chains < 2:
        raise ValueError(
            f"block='chain' needs at least 2 chains, member_probs has {n_chains}; "
            "use block='draw' for a single chain"
        )
    flat = p.reshape(n_chains * n_draws, n * k)
    estimate = float(fn(flat.mean(axis=0).reshape(n, k)))
    rng = np.random.default_rng(seed)
    replicates = np.empty(n_boot)
    for b in range(n_boot):
        if block == "chain":
            weights = np.repeat(rng.multinomial(n_chains, np.full(n_chains, 1 / n_chains)), n_draws)
        else:
            weights = rng.multinomial(n_draws, np.full(n_draws, 1 / n_draws), size=n_chains).ravel()
        replicates[b] = fn((weights @ flat / weights.size).reshape(n, k))
    return estimate, float(np.std(replicates, ddof=1))


def per_chain_spread(member_probs, fn: Callable[[np.ndarray], float]) -> tuple[float, float]:
    r"""Metric of the pooled BMA and its standard error from the spread across chains.

    .. math:: \hat m = f(\bar p), \qquad
       \mathrm{SE} = \frac{\operatorname{std}_c\big(f(\bar p_c)\big)}{\sqrt C}\ \text{(ddof = 1)},
       \qquad \bar p_c = \frac1D \sum_d p^{(c,d)}

    For a metric linear in :math:`\bar p` (e.g. the mean probability of the true class)
    :math:`\hat m` is the mean of the C independent per-chain values and this is the usual
    standard error of that mean; for others it is the spread of single-chain ensembles, see the
    module docstring.

    Parameters
    ----------
    member_probs : array_like, shape (C, D, n, K)
        Per-draw class probabilities, C >= 2 chains.
    fn : callable
        ``fn(probs)`` with ``probs`` the float64 ``(n, K)`` BMA, returning a scalar.

    Returns
    -------
    estimate : float
        ``fn`` of the BMA of all draws, in the metric's units.
    standard_error : float
        In the metric's units.
    """
    p = check_probs(member_probs, "member_probs", ndim=4)
    if p.shape[0] < 2:
        raise ValueError(f"per_chain_spread needs at least 2 chains, member_probs has {p.shape[0]}")
    per_chain = p.mean(axis=1)
    estimate = float(fn(per_chain.mean(axis=0)))
    values = np.array([float(fn(chain_bma)) for chain_bma in per_chain])
    return estimate, float(np.std(values, ddof=1) / np.sqrt(p.shape[0]))
