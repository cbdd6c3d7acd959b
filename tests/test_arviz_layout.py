"""The first ArviZ calls a user makes on the default run's trace stay small."""

import arviz as az
import matplotlib
import numpy as np
from conftest import ARVIZ_1

from bayesflat import sample
from bayesflat.cli import _RECIPE_KEYS, _run_inputs, build_parser

matplotlib.use("Agg")


def _default_run_trace():
    """The trace layout of `bayesflat run` with its defaults, on a short budget."""
    args = build_parser().parse_args(["run"])
    settings = {k: getattr(args, k) for k in _RECIPE_KEYS}
    model, train, eval_sets, kwargs = _run_inputs(settings)
    kwargs.update(burn_in=0, draws=4, thin=1)
    return model, sample(model, train, eval_sets=eval_sets, progress=False, **kwargs)


def test_az_summary_and_plot_trace_have_a_few_variables_on_the_default_run():
    model, trace = _default_run_trace()
    tensors = sum(1 for p in model.parameters() if p.requires_grad)
    weights = sum(p.numel() for p in model.parameters())
    assert weights > 25_000  # every weight is kept, in the weights group
    stored = trace.weights if not ARVIZ_1 else trace["weights"]
    assert sum(int(np.prod(v.shape[2:])) for v in stored.data_vars.values()) == weights
    posterior = trace.posterior if not ARVIZ_1 else trace["posterior"]
    assert set(posterior.data_vars) == {"weight_norm", "projection"}
    directions = posterior["projection"].shape[-1]
    assert directions == 8
    summary = az.summary(trace)
    # One row per tensor norm and per random projection, not one per weight.
    assert len(summary) == tensors + directions
    axes = az.plot_trace_dist(trace) if ARVIZ_1 else az.plot_trace(trace)
    if not ARVIZ_1:
        assert np.asarray(axes).shape == (2, 2)  # weight_norm and projection, compact
    matplotlib.pyplot.close("all")
