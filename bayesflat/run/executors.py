"""Where chains run. An executor only maps :func:`~bayesflat.run.chain.run_chain` over chains.

``sequential``
    One chain after another in this process.
``processes``
    ``workers`` local processes (one torch thread each by default), each running whole chains
    into the run folder; the coordinating process renders the progress. On Linux the workers
    fork from one server process that has imported torch and this module once
    (``forkserver``), so they start in milliseconds, share those pages, and a second run in
    the same program starts no import at all; elsewhere (macOS, where forking a process that
    has loaded system frameworks is unsafe, and Windows) they are spawned.
``distributed``
    Under ``torch.distributed`` (e.g. ``torchrun``): chains divided among the ranks, or each
    chain data-parallel across all ranks (:mod:`bayesflat.run.distributed`).
``vectorised``
    Several chains of one model as one batched computation (:mod:`bayesflat.run.vectorised`).

Whichever executor runs a chain, its draws are the same: chain ``k`` takes all its randomness
from ``chain_seeds(seed, k)``.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import pickle
import queue
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import torch

from bayesflat.run.chain import ChainFailure, ChainStopped, run_chain
from bayesflat.run.checkpoint import ChainState
from bayesflat.run.progress import Progress
from bayesflat.run.sinks import FolderSink, RunFolder
from bayesflat.run.spec import RunSpec

__all__ = ["ChainOutcome", "Interrupt", "run_processes", "run_sequential"]


@dataclass
class ChainOutcome:
    """How a chain ended: ``"done"``, ``"failed"`` (with the message) or ``"stopped"``."""

    chain: int
    status: str
    message: str = ""
    step: int = -1


class Interrupt:
    """First Ctrl-C: ask the chains to stop at their next step (they checkpoint); second: now.

    Installed only in the main thread, around a run; restores the previous handler on exit.
    """

    def __init__(self) -> None:
        self.event = threading.Event()
        self._previous: Any = None

    def __enter__(self) -> Interrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.getsignal(signal.SIGINT)
            if self._previous is signal.default_int_handler:
                signal.signal(signal.SIGINT, self._handle)
            else:
                self._previous = None
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.event.is_set():
            raise KeyboardInterrupt
        self.event.set()

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def is_set(self) -> bool:
        """Whether a stop was asked for."""
        return self.event.is_set()


def _outcome(chain: int, run: Callable[[], ChainState]) -> ChainOutcome:
    try:
        run()
    except ChainFailure as err:
        return ChainOutcome(chain, "failed", str(err), err.step)
    except ChainStopped as err:
        return ChainOutcome(chain, "stopped", "", err.step)
    return ChainOutcome(chain, "done")


def run_sequential(
    spec: RunSpec,
    chains: Sequence[int],
    sink: Any,
    states: dict[int, ChainState],
    *,
    folder: RunFolder | None,
    progress: Progress,
    stop: Interrupt,
    checkpoint_every: int | None,
    checkpoint_interval: float,
) -> list[ChainOutcome]:
    """Run ``chains`` one after another; stop at the first that does not finish."""
    outcomes = []
    for chain in chains:
        outcome = _outcome(
            chain,
            lambda c=chain: run_chain(
                spec,
                c,
                sink,
                states.get(c),
                checkpoint=folder.save_checkpoint if folder is not None else None,
                checkpoint_every=checkpoint_every,
                checkpoint_interval=checkpoint_interval,
                progress=progress.update,
                should_stop=stop.is_set,
            ),  # fmt: skip
        )
        outcomes.append(outcome)
        if outcome.status != "done":
            break
    return outcomes


# -- processes ------------------------------------------------------------------------------------

_WORKER: dict[str, Any] = {}

_PRELOAD = ["bayesflat.run.executors"]
"""What the fork server imports before it forks any worker: torch and the chain loop."""


def _worker_context() -> Any:
    """``forkserver`` with :data:`_PRELOAD` on Linux (Python's own default there from 3.14);
    ``spawn`` elsewhere.

    Spawned workers each import torch and the package again (over a second of CPU apiece,
    and their own copy of torch's pages). Workers forked from the fork server inherit those
    imports; the server itself is a fresh interpreter that has never run a torch operation
    (no thread pools to fork), and it lives as long as this process, so later runs reuse it.
    Each worker still receives this process's ``sys.path``, working folder and main module,
    as a spawned one does. The preload list is only a hint for a server not yet started.
    """
    if not sys.platform.startswith("linux"):
        return mp.get_context("spawn")
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(_PRELOAD)
    return context


def _init_worker(
    spec: bytes, path: str, coords: dict[str, Any], threads: int, updates: Any, stop: Any,
    every: int | None, interval: float,
) -> None:  # fmt: skip
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the coordinator decides when to stop
    torch.set_num_threads(threads)
    _WORKER.update(
        spec=pickle.loads(spec), folder=RunFolder(path), coords=coords, updates=updates, stop=stop,
        every=every, interval=interval,
    )  # fmt: skip


def _run_in_worker(chain: int) -> ChainOutcome:
    spec: RunSpec = _WORKER["spec"]
    folder: RunFolder = _WORKER["folder"]
    updates, stop = _WORKER["updates"], _WORKER["stop"]
    sink = FolderSink(folder, spec.chains, spec.draws, _WORKER["coords"])

    def progress(c: int, step: int, planned: int, kept: int, potential: float) -> None:
        updates.put((c, step, planned, kept, potential))

    return _outcome(
        chain,
        lambda: run_chain(
            spec,
            chain,
            sink,
            folder.checkpoint(chain),
            checkpoint=folder.save_checkpoint,
            checkpoint_every=_WORKER["every"],
            checkpoint_interval=_WORKER["interval"],
            progress=progress,
            should_stop=stop.is_set,
        ),  # fmt: skip
    )


@contextlib.contextmanager
def _relay(updates: Any, progress: Progress) -> Iterator[None]:
    done = threading.Event()

    def pump() -> None:
        while not done.is_set() or not updates.empty():
            try:
                item = updates.get(timeout=0.1)
            except (queue.Empty, EOFError, OSError):
                continue
            progress.update(*item)

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=5)


def run_processes(
    spec: RunSpec,
    chains: Sequence[int],
    folder: RunFolder,
    *,
    workers: int,
    threads: int,
    coords: dict[str, Any],
    progress: Progress,
    stop: Interrupt,
    checkpoint_every: int | None,
    checkpoint_interval: float,
) -> list[ChainOutcome]:
    """Run ``chains`` in ``workers`` processes (:func:`_worker_context`), each chain into
    ``folder``.

    The spec travels pickled by value (torch's multiprocessing pickler would move the
    caller's tensors into shared memory, invalidating numpy arrays that share their memory).

    When a chain fails, the others are asked to stop at their next step (checkpointing their
    last kept draw), so nothing computed is lost and the run can be resumed.
    """
    spec.check_picklable("workers > 1")
    context = _worker_context()
    updates, stop_event = context.Queue(), context.Event()
    outcomes: list[ChainOutcome] = []
    with (
        _relay(updates, progress),
        ProcessPoolExecutor(
            max_workers=min(workers, len(chains)),
            mp_context=context,
            initializer=_init_worker,
            initargs=(pickle.dumps(spec), str(folder.path), coords, threads, updates, stop_event,
                      checkpoint_every, checkpoint_interval),
        ) as pool,
    ):  # fmt: skip
        futures = {pool.submit(_run_in_worker, c): c for c in chains}
        pending = set(futures)
        while pending:
            finished, pending = wait(pending, timeout=0.2, return_when=FIRST_EXCEPTION)
            for future in finished:
                if future.cancelled():
                    continue
                outcome = future.result()
                outcomes.append(outcome)
                if outcome.status != "done":
                    stop_event.set()
            if stop.is_set():
                stop_event.set()
            if stop_event.is_set():
                for future in pending:
                    future.cancel()
                pending = {f for f in pending if not f.cancelled()}
    return sorted(outcomes, key=lambda o: o.chain)
