"""Diagnostics recorded at every kept draw of :func:`bayesflat.sample`, at a bounded cost.

:func:`diagnostic_stats` builds the ``stats_fns`` mapping of :func:`bayesflat.sample`: each
entry is evaluated at every kept draw and lands in ``sample_stats`` with dims
``(chain, draw)``. What each name records, in bayesflat's mean-loss units (DESIGN.md,
section 1):

``"hessian_trace"``
    ``hessian_trace`` and ``hessian_trace_stderr``: the Hutchinson estimate of ``tr H``, the
    Hessian trace of the mean NLL over the curvature subset (nats per example per squared
    parameter unit), and its standard error from that draw's probes.
``"top_eigenvalue"``
    ``top_eigenvalue``: the largest Ritz value of a fixed number of Lanczos steps on ``H``
    (same units), a lower bound of ``lambda_max`` that tightens with the number of steps
    and is exact once it reaches ``d``.
``"rwp_gap"``
    ``rwp_gap``, ``rwp_gap_stderr`` and ``rwp_sigma``: the random-weight-perturbation gap
    ``E_eps[L(theta + sigma eps)] - L(theta)`` (nats per example, antithetic pairs) at the
    sampler's own perturbation scale, or at ``Budget.rwp_sigma``.
``"configurational_temperature"``
    ``theta_dot_grad`` and ``theta_dot_grad_dim``: ``theta . grad L`` of the full potential
    ``L = mean NLL - log p(theta) / N`` (summed over the coordinates, nats per example) and
    the number ``d`` of coordinates; :mod:`bayesflat.diagnostics.report` turns them into
    ``T_conf = N <theta . grad L> / d``.

Every diagnostic also records ``diagnostic_hvps``, the Hessian-vector products spent on
that draw. The parameters, their ``.grad`` and the module buffers are left bit-identical,
the chain's random streams are not touched (the diagnostics draw from their own
generator), and the network is evaluated in eval mode (dropout off, BatchNorm on running
statistics), so for such modules the curvature and ``theta . grad L`` are those of the
deterministic eval-mode loss.

Cost per kept draw
------------------
One Hessian-vector product (HVP) is a forward pass and a double backward pass over the
curvature subset, about twice the cost of a gradient over the same examples (the digits
MLP, 26,122 parameters, on 1437 examples: about 23 ms on one CPU thread).

- ``hessian_trace``: ``Budget.hutchinson_probes`` HVPs, exactly;
- ``top_eigenvalue``: ``min(Budget.lanczos_steps, d)`` HVPs at most (fewer on breakdown);
- ``rwp_gap``: ``2 * Budget.rwp_samples + 1`` forward passes over the subset, no HVP;
- ``configurational_temperature``: one gradient over ``Budget.gradient_subsample``
  examples (all of ``data`` by default).

:meth:`Budget.cost` returns these counts; :meth:`Budget.hvps` is the bound on
``diagnostic_hvps``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from bayesflat._checks import check_int
from bayesflat.diagnostics.flatness import HessianOperator, hutchinson, perturbation_loss_gap
from bayesflat.target.torch import Likelihood, Posterior, Prior

__all__ = ["DIAGNOSTIC_NAMES", "Budget", "diagnostic_stats", "recorded_names"]

DIAGNOSTIC_NAMES: tuple[str, ...] = (
    "hessian_trace",
    "top_eigenvalue",
    "rwp_gap",
    "configurational_temperature",
)
"""Diagnostics :func:`diagnostic_stats` can record."""

_RECORDED: dict[str, tuple[str, ...]] = {
    "hessian_trace": ("hessian_trace", "hessian_trace_stderr"),
    "top_eigenvalue": ("top_eigenvalue",),
    "rwp_gap": ("rwp_gap", "rwp_gap_stderr", "rwp_sigma"),
    "configurational_temperature": ("theta_dot_grad", "theta_dot_grad_dim"),
}


@dataclass(frozen=True)
class Budget:
    """Work spent on the diagnostics of one kept draw.

    Parameters
    ----------
    subsample : int or None, default 512
        Examples of ``data`` on which the curvature diagnostics (``hessian_trace``,
        ``top_eigenvalue``, ``rwp_gap``) are computed: a subset drawn once, without
        replacement, by ``numpy.random.default_rng(seed)``, the same at every draw so that
        draws are compared on one function of the weights. ``None`` (or a number at least
        ``len(data)``) uses all of ``data``.
    hutchinson_probes : int, default 10
        Rademacher probes, hence HVPs, for ``tr H`` (at least 2, for a standard error).
    lanczos_steps : int, default 20
        Lanczos steps, hence HVPs, for the top eigenvalue.
    rwp_samples : int, default 8
        Antithetic pairs ``+-eps`` for the perturbation gap (at least 2).
    rwp_sigma : float or None, default None
        Perturbation scale of the gap, in parameter units. ``None``: the sampler's own
        ``sigma`` at that draw (fSGLD's coupled scale); a sampler that does not perturb
        (``sigma = 0``) then needs an explicit value.
    gradient_subsample : int or None, default None
        Examples for ``theta . grad L``: ``None`` for all of ``data`` (exact given the
        weights); otherwise a fresh uniform subset per draw, which keeps the estimate of
        ``T_conf`` unbiased and lets its error shrink with the number of draws.
    batch_size : int or None, default None
        Examples per forward pass (memory only: the cost in HVPs does not change).
    """

    subsample: int | None = 512
    hutchinson_probes: int = 10
    lanczos_steps: int = 20
    rwp_samples: int = 8
    rwp_sigma: float | None = None
    gradient_subsample: int | None = None
    batch_size: int | None = None

    def __post_init__(self) -> None:
        for name in ("subsample", "gradient_subsample", "batch_size"):
            if getattr(self, name) is not None:
                check_int(getattr(self, name), f"Budget.{name}", 1)
        check_int(self.hutchinson_probes, "Budget.hutchinson_probes", 2)
        check_int(self.lanczos_steps, "Budget.lanczos_steps", 1)
        check_int(self.rwp_samples, "Budget.rwp_samples", 2)
        if self.rwp_sigma is not None and not (
            isinstance(self.rwp_sigma, int | float)
            and math.isfinite(self.rwp_sigma)
            and self.rwp_sigma > 0
        ):
            raise ValueError(
                f"Budget.rwp_sigma must be a finite number > 0 or None (the sampler's sigma), "
                f"got {self.rwp_sigma!r}"
            )

    def cost(self, names: Sequence[str]) -> dict[str, int]:
        """Work per kept draw for the diagnostics ``names``.

        Returns
        -------
        dict
            ``hvps`` (Hessian-vector products over the curvature subset, an upper bound),
            ``forward_passes`` (loss evaluations over the curvature subset) and
            ``gradients`` (gradient evaluations over the gradient subset).
        """
        chosen = _check_names(names)
        return {
            "hvps": self.hvps(chosen),
            "forward_passes": 2 * self.rwp_samples + 1 if "rwp_gap" in chosen else 0,
            "gradients": int("configurational_temperature" in chosen),
        }

    def hvps(self, names: Sequence[str]) -> int:
        """Upper bound on the Hessian-vector products per kept draw for ``names``."""
        chosen = _check_names(names)
        return self.hutchinson_probes * ("hessian_trace" in chosen) + self.lanczos_steps * (
            "top_eigenvalue" in chosen
        )


def _check_names(names: Sequence[str] | str) -> tuple[str, ...]:
    if isinstance(names, str):
        names = (names,)
    chosen = tuple(names)
    unknown = [n for n in chosen if n not in DIAGNOSTIC_NAMES]
    if unknown or not chosen:
        raise ValueError(
            f"names must be a non-empty sequence of {list(DIAGNOSTIC_NAMES)}, got {list(chosen)}"
        )
    if len(set(chosen)) != len(chosen):
        raise ValueError(f"names must not repeat, got {list(chosen)}")
    return chosen


def recorded_names(names: Sequence[str] = DIAGNOSTIC_NAMES) -> tuple[str, ...]:
    """The ``sample_stats`` variables :func:`diagnostic_stats` records for ``names``.

    Always ends with ``diagnostic_hvps``.
    """
    chosen = _check_names(names)
    return tuple(v for n in chosen for v in _RECORDED[n]) + ("diagnostic_hvps",)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _as_pair(data: object) -> tuple[Tensor, Tensor]:
    if not (isinstance(data, tuple | list) and len(data) == 2):
        raise TypeError(
            "data must be an (inputs, targets) pair of tensors or arrays, "
            f"got {type(data).__name__}"
        )
    out = []
    for i, part in enumerate(data):
        if isinstance(part, np.ndarray):
            part = torch.from_numpy(np.ascontiguousarray(part))
        if not isinstance(part, Tensor):
            raise TypeError(f"data[{i}] must be a torch.Tensor or numpy array")
        out.append(part)
    x, y = out
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise ValueError(
            f"data inputs and targets must have the same non-zero length, got "
            f"{x.shape[0]} and {y.shape[0]}"
        )
    if x.dtype == torch.float64:
        x = x.float()
    if not y.is_floating_point():
        y = y.long()
    return x, y


class _DrawDiagnostics:
    """Computes every chosen diagnostic once per kept draw and hands out its values."""

    def __init__(
        self,
        names: tuple[str, ...],
        data: tuple[Tensor, Tensor],
        budget: Budget,
        likelihood: Likelihood,
        prior: Prior,
        seed: int,
    ) -> None:
        self.names = names
        self.budget = budget
        self.likelihood = likelihood
        self.prior = prior
        self.x, self.y = data
        n = self.y.shape[0]
        rng = np.random.default_rng(seed)
        if budget.subsample is None or budget.subsample >= n:
            self.curv_x, self.curv_y = self.x, self.y
        else:
            idx = torch.from_numpy(np.sort(rng.choice(n, size=budget.subsample, replace=False)))
            self.curv_x, self.curv_y = self.x[idx], self.y[idx]
        self.base_seed = int(rng.integers(2**62))
        self.generator = torch.Generator().manual_seed(self.base_seed)
        self._key: tuple[int, int, int] | None = None
        self._values: dict[str, float] = {}
        self._served: set[str] = set()

    def loss_fn(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return self.likelihood.nll(outputs, targets).mean()

    def value(self, name: str, model: nn.Module, sampler: Any) -> float:
        # The driver asks for every variable once per draw; a repeated request, or another
        # model or step, means a new draw (ids alone can be reused by a later chain).
        key = (id(model), id(sampler), int(sampler.param_groups[0]["step"]))
        if key != self._key or name in self._served:
            self.generator.manual_seed(self._draw_seed(sampler))
            self._values = self._compute(model, sampler)
            self._key = key
            self._served = set()
        self._served.add(name)
        return self._values[name]

    def _draw_seed(self, sampler: Any) -> int:
        """The seed of one draw's probes: a function of the seed, the chain and the step.

        The chain is told apart by the seed of its sampler's generator (from
        ``chain_seeds``), so a draw's diagnostics do not depend on which chains ran before
        it in the process, and a resumed or parallel chain records the same values.
        """
        chain = getattr(sampler, "generator", None)
        chain_seed = int(chain.initial_seed()) if isinstance(chain, torch.Generator) else 0
        step = int(sampler.param_groups[0]["step"])
        words = np.random.SeedSequence([self.base_seed, chain_seed, step]).generate_state(2)
        return (int(words[0]) << 31) ^ int(words[1])

    def _compute(self, model: nn.Module, sampler: Any) -> dict[str, float]:
        device = next(model.parameters()).device
        curvature = (self.curv_x.to(device), self.curv_y.to(device))
        bs = self.budget.batch_size
        out: dict[str, float] = {}
        hvps = 0
        if "hessian_trace" in self.names or "top_eigenvalue" in self.names:
            op = HessianOperator(model, curvature, loss_fn=self.loss_fn, batch_size=bs)
            if "hessian_trace" in self.names:
                probes = self.budget.hutchinson_probes
                est = hutchinson(
                    lambda z: float(z @ op.matvec(z)),
                    op.dim,
                    min_probes=probes,
                    max_probes=probes,
                    seed=self.generator,
                )
                out["hessian_trace"] = est.trace
                out["hessian_trace_stderr"] = est.stderr
            if "top_eigenvalue" in self.names:
                sld = op.spectral_density(
                    n_runs=1, n_steps=self.budget.lanczos_steps, seed=self.generator
                )
                out["top_eigenvalue"] = float(sld.nodes.max())
            hvps = op.n_matvecs
        if "rwp_gap" in self.names:
            sigma = self.budget.rwp_sigma
            if sigma is None:
                sigma = float(sampler.stats().get("sigma", 0.0))
                if not sigma > 0:
                    raise ValueError(
                        f"rwp_gap needs a perturbation scale: sampler {type(sampler).__name__} "
                        "has sigma = 0; set Budget(rwp_sigma=...)"
                    )
            gap = perturbation_loss_gap(
                model,
                curvature,
                sigma,
                self.budget.rwp_samples,
                loss_fn=self.loss_fn,
                batch_size=bs,
                seed=self.generator,
            )
            out["rwp_gap"] = gap.gap
            out["rwp_gap_stderr"] = gap.stderr
            out["rwp_sigma"] = float(sigma)
        if "configurational_temperature" in self.names:
            dot, dim = self._theta_dot_grad(model, sampler, device)
            out["theta_dot_grad"] = dot
            out["theta_dot_grad_dim"] = float(dim)
        out["diagnostic_hvps"] = float(hvps)
        return out

    def _theta_dot_grad(self, model: nn.Module, sampler: Any, device: torch.device):
        n = self.y.shape[0]
        m = self.budget.gradient_subsample
        if m is None or m >= n:
            x, y = self.x, self.y
        else:
            idx = torch.randperm(n, generator=self.generator)[:m]
            x, y = self.x[idx], self.y[idx]
        posterior = Posterior(
            model,
            num_data=sampler.param_groups[0]["num_data"],
            likelihood=self.likelihood,
            prior=self.prior,
        )
        named = posterior.named_parameters()
        params = list(named.values())
        step = self.budget.batch_size or y.shape[0]
        grads = [torch.zeros_like(p) for p in params]
        with _eval_mode(model), torch.enable_grad():
            for s in range(0, y.shape[0], step):
                xb, yb = x[s : s + step].to(device), y[s : s + step].to(device)
                # the batch's share of the data term, so the sum over batches is the mean NLL
                nll = posterior.likelihood.nll(model(xb), yb).sum() / y.shape[0]
                parts = torch.autograd.grad(nll, params, allow_unused=True)
                for acc, g in zip(grads, parts, strict=True):
                    if g is not None:
                        acc.add_(g)
            prior_term = posterior.prior.neg_log_prob(named)
            if prior_term is not None:
                parts = torch.autograd.grad(
                    prior_term / posterior.num_data, params, allow_unused=True
                )
                for acc, g in zip(grads, parts, strict=True):
                    if g is not None:
                        acc.add_(g)
        with torch.no_grad():
            dot = sum(
                float((p.double() * g.double()).sum()) for p, g in zip(params, grads, strict=True)
            )
        return dot, sum(p.numel() for p in params)


def diagnostic_stats(
    names: Sequence[str] = DIAGNOSTIC_NAMES,
    *,
    data: tuple[Any, Any],
    budget: Budget | None = None,
    likelihood: str | Likelihood = "categorical",
    prior: Prior | float | None = 1.0,
    seed: int = 0,
) -> dict[str, Callable[[nn.Module, Any], float]]:
    """``stats_fns`` for :func:`bayesflat.sample` that record flatness and temperature data.

    Each kept draw gets the diagnostics ``names`` (see the module docstring for the
    variables and their units), computed on ``data`` at the draw's weights. All of them are
    computed together on the first lookup of a draw and cached, so the cost per draw is
    that of :meth:`Budget.cost` whatever the order in which the driver asks.

    Curvature refers to the mean NLL of ``likelihood`` (the data term, no prior) over the
    curvature subset; a Gaussian prior ``N(0, s^2 I)`` would add ``1 / (N s^2)`` to every
    eigenvalue and ``d / (N s^2)`` to the trace. ``theta . grad L`` refers to the full
    potential ``L = mean NLL - log p(theta) / N`` with ``N`` the sampler's ``num_data``,
    which is what the configurational temperature needs: give ``likelihood`` and ``prior``
    exactly as given to :func:`bayesflat.sample`.

    Parameters
    ----------
    names : sequence of str
        A subset of :data:`DIAGNOSTIC_NAMES`.
    data : (inputs, targets)
        Tensors or arrays, usually the training set (the posterior's ``L`` is over it).
    budget : Budget, optional
        Work per draw; default ``Budget()``.
    likelihood, prior
        As for :class:`bayesflat.target.torch.Posterior`.
    seed : int
        Seed of the curvature subset and of every probe, Lanczos start and perturbation
        (fresh at each draw: a function of this seed, the chain's generator seed and the step,
        so the values do not depend on the executor or on resuming).

    Returns
    -------
    dict of str to callable
        ``variable -> fn(model, sampler) -> float``, the variables of
        :func:`recorded_names`; pass it as ``stats_fns`` (merge it with other entries if
        needed).

    Examples
    --------
    >>> fns = diagnostic_stats(data=(x, y), budget=Budget(subsample=256))  # doctest: +SKIP
    >>> trace = bayesflat.sample(model, (x, y), stats_fns=fns)  # doctest: +SKIP
    """
    chosen = _check_names(names)
    budget = Budget() if budget is None else budget
    if not isinstance(budget, Budget):
        raise TypeError(f"budget must be a Budget, got {type(budget).__name__}")
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    # a Posterior over an empty module resolves and validates likelihood and prior once
    resolved = Posterior(nn.Module(), num_data=1, likelihood=likelihood, prior=prior)
    state = _DrawDiagnostics(
        chosen, _as_pair(data), budget, resolved.likelihood, resolved.prior, int(seed)
    )
    return {variable: _DrawVariable(state, variable) for variable in recorded_names(chosen)}


class _DrawVariable:
    """``fn(model, sampler)`` giving one variable of a draw's shared diagnostics.

    A class rather than a closure so that runs in several processes can send it there.
    """

    def __init__(self, state: _DrawDiagnostics, variable: str) -> None:
        self.state = state
        self.variable = variable
        self.__name__ = f"diagnostic_{variable}"

    def __call__(self, model: nn.Module, sampler: Any) -> float:
        return self.state.value(self.variable, model, sampler)
