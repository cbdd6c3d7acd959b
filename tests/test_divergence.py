"""Divergent draws: the per-draw checks, sample_stats.diverging, and sample(on_divergence=...)."""

import math

import numpy as np
import pytest
import torch

from bayesflat import SamplingError, models, sample
from bayesflat import trace as btrace
from bayesflat.diagnostics import trace_verdict
from bayesflat.diagnostics.divergence import (
    DivergenceWarning,
    diverging_chains,
    diverging_reasons,
)
from bayesflat.run.api import _on_divergence


def test_non_finite_potential_diverges():
    assert diverging_reasons(potential=math.nan)
    assert diverging_reasons(potential=math.inf)
    assert diverging_reasons(potential=2.3) == []


def test_weights_ten_prior_stds_above_diverge():
    scales = {"w": 0.1, "b": 1.0}
    assert diverging_reasons(potential=1.0, weight_rms={"w": 0.99, "b": 9.9},
                             prior_scales=scales) == []  # fmt: skip
    (reason,) = diverging_reasons(potential=1.0, weight_rms={"w": 1.01, "b": 0.1},
                                  prior_scales=scales)  # fmt: skip
    assert "weights w" in reason and "prior std 0.1" in reason
    assert diverging_reasons(potential=1.0, weight_rms={"w": 3e8}, prior_scales=None) == []


def test_training_predictions_at_chance_diverge():
    labels = np.repeat(np.arange(4), [10, 10, 10, 70])
    freq = np.array([0.1, 0.1, 0.1, 0.7])
    chance = -np.sum(freq * np.log(freq))  # the best constant prediction's NLL
    constant = np.log(freq[labels])  # predicting the label frequencies everywhere
    assert -constant.mean() == pytest.approx(chance)
    assert diverging_reasons(potential=1.0, train_log_likelihood=constant, train_labels=labels)
    better = constant + 0.02 * chance  # 2 % better than chance
    assert diverging_reasons(potential=1.0, train_log_likelihood=better, train_labels=labels) == []


def _data(n=128, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=gen)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return x, y


def _blown_up_model():
    torch.manual_seed(0)
    model = models.MLP(in_features=6, hidden=(8,), num_classes=3)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1000.0)
    return model


def _run(model, **kwargs):
    options = dict(sampler="sgld", chains=2, burn_in=2, draws=3, thin=1, batch_size=32,
                   lr=1e-9, progress=False, init="model")  # fmt: skip
    return sample(model, _data(), **{**options, **kwargs})


def test_a_run_far_above_the_prior_scale_records_diverging_and_warns():
    with pytest.warns(DivergenceWarning, match=r"2 of 2 chains .*chain 0: 3, chain 1: 3"):
        trace = _run(_blown_up_model())
    stats = btrace.groups(trace)["sample_stats"]
    assert stats["diverging"].dtype == bool and stats["diverging"].values.all()
    assert diverging_chains(trace) == {0: 3, 1: 3}
    v = trace_verdict(trace)
    assert v.status == "fail" and v.reasons[0].check == "divergence"
    assert "chain 0: 3, chain 1: 3" in v.to_text()


def test_a_sound_run_records_no_divergence(recwarn):
    torch.manual_seed(0)
    model = models.MLP(in_features=6, hidden=(8,), num_classes=3)
    trace = _run(model, init="reset", lr=0.05, burn_in=200)
    assert not btrace.groups(trace)["sample_stats"]["diverging"].values.any()
    assert not [w for w in recwarn if issubclass(w.category, DivergenceWarning)]


def test_on_divergence_raise_and_all_chains_excluded_raise_with_the_trace(tmp_path):
    with pytest.raises(SamplingError, match="2 of 2 chains") as err:
        _run(_blown_up_model(), on_divergence="raise", output=tmp_path / "run")
    assert err.value.trace is not None
    saved = btrace.load(tmp_path / "run")
    assert btrace.groups(saved)["sample_stats"]["diverging"].dtype == bool
    with pytest.raises(SamplingError, match="every chain diverged"):
        _run(_blown_up_model(), on_divergence="exclude")
    with pytest.raises(ValueError, match="on_divergence"):
        _run(_blown_up_model(), on_divergence="drop")


def test_on_divergence_exclude_drops_the_diverging_chains():
    rng = np.random.default_rng(0)
    diverging = np.zeros((3, 5), bool)
    diverging[1, 2:] = True
    trace = btrace.build_trace(
        posterior={"w": rng.normal(size=(3, 5, 2))},
        sample_stats={"lp": rng.normal(size=(3, 5)), "diverging": diverging},
        attrs={"chains": 3},
    )
    with pytest.warns(DivergenceWarning, match="chain 1: 3"):
        kept = _on_divergence(trace, "exclude")
    groups = btrace.groups(kept)
    np.testing.assert_array_equal(
        groups["posterior"]["w"].values, btrace.groups(trace)["posterior"]["w"].values[[0, 2]]
    )
    attrs = btrace.trace_attrs(kept)
    assert list(attrs["excluded_chains"]) == [1] and attrs["chains"] == 2
    assert not groups["sample_stats"]["diverging"].values.any()
