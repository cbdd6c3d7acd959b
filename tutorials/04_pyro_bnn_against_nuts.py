"""Tutorial 4: a Bayesian network written in Pyro, sampled with fSGLD and checked against NUTS.

A Pyro user writes a Bayesian neural network as a ``PyroModule`` whose weights are
``PyroSample`` sites. bayesflat samples it as it is: its latent sites are the parameters, its
observed site the likelihood, and the potential is Pyro's log joint in mean-loss units, with
the likelihood of a minibatch scaled by ``N / |B|`` (no plate subsampling in the model).

We then sample the same network with Pyro's NUTS, the gold standard for small models, and put
the two posteriors side by side:

1. ``az.compare``: the expected log predictive density (PSIS-LOO) of each posterior on the
   training points, from the pointwise log-likelihood both traces hold;
2. ``az.plot_forest``: the output biases, the weights that hidden-unit permutations and sign
   flips leave in place (so chains in different modes still describe the same quantity);
3. the test accuracy of each posterior predictive.

The network is small (64-8-10 on 500 digits) so that NUTS finishes in a few minutes: NUTS
needs the full-data gradient hundreds of times per draw, fSGLD one minibatch gradient per step.

Run it with ``python tutorials/04_pyro_bnn_against_nuts.py`` (15 minutes on two busy shared
cores: 5 for fSGLD, 9 for NUTS); ``BAYESFLAT_TUTORIAL_QUICK=1`` shrinks the budget to a smoke
test of a few seconds.
"""

import os
import time
import warnings
from pathlib import Path

import arviz as az
import matplotlib
import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import MCMC, NUTS
from pyro.nn import PyroModule, PyroSample

import bayesflat
from bayesflat import data, predictive

matplotlib.use("Agg")
QUICK = os.environ.get("BAYESFLAT_TUTORIAL_QUICK") == "1"
TRAIN, HIDDEN = (200, 8) if QUICK else (500, 8)
FSGLD = (
    {"chains": 2, "burn_in": 100, "draws": 10, "thin": 5}
    if QUICK
    else {"chains": 4, "burn_in": 3000, "draws": 100, "thin": 20}
)
NUTS_BUDGET = (
    {"chains": 2, "warmup": 10, "draws": 10, "depth": 3}
    if QUICK
    else {"chains": 2, "warmup": 150, "draws": 150, "depth": 6}
)
torch.set_num_threads(1)


# %% The model --------------------------------------------------------------------------------
# Pyro's idiom for a Bayesian network: PyroModule[nn.Linear] layers whose weight and bias are
# replaced by PyroSample priors, N(0, 1) on every weight. forward(x, y) observes y; with
# y=None it samples the labels (what predictions use).
class BNN(PyroModule):
    def __init__(self, d: int = 64, h: int = HIDDEN, k: int = 10) -> None:
        super().__init__()
        self.fc1 = PyroModule[torch.nn.Linear](d, h)
        self.fc1.weight = PyroSample(dist.Normal(0.0, 1.0).expand([h, d]).to_event(2))
        self.fc1.bias = PyroSample(dist.Normal(0.0, 1.0).expand([h]).to_event(1))
        self.fc2 = PyroModule[torch.nn.Linear](h, k)
        self.fc2.weight = PyroSample(dist.Normal(0.0, 1.0).expand([k, h]).to_event(2))
        self.fc2.bias = PyroSample(dist.Normal(0.0, 1.0).expand([k]).to_event(1))

    def forward(self, x, y=None):
        logits = self.fc2(torch.tanh(self.fc1(x)))
        with pyro.plate("data", x.shape[0]):
            return pyro.sample("obs", dist.Categorical(logits=logits), obs=y)


digits = data.load_digits_split(flatten=True)
x, y = digits.x_train[:TRAIN], digits.y_train[:TRAIN]
print(f"digits: {len(y)} train, {len(digits.y_test)} test; BNN 64-{HIDDEN}-10")

# %% fSGLD with bayesflat ---------------------------------------------------------------------
# The PyroModule goes where a torch module would. Each chain starts from a draw of the prior.
start = time.perf_counter()
fsgld = bayesflat.sample(
    BNN(),
    (x, y),
    sampler="fsgld",
    lr=0.05,
    batch_size=50,
    eval_sets={"test": (digits.x_test, digits.y_test)},
    seed=0,
    progress=not QUICK,
    **FSGLD,
)
steps = FSGLD["burn_in"] + FSGLD["draws"] * FSGLD["thin"]
print(f"fsgld: {FSGLD['chains']} chains x {steps} steps in {time.perf_counter() - start:.1f} s")
# The posterior group holds the latent sites under their Pyro names, as a Pyro trace would.
print("fsgld posterior variables:", ", ".join(bayesflat.trace.get_group(fsgld, "posterior")))


# %% NUTS with Pyro ---------------------------------------------------------------------------
def nuts_trace() -> az.InferenceData:
    """NUTS draws as an InferenceData with the pointwise log-likelihood of the training set."""
    samples: dict[str, list[np.ndarray]] = {}
    for chain in range(NUTS_BUDGET["chains"]):
        pyro.set_rng_seed(chain)
        kernel = NUTS(BNN(), max_tree_depth=NUTS_BUDGET["depth"])
        mcmc = MCMC(
            kernel,
            num_samples=NUTS_BUDGET["draws"],
            warmup_steps=NUTS_BUDGET["warmup"],
            disable_progbar=True,
        )
        mcmc.run(x, y)
        for site, value in mcmc.get_samples().items():
            samples.setdefault(site, []).append(value.numpy())
    posterior = {site: np.stack(values) for site, values in samples.items()}
    # log p(y_i | x_i, theta) per draw: condition the model on the draw and score y.
    chains, draws = NUTS_BUDGET["chains"], NUTS_BUDGET["draws"]
    loglik = np.empty((chains, draws, len(y)))
    model = BNN()
    for c in range(chains):
        for d in range(draws):
            values = {site: torch.as_tensor(v[c, d]) for site, v in posterior.items()}
            trace = pyro.poutine.trace(pyro.poutine.condition(model, data=values)).get_trace(x, y)
            site = trace.nodes["obs"]
            loglik[c, d] = site["fn"].log_prob(site["value"]).detach().numpy()
    return az.from_dict(
        posterior=posterior, log_likelihood={"train": loglik}, observed_data={"train": y.numpy()}
    )


start = time.perf_counter()
nuts = nuts_trace()
print(f"nuts: {NUTS_BUDGET['chains']} chains x {NUTS_BUDGET['draws']} draws in "
      f"{time.perf_counter() - start:.1f} s")  # fmt: skip

# %% 1. az.compare ----------------------------------------------------------------------------
# Both traces hold log p(y_i | x_i, theta) of the same training points in log_likelihood, so
# ArviZ ranks them by PSIS-LOO. With so few draws of 610 weights the Pareto k diagnostics warn
# for both. Read the ranking for what each sampler targets: NUTS the Bayes posterior, fSGLD the
# posterior of the perturbed potential v = E[L(theta + sigma eps)] ~ L + sigma^2 / 2 tr H
# (sigma = (T / N)^((1 + eta) / 4) ~ 0.18 here), which spreads into flatter, higher-loss
# weights. In the full run NUTS ranks first (elpd_loo -113 against -282 nats) and predicts the
# test set better (accuracy 0.96 against 0.90): on a network this small flatness buys nothing,
# and the price of the perturbation shows.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    comparison = az.compare({"fsgld": fsgld, "nuts": nuts})
print("\naz.compare (elpd_loo on the training points, nats)")
print(comparison.to_string())

# %% 2. az.plot_forest ------------------------------------------------------------------------
out = Path("tutorial04_pyro")
out.mkdir(exist_ok=True)
axes = az.plot_forest(
    [fsgld, nuts], model_names=["fsgld", "nuts"], var_names=["fc2.bias"], combined=True
)
figure = out / "forest_fc2_bias.png"
axes.ravel()[0].figure.tight_layout()
axes.ravel()[0].figure.savefig(figure, dpi=80)
print(f"wrote {figure}")

# %% 3. Predictive accuracy -------------------------------------------------------------------
# fSGLD recorded class probabilities on the test set at every kept draw; for NUTS we run the
# network on each draw.
test = predictive.from_trace(fsgld, "test")
fsgld_accuracy = float((test.mean().argmax(-1) == test.labels).mean())
probs = []
with torch.no_grad():
    for site_values in zip(*(nuts.posterior[s].values.reshape(-1, *nuts.posterior[s].shape[2:])
                             for s in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")),
                           strict=True):  # fmt: skip
        w1, b1, w2, b2 = (torch.as_tensor(v) for v in site_values)
        probs.append(torch.softmax(torch.tanh(digits.x_test @ w1.T + b1) @ w2.T + b2, -1))
nuts_accuracy = float((torch.stack(probs).mean(0).argmax(-1) == digits.y_test).float().mean())
print(f"test accuracy (BMA): fsgld {fsgld_accuracy:.4f}, nuts {nuts_accuracy:.4f}")
