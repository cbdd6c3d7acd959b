"""``bayesflat.sample`` and ``bayesflat.resume``: a run from arguments to trace."""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bayesflat import _io
from bayesflat import samplers as _samplers
from bayesflat._checks import check_choice, check_int, check_positive, validate_temperature
from bayesflat.defaults import DEFAULTS, resolve_temperature
from bayesflat.run import distributed as _distributed
from bayesflat.run.chain import preflight
from bayesflat.run.checkpoint import ChainState
from bayesflat.run.executors import ChainOutcome, Interrupt, run_processes, run_sequential
from bayesflat.run.lock import run_lock
from bayesflat.run.progress import Progress
from bayesflat.run.sinks import (
    FolderSink,
    MemorySink,
    RunFolder,
    Static,
    assemble_trace,
    load_folder,
)
from bayesflat.run.spec import (
    ModuleTargetSpec,
    RunSpec,
    as_name_tuple,
    chain_seeds,
    check_device,
    differences,
    make_sampler,
    parse_eval_sets,
)
from bayesflat.run.stream import TrainData
from bayesflat.target.torch import Likelihood, Prior

__all__ = ["SamplingError", "make_spec", "resume", "sample"]

MAX_STEPS = 10**9
"""Most steps one chain may be asked to run (``burn_in + draws * thin``)."""
EXECUTORS = ("auto", "sequential", "processes", "distributed", "vectorised")
_FORMAT = "bayesflat-run"


class SamplingError(RuntimeError):
    """A run stopped early. ``trace`` holds every draw kept before the stop.

    ``trace`` is ``None`` when the stop came before the first kept draw. Draws that were not
    reached are NaN; the trace's root attrs carry ``complete = False``, ``stop_reason`` and
    ``draws_kept`` per chain. A run with an output folder has checkpointed every chain there:
    :func:`resume` continues it. A Ctrl-C that arrives after every chain's last step raises
    this too (from ``KeyboardInterrupt``), with the complete trace.
    """

    def __init__(self, message: str, trace: Any, *, chain: int, step: int) -> None:
        super().__init__(message)
        self.trace = trace
        self.chain = chain
        self.step = step


def sample(
    model: nn.Module | Any,
    train_data: object,
    *,
    sampler: str = DEFAULTS.sampler,
    chains: int = DEFAULTS.chains,
    burn_in: int = DEFAULTS.burn_in,
    draws: int = DEFAULTS.draws,
    thin: int = DEFAULTS.thin,
    batch_size: int = DEFAULTS.batch_size,
    eval_sets: Mapping[str, object] | None = None,
    seed: int = DEFAULTS.seed,
    progress: bool = True,
    lr: float = DEFAULTS.lr,
    temperature: float | None = None,
    num_data: int | None = None,
    likelihood: str | Likelihood = "categorical",
    prior: Prior | float | None = DEFAULTS.prior_scale,
    init: str = DEFAULTS.init,
    store_weights: bool | list[str] = True,
    store_logits: bool = False,
    store_probabilities: bool = True,
    prediction_dtype: str = "float32",
    loo_points: int | None = None,
    eval_batch_size: int = 1024,
    output: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    checkpoint_every: int | None = None,
    workers: int = 1,
    executor: str = "auto",
    parallel: str = "chains",
    device: str | None = None,
    stats_fns: Mapping[str, Callable[[nn.Module, _samplers.Sampler], Any]] | None = None,
    recipe: Mapping[str, Any] | None = None,
    on_divergence: str = "keep",
    **sampler_options: Any,
) -> Any:
    """Run ``chains`` chains of a registered sampler and return an ArviZ trace.

    Each chain runs ``burn_in`` steps, then keeps every ``thin``-th state until ``draws`` are
    kept (``burn_in + draws * thin`` steps; a sampler with exploration phases, such as a
    cyclical schedule, counts only the steps of its sampling phases). Trajectory methods record
    a summary of the iterates instead (:mod:`bayesflat.run.chain`): ``"swa"`` the running
    average at every kept state, ``"swag"`` ``draws`` draws of its fitted Gaussian after the
    chain's last step.

    The defaults of ``sampler``, ``chains``, ``burn_in``, ``draws``, ``thin``, ``batch_size``,
    ``seed``, ``lr``, ``temperature``, ``prior`` and ``init`` are those of ``bayesflat run``,
    :data:`bayesflat.defaults.DEFAULTS` (chosen on the digits MLP, see that module).

    Chain ``k`` takes all its randomness (initial weights, minibatch order, sampler noise,
    dropout masks) from ``chain_seeds(seed, k)``, so a run is the same whichever executor runs
    it, and a run continued by :func:`resume` equals one that never stopped.

    At every kept draw the run records the weights (``weights`` group) and functionals of them
    (``posterior``: per-tensor norms, random projections), the sampler's statistics, class
    probabilities on every evaluation set, the pointwise log-likelihood of the labelled sets
    (``heldout_log_likelihood``) and of training points (``log_likelihood``, for ``az.loo``).

    Parameters
    ----------
    model : nn.Module or TargetSpec
        The network (copied per chain; the caller's module is not modified), or a target
        recipe such as :class:`bayesflat.target.pyro.PyroTargetSpec`.
    train_data : (inputs, targets), Dataset or DataLoader
        Training data. Minibatches of ``batch_size`` are drawn from a fresh permutation every
        epoch (last partial batch dropped); a DataLoader contributes its dataset and collate
        function.
    sampler : str
        A name from :func:`bayesflat.samplers.available`.
    chains, burn_in, draws, thin : int
        Number of chains (>= 1), steps discarded first (>= 0), draws kept per chain (>= 1),
        steps between kept draws (>= 1).
    batch_size : int
        Minibatch size ``|B|``.
    eval_sets : mapping, optional
        ``name -> inputs`` or ``name -> (inputs, labels)``; inputs a tensor/array or a
        Dataset (evaluated ``eval_batch_size`` at a time). Labels must be integer classes.
    seed : int
        Root seed.
    progress : bool, default True
        Show progress (a bar on a terminal, a line every 10% otherwise).
    lr : float
        Step size in mean-loss units.
    temperature : float, optional
        ``T``; defaults to ``DEFAULTS.temperature`` for samplers and 0 for optimisers (e.g.
        ``"sgd"``); see :func:`bayesflat.defaults.resolve_temperature`. For a Pyro model a
        sampler's default is ``T = 1``, the posterior the model states.
    num_data : int, optional
        ``N``; defaults to the number of training examples.
    likelihood, prior
        See :class:`bayesflat.target.torch.Posterior`.
    init : {"reset", "model", "prior"}
        ``"reset"`` re-initialises every chain independently; ``"model"`` starts every chain
        from the given weights; ``"prior"`` starts every chain from its own draw of the
        tempered prior ``N(0, T s_j^2)`` (a Gaussian prior is needed; at ``T = 0`` this is
        ``"reset"``), where the coordinates the data do not constrain are already stationary.
    store_weights : bool or list of str, default True
        Record all floating ``state_dict`` entries, none, or the named ones.
    store_logits : bool, default False
        Record the logits on each evaluation set (``<set>_logits`` in ``predictions``).
    store_probabilities : bool, default True
        Record the class probabilities on each evaluation set (``<set>``). With
        ``store_logits=True, store_probabilities=False`` only logits are stored, half the
        space; readers (:func:`bayesflat.predictive.from_trace`, the report) take the
        softmax of the logits.
    prediction_dtype : {"float32", "float16"}, default "float32"
        Storage type of the ``predictions`` group; ``"float16"`` halves it (a stored
        probability then moves by at most 2.4e-4, a logit ``z`` by ``|z| 2^-11``; see
        :data:`bayesflat.run.spec.PREDICTION_DTYPES`).
    loo_points : int, optional
        Training points whose pointwise log-likelihood is recorded for PSIS-LOO: all of them
        (default), or a fixed random subset of this size (its indices are in
        ``constant_data.train_index``).
    eval_batch_size : int, default 1024
        Batch size of evaluation passes.
    output : path, optional
        A run folder: draws are written as they are kept, every chain is checkpointed (see
        ``checkpoint_every``), and ``trace.nc`` is assembled at the end. The returned trace
        then reads its arrays from that file when they are used.
    overwrite : bool, default False
        Replace a run already in ``output``; without it such a folder is refused (continue it
        with :func:`resume`).
    checkpoint_every : int, optional
        Checkpoint every this many kept draws; by default at the first kept draw 5 s after the
        previous checkpoint, so a killed run loses at most a few seconds. Draws reach the run
        folder whenever 1 MiB of a chain's draws waits, checkpoint or not.
    workers : int, default 1
        With ``workers > 1`` chains run in that many local processes (one torch thread each),
        forked on Linux from a server process that has imported torch once (spawned
        elsewhere). The model and ``stats_fns`` travel to them pickled: their classes
        and functions must be importable (defined at module level), as for ``multiprocessing``.
    executor : {"auto", "sequential", "processes", "distributed", "vectorised"}
        ``"auto"``: ``"distributed"`` under an initialised ``torch.distributed`` process group
        of several ranks, ``"processes"`` when ``workers > 1``, else ``"sequential"``.
    parallel : {"chains", "data"}, default "chains"
        Distributed runs: divide the chains among the ranks, or run every chain data-parallel
        across them (each rank takes its slice of every global minibatch).
    device : str, optional
        Where chains run (default: the model's device).
    stats_fns : mapping, optional
        ``name -> fn(model, sampler)`` evaluated at every kept draw; each returns a number or
        an array recorded in ``sample_stats``. A name the run records itself is refused
        before the first step; a function that raises stops the run at that draw (naming it),
        with the draws before it kept. Functions must be picklable for ``workers > 1``.
    recipe : mapping, optional
        JSON-able description from which :func:`resume` can rebuild ``model``, ``train_data``
        and ``eval_sets`` (``bayesflat run`` stores its arguments).
    on_divergence : {"keep", "exclude", "raise"}, default "keep"
        Every kept draw records ``sample_stats.diverging`` (non-finite potential, a weight
        tensor above 10 prior standard deviations rms, or training predictions no better than
        chance; see :mod:`bayesflat.diagnostics.divergence`). ``"keep"`` returns every chain
        and warns (:class:`~bayesflat.diagnostics.divergence.DivergenceWarning`) naming the
        chains with diverging draws; ``"exclude"`` returns the trace without those chains (root
        attribute ``excluded_chains``; the run folder keeps them all) and warns; ``"raise"``
        raises :class:`SamplingError` whose ``trace`` holds every chain.
    **sampler_options
        Passed to the sampler class (e.g. ``sigma``, ``eta`` for fSGLD).

    Returns
    -------
    arviz.InferenceData (ArviZ 0.x) or xarray.DataTree (ArviZ 1.x)
        On a distributed run, every rank returns the whole trace.

    Raises
    ------
    SamplingError
        When a potential, gradient or prediction becomes non-finite (the message names chain
        and step or draw) or the run is interrupted; ``err.trace`` holds the draws kept.
    ValueError, TypeError
        On bad arguments, before the first step.
    """
    if "log_likelihood_set" in sampler_options:
        raise TypeError(
            "log_likelihood_set is no longer an argument: log_likelihood holds the pointwise "
            "log-likelihood of training points (what az.loo needs; see loo_points), and every "
            "labelled evaluation set has its own in heldout_log_likelihood"
        )
    from bayesflat.diagnostics.divergence import ON_DIVERGENCE

    check_choice(on_divergence, "on_divergence", ON_DIVERGENCE)
    entry = _samplers.entry(sampler)
    temperature = resolve_temperature(
        temperature, entry.is_sampler, states_posterior=_states_posterior(model)
    )
    spec = make_spec(
        model, train_data, sampler=sampler, chains=chains, burn_in=burn_in, draws=draws,
        thin=thin, batch_size=batch_size, eval_sets=eval_sets, seed=seed, lr=lr,
        temperature=temperature, num_data=num_data, likelihood=likelihood, prior=prior,
        init=init, store_weights=store_weights, store_logits=store_logits,
        store_probabilities=store_probabilities, prediction_dtype=prediction_dtype,
        loo_points=loo_points, eval_batch_size=eval_batch_size, device=device,
        stats_fns=stats_fns, options=sampler_options,
    )  # fmt: skip
    executor = _choose_executor(executor, workers)
    check_choice(parallel, "parallel", ("chains", "data"))
    every = None if checkpoint_every is None else check_int(checkpoint_every, "checkpoint_every", 1)
    preflight(spec)
    if executor == "vectorised":
        from bayesflat.run.vectorised import check_vectorisable

        check_vectorisable(spec)
    static = _static(spec)
    with contextlib.ExitStack() as owner:

        def prepare() -> RunFolder | None:
            folder = _prepare_folder(
                output, overwrite, owner, check=lambda path: _capacity(spec, path, disk=True)
            )
            if folder is None:
                _capacity(spec, None, disk=False)
                return None
            folder.write_meta(_meta(spec, static, recipe, status="running"))
            folder.write_static(static)
            return folder

        folder = _distributed.on_rank_zero(prepare, distributed=executor == "distributed")
        if folder is None and output is not None:
            folder = RunFolder(output)
        trace = _execute(
            spec, static, folder, {}, executor=executor, workers=workers, parallel=parallel,
            progress=progress, checkpoint_every=every,
        )  # fmt: skip
        return _on_divergence(trace, on_divergence)


def _on_divergence(trace: Any, mode: str) -> Any:
    """Keep (with a warning), exclude or refuse the chains with diverging draws."""
    import warnings

    from bayesflat.diagnostics.divergence import DivergenceWarning, diverging_chains
    from bayesflat.trace.build import assemble, groups, root_attrs

    bad = diverging_chains(trace)
    if not bad:
        return trace
    parts = groups(trace)
    chains = int(next(ds.sizes["chain"] for ds in parts.values() if "chain" in ds.sizes))
    detail = ", ".join(f"chain {c}: {n}" for c, n in bad.items())
    text = f"{len(bad)} of {chains} chains have diverging draws ({detail}; sample_stats.diverging)"
    if mode == "raise" or (mode == "exclude" and len(bad) == chains):
        why = "" if mode == "raise" else "; every chain diverged, none is left to return"
        raise SamplingError(
            f"{text}{why}; lower lr, check the prior scale, or pass on_divergence='keep'",
            trace, chain=next(iter(bad)), step=-1,
        )  # fmt: skip
    if mode == "keep":
        warnings.warn(f"{text}; kept (on_divergence='keep')", DivergenceWarning, stacklevel=3)
        return trace
    keep = [c for c in range(chains) if c not in bad]
    warnings.warn(f"{text}; excluded (on_divergence='exclude')", DivergenceWarning, stacklevel=3)
    sub = {k: ds.isel(chain=keep) if "chain" in ds.dims else ds for k, ds in parts.items()}
    attrs = {**root_attrs(trace), "excluded_chains": list(bad), "chains": len(keep)}
    return assemble(sub, attrs)


def resume(
    path: str | os.PathLike[str],
    model: nn.Module | Any | None = None,
    train_data: object | None = None,
    *,
    eval_sets: Mapping[str, object] | None = None,
    stats_fns: Mapping[str, Callable[[nn.Module, _samplers.Sampler], Any]] | None = None,
    progress: bool = True,
    workers: int = 1,
    executor: str = "auto",
    parallel: str = "chains",
    checkpoint_every: int | None = None,
    **settings: Any,
) -> Any:
    """Continue every unfinished chain of a run folder and return the whole trace.

    A run started by ``bayesflat run`` is rebuilt from the arguments stored in its folder. A
    run started from Python needs the same ``model``, ``train_data``, ``eval_sets`` and
    ``stats_fns`` again (they are checked against fingerprints stored in the folder). Any
    further keyword is a setting of :func:`sample`; one that differs from the stored run is
    refused, as is any difference in the data or the model.

    Parameters
    ----------
    path : path
        The run folder.
    model, train_data, eval_sets, stats_fns
        As given to :func:`sample` (not needed for runs of ``bayesflat run``).
    progress, workers, executor, parallel, checkpoint_every
        How to run the remaining chains (these may differ from the first attempt).
    **settings
        Settings of :func:`sample` to check against the stored run.

    Returns
    -------
    arviz.InferenceData or xarray.DataTree
        The trace of the whole run, equal array for array to an uninterrupted run.

    Raises
    ------
    ValueError
        If ``path`` is not a run folder, or a setting differs from the stored run (the message
        names it).
    SamplingError
        As for :func:`sample`.
    """
    folder = RunFolder(path)
    if not folder.exists():
        raise ValueError(
            f"{folder.path} holds no run to resume (no run.json); start one with "
            "bayesflat.sample(..., output=...) or `bayesflat run --output`"
        )
    distributed = _distributed.world_size() > 1
    owner = contextlib.ExitStack()
    with owner:
        _distributed.on_rank_zero(
            lambda: owner.enter_context(run_lock(folder.path)), distributed=distributed
        )
        return _resume_locked(
            folder, model, train_data, eval_sets=eval_sets, stats_fns=stats_fns,
            progress=progress, workers=workers, executor=executor, parallel=parallel,
            checkpoint_every=checkpoint_every, settings=settings,
        )  # fmt: skip


def _resume_locked(
    folder: RunFolder,
    model: Any,
    train_data: Any,
    *,
    eval_sets: Any,
    stats_fns: Any,
    progress: bool,
    workers: int,
    executor: str,
    parallel: str,
    checkpoint_every: int | None,
    settings: dict[str, Any],
) -> Any:
    meta = folder.read_meta()
    if meta.get("format") != _FORMAT:
        raise ValueError(f"{folder.run_json} is not a bayesflat run description")
    if model is None:
        model, train_data, eval_sets, stored_settings = _from_recipe(meta, folder)
        stored_settings = dict(stored_settings)
        rebuilt_stats = stored_settings.pop("stats_fns", None)
        stats_fns = rebuilt_stats if stats_fns is None else stats_fns
        settings = {**stored_settings, **settings}
    elif train_data is None:
        raise ValueError("resume needs train_data together with model (as given to sample)")
    stored = meta["identity"]
    kwargs = dict(stored.get("call", {}))
    options = dict(stored["sampler_options"])
    for key, value in settings.items():
        if key in kwargs:
            kwargs[key] = value
        else:
            options[key] = value
    spec = make_spec(
        model, train_data, eval_sets=eval_sets, stats_fns=stats_fns, options=options, **kwargs
    )
    given = spec.identity()
    differ = differences(stored["spec"], given)
    if differ:
        raise ValueError(
            f"cannot resume {folder.path}: these settings differ from the stored run: "
            + "; ".join(differ)
        )
    folder.remove_temporaries()
    static = folder.read_static(meta.get("attrs", {}), meta.get("coords", {}))
    states = {c: s for c in range(spec.chains) if (s := folder.checkpoint(c)) is not None}
    if folder.trace_nc.is_file():
        return load_folder(folder.path, lazy=True)
    _distributed.on_rank_zero(
        lambda: folder.write_meta({**meta, "status": "running"}),
        distributed=_distributed.world_size() > 1,
    )
    every = None if checkpoint_every is None else check_int(checkpoint_every, "checkpoint_every", 1)
    return _execute(
        spec, static, folder, states, executor=_choose_executor(executor, workers),
        workers=workers, parallel=parallel, progress=progress, checkpoint_every=every,
    )  # fmt: skip


# -- building the spec ----------------------------------------------------------------------------


def make_spec(
    model: Any,
    train_data: object,
    *,
    sampler: str = DEFAULTS.sampler,
    chains: int = DEFAULTS.chains,
    burn_in: int = DEFAULTS.burn_in,
    draws: int = DEFAULTS.draws,
    thin: int = DEFAULTS.thin,
    batch_size: int = DEFAULTS.batch_size,
    eval_sets: Mapping[str, object] | None = None,
    seed: int = DEFAULTS.seed,
    lr: float = DEFAULTS.lr,
    temperature: float | None = None,
    num_data: int | None = None,
    likelihood: str | Likelihood = "categorical",
    prior: Prior | float | None = DEFAULTS.prior_scale,
    init: str = DEFAULTS.init,
    store_weights: bool | list[str] = True,
    store_logits: bool = False,
    store_probabilities: bool = True,
    prediction_dtype: str = "float32",
    loo_points: int | None = None,
    eval_batch_size: int = 1024,
    device: str | None = None,
    stats_fns: Mapping[str, Any] | None = None,
    options: Mapping[str, Any] | None = None,
) -> RunSpec:
    """The checked :class:`RunSpec` of :func:`sample`'s arguments (for :func:`run_chain`).

    ``options`` are the sampler's options (``**sampler_options`` of :func:`sample`).
    """
    entry = _samplers.entry(sampler)
    temperature = resolve_temperature(
        temperature, entry.is_sampler, states_posterior=_states_posterior(model)
    )
    options = dict(options or {})
    for name, minimum in (("chains", 1), ("burn_in", 0), ("draws", 1), ("thin", 1),
                          ("batch_size", 1), ("eval_batch_size", 1), ("seed", 0)):  # fmt: skip
        check_int(locals()[name], name, minimum)
    steps = burn_in + draws * thin
    if steps > MAX_STEPS:
        raise ValueError(
            f"burn_in + draws * thin = {steps:,} steps per chain exceeds {MAX_STEPS:,} (days of "
            "sampling even at 1 ms a step); lower burn_in, draws or thin"
        )
    check_choice(init, "init", ("reset", "model", "prior"))
    if not (callable(lr) or math.isfinite(check_positive(lr, "lr"))):
        raise ValueError(f"lr must be a finite number > 0, got {lr!r}")
    temperature = validate_temperature(temperature)
    train = TrainData(train_data)
    n_data = train.num_examples if num_data is None else num_data
    if stats_fns is not None and not isinstance(stats_fns, Mapping):
        raise TypeError(
            "stats_fns must be a mapping from names to callables fn(model, sampler), "
            f"got {type(stats_fns).__name__}"
        )
    target = _target_spec(model, likelihood, prior, n_data, temperature, init, train)
    sets = parse_eval_sets(eval_sets, store_logits=store_logits)
    if any(s.name == "train" for s in sets):
        raise ValueError(
            "eval set name 'train' is reserved for the training points of log_likelihood; "
            "rename it (e.g. 'train_eval')"
        )
    if sets and not getattr(target, "categorical", True):
        if getattr(target, "kind", "module") != "pyro":
            raise ValueError("eval_sets need a categorical likelihood (class probabilities)")
        labelled = [s.name for s in sets if s.labels is not None]
        if labelled:
            raise ValueError(
                f"eval_sets {labelled} have labels, but the Pyro model's observed site is not "
                "categorical: its predictions are draws of that site; pass inputs only"
            )
    if device is None:
        device = _model_device(model)
    spec = RunSpec(
        target=target, train=train, sampler=sampler, options=dict(options), lr=lr,
        temperature=temperature, num_data=n_data, chains=chains, burn_in=burn_in, draws=draws,
        thin=thin, batch_size=batch_size, seed=seed, eval_sets=sets,
        eval_batch_size=eval_batch_size, store_weights=as_name_tuple(store_weights),
        store_logits=store_logits, store_probabilities=store_probabilities,
        prediction_dtype=prediction_dtype, loo_points=loo_points,
        stats_fns=dict(stats_fns or {}),
        device=check_device(device),
    )  # fmt: skip
    _check_store_weights(spec)
    _check_sampler_options(spec)
    return spec


def _target_spec(
    model: Any,
    likelihood: Any,
    prior: Any,
    num_data: int,
    temperature: float,
    init: str,
    train: TrainData,
) -> Any:
    if isinstance(model, nn.Module) and not _is_pyro(model):
        spec = ModuleTargetSpec(model, likelihood, prior, num_data, temperature, init)
        spec.build(0, torch.device("cpu"))  # checks likelihood and prior
        return spec
    if hasattr(model, "build") and hasattr(model, "config"):
        return model
    if _is_pyro(model) or callable(model):
        # sample()'s defaults stand for "not given": a Pyro model brings its own
        if not (isinstance(likelihood, str) and likelihood == "categorical") or not (
            isinstance(prior, int | float) and prior == DEFAULTS.prior_scale
        ):
            raise ValueError(
                "likelihood and prior are for torch modules; a Pyro model's observed sites are "
                "its likelihood and its latent sites its prior: leave them out"
            )
        if init not in ("reset", "prior"):
            raise ValueError(
                f"init={init!r} is for torch modules; a Pyro model's chains start from draws "
                "of its prior (PyroTargetSpec(init='uniform') starts them as Pyro's NUTS does)"
            )
        pyro = importlib.import_module("bayesflat.target.pyro")
        example = train.take(range(min(2, train.num_examples)))
        return pyro.PyroTargetSpec(model, example, num_data=num_data, temperature=temperature)
    raise TypeError(
        f"model must be a torch.nn.Module, a Pyro model or a target spec, got "
        f"{type(model).__name__}"
    )


def _states_posterior(model: Any) -> bool:
    """Whether ``model`` is a Pyro model (module or function) stating its own posterior."""
    return _is_pyro(model) or (callable(model) and not isinstance(model, nn.Module))


def _is_pyro(model: Any) -> bool:
    return any(cls.__module__.startswith("pyro.") for cls in type(model).__mro__)


def _model_device(model: Any) -> str:
    if isinstance(model, nn.Module):
        for p in model.parameters():
            return str(p.device)
    return "cpu"


def _check_store_weights(spec: RunSpec) -> None:
    if isinstance(spec.store_weights, bool) or spec.target.kind != "module":
        return
    keys = list(spec.target.model.state_dict())
    missing = [k for k in spec.store_weights if k not in keys]
    if missing:
        raise ValueError(
            f"store_weights names {missing} that are not state_dict keys; available: {keys}"
        )


def _check_sampler_options(spec: RunSpec) -> None:
    target = spec.target.build(chain_seeds(spec.seed, 0).init, torch.device(spec.device))
    make_sampler(
        spec.sampler, target.module.parameters(), lr=spec.lr, num_data=spec.num_data,
        temperature=spec.temperature, generator=None, options=dict(spec.options),
    )  # fmt: skip


def _choose_executor(executor: str, workers: int) -> str:
    check_choice(executor, "executor", EXECUTORS)
    check_int(workers, "workers", 1, 1024)
    ranks = _distributed.world_size()
    if ranks > 1 and executor not in ("auto", "distributed"):
        raise ValueError(
            f"executor={executor!r} cannot run under a process group of {ranks} ranks: the "
            "ranks divide the chains among themselves; use executor='auto' or 'distributed'"
        )
    if executor != "auto":
        if executor == "processes" and workers < 2:
            raise ValueError("executor='processes' needs workers >= 2")
        return executor
    if ranks > 1:
        return "distributed"
    return "processes" if workers > 1 else "sequential"


# -- the run folder -------------------------------------------------------------------------------


def _prepare_folder(
    output: Any,
    overwrite: bool,
    owner: contextlib.ExitStack,
    check: Callable[[Path], None],
) -> RunFolder | None:
    """Check ``output``, take its lock (held until ``owner`` closes) and clear it if asked.

    ``check(path)`` runs once the folder is locked and before anything in it is removed, so a
    refused run (``overwrite`` included) leaves the previous run as it was.
    """
    if output is None:
        return None
    if not isinstance(output, str | os.PathLike):
        raise TypeError(f"output must be a folder path, got {type(output).__name__}")
    folder = RunFolder(output)
    path = folder.path
    if path.exists() and not path.is_dir():
        raise ValueError(f"output={str(path)!r} is a file; give a folder for the run")
    try:
        owner.enter_context(run_lock(path))
    except OSError as err:
        raise ValueError(f"output folder {path} is not writable: {err.strerror or err}") from None
    check(path)
    if folder.exists() or folder.trace_nc.exists():
        if not overwrite:
            state = "a finished run" if folder.trace_nc.exists() else "an unfinished run"
            raise ValueError(
                f"output folder {path} already holds {state}; continue it with "
                f"bayesflat.resume({str(path)!r}) (`bayesflat run --resume`), or pass "
                "overwrite=True (`--force`) to replace it"
            )
        shutil.rmtree(path / "chains", ignore_errors=True)
        for stale in (folder.run_json, folder.static_nc, folder.trace_nc):
            stale.unlink(missing_ok=True)
    try:
        path.mkdir(parents=True, exist_ok=True)
        with _io.atomic_path(path / ".write-test", fsync=False) as temporary:
            temporary.write_bytes(b"")
        (path / ".write-test").unlink()
    except OSError as err:
        raise ValueError(f"output folder {path} is not writable: {err.strerror or err}") from None
    return folder


def _static(spec: RunSpec) -> Static:
    observed: dict[str, Any] = {s.name: s.labels for s in spec.eval_sets if s.labels is not None}
    constant: dict[str, Any] = {}
    target = spec.target.build(chain_seeds(spec.seed, 0).init, torch.device("cpu"))
    if target.categorical:
        idx = spec.loo_indices()
        # Integer-valued float labels (a Bernoulli likelihood observes floats) stored as ints.
        observed["train"] = torch.as_tensor(spec.train.take(idx)[1]).long()
        if len(idx) < spec.train.num_examples:
            constant["train_index"] = idx
    coords = {}
    if spec.target.kind == "module":
        coords["tensor"] = [n for n, p in target.module.named_parameters() if p.requires_grad]
    return Static(
        observed_data=observed, constant_data=constant, coords=coords, attrs=_attrs(spec, target)
    )


def _attrs(spec: RunSpec, target: Any) -> dict[str, Any]:
    sampler = make_sampler(
        spec.sampler, target.module.parameters(), lr=spec.lr, num_data=spec.num_data,
        temperature=spec.temperature, generator=None, options=dict(spec.options),
    )  # fmt: skip
    sampler.bind_schedule(spec.burn_in, spec.draws, spec.thin)
    planned = sampler.planned_steps(spec.burn_in, spec.draws, spec.thin)
    return {
        **sampler.config(),
        **spec.target.config(),
        "sampler": spec.sampler,
        "chains": spec.chains,
        "draws": spec.draws,
        "burn_in": spec.burn_in,
        "thin": spec.thin,
        "batch_size": spec.batch_size,
        "seed": spec.seed,
        "planned_steps": planned,
        "eval_sets": [s.name for s in spec.eval_sets],
        "store_logits": spec.store_logits,
        "store_probabilities": spec.store_probabilities,
        "prediction_dtype": spec.prediction_dtype,
        "loo_points": len(spec.loo_indices()),
        "device": spec.device,
    }


def _meta(spec: RunSpec, static: Static, recipe: Mapping[str, Any] | None, status: str) -> dict:
    identity = spec.identity()
    call = {
        k: identity[k]
        for k in ("sampler", "chains", "burn_in", "draws", "thin", "batch_size", "seed",
                  "temperature", "eval_batch_size", "store_logits", "loo_points")
    }  # fmt: skip
    call.update(
        lr=spec.lr, num_data=spec.num_data, store_weights=identity["store_weights"],
        store_probabilities=spec.store_probabilities, prediction_dtype=spec.prediction_dtype,
        device=spec.device,
    )  # fmt: skip
    if spec.target.kind == "module":
        call.update(
            init=spec.target.init, likelihood=_json_or_none(spec.target.likelihood),
            prior=_json_or_none(spec.target.prior),
        )  # fmt: skip
    return {
        "format": _FORMAT,
        "version": 1,
        "identity": {"spec": identity, "call": call, "sampler_options": dict(spec.options)},
        "attrs": static.attrs,
        "coords": static.coords,
        "recipe": dict(recipe) if recipe is not None else None,
        "status": status,
    }


def _json_or_none(value: Any) -> Any:
    return value if value is None or isinstance(value, str | int | float) else None


def _from_recipe(meta: Mapping[str, Any], folder: RunFolder) -> tuple[Any, Any, Any, dict]:
    recipe = meta.get("recipe")
    if not recipe:
        raise ValueError(
            f"the run in {folder.path} was started from Python: pass the same model and "
            "train_data (and eval_sets, stats_fns) to bayesflat.resume"
        )
    module_name, _, function = str(recipe.get("rebuild", "")).partition(":")
    if not module_name.startswith("bayesflat."):
        raise ValueError(f"{folder.run_json}: unknown recipe {recipe.get('rebuild')!r}")
    rebuild = getattr(importlib.import_module(module_name), function)
    return rebuild(recipe)


def _capacity(spec: RunSpec, path: Path | None, *, disk: bool) -> None:
    """Refuse a run whose draws cannot fit in free memory (or on the output's disk)."""
    target = spec.target.build(chain_seeds(spec.seed, 0).init, torch.device("cpu"))
    module = target.module
    per_draw = 0
    if spec.store_weights is not False and spec.target.kind == "module":
        state = module.state_dict()
        names = state if spec.store_weights is True else spec.store_weights
        per_draw += 4 * sum(state[k].numel() for k in names if state[k].is_floating_point())
    with torch.no_grad():
        module.eval()
        outputs = 1
        if spec.eval_sets:
            first = next(iter(spec.eval_sets[0].batches(1, torch.device("cpu"))))
            outputs = int(target.predict(first).shape[-1])
    for s in spec.eval_sets:
        copies = int(spec.store_logits) + int(spec.store_probabilities)
        per_draw += s.size * outputs * (2 if spec.prediction_dtype == "float16" else 4) * copies
        per_draw += 8 * s.size if s.labels is not None else 0
    per_draw += 8 * len(spec.loo_indices()) + 8 * 32
    total = per_draw * spec.chains * spec.draws
    if disk:
        free = shutil.disk_usage(path).free  # type: ignore[arg-type]
        where = f"on the disk of {path}"
    else:
        free = _available_memory()
        where = "in memory"
    if free is not None and total > 0.9 * free:
        raise ValueError(
            f"the draws of this run need about {_bytes(total)} ({spec.chains} chains x "
            f"{spec.draws} draws x {_bytes(per_draw)}) but only {_bytes(free)} is free {where}; "
            "lower draws or chains, store fewer weights (store_weights), or give an output "
            "folder on a larger disk"
        )


def _available_memory() -> int | None:
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


# -- running --------------------------------------------------------------------------------------


def _execute(
    spec: RunSpec,
    static: Static,
    folder: RunFolder | None,
    states: dict[int, ChainState],
    *,
    executor: str,
    workers: int,
    parallel: str,
    progress: bool,
    checkpoint_every: int | None,
) -> Any:
    if executor == "distributed":
        return _distributed.run(
            spec, static, folder, states, parallel=parallel, progress=progress,
            checkpoint_every=checkpoint_every,
        )  # fmt: skip
    todo = [c for c in range(spec.chains) if not (c in states and states[c].done)]
    planned = int(static.attrs["planned_steps"])
    bar = Progress(
        todo, planned, spec.draws, enabled=progress,
        start={c: (s.step, s.kept) for c, s in states.items()},
    )  # fmt: skip
    t0 = time.perf_counter()
    temporary = None
    with Interrupt() as stop:
        try:
            if executor == "processes":
                if folder is None:
                    temporary = RunFolder(tempfile.mkdtemp(prefix="bayesflat-run-"))
                    temporary.write_static(static)
                run_folder = folder or temporary
                assert run_folder is not None
                outcomes = run_processes(
                    spec, todo, run_folder, workers=workers, threads=1, coords=static.coords,
                    progress=bar, stop=stop, checkpoint_every=checkpoint_every,
                    checkpoint_interval=5.0,
                )  # fmt: skip
                sink: Any = FolderSink(run_folder, spec.chains, spec.draws, static.coords)
                for c in range(spec.chains):
                    state = run_folder.checkpoint(c)
                    sink.begin(c, state.kept if state is not None else 0)
            else:
                sink = (
                    FolderSink(folder, spec.chains, spec.draws, static.coords)
                    if folder is not None
                    else MemorySink(spec.chains, spec.draws)
                )
                run = run_sequential
                if executor == "vectorised":
                    from bayesflat.run.vectorised import run_vectorised as run
                outcomes = run(
                    spec, todo, sink, states, folder=folder, progress=bar, stop=stop,
                    checkpoint_every=checkpoint_every, checkpoint_interval=5.0,
                )  # fmt: skip
                for c, state in states.items():
                    if state.done or c not in todo:
                        sink.begin(c, state.kept)
            bar.close()
            static.attrs["wall_time_s"] = time.perf_counter() - t0
            trace = _finish(spec, static, folder, sink, outcomes, temporary)
            if stop.is_set():
                _late_interrupt(spec, folder, trace)
            return trace
        finally:
            bar.close()
            if temporary is not None:
                shutil.rmtree(temporary.path, ignore_errors=True)


def _finish(
    spec: RunSpec,
    static: Static,
    folder: RunFolder | None,
    sink: Any,
    outcomes: list[ChainOutcome],
    temporary: RunFolder | None,
) -> Any:
    bad = next((o for o in outcomes if o.status != "done"), None)
    if bad is None:
        missing = [c for c in range(spec.chains) if sink.kept(c) < spec.draws]
        if not missing:
            trace = sink.finish(static, complete=True)
            if temporary is not None:
                trace = _loaded(trace)
            if folder is not None:
                meta = folder.read_meta()
                folder.write_meta({**meta, "status": "complete", "attrs": static.attrs})
            return trace
        bad = ChainOutcome(missing[0], "failed", f"chain {missing[0]} did not finish")
    reason = bad.message if bad.status == "failed" else f"interrupted at chain {bad.chain}"
    kept = sum(sink.kept(c) for c in range(spec.chains))
    partial = None
    if kept:
        partial = sink.finish(static, complete=False, reason=reason)
        if temporary is not None:
            partial = _loaded(partial)
    if folder is not None:
        meta = folder.read_meta()
        folder.write_meta({**meta, "status": "stopped", "stop_reason": reason})
        where = f"; every chain is checkpointed in {folder.path}: bayesflat.resume continues it"
    else:
        where = ""
    error = SamplingError(
        f"sampling stopped: {reason}; {kept} draws kept{where}", partial, chain=bad.chain,
        step=bad.step,
    )  # fmt: skip
    if bad.status == "stopped":
        raise error from KeyboardInterrupt()
    raise error


def _late_interrupt(spec: RunSpec, folder: RunFolder | None, trace: Any) -> None:
    """A Ctrl-C that came after every chain's last step still stops the caller."""
    where = f" (in {folder.trace_nc})" if folder is not None else ""
    raise SamplingError(
        f"interrupted after the last step: the run is complete, all {spec.draws} draws of "
        f"{spec.chains} chains kept{where}",
        trace,
        chain=spec.chains - 1,
        step=-1,
    ) from KeyboardInterrupt()


def _loaded(trace: Any) -> Any:
    from bayesflat.trace.build import assemble, groups, root_attrs

    parts = {name: data.load() for name, data in groups(trace).items()}
    return assemble(parts, root_attrs(trace))


def assemble_folder(path: str | os.PathLike[str]) -> Path:
    """Write the ``trace.nc`` of a finished run folder (normally done by the run itself)."""
    folder = RunFolder(path)
    meta = folder.read_meta()
    static = folder.read_static(meta.get("attrs", {}), meta.get("coords", {}))
    chains = int(meta["identity"]["spec"]["chains"])
    kept = [s.kept if (s := folder.checkpoint(c)) is not None else 0 for c in range(chains)]
    assemble_trace(folder, static, kept)
    return folder.trace_nc
