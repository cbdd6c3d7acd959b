"""Flatness of fSGLD draws against SGD end points on digits, at the same gradient budget.

Every method runs ``chains`` independent chains of the same number of steps (one minibatch
gradient per step, so the same gradient budget) on the embedded digits training split with
the reference MLP (64-128-128-10, 26,122 parameters), batch 64, step size ``lr``, Gaussian
prior of scale 1:

- ``fsgld``: fSGLD at ``T = 1`` with the coupled ``sigma = (T / N)^((1 + eta) / 4)``; the
  diagnostics are taken at ``draws`` kept draws per chain, ``thin`` steps apart, after
  ``burn_in`` steps;
- ``sgld``: SGLD at ``T = 1``, same schedule (the same noise without the perturbation, to
  separate the two);
- ``sgd``: SGD (``T = 0``, the prior as weight decay) for ``burn_in + draws * thin`` steps;
  the diagnostics are taken at the end point of each run.

Chain ``c`` of every method starts from the same initialisation and sees the same minibatch
order (the driver derives both from ``(seed, c)``). The diagnostics are recorded by
:func:`bayesflat.diagnostics.diagnostic_stats` during :func:`bayesflat.sample`, on the
whole training split (``N = 1437``), for the mean NLL (the data term, no prior):

- ``tr H``: Hutchinson with ``probes`` Rademacher probes per point;
- ``lambda_max``: the largest Ritz value of ``lanczos_steps`` Lanczos steps per point; at
  the last point of every chain it is checked against ARPACK's Lanczos (``eigsh``);
- the random-weight-perturbation gap ``E[L(theta + sigma eps)] - L(theta)`` at fSGLD's
  ``sigma`` (the quantity fSGLD smooths, about ``sigma^2 / 2 tr H``).

Standard errors: chains are independent replicates, so a method's standard error is the
standard deviation of its ``chains`` per-chain means over ``sqrt(chains)`` (for SGD, one
point per chain). The Hutchinson error of a single point is reported beside it. Nothing
here is asserted.

Usage::

    python benchmarks/flatness_digits.py           # full run, about 5 minutes on 2 cores
    python benchmarks/flatness_digits.py --quick   # smoke run, seconds; numbers meaningless
    python benchmarks/flatness_digits.py --out DIR # write DIR/flatness_digits.{md,json}
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import bayesflat
from bayesflat import trace as btrace
from bayesflat.data import load_digits_split
from bayesflat.diagnostics import Budget, diagnostic_stats, top_eigenvalues
from bayesflat.models import MLP
from bayesflat.samplers import coupled_sigma

RESULTS_DIR = Path(__file__).resolve().parent / "results"
METHODS = ("fsgld", "sgld", "sgd")
ETA = 0.1


def settings(quick: bool) -> dict[str, Any]:
    """Run lengths and diagnostic budgets (``quick`` shrinks everything)."""
    if quick:
        return dict(chains=2, burn_in=60, draws=2, thin=20, probes=4, lanczos_steps=6,
                    rwp_samples=2, lr=0.05, batch_size=64, seed=0)  # fmt: skip
    return dict(chains=4, burn_in=2000, draws=8, thin=250, probes=20, lanczos_steps=20,
                rwp_samples=8, lr=0.05, batch_size=64, seed=0)  # fmt: skip


def _chain_stats(values: np.ndarray) -> tuple[float, float]:
    """Mean over all points and the standard error from the per-chain means."""
    chain_means = values.mean(axis=1)
    if chain_means.size < 2:
        return float(values.mean()), math.nan
    return float(chain_means.mean()), float(chain_means.std(ddof=1) / math.sqrt(chain_means.size))


def run_method(method: str, cfg: dict[str, Any], digits: Any, sigma: float) -> dict[str, Any]:
    """Sample or optimise with ``method``, recording the flatness diagnostics."""
    x, y = digits.x_train, digits.y_train
    budget = Budget(
        subsample=None,
        hutchinson_probes=cfg["probes"],
        lanczos_steps=cfg["lanczos_steps"],
        rwp_samples=cfg["rwp_samples"],
        rwp_sigma=sigma,
    )
    fns = diagnostic_stats(
        ("hessian_trace", "top_eigenvalue", "rwp_gap"), data=(x, y), budget=budget, seed=1
    )
    steps = cfg["burn_in"] + cfg["draws"] * cfg["thin"]
    if method == "sgd":
        schedule = dict(burn_in=steps - 1, draws=1, thin=1)
    else:
        schedule = dict(burn_in=cfg["burn_in"], draws=cfg["draws"], thin=cfg["thin"])
    extra = {"eta": ETA} if method == "fsgld" else {}
    torch.manual_seed(0)
    t0 = time.perf_counter()
    trace = bayesflat.sample(
        MLP(),
        (x, y),
        sampler=method,
        chains=cfg["chains"],
        batch_size=cfg["batch_size"],
        lr=cfg["lr"],
        temperature=0.0 if method == "sgd" else 1.0,
        prior=1.0,
        init="reset",
        seed=cfg["seed"],
        progress=False,
        eval_sets={"test": (digits.x_test, digits.y_test), "train": (x, y)},
        stats_fns=fns,
        **schedule,
        **extra,
    )
    wall = time.perf_counter() - t0
    groups = btrace.groups(trace)
    stats = groups["sample_stats"]
    out: dict[str, Any] = {"steps_per_chain": steps, "wall_seconds": wall}
    out["points_per_chain"] = int(stats["hessian_trace"].shape[1])
    for name in ("hessian_trace", "top_eigenvalue", "rwp_gap"):
        values = stats[name].transpose("chain", "draw").values
        mean, se = _chain_stats(values)
        out[name] = {"mean": mean, "stderr": se, "per_chain": values.mean(axis=1).tolist()}
    out["hutchinson_stderr_per_point"] = float(stats["hessian_trace_stderr"].values.mean())
    out["hvps_per_point"] = float(stats["diagnostic_hvps"].values.mean())

    labels = {s: groups["observed_data"][s].values.astype(int) for s in ("train", "test")}
    for split in ("train", "test"):
        probs = groups["predictions"][split].transpose("chain", "draw", ...).values
        p_true = probs[..., np.arange(labels[split].size), labels[split]].astype(np.float64)
        nll_points = -np.log(np.maximum(p_true, 1e-30)).mean(axis=-1)
        mean, se = _chain_stats(nll_points)
        out[f"{split}_nll_per_point"] = {"mean": mean, "stderr": se}
    test_probs = groups["predictions"]["test"].values.reshape(-1, *labels["test"].shape, 10)
    bma = test_probs.astype(np.float64).mean(axis=0)
    out["test_bma_accuracy"] = float(np.mean(bma.argmax(axis=1) == labels["test"]))
    out["test_bma_nll"] = float(
        -np.mean(np.log(np.maximum(bma[np.arange(labels["test"].size), labels["test"]], 1e-30)))
    )
    out["lanczos_check"] = _lanczos_check(trace, stats, x, y)
    return out


def _lanczos_check(trace: Any, stats: Any, x: torch.Tensor, y: torch.Tensor) -> list[dict]:
    """ARPACK's top eigenvalue at the last point of every chain, beside the recorded one."""
    posterior = btrace.groups(trace)["posterior"]
    rows = []
    for c in range(posterior.sizes["chain"]):
        model = MLP()
        state = {
            k: torch.from_numpy(np.asarray(posterior[k].values[c, -1])) for k in model.state_dict()
        }
        model.load_state_dict(state)
        exact = top_eigenvalues(model, (x, y), k=1, tol=1e-3, seed=c)
        rows.append(
            {
                "chain": c,
                "recorded": float(stats["top_eigenvalue"].values[c, -1]),
                "eigsh": float(exact.eigenvalues[0]),
                "eigsh_hvps": exact.n_matvecs,
            }
        )
    return rows


def _pm(entry: dict[str, float], digits: int = 3) -> str:
    return f"{entry['mean']:.{digits}g} ± {entry['stderr']:.{max(digits - 1, 1)}g}"


def _ratios(methods: dict[str, Any]) -> list[str]:
    """Ratios of each method's means to SGD's, with delta-method standard errors."""
    if "sgd" not in methods:
        return []
    lines = ["Ratio to the SGD end points (± delta-method standard error):", ""]
    for name, r in methods.items():
        if name == "sgd":
            continue
        parts = []
        for key, label in (("hessian_trace", "tr H"), ("top_eigenvalue", "lambda_max")):
            a, b = r[key], methods["sgd"][key]
            ratio = a["mean"] / b["mean"]
            se = abs(ratio) * math.hypot(a["stderr"] / a["mean"], b["stderr"] / b["mean"])
            parts.append(f"{label} {ratio:.3g} ± {se:.2g}")
        lines.append(f"- {name} / sgd: " + ", ".join(parts))
    return lines


def render_markdown(results: dict[str, Any]) -> str:
    """The results as a Markdown page."""
    cfg, m = results["settings"], results["machine"]
    quick = " --quick" if results["quick"] else ""
    lines = [
        "# Flatness at fSGLD draws and at SGD end points (digits MLP)",
        "",
        f"Written by `python benchmarks/flatness_digits.py{quick}` "
        f"on {m['date_utc']} in {results['wall_seconds']:.0f} s "
        f"({m['torch_threads']} torch threads, {m['cpu_count']} CPUs, {m['processor']}).",
        "",
        f"Digits training split (N = {results['num_data']}), MLP 64-128-128-10, batch "
        f"{cfg['batch_size']}, lr {cfg['lr']}, Gaussian prior of scale 1, "
        f"{cfg['chains']} chains per method, {results['steps_per_chain']} steps per chain "
        "(one minibatch gradient per step for every method). "
        f"fSGLD and SGLD at T = 1 ({cfg['draws']} draws per chain, {cfg['thin']} steps apart "
        f"after {cfg['burn_in']} steps of burn-in; fSGLD sigma = (T/N)^((1+eta)/4) = "
        f"{results['sigma']:.4f}, eta = {ETA}); SGD at T = 0, its end point per chain. "
        "Chain c of every method has the same initialisation and minibatch order.",
        "",
        "Curvature of the mean training NLL over all N examples (no prior term), recorded "
        "during sampling by `bayesflat.diagnostics.diagnostic_stats`: tr H by Hutchinson "
        f"({cfg['probes']} Rademacher probes per point), lambda_max as the top Ritz value of "
        f"{cfg['lanczos_steps']} Lanczos steps, RWP gap = E[L(theta + sigma eps)] - L(theta) "
        f"at sigma = {results['sigma']:.4f} ({cfg['rwp_samples']} antithetic pairs). "
        "Values are means over all points; ± is the standard error from the per-chain means "
        "(chains are independent replicates).",
        "",
        "| method | points | tr H | lambda_max | RWP gap (nats) | train NLL | test NLL "
        "(per point) | test accuracy (average) | test NLL (average) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results["methods"].items():
        lines.append(
            f"| {name} | {cfg['chains']} x {r['points_per_chain']} | {_pm(r['hessian_trace'])} "
            f"| {_pm(r['top_eigenvalue'])} | {_pm(r['rwp_gap'])} "
            f"| {_pm(r['train_nll_per_point'])} | {_pm(r['test_nll_per_point'])} "
            f"| {r['test_bma_accuracy']:.4f} | {r['test_bma_nll']:.4f} |"
        )
    lines += ["", *_ratios(results["methods"])]
    lines += [
        "",
        "Per-chain means (chain 0..): ",
        "",
        "| method | tr H | lambda_max |",
        "|---|---|---|",
    ]
    for name, r in results["methods"].items():
        trh = ", ".join(f"{v:.3g}" for v in r["hessian_trace"]["per_chain"])
        lam = ", ".join(f"{v:.3g}" for v in r["top_eigenvalue"]["per_chain"])
        lines.append(f"| {name} | {trh} | {lam} |")
    lines += [
        "",
        "Hutchinson standard error of a single point (mean over points), and the cost of the "
        "recorded diagnostics:",
        "",
        "| method | Hutchinson s.e. per point | HVPs per point | wall time (s) |",
        "|---|---|---|---|",
    ]
    for name, r in results["methods"].items():
        lines.append(
            f"| {name} | {r['hutchinson_stderr_per_point']:.3g} | {r['hvps_per_point']:.0f} "
            f"| {r['wall_seconds']:.0f} |"
        )
    lines += [
        "",
        f"Check of the {cfg['lanczos_steps']}-step Lanczos top eigenvalue against ARPACK "
        "(`eigsh`, tol 1e-3) at the last point of every chain:",
        "",
        "| method | chain | recorded | eigsh | eigsh HVPs |",
        "|---|---|---|---|---|",
    ]
    for name, r in results["methods"].items():
        for row in r["lanczos_check"]:
            lines.append(
                f"| {name} | {row['chain']} | {row['recorded']:.4g} | {row['eigsh']:.4g} "
                f"| {row['eigsh_hvps']} |"
            )
    lines.append("")
    if results["quick"]:
        lines += ["Quick run: the numbers are meaningless.", ""]
    return "\n".join(lines)


def run(out_dir: Path, *, quick: bool = False, threads: int | None = None) -> dict[str, Any]:
    """Run every method, write ``flatness_digits.md`` and ``.json`` to ``out_dir``."""
    if threads is not None:
        torch.set_num_threads(threads)
    cfg = settings(quick)
    digits = load_digits_split()
    sigma = coupled_sigma(1.0, digits.num_train, ETA)
    t0 = time.perf_counter()
    methods = {}
    for method in METHODS:
        methods[method] = run_method(method, cfg, digits, sigma)
        print(f"{method}: {methods[method]['wall_seconds']:.0f} s", flush=True)
    results = {
        "quick": quick,
        "settings": cfg,
        "num_data": digits.num_train,
        "sigma": sigma,
        "steps_per_chain": cfg["burn_in"] + cfg["draws"] * cfg["thin"],
        "methods": methods,
        "wall_seconds": time.perf_counter() - t0,
        "machine": {
            "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M"),
            "torch": torch.__version__,
            "bayesflat": bayesflat.__version__,
            "torch_threads": torch.get_num_threads(),
            "cpu_count": __import__("os").cpu_count(),
            "processor": platform.processor() or platform.machine(),
        },
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "flatness_digits.json").write_text(json.dumps(results, indent=1) + "\n")
    (out_dir / "flatness_digits.md").write_text(render_markdown(results))
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run, seconds")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="output folder")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args(argv)
    results = run(args.out, quick=args.quick, threads=args.threads)
    print(render_markdown(results))


if __name__ == "__main__":
    main()
