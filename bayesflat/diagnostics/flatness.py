"""Flatness of the loss surface: Hessian-vector products, trace, extreme eigenvalues,
spectral density and the random-perturbation loss gap.

Every quantity refers to the **mean loss over a dataset** (bayesflat's mean-loss units,
see DESIGN.md section 1)

    L(theta) = (1 / N) * sum_{i=1..N} loss_i(theta)            [nats per example]

and to its Hessian ``H = d^2 L / d theta^2`` taken over a chosen subset of the parameters
(all trainable ones by default). The Hessian is never formed: it is applied to vectors by
double back-propagation (Pearlmutter's trick), one pass over the dataset per product,

    H v = d/d theta ( grad L(theta) . v ),

batch by batch, each batch's product weighted by ``n_b / N`` so that uneven batches give
the product for the mean loss over the whole dataset. The model is put in eval mode while
a diagnostic runs (BatchNorm uses its running statistics, dropout is off: the loss is a
deterministic function of the weights) and every module's mode is restored afterwards.
Parameters are never written to: products and perturbed losses are evaluated with
:func:`torch.func.functional_call` on detached copies, so the weights, their ``.grad``
and the buffers are bit-identical before and after.

Common arguments
----------------
model : torch.nn.Module
    The network; ``model(x)`` gives the outputs.
data : (Tensor, Tensor) or iterable of (Tensor, Tensor)
    Either one pair ``(x, y)`` (split into ``batch_size`` chunks if given) or a re-iterable
    of ``(x, y)`` batches such as a ``DataLoader``; a one-shot iterator is read once into a
    list. Batches are moved to the parameters' device.
loss_fn : callable, default :func:`torch.nn.functional.cross_entropy`
    ``loss_fn(outputs, targets)`` returning the **mean** loss over the batch.
params : None, callable, or iterable
    Parameters the Hessian is taken over: ``None`` for every parameter with
    ``requires_grad``; a predicate on names (``lambda name: name.endswith("weight")``); or
    an iterable of names, of ``(name, parameter)`` pairs (e.g. :func:`layer_weights`) or of
    parameters. Flat vectors follow ``model.named_parameters()`` order.
seed : int or torch.Generator
    Source of every random draw (a CPU generator); the same seed gives the same result.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy.linalg import eigh_tridiagonal
from scipy.sparse.linalg import LinearOperator, eigsh
from torch import Tensor, nn
from torch.func import functional_call

__all__ = [
    "CurvatureOperator",
    "EigenResult",
    "HessianOperator",
    "PerturbationGap",
    "SpectralDensity",
    "TraceEstimate",
    "hessian_trace",
    "hutchinson",
    "layer_weights",
    "perturbation_loss_gap",
    "select_parameters",
    "spectral_density",
    "top_eigenvalues",
]

LossFn = Callable[[Tensor, Tensor], Tensor]
ParamSpec = Callable[[str], bool] | Iterable[str | tuple[str, Tensor] | Tensor] | None
Seed = int | torch.Generator

_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


# --------------------------------------------------------------------------- parameters


def select_parameters(model: nn.Module, params: ParamSpec = None) -> list[tuple[str, Tensor]]:
    """Resolve a parameter selection to ``(name, parameter)`` pairs in model order.

    Parameters
    ----------
    model : torch.nn.Module
    params : None, callable, or iterable
        ``None``: every parameter with ``requires_grad``. A callable: the parameters whose
        name it accepts. An iterable of names, ``(name, parameter)`` pairs or parameters.

    Returns
    -------
    list of (str, torch.Tensor)
        Ordered as in ``model.named_parameters()``.

    Raises
    ------
    ValueError
        If a name or parameter does not belong to the model, or nothing is selected.
    """
    named = list(model.named_parameters())
    if params is None:
        chosen = [(n, p) for n, p in named if p.requires_grad]
    elif callable(params):
        chosen = [(n, p) for n, p in named if params(n)]
    else:
        by_id = {id(p): n for n, p in named}
        known = {n for n, _ in named}
        wanted = set()
        for item in params:
            if isinstance(item, str):
                name = item
            elif isinstance(item, tuple):
                name = item[0]
            elif isinstance(item, Tensor):
                if id(item) not in by_id:
                    raise ValueError("a tensor in `params` is not a parameter of the model")
                name = by_id[id(item)]
            else:
                raise TypeError(f"cannot select a parameter from {type(item).__name__}")
            if name not in known:
                raise ValueError(f"{name!r} is not a parameter name of the model")
            wanted.add(name)
        chosen = [(n, p) for n, p in named if n in wanted]
    if not chosen:
        raise ValueError("the parameter selection is empty")
    return chosen


def layer_weights(model: nn.Module) -> list[tuple[str, Tensor]]:
    """Weights of the ``Linear`` and ``Conv{1,2,3}d`` layers (no biases, no norm layers).

    The usual restriction for flatness measures; pass the result as ``params``.
    """
    ids = {id(m.weight) for m in model.modules() if isinstance(m, _LAYER_TYPES)}
    return [(n, p) for n, p in model.named_parameters() if id(p) in ids]


# --------------------------------------------------------------------------- plumbing


def _generator(seed: Seed) -> torch.Generator:
    if isinstance(seed, torch.Generator):
        return seed
    return torch.Generator().manual_seed(int(seed))


def _rademacher(dim: int, gen: torch.Generator) -> Tensor:
    return torch.randint(0, 2, (dim,), generator=gen, dtype=torch.int8).to(torch.float64) * 2 - 1


def _reiterable(data, batch_size: int | None):
    if _is_pair(data):
        return data
    if batch_size is not None:
        raise ValueError("batch_size applies to a single (x, y) pair, not to batches")
    if iter(data) is data:
        return list(data)
    return data


def _is_pair(data) -> bool:
    return (
        isinstance(data, tuple | list)
        and len(data) == 2
        and isinstance(data[0], Tensor)
        and isinstance(data[1], Tensor)
    )


def _batches(data, batch_size: int | None, device: torch.device) -> Iterator[tuple]:
    if _is_pair(data):
        inputs, targets = data
        n = targets.shape[0]
        step = batch_size or n
        chunks = ((inputs[s : s + step], targets[s : s + step]) for s in range(0, n, step))
    else:
        chunks = ((b[0], b[1]) for b in data)
    for x, y in chunks:
        yield _to(x, device), _to(y, device)


def _to(t, device):
    return t.to(device) if isinstance(t, Tensor) else t


def _count(y) -> int:
    return y.shape[0] if isinstance(y, Tensor) else len(y)


def _concat(data):
    """The whole dataset as one (x, y) pair."""
    if _is_pair(data):
        return data
    xs, ys = zip(*((b[0], b[1]) for b in data), strict=True)
    return torch.cat(xs), torch.cat(ys)


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _detached(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach() for n, p in model.named_parameters()}


def _mean_loss(model, data, batch_size, loss_fn, overrides, device) -> float:
    """``(1/N) sum_b n_b L_b`` with the parameters replaced by ``overrides``; no grad."""
    total, n = 0.0, 0
    with torch.no_grad():
        for x, y in _batches(data, batch_size, device):
            nb = _count(y)
            total += nb * float(loss_fn(functional_call(model, overrides, (x,)), y))
            n += nb
    return total / n


def _stats(samples: list[float]) -> tuple[float, float]:
    a = np.asarray(samples, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1) / math.sqrt(a.size))


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class TraceEstimate:
    """Hutchinson estimate of a trace.

    Attributes
    ----------
    trace : float
        Mean of the probe values ``z' M z``; for the Hessian, in loss units per
        squared parameter unit.
    stderr : float
        Standard error of that mean, ``std(z' M z, ddof=1) / sqrt(n_probes)``.
    n_probes : int
        Number of Rademacher probes used.
    dim : int
        Dimension ``d`` of the matrix.
    normalized_trace : float
        ``trace / d``, the mean eigenvalue.
    converged : bool
        Whether ``stderr <= rtol * |trace|`` was reached before ``max_probes``.
    """

    trace: float
    stderr: float
    n_probes: int
    dim: int
    normalized_trace: float
    converged: bool


@dataclass(frozen=True)
class EigenResult:
    """Extreme eigenpairs of a curvature operator.

    Attributes
    ----------
    eigenvalues : numpy.ndarray, shape (k,)
        Descending. Units of the operator (loss per squared parameter unit).
    eigenvectors : numpy.ndarray, shape (d, k)
        Unit-norm columns matching ``eigenvalues``, float64, in flat-parameter order.
    method : str
        ``"lanczos"`` or ``"power"``.
    n_matvecs : int
        Operator products spent (each is one pass over the dataset).
    converged : bool
        Power iteration: every pair met the residual tolerance. Lanczos: always ``True``
        (ARPACK raises when it does not converge).
    """

    eigenvalues: np.ndarray
    eigenvectors: np.ndarray
    method: str
    n_matvecs: int
    converged: bool


@dataclass(frozen=True)
class SpectralDensity:
    """Stochastic Lanczos quadrature of the eigenvalue density (Ghorbani et al., 2019).

    The density of eigenvalues ``phi(t) = (1/d) sum_i delta(t - lambda_i)`` is approximated
    by the Gauss quadrature rules of ``n_runs`` Lanczos runs from random unit vectors:
    nodes ``theta_j`` (Ritz values) with weights ``tau_j`` (squared first components of
    the Ritz vectors), each run's weights summing to one.

    Attributes
    ----------
    nodes : numpy.ndarray, shape (m,)
        Quadrature nodes of all runs, concatenated. Units of the operator.
    weights : numpy.ndarray, shape (m,)
        Matching weights divided by ``n_runs``; they sum to one.
    dim : int
        Dimension ``d`` of the operator.
    n_runs : int
        Number of Lanczos runs.
    """

    nodes: np.ndarray
    weights: np.ndarray
    dim: int
    n_runs: int

    def density(self, grid: np.ndarray, bandwidth: float) -> np.ndarray:
        """Smoothed density ``phi_s(t) = sum_j w_j N(t; theta_j, s^2)`` on ``grid``.

        Integrates to one; units of 1 / (operator units).
        """
        grid = np.asarray(grid, dtype=np.float64)
        z = (grid[:, None] - self.nodes[None, :]) / bandwidth
        kernel = np.exp(-0.5 * z**2) / (bandwidth * math.sqrt(2 * math.pi))
        return kernel @ self.weights

    def expectation(self, f: Callable[[np.ndarray], np.ndarray]) -> float:
        """Quadrature estimate of ``(1/d) tr f(H) = sum_j w_j f(theta_j)``."""
        return float(np.sum(self.weights * f(self.nodes)))


@dataclass(frozen=True)
class PerturbationGap:
    """Monte-Carlo estimate of the random-perturbation loss gap.

    Attributes
    ----------
    gap : float
        ``E_eps[L(theta + sigma eps)] - L(theta)``, nats per example.
    stderr : float
        Standard error of ``gap``.
    n_samples : int
        Number of draws of ``eps`` (each costs two loss passes when antithetic).
    sigma : float
        Perturbation scale, parameter units.
    base_loss : float
        ``L(theta)``.
    antithetic : bool
        Whether ``+eps`` and ``-eps`` were paired.
    dim : int
        Number of perturbed coordinates ``d``.
    implied_trace : float
        ``2 gap / sigma^2``, equal to ``tr H`` to second order in sigma.
    """

    gap: float
    stderr: float
    n_samples: int
    sigma: float
    base_loss: float
    antithetic: bool
    dim: int
    implied_trace: float


# --------------------------------------------------------------------------- estimators


def hutchinson(
    quadratic_form: Callable[[Tensor], float],
    dim: int,
    *,
    rtol: float = 1e-2,
    min_probes: int = 10,
    max_probes: int = 1000,
    seed: Seed = 0,
) -> TraceEstimate:
    """Hutchinson estimate of ``tr M`` from Rademacher probes.

    ``tr M = E[z' M z]`` for ``z`` with independent ``+-1`` entries; the variance of one
    probe is ``2 (||M||_F^2 - sum_i M_ii^2)``. Probes are drawn until the standard error of
    the mean is at most ``rtol * |mean|``, after at least ``min_probes`` and at most
    ``max_probes`` of them.

    Parameters
    ----------
    quadratic_form : callable
        ``z -> z' M z`` for a float64 CPU tensor ``z`` of shape ``(dim,)``. For
        ``||G||_F^2 = tr(G^2)`` pass ``z -> ||G z||^2``.
    dim : int
    rtol : float
        Relative standard-error target.
    min_probes, max_probes : int
        ``2 <= min_probes <= max_probes``.
    seed : int or torch.Generator

    Returns
    -------
    TraceEstimate
    """
    if not 2 <= min_probes <= max_probes:
        raise ValueError("need 2 <= min_probes <= max_probes")
    if rtol <= 0:
        raise ValueError("rtol must be positive")
    gen = _generator(seed)
    samples: list[float] = []
    converged = False
    while len(samples) < max_probes:
        samples.append(float(quadratic_form(_rademacher(dim, gen))))
        if len(samples) >= min_probes:
            mean, se = _stats(samples)
            if se <= rtol * abs(mean):
                converged = True
                break
    mean, se = _stats(samples)
    return TraceEstimate(mean, se, len(samples), dim, mean / dim, converged)


class CurvatureOperator:
    """A symmetric ``d x d`` curvature matrix of the mean loss, applied by products.

    Subclasses define the per-batch product; this class handles the parameter selection,
    flattening, batching with ``n_b / N`` weights, eval mode, and the estimators built on
    products (trace, extreme eigenpairs, spectral density).

    Parameters
    ----------
    model, data, loss_fn, params
        See the module docstring.
    batch_size : int, optional
        Split a single ``(x, y)`` pair into batches of this size (default: one batch).

    Attributes
    ----------
    dim : int
        Number ``d`` of selected scalar parameters.
    names : list of str
        Selected parameter names, in flat-vector order.
    n_matvecs : int
        Products computed so far.
    """

    def __init__(
        self,
        model: nn.Module,
        data,
        *,
        loss_fn: LossFn | None = None,
        params: ParamSpec = None,
        batch_size: int | None = None,
    ) -> None:
        self.model = model
        self.data = _reiterable(data, batch_size)
        self.loss_fn = loss_fn or F.cross_entropy
        self.batch_size = batch_size
        selected = select_parameters(model, params)
        self.names = [n for n, _ in selected]
        self._shapes = [p.shape for _, p in selected]
        self._numels = [p.numel() for _, p in selected]
        self._dtypes = [p.dtype for _, p in selected]
        self.device = selected[0][1].device
        self.dim = sum(self._numels)
        self.n_matvecs = 0

    def _batch_matvec(
        self, x, y, overrides: dict[str, Tensor], leaves: list[Tensor], v: list[Tensor]
    ) -> list[Tensor]:
        """One batch's curvature times ``v``.

        ``overrides`` maps every parameter name to a detached copy for
        :func:`torch.func.functional_call`; ``leaves`` are the selected ones among them and
        ``v`` holds one tensor per selected parameter.
        """
        raise NotImplementedError

    def _leaves(self) -> tuple[dict[str, Tensor], list[Tensor]]:
        overrides = _detached(self.model)
        leaves = [overrides[n] for n in self.names]
        return overrides, leaves

    def split(self, v: Tensor) -> list[Tensor]:
        """Split a flat vector into tensors shaped like the selected parameters."""
        parts = torch.split(v, self._numels)
        return [p.reshape(s) for p, s in zip(parts, self._shapes, strict=True)]

    def matvec(self, v):
        """Curvature-vector product ``M v`` over the whole dataset.

        Parameters
        ----------
        v : numpy.ndarray or torch.Tensor, shape (d,)
            float32 or float64. It is cast to each parameter's dtype for the products.

        Returns
        -------
        numpy.ndarray or torch.Tensor, shape (d,)
            Same kind and dtype as ``v`` (a tensor on ``v``'s device). Accumulation over
            batches is done in ``v``'s dtype.
        """
        as_numpy = not isinstance(v, Tensor)
        vt = torch.as_tensor(np.asarray(v) if as_numpy else v)
        if vt.shape != (self.dim,):
            raise ValueError(f"expected a vector of shape ({self.dim},), got {tuple(vt.shape)}")
        out_dtype, out_device = vt.dtype, vt.device
        chunks = [
            c.to(device=self.device, dtype=dt)
            for c, dt in zip(self.split(vt), self._dtypes, strict=True)
        ]
        acc = torch.zeros(self.dim, dtype=out_dtype, device=self.device)
        n = 0
        with _eval_mode(self.model), torch.enable_grad():
            for x, y in _batches(self.data, self.batch_size, self.device):
                overrides, leaves = self._leaves()
                parts = self._batch_matvec(x, y, overrides, leaves, chunks)
                nb = _count(y)
                acc.add_(torch.cat([p.reshape(-1) for p in parts]).to(out_dtype), alpha=nb)
                n += nb
        self.n_matvecs += 1
        acc /= n
        return acc.cpu().numpy() if as_numpy else acc.to(out_device)

    def loss(self) -> float:
        """Mean loss ``L(theta)`` over the dataset, nats per example."""
        with _eval_mode(self.model):
            return _mean_loss(
                self.model,
                self.data,
                self.batch_size,
                self.loss_fn,
                _detached(self.model),
                self.device,
            )

    def as_linear_operator(self) -> LinearOperator:
        """The operator as a float64 :class:`scipy.sparse.linalg.LinearOperator`."""

        def mv(v):
            return self.matvec(np.asarray(v, dtype=np.float64).reshape(-1))

        return LinearOperator((self.dim, self.dim), matvec=mv, rmatvec=mv, dtype=np.float64)

    def dense(self) -> np.ndarray:
        """The full ``d x d`` matrix, float64, column by column (``d`` products)."""
        eye = np.eye(self.dim)
        return np.stack([self.matvec(e) for e in eye], axis=1)

    def trace(
        self,
        *,
        rtol: float = 1e-2,
        min_probes: int = 10,
        max_probes: int = 1000,
        seed: Seed = 0,
    ) -> TraceEstimate:
        """Hutchinson estimate of ``tr M`` with ``z' M z`` probes; see :func:`hutchinson`."""
        return hutchinson(
            lambda z: float(z @ self.matvec(z)),
            self.dim,
            rtol=rtol,
            min_probes=min_probes,
            max_probes=max_probes,
            seed=seed,
        )

    def eigenpairs(
        self,
        k: int = 1,
        *,
        which: str = "largest",
        method: str = "lanczos",
        tol: float = 1e-4,
        max_iter: int | None = None,
        seed: Seed = 0,
    ) -> EigenResult:
        """Extreme eigenpairs by Lanczos (ARPACK) or power iteration with deflation.

        Parameters
        ----------
        k : int
            Number of eigenpairs (``k < d`` for Lanczos, ``k <= d`` for power iteration).
        which : {"largest", "smallest"}
            Algebraically largest (ARPACK ``which="LA"``) or smallest (``"SA"``; ARPACK
            without shift-invert converges slowly here, so keep it to small problems).
        method : {"lanczos", "power"}
            ``"lanczos"``: :func:`scipy.sparse.linalg.eigsh` on :meth:`as_linear_operator`,
            ``tol`` being ARPACK's relative accuracy of the eigenvalues and ``max_iter``
            its number of restarts. ``"power"``: power iteration on the deflated operator
            ``P M P`` with ``P = I - U U'`` projecting out the pairs already found; a pair
            is accepted when ``||M v - lambda v|| <= tol * |lambda|``, after at most
            ``max_iter`` products (default 500). Power iteration converges to the
            eigenvalue of largest *magnitude*, so ``which="largest"`` only; for a matrix
            whose most negative eigenvalue dominates use Lanczos.
        tol : float
        max_iter : int, optional
        seed : int or torch.Generator
            Draws the starting vectors.

        Returns
        -------
        EigenResult
        """
        if which not in ("largest", "smallest"):
            raise ValueError("which must be 'largest' or 'smallest'")
        gen = _generator(seed)
        start = self.n_matvecs
        if method == "lanczos":
            if not 1 <= k < self.dim:
                raise ValueError(f"Lanczos needs 1 <= k < d = {self.dim}")
            v0 = torch.randn(self.dim, generator=gen, dtype=torch.float64).numpy()
            vals, vecs = eigsh(
                self.as_linear_operator(),
                k=k,
                which="LA" if which == "largest" else "SA",
                tol=tol,
                maxiter=max_iter,
                v0=v0,
            )
            converged = True
        elif method == "power":
            if which != "largest":
                raise ValueError("power iteration finds the largest eigenvalues only")
            if not 1 <= k <= self.dim:
                raise ValueError(f"need 1 <= k <= d = {self.dim}")
            vals, vecs, converged = self._power(k, tol, max_iter or 500, gen)
        else:
            raise ValueError("method must be 'lanczos' or 'power'")
        order = np.argsort(vals)[::-1]
        return EigenResult(
            np.asarray(vals)[order],
            np.asarray(vecs)[:, order],
            method,
            self.n_matvecs - start,
            converged,
        )

    def _power(self, k: int, tol: float, max_iter: int, gen: torch.Generator):
        found: list[Tensor] = []
        vals: list[float] = []
        all_converged = True

        def deflate(u: Tensor) -> Tensor:
            for q in found:
                u = u - (q @ u) * q
            return u

        for _ in range(k):
            v = deflate(torch.randn(self.dim, generator=gen, dtype=torch.float64))
            v /= v.norm()
            lam, converged = 0.0, False
            for _ in range(max_iter):
                mv = deflate(self.matvec(v))
                lam = float(v @ mv)
                if float((mv - lam * v).norm()) <= tol * abs(lam):
                    converged = True
                    break
                norm = mv.norm()
                if norm == 0:
                    break
                v = deflate(mv / norm)
                v /= v.norm()
            if not converged:
                all_converged = False
                warnings.warn(
                    f"power iteration did not reach tol={tol} in {max_iter} products",
                    RuntimeWarning,
                    stacklevel=3,
                )
            found.append(v)
            vals.append(lam)
        return np.array(vals), torch.stack(found, dim=1).numpy(), all_converged

    def spectral_density(
        self, *, n_runs: int = 1, n_steps: int = 80, seed: Seed = 0
    ) -> SpectralDensity:
        """Stochastic Lanczos quadrature (Ghorbani, Krishnan & Xiao, 2019, arXiv:1901.10159).

        Each run starts Lanczos from a Gaussian unit vector ``v`` and runs ``m = n_steps``
        steps with full reorthogonalisation, giving the tridiagonal ``T = Q diag(theta) Q'``.
        The rule ``sum_j tau_j f(theta_j)`` with ``tau_j = Q_{1j}^2`` is exact for
        ``v' f(M) v`` whenever ``f`` is a polynomial of degree ``< 2m``, and
        ``E[v' f(M) v] = (1/d) tr f(M)``. Memory: ``m * d`` float64 numbers per run.

        Parameters
        ----------
        n_runs : int
            Number of independent starting vectors.
        n_steps : int
            Lanczos steps per run, capped at ``d``; a run stops early on breakdown.
        seed : int or torch.Generator

        Returns
        -------
        SpectralDensity
        """
        gen = _generator(seed)
        m = min(n_steps, self.dim)
        nodes, weights = [], []
        for _ in range(n_runs):
            theta, tau = self._lanczos_quadrature(
                torch.randn(self.dim, generator=gen, dtype=torch.float64), m
            )
            nodes.append(theta)
            weights.append(tau / n_runs)
        return SpectralDensity(np.concatenate(nodes), np.concatenate(weights), self.dim, n_runs)

    def _lanczos_quadrature(self, v: Tensor, m: int) -> tuple[np.ndarray, np.ndarray]:
        basis = torch.zeros(m, self.dim, dtype=torch.float64)
        alpha: list[float] = []
        beta: list[float] = []
        v = v / v.norm()
        for j in range(m):
            basis[j] = v
            w = self.matvec(v)
            alpha.append(float(v @ w))
            # full reorthogonalisation (twice is enough, Parlett): keeps Ritz values simple
            for _ in range(2):
                w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)
            b = float(w.norm())
            scale = max(abs(a) for a in alpha + beta)
            if j == m - 1 or b <= 1e-10 * scale:
                break
            beta.append(b)
            v = w / b
        theta, q = eigh_tridiagonal(np.array(alpha), np.array(beta[: len(alpha) - 1]))
        return theta, q[0] ** 2


class HessianOperator(CurvatureOperator):
    """The Hessian ``H = d^2 L / d theta^2`` of the mean loss, by double back-propagation.

    ``H v = sum_b (n_b / N) d/d theta (grad L_b(theta) . v)`` over the batches ``b`` of the
    dataset; units of loss per squared parameter unit. See :class:`CurvatureOperator` for
    the parameters and the estimators (``trace``, ``eigenpairs``, ``spectral_density``).

    Examples
    --------
    >>> op = HessianOperator(model, (x, y), params=layer_weights(model))  # doctest: +SKIP
    >>> hv = op.matvec(v)                                                  # doctest: +SKIP
    >>> eigsh(op.as_linear_operator(), k=5, which="LA")                    # doctest: +SKIP
    """

    def _batch_matvec(self, x, y, overrides, leaves, v):
        for t in leaves:
            t.requires_grad_(True)
        loss = self.loss_fn(functional_call(self.model, overrides, (x,)), y)
        grads = torch.autograd.grad(loss, leaves, create_graph=True, allow_unused=True)
        # a gradient that does not depend on the weights contributes nothing to H v
        terms = [
            (g * u).sum()
            for g, u in zip(grads, v, strict=True)
            if g is not None and g.requires_grad
        ]
        if not terms:
            return [torch.zeros_like(t) for t in leaves]
        hv = torch.autograd.grad(sum(terms), leaves, allow_unused=True)
        return [torch.zeros_like(t) if h is None else h for h, t in zip(hv, leaves, strict=True)]


# --------------------------------------------------------------------------- model-level


def hessian_trace(
    model: nn.Module,
    data,
    *,
    loss_fn: LossFn | None = None,
    params: ParamSpec = None,
    batch_size: int | None = None,
    rtol: float = 1e-2,
    min_probes: int = 10,
    max_probes: int = 1000,
    seed: Seed = 0,
) -> TraceEstimate:
    """Hutchinson estimate of ``tr H``, the Hessian trace of the mean loss.

    ``tr H = E[z' H z]`` with Rademacher ``z``; one Hessian-vector product (one pass over
    ``data``) per probe; stops when the standard error is at most ``rtol * |mean|`` after
    ``min_probes`` probes, or at ``max_probes``. ``normalized_trace = tr H / d``.
    Units: loss (nats per example) per squared parameter unit.

    See the module docstring for ``model``, ``data``, ``loss_fn``, ``params``, ``seed``.

    Returns
    -------
    TraceEstimate
    """
    op = HessianOperator(model, data, loss_fn=loss_fn, params=params, batch_size=batch_size)
    return op.trace(rtol=rtol, min_probes=min_probes, max_probes=max_probes, seed=seed)


def top_eigenvalues(
    model: nn.Module,
    data,
    *,
    k: int = 1,
    method: str = "lanczos",
    loss_fn: LossFn | None = None,
    params: ParamSpec = None,
    batch_size: int | None = None,
    tol: float = 1e-4,
    max_iter: int | None = None,
    seed: Seed = 0,
) -> EigenResult:
    """The ``k`` largest Hessian eigenvalues and their eigenvectors.

    ``method="lanczos"``: ARPACK's implicitly restarted Lanczos (``eigsh``, ``which="LA"``)
    on the Hessian as a ``LinearOperator``. ``method="power"``: power iteration with
    deflation (eigenvalues of largest magnitude; see
    :meth:`CurvatureOperator.eigenpairs`). Eigenvalues descending, loss per squared
    parameter unit; eigenvectors unit-norm, shape ``(d, k)``.

    Returns
    -------
    EigenResult
    """
    op = HessianOperator(model, data, loss_fn=loss_fn, params=params, batch_size=batch_size)
    return op.eigenpairs(k, which="largest", method=method, tol=tol, max_iter=max_iter, seed=seed)


def spectral_density(
    model: nn.Module,
    data,
    *,
    loss_fn: LossFn | None = None,
    params: ParamSpec = None,
    batch_size: int | None = None,
    n_runs: int = 1,
    n_steps: int = 80,
    seed: Seed = 0,
) -> SpectralDensity:
    """Hessian eigenvalue density by stochastic Lanczos quadrature (Ghorbani et al., 2019).

    ``n_runs * n_steps`` Hessian-vector products; see
    :meth:`CurvatureOperator.spectral_density` and :meth:`SpectralDensity.density`.
    """
    op = HessianOperator(model, data, loss_fn=loss_fn, params=params, batch_size=batch_size)
    return op.spectral_density(n_runs=n_runs, n_steps=n_steps, seed=seed)


def perturbation_loss_gap(
    model: nn.Module,
    data,
    sigma: float,
    n_samples: int = 64,
    *,
    loss_fn: LossFn | None = None,
    params: ParamSpec = None,
    batch_size: int | None = None,
    antithetic: bool = True,
    seed: Seed = 0,
) -> PerturbationGap:
    """Loss increase under random Gaussian weight perturbation, the quantity fSGLD smooths.

    Estimates

        gap = E_eps[ L(theta + sigma eps) ] - L(theta),   eps ~ N(0, I_d),

    over the selected parameters (the others stay fixed), with ``n_samples`` draws. With
    ``antithetic=True`` each draw gives ``(L(theta + sigma eps) + L(theta - sigma eps)) / 2
    - L(theta)``: the first-order term ``sigma grad L . eps`` cancels exactly, and on a
    quadratic the sample is exactly ``sigma^2 / 2 eps' H eps``, of mean ``sigma^2 / 2 tr H``
    and variance ``sigma^4 ||H||_F^2 / 2``. In general ``gap = sigma^2 / 2 tr H + O(sigma^4)``.

    The weights are not written to: losses at perturbed points are evaluated through
    :func:`torch.func.functional_call` on fresh tensors ``theta +- sigma eps``, so the
    parameters are bit-identical afterwards.

    Parameters
    ----------
    model, data, loss_fn, params, batch_size, seed
        See the module docstring.
    sigma : float
        Perturbation scale, in parameter units.
    n_samples : int
        Number of draws of ``eps`` (at least 2).
    antithetic : bool

    Returns
    -------
    PerturbationGap
        ``gap`` and ``stderr = std(samples, ddof=1) / sqrt(n_samples)`` in nats per example.
    """
    if not sigma > 0:
        raise ValueError("sigma must be positive")
    if n_samples < 2:
        raise ValueError("n_samples must be at least 2")
    loss_fn = loss_fn or F.cross_entropy
    data = _reiterable(data, batch_size)
    selected = select_parameters(model, params)
    device = selected[0][1].device
    gen = _generator(seed)

    with _eval_mode(model):
        base = _detached(model)
        loss0 = _mean_loss(model, data, batch_size, loss_fn, base, device)

        def loss_at(sign: float, eps: list[Tensor]) -> float:
            moved = dict(base)
            for (n, _), e in zip(selected, eps, strict=True):
                moved[n] = base[n] + sign * sigma * e
            return _mean_loss(model, data, batch_size, loss_fn, moved, device)

        samples = []
        for _ in range(n_samples):
            eps = [
                torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.device, p.dtype)
                for _, p in selected
            ]
            if antithetic:
                samples.append(0.5 * (loss_at(1.0, eps) + loss_at(-1.0, eps)) - loss0)
            else:
                samples.append(loss_at(1.0, eps) - loss0)
    gap, se = _stats(samples)
    dim = sum(p.numel() for _, p in selected)
    return PerturbationGap(
        gap, se, n_samples, float(sigma), loss0, antithetic, dim, 2 * gap / sigma**2
    )
