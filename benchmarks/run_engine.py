"""The run engine at scale: chains against wall time per executor, memory against draws, the
cost of writing the trace and of resuming.

    python benchmarks/run_engine.py            # full run, several minutes on 2 CPUs
    python benchmarks/run_engine.py --quick    # smoke run; its numbers mean nothing

Writes ``results/run_engine.md`` and ``results/run_engine.json``.

What is measured
----------------
``executors``
    Wall time of ``bayesflat.sample`` on the digits MLP (fSGLD, 1000 steps and 50 draws per
    chain, one torch thread per process) for 1, 2, 4 and 8 chains: ``sequential``,
    ``processes`` (``workers=2``, forked from the fork server, whose start the first run
    of the program pays and which is timed apart), ``distributed`` (two gloo
    ranks on 127.0.0.1, chain-parallel, timed on rank 0 from after the process group is up)
    and ``vectorised`` (all chains as one batched forward and backward in one process, with
    one and with two torch threads).
    Candidates are interleaved round by round; the table gives medians and the ratio to one
    sequential chain.
``memory``
    Peak resident memory (``wait4``'s ``ru_maxrss``) of the whole ``bayesflat run`` process
    with weights stored, at ``--draws 100`` and ``--draws 2000`` (``--thin 2``), with and
    without the report's figures (``metrics.json`` is written either way).
``writing``
    Time spent in the folder sink (encoding and appending draws, assembling ``trace.nc``) as
    a fraction of the rest of the run, from timers around the sink's methods.
``resume``
    A run stopped half way and resumed against the same run straight through: wall time of
    both halves over the straight wall time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import bayesflat
from bayesflat import data, models
from bayesflat.run import sinks

OUT = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[1]


def _digits() -> tuple[Any, Any, dict[str, Any]]:
    digits = data.load_digits_split(val_size=0.1)
    return digits.x_train, digits.y_train, {"test": (digits.x_test, digits.y_test)}


def _budget(quick: bool) -> dict[str, int]:
    return (
        {"burn_in": 20, "draws": 4, "thin": 5}
        if quick
        else {"burn_in": 500, "draws": 50, "thin": 10}
    )


def _sample(chains: int, quick: bool, **kw: Any) -> float:
    x, y, sets = _digits()
    start = time.perf_counter()
    bayesflat.sample(
        models.MLP(), (x, y), sampler="fsgld", chains=chains, lr=0.05, temperature=1.0,
        prior=1.0, init="reset", eval_sets=sets, progress=False, **_budget(quick), **kw,
    )  # fmt: skip
    return time.perf_counter() - start


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, chains: int, quick: bool, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
        timeout=datetime.timedelta(minutes=10),
    )  # fmt: skip
    dist.barrier()
    wall = _sample(chains, quick)
    if rank == 0:
        Path(out).write_text(str(wall))
    dist.destroy_process_group()


def _distributed(chains: int, quick: bool) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "wall"
        # On Linux forked from the fork server the processes executor started (torch already
        # imported): the ranks' start-up is not what this times, so it need not cost two more
        # imports.
        torch.multiprocessing.start_processes(
            _rank, args=(_free_port(), chains, quick, str(out)), nprocs=2, join=True,
            start_method="forkserver" if sys.platform.startswith("linux") else "spawn",
        )  # fmt: skip
        return float(out.read_text())


def _threads(n: int, fn: Any, *args: Any, **kw: Any) -> Any:
    """Call ``fn`` with ``n`` torch intra-op threads, then restore the previous count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn(*args, **kw)
    finally:
        torch.set_num_threads(before)


def executors(quick: bool) -> dict[str, Any]:
    counts = [2] if quick else [1, 2, 4, 8]
    rounds = 1 if quick else 3
    _sample(1, True)  # the first run of a process pays one-off costs (imports, allocator)
    # The first run with workers starts the fork server (one import of torch and the chain
    # loop), which later runs reuse: timed apart, as a program meets it once.
    first_processes = _sample(2, quick, workers=2)
    runs = {
        "sequential": lambda c: _sample(c, quick),
        "processes": lambda c: _sample(c, quick, workers=2),
        "distributed": lambda c: _distributed(c, quick),
        "vectorised": lambda c: _sample(c, quick, executor="vectorised"),
        "vectorised, 2 threads": lambda c: _threads(2, _sample, c, quick, executor="vectorised"),
    }
    walls: dict[str, dict[int, list[float]]] = {k: {c: [] for c in counts} for k in runs}
    for _ in range(rounds):
        for chains in counts:
            for name, run in runs.items():
                walls[name][chains].append(run(chains))
    base = statistics.median(walls["sequential"][counts[0]]) / counts[0]
    return {
        "counts": counts,
        "rounds": rounds,
        "median_s": {k: {c: statistics.median(v) for c, v in d.items()} for k, d in walls.items()},
        "ratio_to_one_chain": {
            k: {c: statistics.median(v) / base for c, v in d.items()} for k, d in walls.items()
        },
        "walls_s": walls,
        "first_processes_s": first_processes,
    }


def _peak_rss(args: list[str]) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "bayesflat.cli", "run", "--no-progress", "--output",
               str(Path(tmp) / "run"), *args]  # fmt: skip
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        _, status, usage = os.wait4(proc.pid, 0)
        if status != 0:
            raise RuntimeError(f"{cmd} failed: {proc.stderr.read().decode()[-500:]}")
        return usage.ru_maxrss / 1024, time.perf_counter() - start


def memory(quick: bool) -> dict[str, Any]:
    # A quick run starts one process: the second size would run the same code again.
    sizes = [4] if quick else [100, 2000]
    out: dict[str, Any] = {"draws": sizes}
    labels = [("sampling only (--no-report)", ["--no-report"]), ("with report", [])]
    for label, extra in labels[:1] if quick else labels:
        peaks = {}
        for draws in sizes:
            # thin 2 and a short burn-in: the memory question is about draws kept, not steps
            args = ["--draws", str(draws), "--thin", "2", "--burn-in", "100", *extra]
            if quick:
                args += ["--burn-in", "10", "--chains", "2"]
            peaks[draws] = _peak_rss(args)
        out[label] = {
            "peak_mib": {d: p[0] for d, p in peaks.items()},
            "wall_s": {d: p[1] for d, p in peaks.items()},
            "growth": peaks[sizes[-1]][0] / peaks[sizes[0]][0] - 1.0,
        }
    return out


def writing(quick: bool) -> dict[str, Any]:
    spent = {"write": 0.0, "flush": 0.0, "finish": 0.0}
    originals = {name: getattr(sinks.FolderSink, name) for name in spent}

    def timed(name: str) -> Any:
        def wrapper(self: Any, *a: Any, **k: Any) -> Any:
            start = time.perf_counter()
            try:
                return originals[name](self, *a, **k)
            finally:
                spent[name] += time.perf_counter() - start

        return wrapper

    results = {}
    for label, kw in (
        ("default checkpoints", {}),
        ("checkpoint every draw", {"checkpoint_every": 1}),
    ):
        for name in spent:
            spent[name] = 0.0
            setattr(sinks.FolderSink, name, timed(name))
        try:
            with tempfile.TemporaryDirectory() as tmp:
                wall = _sample(4, quick, output=Path(tmp) / "run", **kw)
        finally:
            for name, fn in originals.items():
                setattr(sinks.FolderSink, name, fn)
        writing_s = sum(spent.values())
        results[label] = {
            "wall_s": wall,
            "writing_s": dict(spent),
            "fraction_of_sampling": writing_s / (wall - writing_s),
        }
    return results


def resume(quick: bool) -> dict[str, Any]:
    x, y, sets = _digits()
    budget = _budget(quick)
    kw = dict(sampler="fsgld", chains=4, lr=0.05, eval_sets=sets, progress=False, **budget)
    start = time.perf_counter()
    bayesflat.sample(models.MLP(), (x, y), **kw)
    straight = time.perf_counter() - start
    calls = {"n": 0}
    half = kw["chains"] * budget["draws"] // 2

    class Stop:
        def __call__(self, model: Any, sampler: Any) -> float:
            calls["n"] += 1
            if calls["n"] == half + 1:
                raise KeyboardInterrupt
            return 0.0

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        try:
            bayesflat.sample(models.MLP(), (x, y), output=tmp, stats_fns={"s": Stop()}, **kw)
        except KeyboardInterrupt:
            pass
        first = time.perf_counter() - start
        start = time.perf_counter()
        bayesflat.resume(tmp, models.MLP(), (x, y), eval_sets=sets, stats_fns={"s": _zero},
                         progress=False)  # fmt: skip
        second = time.perf_counter() - start
    return {"straight_s": straight, "first_half_s": first, "resume_s": second,
            "ratio": (first + second) / straight}  # fmt: skip


def _zero(model: Any, sampler: Any) -> float:
    return 0.0


def _markdown(results: dict[str, Any]) -> str:
    lines = [
        "# Run engine",
        "",
        f"Machine: {results['machine']}; torch {results['torch']}; one torch thread per process."
        + (" QUICK RUN: the numbers mean nothing." if results["quick"] else ""),
        "",
        "## Chains against wall time (digits MLP, fSGLD, 1000 steps and 50 draws per chain)",
        "",
        "| executor | " + " | ".join(f"{c} chains" for c in results["executors"]["counts"]) + " |",
        "|---|" + "---:|" * len(results["executors"]["counts"]),
    ]
    ex = results["executors"]
    for name, row in ex["median_s"].items():
        cells = [f"{row[c]:.1f} s ({ex['ratio_to_one_chain'][name][c]:.2f}x)" for c in ex["counts"]]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Median of {ex['rounds']} interleaved rounds; in brackets the ratio to the wall of one "
        "sequential chain. `processes` and `distributed` use two processes on the 2 cores and "
        "include their start-up (`processes`: two workers forked from the fork server) or the "
        "part after the process group is up (`distributed`). The first `processes` run of the "
        "program, which also starts the fork server (one import of torch and the chain loop), "
        f"took {ex['first_processes_s']:.1f} s for 2 chains. `vectorised` runs every chain in "
        "one process as one batched forward and backward; `vectorised, 2 threads` lets that "
        "process use both cores.",
        "",
        "## Peak memory against draws (`bayesflat run`, weights stored)",
        "",
        "| | " + " | ".join(f"--draws {d}" for d in results["memory"]["draws"]) + " | growth |",
        "|---|" + "---:|" * (len(results["memory"]["draws"]) + 1),
    ]
    mem = results["memory"]
    for label in ("sampling only (--no-report)", "with report"):
        if label not in mem:
            continue
        row = mem[label]
        cells = [f"{row['peak_mib'][d]:.0f} MiB" for d in mem["draws"]]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {100 * row['growth']:+.1f}% |")
    lines += ["", "## Writing the trace", ""]
    lines += ["| checkpoints | wall | in the sink | share of sampling |", "|---|---:|---:|---:|"]
    for label, row in results["writing"].items():
        spent = sum(row["writing_s"].values())
        lines.append(
            f"| {label} | {row['wall_s']:.1f} s | {spent:.2f} s | "
            f"{100 * row['fraction_of_sampling']:.1f}% |"
        )
    r = results["resume"]
    lines += [
        "",
        "## Resume",
        "",
        f"Straight: {r['straight_s']:.1f} s; stopped half way {r['first_half_s']:.1f} s + "
        f"resumed {r['resume_s']:.1f} s = {r['ratio']:.2f} of straight.",
        "",
    ]
    return "\n".join(lines)


def run(out_dir: Path = OUT, quick: bool = False) -> dict[str, Any]:
    """Run every measurement and write ``run_engine.md`` and ``run_engine.json``."""
    torch.set_num_threads(1)
    results = {
        "quick": quick,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "executors": executors(quick),
        "memory": memory(quick),
        "writing": writing(quick),
        "resume": resume(quick),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "run_engine.json").write_text(json.dumps(results, indent=1, default=str))
    (out_dir / "run_engine.md").write_text(_markdown(results))
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=OUT)
    options = parser.parse_args()
    print(_markdown(run(options.out, options.quick)))
