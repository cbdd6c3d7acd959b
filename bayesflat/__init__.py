"""bayesflat: flatness-aware stochastic-gradient MCMC for Bayesian deep learning."""

__version__ = "0.1.0"
