"""Cyclical SG-MCMC: a cosine step-size cycle with an exploration phase, for any sampler.

Zhang, Li, Zhang, Chen, Wilson, "Cyclical stochastic gradient MCMC for Bayesian deep
learning", ICLR 2020. ``K`` steps are split into ``M`` cycles of ``L = ceil(K / M)`` steps;
at step ``t`` (from 0; the paper's ``k = t + 1``)

    lr_t = lr0 / 2 (cos(pi mod(t, L) / L) + 1),        r_t = mod(t, L) / L.

While ``r_t < beta`` (the *exploration* fraction of each cycle) the sampler runs at ``T = 0``,
i.e. as its optimiser, and nothing is recorded; once ``r_t >= beta`` it samples at the given
temperature and :meth:`~bayesflat.samplers.base.Sampler.collecting` is ``True``, so the
driver keeps draws only there.

``K`` comes from ``total_steps``, or, when that is ``None``, from the driver's budget:
:meth:`Cyclical.planned_steps` (called by :func:`bayesflat.sample`) picks the shortest cycle
length ``L`` for which the sampling phases of ``M`` cycles hold ``draws * thin`` steps after
``burn_in``, and sets ``K = M L``. The draws are spread over the sampling phases of the
cycles, and the run stops once they are in, at the latest at the end of the ``M``-th cycle.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from bayesflat.samplers.fsgld import FSGLD
from bayesflat.samplers.langevin import SGLD
from bayesflat.samplers.sghmc import SGHMC
from bayesflat.schedules import Schedule, cycle_length, cyclical_cosine, cyclical_phase

__all__ = ["CFSGLD", "CSGHMC", "CSGLD", "Cyclical", "sampling_offset"]


def sampling_offset(length: int, exploration: float) -> int:
    """First sampling step of a cycle of ``L = length`` steps: least ``j`` with ``j / L >= beta``.

    Uses the floating-point expression of :func:`bayesflat.schedules.cyclical_phase`, so the
    two always agree. Returns ``length`` when the cycle has no sampling step.
    """
    j = min(length, math.ceil(exploration * length))
    while j > 0 and (j - 1) / length >= exploration:
        j -= 1
    while j < length and j / length < exploration:
        j += 1
    return j


def _sampling_steps(length: int, offset: int, cycles: int, burn_in: int) -> int:
    """Sampling steps at index ``>= burn_in`` in the first ``cycles`` cycles."""
    total = 0
    for c in range(cycles):
        last = c * length + length - 1
        first = max(c * length + offset, burn_in)
        total += max(0, last - first + 1)
    return total


class Cyclical:
    """Turns a sampler's step size into the cyclical cosine schedule with exploration phases.

    A mixin placed before a :class:`~bayesflat.samplers.base.Sampler` subclass in the bases
    (``class CSGLD(Cyclical, SGLD)``); the subclass's ``__init__`` calls :meth:`_init_cycles`
    before the sampler's. The given ``lr`` is ``lr0``, the step size at the start of every
    cycle, and the given temperature is the one of the sampling phases (kept in every param
    group as ``base_lr`` and ``base_temperature``). Both must be numbers: the mixin installs
    the cycle as the group's ``lr`` and ``temperature`` schedules, which the sampler resolves
    at the start of every step like any other schedule.

    Sample statistics added: ``cycle`` (index of the cycle of the last step, from 0) and
    ``cycle_phase`` (``r_t`` of the last step, ``>= exploration`` for every recorded draw).

    The cycle is the step-size schedule: a ``torch.optim.lr_scheduler`` attached to a cyclical
    sampler, or an ``lr`` set by hand between steps, is refused at the next step with a
    ``ValueError`` instead of being overridden.
    """

    cycles: int
    exploration: float
    total_steps: int | None
    param_groups: list[dict[str, Any]]

    def _init_cycles(self, cycles: int, exploration: float, total_steps: int | None) -> None:
        if isinstance(cycles, bool) or not isinstance(cycles, int) or cycles < 1:
            raise ValueError(f"cycles must be an integer >= 1, got {cycles!r}")
        if (
            isinstance(exploration, bool)
            or not isinstance(exploration, int | float)
            or not 0 <= exploration < 1
        ):
            raise ValueError(
                f"exploration must lie in [0, 1) (the fraction of each cycle run at T = 0), "
                f"got {exploration!r}"
            )
        self.cycles = cycles
        self.exploration = float(exploration)
        self._planned_total = total_steps is None
        self.total_steps = None
        self._cosine: Schedule | None = None
        self._phase: Schedule | None = None
        if total_steps is not None:
            if isinstance(total_steps, bool) or not isinstance(total_steps, int):
                raise ValueError(f"total_steps must be an integer or None, got {total_steps!r}")
            self._set_total_steps(total_steps)

    def _set_total_steps(self, total_steps: int) -> None:
        length = cycle_length(total_steps, self.cycles)
        if sampling_offset(length, self.exploration) >= length:
            raise ValueError(
                f"total_steps={total_steps} with cycles={self.cycles} gives cycles of {length} "
                f"steps with no sampling step at exploration={self.exploration}; "
                "increase total_steps or lower exploration"
            )
        self.total_steps = total_steps
        self._cosine = cyclical_cosine(total_steps, self.cycles, 1.0)
        self._phase = cyclical_phase(total_steps, self.cycles)

    # -- param groups ---------------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)  # type: ignore[misc]
        group = self.param_groups[-1]
        for key in ("lr", "temperature"):
            if key in group["schedules"]:
                raise ValueError(
                    f"{key} must be a number for a cyclical sampler: the cycle sets the "
                    f"schedule (lr is the step size lr0 at the start of each cycle)"
                )
        group["base_lr"] = group["lr"]
        group["base_temperature"] = group["temperature"]
        self._install_cycle(group)

    def _install_cycle(self, group: dict[str, Any]) -> None:
        # The cycle is an ordinary pair of schedules, resolved by the sampler at every step;
        # they need K, so a step before K is known raises the error of _schedules().
        lr0, temperature = group["base_lr"], group["base_temperature"]
        group["schedules"]["lr"] = Schedule(
            f"cyclical_cosine(lr0={lr0!r}, cycles={self.cycles})",
            lambda step: lr0 * self._schedules()[0](step),
        )
        group["schedules"]["temperature"] = Schedule(
            f"sampling_phases(temperature={temperature!r}, exploration={self.exploration!r})",
            lambda step: temperature if self.is_sampling(step) else 0.0,
        )

    def _schedules(self) -> tuple[Schedule, Schedule]:
        if self._cosine is None or self._phase is None:
            raise ValueError(
                "the cycle length is not known yet: pass total_steps=K, or call "
                "planned_steps(burn_in, draws, thin) first (bayesflat.sample does)"
            )
        return self._cosine, self._phase

    def is_sampling(self, step: int) -> bool:
        """Whether step ``step`` (from 0) lies in a sampling phase, ``r_t >= exploration``."""
        return self._schedules()[1](step) >= self.exploration

    # -- phases ---------------------------------------------------------------------------------

    def collecting(self) -> bool:
        """``True`` when the last step was a sampling-phase step."""
        last = self.param_groups[0]["step"] - 1
        return last >= 0 and self._phase is not None and self.is_sampling(last)

    def planned_steps(self, burn_in: int, draws: int, thin: int) -> int:
        """Steps until ``draws * thin`` sampling-phase steps at index ``>= burn_in`` are done.

        With ``total_steps=None`` this first fixes ``K = M L`` with the shortest cycle length
        ``L`` whose ``M`` cycles hold that many sampling steps. With an explicit
        ``total_steps`` the cycles repeat beyond ``K`` if the budget asks for more.
        """
        needed = draws * thin
        if needed < 1 or burn_in < 0:
            raise ValueError(
                f"planned_steps needs burn_in >= 0 and draws * thin >= 1, got burn_in={burn_in}, "
                f"draws={draws}, thin={thin}"
            )
        m, beta = self.cycles, self.exploration
        if self._planned_total:

            def enough(length: int) -> bool:
                offset = sampling_offset(length, beta)
                return _sampling_steps(length, offset, m, burn_in) >= needed

            low = max(1, math.floor(needed / (m * (1.0 - beta))))
            high = low
            while not enough(high):
                low, high = high + 1, 2 * high
            while low < high:
                mid = (low + high) // 2
                if enough(mid):
                    high = mid
                else:
                    low = mid + 1
            self._set_total_steps(m * high)
        length = cycle_length(self.total_steps, m)  # type: ignore[arg-type]
        offset = sampling_offset(length, beta)
        counted = 0
        c = burn_in // length
        while True:
            first = max(c * length + offset, burn_in)
            available = max(0, c * length + length - first)
            if counted + available >= needed:
                return first + (needed - counted)
            counted += available
            c += 1

    # -- statistics, settings, checkpoints -----------------------------------------------------

    def stats(self) -> dict[str, float]:
        """The sampler's statistics plus ``cycle`` and ``cycle_phase`` of the last step."""
        out = super().stats()  # type: ignore[misc]
        last = self.param_groups[0]["step"] - 1
        if last >= 0 and self.total_steps is not None:
            out["cycle"] = float(last // cycle_length(self.total_steps, self.cycles))
            out["cycle_phase"] = self._schedules()[1](last)
        else:
            out["cycle"] = out["cycle_phase"] = math.nan
        return out

    def config(self) -> dict[str, Any]:
        """Settings plus ``cycles``, ``exploration`` and ``total_steps`` (``None``: planned)."""
        return {
            **super().config(),  # type: ignore[misc]
            "cycles": self.cycles,
            "exploration": self.exploration,
            "total_steps": self.total_steps,
        }

    def state_dict(self) -> dict[str, Any]:
        """Optimizer state plus the planned ``total_steps``."""
        state = super().state_dict()  # type: ignore[misc]
        state["total_steps"] = self.total_steps
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`, including the cycle length."""
        state_dict = dict(state_dict)
        total = state_dict.pop("total_steps", None)
        super().load_state_dict(state_dict)  # type: ignore[misc]
        if total is not None:
            self._set_total_steps(total)
        for group in self.param_groups:
            self._install_cycle(group)


class CSGLD(Cyclical, SGLD):
    """Cyclical SGLD (Zhang, Li, Zhang, Chen, Wilson, ICLR 2020).

    Update rule, in mean-loss units, at step ``t`` with ``r_t = mod(t, L) / L``,
    ``L = ceil(K / M)``:

        lr_t  = lr0 / 2 (cos(pi r_t) + 1)
        T_t   = 0 if r_t < beta (exploration: SGD) else T (sampling)
        theta <- theta - lr_t grad L_B(theta) + sqrt(2 lr_t T_t / N) xi

    Draws are recorded only in sampling phases.

    Parameters
    ----------
    params : iterable
        Parameters or param groups.
    lr : float, default 1e-3
        ``lr0``, the step size at the start of every cycle (``> 0``).
    num_data : int
        Training-set size ``N``.
    temperature : float, default 1.0
        ``T >= 0`` of the sampling phases.
    cycles : int, default 4
        ``M``, the number of cycles (the authors' CIFAR setting).
    exploration : float, default 0.8
        ``beta`` in ``[0, 1)``, the fraction of each cycle run at ``T = 0``. (The authors'
        CIFAR-10 code switches the noise on after 45 of every 50 epochs, ``beta = 0.9``.)
    total_steps : int, optional
        ``K``. ``None`` (default) plans ``K`` from the driver's ``burn_in``, ``draws`` and
        ``thin`` (see :meth:`Cyclical.planned_steps`).
    generator : torch.Generator, optional
        Randomness of this chain.

    References
    ----------
    R. Zhang, C. Li, J. Zhang, C. Chen, A. G. Wilson. Cyclical stochastic gradient MCMC for
    Bayesian deep learning. ICLR 2020.
    """

    name = "csgld"

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        *,
        num_data: int,
        temperature: float = 1.0,
        cycles: int = 4,
        exploration: float = 0.8,
        total_steps: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        self._init_cycles(cycles, exploration, total_steps)
        super().__init__(
            params, lr=lr, num_data=num_data, temperature=temperature, generator=generator
        )


class CSGHMC(Cyclical, SGHMC):
    """Cyclical SGHMC (Zhang, Li, Zhang, Chen, Wilson, ICLR 2020).

    Update rule, in mean-loss units, with ``lr_t``, ``T_t`` as for :class:`CSGLD` and the
    momentum kept in gradient units ``b = -v / lr`` (see :mod:`bayesflat.samplers.sghmc`):

        b     <- (1 - alpha) b + grad L_B(theta) + sqrt(2 alpha T_t / (N lr_t)) xi
        theta <- theta - lr_t b

    so the exploration phases are ``torch.optim.SGD(momentum=1 - alpha)`` with the cosine
    step size.

    Parameters
    ----------
    params : iterable
        Parameters or param groups.
    lr : float, default 1e-3
        ``lr0``, the step size at the start of every cycle (``> 0``).
    num_data : int
        Training-set size ``N``.
    temperature : float, default 1.0
        ``T >= 0`` of the sampling phases.
    alpha : float, default 0.1
        Friction in ``(0, 1]``; momentum ``1 - alpha``.
    cycles : int, default 4
        ``M``, the number of cycles.
    exploration : float, default 0.8
        ``beta`` in ``[0, 1)``.
    total_steps : int, optional
        ``K``; ``None`` plans it from the driver's budget.
    generator : torch.Generator, optional
        Randomness of this chain.

    References
    ----------
    R. Zhang, C. Li, J. Zhang, C. Chen, A. G. Wilson. ICLR 2020. T. Chen, E. B. Fox,
    C. Guestrin. ICML 2014.
    """

    name = "csghmc"

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        *,
        num_data: int,
        temperature: float = 1.0,
        alpha: float = 0.1,
        cycles: int = 4,
        exploration: float = 0.8,
        total_steps: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        self._init_cycles(cycles, exploration, total_steps)
        super().__init__(
            params,
            lr=lr,
            num_data=num_data,
            temperature=temperature,
            alpha=alpha,
            generator=generator,
        )


class CFSGLD(Cyclical, FSGLD):
    """Cyclical fSGLD: the fSGLD step under the cyclical cosine step size.

    Update rule, in mean-loss units, with ``lr_t``, ``T_t`` as for :class:`CSGLD`:

        theta <- theta - lr_t grad L_B(theta + sigma_t eps) + sqrt(2 lr_t T_t / N) xi

    With the coupling (``sigma=None``) ``sigma_t = (T_t / N)^((1 + eta) / 4)`` is 0 while
    exploring, so the exploration phases are plain SGD; an explicit ``sigma`` perturbs in both
    phases.

    Parameters
    ----------
    params : iterable
        Parameters or param groups.
    lr : float, default 1e-3
        ``lr0``, the step size at the start of every cycle (``> 0``).
    num_data : int
        Training-set size ``N``.
    temperature : float, default 1.0
        ``T >= 0`` of the sampling phases.
    sigma, eta, num_perturbations, antithetic, perturbation
        As for :class:`~bayesflat.samplers.fsgld.FSGLD`.
    cycles : int, default 4
        ``M``, the number of cycles.
    exploration : float, default 0.8
        ``beta`` in ``[0, 1)``.
    total_steps : int, optional
        ``K``; ``None`` plans it from the driver's budget.
    generator : torch.Generator, optional
        Randomness of this chain.

    References
    ----------
    Bruno, Hwang, An, Sabanis, Lim. arXiv:2510.02174 (ICML 2026). Zhang, Li, Zhang, Chen,
    Wilson. ICLR 2020.
    """

    name = "cfsgld"

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        *,
        num_data: int,
        temperature: float = 1.0,
        sigma: float | None = None,
        eta: float = 0.1,
        num_perturbations: int = 1,
        antithetic: bool = False,
        perturbation: str = "gaussian",
        cycles: int = 4,
        exploration: float = 0.8,
        total_steps: int | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        self._init_cycles(cycles, exploration, total_steps)
        super().__init__(
            params,
            lr=lr,
            num_data=num_data,
            temperature=temperature,
            sigma=sigma,
            eta=eta,
            num_perturbations=num_perturbations,
            antithetic=antithetic,
            perturbation=perturbation,
            generator=generator,
        )
