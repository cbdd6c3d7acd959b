"""Pyro models as targets: the potential, constrained sites, predictions, the run engine."""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pyro = pytest.importorskip("pyro")
import pyro.distributions as dist  # noqa: E402
from pyro.nn import PyroModule, PyroSample  # noqa: E402

import bayesflat  # noqa: E402
from bayesflat import samplers  # noqa: E402
from bayesflat import trace as btrace  # noqa: E402
from bayesflat.target.pyro import PyroTargetSpec  # noqa: E402

# -- models (module level, so that other processes can import them) --------------------------------


def regression(x, y=None):
    """Linear regression with a HalfNormal noise scale: one constrained latent."""
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
    s = pyro.sample("s", dist.HalfNormal(1.0))
    with pyro.plate("data", x.shape[0]):
        return pyro.sample("obs", dist.Normal(x @ w, s), obs=y)


def regression_subsampled(x, y=None):
    """The same model with the minibatch declared as a subsample of N = 96 examples."""
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
    s = pyro.sample("s", dist.HalfNormal(1.0))
    with pyro.plate("data", 96, subsample_size=x.shape[0]):
        return pyro.sample("obs", dist.Normal(x @ w, s), obs=y)


def classifier(x, y=None):
    """Softmax regression: a categorical likelihood."""
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1], 3]).to_event(2))
    with pyro.plate("data", x.shape[0]):
        return pyro.sample("obs", dist.Categorical(logits=x @ w), obs=y)


def logistic(x, y=None):
    """Logistic regression: a Bernoulli likelihood, predicted as two classes."""
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
    with pyro.plate("data", x.shape[0]):
        return pyro.sample("obs", dist.Bernoulli(logits=x @ w), obs=y)


class BNN(PyroModule):
    """A one-hidden-layer Bayesian network with PyroSample weights."""

    def __init__(self, d: int = 5, h: int = 8, k: int = 3) -> None:
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


def _regression_data(n: int = 96, d: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = x @ torch.tensor([1.0, -1.0, 0.5])[:d] + 0.3 * torch.randn(n, generator=g)
    return x, y


def _class_data(n: int = 96, d: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x @ torch.randn(d, 3, generator=g)).argmax(dim=1)
    return x, y


def _kwargs(**kw):
    args = dict(
        sampler="sgld", chains=2, burn_in=10, draws=6, thin=2, batch_size=16, seed=3,
        progress=False, lr=1e-3,
    )  # fmt: skip
    args.update(kw)
    return args


def _target(model, data, device="cpu", **kw):
    x, y = data
    return PyroTargetSpec(model, (x[:2], y[:2]), num_data=len(x), **kw).build(0, device)


# -- the potential -------------------------------------------------------------------------------


def test_potential_equals_the_hand_formula_with_the_log_jacobian(device):
    x, y = (t.to(device) for t in _regression_data())
    target = _target(regression, (x, y), device)
    xb, yb = x[:16], y[:16]
    n, b = len(x), len(xb)
    u = dict(target.module.by_site())
    w = u["w"].detach().clone().requires_grad_(True)
    log_s = u["s"].detach().clone().requires_grad_(True)
    s = log_s.exp()  # biject_to(positive) is exp; log|ds/du| = u
    log_joint = (
        torch.distributions.Normal(0.0, 1.0).log_prob(w).sum()
        + torch.distributions.HalfNormal(1.0).log_prob(s)
        + log_s
        + (n / b) * torch.distributions.Normal(xb @ w, s).log_prob(yb).sum()
    )
    expected = -log_joint / n
    expected.backward()
    value = target.closure(xb, yb)()
    torch.testing.assert_close(value, expected.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(target.module.w.grad, w.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(target.module.s.grad, log_s.grad, rtol=1e-5, atol=1e-6)


def test_a_subsampled_plate_is_scaled_once():
    x, y = _regression_data()
    plain = _target(regression, (x, y))
    subsampled = _target(regression_subsampled, (x, y))
    subsampled.module.load_state_dict(plain.module.state_dict())
    torch.testing.assert_close(
        subsampled.potential(x[:16], y[:16]), plain.potential(x[:16], y[:16]), rtol=1e-6, atol=0
    )


def test_constrained_sites_are_recorded_in_the_constrained_space(device):
    x, y = _regression_data()
    target = _target(regression, (x, y))
    with torch.no_grad():
        target.module.s.fill_(-1.5)
    assert float(target.posterior_variables()["s"]) == pytest.approx(math.exp(-1.5), rel=1e-6)
    trace = bayesflat.sample(regression, (x, y), device=str(device), **_kwargs())
    posterior = btrace.get_group(trace, "posterior")
    assert set(posterior.data_vars) == {"w", "s"}
    assert posterior["w"].dims == ("chain", "draw", "w_dim_0")
    assert posterior["w"].shape == (2, 6, 3)
    assert bool((posterior["s"].values > 0).all())
    assert "weights" not in btrace.groups(trace)
    attrs = btrace.trace_attrs(trace)
    assert attrs["latent_sites"] == ["w", "s"] and attrs["likelihood"] == "pyro:Normal"


def test_pyro_module_bnn_predicts_class_probabilities_of_its_recorded_weights():
    x, y = _class_data()
    test = _class_data(20, seed=1)
    trace = bayesflat.sample(
        BNN(), (x, y), **_kwargs(sampler="fsgld", eval_sets={"test": test}, lr=1e-2)
    )
    post = btrace.get_group(trace, "posterior")
    assert set(post.data_vars) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    probs = btrace.get_group(trace, "predictions")["test"].values
    assert probs.shape == (2, 6, 20, 3)
    c, d = 1, 4
    hidden = torch.tanh(
        test[0] @ torch.tensor(post["fc1.weight"].values[c, d]).T
        + torch.tensor(post["fc1.bias"].values[c, d])
    )
    logits = hidden @ torch.tensor(post["fc2.weight"].values[c, d]).T + torch.tensor(
        post["fc2.bias"].values[c, d]
    )
    np.testing.assert_allclose(probs[c, d], logits.softmax(-1).numpy(), rtol=1e-4, atol=1e-6)
    ll = btrace.get_group(trace, "heldout_log_likelihood")["test"].values[c, d]
    np.testing.assert_allclose(
        ll, logits.log_softmax(-1)[torch.arange(20), test[1]].numpy(), rtol=1e-4, atol=1e-5
    )


def test_bernoulli_likelihood_predicts_two_classes():
    x, _ = _regression_data()
    y = (x[:, 0] > 0).float()
    trace = bayesflat.sample(logistic, (x, y), **_kwargs(eval_sets={"test": (x[:10], y[:10])}))
    w = btrace.get_group(trace, "posterior")["w"].values[0, 2]
    p = torch.sigmoid(x[:10] @ torch.tensor(w)).numpy()
    probs = btrace.get_group(trace, "predictions")["test"].values[0, 2]
    np.testing.assert_allclose(probs, np.stack([1 - p, p], axis=-1), rtol=1e-4, atol=1e-6)


def test_non_categorical_predictions_are_draws_of_the_observed_site():
    x, y = _regression_data()
    trace = bayesflat.sample(regression, (x, y), **_kwargs(eval_sets={"grid": x[:50]}))
    post = btrace.get_group(trace, "posterior")
    w, s = post["w"].values, post["s"].values
    draws = btrace.get_group(trace, "predictions")["grid"].values
    assert draws.shape == (2, 6, 50)
    mean = np.einsum("nd,cgd->cgn", x[:50].numpy(), w)
    z = ((draws - mean) / s[..., None]).ravel()
    # 600 standard normal draws: mean within 4 standard errors, variance within 4 of its
    # standard error sqrt(2 / n).
    assert abs(z.mean()) < 4 / math.sqrt(z.size)
    assert abs(z.var() - 1) < 4 * math.sqrt(2 / z.size)
    # The pointwise log-likelihood of training points comes from the observed site.
    ll = btrace.get_group(trace, "log_likelihood")["train"].values
    expected = torch.distributions.Normal(
        torch.tensor(np.einsum("nd,cgd->cgn", x.numpy(), w)), torch.tensor(s)[..., None]
    ).log_prob(y)
    np.testing.assert_allclose(ll, expected.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("sampler", samplers.available())
def test_every_registered_sampler_runs_on_a_pyro_model(sampler):
    x, y = _regression_data()
    trace = bayesflat.sample(regression, (x, y), **_kwargs(sampler=sampler, draws=3))
    post = btrace.get_group(trace, "posterior")
    assert np.isfinite(post["w"].values).all() and (post["s"].values > 0).all()
    assert np.isfinite(btrace.get_group(trace, "sample_stats")["potential"].values).all()


# -- the run engine ------------------------------------------------------------------------------


class _InterruptAt:
    def __init__(self, at: int) -> None:
        self.at, self.calls = at, 0

    def __call__(self, model, sampler) -> float:
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return 0.0


def _zero(model, sampler) -> float:
    return 0.0


def _same_draws(a, b) -> None:
    ga, gb = btrace.groups(a), btrace.groups(b)
    assert set(ga) == set(gb)
    for group, data in ga.items():
        assert set(data.data_vars) == set(gb[group].data_vars), group
        for name in data.data_vars:
            assert np.array_equal(data[name].values, gb[group][name].values, equal_nan=True), (
                group,
                name,
            )


@pytest.mark.parametrize("sampler", ["sgld", "sghmc"])
def test_resume_equals_an_uninterrupted_run(sampler, tmp_path):
    x, y = _regression_data()
    kw = _kwargs(sampler=sampler, draws=8, eval_sets={"grid": x[:10]})
    straight = bayesflat.sample(regression, (x, y), stats_fns={"probe": _zero}, **kw)
    with pytest.raises(KeyboardInterrupt):
        bayesflat.sample(
            regression, (x, y), stats_fns={"probe": _InterruptAt(5)}, output=tmp_path,
            checkpoint_every=2, **kw,
        )  # fmt: skip
    resumed = bayesflat.resume(
        tmp_path, regression, (x, y), eval_sets=kw["eval_sets"], stats_fns={"probe": _zero},
        progress=False,
    )  # fmt: skip
    _same_draws(straight, resumed)


def test_processes_executor_equals_the_sequential_run():
    x, y = _class_data()
    kw = _kwargs(sampler="fsgld", eval_sets={"test": _class_data(10, seed=1)})
    _same_draws(
        bayesflat.sample(classifier, (x, y), **kw),
        bayesflat.sample(classifier, (x, y), workers=2, **kw),
    )


def test_processes_refuse_a_model_that_cannot_be_pickled():
    x, y = _regression_data()

    def local(x, y=None):
        return regression(x, y)

    with pytest.raises(ValueError, match="cannot be pickled"):
        bayesflat.sample(local, (x, y), workers=2, **_kwargs())


def test_vectorised_executor_refuses_with_the_fallback():
    x, y = _regression_data()
    with pytest.raises(ValueError, match="executor='vectorised'.*pyro target"):
        bayesflat.sample(regression, (x, y), executor="vectorised", **_kwargs())


# -- bad models ----------------------------------------------------------------------------------


def no_observation(x, y=None):
    pyro.sample("w", dist.Normal(0.0, 1.0))


def with_param(x, y=None):
    b = pyro.param("b", torch.zeros(()))
    w = pyro.sample("w", dist.Normal(0.0, 1.0))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("obs", dist.Normal(w * x[:, 0] + b, 1.0), obs=y)


def discrete_latent(x, y=None):
    k = pyro.sample("k", dist.Bernoulli(0.5))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("obs", dist.Normal(k * x[:, 0], 1.0), obs=y)


def local_latent(x, y=None):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("obs", dist.Normal(z, 1.0), obs=y)


def wrong_plate_size(x, y=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.0))
    with pyro.plate("data", 1000, subsample_size=x.shape[0]):
        pyro.sample("obs", dist.Normal(w * x[:, 0], 1.0), obs=y)


def failing(x, y=None):
    raise RuntimeError("shapes do not match")


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (no_observation, "observes no site.*obs=y"),
        (with_param, r"parameter sites \['b'\].*pyro.param"),
        (discrete_latent, "latent site 'k' is discrete"),
        (local_latent, "latent site 'z' changes with the minibatch"),
        (wrong_plate_size, "plate 'data' of size 1000.*num_data is 96"),
        (failing, r"model\(x, y\) on 1 training example.*shapes do not match"),
    ],
)
def test_bad_models_are_refused_with_the_reason(model, message):
    x, y = _regression_data()
    with pytest.raises(ValueError, match=message):
        bayesflat.sample(model, (x, y), **_kwargs())


def test_other_bad_arguments_are_refused():
    x, y = _regression_data()
    with pytest.raises(TypeError, match="model must be"):
        bayesflat.sample(3, (x, y), **_kwargs())
    with pytest.raises(ValueError, match="likelihood and prior are for torch modules"):
        bayesflat.sample(regression, (x, y), prior=2.0, **_kwargs())
    with pytest.raises(ValueError, match="likelihood and prior are for torch modules"):
        bayesflat.sample(regression, (x, y), likelihood="gaussian", **_kwargs())
    with pytest.raises(ValueError, match="init='model' is for torch modules"):
        bayesflat.sample(regression, (x, y), init="model", **_kwargs())
    with pytest.raises(ValueError, match=r"eval_sets \['test'\] have labels.*inputs only"):
        bayesflat.sample(
            regression, (x, y), eval_sets={"test": (x[:4], y[:4].round().abs())}, **_kwargs()
        )
    learnable = BNN()
    learnable.extra = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match=r"learnable nn.Parameters \['extra'\]"):
        bayesflat.sample(learnable, _class_data(), **_kwargs())


def test_missing_pyro_is_named_with_the_install_command(monkeypatch):
    from bayesflat.target import pyro as target_pyro

    monkeypatch.setitem(sys.modules, "pyro", None)
    with pytest.raises(ImportError, match=r"pip install bayesflat\[pyro\]"):
        target_pyro.import_pyro()


def test_bayesflat_imports_without_pyro():
    code = "import sys, bayesflat; assert 'pyro' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# -- against Pyro's NUTS -------------------------------------------------------------------------

FIXTURES = Path(__file__).with_name("fixtures")
REFERENCE = FIXTURES / "nuts_reference.npz"
_spec = importlib.util.spec_from_file_location("make_nuts", FIXTURES / "make_nuts.py")
make_nuts = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_nuts)

# Step sizes from the Laplace approximation at the mode, whose Hessian of U = N L has
# eigenvalues in [6.5, 61] (logistic, N = 569) and [6.6, 88] (shrinkage, N = 60), in the
# unconstrained space. SGLD's step in U units is lr / N: lr / N * lambda_max = 0.1, so the
# discretisation inflates the stiffest variance by ~5% of its value and the others by less.
# SGHMC: lr / N * lambda_max = 0.09 (h sqrt(lambda_max) = 0.3) and friction alpha = 2 h
# sqrt(lambda_min), near critical damping of the slowest direction. Batches of 90% (logistic)
# and 83% (shrinkage) of the data keep the extra variance of the minibatch gradients (the finite
# population correction (N - |B|) / (N - 1) times the per-example variance over |B|) to a few
# percent of the injected noise.
NUTS_RUNS = {
    ("logistic", "sgld"): dict(lr=0.94, batch_size=512),
    ("logistic", "sghmc"): dict(lr=0.85, alpha=0.2, batch_size=512),
    ("shrinkage", "sgld"): dict(lr=0.0686, batch_size=50),
    ("shrinkage", "sghmc"): dict(lr=0.0617, alpha=0.15, batch_size=50),
}


def _flat(draws: np.ndarray) -> np.ndarray:
    """``(chain, draw, ...)`` as ``(chain, draw, k)``."""
    return draws.reshape(draws.shape[0], draws.shape[1], -1)


def _moments(draws: np.ndarray) -> dict[str, np.ndarray]:
    """Mean and sd of each coordinate with their Monte-Carlo standard errors.

    ``se(mean) = sd / sqrt(ESS_mean)``; ``se(sd) = sd * sqrt((kurtosis - 1) / (4 ESS_sd))``,
    the delta method on ``var(s^2) = sd^4 (kurtosis - 1) / n`` with ``n`` the effective
    sample size of the sd (``sd / sqrt(2 ESS)`` for a normal marginal, kurtosis 3). ESS are
    ArviZ's rank-normalised estimates over all chains.
    """
    import arviz as az

    flat = _flat(draws).astype(np.float64)
    mean = flat.mean(axis=(0, 1))
    sd = flat.std(axis=(0, 1), ddof=1)
    centred = (flat - mean) / sd
    kurtosis = (centred**4).mean(axis=(0, 1))
    ess_mean = np.array([float(az.ess(flat[..., k], method="mean")) for k in range(flat.shape[2])])
    ess_sd = np.array([float(az.ess(flat[..., k], method="sd")) for k in range(flat.shape[2])])
    return {
        "mean": mean,
        "sd": sd,
        "se_mean": sd / np.sqrt(ess_mean),
        "se_sd": sd * np.sqrt((kurtosis - 1) / (4 * ess_sd)),
    }


@pytest.mark.slow
@pytest.mark.parametrize(("name", "sampler"), sorted(NUTS_RUNS))
def test_sgld_and_sghmc_match_nuts_within_monte_carlo_error(name, sampler):
    """Means and sds of every latent coordinate agree with NUTS's.

    The SG-MCMC and the NUTS estimates are independent, so their difference has standard
    error ``sqrt(se_SG^2 + se_NUTS^2)`` (see :func:`_moments`). Each of the 2 x 5 statistics
    of a run must lie within 4 standard errors: a false failure has probability 6e-5 per
    statistic, below 3e-3 over the 40 statistics of the four runs. The step sizes put the
    discretisation and minibatch biases well below these errors.
    """
    reference = np.load(REFERENCE)
    model = getattr(make_nuts, name)
    x, y = torch.from_numpy(reference[f"{name}/x"]), torch.from_numpy(reference[f"{name}/y"])
    trace = bayesflat.sample(
        model, (x, y), sampler=sampler, chains=2, burn_in=300, draws=300, thin=5, seed=1,
        progress=False, loo_points=1, **NUTS_RUNS[(name, sampler)],
    )  # fmt: skip
    posterior = btrace.get_group(trace, "posterior")
    sites = sorted(posterior.data_vars)
    assert sites == sorted(k.split("/")[1] for k in reference.files if k.startswith(name) and
                           k.split("/")[1] not in ("x", "y"))  # fmt: skip
    ours = _moments(np.concatenate([_flat(posterior[s].values) for s in sites], axis=2))
    nuts = _moments(np.concatenate([_flat(reference[f"{name}/{s}"]) for s in sites], axis=2))
    for stat in ("mean", "sd"):
        z = (ours[stat] - nuts[stat]) / np.hypot(ours[f"se_{stat}"], nuts[f"se_{stat}"])
        assert np.all(np.abs(z) < 4), (stat, ours[stat], nuts[stat], z)
