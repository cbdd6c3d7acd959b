"""One set of defaults: ``bayesflat.sample``, ``make_spec`` and ``bayesflat run`` agree."""

import dataclasses
import inspect
import pickle

import numpy as np
import pytest
import torch

import bayesflat
from bayesflat import cli, models
from bayesflat.defaults import (
    DEFAULTS,
    SAMPLE_ARGUMENTS,
    RunDefaults,
    resolve_temperature,
    sample_defaults,
)
from bayesflat.diagnostics import diagnostic_stats
from bayesflat.run.api import make_spec


def _run_args(*argv):
    return cli.build_parser().parse_args(["run", *argv])


def test_cli_parser_defaults_are_the_module_defaults():
    args = _run_args()
    _, _, _, kwargs = cli._run_inputs({k: getattr(args, k) for k in cli._RECIPE_KEYS})
    assert args.temperature is None  # resolved as bayesflat.sample resolves it
    for field in dataclasses.fields(RunDefaults):
        if field.name == "temperature":
            continue
        if hasattr(args, field.name):
            assert getattr(args, field.name) == getattr(DEFAULTS, field.name), field.name
        else:  # not an option: the run leaves it to bayesflat.sample's default
            assert SAMPLE_ARGUMENTS[field.name] not in kwargs, field.name


@pytest.mark.parametrize("function", [bayesflat.sample, make_spec])
def test_sample_signature_defaults_are_the_module_defaults(function):
    parameters = inspect.signature(function).parameters
    for keyword, value in sample_defaults().items():
        assert parameters[keyword].default == value, keyword
    assert set(SAMPLE_ARGUMENTS.values()) <= set(parameters)
    assert parameters["temperature"].default is None


def test_temperature_defaults_to_the_module_for_samplers_and_zero_for_optimisers():
    assert resolve_temperature(None, is_sampler=True) == DEFAULTS.temperature
    assert resolve_temperature(None, is_sampler=False) == 0.0
    assert resolve_temperature(1.0, is_sampler=True) == 1.0
    # a target that states its own posterior (a Pyro model) samples it, at T = 1
    assert resolve_temperature(None, is_sampler=True, states_posterior=True) == 1.0
    assert resolve_temperature(None, is_sampler=False, states_posterior=True) == 0.0
    assert resolve_temperature(0.3, is_sampler=True, states_posterior=True) == 0.3
    x, y = torch.randn(40, 64), torch.arange(40) % 10
    spec = make_spec(models.build_model("mlp", num_classes=10), (x, y), sampler="sgd")
    assert spec.temperature == 0.0


def test_cli_run_passes_nothing_that_overrides_sample_defaults_differently():
    _, train, eval_sets, kwargs = cli._run_inputs(
        {k: getattr(_run_args(), k) for k in cli._RECIPE_KEYS}
    )
    expected = sample_defaults()
    for keyword, value in kwargs.items():
        if keyword in expected:
            assert value == expected[keyword], keyword
    assert len(train[1]) == 1293 and "val" in eval_sets and "test" in eval_sets


def test_the_default_spec_is_the_default_run():
    x = torch.randn(40, 64)
    y = torch.arange(40) % 10
    spec = make_spec(models.build_model("mlp", num_classes=10), (x, y))
    assert (spec.sampler, spec.chains, spec.burn_in, spec.draws, spec.thin) == (
        DEFAULTS.sampler, DEFAULTS.chains, DEFAULTS.burn_in, DEFAULTS.draws, DEFAULTS.thin,
    )  # fmt: skip
    assert (spec.lr, spec.batch_size, spec.seed) == (DEFAULTS.lr, DEFAULTS.batch_size, 0)
    assert spec.temperature == DEFAULTS.temperature
    assert spec.target.config()["prior_scale"] == DEFAULTS.prior_scale


def test_the_configurational_temperature_option_is_recorded_and_can_be_switched_off():
    on = cli._run_inputs({k: getattr(_run_args(), k) for k in cli._RECIPE_KEYS})[3]
    off = cli._run_inputs(
        {k: getattr(_run_args("--no-configurational-temperature"), k) for k in cli._RECIPE_KEYS}
    )[3]
    assert DEFAULTS.configurational_temperature
    assert set(on["stats_fns"]) == {"theta_dot_grad", "theta_dot_grad_dim", "diagnostic_hvps"}
    assert off["stats_fns"] == {}


def test_recorded_diagnostics_survive_pickling_for_worker_processes():
    torch.manual_seed(0)
    x, y = torch.randn(50, 64), torch.arange(50) % 10
    model = models.build_model("mlp", num_classes=10)
    sampler = bayesflat.samplers.get("sgld")(model.parameters(), lr=1e-3, num_data=50)
    fns = diagnostic_stats(["configurational_temperature"], data=(x, y))
    copies = pickle.loads(pickle.dumps(fns))
    assert copies.keys() == fns.keys()
    here = fns["theta_dot_grad"](model, sampler)
    there = copies["theta_dot_grad"](model, sampler)
    assert np.isfinite(here) and here == there


def test_a_cli_run_records_theta_dot_grad_at_every_draw(tmp_path):
    argv = ["run", "--output", str(tmp_path), "--chains", "1", "--draws", "2", "--burn-in", "2",
            "--thin", "1", "--no-progress", "--no-report", "--replicates", "2"]  # fmt: skip
    assert cli.main(argv) == 0
    stats = bayesflat.load(tmp_path)
    from bayesflat.trace import groups

    ss = groups(stats)["sample_stats"]
    assert ss["theta_dot_grad"].shape == (1, 2)
    assert np.all(np.isfinite(ss["theta_dot_grad"].values))
    assert np.all(ss["theta_dot_grad_dim"].values == 26_122)
