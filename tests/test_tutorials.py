"""The tutorials run end to end on a reduced budget and print what their text promises.

Each script runs with ``BAYESFLAT_TUTORIAL_QUICK=1`` (a smoke-test budget of a few seconds) in a
fresh folder; the checks parse its output. One runs as a reader would run it, in a fresh
interpreter; the others run in this process as ``__main__`` (a fresh interpreter would spend
most of their time importing torch, ArviZ and matplotlib again), with the global state a script
may change saved and restored around it.
"""

import contextlib
import math
import os
import random
import re
import runpy
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import bayesflat
from bayesflat import samplers
from bayesflat import trace as btrace

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
NUMBER = r"(-?\d+(?:\.\d+)?(?:e[-+]?\d+)?)"
IN_A_FRESH_INTERPRETER = "02_samplers_as_optimizers.py"
"""The tutorial run with ``python tutorials/NAME`` (it registers a sampler, the others do not)."""


def run_tutorial(name: str, cwd: Path) -> str:
    """``python tutorials/NAME`` in ``cwd`` with the quick budget; its standard output."""
    env = {**os.environ, "BAYESFLAT_TUTORIAL_QUICK": "1"}
    result = subprocess.run(
        [sys.executable, str(TUTORIALS / name)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, f"{name} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


@contextlib.contextmanager
def _restored_globals():
    """Restore what a script may change in this process: RNG states, the sampler registry,
    torch's thread count, warning filters and open matplotlib figures."""
    # pyro.set_rng_seed seeds numpy's legacy global generator too
    states = (torch.get_rng_state(), np.random.get_state(), random.getstate())  # noqa: NPY002
    registry = dict(samplers._REGISTRY)
    threads = torch.get_num_threads()
    try:
        with warnings.catch_warnings():
            yield
    finally:
        torch.set_rng_state(states[0])
        np.random.set_state(states[1])  # noqa: NPY002
        random.setstate(states[2])
        samplers._REGISTRY.clear()
        samplers._REGISTRY.update(registry)
        torch.set_num_threads(threads)
        if "matplotlib.pyplot" in sys.modules:
            sys.modules["matplotlib.pyplot"].close("all")


def run_tutorial_here(name: str, cwd: Path, monkeypatch, capsys) -> str:
    """Run the tutorial as ``__main__`` in this process, in ``cwd`` with the quick budget."""
    monkeypatch.setenv("BAYESFLAT_TUTORIAL_QUICK", "1")
    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", [str(TUTORIALS / name)])
    capsys.readouterr()
    with _restored_globals():
        runpy.run_path(str(TUTORIALS / name), run_name="__main__")
    return capsys.readouterr().out


def number(pattern: str, text: str) -> float:
    match = re.search(pattern.replace("{n}", NUMBER), text, re.M)
    assert match, f"no line matching {pattern!r} in:\n{text}"
    return float(match.group(1))


def check_fsgld_on_digits(out: str, cwd: Path) -> None:
    accuracy = number(r"fsgld accuracy \(BMA\) = {n}", out)
    assert 0 <= accuracy <= 1
    # The table's accuracy row (value ± error for fSGLD and SGLD) agrees with the plain metric.
    row = re.search(rf"^accuracy\s+{NUMBER} ± {NUMBER}\s+{NUMBER} ± {NUMBER}", out, re.M)
    assert row, out
    fsgld_acc, fsgld_err, sgld_acc, _ = map(float, row.groups())
    assert fsgld_acc == pytest.approx(accuracy, abs=1e-4)
    assert 0 <= sgld_acc <= 1 and fsgld_err >= 0
    for metric in ("NLL \\(nats\\)", "ECE"):
        value = number(rf"^{metric}\s+{{n}} ± ", out)
        assert value >= 0
    # OOD is the positive class: the Monte-Carlo table and the plain-array AUROC are one number.
    auroc = number(r"fsgld AUROC patches \(entropy of the BMA\) = {n}", out)
    assert 0 <= auroc <= 1
    assert number(r"^AUROC patches \(entropy\)\s+{n} ± ", out) == pytest.approx(auroc, abs=1e-4)
    # total = aleatoric + epistemic, up to the printed rounding.
    for set_name in ("test", "ood_patches", "ood_noise"):
        match = re.search(rf"^  {set_name}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}$", out, re.M)
        assert match, out
        total, aleatoric, epistemic = map(float, match.groups())
        assert min(aleatoric, epistemic) >= 0
        assert total == pytest.approx(aleatoric + epistemic, abs=2e-3)
    assert re.search(r"^lp\s", out, re.M), "az.summary of lp is missing"
    assert math.isfinite(number(r"elpd_loo per image = {n}", out))
    folder = cwd / "tutorial01_fsgld"
    assert (folder / "report.html").is_file() and (folder / "metrics.json").is_file()
    trace = bayesflat.load(folder / "trace.nc")
    assert btrace.trace_attrs(trace)["sampler"] == "fsgld"
    assert btrace.get_group(trace, "log_likelihood") is not None


def check_samplers_as_optimizers(out: str, cwd: Path) -> None:
    assert 0 <= number(r"BMA test accuracy = {n}", out) <= 1
    for claim in (
        "SGLD(T=0)  == torch.optim.SGD: True",
        "fSGLD(T=0) == torch.optim.SGD: True",
        "SGHMC(T=0, alpha=0.1) == torch.optim.SGD(momentum=0.9): True",
        "same chain bit for bit: True",
        "FlatSGHMC == samplers.FSGHMC bit for bit: True",
    ):
        assert claim in out, f"{claim!r} not in:\n{out}"
    assert "left at their values:         ['1.weight', '1.bias']" in out
    assert "running-statistics updates in a watched step: 0" in out
    # polynomial_decay(0.1, b=1, gamma=0.55) at step 100 and the temperature ramp t / 200.
    assert number(r"step 100: lr = {n}", out) == pytest.approx(0.1 * 101**-0.55, abs=1e-4)
    assert number(r"step 100: lr = [\d.]+, T = {n}", out) == pytest.approx(0.5)
    assert not (cwd / "ckpt.pt").exists()


def check_flatness_and_convergence(out: str, cwd: Path) -> None:
    ratio = number(r"tr H at fSGLD draws / at SGD end points = {n}", out)
    assert 0 < ratio < 1
    verdicts = re.findall(rf"^  \S+\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+(pass|warn)$",
                          out, re.M)  # fmt: skip
    names = {"lp", "nll_test", "hessian_trace"}
    assert len(verdicts) >= len(names)
    assert all(f"  {name} " in out for name in names)
    assert "bayesflat diagnose: fsgld, 2 chains x 6 draws" in out
    for section in ("convergence (pass:", "temperature (pass:", "flatness (pass:"):
        assert section in out


def check_pyro_bnn_against_nuts(out: str, cwd: Path) -> None:
    assert "fsgld posterior variables: fc1.weight, fc1.bias, fc2.weight, fc2.bias" in out
    # az.compare ranks both posteriors by PSIS-LOO on the same training points.
    rows = {
        name: float(value)
        for name, value in re.findall(rf"^(fsgld|nuts)\s+\d+\s+{NUMBER}", out, re.M)
    }
    assert set(rows) == {"fsgld", "nuts"}
    assert all(math.isfinite(v) and v < 0 for v in rows.values())
    assert (cwd / "tutorial04_pyro" / "forest_fc2_bias.png").stat().st_size > 0
    fsgld = number(r"test accuracy \(BMA\): fsgld {n}", out)
    nuts = number(r"test accuracy \(BMA\): fsgld [\d.]+, nuts {n}", out)
    assert 0 <= fsgld <= 1 and 0 <= nuts <= 1


CHECKS = {
    "01_fsgld_on_digits.py": check_fsgld_on_digits,
    "02_samplers_as_optimizers.py": check_samplers_as_optimizers,
    "03_flatness_and_convergence.py": check_flatness_and_convergence,
    "04_pyro_bnn_against_nuts.py": check_pyro_bnn_against_nuts,
}


def test_every_tutorial_is_checked_and_listed():
    scripts = sorted(p.name for p in TUTORIALS.glob("*.py"))
    assert scripts == sorted(CHECKS)
    readme = (TUTORIALS / "README.md").read_text(encoding="utf-8")
    assert all(name in readme for name in scripts)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CHECKS))
def test_tutorial_runs(name, tmp_path, monkeypatch, capsys):
    if name == IN_A_FRESH_INTERPRETER:
        out = run_tutorial(name, tmp_path)
    else:
        out = run_tutorial_here(name, tmp_path, monkeypatch, capsys)
    CHECKS[name](out, tmp_path)
