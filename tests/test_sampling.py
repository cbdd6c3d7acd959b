"""The sampling driver: trace contents, seeds, data forms, failures that keep their draws."""

from __future__ import annotations

import math

import arviz as az
import matplotlib
import numpy as np
import pytest
import torch
from conftest import ARVIZ_1, elpd_loo
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import bayesflat
from bayesflat import trace as btrace

matplotlib.use("Agg")


def _toy(n: int = 96, d: int = 5, k: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, k, generator=g)
    y = (x @ w + 0.3 * torch.randn(n, k, generator=g)).argmax(dim=1)
    return x, y


def _model(d: int = 5, k: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(d, 8), nn.Tanh(), nn.Linear(8, k))


def _run(**kw):
    x, y = _toy()
    xt, yt = _toy(40, seed=1)
    ood = 3.0 * torch.randn(10, 5, generator=torch.Generator().manual_seed(5))
    args = dict(
        sampler="fsgld", chains=2, burn_in=20, draws=6, thin=3, batch_size=16,
        eval_sets={"test": (xt, yt), "ood": ood}, seed=3,
        progress=False, lr=0.05,
    )  # fmt: skip
    args.update(kw)
    # the numbers below are for the Bayes posterior, T = 1 (an optimiser runs at T = 0)
    if "temperature" not in kw and bayesflat.samplers.entry(args["sampler"]).is_sampler:
        args["temperature"] = 1.0
    model = args.pop("model", _model())
    return bayesflat.sample(model, args.pop("train_data", (x, y)), **args)


def test_trace_groups_shapes_and_attrs():
    tr = _run()
    groups = btrace.groups(tr)
    assert set(groups) >= {"posterior", "weights", "sample_stats", "predictions", "log_likelihood"}
    assert groups["weights"]["0.weight"].shape == (2, 6, 8, 5)
    post = groups["posterior"]
    assert list(post["tensor"].values) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    norms = [
        np.sqrt((groups["weights"][k].values.astype(np.float64) ** 2).reshape(2, 6, -1).sum(-1))
        for k in post["tensor"].values
    ]
    np.testing.assert_allclose(post["weight_norm"].values, np.stack(norms, -1), rtol=1e-5)
    assert post["projection"].shape == (2, 6, 8)
    stats = groups["sample_stats"]
    for name in ("lp", "potential", "step_size", "temperature", "sigma", "grad_norm", "step"):
        assert stats[name].shape == (2, 6), name
    # Kept draws are every third step after 20 steps of burn-in.
    np.testing.assert_array_equal(stats["step"].values[0], [22, 25, 28, 31, 34, 37])
    np.testing.assert_allclose(stats["sigma"].values, (1.0 / 96) ** (1.1 / 4))
    preds = groups["predictions"]
    assert preds["test"].shape == (2, 6, 40, 3)
    assert preds["ood"].shape == (2, 6, 10, 3)
    np.testing.assert_allclose(preds["test"].values.sum(-1), 1.0, atol=1e-5)
    ll = groups["heldout_log_likelihood"]["test"].values
    labels = groups["observed_data"]["test"].values
    p_true = np.take_along_axis(preds["test"].values, labels[None, None, :, None], axis=-1)[..., 0]
    np.testing.assert_allclose(ll, np.log(p_true), rtol=1e-5, atol=1e-6)
    # log_likelihood holds the training points (what az.loo leaves out, one at a time).
    assert groups["log_likelihood"]["train"].shape == (2, 6, 96)
    np.testing.assert_array_equal(groups["observed_data"]["train"].values, _toy()[1].numpy())
    attrs = btrace.trace_attrs(tr)
    assert attrs["sampler"] == "fsgld"
    assert attrs["num_data"] == 96 and attrs["temperature"] == 1.0 and attrs["seed"] == 3
    assert attrs["eta"] == 0.1 and attrs["chains"] == 2 and attrs["complete"] is True
    assert attrs["created_by"] == "bayesflat"


def test_potential_recorded_matches_minibatch_scale():
    tr = _run(draws=3)
    stats = btrace.groups(tr)["sample_stats"]
    potential = stats["potential"].values
    # Mean-loss units: a 3-class cross-entropy near log(3) plus a small prior term.
    assert np.all(np.isfinite(potential)) and np.all(potential > 0)
    assert np.all(potential < 3 * math.log(3))
    # lp is ArviZ's log density: the log joint estimated on the minibatch, -N L_B.
    np.testing.assert_allclose(stats["lp"].values, -96 * potential, rtol=1e-12)


def test_same_seed_same_trace_and_chains_differ():
    a = btrace.groups(_run())
    b = btrace.groups(_run())
    for group in ("posterior", "weights", "predictions"):
        for name in a[group].data_vars:
            np.testing.assert_array_equal(a[group][name].values, b[group][name].values)
    w = a["weights"]["0.weight"].values
    assert not np.array_equal(w[0], w[1])
    c = btrace.groups(_run(seed=4))
    assert not np.array_equal(c["weights"]["0.weight"].values, w)


def test_independent_initialisations_and_model_untouched():
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    tr = _run(model=model, sampler="sgd", burn_in=0, draws=1, thin=1, lr=1e-6)
    for p, q in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, q)
    w = btrace.groups(tr)["weights"]["0.weight"].values
    # One tiny SGD step: each chain sits at its own initialisation.
    assert np.abs(w[0, 0] - w[1, 0]).mean() > 0.05
    tr_model = _run(model=model, sampler="sgd", burn_in=0, draws=1, thin=1, lr=1e-6, init="model")
    w_model = btrace.groups(tr_model)["weights"]["0.weight"].values
    np.testing.assert_allclose(w_model[:, 0], before[0].numpy()[None].repeat(2, 0), atol=1e-5)


def test_sgd_runs_at_zero_temperature():
    tr = _run(sampler="sgd")
    attrs = btrace.trace_attrs(tr)
    assert attrs["temperature"] == 0.0
    np.testing.assert_array_equal(btrace.groups(tr)["sample_stats"]["temperature"].values, 0.0)
    with pytest.raises(ValueError, match="temperature must be 0"):
        _run(sampler="sgd", temperature=1.0)


@pytest.mark.parametrize("form", ["numpy", "dataset", "loader"])
def test_train_data_forms(form):
    x, y = _toy()
    data = {
        "numpy": (x.numpy(), y.numpy()),
        "dataset": TensorDataset(x, y),
        "loader": DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True),
    }[form]
    tr = _run(train_data=data, sampler="sgld")
    assert btrace.trace_attrs(tr)["num_data"] == 96
    assert np.all(np.isfinite(btrace.groups(tr)["sample_stats"]["lp"].values))


def test_non_finite_potential_stops_with_draws_kept(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(bayesflat.SamplingError, match=r"chain 0, step \d+") as info:
        _run(sampler="sgd", lr=1e6, burn_in=0, thin=1, draws=50, output=out)
    err = info.value
    assert err.chain == 0
    kept = btrace.trace_attrs(err.trace)["draws_kept"]
    assert kept[0] == err.step  # every step before the failing one was kept (thin=1)
    assert btrace.trace_attrs(err.trace)["complete"] is False
    loaded = btrace.trace_attrs(btrace.load(out))
    assert loaded["complete"] is False and loaded["draws_kept"] == kept


def test_failure_in_later_chain_keeps_earlier_chains(tmp_path):
    calls = {"n": 0}

    class Exploding(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 3)

        def forward(self, x):
            if self.training:
                calls["n"] += 1
                if calls["n"] == 40:
                    return self.lin(x) * float("nan")
            return self.lin(x)

    with pytest.raises(bayesflat.SamplingError, match="chain 1") as info:
        _run(model=Exploding(), sampler="sgld", burn_in=5, draws=10, thin=3,
             output=tmp_path / "run")  # fmt: skip
    groups = btrace.groups(info.value.trace)
    lp = groups["sample_stats"]["lp"].values
    assert lp.shape == (2, 10)
    assert np.all(np.isfinite(lp[0]))
    n_kept = btrace.trace_attrs(info.value.trace)["draws_kept"][1]
    assert np.all(np.isfinite(lp[1, :n_kept])) and np.all(np.isnan(lp[1, n_kept:]))


def test_output_saved_and_loads_equal(tmp_path):
    tr = _run(output=tmp_path / "run")
    assert (tmp_path / "run" / "trace.nc").is_file()
    loaded = btrace.load(tmp_path / "run")
    for name, ds in btrace.groups(tr).items():
        assert ds.equals(btrace.groups(loaded)[name]), name


def test_arviz_functions_run_on_a_sampled_trace():
    tr = _run(draws=20, chains=2)
    summary = az.summary(tr)
    # Per-tensor weight norms and eight random projections: a summary of a few rows, whatever
    # the size of the network (the weights themselves are in the weights group).
    assert len(summary) == 4 + 8
    assert np.all(np.isfinite(az.ess(tr)["weight_norm"].values))
    assert np.all(np.isfinite(az.rhat(tr)["weight_norm"].values))
    assert (az.plot_trace_dist(tr) if ARVIZ_1 else az.plot_trace(tr)) is not None
    matplotlib.pyplot.close("all")
    with pytest.warns(UserWarning):  # 40 draws are few for PSIS; the estimate is still finite
        loo = az.loo(tr)
    assert math.isfinite(elpd_loo(loo))


def test_store_weights_subset_and_logits():
    tr = _run(store_weights=["2.bias"], store_logits=True)
    groups = btrace.groups(tr)
    assert list(groups["weights"].data_vars) == ["2.bias"]
    logits = groups["predictions"]["test_logits"].values
    probs = groups["predictions"]["test"].values
    np.testing.assert_allclose(
        torch.softmax(torch.from_numpy(logits), -1).numpy(), probs, rtol=1e-4, atol=1e-6
    )


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"chains": 0}, "chains"),
        ({"draws": 0}, "draws"),
        ({"thin": 0}, "thin"),
        ({"burn_in": -1}, "burn_in"),
        ({"batch_size": 1000}, "batch_size"),
        ({"sampler": "nope"}, "unknown sampler"),
        ({"bogus": 1}, "does not take option"),
        ({"init": "zeros"}, "init"),
        ({"eval_sets": {"bad name": torch.zeros(2, 5)}}, "eval_sets"),
        ({"eval_sets": {"t": (torch.zeros(2, 5), torch.zeros(3))}}, "labels"),
        ({"loo_points": 0}, "loo_points"),
        ({"eval_sets": {"train": torch.zeros(2, 5)}}, "reserved"),
        ({"eval_sets": {"t": (torch.zeros(2, 5), torch.tensor([0.5, 1.0]))}}, "integer"),
        ({"temperature": -1.0}, "temperature"),
        ({"num_data": 0}, "num_data"),
        ({"store_weights": ["nope"]}, "store_weights"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _run(**kwargs)


def test_removed_log_likelihood_set_is_explained():
    with pytest.raises(TypeError, match="log_likelihood_set.*training points"):
        _run(log_likelihood_set="ood")


def test_bad_train_data_type():
    with pytest.raises(TypeError, match="train_data"):
        _run(train_data="digits")


def test_public_names():
    assert bayesflat.sample is bayesflat.run.sample
    assert bayesflat.save is btrace.save and bayesflat.load is btrace.load


def test_stats_fns_are_recorded_per_draw():
    def weight_norm(model, sampler):
        return float(sum(p.pow(2).sum() for p in model.parameters()).sqrt())

    tr = _run(
        stats_fns={
            "weight_norm": weight_norm,
            "lr_seen": lambda m, s: s.param_groups[0]["lr"],
            "bias": lambda m, s: m[2].bias.detach().numpy().copy(),
        }
    )
    stats = btrace.groups(tr)["sample_stats"]
    post = btrace.groups(tr)["weights"]
    direct = np.sqrt(sum((post[k].values.astype(np.float64) ** 2).reshape(2, 6, -1).sum(-1)
                         for k in post.data_vars))  # fmt: skip
    np.testing.assert_allclose(stats["weight_norm"].values, direct, rtol=1e-5)
    np.testing.assert_array_equal(stats["lr_seen"].values, 0.05)
    assert stats["bias"].shape == (2, 6, 3)
    np.testing.assert_allclose(stats["bias"].values, post["2.bias"].values, rtol=1e-6)


def test_failure_before_the_first_draw_raises_without_a_trace(tmp_path):
    with pytest.raises(bayesflat.SamplingError, match="0 draws kept") as info:
        _run(sampler="sgd", lr=1e6, burn_in=200, output=tmp_path / "run")
    assert info.value.trace is None and info.value.chain == 0
    assert not (tmp_path / "run" / "trace.nc").exists()
