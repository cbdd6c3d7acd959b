"""Tutorial 1: sample an fSGLD posterior on digits and judge its predictions.

We sample the posterior of a small MLP on scikit-learn's 8x8 digits twice, with fSGLD
(gradients taken at randomly perturbed weights, so the chain prefers flat basins) and with
plain SGLD, and then ask of each trace what a practitioner asks of a Bayesian classifier:

1. Is the posterior predictive accurate and calibrated?  Accuracy, NLL and ECE of the Bayesian
   model average (BMA), each with its Monte-Carlo error over the draws.
2. Does it know what it does not know?  AUROC for telling digits from natural-image patches
   and noise; OOD is the positive class and a higher score means more OOD.
3. Where does its uncertainty come from?  Predictive entropy split into the aleatoric part
   (noise in the labels) and the epistemic part (disagreement between draws).
4. What does ArviZ make of the trace?  ``az.summary`` of the potential and ``az.loo``.
5. The whole story as one self-contained HTML page.

Everything is in bayesflat's mean-loss units: with N training images and temperature T the
chain targets exp(-N L / T), L = mean NLL - log p(theta) / N, and a step is
``theta <- theta - lr * grad L_B + sqrt(2 lr T / N) xi``.

Run it with ``python tutorials/01_fsgld_on_digits.py`` (about a minute on two cores);
``BAYESFLAT_TUTORIAL_QUICK=1`` shrinks the budget to a smoke test of a few seconds.
"""

import os
import time
import warnings
from pathlib import Path

import arviz as az
import numpy as np
import torch

import bayesflat
from bayesflat import data, metrics, models, predictive
from bayesflat.report import build_report

QUICK = os.environ.get("BAYESFLAT_TUTORIAL_QUICK") == "1"
# A run keeps `draws` states per chain, one every `thin` steps after `burn_in` steps. `n_boot`
# is used only by the bootstrap error bars (method="bootstrap"); the default error bars are a
# jackknife over batches of consecutive draws.
BUDGET = (
    {"chains": 2, "burn_in": 100, "draws": 8, "thin": 10, "n_boot": 10}
    if QUICK
    else {"chains": 4, "burn_in": 1000, "draws": 50, "thin": 40, "n_boot": 100}
)
# The digits MLP is too small for a second intra-op thread to pay for its synchronisation.
torch.set_num_threads(1)

# %% Data -------------------------------------------------------------------------------------
# A fixed stratified split; 10% of the training images are held back to fit the temperature of
# the post-hoc calibration, never the test set. The OOD sets are built in memory (no download).
digits = data.load_digits_split(val_size=0.1)
eval_sets = {
    "test": (digits.x_test, digits.y_test),
    "val": (digits.x_val, digits.y_val),
    **{f"ood_{name}": x for name, x in data.ood_sets(digits).items()},
}
print(f"digits: {digits.num_train} train, {len(digits.y_val)} val, {len(digits.y_test)} test")
print("OOD sets:", ", ".join(f"{k} ({len(v)})" for k, v in eval_sets.items() if "ood" in k))

# %% Sampling ---------------------------------------------------------------------------------
# Step sizes from the validation-NLL grid of benchmarks/results/acceptance.md. fSGLD's sigma is
# left to the paper's coupling sigma = (T / N)^((1 + eta) / 4): about 0.14 here.
traces = {}
for name, lr in (("fsgld", 0.3), ("sgld", 0.1)):
    start = time.perf_counter()
    traces[name] = bayesflat.sample(
        models.MLP(),
        (digits.x_train, digits.y_train),
        sampler=name,
        chains=BUDGET["chains"],
        burn_in=BUDGET["burn_in"],
        draws=BUDGET["draws"],
        thin=BUDGET["thin"],
        lr=lr,
        temperature=1.0,
        prior=1.0,  # N(0, 1) on every weight
        init="reset",  # PyTorch's initialisation (the default starts from a prior draw)
        eval_sets=eval_sets,
        store_logits=True,  # for the energy OOD score of the report
        seed=0,
        progress=not QUICK,
    )
    steps = BUDGET["burn_in"] + BUDGET["draws"] * BUDGET["thin"]
    print(
        f"{name}: {BUDGET['chains']} chains x {steps} steps in {time.perf_counter() - start:.1f} s"
    )

# %% 1-2. Predictive performance and OOD detection --------------------------------------------
# An Ensemble holds the per-draw class probabilities (chain, draw, n, K) of one evaluation set.
# The metrics are those of the BMA (probabilities averaged, never logits); the error bars come
# from a jackknife over batches of consecutive draws, long enough to span the autocorrelation
# of a chain, so they count correlated draws only once.
rows = {}
for name, trace in traces.items():
    test = predictive.from_trace(trace, "test")
    val = predictive.from_trace(trace, "val")
    patches = predictive.from_trace(trace, "ood_patches")
    cal = predictive.calibration(test, val, n_boot=BUDGET["n_boot"])
    ood = predictive.ood_detection(test, patches, n_boot=BUDGET["n_boot"])
    rows[name] = {
        "accuracy": cal["accuracy"],
        "NLL (nats)": cal["nll"],
        "ECE": cal["ece"],
        "NLL, temperature-scaled": cal["scaled_nll"],
        "AUROC patches (entropy)": ood["entropy"]["auroc"],
        "AUROC patches (mutual inf.)": ood["mutual_information"]["auroc"],
    }
# Read the table against its error bars: on a problem this small both posteriors are accurate
# and detect the patches almost perfectly, and most differences are within two error bars.
print(f"\n{'test set, value ± MC error':<28}" + "".join(f"{n:>18}" for n in rows))
for metric in rows["fsgld"]:
    print(f"{metric:<28}" + "".join(f"{rows[n][metric].format():>18}" for n in rows))

# The headline numbers are plain metrics of plain arrays: the entropy of the BMA is the score,
# the test set the negatives, the OOD set the positives.
test, patches = (predictive.from_trace(traces["fsgld"], s) for s in ("test", "ood_patches"))
auroc = metrics.auroc(metrics.entropy_score(test.mean()), metrics.entropy_score(patches.mean()))
print(f"fsgld accuracy (BMA) = {metrics.accuracy(test.mean(), test.labels):.4f}")
print(f"fsgld AUROC patches (entropy of the BMA) = {auroc:.4f}")

# %% 3. Uncertainty decomposition -------------------------------------------------------------
# total = H[mean_s p_s] (predictive entropy) = aleatoric E_s H[p_s] + epistemic I(y; theta),
# in nats per input. Each draw alone is confident even on image patches (a small aleatoric
# part): a single network would not notice them. The draws disagree with each other there,
# and that disagreement, the epistemic part, is what flags the OOD inputs.
print("\nfsgld uncertainty, mean over inputs (nats)    total  aleatoric  epistemic")
for set_name in ("test", "ood_patches", "ood_noise"):
    u = predictive.from_trace(traces["fsgld"], set_name).uncertainty()
    print(
        f"  {set_name:<42} {u.total.mean():6.3f}  {u.aleatoric.mean():9.3f}  "
        f"{u.epistemic.mean():9.3f}"
    )

# %% 4. The trace in ArviZ --------------------------------------------------------------------
# A trace is an ArviZ InferenceData saved as netCDF; ArviZ opens it without bayesflat.
out = Path("tutorial01_fsgld")
out.mkdir(exist_ok=True)
path = bayesflat.save(traces["fsgld"], out / "trace.nc")
idata = az.from_netcdf(path)
print(f"\nsaved {path}; groups: {', '.join(idata.groups())}")

# lp is the log joint density estimated on a minibatch, -N L_B (nats), at every kept draw.
# Its R-hat and ESS say whether the chains agree about the level of the potential
# (weight-space R-hat would mean nothing: permuting hidden units maps a mode onto an
# equivalent one). Tutorial 3 goes further.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # ArviZ warns on short chains; the numbers say it too
    print(az.summary(idata, group="sample_stats", var_names=["lp"], kind="all").to_string())

# PSIS-LOO estimates the expected log predictive density of new data (elpd) from the
# log-likelihood of the training labels, and flags with the Pareto k of every image whether
# its importance weights can be trusted (k <= 0.7). A few hundred SG-MCMC draws of 26,122
# weights rarely pass that test; the held-out test set measures the same elpd directly.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # the Pareto k below carry the warning's content
    loo = az.loo(idata, pointwise=True)
k = np.asarray(loo.pareto_k)
elpd_test = -rows["fsgld"]["NLL (nats)"].value
print(
    f"az.loo: elpd_loo per image = {loo.elpd_loo / k.size:.3f} "
    f"(Pareto k <= 0.7 for {np.mean(k <= 0.7):.0%} of the {k.size} images)\n"
    f"held-out test: elpd per image = {elpd_test:.3f}"
)
if np.mean(k > 0.7) > 0.1:
    print("  -> too many k > 0.7: PSIS-LOO is unreliable here; trust the test-set number")

# %% 5. The report ----------------------------------------------------------------------------
# The same numbers, with temperature scaling, reliability diagrams, ROC curves, performance
# against the number of draws, trace plots and the convergence table, in one HTML page.
# `bayesflat report tutorial01_fsgld/trace.nc` rebuilds it from the file.
report = build_report(traces["fsgld"], n_boot=BUDGET["n_boot"])
paths = report.save(out)
print("\n" + report.headline())
print(f"wrote {paths['json']} and {paths['html']}")
