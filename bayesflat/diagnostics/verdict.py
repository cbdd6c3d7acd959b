"""One verdict for a trace: can its headline numbers be trusted?

:func:`verdict` condenses the convergence rows of :func:`~bayesflat.diagnostics.report.diagnose`
and the per-draw ``diverging`` flags of ``sample_stats`` into ``"pass"``, ``"warn"`` or
``"fail"``, with the reasons and the numbers behind them. The rules
(:data:`VERDICT_THRESHOLDS`):

=====================================================  =======  ===========================
check                                                  level    default threshold
=====================================================  =======  ===========================
a chain that ends diverged, or diverges often           fail     last draw, or more than
                                                                ``diverging_fail`` of draws
a chain with isolated diverging draws it recovers from  warn     ``sample_stats.diverging``
R-hat of a predictive functional above ``rhat_fail``   fail     1.1
R-hat of a predictive functional above ``rhat_warn``   warn     1.01
bulk ESS of a predictive functional too low            warn     100 per chain
R-hat or ESS not computable (NaN)                      warn
configurational temperature away from ``T``            warn     ``diagnose``'s rule
R-hat of a weight projection above ``rhat_warn``       warn     1.01
fewer than ``min_chains`` chains                       warn     4
=====================================================  =======  ===========================

*Predictive functionals* are the potential ``lp`` and the functionals of the labelled
evaluation sets (``nll_<set>``, ``p_true_<set>_<i>``): the headline numbers are functions of
the predictions, so these decide whether they have converged. Random projections of the
weights (``proj_<j>``) can differ between chains that sit in equivalent modes (hidden units
permuted) while every prediction agrees, so they warn but never fail.

A chain that ends in a diverging state, or spends more than 5% of its draws there, has left
the posterior: its draws bias every average. A chain with a few isolated diverging draws (a
step-size excursion it recovers from, as Stan's divergent transitions) is reported per chain
and warns; ``bayesflat.sample(..., on_divergence="exclude")`` drops such chains.

R-hat 1.01 and ESS 100 per chain are Vehtari et al. (2021); R-hat above 1.1 is the older
Gelman-Rubin rule of a clear failure. With fewer than four chains R-hat has too little
between-chain information to detect a chain that has not mixed.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["LEVELS", "VERDICT_THRESHOLDS", "Reason", "Verdict", "trace_verdict", "verdict"]

VERDICT_THRESHOLDS: dict[str, float] = {
    "rhat_warn": 1.01,
    "rhat_fail": 1.1,
    "ess_per_chain": 100.0,
    "min_chains": 4,
    "diverging_fail": 0.05,
}
"""Thresholds of :func:`verdict` (see the module docstring)."""

LEVELS = ("pass", "warn", "fail")
"""Verdict levels, from best to worst."""

_COLOURS = {"pass": "#1a7f37", "warn": "#b35900", "fail": "#b00020"}
_BACKGROUNDS = {"pass": "#eaf6ec", "warn": "#fff4e5", "fail": "#fdecee"}


@dataclass(frozen=True)
class Reason:
    """One finding of :func:`verdict`: its level, the check and a sentence with the numbers."""

    level: str
    check: str
    message: str


@dataclass(frozen=True)
class Verdict:
    """Pass / warn / fail for a trace, with reasons and the numbers they rest on.

    Attributes
    ----------
    status : str
        ``"pass"``, ``"warn"`` or ``"fail"``: the worst level of ``reasons`` (pass if none).
    reasons : list of Reason
        Findings, fails first.
    numbers : dict
        ``chains``, ``draws``, ``max_rhat`` and ``max_rhat_name`` (predictive functionals),
        ``min_ess_bulk`` and ``min_ess_bulk_name``, ``max_rhat_projection``,
        ``diverging_per_chain`` (diverging draws of each chain, or None when not recorded),
        ``divergent_chains``, and ``temperature`` (the configurational temperature estimate,
        its MCSE and the target, when recorded).
    thresholds : dict
        The thresholds applied.
    """

    status: str
    reasons: list[Reason] = field(default_factory=list)
    numbers: dict[str, Any] = field(default_factory=dict)
    thresholds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"status", "reasons": [{"level", "check", "message"}], ...}``."""
        return {
            "status": self.status,
            "reasons": [r.__dict__.copy() for r in self.reasons],
            **{k: _plain(v) for k, v in self.numbers.items()},
            "thresholds": dict(self.thresholds),
        }

    def to_text(self) -> str:
        """One line per finding; ``""`` for a pass without findings.

        The first line reads ``"FAIL: ..."`` or ``"WARNING: ..."`` with the worst finding;
        the others are indented.
        """
        return verdict_text(self.to_dict())

    def to_html(self) -> str:
        """A coloured box (red fail, amber warn, green pass) listing the findings."""
        return verdict_html(self.to_dict())


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple | np.ndarray):
        return [_plain(v) for v in value]
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    return value


def _is_predictive(name: str) -> bool:
    return name == "lp" or name.startswith(("nll_", "p_true_"))


def _num(value: Any) -> float:
    return math.nan if value is None else float(value)


def verdict(
    diagnosis: Any,
    *,
    diverging: np.ndarray | None = None,
    thresholds: Mapping[str, float] | None = None,
) -> Verdict:
    """Pass / warn / fail from a diagnose table and the diverging flags.

    Parameters
    ----------
    diagnosis : Diagnosis
        :func:`bayesflat.diagnostics.diagnose` of the trace.
    diverging : bool array, shape (chain, draw), optional
        ``sample_stats.diverging``; None when the trace does not record it.
    thresholds : mapping, optional
        Overrides of :data:`VERDICT_THRESHOLDS`.

    Returns
    -------
    Verdict
    """
    unknown = set(thresholds or {}) - set(VERDICT_THRESHOLDS)
    if unknown:
        raise ValueError(
            f"unknown verdict thresholds {sorted(unknown)}; known: {sorted(VERDICT_THRESHOLDS)}"
        )
    t = {**VERDICT_THRESHOLDS, **{k: float(v) for k, v in (thresholds or {}).items()}}
    chains = diagnosis.run.get("chains")
    draws = diagnosis.run.get("draws")
    reasons: list[Reason] = []
    numbers: dict[str, Any] = {"chains": chains, "draws": draws}

    if diverging is not None:
        flags = np.asarray(diverging, dtype=bool)
        per_chain = flags.reshape(flags.shape[0], -1).sum(axis=1)
        bad = [int(c) for c in np.flatnonzero(per_chain)]
        numbers["diverging_per_chain"] = [int(n) for n in per_chain]
        numbers["divergent_chains"] = bad
        if bad:
            flat = flags.reshape(flags.shape[0], -1)
            limit = t["diverging_fail"] * flat.shape[1]
            lost = [c for c in bad if flat[c, -1] or per_chain[c] > limit]
            detail = ", ".join(f"chain {c}: {int(per_chain[c])}" for c in bad)
            what = (
                f"{len(bad)} of {flags.shape[0]} chains have diverging draws ({detail}): "
                "non-finite potential, weights beyond 10 prior stds, or training predictions "
                "at chance"
            )
            if lost:
                reasons.append(Reason(
                    "fail", "divergence",
                    f"{what}; chain(s) {', '.join(map(str, lost))} end diverged or diverge in "
                    f"more than {t['diverging_fail']:.0%} of their draws",
                ))  # fmt: skip
            else:
                reasons.append(Reason(
                    "warn", "divergence",
                    f"{what}; isolated excursions the chains recovered from (lower lr to avoid "
                    "them, or on_divergence='exclude')",
                ))  # fmt: skip
    else:
        numbers["diverging_per_chain"] = None
        numbers["divergent_chains"] = []

    rows = diagnosis.section("convergence")
    predictive = [r for r in rows if _is_predictive(r.name)]
    projections = [r for r in rows if not _is_predictive(r.name)]
    rhats = [(_num(r.values.get("rhat")), r.name) for r in predictive]
    ess = [(_num(r.values.get("ess_bulk")), r.name) for r in predictive]
    finite_rhat = [x for x in rhats if math.isfinite(x[0])]
    finite_ess = [x for x in ess if math.isfinite(x[0])]
    worst = max(finite_rhat, default=(math.nan, None))
    lowest = min(finite_ess, default=(math.nan, None))
    numbers.update({"max_rhat": worst[0], "max_rhat_name": worst[1],
                    "min_ess_bulk": lowest[0], "min_ess_bulk_name": lowest[1]})  # fmt: skip
    if not predictive:
        reasons.append(Reason("warn", "convergence", "no predictive functional to diagnose"))
    if len(finite_rhat) < len(rhats) or len(finite_ess) < len(ess):
        missing = sorted({n for v, n in rhats + ess if not math.isfinite(v)})
        reasons.append(Reason("warn", "convergence",
                              f"R-hat or ESS not computable for {', '.join(missing[:4])}"
                              f"{' ...' if len(missing) > 4 else ''}"))  # fmt: skip
    over = [(v, n) for v, n in finite_rhat if v > t["rhat_warn"]]
    if over:
        level = "fail" if worst[0] > t["rhat_fail"] else "warn"
        limit = t["rhat_fail"] if level == "fail" else t["rhat_warn"]
        reasons.append(Reason(level, "rhat",
                              f"R-hat {worst[0]:.3f} on {worst[1]} > {limit:g} "
                              f"({len(over)} of {len(rhats)} predictive functionals above "
                              f"{t['rhat_warn']:g}): the chains have not converged"))  # fmt: skip
    if isinstance(chains, int) and finite_ess:
        need = t["ess_per_chain"] * chains
        low = [(v, n) for v, n in finite_ess if v < need]
        if low:
            reasons.append(Reason("warn", "ess",
                                  f"bulk ESS {lowest[0]:.0f} on {lowest[1]} < {need:.0f} "
                                  f"({t['ess_per_chain']:.0f} per chain; {len(low)} of "
                                  f"{len(ess)} predictive functionals below)"))  # fmt: skip
    proj = [_num(r.values.get("rhat")) for r in projections]
    numbers["max_rhat_projection"] = max((v for v in proj if math.isfinite(v)), default=math.nan)
    if math.isfinite(numbers["max_rhat_projection"]) and (
        numbers["max_rhat_projection"] > t["rhat_warn"]
    ):
        reasons.append(Reason("warn", "weights",
                              f"R-hat {numbers['max_rhat_projection']:.3f} on random projections "
                              "of the weights: the chains explore different regions of weight "
                              "space (equivalent modes, or still drifting)"))  # fmt: skip
    if isinstance(chains, int) and chains < t["min_chains"]:
        reasons.append(Reason("warn", "chains",
                              f"{chains} chain{'s' if chains != 1 else ''}: R-hat and the "
                              f"Monte-Carlo errors need at least {t['min_chains']:.0f} chains "
                              "to be reliable"))  # fmt: skip

    for row in diagnosis.section("temperature"):
        if row.name == "configurational":
            temp = {k: row.values.get(k) for k in ("estimate", "mcse", "target")}
            numbers["temperature"] = {"configurational": temp["estimate"], "mcse": temp["mcse"],
                                      "target": temp["target"]}  # fmt: skip
            if row.verdict != "pass" and all(
                isinstance(v, int | float) and math.isfinite(v) for v in temp.values()
            ):
                reasons.append(Reason("warn", "temperature",
                                      f"configurational temperature {temp['estimate']:.3g} ± "
                                      f"{temp['mcse']:.2g}, target T = {temp['target']:g}: the "
                                      "chains are not at the target's equilibrium (for "
                                      "perturbation samplers such as fSGLD part of the gap is "
                                      "the smoothing of the potential)"))  # fmt: skip

    reasons.sort(key=lambda r: -LEVELS.index(r.level))
    status = reasons[0].level if reasons else "pass"
    return Verdict(status=status, reasons=reasons, numbers=numbers, thresholds=t)


def trace_verdict(
    trace: Any, *, diagnosis: Any = None, thresholds: Mapping[str, float] | None = None
) -> Verdict:
    """:func:`verdict` of a trace: its diagnose table and ``sample_stats.diverging``.

    Parameters
    ----------
    trace : arviz.InferenceData or xarray.DataTree
        A bayesflat trace.
    diagnosis : Diagnosis, optional
        :func:`~bayesflat.diagnostics.diagnose` of ``trace``, when already computed.
    thresholds : mapping, optional
        Overrides of :data:`VERDICT_THRESHOLDS`.
    """
    from bayesflat.diagnostics.report import diagnose
    from bayesflat.trace import get_group

    if diagnosis is None:
        diagnosis = diagnose(trace)
    stats = get_group(trace, "sample_stats")
    diverging = None
    if stats is not None and "diverging" in stats:
        diverging = stats["diverging"].transpose("chain", "draw").values
    return verdict(diagnosis, diverging=diverging, thresholds=thresholds)


def _temperature_text(numbers: Mapping[str, Any]) -> str:
    temp = numbers.get("temperature")
    if not temp or temp.get("configurational") is None:
        return ""
    mcse = temp.get("mcse")
    err = f" ± {mcse:.2g}" if isinstance(mcse, float) else ""
    target = temp.get("target")
    return f"configurational temperature {temp['configurational']:.3g}{err}" + (
        f" (target T = {target:g})" if isinstance(target, int | float) else ""
    )


def _numbers_text(numbers: Mapping[str, Any]) -> str:
    parts = []
    if isinstance(numbers.get("max_rhat"), float):
        parts.append(f"max R-hat {numbers['max_rhat']:.3f} ({numbers['max_rhat_name']})")
    if isinstance(numbers.get("min_ess_bulk"), float):
        parts.append(f"min bulk ESS {numbers['min_ess_bulk']:.0f} ({numbers['min_ess_bulk_name']})")
    if numbers.get("chains") is not None:
        parts.append(f"{numbers['chains']} chains")
    per_chain = numbers.get("diverging_per_chain")
    if per_chain is not None:
        parts.append("diverging draws per chain " + str(list(per_chain)))
    temp = _temperature_text(numbers)
    if temp:
        parts.append(temp)
    return "; ".join(parts)


def verdict_text(data: Mapping[str, Any]) -> str:
    """The text of :meth:`Verdict.to_text` from its :meth:`~Verdict.to_dict` form."""
    reasons: Sequence[Mapping[str, str]] = data.get("reasons", [])
    status = data.get("status", "pass")
    numbers = _numbers_text(data)
    if not reasons:
        return f"verdict: pass ({numbers})" if numbers else "verdict: pass"
    head = "FAIL" if status == "fail" else "WARNING"
    lines = [f"{head}: {reasons[0]['message']}; do not trust the numbers above as converged"
             if status == "fail" else f"{head}: {reasons[0]['message']}"]  # fmt: skip
    lines += [f"  {r['level']}: {r['message']}" for r in reasons[1:]]
    if numbers:
        lines.append(f"  ({numbers})")
    return "\n".join(lines)


def verdict_html(data: Mapping[str, Any]) -> str:
    """The box of :meth:`Verdict.to_html` from its :meth:`~Verdict.to_dict` form."""
    status = data.get("status", "pass")
    colour, background = _COLOURS[status], _BACKGROUNDS[status]
    title = {"pass": "Verdict: pass", "warn": "Verdict: warning",
             "fail": "Verdict: FAIL — the chains have not converged"}[status]  # fmt: skip
    if status == "fail" and not any(
        r["check"] in ("rhat",) for r in data.get("reasons", []) if r["level"] == "fail"
    ):
        title = "Verdict: FAIL"
    items = "".join(
        f"<li><b>{html.escape(r['level'])}</b>: {html.escape(r['message'])}</li>"
        for r in data.get("reasons", [])
    )
    numbers = _numbers_text(data)
    return (
        f'<div class="verdict verdict-{status}" style="border-left: 6px solid {colour}; '
        f'background: {background}; padding: 0.6em 1em; margin: 1em 0;">'
        f'<p style="margin: 0; color: {colour}; font-weight: 700; font-size: 1.1em">'
        f"{html.escape(title)}</p>"
        + (f'<ul style="margin: 0.3em 0">{items}</ul>' if items else "")
        + (f'<p style="margin: 0; font-size: 0.9em">{html.escape(numbers)}</p>' if numbers else "")
        + "</div>"
    )
