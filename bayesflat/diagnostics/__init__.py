"""Diagnostics of a posterior sample: convergence, temperatures, flatness, gradient noise.

Three ways to use them:

- as functions of a model and data (``flatness``, ``noise``) or of a trace
  (``convergence``);
- recorded at every kept draw of :func:`bayesflat.sample`, at a bounded cost:
  ``stats_fns=diagnostic_stats(...)`` (``recording``);
- summarised with pass/warn verdicts for a trace: :func:`diagnose`, the
  ``bayesflat diagnose TRACE`` command and the report section (``report``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from bayesflat._lazy import lazy_attributes

# Eager: NumPy only, and the function ``verdict`` must win over the submodule of that name,
# which the import system would otherwise bind to this attribute.
from bayesflat.diagnostics.verdict import VERDICT_THRESHOLDS, Verdict, trace_verdict, verdict

if TYPE_CHECKING:
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
    from bayesflat.diagnostics.flatness import (
        CurvatureOperator,
        EigenResult,
        HessianOperator,
        PerturbationGap,
        SpectralDensity,
        TraceEstimate,
        hessian_trace,
        hutchinson,
        layer_weights,
        perturbation_loss_gap,
        select_parameters,
        spectral_density,
        top_eigenvalues,
    )
    from bayesflat.diagnostics.noise import (
        DirectionalAlignment,
        GaussNewtonOperator,
        NoiseAlignment,
        iter_per_example_gradients,
        noise_alignment,
        per_example_gradients,
    )
    from bayesflat.diagnostics.recording import (
        DIAGNOSTIC_NAMES,
        Budget,
        diagnostic_stats,
        recorded_names,
    )
    from bayesflat.diagnostics.report import (
        DIAGNOSE_THRESHOLDS,
        Diagnosis,
        DiagnosticRow,
        diagnose,
        diagnostics_section,
        write_diagnostics,
    )

__all__ = [
    "DEFAULT_THRESHOLDS",
    "DIAGNOSE_THRESHOLDS",
    "DIAGNOSTIC_NAMES",
    "Budget",
    "ConvergenceRow",
    "CurvatureOperator",
    "Diagnosis",
    "DiagnosticRow",
    "DirectionalAlignment",
    "EigenResult",
    "Estimate",
    "GaussNewtonOperator",
    "HessianOperator",
    "NoiseAlignment",
    "PerturbationGap",
    "SpectralDensity",
    "TraceEstimate",
    "VERDICT_THRESHOLDS",
    "Verdict",
    "configurational_temperature",
    "convergence_table",
    "diagnose",
    "diagnostic_stats",
    "diagnostics_section",
    "functionals",
    "hessian_trace",
    "hutchinson",
    "iter_per_example_gradients",
    "kinetic_temperature",
    "layer_weights",
    "nll_per_draw",
    "noise_alignment",
    "per_example_gradients",
    "perturbation_loss_gap",
    "recorded_names",
    "rhat_nested",
    "select_parameters",
    "spectral_density",
    "top_eigenvalues",
    "trace_verdict",
    "true_class_probability",
    "verdict",
    "weight_projections",
    "write_diagnostics",
]

_MODULES: dict[str, tuple[str, ...]] = {
    "convergence": (
        "DEFAULT_THRESHOLDS", "ConvergenceRow", "Estimate", "configurational_temperature",
        "convergence_table", "functionals", "kinetic_temperature", "nll_per_draw", "rhat_nested",
        "true_class_probability", "weight_projections",
    ),
    "flatness": (
        "CurvatureOperator", "EigenResult", "HessianOperator", "PerturbationGap",
        "SpectralDensity", "TraceEstimate", "hessian_trace", "hutchinson", "layer_weights",
        "perturbation_loss_gap", "select_parameters", "spectral_density", "top_eigenvalues",
    ),
    "noise": (
        "DirectionalAlignment", "GaussNewtonOperator", "NoiseAlignment",
        "iter_per_example_gradients", "noise_alignment", "per_example_gradients",
    ),
    "recording": ("DIAGNOSTIC_NAMES", "Budget", "diagnostic_stats", "recorded_names"),
    "report": (
        "DIAGNOSE_THRESHOLDS", "Diagnosis", "DiagnosticRow", "diagnose", "diagnostics_section",
        "write_diagnostics",
    ),
}  # fmt: skip
"""Submodules and their public names, each loaded on first use: flatness, noise and recording
import torch, convergence and report import ArviZ, so a sampling process that only needs the
divergence check (``divergence``, NumPy only) pays for neither, and reading a
trace does not pay torch's import."""

__getattr__, __dir__ = lazy_attributes(__name__, _MODULES, ("divergence",))
