"""Acceptance on the embedded default: fSGLD, SGLD and the SGD point estimate on digits.

Data: the embedded digits with a validation split carved from the training data
(``load_digits_split(val_size=VAL_SIZE)``: 1149 train, 288 validation, 360 test images), and
the natural-image-patch OOD set (``ood_sets(data, names=["patches"])``, 360 grey 8x8 patches).
Network: the reference MLP (64-128-128-10), batch 64, Gaussian prior of scale 1.

Methods, all with the same gradient budget of ``BUDGET`` minibatch gradients per chain (one
gradient per step: fSGLD with ``num_perturbations=1`` evaluates one perturbed gradient per
step, like SGLD):

- ``fsgld``: fSGLD at ``T = 1`` with the coupled ``sigma = (T / N)^((1 + eta) / 4)``,
  ``eta = 0.1``; ``BURN_IN`` steps, then ``DRAWS`` draws ``THIN`` steps apart;
- ``sgld``: SGLD at ``T = 1``, same schedule;
- ``sgd``: SGD (``T = 0``, the prior as weight decay). The driver records its chain of
  iterates like draws; the point estimate is the **final iterate of each chain**: the
  ``CHAINS`` chains are ``CHAINS`` independent SGD runs, and every number is the mean over runs
  ± its standard error. Early stopping is a hyperparameter: SGD may stop at any multiple of
  ``SGD_CHECK`` steps within the budget.

Hyperparameters are chosen on the validation split only, never on the test split: for each
method and each step size in ``LR_GRID`` one selection run (``SELECT_CHAINS`` chains, seed
``SELECT_SEED``) is scored by the validation NLL of its prediction (the model average of all
draws for the samplers; for SGD the iterate at each multiple of ``SGD_CHECK`` steps, mean
over runs), and the best setting is rerun with ``CHAINS`` chains and seed ``SEED`` for the
test numbers. A run that diverges scores an infinite NLL.

Test numbers come from :func:`bayesflat.report.build_report`: accuracy, NLL, ECE (15 bins)
and OOD AUROC, each ± its Monte-Carlo error (samplers: bootstrap over chains, 200 replicates;
SGD: standard error over runs), before and after temperature scaling fitted on the
validation split.

Usage::

    python benchmarks/acceptance.py              # full run, a few minutes on 2 cores
    python benchmarks/acceptance.py --quick      # smoke run, under a minute; numbers meaningless
    python benchmarks/acceptance.py --out DIR    # write DIR/acceptance.{md,json}
    python benchmarks/acceptance.py --reports DIR  # also write each final run's HTML report
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import platform
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

VAL_SIZE = 0.2
BUDGET = 3000
BURN_IN = 1000
DRAWS = 100
THIN = 20
CHAINS = 4
SEED = 0
SELECT_CHAINS = 2
SELECT_SEED = 100
LR_GRID = (0.03, 0.1, 0.3, 1.0)
SGD_CHECK = 250
BATCH_SIZE = 64
METHODS = ("fsgld", "sgld", "sgd")
N_BOOT = 200


def _setup(num_threads: int = 1) -> tuple[Any, dict[str, Any]]:
    import torch

    from bayesflat import data as bdata

    torch.set_num_threads(num_threads)
    digits = bdata.load_digits_split(val_size=VAL_SIZE)
    sets: dict[str, Any] = {
        "test": (digits.x_test, digits.y_test),
        "val": (digits.x_val, digits.y_val),
    }
    for name, x in bdata.ood_sets(digits, names=["patches"]).items():
        sets[f"ood_{name}"] = x
    return digits, sets


def _schedule(method: str, budget: int, steps: int | None) -> dict[str, int]:
    """burn_in, draws and thin of a run; SGD records its iterate every checkpoint."""
    if method == "sgd":
        check = SGD_CHECK * budget // BUDGET
        total = budget if steps is None else steps
        return {"burn_in": 0, "draws": total // check, "thin": check}
    return {"burn_in": BURN_IN * budget // BUDGET, "draws": DRAWS, "thin": THIN * budget // BUDGET}


def _sample(job: dict[str, Any]) -> Any:
    import torch

    import bayesflat
    from bayesflat import models, samplers

    digits, sets = _setup()
    torch.manual_seed(job["seed"])
    model = models.build_model("mlp", num_classes=digits.num_classes)
    eval_sets = sets if job["final"] else {"val": sets["val"]}
    return bayesflat.sample(
        model,
        (digits.x_train, digits.y_train),
        sampler=job["method"],
        chains=job["chains"],
        batch_size=BATCH_SIZE,
        eval_sets=eval_sets,
        seed=job["seed"],
        progress=False,
        lr=job["lr"],
        temperature=1.0 if samplers.entry(job["method"]).is_sampler else 0.0,
        prior=1.0,
        init="reset",
        store_logits=job["final"],
        **_schedule(job["method"], job["budget"], job.get("steps")),
    )


def _select(job: dict[str, Any]) -> dict[str, Any]:
    """Validation NLL of one grid point (per SGD checkpoint for SGD)."""
    import numpy as np

    import bayesflat
    from bayesflat import metrics, predictive

    start = time.perf_counter()
    try:
        trace = _sample(job)
    except (bayesflat.SamplingError, ValueError) as err:
        # A chain that diverges before its first draw leaves no partial trace to build: the
        # driver then raises a ValueError while handling the FloatingPointError.
        if isinstance(err, ValueError) and not isinstance(err.__context__, FloatingPointError):
            raise
        return {**job, "val_nll": math.inf, "error": str(err), "seconds": 0.0}
    val = predictive.from_trace(trace, "val")
    result = {**job, "seconds": time.perf_counter() - start}
    if job["method"] != "sgd":
        result["val_nll"] = metrics.nll(val.mean(), val.labels)
        return result
    # Mean over runs of the NLL of the iterate at every checkpoint.
    per_check = [
        float(np.mean([metrics.nll(val.probs[c, d], val.labels) for c in range(val.chains)]))
        for d in range(val.draws)
    ]
    best = int(np.argmin(per_check))
    check = _schedule("sgd", job["budget"], None)["thin"]
    result.update(
        val_nll=per_check[best],
        steps=(best + 1) * check,
        val_nll_by_steps={(d + 1) * check: v for d, v in enumerate(per_check)},
    )
    return result


def _final(job: dict[str, Any]) -> dict[str, Any]:
    """Test report of the chosen setting."""
    from bayesflat import trace as btrace
    from bayesflat.report import build_report

    start = time.perf_counter()
    trace = _sample(job)
    seconds = time.perf_counter() - start
    ensemble = "final" if job["method"] == "sgd" else "bma"
    report = build_report(
        trace, ensemble=ensemble, n_boot=job["n_boot"], figures=bool(job["reports"])
    )
    if job["reports"]:
        folder = Path(job["reports"]) / job["method"]
        report.save(folder)
        btrace.save(trace, folder / "trace.nc")
    return {**job, "summary": report.summary, "seconds": seconds, **_stationarity(trace)}


def _stationarity(trace: Any) -> dict[str, float]:
    """Potential and weight norm over the first and the last quarter of the kept draws."""
    import numpy as np

    from bayesflat import trace as btrace

    lp = btrace.get_group(trace, "sample_stats")["lp"].values
    posterior = btrace.get_group(trace, "posterior")
    squares = [
        (posterior[v].values.astype(np.float64).reshape(*lp.shape, -1) ** 2).sum(axis=-1)
        for v in posterior.data_vars
    ]
    norm = np.sqrt(np.sum(squares, axis=0))
    quarter = max(1, lp.shape[1] // 4)
    return {
        "lp_first": float(lp[:, :quarter].mean()),
        "lp_last": float(lp[:, -quarter:].mean()),
        "norm_first": float(norm[:, :quarter].mean()),
        "norm_last": float(norm[:, -quarter:].mean()),
        "num_weights": int(sum(np.prod(posterior[v].shape[2:]) for v in posterior.data_vars)),
    }


def _fmt(entry: dict[str, Any] | None, digits: int = 4) -> str:
    from bayesflat.predictive import Estimate

    if entry is None or entry["value"] is None:
        return "n/a"
    return Estimate(entry["value"], entry["mc_error"]).format(digits)


def _markdown(selection: list[dict[str, Any]], finals: list[dict[str, Any]], meta: dict) -> str:
    lines = [
        "# Acceptance: fSGLD vs SGLD vs the SGD point estimate on digits",
        "",
        f"Generated by `python benchmarks/acceptance.py` ({meta['wall_s']:.0f} s wall on "
        f"{meta['cpus']} CPUs, torch {meta['torch']}, {meta['platform']}).",
        "",
        "Digits split `load_digits_split(val_size=0.2)`: 1149 train, 288 validation, 360 test; "
        "OOD set: 360 natural-image patches (`ood_patches`). MLP 64-128-128-10, batch 64, "
        "Gaussian prior of scale 1. Same gradient budget for every method: "
        f"{meta['budget']} minibatch gradients per chain (one gradient per step for all three; "
        f"samplers: {meta['burn_in']} burn-in steps, then {meta['draws']} draws every "
        f"{meta['thin']} steps; SGD may stop earlier, see below).",
        "",
        "## Test numbers (hyperparameters chosen on the validation split)",
        "",
        "Value ± Monte-Carlo error. fSGLD and SGLD: Bayesian model average of all "
        f"{meta['chains']} x {meta['draws']} draws, error from the bootstrap over the "
        f"{meta['chains']} chains ({meta['n_boot']} replicates). SGD: point estimate = the "
        f"**final iterate of each of {meta['chains']} independent runs**; the number is the mean "
        "over runs ± its standard error. AUROC: test (negative) vs natural-image patches "
        "(positive), predictive-entropy score.",
        "",
        "| method | lr | gradients / chain | accuracy | NLL | ECE | AUROC patches |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in finals:
        s = row["summary"]
        m = s["test"]["metrics"]
        auroc = s["ood"]["ood_patches"]["scores"]["entropy"]["auroc"]
        lines.append(
            f"| {row['method']} | {row['lr']:g} | {row['gradients']} | {_fmt(m['accuracy'])} | "
            f"{_fmt(m['nll'])} | {_fmt(m['ece'])} | {_fmt(auroc)} |"
        )
    lines += [
        "",
        "After temperature scaling (T fitted on the validation split, refitted in every "
        "bootstrap replicate / per run), and the AUROC of the other OOD scores:",
        "",
        "| method | T | NLL (scaled) | ECE (scaled) | AUROC max-softmax | AUROC mutual inf. "
        "| AUROC energy | FPR@95 (entropy) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in finals:
        s = row["summary"]
        ts = s["test"]["temperature_scaling"]
        scores = s["ood"]["ood_patches"]["scores"]
        mi = scores.get("mutual_information", {}).get("auroc")
        lines.append(
            f"| {row['method']} | {_fmt(ts['temperature'], 3)} | {_fmt(ts['metrics']['nll'])} | "
            f"{_fmt(ts['metrics']['ece'])} | {_fmt(scores['max_softmax']['auroc'])} | "
            f"{_fmt(mi) if mi else 'n/a (one member per run)'} | "
            f"{_fmt(scores['energy']['auroc'])} | "
            f"{_fmt(scores['entropy']['fpr95'])} |"
        )
    d, n = finals[0]["num_weights"], meta["num_data"]
    lines += [
        "",
        "## Stationarity check",
        "",
        "Mean minibatch potential L_B (sample_stats `lp`, mean-loss units, prior term included) "
        "and weight norm over the first and the last quarter of the kept draws (SGD: of its "
        "recorded iterates). With the Gaussian prior of scale s = 1 the prior term "
        "|θ|²/(2 N s²) of L_B relaxes towards its equilibrium (d T / (2N) = "
        f"{d / (2 * n):.1f} and |θ| ≈ sqrt(d) = {d**0.5:.0f} if none of the d = {d} weights "
        f"were constrained by the N = {n} training images) only over about N s² / lr "
        "Langevin steps; a potential or norm "
        "that still rises between the two quarters means that the chains are still relaxing "
        "in those directions within the budget.",
        "",
        "| method | lp, first quarter | lp, last quarter | norm, first quarter "
        "| norm, last quarter | N s² / lr (steps) |",
        "|---|---|---|---|---|---|",
    ]
    for row in finals:
        relax = "—" if row["method"] == "sgd" else f"{n / row['lr']:.0f}"
        lines.append(
            f"| {row['method']} | {row['lp_first']:.3f} | {row['lp_last']:.3f} | "
            f"{row['norm_first']:.1f} | {row['norm_last']:.1f} | {relax} |"
        )
    lines += [
        "",
        "## Hyperparameter selection (validation split only)",
        "",
        f"Grid: lr in {list(meta['lr_grid'])} for every method; for SGD also the number of "
        f"steps, any multiple of {meta['sgd_check']} up to the budget (early stopping). "
        f"One selection run per grid point: {meta['select_chains']} chains, "
        f"seed {meta['select_seed']}; "
        "score: validation NLL (samplers: of the model average of all draws; SGD: of the "
        "iterate, mean over runs). The lowest score wins; the winner is rerun with "
        f"{meta['chains']} chains and seed {meta['seed']} for the test numbers above.",
        "",
        "| method | lr | validation NLL | chosen SGD steps | note |",
        "|---|---|---|---|---|",
    ]
    chosen = {(r["method"], r["lr"]) for r in finals}
    for row in selection:
        mark = "**chosen**" if (row["method"], row["lr"]) in chosen else ""
        nll = "diverged" if math.isinf(row["val_nll"]) else f"{row['val_nll']:.4f}"
        steps = str(row.get("steps", "")) if row["method"] == "sgd" else ""
        lines.append(f"| {row['method']} | {row['lr']:g} | {nll} | {steps} | {mark} |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny budget, numbers meaningless")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--reports", type=Path, default=None, help="write HTML reports here")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args(argv)
    import torch

    budget = 300 if args.quick else BUDGET
    n_boot = 20 if args.quick else N_BOOT
    start = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=args.workers, mp_context=context) as pool:
        grid = [
            {"method": m, "lr": lr, "chains": SELECT_CHAINS, "seed": SELECT_SEED,
             "budget": budget, "final": False}
            for m in METHODS for lr in LR_GRID
        ]  # fmt: skip
        selection = list(pool.map(_select, grid))
        for row in selection:
            print(f"select {row['method']:6s} lr={row['lr']:<5g} val NLL {row['val_nll']:.4f}")
        finals_jobs = []
        for method in METHODS:
            best = min((r for r in selection if r["method"] == method), key=lambda r: r["val_nll"])
            if math.isinf(best["val_nll"]):
                raise RuntimeError(f"every {method} run of the grid diverged")
            finals_jobs.append(
                {"method": method, "lr": best["lr"], "chains": CHAINS, "seed": SEED,
                 "budget": budget, "final": True, "steps": best.get("steps"),
                 "n_boot": n_boot, "reports": str(args.reports) if args.reports else ""}
            )  # fmt: skip
        finals = list(pool.map(_final, finals_jobs))
    for row in finals:
        sched = _schedule(row["method"], row["budget"], row.get("steps"))
        row["gradients"] = sched["burn_in"] + sched["draws"] * sched["thin"]
    meta = {
        "wall_s": time.perf_counter() - start,
        "cpus": multiprocessing.cpu_count(),
        "torch": torch.__version__,
        "platform": platform.platform(terse=True),
        "budget": budget,
        "burn_in": _schedule("fsgld", budget, None)["burn_in"],
        "draws": DRAWS,
        "thin": _schedule("fsgld", budget, None)["thin"],
        "chains": CHAINS,
        "seed": SEED,
        "select_chains": SELECT_CHAINS,
        "select_seed": SELECT_SEED,
        "lr_grid": LR_GRID,
        "n_boot": n_boot,
        "sgd_check": _schedule("sgd", budget, None)["thin"],
        "num_data": finals[0]["summary"]["run"]["num_data"],
        "quick": args.quick,
    }
    text = _markdown(selection, finals, meta)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "acceptance.md").write_text(text, encoding="utf-8")
    record = {
        "meta": meta,
        "selection": [
            {k: (None if v == math.inf else v) for k, v in r.items() if k != "reports"}
            for r in selection
        ],
        "final": [
            {
                "method": r["method"],
                "lr": r["lr"],
                "steps": r.get("steps"),
                "gradients": r["gradients"],
                "seconds": r["seconds"],
                **{k: r[k] for k in ("lp_first", "lp_last", "norm_first", "norm_last")},
                "summary": r["summary"],
            }
            for r in finals
        ],  # fmt: skip
    }
    (args.out / "acceptance.json").write_text(
        json.dumps(record, indent=1, default=str, allow_nan=False) + "\n", encoding="utf-8"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
