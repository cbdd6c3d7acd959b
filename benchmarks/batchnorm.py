"""BatchNorm running statistics under weight perturbation: which statistics should a draw use?

fSGLD (and RWP, NSO, SAM's second pass) evaluate the network at weights other than the
current ``theta``. In training mode a BatchNorm layer normalises with the batch statistics, so
the chain itself does not depend on the running statistics; they matter only for the
predictions of the kept draws (evaluation mode). The policies compared:

- ``perturbed``: every forward pass updates the running statistics, including those at
  ``theta + sigma eps`` (``num_perturbations`` updates per step, none at ``theta``);
- ``clean_step``: passes away from ``theta`` leave them alone
  (:meth:`~bayesflat.samplers.base.GradientEstimator.away_from_theta`), and one forward pass
  at the new ``theta`` on the step's minibatch (no backward) updates them once per step;
- ``recompute``: passes away from ``theta`` leave them alone, and the statistics of every
  kept draw are recomputed at its weights from one pass over the training split
  (:func:`torch.optim.swa_utils.update_bn`, a cumulative average, as SWA does).

The three runs of a seed share the initialisation, the minibatch order and every random draw,
and the weights do not depend on the running statistics, so the chains are identical (checked)
and the differences between policies are paired: they come from the statistics alone.

Setup: the reference CNN with BatchNorm (``SmallCNN(batch_norm=True)``, width 16) on digits
(train/validation/test split with ``val_size=0.2``), fSGLD at ``T = 1`` with the coupled
``sigma`` and a Gaussian prior ``N(0, prior_sd^2)``, batch 64; the Bayesian model average of
the kept draws is scored on the validation split (NLL, 15-bin ECE, accuracy). The cost is
the wall time per chain and the forward passes added per chain.

Standard errors: seeds are independent replicates; a paired difference is reported as its
mean over seeds with the standard error ``sd / sqrt(seeds)``.

Usage::

    python benchmarks/batchnorm.py            # full run, about 4 minutes on one core
    python benchmarks/batchnorm.py --quick    # smoke run, seconds; numbers meaningless
    python benchmarks/batchnorm.py --out DIR  # write DIR/batchnorm.{md,json}
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
from torch.optim.swa_utils import update_bn

from bayesflat import metrics
from bayesflat.data import load_digits_split
from bayesflat.models import SmallCNN
from bayesflat.samplers import FSGLD, coupled_sigma
from bayesflat.target.torch import GaussianPrior, Posterior

RESULTS_DIR = Path(__file__).resolve().parent / "results"
POLICIES = ("perturbed", "clean_step", "recompute")


def run_chain(
    policy: str,
    seed: int,
    *,
    num_perturbations: int,
    burn_in: int,
    draws: int,
    thin: int,
    lr: float,
    prior_sd: float,
    batch_size: int,
) -> dict[str, Any]:
    """One fSGLD chain under ``policy``; the BMA of its kept draws on the validation split."""
    data = load_digits_split(val_size=0.2, flatten=False)
    x, y = data.x_train, data.y_train
    n = len(y)
    torch.manual_seed(seed)
    model = SmallCNN(batch_norm=True)
    posterior = Posterior(model, num_data=n, temperature=1.0, prior=GaussianPrior(prior_sd))
    sampler = FSGLD(
        model.parameters(), lr=lr, num_data=n, temperature=1.0,
        num_perturbations=num_perturbations, generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip
    if policy != "perturbed":
        sampler.watch(model)
    order = torch.Generator().manual_seed(10_000 + seed)
    train_batches = [(x[i : i + 256],) for i in range(0, n, 256)]
    probs = torch.zeros(len(data.y_val), 10, dtype=torch.float64)
    extra_forwards = 0
    kept = 0
    start = time.process_time()
    step = 0
    while kept < draws:
        perm = torch.randperm(n, generator=order)
        for i in range(0, n - batch_size + 1, batch_size):
            idx = perm[i : i + batch_size]
            xb, yb = x[idx], y[idx]
            sampler.step(posterior.closure(xb, yb))
            if policy == "clean_step":
                with torch.no_grad():
                    model(xb)
                extra_forwards += len(idx)
            step += 1
            if step > burn_in and (step - burn_in) % thin == 0 and kept < draws:
                if policy == "recompute":
                    update_bn(train_batches, model)
                    extra_forwards += n
                model.eval()
                with torch.no_grad():
                    probs += torch.softmax(model(data.x_val).double(), dim=-1)
                model.train()
                kept += 1
    seconds = time.process_time() - start
    bma = (probs / draws).numpy()
    labels = data.y_val.numpy()
    weights = torch.cat([p.detach().flatten() for p in model.parameters()])
    return {
        "nll": metrics.nll(bma, labels),
        "ece": metrics.ece(bma, labels),
        "accuracy": metrics.accuracy(bma, labels),
        "cpu_seconds": seconds,
        "steps": step,
        "extra_forward_examples": extra_forwards,
        "sigma": coupled_sigma(1.0, n),
        "final_weights": weights,
    }


def paired(
    results: dict[str, list[dict[str, Any]]], key: str, a: str, b: str
) -> tuple[float, float]:
    """Mean over seeds of ``b - a`` and its standard error ``sd / sqrt(seeds)``."""
    d = np.array([rb[key] - ra[key] for ra, rb in zip(results[a], results[b], strict=True)])
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else math.nan
    return float(d.mean()), se


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny budget (smoke test)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="write batchnorm.{md,json} here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    budget = (
        {"burn_in": 20, "draws": 3, "thin": 5}
        if args.quick
        else {"burn_in": 600, "draws": 30, "thin": 20}
    )
    settings = {"lr": 0.05, "prior_sd": 1.0, "batch_size": 64, **budget}
    seeds = 2 if args.quick else args.seeds
    table: dict[str, Any] = {}
    for m in (1, 2):
        results: dict[str, list[dict[str, Any]]] = {p: [] for p in POLICIES}
        for seed in range(seeds):
            for policy in POLICIES:
                r = run_chain(policy, seed, num_perturbations=m, **settings)
                results[policy].append(r)
                print(
                    f"n={m} seed={seed} {policy:10s} nll={r['nll']:.4f} ece={r['ece']:.4f} "
                    f"acc={r['accuracy']:.4f} cpu={r['cpu_seconds']:.1f}s",
                    flush=True,
                )
            same = all(
                torch.equal(
                    results[p][-1]["final_weights"], results["perturbed"][-1]["final_weights"]
                )
                for p in POLICIES
            )
            if not same:
                raise RuntimeError(
                    "the policies changed the chain: they must only touch statistics"
                )
        entry: dict[str, Any] = {"per_seed": {}, "mean": {}, "paired_vs_perturbed": {}}
        for p in POLICIES:
            entry["per_seed"][p] = [
                {k: v for k, v in r.items() if k != "final_weights"} for r in results[p]
            ]
            entry["mean"][p] = {
                k: float(np.mean([r[k] for r in results[p]]))
                for k in ("nll", "ece", "accuracy", "cpu_seconds", "extra_forward_examples")
            }
            if p != "perturbed":
                entry["paired_vs_perturbed"][p] = {
                    k: paired(results, k, "perturbed", p) for k in ("nll", "ece", "accuracy")
                }
        d_nll, se_nll = paired(results, "nll", "clean_step", "recompute")
        d_ece, se_ece = paired(results, "ece", "clean_step", "recompute")
        entry["recompute_minus_clean_step"] = {"nll": (d_nll, se_nll), "ece": (d_ece, se_ece)}
        entry["steps"] = results["perturbed"][0]["steps"]
        entry["sigma"] = results["perturbed"][0]["sigma"]
        table[f"num_perturbations={m}"] = entry
    out = {
        "settings": {**settings, "seeds": seeds, "model": "SmallCNN(batch_norm=True)",
                     "sampler": "fsgld", "temperature": 1.0, "split": "validation"},
        "results": table,
        "machine": platform.platform(),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
    }  # fmt: skip
    text = render(out)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "batchnorm.json").write_text(json.dumps(out, indent=2) + "\n")
        (args.out / "batchnorm.md").write_text(text)


def render(out: dict[str, Any]) -> str:
    """Markdown tables of the means and the paired differences."""
    s = out["settings"]
    lines = [
        "# BatchNorm statistics under weight perturbation (fSGLD, digits, validation split)",
        "",
        f"SmallCNN with BatchNorm, fSGLD T = 1, coupled sigma, prior N(0, {s['prior_sd']}^2), "
        f"lr {s['lr']}, batch {s['batch_size']}, burn-in {s['burn_in']}, {s['draws']} draws "
        f"thinned by {s['thin']}, {s['seeds']} seeds. Generated by `benchmarks/batchnorm.py`.",
        "",
    ]
    for name, entry in out["results"].items():
        lines += [
            f"## {name} (sigma = {entry['sigma']:.3f}, {entry['steps']} steps)",
            "",
            "| policy | BMA NLL | ECE | accuracy | CPU s / chain | extra forward examples |",
            "|---|---|---|---|---|---|",
        ]
        for p, m in entry["mean"].items():
            lines.append(
                f"| {p} | {m['nll']:.4f} | {m['ece']:.4f} | {m['accuracy']:.4f} | "
                f"{m['cpu_seconds']:.1f} | {m['extra_forward_examples']:.0f} |"
            )
        lines += ["", "Paired differences against `perturbed` (mean +- SE over seeds):", ""]
        for p, d in entry["paired_vs_perturbed"].items():
            cells = ", ".join(f"{k} {v[0]:+.4f} +- {v[1]:.4f}" for k, v in d.items())
            lines.append(f"- {p}: {cells}")
        r = entry["recompute_minus_clean_step"]
        lines.append(
            f"- recompute - clean_step: nll {r['nll'][0]:+.4f} +- {r['nll'][1]:.4f}, "
            f"ece {r['ece'][0]:+.4f} +- {r['ece'][1]:.4f}"
        )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
