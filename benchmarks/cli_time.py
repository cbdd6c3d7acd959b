"""Where a command-line user waits: short commands, the report, and the default run's CPU.

    python benchmarks/cli_time.py            # full run, about 5 minutes on 2 CPUs
    python benchmarks/cli_time.py --quick    # smoke run; its numbers mean nothing
    python benchmarks/cli_time.py --against 24bae8f   # also the report of another commit

Writes ``results/cli_time.md`` and ``results/cli_time.json``.

What is measured
----------------
``commands``
    Wall and CPU time of fresh ``python -m bayesflat.cli ...`` processes, as a user meets
    them: ``--help``, ``run --help``, ``samplers``, ``run --data`` on a missing path (an
    error), and ``report`` of the default run's trace (``bayesflat run`` with its defaults,
    made first); and two Python start-ups: ``bayesflat.load`` of that run folder, and a tiny
    ``bayesflat.sample`` with ``workers=2`` (two spawned chain processes, whose imports are
    most of its cost). The commands are interleaved round by round; the table gives the
    median and the range over rounds. Goals: under 1 s for the first four, at most 5 s for
    the report. With ``--against REV`` the report, the load and the two-worker run by the
    code of commit ``REV`` (run in a temporary git worktree, whose package ``python -m`` and
    ``python -c`` import first) join the rounds, and the median and range of the paired
    ratios (now / at ``REV``) are given: a comparison that survives the drift of a shared
    machine's speed, which absolute seconds do not.
``default run``
    CPU time (user + system, ``os.wait4``) of ``bayesflat run`` with its defaults, split in
    one instrumented process: imports, ``bayesflat.sample`` (and inside it the sampler
    steps), ``build_report`` and the rest. Goal: sampling at least 70% of the run's CPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]

_SPLIT = r"""
import json, sys, time
start = time.process_time()
import bayesflat.cli as cli
import bayesflat
import bayesflat.report as report
from bayesflat.samplers import base
imports = time.process_time() - start
spent = {"sample": 0.0, "steps": 0.0, "build_report": 0.0}

def timed(owner, name, key):
    original = getattr(owner, name)
    def wrapper(*args, **kwargs):
        t = time.process_time()
        try:
            return original(*args, **kwargs)
        finally:
            spent[key] += time.process_time() - t
    setattr(owner, name, wrapper)

timed(bayesflat, "sample", "sample")
timed(report, "build_report", "build_report")
timed(base.Sampler, "step", "steps")
code = cli.main(["run", "--no-progress", "-q", "--output", sys.argv[1], *sys.argv[2:]])
total = time.process_time() - start
print(json.dumps({"imports": imports, **spent, "total": total, "code": code}))
"""


REPORT = "bayesflat report DEFAULT_RUN"
LOAD = "python: bayesflat.load(DEFAULT_RUN)"
WORKERS = "python: bayesflat.sample(workers=2), 2 chains x 2 draws"
PAIRED = (REPORT, LOAD, WORKERS)
"""The cases also timed at ``--against REV``, with paired ratios."""

_LOAD = "import sys, bayesflat\nbayesflat.load(sys.argv[1])\n"
_WORKERS = """
import bayesflat
from bayesflat import data, models
d = data.load_digits_split()
bayesflat.sample(
    models.MLP(), (d.x_train, d.y_train), chains=2, workers=2, burn_in=20, draws=2, thin=5,
    eval_sets={"test": (d.x_test, d.y_test)}, progress=False,
)
# Stop the fork server, if the run started one, and wait for it: the CPU that wait4 reports
# for this process then includes the server and the workers it forked, as it includes
# spawned workers. (A private function, also used by CPython's own tests.)
from multiprocessing import forkserver
forkserver._forkserver._stop()
"""


def _timed(cmd: list[str], cwd: Path = REPO) -> tuple[float, float, int]:
    """Wall and CPU seconds (``wait4``: the process and the children it waited for) of
    ``cmd``, and its exit code."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    return wall, usage.ru_utime + usage.ru_stime, os.waitstatus_to_exitcode(status)


def commands(trace_dir: Path, rounds: int, against: tuple[str, Path] | None = None) -> dict:
    py = [sys.executable, "-m", "bayesflat.cli"]
    report = [*py, "report", str(trace_dir), "--output"]
    cases: dict[str, tuple[list[str], Path]] = {
        "bayesflat --help": ([*py, "--help"], REPO),
        "bayesflat run --help": ([*py, "run", "--help"], REPO),
        "bayesflat samplers": ([*py, "samplers"], REPO),
        "bayesflat run --data MISSING (error)": (
            [*py, "run", "--data", str(trace_dir / "none")], REPO
        ),
        REPORT: ([*report, str(trace_dir / "again")], REPO),
        LOAD: ([sys.executable, "-c", _LOAD, str(trace_dir)], REPO),
        WORKERS: ([sys.executable, "-c", _WORKERS], REPO),
    }  # fmt: skip
    if against is not None:
        # `python -m` and `-c` put the working folder first on sys.path: run in the other tree
        rev, tree = against
        cases[f"{REPORT} at {rev}"] = ([*report, str(trace_dir / "again_rev")], tree)
        cases[f"{LOAD} at {rev}"] = (cases[LOAD][0], tree)
        cases[f"{WORKERS} at {rev}"] = (cases[WORKERS][0], tree)
    walls: dict[str, list[float]] = {name: [] for name in cases}
    cpus: dict[str, list[float]] = {name: [] for name in cases}
    codes: dict[str, int] = {}
    for _ in range(rounds):
        for name, (cmd, cwd) in cases.items():
            wall, cpu, code = _timed(cmd, cwd)
            walls[name].append(wall)
            cpus[name].append(cpu)
            codes[name] = code
    return {
        name: {
            "median_s": statistics.median(v),
            "min_s": min(v),
            "max_s": max(v),
            "cpu_median_s": statistics.median(cpus[name]),
            "exit_code": codes[name],
            "walls_s": v,
            "cpus_s": cpus[name],
        }
        for name, v in walls.items()
    }


def paired_ratio(timed: dict[str, Any], rev: str) -> dict[str, Any]:
    """Per round, each case of :data:`PAIRED` over the same case at ``rev``: medians and
    ranges of the wall and of the CPU ratios."""

    def summary(a: list[float], b: list[float]) -> dict[str, Any]:
        ratios = [x / y for x, y in zip(a, b, strict=True)]
        return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios),
                "ratios": ratios}  # fmt: skip

    return {
        "rev": rev,
        "cases": {
            name: {
                kind: summary(timed[name][key], timed[f"{name} at {rev}"][key])
                for kind, key in (("wall", "walls_s"), ("cpu", "cpus_s"))
            }
            for name in PAIRED
        },
    }


def _worktree(rev: str, path: Path) -> None:
    """Check ``rev`` out at ``path`` and make sure Python there imports its bayesflat."""
    subprocess.run(["git", "worktree", "add", "--detach", str(path), rev], cwd=REPO,
                   check=True, capture_output=True)  # fmt: skip
    where = subprocess.run([sys.executable, "-c", "import bayesflat; print(bayesflat.__file__)"],
                           cwd=path, check=True, capture_output=True, text=True).stdout  # fmt: skip
    if not Path(where.strip()).resolve().is_relative_to(path.resolve()):
        raise RuntimeError(f"in {path}, Python imports bayesflat from {where.strip()}")


def default_run(out: Path, extra: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, "-c", _SPLIT, str(out), *extra]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    stdout = proc.stdout.read().decode()
    if status != 0:
        raise RuntimeError(f"the default run failed: {proc.stderr.read().decode()[-800:]}")
    split = json.loads(stdout.strip().splitlines()[-1])
    cpu = usage.ru_utime + usage.ru_stime
    split["process_cpu_s"] = cpu
    split["shares"] = {
        k: split[k] / split["total"] for k in ("imports", "sample", "steps", "build_report")
    }
    return split


def _markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Command-line times",
        "",
        f"Machine: {result['machine']}; torch {result['torch']}; "
        f"load average before/after {result['load'][0]:.2f}/{result['load'][1]:.2f}.",
        "",
        f"## Commands (fresh processes, {result['rounds']} interleaved rounds)",
        "",
        "| command | median wall | range | median CPU | exit code | goal |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, row in result["commands"].items():
        goal = (
            "<= 5 s" if name == REPORT
            else "(reference)" if " at " in name
            else "(start-up)" if name.startswith("python")
            else "< 1 s"
        )  # fmt: skip
        lines.append(
            f"| `{name}` | {row['median_s']:.2f} s | {row['min_s']:.2f}-{row['max_s']:.2f} s "
            f"| {row['cpu_median_s']:.2f} s | {row['exit_code']} | {goal} |"
        )
    lines += [
        "",
        "CPU: user + system time of the process and of the processes it waited for (the two "
        "workers of `workers=2`, and the fork server they were forked from).",
    ]
    paired = result.get("paired")
    if paired is not None:
        lines += [
            "",
            f"Paired per round, each over the same at `{paired['rev']}` (median and range):",
            "",
            "| command | wall ratio | CPU ratio |",
            "|---|---:|---:|",
        ]
        for name, row in paired["cases"].items():
            w, c = row["wall"], row["cpu"]
            lines.append(
                f"| `{name}` | **{w['median']:.3f}** ({w['min']:.3f}-{w['max']:.3f}) "
                f"| **{c['median']:.3f}** ({c['min']:.3f}-{c['max']:.3f}) |"
            )
    split = result["default_run"]
    shares = split["shares"]
    lines += [
        "",
        "## The default `bayesflat run` (CPU time of one instrumented process)",
        "",
        "| part | CPU | share |",
        "|---|---:|---:|",
        f"| imports | {split['imports']:.1f} s | {shares['imports']:.0%} |",
        f"| `bayesflat.sample` | {split['sample']:.1f} s | {shares['sample']:.0%} |",
        f"| of which sampler steps | {split['steps']:.1f} s | {shares['steps']:.0%} |",
        f"| `build_report` (metrics.json, report.html) | {split['build_report']:.1f} s "
        f"| {shares['build_report']:.0%} |",
        f"| whole process (`wait4`) | {split['process_cpu_s']:.1f} s | |",
        "",
        "`bayesflat.sample` includes, besides the steps, the evaluation of every kept draw on "
        "the evaluation sets and the LOO points, the diagnostics probes and writing the run "
        "folder. Goal: sampling at least 70% of the run's CPU.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run; numbers mean nothing")
    parser.add_argument("--out", type=Path, default=OUT, help="folder for the results")
    parser.add_argument(
        "--against", metavar="REV", default=None,
        help="also time the report by the code of this git commit, and the paired ratio",
    )  # fmt: skip
    args = parser.parse_args(argv)
    import torch

    load = [os.getloadavg()[0]]
    extra = (
        ["--draws", "8", "--burn-in", "20", "--thin", "2", "--chains", "2"] if args.quick else []
    )
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "default"
        split = default_run(run_dir, extra)
        rounds = 1 if args.quick else 5
        against = None
        if args.against is not None:
            against = (args.against, Path(tmp) / "against")
            _worktree(args.against, against[1])
        try:
            timed = commands(run_dir, rounds, against)
        finally:
            if against is not None:
                subprocess.run(["git", "worktree", "remove", "--force", str(against[1])],
                               cwd=REPO, capture_output=True)  # fmt: skip
    load.append(os.getloadavg()[0])
    result = {
        "written": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "load": load,
        "rounds": rounds,
        "quick": args.quick,
        "commands": timed,
        "paired": None if args.against is None else paired_ratio(timed, args.against),
        "default_run": split,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cli_time.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "cli_time.md").write_text(_markdown(result))
    print(_markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
