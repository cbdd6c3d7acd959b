"""Flatness diagnostics against Hessians known in closed form."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from bayesflat.diagnostics.flatness import (
    HessianOperator,
    hessian_trace,
    hutchinson,
    layer_weights,
    perturbation_loss_gap,
    select_parameters,
    spectral_density,
    top_eigenvalues,
)


@pytest.fixture(autouse=True)
def single_thread():
    """The problems are tiny: intra-op threads only add synchronisation (and contention)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


SPECTRUM = np.array([8.0, 4.0, 2.0, 1.0, 0.5, 0.25, 0.1, 0.05, -0.2, -0.5])


class Quadratic(nn.Module):
    """theta = (a, b) with a of shape (2, 3) and b of shape (4,); outputs theta per example."""

    def __init__(self, theta: torch.Tensor) -> None:
        super().__init__()
        self.a = nn.Parameter(theta[:6].reshape(2, 3).clone())
        self.b = nn.Parameter(theta[6:].clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        theta = torch.cat([self.a.reshape(-1), self.b])
        return theta.expand(x.shape[0], -1)


def quadratic_problem(spectrum=SPECTRUM):
    """L(theta) = 0.5 theta' A theta with eig(A) = spectrum, so H = A exactly."""
    gen = torch.Generator().manual_seed(1)
    d = len(spectrum)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=gen, dtype=torch.float64))
    a = q @ torch.diag(torch.as_tensor(spectrum)) @ q.T
    a = 0.5 * (a + a.T)
    model = Quadratic(torch.randn(d, generator=gen, dtype=torch.float64) + 1.0)

    def loss_fn(out, _):
        return 0.5 * torch.einsum("bi,ij,bj->b", out, a, out).mean()

    data = (torch.zeros(5, 1, dtype=torch.float64), torch.zeros(5, dtype=torch.float64))
    return model, data, loss_fn, a.numpy(), q.numpy()


def regression_problem(dtype=torch.float64, n=11):
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(n, 3, generator=gen, dtype=torch.float64)
    y = torch.randn(n, generator=gen, dtype=torch.float64)
    torch.manual_seed(0)
    model = nn.Linear(3, 1).to(torch.float64)
    xt = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], dim=1)
    # L = mean (w'x + b - y)^2 over [weight (3), bias (1)]  =>  H = 2 X~' X~ / n
    hessian = (2 * xt.T @ xt / n).numpy()
    return model.to(dtype), (x.to(dtype), y.to(dtype)), mse, hessian


def mse(out, target):
    return F.mse_loss(out.squeeze(-1), target)


def small_mlp():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(torch.float64)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(9, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (9,), generator=gen)
    return model, (x, y)


def dense_hessian(model, data, loss_fn):
    """Full Hessian by torch.autograd.functional.hessian over the flat parameters."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])

    def loss_of(flat):
        parts = torch.split(flat, [math.prod(s) for s in shapes])
        weights = {n: t.reshape(s) for n, t, s in zip(names, parts, shapes, strict=True)}
        return loss_fn(functional_call(model, weights, (data[0],)), data[1])

    return torch.autograd.functional.hessian(loss_of, flat0).numpy(), names, shapes


def rel_err(a, b):
    return np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b))


# --------------------------------------------------------------------------- products


def test_hvp_equals_dense_quadratic():
    model, data, loss_fn, a, _ = quadratic_problem()
    op = HessianOperator(model, data, loss_fn=loss_fn, batch_size=2)
    v = np.random.default_rng(0).standard_normal(op.dim)
    assert rel_err(op.matvec(v), a @ v) < 1e-5
    out32 = op.matvec(torch.as_tensor(v, dtype=torch.float32))
    assert out32.dtype == torch.float32 and isinstance(out32, torch.Tensor)
    assert rel_err(out32.numpy(), a @ v) < 1e-5
    assert rel_err(op.dense(), a) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_hvp_linear_regression_any_batching(dtype):
    model, (x, y), loss_fn, hessian = regression_problem(dtype)
    v = np.random.default_rng(1).standard_normal(4)
    batches = [(x[s : s + 4], y[s : s + 4]) for s in range(0, len(y), 4)]  # sizes 4, 4, 3
    for data, batch_size in [((x, y), None), ((x, y), 3), (batches, None), (iter(batches), None)]:
        op = HessianOperator(model, data, loss_fn=loss_fn, batch_size=batch_size)
        assert rel_err(op.matvec(v), hessian @ v) < 1e-5
        assert rel_err(op.matvec(v), hessian @ v) < 1e-5  # a one-shot iterator is kept


def test_linear_operator_for_scipy():
    model, data, loss_fn, hessian = regression_problem()
    lo = HessianOperator(model, data, loss_fn=loss_fn).as_linear_operator()
    assert lo.shape == (4, 4) and lo.dtype == np.float64
    v = np.arange(4.0)
    assert rel_err(lo @ v, hessian @ v) < 1e-12


# --------------------------------------------------------------------------- trace


def test_hutchinson_trace_within_its_standard_error():
    model, data, loss_fn, a, _ = quadratic_problem()
    res = hessian_trace(model, data, loss_fn=loss_fn, rtol=0.05, min_probes=30, max_probes=3000)
    # Var(z'Az) for Rademacher z = 2 (||A||_F^2 - sum_i A_ii^2)
    probe_sd = math.sqrt(2 * (np.sum(a**2) - np.sum(np.diag(a) ** 2)))
    theory_se = probe_sd / math.sqrt(res.n_probes)
    assert res.converged and res.n_probes >= 30
    assert abs(res.trace - SPECTRUM.sum()) < 4 * theory_se
    assert 0.6 < res.stderr / theory_se < 1.4
    assert res.dim == 10 and res.normalized_trace == pytest.approx(res.trace / 10)
    again = hessian_trace(model, data, loss_fn=loss_fn, rtol=0.05, min_probes=30, max_probes=3000)
    assert again == res


def test_hutchinson_stopping_rule():
    diag = torch.tensor([3.0, 1.0, -0.5], dtype=torch.float64)
    exact = hutchinson(lambda z: float(z @ (diag * z)), 3, min_probes=5)
    assert exact.trace == pytest.approx(3.5) and exact.stderr == 0.0
    assert exact.n_probes == 5 and exact.converged
    dense = torch.ones(3, 3, dtype=torch.float64)
    capped = hutchinson(lambda z: float(z @ dense @ z), 3, rtol=1e-9, max_probes=40)
    assert capped.n_probes == 40 and not capped.converged
    with pytest.raises(ValueError):
        hutchinson(lambda z: 0.0, 3, min_probes=1)


# --------------------------------------------------------------------------- eigenvalues


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_top_eigenvalues(method):
    model, data, loss_fn, _, q = quadratic_problem()
    res = top_eigenvalues(model, data, k=3, method=method, loss_fn=loss_fn, tol=1e-7)
    np.testing.assert_allclose(res.eigenvalues, SPECTRUM[:3], rtol=1e-4)
    assert res.eigenvectors.shape == (10, 3) and res.converged and res.n_matvecs > 0
    overlap = np.abs(np.sum(res.eigenvectors * q[:, :3], axis=0))
    np.testing.assert_allclose(overlap, 1.0, atol=1e-4)


def test_top_eigenvalue_linear_regression():
    model, data, loss_fn, hessian = regression_problem(torch.float32)
    expected = np.linalg.eigvalsh(hessian)[::-1]
    for method in ("lanczos", "power"):
        res = top_eigenvalues(model, data, k=2, method=method, loss_fn=loss_fn, tol=1e-6)
        np.testing.assert_allclose(res.eigenvalues, expected[:2], rtol=1e-4)


def test_smallest_eigenvalues_and_errors():
    model, data, loss_fn, _, _ = quadratic_problem()
    op = HessianOperator(model, data, loss_fn=loss_fn)
    res = op.eigenpairs(2, which="smallest", tol=1e-10)
    np.testing.assert_allclose(res.eigenvalues, [-0.2, -0.5], rtol=1e-6)
    with pytest.raises(ValueError):
        op.eigenpairs(2, which="smallest", method="power")
    with pytest.raises(ValueError):
        op.eigenpairs(10)  # ARPACK needs k < d


def test_spectral_density_recovers_spectrum():
    model, data, loss_fn, _, _ = quadratic_problem()
    sd = spectral_density(model, data, loss_fn=loss_fn, n_runs=3, n_steps=10)
    assert sd.weights.sum() == pytest.approx(1.0)
    # n_steps = d: each run's Gauss rule has the d eigenvalues as nodes
    for run in sd.nodes.reshape(3, 10):
        np.testing.assert_allclose(np.sort(run), np.sort(SPECTRUM), atol=1e-8)
    grid = np.linspace(-3, 11, 4001)
    assert np.trapezoid(sd.density(grid, 0.1), grid) == pytest.approx(1.0, abs=1e-6)
    for run in sd.weights.reshape(3, 10):
        assert run.sum() == pytest.approx(1 / 3)
    assert sd.expectation(lambda t: t**0) == pytest.approx(1.0)


# --------------------------------------------------------------------------- perturbation


def test_perturbation_gap_quadratic():
    model, data, loss_fn, a, _ = quadratic_problem()
    sigma, n = 0.1, 400
    res = perturbation_loss_gap(model, data, sigma, n, loss_fn=loss_fn, batch_size=2)
    # antithetic sample = sigma^2/2 eps'A eps exactly: mean sigma^2/2 tr A,
    # variance sigma^4 ||A||_F^2 / 2
    expected = sigma**2 / 2 * SPECTRUM.sum()
    theory_se = sigma**2 * math.sqrt(np.sum(a**2) / 2 / n)
    assert abs(res.gap - expected) < 4 * theory_se
    assert 0.8 < res.stderr / theory_se < 1.2
    assert res.implied_trace == pytest.approx(2 * res.gap / sigma**2)
    assert res.base_loss == pytest.approx(loss_fn(model(data[0]), None).item())
    plain = perturbation_loss_gap(model, data, sigma, n, loss_fn=loss_fn, antithetic=False)
    # without pairing the first-order term sigma (A theta).eps dominates the variance
    assert plain.stderr > 5 * res.stderr


def test_perturbation_gap_restricted_to_a_block():
    model, data, loss_fn, a, _ = quadratic_problem()
    sigma, n = 0.2, 400
    res = perturbation_loss_gap(model, data, sigma, n, loss_fn=loss_fn, params=["b"], seed=3)
    block = a[6:, 6:]
    theory_se = sigma**2 * math.sqrt(np.sum(block**2) / 2 / n)
    assert res.dim == 4
    assert abs(res.gap - sigma**2 / 2 * np.trace(block)) < 4 * theory_se


# --------------------------------------------------------------------------- restriction


def test_restriction_equals_dense_block():
    model, data = small_mlp()
    full, names, shapes = dense_hessian(model, data, F.cross_entropy)
    offsets = np.cumsum([0] + [math.prod(s) for s in shapes])
    span = {n: np.arange(offsets[i], offsets[i + 1]) for i, n in enumerate(names)}
    assert rel_err(HessianOperator(model, data).dense(), full) < 1e-10
    for spec in (layer_weights(model), lambda n: n.endswith("weight")):
        op = HessianOperator(model, data, params=spec)
        assert op.names == ["0.weight", "2.weight"]
        idx = np.concatenate([span[n] for n in op.names])
        assert rel_err(op.dense(), full[np.ix_(idx, idx)]) < 1e-10
    idx = span["2.bias"]
    op = HessianOperator(model, data, params=[model[2].bias])
    assert rel_err(op.dense(), full[np.ix_(idx, idx)]) < 1e-10


def test_select_parameters_rejects_bad_selections():
    model, _ = small_mlp()
    assert [n for n, _ in select_parameters(model, ["2.bias", "0.weight"])] == [
        "0.weight",
        "2.bias",
    ]
    with pytest.raises(ValueError):
        select_parameters(model, lambda n: False)
    with pytest.raises(ValueError):
        select_parameters(model, ["nope"])
    with pytest.raises(ValueError):
        select_parameters(model, [nn.Parameter(torch.zeros(1))])


# --------------------------------------------------------------------------- side effects


def test_parameters_buffers_grads_and_modes_untouched():
    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Linear(3, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 3)
    )
    model.train()
    model[1].eval()  # a mixed-mode model must come back mixed
    modes = [m.training for m in model.modules()]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(12, 3), torch.randint(0, 3, (12,))
    data = (x, y)

    def untouched():
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert [m.training for m in model.modules()] == modes
        assert all(p.grad is None for p in model.parameters())

    op = HessianOperator(model, data, batch_size=5)
    v = torch.randn(op.dim)
    first = op.matvec(v)
    untouched()
    assert torch.equal(op.matvec(v), first)  # eval mode: dropout off, deterministic
    hessian_trace(model, data, max_probes=12)
    untouched()
    top_eigenvalues(model, data, k=2)
    untouched()
    top_eigenvalues(model, data, k=1, method="power", max_iter=20, tol=1e-2)
    untouched()
    spectral_density(model, data, n_steps=5)
    untouched()
    perturbation_loss_gap(model, data, 0.05, 4, params=layer_weights(model))
    untouched()
    op.loss()
    untouched()
