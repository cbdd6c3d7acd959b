"""Metrics computed slab by slab of draws: the same numbers as on every draw at once, in
memory that does not grow with the number of draws."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest

from bayesflat import predictive, report
from bayesflat import trace as btrace
from bayesflat._draws import DrawReducer
from bayesflat.diagnostics.convergence import functionals, weight_projections


def _features(chains=3, draws=37, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "a": rng.normal(size=(chains, draws, 5, 4)).astype(np.float32),
        "b": rng.normal(size=(chains, draws, 6)),
    }


def _reduce(features, step, **kwargs):
    chains, draws = next(iter(features.values())).shape[:2]
    reducer = DrawReducer(chains, draws, **kwargs)
    for d0 in range(0, draws, step):
        reducer.add({k: v[:, d0 : d0 + step] for k, v in features.items()})
    return reducer.result()


@pytest.mark.parametrize("step", [1, 4, 36, 37])
def test_reducer_sums_equal_the_sums_of_all_draws(step):
    features = _features()
    chains, draws = 3, 37
    length, points = 5, [1, 7, 20, 37]
    weights = np.random.default_rng(1).integers(0, 3, size=(6, chains, draws)).astype(float)
    sums = _reduce(features, step, batch_length=length, boot_weights=weights, points=points)
    per_chain = draws // length
    used = per_chain * length
    for key, value in features.items():
        v = value.astype(np.float64)
        np.testing.assert_allclose(sums.chain[key], v.sum(axis=1), rtol=1e-12)
        np.testing.assert_array_equal(sums.last[key], v[:, -1])
        batches = v[:, draws - used :].reshape(chains, per_chain, length, *v.shape[2:])
        np.testing.assert_allclose(
            sums.batch[key], batches.sum(axis=2).reshape(-1, *v.shape[2:]), rtol=1e-12
        )
        boot = np.einsum("rcd,cd...->r...", weights, v)
        np.testing.assert_allclose(sums.boot[key], boot, rtol=1e-12)
        for k in points:
            np.testing.assert_allclose(sums.prefix[k][key], v[:, :k].sum(axis=1), rtol=1e-12)
            np.testing.assert_array_equal(sums.at[k][key], v[:, k - 1])
        np.testing.assert_allclose(sums.total()[key], v.mean(axis=(0, 1)), rtol=1e-12)


def test_reducer_refuses_slabs_beyond_the_announced_draws():
    features = _features(draws=4)
    reducer = DrawReducer(3, 3)
    with pytest.raises(ValueError, match="more than the 3 draws"):
        reducer.add(features)
    reducer = DrawReducer(3, 5)
    reducer.add(features)
    with pytest.raises(ValueError, match="covered 4 of the 5 draws"):
        reducer.result()


def _fn(avg):
    p = avg["a"]
    return {"m": float(np.tanh(p).mean()), "top": float(p.max(axis=-1).mean()),
            "b": float(np.mean(avg["b"] ** 2))}  # fmt: skip


@pytest.mark.parametrize(
    ("ensemble", "method", "chains"),
    [("bma", "batch", 3), ("bma", "spread", 3), ("bma", "bootstrap", 3),
     ("bma", "bootstrap", 1), ("final", "batch", 3)],
)  # fmt: skip
def test_estimate_from_slabs_equals_the_estimate_on_all_draws(ensemble, method, chains):
    features = _features(chains=chains)
    whole = predictive.estimate(features, _fn, ensemble=ensemble, method=method, n_boot=30,
                                seed=3, batch_size=6)  # fmt: skip
    reducer = predictive._reducer(chains, 37, ensemble, method, 30, 3, 6)
    for d0 in range(0, 37, 2):
        reducer.add({k: v[:, d0 : d0 + 2] for k, v in features.items()})
    sliced = predictive.estimate_sums(
        reducer.result(), _fn, ensemble=ensemble, method=method, n_boot=30, seed=3
    )
    assert sliced.keys() == whole.keys()
    for key, est in whole.items():
        # the same sums in another order: equal to float64 rounding
        assert sliced[key].value == pytest.approx(est.value, rel=1e-12)
        if est.mc_error is None:
            assert sliced[key].mc_error is None
        else:
            assert sliced[key].mc_error == pytest.approx(est.mc_error, rel=1e-9, abs=1e-15)


def test_draw_chunks_cover_every_draw_in_order():
    import xarray as xr

    values = np.arange(2 * 11 * 3, dtype=np.float32).reshape(2, 11, 3)
    var = xr.DataArray(values, dims=("chain", "draw", "x"))
    slabs = list(btrace.draw_chunks(var, chunk_bytes=2 * 3 * 8 * 4))  # four draws a slab
    assert [d0 for d0, _ in slabs] == [0, 4, 8]
    np.testing.assert_array_equal(np.concatenate([s for _, s in slabs], axis=1), values)
    assert [d0 for d0, _ in btrace.draw_chunks(var, chunk_bytes=1, draws=3)] == [0, 1, 2]


def _trace(chains=3, draws=30, n=60, k=5, n_train=40, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, k, n)
    logits = rng.normal(size=(chains, draws, n, k)) + 2.5 * np.eye(k)[labels]
    logits += np.cumsum(rng.normal(scale=0.3, size=(chains, draws, 1, 1)), axis=1)  # drift
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    ood_logits = rng.normal(size=(chains, draws, 25, k))
    ood = np.exp(ood_logits) / np.exp(ood_logits).sum(-1, keepdims=True)
    train_ll = -rng.gamma(2.0, 0.3, size=(chains, draws, n_train))
    return btrace.build_trace(
        posterior={"proj": rng.normal(size=(chains, draws, 2))},
        weights={"w": rng.normal(size=(chains, draws, 4, 3)),
                 "b": rng.normal(size=(chains, draws, 3))},
        sample_stats={"lp": rng.normal(size=(chains, draws)),
                      "step_size": np.full((chains, draws), 0.01)},
        predictions={"test": probs[:, :, :40], "test_logits": logits[:, :, :40],
                     "val": probs[:, :, 40:], "ood_x": ood, "ood_x_logits": ood_logits},
        observed_data={"test": labels[:40], "val": labels[40:],
                       "train": rng.integers(0, k, n_train)},
        log_likelihood={"train": train_ll},
        heldout_log_likelihood={"test": np.log(probs[:, :, np.arange(40), labels[:40]])},
        attrs={"sampler": "sgld", "temperature": 1.0, "chains": chains, "draws": draws,
               "burn_in": 10, "thin": 2, "num_data": n_train, "seed": 0},
    )  # fmt: skip


def _numbers(node, path=""):
    if isinstance(node, dict):
        for key, child in node.items():
            yield from _numbers(child, f"{path}/{key}")
    elif isinstance(node, list):
        for i, child in enumerate(node):
            yield from _numbers(child, f"{path}/{i}")
    elif isinstance(node, float):
        yield path, node


@pytest.mark.parametrize("method", ["batch", "bootstrap"])
def test_report_of_a_lazy_trace_read_draw_by_draw_equals_the_report_in_memory(
    tmp_path, monkeypatch, method
):
    trace = _trace()
    in_memory = report.build_report(trace, figures=False, method=method, n_boot=20).summary
    path = btrace.save(trace, tmp_path / "trace.nc")
    monkeypatch.setattr(btrace.build, "CHUNK_BYTES", 1)  # one draw per slab
    monkeypatch.setattr(report, "_LOO_BYTES", 1)  # one training point per az.loo call
    lazy = report.build_report(btrace.load(path, lazy=True), figures=False, method=method,
                               n_boot=20).summary  # fmt: skip
    assert lazy["predictive_density"]["elpd_loo"] is not None
    first, second = dict(_numbers(in_memory)), dict(_numbers(lazy))
    assert first.keys() == second.keys()
    for key, value in first.items():
        # The same sums in another order differ by float64 rounding (~1e-16 relative); the
        # post-hoc temperature is located to the optimiser's xatol of 1e-9 in log T, and the
        # scaled metrics move with it, hence 1e-7 rather than 1e-12.
        if math.isnan(value):
            assert math.isnan(second[key]), key
        else:
            assert second[key] == pytest.approx(value, rel=1e-7, abs=1e-12), key


@pytest.mark.filterwarnings("ignore:Estimated shape parameter")
def test_loo_over_slabs_of_points_equals_arviz_on_all_points(monkeypatch):
    import arviz as az

    trace = _trace(draws=40)
    whole = az.loo(trace, pointwise=True)
    monkeypatch.setattr(report, "_LOO_BYTES", 3 * 40 * 8 * 7)  # seven points a call
    sliced = report._predictive_density(trace)["elpd_loo"]
    elpd = getattr(whole, "elpd_loo", getattr(whole, "elpd", None))  # ArviZ 0.x, 1.x
    p_loo = getattr(whole, "p_loo", getattr(whole, "p", None))
    assert sliced["value"] == pytest.approx(float(elpd), rel=1e-12)
    assert sliced["se"] == pytest.approx(float(whole.se), rel=1e-9)
    assert sliced["p_loo"] == pytest.approx(float(p_loo), rel=1e-9)
    assert sliced["pareto_k_above_0.7"] == int(np.sum(np.asarray(whole.pareto_k) > 0.7))


def test_functionals_read_in_slabs_equal_the_functionals_of_all_draws(monkeypatch):
    trace = _trace()
    whole = functionals(trace)
    monkeypatch.setattr(btrace.build, "CHUNK_BYTES", 1)
    sliced = functionals(trace)
    assert whole.keys() == sliced.keys()
    assert any(k.startswith("proj_") for k in whole) and "nll_test" in whole
    for key in whole:
        np.testing.assert_allclose(sliced[key], whole[key], rtol=1e-12, err_msg=key)
    weights = btrace.get_group(trace, "weights")
    arrays = {k: weights[k].values for k in weights.data_vars}
    np.testing.assert_allclose(
        weight_projections(dict(weights.data_vars), seed=2),
        weight_projections(arrays, seed=2),
        rtol=1e-12,
    )


def test_report_memory_does_not_hold_every_draw(tmp_path, monkeypatch):
    # 2 chains x 1200 draws of 3 sets of 150 inputs x 10 classes: 43 MiB of float32
    # predictions, 86 MiB as float64. With 1 MiB slabs the report needs a few slabs plus the
    # jackknife's batch sums, 2 x 34 batches of every feature (about 4 MiB).
    rng = np.random.default_rng(0)
    chains, draws, n, k = 2, 1200, 150, 10
    labels = rng.integers(0, k, n)
    sets, observed = {}, {}
    for name in ("test", "val", "ood_x"):
        logits = rng.normal(size=(chains, draws, n, k)).astype(np.float32)
        logits += 2.0 * np.eye(k, dtype=np.float32)[labels]
        sets[f"{name}_logits"] = logits
        if name != "ood_x":
            observed[name] = labels
    stored = sum(v.nbytes for v in sets.values())
    trace = btrace.build_trace(
        posterior={"proj": rng.normal(size=(chains, draws, 2))},
        sample_stats={"lp": rng.normal(size=(chains, draws))},
        predictions=sets, observed_data=observed,
        attrs={"sampler": "sgld", "temperature": 1.0, "store_probabilities": False,
               "burn_in": 1, "thin": 1, "num_data": 100, "seed": 0},
    )  # fmt: skip
    path = btrace.save(trace, tmp_path / "trace.nc")
    del trace, sets
    monkeypatch.setattr(btrace.build, "CHUNK_BYTES", 2**20)
    lazy = btrace.load(path, lazy=True)
    tracemalloc.start()
    try:
        summary = report.build_report(lazy, figures=False).summary
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert summary["ensemble"]["draws"] == draws
    assert peak < stored / 4, f"peak {peak / 2**20:.1f} MiB for {stored / 2**20:.1f} MiB stored"
