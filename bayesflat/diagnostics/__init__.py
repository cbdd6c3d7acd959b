"""Diagnostics of a trace: convergence on scalar functionals, sampler temperatures.

Flatness and gradient-noise diagnostics live in ``flatness`` and ``noise``.
"""

from bayesflat.diagnostics.convergence import (
    DEFAULT_THRESHOLDS,
    ConvergenceRow,
    Estimate,
    configurational_temperature,
    convergence_table,
    functionals,
    kinetic_temperature,
    nll_per_draw,
    rhat_nested,
    true_class_probability,
    weight_projections,
)

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
