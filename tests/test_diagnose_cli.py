"""The diagnose table (text, JSON, HTML) and the `bayesflat diagnose` command."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import bayesflat
from bayesflat import cli
from bayesflat import trace as btrace
from bayesflat.diagnostics import Budget, diagnostic_stats
from bayesflat.diagnostics.report import (
    DIAGNOSE_THRESHOLDS,
    diagnose,
    diagnostics_section,
    write_diagnostics,
)


def _synthetic(stats: dict[str, np.ndarray], **attrs):
    chains, draws = next(iter(stats.values())).shape
    return btrace.build_trace(
        posterior={"w": np.zeros((chains, draws, 2))},
        sample_stats=stats,
        attrs={"sampler": "sghmc", "temperature": 1.0, "num_data": 1000, "lr": 0.01, **attrs},
    )


def test_temperature_verdicts_follow_the_rule():
    rng = np.random.default_rng(0)
    shape = (4, 400)
    d, n = 50, 1000
    # theta . grad L with N <theta . grad L> / d = 1 (T), and kinetic draws around 1.5
    dot = (1.0 + 0.2 * rng.standard_normal(shape)) * d / n
    kinetic = 1.5 + 0.2 * rng.standard_normal(shape)
    tr = _synthetic(
        {
            "lp": rng.standard_normal(shape),
            "theta_dot_grad": dot,
            "theta_dot_grad_dim": np.full(shape, d),
            "kinetic_temperature": kinetic,
        }
    )
    rows = {r.name: r for r in diagnose(tr).section("temperature")}
    conf, kin = rows["configurational"], rows["kinetic"]
    # iid draws: the MCSE is the standard error 0.2 / sqrt(1600) = 0.005
    assert conf.values["estimate"] == pytest.approx(1.0, abs=4 * 0.005)
    assert conf.values["mcse"] == pytest.approx(0.005, rel=0.3)
    assert conf.verdict == "pass"
    assert kin.values["estimate"] == pytest.approx(1.5, abs=4 * 0.005)
    assert kin.verdict == "warn"
    assert "not <=" in kin.rule and "0.1 x 1" in kin.rule
    # a 60% tolerance relative to T accepts the kinetic estimate
    rows = {r.name: r for r in diagnose(tr, thresholds={"temperature_rel": 0.6}).rows}
    assert rows["kinetic"].verdict == "pass"


def test_flatness_verdicts_and_convergence_rows():
    rng = np.random.default_rng(1)
    shape = (2, 200)
    stuck = np.array([[1.0], [3.0]]) + 0.1 * rng.standard_normal(shape)
    diagnosis = diagnose(_synthetic({
        "lp": rng.standard_normal(shape),
        "hessian_trace": 50 + rng.standard_normal(shape),
        "top_eigenvalue": 30 + rng.standard_normal(shape),  # lr * lambda_max = 0.3
        "rwp_gap": stuck,
    }))  # fmt: skip
    flat = {r.name: r for r in diagnosis.section("flatness")}
    assert flat["hessian_trace"].verdict == "pass"
    assert flat["hessian_trace"].values["chain_means"] == pytest.approx([50, 50], abs=0.5)
    assert flat["top_eigenvalue"].verdict == "warn"
    assert "lr * max lambda_max" in flat["top_eigenvalue"].rule
    assert flat["top_eigenvalue"].values["lr_times_mean"] == pytest.approx(0.3, abs=0.01)
    assert flat["rwp_gap"].verdict == "warn" and "R-hat" in flat["rwp_gap"].rule
    lp = diagnosis.section("convergence")[0]
    assert lp.name == "lp"
    # 2 x 200 iid draws: ESS about 400 >= 100 per chain, R-hat about 1
    assert lp.verdict == "pass", lp.rule
    short = _synthetic({"lp": rng.standard_normal((4, 50))})  # ESS about 200 < 400
    row = diagnose(short).section("convergence")[0]
    assert row.verdict == "warn" and "ESS" in row.rule
    relaxed = diagnose(short, thresholds={"ess_per_chain": 25})
    assert relaxed.section("convergence")[0].verdict == "pass"
    assert relaxed.thresholds == {**DIAGNOSE_THRESHOLDS, "ess_per_chain": 25}
    with pytest.raises(ValueError, match="unknown thresholds"):
        diagnose(short, thresholds={"ess": 3})


def test_outputs_are_json_safe_and_html_escaped():
    shape = (1, 3)  # too short for R-hat: NaN numbers, warn verdicts
    tr = _synthetic({"lp": np.arange(3.0)[None], "hessian_trace": np.full(shape, np.nan)},
                    sampler="<b>x</b>")  # fmt: skip
    diagnosis = diagnose(tr)
    assert all(r.verdict == "warn" for r in diagnosis.rows)
    text = json.dumps(diagnosis.to_dict(), allow_nan=False)
    assert json.loads(text)["sections"]["flatness"][0]["mean"] is None
    html = diagnostics_section(tr)
    assert html.startswith('<section class="bayesflat-diagnostics">')
    assert html.rstrip().endswith("</section>")
    assert "<b>x</b>" not in html and "<b>" not in diagnosis.to_html()
    assert "thresholds: rhat=1.01" in diagnosis.to_text()


@pytest.fixture(scope="module")
def small_trace(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 3, generator=g)
    y = (x @ torch.randn(3, 3, generator=g)).argmax(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    fns = diagnostic_stats(data=(x, y), budget=Budget(subsample=32, hutchinson_probes=3,
                                                      lanczos_steps=4, rwp_samples=2))  # fmt: skip
    folder = tmp_path_factory.mktemp("run")
    bayesflat.sample(
        model, (x, y), sampler="fsgld", chains=2, burn_in=10, draws=6, thin=2, batch_size=16,
        eval_sets={"test": (x[:16], y[:16])}, progress=False, lr=0.05, stats_fns=fns,
        output=folder,
    )  # fmt: skip
    return folder / "trace.nc"


def test_diagnose_command_prints_and_writes(small_trace, capsys):
    assert cli.main(["diagnose", str(small_trace)]) == 0
    out = capsys.readouterr().out
    for part in ("convergence (pass:", "temperature (pass:", "flatness (pass:",
                 "configurational", "hessian_trace", "thresholds: rhat=1.01"):  # fmt: skip
        assert part in out
    payload = json.loads((small_trace.parent / "diagnostics.json").read_text())
    assert payload["trace"] == "trace.nc"
    assert payload["run"]["chains"] == 2 and payload["run"]["draws"] == 6
    assert set(payload["sections"]) == {"convergence", "temperature", "flatness"}
    rows = [r for section in payload["sections"].values() for r in section]
    assert rows and all(r["verdict"] in ("pass", "warn") and r["rule"] for r in rows)
    assert payload["thresholds"] == DIAGNOSE_THRESHOLDS
    html = (small_trace.parent / "diagnostics.html").read_text()
    assert "<table" in html and "configurational" in html
    # a run folder works too and gives the same table
    result, json_path, _ = write_diagnostics(small_trace.parent)
    assert json_path == small_trace.parent / "diagnostics.json"
    assert result.to_dict() == {k: v for k, v in payload.items() if k != "trace"}


def test_bad_paths_fail_with_one_line(tmp_path):
    """The one true subprocess test of ``diagnose``: exit status and stderr as a shell sees
    them, for a missing file."""
    path = tmp_path / "nothing.nc"
    proc = subprocess.run([sys.executable, "-m", "bayesflat.cli", "diagnose", str(path)],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bayesflat diagnose: error:")
    assert str(path) in lines[0]
    assert not (tmp_path / "diagnostics.json").exists()


def test_a_file_that_is_not_a_trace_fails_with_one_line(tmp_path, capsys):
    path = tmp_path / "nothing.nc"
    path.write_text("not a netCDF file\n")
    assert cli.main(["diagnose", str(path)]) != 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bayesflat diagnose: error:")
    assert str(path) in lines[0]
    assert not (tmp_path / "diagnostics.json").exists()
