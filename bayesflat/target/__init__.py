"""Sampling targets: the potential in mean-loss units and the module that holds theta.

:class:`Posterior` wraps a torch module with a likelihood and a prior; every target obeys the
:class:`Target` protocol, which is all the run engine and the samplers rely on.
"""

from bayesflat.target.base import Target, TargetSpec
from bayesflat.target.torch import (
    CategoricalLikelihood,
    FlatPrior,
    GaussianLikelihood,
    GaussianPrior,
    Likelihood,
    Posterior,
    Prior,
)

__all__ = [
    "CategoricalLikelihood",
    "FlatPrior",
    "GaussianLikelihood",
    "GaussianPrior",
    "Likelihood",
    "Posterior",
    "Prior",
    "Target",
    "TargetSpec",
]
