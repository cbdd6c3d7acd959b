"""The diagnose table of a trace: convergence, temperatures and flatness, with verdicts.

:func:`diagnose` reads a trace and returns a :class:`Diagnosis`, a list of rows in three
sections, each row with a ``"pass"`` / ``"warn"`` verdict and the rule that gave it:

``convergence``
    :func:`~bayesflat.diagnostics.convergence.convergence_table` on the scalar functionals
    of the trace (potential, test NLL, true-class probabilities, weight projections):
    pass when R-hat ``< rhat`` and bulk and tail ESS ``>= ess_per_chain * chains``.
``temperature``
    ``configurational``: :math:`\\hat T_\\mathrm{conf} = N \\langle \\theta \\cdot \\nabla L
    \\rangle / d` from the ``theta_dot_grad`` and ``theta_dot_grad_dim`` statistics that
    :func:`~bayesflat.diagnostics.recording.diagnostic_stats` records
    (:func:`~bayesflat.diagnostics.convergence.configurational_temperature`);
    ``kinetic``: the mean of a ``kinetic_temperature`` statistic, which SGHMC-like samplers
    record per draw. Both with a batch-means MCSE; pass when
    :math:`|\\hat T - T| \\le z \\cdot \\mathrm{MCSE} + r\\,T` (``temperature_z`` = z,
    ``temperature_rel`` = r: the discretisation bias tolerated, relative to ``T``). A
    correct sampler at stationarity has both equal to the target ``T``. fSGLD targets
    ``exp(-N v / T)`` with the smoothed potential ``v = E_eps[L(theta + sigma eps)]``, for
    which ``N <theta . grad v> / d = T``; its ``T_conf`` of ``L`` departs from ``T`` by
    about ``-(N sigma^2 / 2d) <theta . grad tr H>``, and a warn there measures the
    smoothing, not an error.
``flatness``
    Each recorded ``hessian_trace``, ``top_eigenvalue`` and ``rwp_gap``: mean over all
    draws, MCSE, R-hat and per-chain means. Pass when every draw is finite and R-hat
    ``< rhat`` (the chains agree on the curvature); for ``top_eigenvalue`` also
    ``lr * lambda_max < lr_curvature``: on a quadratic, discretised Langevin dynamics has
    stationary variance ``T / (N lambda) / (1 - h/2)`` along an eigenvector with
    ``h = lr * lambda``, so ``h = 0.2`` inflates the stiffest direction by 11% and ``h >= 2``
    diverges.

A row whose statistic cannot be computed (too few draws, a NaN) is a ``"warn"``. The same
result renders as text (:meth:`Diagnosis.to_text`), as a JSON-ready dict
(:meth:`Diagnosis.to_dict`) and as an HTML fragment (:meth:`Diagnosis.to_html`,
:func:`diagnostics_section`); :func:`write_diagnostics` writes the latter two next to a
trace file (the ``bayesflat diagnose`` command).
"""

from __future__ import annotations

import html
import json
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bayesflat import _io
from bayesflat.diagnostics.convergence import (
    DEFAULT_THRESHOLDS,
    _batch_means,
    configurational_temperature,
    convergence_table,
)

__all__ = [
    "DIAGNOSE_THRESHOLDS",
    "Diagnosis",
    "DiagnosticRow",
    "diagnose",
    "diagnostics_section",
    "load_trace_path",
    "write_diagnostics",
]

DIAGNOSE_THRESHOLDS: dict[str, float] = {
    **DEFAULT_THRESHOLDS,
    "temperature_z": 3.0,
    "temperature_rel": 0.1,
    "lr_curvature": 0.2,
}
"""Defaults of :func:`diagnose`: ``rhat`` and ``ess_per_chain`` are Vehtari et al. (2021)'s
(see :data:`~bayesflat.diagnostics.convergence.DEFAULT_THRESHOLDS`); ``temperature_z`` and
``temperature_rel`` the temperature rule; ``lr_curvature`` the bound on ``lr * lambda_max``."""

FLATNESS_STATS: tuple[str, ...] = ("hessian_trace", "top_eigenvalue", "rwp_gap")
_UNITS = {
    "hessian_trace": "nats per example per squared parameter unit",
    "top_eigenvalue": "nats per example per squared parameter unit",
    "rwp_gap": "nats per example",
}
SECTIONS = ("convergence", "temperature", "flatness")


@dataclass(frozen=True)
class DiagnosticRow:
    """One line of the diagnose table.

    Attributes
    ----------
    section : str
        ``"convergence"``, ``"temperature"`` or ``"flatness"``.
    name : str
        The functional, temperature or flatness statistic.
    values : dict
        The numbers of the row (keys depend on the section; NaN where not computable).
    verdict : str
        ``"pass"`` or ``"warn"``.
    rule : str
        The rule applied, with its thresholds, and why a ``"warn"`` was given.
    """

    section: str
    name: str
    values: dict[str, Any]
    verdict: str
    rule: str


@dataclass(frozen=True)
class Diagnosis:
    """The diagnose table of a trace: rows, thresholds used and run facts."""

    rows: list[DiagnosticRow]
    thresholds: dict[str, float]
    run: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def section(self, name: str) -> list[DiagnosticRow]:
        """The rows of one section, in table order."""
        return [r for r in self.rows if r.section == name]

    @property
    def counts(self) -> dict[str, int]:
        """Number of ``pass`` and ``warn`` rows."""
        return {v: sum(r.verdict == v for r in self.rows) for v in ("pass", "warn")}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: NaN and infinities become ``None``."""
        return _json_safe(
            {
                "run": self.run,
                "thresholds": self.thresholds,
                "counts": self.counts,
                "sections": {
                    s: [
                        {"name": r.name, **r.values, "verdict": r.verdict, "rule": r.rule}
                        for r in self.section(s)
                    ]
                    for s in SECTIONS
                },
                "notes": self.notes,
            }
        )

    def to_text(self) -> str:
        """The table as plain text, one block per section."""
        run = self.run
        head = (
            f"bayesflat diagnose: {run.get('sampler', '?')}, {run.get('chains', '?')} chains x "
            f"{run.get('draws', '?')} draws, T = {_fmt(run.get('temperature'))}, "
            f"N = {run.get('num_data', '?')}"
        )
        lines = [head, f"{self.counts['pass']} pass, {self.counts['warn']} warn"]
        for section in SECTIONS:
            rows = self.section(section)
            if not rows:
                continue
            columns = _COLUMNS[section]
            table = [["name", *(c for c, _ in columns), "verdict"]]
            table += [
                [r.name, *(_fmt(r.values.get(key)) for _, key in columns), r.verdict] for r in rows
            ]
            widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
            lines += ["", f"{section} ({_section_rule(section, self.thresholds)})"]
            lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True))
                      for row in table]  # fmt: skip
            if section != "convergence":  # its columns already say why
                lines += [f"  {r.name}: {r.rule}" for r in rows if r.verdict == "warn"]
        lines += ["", "thresholds: " + ", ".join(f"{k}={_fmt(v)}" for k, v in
                                                 self.thresholds.items())]  # fmt: skip
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def to_html(self) -> str:
        """An HTML fragment: one ``<section>`` with a table per section (escaped text)."""
        parts = ['<section class="bayesflat-diagnostics">', '<h2 id="diagnostics">Diagnostics</h2>']
        c = self.counts
        parts.append(
            f"<p>{c['pass']} pass, {c['warn']} warn. Thresholds: "
            + ", ".join(
                f"<code>{html.escape(k)}={_fmt(v)}</code>" for k, v in self.thresholds.items()
            )  # fmt: skip
            + ".</p>"
        )
        for section in SECTIONS:
            rows = self.section(section)
            if not rows:
                continue
            columns = _COLUMNS[section]
            parts.append(f"<h3>{section.capitalize()}</h3>")
            parts.append(f"<p>{html.escape(_section_rule(section, self.thresholds))}</p>")
            parts.append('<table class="bayesflat-diagnostics-table">')
            header = "".join(f"<th>{html.escape(h)}</th>" for h, _ in columns)
            parts.append(f"<thead><tr><th>name</th>{header}<th>verdict</th></tr></thead>")
            parts.append("<tbody>")
            for r in rows:
                cells = "".join(f'<td class="num">{_fmt(r.values.get(k))}</td>' for _, k in columns)
                colour = "#1a7f37" if r.verdict == "pass" else "#b35900"
                parts.append(
                    f'<tr class="{r.verdict}"><td>{html.escape(r.name)}</td>{cells}'
                    f'<td style="color:{colour}" title="{html.escape(r.rule)}">'
                    f"{r.verdict}</td></tr>"
                )
            parts.append("</tbody></table>")
        for note in self.notes:
            parts.append(f'<p class="note">{html.escape(note)}</p>')
        parts.append("</section>")
        return "\n".join(parts)


_COLUMNS: dict[str, list[tuple[str, str]]] = {
    "convergence": [("R-hat", "rhat"), ("ESS bulk", "ess_bulk"), ("ESS tail", "ess_tail"),
                    ("MCSE", "mcse_mean")],
    "temperature": [("estimate", "estimate"), ("MCSE", "mcse"), ("target T", "target")],
    "flatness": [("mean", "mean"), ("MCSE", "mcse"), ("R-hat", "rhat"),
                 ("chain means", "chain_means"), ("lr*mean", "lr_times_mean")],
}  # fmt: skip


def _section_rule(section: str, t: Mapping[str, float]) -> str:
    if section == "convergence":
        return (
            f"pass: R-hat < {_fmt(t['rhat'])} and bulk/tail ESS >= {_fmt(t['ess_per_chain'])} "
            "per chain"
        )
    if section == "temperature":
        return (
            f"pass: |estimate - T| <= {_fmt(t['temperature_z'])} MCSE + "
            f"{_fmt(t['temperature_rel'])} T"
        )
    return (
        f"pass: all draws finite and R-hat < {_fmt(t['rhat'])}; top_eigenvalue also "
        f"lr * lambda_max < {_fmt(t['lr_curvature'])}"
    )


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    if isinstance(value, bool | str):
        return str(value)
    if isinstance(value, int | np.integer):
        return str(int(value))
    v = float(value)
    if math.isnan(v):
        return "nan"
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
        return f"{v:.3e}"
    return f"{v:.4g}"


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.ndarray):
        return _json_safe(obj.tolist())
    return obj


def _finite(x: float) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


# ------------------------------------------------------------------------- sections


def _convergence_rows(
    groups: dict[str, Any], t: dict[str, float], notes: list[str], attrs: dict[str, Any]
) -> list[DiagnosticRow]:
    try:
        rows, used = convergence_table(
            groups, thresholds={"rhat": t["rhat"], "ess_per_chain": t["ess_per_chain"]},
            attrs=attrs,
        )  # fmt: skip
    except ValueError as err:
        notes.append(f"no convergence rows: {err}")
        return []
    out = []
    for r in rows:
        problems = []
        if not r.rhat < used["rhat"]:
            problems.append(f"R-hat {_fmt(r.rhat)} not < {_fmt(used['rhat'])}")
        for label, ess in (("bulk", r.ess_bulk), ("tail", r.ess_tail)):
            if not ess >= used["ess"]:
                problems.append(f"{label} ESS {_fmt(ess)} not >= {_fmt(used['ess'])}")
        rule = "; ".join(problems) or (f"R-hat < {_fmt(used['rhat'])}, ESS >= {_fmt(used['ess'])}")
        values = {"rhat": r.rhat, "ess_bulk": r.ess_bulk, "ess_tail": r.ess_tail,
                  "mcse_mean": r.mcse_mean}  # fmt: skip
        out.append(DiagnosticRow("convergence", r.name, values, r.verdict, rule))
    return out


def _temperature_row(
    name: str, estimate: float, mcse: float, target: float | None, t: dict[str, float],
    source: str,
) -> DiagnosticRow:  # fmt: skip
    values = {"estimate": estimate, "mcse": mcse, "target": target}
    if target is None or not _finite(target):
        return DiagnosticRow("temperature", name, values, "warn",
                             f"{source}; the trace records no target temperature")  # fmt: skip
    tol = t["temperature_z"] * mcse + t["temperature_rel"] * target
    ok = _finite(estimate) and _finite(mcse) and abs(estimate - target) <= tol
    values["tolerance"] = tol
    rule = (
        f"{source}; |{_fmt(estimate)} - {_fmt(target)}| = {_fmt(abs(estimate - target))} "
        f"{'<=' if ok else 'not <='} {_fmt(t['temperature_z'])} x {_fmt(mcse)} + "
        f"{_fmt(t['temperature_rel'])} x {_fmt(target)} = {_fmt(tol)}"
    )
    return DiagnosticRow("temperature", name, values, "pass" if ok else "warn", rule)


def _per_draw_estimate(per_draw: np.ndarray) -> tuple[float, float]:
    try:
        est = _batch_means(per_draw, None)
    except ValueError:
        return float(np.mean(per_draw)), math.nan
    return est.estimate, est.mcse


def _temperature_rows(
    stats: Any, run: dict[str, Any], t: dict[str, float], notes: list[str]
) -> list[DiagnosticRow]:
    rows = []
    target = run.get("temperature")
    if "theta_dot_grad" in stats:
        dot = stats["theta_dot_grad"].transpose("chain", "draw").values.astype(np.float64)
        dims = stats["theta_dot_grad_dim"].values if "theta_dot_grad_dim" in stats else None
        num_data = run.get("num_data")
        if dims is None or not np.all(np.isfinite(dims)) or num_data is None:
            notes.append(
                "theta_dot_grad is recorded without theta_dot_grad_dim or num_data; "
                "no configurational temperature"
            )
        else:
            dim = float(np.max(dims))
            source = (
                f"T_conf = N <theta . grad L> / d, N = {num_data}, d = {int(dim)}, {dot.size} draws"
            )
            try:
                # theta . grad L is already summed over the d coordinates: one coordinate
                # holding it, times 1/d, gives the per-coordinate mean the estimator wants
                est = configurational_temperature(
                    dot[..., None], np.full_like(dot[..., None], 1.0 / dim), num_data=num_data
                )
                estimate, mcse = est.estimate, est.mcse
            except ValueError:
                estimate, mcse = float(num_data * np.mean(dot) / dim), math.nan
            rows.append(_temperature_row("configurational", estimate, mcse, target, t, source))
    if "kinetic_temperature" in stats:
        kin = stats["kinetic_temperature"].transpose("chain", "draw").values.astype(np.float64)
        estimate, mcse = _per_draw_estimate(kin)
        source = f"mean of the recorded kinetic_temperature, {kin.size} draws"
        rows.append(_temperature_row("kinetic", estimate, mcse, target, t, source))
    return rows


def _flatness_rows(stats: Any, run: dict[str, Any], t: dict[str, float]) -> list[DiagnosticRow]:
    import arviz as az

    rows = []
    lr = run.get("lr")
    for name in FLATNESS_STATS:
        if name not in stats:
            continue
        values = stats[name].transpose("chain", "draw").values.astype(np.float64)
        finite = bool(np.all(np.isfinite(values)))
        chain_means = values.mean(axis=1).tolist()
        mean = float(values.mean())
        rhat = mcse = math.nan
        if finite and values.shape[1] >= 4:
            ds = az.convert_to_dataset({name: values})
            rhat = float(az.rhat(ds)[name])
            mcse = float(az.mcse(ds, method="mean")[name])
        row_values: dict[str, Any] = {
            "mean": mean, "mcse": mcse, "rhat": rhat, "chain_means": chain_means,
            "units": _UNITS[name],
        }  # fmt: skip
        problems = []
        if not finite:
            problems.append("non-finite draws")
        if not rhat < t["rhat"]:
            problems.append(
                f"R-hat {_fmt(rhat)} not < {_fmt(t['rhat'])}"
                + (" (fewer than 4 draws per chain)" if values.shape[1] < 4 else "")
            )
        if name == "top_eigenvalue" and _finite(lr):
            h = float(lr) * float(np.max(values)) if finite else math.nan
            row_values["lr_times_mean"] = float(lr) * mean
            row_values["lr_times_max"] = h
            if not h < t["lr_curvature"]:
                problems.append(
                    f"lr * max lambda_max = {_fmt(h)} not < {_fmt(t['lr_curvature'])}: "
                    "the step is large for the stiffest direction"
                )
        rule = "; ".join(problems) or "finite, chains agree"
        rows.append(DiagnosticRow("flatness", name, row_values,
                                  "warn" if problems else "pass", rule))  # fmt: skip
    return rows


# ------------------------------------------------------------------------- entry points


def _run_facts(trace: Any, stats: Any) -> dict[str, Any]:
    from bayesflat.trace import trace_attrs

    attrs = trace_attrs(trace)
    run: dict[str, Any] = {k: attrs.get(k) for k in ("sampler", "num_data", "complete")}
    temperature = attrs.get("temperature")
    if not _finite(temperature) and stats is not None and "temperature" in stats:
        temps = np.asarray(stats["temperature"].values, dtype=np.float64)
        temperature = float(temps[0, 0]) if np.all(temps == temps.flat[0]) else None
    run["temperature"] = temperature if _finite(temperature) else None
    lr = attrs.get("lr")
    if not _finite(lr) and stats is not None and "step_size" in stats:
        lr = float(np.max(stats["step_size"].values))
    run["lr"] = lr if _finite(lr) else None
    if stats is not None:
        run["chains"], run["draws"] = int(stats.sizes["chain"]), int(stats.sizes["draw"])
    return run


def diagnose(trace: Any, *, thresholds: Mapping[str, float] | None = None) -> Diagnosis:
    """The diagnose table of a trace.

    Parameters
    ----------
    trace : arviz.InferenceData or xarray.DataTree
        A bayesflat trace (:func:`bayesflat.sample` or :func:`bayesflat.load`).
    thresholds : mapping, optional
        Overrides of :data:`DIAGNOSE_THRESHOLDS` (``rhat``, ``ess_per_chain``,
        ``temperature_z``, ``temperature_rel``, ``lr_curvature``).

    Returns
    -------
    Diagnosis
        Rows in the order convergence, temperature, flatness; the thresholds used; run facts
        (sampler, chains, draws, ``T``, ``N``, ``lr``); notes on what could not be computed.
    """
    from bayesflat.trace import groups

    unknown = set(thresholds or {}) - set(DIAGNOSE_THRESHOLDS)
    if unknown:
        raise ValueError(
            f"unknown thresholds {sorted(unknown)}; known: {sorted(DIAGNOSE_THRESHOLDS)}"
        )
    t = {**DIAGNOSE_THRESHOLDS, **{k: float(v) for k, v in (thresholds or {}).items()}}
    grp = _kept_groups(groups(trace), trace)
    stats = grp.get("sample_stats")
    run = _run_facts(trace, stats)
    notes: list[str] = []
    with warnings.catch_warnings():
        # ArviZ warns on short chains; those rows get "warn" verdicts instead
        warnings.simplefilter("ignore")
        from bayesflat.trace import trace_attrs

        rows = _convergence_rows(grp, t, notes, trace_attrs(trace))
        if stats is not None:
            rows += _temperature_rows(stats, run, t, notes)
            rows += _flatness_rows(stats, run, t)
    if stats is None or not any(n in stats for n in ("theta_dot_grad", "kinetic_temperature")):
        notes.append(
            "no temperature rows: record theta_dot_grad with bayesflat.diagnostics."
            "diagnostic_stats(('configurational_temperature',), ...) during sampling"
        )
    if stats is None or not any(n in stats for n in FLATNESS_STATS):
        notes.append("no flatness rows: no hessian_trace, top_eigenvalue or rwp_gap recorded")
    if run.get("complete") is False:
        notes.append("the trace is partial: sampling stopped early")
    return Diagnosis(rows=rows, thresholds=t, run=run, notes=notes)


def _kept_groups(grp: dict[str, Any], trace: Any) -> dict[str, Any]:
    """The groups cut to what was kept: chains with draws, up to the shortest of them.

    A run that stopped early pads the draws it did not reach with NaN (its ``draws_kept``
    attribute says how many each chain kept); R-hat and ESS are computed on the kept draws.

    Raises
    ------
    ValueError
        If the trace holds no draw at all.
    """
    from bayesflat.trace import trace_attrs

    sampled = {name: data for name, data in grp.items() if {"chain", "draw"} <= set(data.dims)}
    if not sampled:
        raise ValueError(
            "the trace holds no draws (no group with chain and draw dimensions); diagnose a "
            "trace written by bayesflat.sample or bayesflat run"
        )
    kept = trace_attrs(trace).get("draws_kept")
    if kept is None:
        return grp
    kept = [int(k) for k in np.atleast_1d(kept)]
    chains = [c for c, k in enumerate(kept) if k > 0]
    if not chains:
        raise ValueError(
            "the trace holds no kept draw (draws_kept is 0 for every chain): the run stopped "
            "before its first draw; nothing to diagnose"
        )
    draws = min(kept[c] for c in chains)
    cut = {name: data.isel(chain=chains, draw=slice(0, draws)) for name, data in sampled.items()}
    return {**grp, **cut}


def diagnostics_section(trace: Any, *, thresholds: Mapping[str, float] | None = None) -> str:
    """The diagnose table of ``trace`` as an HTML fragment for the report.

    One ``<section class="bayesflat-diagnostics">`` element (heading, thresholds, one table
    per section, verdicts coloured and explained in their ``title``); all text escaped.
    """
    return diagnose(trace, thresholds=thresholds).to_html()


def load_trace_path(path: str | Path) -> tuple[Any, Path]:
    """Load a trace given its file, or a run folder holding ``trace.nc``.

    Returns
    -------
    (trace, path of the trace file)

    Raises
    ------
    FileNotFoundError, ValueError
        With a one-line message naming the path, when it does not exist or is not a
        bayesflat trace.
    """
    from bayesflat.trace import load

    path = Path(path)
    if path.is_dir():
        if not (path / "trace.nc").is_file():
            raise FileNotFoundError(
                f"{path} is a folder without trace.nc; give a trace file written by "
                "bayesflat.save or a run folder"
            )
        path = path / "trace.nc"
    try:
        return load(path), path
    except (ValueError, FileNotFoundError) as err:
        raise type(err)(" ".join(str(err).split())) from None


def write_diagnostics(
    path: str | Path, *, thresholds: Mapping[str, float] | None = None
) -> tuple[Diagnosis, Path, Path]:
    """Diagnose the trace at ``path``; write ``diagnostics.json`` and ``diagnostics.html``.

    Both files go to the folder of the trace file. ``diagnostics.json`` holds
    :meth:`Diagnosis.to_dict` (with ``trace``: the trace file's name), ``diagnostics.html``
    the fragment of :meth:`Diagnosis.to_html`.

    Returns
    -------
    (Diagnosis, json path, html path)
    """
    trace, trace_path = load_trace_path(path)
    result = diagnose(trace, thresholds=thresholds)
    folder = trace_path.parent
    json_path, html_path = folder / "diagnostics.json", folder / "diagnostics.html"
    payload = {"trace": trace_path.name, **result.to_dict()}
    _io.write_text(json_path, json.dumps(payload, indent=2, allow_nan=False) + "\n")
    _io.write_text(html_path, result.to_html() + "\n")
    return result, json_path, html_path
