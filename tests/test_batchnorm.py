"""BatchNorm running statistics under weight perturbation.

Every gradient estimator that evaluates the network away from ``theta`` does it inside
``GradientEstimator.away_from_theta``: the running statistics of the watched model are updated
only by passes at ``theta``, at most once per step, and equal a clean training-mode pass there.
The run engine recomputes the statistics of every kept draw of such samplers at its weights.
BatchNorm buffers are stored with the weights, never as posterior variables.
"""

from __future__ import annotations

import copy

import arviz as az
import numpy as np
import pytest
import torch
from torch import nn
from torch.optim.swa_utils import update_bn

import bayesflat
from bayesflat import samplers
from bayesflat import trace as btrace
from bayesflat.target.torch import Posterior


def _data(n: int = 64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = (x @ torch.randn(6, 3, generator=g)).argmax(dim=1)
    return x, y


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))


# Options that make every sampler take one ordinary step on the small network.
OPTIONS = {
    "sgd": {"temperature": 0.0},
    "sam": {"rho": 0.3},
    "rwp": {"sigma": 0.1},
    "nso": {"sigma": 0.1},
    "escape": {"rho": 0.3, "eps0": 1e3},
    "escape_sam": {"rho": 0.3, "eps0": 1e3},
    "fsgld": {"sigma": 0.1},
    "fpsgld": {"sigma": 0.1},
    "fsghmc": {"sigma": 0.1},
    "cfsgld": {"sigma": 0.1, "exploration": 0.0},
    "swa": {"start": 0},
    "swag": {"start": 0},
}


def _one_step(name: str, options: dict, model: nn.Module, x, y) -> samplers.Sampler:
    opt = samplers.get(name)(
        model.parameters(), lr=0.05, num_data=64,
        generator=torch.Generator().manual_seed(3), **options,
    )  # fmt: skip
    opt.planned_steps(0, 10, 1)
    opt.bind_schedule(5, 10, 1)
    opt.watch(model)
    temperature = options.get("temperature", 1.0)
    opt.step(Posterior(model, num_data=64, temperature=temperature).closure(x, y))
    return opt


@pytest.mark.parametrize("name", samplers.available())
def test_one_step_updates_the_statistics_at_most_once_and_only_at_theta(name):
    x, y = _data()
    model = _net()
    clean = copy.deepcopy(model)
    with torch.no_grad():
        clean(x[:16])  # one training-mode pass at the weights before the step
    opt = _one_step(name, OPTIONS.get(name, {}), model, x[:16], y[:16])
    bn, bn_clean, bn_init = model[1], clean[1], _net()[1]
    updates = int(bn.num_batches_tracked)
    if opt.estimator.moves_weights and name not in ("sam", "escape", "escape_sam"):
        # perturbed-gradient estimators take no pass at theta: the statistics stay put
        assert updates == 0, name
        reference = bn_init
    else:
        # plain gradients, and SAM's (and escape's) first pass, are at theta
        assert updates == 1, name
        reference = bn_clean
    assert torch.equal(bn.running_mean, reference.running_mean)
    assert torch.equal(bn.running_var, reference.running_var)
    assert bn.track_running_stats


@pytest.mark.parametrize("num_perturbations", [1, 2])
def test_fsgld_statistics_move_only_when_the_model_is_not_watched(num_perturbations):
    x, y = _data()
    watched, unwatched = _net(), _net()
    for model, watch in ((watched, True), (unwatched, False)):
        opt = samplers.FSGLD(model.parameters(), lr=0.05, num_data=64,
                             num_perturbations=num_perturbations,
                             generator=torch.Generator().manual_seed(3))  # fmt: skip
        if watch:
            opt.watch(model)
        opt.step(Posterior(model, num_data=64).closure(x[:16], y[:16]))
    # today's behaviour without watch: one update per perturbed pass
    assert int(unwatched[1].num_batches_tracked) == num_perturbations
    assert int(watched[1].num_batches_tracked) == 0
    # the chain does not depend on the statistics: the weights are identical
    for a, b in zip(watched.parameters(), unwatched.parameters(), strict=True):
        assert torch.equal(a, b)


def test_clean_weight_pass_gives_the_one_clean_update():
    x, y = _data()
    model = _net()
    clean = copy.deepcopy(model)
    with torch.no_grad():
        clean(x[:16])
    opt = samplers.RWP(model.parameters(), lr=0.05, num_data=64, sigma=0.2, clean_weight=0.5,
                       generator=torch.Generator().manual_seed(0))  # fmt: skip
    opt.watch(model)
    opt.step(Posterior(model, num_data=64, temperature=0.0).closure(x[:16], y[:16]))
    assert int(model[1].num_batches_tracked) == 1
    assert torch.equal(model[1].running_mean, clean[1].running_mean)
    assert torch.equal(model[1].running_var, clean[1].running_var)


def test_away_from_theta_restores_tracking_after_an_error():
    model = _net()
    est = samplers.FSGLD(model.parameters(), lr=0.1, num_data=10).estimator
    est.watch(model)
    with pytest.raises(RuntimeError), est.away_from_theta():
        assert not model[1].track_running_stats
        raise RuntimeError
    assert model[1].track_running_stats


def _sample(name: str, **kw):
    x, y = _data(96)
    xt, yt = _data(30, seed=1)
    args = dict(chains=1, burn_in=4, draws=3, thin=2, batch_size=16, seed=2, progress=False,
                lr=0.05, eval_sets={"test": (xt, yt)})  # fmt: skip
    args.update(kw)
    return bayesflat.sample(_net(), (x, y), sampler=name, **args), x


@pytest.mark.parametrize(("name", "options"), [("fsgld", {}), ("sam", {"rho": 0.2})])
def test_kept_draws_carry_statistics_recomputed_at_their_weights(name, options):
    tr, x = _sample(name, **options)
    weights = btrace.groups(tr)["weights"]
    model = _net()
    for draw in range(3):
        state = {k: torch.from_numpy(weights[k].values[0, draw]) for k in weights.data_vars}
        model.load_state_dict({**model.state_dict(), **state})
        update_bn([x[i : i + 16] for i in range(0, 96, 16)], model)
        for key in ("running_mean", "running_var"):
            recorded = weights[f"1.{key}"].values[0, draw]
            expected = getattr(model[1], key).numpy()
            np.testing.assert_allclose(recorded, expected, rtol=1e-5, atol=1e-6)
    # ... and the recorded predictions are the eval-mode outputs with those statistics
    xt, _ = _data(30, seed=1)
    model.eval()
    with torch.no_grad():
        probs = torch.softmax(model(xt), dim=-1).numpy()
    np.testing.assert_allclose(
        btrace.groups(tr)["predictions"]["test"].values[0, -1], probs, rtol=1e-5, atol=1e-6
    )


def test_batchnorm_buffers_are_not_posterior_variables():
    tr, _ = _sample("fsgld")
    groups = btrace.groups(tr)
    parameters = [n for n, _ in _net().named_parameters()]
    for name, var in groups["posterior"].data_vars.items():
        assert "running" not in name and "num_batches" not in name
        if "tensor" in var.dims:
            assert list(var["tensor"].values) == parameters
    assert "1.running_mean" in groups["weights"].data_vars
    rows = [str(r) for r in az.summary(tr).index]
    assert len(rows) == len(parameters) + 8  # weight norms and projections only
    assert not any("running" in r or "num_batches" in r for r in rows)


def test_resume_with_batchnorm_equals_the_uninterrupted_run(tmp_path):
    from test_run import _InterruptAt, _zero, assert_same_draws

    x, y = _data(96)
    kw = dict(sampler="fsgld", chains=1, burn_in=4, draws=6, thin=2, batch_size=16, seed=2,
              progress=False, lr=0.05, eval_sets={"test": _data(30, seed=1)})  # fmt: skip
    straight = bayesflat.sample(_net(), (x, y), stats_fns={"probe": _zero}, **kw)
    with pytest.raises(KeyboardInterrupt):
        bayesflat.sample(_net(), (x, y), stats_fns={"probe": _InterruptAt(4)}, output=tmp_path,
                         checkpoint_every=1, **kw)  # fmt: skip
    resumed = bayesflat.resume(tmp_path, _net(), (x, y), eval_sets=kw["eval_sets"],
                               stats_fns={"probe": _zero}, progress=False)  # fmt: skip
    assert_same_draws(straight, resumed)
