"""fSGLD's perturbation scale against the prior scale of the weights it perturbs."""

import warnings

import pytest
import torch

from bayesflat import models, sample
from bayesflat.samplers.fsgld import coupled_sigma
from bayesflat.samplers.perturbation import ScaleWarning

N = 128


def _data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, 6, generator=gen)
    return x, (x[:, 0] > 0).long()


def _run(**kwargs):
    torch.manual_seed(0)
    # T = 1: the coupled sigma below is the Bayes posterior's
    options = dict(
        chains=1, burn_in=1, draws=1, thin=1, batch_size=32, lr=1e-3, progress=False,
        temperature=1.0,
    )  # fmt: skip
    return sample(models.MLP(in_features=6, hidden=(4,), num_classes=2), _data(),
                  **{**options, **kwargs})  # fmt: skip


def test_coupled_sigma_above_the_prior_std_warns_naming_the_tensors():
    sigma = coupled_sigma(1.0, N, 0.1)
    assert sigma == pytest.approx(N ** (-1.1 / 4))  # 0.263
    with pytest.warns(ScaleWarning, match=r"sigma = 0\.263 .*prior std of 4 perturbed"):
        _run(sampler="fsgld", prior=0.1)


def test_no_warning_when_sigma_is_below_the_prior_std():
    with warnings.catch_warnings():
        warnings.simplefilter("error", ScaleWarning)
        _run(sampler="fsgld", prior=1.0)
        _run(sampler="fsgld", prior=0.1, sigma=0.05)
        _run(sampler="sgld", prior=0.01)


def test_per_layer_prior_scales_are_checked_per_tensor():
    from bayesflat.target.torch import GaussianPrior

    prior = GaussianPrior(scale=1.0, scales={"1.weight": 0.1})
    with pytest.warns(ScaleWarning, match=r"1 perturbed parameter tensors: 1\.weight \(0\.1\)"):
        _run(sampler="fsgld", prior=prior)


def test_report_shows_sigma_beside_the_prior_std():
    from bayesflat import report

    with pytest.warns(ScaleWarning):
        trace = _run(sampler="fsgld", prior=0.1, draws=4, chains=2, eval_sets={"test": _data()})
    run = report.build_report(trace, figures=False).summary["run"]
    keys = list(run)
    assert keys.index("sigma_vs_prior_std") == keys.index("prior_scale") + 1
    block = run["sigma_vs_prior_std"]
    assert block["sigma"] == pytest.approx(coupled_sigma(1.0, N, 0.1))
    assert block["smallest_prior_std"] == 0.1
    assert block["ratio"] == pytest.approx(block["sigma"] / 0.1)
    assert "above the prior std" in block["note"]
