"""The pass / warn / fail verdict: its rules, and where the report and the CLI show it."""

import json
import math

import numpy as np
import pytest

from bayesflat import report
from bayesflat import trace as btrace
from bayesflat.defaults import DEFAULTS
from bayesflat.diagnostics import Diagnosis, DiagnosticRow, trace_verdict, verdict


def _diagnosis(rows, chains=4, draws=100):
    return Diagnosis(
        rows=[
            DiagnosticRow("convergence", name, {"rhat": r, "ess_bulk": e, "ess_tail": e}, "", "")
            for name, r, e in rows
        ],
        thresholds={},
        run={"chains": chains, "draws": draws},
    )


def test_converged_functionals_pass():
    v = verdict(_diagnosis([("lp", 1.002, 900.0), ("nll_test", 1.005, 450.0)]))
    assert v.status == "pass" and v.reasons == []
    assert v.numbers["max_rhat"] == 1.005 and v.numbers["max_rhat_name"] == "nll_test"
    assert v.numbers["min_ess_bulk"] == 450.0


@pytest.mark.parametrize(
    ("rhat", "ess", "status", "check"),
    [
        (1.02, 900.0, "warn", "rhat"),
        (1.0999, 900.0, "warn", "rhat"),
        (1.101, 900.0, "fail", "rhat"),
        (1.62, 6.0, "fail", "rhat"),
        (1.001, 399.0, "warn", "ess"),
        (float("nan"), 900.0, "warn", "convergence"),
    ],
)
def test_rhat_above_1_1_fails_above_1_01_warns_low_ess_warns(rhat, ess, status, check):
    v = verdict(_diagnosis([("lp", 1.001, 900.0), ("nll_test", rhat, ess)]))
    assert v.status == status
    assert v.reasons[0].check == check and v.reasons[0].level == status


def test_weight_projections_warn_but_never_fail():
    v = verdict(_diagnosis([("lp", 1.001, 900.0), ("proj_0", 2.45, 5.0)]))
    assert v.status == "warn" and [r.check for r in v.reasons] == ["weights"]
    assert v.numbers["max_rhat_projection"] == 2.45


def test_fewer_than_four_chains_is_flagged():
    v = verdict(_diagnosis([("lp", 1.001, 900.0)], chains=2))
    assert v.status == "warn" and v.reasons[0].check == "chains"
    assert "2 chains" in v.reasons[0].message


def test_isolated_diverging_draws_warn_and_a_chain_that_stays_diverged_fails():
    diverging = np.zeros((4, 100), bool)
    diverging[1, [10, 50]] = True  # two excursions the chain recovered from: 2% of its draws
    v = verdict(_diagnosis([("lp", 1.001, 900.0)]), diverging=diverging)
    assert v.status == "warn" and v.reasons[0].check == "divergence"
    assert v.numbers["divergent_chains"] == [1]
    diverging[1, 20:26] = True  # 8 of 100 draws: above the 5% rule
    assert verdict(_diagnosis([("lp", 1.001, 900.0)]), diverging=diverging).status == "fail"
    diverging[1] = False
    diverging[3, -1] = True  # ends diverged
    assert verdict(_diagnosis([("lp", 1.001, 900.0)]), diverging=diverging).status == "fail"


def test_divergent_chains_fail_and_are_named():
    diverging = np.zeros((4, 100), bool)
    diverging[2, 60:] = True
    v = verdict(_diagnosis([("lp", 1.001, 900.0)]), diverging=diverging)
    assert v.status == "fail" and v.reasons[0].check == "divergence"
    assert v.numbers["diverging_per_chain"] == [0, 0, 40, 0]
    assert v.numbers["divergent_chains"] == [2]
    assert "chain 2: 40" in v.reasons[0].message


def test_unknown_threshold_is_refused():
    with pytest.raises(ValueError, match="rhat_fial"):
        verdict(_diagnosis([("lp", 1.0, 900.0)]), thresholds={"rhat_fial": 1.2})


def _trace(shift=0.0, chains=4, draws=200, diverging=None):
    rng = np.random.default_rng(1)
    n, k = 40, 3
    labels = rng.integers(0, k, n)
    logits = rng.normal(size=(chains, draws, n, k)) + 2.0 * np.eye(k)[labels]
    logits[0] += shift * np.eye(k)[labels]  # chain 0 predicts differently: not mixed
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    lp = rng.normal(size=(chains, draws))
    lp[0] += 5.0 * shift
    stats = {"lp": lp, "step_size": np.full((chains, draws), 0.01)}
    if diverging is not None:
        stats["diverging"] = diverging
    return btrace.build_trace(
        posterior={"w": rng.normal(size=(chains, draws, 2))},
        sample_stats=stats,
        predictions={"test": probs},
        observed_data={"test": labels},
        attrs={"sampler": "sgld", "temperature": 1.0, "chains": chains, "draws": draws,
               "burn_in": 10, "thin": 1, "num_data": 100, "seed": 0},
    )  # fmt: skip


def test_report_carries_the_verdict_in_json_html_and_headline():
    rep = report.build_report(_trace(shift=3.0), figures=False, n_boot=10)
    v = json.loads(rep.to_json())["verdict"]
    assert v["status"] == "fail" and v["max_rhat"] > 1.1
    headline = rep.headline().splitlines()
    note = next(i for i, line in enumerate(headline) if line.startswith("value ±"))
    assert headline[note + 1].startswith("FAIL: R-hat")
    page = rep.to_html()
    box = page.index('class="verdict verdict-fail"')
    assert box < page.index('id="summary"') < page.index("Accuracy")
    assert "#b00020" in page[box : box + 300]


def test_mixed_chains_give_a_pass_verdict_and_no_warning_line():
    v = trace_verdict(_trace(shift=0.0))
    assert v.status == "pass", v.reasons
    assert v.to_text().startswith("verdict: pass")


def test_trace_verdict_reads_sample_stats_diverging():
    diverging = np.zeros((4, 200), bool)
    diverging[1, -5:] = True
    v = trace_verdict(_trace(diverging=diverging))
    assert v.status == "fail" and v.numbers["divergent_chains"] == [1]


def test_cli_run_records_the_configurational_temperature_and_prints_the_verdict(tmp_path, capsys):
    from bayesflat.cli import main

    out = tmp_path / "run"
    argv = ["run", "--chains", "2", "--burn-in", "20", "--draws", "6", "--thin", "2",
            "--no-progress", "--no-report", "--output", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out.splitlines()
    note = next(i for i, line in enumerate(printed) if line.startswith("value ±"))
    assert printed[note + 1].startswith(("FAIL:", "WARNING:"))  # 2 chains x 6 draws
    assert any("configurational temperature" in line for line in printed[note + 1 :])
    stats = btrace.groups(btrace.load(out))["sample_stats"]
    assert {"theta_dot_grad", "theta_dot_grad_dim", "diverging"} <= set(stats.data_vars)
    v = json.loads((out / "metrics.json").read_text())["verdict"]
    target = v["temperature"]["target"]
    assert target == DEFAULTS.temperature and math.isfinite(v["temperature"]["configurational"])
    assert any(r["check"] == "chains" for r in v["reasons"])
