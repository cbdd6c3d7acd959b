"""Trajectory methods: averaged SGD / stochastic weight averaging (SWA) and SWAG.

Both run SGD (the ``T = 0`` Langevin dynamics) with a constant, typically large, step and
summarise its iterates ``theta_1, theta_2, ...`` from a start step on, every ``every`` steps:

- SWA / averaged SGD (Izmailov, Podoprikhin, Garipov, Vetrov, Wilson, UAI 2018; Nitanda,
  Kikuchi, Maeda, Wu, AISTATS 2024) keeps the running mean ``theta_SWA = mean_i theta_i``.
  The average lies in a flatter region than the iterates, which bounce across the sharp
  directions; averaging SGD's iterates acts as a smoothing of the objective by SGD's own noise.
  BatchNorm statistics of the average are recomputed with one pass over the training data
  (:func:`torch.optim.swa_utils.update_bn`), never averaged.
- SWAG (Maddox, Izmailov, Garipov, Vetrov, Wilson, NeurIPS 2019) fits a Gaussian to the
  iterates, diagonal plus low rank:

      mean     = mean_i theta_i,      Sigma_diag = mean_i theta_i^2 - mean^2
      D        = [theta_i - mean_i]   (the last K deviations from the running mean, columns)
      theta~   = mean + sqrt(scale) * (Sigma_diag^(1/2) z_1 + D z_2 / sqrt(K - 1)),
                 z_1 ~ N(0, I_P), z_2 ~ N(0, I_K)

  so ``Cov(theta~) = scale * (Sigma_diag + D D' / (K - 1))``; ``scale = 1/2`` is the paper's.

In :func:`bayesflat.sample` the SWA average (with recomputed BatchNorm statistics) is what is
recorded at every kept draw, and SWAG's draws are the chain's draws, taken after its last step.
:func:`swa_from_trace` and :func:`fit_swag` do the same from the iterates of any trace.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.optim.swa_utils import update_bn

from bayesflat._checks import check_int, check_positive
from bayesflat.samplers.base import FlatBuffer, PlainGradient, Sampler, batchnorm_layers
from bayesflat.samplers.langevin import LangevinDynamics

__all__ = ["SWA", "SWAG", "SWAGFit", "SWAGMoments", "fit_swag", "swa_from_trace"]


class SWAGMoments:
    """Running SWAG moments of flat vectors, one chunk per dtype/device.

    Parameters
    ----------
    like : sequence of Tensor
        Flat tensors giving the shape, dtype and device of every chunk.
    max_rank : int
        Number ``K`` of deviation columns kept (the last ``K`` collected).
    dtype : torch.dtype, optional
        Storage dtype of the moments (default: that of each chunk).

    Attributes
    ----------
    mean, sq_mean : list of Tensor
        ``mean_i theta_i`` and ``mean_i theta_i^2`` per chunk.
    deviations : list of Tensor
        ``(K, numel)`` per chunk; row ``(i - 1) mod K`` holds ``theta_i - mean_i``.
    count : int
        Number of vectors collected.
    """

    def __init__(
        self, like: Sequence[Tensor], max_rank: int, dtype: torch.dtype | None = None
    ) -> None:
        self.max_rank = check_int(max_rank, "max_rank", 1)
        self.mean = [torch.zeros(c.numel(), dtype=dtype or c.dtype, device=c.device) for c in like]
        self.sq_mean = [torch.zeros_like(m) for m in self.mean]
        self.deviations = [
            torch.zeros(self.max_rank, m.numel(), dtype=m.dtype, device=m.device) for m in self.mean
        ]
        self.count = 0

    @property
    def rank(self) -> int:
        """Deviation columns held, ``min(count, K)``."""
        return min(self.count, self.max_rank)

    @torch.no_grad()
    def collect(self, chunks: Sequence[Tensor]) -> None:
        """Add one vector (flat chunks matching ``like``) to the moments."""
        self.count += 1
        weight = 1.0 / self.count
        slot = (self.count - 1) % self.max_rank
        for mean, sq, dev, x in zip(self.mean, self.sq_mean, self.deviations, chunks, strict=True):
            x = x.to(mean.dtype)
            mean.lerp_(x, weight)
            sq.lerp_(x * x, weight)
            torch.sub(x, mean, out=dev[slot])

    def variance(self, clamp: float = 1e-30) -> list[Tensor]:
        """``Sigma_diag = max(mean theta^2 - mean^2, clamp)`` per chunk."""
        return [
            (sq - m * m).clamp_(min=clamp) for m, sq in zip(self.mean, self.sq_mean, strict=True)
        ]

    @torch.no_grad()
    def draw_(self, out: Sequence[Tensor], generator: torch.Generator | None, scale: float) -> None:
        """Write one SWAG draw into the flat chunks ``out``.

        ``out = mean + sqrt(scale) (Sigma_diag^(1/2) z_1 + D z_2 / sqrt(r - 1))`` with ``r`` the
        rank held; the low-rank term is left out while ``r < 2``. ``z_2`` is shared by all
        chunks: it is one draw for the whole parameter vector.
        """
        if self.count == 0:
            raise RuntimeError("SWAG has collected no iterates yet; step past its start first")
        r = self.rank
        z2 = None
        if r >= 2:
            dev0 = self.deviations[0]
            z2 = torch.randn(r, generator=generator, dtype=dev0.dtype, device=dev0.device)
        for o, mean, var, dev in zip(out, self.mean, self.variance(), self.deviations, strict=True):
            z1 = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
            sample = z1.mul_(var.sqrt_())
            if z2 is not None:
                sample.addmv_(dev[:r].T, z2.to(dev.device), alpha=1.0 / math.sqrt(r - 1))
            o.copy_(sample.mul_(math.sqrt(scale)).add_(mean))

    def state(self) -> dict[str, Any]:
        """Tensors and counters, for ``state_dict``."""
        return {
            "count": self.count,
            "mean": [t.clone() for t in self.mean],
            "sq_mean": [t.clone() for t in self.sq_mean],
            "deviations": [t.clone() for t in self.deviations],
        }

    def load(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state`."""
        self.count = int(state["count"])
        for key in ("mean", "sq_mean", "deviations"):
            for dst, src in zip(getattr(self, key), state[key], strict=True):
                dst.copy_(src)


@contextlib.contextmanager
def _held(
    params: Sequence[Tensor], backup: Sequence[Tensor], model: nn.Module | None
) -> Iterator[None]:
    """Restore ``params`` (kept in ``backup``) and ``model``'s BatchNorm buffers on exit."""
    layers = batchnorm_layers(model)
    buffers = [b for m in layers for b in m.buffers(recurse=False)]
    saved = FlatBuffer(buffers).of(buffers)
    with torch.no_grad():
        torch._foreach_copy_(list(backup), list(params))
        if buffers:
            torch._foreach_copy_(saved, buffers)
    try:
        yield
    finally:
        with torch.no_grad():
            torch._foreach_copy_(list(params), list(backup))
            if buffers:
                torch._foreach_copy_(buffers, saved)


def _recompute_batchnorm(model: nn.Module | None, batches: Iterable[Any] | None) -> None:
    if batchnorm_layers(model) and batches is not None:
        update_bn(batches, model)


class _IterateCollector(Sampler):
    """SGD (``T = 0`` Langevin) that hands its iterates to :meth:`_collect` on a schedule.

    The iterate after step ``s`` (counted from 0) is collected when ``s >= start`` and
    ``(s - start + 1) % every == 0``: with the driver's defaults (``start = burn_in``,
    ``every = thin``) these are exactly the states the driver would keep as draws.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        *,
        lr: float | Callable[[int], float],
        num_data: int,
        temperature: float | Callable[[int], float],
        start: int | None,
        every: int | None,
        generator: torch.Generator | None,
    ) -> None:
        super().__init__(
            params,
            estimator=PlainGradient(),
            dynamics=LangevinDynamics(),
            lr=lr,
            num_data=num_data,
            temperature=temperature,
            generator=generator,
        )
        self.start = None if start is None else check_int(start, "start", 0)
        self.every = None if every is None else check_int(every, "every", 1)
        self._model: nn.Module | None = None
        self._batches: Iterable[Any] | None = None

    def _all_params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def bind_schedule(self, burn_in: int, draws: int, thin: int) -> None:
        """Default ``start`` to the burn-in and ``every`` to this method's default."""
        if self.start is None:
            self.start = burn_in
        if self.every is None:
            self.every = self._default_every(thin)

    def begin_chain(self, context: Any) -> None:
        """Driver hook: keep the chain's model and training batches (for BatchNorm)."""
        self._model = context.model
        self._batches = context.train_batches
        self.bind_schedule(context.burn_in, context.draws, context.thin)

    def _default_every(self, thin: int) -> int:
        return 1

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor:  # type: ignore[override]
        """One SGD step; collect the new iterate if the schedule says so."""
        loss = super().step(closure)
        index = self.param_groups[0]["step"] - 1
        start = self.start or 0
        if index >= start and (index - start + 1) % (self.every or 1) == 0:
            self._collect()
        return loss

    def _collect(self) -> None:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        return {**super().config(), "start": self.start, "every": self.every}


class SWA(_IterateCollector):
    """Averaged SGD / stochastic weight averaging (Izmailov et al., UAI 2018).

    Update rule, in mean-loss units, and the average it keeps:

        theta_{s+1} = theta_s - lr * grad L_B(theta_s) + sqrt(2 lr T / N) xi
        theta_SWA   = (1 / n) * sum_{collected s} theta_{s+1}
                      (running mean over s >= start with (s - start + 1) % every == 0)

    The iterates are those of ``torch.optim.SGD`` exactly; the average is recorded, with the
    BatchNorm statistics recomputed for it from one pass over the training data. Use a constant
    step larger than SGD's usual one: the iterates then cannot settle in minima sharper than
    ``2 / lr`` and the average sits in the flat region they circle.

    Parameters
    ----------
    params : iterable
        Parameters or param groups.
    lr : float or callable, default 1e-3
        Step size (``> 0``) or a schedule (SWA uses a constant one).
    num_data : int
        Training-set size ``N``.
    temperature : float or callable, default 0.0
        ``T >= 0``; ``T = 0`` is averaged SGD.
    start : int, optional
        First step whose iterate is averaged. ``None``: the driver's burn-in (0 outside it).
    every : int, default 1
        Average every ``every``-th iterate (1: all of them, averaged SGD; the number of steps
        per epoch: SWA's once-per-epoch average).
    generator : torch.Generator, optional
        Source of the Langevin noise when ``T > 0``.

    Notes
    -----
    Stats: ``swa_count``, the number of iterates averaged. In the driver ``lp`` and
    ``grad_norm`` are those of the step's iterate; the weights and predictions recorded are the
    average's. Memory: one parameter-sized buffer (plus a backup while recording).

    References
    ----------
    P. Izmailov, D. Podoprikhin, T. Garipov, D. Vetrov, A. G. Wilson. Averaging weights leads to
    wider optima and better generalization. UAI 2018.
    A. Nitanda, R. Kikuchi, S. Maeda, D. Wu. Why is parameter averaging beneficial in SGD? An
    objective smoothing perspective. AISTATS 2024.
    """

    name = "swa"

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Callable[[int], float] = 1e-3,
        *,
        num_data: int,
        temperature: float | Callable[[int], float] = 0.0,
        start: int | None = None,
        every: int = 1,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(
            params, lr=lr, num_data=num_data, temperature=temperature, start=start,
            every=every, generator=generator,
        )  # fmt: skip
        self.count = 0

    def _collect(self) -> None:
        params = self._all_params()
        mean = self.buffer("swa_mean").of(params)
        self.count += 1
        if self.count == 1:
            torch._foreach_copy_(mean, params)
        else:
            torch._foreach_lerp_(mean, params, 1.0 / self.count)

    def average(self) -> list[Tensor]:
        """The running average, one tensor per parameter (copies, in param-group order)."""
        if self.count == 0:
            raise RuntimeError("SWA has averaged no iterates yet; step past its start first")
        return [t.clone() for t in self.buffer("swa_mean").of(self._all_params())]

    @contextlib.contextmanager
    def averaged(
        self, model: nn.Module | None = None, batches: Iterable[Any] | None = None
    ) -> Iterator[None]:
        """Within the block the parameters hold the average; restored exactly on exit.

        Parameters
        ----------
        model : nn.Module, optional
            The module of the parameters. Its BatchNorm running statistics are recomputed for
            the average (and restored on exit) when ``batches`` is given.
        batches : iterable, optional
            Training batches, e.g. a DataLoader; each a tensor or a tuple whose first entry is
            the input (as for :func:`torch.optim.swa_utils.update_bn`).

        Before any iterate is averaged the block sees the current iterate unchanged.
        """
        if self.count == 0:
            yield
            return
        params = self._all_params()
        with _held(params, self.buffer("backup").of(params), model), torch.no_grad():
            torch._foreach_copy_(params, self.buffer("swa_mean").of(params))
            _recompute_batchnorm(model, batches)
            yield

    def recorded_state(self) -> contextlib.AbstractContextManager[None]:
        """Driver hook: record the average (BatchNorm recomputed) instead of the iterate."""
        return self.averaged(self._model, self._batches)

    def stats(self) -> dict[str, float]:
        return {**super().stats(), "swa_count": float(self.count)}

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        mean = self.buffer("swa_mean")
        state["swa"] = {"count": self.count, "mean": [c.clone() for c in mean.chunks]}
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        swa = state_dict.pop("swa", None)
        super().load_state_dict(state_dict)
        if swa is not None:
            self.count = int(swa["count"])
            for dst, src in zip(self.buffer("swa_mean").chunks, swa["mean"], strict=True):
                dst.copy_(src)


class SWAG(_IterateCollector):
    """SWAG: a diagonal plus low-rank Gaussian fitted to SGD iterates (Maddox et al., 2019).

    Iterates and moments (``s`` the step, collected when ``s >= start`` and
    ``(s - start + 1) % every == 0``):

        theta_{s+1} = theta_s - lr * grad L_B(theta_s) + sqrt(2 lr T / N) xi
        mean, sq_mean  running means of theta and theta^2;  Sigma_diag = sq_mean - mean^2
        D              the last K deviations theta_i - mean_i (mean_i after collecting i)

    Draws: ``theta~ = mean + sqrt(scale) (Sigma_diag^(1/2) z_1 + D z_2 / sqrt(r - 1))`` with
    ``r = min(n, K)`` columns held, so ``Cov = scale (Sigma_diag + D D' / (r - 1))``.

    Parameters
    ----------
    params : iterable
        Parameters or param groups.
    lr : float or callable, default 1e-3
        Step size (``> 0``) or a schedule.
    num_data : int
        Training-set size ``N``.
    temperature : float or callable, default 0.0
        ``T >= 0``.
    max_rank : int, default 20
        ``K``, the deviation columns kept (the paper's default).
    scale : float, default 0.5
        Covariance scale of the draws (``1/2`` as in the paper).
    start : int, optional
        First step whose iterate is collected. ``None``: the driver's burn-in (0 outside it).
    every : int, optional
        Collect every ``every``-th iterate. ``None``: the driver's ``thin`` (1 outside it), so
        the driver's ``draws`` kept states are the ones collected.
    generator : torch.Generator, optional
        Randomness of the draws (and of the Langevin noise when ``T > 0``).

    Notes
    -----
    In :func:`bayesflat.sample` the chain runs ``burn_in + draws * thin`` steps, collecting the
    ``draws`` states it would keep; then ``draws`` SWAG draws, each with its BatchNorm
    statistics recomputed from the training data, are the chain's draws. Stats:
    ``swag_count`` (iterates collected) and ``swag_rank`` (``r``). Memory: ``K + 2``
    parameter-sized buffers.

    References
    ----------
    W. J. Maddox, P. Izmailov, T. Garipov, D. Vetrov, A. G. Wilson. A simple baseline for
    Bayesian uncertainty in deep learning. NeurIPS 2019.
    """

    name = "swag"

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Callable[[int], float] = 1e-3,
        *,
        num_data: int,
        temperature: float | Callable[[int], float] = 0.0,
        max_rank: int = 20,
        scale: float = 0.5,
        start: int | None = None,
        every: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__(
            params, lr=lr, num_data=num_data, temperature=temperature, start=start,
            every=every, generator=generator,
        )  # fmt: skip
        self.scale = check_positive(scale, "scale")
        self.moments = SWAGMoments(self.buffer("swag_iterate").chunks, max_rank)

    def _default_every(self, thin: int) -> int:
        return thin

    def _collect(self) -> None:
        iterate = self.buffer("swag_iterate")
        torch._foreach_copy_(iterate.of(self._all_params()), self._all_params())
        self.moments.collect(iterate.chunks)

    def draws(
        self,
        count: int,
        model: nn.Module | None = None,
        batches: Iterable[Any] | None = None,
    ) -> Iterator[dict[str, float]]:
        """Set the parameters to ``count`` successive SWAG draws; restore them at the end.

        Yields after each draw (the parameters hold it) the statistics ``swag_count`` and
        ``swag_rank``. With ``model`` and ``batches`` the BatchNorm statistics are recomputed
        for every draw, as for :meth:`SWA.averaged`.
        """
        count = check_int(count, "count", 0)
        params = self._all_params()
        out = self.buffer("swag_draw")
        with _held(params, self.buffer("backup").of(params), model):
            for _ in range(count):
                with torch.no_grad():
                    self.moments.draw_(out.chunks, self.generator, self.scale)
                    torch._foreach_copy_(params, out.of(params))
                    _recompute_batchnorm(model, batches)
                yield {
                    "swag_count": float(self.moments.count),
                    "swag_rank": float(self.moments.rank),
                }

    def chain_draws(self, count: int) -> Iterator[dict[str, float]]:
        """Driver hook: the chain's draws, taken after its last step."""
        return self.draws(count, self._model, self._batches)

    def stats(self) -> dict[str, float]:
        return {
            **super().stats(),
            "swag_count": float(self.moments.count),
            "swag_rank": float(self.moments.rank),
        }

    def config(self) -> dict[str, Any]:
        return {**super().config(), "max_rank": self.moments.max_rank, "scale": self.scale}

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["swag"] = self.moments.state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        swag = state_dict.pop("swag", None)
        super().load_state_dict(state_dict)
        if swag is not None:
            self.moments.load(swag)


# -- from a trace of iterates ---------------------------------------------------------------------


def _iterates(
    trace: Any, var_names: Sequence[str] | None
) -> tuple[list[str], list[tuple[int, ...]], np.ndarray]:
    """Stored weights as ``(chain, draw, P)`` float64, with their names and shapes."""
    from bayesflat import trace as _trace

    posterior = _trace.get_group(trace, "weights")
    if posterior is None or not posterior.data_vars:
        raise ValueError("the trace stores no weights; sample with store_weights=True")
    names = list(posterior.data_vars) if var_names is None else list(var_names)
    missing = [n for n in names if n not in posterior.data_vars]
    if missing:
        raise ValueError(f"var_names {missing} are not stored weights; the trace holds {names}")
    arrays = [np.asarray(posterior[n].values, dtype=np.float64) for n in names]
    chains, draws = arrays[0].shape[:2]
    shapes = [a.shape[2:] for a in arrays]
    flat = np.concatenate([a.reshape(chains, draws, -1) for a in arrays], axis=2)
    return [_trace.decode_name(n) for n in names], shapes, flat


def swa_from_trace(
    trace: Any,
    *,
    start: int = 0,
    every: int = 1,
    var_names: Sequence[str] | None = None,
) -> dict[str, np.ndarray]:
    """SWA average of the iterates of every chain of a trace.

    ``theta_SWA[c] = mean_{j in J} theta[c, j]`` with ``J = start, start + every, ...`` over
    the recorded draws, skipping draws that were never reached (NaN, in a partial trace).

    Parameters
    ----------
    trace : arviz.InferenceData or xarray.DataTree
        A trace whose ``posterior`` group holds weights (e.g. of ``sampler="sgd"``).
    start, every : int
        First draw averaged and the stride between averaged draws.
    var_names : sequence of str, optional
        Posterior variables to average (default: all).

    Returns
    -------
    dict of str to numpy.ndarray
        ``state_dict`` key -> average, shape ``(chain, *shape)``. BatchNorm running statistics,
        if recorded, are averaged like the weights: recompute them for the average with
        :func:`torch.optim.swa_utils.update_bn` after loading it.
    """
    start, every = check_int(start, "start", 0), check_int(every, "every", 1)
    names, shapes, flat = _iterates(trace, var_names)
    picked = flat[:, start::every]
    if picked.shape[1] == 0:
        raise ValueError(f"start={start} is past the {flat.shape[1]} draws of the trace")
    mean = np.nanmean(picked, axis=1)
    out, offset = {}, 0
    for name, shape in zip(names, shapes, strict=True):
        size = int(np.prod(shape, dtype=np.int64))
        out[name] = mean[:, offset : offset + size].reshape(flat.shape[0], *shape)
        offset += size
    return out


@dataclass
class SWAGFit:
    """A SWAG Gaussian fitted to iterates: moments and draws, by ``state_dict`` key.

    Attributes
    ----------
    names : list of str
        ``state_dict`` keys, in the order of the flat parameter vector.
    shapes : list of tuple of int
        Shape of every variable.
    moments : SWAGMoments
        The running moments (one float64 chunk of length ``P``).
    scale : float
        Covariance scale of the draws.
    """

    names: list[str]
    shapes: list[tuple[int, ...]]
    moments: SWAGMoments
    scale: float = 0.5

    def _split(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        out, offset = {}, 0
        lead = flat.shape[:-1]
        for name, shape in zip(self.names, self.shapes, strict=True):
            size = int(np.prod(shape, dtype=np.int64))
            out[name] = flat[..., offset : offset + size].reshape(*lead, *shape)
            offset += size
        return out

    @property
    def mean(self) -> dict[str, np.ndarray]:
        """SWA mean of every variable."""
        return self._split(self.moments.mean[0].numpy().copy())

    @property
    def variance(self) -> dict[str, np.ndarray]:
        """Diagonal variance ``Sigma_diag`` of every variable."""
        return self._split(self.moments.variance()[0].numpy())

    @property
    def deviations(self) -> np.ndarray:
        """The ``r`` deviation columns held, as rows ``(r, P)`` (flat parameter order)."""
        return self.moments.deviations[0][: self.moments.rank].numpy().copy()

    def covariance(self) -> np.ndarray:
        """Dense covariance of the draws, ``scale (Sigma_diag + D D' / (r - 1))``, ``(P, P)``.

        For small models only (``P^2`` memory); the low-rank term is absent while ``r < 2``.
        """
        cov = np.diag(self.moments.variance()[0].numpy())
        r = self.moments.rank
        if r >= 2:
            d = self.deviations
            cov = cov + d.T @ d / (r - 1)
        return self.scale * cov

    def sample(
        self, num_draws: int, generator: torch.Generator | None = None
    ) -> dict[str, np.ndarray]:
        """``num_draws`` SWAG draws, ``state_dict`` key -> ``(num_draws, *shape)``."""
        num_draws = check_int(num_draws, "num_draws", 1)
        out = torch.empty(num_draws, self.moments.mean[0].numel(), dtype=torch.float64)
        for row in out:
            self.moments.draw_([row], generator, self.scale)
        return self._split(out.numpy())


def fit_swag(
    trace: Any,
    *,
    chain: int = 0,
    start: int = 0,
    every: int = 1,
    max_rank: int = 20,
    scale: float = 0.5,
    var_names: Sequence[str] | None = None,
) -> SWAGFit:
    """Fit SWAG to the iterates of one chain of a trace.

    The draws ``theta[chain, start::every]`` are collected in order, exactly as the
    :class:`SWAG` optimiser collects its iterates (running mean and mean square, last
    ``max_rank`` deviations from the running mean), in float64. Draws never reached (NaN) are
    skipped.

    Parameters
    ----------
    trace : arviz.InferenceData or xarray.DataTree
        A trace with weights in its ``posterior`` group.
    chain : int, default 0
        The chain whose iterates are fitted (chains are separate trajectories: fitting one
        Gaussian across modes would be meaningless).
    start, every : int
        First draw used and the stride.
    max_rank : int, default 20
        ``K``, the deviation columns kept.
    scale : float, default 0.5
        Covariance scale of the draws.
    var_names : sequence of str, optional
        Posterior variables to fit (default: all).

    Returns
    -------
    SWAGFit
        Moments (``mean``, ``variance``, ``deviations``, ``covariance()``) and ``sample``.
    """
    start, every = check_int(start, "start", 0), check_int(every, "every", 1)
    names, shapes, flat = _iterates(trace, var_names)
    chain = check_int(chain, "chain", 0)
    if chain >= flat.shape[0]:
        raise ValueError(f"chain={chain} is out of range; the trace has {flat.shape[0]} chains")
    rows = flat[chain, start::every]
    rows = rows[np.all(np.isfinite(rows), axis=1)]
    if rows.shape[0] == 0:
        raise ValueError(f"no finite draws of chain {chain} from draw {start} on to fit")
    data = torch.from_numpy(np.ascontiguousarray(rows))
    moments = SWAGMoments([data[0]], max_rank, dtype=torch.float64)
    for row in data:
        moments.collect([row])
    return SWAGFit(names, shapes, moments, check_positive(scale, "scale"))
