"""The sampling driver: chains, burn-in, thinning, seeds, evaluation sets, checkpoints.

The driver owns the loop; a sampler owns one step. Each chain starts from its own
initialisation, with its own :class:`torch.Generator` s for the initial weights, the minibatch
order and the sampler's noise, all derived from ``seed`` and the chain index, so the same
seed gives the same trace.

Trajectory hooks
----------------
A sampler may define any of three optional methods, looked up by name, to take part in what
is recorded (trajectory methods such as SWA and SWAG use them):

``begin_chain(context)``
    Called once per chain, before its first step, with a :class:`ChainContext`: the chain's
    module, an iterable over one pass of the training data (for recomputing BatchNorm
    statistics) and the run's ``burn_in``, ``draws`` and ``thin``.
``recorded_state()``
    A context manager entered around every kept draw: inside it the module holds the state to
    record (e.g. the SWA average with recomputed BatchNorm statistics); on exit the iterate is
    restored. Statistics are read inside it.
``chain_draws(count)``
    An iterator; when defined, the chain's kept points record nothing and, after the chain's
    last step, each of the ``count = draws`` states it yields (the module holds the draw when
    it yields; it yields a dict of extra statistics) is recorded as one draw. For such draws
    ``lp`` is the potential of the draw on one training minibatch, evaluated in eval mode;
    ``step`` is the chain's last step and the other statistics are those of that step.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from bayesflat import samplers as _samplers
from bayesflat import trace as _trace
from bayesflat._checks import validate_temperature
from bayesflat.target.torch import Likelihood, Posterior, Prior

__all__ = ["ChainContext", "SamplingError", "chain_seeds", "sample"]


@dataclass(frozen=True)
class ChainContext:
    """What the driver tells a sampler's ``begin_chain`` hook about the chain it will run.

    Attributes
    ----------
    model : nn.Module
        The chain's module (its parameters are the sampler's).
    train_batches : iterable of (inputs, targets)
        Re-iterable; every iteration is one pass over the training data in fixed order, on the
        chain's device, independent of the chain's minibatch stream.
    burn_in, draws, thin : int
        The run's schedule: steps discarded, draws kept, steps between kept draws.
    """

    model: nn.Module
    train_batches: Iterable[tuple[Tensor, Tensor]]
    burn_in: int
    draws: int
    thin: int


class SamplingError(RuntimeError):
    """A run stopped early. ``trace`` holds every draw kept before the stop.

    ``trace`` is ``None`` when the stop came before the first kept draw.

    Draws that were not reached are NaN; ``trace`` root attrs carry ``complete = False``,
    ``stop_reason`` and ``draws_kept`` per chain. If the run was given ``output``, the
    partial trace has been saved there too.
    """

    def __init__(self, message: str, trace: Any, *, chain: int, step: int) -> None:
        super().__init__(message)
        self.trace = trace
        self.chain = chain
        self.step = step


def chain_seeds(seed: int, chain: int) -> tuple[int, int, int]:
    """Independent seeds (initialisation, minibatch order, sampler noise) for one chain."""
    state = np.random.SeedSequence([int(seed), int(chain)]).generate_state(3, dtype=np.uint64)
    return tuple(int(s) & 0x7FFF_FFFF_FFFF_FFFF for s in state)  # type: ignore[return-value]


def _check_int(value: object, argname: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{argname} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _as_tensor(x: object, argname: str, dtype: torch.dtype | None = None) -> Tensor:
    if isinstance(x, Tensor):
        t = x
    elif isinstance(x, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(x))
    else:
        raise TypeError(f"{argname} must be a torch.Tensor or numpy array, got {type(x).__name__}")
    if dtype is not None:
        t = t.to(dtype)
    elif t.is_floating_point() and t.dtype == torch.float64:
        t = t.float()
    return t


class _Batches:
    """Endless minibatches from tensors, a Dataset or a DataLoader."""

    def __init__(self, train_data: object, batch_size: int) -> None:
        self.loader: DataLoader | None = None
        self.dataset: Dataset | None = None
        self.x: Tensor | None = None
        self.y: Tensor | None = None
        self.batch_size = batch_size
        if isinstance(train_data, DataLoader):
            self.loader = train_data
            self.num_data = len(train_data.dataset)  # type: ignore[arg-type]
        elif isinstance(train_data, Dataset):
            self.dataset = train_data
            self.num_data = len(train_data)  # type: ignore[arg-type]
        elif isinstance(train_data, tuple | list) and len(train_data) == 2:
            self.x = _as_tensor(train_data[0], "train_data[0]")
            self.y = _as_tensor(train_data[1], "train_data[1]")
            if not self.y.is_floating_point():
                self.y = self.y.long()
            if self.x.shape[0] != self.y.shape[0]:
                raise ValueError(
                    f"train_data inputs and targets differ in length: "
                    f"{self.x.shape[0]} vs {self.y.shape[0]}"
                )
            self.num_data = int(self.x.shape[0])
        else:
            raise TypeError(
                "train_data must be (inputs, targets) tensors or arrays, a torch Dataset or a "
                f"DataLoader, got {type(train_data).__name__}"
            )
        if self.num_data < 1:
            raise ValueError("train_data is empty")
        if self.loader is None and batch_size > self.num_data:
            raise ValueError(
                f"batch_size={batch_size} exceeds the {self.num_data} training examples; "
                "choose batch_size <= len(train_data)"
            )

    def iterate(self, generator: torch.Generator, device: torch.device) -> Iterator[tuple]:
        if self.x is not None and self.y is not None:
            x, y = self.x.to(device), self.y.to(device)
            n, b = self.num_data, self.batch_size
            while True:
                order = torch.randperm(n, generator=generator).to(device)
                for start in range(0, n - b + 1, b):
                    idx = order[start : start + b]
                    yield x[idx], y[idx]
        loader = self.loader
        if loader is None:
            loader = DataLoader(
                self.dataset, batch_size=self.batch_size, shuffle=True, drop_last=True,
                generator=generator,
            )  # fmt: skip
        while True:
            empty = True
            for xb, yb in loader:
                empty = False
                yield xb.to(device), yb.to(device)
            if empty:
                raise ValueError("the DataLoader given as train_data yields no batches")

    def one_pass(self, device: torch.device) -> Iterable[tuple[Tensor, Tensor]]:
        """Re-iterable single pass over the training data in order (last batch kept)."""
        return _OnePass(self, device)


class _OnePass:
    def __init__(self, batches: _Batches, device: torch.device) -> None:
        self.batches, self.device = batches, device

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        b = self.batches
        if b.x is not None and b.y is not None:
            for start in range(0, b.num_data, b.batch_size):
                end = start + b.batch_size
                yield b.x[start:end].to(self.device), b.y[start:end].to(self.device)
            return
        loader = b.loader or DataLoader(b.dataset, batch_size=b.batch_size, shuffle=False)
        for xb, yb in loader:
            yield xb.to(self.device), yb.to(self.device)


def _eval_sets(eval_sets: Mapping[str, object] | None) -> dict[str, tuple[Tensor, Tensor | None]]:
    if eval_sets is None:
        return {}
    if not isinstance(eval_sets, Mapping):
        raise TypeError(
            "eval_sets must be a mapping name -> inputs or name -> (inputs, labels), "
            f"got {type(eval_sets).__name__}"
        )
    out: dict[str, tuple[Tensor, Tensor | None]] = {}
    for name, value in eval_sets.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(
                f"eval_sets keys must be identifiers such as 'test' or 'ood_patches', got {name!r}"
            )
        if isinstance(value, tuple | list):
            if len(value) != 2:
                raise ValueError(f"eval_sets[{name!r}] must be inputs or (inputs, labels)")
            x = _as_tensor(value[0], f"eval_sets[{name!r}][0]")
            y = _as_tensor(value[1], f"eval_sets[{name!r}][1]", torch.long)
            if y.shape != (x.shape[0],):
                raise ValueError(
                    f"eval_sets[{name!r}] labels must have shape ({x.shape[0]},), got "
                    f"{tuple(y.shape)}"
                )
            out[name] = (x, y)
        else:
            out[name] = (_as_tensor(value, f"eval_sets[{name!r}]"), None)
    return out


def _init_chain(model: nn.Module, init: str, seed: int, device: torch.device) -> nn.Module:
    chain_model = copy.deepcopy(model).to("cpu")
    if init == "reset":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for module in chain_model.modules():
                reset = getattr(module, "reset_parameters", None)
                if callable(reset):
                    reset()
    return chain_model.to(device)


def _make_sampler(
    name: str, params: Any, *, lr: float, num_data: int, temperature: float,
    generator: torch.Generator, options: dict[str, Any],
) -> _samplers.Sampler:  # fmt: skip
    cls = _samplers.get(name)
    accepted = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    unknown = [k for k in options if k not in accepted] if not takes_any else []
    if unknown:
        allowed = [
            k for k in accepted
            if k not in ("self", "params", "lr", "num_data", "temperature", "generator")
        ]  # fmt: skip
        raise ValueError(
            f"sampler {name!r} does not take option(s) {unknown}; it accepts {allowed}"
        )
    return cls(
        params, lr=lr, num_data=num_data, temperature=temperature, generator=generator, **options
    )


@torch.no_grad()
def _evaluate(model: nn.Module, x: Tensor, batch_size: int, device: torch.device) -> Tensor:
    was_training = model.training
    model.eval()
    outs = [model(x[i : i + batch_size].to(device)) for i in range(0, x.shape[0], batch_size)]
    model.train(was_training)
    return torch.cat(outs).float()


def sample(
    model: nn.Module,
    train_data: object,
    *,
    sampler: str = "fsgld",
    chains: int = 4,
    burn_in: int = 1000,
    draws: int = 100,
    thin: int = 10,
    batch_size: int = 64,
    eval_sets: Mapping[str, object] | None = None,
    seed: int = 0,
    progress: bool = True,
    lr: float = 1e-3,
    temperature: float | None = None,
    num_data: int | None = None,
    likelihood: str | Likelihood = "categorical",
    prior: Prior | float | None = 1.0,
    init: str = "reset",
    store_weights: bool | list[str] = True,
    store_logits: bool = False,
    log_likelihood_set: str | None = None,
    eval_batch_size: int = 1024,
    output: str | Path | None = None,
    stats_fns: Mapping[str, Callable[[nn.Module, _samplers.Sampler], Any]] | None = None,
    **sampler_options: Any,
) -> Any:
    """Run ``chains`` chains of a registered sampler and return an ArviZ trace.

    Each chain runs ``burn_in`` steps, then keeps every ``thin``-th state until ``draws`` are
    kept (``burn_in + draws * thin`` steps; a sampler with exploration phases, such as a
    cyclical schedule, counts only the steps of its sampling phases). Trajectory methods
    record a summary of the iterates instead, through the hooks described in this module:
    ``"swa"`` the running average at every kept state, ``"swag"`` ``draws`` draws of its
    fitted Gaussian after the chain's last step.

    At every kept draw the driver records the weights, the sampler's statistics, the
    class probabilities on every evaluation set and the pointwise log-likelihood of one
    labelled set.

    Parameters
    ----------
    model : nn.Module
        The network. It is copied per chain; the caller's module is not modified.
    train_data : (inputs, targets), Dataset or DataLoader
        Training data. Tensors/arrays are minibatched by the driver (reshuffled every epoch
        with the chain's generator; last partial batch dropped).
    sampler : str, default "fsgld"
        A name from :func:`bayesflat.samplers.available`.
    chains, burn_in, draws, thin : int
        Number of chains (>= 1), steps discarded first (>= 0), draws kept per chain (>= 1),
        steps between kept draws (>= 1).
    batch_size : int, default 64
        Minibatch size ``|B|`` (ignored when ``train_data`` is a DataLoader).
    eval_sets : mapping, optional
        ``name -> inputs`` or ``name -> (inputs, labels)``. Predictions are stored for all;
        labels enable accuracy/NLL and the ``log_likelihood`` group.
    seed : int, default 0
        Root seed; chain ``c`` uses seeds derived from ``(seed, c)``.
    progress : bool, default True
        Show a tqdm bar per chain with the draw count and the running potential.
    lr : float, default 1e-3
        Step size in mean-loss units.
    temperature : float, optional
        ``T``; defaults to 1 for samplers and 0 for optimisers (e.g. ``"sgd"``).
    num_data : int, optional
        ``N``; defaults to the number of training examples.
    likelihood, prior
        See :class:`bayesflat.target.torch.Posterior`.
    init : {"reset", "model"}, default "reset"
        ``"reset"`` re-initialises every chain independently (``reset_parameters`` under the
        chain's seed); ``"model"`` starts every chain from the given weights.
    store_weights : bool or list of str, default True
        Record all ``state_dict`` entries, none, or the named ones.
    store_logits : bool, default False
        Also record logits on each evaluation set (as ``<set>_logits`` in ``predictions``),
        for energy-based OOD scores.
    log_likelihood_set : str, optional
        Labelled evaluation set whose pointwise log-likelihood fills ``log_likelihood``
        (default: the first labelled set), so ``az.loo`` works without arguments.
    eval_batch_size : int, default 1024
        Batch size for evaluation passes.
    output : path, optional
        Save the trace there (netCDF, atomic). Saved after every chain, so a stop loses
        nothing already computed.
    stats_fns : mapping, optional
        ``name -> fn(model, sampler)`` evaluated at every kept draw; each returns a number
        or an array recorded in ``sample_stats`` (e.g. a flatness diagnostic).
    **sampler_options
        Passed to the sampler class (e.g. ``sigma``, ``eta`` for fSGLD).

    Returns
    -------
    arviz.InferenceData (ArviZ 0.x) or xarray.DataTree (ArviZ 1.x)

    Raises
    ------
    SamplingError
        When a potential or gradient becomes non-finite (message names chain and step) or the
        run is interrupted; ``err.trace`` holds the draws kept so far.
    """
    entry = _samplers.entry(sampler)
    chains = _check_int(chains, "chains", 1)
    burn_in = _check_int(burn_in, "burn_in", 0)
    draws = _check_int(draws, "draws", 1)
    thin = _check_int(thin, "thin", 1)
    batch_size = _check_int(batch_size, "batch_size", 1)
    eval_batch_size = _check_int(eval_batch_size, "eval_batch_size", 1)
    seed = _check_int(seed, "seed", 0)
    if init not in ("reset", "model"):
        raise ValueError(f"init must be 'reset' or 'model', got {init!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if temperature is None:
        temperature = 1.0 if entry.is_sampler else 0.0
    temperature = validate_temperature(temperature)
    batches = _Batches(train_data, batch_size)
    n_data = batches.num_data if num_data is None else num_data
    sets = _eval_sets(eval_sets)
    labelled = [name for name, (_, y) in sets.items() if y is not None]
    if log_likelihood_set is None:
        log_likelihood_set = labelled[0] if labelled else None
    elif log_likelihood_set not in labelled:
        raise ValueError(
            f"log_likelihood_set={log_likelihood_set!r} is not a labelled evaluation set; "
            f"labelled sets: {labelled}"
        )
    params = list(model.parameters())
    device = params[0].device if params else torch.device("cpu")
    probe = Posterior(model, num_data=n_data, temperature=temperature, likelihood=likelihood,
                      prior=prior)  # fmt: skip
    if sets and not probe.likelihood.name == "categorical":
        raise ValueError("eval_sets need likelihood='categorical' (class probabilities)")

    recorder = _Recorder(
        chains=chains, draws=draws, sets=sets, store_weights=store_weights,
        store_logits=store_logits, log_likelihood_set=log_likelihood_set,
    )  # fmt: skip
    attrs: dict[str, Any] = {
        "chains": chains, "draws": draws, "burn_in": burn_in, "thin": thin,
        "batch_size": batch_size, "seed": seed, "init": init,
        "model": type(model).__name__, "eval_sets": list(sets),
        "log_likelihood_set": log_likelihood_set or "",
    }  # fmt: skip
    output_path = Path(output) if output is not None else None
    t_start = time.perf_counter()
    for c in range(chains):
        init_seed, data_seed, noise_seed = chain_seeds(seed, c)
        chain_model = _init_chain(model, init, init_seed, device)
        posterior = Posterior(chain_model, num_data=n_data, temperature=temperature,
                              likelihood=likelihood, prior=prior)  # fmt: skip
        data_gen = torch.Generator().manual_seed(data_seed)
        noise_gen = torch.Generator(device=device).manual_seed(noise_seed)
        opt = _make_sampler(
            sampler, chain_model.parameters(), lr=lr, num_data=n_data,
            temperature=temperature, generator=noise_gen, options=dict(sampler_options),
        )  # fmt: skip
        begin_chain = getattr(opt, "begin_chain", None)
        if callable(begin_chain):
            begin_chain(ChainContext(chain_model, batches.one_pass(device), burn_in, draws, thin))
        recorded_state = getattr(opt, "recorded_state", None)
        chain_draws = getattr(opt, "chain_draws", None)
        planned = opt.planned_steps(burn_in, draws, thin)
        if c == 0:
            attrs.update(opt.config())
            attrs.update(posterior.config())
            attrs["sampler"] = sampler
        bar = _progress(progress, planned, c, chains)
        batch_iter = batches.iterate(data_gen, device)
        chain_model.train()
        running = math.nan
        step = -1
        collected = 0
        kept_points = 0
        try:
            while kept_points < draws:
                step += 1
                if step >= 10 * planned:
                    raise FloatingPointError(
                        f"{sampler!r} kept only {kept_points} of {draws} draws in {step} "
                        f"steps at chain {c}; its sampling phases are too short for thin={thin}"
                    )
                xb, yb = next(batch_iter)
                loss = float(opt.step(posterior.closure(xb, yb)))
                if not math.isfinite(loss):
                    raise FloatingPointError(
                        f"non-finite potential {loss} at chain {c}, step {step}"
                    )
                running = loss if math.isnan(running) else 0.98 * running + 0.02 * loss
                if step >= burn_in and opt.collecting():
                    collected += 1
                    if collected % thin == 0:
                        kept_points += 1
                        if chain_draws is not None:
                            if not math.isfinite(opt.grad_norm()):
                                raise FloatingPointError(
                                    f"non-finite gradient norm at chain {c}, step {step}"
                                )
                        else:
                            with recorded_state() if recorded_state else contextlib.nullcontext():
                                _keep(recorder, opt, chain_model, c, kept_points - 1, step, {},
                                      stats_fns, eval_batch_size, device)  # fmt: skip
                if bar is not None and step % 25 == 0:
                    bar.set_postfix(draw=kept_points, potential=f"{running:.4f}",
                                    refresh=False)  # fmt: skip
                    bar.update(min(step + 1, planned) - bar.n)
            if chain_draws is not None:
                with contextlib.closing(chain_draws(draws)) as post_draws:
                    for draw, extra in enumerate(post_draws):
                        lp = _eval_potential(posterior, *next(batch_iter))
                        if not math.isfinite(lp):
                            raise FloatingPointError(
                                f"non-finite potential {lp} at draw {draw} of chain {c}"
                            )
                        _keep(recorder, opt, chain_model, c, draw, step, {**extra, "lp": lp},
                              stats_fns, eval_batch_size, device)  # fmt: skip
                if recorder.kept[c] < draws:
                    raise FloatingPointError(
                        f"{sampler!r} gave only {recorder.kept[c]} of {draws} draws at chain {c}"
                    )
        except (FloatingPointError, KeyboardInterrupt) as err:
            if bar is not None:
                bar.close()
            reason = str(err) if isinstance(err, FloatingPointError) else (
                f"interrupted at chain {c}, step {step}"
            )  # fmt: skip
            partial = None
            if any(recorder.kept):
                partial = recorder.build(attrs, complete=False, reason=reason, upto_chain=c)
            saved = partial is not None and output_path is not None
            if saved:
                _trace.save(partial, output_path)
            where = f" (partial trace saved to {output_path})" if saved else ""
            raise SamplingError(
                f"sampling stopped: {reason}; {sum(recorder.kept)} draws kept{where}",
                partial, chain=c, step=step,
            ) from err  # fmt: skip
        if bar is not None:
            bar.set_postfix(draw=recorder.kept[c], potential=f"{running:.4f}", refresh=False)
            bar.update(planned - bar.n)
            bar.close()
        if output_path is not None and c < chains - 1:
            _trace.save(
                recorder.build(attrs, complete=False, reason="running", upto_chain=c),
                output_path,
            )
    attrs["wall_time_s"] = time.perf_counter() - t_start
    result = recorder.build(attrs, complete=True, reason="", upto_chain=chains - 1)
    if output_path is not None:
        _trace.save(result, output_path)
    return result


def _keep(
    recorder: _Recorder, opt: _samplers.Sampler, model: nn.Module, chain: int, draw: int,
    step: int, extra: Mapping[str, float],
    stats_fns: Mapping[str, Callable[[nn.Module, _samplers.Sampler], Any]] | None,
    eval_batch_size: int, device: torch.device,
) -> None:  # fmt: skip
    """Record the module's current state as ``draw`` of ``chain`` with the sampler's stats."""
    stats = opt.stats()
    if not math.isfinite(stats["grad_norm"]):
        raise FloatingPointError(f"non-finite gradient norm at chain {chain}, step {step}")
    stats["step"] = step
    stats.update(extra)
    for name, fn in (stats_fns or {}).items():
        stats[name] = fn(model, opt)
    recorder.record(chain, draw, model, stats, eval_batch_size, device)


@torch.no_grad()
def _eval_potential(posterior: Posterior, inputs: Tensor, targets: Tensor) -> float:
    """``L_B`` of the current weights on one minibatch, in eval mode (running statistics)."""
    model = posterior.model
    was_training = model.training
    model.eval()
    try:
        return float(posterior.potential(inputs, targets))
    finally:
        model.train(was_training)


def _progress(enabled: bool, total: int, chain: int, chains: int) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"chain {chain + 1}/{chains}", unit="step", leave=True)


class _Recorder:
    """Preallocated arrays for every kept draw; unfilled entries stay NaN."""

    def __init__(
        self, *, chains: int, draws: int, sets: dict[str, tuple[Tensor, Tensor | None]],
        store_weights: bool | list[str], store_logits: bool, log_likelihood_set: str | None,
    ) -> None:  # fmt: skip
        self.chains, self.draws = chains, draws
        self.sets = sets
        self.store_weights = store_weights
        self.store_logits = store_logits
        self.ll_set = log_likelihood_set
        self.kept = [0] * chains
        self.weights: dict[str, np.ndarray] = {}
        self.stats: dict[str, np.ndarray] = {}
        self.preds: dict[str, np.ndarray] = {}
        self.loglik: dict[str, np.ndarray] = {}

    def _slot(self, store: dict[str, np.ndarray], key: str, shape: tuple, dtype: Any) -> np.ndarray:
        arr = store.get(key)
        if arr is None:
            arr = store[key] = np.full((self.chains, self.draws, *shape), np.nan, dtype=dtype)
        return arr

    def _weight_names(self, state: dict[str, Tensor]) -> list[str]:
        floats = [k for k, v in state.items() if v.is_floating_point()]
        if self.store_weights is True:
            return floats
        if self.store_weights is False:
            return []
        missing = [k for k in self.store_weights if k not in state]
        if missing:
            raise ValueError(
                f"store_weights names {missing} are not state_dict keys; available: {floats}"
            )
        return list(self.store_weights)

    def record(
        self, chain: int, draw: int, model: nn.Module, stats: dict[str, float],
        eval_batch_size: int, device: torch.device,
    ) -> None:  # fmt: skip
        state = model.state_dict()
        for key in self._weight_names(state):
            value = state[key].detach().float().cpu().numpy()
            self._slot(self.weights, key, value.shape, np.float32)[chain, draw] = value
        for key, value in stats.items():
            value = np.asarray(value, dtype=np.float64)
            self._slot(self.stats, key, value.shape, np.float64)[chain, draw] = value
        for name, (x, y) in self.sets.items():
            logits = _evaluate(model, x, eval_batch_size, device)
            log_probs = torch.log_softmax(logits, dim=-1)
            probs = log_probs.exp().cpu().numpy()
            self._slot(self.preds, name, probs.shape, np.float32)[chain, draw] = probs
            if self.store_logits:
                lg = logits.cpu().numpy()
                self._slot(self.preds, f"{name}_logits", lg.shape, np.float32)[chain, draw] = lg
            if y is not None and name == self.ll_set:
                ll = log_probs.gather(1, y.to(log_probs.device)[:, None])[:, 0].cpu().numpy()
                self._slot(self.loglik, name, ll.shape, np.float64)[chain, draw] = ll
        self.kept[chain] = draw + 1

    def build(self, attrs: dict[str, Any], *, complete: bool, reason: str, upto_chain: int) -> Any:
        n = upto_chain + 1

        def cut(store: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            return {k: v[:n] for k, v in store.items()}

        observed = {name: y.cpu().numpy() for name, (_, y) in self.sets.items() if y is not None}
        run_attrs = {
            **attrs,
            "complete": complete,
            "stop_reason": reason,
            "draws_kept": list(self.kept[:n]),
        }
        return _trace.build_trace(
            posterior=cut(self.weights),
            sample_stats=cut(self.stats),
            predictions=cut(self.preds) or None,
            log_likelihood=cut(self.loglik) or None,
            observed_data=observed or None,
            attrs=run_attrs,
        )
