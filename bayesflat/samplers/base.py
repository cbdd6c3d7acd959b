"""The sampler contract: a gradient estimator composed with a dynamics.

A :class:`Sampler` is a :class:`torch.optim.Optimizer` whose ``step(closure)`` does two things:

1. its :class:`GradientEstimator` decides *where* the closure is evaluated and how the
   resulting gradients are combined, leaving the combined gradient in ``p.grad``;
2. its :class:`Dynamics` decides *what is done* with that gradient (a Langevin move, a
   preconditioned move, a momentum move; with ``T = 0`` the corresponding optimiser step).

Hyperparameters live in the param groups, so ``torch.optim.lr_scheduler`` and per-group
settings work as with any optimiser. Any hyperparameter may be given as a schedule, a callable
``step -> value`` evaluated at the start of every step (steps counted from 0). A hyperparameter
given as a schedule belongs to it: a ``torch.optim.lr_scheduler`` on a scheduled ``lr``, or a
value written into the group between steps, is refused with a ``ValueError`` rather than
silently overridden.

The closure evaluates the minibatch potential ``L_B`` in mean-loss units, calls
``backward()`` and returns the detached value. It must *not* zero the gradients: the
estimator zeroes them once per step and lets repeated evaluations accumulate.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.optimizer import _global_optimizer_post_hooks as _global_post_hooks
from torch.optim.optimizer import _global_optimizer_pre_hooks as _global_pre_hooks

from bayesflat._checks import check_positive, validate_num_data, validate_temperature

__all__ = [
    "Closure",
    "batchnorm_layers",
    "frozen_batchnorm",
    "Dynamics",
    "FlatBuffer",
    "GradientEstimator",
    "PlainGradient",
    "Sampler",
]

Closure = Callable[[], Tensor]


class FlatBuffer:
    """One contiguous buffer shaped like a list of parameters, with a view per parameter.

    Drawing noise into it is a single random-number call whatever the number of parameter
    tensors; the per-parameter views feed ``torch._foreach_*`` kernels.
    """

    def __init__(self, params: Sequence[Tensor]) -> None:
        self.params = list(params)
        self.views: dict[int, Tensor] = {}
        self.chunks: list[Tensor] = []
        by_kind: dict[tuple[torch.device, torch.dtype], list[Tensor]] = {}
        for p in self.params:
            by_kind.setdefault((p.device, p.dtype), []).append(p)
        for (device, dtype), plist in by_kind.items():
            flat = torch.empty(sum(p.numel() for p in plist), device=device, dtype=dtype)
            self.chunks.append(flat)
            offset = 0
            for p in plist:
                self.views[id(p)] = flat[offset : offset + p.numel()].view_as(p)
                offset += p.numel()

    def of(self, params: Iterable[Tensor]) -> list[Tensor]:
        """Views matching ``params`` (each must be one of the buffer's parameters)."""
        return [self.views[id(p)] for p in params]

    def of_group(self, group: dict[str, Any]) -> list[Tensor]:
        """Views matching all of ``group["params"]``, listed once per group and then reused
        (a sampler renews its buffers whenever a param group is added)."""
        params = group["params"]
        cache = self.__dict__.setdefault("_group_views", {})
        cached = cache.get(id(params))
        if cached is None or cached[0] is not params:
            cached = cache[id(params)] = (params, self.of(params))
        return cached[1]

    def normal_(self, generator: torch.Generator | None) -> None:
        """Fill with independent standard normal draws (one call per dtype/device chunk)."""
        for flat in self.chunks:
            fill_normal_(flat, generator)

    def rademacher_(self, generator: torch.Generator | None) -> None:
        """Fill with independent signs, ``P(+1) = P(-1) = 1/2``."""
        for flat in self.chunks:
            fill_rademacher_(flat, generator)


def fill_normal_(flat: Tensor, generator: torch.Generator | None) -> None:
    """Standard normal draws into the contiguous tensor ``flat``."""
    flat.normal_(generator=generator)


_SIGN_BITS = 63
"""Random bits used per ``int64`` word: ``random_()`` on ``int64`` is uniform on
``[0, 2^63 - 1]``, so bits 0-62 are independent fair coins and the sign bit is always 0."""

_SHIFTS: dict[torch.device, Tensor] = {}


def fill_rademacher_(flat: Tensor, generator: torch.Generator | None) -> None:
    """Independent signs ``+-1`` (probability 1/2 each) into the contiguous tensor ``flat``.

    The signs are the bits of one integer draw: ``ceil(n / 63)`` uniform ``int64`` words, each
    giving 63 independent fair bits ``b``, written as ``2 b - 1``. This costs about a third
    of a standard normal draw of ``flat`` (``bernoulli_`` costs four times one).
    """
    n = flat.numel()
    if n == 0:
        return
    device = flat.device
    shifts = _SHIFTS.get(device)
    if shifts is None:
        shifts = _SHIFTS[device] = torch.arange(_SIGN_BITS, dtype=torch.int64, device=device)
    words = torch.empty(-(-n // _SIGN_BITS), dtype=torch.int64, device=device)
    words.random_(generator=generator)
    bits = torch.bitwise_right_shift(words[:, None], shifts).bitwise_and_(1)
    flat.view(-1).copy_(bits.view(-1)[:n]).mul_(2.0).sub_(1.0)


def _with_step_hooks(step: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``step`` calling the step hooks users register, without ``torch.optim``'s wrapper.

    :class:`torch.optim.Optimizer` wraps ``step`` in a profiler record that also calls the
    hooks; that wrapper costs about 80 us per call, a sixth of an SGD step on the digits MLP
    (``benchmarks/step_time.py``). This one calls the global hooks
    (:func:`torch.optim.optimizer.register_optimizer_step_pre_hook` and ``..._post_hook``) and
    the optimiser's own (:meth:`~torch.optim.Optimizer.register_step_pre_hook`,
    ``register_step_post_hook``) in torch's order, with torch's arguments, and only around the
    outermost ``step`` (a subclass's ``step`` calling ``super().step`` runs them once). It
    marks itself ``hooked`` so that torch does not wrap it again.
    """

    @functools.wraps(step)
    def hooked(self: Sampler, *args: Any, **kwargs: Any) -> Tensor:
        if type(self).step is not hooked:
            return step(self, *args, **kwargs)
        pre = self._optimizer_step_pre_hooks
        if _global_pre_hooks or pre:
            for hook in (*_global_pre_hooks.values(), *pre.values()):
                result = hook(self, args, kwargs)
                if result is not None:
                    if not (isinstance(result, tuple) and len(result) == 2):
                        raise RuntimeError(
                            f"a step pre-hook must return None or a tuple (args, kwargs), "
                            f"got {result!r}"
                        )
                    args, kwargs = result
        out = step(self, *args, **kwargs)
        post = self._optimizer_step_post_hooks
        if post or _global_post_hooks:
            for hook in (*post.values(), *_global_post_hooks.values()):
                hook(self, args, kwargs)
        return out

    hooked.hooked = True  # type: ignore[attr-defined]
    return hooked


def batchnorm_layers(model: nn.Module | None) -> list[nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm layer of ``model`` (none for ``None``)."""
    if model is None:
        return []
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module or None, got {type(model).__name__}")
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@contextlib.contextmanager
def frozen_batchnorm(layers: Iterable[nn.modules.batchnorm._BatchNorm]) -> Iterator[None]:
    """Within the block, BatchNorm layers in training mode do not update running statistics.

    ``track_running_stats`` is switched off for those layers and restored on exit: in training
    mode a BatchNorm layer normalises with the batch statistics either way, so the forward and
    backward passes are unchanged and only the update of ``running_mean``, ``running_var`` and
    ``num_batches_tracked`` is suppressed.
    """
    switched = [m for m in layers if m.training and m.track_running_stats]
    for m in switched:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m in switched:
            m.track_running_stats = True


class GradientEstimator:
    """Where the closure is evaluated and how its gradients are combined.

    Subclasses implement :meth:`estimate`, which must leave the combined gradient in
    ``p.grad`` for every parameter that received one and return the potential value.
    ``defaults`` are hyperparameters added to every param group.

    BatchNorm: an estimator that evaluates the closure anywhere but at the current weights
    ``theta`` does so inside :meth:`away_from_theta`, which keeps the running statistics of
    the watched model (:meth:`watch`) as they are. The statistics are then only ever updated
    by passes at ``theta``, at most once per step; ``moves_weights`` says which estimators
    may evaluate away from ``theta``.
    """

    name = "plain"
    defaults: dict[str, Any] = {}
    moves_weights = False
    _batchnorm: list[nn.modules.batchnorm._BatchNorm] = []

    def watch(self, model: nn.Module | None) -> None:
        """Keep the BatchNorm running statistics of ``model`` out of passes away from theta."""
        self._batchnorm = batchnorm_layers(model)

    def away_from_theta(self) -> contextlib.AbstractContextManager[None]:
        """Context for every closure evaluation at weights other than ``theta``.

        The watched model's BatchNorm layers normalise with the batch statistics as always,
        but leave their running statistics unchanged (:func:`frozen_batchnorm`).
        """
        return frozen_batchnorm(self._batchnorm)

    def estimate(self, sampler: Sampler, closure: Closure) -> Tensor:
        """Fill ``p.grad`` and return the (detached) potential."""
        raise NotImplementedError

    def validate(self, group: dict[str, Any]) -> None:
        """Check (and normalise) the hyperparameters this estimator reads from ``group``."""

    def stats(self, sampler: Sampler) -> dict[str, float]:
        """Per-step statistics this estimator adds to ``sample_stats``."""
        return {}

    def config(self) -> dict[str, Any]:
        """Settings recorded in the trace attributes."""
        return {"estimator": self.name}


class PlainGradient(GradientEstimator):
    """The gradient at the current parameters: ``g = grad L_B(theta)``."""

    name = "plain"

    def estimate(self, sampler: Sampler, closure: Closure) -> Tensor:
        sampler.zero_grad(set_to_none=True)
        with torch.enable_grad():
            return closure()


class Dynamics:
    """What is done with the estimated gradient.

    Subclasses implement :meth:`update`, which moves every parameter with a gradient.
    ``defaults`` are hyperparameters added to every param group.
    """

    name = "dynamics"
    defaults: dict[str, Any] = {}

    def update(self, sampler: Sampler) -> None:
        """Move the parameters of every group using ``p.grad``."""
        raise NotImplementedError

    def validate(self, group: dict[str, Any]) -> None:
        """Check (and normalise) the hyperparameters this dynamics reads from ``group``."""

    def bind_schedule(self, sampler: Sampler, burn_in: int, draws: int, thin: int) -> None:
        """Resolve settings of ``sampler``'s groups that default to the run's schedule."""

    def stats(self, sampler: Sampler) -> dict[str, float]:
        """Per-step statistics this dynamics adds to ``sample_stats``."""
        return {}

    def config(self) -> dict[str, Any]:
        """Settings recorded in the trace attributes."""
        return {"dynamics": self.name}


def _optimizer_method(name: str) -> Callable[..., Any]:
    """:class:`torch.optim.Optimizer`'s method ``name``, past its dynamo guard while dynamo is
    not loaded.

    torch guards ``add_param_group``, ``zero_grad``, ``state_dict`` and ``load_state_dict``
    with ``torch._disable_dynamo``, which imports ``torch._dynamo`` at its first call (1.3-1.8 s
    of CPU, more than importing torch) only so that dynamo does not trace into them. Nothing
    traces before dynamo is imported, so until then the undecorated method is called; in a
    program that has imported dynamo (``torch.compile``), the guarded one is.
    """
    guarded = getattr(torch.optim.Optimizer, name)
    plain = getattr(guarded, "__wrapped__", guarded)

    def call(self: torch.optim.Optimizer, *args: Any, **kwargs: Any) -> Any:
        method = guarded if "torch._dynamo" in sys.modules else plain
        return method(self, *args, **kwargs)

    return call


_add_param_group = _optimizer_method("add_param_group")
_zero_grad = _optimizer_method("zero_grad")
_state_dict = _optimizer_method("state_dict")
_load_state_dict = _optimizer_method("load_state_dict")


class Sampler(torch.optim.Optimizer):
    """An SG-MCMC sampler: a :class:`GradientEstimator` followed by a :class:`Dynamics`.

    Parameters
    ----------
    params : iterable of Tensor or dict
        Parameters or param groups, as for any :class:`torch.optim.Optimizer`.
    estimator : GradientEstimator
        Where gradients are taken.
    dynamics : Dynamics
        How the parameters move.
    lr : float or callable
        Step size in mean-loss units (``> 0``), or a schedule ``step -> lr``.
    num_data : int
        Training-set size ``N``.
    temperature : float or callable, default 1.0
        ``T >= 0``, or a schedule ``step -> T``.
    generator : torch.Generator, optional
        Source of all randomness of this chain. ``None`` uses the global generator.
    **defaults
        Further per-group hyperparameters (those of the estimator and dynamics).
    """

    name = "sampler"
    buffer_type: Callable[[Sequence[Tensor]], FlatBuffer] = FlatBuffer
    """Makes the workspaces of :meth:`buffer`; the vectorised executor swaps in one with a
    chain dimension."""

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        *,
        estimator: GradientEstimator,
        dynamics: Dynamics,
        lr: float | Callable[[int], float],
        num_data: int,
        temperature: float | Callable[[int], float] = 1.0,
        generator: torch.Generator | None = None,
        **defaults: Any,
    ) -> None:
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(
                f"generator must be a torch.Generator or None, got {type(generator).__name__}"
            )
        self.estimator = estimator
        self.dynamics = dynamics
        self.generator = generator
        all_defaults = {
            **estimator.defaults,
            **dynamics.defaults,
            **defaults,
            "lr": lr,
            "num_data": num_data,
            "temperature": temperature,
        }
        super().__init__(params, all_defaults)
        self._buffers: dict[str, FlatBuffer] = {}
        self._last_loss: Tensor | None = None

    # -- param groups ---------------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        _add_param_group(self, param_group)
        group = self.param_groups[-1]
        group.setdefault("step", 0)
        schedules = {
            k: v for k, v in group.items() if k not in ("params", "schedules") and callable(v)
        }
        group["schedules"] = {**group.get("schedules", {}), **schedules}
        self._resolve_schedules(group)
        self._validate_group(group)
        self._buffers = {}
        self._params = [p for g in self.param_groups for p in g["params"]]

    def _resolve_schedules(self, group: dict[str, Any]) -> None:
        for key, schedule in group["schedules"].items():
            group[key] = schedule(group["step"])

    def _validate_group(self, group: dict[str, Any]) -> None:
        group["num_data"] = validate_num_data(group["num_data"])
        group["temperature"] = validate_temperature(group["temperature"])
        group["lr"] = check_positive(group["lr"], "lr")
        if not isinstance(group.get("perturb", True), bool):
            raise ValueError(f"perturb must be True or False, got {group['perturb']!r}")
        self.estimator.validate(group)
        self.dynamics.validate(group)

    def watch(self, model: nn.Module | None) -> None:
        """Name the module whose BatchNorm statistics passes away from theta must not move.

        The run engine calls it for every chain; call it once when stepping a sampler by hand
        on a network with BatchNorm (see :meth:`GradientEstimator.away_from_theta`).
        """
        self.estimator.watch(model)

    # -- workspace ------------------------------------------------------------------------------

    def buffer(self, key: str) -> FlatBuffer:
        """A flat workspace shaped like all parameters, allocated once and reused."""
        buf = self._buffers.get(key)
        if buf is None:
            buf = self._buffers[key] = self.buffer_type(self._params)
        return buf

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients, as :meth:`torch.optim.Optimizer.zero_grad` does.

        Estimators call it every step with ``set_to_none=True``: that path is a plain loop over
        the parameters listed at :meth:`add_param_group`, without the profiler record and the
        dynamo guard of the base method, which cost 20-30 us per step on the digits MLP, whose
        whole step takes about 1 ms (``benchmarks/step_time.py``).
        """
        if not set_to_none:
            _zero_grad(self, set_to_none=False)
            return
        for p in self._params:
            p.grad = None

    @staticmethod
    def grads_of(group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor]]:
        """Parameters of ``group`` that have a gradient, and those gradients.

        When every parameter has one (the usual case) the parameters are ``group["params"]``
        itself, the list :meth:`FlatBuffer.of_group` knows.
        """
        params = group["params"]
        grads = [p.grad for p in params]
        if any(g is None for g in grads):
            params = [p for p in params if p.grad is not None]
            grads = [p.grad for p in params]
        return params, grads

    # -- the step -------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> Tensor:  # type: ignore[override]
        """One move: estimate the gradient with ``closure``, then apply the dynamics.

        Returns the potential reported by the estimator (mean-loss units).
        """
        if closure is None:
            raise ValueError(
                "step() needs a closure that evaluates the minibatch potential and calls "
                "backward(); build one with Posterior.closure(inputs, targets)"
            )
        resolved = getattr(self, "_resolved", [])
        resolved += [None] * (len(self.param_groups) - len(resolved))
        for index, group in enumerate(self.param_groups):
            if group["schedules"]:
                self._check_schedules_unopposed(index, group, resolved[index])
                self._resolve_schedules(group)
                self._validate_group(group)
                resolved[index] = {k: group[k] for k in group["schedules"]}
        self._resolved = resolved
        loss = self.estimator.estimate(self, closure)
        self.dynamics.update(self)
        for group in self.param_groups:
            group["step"] += 1
        self._last_loss = loss
        return loss

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "step" in cls.__dict__:
            cls.step = _with_step_hooks(cls.__dict__["step"])  # type: ignore[method-assign]

    def _check_schedules_unopposed(
        self, index: int, group: dict[str, Any], last: dict[str, Any] | None
    ) -> None:
        """Refuse a hyperparameter that a schedule sets and something else changed.

        The schedule rewrites it at every step, so a ``torch.optim.lr_scheduler`` (which marks
        the groups it drives with ``initial_lr``) or a hand-set value would be dropped without
        a word.
        """
        fix = (
            "Give the step size one way: a torch.optim.lr_scheduler on a sampler with a "
            "numeric lr (e.g. 'sgld' rather than 'csgld', whose cosine cycle is its own lr "
            "schedule), or lr=<schedule> / the cyclical sampler's cycles, exploration and "
            "total_steps without a torch scheduler"
        )
        if "lr" in group["schedules"] and "initial_lr" in group:
            raise ValueError(
                f"a torch.optim.lr_scheduler drives param group {index} of {self.name!r}, whose "
                f"lr is already set at every step by the schedule "
                f"{getattr(group['schedules']['lr'], '__name__', 'given')}; the "
                f"scheduler's values would be overridden silently. {fix}"
            )
        for key, value in (last or {}).items():
            if group[key] != value:
                raise ValueError(
                    f"param group {index}'s {key} of {self.name!r} was changed from outside "
                    f"({value!r} -> {group[key]!r}), but the schedule "
                    f"{getattr(group['schedules'][key], '__name__', 'given')} sets it at "
                    f"every step and would override the change silently. {fix}"
                )

    # -- phases -----------------------------------------------------------------------------------

    def collecting(self) -> bool:
        """Whether the state after the last step is a draw of the target.

        ``False`` during exploration phases (e.g. of a cyclical schedule), where the driver
        records nothing.
        """
        return True

    def bind_schedule(self, burn_in: int, draws: int, thin: int) -> None:
        """Resolve settings that default to the run's schedule (those of the dynamics here).

        The run engine calls it before recording the sampler's settings and before every
        chain, so the trace attributes show the values the chains use.
        """
        self.dynamics.bind_schedule(self, burn_in, draws, thin)

    def planned_steps(self, burn_in: int, draws: int, thin: int) -> int:
        """Steps a chain needs to keep ``draws`` draws: ``burn_in + draws * thin`` by default."""
        return burn_in + draws * thin

    # -- statistics and settings ----------------------------------------------------------------

    def gradients(self) -> list[Tensor]:
        """Every ``p.grad`` that exists, over all param groups."""
        return [p.grad for p in self._params if p.grad is not None]

    def grad_norm(self) -> float:
        """Euclidean norm of the last combined gradient over all parameters."""
        grads = self.gradients()
        if not grads:
            return 0.0
        return float(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))

    def stats(self) -> dict[str, float]:
        """Statistics of the last step (first param group's hyperparameters).

        ``lp`` is the potential the estimator evaluated (mean-loss units); ``step_size`` the
        learning rate; ``temperature`` ``T``; ``sigma`` the perturbation scale (0 for
        estimators that do not perturb); ``grad_norm`` the norm of the combined gradient.
        """
        group = self.param_groups[0]
        out = {
            "lp": float("nan") if self._last_loss is None else float(self._last_loss),
            "step_size": float(group["lr"]),
            "temperature": float(group["temperature"]),
            "sigma": 0.0,
            "grad_norm": self.grad_norm(),
        }
        out.update(self.estimator.stats(self))
        out.update(self.dynamics.stats(self))
        return out

    def config(self) -> dict[str, Any]:
        """Name and every hyperparameter of the first param group, for the trace attributes."""
        group = self.param_groups[0]
        hyper = {
            k: (f"schedule:{getattr(group['schedules'][k], '__name__', 'callable')}")
            if k in group["schedules"]
            else v
            for k, v in group.items()
            if k not in ("params", "schedules", "step")
        }
        return {
            "sampler": self.name,
            **hyper,
            **self.estimator.config(),
            **self.dynamics.config(),
        }

    def state_dict(self) -> dict[str, Any]:
        """Optimizer state plus the chain's generator state (for exact resumption)."""
        state = _state_dict(self)
        for group in state["param_groups"]:
            group.pop("schedules", None)
        if self.generator is not None:
            state["generator_state"] = self.generator.get_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; schedules given at construction are kept."""
        state_dict = dict(state_dict)
        generator_state = state_dict.pop("generator_state", None)
        schedules = [g["schedules"] for g in self.param_groups]
        _load_state_dict(self, state_dict)
        self._resolved = []
        for group, sched in zip(self.param_groups, schedules, strict=True):
            group["schedules"] = sched
        if generator_state is not None and self.generator is not None:
            self.generator.set_state(generator_state)


Sampler.step = _with_step_hooks(Sampler.step)  # type: ignore[method-assign]
