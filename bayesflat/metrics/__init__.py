"""Calibration and out-of-distribution metrics on plain arrays, with Monte-Carlo error bars.

Inputs are NumPy arrays or torch tensors: ``probs`` ``(n, K)`` averaged class probabilities,
``labels`` ``(n,)`` integer classes, ``member_probs`` per-draw probabilities, OOD ``scores``
``(n,)``. OOD convention: OOD is the positive class and a higher score means more OOD.
This package depends on no other bayesflat module.
"""

from .calibration import (
    PROB_FLOOR,
    ReliabilityCurve,
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
from .ood import (
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
    roc_curve,
)
from .uncertainty import bootstrap_metric, per_chain_spread

__all__ = [
    "PROB_FLOOR",
    "ReliabilityCurve",
    "accuracy",
    "apply_temperature",
    "aupr_in",
    "aupr_out",
    "auroc",
    "bootstrap_metric",
    "brier_score",
    "calibration_summary",
    "classwise_ece",
    "ece",
    "energy_score",
    "entropy_score",
    "expected_entropy_score",
    "fit_temperature",
    "fpr_at_tpr",
    "max_softmax_score",
    "mce",
    "mutual_information_score",
    "nll",
    "ood_summary",
    "per_chain_spread",
    "reliability_curve",
    "roc_curve",
]
