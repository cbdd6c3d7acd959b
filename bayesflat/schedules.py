"""Step-size and temperature schedules: plain functions of the step.

A schedule maps the step ``t = 0, 1, 2, ...`` (steps already taken by the sampler) to a value.
Any sampler hyperparameter accepts one: pass ``lr=polynomial_decay(0.1)`` and the sampler
evaluates it at the start of every step. Each schedule carries a ``__name__`` that spells out
its parameters, so the trace attributes say which schedule ran.

- :func:`constant`: ``a``.
- :func:`polynomial_decay`: ``a (b + t)^(-gamma)`` (Welling & Teh, ICML 2011).
- :func:`cyclical_cosine`: ``lr0 / 2 (cos(pi mod(t, L) / L) + 1)`` with cycle length
  ``L = ceil(K / M)`` (Zhang, Li, Zhang, Chen, Wilson, ICLR 2020), and :func:`cyclical_phase`,
  the position ``mod(t, L) / L`` in the cycle that separates exploration from sampling.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from bayesflat._checks import check_positive

__all__ = [
    "Schedule",
    "constant",
    "cycle_length",
    "cyclical_cosine",
    "cyclical_phase",
    "polynomial_decay",
]


class Schedule:
    """A hyperparameter as a function of the step ``t >= 0``.

    Parameters
    ----------
    name : str
        Readable description with the parameters (recorded in trace attributes).
    fn : callable
        ``t -> value`` for integer ``t >= 0``.
    """

    def __init__(self, name: str, fn: Callable[[int], float]) -> None:
        self.__name__ = name
        self._fn = fn

    def __call__(self, step: int) -> float:
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"step must be an integer >= 0, got {step!r}")
        return self._fn(step)

    def __repr__(self) -> str:
        return self.__name__


def _count(value: object, argname: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{argname} must be an integer >= 1, got {value!r}")
    return value


def constant(value: float) -> Schedule:
    """The schedule ``t -> value``.

    Parameters
    ----------
    value : float
        A finite number (the units of the hyperparameter it feeds).
    """
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"value must be a finite number, got {value!r}")
    v = float(value)
    return Schedule(f"constant(value={v!r})", lambda step: v)


def polynomial_decay(a: float, b: float = 1.0, gamma: float = 0.55) -> Schedule:
    """The decaying step size ``eps_t = a (b + t)^(-gamma)`` of Welling & Teh (ICML 2011).

    With ``gamma`` in ``(0.5, 1]`` the steps satisfy the Robbins–Monro conditions
    ``sum eps_t = inf``, ``sum eps_t^2 < inf`` under which SGLD converges to the posterior
    without a Metropolis correction; ``gamma <= 0.5`` (e.g. the ``1/3`` that minimises the
    asymptotic mean-squared error, Teh, Thiery & Vollmer, JMLR 2016) is accepted too.

    Parameters
    ----------
    a : float
        Scale (``> 0``), in the units of the step size: ``eps_0 = a b^(-gamma)``.
    b : float, default 1.0
        Offset (``> 0``), in steps; delays the decay.
    gamma : float, default 0.55
        Decay exponent in ``(0, 1]``; 0.55 is the value of Welling & Teh's experiments.

    Returns
    -------
    Schedule
        ``t -> a (b + t)^(-gamma)``.
    """
    a = check_positive(a, "a")
    b = check_positive(b, "b")
    if isinstance(gamma, bool) or not isinstance(gamma, int | float) or not 0 < gamma <= 1:
        raise ValueError(f"gamma must lie in (0, 1], got {gamma!r}")
    g = float(gamma)
    return Schedule(
        f"polynomial_decay(a={a!r}, b={b!r}, gamma={g!r})", lambda step: a * (b + step) ** -g
    )


def cycle_length(total_steps: int, cycles: int) -> int:
    """Steps per cycle, ``L = ceil(K / M)``, for ``K`` total steps in ``M`` cycles."""
    k = _count(total_steps, "total_steps")
    m = _count(cycles, "cycles")
    if m > k:
        raise ValueError(f"cycles={m} exceeds total_steps={k}; each cycle needs at least one step")
    return -(-k // m)


def cyclical_phase(total_steps: int, cycles: int) -> Schedule:
    """Position in the current cycle, ``r_t = mod(t, L) / L`` in ``[0, 1)``.

    Zhang et al. (ICLR 2020) explore while ``r_t < beta`` and sample once ``r_t >= beta``,
    with ``beta`` the exploration fraction. Their step counter ``k = t + 1`` starts at 1, so
    ``mod(k - 1, L)`` there is ``mod(t, L)`` here. The pattern repeats with period ``L``
    beyond ``K`` steps.

    Parameters
    ----------
    total_steps : int
        ``K``, the planned number of steps.
    cycles : int
        ``M``, the number of cycles in ``K`` steps (``1 <= M <= K``).
    """
    length = cycle_length(total_steps, cycles)
    return Schedule(
        f"cyclical_phase(total_steps={total_steps}, cycles={cycles})",
        lambda step: (step % length) / length,
    )


def cyclical_cosine(total_steps: int, cycles: int, lr0: float) -> Schedule:
    """Cyclical cosine step size of cyclical SG-MCMC (Zhang et al., ICLR 2020).

    .. math::

        \\mathrm{lr}_t = \\frac{\\mathrm{lr}_0}{2}
            \\left(\\cos\\left(\\pi\\, \\frac{\\mathrm{mod}(t, L)}{L}\\right) + 1\\right),
        \\qquad L = \\lceil K / M \\rceil,

    for steps ``t = 0, 1, ...`` (the paper's ``k = t + 1``): ``lr0`` at the start of every
    cycle, decaying to ``lr0 (1 + cos(pi (L - 1) / L)) / 2 ≈ lr0 pi^2 / (4 L^2)`` at its end.
    The pattern repeats with period ``L`` beyond ``K`` steps.

    Parameters
    ----------
    total_steps : int
        ``K``, the planned number of steps.
    cycles : int
        ``M``, the number of cycles (``1 <= M <= K``).
    lr0 : float
        Initial step size of every cycle (``> 0``), mean-loss units.
    """
    length = cycle_length(total_steps, cycles)
    lr0 = check_positive(lr0, "lr0")
    return Schedule(
        f"cyclical_cosine(total_steps={total_steps}, cycles={cycles}, lr0={lr0!r})",
        lambda step: lr0 / 2.0 * (math.cos(math.pi * (step % length) / length) + 1.0),
    )
