"""Predictive ensembles: stored vs recomputed predictions, uncertainty identities, MC errors."""

import copy

import numpy as np
import pytest
import torch
from scipy.special import softmax

from bayesflat import data as bdata
from bayesflat import metrics, models, predictive, sample
from bayesflat import trace as btrace
from bayesflat.predictive import Ensemble, Estimate


def _digits_sets(flatten: bool = True):
    digits = bdata.load_digits_split(val_size=0.1, flatten=flatten)
    sets = {
        "test": (digits.x_test[:120], digits.y_test[:120]),
        "val": (digits.x_val[:80], digits.y_val[:80]),
        "ood_patches": bdata.image_patches(90, flatten=flatten),
    }
    return digits, sets


def _sample(model, digits, sets, **kwargs):
    return sample(
        model, (digits.x_train, digits.y_train), sampler="sgld", chains=2, draws=3, burn_in=10,
        thin=2, eval_sets=sets, progress=False, lr=0.05, store_logits=True, seed=3, **kwargs,
    )  # fmt: skip


@pytest.fixture(scope="module")
def mlp_run():
    digits, sets = _digits_sets()
    torch.manual_seed(0)
    model = models.MLP(hidden=(32,))
    return model, sets, _sample(model, digits, sets)


def _dirichlet(shape, alpha=0.5, seed=0):
    rng = np.random.default_rng(seed)
    return rng.dirichlet(np.full(shape[-1], alpha), size=shape[:-1])


def test_eval_sets_lists_sets_with_labels_and_skips_logits(mlp_run):
    _, _, trace = mlp_run
    assert predictive.eval_sets(trace) == {"test": True, "val": True, "ood_patches": False}


def test_from_trace_reads_probs_labels_and_logits(mlp_run):
    _, sets, trace = mlp_run
    ens = predictive.from_trace(trace, "test")
    assert ens.probs.shape == (2, 3, 120, 10) and ens.logits.shape == (2, 3, 120, 10)
    np.testing.assert_array_equal(ens.labels, sets["test"][1].numpy())
    ood = predictive.from_trace(trace, "ood_patches")
    assert ood.labels is None and ood.size == 90
    with pytest.raises(ValueError, match="holds"):
        predictive.from_trace(trace, "nope")


@pytest.mark.parametrize("name", ["test", "val", "ood_patches"])
def test_predict_from_weights_equals_stored_predictions(mlp_run, name, device):
    model, sets, trace = mlp_run
    x = sets[name][0] if isinstance(sets[name], tuple) else sets[name]
    stored = predictive.from_trace(trace, name)
    recomputed = predictive.predict(trace, model, x, batch_size=17, device=device)
    np.testing.assert_allclose(recomputed.probs, stored.probs, rtol=0, atol=1e-5)
    np.testing.assert_allclose(recomputed.logits, stored.logits, rtol=0, atol=1e-5)
    np.testing.assert_allclose(recomputed.mean(), stored.mean(), rtol=0, atol=1e-5)


def test_predict_leaves_the_model_unchanged(mlp_run):
    model, sets, trace = mlp_run
    before = {k: v.clone() for k, v in model.state_dict().items()}
    predictive.predict(trace, model, sets["test"][0].numpy())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


def test_predict_with_batchnorm_buffers_equals_stored_predictions():
    digits, sets = _digits_sets(flatten=False)
    torch.manual_seed(1)
    model = models.SmallCNN(width=4, batch_norm=True)
    trace = _sample(model, digits, {"test": sets["test"]})
    stored = predictive.from_trace(trace, "test")
    recomputed = predictive.predict(trace, model, sets["test"][0], batch_size=50)
    np.testing.assert_allclose(recomputed.probs, stored.probs, rtol=0, atol=1e-5)


def test_predict_rejects_a_model_whose_weights_are_not_stored(mlp_run):
    _, sets, trace = mlp_run
    with pytest.raises(ValueError, match="does not store the weights"):
        predictive.predict(trace, models.SmallCNN(), sets["test"][0])
    with pytest.raises(ValueError, match="shape"):
        predictive.predict(trace, models.MLP(hidden=(16,)), sets["test"][0])
    with pytest.raises(TypeError, match="torch.nn.Module"):
        predictive.predict(trace, "mlp", sets["test"][0])


def test_bma_averages_probabilities_not_logits():
    logits = np.array([[[4.0, 0.0]], [[0.0, 0.0]]])  # 2 members, 1 input
    probs = softmax(logits, axis=-1)
    np.testing.assert_allclose(predictive.bma(probs), probs.mean(axis=0), rtol=1e-15)
    assert not np.allclose(predictive.bma(probs), softmax(logits.mean(axis=0), axis=-1))
    members = _dirichlet((3, 4, 6, 5))
    np.testing.assert_allclose(predictive.bma(members), members.mean(axis=(0, 1)), rtol=1e-12)
    np.testing.assert_allclose(predictive.chain_bma(members), members.mean(axis=1), rtol=1e-12)


def test_uncertainty_decomposition_identities():
    members = _dirichlet((2, 6, 40, 4), alpha=0.3, seed=1)
    u = predictive.decompose_uncertainty(members)
    mean = members.mean(axis=(0, 1))
    total = -np.sum(mean * np.log(mean), axis=-1)
    aleatoric = -np.sum(members * np.log(members), axis=-1).mean(axis=(0, 1))
    np.testing.assert_allclose(u.total, total, rtol=1e-12)
    np.testing.assert_allclose(u.aleatoric, aleatoric, rtol=1e-12)
    np.testing.assert_allclose(u.total, u.aleatoric + u.epistemic, rtol=0, atol=1e-12)
    assert np.all(u.epistemic >= 0) and np.all(u.epistemic > 1e-3)
    np.testing.assert_allclose(u.max_prob, mean.max(axis=-1), rtol=1e-12)
    assert np.all((u.variation_ratio >= 0) & (u.variation_ratio <= 1 - 1 / 4))


def test_mutual_information_and_variation_ratio_vanish_when_draws_agree():
    one = _dirichlet((1, 1, 30, 5), seed=2)
    agree = np.repeat(np.repeat(one, 3, axis=0), 4, axis=1)
    u = predictive.decompose_uncertainty(agree)
    np.testing.assert_allclose(u.epistemic, 0.0, atol=1e-12)
    np.testing.assert_allclose(u.total, u.aleatoric, rtol=1e-12)
    np.testing.assert_array_equal(u.variation_ratio, 0.0)


def test_variation_ratio_counts_votes():
    # 4 members vote for classes 0, 0, 1, 2 on the one input: the mode has 2 of 4 votes.
    probs = np.array([[[0.8, 0.1, 0.1]], [[0.6, 0.3, 0.1]], [[0.2, 0.7, 0.1]], [[0.1, 0.1, 0.8]]])
    np.testing.assert_allclose(predictive.variation_ratio(probs), [0.5])


def test_estimate_bootstrap_equals_bootstrap_metric():
    members = _dirichlet((4, 5, 50, 6), seed=3)
    labels = np.random.default_rng(4).integers(0, 6, 50)
    ens = Ensemble(members, labels)

    def fn(avg):
        return {"nll": metrics.nll(avg["p"] / avg["p"].sum(-1, keepdims=True), labels)}

    got = predictive.estimate({"p": members}, fn, method="bootstrap", n_boot=50, seed=7)["nll"]
    value, se = metrics.bootstrap_metric(
        members, lambda p: metrics.nll(p, labels), n_boot=50, seed=7
    )
    assert got.value == pytest.approx(value, rel=1e-10)
    assert got.mc_error == pytest.approx(se, rel=1e-8)
    single = predictive.calibration(
        ens.head(5).final(0).head(1), method="bootstrap", n_boot=30, seed=1
    )
    assert single["nll"].mc_error == 0.0  # one member: every replicate is the same
    one_chain = Ensemble(members[:1], labels)
    got = predictive.calibration(one_chain, method="bootstrap", n_boot=40, seed=2)["nll"]
    value, se = metrics.bootstrap_metric(
        members[:1], lambda p: metrics.nll(p, labels), n_boot=40, seed=2, block="draw"
    )
    assert (got.value, got.mc_error) == (
        pytest.approx(value, rel=1e-10),
        pytest.approx(se, rel=1e-8),
    )


def test_estimate_spread_equals_per_chain_spread():
    members = _dirichlet((5, 3, 40, 4), seed=5)
    labels = np.random.default_rng(6).integers(0, 4, 40)
    got = predictive.calibration(Ensemble(members, labels), method="spread")["accuracy"]
    value, se = metrics.per_chain_spread(members, lambda p: metrics.accuracy(p, labels))
    assert (got.value, got.mc_error) == (pytest.approx(value), pytest.approx(se))


def test_final_ensemble_is_the_mean_over_chains_of_the_last_draw():
    members = _dirichlet((4, 3, 60, 5), seed=8)
    labels = np.random.default_rng(9).integers(0, 5, 60)
    got = predictive.calibration(Ensemble(members, labels), ensemble="final")["nll"]
    per_run = [metrics.nll(members[c, -1], labels) for c in range(4)]
    assert got.value == pytest.approx(np.mean(per_run), rel=1e-12)
    assert got.mc_error == pytest.approx(np.std(per_run, ddof=1) / 2, rel=1e-12)
    one = predictive.calibration(Ensemble(members[:1], labels), ensemble="final")["nll"]
    assert one.mc_error is None


def test_calibration_with_temperature_scaling_fitted_on_val(mlp_run):
    _, _, trace = mlp_run
    test, val = predictive.from_trace(trace, "test"), predictive.from_trace(trace, "val")
    cal = predictive.calibration(test, val, n_boot=20)
    expected = {*predictive.CALIBRATION_METRICS, "temperature"}
    expected |= {f"scaled_{k}" for k in predictive.CALIBRATION_METRICS}
    assert set(cal) == expected
    t = metrics.fit_temperature(np.log(val.mean()), val.labels)
    assert cal["temperature"].value == pytest.approx(t, rel=1e-9)
    scaled = metrics.apply_temperature(np.log(test.mean()), t)
    assert cal["scaled_nll"].value == pytest.approx(metrics.nll(scaled, test.labels), rel=1e-9)
    # Scaling never changes the predicted class.
    assert cal["scaled_accuracy"].value == cal["accuracy"].value
    assert all(np.isfinite(e.mc_error) and e.mc_error >= 0 for e in cal.values())
    with pytest.raises(ValueError, match="no labels"):
        predictive.calibration(predictive.from_trace(trace, "ood_patches"))


def test_ood_detection_uses_the_metrics_of_the_scores(mlp_run):
    _, _, trace = mlp_run
    test, ood = predictive.from_trace(trace, "test"), predictive.from_trace(trace, "ood_patches")
    result = predictive.ood_detection(test, ood, n_boot=20)
    assert set(result) == set(predictive.OOD_SCORES)
    s_in, s_out = predictive.ood_scores(test), predictive.ood_scores(ood)
    mutual_information = metrics.mutual_information_score(test.probs)
    np.testing.assert_allclose(s_in["mutual_information"], mutual_information, atol=1e-12)
    energy = np.mean([metrics.energy_score(z) for z in test.logits.reshape(-1, 120, 10)], axis=0)
    np.testing.assert_allclose(s_in["energy"], energy, rtol=1e-10)
    for score in predictive.OOD_SCORES:
        assert set(result[score]) == set(predictive.OOD_METRICS)
        expected = metrics.auroc(s_in[score], s_out[score])
        assert result[score]["auroc"].value == pytest.approx(expected, rel=1e-12)
    final = predictive.ood_detection(test, ood, ensemble="final")
    assert "mutual_information" not in final and "energy" in final


def test_from_trace_keeps_completed_draws_of_a_stopped_run():
    probs = _dirichlet((2, 4, 7, 3), seed=10).astype(np.float32)
    probs[1, 2:] = np.nan
    trace = btrace.build_trace(
        posterior={"w": np.zeros((2, 4, 1))}, sample_stats={},
        predictions={"test": probs}, observed_data={"test": np.arange(7) % 3},
        attrs={"draws_kept": [4, 2], "complete": False},
    )  # fmt: skip
    ens = predictive.from_trace(trace, "test")
    assert ens.probs.shape == (2, 2, 7, 3)
    np.testing.assert_array_equal(ens.probs, probs[:, :2])


def test_estimate_formats_value_and_error():
    assert Estimate(0.123456, 0.00123).format() == "0.1235 ± 0.0012"
    assert Estimate(0.5, None).format(2) == "0.50"
    assert Estimate(float("nan"), 0.1).format() == "n/a"
    assert Estimate(1.0, float("inf")).to_dict() == {"value": 1.0, "mc_error": None}


def test_ensemble_validates_shapes():
    with pytest.raises(ValueError, match="chain, draw, n, K"):
        Ensemble(np.ones((3, 4)) / 4)
    with pytest.raises(ValueError, match="labels"):
        Ensemble(_dirichlet((1, 2, 5, 3)), labels=np.zeros(4, dtype=int))
    with pytest.raises(ValueError, match="features"):
        predictive.estimate({"a": np.zeros((2, 3)), "b": np.zeros((3, 3))}, lambda a: {})


def test_state_dict_at_reproduces_a_stored_draw(mlp_run):
    model, sets, trace = mlp_run
    net = copy.deepcopy(model).eval()
    net.load_state_dict(predictive.state_dict_at(trace, 1, 2))
    with torch.no_grad():
        probs = torch.softmax(net(sets["test"][0]), -1).numpy()
    stored = predictive.from_trace(trace, "test").probs[1, 2]
    np.testing.assert_allclose(probs, stored, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="outside"):
        predictive.state_dict_at(trace, 2, 0)


def test_softmax_is_computed_row_by_row_in_float32():
    """Each row's probabilities depend on that row alone (not on the slab it is read in, the
    array's layout or its leading shape), which is what makes stored and recomputed
    probabilities equal bit for bit; and they are the softmax to float32 rounding."""
    from scipy.special import softmax as reference

    rng = np.random.default_rng(3)
    for classes in (2, 10, 100):
        z = rng.normal(scale=6.0, size=(3, 17, 11, classes)).astype(np.float32)
        p = predictive.softmax(z)
        assert p.dtype == np.float32 and p.shape == z.shape
        slabs = np.concatenate([predictive.softmax(z[:, a : a + 4]) for a in range(0, 17, 4)], 1)
        assert np.array_equal(p, slabs)
        assert np.array_equal(p, predictive.softmax(np.asfortranarray(z)))
        assert np.array_equal(p[1, 5, 7], predictive.softmax(z[1, 5, 7]))
        z64 = z.astype(np.float64)
        exact = reference(z64, axis=-1)
        # Rounding the shift z - max to float32 moves exp by |z - max| 2^-24 relative; exp,
        # the sum and the division add a few roundings of 2^-24 each.
        shift = np.abs(z64 - z64.max(axis=-1, keepdims=True))
        bound = (shift + 8.0) * 2.0**-24 * exact + 2.0**-149
        assert np.all(np.abs(p - exact) <= bound)
    # a huge logit does not overflow: the row maximum is subtracted first
    big = predictive.softmax(np.array([[1e30, 0.0], [-1e30, 0.0]], dtype=np.float32))
    assert np.array_equal(big, np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32))


def test_class_reduce_folds_each_row_in_class_order():
    import functools

    from bayesflat.metrics._validation import FEW_CLASSES, class_reduce

    rng = np.random.default_rng(5)
    for classes in (2, 10, FEW_CLASSES, FEW_CLASSES + 1, 100):
        a = rng.normal(size=(3, 7, classes)).astype(np.float32)
        assert np.array_equal(class_reduce(np.maximum, a), a.max(axis=-1))
        total = class_reduce(np.add, a)
        assert total.dtype == np.float32 and total.shape == (3, 7)
        if classes <= FEW_CLASSES:  # the fold itself, row by row
            fold = functools.reduce(np.add, (a[..., k] for k in range(classes)))
            assert np.array_equal(total, fold)
            assert np.array_equal(class_reduce(np.add, a[1:2, 3:5]), fold[1:2, 3:5])
        exact = a.astype(np.float64).sum(axis=-1)
        assert np.all(np.abs(total - exact) <= classes * 2.0**-24 * np.abs(a).sum(axis=-1))
