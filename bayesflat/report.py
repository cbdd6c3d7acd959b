r"""Reports of a trace: one JSON of numbers and one self-contained HTML page of the same numbers.

:func:`build_report` turns a trace into a :class:`Report`: the run settings, accuracy, NLL,
Brier score, ECE and MCE of the predictive ensemble on the test set before and after temperature
scaling (fitted on the validation set), a reliability diagram with bin counts, confidence
histograms, OOD detection (AUROC, AUPR, FPR@95) for every unlabelled evaluation set, predictive
performance against the number of draws averaged, and trace plots of the potential and the step
size. Every metric carries its Monte-Carlo error over the posterior draws
(:func:`bayesflat.predictive.estimate`). :meth:`Report.save` writes ``metrics.json`` and
``report.html`` (figures embedded as base64 PNG).

:func:`compare` puts the summaries of several runs side by side (a table and a combined
reliability diagram).

Evaluation sets are found by role: the labelled set ``test`` (or the first labelled set other
than ``val``) is reported, the labelled set ``val`` fits the temperature, and every unlabelled set
is an OOD set (``ood_*`` in ``bayesflat run``). OOD is the positive class and a higher score
means more OOD.
"""

from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bayesflat import _io, metrics, predictive
from bayesflat import trace as _trace
from bayesflat._draws import DrawSums
from bayesflat.diagnostics.report import diagnose
from bayesflat.diagnostics.verdict import trace_verdict, verdict_html, verdict_text
from bayesflat.predictive import Estimate, _fit_temperature, _log, _renormalise

__all__ = [
    "FORMAT",
    "Comparison",
    "Report",
    "build_report",
    "compare",
    "headline_table",
    "load_summary",
]

FORMAT = "bayesflat-report/1"
"""Value of the ``format`` key of every report JSON."""

METRIC_LABELS = {
    "accuracy": "Accuracy",
    "nll": "NLL (nats)",
    "brier_score": "Brier score",
    "ece": "ECE",
    "mce": "MCE",
}
SCORE_LABELS = {
    "max_softmax": "max-softmax (1 − max p)",
    "entropy": "predictive entropy",
    "mutual_information": "mutual information",
    "energy": "energy",
}
OOD_METRIC_LABELS = {
    "auroc": "AUROC ↑",
    "aupr_in": "AUPR-in ↑",
    "aupr_out": "AUPR-out ↑",
    "fpr95": "FPR@95 ↓",
}
UNCERTAINTY_LABELS = {
    "total": "total (entropy)",
    "aleatoric": "aleatoric (exp. entropy)",
    "epistemic": "epistemic (MI)",
    "variation_ratio": "variation ratio",
    "max_prob": "confidence (max p)",
}
HEADLINE_SCORE = "entropy"
"""OOD score of the headline table and of :func:`compare`: the total predictive uncertainty."""

# Run settings shown first, in this order; every other root attribute follows.
_RUN_KEYS = (
    "sampler", "model", "num_data", "temperature", "lr", "seed", "chains", "draws", "burn_in",
    "thin", "batch_size", "prior", "prior_scale", "likelihood", "sigma", "eta",
    "num_perturbations", "antithetic", "perturbation", "estimator", "dynamics",
)  # fmt: skip
_HIDDEN_KEYS = set(_trace.PROVENANCE_KEYS) | {
    "eval_sets", "draws_kept", "stop_reason", "log_likelihood_set", "init", "complete",
    "wall_time_s",
}  # fmt: skip
_DIGITS = 4


@dataclass(eq=False)
class Report:
    """The numbers (``summary``, JSON-ready) and figures (PNG bytes) of one trace.

    Attributes
    ----------
    summary : dict
        Nested dict of plain values (the content of ``metrics.json``); every metric is
        ``{"value": float, "mc_error": float | None}``.
    figures : dict of str to bytes
        PNG images by name.
    captions : dict of str to str
        One caption per figure.
    diagnostics_html : str
        The convergence, temperature and flatness table
        (:func:`bayesflat.diagnostics.report.diagnose`) as an HTML section.
    """

    summary: dict[str, Any]
    figures: dict[str, bytes] = field(default_factory=dict)
    captions: dict[str, str] = field(default_factory=dict)
    diagnostics_html: str = ""

    def to_json(self) -> str:
        """``summary`` as indented JSON (non-finite numbers are null)."""
        return json.dumps(self.summary, indent=2, allow_nan=False) + "\n"

    def to_html(self) -> str:
        """A self-contained HTML page: tables, captions, figures embedded as base64 PNG."""
        return _render_report(self)

    def headline(self) -> str:
        """The headline table as text (see :func:`headline_table`)."""
        return headline_table(self.summary)

    def save(self, output: str | Path, *, html: bool = True) -> dict[str, Path]:
        """Write ``metrics.json`` and (with ``html``) ``report.html`` into the folder ``output``.

        The folder is created if needed.

        Returns
        -------
        dict
            ``{"json": path, "html": path}``, without ``"html"`` when ``html`` is False.
        """
        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"json": out / "metrics.json"}
        _io.write_text(paths["json"], self.to_json())
        if html:
            paths["html"] = out / "report.html"
            _io.write_text(paths["html"], self.to_html())
        return paths


def build_report(
    trace: Any,
    *,
    test: str | None = None,
    val: str | None = "val",
    ood: Sequence[str] | None = None,
    ensemble: str = "auto",
    method: str = "batch",
    n_boot: int = 200,
    seed: int = 0,
    n_bins: int = 15,
    figures: bool = True,
) -> Report:
    r"""Compute every number and figure of the report of a trace.

    Parameters
    ----------
    trace : arviz.InferenceData or xarray.DataTree
        A bayesflat trace with stored predictions (``sample(..., eval_sets=...)``).
    test : str, optional
        Labelled set the metrics are reported on; default ``"test"`` if present, else the first
        labelled set other than ``val``.
    val : str or None, default "val"
        Labelled held-out set that fits the post-hoc temperature; None, or a name the trace
        does not hold, skips temperature scaling.
    ood : sequence of str, optional
        OOD sets; default every unlabelled evaluation set.
    ensemble : {"auto", "bma", "final"}, default "auto"
        ``"bma"``: Bayesian model average of all draws; ``"final"``: the last draw of each
        chain as an independent point estimate (mean over chains ± standard error).
        ``"auto"``: ``"final"`` for an optimiser (a registry entry that is not a sampler) or a
        run at ``T = 0``, ``"bma"`` otherwise.
    method : {"batch", "bootstrap", "spread"}, default "batch"
        Monte-Carlo error of the BMA metrics (:func:`bayesflat.predictive.estimate`).
        ``"batch"``: jackknife over batches of consecutive draws, with the batch length from
        the autocorrelation time of the per-draw test NLL (:func:`bayesflat.predictive.
        batch_length`), so the error accounts for autocorrelation within chains.
    n_boot : int, default 200
        Bootstrap replicates.
    seed : int, default 0
        Bootstrap seed.
    n_bins : int, default 15
        Equal-width bins of the reliability diagram, ECE and MCE.
    figures : bool, default True
        Also draw the figures (matplotlib, Agg); False gives the numbers only.

    Returns
    -------
    Report
    """
    sets = predictive.eval_sets(trace)
    attrs = _trace.trace_attrs(trace)
    test = _test_set(sets, test, val)
    if val == test:
        raise ValueError(
            f"val={val!r} is the reported set; the temperature must be fitted on held-out data"
        )
    val = val if val is not None and sets.get(val) else None
    if ood is None:
        ood = [name for name, labelled in sets.items() if not labelled]
    elif isinstance(ood, str):
        ood = [ood]
    for name in ood:
        if name not in sets:
            raise ValueError(f"ood set {name!r} is not in the trace; it holds {list(sets)}")
    kind = _ensemble_kind(ensemble, attrs)
    test_ens = predictive.StoredEnsemble(trace, test)
    val_ens = predictive.StoredEnsemble(trace, val) if val else None
    ood_ens = {name: predictive.StoredEnsemble(trace, name) for name in ood}
    options = {"ensemble": kind, "method": method, "n_boot": n_boot, "seed": seed}
    mc_info = _mc_info(kind, method, n_boot, seed, test_ens)
    sums = _draw_sums(test_ens, val_ens, ood_ens, kind, method, n_boot, seed,
                      mc_info.get("batch_size"), _curve_points(test_ens.draws))  # fmt: skip

    def estimate(fn: Any) -> dict[str, predictive.Estimate]:
        return predictive.estimate_sums(sums, fn, **options)

    val_fit = None if val_ens is None else (val_ens.labels, val)
    cal = estimate(predictive.calibration_fn(test_ens.labels, test, val_fit, n_bins))
    summary: dict[str, Any] = {
        "format": FORMAT,
        "title": _title(attrs),
        "verdict": None,
        "run": _run_settings(attrs, trace),
        "ensemble": _ensemble_info(kind, test_ens),
        "mc_error": mc_info,
        "test": {
            "set": test,
            "n": test_ens.size,
            "labels_sha256": labels_digest(test_ens.labels),
            "metrics": {k: cal[k].to_dict() for k in predictive.CALIBRATION_METRICS},
            "temperature_scaling": None,
            "reliability": None,
        },
        "uncertainty": {},
        "ood": {},
        "draws_curve": _draws_curve(sums, test_ens, kind, n_bins),
    }
    if val_ens is not None:
        summary["test"]["temperature_scaling"] = {
            "fitted_on": val,
            "n_val": val_ens.size,
            "temperature": cal["temperature"].to_dict(),
            "metrics": {k: cal[f"scaled_{k}"].to_dict() for k in predictive.CALIBRATION_METRICS},
        }
    raw_p, scaled_p, labels = _pooled_predictions(sums, test_ens, val_ens, kind)
    raw_curve = metrics.reliability_curve(raw_p, labels, n_bins=n_bins)
    summary["test"]["reliability"] = {
        "n_bins": n_bins,
        "binning": "uniform",
        "edges": raw_curve.edges.tolist(),
        "raw": _curve_dict(raw_curve),
        "scaled": None
        if scaled_p is None
        else _curve_dict(metrics.reliability_curve(scaled_p, labels, n_bins=n_bins)),
    }
    single = kind == "final" or test_ens.chains * test_ens.draws == 1
    for name, ens in {test: test_ens, **ood_ens}.items():
        summary["uncertainty"][name] = {
            "n": ens.size,
            **{k: e.to_dict() for k, e in estimate(_uncertainty_fn(name, single)).items()},
        }
    members = 1 if kind == "final" else test_ens.chains * test_ens.draws
    for name, ens in ood_ens.items():
        scores = predictive.nest_scores(estimate(predictive.ood_fn(test, name, members)))
        summary["ood"][name] = {
            "n": ens.size,
            "scores": {
                s: {m: e.to_dict() for m, e in table.items()} for s, table in scores.items()
            },
        }
    summary["predictive_density"] = _predictive_density(trace)
    diagnosis = diagnose(trace)
    summary["diagnostics"] = diagnosis.to_dict()
    summary["verdict"] = trace_verdict(trace, diagnosis=diagnosis).to_dict()
    report = Report(summary=_clean(summary), diagnostics_html=diagnosis.to_html())
    if figures:
        _draw_figures(report, trace, sums, test_ens, ood_ens, raw_p, scaled_p, labels, kind)
    return report


def _draw_sums(
    test: predictive.StoredEnsemble, val: predictive.StoredEnsemble | None,
    ood: Mapping[str, predictive.StoredEnsemble], kind: str, method: str, n_boot: int,
    seed: int, batch_size: int | None, points: Sequence[int],
) -> DrawSums:  # fmt: skip
    """Every sum the report's estimates need, in one pass over the draws of every set."""
    sources: dict[str, predictive.StoredEnsemble] = {test.name: test}
    scored = ("probs", "entropy", "votes", "energy")
    kinds: dict[str, tuple[str, ...]] = {test.name: scored}
    if val is not None:
        sources[val.name], kinds[val.name] = val, ("probs",)
    for name, ens in ood.items():
        sources[name], kinds[name] = ens, scored
    reducer = predictive._reducer(test.chains, test.draws, kind, method, n_boot, seed,
                                  batch_size, points=points,
                                  point_keys=[(test.name, "probs")])  # fmt: skip
    for slab in predictive.feature_slabs(sources, kinds):
        reducer.add(slab)
    return reducer.result()


def _test_set(sets: Mapping[str, bool], test: str | None, val: str | None) -> str:
    labelled = [name for name, has_labels in sets.items() if has_labels]
    if test is not None:
        if not sets.get(test):
            raise ValueError(
                f"test={test!r} is not a labelled evaluation set of the trace; labelled sets: "
                f"{labelled}"
            )
        return test
    if "test" in labelled:
        return "test"
    others = [name for name in labelled if name != val]
    if not others:
        raise ValueError(
            f"the trace has no labelled evaluation set to report on (sets: {list(sets)}); "
            "sample with eval_sets={'test': (x, y), ...}"
        )
    return others[0]


def _ensemble_kind(ensemble: str, attrs: Mapping[str, Any]) -> str:
    if ensemble != "auto":
        if ensemble not in predictive.ENSEMBLES:
            raise ValueError(
                f"ensemble must be 'auto' or one of {predictive.ENSEMBLES}, got {ensemble!r}"
            )
        return ensemble
    from bayesflat import samplers

    try:
        is_sampler = samplers.entry(str(attrs.get("sampler"))).is_sampler
    except ValueError:
        is_sampler = True
    temperature = attrs.get("temperature")
    cold = isinstance(temperature, int | float) and temperature == 0
    return "final" if (not is_sampler or cold) else "bma"


def _title(attrs: Mapping[str, Any]) -> str:
    sampler = attrs.get("sampler", "unknown sampler")
    model = attrs.get("model")
    return f"{sampler} on {model}" if model else str(sampler)


_GRADIENTS_PER_STEP = {"plain": 1, "sharpness_aware": 2, "randomly_smoothed_perturbation": 2}
"""Closure evaluations per step of estimators whose count does not depend on their settings."""


def _gradients_per_step(attrs: Mapping[str, Any]) -> int | None:
    estimator = attrs.get("estimator")
    if estimator in _GRADIENTS_PER_STEP:
        return _GRADIENTS_PER_STEP[str(estimator)]
    if "num_perturbations" in attrs:
        per_step = int(attrs["num_perturbations"]) * (2 if attrs.get("antithetic") else 1)
        clean = attrs.get("clean_weight")
        return per_step + (1 if isinstance(clean, int | float) and clean > 0 else 0)
    return None


def _run_settings(attrs: Mapping[str, Any], trace: Any) -> dict[str, Any]:
    run = {key: attrs[key] for key in _RUN_KEYS if key in attrs}
    run.update(
        {k: v for k, v in attrs.items() if k not in run and k not in _HIDDEN_KEYS and v != {}}
    )
    run.update(_kept_shape(trace))
    burn_in, draws, thin = attrs.get("burn_in"), attrs.get("draws"), attrs.get("thin")
    planned = attrs.get("planned_steps")
    if isinstance(planned, int) or all(isinstance(v, int) for v in (burn_in, draws, thin)):
        # planned_steps counts the exploration phases of cyclical samplers too
        run["steps_per_chain"] = planned if isinstance(planned, int) else burn_in + draws * thin
        per_step = _gradients_per_step(attrs)
        if per_step is not None:
            run["gradient_evaluations_per_chain"] = run["steps_per_chain"] * per_step
    stats = _trace.get_group(trace, "sample_stats")
    if stats is not None and "sigma" in stats and attrs.get("sigma", 0) is None:
        used = np.asarray(stats["sigma"].values, dtype=np.float64)
        if np.isfinite(used).any():
            run["sigma_used"] = float(np.nanmean(used))
    coupling = _sigma_vs_prior(attrs, run.get("sigma_used"))
    if coupling is not None:
        keys = list(run)
        at = keys.index("prior_scale") + 1 if "prior_scale" in keys else len(keys)
        run = {**dict(list(run.items())[:at]), "sigma_vs_prior_std": coupling,
               **dict(list(run.items())[at:])}  # fmt: skip
    run["complete"] = attrs.get("complete", True)
    if not run["complete"]:
        run["stop_reason"] = attrs.get("stop_reason", "")
    for key in ("wall_time_s", "bayesflat_version", "created_at"):
        if key in attrs:
            run[key] = attrs[key]
    return run


def _kept_shape(trace: Any) -> dict[str, int]:
    """Chains and draws as the trace's arrays hold them, not as its attributes claim.

    A trace merged from several processes (``az.concat`` over chains) keeps the attributes of
    its first part; the arrays are the truth. With ``draws_kept`` recorded per chain, ``draws``
    is the most any chain kept.
    """
    for name in ("sample_stats", "posterior", "predictions"):
        group = _trace.get_group(trace, name)
        if group is not None and "chain" in group.sizes and "draw" in group.sizes:
            shape = {"chains": int(group.sizes["chain"]), "draws": int(group.sizes["draw"])}
            kept = _trace.trace_attrs(trace).get("draws_kept")
            if isinstance(kept, list) and len(kept) == shape["chains"] and kept:
                shape["draws"] = int(max(kept))
            return shape
    return {}


def _sigma_vs_prior(attrs: Mapping[str, Any], sigma_used: Any) -> dict[str, Any] | None:
    """The perturbation scale beside the smallest Gaussian prior std (both parameter units)."""
    sigma = attrs.get("sigma")
    if not isinstance(sigma, int | float) or isinstance(sigma, bool):
        sigma = sigma_used
    scale = attrs.get("prior_scale")
    if not isinstance(sigma, int | float) or not isinstance(scale, int | float) or sigma <= 0:
        return None
    if attrs.get("filter_normalised") or attrs.get("prior") != "gaussian":
        return None
    scales = [float(scale)]
    per_layer = attrs.get("prior_scales")
    if isinstance(per_layer, Mapping):
        scales += [float(v) for v in per_layer.values() if isinstance(v, int | float)]
    smallest = min(scales)
    return {
        "sigma": float(sigma),
        "smallest_prior_std": smallest,
        "ratio": float(sigma) / smallest,
        "note": "sigma above the prior std: the perturbation reaches beyond the prior's spread"
        if sigma > smallest
        else "sigma below every prior std",
    }


def _ensemble_info(kind: str, ens: Any) -> dict[str, Any]:
    if kind == "bma":
        text = (
            f"Bayesian model average: class probabilities averaged over all "
            f"{ens.chains * ens.draws} draws ({ens.chains} chains x {ens.draws} draws)"
        )
    else:
        text = (
            f"point estimates: the final iterate of each of the {ens.chains} chains is one "
            "independent run; numbers are the mean over runs"
        )
    return {"kind": kind, "chains": ens.chains, "draws": ens.draws, "description": text}


_FEW_CHAINS = 4
"""Below this many chains a Monte-Carlo error is flagged: nothing checks that the chains agree."""


def _mc_info(kind: str, method: str, n_boot: int, seed: int, ens: Any) -> dict[str, Any]:
    info = _mc_method_info(kind, method, n_boot, seed, ens)
    info["chains"] = ens.chains
    info["few_chains"] = ens.chains < _FEW_CHAINS
    if info["few_chains"] and not info["description"].startswith("none"):
        info["description"] += (
            f"; rests on {ens.chains} chain{'s' if ens.chains != 1 else ''} (fewer than "
            f"{_FEW_CHAINS}): it cannot include the spread between modes that other chains "
            "would find, so read it as a lower bound"
        )
    return info


def _mc_method_info(kind: str, method: str, n_boot: int, seed: int, ens: Any) -> dict[str, Any]:
    chains = ens.chains
    if kind == "bma" and method == "batch":
        length, tau = predictive.batch_length(predictive.nll_per_draw_of(ens))
        batches = chains * (ens.draws // length)
        if batches < 2:
            text = "none: a batch jackknife needs at least two batches"
            return {"method": "batch", "batch_size": length, "batches": batches,
                    "autocorrelation_time": tau, "description": text}  # fmt: skip
        tau_text = f"{tau:.1f}" if math.isfinite(tau) else "unknown"
        span = (
            f"the batch spans at least the autocorrelation time of the per-draw test NLL, "
            f"{tau_text} draws, so the error accounts for autocorrelation within chains"
        )
        if math.isfinite(tau) and tau > length:
            span = (
                f"the autocorrelation time of the per-draw test NLL, {tau_text} draws, exceeds "
                "even whole chains, so the error is underestimated"
            )
        return {
            "method": "batch",
            "batch_size": length,
            "batches": batches,
            "autocorrelation_time": tau,
            "description": (
                f"jackknife over {batches} batches of {length} consecutive draws "
                f"({ens.draws // length} per chain; {span})"
            ),
        }
    if kind == "final" or method == "spread":
        if chains < 2:
            text = "none: a Monte-Carlo error needs at least two chains"
        elif kind == "final":
            text = f"standard error of the mean over the {chains} runs"
        else:
            text = f"spread of the {chains} single-chain ensembles / sqrt({chains})"
        return {"method": "runs" if kind == "final" else "spread", "description": text}
    block = "chain" if chains >= 2 else "draw"
    unit = f"the {chains} chains" if block == "chain" else "the draws of the single chain"
    return {
        "method": "bootstrap",
        "block": block,
        "replicates": n_boot,
        "seed": seed,
        "description": f"bootstrap over {unit} ({n_boot} replicates)",
    }


def _curve_dict(curve: metrics.ReliabilityCurve) -> dict[str, list]:
    return {
        "confidence": curve.confidence.tolist(),
        "accuracy": curve.accuracy.tolist(),
        "count": [int(c) for c in curve.count],
    }


def _predictive_density(trace: Any) -> dict[str, Any]:
    r"""PSIS-LOO on the training points and the log predictive density of held-out sets.

    ``elpd_loo`` is ``az.loo(trace)``: the expected log predictive density of a new point,
    estimated by leaving out each training point of the ``log_likelihood`` group in turn (nats,
    summed over the points; ``per_point`` divides by their number). The held-out sets need no
    leaving out: their log pointwise predictive density is computed directly from the
    ``heldout_log_likelihood`` group,

    .. math:: \mathrm{lppd} = \sum_{i=1}^{n} \log \frac{1}{S} \sum_{s=1}^{S}
              p(y_i \mid x_i, \theta_s) ,

    and its mean over the points is minus the NLL of the BMA. The per-point numbers estimate
    the same quantity when the held-out set is drawn like the training set.
    """
    out: dict[str, Any] = {"elpd_loo": None, "heldout": {}}
    train = _trace.get_group(trace, "log_likelihood")
    if train is not None and train.data_vars:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                out["elpd_loo"] = _loo(trace, train)
            except (ValueError, TypeError, KeyError, IndexError, FloatingPointError):
                # too few draws for PSIS (ArviZ 1.x raises IndexError there): no elpd_loo
                out["elpd_loo"] = None
    held = _trace.get_group(trace, "heldout_log_likelihood")
    if held is not None:
        for name in held.data_vars:
            pointwise = _log_mean_exp(held[name])
            if pointwise is None:
                continue
            out["heldout"][str(name)] = {
                "lppd": float(pointwise.sum()),
                "n": int(pointwise.size),
                "per_point": float(pointwise.mean()),
            }
    return out


_LOO_BYTES = 4 * 2**20
"""Log-likelihood values handed to one ``az.loo`` call, in bytes of float64: ArviZ holds
several working copies of them."""


def _loo(trace: Any, train: Any) -> dict[str, Any] | None:
    r"""``az.loo`` of the training points, over slabs of points so memory stays bounded.

    PSIS-LOO treats each point on its own, so ``elpd_loo`` and ``p_loo`` are sums over the
    points and the standard error is :math:`\sqrt{n \operatorname{var}_i(\mathrm{elpd}_i)}`
    of the pointwise values (their variance with the installed ArviZ's ``ddof``), as ``az.loo``
    computes it on all points at once.
    """
    import arviz as az

    var = str(next(iter(train.data_vars)))
    ll = train[var].transpose("chain", "draw", ...)
    point_dim = ll.dims[2]
    per_point = 8 * ll.sizes["chain"] * ll.sizes["draw"]
    step = max(1, _LOO_BYTES // per_point)
    posterior = _trace.get_group(trace, "posterior")
    parts = {} if posterior is None else {"posterior": posterior.load()}
    reff = _relative_ess(parts.get("posterior"), ll.sizes["chain"] * ll.sizes["draw"])
    elpd_i, pareto_k, p_loo = [], [], 0.0
    root = _trace.build.root_attrs(trace)
    for start in range(0, ll.sizes[point_dim], step):
        piece = ll.isel({point_dim: slice(start, start + step)}).load()
        sub = _trace.build.assemble({**parts, "log_likelihood": piece.to_dataset(name=var)}, root)
        loo = az.loo(sub, pointwise=True, reff=reff)
        pointwise = getattr(loo, "loo_i", None)
        if pointwise is None:
            pointwise = loo.elpd_i
        elpd_i.append(np.asarray(pointwise).ravel())
        pareto_k.append(np.asarray(loo.pareto_k).ravel())
        p_loo += float(getattr(loo, "p_loo", getattr(loo, "p", math.nan)))
    elpd_points = np.concatenate(elpd_i)
    k = np.concatenate(pareto_k)
    n = int(elpd_points.size)
    elpd = float(elpd_points.sum())
    return {
        "value": elpd,
        # ArviZ 0.x takes the variance of the pointwise values with ddof 0, ArviZ 1.x with 1
        "se": float(math.sqrt(n * np.var(elpd_points, ddof=int(_trace.build.arviz_major() >= 1)))),
        "p_loo": p_loo,
        "n": n,
        "per_point": elpd / n,
        "pareto_k_above_0.7": int(np.sum(k > 0.7)),
        "data": "training points (log_likelihood group)",
    }


def _relative_ess(posterior: Any, n_samples: int) -> float | None:
    """The relative efficiency ``az.loo`` computes when not given one (ArviZ 0.x and 1.x alike):
    the mean over every posterior variable of its mean-ESS, over the number of draws; 1 for
    one chain. Computed once for all the slabs of points. None without a posterior: ``az.loo``
    then raises as it would on the whole trace."""
    import arviz as az

    if posterior is None or not posterior.data_vars:
        return None
    if posterior.sizes["chain"] == 1:
        return 1.0
    ess = az.ess(posterior, method="mean")
    return float(np.hstack([ess[v].values.ravel() for v in ess.data_vars]).mean() / n_samples)


def _log_mean_exp(ll: Any) -> np.ndarray | None:
    r""":math:`\log \frac1S \sum_s e^{\ell_{si}}` per point over the draws with every point
    finite, read slab by slab; None when no draw is finite."""
    from scipy.special import logsumexp

    total, count = None, 0
    # logsumexp makes several working copies of its input: slabs a quarter the usual size
    for _, slab in _trace.draw_chunks(ll, chunk_bytes=_trace.build.CHUNK_BYTES // 4):
        slab = slab.astype(np.float64).reshape(-1, slab.shape[-1])
        slab = slab[np.all(np.isfinite(slab), axis=1)]
        if not slab.size:
            continue
        part = logsumexp(slab, axis=0)
        total = part if total is None else np.logaddexp(total, part)
        count += slab.shape[0]
    return None if total is None else total - math.log(count)


def _pooled_predictions(
    sums: DrawSums, test: Any, val: Any, kind: str
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Test predictions for the figures: the BMA, or every run's final iterate stacked."""
    if kind == "bma":
        avg = sums.total()
        raw = _renormalise(avg[test.name, "probs"])
        scaled = None
        if val is not None:
            t = _fit_temperature(_renormalise(avg[val.name, "probs"]), val.labels)
            scaled = metrics.apply_temperature(_log(raw), t)
        return raw, scaled, test.labels
    raws, scaleds = [], []
    for c in range(test.chains):
        raw = _renormalise(sums.last[test.name, "probs"][c])
        raws.append(raw)
        if val is not None:
            t = _fit_temperature(_renormalise(sums.last[val.name, "probs"][c]), val.labels)
            scaleds.append(metrics.apply_temperature(_log(raw), t))
    labels = np.tile(test.labels, test.chains)
    return np.concatenate(raws), (np.concatenate(scaleds) if scaleds else None), labels


def _uncertainty_fn(name: str, single: bool) -> Any:
    """Mean total, aleatoric and epistemic uncertainty, variation ratio and confidence."""

    def fn(avg: Mapping[Any, np.ndarray]) -> dict[str, float]:
        p = avg[name, "probs"]
        total = metrics.entropy_score(p)
        aleatoric = avg[name, "entropy"]
        out = {"total": total.mean(), "aleatoric": aleatoric.mean()}
        if not single:
            out["epistemic"] = np.maximum(total - aleatoric, 0.0).mean()
            out["variation_ratio"] = (1.0 - avg[name, "votes"].max(axis=-1)).mean()
        out["max_prob"] = p.max(axis=-1).mean()
        return out

    return fn


def _curve_points(draws: int) -> np.ndarray:
    """Draw counts of the draws curve: up to 12, geometrically spaced from 1 to ``draws``."""
    return np.unique(np.round(np.geomspace(1, draws, min(draws, 12))).astype(int))


def _draws_curve(sums: DrawSums, test: Any, kind: str, n_bins: int) -> dict[str, Any]:
    """Test metrics against the number of draws per chain (spread over chains as error)."""
    points = _curve_points(test.draws)
    key = (test.name, "probs")

    def fn(avg: Mapping[Any, np.ndarray]) -> dict[str, float]:
        p = _renormalise(avg[key])
        return {
            "accuracy": metrics.accuracy(p, test.labels),
            "nll": metrics.nll(p, test.labels),
            "ece": metrics.ece(p, test.labels, n_bins=n_bins),
        }

    rows = [predictive.estimate_prefix(sums, int(k), fn, ensemble=kind) for k in points]
    if kind == "bma":
        text = "BMA of the first k draws of every chain; error: spread over chains"
    else:
        text = "iterate at draw k of every run, mean over runs; error: standard error over runs"
    return {
        "kind": kind,
        "description": text,
        "draws": points.tolist(),
        "members": (points * (test.chains if kind == "bma" else 1)).tolist(),
        **{m: [row[m].to_dict() for row in rows] for m in ("accuracy", "nll", "ece")},
    }


def _clean(value: Any) -> Any:
    """Plain JSON values: numpy scalars to Python, non-finite floats to None."""
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, np.ndarray):
        return _clean(value.tolist())
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, int | np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    return value


# ---------------------------------------------------------------------------------------------
# Text tables


def _estimate(entry: Mapping[str, Any] | None) -> Estimate:
    if entry is None:
        return Estimate(math.nan, None)
    value = entry.get("value")
    return Estimate(math.nan if value is None else float(value), entry.get("mc_error"))


def _fmt(entry: Mapping[str, Any] | None, digits: int = _DIGITS) -> str:
    return _estimate(entry).format(digits)


def _text_table(header: Sequence[str], rows: Sequence[Sequence[str]], numeric_from: int = 1) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            str(c).rjust(w) if i >= numeric_from else str(c).ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *map(line, rows)])


def headline_table(summary: Mapping[str, Any]) -> str:
    """Accuracy, NLL, ECE and OOD AUROC per OOD set, value ± Monte-Carlo error, as text.

    Parameters
    ----------
    summary : dict
        A report summary (:attr:`Report.summary` or a loaded ``metrics.json``).

    Returns
    -------
    str
        A title line, a table (raw and temperature-scaled columns), the error method and, when
        the summary holds one, the verdict (:mod:`bayesflat.diagnostics.verdict`): a
        ``FAIL:`` or ``WARNING:`` line with the worst finding, or ``verdict: pass``.
    """
    test = summary["test"]
    scaling = test.get("temperature_scaling")
    header = ["metric", "raw"]
    if scaling:
        header.append(f"temp.-scaled (T = {_fmt(scaling['temperature'], 2)})")
    rows = []
    for key in ("accuracy", "nll", "ece"):
        row = [METRIC_LABELS[key], _fmt(test["metrics"][key])]
        if scaling:
            row.append(_fmt(scaling["metrics"][key]))
        rows.append(row)
    for name, block in summary.get("ood", {}).items():
        entry = block["scores"].get(HEADLINE_SCORE, {}).get("auroc")
        row = [f"AUROC {name} ({HEADLINE_SCORE})", _fmt(entry)]
        if scaling:
            row.append("")
        rows.append(row)
    ens = summary["ensemble"]
    title = (
        f"{summary.get('title', '')}: {test['set']} set (n = {test['n']}), "
        f"{ens['chains']} chains x {ens['draws']} draws, "
        f"{'BMA of all draws' if ens['kind'] == 'bma' else 'final iterate per run'}"
    )
    note = f"value ± Monte-Carlo error ({summary['mc_error']['description']})"
    lines = [title, _text_table(header, rows), note]
    if summary.get("verdict"):
        lines.append(verdict_text(summary["verdict"]))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Figures


_MARGINS_IN = {"left": 0.9, "right": 0.15, "bottom": 0.55, "top": 0.38, "wgap": 0.9,
               "hgap": 0.45}  # fmt: skip
"""Figure margins and gaps between panels, in inches: room for tick labels, axis labels and
titles at the report's font sizes."""


def _new_figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110)


def _place_panels(fig: Any) -> None:
    """Fixed margins in inches instead of a layout engine.

    Constrained layout measures every tick label, which draws each figure once more and was
    the largest single cost of a report; the report's figures have few panels with labels of
    known size, so margins sized once in inches serve them all."""
    width, height = fig.get_size_inches()
    grids = [ax.get_subplotspec().get_gridspec() for ax in fig.axes if ax.get_subplotspec()]
    ncols = max((g.ncols for g in grids), default=1)
    nrows = max((g.nrows for g in grids), default=1)
    m = _MARGINS_IN
    panel_w = (width - m["left"] - m["right"] - (ncols - 1) * m["wgap"]) / ncols
    panel_h = (height - m["bottom"] - m["top"] - (nrows - 1) * m["hgap"]) / nrows
    fig.subplots_adjust(
        left=m["left"] / width,
        right=1 - m["right"] / width,
        bottom=m["bottom"] / height,
        top=1 - m["top"] / height,
        wspace=m["wgap"] / panel_w,
        hspace=m["hgap"] / panel_h,
    )


def _png(fig: Any) -> bytes:
    _place_panels(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def _reliability_axes(ax: Any, count_ax: Any, curve: Mapping[str, Any], edges: np.ndarray,
                      title: str) -> None:  # fmt: skip
    conf = np.array([np.nan if v is None else v for v in curve["confidence"]], dtype=float)
    acc = np.array([np.nan if v is None else v for v in curve["accuracy"]], dtype=float)
    count = np.asarray(curve["count"])
    width = np.diff(edges)
    full = count > 0
    ax.bar(edges[:-1][full], acc[full], width=width[full], align="edge", color="#4c72b0",
           edgecolor="white", label="accuracy in bin")  # fmt: skip
    centres = (edges[:-1] + width / 2)[full]
    ax.vlines(centres, acc[full], conf[full], color="#c44e52", linewidth=2)
    ax.plot(centres, conf[full], linestyle="none", marker="D", markersize=4, color="#c44e52",
            label="mean confidence in bin (red line: gap)")  # fmt: skip
    ax.plot([0, 1], [0, 1], color="black", linestyle="--", linewidth=1, label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy", title=title)
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    count_ax.bar(edges[:-1], count, width=width, align="edge", color="#8c8c8c", edgecolor="white")
    for left, w, n in zip(edges[:-1], width, count, strict=True):
        if n:
            count_ax.text(left + w / 2, n, str(int(n)), ha="center", va="bottom", fontsize=7)
    count_ax.set(xlim=(0, 1), xlabel="confidence (max predicted probability)", ylabel="count")
    count_ax.set_ylim(0, max(1, count.max()) * 1.25)


def _draw_figures(
    report: Report, trace: Any, sums: DrawSums, test: Any, ood: Mapping[str, Any],
    raw_p: np.ndarray, scaled_p: np.ndarray | None, labels: np.ndarray, kind: str,
) -> None:  # fmt: skip
    summary = report.summary
    rel = summary["test"]["reliability"]
    edges = np.asarray(rel["edges"])
    panels = [("raw", "before temperature scaling")]
    if rel["scaled"] is not None:
        t = _fmt(summary["test"]["temperature_scaling"]["temperature"], 2)
        panels.append(("scaled", f"after temperature scaling (T = {t})"))
    fig = _new_figure(5.2 * len(panels), 5.2)
    grid = fig.add_gridspec(2, len(panels), height_ratios=(3, 1))
    for i, (key, title) in enumerate(panels):
        ax = fig.add_subplot(grid[0, i])
        _reliability_axes(ax, fig.add_subplot(grid[1, i], sharex=ax), rel[key], edges, title)
    report.figures["reliability"] = _png(fig)
    pooled = "" if kind == "bma" else f" (final iterates of all {test.chains} runs pooled)"
    report.captions["reliability"] = (
        f"Reliability diagram of the {summary['test']['set']} set{pooled}: accuracy per "
        f"confidence bin ({rel['n_bins']} equal-width bins) against the diagonal of perfect "
        "calibration; red diamonds mark the mean confidence of each bin and the red line its gap "
        "to the accuracy. Below: "
        "number of test inputs per bin."
    )

    fig = _new_figure(10.5, 3.4)
    ax_id, ax_ood = fig.subplots(1, 2)
    conf = raw_p.max(axis=1)
    correct = raw_p.argmax(axis=1) == labels
    bins = np.linspace(1.0 / raw_p.shape[1], 1.0, 31)
    # stepfilled: one polygon per histogram instead of one patch per bin
    ax_id.hist(conf[correct], bins=bins, color="#4c72b0", alpha=0.75, label="correct",
               histtype="stepfilled")  # fmt: skip
    ax_id.hist(conf[~correct], bins=bins, color="#c44e52", alpha=0.75, label="wrong",
               histtype="stepfilled")  # fmt: skip
    ax_id.set(xlabel="confidence", ylabel="count (log scale)", yscale="log",
              title=f"{summary['test']['set']} set")  # fmt: skip
    ax_id.legend(fontsize=8, frameon=False)
    ax_ood.hist(conf, bins=bins, histtype="step", linewidth=1.6, density=True,
                label=summary["test"]["set"], color="black")  # fmt: skip
    for i, name in enumerate(ood):
        if kind == "bma":
            p = _renormalise(sums.total()[name, "probs"])
        else:
            p = np.concatenate(list(_renormalise(sums.last[name, "probs"])))
        ax_ood.hist(p.max(axis=1), bins=bins, histtype="step", linewidth=1.6, density=True,
                    label=name, color=f"C{i + 1}")  # fmt: skip
    ax_ood.set(xlabel="confidence", ylabel="density (log scale)", yscale="log",
               title="in-distribution vs OOD sets")  # fmt: skip
    ax_ood.legend(fontsize=8, frameon=False)
    report.figures["confidence"] = _png(fig)
    report.captions["confidence"] = (
        "Confidence (largest predicted probability) of the "
        + ("Bayesian model average" if kind == "bma" else "final iterates of all runs pooled")
        + ". Left: correct and wrong test predictions. Right: test set against each OOD set "
        "(normalised to unit area)."
    )

    # scores of the BMA, or of the first run's final iterate
    avg = sums.total() if kind == "bma" else {k: v[0] for k, v in sums.last.items()}
    members = test.chains * test.draws if kind == "bma" else 1
    s_in = predictive.scores_of(avg, test.name, members)
    for name in ood:
        _ood_figures(report, name, s_in, predictive.scores_of(avg, name, members), kind)
    _curve_figure(report)
    _trace_figure(report, trace)


def _ood_figures(
    report: Report, name: str, s_in: Mapping[str, np.ndarray], s_out: Mapping[str, np.ndarray],
    kind: str,
) -> None:  # fmt: skip
    from matplotlib.ticker import MaxNLocator

    scores = [s for s in report.summary["ood"][name]["scores"] if s in s_in]
    fig = _new_figure(2.9 * len(scores), 2.8)
    axes = np.atleast_1d(fig.subplots(1, len(scores)))
    for ax, score in zip(axes, scores, strict=True):
        both = np.concatenate([s_in[score], s_out[score]])
        bins = np.linspace(both.min(), both.max() + 1e-12, 31)
        ax.hist(s_in[score], bins=bins, alpha=0.6, color="#4c72b0", histtype="stepfilled",
                label=report.summary["test"]["set"])  # fmt: skip
        ax.hist(s_out[score], bins=bins, alpha=0.6, color="#c44e52", histtype="stepfilled",
                label=name)  # fmt: skip
        auroc = report.summary["ood"][name]["scores"][score]["auroc"]
        ax.set(xlabel=SCORE_LABELS[score], ylabel="count", title=f"AUROC {_fmt(auroc, 3)}")
        ax.xaxis.set_major_locator(MaxNLocator(4))
        ax.title.set_fontsize(9)
        ax.legend(fontsize=7, frameon=False)
    report.figures[f"ood_hist_{name}"] = _png(fig)
    which = "Bayesian model average" if kind == "bma" else "final iterate of the first run"
    report.captions[f"ood_hist_{name}"] = (
        f"Distribution of each OOD score ({which}) on the {report.summary['test']['set']} set "
        f"(blue) and on {name} (red). Every score is oriented so that higher means more OOD."
    )
    fig = _new_figure(4.4, 4.0)
    ax = fig.subplots()
    for i, score in enumerate(scores):
        fpr, tpr, _ = metrics.roc_curve(s_in[score], s_out[score])
        ax.plot(fpr, tpr, color=f"C{i}", label=SCORE_LABELS[score])
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set(
        xlabel="false positive rate (test inputs flagged)",
        ylabel="true positive rate (OOD inputs flagged)",
        xlim=(0, 1),
        ylim=(0, 1.01),
    )
    ax.set_title(f"ROC: {report.summary['test']['set']} vs {name}", fontsize=10)
    ax.legend(fontsize=8, loc="lower right", frameon=False)
    report.figures[f"ood_roc_{name}"] = _png(fig)
    report.captions[f"ood_roc_{name}"] = (
        f"ROC curves for detecting {name} (positive class) among the "
        f"{report.summary['test']['set']} inputs."
    )


def _curve_figure(report: Report) -> None:
    from matplotlib.ticker import FuncFormatter, NullFormatter

    curve = report.summary["draws_curve"]
    x = np.asarray(curve["draws"])
    fig = _new_figure(10.5, 3.0)
    axes = fig.subplots(1, 3)
    for ax, key in zip(axes, ("accuracy", "nll", "ece"), strict=True):
        values = np.array([np.nan if e["value"] is None else e["value"] for e in curve[key]])
        errors = np.array([np.nan if e["mc_error"] is None else e["mc_error"] for e in curve[key]])
        ax.plot(x, values, marker="o", color="#4c72b0")
        if np.isfinite(errors).any():
            ax.fill_between(x, values - errors, values + errors, color="#4c72b0", alpha=0.2)
        ax.set(xlabel="draws per chain" if curve["kind"] == "bma" else "draw index (iterate)",
               ylabel=METRIC_LABELS[key])  # fmt: skip
        if x.max() > 10:
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
    report.figures["draws_curve"] = _png(fig)
    report.captions["draws_curve"] = (
        f"Test accuracy, NLL and ECE against the number of draws: {curve['description']} "
        "(shaded: ± one standard error)."
    )


def _trace_figure(report: Report, trace: Any) -> None:
    stats = _trace.get_group(trace, "sample_stats")
    if stats is None:
        return
    keys = [k for k in ("lp", "step_size") if k in stats]
    if not keys:
        return
    labels = {"lp": "log joint density lp = -N L_B (nats)", "step_size": "step size (lr)"}
    fig = _new_figure(5.2 * len(keys), 3.2)
    axes = np.atleast_1d(fig.subplots(1, len(keys)))
    step = stats["step"].values if "step" in stats else None
    for ax, key in zip(axes, keys, strict=True):
        values = stats[key].values
        for c in range(values.shape[0]):
            x = step[c] if step is not None else np.arange(values.shape[1])
            ax.plot(x, values[c], linewidth=1, color=f"C{c}", label=f"chain {c}")
        ax.set(xlabel="step" if step is not None else "draw", ylabel=labels[key])
        # scientific offset beyond 10^4: tick labels keep to the width the margins allow
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-4, 4), useOffset=False)
        if values.shape[0] <= 8:
            ax.legend(fontsize=7, frameon=False)
    report.figures["trace"] = _png(fig)
    report.captions["trace"] = (
        "Trace plots per chain at the kept draws: the log joint density estimated on the "
        "minibatch, lp = -N L_B in nats (ArviZ's sample_stats lp), and the step size (equal "
        "step sizes overlap). Chains that mix overlap; an lp that still drifts means the burn-in "
        "was too short."
    )


# ---------------------------------------------------------------------------------------------
# HTML

_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; color: #222;
       max-width: 1180px; margin: 2em auto; padding: 0 1.5em; line-height: 1.45; }
h1 { font-size: 1.7em; margin-bottom: 0.1em; }
h2 { font-size: 1.3em; border-bottom: 2px solid #4c72b0; padding-bottom: 0.2em;
     margin-top: 2em; }
h3 { font-size: 1.08em; margin-top: 1.4em; }
.subtitle { color: #666; margin-top: 0; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.93em; }
th, td { padding: 0.32em 0.8em; border-bottom: 1px solid #ddd; text-align: left; }
th { background: #eef2f8; font-weight: 600; }
th.num, td.num { text-align: right; }
tbody tr:nth-child(even) { background: #fafafa; }
td.num { font-variant-numeric: tabular-nums; white-space: nowrap; }
caption { caption-side: bottom; text-align: left; color: #555; font-size: 0.88em;
          padding-top: 0.4em; }
figure { margin: 1em 0 1.6em 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 0.88em; max-width: 60em; }
.settings { display: grid; grid-template-columns: repeat(3, auto); gap: 0 2.5em;
            justify-content: start; }
.settings table { margin-top: 0; }
.row { display: flex; flex-wrap: wrap; gap: 2em; align-items: flex-start; }
.row figure { margin-top: 0.8em; max-width: 400px; }
.note { background: #f6f6f2; border-left: 4px solid #c9b458; padding: 0.5em 1em;
        font-size: 0.92em; }
nav a { margin-right: 1em; }
"""


def _esc(value: Any) -> str:
    return html.escape(str(value))


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]], caption: str = "",
                numeric_from: int = 1) -> str:  # fmt: skip
    out = ["<table>"]
    if caption:
        out.append(f"<caption>{caption}</caption>")
    out.append(
        "<thead><tr>"
        + "".join(
            f'<th class="num">{_esc(h)}</th>' if i >= numeric_from else f"<th>{_esc(h)}</th>"
            for i, h in enumerate(header)
        )
        + "</tr></thead>"
    )
    out.append("<tbody>")
    for row in rows:
        cells = [
            f'<td class="num">{_esc(c)}</td>' if i >= numeric_from else f"<td>{_esc(c)}</td>"
            for i, c in enumerate(row)
        ]
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def _figure_html(report: Report, key: str) -> str:
    if key not in report.figures:
        return ""
    data = base64.b64encode(report.figures[key]).decode("ascii")
    caption = _esc(report.captions.get(key, ""))
    return (
        f'<figure><img alt="{_esc(key)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{caption}</figcaption></figure>"
    )


def _when(text: Any) -> str:
    from datetime import datetime

    try:
        stamp = datetime.fromisoformat(str(text))
    except ValueError:
        return str(text)
    zone = stamp.tzname() or ""
    return stamp.strftime("%Y-%m-%d %H:%M") + (f" {zone}" if zone else "")


def _setting_text(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list | dict):
        return json.dumps(value)
    return str(value)


def _density_html(density: Mapping[str, Any] | None) -> str:
    if not density or (density.get("elpd_loo") is None and not density.get("heldout")):
        return ""
    rows = []
    loo = density.get("elpd_loo")
    note = ""
    if loo is not None and loo["pareto_k_above_0.7"] > 0:
        note = (
            f" {loo['pareto_k_above_0.7']} of {loo['n']} training points have Pareto k > 0.7, "
            "where PSIS-LOO is unreliable (too few or too correlated draws, or points that "
            "move the posterior much): trust the held-out lppd instead."
        )
    if loo is not None:
        rows.append([
            f"elpd_loo, training points (PSIS-LOO, {loo['pareto_k_above_0.7']} with k > 0.7)",
            str(loo["n"]), f"{loo['value']:.2f} ± {loo['se']:.2f}", f"{loo['per_point']:.4f}",
        ])  # fmt: skip
    for name, block in density.get("heldout", {}).items():
        rows.append([f"lppd, held-out set {name}", str(block["n"]), f"{block['lppd']:.2f}",
                     f"{block['per_point']:.4f}"])  # fmt: skip
    return _html_table(
        ["log predictive density (nats)", "n", "total", "per point"], rows,
        "elpd_loo leaves out each training point in turn (az.loo on the log_likelihood group); "
        "lppd is the log of the BMA's probability of each held-out label, summed "
        "(per point: minus the BMA's NLL). On held-out data drawn like the training data the "
        "per-point numbers estimate the same quantity; ± is the standard error over points."
        + _esc(note),
    )  # fmt: skip


def _render_report(report: Report) -> str:
    s = report.summary
    test = s["test"]
    scaling = test.get("temperature_scaling")
    ens = s["ensemble"]
    run = s["run"]
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>bayesflat report: {_esc(s['title'])}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>bayesflat report: {_esc(s['title'])}</h1>",
        f'<p class="subtitle">{_esc(ens["description"])}. Created '
        f"{_esc(_when(run.get('created_at', '')))} with bayesflat "
        f"{_esc(run.get('bayesflat_version', ''))}.</p>",
        verdict_html(s["verdict"]) if s.get("verdict") else "",
        '<nav><a href="#summary">Summary</a><a href="#settings">Run settings</a>'
        '<a href="#calibration">Calibration</a><a href="#uncertainty">Uncertainty</a>'
        '<a href="#ood">OOD detection</a><a href="#draws">Draws</a>'
        '<a href="#traces">Traces</a><a href="#diagnostics">Diagnostics</a></nav>',
    ]
    if not run.get("complete", True):
        parts.append(
            f'<p class="note">This run stopped early: {_esc(run.get("stop_reason", ""))}. The '
            "numbers use the draws kept before the stop.</p>"
        )

    parts.append('<h2 id="summary">Summary</h2>')
    description = _esc(s["mc_error"]["description"])
    if description.startswith("none"):
        note = f"Numbers have no Monte-Carlo error ({description.removeprefix('none: ')})."
    else:
        note = (
            f"Every number is <b>value ± Monte-Carlo error</b>; the error is the {description}. "
            "It measures how much the number would change with "
            f"{'another set of posterior draws' if ens['kind'] == 'bma' else 'other runs'}, "
            f"not the sampling error of the finite test set (n = {test['n']})."
        )
    parts.append(f'<p class="note">{note}</p>')
    rows = [
        ["Accuracy", _fmt(test["metrics"]["accuracy"])],
        ["NLL (nats)", _fmt(test["metrics"]["nll"])],
        ["ECE", _fmt(test["metrics"]["ece"])],
    ]
    for name, block in s["ood"].items():
        rows.append([f"AUROC, {name} ({SCORE_LABELS[HEADLINE_SCORE]})",
                     _fmt(block["scores"][HEADLINE_SCORE]["auroc"])])  # fmt: skip
    parts.append(_html_table(["headline", f"{test['set']} set"], rows))
    parts.append(_density_html(s.get("predictive_density")))

    parts.append('<h2 id="settings">Run settings</h2>')
    items = [(k, _when(v) if k == "created_at" else _setting_text(v)) for k, v in run.items()]
    per_col = math.ceil(len(items) / 3)
    columns = [items[i : i + per_col] for i in range(0, len(items), per_col)]
    parts.append('<div class="settings">')
    for column in columns:
        parts.append(_html_table(["setting", "value"], column))
    parts.append("</div>")

    parts.append(
        '<h2 id="calibration">Predictive performance and calibration '
        f"({_esc(test['set'])} set)</h2>"
    )
    header = ["metric", "raw"]
    if scaling:
        header.append("temperature-scaled")
    rows = []
    for key, label in METRIC_LABELS.items():
        row = [label, _fmt(test["metrics"][key])]
        if scaling:
            row.append(_fmt(scaling["metrics"][key]))
        rows.append(row)
    if scaling:
        rows.append(["temperature T", "1 (none)", _fmt(scaling["temperature"], 3)])
        caption = (
            "Temperature scaling: T fitted by minimising the NLL on the "
            f"{_esc(scaling['fitted_on'])} set (n = {scaling['n_val']}, held out from "
            f"training), then applied to the {_esc(test['set'])} set; each Monte-Carlo "
            f"replicate refits T. ECE and MCE use {test['reliability']['n_bins']} "
            "equal-width confidence bins; MCE, the largest gap of any non-empty bin, is driven "
            "by bins that hold few inputs (see the counts below the reliability diagram)."
        )
    else:
        caption = "No validation set in the trace, so no temperature scaling."
    parts.append(_html_table(header, rows, caption))
    parts.append(_figure_html(report, "reliability"))
    parts.append(_figure_html(report, "confidence"))

    parts.append('<h2 id="uncertainty">Uncertainty decomposition</h2>')
    keys = [k for k in UNCERTAINTY_LABELS if any(k in b for b in s["uncertainty"].values())]
    rows = [
        [name, str(block["n"]), *(_fmt(block.get(k)) for k in keys)]
        for name, block in s["uncertainty"].items()
    ]
    if ens["kind"] == "bma":
        caption = (
            "Means over the inputs of each set; entropies in nats. Total predictive entropy = "
            "aleatoric (expected entropy of the draws) + epistemic (mutual information between "
            "label and weights); variation ratio: share of draws that disagree with the most "
            "voted class. OOD inputs should show higher epistemic uncertainty."
        )
    else:
        caption = (
            "Means over the inputs of each set and over runs; entropies in nats. A point "
            "estimate has no epistemic part: its total entropy is all aleatoric."
        )
    parts.append(_html_table(["set", "n", *(UNCERTAINTY_LABELS[k] for k in keys)], rows, caption))

    parts.append('<h2 id="ood">Out-of-distribution detection</h2>')
    if not s["ood"]:
        parts.append("<p>The trace holds no unlabelled evaluation set, so no OOD detection.</p>")
    for name, block in s["ood"].items():
        parts.append(
            f"<h3>{_esc(test['set'])} (negative) vs {_esc(name)} (positive, n = {block['n']})</h3>"
        )
        rows = [
            [SCORE_LABELS[score], *(_fmt(table[m]) for m in OOD_METRIC_LABELS)]
            for score, table in block["scores"].items()
        ]
        table = _html_table(
            ["score", *OOD_METRIC_LABELS.values()], rows,
            "OOD is the positive class and a higher score means more OOD. FPR@95: fraction of "
            "OOD inputs accepted when 95 % of the test inputs are kept.",
        )  # fmt: skip
        parts.append(
            f'<div class="row"><div>{table}</div>{_figure_html(report, f"ood_roc_{name}")}</div>'
        )
        parts.append(_figure_html(report, f"ood_hist_{name}"))

    parts.append('<h2 id="draws">Performance against the number of draws</h2>')
    curve = s["draws_curve"]
    rows = [
        [str(k), *(_fmt(curve[m][i]) for m in ("accuracy", "nll", "ece"))]
        for i, k in enumerate(curve["draws"])
    ]
    parts.append(_figure_html(report, "draws_curve"))
    parts.append(_html_table(
        ["draws per chain" if curve["kind"] == "bma" else "draw", "accuracy", "NLL", "ECE"],
        rows, _esc(curve["description"]),
    ))  # fmt: skip

    parts.append('<h2 id="traces">Sampler traces</h2>')
    parts.append(_figure_html(report, "trace") or "<p>The trace holds no sample statistics.</p>")
    parts.append(report.diagnostics_html)
    parts.append("</body></html>")
    return "\n".join(p for p in parts if p)


# ---------------------------------------------------------------------------------------------
# Comparison of runs


def load_summary(path: str | Path, **options: Any) -> dict[str, Any]:
    """The report summary of a run folder, a ``metrics.json`` or a trace file.

    A folder is read through its ``metrics.json`` when that is a report of this format, else
    through its ``trace.nc``; a trace file is reported with :func:`build_report` (numbers only).

    Parameters
    ----------
    path : str or path-like
        Run folder, ``metrics.json`` or trace (``.nc``).
    **options
        Passed to :func:`build_report` when a trace has to be read.

    Returns
    -------
    dict
        The summary.
    """
    path = Path(path)
    if path.is_dir():
        candidate = path / "metrics.json"
        if candidate.is_file():
            summary = _read_summary(candidate, strict=False)
            if summary is not None:
                return summary
        trace_path = path / "trace.nc"
        if not trace_path.is_file():
            if candidate.is_file():
                return _read_summary(candidate, strict=True)  # says what is wrong with it
            raise FileNotFoundError(
                f"{path} holds neither a report metrics.json nor a trace.nc; pass a run folder "
                "written by `bayesflat run`"
            )
        path = trace_path
    elif not path.exists():
        raise FileNotFoundError(f"{path} does not exist; pass a run folder, metrics.json or trace")
    if path.suffix == ".json":
        return _read_summary(path, strict=True)
    return build_report(_trace.load(path), figures=False, **options).summary


def labels_digest(labels: Any) -> str:
    """SHA-256 of the labels as little-endian int64 (hex): the identity of a test set.

    Two runs are scored on the same test set when their sizes and digests agree.
    """
    values = np.ascontiguousarray(np.asarray(labels), dtype="<i8")
    return hashlib.sha256(values.tobytes()).hexdigest()


_SUMMARY_KEYS = (
    ("ensemble", "kind"), ("ensemble", "description"), ("mc_error", "description"),
    ("test", "set"), ("test", "n"), ("test", "labels_sha256"), ("test", "metrics"),
    ("test", "reliability"),
)  # fmt: skip
"""Keys of a report summary that :func:`compare` reads."""


def _missing_key(summary: Mapping[str, Any]) -> str | None:
    """The first of :data:`_SUMMARY_KEYS` absent from ``summary`` (dotted), or None."""
    for keys in _SUMMARY_KEYS:
        node: Any = summary
        for depth, key in enumerate(keys):
            if not isinstance(node, Mapping) or key not in node:
                return ".".join(keys[: depth + 1])
            node = node[key]
    for metric in ("accuracy", "nll", "ece"):
        if metric not in summary["test"]["metrics"]:
            return f"test.metrics.{metric}"
    return None


def _read_summary(path: Path, *, strict: bool) -> dict[str, Any] | None:
    try:
        summary = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        if not strict:
            return None
        raise ValueError(f"{path} is not valid JSON ({err}); expected a bayesflat report") from None
    if not isinstance(summary, dict) or summary.get("format") != FORMAT:
        if not strict:
            return None
        raise ValueError(f"{path} is not a bayesflat report (its format is not {FORMAT!r})")
    missing = _missing_key(summary)
    if missing is not None:
        if not strict:
            return None
        raise ValueError(
            f"{path} lacks the key {missing!r} of a bayesflat report; write it again with "
            "`bayesflat report` on the run's trace"
        )
    return summary


@dataclass(eq=False)
class Comparison:
    """Several runs side by side: a JSON-ready ``summary``, a text table and a figure.

    Attributes
    ----------
    summary : dict
        ``{"format", "runs": [{"name", "sampler", "ensemble", "metrics", "scaled", "temperature",
        "ood_auroc", "steps_per_chain", "gradient_evaluations_per_chain", "verdict"}],
        "ood_sets", "ood_score", "budget_warning"}``; metrics as ``{"value", "mc_error"}``;
        ``budget_warning`` is a sentence when the runs' gradient evaluations per chain differ by
        more than 10 % (:data:`BUDGET_TOLERANCE`), else None.
    figure : bytes
        PNG of the combined reliability diagram.
    """

    summary: dict[str, Any]
    figure: bytes = b""

    def rows(self) -> tuple[list[str], list[list[str]]]:
        """Header and rows of the comparison table (value ± MC error)."""
        sets = self.summary["ood_sets"]
        header = ["run", "sampler", "estimate", "verdict", "grad. evals/chain", "accuracy", "NLL",
                  "ECE", "NLL (T-scaled)", "ECE (T-scaled)",
                  *(f"AUROC {name}" for name in sets)]  # fmt: skip
        rows = []
        for run in self.summary["runs"]:
            scaled = run["scaled"] or {}
            evals = run.get("gradient_evaluations_per_chain")
            rows.append([
                run["name"], str(run["sampler"]), run["ensemble"], str(run.get("verdict") or "-"),
                f"{evals:,}" if isinstance(evals, int) else "n/a",
                _fmt(run["metrics"]["accuracy"]), _fmt(run["metrics"]["nll"]),
                _fmt(run["metrics"]["ece"]), _fmt(scaled.get("nll")), _fmt(scaled.get("ece")),
                *(_fmt(run["ood_auroc"].get(name)) for name in sets),
            ])  # fmt: skip
        return header, rows

    def _note(self) -> str:
        return (
            f"value ± Monte-Carlo error; AUROC of the {SCORE_LABELS[self.summary['ood_score']]} "
            "score; bma = model average of all draws, final = final iterate per run (mean over "
            "runs); grad. evals/chain: closure evaluations per chain, burn-in and exploration "
            "included"
        )

    def table(self) -> str:
        """The comparison as a text table, then a warning line when the budgets differ."""
        header, rows = self.rows()
        text = _text_table(header, rows, numeric_from=4) + "\n" + self._note()
        warning = self.summary.get("budget_warning")
        return text + (f"\nWARNING: {warning}" if warning else "")

    def to_json(self) -> str:
        """``summary`` as indented JSON."""
        return json.dumps(self.summary, indent=2, allow_nan=False) + "\n"

    def to_html(self) -> str:
        """A self-contained HTML page with the table and the reliability diagram."""
        header, rows = self.rows()
        data = base64.b64encode(self.figure).decode("ascii")
        runs = "".join(
            f"<li><b>{_esc(r['name'])}</b>: {_esc(r['title'])}; {_esc(r['ensemble_description'])}; "
            f"MC error: {_esc(r['mc_error'])}</li>"
            for r in self.summary["runs"]
        )
        return "\n".join([
            "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
            "<title>bayesflat comparison</title>", f"<style>{_CSS}</style></head><body>",
            "<h1>bayesflat comparison</h1>",
            f'<p class="subtitle">{len(self.summary["runs"])} runs on the same test set.</p>',
            '<p class="note">Every number is <b>value ± Monte-Carlo error</b> over the '
            "posterior draws (or over independent runs for point estimates).</p>",
            _budget_html(self.summary.get("budget_warning")),
            _html_table(header, rows, _esc(self._note()), numeric_from=4),
            f"<h2>Runs</h2><ul>{runs}</ul>",
            "<h2>Reliability</h2>",
            f'<figure><img alt="reliability" src="data:image/png;base64,{data}">'
            "<figcaption>Reliability diagrams of all runs (raw, before temperature scaling): "
            "accuracy against mean confidence per bin; marker area grows with the bin count. "
            "Below: share of the test predictions in each bin (log scale; point estimates "
            "pool the final iterates of all runs).</figcaption></figure>",
            "</body></html>",
        ])  # fmt: skip

    def save(self, output: str | Path) -> dict[str, Path]:
        """Write ``comparison.json``, ``comparison.html`` and ``reliability.png`` in ``output``."""
        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        paths = {
            "json": out / "comparison.json",
            "html": out / "comparison.html",
            "png": out / "reliability.png",
        }
        _io.write_text(paths["json"], self.to_json())
        _io.write_text(paths["html"], self.to_html())
        _io.write_bytes(paths["png"], self.figure)
        return paths


def compare(runs: Mapping[str, Mapping[str, Any]]) -> Comparison:
    """Compare report summaries of several runs.

    Parameters
    ----------
    runs : mapping of str to dict
        Run name to its report summary (:attr:`Report.summary` or :func:`load_summary`).

    Returns
    -------
    Comparison
        The table rows hold accuracy, NLL and ECE (raw and temperature-scaled) and the AUROC of
        the predictive-entropy score for every OOD set of any run, each value ± Monte-Carlo
        error.
    """
    if not runs:
        raise ValueError("runs is empty; pass at least one run summary")
    sets: list[str] = []
    entries = []
    for name, summary in runs.items():
        if not isinstance(summary, Mapping) or summary.get("format") != FORMAT:
            raise ValueError(f"runs[{name!r}] is not a bayesflat report summary")
        missing = _missing_key(summary)
        if missing is not None:
            raise ValueError(f"runs[{name!r}] lacks the key {missing!r} of a report summary")
    _check_same_test_set(runs)
    for name, summary in runs.items():
        test = summary["test"]
        scaling = test.get("temperature_scaling")
        ood = {}
        for set_name, block in summary.get("ood", {}).items():
            if set_name not in sets:
                sets.append(set_name)
            ood[set_name] = block["scores"].get(HEADLINE_SCORE, {}).get("auroc")
        entries.append({
            "name": name,
            "title": summary.get("title", ""),
            "sampler": summary.get("run", {}).get("sampler"),
            "ensemble": summary["ensemble"]["kind"],
            "ensemble_description": summary["ensemble"]["description"],
            "mc_error": summary["mc_error"]["description"],
            "test_set": test["set"],
            "n": test["n"],
            "metrics": test["metrics"],
            "scaled": scaling["metrics"] if scaling else None,
            "temperature": scaling["temperature"] if scaling else None,
            "ood_auroc": ood,
            "reliability": test["reliability"],
            "steps_per_chain": summary.get("run", {}).get("steps_per_chain"),
            "gradient_evaluations_per_chain": summary.get("run", {}).get(
                "gradient_evaluations_per_chain"
            ),
            "verdict": (summary.get("verdict") or {}).get("status"),
        })  # fmt: skip
    summary = {"format": "bayesflat-comparison/1", "ood_score": HEADLINE_SCORE,
               "ood_sets": sets, "runs": entries,
               "budget_warning": _budget_warning(entries)}  # fmt: skip
    return Comparison(summary=_clean(summary), figure=_comparison_figure(entries))


BUDGET_TOLERANCE = 0.10
"""Relative difference in gradient evaluations per chain above which :func:`compare` warns."""


def _budget_html(warning: str | None) -> str:
    if not warning:
        return ""
    return (
        f'<p class="note" style="border-left-color: #b35900"><b>Warning:</b> {_esc(warning)}.</p>'
    )


def _budget_warning(entries: Sequence[Mapping[str, Any]]) -> str | None:
    """A warning when the runs' gradient evaluations per chain differ by more than 10 %."""
    known = {e["name"]: e["gradient_evaluations_per_chain"] for e in entries}
    missing = [name for name, v in known.items() if not isinstance(v, int | float)]
    values = {name: float(v) for name, v in known.items() if name not in missing}
    parts = []
    if len(values) >= 2:
        low, high = min(values.values()), max(values.values())
        if high > (1.0 + BUDGET_TOLERANCE) * low:
            parts.append(
                f"the runs differ in budget: {high / low:.2f}x as many gradient evaluations per "
                f"chain in {max(values, key=values.__getitem__)} ({high:.0f}) as in "
                f"{min(values, key=values.__getitem__)} ({low:.0f}); compare them at equal "
                f"budgets (within {BUDGET_TOLERANCE:.0%})"
            )
    if missing and len(entries) > 1:
        parts.append(f"unknown gradient evaluations per chain for {', '.join(missing)}")
    return "; ".join(parts) or None


def _check_same_test_set(runs: Mapping[str, Mapping[str, Any]]) -> None:
    """Refuse runs scored on different test sets (size or label digest differ)."""
    first, *others = runs
    ref = runs[first]["test"]
    for name in others:
        test = runs[name]["test"]
        if test["n"] != ref["n"] or test["labels_sha256"] != ref["labels_sha256"]:
            what = (
                f"{ref['n']} and {test['n']} examples"
                if test["n"] != ref["n"]
                else f"the same size ({ref['n']}) but different labels"
            )
            raise ValueError(
                f"runs {first!r} and {name!r} are scored on different test sets ({what}); "
                "compare only runs evaluated on the same test set"
            )


def _comparison_figure(entries: Sequence[Mapping[str, Any]]) -> bytes:
    fig = _new_figure(6.4, 6.4)
    ax, count_ax = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    ax.plot([0, 1], [0, 1], color="black", linestyle="--", linewidth=1, label="perfect calibration")
    for i, run in enumerate(entries):
        rel = run["reliability"]
        curve = rel["raw"]
        conf = np.array([np.nan if v is None else v for v in curve["confidence"]], dtype=float)
        acc = np.array([np.nan if v is None else v for v in curve["accuracy"]], dtype=float)
        count = np.asarray(curve["count"], dtype=float)
        share = count / count.sum()
        full = count > 0
        ece = _fmt(run["metrics"]["ece"], 3)
        ax.plot(
            conf[full], acc[full], color=f"C{i}", linewidth=1.4, label=f"{run['name']} (ECE {ece})"
        )
        ax.scatter(conf[full], acc[full], s=8 + 200 * count[full] / count.sum(), color=f"C{i}")
        edges = np.asarray(rel["edges"])
        count_ax.stairs(np.where(full, share, np.nan), edges, color=f"C{i}", linewidth=1.4)
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy", title="reliability (raw)")
    ax.legend(fontsize=8, loc="upper left", frameon=False)
    count_ax.set(xlabel="confidence (max predicted probability)", ylabel="share of inputs",
                 yscale="log")  # fmt: skip
    return _png(fig)
