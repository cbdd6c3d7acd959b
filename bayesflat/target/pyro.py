"""Pyro models as sampling targets.

A Pyro model stands in for model, likelihood and prior: its *latent* sample sites are ``theta``
(the prior), its *observed* sample sites the likelihood. Two forms are accepted:

- a :class:`pyro.nn.PyroModule` whose weights are :class:`pyro.nn.PyroSample` sites (a Bayesian
  network in Pyro's idiom), called as ``model(x, y)``;
- a model function ``model(x, y=None)`` that draws its latents with ``pyro.sample`` and observes
  ``y`` with ``pyro.sample(..., obs=y)``.

Potential
---------
For a minibatch ``B`` of a data set of ``N`` examples, in mean-loss units,

.. math::

    L_B(u) = -\\frac{1}{N}\\Big[\\sum_{\\text{latent } z} \\big(\\log p(z)
             + \\log\\big|\\det \\partial z / \\partial u\\big|\\big)
             + \\frac{N}{|B|} \\sum_{\\text{observed } o} \\log p(o \\mid z, x_B)\\Big],
    \\qquad z = T(u),

where ``T`` is ``biject_to(support)`` of each latent site: latents with constrained support
(a scale, a simplex) are sampled in the unconstrained space ``u`` and the log-Jacobian of ``T``
keeps the target the posterior of ``z``. ``N / |B|`` scales the minibatch likelihood to the data
set, so the user's model needs no plate subsampling; an observed site inside a plate declared
with ``subsample_size`` is already scaled by Pyro (by ``size / subsample_size``) and is taken as
it is. The sampler's temperature enters through its noise only, as for every target.

Latents are recorded in the ``posterior`` group in the constrained space, under their site
names, as a Pyro or NumPyro trace reads. Predictions come from the observed site: class
probabilities for a ``Categorical`` (or ``Bernoulli``, as two classes) likelihood, one draw of
the site per kept draw otherwise.

Pyro is imported only when a Pyro target is built; install it with
``pip install bayesflat[pyro]``.
"""

from __future__ import annotations

import copy
import hashlib
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from bayesflat._checks import check_choice, validate_num_data, validate_temperature

__all__ = ["PyroTarget", "PyroTargetSpec", "import_pyro"]

_INSTALL = "pip install bayesflat[pyro]"


def import_pyro() -> Any:
    """The ``pyro`` package, or an ``ImportError`` that says how to install it."""
    try:
        pyro = importlib.import_module("pyro")
        importlib.import_module("pyro.distributions")
        importlib.import_module("pyro.poutine")
    except ImportError as err:
        raise ImportError(
            f"Pyro models need the pyro-ppl package ({err}); install it with `{_INSTALL}`"
        ) from None
    return pyro


@dataclass(frozen=True)
class _Site:
    """A latent site: name, constrained shape and the bijection from the unconstrained space."""

    name: str
    shape: tuple[int, ...]
    transform: Any


def _base(fn: Any) -> Any:
    """The distribution under ``Independent``/``Expanded``/``Masked`` wrappers."""
    while hasattr(fn, "base_dist"):
        fn = fn.base_dist
    return fn


def _is_data_scaled(site: dict[str, Any]) -> bool:
    """Whether a plate with ``subsample_size`` encloses the site (Pyro has scaled it)."""
    return any(f.full_size is not None and f.full_size != f.size for f in site["cond_indep_stack"])


def _sample_sites(trace: Any) -> dict[str, dict[str, Any]]:
    """Sample sites of ``trace`` that carry a density (no subsample or deterministic sites)."""
    from pyro.poutine.util import site_is_subsample

    return {
        name: site
        for name, site in trace.nodes.items()
        if site["type"] == "sample"
        and not site_is_subsample(site)
        and not site["infer"].get("_deterministic", False)
    }


def _describe(model: Any) -> str:
    return getattr(model, "__qualname__", type(model).__qualname__)


def _trace(model: Any, *args: Any, data: dict[str, Tensor] | None = None) -> Any:
    from pyro import poutine

    fn = poutine.condition(model, data=data) if data else model
    return poutine.trace(fn).get_trace(*args)


def _inspect(
    model: Any, x: Tensor, y: Tensor, num_data: int, obs_site: str | None
) -> tuple[list[_Site], str, str]:
    """Latent sites, the observed site used for predictions, and the likelihood's name.

    Traces ``model(x, y)`` on one and on two examples: a latent whose shape follows the batch
    is a per-example latent, which minibatch samplers cannot sample.
    """
    from torch.distributions import biject_to

    import_pyro()
    if isinstance(model, nn.Module):
        learnable = [n for n, p in model.named_parameters() if p.requires_grad]
        if learnable:
            raise ValueError(
                f"the Pyro model has learnable nn.Parameters {learnable[:5]}: bayesflat samples "
                "latent sample sites only; give them priors with PyroSample, or fix them with "
                "requires_grad_(False)"
            )
    traces = []
    sizes = [1, 2] if x.shape[0] >= 2 else [1]
    for size in sizes:
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                traces.append(_trace(model, x[:size], y[:size]))
        except Exception as err:
            raise ValueError(
                f"calling the Pyro model {_describe(model)} as model(x, y) on {size} training "
                f"example(s) failed: {type(err).__name__}: {' '.join(str(err).split())}"
            ) from None
    trace = traces[-1]
    params = [n for n, s in trace.nodes.items() if s["type"] == "param"]
    if params:
        raise ValueError(
            f"the Pyro model has parameter sites {params[:5]} (pyro.param): bayesflat samples "
            "latent sample sites only; give them priors (pyro.sample) or make them constants"
        )
    sites = _sample_sites(trace)
    latents, observed = [], []
    for name, site in sites.items():
        if site["is_observed"]:
            observed.append(name)
            subsampled = [f for f in site["cond_indep_stack"] if f.full_size not in (None, f.size)]
            for frame in subsampled:
                if frame.full_size != num_data:
                    raise ValueError(
                        f"observed site {name!r} is in plate {frame.name!r} of size "
                        f"{frame.full_size} subsampled to the minibatch, but num_data is "
                        f"{num_data}: give the plate size=num_data (or pass num_data="
                        f"{frame.full_size})"
                    )
            continue
        fn = site["fn"]
        if fn.support.is_discrete:
            raise ValueError(
                f"latent site {name!r} is discrete ({type(_base(fn)).__name__}); gradient "
                "samplers need continuous latents: marginalise it out of the model"
            )
        if _is_data_scaled(site) or any(
            name in t.nodes and tuple(t.nodes[name]["value"].shape) != tuple(site["value"].shape)
            for t in traces
        ):
            raise ValueError(
                f"latent site {name!r} changes with the minibatch (a per-example latent); "
                "minibatch samplers sample global latents only: marginalise it or make it "
                "global"
            )
        latents.append(_Site(name, tuple(site["value"].shape), biject_to(fn.support)))
    if not observed:
        raise ValueError(
            f"the Pyro model {_describe(model)} observes no site when called as model(x, y): "
            "observe the targets with pyro.sample(name, likelihood, obs=y)"
        )
    if not latents:
        raise ValueError(f"the Pyro model {_describe(model)} has no latent sample sites to sample")
    if obs_site is None:
        if len(observed) > 1:
            raise ValueError(
                f"the Pyro model observes several sites {observed}; name the one that holds "
                "the predictions with PyroTargetSpec(obs_site=...)"
            )
        obs_site = observed[0]
    elif obs_site not in observed:
        raise ValueError(f"obs_site={obs_site!r} is not an observed site; observed: {observed}")
    likelihood = type(_base(sites[obs_site]["fn"])).__name__
    return latents, obs_site, likelihood


class _Latents(nn.Module):
    """The unconstrained latents, one parameter per site (``.`` in site names becomes ``__``)."""

    def __init__(self, values: dict[str, Tensor]) -> None:
        super().__init__()
        self.site_of: dict[str, str] = {}
        for site, value in values.items():
            key = site.replace(".", "__")
            if key in self.site_of:
                raise ValueError(
                    f"latent sites {self.site_of[key]!r} and {site!r} collide once '.' is "
                    "replaced by '__'; rename one"
                )
            self.site_of[key] = site
            self.register_parameter(key, nn.Parameter(value))

    def by_site(self) -> dict[str, Tensor]:
        """Unconstrained values by site name."""
        return {self.site_of[k]: p for k, p in self.named_parameters()}


@dataclass(frozen=True)
class PyroTargetSpec:
    """Picklable recipe for the target of a Pyro model (:class:`PyroTarget`).

    Parameters
    ----------
    model : PyroModule or callable
        ``model(x, y=None)``: a :class:`pyro.nn.PyroModule` with :class:`~pyro.nn.PyroSample`
        weights, or a model function. With ``y`` it must observe ``y``; with ``y=None`` it must
        sample the observed site (what predictions use). For other processes the model must
        be picklable (a module-level function or class).
    example : (inputs, targets)
        A few training examples (at least one; two let per-example latents be detected) on
        which the model is traced to find its sites.
    num_data : int
        Training-set size ``N``.
    temperature : float, default 1.0
        ``T >= 0``.
    obs_site : str, optional
        The observed site predictions come from; needed only when several sites are observed.
    init : {"prior", "uniform"}, default "prior"
        Each chain starts from a draw of the prior (under the chain's init seed), or, as Pyro's
        ``init_to_uniform``, from ``U(-2, 2)`` in the unconstrained space.

    Notes
    -----
    On a GPU the model runs with that device as torch's default device, so distributions it
    creates when called land there. Distributions created once, outside the call (a
    ``PyroSample(dist.Normal(0., 1.).expand([h, d]))`` prior is built with the module), stay
    where they were built: give such priors as callables, ``PyroSample(lambda self:
    dist.Normal(0., 1.).expand([h, d]).to_event(2))``, to have them built on the device.
    """

    model: Any
    example: tuple[Tensor, Tensor]
    num_data: int
    temperature: float = 1.0
    obs_site: str | None = None
    init: str = "prior"
    kind: str = field(default="pyro", init=False)

    def __post_init__(self) -> None:
        import_pyro()
        if not callable(self.model):
            raise TypeError(
                f"model must be a PyroModule or a Pyro model function model(x, y=None), got "
                f"{type(self.model).__name__}"
            )
        object.__setattr__(self, "num_data", validate_num_data(self.num_data))
        object.__setattr__(self, "temperature", validate_temperature(self.temperature))
        check_choice(self.init, "init", ("prior", "uniform"))
        if not (isinstance(self.example, tuple | list) and len(self.example) == 2):
            raise TypeError("example must be (inputs, targets): a few training examples")
        x, y = self.example
        if x.shape[0] < 1 or x.shape[0] != y.shape[0]:
            raise ValueError("example must hold at least one (input, target) pair of equal length")
        latents, obs_site, likelihood = _inspect(self.model, x, y, self.num_data, self.obs_site)
        object.__setattr__(self, "_latents", latents)
        object.__setattr__(self, "_obs_site", obs_site)
        object.__setattr__(self, "_likelihood", likelihood)

    def __getstate__(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            object.__setattr__(self, key, value)
        self.__post_init__()

    @property
    def categorical(self) -> bool:
        """Whether the observed site is ``Categorical`` or ``Bernoulli`` (class probabilities)."""
        return self._likelihood in ("Categorical", "Bernoulli")  # type: ignore[attr-defined]

    @property
    def latent_sites(self) -> list[str]:
        """Names of the latent sites, in the order the model draws them."""
        return [s.name for s in self._latents]  # type: ignore[attr-defined]

    def build(self, init_seed: int, device: torch.device | str) -> PyroTarget:
        """A fresh :class:`PyroTarget` on ``device`` whose latents start from ``init_seed``."""
        device = torch.device(device)
        latents: list[_Site] = self._latents  # type: ignore[attr-defined]
        x, y = self.example
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed)
            if self.init == "prior":
                trace = _trace(self.model, x, y)
                start = {s.name: s.transform.inv(trace.nodes[s.name]["value"]) for s in latents}
            else:
                start = {}
                for s in latents:
                    shape = s.transform.inv_shape(torch.Size(s.shape))
                    start[s.name] = torch.rand(shape) * 4.0 - 2.0
        values = {k: v.detach().to(device, torch.float32).clone() for k, v in start.items()}
        model = copy.deepcopy(self.model)
        if isinstance(model, nn.Module):
            model = model.to(device)
        return PyroTarget(
            model, _Latents(values), latents, self._obs_site,  # type: ignore[attr-defined]
            self._likelihood, self.num_data, self.temperature,  # type: ignore[attr-defined]
            device=device,
        )  # fmt: skip

    def config(self) -> dict[str, Any]:
        """Model name, likelihood, latent sites and the target's settings."""
        return {
            "model": _describe(self.model),
            "likelihood": f"pyro:{self._likelihood}",  # type: ignore[attr-defined]
            "obs_site": self._obs_site,  # type: ignore[attr-defined]
            "latent_sites": self.latent_sites,
            "init": self.init,
            "num_data": self.num_data,
            "temperature": self.temperature,
        }

    def fingerprint(self) -> str:
        """The model's name, its latent sites' names and shapes, and its buffers."""
        layout = repr([(s.name, s.shape) for s in self._latents])  # type: ignore[attr-defined]
        if isinstance(self.model, nn.Module):
            layout += repr([(k, tuple(v.shape)) for k, v in self.model.state_dict().items()])
        digest = hashlib.sha256(layout.encode()).hexdigest()[:16]
        return f"pyro:{_describe(self.model)}:{digest}"


class PyroTarget:
    """One chain's target for a Pyro model (built by :class:`PyroTargetSpec`).

    Attributes
    ----------
    module : nn.Module
        The unconstrained latents ``u`` as parameters, one per latent site.
    num_data, temperature
        ``N`` and ``T``.
    categorical : bool
        Whether :meth:`predict` returns class logits.
    """

    def __init__(
        self,
        model: Any,
        latents: _Latents,
        sites: list[_Site],
        obs_site: str,
        likelihood: str,
        num_data: int,
        temperature: float,
        device: torch.device | None = None,
    ) -> None:
        self.model = model
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.module = latents
        self.sites = sites
        self.obs_site = obs_site
        self.likelihood = likelihood
        self.num_data = num_data
        self.temperature = temperature
        self.categorical = likelihood in ("Categorical", "Bernoulli")
        self._names = {s.name for s in sites}

    def _trace(self, *args: Any, data: dict[str, Tensor]) -> Any:
        """Trace the model conditioned on ``data``; off the CPU, constants it creates (the
        ``Normal(0., 1.)`` of a prior) are created on the target's device."""
        if self.device.type == "cpu":
            return _trace(self.model, *args, data=data)
        with self.device:
            return _trace(self.model, *args, data=data)

    def constrained(self) -> tuple[dict[str, Tensor], Tensor]:
        """The latents ``z = T(u)`` by site name, and ``sum log|det dz/du|`` (nats)."""
        unconstrained = self.module.by_site()
        values, log_jac = {}, []
        for s in self.sites:
            u = unconstrained[s.name]
            z = s.transform(u)
            values[s.name] = z
            log_jac.append(s.transform.log_abs_det_jacobian(u, z).sum())
        return values, torch.stack(log_jac).sum()

    def log_joint(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """``(sum of latent log densities + log-Jacobian, observed log density scaled to N)``.

        Both in nats; the second is ``(N / |B|) sum_o log p(o | z, x_B)`` (or Pyro's own plate
        scaling for observed sites in a subsampled plate).
        """
        from pyro.distributions.util import scale_and_mask

        values, log_jac = self.constrained()
        trace = self._trace(inputs, targets, data=values)
        latent, observed = [log_jac], []
        ratio = self.num_data / int(targets.shape[0])
        for name, site in _sample_sites(trace).items():
            lp = scale_and_mask(site["fn"].log_prob(site["value"]), site["scale"], site["mask"])
            if name in self._names:
                latent.append(lp.sum())
            elif site["is_observed"]:
                observed.append(lp.sum() if _is_data_scaled(site) else lp.sum() * ratio)
            else:
                raise ValueError(
                    f"the Pyro model sampled a new latent site {name!r} that was not there when "
                    "it was first traced; its sites must not depend on the data"
                )
        return torch.stack(latent).sum(), torch.stack(observed).sum()

    def potential(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """``L_B`` in mean-loss units: ``-(latent log density + (N/|B|) obs. log density) / N``."""
        latent, observed = self.log_joint(inputs, targets)
        return -(latent + observed) / self.num_data

    def closure(
        self, inputs: Tensor, targets: Tensor, *, value: bool = True
    ) -> Callable[[], Tensor]:
        """Closure for ``sampler.step``: evaluates :meth:`potential`, back-propagates it.

        ``value`` is accepted for the target protocol: a Pyro trace yields the latent sites'
        log densities together with the observed ones, so the whole potential is always
        returned (there is no separate prior value to skip).
        """

        def closure() -> Tensor:
            loss = self.potential(inputs, targets)
            loss.backward()
            return loss.detach()

        return closure

    def _observed_site(self, inputs: Tensor, targets: Tensor | None) -> dict[str, Any]:
        values, _ = self.constrained()
        args = (inputs,) if targets is None else (inputs, targets)
        return self._trace(*args, data=values).nodes[self.obs_site]

    def predict(self, inputs: Tensor) -> Tensor:
        """Class logits ``(n, classes)`` for a categorical likelihood, else a draw of the site.

        A ``Bernoulli`` site with logits ``l`` gives the two-class logits ``(0, l)``.
        """
        site = self._observed_site(inputs, None)
        if not self.categorical:
            return site["value"]
        fn = _base(site["fn"])
        n = int(inputs.shape[0])
        if self.likelihood == "Bernoulli":
            logits = fn.logits.expand(site["value"].shape).reshape(n)
            return torch.stack([torch.zeros_like(logits), logits], dim=-1)
        logits = fn.logits
        return logits.expand(*site["value"].shape, logits.shape[-1]).reshape(n, -1)

    def pointwise_log_likelihood(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """``log p(y_i | x_i, theta)`` from :meth:`predict`'s class logits (nats)."""
        if not self.categorical:
            raise ValueError(
                "a non-categorical Pyro target scores examples with log_likelihood(inputs, "
                "targets), not from predictions (which are draws)"
            )
        log_probs = torch.log_softmax(outputs.float(), dim=-1)
        return log_probs.gather(-1, targets.long().reshape(-1, 1)).squeeze(-1)

    def log_likelihood(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """``log p(y_i | x_i, theta)`` of the observed site per example, shape ``(n,)`` (nats)."""
        site = self._observed_site(inputs, targets)
        fn, n = site["fn"], int(inputs.shape[0])
        lp = fn.log_prob(site["value"])
        while (lp.dim() == 0 or lp.shape[0] != n) and hasattr(fn, "base_dist"):
            fn = fn.base_dist
            lp = fn.log_prob(site["value"])
        return lp.reshape(n, -1).sum(dim=1)

    def posterior_variables(self) -> dict[str, Tensor]:
        """The latents in the constrained space, by site name."""
        with torch.no_grad():
            values, _ = self.constrained()
        return {k: v.detach() for k, v in values.items()}

    def config(self) -> dict[str, Any]:
        """Settings recorded in the trace attributes."""
        return {
            "num_data": self.num_data,
            "temperature": self.temperature,
            "likelihood": f"pyro:{self.likelihood}",
        }
