"""Runs under ``torch.distributed`` (``torchrun``): chain-parallel or data-parallel.

``parallel="chains"``
    The chains are divided among the ranks (chain ``k`` on rank ``k % world``); each rank runs
    its chains on its own device. With an output folder (on a filesystem every rank sees) each
    rank writes its chains there and rank 0 assembles ``trace.nc``; without one the draws are
    gathered with ``all_gather_object``. Every rank returns the whole trace, whose metadata
    counts every chain.
``parallel="data"``
    Every chain runs on all ranks at once: each rank takes its contiguous slice of every global
    minibatch (``batch_size`` must divide by the world size), the gradients (and the potential)
    are averaged across ranks inside the closure, and the Langevin noise and fSGLD
    perturbations are drawn identically on every rank because every rank's generator has the
    chain's seed. The replicas never diverge: every 50 closure evaluations a checksum of the
    parameters is compared across ranks and a difference stops the run. The result equals the
    single-process run with the same global batch to float tolerance (BatchNorm statistics are
    per slice, as in DDP without SyncBatchNorm).

A stop on one rank (a failure, Ctrl-C) is posted to the process group's store; the other
ranks see it within half a second, checkpoint and stop.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from bayesflat.run.chain import ChainFailure, run_chain
from bayesflat.run.checkpoint import ChainState
from bayesflat.run.executors import ChainOutcome, Interrupt, _outcome
from bayesflat.run.progress import Progress
from bayesflat.run.sinks import FolderSink, MemorySink, RunFolder, Static, load_folder
from bayesflat.run.spec import RunSpec

__all__ = ["averaging_closure", "on_rank_zero", "rank", "run", "world_size"]

_STOP_KEY = "bayesflat/stop"


def world_size() -> int:
    """Ranks of the initialised default process group (1 without one)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def on_rank_zero(fn: Callable[[], Any], *, distributed: bool) -> Any:
    """Run ``fn`` on rank 0 only; the others wait for it and raise what it raised.

    Without a process group (``distributed=False``) this is ``fn()``.
    """
    if not distributed or world_size() == 1:
        return fn()
    result, error = None, None
    if rank() == 0:
        try:
            result = fn()
        except (ValueError, TypeError, OSError) as err:
            error = err
    message = [f"{type(error).__name__}: {error}" if error is not None else None]
    dist.broadcast_object_list(message, src=0)
    if error is not None:
        raise error
    if message[0] is not None:
        kind, _, text = message[0].partition(": ")
        raise {"TypeError": TypeError, "OSError": OSError}.get(kind, ValueError)(text)
    return result


class _SharedStop:
    """A stop flag shared by every rank through the process group's store."""

    def __init__(self, local: Interrupt) -> None:
        self.local = local
        self.store = _default_store()
        self._checked = 0.0
        self._set = False

    def set(self) -> None:
        if self.store is not None:
            self.store.set(_STOP_KEY, "1")
        self._set = True

    def __call__(self) -> bool:
        if self._set:
            return True
        if self.local.is_set():
            self.set()
            return True
        now = time.monotonic()
        if self.store is not None and now - self._checked > 0.5:
            self._checked = now
            if self.store.check([_STOP_KEY]):
                self._set = True
        return self._set


def _default_store() -> Any:
    try:
        return dist.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):
        return None


class _NullSink:
    """Discards draws (ranks other than 0 in data-parallel runs)."""

    def __init__(self) -> None:
        self._kept: dict[int, int] = {}

    def begin(self, chain: int, kept: int) -> None:
        self._kept[chain] = kept

    def write(self, chain: int, draw: int, record: Any) -> None:
        self._kept[chain] = draw + 1

    def flush(self, chain: int) -> None:
        """Nothing to write."""

    def pending_bytes(self, chain: int) -> int:
        return 0

    def kept(self, chain: int) -> int:
        return self._kept.get(chain, 0)


def averaging_closure(world: int, check_every: int = 50) -> Callable[[Callable], Callable]:
    """Wrap a closure so its gradients and value are averaged over the ``world`` ranks.

    Every ``check_every`` evaluations the parameters' checksum is compared across ranks;
    replicas that differ raise :class:`~bayesflat.run.chain.ChainFailure`.
    """
    calls = [0]

    def wrap(closure: Callable[[], torch.Tensor], params: list[torch.Tensor]) -> Callable:
        def averaged() -> torch.Tensor:
            loss = closure()
            grads = [p.grad for p in params if p.grad is not None]
            flat = torch.cat([g.reshape(-1) for g in grads] + [loss.reshape(1).to(grads[0])])
            dist.all_reduce(flat)
            flat /= world
            offset = 0
            for g in grads:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()
            calls[0] += 1
            if calls[0] % check_every == 0:
                _check_replicas(params)
            return flat[-1].to(loss.dtype)

        return averaged

    return wrap


def _check_replicas(params: list[torch.Tensor]) -> None:
    with torch.no_grad():
        total = torch.stack([p.double().sum() for p in params]).sum().reshape(1)
        low, high = total.clone(), total.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
    if float(low) != float(high):
        raise ChainFailure(
            f"data-parallel replicas diverged (parameter sums {float(low)!r} to {float(high)!r} "
            "across ranks): every rank must run the same code on the same seed",
            chain=-1,
            step=-1,
        )


def run(
    spec: RunSpec,
    static: Static,
    folder: RunFolder | None,
    states: dict[int, ChainState],
    *,
    parallel: str,
    progress: bool,
    checkpoint_every: int | None,
) -> Any:
    """Run the chains of ``spec`` across the ranks; every rank returns the whole trace."""
    from bayesflat.run.api import SamplingError, _finish

    world, me = world_size(), rank()
    if parallel == "data" and spec.batch_size % world:
        raise ValueError(
            f"batch_size={spec.batch_size} must divide by the {world} ranks of a data-parallel run"
        )
    todo = [c for c in range(spec.chains) if not (c in states and states[c].done)]
    mine = todo if parallel == "data" else [c for c in todo if c % world == me]
    writes = parallel == "chains" or me == 0
    planned = int(static.attrs["planned_steps"])
    bar = Progress(mine, planned, spec.draws, enabled=progress and me == 0)
    if folder is not None:
        sink: Any = FolderSink(folder, spec.chains, spec.draws, static.coords)
    else:
        sink = MemorySink(spec.chains, spec.draws)
    if not writes:
        sink = _NullSink()
    for c, state in states.items():
        sink.begin(c, state.kept)
    outcomes: list[ChainOutcome] = []
    with Interrupt() as interrupt:
        stop = _SharedStop(interrupt)
        for chain in mine:
            options: dict[str, Any] = {}
            if parallel == "data":
                options = {"shard": (me, world), "wrap_params": averaging_closure(world)}
            outcome = _outcome(
                chain,
                lambda c=chain, o=options: _run_one(
                    spec,
                    c,
                    sink,
                    states.get(c),
                    folder if writes else None,
                    bar,
                    stop,
                    checkpoint_every,
                    o,
                ),  # fmt: skip
            )
            outcomes.append(outcome)
            if outcome.status != "done":
                stop.set()
                break
    bar.close()
    everyone = [None] * world
    dist.all_gather_object(everyone, outcomes)
    outcomes = [o for part in everyone for o in (part or [])]
    if parallel == "data":
        outcomes = [o for o in outcomes if o is not None][: len(todo)]
    if folder is None:
        return _finish(
            spec, static, None, _gather_memory(sink if writes else None, spec), outcomes, None
        )
    dist.barrier()
    result: Any = None
    if me == 0:
        sink = FolderSink(folder, spec.chains, spec.draws, static.coords)
        for c in range(spec.chains):
            state = folder.checkpoint(c)
            sink.begin(c, state.kept if state is not None else 0)
        try:
            result = _finish(spec, static, folder, sink, outcomes, None)
        except SamplingError as err:
            result = err
    dist.barrier()
    if me != 0:
        if folder.trace_nc.is_file():
            return load_folder(folder.path, lazy=True)
        bad = next((o for o in outcomes if o.status != "done"), None)
        try:
            partial = load_folder(folder.path)
        except ValueError:
            partial = None
        reason = bad.message if bad is not None and bad.status == "failed" else "interrupted"
        raise SamplingError(
            f"sampling stopped: {reason}; every chain is checkpointed in {folder.path}",
            partial, chain=bad.chain if bad else -1, step=bad.step if bad else -1,
        )  # fmt: skip
    if isinstance(result, BaseException):
        raise result
    return result


def _run_one(
    spec: RunSpec,
    chain: int,
    sink: Any,
    state: ChainState | None,
    folder: RunFolder | None,
    bar: Progress,
    stop: _SharedStop,
    checkpoint_every: int | None,
    options: dict[str, Any],
) -> ChainState:
    wrap = options.get("wrap_params")
    return run_chain(
        spec, chain, sink, state,
        checkpoint=folder.save_checkpoint if folder is not None else None,
        checkpoint_every=checkpoint_every, progress=bar.update, should_stop=stop,
        shard=options.get("shard"), wrap_closure=wrap,
    )  # fmt: skip


def _gather_memory(sink: MemorySink | None, spec: RunSpec) -> MemorySink:
    """Every rank's in-memory draws merged into one sink on every rank."""
    local = None
    if sink is not None:
        local = {
            "kept": [sink.kept(c) for c in range(spec.chains)],
            "arrays": sink._arrays,
        }
    parts: list[Any] = [None] * world_size()
    dist.all_gather_object(parts, local)
    merged = MemorySink(spec.chains, spec.draws)
    for part in parts:
        if part is None:
            continue
        for chain, count in enumerate(part["kept"]):
            if count == 0:
                continue
            for group, variables in part["arrays"].items():
                store = merged._arrays.setdefault(group, {})
                for name, array in variables.items():
                    if name not in store:
                        store[name] = np.full_like(array, np.nan)
                    store[name][chain, :count] = array[chain, :count]
            merged.begin(chain, count)
    return merged
