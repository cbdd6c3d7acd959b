"""Noise geometry of SGD against dense references built explicitly."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from bayesflat.diagnostics.flatness import HessianOperator
from bayesflat.diagnostics.noise import (
    GaussNewtonOperator,
    iter_per_example_gradients,
    noise_alignment,
    per_example_gradients,
)


@pytest.fixture(autouse=True)
def single_thread():
    """The problems are tiny: intra-op threads only add synchronisation (and contention)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def mse(out, target):
    return F.mse_loss(out.squeeze(-1), target)


def least_squares(n=40):
    """Linear model, L = mean (w'x + b - y)^2: g_i = 2 r_i x~_i, H = G = 2 X~'X~ / n."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, generator=gen, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5])
    y = x @ torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    y = y + 0.3 * torch.randn(n, generator=gen, dtype=torch.float64)
    torch.manual_seed(1)
    model = nn.Linear(3, 1).to(torch.float64)
    return model, x, y


def least_squares_reference(model, x, y, sample_size):
    xt = torch.cat([x, torch.ones(len(y), 1, dtype=torch.float64)], dim=1)
    theta = torch.cat([model.weight.detach().reshape(-1), model.bias.detach()])
    r = xt @ theta - y
    g = 2 * r[:, None] * xt
    return g[:sample_size], 2 * xt.T @ xt / len(y), float((r**2).mean())


def alignment_reference(g, curv, loss):
    """Wang & Wu's average and directional alignment from dense matrices."""
    c = g - g.mean(0)
    sigma = c.T @ c / len(g)
    average = float(torch.trace(sigma @ curv) / (2 * loss * (curv**2).sum()))
    evals, evecs = torch.linalg.eigh(curv)
    top, bottom = evecs[:, -1], evecs[:, 0]
    directional = [float(v @ sigma @ v / (2 * loss * (v @ curv @ v))) for v in (top, bottom)]
    return average, directional, (top.numpy(), bottom.numpy()), sigma, evals


def small_classifier():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 3)).to(torch.float64)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(10, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (10,), generator=gen)
    return model, x, y


def flat_function(model):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat0 = torch.cat([p.detach().reshape(-1) for _, p in model.named_parameters()])

    def outputs(flat, x):
        parts = torch.split(flat, [math.prod(s) for s in shapes])
        weights = {n: t.reshape(s) for n, t, s in zip(names, parts, shapes, strict=True)}
        return functional_call(model, weights, (x,))

    return flat0, outputs


def loop_gradients(model, x, y, loss_fn):
    rows = []
    for xi, yi in zip(x, y, strict=True):
        loss = loss_fn(model(xi[None]), yi[None])
        grads = torch.autograd.grad(loss, list(model.parameters()))
        rows.append(torch.cat([t.reshape(-1) for t in grads]))
    return torch.stack(rows)


def rel(a, b):
    return abs(a - b) / abs(b)


# --------------------------------------------------------------------------- gradients


def test_per_example_gradients_match_dense():
    model, x, y = least_squares()
    g_ref, _, _ = least_squares_reference(model, x, y, len(y))
    g = per_example_gradients(model, x, y, loss_fn=mse)
    assert g.shape == (40, 4)
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-12)
    chunks = list(iter_per_example_gradients(model, x, y, loss_fn=mse, chunk_size=16))
    assert [c.shape[0] for c in chunks] == [16, 16, 8]
    torch.testing.assert_close(torch.cat(chunks), g_ref, rtol=1e-12, atol=1e-12)
    only_bias = per_example_gradients(model, x, y, loss_fn=mse, params=["bias"])
    torch.testing.assert_close(only_bias, g_ref[:, 3:], rtol=1e-12, atol=1e-12)


def test_per_example_gradients_cross_entropy():
    model, x, y = small_classifier()
    ref = loop_gradients(model, x, y, F.cross_entropy)
    model.zero_grad(set_to_none=True)
    torch.testing.assert_close(per_example_gradients(model, x, y, chunk_size=3), ref)


# --------------------------------------------------------------------------- Gauss-Newton


def test_gauss_newton_equals_dense_reference_for_cross_entropy():
    model, x, y = small_classifier()
    flat0, outputs = flat_function(model)
    jac = torch.autograd.functional.jacobian(lambda f: outputs(f, x), flat0)  # (n, C, d)
    p = torch.softmax(outputs(flat0, x), dim=-1).detach()
    h_out = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    dense = torch.einsum("ncd,nce,nef->df", jac, h_out, jac) / len(y)
    op = GaussNewtonOperator(model, (x, y), batch_size=4)
    np.testing.assert_allclose(op.dense(), dense.numpy(), rtol=1e-10, atol=1e-12)


def test_gauss_newton_equals_hessian_for_linear_least_squares():
    model, x, y = least_squares()
    _, curv, _ = least_squares_reference(model, x, y, len(y))
    gn = GaussNewtonOperator(model, (x, y), loss_fn=mse).dense()
    hess = HessianOperator(model, (x, y), loss_fn=mse).dense()
    np.testing.assert_allclose(gn, curv.numpy(), rtol=1e-12)
    np.testing.assert_allclose(hess, curv.numpy(), rtol=1e-12)


# --------------------------------------------------------------------------- alignment


@pytest.mark.parametrize("curvature", ["hessian", "gauss_newton"])
@pytest.mark.parametrize("sample_size", [40, 25])
def test_alignment_exact_paths_match_dense(curvature, sample_size):
    model, x, y = least_squares()
    g, curv, loss = least_squares_reference(model, x, y, sample_size)
    average, directional, (top, bottom), _, evals = alignment_reference(g, curv, loss)
    res = noise_alignment(
        model,
        (x, y),
        sample=(x[:sample_size], y[:sample_size]),
        curvature=curvature,
        loss_fn=mse,
        batch_size=16,
        n_top=1,
        n_bottom=1,
        frobenius="exact",
        eig_tol=0,
        chunk_size=7,
    )
    assert res.frobenius_method == "exact" and res.average_stderr == 0
    assert res.n_examples == sample_size and res.dim == 4 and res.curvature == curvature
    assert rel(res.loss, loss) < 1e-12
    assert rel(res.frobenius_sq, float((curv**2).sum())) < 1e-10
    assert rel(res.average, average) < 1e-5
    assert rel(res.top.alignment[0], directional[0]) < 1e-5
    assert rel(res.bottom.alignment[0], directional[1]) < 1e-5
    assert rel(res.top.curvature[0], float(evals[-1])) < 1e-10
    assert rel(res.bottom.curvature[0], float(evals[0])) < 1e-10
    assert abs(abs(res.top.directions[:, 0] @ top) - 1) < 1e-8
    assert abs(abs(res.bottom.directions[:, 0] @ bottom) - 1) < 1e-8


def test_alignment_with_hessian_of_a_classifier():
    # Hessian != Gauss-Newton here; references are the dense Hessian and looped gradients
    model, x, y = small_classifier()
    flat0, outputs = flat_function(model)
    hess = torch.autograd.functional.hessian(lambda f: F.cross_entropy(outputs(f, x), y), flat0)
    g = loop_gradients(model, x, y, F.cross_entropy)
    model.zero_grad(set_to_none=True)
    loss = F.cross_entropy(model(x), y).item()
    average, directional, _, _, _ = alignment_reference(g, hess, loss)
    res = noise_alignment(model, (x, y), n_top=1, n_bottom=1, frobenius="exact", eig_tol=0)
    assert rel(res.average, average) < 1e-5
    assert rel(res.top.alignment[0], directional[0]) < 1e-5
    assert rel(res.bottom.alignment[0], directional[1]) < 1e-5


def test_alignment_hutchinson_within_standard_error():
    model, x, y = least_squares()
    g, curv, loss = least_squares_reference(model, x, y, len(y))
    average, _, _, _, _ = alignment_reference(g, curv, loss)
    res = noise_alignment(
        model, (x, y), loss_fn=mse, frobenius="hutchinson", n_top=0, rtol=0.01, max_probes=4000
    )
    # Var ||Gz||^2 = Var z'Mz with M = G^2: 2 (||M||_F^2 - sum_i M_ii^2)
    m = curv @ curv
    probe_sd = math.sqrt(2 * float((m**2).sum() - (torch.diagonal(m) ** 2).sum()))
    n_probes = round((probe_sd / res.frobenius_sq_stderr) ** 2)
    theory_se = probe_sd / math.sqrt(n_probes)
    assert res.frobenius_method == "hutchinson" and res.top is None
    assert abs(res.frobenius_sq - float((curv**2).sum())) < 4 * theory_se
    assert abs(res.average - average) < 4 * res.average_stderr
    assert res.average_stderr == pytest.approx(res.average * theory_se / res.frobenius_sq, rel=0.5)


def test_alignment_leaves_model_untouched_and_validates():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3))
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(8, 3), torch.randint(0, 3, (8,))
    for curvature in ("hessian", "gauss_newton"):
        noise_alignment(
            model, (x, y), curvature=curvature, n_top=1, frobenius="hutchinson", max_probes=10
        )
    per_example_gradients(model, x, y)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError):
        noise_alignment(model, (x, y), curvature="fisher")
