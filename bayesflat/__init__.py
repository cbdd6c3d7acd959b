"""bayesflat: flatness-aware stochastic-gradient MCMC for Bayesian deep learning.

Sample posteriors of neural networks with fSGLD and its relatives, keep the draws as
ArviZ-compatible traces, and turn them into predictive ensembles, calibration and
out-of-distribution figures.
"""

__version__ = "0.1.0"

from bayesflat import samplers
from bayesflat.run import SamplingError, resume, sample
from bayesflat.target.torch import Posterior
from bayesflat.trace import load, save

__all__ = [
    "Posterior",
    "SamplingError",
    "__version__",
    "load",
    "resume",
    "sample",
    "samplers",
    "save",
]
