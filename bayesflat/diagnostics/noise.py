"""Noise geometry of SGD: how the minibatch-noise covariance aligns with the curvature.

Wang & Wu, "The noise geometry of stochastic gradient descent: a quantitative and
analytical characterization" (2023, arXiv:2310.00692). With per-example gradients
``g_i = grad loss_i(theta)`` on a sample of ``n`` examples, their mean ``gbar`` and the
mean loss ``L(theta)`` over the dataset (nats per example), this module computes

    Sigma    = (1/n) sum_i (g_i - gbar)(g_i - gbar)'            SGD noise covariance
    mu       = Tr(Sigma G) / (2 L ||G||_F^2)                    average alignment
    mu_v     = v' Sigma v / (2 L v' G v)                        directional alignment

where ``G`` is the curvature of the mean loss over the dataset: its Hessian
(``curvature="hessian"``) or its Gauss–Newton matrix (``curvature="gauss_newton"``,
``G = (1/N) sum_i J_i' H_out,i J_i``, ``J_i`` the Jacobian of example ``i``'s outputs with
respect to the parameters and ``H_out,i`` the Hessian of its loss with respect to the
outputs: ``diag(p) - p p'`` for softmax cross-entropy, ``2 I`` for ``(f - y)^2``). For
squared loss on a model linear in its parameters the two coincide. ``mu`` and ``mu_v`` are
dimensionless and invariant to rescaling the loss; ``mu_v`` near 1 means the noise
variance along ``v`` is what a loss-proportional, curvature-aligned noise would give.

``d x d`` matrices are never formed (except by request when ``d`` is small):
per-example gradients come from :func:`torch.func.vmap` over :func:`torch.func.grad`, and
``G`` is applied by products (:class:`~bayesflat.diagnostics.flatness.HessianOperator`,
:class:`GaussNewtonOperator`). Arguments ``model``, ``data``, ``loss_fn``, ``params``,
``batch_size`` and ``seed`` are as in :mod:`bayesflat.diagnostics.flatness`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from bayesflat.diagnostics.flatness import (
    CurvatureOperator,
    HessianOperator,
    LossFn,
    ParamSpec,
    Seed,
    _concat,
    _detached,
    _eval_mode,
    _generator,
    hutchinson,
    select_parameters,
)

__all__ = [
    "DirectionalAlignment",
    "GaussNewtonOperator",
    "NoiseAlignment",
    "iter_per_example_gradients",
    "noise_alignment",
    "per_example_gradients",
]

CURVATURES = ("hessian", "gauss_newton")
_EXACT_FROBENIUS_MAX_DIM = 128


def iter_per_example_gradients(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    loss_fn: LossFn | None = None,
    params: ParamSpec = None,
    chunk_size: int | None = None,
) -> Iterator[Tensor]:
    """Per-example gradients ``g_i = grad_theta loss(model(x_i), y_i)``, chunk by chunk.

    Each example is passed alone (a batch of one) through
    :func:`torch.func.functional_call`, differentiated by :func:`torch.func.grad` and
    vectorised by :func:`torch.func.vmap`; the model is in eval mode for each chunk and its
    modes are restored between chunks.

    Parameters
    ----------
    x, y : torch.Tensor
        Inputs and targets, first dimension ``n``.
    chunk_size : int, optional
        Examples per chunk (default: all at once). Memory per chunk: ``chunk_size * d``
        numbers plus vmap's activations.

    Yields
    ------
    torch.Tensor, shape (chunk, d)
        Rows in example order, columns in flat-parameter order (the selected parameters in
        ``model.named_parameters()`` order), dtype of the parameters. Units: loss per
        parameter unit.
    """
    loss_fn = loss_fn or F.cross_entropy
    selected = select_parameters(model, params)
    names = [n for n, _ in selected]
    device = selected[0][1].device
    base = _detached(model)
    chosen = {n: base[n] for n in names}

    def example_loss(weights: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        out = functional_call(model, {**base, **weights}, (xi.unsqueeze(0),))
        return loss_fn(out, yi.unsqueeze(0))

    per_example = vmap(grad(example_loss), in_dims=(None, 0, 0))
    n = y.shape[0]
    step = chunk_size or n
    for s in range(0, n, step):
        with _eval_mode(model), torch.no_grad():
            g = per_example(chosen, x[s : s + step].to(device), y[s : s + step].to(device))
        yield torch.cat([g[k].reshape(g[k].shape[0], -1) for k in names], dim=1)


def per_example_gradients(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    loss_fn: LossFn | None = None,
    params: ParamSpec = None,
    chunk_size: int | None = None,
) -> Tensor:
    """The ``(n, d)`` matrix of per-example gradients; see :func:`iter_per_example_gradients`."""
    return torch.cat(
        list(
            iter_per_example_gradients(
                model, x, y, loss_fn=loss_fn, params=params, chunk_size=chunk_size
            )
        )
    )


class GaussNewtonOperator(CurvatureOperator):
    """Generalised Gauss–Newton matrix of the mean loss, ``G = (1/N) sum_i J_i' H_out,i J_i``.

    ``G v`` for one batch is ``J' (d^2 L_b / d f^2) (J v)`` from one forward pass: the JVP
    ``J v`` by the double-VJP trick (``J' u`` is linear in ``u``, so ``d(J' u . v)/du = J v``;
    reverse mode only, which every module that supports Hessian-vector products also
    supports), the output Hessian applied by double back-propagation through ``loss_fn``
    (so any loss twice differentiable in the outputs works), then the VJP ``J' w``. In eval
    mode an example's outputs depend on its input only, so the batch product is the sum of
    per-example ones. ``G`` is positive semi-definite for convex losses (cross-entropy,
    squared error). Units: loss per squared parameter unit.
    Same constructor and methods as :class:`~bayesflat.diagnostics.flatness.HessianOperator`.
    """

    def _batch_matvec(self, x, y, overrides, leaves, v):
        for t in leaves:
            t.requires_grad_(True)
        out = functional_call(self.model, overrides, (x,))
        # J v by reverse mode twice: J' u is linear in u, and d(J' u . v)/du = J v
        u = torch.zeros_like(out, requires_grad=True)
        jt_u = torch.autograd.grad(
            out, leaves, grad_outputs=u, create_graph=True, allow_unused=True
        )
        used = [(a, b) for a, b in zip(jt_u, v, strict=True) if a is not None]
        if not used:
            return [torch.zeros_like(t) for t in leaves]
        (jv,) = torch.autograd.grad(
            [a for a, _ in used], u, grad_outputs=[b for _, b in used], retain_graph=True
        )
        detached = out.detach().requires_grad_(True)
        (g_out,) = torch.autograd.grad(self.loss_fn(detached, y), detached, create_graph=True)
        if not g_out.requires_grad:  # loss linear in the outputs: no curvature
            return [torch.zeros_like(t) for t in leaves]
        (h_jv,) = torch.autograd.grad(g_out, detached, grad_outputs=jv)
        jt_h_jv = torch.autograd.grad(out, leaves, grad_outputs=h_jv, allow_unused=True)
        return [
            torch.zeros_like(t) if a is None else a for a, t in zip(jt_h_jv, leaves, strict=True)
        ]


@dataclass(frozen=True)
class DirectionalAlignment:
    """Alignment along eigenvectors ``v`` of the curvature ``G``.

    Attributes
    ----------
    curvature : numpy.ndarray, shape (m,)
        ``v' G v``, the eigenvalues (Ritz values), loss per squared parameter unit.
    noise : numpy.ndarray, shape (m,)
        ``v' Sigma v = (1/n) sum_i ((g_i - gbar)' v)^2``, squared loss per squared
        parameter unit.
    alignment : numpy.ndarray, shape (m,)
        ``mu_v = v' Sigma v / (2 L v' G v)``, dimensionless; NaN where ``v' G v = 0``.
    directions : numpy.ndarray, shape (d, m)
        The unit vectors ``v``, float64.
    """

    curvature: np.ndarray
    noise: np.ndarray
    alignment: np.ndarray
    directions: np.ndarray


@dataclass(frozen=True)
class NoiseAlignment:
    """Result of :func:`noise_alignment`.

    Attributes
    ----------
    average : float
        ``mu = Tr(Sigma G) / (2 L ||G||_F^2)``, dimensionless.
    average_stderr : float
        Standard error of ``average`` from the Hutchinson estimate of ``||G||_F^2`` (delta
        method, ``average * frobenius_sq_stderr / frobenius_sq``); 0 when that is exact.
        The sampling error of ``Sigma`` from a finite sample is not included.
    trace_sigma_g : float
        ``Tr(Sigma G) = (1/n) sum_i (g_i - gbar)' G (g_i - gbar)``, exact given the sample
        (``n`` products with ``G``).
    frobenius_sq : float
        ``||G||_F^2 = tr(G^2)``.
    frobenius_sq_stderr : float
        Its standard error (0 when exact).
    frobenius_method : str
        ``"exact"`` (sum of squares of the dense ``G``, ``d`` products) or
        ``"hutchinson"`` (mean of ``||G z||^2`` over Rademacher ``z``).
    loss : float
        ``L(theta)``, mean loss over the dataset, nats per example.
    n_examples : int
        Sample size ``n`` for ``Sigma``.
    dim : int
        Number ``d`` of selected parameters.
    curvature : str
        ``"hessian"`` or ``"gauss_newton"``.
    top, bottom : DirectionalAlignment or None
        Along the largest / smallest eigenvalues of ``G``.
    """

    average: float
    average_stderr: float
    trace_sigma_g: float
    frobenius_sq: float
    frobenius_sq_stderr: float
    frobenius_method: str
    loss: float
    n_examples: int
    dim: int
    curvature: str
    top: DirectionalAlignment | None
    bottom: DirectionalAlignment | None


def noise_alignment(
    model: nn.Module,
    data,
    *,
    sample: tuple[Tensor, Tensor] | None = None,
    curvature: str = "hessian",
    loss_fn: LossFn | None = None,
    params: ParamSpec = None,
    batch_size: int | None = None,
    n_top: int = 1,
    n_bottom: int = 0,
    frobenius: str = "auto",
    eig_tol: float = 1e-6,
    rtol: float = 1e-2,
    min_probes: int = 10,
    max_probes: int = 1000,
    chunk_size: int | None = None,
    seed: Seed = 0,
) -> NoiseAlignment:
    """Average and directional alignment of SGD noise with the curvature (Wang & Wu, 2023).

    Computes, over the selected parameters,

        mu   = Tr(Sigma G) / (2 L ||G||_F^2),
        mu_v = v' Sigma v / (2 L v' G v)   for the top / bottom eigenvectors v of G,

    with ``L`` the mean loss and ``G`` the curvature over ``data``, and
    ``Sigma = (1/n) sum_i (g_i - gbar)(g_i - gbar)'`` (divisor ``n``) from the per-example
    gradients of ``sample``. Estimators:

    - ``Tr(Sigma G) = (1/n) sum_i c_i' G c_i`` with ``c_i = g_i - gbar``: exact, ``n``
      products with ``G`` (each a pass over ``data``);
    - ``||G||_F^2``: ``frobenius="exact"`` sums the squares of the dense ``G`` (``d``
      products); ``"hutchinson"`` averages ``||G z||^2`` over Rademacher ``z`` (unbiased,
      ``E ||G z||^2 = tr(G^2)``) until its standard error is at most ``rtol`` times the
      mean (``min_probes`` to ``max_probes`` products); ``"auto"`` is exact when
      ``d <= 128``;
    - ``v``: Lanczos (ARPACK ``eigsh``, ``which="LA"`` for the ``n_top`` largest, ``"SA"``
      for the ``n_bottom`` smallest, the latter for small problems), relative accuracy
      ``eig_tol``; ``v' G v`` is the Ritz value and
      ``v' Sigma v = (1/n) sum_i (c_i' v)^2``.

    Per-example gradients are computed twice (once for ``gbar``, once centred) so that
    only ``chunk_size`` rows are held at a time.

    Parameters
    ----------
    model, data, loss_fn, params, batch_size, seed
        See :mod:`bayesflat.diagnostics.flatness`. ``data`` defines ``L`` and ``G``.
    sample : (Tensor, Tensor), optional
        Examples for ``Sigma``; default all of ``data``.
    curvature : {"hessian", "gauss_newton"}
    n_top, n_bottom : int
        Numbers of directions for the directional alignment (0 to skip).
    frobenius : {"auto", "exact", "hutchinson"}
    eig_tol : float
    rtol, min_probes, max_probes
        Hutchinson stopping rule, see :func:`~bayesflat.diagnostics.flatness.hutchinson`.
    chunk_size : int, optional
        Examples per vmap chunk for the per-example gradients.

    Returns
    -------
    NoiseAlignment
    """
    if curvature not in CURVATURES:
        raise ValueError(f"curvature must be one of {CURVATURES}")
    if frobenius not in ("auto", "exact", "hutchinson"):
        raise ValueError("frobenius must be 'auto', 'exact' or 'hutchinson'")
    operator_cls = HessianOperator if curvature == "hessian" else GaussNewtonOperator
    op = operator_cls(model, data, loss_fn=loss_fn, params=params, batch_size=batch_size)
    gen = _generator(seed)
    loss = op.loss()
    if not loss > 0:
        raise ValueError(f"the alignment divides by the mean loss, which is {loss}")

    x_s, y_s = _concat(op.data) if sample is None else sample

    def gradient_chunks() -> Iterator[Tensor]:
        for g in iter_per_example_gradients(
            model, x_s, y_s, loss_fn=op.loss_fn, params=op.names, chunk_size=chunk_size
        ):
            yield g.to(torch.float64)

    n = 0
    gbar = torch.zeros(op.dim, dtype=torch.float64, device=op.device)
    for g in gradient_chunks():
        gbar += g.sum(0)
        n += g.shape[0]
    gbar /= n

    pairs = []
    if n_top:
        pairs.append(op.eigenpairs(n_top, which="largest", tol=eig_tol, seed=gen))
    if n_bottom:
        pairs.append(op.eigenpairs(n_bottom, which="smallest", tol=eig_tol, seed=gen))
    directions = torch.as_tensor(
        np.concatenate([p.eigenvectors for p in pairs], axis=1) if pairs else np.zeros((op.dim, 0)),
        device=op.device,
    )

    trace_sigma_g = 0.0
    noise = torch.zeros(directions.shape[1], dtype=torch.float64, device=op.device)
    for g in gradient_chunks():
        centred = g - gbar
        for c in centred:
            trace_sigma_g += float(c @ op.matvec(c))
        noise += ((centred @ directions) ** 2).sum(0)
    trace_sigma_g /= n
    noise = (noise / n).cpu().numpy()

    if frobenius == "exact" or (frobenius == "auto" and op.dim <= _EXACT_FROBENIUS_MAX_DIM):
        frob, frob_se, method = float(np.sum(op.dense() ** 2)), 0.0, "exact"
    else:
        est = hutchinson(
            lambda z: float(op.matvec(z).square().sum()),
            op.dim,
            rtol=rtol,
            min_probes=min_probes,
            max_probes=max_probes,
            seed=gen,
        )
        frob, frob_se, method = est.trace, est.stderr, "hutchinson"

    average = trace_sigma_g / (2 * loss * frob)

    def directional(result, part: np.ndarray) -> DirectionalAlignment:
        curv = result.eigenvalues
        with np.errstate(divide="ignore", invalid="ignore"):
            mu = np.where(curv != 0, part / (2 * loss * curv), np.nan)
        return DirectionalAlignment(curv, part, mu, result.eigenvectors)

    top = directional(pairs[0], noise[:n_top]) if n_top else None
    bottom = directional(pairs[-1], noise[n_top:]) if n_bottom else None
    return NoiseAlignment(
        average=average,
        average_stderr=abs(average) * frob_se / frob,
        trace_sigma_g=trace_sigma_g,
        frobenius_sq=frob,
        frobenius_sq_stderr=frob_se,
        frobenius_method=method,
        loss=loss,
        n_examples=n,
        dim=op.dim,
        curvature=curvature,
        top=top,
        bottom=bottom,
    )
