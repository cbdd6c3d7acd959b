"""The step-time benchmark runs and writes its report (structure only: no timing assertions)."""

from __future__ import annotations

import copy
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from bayesflat import samplers
from bayesflat.models import MLP, ConvNet32
from bayesflat.target.torch import Posterior

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "step_time.py"


@pytest.fixture(scope="module")
def step_time():
    spec = importlib.util.spec_from_file_location("step_time", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


SHARES_QUICK_RUN = pytest.mark.xdist_group("test_benchmarks.quick_run")
"""Tests that use ``quick_run``: one xdist worker runs them all, so the fixture is built once
(``--dist loadgroup``)."""


@pytest.fixture(scope="module")
def quick_run(step_time, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    results = step_time.run(out, quick=True)
    return out, results


@SHARES_QUICK_RUN
def test_quick_run_writes_markdown_and_json(step_time, quick_run):
    out, results = quick_run
    md = (out / "step_time.md").read_text()
    on_disk = json.loads((out / "step_time.json").read_text())
    assert on_disk["quick"] is True
    assert set(on_disk["cases"]) == {"convnet32", "digits_mlp"}
    assert on_disk["cases"].keys() == results["cases"].keys()

    for key in ("cpu", "torch", "torch_threads", "date_utc", "logical_cpus"):
        assert key in on_disk["machine"]
    assert on_disk["machine"]["torch_threads"] == 1

    for header in (
        "passes/step",
        "ratio to SGD",
        "IQR",
        "outside fwd/bwd",
        "persistent extra",
        "peak in step",
    ):
        assert header in md
    assert "Quick smoke run" in md
    assert "Claim fSGLD / SGD <= 1.03" in md
    # each sampler over its floor, from the per-round times of the same run
    mlp = on_disk["cases"]["digits_mlp"]["per_round_seconds"]["cpu"]
    for method, floor in (("sgld", "floor_sgld"), ("fsgld", "floor_fsgld")):
        ratios = [m / f for m, f in zip(mlp[method], mlp[floor], strict=True)]
        median = step_time._quartiles(ratios)[1]
        assert f"- `{method}` / `{floor}`, paired per round: {median:.3f} (IQR " in md


@SHARES_QUICK_RUN
def test_every_registered_method_in_both_cases(step_time, quick_run):
    _, results = quick_run
    registered = samplers.available()
    external = [n for n in step_time.EXTERNAL if n not in step_time.missing_references()]
    cnn, mlp = results["cases"]["convnet32"], results["cases"]["digits_mlp"]
    assert list(cnn["methods"]) == ["torch_sgd", *external, *registered]
    assert list(mlp["methods"]) == ["torch_sgd", *step_time.REFERENCES, *external, *registered]


@SHARES_QUICK_RUN
def test_posteriors_row_is_timed_when_installed(step_time, quick_run):
    out, results = quick_run
    pytest.importorskip("posteriors")
    md = (out / "step_time.md").read_text()
    assert results["machine"]["posteriors"] == "0.1.3"
    for case in results["cases"].values():
        row = case["methods"]["posteriors_sgld"]
        assert row["kind"] == "reference" and row["temperature"] == 1.0
        assert row["passes_per_step"] == 1
        # Its forward/backward run inside torch.func inside posteriors: not timed apart.
        assert row["outside"] is None
        assert "posteriors_sgld" not in case["per_round_seconds"]["outside"]
        assert case["skipped"] == {}
    assert md.count("| `posteriors_sgld` |") == 2


def test_posteriors_row_is_left_out_with_a_note_without_posteriors(
    step_time, tmp_path, monkeypatch
):
    monkeypatch.setattr(step_time, "import_posteriors", lambda: None)
    results = step_time.run(tmp_path, quick=True, case_names=["digits_mlp"])
    case = results["cases"]["digits_mlp"]
    assert "posteriors_sgld" not in case["methods"]
    assert "posteriors is not installed" in case["skipped"]["posteriors_sgld"]
    assert results["machine"]["posteriors"] is None
    md = (tmp_path / "step_time.md").read_text()
    assert "Not timed: `posteriors_sgld`, posteriors is not installed" in md
    assert "posteriors not installed" in md


@pytest.mark.parametrize("build, shape", [(MLP, (64,)), (ConvNet32, (3, 32, 32))])
def test_posteriors_log_posterior_is_minus_the_potential(step_time, build, shape):
    pytest.importorskip("posteriors")
    torch.manual_seed(0)
    model, num_data = build(), 1797
    x, y = torch.randn(8, *shape), torch.randint(0, 10, (8,))
    # The benchmark's BatchNorm-free copy: in training mode it normalises by the batch
    # statistics as the original does, so value and gradient are those of the Posterior.
    functional = torch.func.replace_all_batch_norm_modules_(copy.deepcopy(model))
    log_posterior = step_time.posteriors_log_posterior(functional, num_data)
    params = dict(functional.named_parameters())
    grads, (value, logits) = torch.func.grad_and_value(log_posterior, has_aux=True)(params, (x, y))
    posterior = Posterior(model, num_data=num_data)
    potential = posterior.potential(x, y)
    potential.backward()
    # Same float32 computation by two routes: agreement to float32 rounding. posteriors'
    # Gaussian log density is normalised, the Posterior's prior is not: they differ by the
    # constant P log(2 pi) / 2, divided by N.
    num_params = sum(p.numel() for p in params.values())
    constant = num_params * math.log(2 * math.pi) / 2 / num_data
    torch.testing.assert_close(value, -potential.detach() - constant)
    torch.testing.assert_close(logits, model(x).detach())
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], -p.grad, msg=name)


@SHARES_QUICK_RUN
def test_every_method_has_its_columns(step_time, quick_run):
    _, results = quick_run
    for case in results["cases"].values():
        assert case["rounds"] >= 2
        for name, method in case["methods"].items():
            kinds = ("cpu", "wall") if name in step_time.EXTERNAL else ("cpu", "wall", "outside")
            for kind in kinds:
                stats = method[kind]
                for key in ("median_ms", "q1_ms", "q3_ms", "ratio_median", "ratio_q1", "ratio_q3"):
                    assert math.isfinite(stats[key]), (name, kind, key)
            assert method["cpu"]["median_ms"] > 0
            assert method["passes_per_step"] >= 1
            assert method["persistent_bytes"] >= 0 and method["peak_step_bytes"] >= 0
            assert method["kind"] in ("baseline", "reference", "sampler", "optimiser")
            assert len(case["per_round_seconds"]["cpu"][name]) == case["rounds"]
            assert len(case["per_round_passes"][name]) == case["rounds"]
        assert case["methods"]["torch_sgd"]["cpu"]["ratio_median"] == 1.0


@SHARES_QUICK_RUN
def test_methods_run_at_the_driver_temperatures(quick_run):
    _, results = quick_run
    for case in results["cases"].values():
        for entry in samplers.describe():
            method = case["methods"][entry.name]
            assert method["temperature"] == (1.0 if entry.is_sampler else 0.0), entry.name
            assert method["kind"] == ("sampler" if entry.is_sampler else "optimiser")


@SHARES_QUICK_RUN
def test_markdown_lists_every_method(quick_run):
    out, results = quick_run
    md = (out / "step_time.md").read_text()
    for case in results["cases"].values():
        for name in case["methods"]:
            assert f"| `{name}` |" in md


@SHARES_QUICK_RUN
def test_methods_table_has_one_row_per_registered_method(quick_run):
    out, _ = quick_run
    table = (out / "methods_table.md").read_text()
    header = next(line for line in table.splitlines() if line.startswith("| method"))
    for column in ("passes/step", "CNN ratio to SGD", "MLP ratio to SGD", "extra buffers"):
        assert column in header
    rows = [line for line in table.splitlines() if line.startswith("| `")]
    assert [row.split("`")[1] for row in rows] == samplers.available()
    width = header.count("|")
    assert all(row.count("|") == width for row in rows)


@SHARES_QUICK_RUN
def test_noise_draws_are_timed_against_normal_and_checked(step_time, quick_run):
    out, results = quick_run
    mlp, cnn = results["cases"]["digits_mlp"], results["cases"]["convnet32"]
    assert cnn["noise_draws"] is None
    found = mlp["noise_draws"]
    assert found["num_values"] == mlp["num_params"]
    assert list(found["draws"]) == list(step_time.draw_candidates(4))
    md = (out / "step_time.md").read_text()
    assert f"### Drawing the noise: {mlp['num_params']:,} values" in md
    for name, draw in found["draws"].items():
        assert len(found["per_round_seconds"][name]) == found["rounds"] >= 2
        assert math.isfinite(draw["cpu"]["median_ms"]) and draw["cpu"]["median_ms"] > 0
        # every draw a sampler could use follows its law; the bit sources are not checked
        assert draw["check"]["passed"] is (None if draw["law"] == "bits" else True), name
        assert f"| `{name}` | {draw['law']} |" in md
    assert found["draws"]["torch_normal"]["cpu"]["ratio_median"] == 1.0
    assert "Cheapest normal draw that passes its checks: `" in md


def test_draw_checks_reject_the_wrong_law(step_time):
    stats = pytest.importorskip("scipy.stats")
    n = 26_122
    gen = torch.Generator().manual_seed(3)
    normal = torch.randn(n, generator=gen)
    passed = step_time.check_draw(normal, "normal")
    assert passed["passed"]
    # the Kolmogorov-Smirnov distance is scipy's, and the bounds are those of the docstring
    expected = stats.kstest(normal.double().numpy(), "norm").statistic
    assert passed["ks_distance"] == pytest.approx(expected, abs=1e-12)
    assert passed["ks_bound"] == pytest.approx(stats.kstwo.ppf(0.999, n), rel=1e-12)
    assert passed["ks_bound"] == pytest.approx(1.9495 / math.sqrt(n), rel=1e-3)
    assert passed["mean_bound"] == 4 / math.sqrt(n)
    # mean 0 and variance 1, but flat: only the distribution test sees it
    flat = (torch.rand(n, generator=gen) * 2 - 1) * math.sqrt(3)
    wrong = step_time.check_draw(flat, "normal")
    assert abs(wrong["mean"]) <= wrong["mean_bound"]
    assert abs(wrong["variance"] - 1) <= wrong["variance_bound"]
    assert not wrong["passed"] and wrong["ks_distance"] > wrong["ks_bound"]
    # 10 standard errors of the variance too wide, 10 of the mean off
    assert not step_time.check_draw(normal * (1 + 10 * math.sqrt(0.5 / n)), "normal")["passed"]
    assert not step_time.check_draw(normal + 10 / math.sqrt(n), "normal")["passed"]
    signs = torch.randint(0, 2, (n,), generator=gen).float() * 2 - 1
    assert step_time.check_draw(signs, "sign")["passed"]
    signs[0] = 0.0
    assert not step_time.check_draw(signs, "sign")["passed"]
    assert step_time.check_draw(signs, "bits") == {"passed": None}


def test_cli_one_case_writes_into_out(step_time, tmp_path, capsys):
    step_time.main(["--quick", "--cases", "digits_mlp", "--out", str(tmp_path / "cli")])
    on_disk = json.loads((tmp_path / "cli" / "step_time.json").read_text())
    assert set(on_disk["cases"]) == {"digits_mlp"}
    assert (tmp_path / "cli" / "step_time.md").is_file()
    assert "MLP ratio to SGD" in (tmp_path / "cli" / "methods_table.md").read_text()
    assert "digits_mlp" in capsys.readouterr().out


def test_unknown_case_is_refused(step_time, tmp_path):
    with pytest.raises(ValueError, match="case_names"):
        step_time.run(tmp_path, quick=True, case_names=["cifar"])


def test_paper_cifar_smoke_runs_on_synthetic_files_of_the_real_formats(tmp_path):
    spec = importlib.util.spec_from_file_location("paper_cifar", SCRIPT.parent / "paper_cifar.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = module.main(["--smoke", "--out", str(tmp_path), "--device", "cpu"])
    assert results["draws"] == 2 and results["train"] == 96 and results["svhn"] == 48
    for key in ("accuracy", "nll", "ece", "auroc_svhn", "fpr95_svhn"):
        assert math.isfinite(results[key])
    assert "| accuracy |" in (tmp_path / "paper_cifar_smoke.md").read_text()


@pytest.mark.slow
def test_run_engine_quick_run_writes_its_tables(tmp_path, monkeypatch):
    # Spawned ranks import the module by name, so it must be importable.
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    module = importlib.import_module("run_engine")
    results = module.run(tmp_path, quick=True)
    assert set(results["executors"]["median_s"]) == {
        "sequential",
        "processes",
        "distributed",
        "vectorised",
        "vectorised, 2 threads",
    }
    text = (tmp_path / "run_engine.md").read_text()
    for part in (
        "## Chains against wall time",
        "## Peak memory",
        "## Writing the trace",
        "## Resume",
        "| sampling only (--no-report) | ",
    ):
        assert part in text
    assert results["memory"]["draws"] == [4]
