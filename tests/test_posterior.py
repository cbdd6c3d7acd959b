"""The target in mean-loss units: likelihoods, priors, scaling by N, validation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from bayesflat._checks import validate_num_data, validate_temperature
from bayesflat.target.torch import (
    FlatPrior,
    GaussianLikelihood,
    GaussianPrior,
    Posterior,
)


def _linear(d: int = 4, k: int = 3) -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(d, k)


def test_categorical_potential_is_mean_nll_plus_prior_over_n():
    model = _linear()
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    post = Posterior(model, num_data=500, prior=GaussianPrior(2.0))
    logits = model(x)
    nll = -torch.log_softmax(logits, -1)[torch.arange(10), y].mean()
    sq = sum(p.pow(2).sum() for p in model.parameters())
    expected = nll + sq / (2 * 2.0**2) / 500
    torch.testing.assert_close(post.potential(x, y), expected, rtol=1e-6, atol=1e-7)


def test_gaussian_prior_gradient_is_weight_decay_one_over_n_s2():
    model = _linear()
    post = Posterior(model, num_data=250, prior=0.5)
    neg_log_prior = post.prior.neg_log_prob(post.named_parameters())
    (neg_log_prior / post.num_data).backward()
    for p in model.parameters():
        torch.testing.assert_close(p.grad, p.detach() / (250 * 0.5**2))


def test_per_parameter_prior_scales_longest_prefix_wins():
    prior = GaussianPrior(1.0, scales={"fc": 2.0, "fc.bias": 3.0})
    assert prior.scale_for("fc.weight") == 2.0
    assert prior.scale_for("fc.bias") == 3.0
    assert prior.scale_for("out.weight") == 1.0
    named = {"fc.weight": torch.ones(2), "fc.bias": torch.ones(3), "out.weight": torch.ones(1)}
    expected = 2 / (2 * 4.0) + 3 / (2 * 9.0) + 1 / 2.0
    assert math.isclose(float(prior.neg_log_prob(named)), expected, rel_tol=1e-6)


def test_gaussian_likelihood_value():
    lik = GaussianLikelihood(noise_std=0.5)
    f, y = torch.tensor([[1.0], [2.0]]), torch.tensor([1.5, 2.0])
    expected = torch.tensor([0.25 / (2 * 0.25), 0.0]) + 0.5 * math.log(2 * math.pi * 0.25)
    torch.testing.assert_close(lik.nll(f, y), expected)


def test_flat_prior_adds_nothing_and_closure_accumulates():
    model = _linear()
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    post = Posterior(model, num_data=6, prior=None)
    assert isinstance(post.prior, FlatPrior)
    closure = post.closure(x, y)
    value = closure()
    torch.testing.assert_close(value, nn.functional.cross_entropy(model(x), y))
    g1 = [p.grad.clone() for p in model.parameters()]
    closure()  # the sampler zeroes gradients; the closure only accumulates
    for p, g in zip(model.parameters(), g1, strict=True):
        torch.testing.assert_close(p.grad, 2 * g)


def test_config_records_n_t_and_prior():
    post = Posterior(_linear(), num_data=100, temperature=0.5, prior=2.0)
    cfg = post.config()
    assert cfg["num_data"] == 100 and cfg["temperature"] == 0.5
    assert cfg["likelihood"] == "categorical" and cfg["prior_scale"] == 2.0


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "10", None, float("nan")])
def test_num_data_validation_names_argument(bad):
    with pytest.raises(ValueError, match="num_data"):
        validate_num_data(bad)
    with pytest.raises(ValueError, match="num_data"):
        Posterior(_linear(), num_data=bad)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), "1", None])
def test_temperature_validation_names_argument(bad):
    with pytest.raises(ValueError, match="temperature"):
        validate_temperature(bad)


def test_other_validation():
    assert validate_num_data(12.0) == 12
    with pytest.raises(ValueError, match="likelihood"):
        Posterior(_linear(), num_data=5, likelihood="poisson")
    with pytest.raises(ValueError, match="prior"):
        Posterior(_linear(), num_data=5, prior="wide")
    with pytest.raises(ValueError, match="scale"):
        GaussianPrior(0.0)
    with pytest.raises(ValueError, match="noise_std"):
        GaussianLikelihood(-1.0)
    with pytest.raises(TypeError, match="model"):
        Posterior("mlp", num_data=5)  # type: ignore[arg-type]


def test_closure_matches_potential_with_the_prior_in_closed_form():
    model = _linear()
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    post = Posterior(model, num_data=40, prior=GaussianPrior(1.0, scales={"bias": 0.5}))
    value = post.closure(x, y)()
    closed = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    expected = post.potential(x, y)
    expected.backward()
    torch.testing.assert_close(value, expected.detach(), rtol=1e-6, atol=1e-7)
    for g, p in zip(closed, model.parameters(), strict=True):
        torch.testing.assert_close(g, p.grad, rtol=1e-6, atol=1e-8)


def test_zero_temperature_sgld_is_sgd_with_weight_decay_one_over_n_s2():
    from bayesflat.samplers import SGLD

    ours, ref = _linear(), _linear()
    n, s = 40, 0.5
    post = Posterior(ours, num_data=n, temperature=0.0, prior=s)
    sampler = SGLD(ours.parameters(), lr=0.1, num_data=n, temperature=0.0)
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1, weight_decay=1.0 / (n * s**2))
    g = torch.Generator().manual_seed(0)
    for _ in range(10):
        x, y = torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)
        sampler.step(post.closure(x, y))
        sgd.zero_grad()
        nn.functional.cross_entropy(ref(x), y).backward()
        sgd.step()
        for p, q in zip(ours.parameters(), ref.parameters(), strict=True):
            assert torch.equal(p, q)


def test_closure_without_value_returns_the_likelihood_part_and_the_same_gradient():
    model = _linear()
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    post = Posterior(model, num_data=40, prior=GaussianPrior(1.0, scales={"bias": 0.5}))
    full = post.closure(x, y)()
    with_value = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    nll = post.closure(x, y, value=False)()
    assert torch.equal(nll, nn.functional.cross_entropy(model(x), y).detach())
    assert not torch.equal(nll, full)  # the prior term is left out of the value
    for g, p in zip(with_value, model.parameters(), strict=True):
        assert torch.equal(g, p.grad)


def test_closure_notices_a_frozen_or_replaced_parameter():
    """The parameter mapping kept between closures is rebuilt when a parameter stops
    requiring gradients or is replaced."""
    model = _linear()
    x, y = torch.randn(10, 4), torch.randint(0, 3, (10,))
    post = Posterior(model, num_data=40, prior=1.0)
    post.closure(x, y)()
    model.bias.requires_grad_(False)
    model.zero_grad(set_to_none=True)
    post.closure(x, y)()
    assert model.bias.grad is None and model.weight.grad is not None
    model.bias = nn.Parameter(torch.full_like(model.bias, 3.0))
    model.weight.grad = None
    expected = post.potential(x, y).detach()
    assert torch.equal(post.closure(x, y)(), expected)
    assert model.bias.grad is not None
