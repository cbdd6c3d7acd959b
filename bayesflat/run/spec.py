"""The frozen description of a run: what to sample, how, and what to record.

A :class:`RunSpec` holds everything that determines a run's draws. It is checked once, before
the first step, and is what every executor hands to :func:`bayesflat.run.chain.run_chain`.
:meth:`RunSpec.identity` lists the settings a resumed run must share with the stored one.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import math
import pickle
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from bayesflat import samplers as _samplers
from bayesflat._checks import check_bool, check_choice, check_int
from bayesflat.run.stream import TrainData, as_tensor, fingerprint
from bayesflat.target.torch import GaussianPrior, Likelihood, Posterior, Prior

__all__ = [
    "ChainContext",
    "ChainSeeds",
    "EvalSet",
    "ModuleTargetSpec",
    "PREDICTION_DTYPES",
    "RunSpec",
    "chain_seeds",
    "make_sampler",
]

PREDICTION_DTYPES = ("float32", "float16")
"""Storage types of the ``predictions`` group: float16 halves it. It keeps 11 significant bits:
a stored probability moves by at most 2^-12 = 2.4e-4; a logit ``z`` by ``|z| 2^-11``, so on the
default digits run, whose logits reach 160, a probability computed from float16 logits moves
by up to 7e-3 (the BMA test NLL by 8e-7 nats)."""


class ChainSeeds(NamedTuple):
    """Independent seeds of one chain."""

    init: int
    """Initial parameters."""
    data: int
    """Minibatch order (and augmentation)."""
    noise: int
    """The sampler's noise (Langevin kicks, perturbations)."""
    model: int
    """torch's global generator inside the chain (dropout masks)."""


def chain_seeds(seed: int, chain: int) -> ChainSeeds:
    """The seeds of chain ``chain`` (global index) of a run with root seed ``seed``.

    Derived with :class:`numpy.random.SeedSequence` from ``(seed, chain)``, so chain ``k``
    is the same whichever process or executor runs it.
    """
    state = np.random.SeedSequence([int(seed), int(chain)]).generate_state(4, dtype=np.uint64)
    return ChainSeeds(*(int(s) & 0x7FFF_FFFF_FFFF_FFFF for s in state))


@dataclass(frozen=True)
class ChainContext:
    """What the run engine tells a sampler's ``begin_chain`` hook about the chain it will run.

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
    train_batches: Any
    burn_in: int
    draws: int
    thin: int


@torch.no_grad()
def prior_draw_(target: Posterior, generator: torch.Generator) -> None:
    """Set every trainable parameter to a draw of the tempered Gaussian prior, in place.

    ``theta_j ~ N(0, T s_j^2)``, with ``s_j`` the prior scale of the parameter
    (``GaussianPrior.scale_for``) and ``T`` the target's temperature: the stationary law of
    every coordinate the data leave to the prior, which a chain started elsewhere reaches
    only after a few relaxation times ``N s_j^2 / lr`` steps (mean-loss units). At ``T = 0``
    (an optimiser) that law is a point mass at zero, from which a network cannot break its
    symmetries, so the weights are left as they are (PyTorch's initialisation).

    Raises
    ------
    ValueError
        If the prior is not a :class:`~bayesflat.target.torch.GaussianPrior`.
    """
    if not isinstance(target.prior, GaussianPrior):
        raise ValueError(
            f"init='prior' draws the first weights from a Gaussian prior, but the prior is "
            f"{type(target.prior).__name__}; pass init='reset' (or a Gaussian prior)"
        )
    if target.temperature == 0:
        return
    root_t = math.sqrt(target.temperature)
    for name, p in target.named_parameters().items():
        draw = torch.randn(p.shape, generator=generator, dtype=p.dtype)
        p.copy_(draw * (root_t * target.prior.scale_for(name)))


@dataclass(frozen=True)
class ModuleTargetSpec:
    """Recipe for the target of a torch module with a likelihood and a prior.

    Parameters
    ----------
    model : nn.Module
        Template; every chain gets a copy.
    likelihood, prior
        As for :class:`~bayesflat.target.torch.Posterior`.
    num_data : int
        ``N``.
    temperature : float
        ``T``.
    init : {"reset", "model", "prior"}
        ``"reset"``: every chain re-initialises its copy (``reset_parameters`` of every
        submodule under the chain's init seed); ``"model"``: every chain starts from the
        template's weights; ``"prior"``: every chain starts from a draw of the tempered
        prior, ``theta_j ~ N(0, T s_j^2)`` (:func:`prior_draw_`).
    """

    model: nn.Module
    likelihood: str | Likelihood
    prior: Prior | float | None
    num_data: int
    temperature: float
    init: str = "reset"
    kind: str = "module"

    def build(self, init_seed: int, device: torch.device) -> Posterior:
        """A fresh :class:`Posterior` on ``device`` for a chain with ``init_seed``."""
        model = copy.deepcopy(self.model).to("cpu")
        if self.init in ("reset", "prior"):
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(init_seed)
                for module in model.modules():
                    reset = getattr(module, "reset_parameters", None)
                    if callable(reset):
                        reset()
        target = Posterior(
            model,
            num_data=self.num_data,
            temperature=self.temperature,
            likelihood=self.likelihood,
            prior=self.prior,
        )
        if self.init == "prior":
            prior_draw_(target, torch.Generator().manual_seed(init_seed))
        target.model.to(device)
        return target

    def config(self) -> dict[str, Any]:
        """Model class, ``init`` and the target's settings."""
        probe = self.build(0, torch.device("cpu")) if self.init == "model" else None
        target = probe or Posterior(
            self.model, num_data=self.num_data, temperature=self.temperature,
            likelihood=self.likelihood, prior=self.prior,
        )  # fmt: skip
        return {"model": type(self.model).__name__, "init": self.init, **target.config()}

    def fingerprint(self) -> str:
        """Architecture (names, shapes, dtypes) and, for ``init="model"``, the weights."""
        state = self.model.state_dict()
        layout = repr([(k, tuple(v.shape), str(v.dtype)) for k, v in state.items()])
        digest = hashlib.sha256(layout.encode()).hexdigest()[:16]
        weights = fingerprint(*state.values()) if self.init == "model" else self.init
        return f"{type(self.model).__qualname__}:{digest}:{weights}"


@dataclass(frozen=True)
class EvalSet:
    """An evaluation set: inputs (tensor or Dataset of inputs) and optional integer labels."""

    name: str
    inputs: Tensor | Dataset
    labels: Tensor | None
    size: int

    def batches(self, batch_size: int, device: torch.device) -> Iterator[Tensor]:
        """The inputs in order, ``batch_size`` at a time, on ``device``."""
        for start in range(0, self.size, batch_size):
            stop = min(start + batch_size, self.size)
            if isinstance(self.inputs, Tensor):
                batch = self.inputs[start:stop]
            else:
                items = [self.inputs[i] for i in range(start, stop)]
                items = [item[0] if isinstance(item, tuple | list) else item for item in items]
                batch = torch.stack(
                    [as_tensor(item, f"eval_sets[{self.name!r}]") for item in items]
                )
            yield batch.to(device, non_blocking=True)

    def fingerprint(self) -> str:
        """Size and a hash of the labels (and of the inputs when they are a tensor)."""
        inputs = self.inputs if isinstance(self.inputs, Tensor) else None
        return f"{self.size}:{fingerprint(inputs, self.labels)}"


def _labels_of(value: object, argname: str, size: int) -> Tensor:
    labels = as_tensor(value, argname)
    if labels.is_floating_point():
        if not bool(torch.isfinite(labels).all()) or not bool((labels == labels.round()).all()):
            raise ValueError(
                f"{argname} must hold integer class labels; it holds non-integer values "
                f"such as {labels[labels != labels.round()][:1].tolist()}"
            )
    if labels.dtype == torch.bool or labels.is_complex():
        raise ValueError(f"{argname} must hold integer class labels, got dtype {labels.dtype}")
    labels = labels.long()
    if labels.shape != (size,):
        raise ValueError(
            f"{argname} (the labels) must have shape ({size},), got {tuple(labels.shape)}"
        )
    if size and int(labels.min()) < 0:
        raise ValueError(f"{argname} holds a negative label ({int(labels.min())})")
    return labels


def _dataset_labels(dataset: Dataset) -> Any:
    """Labels of a Dataset of ``(input, label)`` items (its ``targets`` attribute if any)."""
    for attr in ("targets", "labels"):
        labels = getattr(dataset, attr, None)
        if labels is not None:
            return labels if isinstance(labels, Tensor | np.ndarray) else np.asarray(labels)
    first = dataset[0]
    if not isinstance(first, tuple | list):
        return None
    return np.asarray([int(dataset[i][1]) for i in range(len(dataset))])  # type: ignore[arg-type]


def parse_eval_sets(
    eval_sets: Mapping[str, object] | None, *, store_logits: bool
) -> tuple[EvalSet, ...]:
    """Check ``eval_sets`` (``name -> inputs`` or ``name -> (inputs, labels)``)."""
    if eval_sets is None:
        return ()
    if not isinstance(eval_sets, Mapping):
        raise TypeError(
            "eval_sets must be a mapping name -> inputs or name -> (inputs, labels), "
            f"got {type(eval_sets).__name__}"
        )
    out = []
    for name, value in eval_sets.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ValueError(
                f"eval_sets keys must be identifiers such as 'test' or 'ood_patches', got {name!r}"
            )
        argname = f"eval_sets[{name!r}]"
        labels_value = None
        if isinstance(value, tuple | list):
            if len(value) != 2:
                raise ValueError(f"{argname} must be inputs or (inputs, labels)")
            value, labels_value = value
        if isinstance(value, Dataset):
            inputs: Tensor | Dataset = value
            size = len(value)  # type: ignore[arg-type]
            if labels_value is None:
                labels_value = _dataset_labels(value)
        else:
            inputs = as_tensor(value, f"{argname}[0]" if labels_value is not None else argname)
            size = int(inputs.shape[0])
            if inputs.is_floating_point() and not bool(torch.isfinite(inputs).all()):
                raise ValueError(f"{argname} inputs hold NaN or infinite values")
        if size < 1:
            raise ValueError(f"{argname} is empty")
        labels = None
        if labels_value is not None:
            labels = _labels_of(labels_value, f"{argname}[1]", size)
        out.append(EvalSet(name, inputs, labels, size))
    names = {s.name for s in out}
    for s in out:
        base = s.name.removesuffix("_logits")
        if store_logits and s.name != base and base in names:
            raise ValueError(
                f"eval set name {s.name!r} collides with the logits recorded for set {base!r} "
                "(store_logits=True); rename it"
            )
    return tuple(out)


def make_sampler(
    name: str,
    params: Any,
    *,
    lr: float,
    num_data: int,
    temperature: float,
    generator: torch.Generator | None,
    options: Mapping[str, Any],
) -> _samplers.Sampler:
    """Instantiate a registered sampler, refusing options its class does not take."""
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


StatsFn = Callable[[nn.Module, _samplers.Sampler], Any]


@dataclass(frozen=True)
class RunSpec:
    """Everything that determines the draws of a run.

    Built and checked by :func:`bayesflat.sample`; see its docstring for the meaning of each
    field. ``target`` is a :class:`~bayesflat.target.base.TargetSpec`.
    """

    target: Any
    train: TrainData
    sampler: str
    options: Mapping[str, Any]
    lr: float
    temperature: float
    num_data: int
    chains: int
    burn_in: int
    draws: int
    thin: int
    batch_size: int
    seed: int
    eval_sets: tuple[EvalSet, ...] = ()
    eval_batch_size: int = 1024
    store_weights: bool | tuple[str, ...] = True
    store_logits: bool = False
    store_probabilities: bool = True
    prediction_dtype: str = "float32"
    loo_points: int | None = None
    projections: int = 8
    stats_fns: Mapping[str, StatsFn] = field(default_factory=dict)
    device: str = "cpu"

    def __post_init__(self) -> None:
        check_int(self.chains, "chains", 1)
        check_int(self.burn_in, "burn_in", 0)
        check_int(self.draws, "draws", 1)
        check_int(self.thin, "thin", 1)
        check_int(self.seed, "seed", 0)
        check_int(self.eval_batch_size, "eval_batch_size", 1)
        check_int(self.projections, "projections", 0)
        if self.loo_points is not None:
            check_int(self.loo_points, "loo_points", 1)
        if not isinstance(self.store_weights, bool):
            bad = [k for k in self.store_weights if not isinstance(k, str)]
            if bad:
                raise ValueError(f"store_weights must be True, False or a list of names, got {bad}")
        check_bool(self.store_logits, "store_logits")
        check_bool(self.store_probabilities, "store_probabilities")
        if not (self.store_logits or self.store_probabilities):
            raise ValueError(
                "store_logits and store_probabilities are both False: a categorical model's "
                "predictions would not be stored; set one of them"
            )
        if self.prediction_dtype not in PREDICTION_DTYPES:
            raise ValueError(
                f"prediction_dtype must be one of {PREDICTION_DTYPES}, got "
                f"{self.prediction_dtype!r}"
            )
        if not isinstance(self.stats_fns, Mapping) or not all(
            isinstance(k, str) and k.isidentifier() and callable(f)
            for k, f in self.stats_fns.items()
        ):
            raise TypeError(
                "stats_fns must be a mapping from identifiers to callables fn(model, sampler), "
                f"got {self.stats_fns!r}"
            )
        if self.sampler not in _samplers.available():
            _samplers.entry(self.sampler)  # raises the registry's message

    @property
    def labelled_sets(self) -> list[EvalSet]:
        """Evaluation sets with labels."""
        return [s for s in self.eval_sets if s.labels is not None]

    def loo_indices(self) -> np.ndarray:
        """Training examples whose pointwise log-likelihood is recorded (sorted indices).

        All of them when ``loo_points`` is ``None`` or at least the training-set size;
        otherwise a fixed random subset drawn from the run's seed.
        """
        n = self.train.num_examples
        if self.loo_points is None or self.loo_points >= n:
            return np.arange(n)
        rng = np.random.default_rng([self.seed, 0x100])
        return np.sort(rng.choice(n, size=self.loo_points, replace=False))

    def identity(self) -> dict[str, Any]:
        """The settings a resumed run must share with the run stored in its folder."""
        options = {k: _plain(v) for k, v in sorted(self.options.items())}
        return {
            "sampler": self.sampler,
            "sampler_options": options,
            "lr": _plain(self.lr),
            "temperature": self.temperature,
            "num_data": self.num_data,
            "chains": self.chains,
            "burn_in": self.burn_in,
            "draws": self.draws,
            "thin": self.thin,
            "batch_size": self.batch_size,
            "seed": self.seed,
            "target": self.target.config(),
            "model_fingerprint": self.target.fingerprint(),
            "train_fingerprint": self.train.fingerprint(),
            "eval_sets": {s.name: s.fingerprint() for s in self.eval_sets},
            "eval_batch_size": self.eval_batch_size,
            "store_weights": self.store_weights
            if isinstance(self.store_weights, bool)
            else list(self.store_weights),
            "store_logits": self.store_logits,
            # At their defaults these two are left out, so runs stored before they existed
            # still resume.
            **({} if self.store_probabilities else {"store_probabilities": False}),
            **(
                {}
                if self.prediction_dtype == "float32"
                else {"prediction_dtype": self.prediction_dtype}
            ),
            "loo_points": self.loo_points,
            "projections": self.projections,
            "stats_fns": sorted(self.stats_fns),
        }

    def check_picklable(self, why: str) -> None:
        """Raise a clear error if the spec cannot be sent to another process."""
        for name, fn in self.stats_fns.items():
            try:
                pickle.dumps(fn)
            except Exception as err:
                raise ValueError(
                    f"stats_fns[{name!r}] cannot be sent to another process ({err}); {why} "
                    "needs module-level functions (no lambdas or closures)"
                ) from None
        try:
            pickle.dumps(self.target)
        except Exception as err:
            raise ValueError(f"the model cannot be pickled ({err}); {why} needs it") from None


def differences(stored: Mapping[str, Any], given: Mapping[str, Any]) -> list[str]:
    """Human-readable list of the settings that differ between two identities."""
    out = []
    for key in sorted(set(stored) | set(given)):
        a, b = stored.get(key), given.get(key)
        if _plain(a) != _plain(b):
            out.append(f"{key} (run folder: {_short(a)}, now: {_short(b)})")
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    if callable(value):
        return f"callable:{getattr(value, '__qualname__', type(value).__name__)}"
    return value


def _short(value: Any) -> str:
    text = repr(_plain(value))
    return text if len(text) <= 80 else text[:77] + "..."


def as_name_tuple(names: Sequence[str] | bool) -> bool | tuple[str, ...]:
    """``store_weights`` as True/False or a tuple of names."""
    if isinstance(names, bool):
        return names
    if isinstance(names, str):
        return (names,)
    return tuple(names)


def check_device(device: object) -> str:
    """A torch device string that exists here."""
    try:
        dev = torch.device(device)  # type: ignore[arg-type]
    except (RuntimeError, TypeError) as err:
        raise ValueError(
            f"device must be a torch device such as 'cpu' or 'cuda:0': {err}"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but CUDA is not available here; use 'cpu'")
    return str(dev)


def check_executor(executor: str) -> str:
    """One of the executors."""
    return check_choice(executor, "executor", ("sequential", "processes", "vectorised", "auto"))
