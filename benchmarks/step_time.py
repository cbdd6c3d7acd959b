"""Per-step time, passes and memory of every bayesflat method against ``torch.optim.SGD``.

A *step* is zero grad + forward + backward + update on one fixed minibatch:

- ``torch.optim.SGD`` (``torch_sgd``, the baseline), as a PyTorch user writes it, with the
  Gaussian prior as its weight decay ``1 / (N s^2)``:
  ``opt.zero_grad(); F.cross_entropy(model(x), y).backward(); opt.step()`` (bit for bit the
  update of bayesflat's ``sgd``);
- every method of the registry :mod:`bayesflat.samplers` (built as the driver builds it:
  ``get(name)(params, lr=LR, num_data=N, temperature=T, generator=...)`` with ``T = 1`` for
  samplers and ``T = 0`` for optimisers, then ``bind_schedule``, ``watch``, its
  ``begin_chain`` hook and ``planned_steps``):
  ``opt.step(posterior.closure(x, y, value=False))``, the closure the run engine builds for
  the steps whose potential it does not read (the NLL is returned; the prior's value is not
  computed, its gradient is).

All methods share one model, one batch and one :class:`~bayesflat.target.torch.Posterior`
(Gaussian prior of scale 1), run in one process on one thread, and are interleaved: every
round runs each method for ``steps_per_round`` steps, in a freshly shuffled order, so that the
load of a noisy machine falls on all of them alike. Times are CPU time of this thread (all the
work runs on it; time spent waiting for a CPU is left out), with wall-clock time beside them.
Reported: the median per-step time over rounds with its interquartile range; the median over
rounds of the per-round ratio to SGD (paired within a round) with its interquartile range;
the number of forward/backward passes per step (calls of the closure); and the CPU time spent
outside the forward/backward passes, with the ratio it implies (see ``summarise``).

Two cases:

- ``convnet32``: :class:`~bayesflat.models.ConvNet32` on a 128 x 3 x 32 x 32 batch, where the
  forward/backward pass dominates: a method costs about its number of passes, and fSGLD
  should cost what SGD costs (ratio <= 1.03);
- ``digits_mlp``: the digits :class:`~bayesflat.models.MLP` (64-128-128-10) on a batch of 64,
  where per-step overhead shows. Two references run beside the methods:

  - *floor*: the SGD step plus the noise itself, drawn into preallocated flat buffers (one
    standard normal draw of all P parameters for SGLD; two, plus one P-sized copy for the
    weight backup, for fSGLD). No sampler that draws its noise from ``torch.Generator`` can be
    cheaper. The page gives ``sgld`` / ``floor_sgld`` and ``fsgld`` / ``floor_fsgld`` paired
    per round, and checks that each sits at or below 1;
  - *naive loop*: a textbook per-parameter Python loop (one ``torch.randn`` per tensor, a
    ``clone`` per tensor for the backup), written here as the reference, not part of bayesflat.

  The case also times, in rounds of their own, every way of drawing the P noise values that
  torch and numpy offer (``compare_draws``): torch's ``normal_`` in float32 (bayesflat's
  draw), in float64 and bfloat16; Box-Muller and the inverse normal CDF in torch ops; numpy's
  ziggurat with four bit generators; the Rademacher signs; and, as bounds, the uniform random
  numbers these start from. Each normal draw is checked against the standard normal law.

One more reference runs in both cases, when the ``posteriors`` library (0.1.3, the ``bench``
extra) is installed: ``posteriors_sgld``, its SGLD written as a posteriors user writes it, with
a functional log posterior over a dict of the parameters,

    log_post(theta, B) = -mean_{i in B} NLL_i(theta) + log N(theta; 0, I) / N
                       = -L_B(theta) - P log(2 pi) / (2 N)     (nats per example),

(``torch.func.functional_call`` of the model, ``F.cross_entropy`` and
``posteriors.diag_normal_log_prob``, whose normalised density adds the constant; its passes are
the calls of ``log_post``), ``posteriors.sgmcmc.sgld.build(log_post, lr=LR,
temperature=T / N)`` and ``state, aux = transform.update(state, (x, y))`` per step. That is the
scaling the posteriors documentation asks for (a batch-mean log posterior with temperature
``1 / num_data`` for the Bayes posterior), and it makes the step the one of bayesflat's
``sgld`` at the same ``lr`` and ``T = 1``: ``theta + lr grad log_post + sqrt(2 lr T / N) xi``.
It runs on a copy of the model whose BatchNorm layers keep no running statistics
(``torch.func.replace_all_batch_norm_modules_``: ``torch.func`` cannot update them inside its
gradient transform; in training mode the layers normalise by the batch statistics either way),
so on ``convnet32`` it skips the running-statistics update that the other methods make.
Its gradient comes from ``torch.func.grad_and_value`` inside ``transform.update``, so its
forward and backward cannot be timed apart from the rest of its step: its "outside fwd/bwd"
cells read n/a. Its state keeps a new copy of the parameters after every step and no ``.grad``;
that copy stands where the gradients of the other methods stand in the persistent memory.
Without ``posteriors`` the row is left out and the results say so.

The cyclical samplers (``csgld``, ``csghmc``, ``cfsgld``) are timed in their sampling phase
(``exploration=0``, see ``METHOD_OPTIONS``): their exploration steps are ``T = 0`` steps, those
of ``sgd`` (``csgld``, ``cfsgld``) or of momentum SGD (``csghmc``). pSGLD runs with its
preconditioner frozen after one step (``adapt_steps=1``), as in its sampling phase. Every other
method runs with its defaults.

Memory, measured with ``torch.profiler`` (``profile_memory=True``), from its allocation
events in time order:

- *persistent*: bytes allocated while a fresh optimiser is built (with its hooks) and makes
  its first step that are still alive after it, less the gradients (sampler workspace and
  optimiser state), also counted in parameter-sized buffers;
- *peak in step*: the highest total of bytes allocated and not yet freed during one later
  step (gradients, activations, temporaries), starting from parameters without gradients.

Usage::

    python benchmarks/step_time.py                   # full run, about 5-6 minutes
    python benchmarks/step_time.py --quick           # smoke run, seconds; timings meaningless
    python benchmarks/step_time.py --out DIR         # write DIR/step_time.{md,json} and
                                                     # DIR/methods_table.md
    python benchmarks/step_time.py --cases digits_mlp
                                                     # one case only (``--case`` is the same)
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import math
import os
import platform
import random
import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.profiler import ProfilerActivity, profile

from bayesflat import samplers
from bayesflat.models import MLP, ConvNet32
from bayesflat.run.spec import ChainContext
from bayesflat.samplers import coupled_sigma, langevin_noise_scale
from bayesflat.samplers.base import fill_rademacher_
from bayesflat.target.torch import Posterior

RESULTS_DIR = Path(__file__).resolve().parent / "results"
BASELINE = "torch_sgd"
CLAIM_CASE, CLAIM_METHOD, CLAIM_BOUND = "convnet32", "fsgld", 1.03

# Step size small enough that the weights barely move over a run; samplers run at T = 1 with
# their defaults (fSGLD's coupled sigma included), so they do all their work.
LR = 1e-6
TEMPERATURE = 1.0

# Options that differ from a method's defaults. A cyclical sampler explores at T = 0 for the
# first 80% of every cycle by default; with exploration=0 every step is a sampling step, the
# costlier phase, and the one the method adds to its base sampler.
METHOD_OPTIONS: dict[str, dict[str, Any]] = {
    "csgld": {"exploration": 0.0},
    "csghmc": {"exploration": 0.0},
    "cfsgld": {"exploration": 0.0},
    # pSGLD's default preconditioner is estimated during the burn-in and then frozen: time the
    # frozen sampling phase, as for the cyclical samplers.
    "psgld": {"adapt_steps": 1},
    "fpsgld": {"adapt_steps": 1},
}

# The schedule the hooks are told about (burn-in 0, thin 1): long enough that no method's
# schedule ends within a run.
PLANNED_DRAWS = 100_000


@dataclass(frozen=True)
class Case:
    """One model and batch, and how long to time it."""

    name: str
    title: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    batch_size: int
    num_data: int
    methods: tuple[str, ...]
    min_rounds: int
    max_rounds: int
    budget_s: float
    steps_per_round: int
    warmup: int
    draw_rounds: tuple[int, int, float] | None = None
    """``(min_rounds, max_rounds, budget_s)`` of the comparison of ways to draw the noise
    (``compare_draws``), or ``None`` to leave it out."""


REFERENCES = ("floor_sgld", "naive_sgld", "floor_fsgld", "naive_fsgld")
# References from other libraries: timed when the library is installed, left out with a note
# otherwise.
POSTERIORS = "posteriors_sgld"
POSTERIORS_INSTALL = "pip install -c constraints.txt posteriors==0.1.3 (the bench extra)"
EXTERNAL = (POSTERIORS,)
REGISTERED = tuple(samplers.available())
CASE_NAMES = ("convnet32", "digits_mlp")

DESCRIPTIONS = {
    "torch_sgd": "torch.optim.SGD: zero_grad, forward, backward, step",
    "floor_sgld": "floor: SGD step + 1 normal draw of all P parameters",
    "naive_sgld": "reference: per-parameter Python loop SGLD (not bayesflat)",
    "floor_fsgld": "floor: SGD step + 2 normal draws of P + 1 copy of P",
    "naive_fsgld": "reference: per-parameter Python loop fSGLD (not bayesflat)",
    POSTERIORS: "reference: posteriors.sgmcmc.sgld, log_post = -mean NLL + log N(theta; 0, I) / N "
    "by functional_call, temperature = T/N; transform.update(state, (x, y))",
}


def cases(quick: bool) -> list[Case]:
    """The two benchmark cases; ``quick`` shrinks the CNN batch and the repetitions."""
    return [
        Case(
            name="convnet32",
            title="ConvNet32 (CNN for 3x32x32 images)",
            build=ConvNet32,
            input_shape=(3, 32, 32),
            batch_size=8 if quick else 128,
            num_data=50_000,
            methods=(BASELINE, *EXTERNAL, *REGISTERED),
            min_rounds=2 if quick else 8,
            max_rounds=2 if quick else 40,
            budget_s=0.0 if quick else 170.0,
            steps_per_round=1,
            warmup=1,
        ),
        Case(
            name="digits_mlp",
            title="digits MLP 64-128-128-10",
            build=MLP,
            input_shape=(64,),
            batch_size=64,
            num_data=1797,
            methods=(BASELINE, *REFERENCES, *EXTERNAL, *REGISTERED),
            min_rounds=2 if quick else 30,
            max_rounds=2 if quick else 200,
            budget_s=0.0 if quick else 45.0,
            steps_per_round=2 if quick else 20,
            warmup=2 if quick else 50,
            draw_rounds=(2, 2, 0.0) if quick else (30, 200, 20.0),
        ),
    ]


# -- reference implementations (not bayesflat) --------------------------------------------------


class NaiveLoopSampler(torch.optim.Optimizer):
    """Reference only: SGLD / fSGLD written as a plain per-parameter Python loop.

    Same update as bayesflat's samplers (``theta <- theta - lr g + sqrt(2 lr T / N) xi``, with
    ``g`` taken at ``theta + sigma eps`` when ``sigma > 0``), but one ``torch.randn`` and, for
    the backup, one ``clone`` per parameter tensor, every step.
    """

    def __init__(
        self,
        params: list[Tensor],
        *,
        lr: float,
        num_data: int,
        temperature: float,
        sigma: float,
        generator: torch.Generator,
    ) -> None:
        super().__init__(params, {"lr": lr})
        self.noise_std = langevin_noise_scale(lr, temperature, num_data)
        self.sigma = sigma
        self.generator = generator

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor]) -> Tensor:  # type: ignore[override]
        self.zero_grad(set_to_none=True)
        params = [p for group in self.param_groups for p in group["params"]]
        backups = []
        if self.sigma > 0:
            for p in params:
                backups.append(p.clone())
                p.add_(torch.randn(p.shape, generator=self.generator), alpha=self.sigma)
        with torch.enable_grad():
            loss = closure()
        if backups:
            for p, backup in zip(params, backups, strict=True):
                p.copy_(backup)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.add_(p.grad, alpha=-group["lr"])
                p.add_(torch.randn(p.shape, generator=self.generator), alpha=self.noise_std)
        return loss


def import_posteriors() -> Any | None:
    """The ``posteriors`` module, or ``None`` when it is not installed."""
    try:
        # Importing posteriors 0.1.3 with tensordict 0.15 warns once per state class about
        # shared tensor defaults, which SGLD never mutates (it builds a new state every step).
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            import posteriors
    except ImportError:
        return None
    return posteriors


def posteriors_log_posterior(
    model: nn.Module, num_data: int
) -> Callable[[dict[str, Tensor], tuple[Tensor, Tensor]], tuple[Tensor, Tensor]]:
    """The log posterior a posteriors user writes for ``model``, in posteriors' scaling.

    ``log_post(params, (x, y)) = -mean_{i in B} NLL_i + log N(params; 0, I) / num_data``
    (nats per example), with the logits as auxiliary output: minus the potential ``L_B`` of
    :class:`~bayesflat.target.torch.Posterior` with its default prior (Gaussian, scale 1), up
    to the constant ``P log(2 pi) / (2 num_data)`` of the normalised Gaussian density
    (``P`` parameters), so with the same gradient.

    Raises
    ------
    ModuleNotFoundError
        When ``posteriors`` is not installed.
    """
    posteriors = import_posteriors()
    if posteriors is None:
        raise ModuleNotFoundError(f"posteriors is not installed: {POSTERIORS_INSTALL}")

    def log_posterior(
        params: dict[str, Tensor], batch: tuple[Tensor, Tensor]
    ) -> tuple[Tensor, Tensor]:
        inputs, targets = batch
        logits = torch.func.functional_call(model, params, (inputs,))
        log_post = (
            -F.cross_entropy(logits, targets) + posteriors.diag_normal_log_prob(params) / num_data
        )
        return log_post, logits

    return log_posterior


# -- the methods --------------------------------------------------------------------------------


@dataclass
class Method:
    """A step function and its counters: the CPU seconds its steps spent inside forward +
    backward (``None`` where they cannot be timed apart from the step) and its
    forward/backward passes (closure calls) so far; the settings it runs at."""

    step: Callable[[], None]
    fwd_bwd_seconds: list[float] | None
    passes: list[int] = field(default_factory=lambda: [0])
    temperature: float = 0.0
    options: dict[str, Any] = field(default_factory=dict)


def method_temperature(name: str) -> float:
    """``T`` a method runs at: ``TEMPERATURE`` for samplers, 0 for optimisers and SGD."""
    if name in samplers.available():
        return TEMPERATURE if samplers.entry(name).is_sampler else 0.0
    return 0.0 if name == BASELINE else TEMPERATURE


def describe_method(name: str) -> str:
    """One line on what a method is (the registry summary for bayesflat methods)."""
    if name in DESCRIPTIONS:
        return DESCRIPTIONS[name]
    return f"bayesflat `{name}`: {samplers.entry(name).summary}"


def build_methods(
    case: Case, model: nn.Module, posterior: Posterior, x: Tensor, y: Tensor
) -> dict[str, Callable[[], Method]]:
    """For each method of ``case``, a factory of a fresh optimiser and its step function."""
    params = [p for p in model.parameters() if p.requires_grad]
    num_params = sum(p.numel() for p in params)
    sigma = coupled_sigma(TEMPERATURE, case.num_data)
    generator = torch.Generator().manual_seed(1)
    xi, eps, backup = (torch.empty(num_params) for _ in range(3))
    # torch.func cannot update BatchNorm running statistics inside its gradient transform; as
    # its documentation advises, posteriors runs on a copy whose BatchNorm layers track none
    # (in training mode they normalise by the batch statistics either way). One copy, made
    # here, so that the memory of a fresh posteriors sampler does not count it.
    functional_model = torch.func.replace_all_batch_norm_modules_(copy.deepcopy(model))

    def registered(name: str, seed: int) -> Method:
        temperature = method_temperature(name)
        options = METHOD_OPTIONS.get(name, {})
        opt = samplers.get(name)(
            params,
            lr=LR,
            num_data=case.num_data,
            temperature=temperature,
            generator=torch.Generator().manual_seed(seed),
            **options,
        )
        # The driver's order: bind_schedule (a burn-in of one step: pSGLD's preconditioner is
        # then frozen, as in its sampling phase), watch, begin_chain, then planned_steps
        # (which fixes a cyclical sampler's cycle length).
        opt.bind_schedule(1, PLANNED_DRAWS, 1)
        opt.watch(model)
        begin_chain = getattr(opt, "begin_chain", None)
        if callable(begin_chain):
            begin_chain(ChainContext(model, [(x, y)], 0, PLANNED_DRAWS, 1))
        opt.planned_steps(0, PLANNED_DRAWS, 1)
        method = sampler_step(opt)
        method.temperature, method.options = temperature, dict(options)
        return method

    def naive(sigma: float, seed: int) -> Method:
        opt = NaiveLoopSampler(
            params,
            lr=LR,
            num_data=case.num_data,
            temperature=TEMPERATURE,
            sigma=sigma,
            generator=torch.Generator().manual_seed(seed),
        )
        method = sampler_step(opt)
        method.temperature = TEMPERATURE
        return method

    def sgd_step(extra: Callable[[], None] | None = None) -> Method:
        opt = torch.optim.SGD(params, lr=LR, weight_decay=1.0 / case.num_data)
        clock, passes = [0.0], [0]

        def step() -> None:
            opt.zero_grad()
            start = time.thread_time()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            clock[0] += time.thread_time() - start
            passes[0] += 1
            opt.step()
            if extra is not None:
                extra()

        # A floor stands for a sampler at TEMPERATURE; the bare step is SGD's, at T = 0.
        return Method(step, clock, passes, temperature=0.0 if extra is None else TEMPERATURE)

    def sampler_step(opt: torch.optim.Optimizer) -> Method:
        clock, passes = [0.0], [0]

        def step() -> None:
            closure = posterior.closure(x, y, value=False)

            def timed() -> Tensor:
                start = time.thread_time()
                loss = closure()
                clock[0] += time.thread_time() - start
                passes[0] += 1
                return loss

            opt.step(timed)

        return Method(step, clock, passes)

    def posteriors_sgld() -> Method:
        posteriors = import_posteriors()
        log_posterior = posteriors_log_posterior(functional_model, case.num_data)
        passes = [0]

        def counted(
            params: dict[str, Tensor], batch: tuple[Tensor, Tensor]
        ) -> tuple[Tensor, Tensor]:
            passes[0] += 1
            return log_posterior(params, batch)

        transform = posteriors.sgmcmc.sgld.build(
            counted, lr=LR, temperature=TEMPERATURE / case.num_data
        )
        state = transform.init(dict(functional_model.named_parameters()))

        def step() -> None:
            nonlocal state
            state, _ = transform.update(state, (x, y))

        return Method(step, None, passes, temperature=TEMPERATURE)

    def draw_xi() -> None:
        xi.normal_(generator=generator)

    def draw_eps_backup_xi() -> None:
        eps.normal_(generator=generator)
        backup.copy_(eps)
        xi.normal_(generator=generator)

    makers: dict[str, Callable[[], Method]] = {
        BASELINE: lambda: sgd_step(),
        "floor_sgld": lambda: sgd_step(draw_xi),
        "naive_sgld": lambda: naive(0.0, 4),
        "floor_fsgld": lambda: sgd_step(draw_eps_backup_xi),
        "naive_fsgld": lambda: naive(sigma, 5),
        POSTERIORS: posteriors_sgld,
    }
    for index, name in enumerate(REGISTERED):
        makers[name] = lambda name=name, seed=10 + index: registered(name, seed)
    return {name: makers[name] for name in case.methods if name not in missing_references()}


def missing_references() -> dict[str, str]:
    """References from other libraries that cannot run here, each with why and the fix."""
    if import_posteriors() is None:
        return {POSTERIORS: f"posteriors is not installed ({POSTERIORS_INSTALL})"}
    return {}


# -- measurements -------------------------------------------------------------------------------


def time_rounds(
    methods: dict[str, Method],
    *,
    min_rounds: int,
    max_rounds: int,
    budget_s: float,
    steps_per_round: int,
    seed: int = 0,
) -> dict[str, dict[str, list[float]]]:
    """Per-step seconds and passes of each method, one value per round; order shuffled every
    round.

    Rounds go on until ``max_rounds``, or until ``budget_s`` seconds have passed and at least
    ``min_rounds`` are done. Returns ``{"cpu": ..., "wall": ..., "outside": ..., "passes":
    ...}``, each ``{method: [value per step, one per round]}``: CPU time of this thread (all
    the work runs on it with one torch thread; time spent descheduled by other processes is
    left out), wall-clock time, the CPU time spent outside forward + backward (for the methods
    whose forward + backward are timed apart), and the number of forward/backward passes.
    """
    order = list(methods)
    rng = random.Random(seed)
    times: dict[str, dict[str, list[float]]] = {
        kind: {name: [] for name in order} for kind in ("cpu", "wall", "passes")
    }
    times["outside"] = {n: [] for n in order if methods[n].fwd_bwd_seconds is not None}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    started = time.perf_counter()
    try:
        for done in range(max_rounds):
            if done >= min_rounds and time.perf_counter() - started > budget_s:
                break
            rng.shuffle(order)
            for name in order:
                method = methods[name]
                step, clock = method.step, method.fwd_bwd_seconds
                if clock is not None:
                    clock[0] = 0.0
                passes = method.passes[0]
                wall0, cpu0 = time.perf_counter(), time.thread_time()
                for _ in range(steps_per_round):
                    step()
                cpu = time.thread_time() - cpu0
                times["cpu"][name].append(cpu / steps_per_round)
                times["wall"][name].append((time.perf_counter() - wall0) / steps_per_round)
                if clock is not None:
                    times["outside"][name].append((cpu - clock[0]) / steps_per_round)
                times["passes"][name].append((method.passes[0] - passes) / steps_per_round)
            gc.collect()
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


def _allocation_trace(step: Callable[[], None]) -> tuple[int, int]:
    """``(peak, net)`` bytes of CPU allocations made during ``step``, from the profiler."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    current = peak = 0
    for event in events:
        current += event.nbytes()
        peak = max(peak, current)
    return peak, current


def measure_memory(make: Callable[[], Method], params: list[Tensor]) -> dict[str, float]:
    """Persistent workspace and in-step peak of a fresh optimiser (see the module docstring).

    The persistent bytes are traced from the construction on: some methods allocate their
    state there (SWAG its moments), others in their first step.
    """
    grad_bytes = sum(p.numel() * p.element_size() for p in params)
    made: list[Method] = []

    def build_and_step() -> None:
        made.append(make())
        made[0].step()

    # An optimiser of an earlier measurement that the collector freed inside a trace would
    # count as a negative allocation: no collection during the traces.
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for p in params:
            p.grad = None
        _, net_first = _allocation_trace(build_and_step)
        for p in params:
            p.grad = None
        peak, _ = _allocation_trace(made[0].step)
    finally:
        if gc_was_enabled:
            gc.enable()
    persistent = max(net_first - grad_bytes, 0)
    return {
        "persistent_bytes": persistent,
        "persistent_param_buffers": persistent / grad_bytes,
        "peak_step_bytes": peak,
    }


def _quartiles(values: list[float]) -> tuple[float, float, float]:
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def _summary(values: list[float], ratios: list[float]) -> dict[str, float]:
    q1, med, q3 = _quartiles(values)
    r1, rmed, r3 = _quartiles(ratios)
    return {
        "median_ms": med * 1e3,
        "q1_ms": q1 * 1e3,
        "q3_ms": q3 * 1e3,
        "ratio_median": rmed,
        "ratio_q1": r1,
        "ratio_q3": r3,
    }


def summarise(times: dict[str, dict[str, list[float]]], baseline: str = BASELINE) -> dict:
    """Medians and IQRs per method, in ms, with the per-round ratios to ``baseline``.

    ``cpu`` / ``wall``: step time and ``time / baseline time`` in the same round.
    ``outside`` (``None`` for a method missing from ``times["outside"]``, whose forward +
    backward were not timed apart): CPU time outside forward + backward, and the ratio it implies,
    ``1 + ((k - 1) (b - bo) + o - bo) / b`` in the same round, with ``b`` the baseline's step,
    ``bo`` its time outside forward + backward, ``o`` the method's and ``k`` the method's
    passes per step: the method's step with each of its ``k`` forward/backward passes priced
    at the baseline's one, which takes the noisiest part (the forward/backward, the same for
    every method on the same batch) out of the comparison.
    """
    out: dict[str, dict] = {}
    base_cpu, base_outside = times["cpu"][baseline], times["outside"][baseline]
    base_wall = times["wall"][baseline]
    for name in times["cpu"]:
        cpu, wall, passes = times["cpu"][name], times["wall"][name], times["passes"][name]
        outside = times["outside"].get(name)
        out[name] = {
            "cpu": _summary(cpu, [v / b for v, b in zip(cpu, base_cpu, strict=True)]),
            "wall": _summary(wall, [v / b for v, b in zip(wall, base_wall, strict=True)]),
            "outside": None
            if outside is None
            else _summary(
                outside,
                [
                    1 + ((k - 1) * (b - bo) + o - bo) / b
                    for o, k, bo, b in zip(outside, passes, base_outside, base_cpu, strict=True)
                ],
            ),
            "passes_per_step": statistics.fmean(passes),
        }
    return out


# -- where the floor comes from: ways to draw the noise -----------------------------------------

DRAW_BASELINE = "torch_normal"
NUMPY_BIT_GENERATORS = ("SFC64", "PCG64", "Philox", "MT19937")
KS_LEVEL = 0.001
"""Level of the Kolmogorov-Smirnov check of each normal draw."""


@dataclass(frozen=True)
class Draw:
    """One way of filling a float32 buffer of ``P`` values with noise.

    ``law`` is what the values follow: ``"normal"`` (a standard normal draw, what a sampler
    needs), ``"sign"`` (independent signs, the Rademacher perturbation) or ``"bits"`` (uniform
    random numbers only, the first half of any transform of them: a lower bound, not a draw a
    sampler can use).
    """

    description: str
    law: str
    fill: Callable[[], Tensor]


def draw_candidates(num: int, seed: int = 2) -> dict[str, Draw]:
    """The ways of drawing ``num`` noise values that ``compare_draws`` times.

    Each fills its own preallocated buffers from its own generator seeded with ``seed``, and
    returns the float32 tensor of the ``num`` values.
    """
    torch_gen = torch.Generator().manual_seed(seed)
    out = torch.empty(num)
    half = -(-num // 2)
    words = torch.empty(half, dtype=torch.int64)
    low24 = torch.empty(2 * half, dtype=torch.int32)
    u1, angle, radius = (torch.empty(half) for _ in range(3))
    pairs = torch.empty(2 * half)
    uniform = torch.empty(num)
    wide = torch.empty(num, dtype=torch.float64)
    narrow = torch.empty(num, dtype=torch.bfloat16)
    as_numpy = out.numpy()

    def torch_normal() -> Tensor:
        return out.normal_(generator=torch_gen)

    def torch_uniform() -> Tensor:
        return out.uniform_(generator=torch_gen)

    def int64_words() -> Tensor:
        words.random_(-(2**63), None, generator=torch_gen)
        return words

    def box_muller() -> Tensor:
        # 32 random bits per value from int64 words (the cheapest bits torch gives), the low
        # 24 of each as a uniform: u1 in (0, 1], angle in [0, 2 pi); then
        # (r cos angle, r sin angle) with r = sqrt(-2 log u1) are two independent normals.
        words.random_(-(2**63), None, generator=torch_gen)
        torch.bitwise_and(words.view(torch.int32), 0xFFFFFF, out=low24)
        torch.add(low24[:half], 1, out=u1).mul_(2.0**-24)
        torch.mul(low24[half:], 2.0 * math.pi * 2.0**-24, out=angle)
        torch.log(u1, out=radius).mul_(-2.0).sqrt_()
        torch.cos(angle, out=pairs[:half]).mul_(radius)
        torch.sin(angle, out=pairs[half:]).mul_(radius)
        return pairs[:num]

    def inverse_cdf() -> Tensor:
        uniform.uniform_(2.0**-25, 1.0, generator=torch_gen)
        return torch.special.ndtri(uniform, out=out)

    def via(buffer: Tensor) -> Callable[[], Tensor]:
        def fill() -> Tensor:
            buffer.normal_(generator=torch_gen)
            return out.copy_(buffer)

        return fill

    def numpy_normal(name: str) -> Callable[[], Tensor]:
        gen = np.random.Generator(getattr(np.random, name)(seed))

        def fill() -> Tensor:
            gen.standard_normal(out=as_numpy, dtype=np.float32)
            return out

        return fill

    def signs() -> Tensor:
        fill_rademacher_(out, torch_gen)
        return out

    def bernoulli_signs() -> Tensor:
        return out.bernoulli_(0.5, generator=torch_gen).mul_(2.0).sub_(1.0)

    candidates = {
        DRAW_BASELINE: Draw(
            "torch `normal_` into the flat buffer (what bayesflat draws)", "normal", torch_normal
        ),
        "float64_normal": Draw(
            "torch `normal_` in float64, copied to float32", "normal", via(wide)
        ),
        "bfloat16_normal": Draw(
            "torch `normal_` in bfloat16, copied to float32", "normal", via(narrow)
        ),
        "box_muller_bits": Draw(
            "Box-Muller in torch ops from int64 `random_` bits", "normal", box_muller
        ),
        "inverse_cdf": Draw("torch `uniform_`, then `torch.special.ndtri`", "normal", inverse_cdf),
        **{
            f"numpy_{name.lower()}": Draw(
                f"numpy `Generator({name}).standard_normal(out=..., dtype=float32)` into the "
                "buffer (ziggurat)",
                "normal",
                numpy_normal(name),
            )
            for name in NUMPY_BIT_GENERATORS
        },
        "rademacher": Draw("bayesflat's signs: 63 from each int64 `random_` word", "sign", signs),
        "bernoulli_signs": Draw("`bernoulli_(0.5)`, then 2 b - 1", "sign", bernoulli_signs),
        "torch_uniform_bits": Draw(
            "torch `uniform_` alone: one generator call per value", "bits", torch_uniform
        ),
        "int64_bits": Draw(
            "torch int64 `random_` of P/2 words alone: 32 bits per value", "bits", int64_words
        ),
    }
    return candidates


def check_draw(values: Tensor, law: str) -> dict[str, Any]:
    """Whether ``values`` (one fill) look like the law they are meant to follow.

    For ``"normal"``: the mean within 4 standard errors of 0 (``4 / sqrt(n)``), the variance
    within 4 of its standard errors of 1 (``4 sqrt(2 / n)``), and the Kolmogorov-Smirnov
    distance to the standard normal CDF (``scipy.stats.kstest``) at most its critical value
    at level ``KS_LEVEL`` (``scipy.stats.kstwo``, about ``1.949 / sqrt(n)``).
    For ``"sign"``: every value is -1 or +1 and the mean is within ``4 / sqrt(n)`` of 0.
    ``"bits"`` are not checked (``None``).
    """
    if law == "bits":
        return {"passed": None}
    x = values.detach().double().flatten()
    n = x.numel()
    mean = float(x.mean())
    result: dict[str, Any] = {"mean": mean, "mean_bound": 4 / math.sqrt(n)}
    passed = abs(mean) <= result["mean_bound"]
    if law == "sign":
        result["signs_only"] = bool(((x == 1) | (x == -1)).all())
        result["passed"] = passed and result["signs_only"]
        return result
    from scipy import stats

    variance = float(x.var())
    distance = float(stats.kstest(x.numpy(), "norm").statistic)
    result.update(
        variance=variance,
        variance_bound=4 * math.sqrt(2 / n),
        ks_distance=distance,
        ks_bound=float(stats.kstwo.ppf(1 - KS_LEVEL, n)),
    )
    result["passed"] = (
        passed and abs(variance - 1) <= result["variance_bound"] and distance <= result["ks_bound"]
    )
    return result


def compare_draws(
    num: int, *, min_rounds: int, max_rounds: int, budget_s: float, steps_per_round: int
) -> dict[str, Any]:
    """Time every way of drawing ``num`` noise values in interleaved rounds, against torch's
    ``normal_`` (paired per round), and check each draw's law on one fill after timing."""
    candidates = draw_candidates(num)
    methods = {name: Method(draw.fill, None) for name, draw in candidates.items()}
    for method in methods.values():
        method.step()
    times = time_rounds(
        methods,
        min_rounds=min_rounds,
        max_rounds=max_rounds,
        budget_s=budget_s,
        steps_per_round=steps_per_round,
    )["cpu"]
    base = times[DRAW_BASELINE]
    return {
        "num_values": num,
        "rounds": len(base),
        "steps_per_round": steps_per_round,
        "draws": {
            name: {
                "description": draw.description,
                "law": draw.law,
                "cpu": _summary(
                    times[name], [t / b for t, b in zip(times[name], base, strict=True)]
                ),
                "check": check_draw(draw.fill(), draw.law),
            }
            for name, draw in candidates.items()
        },
        "per_round_seconds": times,
    }


def run_case(case: Case) -> dict[str, Any]:
    """Time and measure every method of ``case``; raw per-round times included.

    A reference whose library is not installed is left out and listed under ``skipped``
    with the reason.
    """
    torch.manual_seed(0)
    model = case.build()
    x = torch.randn(case.batch_size, *case.input_shape)
    y = torch.randint(0, 10, (case.batch_size,))
    posterior = Posterior(model, num_data=case.num_data, temperature=TEMPERATURE)
    params = [p for p in model.parameters() if p.requires_grad]
    makers = build_methods(case, model, posterior, x, y)

    methods = {name: make() for name, make in makers.items()}
    for method in methods.values():
        for _ in range(case.warmup):
            method.step()
    started = time.perf_counter()
    times = time_rounds(
        methods,
        min_rounds=case.min_rounds,
        max_rounds=case.max_rounds,
        budget_s=case.budget_s,
        steps_per_round=case.steps_per_round,
    )
    timing_seconds = time.perf_counter() - started
    memory = {name: measure_memory(make, params) for name, make in makers.items()}
    summary = summarise(times)
    for name, method in methods.items():
        summary[name].update(
            description=describe_method(name),
            kind=_kind(name),
            temperature=method.temperature,
            options=method.options,
            **memory[name],
        )
    passes = times.pop("passes")
    draws = None
    if case.draw_rounds is not None:
        low, high, budget = case.draw_rounds
        draws = compare_draws(
            sum(p.numel() for p in params),
            min_rounds=low,
            max_rounds=high,
            budget_s=budget,
            steps_per_round=case.steps_per_round,
        )
    return {
        "title": case.title,
        "batch_size": case.batch_size,
        "input_shape": list(case.input_shape),
        "num_data": case.num_data,
        "num_params": sum(p.numel() for p in params),
        "num_param_tensors": len(params),
        "fsgld_sigma": coupled_sigma(TEMPERATURE, case.num_data),
        "rounds": len(times["cpu"][BASELINE]),
        "steps_per_round": case.steps_per_round,
        "warmup_steps": case.warmup,
        "timing_seconds": timing_seconds,
        "methods": summary,
        "per_round_seconds": times,
        "per_round_passes": passes,
        "skipped": {n: why for n, why in missing_references().items() if n in case.methods},
        "noise_draws": draws,
    }


def _kind(name: str) -> str:
    if name == BASELINE:
        return "baseline"
    if name in REFERENCES or name in EXTERNAL:
        return "reference"
    return "sampler" if samplers.entry(name).is_sampler else "optimiser"


def machine_info() -> dict[str, Any]:
    """CPU model, core count, library versions, thread count and the current load."""
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "posteriors": getattr(import_posteriors(), "__version__", None),
        "torch_threads": torch.get_num_threads(),
        "date_utc": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


# -- report -------------------------------------------------------------------------------------


def _iqr(s: dict[str, float]) -> str:
    return f"{s['ratio_q1']:.3f}-{s['ratio_q3']:.3f}"


def _median_interval(s: dict[str, float], rounds: int) -> tuple[float, float]:
    """About 95% interval of the median ratio, ``median +- 1.58 IQR / sqrt(n)`` (the notch of
    a box plot; McGill, Tukey, Larsen 1978)."""
    half = 1.58 * (s["ratio_q3"] - s["ratio_q1"]) / rounds**0.5
    return s["ratio_median"] - half, s["ratio_median"] + half


def _verdict(s: dict[str, float], rounds: int, bound: float = CLAIM_BOUND) -> str:
    low, high = _median_interval(s, rounds)
    interval = f"median interval {low:.3f}-{high:.3f}"
    if high <= bound:
        return f"{interval}: holds"
    if low > bound:
        return f"{interval}: does NOT hold"
    return f"{interval}: not resolved at this number of rounds"


FLOORS = {"sgld": "floor_sgld", "fsgld": "floor_fsgld"}
"""Each sampler and its floor row: the SGD step plus the noise that sampler draws."""


def _floor_lines(case: dict[str, Any]) -> list[str]:
    """Each sampler over its floor, paired per round (CPU time), with the check <= 1."""
    cpu = case["per_round_seconds"]["cpu"]
    lines = []
    for method, floor in FLOORS.items():
        if method not in cpu or floor not in cpu:
            continue
        r1, rmed, r3 = _quartiles([m / f for m, f in zip(cpu[method], cpu[floor], strict=True)])
        s = {"ratio_median": rmed, "ratio_q1": r1, "ratio_q3": r3}
        lines.append(
            f"- `{method}` / `{floor}`, paired per round: {rmed:.3f} (IQR {_iqr(s)}); at or below "
            f"its floor: {_verdict(s, case['rounds'], bound=1.0)}."
        )
    return [*lines, ""] if lines else []


def _draw_lines(case: dict[str, Any]) -> list[str]:
    """The table of ways to draw the noise, with their checks (empty if not run)."""
    found = case.get("noise_draws")
    if not found:
        return []
    sgd_ms = case["methods"][BASELINE]["cpu"]["median_ms"]
    lines = [
        f"### Drawing the noise: {found['num_values']:,} values",
        "",
        "Each way fills preallocated buffers, from its own generator; "
        f"{found['rounds']} interleaved rounds x {_count(found['steps_per_round'], 'fill')}, "
        "one thread, CPU time. Ratio: median over rounds of the fill time over torch "
        "`normal_`'s in the same round. Share of a step: median fill time over the median "
        f"`torch_sgd` step above ({sgd_ms * 1e3:.0f} us). Checks, on one fill after timing: "
        "for a normal draw the mean within 4 standard errors of 0, the variance within 4 of "
        "1, the Kolmogorov-Smirnov distance under its 0.1% critical value; for signs, only "
        "+-1 and the mean. *Bits* rows make uniform random numbers only, the first half of "
        "any normal draw built on them: bounds, not draws a sampler can use.",
        "",
        "| draw | law | what | us per fill (IQR) | ratio to `normal_` (IQR) "
        "| share of an SGD step | checks |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    usable = []
    for name, d in found["draws"].items():
        c, check = d["cpu"], d["check"]
        if check["passed"] is None:
            verdict = "n/a (bits)"
        elif d["law"] == "sign":
            verdict = f"{'pass' if check['passed'] else 'FAIL'}: mean {check['mean']:+.4f}"
        else:
            verdict = (
                f"{'pass' if check['passed'] else 'FAIL'}: mean {check['mean']:+.4f} "
                f"(bound {check['mean_bound']:.4f}), variance {check['variance']:.4f} "
                f"(+-{check['variance_bound']:.4f}), KS {check['ks_distance']:.4f} "
                f"(< {check['ks_bound']:.4f})"
            )
        if d["law"] == "normal" and check["passed"]:
            usable.append((c["median_ms"], name))
        lines.append(
            f"| `{name}` | {d['law']} | {_cell(d['description'])} "
            f"| {c['median_ms'] * 1e3:.1f} ({c['q1_ms'] * 1e3:.1f}-{c['q3_ms'] * 1e3:.1f}) "
            f"| {c['ratio_median']:.2f} ({c['ratio_q1']:.2f}-{c['ratio_q3']:.2f}) "
            f"| {c['median_ms'] / sgd_ms:.2f} | {verdict} |"
        )
    lines.append("")
    if usable:
        best_ms, best = min(usable)
        lines += [
            f"Cheapest normal draw that passes its checks: `{best}`, {best_ms * 1e3:.1f} us, "
            f"{best_ms / sgd_ms:.2f} of an SGD step. A sampler that adds this draw to a step "
            f"costs at least 1 + {best_ms / sgd_ms:.2f} SGD steps unless the rest of its step "
            "is cheaper than SGD's.",
            "",
        ]
    return lines


def _fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB"


def _ratio_cell(s: dict[str, float]) -> str:
    return f"{s['ratio_median']:.2f} ({s['ratio_q1']:.2f}-{s['ratio_q3']:.2f})"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _cell(text: str) -> str:
    """``text`` safe inside a Markdown table cell (the registry summaries contain ``||g||``)."""
    return text.replace("|", "\\|")


def _settings(s: dict[str, Any]) -> str:
    options = "".join(f", {k}={v!r}" for k, v in s["options"].items())
    return f"T={s['temperature']:g}{options}"


def render_markdown(results: dict[str, Any]) -> str:
    """The results as a Markdown page (tables per case, machine, check of the claim)."""
    m = results["machine"]
    load = " -> ".join(
        f"{a[0]:.2f}" for a in (m["load_average_start"], m["load_average_end"]) if a is not None
    )
    lines = [
        "# Step time and memory: every bayesflat method vs torch.optim.SGD",
        "",
        f"Written by `python benchmarks/step_time.py{' --quick' if results['quick'] else ''}` "
        f"on {m['date_utc']} in {results['wall_seconds']:.0f} s.",
        "",
        f"- Machine: {m['cpu']}, {m['logical_cpus']} logical CPUs, {m['platform']}",
        f"- Python {m['python']}, torch {m['torch']}, "
        f"posteriors {m.get('posteriors') or 'not installed'}, "
        f"**{m['torch_threads']} torch thread**",
        f"- 1-minute load average at start -> end: {load} (other processes share the machine: "
        "that is why methods are interleaved and ratios are paired per round)",
        f"- lr = {LR:g}; samplers at T = {TEMPERATURE:g}, optimisers at T = 0, each with its "
        "defaults (fSGLD: sigma = (T/N)^((1+eta)/4), eta = 0.1, one Gaussian perturbation per "
        "step) except the cyclical samplers, timed in their sampling phase (exploration=0); "
        "Posterior with a Gaussian prior of scale 1",
        "",
    ]
    if results["quick"]:
        lines += ["**Quick smoke run: the numbers below are not measurements.**", ""]
    for name, case in results["cases"].items():
        lines += [
            f"## {case['title']}: `{name}`",
            "",
            f"Batch {case['batch_size']} x {'x'.join(map(str, case['input_shape']))}, "
            f"N = {case['num_data']}, {case['num_params']:,} parameters in "
            f"{case['num_param_tensors']} tensors, fSGLD sigma = {case['fsgld_sigma']:.4f}. "
            f"{case['rounds']} rounds x {_count(case['steps_per_round'], 'step')} per method, "
            f"after {_count(case['warmup_steps'], 'warm-up step')}; timing took "
            f"{case['timing_seconds']:.0f} s.",
            "",
            "| method | settings | what | passes/step | CPU ms/step (IQR) "
            "| **ratio to SGD** (IQR) | outside fwd/bwd, ms | ratio, fwd/bwd at SGD's (IQR) "
            "| wall ratio (IQR) | persistent extra | peak in step |",
            "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for method, s in case["methods"].items():
            c, o, w = s["cpu"], s["outside"], s["wall"]
            outside = (
                "n/a | n/a"
                if o is None
                else f"{o['median_ms']:.3f} | {o['ratio_median']:.3f} ({_iqr(o)})"
            )
            lines.append(
                f"| `{method}` | {_settings(s)} | {_cell(s['description'])} "
                f"| {s['passes_per_step']:g} "
                f"| {c['median_ms']:.3f} ({c['q1_ms']:.3f}-{c['q3_ms']:.3f}) "
                f"| **{c['ratio_median']:.3f}** ({_iqr(c)}) "
                f"| {outside} "
                f"| {w['ratio_median']:.3f} ({_iqr(w)}) "
                f"| {s['persistent_param_buffers']:.2f} x params "
                f"({_fmt_bytes(s['persistent_bytes'])}) | {_fmt_bytes(s['peak_step_bytes'])} |"
            )
        lines.append("")
        for method, why in case.get("skipped", {}).items():
            lines += [f"Not timed: `{method}`, {why}.", ""]
        if name == CLAIM_CASE and CLAIM_METHOD in case["methods"]:
            c, o = (case["methods"][CLAIM_METHOD][k] for k in ("cpu", "outside"))
            lines += [
                f"Claim fSGLD / SGD <= {CLAIM_BOUND}: whole steps {c['ratio_median']:.3f} "
                f"(IQR {_iqr(c)}; {_verdict(c, case['rounds'])}); with the forward/backward "
                f"at SGD's {o['ratio_median']:.3f} (IQR {_iqr(o)}; "
                f"{_verdict(o, case['rounds'])}).",
                "",
            ]
        lines += _floor_lines(case)
        lines += _draw_lines(case)
    lines += [
        "Passes/step: forward/backward passes per step (closure calls), mean over the timed "
        "rounds. CPU ms/step: CPU time of the benchmark thread per step (all the work runs on "
        "it), median over rounds. Ratio to SGD: median over rounds of (method time / "
        "torch.optim.SGD time in the same round); IQR: interquartile range over rounds. "
        "Outside fwd/bwd: CPU time of a step spent outside its forward and backward passes "
        "(zeroing, noise, perturbation, update, Python). The ratio next to it prices each of "
        "the method's k passes at SGD's forward/backward in the same round, "
        "1 + ((k - 1) (SGD step - SGD outside) + outside - SGD outside) / SGD step: the same "
        "ratio without the noise of the forward/backward that all methods share (n/a for "
        "`posteriors_sgld`, whose forward/backward run inside `torch.func.grad_and_value` in "
        "its update and are not timed apart). Wall ratio: "
        "from wall-clock time, which also counts time the process waited for a CPU. "
        "Persistent extra: workspace and state the optimiser keeps between steps (allocated "
        "while it is built and makes its first step), in parameter-sized buffers. Peak in "
        "step: highest total of CPU allocations alive during one step (gradients, "
        "activations, temporaries), from torch.profiler. See benchmarks/README.md.",
        "",
    ]
    return "\n".join(lines)


def render_methods_table(results: dict[str, Any]) -> str:
    """One row per bayesflat method: passes, ratio to SGD per case and persistent buffers."""
    case_results = results["cases"]
    names = [n for case in case_results.values() for n in case["methods"]]
    names = [n for n in dict.fromkeys(names) if n in REGISTERED]
    titles = {"convnet32": "CNN", "digits_mlp": "MLP"}
    shown = [c for c in CASE_NAMES if c in case_results]
    setup = "; ".join(
        f"{titles[c]}: `{c}`, batch {case_results[c]['batch_size']} x "
        f"{'x'.join(map(str, case_results[c]['input_shape']))}, "
        f"{case_results[c]['rounds']} rounds x {_count(case_results[c]['steps_per_round'], 'step')}"
        for c in shown
    )
    lines = [
        "Step time of every bayesflat method relative to `torch.optim.SGD` on the same model and "
        "minibatch, one CPU thread: median over interleaved rounds of the per-round ratio, "
        f"with its interquartile range ({setup}). Passes/step: forward/backward passes per "
        "step. Extra buffers: parameter-sized buffers of workspace and state the method keeps "
        "between steps (`torch.optim.SGD`: none). Samplers at T = 1, optimisers at T = 0, "
        "registry defaults; cyclical samplers in their sampling phase. Measured by "
        f"`benchmarks/step_time.py` on {results['machine']['date_utc']}; details, and a "
        "sharper ratio for the CNN with the shared forward/backward priced at SGD's, in "
        "`benchmarks/results/step_time.md`.",
        "",
    ]
    if results["quick"]:
        lines += ["**Quick smoke run: the numbers below are not measurements.**", ""]
    header = "| method | kind | passes/step |"
    rule = "|---|---|---:|"
    for c in shown:
        header += f" {titles[c]} ratio to SGD (IQR) |"
        rule += "---:|"
    lines += [header + " extra buffers |", rule + "---:|"]
    for name in names:
        row = next(
            case_results[c]["methods"][name] for c in shown if name in case_results[c]["methods"]
        )
        cells = [
            _ratio_cell(case_results[c]["methods"][name]["cpu"])
            if name in case_results[c]["methods"]
            else "-"
            for c in shown
        ]
        lines.append(
            f"| `{name}` | {row['kind']} | {row['passes_per_step']:g} | "
            + " | ".join(cells)
            + f" | {round(row['persistent_param_buffers'], 2):g} |"
        )
    lines.append("")
    return "\n".join(lines)


def run(
    out_dir: str | Path = RESULTS_DIR,
    *,
    quick: bool = False,
    case_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Run the cases on one thread; write ``step_time.md``, ``step_time.json`` and
    ``methods_table.md`` to ``out_dir``.

    ``case_names`` picks cases (default: all of ``CASE_NAMES``). Returns the results
    dictionary that was written as JSON.
    """
    chosen = cases(quick)
    if case_names is not None:
        unknown = sorted(set(case_names) - set(CASE_NAMES))
        if unknown or not case_names:
            raise ValueError(
                f"case_names must name cases among {CASE_NAMES}, got {list(case_names)!r}"
            )
        chosen = [c for c in chosen if c.name in case_names]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    started = time.perf_counter()
    try:
        machine = machine_info()
        results_cases = {case.name: run_case(case) for case in chosen}
    finally:
        torch.set_num_threads(threads)
    machine["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    results = {
        "quick": quick,
        "wall_seconds": time.perf_counter() - started,
        "machine": machine,
        "cases": results_cases,
    }
    (out_dir / "step_time.json").write_text(json.dumps(results, indent=1) + "\n")
    (out_dir / "step_time.md").write_text(render_markdown(results))
    (out_dir / "methods_table.md").write_text(render_methods_table(results))
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: few tiny repetitions")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR, help="output folder")
    parser.add_argument(
        "--cases",
        "--case",
        dest="cases",
        action="extend",
        nargs="+",
        choices=CASE_NAMES,
        metavar="CASE",
        help=f"run only these cases, among {', '.join(CASE_NAMES)} (repeatable; default: all)",
    )
    args = parser.parse_args(argv)
    results = run(args.out, quick=args.quick, case_names=args.cases)
    print(render_markdown(results))
    print(render_methods_table(results))


if __name__ == "__main__":
    main()
