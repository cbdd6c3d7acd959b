"""The bayesflat command line: run, report and compare end to end; one-line errors."""

import contextlib
import io
import json
import subprocess
import sys

import pytest

from bayesflat import cli
from bayesflat import trace as btrace
from bayesflat.report import FORMAT

TINY = ["--chains", "2", "--draws", "3", "--burn-in", "10", "--thin", "2", "--no-progress",
        "--replicates", "20"]  # fmt: skip


def _main(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


SHARES_RUNS = pytest.mark.xdist_group("test_cli.runs")
"""Tests that use ``runs``: one xdist worker runs them all, so the fixture is built once
(``--dist loadgroup``)."""


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    results = {}
    for sampler in ("fsgld", "sgd"):
        folder = root / sampler
        results[sampler] = (folder, *_main(["run", "--sampler", sampler, "--output", str(folder),
                                            *TINY]))  # fmt: skip
    return results


@SHARES_RUNS
@pytest.mark.parametrize("sampler", ["fsgld", "sgd"])
def test_run_writes_trace_metrics_and_report(runs, sampler):
    folder, code, out, _ = runs[sampler]
    assert code == 0
    trace = btrace.load(folder / "trace.nc")
    assert btrace.trace_attrs(trace)["sampler"] == sampler
    stored = set(btrace.get_group(trace, "predictions").data_vars)
    assert stored == {"test_logits", "val_logits", "ood_noise_logits", "ood_patches_logits"}
    summary = json.loads((folder / "metrics.json").read_text())
    assert summary["format"] == FORMAT and summary["run"]["sampler"] == sampler
    assert summary["ensemble"]["kind"] == ("bma" if sampler == "fsgld" else "final")
    page = (folder / "report.html").read_text(encoding="utf-8")
    assert "data:image/png;base64," in page
    for label in ("Accuracy", "NLL", "ECE", "AUROC ood_patches", "AUROC ood_noise", " ± "):
        assert label in out
    assert "report.html" in out


def test_run_without_report_writes_trace_and_metrics_only(tmp_path):
    argv = ["run", "--sampler", "sgd", "--output", str(tmp_path), "--no-report", *TINY]
    code, out, _ = _main(argv)
    assert code == 0 and "Accuracy" in out
    assert (tmp_path / "trace.nc").is_file() and (tmp_path / "metrics.json").is_file()
    assert not (tmp_path / "report.html").exists()


@SHARES_RUNS
def test_report_command_reproduces_the_run_numbers(runs, tmp_path):
    folder, *_ = runs["sgd"]
    code, out, _ = _main(["report", str(folder), "--output", str(tmp_path), "--replicates", "20"])
    assert code == 0 and "AUROC ood_patches" in out
    again = json.loads((tmp_path / "metrics.json").read_text())
    assert again == json.loads((folder / "metrics.json").read_text())
    assert (tmp_path / "report.html").is_file()


@SHARES_RUNS
def test_report_of_a_trace_file_reproduces_the_run_without_torch(runs, tmp_path):
    """In a fresh process, as a user runs it: the report of a logits-only trace and loading
    the run folder need neither torch nor scikit-learn (their imports cost more than a
    second), and the report's numbers equal the run's to the bit."""
    folder, *_ = runs["fsgld"]
    code = (
        "import sys\nimport bayesflat\nfrom bayesflat import cli\n"
        f"cli.main(['report', {str(folder / 'trace.nc')!r}, '--output', {str(tmp_path)!r},"
        " '--replicates', '20', '-q'])\n"
        f"trace = bayesflat.load({str(folder)!r})\n"
        "print((trace.posterior.sizes['chain'], trace.posterior.sizes['draw']))\n"
        "print(sorted(m for m in ('torch', 'sklearn') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    *_, sizes, loaded = result.stdout.strip().splitlines()
    assert loaded == "[]"
    summary = json.loads((folder / "metrics.json").read_text())["run"]
    assert sizes == str((summary["chains"], summary["draws"]))
    again = json.loads((tmp_path / "metrics.json").read_text())
    assert again == json.loads((folder / "metrics.json").read_text())


@SHARES_RUNS
def test_compare_command_writes_table_html_json_and_png(runs, tmp_path):
    folders = [str(runs[s][0]) for s in ("fsgld", "sgd")]
    code, out, _ = _main(["compare", *folders, "--output", str(tmp_path)])
    assert code == 0
    assert "fsgld" in out and "sgd" in out and "AUROC ood_patches" in out and " ± " in out
    comparison = json.loads((tmp_path / "comparison.json").read_text())
    assert [r["name"] for r in comparison["runs"]] == ["fsgld", "sgd"]
    assert (tmp_path / "reliability.png").read_bytes().startswith(b"\x89PNG")
    assert "data:image/png;base64," in (tmp_path / "comparison.html").read_text(encoding="utf-8")


def test_bad_input_exits_with_one_line_and_no_traceback(tmp_path):
    """The one true subprocess test of ``report``: exit status and stderr as a shell sees
    them, for a missing file."""
    path = tmp_path / "missing.nc"
    result = subprocess.run(
        [sys.executable, "-m", "bayesflat.cli", "report", str(path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("bayesflat report: error: ") and str(path) in lines[0]


def test_a_file_that_is_not_a_trace_is_one_line(tmp_path):
    path = tmp_path / "notes.nc"
    path.write_text("not a trace\n")
    code, _, err = _main(["report", str(path)])
    assert code == 1 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("bayesflat report: error: ") and str(path) in err


def test_in_process_errors_are_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    cases = [
        (["compare", str(tmp_path / "empty")], "neither"),
        (["compare", str(tmp_path), str(tmp_path)], "twice"),
        (["report", str(tmp_path / "empty")], "without trace.nc"),
        (["report", str(tmp_path), "--replicates", "1"], "--replicates"),
    ]
    for argv, expected in cases:
        code, _, err = _main(argv)
        assert code == 1 and err.count("\n") == 1 and expected in err, (argv, err)
        assert err.startswith(f"bayesflat {argv[0]}: error: ")


def test_command_table_is_the_parser(capsys):
    names = [c.name for c in cli.COMMANDS]
    assert names[:4] == ["run", "report", "compare", "samplers"]
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["--help"])
    help_text = capsys.readouterr().out
    assert all(name in help_text for name in names)


# -- users' own data ------------------------------------------------------------------------------


def _images(n: int, channels: int, size: int, seed: int, classes: int = 2):
    import numpy as np

    rng = np.random.default_rng(seed)
    y = np.arange(n) % classes
    x = rng.integers(0, 64, size=(n, channels, size, size), dtype=np.uint8)
    x[y == 1] += 128  # class 1 is brighter: learnable in a few steps
    return x, y


def test_run_on_an_npz_file_with_an_ood_set(tmp_path):
    import numpy as np

    x, y = _images(60, 1, 8, seed=0)
    np.savez(tmp_path / "shapes.npz", x=x, y=y)
    np.savez(tmp_path / "noise-set.npz", x=_images(12, 1, 8, seed=1)[0], y=np.zeros(12, int))
    out = tmp_path / "run"
    code, text, err = _main(
        ["run", "--data", str(tmp_path / "shapes.npz"), "--ood", str(tmp_path / "noise-set.npz"),
         "--model", "cnn", "--width", "4", "--batch-size", "8", "--output", str(out),
         "--no-report", *TINY]
    )  # fmt: skip
    assert code == 0, err
    assert "shapes.npz (43 train)" in text  # 20% test, then 10% of the rest for validation
    trace = btrace.load(out / "trace.nc")
    predictions = btrace.get_group(trace, "predictions")
    # the command line stores logits only
    assert predictions["test_logits"].shape == (2, 3, 12, 2)
    assert predictions["val_logits"].shape == (2, 3, 5, 2)
    assert predictions["ood_noise_set_logits"].shape == (2, 3, 12, 2)
    assert "AUROC ood_noise_set" in text
    assert btrace.trace_attrs(trace)["num_data"] == 43


def test_run_on_cifar_batches_with_resnet18_and_resume(tmp_path):
    from bayesflat.data import write_cifar_folder

    classes = [f"c{k}" for k in range(10)]
    train, test = _images(40, 3, 32, seed=2, classes=10), _images(10, 3, 32, seed=3, classes=10)
    write_cifar_folder(tmp_path / "cifar", train, test, classes=classes, batches=2)
    out = tmp_path / "run"
    argv = ["run", "--data", str(tmp_path / "cifar"), "--model", "resnet18", "--width", "2",
            "--augment", "--no-weights", "--val-size", "0", "--batch-size", "8", "--output",
            str(out), "--no-report", *TINY]  # fmt: skip
    code, text, err = _main(argv)
    assert code == 0, err
    trace = btrace.load(out / "trace.nc")
    assert "weights" not in btrace.groups(trace)
    assert btrace.get_group(trace, "predictions")["test_logits"].shape == (2, 3, 10, 10)
    attrs = btrace.trace_attrs(trace)
    assert attrs["model"] == "ResNet18" and attrs["num_data"] == 40
    # The stored recipe rebuilds the same data and model: --resume of a finished run loads it.
    code, text, err = _main(["run", "--resume", str(out), "--no-report", "--no-progress"])
    assert code == 0, err


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--model", "resnet18"], "--model resnet18 is for 32x32 images: give --data"),
        (["--ood", "x.npz"], "--ood needs --data"),
        (["--model", "mlp", "--width", "3"], "--width is for cnn"),
        (["--data", "missing.npz"], "missing.npz"),
    ],
)
def test_bad_data_options_are_one_line_errors(tmp_path, argv, expected):
    code, _, err = _main(["run", *argv, "--output", str(tmp_path / "run"), *TINY])
    assert code == 1 and err.count("\n") == 1 and expected in err, err


def test_package_warnings_print_as_one_line_each(tmp_path):
    # fSGLD at T = 1 with a prior of std 0.05: the coupled sigma (0.139) is above it
    argv = ["run", "--sampler", "fsgld", "--temperature", "1", "--prior-scale", "0.05",
            "--lr", "0.01", "--output", str(tmp_path / "run"), "--no-report", *TINY]  # fmt: skip
    code, _, err = _main(argv)
    assert code == 0, err
    lines = [line for line in err.splitlines() if "ScaleWarning" in line or "sigma =" in line]
    assert lines and all(line.startswith("bayesflat run: warning: sigma = ") for line in lines)
    assert "warnings.warn" not in err and ".py:" not in err
