"""Where a command-line user waits: short commands, the report, and the default run's CPU.

    python benchmarks/cli_time.py            # full run, about 5 minutes on 2 CPUs
    python benchmarks/cli_time.py --quick    # smoke run; its numbers mean nothing
    python benchmarks/cli_time.py --against 24bae8f   # also the report of another commit

Writes ``results/cli_time.md`` and ``results/cli_time.json``.

What is measured
----------------
``commands``
    Wall time of fresh ``python -m bayesflat.cli ...`` processes, as a user meets them:
    ``--help``, ``run --help``, ``samplers``, ``run --data`` on a missing path (an error), and
    ``report`` of the default run's trace (``bayesflat run`` with its defaults, made first).
    The commands are interleaved round by round; the table gives the median and the range
    over rounds. Goals: under 1 s for the first four, at most 5 s for the report. With
    ``--against REV`` the report of the same trace by the code of commit ``REV`` (run in a
    temporary git worktree, whose package ``python -m`` imports first) joins the rounds, and
    the median and range of the paired ratios report / report at ``REV`` are given: a
    comparison that survives the drift of a shared machine's speed, which absolute seconds
    do not.
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


def _wall(cmd: list[str], cwd: Path = REPO) -> tuple[float, int]:
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    return time.perf_counter() - start, proc.returncode


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
    }  # fmt: skip
    if against is not None:
        # `python -m` puts the working folder first on sys.path: run in the other tree
        rev, tree = against
        cases[f"{REPORT} at {rev}"] = ([*report, str(trace_dir / "again_rev")], tree)
    walls: dict[str, list[float]] = {name: [] for name in cases}
    codes: dict[str, int] = {}
    for _ in range(rounds):
        for name, (cmd, cwd) in cases.items():
            wall, code = _wall(cmd, cwd)
            walls[name].append(wall)
            codes[name] = code
    return {
        name: {
            "median_s": statistics.median(v),
            "min_s": min(v),
            "max_s": max(v),
            "exit_code": codes[name],
            "walls_s": v,
        }
        for name, v in walls.items()
    }


def paired_ratio(timed: dict[str, Any], rev: str) -> dict[str, Any]:
    """Per round, the report's wall over the report's wall at ``rev``: median and range."""
    ratios = [
        a / b
        for a, b in zip(timed[REPORT]["walls_s"], timed[f"{REPORT} at {rev}"]["walls_s"],
                        strict=True)
    ]  # fmt: skip
    return {"rev": rev, "median": statistics.median(ratios), "min": min(ratios),
            "max": max(ratios), "ratios": ratios}  # fmt: skip


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
        f"## Commands (wall time of a fresh process, {result['rounds']} interleaved rounds)",
        "",
        "| command | median | range | exit code | goal |",
        "|---|---:|---:|---:|---|",
    ]
    for name, row in result["commands"].items():
        goal = "<= 5 s" if name == REPORT else "(reference)" if "report" in name else "< 1 s"
        lines.append(
            f"| `{name}` | {row['median_s']:.2f} s | {row['min_s']:.2f}-{row['max_s']:.2f} s "
            f"| {row['exit_code']} | {goal} |"
        )
    paired = result.get("paired")
    if paired is not None:
        lines += [
            "",
            f"Paired per round, the report over the report at `{paired['rev']}`: "
            f"**{paired['median']:.3f}** (range {paired['min']:.3f}-{paired['max']:.3f}).",
        ]
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
