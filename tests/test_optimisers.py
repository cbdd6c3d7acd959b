"""Flat-minimum optimisers: SAM, RWP, NSO, escape, SWA and SWAG.

Every check is exact or statistical with a tolerance from theory: the zero-radius limits equal
``torch.optim.SGD`` bit for bit; the estimators are checked against closed forms on
quadratics and cubics; SWAG against the moments of Gaussian iterates.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import pytest
import torch
from harness import cov_zscores, rows_closure, z_bound
from torch import nn
from torch.optim.swa_utils import update_bn

import bayesflat
from bayesflat import cli, samplers
from bayesflat import trace as btrace
from bayesflat.report import build_report
from bayesflat.samplers.escape import Escape, EscapeSAM
from bayesflat.samplers.rwp import NSO, RWP
from bayesflat.samplers.sam import SAM
from bayesflat.samplers.swa import SWA, SWAG, fit_swag, swa_from_trace
from bayesflat.target.torch import Posterior

NEW_NAMES = ["sam", "rwp", "nso", "escape", "escape_sam", "swa", "swag"]


def _data(n: int = 64, d: int = 6, k: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x @ torch.randn(d, k, generator=g)).argmax(dim=1)
    return x, y


def _mlp(seed: int = 0, batchnorm: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    layers: list[nn.Module] = [nn.Linear(6, 8)]
    if batchnorm:
        layers.append(nn.BatchNorm1d(8))
    layers += [nn.Tanh(), nn.Linear(8, 3)]
    return nn.Sequential(*layers)


def _closures(model: nn.Module, num_steps: int, batch: int = 16):
    x, y = _data()
    post = Posterior(model, num_data=x.shape[0], temperature=0.0)
    return [
        post.closure(x[i * batch % 64 : i * batch % 64 + batch], y[i * batch % 64 :][:batch])
        for i in range(num_steps)
    ]


# -- zero radius: exactly SGD ---------------------------------------------------------------------

ZERO_RADIUS = [
    ("sam", {"rho": 0.0}),
    ("rwp", {"sigma": 0.0}),
    ("rwp", {"sigma": 0.0, "filter_normalised": True, "clean_weight": 0.3}),
    ("nso", {"sigma": 0.0, "num_pairs": 2}),
    ("escape", {"rho": 0.0}),
    ("escape", {"rho": 0.5, "eps0": 1e-9}),
    ("escape_sam", {"rho": 0.5, "eps0": 1e-9}),
    ("swa", {"start": 2}),
    ("swag", {"start": 0, "every": 3, "max_rank": 4}),
]


@pytest.mark.parametrize(("name", "options"), ZERO_RADIUS)
def test_zero_radius_is_torch_sgd_step_for_step(name, options):
    model, ref = _mlp(), _mlp()
    opt = samplers.get(name)(
        model.parameters(),
        lr=0.1,
        num_data=64,
        temperature=0.0,
        generator=torch.Generator().manual_seed(1),
        **options,
    )
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1)
    for closure, ref_closure in zip(_closures(model, 15), _closures(ref, 15), strict=True):
        loss = opt.step(closure)
        sgd.zero_grad()
        ref_loss = ref_closure()
        sgd.step()
        assert torch.equal(loss, ref_loss)
        for p, q in zip(model.parameters(), ref.parameters(), strict=True):
            assert torch.equal(p, q)


# -- NSO and RWP ----------------------------------------------------------------------------------


def _estimate(opt: samplers.Sampler, closure) -> list[torch.Tensor]:
    """One call of the optimiser's gradient estimator; returns the gradients it left."""
    with torch.no_grad():
        opt.estimator.estimate(opt, closure)
    return [p.grad.clone() for g in opt.param_groups for p in g["params"]]


def test_nso_antithetic_pair_is_exact_on_a_quadratic():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(5, 5, generator=g, dtype=torch.float64)
    a, b = m @ m.T + torch.eye(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    w = torch.randn(200, 5, generator=g, dtype=torch.float64).requires_grad_(True)
    closure = rows_closure(w, lambda v: 0.5 * ((v @ a) * v).sum(1) - v @ b)
    exact = w.detach() @ a - b
    nso = NSO([w], lr=0.1, num_data=10, sigma=0.7, generator=torch.Generator().manual_seed(1))
    before = w.detach().clone()
    for _ in range(3):
        (grad,) = _estimate(nso, closure)
        # First-order terms cancel for every draw: zero variance, float64 rounding only.
        torch.testing.assert_close(grad, exact, rtol=0, atol=1e-12)
        assert torch.equal(w.detach(), before)
    # A one-sided perturbation of the same scale is not exact: its error is sigma * A eps.
    rwp = RWP([w], lr=0.1, num_data=10, sigma=0.7, generator=torch.Generator().manual_seed(1))
    (grad,) = _estimate(rwp, closure)
    assert (grad - exact).abs().mean() > 0.1


@pytest.mark.parametrize("clean_weight", [0.0, 0.5])
def test_nso_recovers_smoothed_gradient_on_a_cubic(clean_weight):
    # f(w) = sum_ijk T_ijk w_i w_j w_k / 6 + a.w with symmetric T: grad tr H = (sum_j T_kjj)_k and
    # E[(grad f(w + U) + grad f(w - U)) / 2] = grad f(w) + sigma^2 / 2 grad tr H exactly.
    g = torch.Generator().manual_seed(3)
    d, rows, sigma = 3, 20000, 0.3
    t = torch.randn(d, d, d, generator=g, dtype=torch.float64)
    perms = [(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)]
    t = sum(t.permute(*p) for p in perms) / 6
    lin = torch.randn(d, generator=g, dtype=torch.float64)
    w0 = torch.randn(d, generator=g, dtype=torch.float64)
    w = w0.repeat(rows, 1).requires_grad_(True)

    def potential(v):
        return torch.einsum("ijk,ni,nj,nk->n", t, v, v, v) / 6 + v @ lin

    grad_f = 0.5 * torch.einsum("ijk,j,k->i", t, w0, w0) + lin
    grad_tr_h = torch.einsum("kjj->k", t)
    expected = grad_f + (1 - clean_weight) * sigma**2 / 2 * grad_tr_h
    nso = NSO(
        [w],
        lr=0.1,
        num_data=10,
        sigma=sigma,
        clean_weight=clean_weight,
        generator=torch.Generator().manual_seed(4),
    )
    (grad,) = _estimate(nso, rows_closure(w, potential))
    est = grad.numpy()
    z = (est.mean(0) - expected.numpy()) / (est.std(0, ddof=1) / math.sqrt(rows))
    assert np.all(np.abs(z) < z_bound(d)), z
    # The smoothing term is resolved: it is many standard errors away from zero.
    shift = (1 - clean_weight) * sigma**2 / 2 * grad_tr_h.numpy()
    assert np.max(np.abs(shift) / (est.std(0, ddof=1) / math.sqrt(rows))) > 10


def test_rwp_filter_normalised_noise_and_clean_weight():
    # L = |W|^2 / 2 + 3 |b|^2 / 2 on a Linear(4, 3): the closure records the weights it sees.
    lin = nn.Linear(4, 3).double()
    calls = []

    def closure():
        calls.append((lin.weight.detach().clone(), lin.bias.detach().clone()))
        loss = 0.5 * (lin.weight**2).sum() + 0.5 * (lin.bias**2).sum() * 3.0
        loss.backward()
        return loss.detach()

    sigma, w = 0.1, 0.25
    opt = RWP(
        lin.parameters(),
        lr=0.1,
        num_data=10,
        sigma=sigma,
        filter_normalised=True,
        clean_weight=w,
        generator=torch.Generator().manual_seed(5),
    )
    w0, b0 = lin.weight.detach().clone(), lin.bias.detach().clone()
    with torch.no_grad():
        opt.estimator.estimate(opt, closure)
    # Replaying the generator gives eps: one normal draw over the flat (weight, bias) buffer.
    replay = torch.Generator().manual_seed(5)
    z = torch.randn(w0.numel() + b0.numel(), generator=replay, dtype=torch.float64)
    zw, zb = z[: w0.numel()].view_as(w0), z[w0.numel() :]
    eps_w = sigma * w0.norm(dim=1, keepdim=True) * zw
    eps_b = sigma * b0.norm() * zb
    (cw, cb), (pw, pb) = calls
    assert torch.equal(cw, w0) and torch.equal(cb, b0)
    torch.testing.assert_close(pw - w0, eps_w, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(pb - b0, eps_b, rtol=1e-10, atol=1e-12)
    # g = w grad L(theta) + (1 - w) grad L(theta + eps) for the quadratic above.
    torch.testing.assert_close(lin.weight.grad, w * w0 + (1 - w) * (w0 + eps_w))
    torch.testing.assert_close(lin.bias.grad, 3.0 * (w * b0 + (1 - w) * (b0 + eps_b)))
    assert torch.equal(lin.weight.detach(), w0) and torch.equal(lin.bias.detach(), b0)


# -- SAM ------------------------------------------------------------------------------------------


def test_sam_ascent_direction_radius_and_gradient_on_a_quadratic():
    g = torch.Generator().manual_seed(0)
    m = torch.randn(4, 4, generator=g, dtype=torch.float64)
    a = m @ m.T + torch.eye(4, dtype=torch.float64)
    theta = torch.randn(4, generator=g, dtype=torch.float64).requires_grad_(True)
    extra = torch.randn(2, generator=g, dtype=torch.float64).requires_grad_(True)

    def closure():
        loss = 0.5 * theta @ a @ theta + 0.5 * (extra**2).sum() * (1 + theta.sum() ** 2)
        loss.backward()
        return loss.detach()

    rho, lr = 0.3, 0.05
    opt = SAM(
        [{"params": [theta]}, {"params": [extra], "perturb": False}], lr=lr, num_data=10, rho=rho
    )
    t0, x0 = theta.detach().clone(), extra.detach().clone()
    with torch.enable_grad():
        first = torch.func.grad(
            lambda t: 0.5 * t @ a @ t + 0.5 * (x0**2).sum() * (1 + t.sum() ** 2)
        )
        g0 = first(t0)
    e = rho * g0 / g0.norm()
    t1 = t0 + e
    expected_theta_grad = a @ t1 + (x0**2).sum() * t1.sum() * torch.ones(4, dtype=torch.float64)
    expected_extra_grad = x0 * (1 + t1.sum() ** 2)
    with torch.no_grad():
        loss = opt.estimator.estimate(opt, closure)
    torch.testing.assert_close(theta.grad, expected_theta_grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(extra.grad, expected_extra_grad, rtol=1e-12, atol=1e-12)
    assert torch.equal(theta.detach(), t0) and torch.equal(extra.detach(), x0)

    def value(t):
        return float(0.5 * t @ a @ t + 0.5 * (x0**2).sum() * (1 + t.sum() ** 2))

    stats = opt.estimator.stats(opt)
    assert stats["ascent_radius"] == pytest.approx(rho, rel=1e-12)
    assert float(loss) == pytest.approx(value(t0), rel=1e-12)
    assert stats["sharpness"] == pytest.approx(value(t1) - value(t0), rel=1e-9)
    opt.step(closure)
    torch.testing.assert_close(theta.detach(), t0 - lr * expected_theta_grad)


def test_sam_updates_batchnorm_statistics_in_the_first_pass_only():
    model, ref = _mlp(batchnorm=True), _mlp(batchnorm=True)
    x, y = _data()
    opt = SAM(model.parameters(), lr=0.1, num_data=64, rho=0.5, model=model)
    opt.step(Posterior(model, num_data=64, temperature=0.0).closure(x[:16], y[:16]))
    with torch.no_grad():
        ref(x[:16])  # one training-mode pass at the unperturbed weights
    bn, bn_ref = model[1], ref[1]
    assert torch.equal(bn.running_mean, bn_ref.running_mean)
    assert torch.equal(bn.running_var, bn_ref.running_var)
    assert int(bn.num_batches_tracked) == 1 and bn.track_running_stats
    assert opt.stats()["ascent_radius"] == pytest.approx(0.5)


# -- escape ---------------------------------------------------------------------------------------


def _cubic_problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(5, 5, generator=g, dtype=torch.float64)
    a = m @ m.T / 5 + torch.eye(5, dtype=torch.float64)
    c = torch.randn(5, generator=g, dtype=torch.float64)
    theta = torch.randn(5, generator=g, dtype=torch.float64).requires_grad_(True)

    def f(t):
        return 0.5 * t @ a @ t + (c * t**3).sum() / 6

    def closure():
        loss = f(theta)
        loss.backward()
        return loss.detach()

    return theta, f, closure


@pytest.mark.parametrize("cls", [Escape, EscapeSAM])
def test_escape_perturbation_is_orthogonal_and_gated(cls):
    theta, f, closure = _cubic_problem()
    t0 = theta.detach().clone()
    g0 = torch.func.grad(f)(t0)
    rho = 0.4
    opt = cls(
        [theta],
        lr=0.1,
        num_data=10,
        rho=rho,
        eps0=2 * float(g0.norm()),
        generator=torch.Generator().manual_seed(2),
    )
    g_hat = g0 / g0.norm()
    for _ in range(6):
        (grad,) = _estimate(opt, closure)
        assert torch.equal(theta.detach(), t0)
        v = grad - g0
        assert opt.estimator.stats(opt)["perturbed"] == 1.0
        assert abs(float(v @ g0)) < 1e-12 * float(v.norm() * g0.norm())
        assert float(v.norm()) > 1e-3
        assert opt.estimator.stats(opt)["perturbation_norm"] == pytest.approx(float(v.norm()))
        if cls is EscapeSAM:
            # v is the projected gradient at theta + s rho g / ||g|| for a sign s.
            candidates = []
            for s in (1.0, -1.0):
                h = torch.func.grad(f)(t0 + s * rho * g_hat)
                candidates.append(h - (h @ g_hat) * g_hat)
            assert min(float((v - cand).abs().max()) for cand in candidates) < 1e-12
    # Above the threshold: the plain gradient, one pass, bit for bit.
    opt_above = cls([theta], lr=0.1, num_data=10, rho=rho, eps0=0.5 * float(g0.norm()))
    theta.grad = None
    (grad,) = _estimate(opt_above, closure)
    assert torch.equal(grad, g0) or torch.allclose(grad, g0, rtol=0, atol=1e-15)
    assert opt_above.estimator.stats(opt_above)["perturbed"] == 0.0


def test_escape_sphere_direction_has_radius_rho():
    # On a quadratic v = rho P^perp A u: reconstruct u from the perturbed weights seen by the
    # closure and check ||u|| = 1.
    theta, f, _ = _cubic_problem(1)
    seen = []

    def closure():
        seen.append(theta.detach().clone())
        loss = f(theta)
        loss.backward()
        return loss.detach()

    rho = 0.25
    opt = Escape([theta], lr=0.1, num_data=10, rho=rho, generator=torch.Generator().manual_seed(0))
    _estimate(opt, closure)
    assert len(seen) == 2
    assert float((seen[1] - seen[0]).norm()) == pytest.approx(rho, rel=1e-12)


def test_escape_sam_sign_is_fair():
    theta, f, closure = _cubic_problem(2)
    opt = EscapeSAM(
        [theta], lr=0.1, num_data=10, rho=0.1, generator=torch.Generator().manual_seed(3)
    )
    g0 = torch.func.grad(f)(theta.detach().clone())
    seen = []

    def spy():
        seen.append(theta.detach().clone())
        return closure()

    n, positive = 400, 0
    for _ in range(n):
        seen.clear()
        _estimate(opt, spy)
        positive += float((seen[1] - seen[0]) @ g0) > 0
    # P(s = +1) = 1/2: binomial z within the alpha = 1e-4 bound.
    assert abs((positive / n - 0.5) / math.sqrt(0.25 / n)) < z_bound(1)


# -- SWA ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("start", "every"), [(0, 1), (4, 1), (3, 4)])
def test_swa_average_is_the_mean_of_the_collected_iterates(start, every):
    model, ref = _mlp(), _mlp()
    opt = SWA(model.parameters(), lr=0.2, num_data=64, start=start, every=every)
    sgd = torch.optim.SGD(ref.parameters(), lr=0.2)
    iterates = []
    for s, (closure, ref_closure) in enumerate(
        zip(_closures(model, 20), _closures(ref, 20), strict=True)
    ):
        opt.step(closure)
        sgd.zero_grad()
        ref_closure()
        sgd.step()
        if s >= start and (s - start + 1) % every == 0:
            iterates.append([p.detach().clone() for p in ref.parameters()])
    expected = [torch.stack(ps).mean(0) for ps in zip(*iterates, strict=True)]
    assert opt.count == len(iterates)
    for avg, exp in zip(opt.average(), expected, strict=True):
        torch.testing.assert_close(avg, exp, rtol=1e-6, atol=1e-6)
    # Inside `averaged` the model holds the average; afterwards the iterate, exactly.
    iterate = [p.detach().clone() for p in model.parameters()]
    with opt.averaged(model):
        for p, exp in zip(model.parameters(), expected, strict=True):
            torch.testing.assert_close(p.detach(), exp, rtol=1e-6, atol=1e-6)
    for p, q in zip(model.parameters(), iterate, strict=True):
        assert torch.equal(p, q)


def test_swa_recomputes_batchnorm_statistics_for_the_average():
    model = _mlp(batchnorm=True)
    x, y = _data()
    opt = SWA(model.parameters(), lr=0.2, num_data=64, start=2)
    for closure in _closures(model, 10):
        opt.step(closure)
    bn = model[1]
    iterate_stats = [t.clone() for t in (bn.running_mean, bn.running_var, bn.num_batches_tracked)]
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]
    reference = _mlp(batchnorm=True)
    with torch.no_grad():
        for p, avg in zip(reference.parameters(), opt.average(), strict=True):
            p.copy_(avg)
    update_bn(batches, reference)
    with opt.averaged(model, batches):
        torch.testing.assert_close(bn.running_mean, reference[1].running_mean)
        torch.testing.assert_close(bn.running_var, reference[1].running_var)
        # One pass with cumulative averaging: the statistics of the whole training set.
        torch.testing.assert_close(
            bn.running_mean, model[0](x).mean(0).detach(), rtol=1e-5, atol=1e-6
        )
    for now, before in zip(
        (bn.running_mean, bn.running_var, bn.num_batches_tracked), iterate_stats, strict=True
    ):
        assert torch.equal(now, before)


def test_swa_state_dict_resumes_exactly():
    model = _mlp()
    closures = _closures(model, 12)
    opt = SWA(model.parameters(), lr=0.2, num_data=64, start=1)
    for closure in closures[:6]:
        opt.step(closure)
    state = opt.state_dict()
    weights = [p.detach().clone() for p in model.parameters()]
    for closure in closures[6:]:
        opt.step(closure)
    final = opt.average()
    with torch.no_grad():
        for p, w in zip(model.parameters(), weights, strict=True):
            p.copy_(w)
    resumed = SWA(model.parameters(), lr=0.2, num_data=64, start=1)
    resumed.load_state_dict(state)
    for closure in closures[6:]:
        resumed.step(closure)
    for a, b in zip(resumed.average(), final, strict=True):
        assert torch.equal(a, b)


def _sample(sampler: str, model: nn.Module | None = None, **kw):
    x, y = _data(96)
    xt, yt = _data(30, seed=1)
    args = dict(
        chains=2,
        burn_in=4,
        draws=5,
        thin=1,
        batch_size=16,
        seed=2,
        progress=False,
        lr=0.2,
        eval_sets={"test": (xt, yt)},
    )
    args.update(kw)
    return bayesflat.sample(model or _mlp(), (x, y), sampler=sampler, **args)


def test_driver_records_the_swa_average_of_the_sgd_chain():
    sgd = btrace.groups(_sample("sgd"))
    swa = btrace.groups(_sample("swa"))
    for name in sgd["weights"].data_vars:
        iterates = sgd["weights"][name].values.astype(np.float64)
        counts = np.arange(1, 6).reshape(1, 5, *[1] * (iterates.ndim - 2))
        running = np.cumsum(iterates, axis=1) / counts
        np.testing.assert_allclose(swa["weights"][name].values, running, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(swa["sample_stats"]["swa_count"].values, [np.arange(1, 6)] * 2)
    # lp is the iterate's: identical to the SGD chain's.
    np.testing.assert_array_equal(
        swa["sample_stats"]["lp"].values, sgd["sample_stats"]["lp"].values
    )


def test_driver_swa_batchnorm_statistics_are_recomputed_for_the_average():
    x, _ = _data(96)
    tr = btrace.groups(_sample("swa", model=_mlp(batchnorm=True), chains=1, draws=3))
    post = tr["weights"]
    model = _mlp(batchnorm=True)
    state = {k: torch.from_numpy(post[k].values[0, -1]) for k in post.data_vars}
    model.load_state_dict({**model.state_dict(), **state})
    update_bn([x[i : i + 16] for i in range(0, 96, 16)], model)
    np.testing.assert_allclose(
        post["1.running_mean"].values[0, -1], model[1].running_mean.numpy(), rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(
        post["1.running_var"].values[0, -1], model[1].running_var.numpy(), rtol=1e-5, atol=1e-6
    )


def test_driver_hooks_are_generic(monkeypatch):
    contexts = []

    class Hooked(samplers.SGD):
        def begin_chain(self, context):
            contexts.append(context)

        @contextlib.contextmanager
        def recorded_state(self):
            weight = self.param_groups[0]["params"][0]
            saved = weight.detach().clone()
            with torch.no_grad():
                weight.zero_()
            yield
            with torch.no_grad():
                weight.copy_(saved)

    monkeypatch.setitem(
        samplers._REGISTRY,
        "hooked",
        samplers.RegistryEntry("hooked", Hooked, "test", "test", is_sampler=False),
    )
    hooked = btrace.groups(_sample("hooked", burn_in=3, draws=4, thin=2))
    sgd = btrace.groups(_sample("sgd", burn_in=3, draws=4, thin=2))
    assert len(contexts) == 2 and (contexts[0].burn_in, contexts[0].draws, contexts[0].thin) == (
        3,
        4,
        2,
    )
    batches = list(contexts[0].train_batches)
    assert sum(xb.shape[0] for xb, _ in batches) == 96
    assert torch.equal(torch.cat([xb for xb, _ in batches]), _data(96)[0])
    # The recorded state is the hook's; the chain itself is the SGD chain, untouched.
    np.testing.assert_array_equal(hooked["weights"]["0.weight"].values, 0.0)
    np.testing.assert_array_equal(
        hooked["weights"]["2.weight"].values, sgd["weights"]["2.weight"].values
    )
    np.testing.assert_array_equal(
        hooked["sample_stats"]["lp"].values, sgd["sample_stats"]["lp"].values
    )


def test_driver_recomputes_batchnorm_for_sam_draws():
    tr = _sample(
        "sam",
        model=_mlp(batchnorm=True),
        chains=1,
        draws=3,
        rho=0.2,
        stats_fns={"bn_updates": lambda m, s: float(m[1].num_batches_tracked)},
    )
    stats = btrace.groups(tr)["sample_stats"]
    # Each kept draw's statistics are recomputed from the 6 training batches at its weights
    # (the second pass never counts; tests/test_batchnorm.py checks one step's update).
    np.testing.assert_array_equal(stats["bn_updates"].values, 6.0)
    np.testing.assert_allclose(stats["ascent_radius"].values, 0.2)


# -- SWAG -----------------------------------------------------------------------------------------


def _gaussian_trace(n: int, seed: int = 0):
    """iid draws of N(mu, diag(s^2) + U U') as one chain's iterates of a two-variable trace."""
    rng = np.random.default_rng(seed)
    d = 12
    mu = rng.normal(size=d)
    u = rng.normal(size=(d, 2)) * np.array([1.0, 0.6])
    s2 = rng.uniform(0.01, 0.04, size=d)
    cov = np.diag(s2) + u @ u.T
    draws = rng.multivariate_normal(mu, cov, size=n)
    trace = btrace.build_trace(
        weights={
            "a.weight": draws[None, :, :8].reshape(1, n, 2, 4),
            "a.bias": draws[None, :, 8:],
        },
        sample_stats={"lp": np.zeros((1, n))},
    )
    return trace, mu, cov, u


def test_swag_recovers_the_moments_of_gaussian_iterates():
    n, k = 4000, 20
    trace, mu, cov, u = _gaussian_trace(n)
    fit = fit_swag(trace, max_rank=k)
    assert fit.names == ["a.weight", "a.bias"] and fit.shapes == [(2, 4), (4,)]
    mean = np.concatenate([fit.mean["a.weight"].ravel(), fit.mean["a.bias"]])
    var = np.concatenate([fit.variance["a.weight"].ravel(), fit.variance["a.bias"]])
    d = mu.size
    bound = z_bound(2 * d + 2)
    # Mean and diagonal: sample moments of n iid draws (SE sqrt(S_ii / n), S_ii sqrt(2 / n)).
    assert np.all(np.abs((mean - mu) / np.sqrt(np.diag(cov) / n)) < bound)
    assert np.all(np.abs((var - np.diag(cov)) / (np.diag(cov) * np.sqrt(2 / n))) < bound)
    # Low rank: the last K deviations from the (converged) running mean are K iid N(0, S), so
    # E[D D' / (K - 1)] = K / (K - 1) S. Check its trace, and its mass in span(U) (where the
    # covariance lives), each against the Wishart standard deviation sqrt(2 K tr(M^2)) / (K - 1).
    dev = fit.deviations
    assert dev.shape == (k, d)
    low = dev.T @ dev / (k - 1)
    proj = u @ np.linalg.pinv(u)
    for m_true, m_hat in [(cov, low), (proj @ cov @ proj, proj @ low @ proj)]:
        se = math.sqrt(2 * k * np.trace(m_true @ m_true)) / (k - 1)
        assert abs(np.trace(m_hat) - k / (k - 1) * np.trace(m_true)) / se < bound
    # Draws: their moments are the fitted ones, scale (diag + D D' / (K - 1)).
    draws = fit.sample(6000, torch.Generator().manual_seed(0))
    flat = np.concatenate([draws["a.weight"].reshape(6000, -1), draws["a.bias"]], axis=1)
    fitted = fit.covariance()
    np.testing.assert_allclose(fitted, 0.5 * (np.diag(var) + low), rtol=1e-10)
    zm = (flat.mean(0) - mean) / np.sqrt(np.diag(fitted) / 6000)
    zc = cov_zscores(flat, fitted)
    draw_bound = z_bound(zm.size + zc.size)
    assert np.all(np.abs(zm) < draw_bound) and np.all(np.abs(zc) < draw_bound)


def test_swag_online_moments_equal_the_fit_from_recorded_iterates():
    model = _mlp()
    opt = SWAG(
        model.parameters(),
        lr=0.2,
        num_data=64,
        start=2,
        every=2,
        max_rank=4,
        generator=torch.Generator().manual_seed(0),
    )
    iterates = []
    for s, closure in enumerate(_closures(model, 17)):
        opt.step(closure)
        if s >= 2 and (s - 2 + 1) % 2 == 0:
            iterates.append({k: v.detach().clone().numpy() for k, v in model.state_dict().items()})
    n = len(iterates)
    assert opt.moments.count == n == 7 and opt.moments.rank == 4
    trace = btrace.build_trace(
        weights={k: np.stack([it[k] for it in iterates])[None] for k in iterates[0]},
        sample_stats={"lp": np.zeros((1, n))},
    )
    fit = fit_swag(trace, max_rank=4)
    flat_mean = np.concatenate([fit.mean[k].ravel() for k in fit.names])
    np.testing.assert_allclose(opt.moments.mean[0].numpy(), flat_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        opt.moments.variance()[0].numpy(),
        np.concatenate([fit.variance[k].ravel() for k in fit.names]),
        rtol=1e-3,
        atol=1e-6,
    )
    np.testing.assert_allclose(
        opt.moments.deviations[0].numpy(), fit.deviations, rtol=1e-4, atol=1e-6
    )
    swa = swa_from_trace(trace)
    for k in fit.names:
        np.testing.assert_allclose(swa[k][0], fit.mean[k], rtol=1e-12)
    # Draws move the weights and restore them exactly.
    before = [p.detach().clone() for p in model.parameters()]
    seen = []
    for stats in opt.draws(3):
        assert stats == {"swag_count": 7.0, "swag_rank": 4.0}
        seen.append(torch.cat([p.detach().ravel() for p in model.parameters()]))
    assert not torch.equal(seen[0], seen[1])
    for p, q in zip(model.parameters(), before, strict=True):
        assert torch.equal(p, q)


def test_driver_swag_draws_are_the_chain():
    tr = _sample("swag", model=_mlp(batchnorm=True), burn_in=6, draws=4, thin=2)
    groups = btrace.groups(tr)
    attrs = btrace.trace_attrs(tr)
    assert attrs["start"] == 6 and attrs["every"] == 2 and attrs["max_rank"] == 20
    stats = groups["sample_stats"]
    np.testing.assert_array_equal(stats["swag_count"].values, 4.0)
    np.testing.assert_array_equal(stats["swag_rank"].values, 4.0)
    np.testing.assert_array_equal(stats["step"].values, 13)
    assert np.all(np.isfinite(stats["lp"].values)) and np.unique(stats["lp"].values).size == 8
    w = groups["weights"]["0.weight"].values
    assert w.shape == (2, 4, 8, 6) and np.all(np.isfinite(w))
    assert np.all(np.abs(np.diff(w, axis=1)).reshape(2, 3, -1).max(-1) > 0)
    assert np.all(np.isfinite(groups["predictions"]["test"].values))


# -- registry, validation, command line ------------------------------------------------------------


def test_registry_marks_them_optimisers():
    for name in NEW_NAMES:
        assert samplers.entry(name).is_sampler is False


@pytest.mark.parametrize(
    ("factory", "match"),
    [
        (lambda p: SAM(p, num_data=5, rho=-1.0), "rho"),
        (lambda p: RWP(p, num_data=5, clean_weight=1.0), "clean_weight"),
        (lambda p: RWP(p, num_data=5, filter_normalised="yes"), "filter_normalised"),
        (lambda p: NSO(p, num_data=5, num_pairs=0), "num_pairs"),
        (lambda p: Escape(p, num_data=5, eps0=0.0), "eps0"),
        (lambda p: Escape(p, num_data=5, direction="up"), "direction"),
        (lambda p: SWA(p, num_data=5, every=0), "every"),
        (lambda p: SWAG(p, num_data=5, max_rank=0), "max_rank"),
        (lambda p: SWAG(p, num_data=5, scale=0.0), "scale"),
    ],
)
def test_bad_options_name_the_argument(factory, match):
    with pytest.raises(ValueError, match=match):
        factory([nn.Parameter(torch.zeros(2))])


@pytest.mark.parametrize("name", NEW_NAMES)
def test_cli_run_works_for_every_optimiser(name, tmp_path):
    out = tmp_path / name
    rc = cli.main(
        [
            "run",
            "--sampler",
            name,
            "--chains",
            "1",
            "--draws",
            "2",
            "--burn-in",
            "5",
            "--thin",
            "1",
            "--no-progress",
            "--no-report",
            "--output",
            str(out),
        ]
    )
    assert rc == 0
    tr = btrace.load(out / "trace.nc")
    # The figures do not depend on the optimiser (test_cli draws sgd's): the run writes
    # metrics.json only, and the page is rendered here without them.
    assert name in build_report(tr, figures=False).to_html()
    attrs = btrace.trace_attrs(tr)
    assert attrs["sampler"] == name and attrs["temperature"] == 0.0
    assert btrace.groups(tr)["predictions"]["test_logits"].shape[:2] == (1, 2)
