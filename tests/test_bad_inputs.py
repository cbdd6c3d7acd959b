# ruff: noqa: E501 (the case tables read one case a line)
"""Bad input, refused at once with a message that names the argument and never a wrong answer.

Every case is what a new user might try. Python calls go straight to :func:`bayesflat.sample`
(refused before the first step, so each case costs one forward pass); command lines go
through :func:`bayesflat.cli.main` in-process. Each case asserts the exception type or exit
status and that the message names the argument (or the file and key) at fault.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import bayesflat
from bayesflat import cli
from bayesflat import trace as btrace

REPO = Path(__file__).resolve().parents[1]
TINY = ["--chains", "2", "--draws", "3", "--burn-in", "10", "--thin", "2", "--no-progress",
        "--replicates", "20"]  # fmt: skip


def _data() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "x": torch.randn(60, 4, generator=g),
        "y": torch.randint(0, 3, (60,), generator=g),
        "xt": torch.randn(20, 4, generator=g),
        "yt": torch.randint(0, 3, (20,), generator=g),
    }


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def _with(values: torch.Tensor, index: tuple, value: float) -> torch.Tensor:
    out = values.clone()
    out[index] = value
    return out


def _kwargs(d: dict[str, torch.Tensor], **changes) -> dict:
    kwargs = {"sampler": "sgld", "chains": 1, "burn_in": 2, "draws": 2, "thin": 1,
              "batch_size": 10, "progress": False, "eval_sets": {"test": (d["xt"], d["yt"])}}  # fmt: skip
    kwargs.update(changes)
    return kwargs


# (id, changes as a function of the data and a scratch folder, exception, message pattern)
API_CASES = [
    ("nan eval input", lambda d, t: {"eval_sets": {"test": (_with(d["xt"], (0, 0), np.nan), d["yt"])}},
     ValueError, r"eval_sets\['test'\] inputs hold NaN"),
    ("inf eval input", lambda d, t: {"eval_sets": {"ood": _with(d["xt"], (3, 1), np.inf)}},
     ValueError, r"eval_sets\['ood'\] inputs hold NaN or infinite"),
    ("nan train input", lambda d, t: {"train": (_with(d["x"], (5, 2), np.nan), d["y"])},
     ValueError, r"train_data\[0\].*NaN or infinite values \(first in example 5\)"),
    ("float eval labels", lambda d, t: {"eval_sets": {"test": (d["xt"], d["yt"] + 0.7)}},
     ValueError, r"eval_sets\['test'\]\[1\] must hold integer class labels"),
    ("float train labels", lambda d, t: {"train": (d["x"], d["y"] + 0.7)},
     ValueError, r"train_data\[1\] must hold integer class labels"),
    ("bool train labels", lambda d, t: {"train": (d["x"], d["y"] > 0)},
     ValueError, r"train_data\[1\] must hold integer class labels"),
    ("eval labels out of range", lambda d, t: {"eval_sets": {"test": (d["xt"], d["yt"] + 5)}},
     ValueError, r"eval_sets\['test'\] has label \d+ but the model has 3 outputs"),
    ("train labels out of range", lambda d, t: {"train": (d["x"], d["y"] + 10)},
     ValueError, r"train_data\[1\] must hold class labels in \[0, 3\)"),
    ("negative train labels", lambda d, t: {"train": (d["x"], d["y"] - 1)},
     ValueError, r"train_data\[1\]"),
    ("eval labels wrong length", lambda d, t: {"eval_sets": {"test": (d["xt"], d["yt"][:5])}},
     ValueError, r"eval_sets\['test'\]\[1\].*shape \(20,\)"),
    ("empty eval set", lambda d, t: {"eval_sets": {"test": (d["xt"][:0], d["yt"][:0])}},
     ValueError, r"eval_sets\['test'\] is empty"),
    ("eval wrong features", lambda d, t: {"eval_sets": {"test": (torch.randn(20, 7), d["yt"])}},
     ValueError, r"eval_sets\['test'\] inputs do not fit the model"),
    ("train wrong features", lambda d, t: {"train": (torch.randn(60, 7), d["y"])},
     ValueError, r"train_data\[0\] \(the inputs\) do not fit the model"),
    ("eval set shadows logits", lambda d, t: {"store_logits": True,
                                              "eval_sets": {"test": (d["xt"], d["yt"]), "test_logits": d["xt"]}},
     ValueError, r"'test_logits' collides with the logits recorded for set 'test'"),
    ("eval set named train", lambda d, t: {"eval_sets": {"train": (d["xt"], d["yt"])}},
     ValueError, r"eval set name 'train' is reserved"),
    ("eval set key not a name", lambda d, t: {"eval_sets": {"my test": d["xt"]}},
     ValueError, r"eval_sets keys must be identifiers"),
    ("eval_sets not a mapping", lambda d, t: {"eval_sets": [d["xt"]]},
     TypeError, r"eval_sets must be a mapping"),
    ("unknown store_weights", lambda d, t: {"store_weights": ["nope"]},
     ValueError, r"store_weights names \['nope'\]"),
    ("stats_fns a list", lambda d, t: {"stats_fns": [len]},
     TypeError, r"stats_fns must be a mapping"),
    ("stats_fns value not callable", lambda d, t: {"stats_fns": {"a": 3}},
     TypeError, r"stats_fns must be a mapping from identifiers to callables"),
    ("stats_fns overwrites lp", lambda d, t: {"stats_fns": {"lp": lambda m, s: 0.0}},
     ValueError, r"stats_fns\['lp'\] collides with the statistic 'lp'"),
    ("stats_fns overwrites grad_norm", lambda d, t: {"stats_fns": {"grad_norm": lambda m, s: 0.0}},
     ValueError, r"stats_fns\['grad_norm'\] collides"),
    ("output is a file", lambda d, t: {"output": _file(t)},
     ValueError, r"output='.*notes.txt' is a file"),
    ("output unwritable", lambda d, t: {"output": "/proc/bayesflat-run"},
     ValueError, r"output folder /proc/bayesflat-run is not writable"),
    ("output not a path", lambda d, t: {"output": 3},
     TypeError, r"output must be a folder path"),
    ("draws beyond memory", lambda d, t: {"draws": 10**8},
     ValueError, r"draws of this run need about .* \(1 chains x 100000000 draws"),
    ("chains beyond disk", lambda d, t: {"chains": 10**5, "draws": 10**5, "output": t / "big"},
     ValueError, r"100000 chains x 100000 draws .* free on the disk of"),
    ("steps beyond bound", lambda d, t: {"burn_in": 10**10},
     ValueError, r"burn_in \+ draws \* thin = 10,000,000,002 steps per chain"),
    ("zero chains", lambda d, t: {"chains": 0}, ValueError, r"chains must be an integer >= 1"),
    ("zero thin", lambda d, t: {"thin": 0}, ValueError, r"thin must be an integer >= 1"),
    ("float draws", lambda d, t: {"draws": 2.5}, ValueError, r"draws must be an integer"),
    ("negative lr", lambda d, t: {"lr": -0.1}, ValueError, r"lr must be a finite number > 0"),
    ("nan lr", lambda d, t: {"lr": float("nan")}, ValueError, r"lr must be a finite number"),
    ("negative temperature", lambda d, t: {"temperature": -1.0},
     ValueError, r"temperature must be a finite number >= 0"),
    ("unknown sampler", lambda d, t: {"sampler": "hmc"}, ValueError, r"unknown sampler 'hmc'"),
    ("unknown sampler option", lambda d, t: {"momentum": 0.9},
     ValueError, r"sampler 'sgld' does not take option\(s\) \['momentum'\]"),
    ("batch larger than data", lambda d, t: {"batch_size": 1000},
     ValueError, r"batch_size=1000 exceeds the 60 training examples"),
    ("zero eval_batch_size", lambda d, t: {"eval_batch_size": 0},
     ValueError, r"eval_batch_size must be an integer >= 1"),
    ("zero loo_points", lambda d, t: {"loo_points": 0}, ValueError, r"loo_points"),
    ("zero workers", lambda d, t: {"workers": 0}, ValueError, r"workers must be an integer >= 1"),
    ("too many workers", lambda d, t: {"workers": 10**5}, ValueError, r"workers must be an integer <= 1024"),
    ("unknown executor", lambda d, t: {"executor": "gpu"}, ValueError, r"executor must be one of"),
    ("unknown parallel", lambda d, t: {"parallel": "both"}, ValueError, r"parallel must be one of"),
    ("unknown init", lambda d, t: {"init": "zeros"}, ValueError, r"init must be one of"),
    ("zero num_data", lambda d, t: {"num_data": 0}, ValueError, r"num_data must be a positive integer"),
    ("negative seed", lambda d, t: {"seed": -1}, ValueError, r"seed must be an integer >= 0"),
    ("zero checkpoint_every", lambda d, t: {"checkpoint_every": 0},
     ValueError, r"checkpoint_every must be an integer >= 1"),
    ("model not a module", lambda d, t: {"model": "mlp"}, TypeError, r"model must be a torch.nn.Module"),
]  # fmt: skip


def _file(folder: Path) -> Path:
    path = folder / "notes.txt"
    path.write_text("notes\n")
    return path


@pytest.mark.parametrize(("changes", "error", "pattern"), [c[1:] for c in API_CASES],
                         ids=[c[0] for c in API_CASES])  # fmt: skip
def test_sample_refuses_bad_input_before_the_first_step(tmp_path, changes, error, pattern):
    d = _data()
    kwargs = _kwargs(d, **changes(d, tmp_path))
    model = kwargs.pop("model", None) or _model()
    train = kwargs.pop("train", (d["x"], d["y"]))
    with pytest.raises(error, match=pattern):
        bayesflat.sample(model, train, **kwargs)
    assert not (tmp_path / "big").exists() or not any((tmp_path / "big").glob("chains/*"))


class _NaNAfter(nn.Module):
    """A network whose evaluation-mode outputs turn NaN at its ``after``-th pass on 20 inputs."""

    def __init__(self, after: int) -> None:
        super().__init__()
        self.net, self.after, self.passes = _model(), after, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        if not self.training and x.shape[0] == 20:
            self.passes += 1
            if self.passes >= self.after:
                out = out * float("nan")
        return out


def test_a_nan_prediction_stops_the_run_naming_set_chain_and_draw_and_keeps_the_draws_before(
    tmp_path,
):
    d = _data()
    # Each chain evaluates a fresh copy of the network: passes 1.. are its draws 0..
    with pytest.raises(bayesflat.SamplingError, match=r"non-finite prediction on eval set "
                       r"'test' at chain 0, draw 4; 4 draws kept") as err:  # fmt: skip
        bayesflat.sample(_NaNAfter(5), (d["x"], d["y"]), init="model", output=tmp_path / "run",
                         **_kwargs(d, draws=6))  # fmt: skip
    attrs = btrace.trace_attrs(err.value.trace)
    assert attrs["complete"] is False and attrs["draws_kept"] == [4]
    probs = btrace.groups(err.value.trace)["predictions"]["test"].values
    assert np.isfinite(probs[0, :4]).all()
    assert not (tmp_path / "run" / ".lock").exists()


# -- one owner per run folder ---------------------------------------------------------------------

_HOLD = """
import sys, time
from bayesflat.run.lock import run_lock
with run_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
"""


def _python(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)  # fmt: skip


def test_a_second_run_into_a_folder_in_use_is_refused_naming_the_folder(tmp_path):
    folder = tmp_path / "run"
    holder = _python("-c", _HOLD, str(folder), "120")
    try:
        assert holder.stdout.readline().strip() == "held"
        d = _data()
        with pytest.raises(ValueError, match=rf"output folder {folder} is in use by process "
                           rf"{holder.pid} on "):  # fmt: skip
            bayesflat.sample(_model(), (d["x"], d["y"]), output=folder, **_kwargs(d))
        code, _, err = _main(["run", "--output", str(folder), *TINY])
        assert code == 1 and f"{folder} is in use by process {holder.pid}" in err
        assert not (folder / "run.json").exists()
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.slow
def test_two_command_line_runs_into_one_folder_one_wins_and_the_other_is_refused(tmp_path):
    folder = tmp_path / "run"
    args = ["-m", "bayesflat.cli", "run", "--sampler", "sgd", "--output", str(folder),
            "--no-report", *TINY]  # fmt: skip
    first, second = _python(*args), _python(*args, "--seed", "1")
    codes = sorted([first.wait(timeout=600), second.wait(timeout=600)])
    errors = first.stderr.read() + second.stderr.read()
    assert codes == [0, 1], errors
    assert "is in use by process" in errors or "already holds a finished run" in errors
    trace = bayesflat.load(folder / "trace.nc")
    summary = json.loads((folder / "metrics.json").read_text())
    assert summary["run"]["seed"] == btrace.trace_attrs(trace)["seed"]
    assert not (folder / ".lock").exists()


def test_a_stale_lock_is_reported_with_how_to_clear_it(tmp_path):
    folder = tmp_path / "run"
    dead = _python("-c", "pass")
    dead.wait()
    folder.mkdir()
    import socket

    (folder / ".lock").write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    d = _data()
    with pytest.raises(ValueError, match=rf"{folder} has a stale lock: process {dead.pid} .* no "
                       rf"longer running .* remove {folder / '.lock'}"):  # fmt: skip
        bayesflat.sample(_model(), (d["x"], d["y"]), output=folder, **_kwargs(d))
    (folder / ".lock").unlink()
    bayesflat.sample(_model(), (d["x"], d["y"]), output=folder, **_kwargs(d))
    assert not (folder / ".lock").exists()


# -- the command line -----------------------------------------------------------------------------


def _main(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as exit_:
            code = exit_.code
    return code, out.getvalue(), err.getvalue()


SHARES_FILES = pytest.mark.xdist_group("test_bad_inputs.files")
"""Tests that use ``files``: one xdist worker runs them all, so the fixture is built once
(``--dist loadgroup``)."""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A finished run, and broken or foreign files around it."""
    root = tmp_path_factory.mktemp("bad")
    run = root / "run"
    code, _, err = _main(["run", "--sampler", "sgd", "--output", str(run), "--no-report", *TINY])
    assert code == 0, err
    summary = json.loads((run / "metrics.json").read_text())
    other = root / "other"
    other.mkdir()
    (other / "metrics.json").write_text(json.dumps(
        {**summary, "test": {**summary["test"], "n": 30, "labels_sha256": "0" * 64}}
    ))  # fmt: skip
    relabelled = root / "relabelled"
    relabelled.mkdir()
    (relabelled / "metrics.json").write_text(
        json.dumps({**summary, "test": {**summary["test"], "labels_sha256": "1" * 64}})
    )
    keyless = root / "keyless"
    keyless.mkdir()
    (keyless / "metrics.json").write_text(json.dumps({k: v for k, v in summary.items()
                                                      if k != "test"}))  # fmt: skip
    (root / "empty").mkdir()
    (root / "notes.nc").write_text("not a trace\n")
    (root / "notes.txt").write_text("notes\n")
    import xarray as xr

    xr.Dataset(attrs={"title": "foreign"}).to_netcdf(root / "foreign.nc", engine="h5netcdf")
    attrs = {k: v for k, v in btrace.trace_attrs(bayesflat.load(run / "trace.nc")).items()
             if isinstance(v, str)}  # fmt: skip
    xr.Dataset(attrs=attrs).to_netcdf(root / "drawless.nc", engine="h5netcdf")
    stale = root / "stale"
    stale.mkdir()
    (stale / ".lock").write_text(json.dumps({"pid": _dead_pid(), "host": _host()}))
    return root


def _dead_pid() -> int:
    proc = _python("-c", "pass")
    proc.wait()
    return proc.pid


def _host() -> str:
    import socket

    return socket.gethostname()


# (id, argv with {root} for the fixture's folder, exit status, pattern in stderr)
CLI_CASES = [
    ("run zero chains", ["run", "--chains", "0", "--output", "{root}/x"], 1, r"chains must be an integer >= 1"),
    ("run draws beyond disk", ["run", "--draws", "10000000", "--output", "{root}/x"], 1,
     r"4 chains x 10000000 draws .* free on the disk"),
    ("run chains beyond disk", ["run", "--chains", "100000", "--output", "{root}/x"], 1,
     r"100000 chains x \d+ draws .* free on the disk"),
    ("run steps beyond bound", ["run", "--burn-in", "10000000000", "--output", "{root}/x"], 1,
     r"burn_in \+ draws \* thin"),
    ("run one replicate", ["run", "--replicates", "1", "--output", "{root}/x"], 1, r"--replicates must be between 2"),
    ("run too many replicates", ["run", "--replicates", "100000000", "--output", "{root}/x"], 1,
     r"--replicates must be between 2 and 100000"),
    ("run zero threads", ["run", "--threads", "0", "--output", "{root}/x"], 1, r"--threads must be between 1"),
    ("run too many threads", ["run", "--threads", "100000", "--output", "{root}/x"], 1, r"--threads must be between 1"),
    ("run too many workers", ["run", "--workers", "100000", "--output", "{root}/x"], 1, r"workers must be an integer <= 1024"),
    ("run batch beyond data", ["run", "--batch-size", "100000000", "--output", "{root}/x"], 1, r"batch_size=100000000 exceeds"),
    ("run negative lr", ["run", "--lr", "-1", "--output", "{root}/x"], 1, r"lr must be a finite number > 0"),
    ("run nan temperature", ["run", "--temperature", "nan", "--output", "{root}/x"], 1, r"temperature must be a finite"),
    ("run unknown sampler", ["run", "--sampler", "hmc", "--output", "{root}/x"], 1, r"unknown sampler 'hmc'"),
    ("run option without value", ["run", "--option", "sigma", "--output", "{root}/x"], 1, r"--option expects KEY=VALUE"),
    ("run unknown option", ["run", "--option", "foo=1", "--output", "{root}/x"], 1, r"does not take option\(s\) \['foo'\]"),
    ("run val-size above 1", ["run", "--val-size", "2", "--output", "{root}/x"], 1, r"val_size"),
    ("run chains not a number", ["run", "--chains", "four"], 2, r"argument --chains: invalid int value"),
    ("run unknown model", ["run", "--model", "resnet"], 2, r"argument --model: invalid choice"),
    ("run output a file", ["run", "--output", "{root}/notes.txt", *TINY], 1, r"output='.*notes.txt' is a file"),
    ("run output holds a run", ["run", "--sampler", "sgd", "--output", "{root}/run", *TINY], 1,
     r"output folder .*run already holds a finished run; continue it .*--force"),
    ("run output stale lock", ["run", "--output", "{root}/stale", *TINY], 1, r"stale.* has a stale lock: process \d+"),
    ("run resume nothing", ["run", "--resume", "{root}/empty"], 1, r"--resume .*empty: no run there"),
    ("report missing path", ["report", "{root}/missing"], 1, r"missing does not exist"),
    ("report empty folder", ["report", "{root}/empty"], 1, r"empty is a folder without trace.nc"),
    ("report not a trace", ["report", "{root}/notes.nc"], 1, r"notes.nc is not a netCDF4/HDF5 file"),
    ("report foreign netcdf", ["report", "{root}/foreign.nc"], 1, r"foreign.nc is a netCDF/HDF5 file but not a bayesflat trace"),
    ("report too many replicates", ["report", "{root}/run", "--replicates", "100000000"], 1,
     r"--replicates must be between 2 and 100000"),
    ("compare different test sets", ["compare", "{root}/run", "{root}/other", "--output", "{root}/cmp"], 1,
     r"runs 'run' and 'other' are scored on different test sets \(\d+ and 30 examples\)"),
    ("compare relabelled test set", ["compare", "{root}/run", "{root}/relabelled", "--output", "{root}/cmp"], 1,
     r"runs 'run' and 'relabelled' are scored on different test sets \(the same size"),
    ("compare metrics lacking a key", ["compare", "{root}/run", "{root}/keyless", "--output", "{root}/cmp"], 1,
     r"keyless/metrics.json lacks the key 'test'"),
    ("compare missing path", ["compare", "{root}/run", "{root}/missing"], 1, r"missing does not exist"),
    ("compare one run twice", ["compare", "{root}/run", "{root}/run"], 1, r"the same run is given twice"),
    ("diagnose missing path", ["diagnose", "{root}/missing"], 1, r"missing does not exist"),
    ("diagnose not a trace", ["diagnose", "{root}/notes.nc"], 1, r"notes.nc is not a netCDF4/HDF5 file"),
    ("diagnose foreign netcdf", ["diagnose", "{root}/foreign.nc"], 1, r"foreign.nc is a netCDF/HDF5 file but not a bayesflat trace"),
    ("diagnose trace without draws", ["diagnose", "{root}/drawless.nc"], 1, r"the trace holds no draws"),
    ("unknown command", ["sample"], 2, r"invalid choice: 'sample'"),
    ("samplers extra argument", ["samplers", "fsgld"], 2, r"unrecognized arguments: fsgld"),
]  # fmt: skip


@SHARES_FILES
@pytest.mark.parametrize(("argv", "status", "pattern"), [c[1:] for c in CLI_CASES],
                         ids=[c[0] for c in CLI_CASES])  # fmt: skip
def test_command_line_refuses_bad_input_with_one_line(files, argv, status, pattern):
    argv = [a.format(root=files) for a in argv]
    code, out, err = _main(argv)
    assert code == status, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    import re

    assert re.search(pattern, err), err
    if status == 1:
        assert len(lines) == 1 and lines[0].startswith(f"bayesflat {argv[0]}: error: "), err


def test_diagnose_uses_the_kept_draws_of_a_partial_trace(tmp_path):
    d = _data()
    with pytest.raises(bayesflat.SamplingError) as err:
        bayesflat.sample(_NaNAfter(8), (d["x"], d["y"]), init="model",
                         **_kwargs(d, chains=2, draws=10))  # fmt: skip
    bayesflat.save(err.value.trace, tmp_path / "partial.nc")
    code, out, stderr = _main(["diagnose", str(tmp_path / "partial.nc")])
    assert code == 0, stderr
    assert "1 chains x 7 draws" in out and "partial" in out
    table = json.loads((tmp_path / "diagnostics.json").read_text())
    ess = [row["ess_bulk"] for row in table["sections"]["convergence"]]
    assert ess and all(v is not None and np.isfinite(v) for v in ess)


def test_a_failing_statistic_stops_the_run_naming_it_and_keeps_the_draws_before():
    d = _data()
    calls = []

    def flaky(model, sampler):
        calls.append(1)
        if len(calls) == 3:
            raise ZeroDivisionError("division by zero")
        return 1.0

    with pytest.raises(bayesflat.SamplingError, match=r"stats_fns\['flaky'\] at chain 0, "
                       r"draw 2 failed: ZeroDivisionError: division by zero; 2 draws kept") as err:  # fmt: skip
        bayesflat.sample(_model(), (d["x"], d["y"]), stats_fns={"flaky": flaky},
                         **_kwargs(d, draws=5))  # fmt: skip
    assert btrace.trace_attrs(err.value.trace)["draws_kept"] == [2]


@SHARES_FILES
def test_reports_are_replaced_whole_or_not_at_all(files, tmp_path, monkeypatch):
    (tmp_path / "metrics.json").write_text("{}\n")
    (tmp_path / "report.html").write_text("<p>previous page</p>\n")

    def full_disk(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    code, _, err = _main(["report", str(files / "run"), "--output", str(tmp_path),
                          "--replicates", "20"])  # fmt: skip
    assert code == 1 and "No space left on device" in err
    assert (tmp_path / "metrics.json").read_text() == "{}\n"
    assert (tmp_path / "report.html").read_text() == "<p>previous page</p>\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "report.html"]
    monkeypatch.undo()
    code, _, err = _main(["diagnose", str(files / "run")])
    assert code == 0, err
    assert json.loads((files / "run" / "diagnostics.json").read_text())["sections"]


@SHARES_FILES
def test_json_and_quiet_output(files):
    code, out, err = _main(["report", str(files / "run"), "--output", str(files / "json"),
                            "--replicates", "20", "--json"])  # fmt: skip
    assert code == 0, err
    payload = json.loads(out)
    saved = json.loads((files / "json" / "metrics.json").read_text())
    assert payload["accuracy"] == saved["test"]["metrics"]["accuracy"]
    assert payload["n"] == saved["test"]["n"] and set(payload["ood_auroc"]) == set(saved["ood"])
    code, out, err = _main(["report", str(files / "run"), "--output", str(files / "json"),
                            "--replicates", "20", "-q"])  # fmt: skip
    assert (code, out, err) == (0, "", "")
    code, out, _ = _main(["samplers", "--json"])
    assert code == 0 and "fsgld" in [e["name"] for e in json.loads(out)]


def test_every_option_has_help_showing_its_default(capsys):
    parser = cli.build_parser()
    sub = parser._subparsers._group_actions[0]  # type: ignore[union-attr]
    for name, command in sub.choices.items():
        for action in command._actions:
            if not action.option_strings or action.dest == "help":
                continue
            assert action.help, (name, action.dest)
        command.print_help()
        text = capsys.readouterr().out
        for action in command._actions:
            if action.option_strings and action.nargs != 0 and action.dest != "help":
                options = text[text.index("options:") :]
                block = options[options.index(action.option_strings[-1]) :]
                assert "default" in block.split("\n  -")[0], (name, action.dest)
    parser.print_help()
    text = capsys.readouterr().out
    assert "``" not in text and ":func:" not in text
    assert all(c.name in text for c in cli.COMMANDS)


def test_help_listing_and_path_errors_do_not_import_torch():
    code = ("import sys\nfrom bayesflat import cli\n"
            "for argv in (['run', '--help'], ['report', 'missing.nc'], ['samplers'],\n"
            "             ['samplers', '--json'], ['run', '--data', 'missing.npz'],\n"
            "             ['run', '--data', '.', '--ood', 'missing.npz'],\n"
            "             ['run', '--resume', 'missing'], ['run', '--resume', '.'],\n"
            "             ['run', '--sampler', 'hmc'],\n"
            "             ['run', '--output', 'pyproject.toml']):\n"
            "    try:\n        cli.main(argv)\n    except SystemExit:\n        pass\n"
            "print(sorted(m for m in ('torch', 'xarray', 'pandas', 'arviz', 'matplotlib') "
            "if m in sys.modules))")  # fmt: skip
    proc = _python("-c", code, cwd=REPO)
    out, err = proc.communicate(timeout=120)
    assert out.strip().splitlines()[-1] == "[]", err


def test_closed_stdout_exits_zero_quietly():
    proc = subprocess.run(
        f"{sys.executable} -m bayesflat.cli samplers | head -1", shell=True, capture_output=True,
        text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)},
        executable="/bin/bash",
    )  # fmt: skip
    assert proc.stdout.startswith("sgd") and proc.stderr == ""


@pytest.mark.parametrize("delay", [1.0, 4.0])
def test_ctrl_c_at_any_moment_exits_130_with_one_line(tmp_path, delay):
    import signal

    proc = _python("-m", "bayesflat.cli", "run", "--output", str(tmp_path / "run"), *TINY)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    lines = [line for line in err.strip().splitlines() if "WARNING" not in line]
    assert len(lines) == 1 and lines[0].startswith("bayesflat run: interrupted: "), err
    assert "Traceback" not in err


def test_a_ctrl_c_at_the_last_draw_is_not_swallowed(tmp_path):
    import signal

    d = _data()
    calls = []

    def ctrl_c_at_last_draw(model, sampler):
        calls.append(1)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return 0.0

    with pytest.raises(bayesflat.SamplingError, match="interrupt") as err:
        bayesflat.sample(_model(), (d["x"], d["y"]), output=tmp_path / "run",
                         stats_fns={"probe": ctrl_c_at_last_draw}, **_kwargs(d, draws=3))  # fmt: skip
    assert isinstance(err.value.__cause__, KeyboardInterrupt)
    assert btrace.trace_attrs(err.value.trace)["draws_kept"] == [3]
    assert not (tmp_path / "run" / ".lock").exists()


def test_run_json_prints_the_headline_only(tmp_path):
    code, out, err = _main(["run", "--sampler", "sgd", "--output", str(tmp_path / "run"),
                            "--no-report", "--json", *TINY])  # fmt: skip
    assert code == 0, err
    payload = json.loads(out)
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert payload["accuracy"] == saved["test"]["metrics"]["accuracy"]
    assert payload["files"] == [str(tmp_path / "run" / n) for n in ("trace.nc", "metrics.json")]


@pytest.mark.slow
def test_ctrl_c_while_sampling_exits_130_naming_the_kept_draws_and_resume(tmp_path):
    import signal

    folder = tmp_path / "run"
    proc = _python("-m", "bayesflat.cli", "run", "--output", str(folder), "--chains", "2",
                   "--draws", "50", "--burn-in", "200", "--thin", "10", "--no-progress")  # fmt: skip
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not any(folder.glob("chains/*/checkpoint.pt")):
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    lines = [line for line in err.strip().splitlines() if "WARNING" not in line]
    assert len(lines) == 1 and "draws kept" in lines[0], err
    assert f"`bayesflat run --resume {folder}` continues it" in lines[0]
    assert not (folder / ".lock").exists()
