r"""Divergent draws: a chain that has left every region the posterior could hold.

Stochastic-gradient samplers have no accept/reject step that would catch an unstable step
size, so a chain can run away (weights growing without bound) or collapse (a network whose
predictions carry no information) and still produce draws. A kept draw is *diverging* when any
of these holds:

``non-finite potential``
    the recorded potential ``L_B`` is NaN or infinite;
``weights far above the prior scale``
    some parameter tensor ``t`` (``d_t`` entries, Gaussian prior std ``s_t``) has
    :math:`\mathrm{rms}(\theta_t) = \lVert\theta_t\rVert / \sqrt{d_t} > 10\, s_t`.
    Under the prior :math:`\lVert\theta_t\rVert^2 / s_t^2 \sim \chi^2_{d_t}`, so this is an
    event of probability below :math:`10^{-20}` for every ``d_t``: the likelihood would have to
    push a whole tensor to ten prior standard deviations. Skipped under a flat prior;
``training data at chance``
    the mean negative log-likelihood of the recorded training points is within 1% of, or
    above, that of the best constant prediction, the entropy of their label frequencies
    :math:`H(\hat\pi) = -\sum_k \hat\pi_k \log \hat\pi_k` (nats): the network predicts
    (almost) nothing about its own training data. Categorical likelihoods with recorded
    training points only.
    An exploding potential shows here too: its negative log-likelihood is far above
    :math:`H(\hat\pi)`.

:func:`diverging_reasons` applies the three checks to one draw; the run records the result as
the boolean ``sample_stats.diverging`` (ArviZ's name, as Stan's divergent transitions), and
:func:`bayesflat.sample` keeps, excludes or refuses diverging chains (``on_divergence``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = [
    "CHANCE_MARGIN",
    "ON_DIVERGENCE",
    "WEIGHT_SCALE_LIMIT",
    "DivergenceWarning",
    "diverging_chains",
    "diverging_reasons",
]

WEIGHT_SCALE_LIMIT = 10.0
"""A tensor whose rms exceeds this many prior standard deviations marks a diverging draw."""

CHANCE_MARGIN = 0.01
"""Training NLL within this fraction of the chance level counts as at chance."""

ON_DIVERGENCE = ("keep", "exclude", "raise")
"""What :func:`bayesflat.sample` does with chains that have diverging draws."""


class DivergenceWarning(UserWarning):
    """A run returned chains with diverging draws (``on_divergence="keep"`` or ``"exclude"``)."""


def diverging_reasons(
    *,
    potential: float,
    weight_rms: Mapping[str, float] | None = None,
    prior_scales: Mapping[str, float] | None = None,
    train_log_likelihood: np.ndarray | None = None,
    train_labels: np.ndarray | None = None,
) -> list[str]:
    """Why a draw diverges (see the module docstring); an empty list for a sound draw.

    Parameters
    ----------
    potential : float
        The recorded potential ``L_B`` (mean-loss units).
    weight_rms : mapping of str to float, optional
        Root mean square of each parameter tensor, by name (parameter units).
    prior_scales : mapping of str to float, optional
        Gaussian prior standard deviation of each tensor, by name (same units); None for a flat
        prior.
    train_log_likelihood : array, shape (n,), optional
        ``log p(y_i | x_i, theta)`` of recorded training points (nats).
    train_labels : int array, shape (n,), optional
        Their labels (categorical likelihood).

    Returns
    -------
    list of str
        One sentence per failed check.
    """
    reasons = []
    if not math.isfinite(potential):
        reasons.append(f"non-finite potential {potential}")
    if weight_rms and prior_scales:
        for name, rms in weight_rms.items():
            scale = prior_scales.get(name)
            if scale is None or not math.isfinite(scale):
                continue
            if not rms <= WEIGHT_SCALE_LIMIT * scale:
                reasons.append(
                    f"weights {name} at rms {rms:.3g}, above {WEIGHT_SCALE_LIMIT:g} x its prior "
                    f"std {scale:.3g}"
                )
                break
    if train_log_likelihood is not None and train_labels is not None and train_labels.size:
        nll = float(-np.mean(train_log_likelihood))
        freq = np.bincount(np.asarray(train_labels, dtype=np.int64)) / train_labels.size
        freq = freq[freq > 0]
        chance = float(-np.sum(freq * np.log(freq)))
        if not nll < (1.0 - CHANCE_MARGIN) * chance:
            reasons.append(
                f"training NLL {nll:.3g} nats is no better than chance ({chance:.3g}, the "
                "entropy of the label frequencies)"
            )
    return reasons


def diverging_chains(trace: Any) -> dict[int, int]:
    """Chains with diverging draws and how many: ``{chain: count}`` (empty if none or unknown).

    Reads the boolean ``sample_stats.diverging`` of a trace.
    """
    from bayesflat.trace import get_group

    stats = get_group(trace, "sample_stats")
    if stats is None or "diverging" not in stats:
        return {}
    flags = np.asarray(stats["diverging"].transpose("chain", "draw").values, dtype=bool)
    counts = flags.sum(axis=1)
    return {int(c): int(counts[c]) for c in np.flatnonzero(counts)}
