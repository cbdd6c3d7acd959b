"""One chain: the loop, and what a kept draw records.

:func:`run_chain` is a pure function of ``(spec, chain, state)``: its randomness comes only
from :func:`~bayesflat.run.spec.chain_seeds` of the run's seed and the chain's global index,
so the chain is the same in any process, and a chain continued from a
:class:`~bayesflat.run.checkpoint.ChainState` is identical, array for array, to one that never
stopped.

Sampler hooks
-------------
A sampler may take part in what is recorded (trajectory methods do):

``begin_chain(context)``
    Called once per chain before its first step (also when a chain resumes, before its state
    is restored) with a :class:`~bayesflat.run.spec.ChainContext`.
``recorded_state()``
    A context manager entered around every kept draw: inside it the module holds the state to
    record (e.g. the SWA average); on exit the iterate is restored.
``chain_draws(count)``
    An iterator; when defined, the kept points of the step loop record nothing and, after the
    chain's last step, each of the ``count`` states it yields (the module holds the draw; it
    yields a dict of extra statistics) is recorded as one draw. For such draws ``potential`` is
    evaluated on the next training minibatch in eval mode.

BatchNorm
---------
The engine watches every chain's module (:meth:`~bayesflat.samplers.base.Sampler.watch`), so
gradient estimators that evaluate away from ``theta`` (fSGLD, RWP, NSO, SAM's second pass)
leave the running statistics alone. For those samplers the statistics of every kept draw are
recomputed at its weights from one pass over the training split
(:func:`torch.optim.swa_utils.update_bn`) before it is recorded; the chain itself never reads
them (training mode normalises with batch statistics), so this changes no draw's weights.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.optim.swa_utils import update_bn

from bayesflat.predictive import softmax
from bayesflat.run.checkpoint import ChainState, snapshot
from bayesflat.run.spec import ChainContext, RunSpec, chain_seeds, make_sampler
from bayesflat.run.stream import MinibatchStream

__all__ = ["ChainFailure", "ChainStopped", "preflight", "run_chain"]

Record = dict[str, dict[str, np.ndarray]]
"""One kept draw: group -> variable -> array without the (chain, draw) dimensions."""

ProgressFn = Callable[[int, int, int, int, float], None]
"""``progress(chain, step, planned, kept, potential)``."""


class ChainFailure(FloatingPointError):
    """A chain stopped on a non-finite value or a sampler that could not keep its draws.

    The draws kept before the failure have been written to the sink.
    """

    def __init__(self, message: str, *, chain: int, step: int) -> None:
        super().__init__(message)
        self.chain = chain
        self.step = step


class ChainStopped(Exception):
    """A chain stopped because ``should_stop()`` said so (an interrupt or another failure)."""

    def __init__(self, chain: int, step: int) -> None:
        super().__init__(f"chain {chain} stopped at step {step}")
        self.chain = chain
        self.step = step


@dataclass
class Computed:
    """What a caller already evaluated for one chain's draw (``None``: compute it).

    ``outputs`` maps each evaluation set's name to the model's outputs on it, in order;
    ``train_outputs`` are the outputs on the training points of the ``log_likelihood`` group;
    ``functionals`` the ``posterior`` functionals of the weights (``weight_norm``,
    ``projection``). For a categorical likelihood, ``log_probs`` and ``train_log_probs`` are
    ``log_softmax`` of those outputs over the classes, whose entry at the label is the
    pointwise log-likelihood ``log p(y_i | x_i)``; stored probabilities always come from
    :func:`bayesflat.predictive.softmax` of the outputs.
    """

    outputs: dict[str, Tensor] | None = None
    train_outputs: Tensor | None = None
    functionals: dict[str, np.ndarray] | None = None
    log_probs: dict[str, Tensor] | None = None
    train_log_probs: Tensor | None = None


@dataclass
class _Recorder:
    """Turns the chain's current state into a :data:`Record`."""

    spec: RunSpec
    target: Any
    sampler: Any
    device: torch.device
    loo_x: Any
    loo_y: Any
    directions: list[list[Tensor]] | None

    def record(
        self,
        step: int,
        extra: dict[str, Any],
        chain: int,
        draw: int,
        computed: Computed | None = None,
    ) -> Record:
        """The draw at the module's current weights.

        ``computed`` holds what a caller evaluated already for this chain (the vectorised
        executor evaluates every chain in one batched pass); the rest is computed here.
        """
        spec, target, module = self.spec, self.target, self.target.module
        computed = computed or Computed()
        stats = self.sampler.stats()
        potential = stats.pop("lp")
        if not math.isfinite(stats["grad_norm"]):
            raise ChainFailure(
                f"non-finite gradient norm at chain {chain}, step {step}", chain=chain, step=step
            )
        stats = {"potential": potential, **stats, **extra}
        stats["lp"] = -spec.num_data * stats["potential"]
        stats["step"] = step
        for name, fn in spec.stats_fns.items():
            stats[name] = _statistic(name, fn, module, self.sampler, chain, draw)
        out: Record = {"sample_stats": {k: np.asarray(v, np.float64) for k, v in stats.items()}}
        posterior = {k: _host(v) for k, v in target.posterior_variables().items()}
        if spec.target.kind == "module":
            posterior.update(
                computed.functionals if computed.functionals is not None
                else self._functionals(module)
            )  # fmt: skip
            out["weights"] = self._weights(module)
        out["posterior"] = posterior
        with _eval_mode(module), torch.no_grad():
            out.update(self._predictions(chain, draw, computed))
        # float 0/1 through the sinks; the trace schema stores it as bool
        out["sample_stats"]["diverging"] = np.float64(bool(self._diverging(stats, out)))
        return {group: data for group, data in out.items() if data}

    def _diverging(self, stats: dict[str, Any], out: Record) -> list[str]:
        """Reasons the draw diverges (:mod:`bayesflat.diagnostics.divergence`)."""
        from bayesflat.diagnostics.divergence import diverging_reasons

        target = self.target
        rms: dict[str, float] = {}
        scales: dict[str, float] = {}
        scale_for = getattr(getattr(target, "prior", None), "scale_for", None)
        if self.spec.target.kind == "module" and scale_for is not None:
            for name, p in target.module.named_parameters():
                if p.requires_grad and p.numel():
                    rms[name] = float(torch.linalg.vector_norm(p.detach())) / math.sqrt(p.numel())
                    scales[name] = float(scale_for(name))
        train_ll = out.get("log_likelihood", {}).get("train")
        labels = None
        if train_ll is not None and getattr(target, "categorical", False):
            labels = self.loo_y.detach().cpu().numpy()
        return diverging_reasons(
            potential=float(stats["potential"]), weight_rms=rms, prior_scales=scales,
            train_log_likelihood=train_ll if labels is not None else None, train_labels=labels,
        )  # fmt: skip

    def _weights(self, module: nn.Module) -> dict[str, np.ndarray]:
        store = self.spec.store_weights
        if store is False:
            return {}
        state = module.state_dict()
        names = [k for k, v in state.items() if v.is_floating_point()] if store is True else store
        return {k: state[k].detach().to("cpu", torch.float32, copy=True).numpy() for k in names}

    def _functionals(self, module: nn.Module) -> dict[str, np.ndarray]:
        params = [p.detach() for p in module.parameters() if p.requires_grad]
        if not params:
            return {}
        norms = torch.stack(torch._foreach_norm(params)).float().cpu().numpy()
        out = {"weight_norm": norms}
        if self.directions is not None:
            out["projection"] = np.asarray(
                [
                    float(
                        sum(
                            torch.vdot(d.flatten(), p.flatten())
                            for d, p in zip(ds, params, strict=True)
                        )
                    )
                    for ds in self.directions
                ]
            )
        return out

    def _predictions(self, chain: int, draw: int, computed: Computed) -> Record:
        spec, target = self.spec, self.target
        out: Record = {"predictions": {}, "heldout_log_likelihood": {}, "log_likelihood": {}}
        for s in spec.eval_sets:
            if computed.outputs is not None:
                outputs = computed.outputs[s.name]
            else:
                outputs = torch.cat(
                    [target.predict(xb) for xb in s.batches(spec.eval_batch_size, self.device)]
                )
            if not bool(torch.isfinite(outputs).all()):
                raise ChainFailure(
                    f"non-finite prediction on eval set {s.name!r} at chain {chain}, draw {draw}",
                    chain=chain,
                    step=-1,
                )
            dtype = torch.float16 if spec.prediction_dtype == "float16" else torch.float32
            if target.categorical:
                if spec.store_probabilities:
                    # the readers' softmax, so logits-only traces give these very numbers
                    probs = softmax(outputs.float().cpu().numpy())
                    out["predictions"][s.name] = probs.astype(spec.prediction_dtype, copy=False)
                if spec.store_logits:
                    logits = outputs.to(dtype).cpu().numpy()
                    out["predictions"][f"{s.name}_logits"] = logits
            else:
                out["predictions"][s.name] = outputs.to(dtype).cpu().numpy()
            if s.labels is not None and computed.log_probs is not None:
                labels = s.labels.to(outputs.device)
                ll = computed.log_probs[s.name].gather(-1, labels[:, None]).squeeze(-1)
                out["heldout_log_likelihood"][s.name] = ll.double().cpu().numpy()
            elif s.labels is not None:
                ll = target.pointwise_log_likelihood(outputs, s.labels.to(outputs.device))
                out["heldout_log_likelihood"][s.name] = ll.double().cpu().numpy()
        if self.loo_x is not None and computed.train_log_probs is not None:
            ll = computed.train_log_probs.gather(-1, self.loo_y.long()[:, None]).squeeze(-1)
            out["log_likelihood"]["train"] = ll.double().cpu().numpy()
        elif self.loo_x is not None and computed.train_outputs is not None:
            ll = target.pointwise_log_likelihood(computed.train_outputs, self.loo_y)
            out["log_likelihood"]["train"] = ll.double().cpu().numpy()
        elif self.loo_x is not None:
            lls = []
            # Targets whose predictions are draws (Pyro) score examples from their inputs.
            scored = getattr(target, "log_likelihood", None) if not target.categorical else None
            for start in range(0, len(self.loo_y), spec.eval_batch_size):
                xb = self.loo_x[start : start + spec.eval_batch_size]
                yb = self.loo_y[start : start + spec.eval_batch_size]
                if scored is not None:
                    lls.append(scored(xb, yb))
                else:
                    lls.append(target.pointwise_log_likelihood(target.predict(xb), yb))
            out["log_likelihood"]["train"] = torch.cat(lls).double().cpu().numpy()
        return out


def _statistic(name: str, fn: Any, module: nn.Module, sampler: Any, chain: int, draw: int) -> Any:
    """``fn(module, sampler)`` as float64; a failure stops the chain, naming the function."""
    where = f"stats_fns[{name!r}] at chain {chain}, draw {draw}"
    try:
        value = np.asarray(fn(module, sampler), dtype=np.float64)
    except (KeyboardInterrupt, ChainFailure):
        raise
    except Exception as err:  # noqa: BLE001 - user code: report any failure, keep the draws
        raise ChainFailure(
            f"{where} failed: {type(err).__name__}: {' '.join(str(err).split())}",
            chain=chain, step=-1,
        ) from err  # fmt: skip
    return value


def _recomputes_batchnorm(sampler: Any, module: nn.Module) -> bool:
    """Whether kept draws get their BatchNorm statistics recomputed (see the module notes)."""
    tracked = any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
        for m in module.modules()
    )
    return tracked and getattr(sampler.estimator, "moves_weights", False)


def _recomputed_batchnorm(module: nn.Module, batches: Any) -> Callable[[], Any]:
    """``recorded_state`` hook: the draw's BatchNorm statistics from one training pass."""

    @contextlib.contextmanager
    def recorded() -> Iterator[None]:
        update_bn(batches, module)
        yield

    return recorded


def _host(value: Any) -> np.ndarray:
    if isinstance(value, Tensor):
        return value.detach().to("cpu", copy=True).numpy()
    return np.array(value)


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def projection_directions(spec: RunSpec, module: nn.Module) -> list[list[Tensor]] | None:
    """Unit random directions over the trainable parameters, the same for every chain."""
    if spec.projections == 0 or spec.target.kind != "module":
        return None
    params = [p for p in module.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(spec.seed + 0x5EED)
    out = []
    for _ in range(spec.projections):
        parts = [torch.randn(p.shape, generator=gen, dtype=torch.float32) for p in params]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in parts]))
        out.append([(t / norm).to(p.device, p.dtype) for t, p in zip(parts, params, strict=True)])
    return out


def _loo_data(spec: RunSpec, target: Any, device: torch.device) -> tuple[Any, Any]:
    if not target.categorical and spec.loo_points == 0:
        return None, None
    idx = spec.loo_indices()
    x, y = spec.train.take(idx)
    return x.to(device), y.to(device)


def _check_sigma_scale(spec: RunSpec, target: Any) -> None:
    """Warn (ScaleWarning) when a perturbation scale exceeds prior stds it perturbs."""
    import warnings

    from bayesflat.samplers.perturbation import ScaleWarning, sigma_above_prior

    scale_for = getattr(getattr(target, "prior", None), "scale_for", None)
    if scale_for is None or spec.target.kind != "module":
        return
    module = target.module
    sampler = make_sampler(
        spec.sampler, module.parameters(), lr=spec.lr, num_data=spec.num_data,
        temperature=spec.temperature, generator=None, options=dict(spec.options),
    )  # fmt: skip
    sigma, below = sigma_above_prior(sampler, module.named_parameters(), scale_for)
    if not below:
        return
    listed = ", ".join(f"{name} ({scale:.3g})" for name, scale in below[:4])
    more = f" and {len(below) - 4} more" if len(below) > 4 else ""
    warnings.warn(
        f"sigma = {sigma:.3g} (perturbation scale, parameter units) exceeds the prior std of "
        f"{len(below)} perturbed parameter tensors: {listed}{more}. The perturbed points then "
        "lie beyond the prior's own spread and the smoothed posterior can collapse; pass a "
        "smaller sigma (the coupling (T/N)^((1+eta)/4) shrinks only slowly with N) or widen "
        "the prior",
        ScaleWarning,
        stacklevel=4,
    )


def preflight(spec: RunSpec) -> None:
    """Everything that can fail later, checked before the first step.

    Builds chain 0's target, evaluates one closure on the first minibatch (finite potential),
    runs the first batch of every evaluation set through the model, and checks the labels
    against the number of outputs.
    """
    device = torch.device(spec.device)
    seeds = chain_seeds(spec.seed, 0)
    target = spec.target.build(seeds.init, device)
    _check_train_tensors(spec, target)
    stream = MinibatchStream(spec.train, spec.batch_size, seeds.data, device)
    xb, yb = next(stream)
    module = target.module
    if target.categorical and spec.train.is_tensors:
        _check_train_labels(spec, target, xb)
    with torch.random.fork_rng(devices=_rng_devices(device)):
        torch.manual_seed(seeds.model)
        try:
            with torch.enable_grad():
                loss = float(target.closure(xb, yb)())
        except (IndexError, RuntimeError) as err:
            raise ValueError(
                f"the first training minibatch cannot be evaluated: {' '.join(str(err).split())}"
            ) from None
        finally:
            for p in module.parameters():
                p.grad = None
    if not math.isfinite(loss):
        raise ValueError(f"the potential at the initial weights is {loss} on the first minibatch")
    _check_sigma_scale(spec, target)
    n_out = None
    with _eval_mode(module), torch.no_grad():
        for s in spec.eval_sets:
            first = next(iter(s.batches(min(spec.eval_batch_size, 8), device)))
            try:
                outputs = target.predict(first)
            except RuntimeError as err:
                raise ValueError(
                    f"eval_sets[{s.name!r}] inputs do not fit the model: "
                    f"{' '.join(str(err).split())}"
                ) from None
            if target.categorical:
                n_out = int(outputs.shape[-1])
                if s.labels is not None and int(s.labels.max()) >= n_out:
                    raise ValueError(
                        f"eval_sets[{s.name!r}] has label {int(s.labels.max())} but the model "
                        f"has {n_out} outputs (labels must be in [0, {n_out}))"
                    )
    _check_stats_fns(spec, target)


def _check_train_tensors(spec: RunSpec, target: Any) -> None:
    """Refuse non-finite training inputs and non-integer class labels before any step."""
    if not spec.train.is_tensors:
        return
    x, y = spec.train.x, spec.train.y
    if x is not None and x.is_floating_point() and not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).flatten(1).any(1).nonzero()[0, 0]) if x.ndim > 1 else 0
        raise ValueError(
            f"train_data[0] (the inputs) hold NaN or infinite values (first in example {bad}); "
            "clean or drop those examples"
        )
    if target.categorical and y is not None:
        if y.is_floating_point() and not (
            bool(torch.isfinite(y).all()) and bool((y == y.round()).all())
        ):
            raise ValueError(
                "train_data[1] must hold integer class labels; it holds non-integer values "
                f"such as {y[y != y.round()][:1].tolist()}"
            )
        if y.dtype == torch.bool or y.is_complex():
            raise ValueError(f"train_data[1] must hold integer class labels, got dtype {y.dtype}")


def _check_train_labels(spec: RunSpec, target: Any, xb: Tensor) -> None:
    """Refuse training labels outside ``[0, outputs)`` of the model."""
    y = spec.train.y
    assert y is not None
    try:
        with _eval_mode(target.module), torch.no_grad():
            n_out = int(target.predict(xb[:1]).shape[-1])
    except RuntimeError as err:
        raise ValueError(
            "train_data[0] (the inputs) do not fit the model: " + " ".join(str(err).split())
        ) from None
    if int(y.min()) < 0 or int(y.max()) >= n_out:
        raise ValueError(
            f"train_data[1] must hold class labels in [0, {n_out}) for a model with {n_out} "
            f"outputs; they range over [{int(y.min())}, {int(y.max())}]"
        )


_GENERATED_STATS = ("potential", "lp", "step")
"""Sample-stats names every run records besides the sampler's own statistics."""


def _check_stats_fns(spec: RunSpec, target: Any) -> None:
    """Refuse ``stats_fns`` names that the run records itself (they would overwrite them).

    The functions are not called here: they may keep state (a generator, a counter) that one
    extra call would change. One that fails at a draw stops the run there, naming it, with
    the draws before it kept.
    """
    if not spec.stats_fns:
        return
    sampler = make_sampler(
        spec.sampler, target.module.parameters(), lr=spec.lr, num_data=spec.num_data,
        temperature=spec.temperature, generator=None, options=dict(spec.options),
    )  # fmt: skip
    generated = {*_GENERATED_STATS, *sampler.stats()}
    for name in spec.stats_fns:
        if name in generated:
            raise ValueError(
                f"stats_fns[{name!r}] collides with the statistic {name!r} the run records "
                f"itself (taken: {sorted(generated)}); rename it"
            )


def _rng_devices(device: torch.device) -> list[Any]:
    return [device] if device.type == "cuda" else []


def run_chain(
    spec: RunSpec,
    chain: int,
    sink: Any,
    state: ChainState | None = None,
    *,
    checkpoint: Callable[[ChainState], None] | None = None,
    checkpoint_every: int | None = None,
    checkpoint_interval: float = 5.0,
    progress: ProgressFn | None = None,
    should_stop: Callable[[], bool] | None = None,
    shard: tuple[int, int] | None = None,
    wrap_closure: Callable[[Callable[[], Tensor], list[Tensor]], Callable[[], Tensor]]
    | None = None,
) -> ChainState:
    """Run (or continue) chain ``chain`` of ``spec``, writing its kept draws to ``sink``.

    Parameters
    ----------
    spec : RunSpec
    chain : int
        Global chain index: its seeds are ``chain_seeds(spec.seed, chain)``.
    sink : Sink
        Receives ``sink.write(chain, draw, record)`` for every kept draw and
        ``sink.flush(chain)`` before every checkpoint.
    state : ChainState, optional
        Continue from this state (a checkpoint) instead of starting afresh.
    checkpoint : callable, optional
        Called with the state after the draws written so far are flushed: every
        ``checkpoint_every`` kept draws, or (by default) at the first kept draw at least
        ``checkpoint_interval`` seconds after the previous checkpoint; and at the end.
    progress : callable, optional
        ``progress(chain, step, planned, kept, potential)``, called about every 1% of the steps.
    should_stop : callable, optional
        Polled after every step; when it returns True the chain checkpoints its last kept draw
        and raises :class:`ChainStopped`.
    shard, wrap_closure
        Data-parallel runs: this process's slice of every global minibatch, and a wrapper that
        averages the gradients across processes.

    Returns
    -------
    ChainState
        The final state (``done=True``).

    Raises
    ------
    ChainFailure
        A non-finite potential, gradient or prediction; the draws before it are in the sink
        and the last kept draw is checkpointed.
    ChainStopped
        ``should_stop()`` returned True.
    """
    device = torch.device(spec.device)
    seeds = chain_seeds(spec.seed, chain)
    target = spec.target.build(seeds.init, device)
    module = target.module
    noise = torch.Generator(device=device).manual_seed(seeds.noise)
    sampler = make_sampler(
        spec.sampler, module.parameters(), lr=spec.lr, num_data=spec.num_data,
        temperature=spec.temperature, generator=noise, options=dict(spec.options),
    )  # fmt: skip
    sampler.bind_schedule(spec.burn_in, spec.draws, spec.thin)
    sampler.watch(module)
    stream = MinibatchStream(spec.train, spec.batch_size, seeds.data, device, shard=shard)
    one_pass = spec.train.one_pass(spec.batch_size, device)
    begin = getattr(sampler, "begin_chain", None)
    if callable(begin):
        begin(ChainContext(module, one_pass, spec.burn_in, spec.draws, spec.thin))
    recorded_state = getattr(sampler, "recorded_state", None)
    chain_draws = getattr(sampler, "chain_draws", None)
    if recorded_state is None and _recomputes_batchnorm(sampler, module):
        recorded_state = _recomputed_batchnorm(module, one_pass)
    planned = sampler.planned_steps(spec.burn_in, spec.draws, spec.thin)
    loo_x, loo_y = _loo_data(spec, target, device)
    recorder = _Recorder(
        spec, target, sampler, device, loo_x, loo_y, projection_directions(spec, module)
    )
    with torch.random.fork_rng(devices=_rng_devices(device)):
        torch.manual_seed(seeds.model)
        if state is None:
            state = ChainState(chain=chain)
        else:
            state.restore(module, sampler, stream)
        if state.done:
            return state
        return _loop(
            spec, chain, sink, state, target, sampler, stream, recorder, planned,
            recorded_state=recorded_state, chain_draws=chain_draws, checkpoint=checkpoint,
            checkpoint_every=checkpoint_every, checkpoint_interval=checkpoint_interval,
            progress=progress, should_stop=should_stop, wrap_closure=wrap_closure,
        )  # fmt: skip


def _loop(
    spec: RunSpec,
    chain: int,
    sink: Any,
    state: ChainState,
    target: Any,
    sampler: Any,
    stream: MinibatchStream,
    recorder: _Recorder,
    planned: int,
    *,
    recorded_state: Any,
    chain_draws: Any,
    checkpoint: Callable[[ChainState], None] | None,
    checkpoint_every: int | None,
    checkpoint_interval: float,
    progress: ProgressFn | None,
    should_stop: Callable[[], bool] | None,
    wrap_closure: Any,
) -> ChainState:
    module = target.module
    params = [p for p in module.parameters() if p.requires_grad]
    sink.begin(chain, state.kept)
    module.train()
    step, collected, points, kept = state.step, state.collected, state.points, state.kept
    running = state.running
    since = time.monotonic()
    report_every = max(1, planned // 100)

    def current() -> ChainState:
        return snapshot(
            ChainState(chain, step, collected, points, kept, running), module, sampler, stream
        )

    last = current()

    def save(final: bool = False) -> None:
        nonlocal since
        sink.flush(chain)
        if checkpoint is not None:
            checkpoint(last.finished() if final else last)
        since = time.monotonic()

    def due() -> bool:
        if sink.pending_bytes(chain) > _FLUSH_BYTES:
            return True
        if checkpoint_every:
            return kept % checkpoint_every == 0
        return time.monotonic() - since >= checkpoint_interval

    try:
        while points < spec.draws:
            if step >= 10 * planned:
                raise ChainFailure(
                    f"{spec.sampler!r} kept only {points} of {spec.draws} draws in {step} "
                    f"steps at chain {chain}; its sampling phases are too short for "
                    f"thin={spec.thin}",
                    chain=chain,
                    step=step,
                )
            # The potential's value (the prior's norms included) is computed only where it is
            # read: at kept draws and progress reports; other steps return the likelihood part,
            # enough to stop on a non-finite step.
            read = reads_potential(step, collected, spec, report_every)
            closure = target.closure(*next(stream), value=read)
            if wrap_closure is not None:
                closure = wrap_closure(closure, params)
            loss = float(sampler.step(closure))
            step += 1
            if not math.isfinite(loss):
                raise ChainFailure(
                    f"non-finite potential {loss} at chain {chain}, step {step - 1}",
                    chain=chain,
                    step=step - 1,
                )
            if read:
                running = loss if math.isnan(running) else 0.98 * running + 0.02 * loss
            if step > spec.burn_in and sampler.collecting():
                collected += 1
                if collected % spec.thin == 0:
                    points += 1
                    if chain_draws is None:
                        with recorded_state() if recorded_state else contextlib.nullcontext():
                            sink.write(chain, kept, recorder.record(step - 1, {}, chain, kept))
                        kept += 1
                    last = current()
                    if chain_draws is None and due():
                        save()
            if progress is not None and step % report_every == 0:
                progress(chain, step, planned, kept, running)
            if should_stop is not None and should_stop():
                raise ChainStopped(chain, step)
        if chain_draws is not None:
            save()
            with contextlib.closing(chain_draws(spec.draws - kept)) as draws:
                for extra in draws:
                    with _eval_mode(module), torch.no_grad():
                        potential = float(target.potential(*next(stream)))
                    if not math.isfinite(potential):
                        raise ChainFailure(
                            f"non-finite potential {potential} at draw {kept} of chain {chain}",
                            chain=chain,
                            step=step,
                        )
                    extra = {**extra, "potential": potential}
                    sink.write(chain, kept, recorder.record(step - 1, extra, chain, kept))
                    kept += 1
            if kept < spec.draws:
                raise ChainFailure(
                    f"{spec.sampler!r} gave only {kept} of {spec.draws} draws at chain {chain}",
                    chain=chain,
                    step=step,
                )
            last = current()
    except (ChainFailure, ChainStopped, KeyboardInterrupt):
        sink.flush(chain)
        if checkpoint is not None and chain_draws is None:
            checkpoint(last)
        raise
    if progress is not None:
        progress(chain, planned, planned, kept, running)
    save(final=True)
    return last.finished()


_FLUSH_BYTES = 64 * 2**20


def reads_potential(step: int, collected: int, spec: RunSpec, report_every: int) -> bool:
    """Whether step ``step`` (0-based) needs the potential's full value.

    It does at progress reports (every ``report_every`` steps) and at the steps whose state
    becomes a kept draw; elsewhere the closure returns the likelihood part only, which is
    enough to stop on a non-finite step. ``collected`` counts the sampling-phase steps so far.
    """
    return (step + 1) % report_every == 0 or (
        step + 1 > spec.burn_in and (collected + 1) % spec.thin == 0
    )
