"""The contract between a sampling target and the rest of bayesflat.

A *target* is the potential of one chain in mean-loss units,

    L_B(theta) = mean_{i in B} -log p(y_i | x_i, theta) - log p(theta) / N,

together with the module that holds ``theta``. Samplers only see the closure a target builds;
the run engine only sees the methods below. A torch module with a likelihood and a prior
(:class:`bayesflat.target.torch.Posterior`) and a Pyro model (:mod:`bayesflat.target.pyro`)
are both targets.

A :class:`TargetSpec` is the picklable recipe that builds one chain's target from that chain's
initialisation seed, so a chain can be rebuilt in another process or after a restart.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

from torch import Tensor, nn

__all__ = ["Target", "TargetSpec"]


@runtime_checkable
class Target(Protocol):
    """One chain's potential and the module that holds its parameters.

    Attributes
    ----------
    module : nn.Module
        Holds the sampled parameters (its trainable ``parameters()``, in the unconstrained
        space) and any buffers. Its ``state_dict`` is what a checkpoint stores.
    num_data : int
        Training-set size ``N``.
    temperature : float
        ``T >= 0``.
    categorical : bool
        Whether :meth:`predict` returns class logits (then evaluation sets get class
        probabilities and labelled sets a pointwise log-likelihood).
    """

    module: nn.Module
    num_data: int
    temperature: float
    categorical: bool

    def closure(self, inputs: Any, targets: Any, *, value: bool = True) -> Callable[[], Tensor]:
        """Closure for ``sampler.step``: evaluates ``L_B``, back-propagates it, returns it.

        It accumulates into ``.grad`` and never zeroes gradients (the sampler does). With
        ``value=False`` the run engine does not read the returned value except to check that
        it is finite, so a target may return a cheaper finite-iff-``L_B``-is quantity (the
        likelihood part) and skip terms that only enter the value.
        """
        ...

    def potential(self, inputs: Any, targets: Any) -> Tensor:
        """``L_B`` on one minibatch (differentiable scalar, mean-loss units)."""
        ...

    def predict(self, inputs: Any) -> Tensor:
        """Model outputs on ``inputs`` (logits when :attr:`categorical`), shape ``(n, ...)``."""
        ...

    def pointwise_log_likelihood(self, outputs: Tensor, targets: Tensor) -> Tensor:
        """``log p(y_i | x_i, theta)`` per example (nats) from :meth:`predict`'s outputs."""
        ...

    def posterior_variables(self) -> dict[str, Tensor]:
        """The values a kept draw records in the ``posterior`` group, by name."""
        ...

    def config(self) -> dict[str, Any]:
        """Settings recorded in the trace attributes (``num_data``, ``temperature``...)."""
        ...


class TargetSpec(Protocol):
    """Picklable recipe for one chain's target."""

    def build(self, init_seed: int, device: Any) -> Target:
        """A fresh target whose parameters are initialised from ``init_seed`` on ``device``."""
        ...

    def config(self) -> dict[str, Any]:
        """Settings recorded in the trace attributes."""
        ...
