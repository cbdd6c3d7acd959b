"""LOO on the training points, held-out lppd, and sample_stats.lp as ArviZ's log density."""

import math
import warnings

import arviz as az
import numpy as np
import pytest
import torch
from conftest import elpd_loo

from bayesflat import data as bdata
from bayesflat import metrics, models, predictive, report, sample
from bayesflat import trace as btrace

N_TRAIN = 192
DRAWS = 20  # PSIS of ArviZ 1.x needs at least 5 draws in the tail: 2 x 20 draws


@pytest.fixture(scope="module")
def full_batch_run():
    digits = bdata.load_digits_split(val_size=0.1)
    x, y = digits.x_train[:N_TRAIN], digits.y_train[:N_TRAIN]
    sets = {"test": (digits.x_test, digits.y_test), "val": (digits.x_val, digits.y_val)}
    torch.manual_seed(0)
    # Full batch, T = 0 and a tiny step: lp, evaluated before the step, is the log joint at the
    # recorded weights up to the step's change N lr |grad L|^2.
    trace = sample(
        models.MLP(hidden=(16,)), (x, y), sampler="sgld", chains=2, burn_in=2, draws=DRAWS, thin=1,
        batch_size=N_TRAIN, lr=1e-7, temperature=0.0, prior=0.5, eval_sets=sets, progress=False,
    )  # fmt: skip
    return trace


@pytest.fixture(scope="module")
def posterior_run():
    digits = bdata.load_digits_split(val_size=0.1)
    x, y = digits.x_train[:N_TRAIN], digits.y_train[:N_TRAIN]
    sets = {"test": (digits.x_test, digits.y_test), "val": (digits.x_val, digits.y_val)}
    torch.manual_seed(0)
    return sample(
        models.MLP(hidden=(16,)), (x, y), sampler="sgld", chains=2, burn_in=100, draws=DRAWS,
        thin=5, batch_size=32, lr=0.05, eval_sets=sets, progress=False,
    )  # fmt: skip


def test_lp_is_the_log_joint_density_in_nats(full_batch_run):
    groups = btrace.groups(full_batch_run)
    stats, weights = groups["sample_stats"], groups["weights"]
    lp = stats["lp"].values
    log_lik = groups["log_likelihood"]["train"].values.sum(axis=-1)
    sq = sum(np.square(weights[k].values.astype(np.float64)).reshape(2, DRAWS, -1).sum(-1)
             for k in weights.data_vars)  # fmt: skip
    log_prior = -sq / (2 * 0.5**2)  # N(0, 0.5^2), constants dropped
    drift = 2 * N_TRAIN * 1e-7 * stats["grad_norm"].values ** 2
    # float32 network: about 1e-6 relative on each of N_TRAIN log-likelihood terms
    tol = drift + 1e-5 * np.abs(log_lik) + 1e-6 * sq
    assert np.all(lp < 0)
    assert np.all(np.abs(lp - (log_lik + log_prior)) <= tol), lp - (log_lik + log_prior)
    np.testing.assert_allclose(lp, -N_TRAIN * stats["potential"].values, rtol=1e-12)


def test_az_loo_leaves_out_training_points(posterior_run):
    groups = btrace.groups(posterior_run)
    assert list(groups["log_likelihood"].data_vars) == ["train"]
    assert groups["log_likelihood"]["train"].shape[-1] == N_TRAIN
    assert set(groups["heldout_log_likelihood"].data_vars) == {"test", "val"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 40 draws are few for PSIS
        loo = az.loo(posterior_run)
    assert loo.n_data_points == N_TRAIN
    train_ll = groups["log_likelihood"]["train"].values.reshape(2 * DRAWS, -1)
    lppd = float(np.sum(np.log(np.exp(train_ll).mean(axis=0))))
    assert elpd_loo(loo) <= lppd + 1e-9  # leaving a point out never raises its density


def test_report_shows_heldout_lppd_beside_elpd_loo(posterior_run):
    rep = report.build_report(posterior_run, figures=False)
    density = rep.summary["predictive_density"]
    assert density["elpd_loo"]["n"] == N_TRAIN
    assert density["elpd_loo"]["per_point"] == pytest.approx(density["elpd_loo"]["value"] / N_TRAIN)
    test = density["heldout"]["test"]
    bma = predictive.from_trace(posterior_run, "test")
    assert test["per_point"] == pytest.approx(-metrics.nll(bma.mean(), bma.labels), rel=1e-6)
    ll = btrace.groups(posterior_run)["heldout_log_likelihood"]["test"].values.reshape(
        2 * DRAWS, -1
    )
    expected = np.sum(np.log(np.mean(np.exp(ll), axis=0)))
    assert test["lppd"] == pytest.approx(expected, rel=1e-9)
    page = rep.to_html()
    loo_row, test_row = (
        page.index("elpd_loo, training points"),
        page.index("lppd, held-out set test"),
    )
    assert page.index('id="summary"') < loo_row < test_row < page.index('id="settings"')
    assert math.isfinite(test["lppd"])
