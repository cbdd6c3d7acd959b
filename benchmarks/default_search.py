"""Search for the default configuration of ``bayesflat run`` (MLP on the embedded digits).

A configuration is kept only if, on the **validation** split (the test split is never read
during the search), its four chains pass every criterion:

- rank-normalised split R-hat <= 1.01 and bulk ESS >= 400 (all chains together) on ``lp``
  and on the per-draw validation NLL (ArviZ's ``az.rhat`` / ``az.ess``);
- the Bayesian model average (BMA) beats the SGD final iterate on validation NLL and on OOD
  AUROC (entropy score, the headline score of the report) against each of two generated
  OOD sets made for validation (``ood_sets(n=144, seed=1)``; the run's own OOD sets use
  ``seed=0``);
- the whole default run fits in 60 s of wall time on 2 cores: its CPU time for the sampling,
  at one torch thread, is recorded here; the end-to-end ``bayesflat run`` is timed on the
  chosen configuration only.

The SGD baseline of a configuration is ``sgd`` (``T = 0``: the prior is its weight decay
``1 / (N s^2)``) with the same step size, prior and number of steps per chain; its final
iterate is scored chain by chain and the metrics averaged over chains. The baseline against
which the BMA must win is the better of that and of SGD at the former defaults (``s = 1``,
``lr = 0.1``, 3000 steps), so that a strong prior cannot win by weakening the baseline.

Axes of the search: sampler (``fsgld``, ``sgld``); prior family and scale (isotropic ``s``,
or He-scaled ``s_l^2 = c / fan_in`` per layer); temperature ``T``; step size; budget
(burn-in, draws, thinning); initialisation: ``reset`` (PyTorch's initialisation), ``prior``
(a draw from the tempered prior ``N(0, T s_j^2)``, the stationary law of every coordinate
the data do not constrain) or ``sgd<K>`` (``K`` SGD steps from ``reset``, discarded with the
burn-in).

Why these axes (the time constants, in steps, of a coordinate the data leave to the prior):
the Langevin update moves such a coordinate as an Ornstein-Uhlenbeck process with mean
relaxation time ``N s^2 / lr`` and stationary variance ``T s^2``; its contribution
``theta^2 / (2 s^2)`` to the potential relaxes twice as fast and fluctuates with variance
``T^2 / 2``. With ``k`` such coordinates ``lp`` carries a slow part of variance
``k T^2 / 2``: hot chains need many relaxation times for ``lp`` to mix, cold chains hide it
under the minibatch noise of ``N mean_B NLL``.

Usage::

    python benchmarks/default_search.py                      # every candidate (validation)
    python benchmarks/default_search.py --only NAME          # one candidate (repeatable)
    python benchmarks/default_search.py --stage final --only NAME   # test numbers, once
    python benchmarks/default_search.py --quick --out DIR    # smoke run, numbers meaningless

Each candidate costs one to two minutes of CPU (its chains and its SGD baseline); the whole
grid about 25 minutes, the final stage about 5 (two end-to-end runs of ``bayesflat run``).

Results go to ``results/default_search.json`` (every row, appended per candidate),
``results/default_search_baseline.json`` (SGD at the former defaults, validation),
``results/default_search_final.json`` (the final stage) and ``results/default_search.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import time
from pathlib import Path
from typing import Any

import arviz as az
import numpy as np
import torch

import bayesflat
from bayesflat import data as bdata
from bayesflat import models
from bayesflat.metrics import accuracy, auroc, ece, entropy_score, nll
from bayesflat.run.spec import ModuleTargetSpec
from bayesflat.target.torch import GaussianPrior, Posterior
from bayesflat.trace import groups

RESULTS_DIR = Path(__file__).resolve().parent / "results"
FINDINGS = """\
## What the table says

- **Chosen: `sgld-T0.1-s0.4-prior-lr0.5-11k`**: SGLD at `T = 0.1`, isotropic prior
  `N(0, 0.4^2)` (weight decay `1 / (N s^2) = 0.0048`), `lr = 0.5`, every chain started from its
  own draw of the tempered prior `N(0, T s^2)`, 1000 burn-in steps then 400 draws 25 steps
  apart (11,000 steps per chain). It meets every validation criterion on root seed 0 and again
  on root seed 1. Its margin on NLL is small (0.173 against 0.178 and 0.184): on 144
  validation digits that difference is within noise, so read it as "as good as SGD on NLL,
  better on OOD AUROC, and converged", not as a clear NLL win. The test numbers below carry
  the paired standard error of the difference.
- **Why the former default failed.** A coordinate the data leave to the prior relaxes with
  time constant `N s^2 / lr` steps: 12,930 at `s = 1`, `lr = 0.1`, four times the old budget.
  Starting from a draw of `N(0, T s^2)` puts every such coordinate at its stationary law from
  step 0 (`*-prior` rows against `reset`); the coordinates the data constrain a little stay
  slow, which is what the R-hat of the squared weight norm shows (not a criterion, reported
  because it is the slowest functional).
- **Why not `T = 1`.** The priors that relax fast enough at `T = 1` (`s <= 0.25`) give a BMA
  worse than SGD on NLL (0.22-0.29 against 0.18), and their `lp` carries a slow part of
  variance `k T^2 / 2` (`k` weakly constrained coordinates) with correlation time
  `N s^2 / (2 lr)` steps: ESS 22 from 400 draws for `sgld-T1-s0.2-prior`. Cold posteriors
  shrink that part by `T^2`, and the wider prior they allow (`s = 0.4`) is what lets the BMA
  reach SGD's NLL.
- **Step size.** `lr = 0.5` against 0.3 at the same prior and budget: relaxation times 40%
  shorter (ESS on `lp` and on the validation NLL both above 400, R-hat 1.002-1.004 on two
  seeds, against 1.003-1.013 and ESS 390-397 at 0.3) at the price of the discretisation bias
  of the stationary law (validation NLL 0.173 against 0.146-0.150). Both beat SGD on OOD.
- **Initialisation** (at the leading configuration of the time, `T = 0.1`, `s = 0.4`,
  `lr = 0.3`, 11,000 steps): from a prior draw, R-hat on `lp` 1.003 and ESS 683; from
  PyTorch's initialisation 1.016 and 283; after 500 SGD steps 1.014 and 249 (squared-norm
  R-hat 1.046, 1.087, 1.103). A warm start puts the well-determined coordinates near a mode
  but leaves the weakly determined ones far from their stationary spread, which is what `lp`
  and the norm see; the predictions hardly differ (validation NLL 0.146-0.148).
- **Sampler** (same setting): fSGLD reaches the best validation NLL of the search (0.134) but
  its per-draw NLL mixes slowly (R-hat 1.042, ESS 77 from 1600 draws), and it costs 1.3-1.5x
  SGLD per step on this MLP (CPU 58 s against 44 s for the same steps). SGLD is the default
  sampler; fSGLD remains one option away (`--sampler fsgld`).
- Seeds: every row is root seed 0 unless its name ends in `-seed1`. Rounds 1-2 took the
  same-prior SGD baseline as the mean of 4 runs, later rounds of 2 runs (the baseline is a
  mean over runs, not an ensemble). Rows of rounds 1-3 drew their prior initialisation from
  the script's own generator (seed `10007 + init seed`, same law); later rows use
  `bayesflat.sample(init="prior")`, as the default run does.
"""
"""What the table says, written after the search (rendered under the table)."""

VERDICT = """\
**Verdict, honestly.** On the test split the chosen default converges (R-hat 1.002 on `lp`
and 1.000 on the per-draw test NLL, bulk ESS 463 and 1036) and its BMA beats both SGD
baselines on OOD AUROC and SGD with the same prior on NLL (-0.022 ± 0.012), but **not** SGD
at the former defaults on test NLL (0.155 against 0.138; difference +0.017 ± 0.025, within
noise), and its ECE is higher (0.078 against 0.022-0.041; the direction of the
miscalibration was not measured). The wall-time criterion is **not met as the command stands**:
the whole `bayesflat run` (weights stored, `theta . grad L` recorded at each of the 1600 draws,
report with figures) costs 107-118 s of CPU, of which the sampling itself is about 53 s; with
`--workers 1` (the command's default) that is at least 118 s of wall time, and with
`--workers 2` on 2 idle cores about 55-60 s at best (an estimate from the CPU time;
measured here: 111 s on a machine with a load average of 6.6 on 2 cores). No
configuration of the search meets every criterion on both splits within the time limit;
this one meets every convergence criterion, and every validation criterion on two seeds."""
"""The test-split verdict, written after the final stage (rendered under its numbers)."""
VAL_OOD_SEED = 1


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One configuration of the default run."""

    name: str
    sampler: str = "fsgld"
    prior: str = "iso"  # "iso": isotropic scale; "he": s_l^2 = scale / fan_in
    scale: float = 0.2
    temperature: float = 1.0
    lr: float = 0.1
    burn_in: int = 1000
    draws: int = 100
    thin: int = 20
    init: str = "reset"  # "reset", "prior" or "sgd<K>"
    chains: int = 4
    batch_size: int = 64
    seed: int = 0

    @property
    def steps(self) -> int:
        return self.burn_in + self.draws * self.thin


def make_prior(c: Candidate, model: torch.nn.Module) -> GaussianPrior:
    """Isotropic ``N(0, s^2 I)`` or He-scaled ``N(0, c / fan_in)`` per layer (bias included)."""
    if c.prior == "iso":
        return GaussianPrior(scale=c.scale)
    if c.prior != "he":
        raise ValueError(f"prior must be 'iso' or 'he', got {c.prior!r}")
    scales = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            scales[f"{name}."] = math.sqrt(c.scale / module.in_features)
    return GaussianPrior(scale=1.0, scales=scales)


@dataclasses.dataclass(frozen=True)
class WarmStartTargetSpec(ModuleTargetSpec):
    """A module target whose chains start after ``K`` SGD steps (``start = "sgd<K>"``).

    SGD (``T = 0``, the prior as weight decay, step ``warm_lr``, batch ``warm_batch``) runs from
    the reset weights on ``warm_data``, minibatches drawn by a generator seeded by the chain's
    init seed; the steps are not part of the chain (they are burn-in before the burn-in).
    """

    start: str = "sgd500"
    warm_data: Any = None
    warm_lr: float = 0.1
    warm_batch: int = 64

    def build(self, init_seed: int, device: torch.device) -> Posterior:
        key = (init_seed, str(device))
        cache = self.__dict__.setdefault("_cache", {})
        if key not in cache:
            cache[key] = self._warm(super().build(init_seed, device), init_seed)
        fresh = super().build(init_seed, device)
        fresh.model.load_state_dict(cache[key].model.state_dict())
        return fresh

    def _warm(self, target: Posterior, init_seed: int) -> Posterior:
        g = torch.Generator().manual_seed(10_007 + init_seed)
        x, y = self.warm_data
        opt = torch.optim.SGD(target.model.parameters(), lr=self.warm_lr)
        for _ in range(int(self.start.removeprefix("sgd"))):
            idx = torch.randint(y.shape[0], (self.warm_batch,), generator=g)
            opt.zero_grad()
            target.closure(x[idx], y[idx])()
            opt.step()
        return target


def load_data() -> dict[str, Any]:
    """The digits split of ``bayesflat run`` and the validation and test evaluation sets."""
    digits = bdata.load_digits_split(val_size=0.1, flatten=True)
    val_sets: dict[str, Any] = {"val": (digits.x_val, digits.y_val)}
    for name, x in bdata.ood_sets(digits, n=len(digits.y_val), seed=VAL_OOD_SEED).items():
        val_sets[f"oodval_{name}"] = x
    test_sets: dict[str, Any] = {"test": (digits.x_test, digits.y_test)}
    for name, x in bdata.ood_sets(digits).items():
        test_sets[f"ood_{name}"] = x
    return {"train": (digits.x_train, digits.y_train), "val": val_sets, "test": test_sets}


def _target(c: Candidate, data: dict[str, Any], temperature: float, init: str) -> Any:
    model = models.build_model("mlp", num_classes=10)
    prior = make_prior(c, model)
    if init in ("reset", "prior"):
        return model, prior
    spec = WarmStartTargetSpec(
        model, "categorical", prior, len(data["train"][1]), temperature, "reset",
        start=init, warm_data=data["train"], warm_lr=c.lr, warm_batch=c.batch_size,
    )  # fmt: skip
    return spec, prior


def run(
    c: Candidate, data: dict[str, Any], sets: dict[str, Any], *, sampler: str | None = None
) -> tuple[Any, float, float]:
    """Sample ``c`` (or its SGD baseline) on ``sets``; trace, CPU seconds, wall seconds."""
    sampler = sampler or c.sampler
    temperature = 0.0 if sampler == "sgd" else c.temperature
    init = c.init if sampler != "sgd" else "reset"
    model, prior = _target(c, data, temperature, init)
    cpu, wall = time.process_time(), time.perf_counter()
    if sampler == "sgd":
        trace = bayesflat.sample(
            model, data["train"], sampler="sgd", chains=c.chains, burn_in=c.steps - 1, draws=1,
            thin=1, lr=c.lr, prior=prior, eval_sets=sets, seed=c.seed, progress=False,
            store_weights=False,
        )  # fmt: skip
    else:
        trace = bayesflat.sample(
            model, data["train"], sampler=sampler, chains=c.chains, burn_in=c.burn_in,
            draws=c.draws, thin=c.thin, lr=c.lr, temperature=temperature, prior=prior,
            eval_sets=sets, seed=c.seed, progress=False, store_weights=False,
            batch_size=c.batch_size, init="prior" if init == "prior" else "reset",
        )  # fmt: skip
    return trace, time.process_time() - cpu, time.perf_counter() - wall


def _probs(trace: Any, name: str) -> np.ndarray:
    p = groups(trace)["predictions"][name]
    return np.asarray(p.transpose("chain", "draw", f"{name}_id", "class").values, np.float64)


def _labels(trace: Any, name: str) -> np.ndarray:
    return np.asarray(groups(trace)["observed_data"][name].values, dtype=int)


def diagnostics(trace: Any, labelled: str) -> dict[str, float]:
    """R-hat and bulk ESS of ``lp``, the per-draw NLL on ``labelled`` and the squared norm."""
    grp = groups(trace)
    probs = _probs(trace, labelled)
    labels = _labels(trace, labelled)
    picked = np.take_along_axis(probs, labels[None, None, :, None], axis=-1)[..., 0]
    per_draw_nll = -np.log(np.clip(picked, np.finfo(np.float32).tiny, None)).mean(axis=-1)
    sq_norm = (grp["posterior"]["weight_norm"].transpose("chain", "draw", ...).values ** 2).sum(-1)
    lp = grp["sample_stats"]["lp"].transpose("chain", "draw").values
    arrays = {"lp": lp, "nll": per_draw_nll, "sqnorm": sq_norm}
    ds = az.convert_to_dataset({k: np.asarray(v, np.float64) for k, v in arrays.items()})
    rhat, ess = az.rhat(ds), az.ess(ds, method="bulk")
    out: dict[str, float] = {}
    for k in arrays:
        out[f"rhat_{k}"] = float(rhat[k])
        out[f"ess_{k}"] = float(ess[k])
    out["lp_mean"] = float(np.mean(lp))
    return out


def scores(trace: Any, labelled: str, ood: list[str], *, final: bool) -> dict[str, float]:
    """Accuracy, NLL, ECE and entropy AUROC per OOD set, of the BMA or the final iterates.

    ``final``: each chain's last draw is one point estimate; the metrics are averaged over
    chains (one SGD run's expected score).
    """
    probs = _probs(trace, labelled)
    labels = _labels(trace, labelled)
    oods = {name: _probs(trace, name) for name in ood}
    members = (
        [probs[c, -1:] for c in range(probs.shape[0])]
        if final
        else [probs.reshape(-1, *probs.shape[2:])]
    )
    out: dict[str, list[float]] = {}
    for k, m in enumerate(members):
        p = m.mean(axis=0)
        row = {"acc": accuracy(p, labels), "nll": nll(p, labels), "ece": ece(p, labels)}
        s_in = entropy_score(p)
        for name, q in oods.items():
            q_m = q[k, -1:] if final else q.reshape(-1, *q.shape[2:])
            row[f"auroc_{name}"] = auroc(s_in, entropy_score(q_m.mean(axis=0)))
        for key, v in row.items():
            out.setdefault(key, []).append(float(v))
    return {k: float(np.mean(v)) for k, v in out.items()}


def evaluate(c: Candidate, data: dict[str, Any], baseline: dict[str, float]) -> dict[str, Any]:
    """Every number of one candidate on the validation split, and its verdict."""
    sets = data["val"]
    ood = [k for k in sets if k.startswith("oodval_")]
    row: dict[str, Any] = {"candidate": dataclasses.asdict(c)}
    try:
        trace, cpu, wall = run(c, data, sets)
    except bayesflat.SamplingError as err:
        return {**row, "diverged": str(err), "passes": False}
    row.update(cpu_s=cpu, wall_s=wall)
    row.update(diagnostics(trace, "val"))
    row["bma"] = scores(trace, "val", ood, final=False)
    # two SGD runs: its score is a mean over runs, not an ensemble
    sgd_trace, sgd_cpu, _ = run(dataclasses.replace(c, chains=2), data, sets, sampler="sgd")
    row["sgd_same"] = scores(sgd_trace, "val", ood, final=True)
    row["sgd_cpu_s"] = sgd_cpu
    best = {
        k: (min if k in ("nll", "ece") else max)(row["sgd_same"][k], baseline[k])
        for k in row["sgd_same"]
    }
    row["sgd_best"] = best
    checks = {
        "rhat_lp": row["rhat_lp"] <= 1.01,
        "rhat_nll": row["rhat_nll"] <= 1.01,
        "ess_lp": row["ess_lp"] >= 400,
        "ess_nll": row["ess_nll"] >= 400,
        "nll_vs_sgd": row["bma"]["nll"] < best["nll"],
        **{f"{k}_vs_sgd": row["bma"][k] > best[k] for k in best if k.startswith("auroc_")},
    }
    row["checks"] = checks
    row["passes"] = all(checks.values())
    return row


def old_default_sgd(data: dict[str, Any], sets: dict[str, Any], labelled: str) -> dict[str, Any]:
    """SGD at the former defaults: prior scale 1 (weight decay 1/N), lr 0.1, 3000 steps."""
    c = Candidate("sgd-old-defaults", sampler="sgd", scale=1.0, lr=0.1, burn_in=1000, draws=100)
    trace, cpu, _ = run(c, data, sets, sampler="sgd")
    ood = [k for k in sets if k.startswith("ood")]
    return {**scores(trace, labelled, ood, final=True), "cpu_s": cpu}


# -- candidates -----------------------------------------------------------------------------------


def _grid() -> list[Candidate]:
    c = Candidate
    return [
        # round 1: the configuration the former default was closest with, its initialisation,
        # and cold posteriors with the SGD baseline's own weight decay from a tempered prior draw
        c("fsgld-T1-s0.2", "fsgld", scale=0.2, temperature=1.0, lr=0.1),
        c("fsgld-T1-s0.2-prior", "fsgld", scale=0.2, temperature=1.0, lr=0.1, init="prior"),
        c("sgld-T1-s0.2-prior", "sgld", scale=0.2, temperature=1.0, lr=0.1, init="prior"),
        c("sgld-T0.1-s1-prior", "sgld", scale=1.0, temperature=0.1, lr=0.1, init="prior"),
        c("sgld-T0.03-s1-prior", "sgld", scale=1.0, temperature=0.03, lr=0.1, init="prior"),
        c("fsgld-T0.03-s1-prior", "fsgld", scale=1.0, temperature=0.03, lr=0.1, init="prior"),
        # round 2: relaxation time N s^2 / lr of at most a few hundred steps (larger steps,
        # smaller or layer-scaled priors), budgets of 6000 steps per chain
        c("sgld-T1-s0.2-prior-lr0.3", "sgld", scale=0.2, temperature=1.0, lr=0.3,
          init="prior", draws=200, thin=25),
        c("sgld-T1-s0.25-prior-lr0.3", "sgld", scale=0.25, temperature=1.0, lr=0.3,
          init="prior", draws=200, thin=25),
        c("sgld-T0.3-s0.3-prior-lr0.3", "sgld", scale=0.3, temperature=0.3, lr=0.3,
          init="prior", draws=200, thin=25),
        # round 3: colder and wider (the BMA needs both to beat SGD), longer chains
        c("sgld-T0.1-s0.3-prior-lr0.3", "sgld", scale=0.3, temperature=0.1, lr=0.3,
          init="prior", draws=300, thin=25),
        c("sgld-T0.2-s0.35-prior-lr0.3", "sgld", scale=0.35, temperature=0.2, lr=0.3,
          init="prior", draws=300, thin=25),
        c("sgld-T0.1-s0.4-prior-lr0.3", "sgld", scale=0.4, temperature=0.1, lr=0.3,
          init="prior", draws=300, thin=25),
        c("sgld-T0.2-s0.35-prior-lr0.5", "sgld", scale=0.35, temperature=0.2, lr=0.5,
          init="prior", draws=300, thin=25),
        c("fsgld-T0.2-s0.35-prior-lr0.3", "fsgld", scale=0.35, temperature=0.2, lr=0.3,
          init="prior", draws=300, thin=25),
        # round 4: the leading configuration with a longer budget and another seed
        c("sgld-T0.1-s0.4-prior-lr0.3-11k", "sgld", scale=0.4, temperature=0.1, lr=0.3,
          init="prior", draws=400, thin=25),
        c("sgld-T0.1-s0.4-prior-lr0.3-11k-seed1", "sgld", scale=0.4, temperature=0.1, lr=0.3,
          init="prior", draws=400, thin=25, seed=1),
        # round 5: larger steps for the slow directions of the leading configuration
        c("sgld-T0.1-s0.4-prior-lr0.5-11k", "sgld", scale=0.4, temperature=0.1, lr=0.5,
          init="prior", draws=400, thin=25),
        c("sgld-T0.1-s0.4-prior-lr0.5-11k-seed1", "sgld", scale=0.4, temperature=0.1, lr=0.5,
          init="prior", draws=400, thin=25, seed=1),
        # the other sampler and initialisations, at the leading configuration
        c("fsgld-T0.1-s0.4-prior-lr0.3-11k", "fsgld", scale=0.4, temperature=0.1, lr=0.3,
          init="prior", draws=400, thin=25),
        c("sgld-T0.1-s0.4-reset-lr0.3-11k", "sgld", scale=0.4, temperature=0.1, lr=0.3,
          init="reset", draws=400, thin=25),
        c("sgld-T0.1-s0.4-sgd500-lr0.3-11k", "sgld", scale=0.4, temperature=0.1, lr=0.3,
          init="sgd500", draws=400, thin=25),
    ]  # fmt: skip


def _quick_grid() -> list[Candidate]:
    return [Candidate("quick", burn_in=20, draws=10, thin=2, chains=2, init="prior")]


def _append(path: Path, row: dict[str, Any]) -> None:
    rows = json.loads(path.read_text()) if path.is_file() else []
    rows = [r for r in rows if r.get("candidate", {}).get("name") != row["candidate"]["name"]]
    rows.append(row)
    path.write_text(json.dumps(rows, indent=1))


def screen(out: Path, names: list[str] | None, quick: bool) -> None:
    data = load_data()
    grid = _quick_grid() if quick else _grid()
    if names:
        grid = [c for c in grid if c.name in names]
    meta_path = out / "default_search_baseline.json"
    if meta_path.is_file() and not quick:
        baseline = json.loads(meta_path.read_text())
    else:
        baseline = old_default_sgd(data, data["val"], "val")
        if not quick:
            meta_path.write_text(json.dumps(baseline, indent=1))
    for c in grid:
        row = evaluate(c, data, baseline)
        _append(out / "default_search.json", row)
        print(_line(row), flush=True)


def _line(row: dict[str, Any]) -> str:
    if "diverged" in row:
        return f"{row['candidate']['name']:<26} diverged: {row['diverged']}"
    b, s = row["bma"], row["sgd_best"]
    return (
        f"{row['candidate']['name']:<26} rhat lp {row['rhat_lp']:.3f} nll {row['rhat_nll']:.3f} "
        f"sqn {row['rhat_sqnorm']:.3f} | ess lp {row['ess_lp']:.0f} nll {row['ess_nll']:.0f} | "
        f"val acc {b['acc']:.3f} nll {b['nll']:.3f} (sgd {s['nll']:.3f}) "
        f"auroc {b['auroc_oodval_patches']:.3f}/{b['auroc_oodval_noise']:.3f} "
        f"(sgd {s['auroc_oodval_patches']:.3f}/{s['auroc_oodval_noise']:.3f}) "
        f"cpu {row['cpu_s']:.0f}s pass {row['passes']}"
    )


def _per_example_nll(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    picked = np.take_along_axis(probs, labels[:, None], axis=-1)[:, 0]
    return -np.log(np.clip(picked, np.finfo(np.float32).tiny, None))


def _cli_time(workers: int) -> dict[str, float]:
    """Wall and CPU seconds of ``bayesflat run`` with its defaults, end to end (report included)."""
    import os
    import resource
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "bayesflat.cli", "run", "--output", folder, "--no-progress",
             "--workers", str(workers)],
            check=True, capture_output=True, env={**os.environ},
        )  # fmt: skip
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    load = os.getloadavg()[0]
    return {"workers": workers, "wall_s": wall, "cpu_s": cpu, "load_1min": load}


def final(out: Path, name: str, quick: bool) -> dict[str, Any]:
    """The test numbers of the defaults, once: the BMA of ``bayesflat.sample`` with no
    settings against SGD, on the run's own test and OOD sets, and the CLI's wall time."""
    from bayesflat.defaults import DEFAULTS

    grid = {c.name: c for c in (_quick_grid() if quick else _grid())}
    c = grid[name]
    mismatch = {
        k: (getattr(c, k), getattr(DEFAULTS, k))
        for k in ("sampler", "chains", "burn_in", "draws", "thin", "lr", "init", "batch_size")
        if getattr(c, k) != getattr(DEFAULTS, k)
    }
    if c.prior != "iso" or c.scale != DEFAULTS.prior_scale:
        mismatch["prior_scale"] = (c.scale, DEFAULTS.prior_scale)
    if c.temperature != DEFAULTS.temperature:
        mismatch["temperature"] = (c.temperature, DEFAULTS.temperature)
    if mismatch and not quick:
        raise SystemExit(f"bayesflat.defaults differs from {name}: {mismatch}")
    data = load_data()
    sets = data["test"]
    ood = [k for k in sets if k.startswith("ood_")]
    model = models.build_model(DEFAULTS.model, num_classes=10)
    cpu, wall = time.process_time(), time.perf_counter()
    smoke = {"chains": 2, "burn_in": 10, "draws": 5, "thin": 2} if quick else {}
    trace = bayesflat.sample(
        model, data["train"], eval_sets=sets, progress=False, store_weights=False, **smoke
    )
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    result: dict[str, Any] = {"chosen": name, "cpu_s": cpu, "wall_s": wall}
    result.update(diagnostics(trace, "test"))
    result["bma"] = scores(trace, "test", ood, final=False)
    steps = c.steps if not quick else 20
    same = dataclasses.replace(c, chains=4, burn_in=steps - 1, draws=1, thin=1)
    sgd_same, _, _ = run(same, data, sets, sampler="sgd")
    old = Candidate("old", scale=1.0, lr=0.1, burn_in=2999, draws=1, thin=1)
    sgd_old, _, _ = run(old, data, sets, sampler="sgd")
    result["sgd_same"] = scores(sgd_same, "test", ood, final=True)
    result["sgd_old"] = scores(sgd_old, "test", ood, final=True)
    labels = _labels(trace, "test")
    bma_nll = _per_example_nll(
        _probs(trace, "test").reshape(-1, *_probs(trace, "test").shape[2:]).mean(0), labels
    )
    for key, tr in (("sgd_same", sgd_same), ("sgd_old", sgd_old)):
        p = _probs(tr, "test")[:, -1]
        sgd_nll = np.mean([_per_example_nll(p[k], labels) for k in range(p.shape[0])], axis=0)
        diff = bma_nll - sgd_nll
        result[f"nll_diff_{key}"] = {
            "mean": float(diff.mean()), "se": float(diff.std(ddof=1) / math.sqrt(diff.size))
        }  # fmt: skip
    result["cli"] = [] if quick else [_cli_time(1), _cli_time(2)]
    (out / "default_search_final.json").write_text(json.dumps(result, indent=1))
    return result


def _f(x: Any, digits: int = 3) -> str:
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def table(rows: list[dict[str, Any]], baseline: dict[str, Any]) -> str:
    """The Markdown table of the search: one row per candidate, validation numbers only."""
    head = (
        "| candidate | sampler | prior | T | lr | steps/chain (burn-in + draws x thin) | init | "
        "R-hat lp | R-hat val NLL | R-hat sq. norm | ESS lp | ESS val NLL | "
        "BMA val acc | BMA val NLL | BMA AUROC patches / noise | SGD same prior NLL | "
        "CPU s (sampling) | passes |\n|" + "---|" * 18
    )
    lines = [head]
    for r in rows:
        c = r["candidate"]
        prior = f"iso s={c['scale']}" if c["prior"] == "iso" else f"he s²={c['scale']}/fan_in"
        budget = (
            f"{c['burn_in'] + c['draws'] * c['thin']} ({c['burn_in']} + {c['draws']} x {c['thin']})"
        )
        cells = [c["name"], c["sampler"], prior, c["temperature"], c["lr"], budget, c["init"]]
        lead = "| " + " | ".join(str(v) for v in cells) + " | "
        if "diverged" in r:
            lines.append(lead + "diverged |" + " |" * 10 + " no |")
            continue
        b = r["bma"]
        failed = [k for k, ok in r["checks"].items() if not ok]
        lines.append(
            lead
            + " | ".join([
                _f(r["rhat_lp"]), _f(r["rhat_nll"]), _f(r["rhat_sqnorm"]),
                f"{r['ess_lp']:.0f}", f"{r['ess_nll']:.0f}", _f(b["acc"]), _f(b["nll"]),
                f"{_f(b['auroc_oodval_patches'])} / {_f(b['auroc_oodval_noise'])}",
                _f(r["sgd_same"]["nll"]), f"{r['cpu_s']:.0f}",
                "yes" if r["passes"] else "no: " + ", ".join(failed),
            ])
            + " |"
        )  # fmt: skip
    lines.append("")
    lines.append(
        f"SGD at the former defaults (s = 1, lr = 0.1, 3000 steps), final iterate per chain, "
        f"mean of 4 chains, validation: acc {_f(baseline['acc'])}, NLL {_f(baseline['nll'])}, "
        f"AUROC patches {_f(baseline['auroc_oodval_patches'])}, "
        f"noise {_f(baseline['auroc_oodval_noise'])}."
    )
    return "\n".join(lines)


def _final_section(f: dict[str, Any]) -> str:
    from bayesflat.defaults import DEFAULTS

    b, same, old = f["bma"], f["sgd_same"], f["sgd_old"]
    rows = [
        "| | accuracy | NLL | ECE | AUROC patches | AUROC noise |",
        "|---|---|---|---|---|---|",
    ]
    for label, m in (
        ("BMA of the default run (4 chains)", b),
        ("SGD, same prior, step size and steps; final iterate, mean of 4 runs", same),
        ("SGD at the former defaults (s = 1, lr = 0.1, 3000 steps); mean of 4 runs", old),
    ):
        rows.append(
            f"| {label} | {_f(m['acc'])} | {_f(m['nll'])} | {_f(m['ece'])} | "
            f"{_f(m['auroc_ood_patches'])} | {_f(m['auroc_ood_noise'])} |"
        )
    d1, d2 = f["nll_diff_sgd_same"], f["nll_diff_sgd_old"]
    lines = [
        *rows,
        "",
        f"Paired NLL difference BMA - SGD over the 360 test digits (mean ± standard error of "
        f"the mean of per-digit differences): {d1['mean']:+.4f} ± {d1['se']:.4f} against SGD "
        f"with the same prior, {d2['mean']:+.4f} ± {d2['se']:.4f} against the former defaults.",
        "",
        f"Convergence on the test split ({DEFAULTS.chains} chains x {DEFAULTS.draws} draws): "
        f"R-hat lp "
        f"{_f(f['rhat_lp'])}, R-hat per-draw test NLL {_f(f['rhat_nll'])}, bulk ESS lp "
        f"{f['ess_lp']:.0f}, bulk ESS test NLL {f['ess_nll']:.0f}; R-hat of the squared weight "
        f"norm {_f(f['rhat_sqnorm'])} (not a criterion; see above).",
        "",
        f"Sampling inside Python: {f['cpu_s']:.0f} s CPU at one thread.",
    ]
    for t in f.get("cli", []):
        lines.append(
            f"`bayesflat run --workers {t['workers']}` end to end (report included): wall "
            f"{t['wall_s']:.0f} s, CPU {t['cpu_s']:.0f} s, 1-minute load average "
            f"{t['load_1min']:.1f} on 2 cores shared with other work."
        )
    return "\n".join(lines)


def write_markdown(out: Path, findings: str = "") -> Path:
    """``default_search.md`` from the JSON files the stages wrote."""
    rows = json.loads((out / "default_search.json").read_text())
    order = {c.name: i for i, c in enumerate(_grid())}
    rows.sort(key=lambda r: order.get(r["candidate"]["name"], len(order)))
    baseline = json.loads((out / "default_search_baseline.json").read_text())
    parts = [
        "# Default configuration of `bayesflat run`: the search",
        "",
        "Produced by `benchmarks/default_search.py` (its docstring has the protocol). MLP "
        "64-128-128-10 on the embedded digits, N = 1293 training images, batch 64, 4 chains, "
        "root seed 0 unless the name says otherwise, one torch thread. Every number in the "
        "table is on the **validation** split (144 digits) and on OOD sets generated for "
        "validation (`ood_sets(n=144, seed=1)`); the test split was read once, for the "
        "chosen configuration, at the end.",
        "",
        "Criteria: R-hat <= 1.01 and bulk ESS >= 400 on `lp` and on the per-draw validation "
        "NLL; the BMA's NLL below and its entropy AUROC above those of the better SGD "
        "baseline (same prior, step and steps; or the former defaults), on both OOD sets; "
        "the whole run <= 60 s wall on 2 cores.",
        "",
        table(rows, baseline),
    ]
    if findings:
        parts += ["", findings]
    final_path = out / "default_search_final.json"
    if final_path.is_file():
        f = json.loads(final_path.read_text())
        parts += ["", f"## Test numbers of the chosen default ({f['chosen']}), read once", ""]
        parts.append(_final_section(f))
        parts += ["", VERDICT]
    path = out / "default_search.md"
    path.write_text("\n".join(parts) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stage", choices=("screen", "final"), default="screen")
    parser.add_argument("--only", action="append", default=None, help="candidate name")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"{platform.platform()} torch {torch.__version__}", flush=True)
    if args.stage == "screen":
        screen(args.out, args.only, args.quick)
    else:
        if not args.only or len(args.only) != 1:
            raise SystemExit("--stage final needs --only NAME, the chosen candidate")
        print(json.dumps(final(args.out, args.only[0], args.quick), indent=1))
    if not args.quick:
        print(f"wrote {write_markdown(args.out, FINDINGS)}")


if __name__ == "__main__":
    main()
