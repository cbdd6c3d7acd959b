"""The sampling target: model, likelihood, prior, dataset size and temperature.

Everything in bayesflat works in *mean-loss units*. For a dataset of ``N`` examples and a
minibatch ``B`` the potential is

.. math::

    L_B(\\theta) = \\frac{1}{|B|} \\sum_{i \\in B} -\\log p(y_i \\mid x_i, \\theta)
                   - \\frac{1}{N} \\log p(\\theta),

and the tempered posterior is :math:`\\pi_T(\\theta) \\propto \\exp(-N L(\\theta) / T)`.
:class:`Posterior` is the only place that knows how ``N``, ``T`` and the prior enter.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bayesflat._checks import validate_num_data, validate_temperature

__all__ = [
    "CategoricalLikelihood",
    "FlatPrior",
    "GaussianLikelihood",
    "GaussianPrior",
    "Likelihood",
    "Posterior",
    "Prior",
]


class Likelihood:
    """Per-example negative log-likelihood, in nats.

    Subclasses implement :meth:`nll`, returning ``-log p(y_i | f_i)`` per example.
    """

    name = "likelihood"

    def nll(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Per-example negative log-likelihood, shape ``(batch,)``, in nats."""
        raise NotImplementedError

    def mean_nll(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """Minibatch mean of :meth:`nll` (nats per example)."""
        return self.nll(outputs, targets).mean()

    def config(self) -> dict[str, object]:
        """Settings recorded in the trace attributes."""
        return {"likelihood": self.name}


class CategoricalLikelihood(Likelihood):
    """Categorical likelihood on logits: ``-log softmax(f)_y`` (cross-entropy, nats)."""

    name = "categorical"

    def nll(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(outputs, targets, reduction="none")

    def mean_nll(self, outputs: Tensor, targets: Tensor) -> Tensor:
        return F.cross_entropy(outputs, targets)


class GaussianLikelihood(Likelihood):
    """Gaussian likelihood with fixed noise scale ``s``.

    ``-log p(y | f) = (y - f)^2 / (2 s^2) + log(2 pi s^2) / 2`` summed over output dimensions.

    Parameters
    ----------
    noise_std : float
        Observation noise standard deviation ``s`` (> 0), in the units of ``y``.
    """

    name = "gaussian"

    def __init__(self, noise_std: float = 1.0) -> None:
        if not (isinstance(noise_std, int | float) and noise_std > 0 and math.isfinite(noise_std)):
            raise ValueError(f"noise_std must be a finite number > 0, got {noise_std!r}")
        self.noise_std = float(noise_std)

    def nll(self, outputs: Tensor, targets: Tensor) -> Tensor:
        targets = targets.reshape(outputs.shape).to(outputs.dtype)
        var = self.noise_std**2
        sq = (outputs - targets).pow(2) / (2.0 * var) + 0.5 * math.log(2.0 * math.pi * var)
        return sq.reshape(sq.shape[0], -1).sum(dim=1)

    def config(self) -> dict[str, object]:
        return {"likelihood": self.name, "noise_std": self.noise_std}


class Prior:
    """Prior over the parameters; :meth:`neg_log_prob` returns ``-log p(theta)`` (nats)."""

    name = "prior"

    def neg_log_prob(self, named_params: Mapping[str, Tensor]) -> Tensor | None:
        """``-log p(theta)`` up to an additive constant, or ``None`` for a flat prior."""
        raise NotImplementedError

    def accumulate_grad_(
        self, named_params: Mapping[str, Tensor], weight: float, *, value: bool = True
    ) -> Tensor | None:
        """Add ``weight * grad(-log p(theta))`` into every ``p.grad``; return ``-log p``.

        The default back-propagates :meth:`neg_log_prob`; priors with a closed-form gradient
        override it to skip autograd, and may then skip the value too when ``value`` is false
        (they return ``None``).
        """
        neg_log_prob = self.neg_log_prob(named_params)
        if neg_log_prob is None:
            return None
        (neg_log_prob * weight).backward()
        return neg_log_prob.detach()

    def config(self) -> dict[str, object]:
        """Settings recorded in the trace attributes."""
        return {"prior": self.name}


class FlatPrior(Prior):
    """Improper flat prior: contributes nothing to the potential."""

    name = "flat"

    def neg_log_prob(self, named_params: Mapping[str, Tensor]) -> Tensor | None:
        return None


class GaussianPrior(Prior):
    """Isotropic Gaussian prior ``N(0, s^2 I)``, with optional per-parameter scales.

    ``-log p(theta) = sum_j theta_j^2 / (2 s_j^2)`` (constants dropped). In mean-loss units
    the gradient contribution is ``theta / (N s^2)``: weight decay ``1 / (N s^2)``.

    Parameters
    ----------
    scale : float
        Prior standard deviation ``s`` (> 0) for every parameter not named in ``scales``.
    scales : mapping of str to float, optional
        Per-parameter standard deviations keyed by parameter name (``model.named_parameters``)
        or by a name prefix (``"fc1."``); the longest matching key wins.
    """

    name = "gaussian"

    def __init__(self, scale: float = 1.0, scales: Mapping[str, float] | None = None) -> None:
        self.scale = self._check(scale, "scale")
        self.scales = {k: self._check(v, f"scales[{k!r}]") for k, v in (scales or {}).items()}

    @staticmethod
    def _check(value: object, argname: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"prior {argname} must be a finite number > 0, got {value!r}")
        if not (math.isfinite(value) and value > 0):
            raise ValueError(f"prior {argname} must be a finite number > 0, got {value!r}")
        return float(value)

    def scale_for(self, name: str) -> float:
        """Prior standard deviation used for parameter ``name``."""
        best, best_len = self.scale, -1
        for key, value in self.scales.items():
            if (name == key or name.startswith(key)) and len(key) > best_len:
                best, best_len = value, len(key)
        return best

    def neg_log_prob(self, named_params: Mapping[str, Tensor]) -> Tensor | None:
        if not named_params:
            return None
        precisions = tuple(1.0 / self.scale_for(name) ** 2 for name in named_params)
        return _WeightedHalfSquaredNorm.apply(precisions, *named_params.values())

    @torch.no_grad()
    def accumulate_grad_(
        self, named_params: Mapping[str, Tensor], weight: float, *, value: bool = True
    ) -> Tensor | None:
        """Closed form: ``p.grad += weight * p / s^2``, one fused kernel per prior scale.

        This is the weight-decay update of ``torch.optim.SGD(weight_decay=weight / s^2)``.
        Returns ``-log p(theta) = sum_j theta_j^2 / (2 s_j^2)``, or ``None`` when ``value`` is
        false (the norms are then not computed).
        """
        if not named_params:
            return None
        by_precision = self._by_precision(named_params)
        for precision, params in by_precision.items():
            grads = []
            for p in params:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                grads.append(p.grad)
            torch._foreach_add_(grads, params, alpha=weight * precision)
        if not value:
            return None
        return _half_weighted_square_norm(by_precision)

    def __getstate__(self) -> dict[str, Any]:
        """Settings only: the kept grouping is rebuilt on first use."""
        return {k: v for k, v in self.__dict__.items() if k != "_grouping"}

    def _by_precision(self, named_params: Mapping[str, Tensor]) -> dict[float, list[Tensor]]:
        """The parameters grouped by prior precision ``1 / s^2``.

        The grouping of a read-only mapping (the one :meth:`Posterior.closure` passes every
        step) is kept and reused while that same mapping comes back.
        """
        cached = self.__dict__.get("_grouping")
        if cached is not None and cached[0] is named_params:
            return cached[1]
        by_precision: dict[float, list[Tensor]] = {}
        for name, p in named_params.items():
            by_precision.setdefault(1.0 / self.scale_for(name) ** 2, []).append(p)
        if isinstance(named_params, MappingProxyType):
            self.__dict__["_grouping"] = (named_params, by_precision)
        return by_precision

    def config(self) -> dict[str, object]:
        return {"prior": self.name, "prior_scale": self.scale, "prior_scales": dict(self.scales)}


def _half_weighted_square_norm(by_precision: Mapping[float, list[Tensor]]) -> Tensor:
    """``sum_c c / 2 * sum_{p in group c} ||p||^2``, one ``_foreach_norm`` per precision."""
    terms = [
        torch.stack(torch._foreach_norm(params)).square().sum() * (0.5 * precision)
        for precision, params in by_precision.items()
    ]
    return terms[0] if len(terms) == 1 else torch.stack(terms).sum()


class _WeightedHalfSquaredNorm(torch.autograd.Function):
    """``sum_i c_i ||p_i||^2 / 2`` as one autograd node.

    Written per parameter with ``pow``/``sum`` the prior adds some thirty autograd nodes to every
    step, which on a small network costs more than the likelihood's forward and backward. The
    backward uses ordinary differentiable ops, so Hessian-vector products still pass through.
    """

    @staticmethod
    def forward(ctx: Any, precisions: tuple[float, ...], *params: Tensor) -> Tensor:
        ctx.precisions = precisions
        ctx.save_for_backward(*params)
        by_precision: dict[float, list[Tensor]] = {}
        for precision, p in zip(precisions, params, strict=True):
            by_precision.setdefault(precision, []).append(p)
        return _half_weighted_square_norm(by_precision)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        params = ctx.saved_tensors
        return (None, *(p * (grad_output * c) for p, c in zip(params, ctx.precisions, strict=True)))


_LIKELIHOODS: dict[str, Callable[[], Likelihood]] = {
    "categorical": CategoricalLikelihood,
    "gaussian": GaussianLikelihood,
}


def _resolve_likelihood(likelihood: str | Likelihood) -> Likelihood:
    if isinstance(likelihood, Likelihood):
        return likelihood
    if isinstance(likelihood, str) and likelihood in _LIKELIHOODS:
        return _LIKELIHOODS[likelihood]()
    raise ValueError(
        f"likelihood must be one of {sorted(_LIKELIHOODS)} or a Likelihood instance, "
        f"got {likelihood!r}"
    )


def _resolve_prior(prior: Prior | float | None) -> Prior:
    if isinstance(prior, Prior):
        return prior
    if prior is None:
        return FlatPrior()
    if isinstance(prior, int | float) and not isinstance(prior, bool):
        return GaussianPrior(scale=float(prior))
    raise ValueError(
        f"prior must be a Prior, a positive number (Gaussian prior scale) or None (flat), "
        f"got {prior!r}"
    )


@dataclass
class Posterior:
    """Tempered posterior of a model: ``pi_T(theta) ∝ exp(-N L(theta) / T)``.

    Parameters
    ----------
    model : nn.Module
        The network ``f_theta``; its trainable parameters are ``theta``.
    num_data : int
        Training-set size ``N`` (positive integer). Sets the weight of the prior and the
        Langevin noise ``sqrt(2 lr T / N)``.
    temperature : float, default 1.0
        ``T >= 0``. ``1`` is the Bayes posterior, ``< 1`` a cold posterior, ``0`` the MAP problem.
    likelihood : str or Likelihood, default "categorical"
        ``"categorical"`` (logits, classification) or ``"gaussian"`` (regression, unit noise),
        or a :class:`Likelihood` instance.
    prior : Prior, float or None, default 1.0
        A :class:`Prior`; a number is the scale of an isotropic Gaussian prior; ``None`` is flat.

    Notes
    -----
    The minibatch potential in mean-loss units is
    ``L_B = mean_{i in B} NLL_i - log p(theta) / N``; its gradient is an unbiased estimate of
    ``grad U / N`` with ``U = sum_i NLL_i - log p(theta)``.
    """

    model: nn.Module
    num_data: int
    temperature: float = 1.0
    likelihood: str | Likelihood = "categorical"
    prior: Prior | float | None = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(self.model).__name__}")
        self.num_data = validate_num_data(self.num_data)
        self.temperature = validate_temperature(self.temperature)
        self.likelihood = _resolve_likelihood(self.likelihood)
        self.prior = _resolve_prior(self.prior)

    @property
    def module(self) -> nn.Module:
        """The network (the :class:`~bayesflat.target.base.Target` name for it)."""
        return self.model

    @property
    def categorical(self) -> bool:
        """Whether outputs are class logits (a categorical likelihood)."""
        return self.likelihood.name == "categorical"

    def predict(self, inputs: Tensor) -> Tensor:
        """``f_theta(inputs)``: logits for a categorical likelihood, means for a Gaussian one."""
        return self.model(inputs)

    def pointwise_log_likelihood(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """``log p(y_i | x_i, theta)`` per example (nats), from :meth:`predict`'s outputs."""
        return -self.likelihood.nll(outputs, targets)

    def posterior_variables(self) -> dict[str, Tensor]:
        """Nothing: a network's weights are too many to summarise one by one.

        The run engine records them in the trace's ``weights`` group and functionals of them
        (per-tensor norms, random projections) in ``posterior``.
        """
        return {}

    def named_parameters(self) -> dict[str, Tensor]:
        """Trainable parameters of the model, by name."""
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def potential(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """Minibatch potential ``L_B`` in mean-loss units (differentiable scalar).

        ``L_B = mean_{i in B} -log p(y_i | x_i, theta) - log p(theta) / N``.
        """
        nll = self.likelihood.mean_nll(self.model(inputs), targets)
        neg_log_prior = self.prior.neg_log_prob(self.named_parameters())
        if neg_log_prior is None:
            return nll
        return nll + neg_log_prior / self.num_data

    def closure(
        self, inputs: Tensor, targets: Tensor, *, value: bool = True
    ) -> Callable[[], Tensor]:
        """Closure for ``sampler.step(closure)``.

        It evaluates :meth:`potential` on the batch, back-propagates it (accumulating into
        ``.grad``; the sampler zeroes gradients) and returns the detached value. The prior's
        gradient is added in closed form where the prior has one (a Gaussian prior adds
        ``theta / (N s^2)``, exactly the weight decay of ``torch.optim.SGD``), which on a small
        network halves the cost of a step compared with back-propagating it.

        Parameters
        ----------
        inputs, targets : Tensor
            The minibatch ``B``.
        value : bool, default True
            Return ``L_B`` (mean-loss units). ``False`` returns only its likelihood part
            ``mean_{i in B} NLL_i`` (enough to check that the step stayed finite) and skips
            evaluating ``-log p(theta)``, whose norms cost about a quarter of a step on a small
            network; the gradient is the same either way. The run engine passes ``False`` at
            the steps whose potential it does not read.
        """
        named = self._trainable()
        prior = self.prior
        weight = 1.0 / self.num_data
        mean_nll = self.likelihood.mean_nll
        model = self.model

        def closure() -> Tensor:
            nll = mean_nll(model(inputs), targets)
            nll.backward()
            neg_log_prior = prior.accumulate_grad_(named, weight, value=value)
            if neg_log_prior is None:
                return nll.detach()
            return nll.detach() + neg_log_prior / self.num_data

        return closure

    def __getstate__(self) -> dict[str, Any]:
        """Fields only: the kept parameter mapping is rebuilt on first use."""
        return {k: v for k, v in self.__dict__.items() if k != "_trainable_cache"}

    def _trainable(self) -> Mapping[str, Tensor]:
        """:meth:`named_parameters`, kept between closures.

        Walking the modules costs about 30 us on the digits MLP, a twentieth of a step; the
        kept mapping is reused while every parameter is still registered under its name and
        keeps its ``requires_grad`` flag (a parameter replaced or frozen is noticed; one
        registered on a new module after the first closure is not).
        """
        cached = self.__dict__.get("_trainable_cache")
        if cached is not None:
            slots, named = cached
            if all(
                owner.get(key) is p and p.requires_grad is flag for owner, key, p, flag in slots
            ):
                return named
        slots = []
        for module in self.model.modules():
            for key, p in module._parameters.items():
                if p is not None:
                    slots.append((module._parameters, key, p, p.requires_grad))
        named = MappingProxyType(self.named_parameters())
        self.__dict__["_trainable_cache"] = (slots, named)
        return named

    def config(self) -> dict[str, object]:
        """Settings recorded in the trace attributes."""
        return {
            "num_data": self.num_data,
            "temperature": self.temperature,
            **self.likelihood.config(),
            **self.prior.config(),
        }
