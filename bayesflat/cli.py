"""Command line: ``bayesflat run``, ``report``, ``compare`` and ``samplers``.

- ``bayesflat run`` samples the embedded digits posterior and writes ``trace.nc``,
  ``metrics.json`` and ``report.html`` into its output folder, then prints the headline table;
- ``bayesflat report TRACE`` writes ``metrics.json`` and ``report.html`` for a saved trace;
- ``bayesflat compare RUN...`` puts several runs in one table with a combined reliability plot;
- ``bayesflat samplers`` lists the registry.

Every command exits non-zero with a one-line message on bad input or a failed run; a run that
stops early has already saved the draws it kept. Sub-commands live in :data:`COMMANDS`.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

__all__ = ["COMMANDS", "Command", "build_parser", "main"]


class CLIError(Exception):
    """An error reported to the user as one line, exit status 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _option_value(text: str) -> Any:
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _parse_options(pairs: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            raise CLIError(f"--option expects KEY=VALUE with KEY an identifier, got {pair!r}")
        out[key] = _option_value(value)
    return out


def _default_output(sampler: str, seed: int) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("bayesflat-runs") / f"{sampler}-seed{seed}-{stamp}"


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``bayesflat run``; defaults from :data:`bayesflat.defaults.DEFAULTS`."""
    from bayesflat.defaults import DEFAULTS as D

    p.add_argument("--sampler", default=D.sampler, help="registry name (see `bayesflat samplers`)")
    p.add_argument("--model", default=D.model, choices=("mlp", "cnn"), help="reference network")
    p.add_argument("--chains", type=int, default=D.chains)
    p.add_argument("--draws", type=int, default=D.draws, help="draws kept per chain")
    p.add_argument("--burn-in", type=int, default=D.burn_in, help="steps discarded per chain")
    p.add_argument("--thin", type=int, default=D.thin, help="steps between kept draws")
    p.add_argument("--batch-size", type=int, default=D.batch_size)
    p.add_argument("--seed", type=int, default=D.seed)
    p.add_argument("--lr", type=float, default=D.lr, help="step size, mean-loss units")
    p.add_argument(
        "--temperature", type=float, default=None,
        help=f"T (default {D.temperature} for samplers, 0 for optimisers)",
    )  # fmt: skip
    p.add_argument("--prior-scale", type=float, default=D.prior_scale, help="Gaussian prior std")
    p.add_argument("--sigma", type=float, default=None, help="fSGLD perturbation scale")
    p.add_argument("--eta", type=float, default=None, help="fSGLD coupling exponent in (0, 1)")
    p.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE",
        help="further sampler option, repeatable (e.g. --option num_perturbations=2)",
    )  # fmt: skip
    p.add_argument(
        "--val-size", type=float, default=D.val_size, help="validation fraction of train"
    )
    p.add_argument(
        "--configurational-temperature", action=argparse.BooleanOptionalAction,
        default=D.configurational_temperature,
        help="record theta . grad L of the full-data potential at every kept draw "
        "(one training-set gradient per draw)",
    )  # fmt: skip
    p.add_argument("--output", type=Path, default=None, help="output folder (default: named)")
    p.add_argument(
        "--resume", type=Path, default=None, metavar="DIR",
        help="continue the unfinished chains of the run in DIR (other run options must match)",
    )  # fmt: skip
    p.add_argument(
        "--force", action="store_true", help="replace a run already in the output folder"
    )
    p.add_argument(
        "--workers", type=int, default=1,
        help="run the chains in this many local processes (one torch thread each)",
    )  # fmt: skip
    p.add_argument(
        "--checkpoint-every", type=int, default=None, metavar="K",
        help="checkpoint every K kept draws (default: about every 5 s)",
    )  # fmt: skip
    p.add_argument(
        "--parallel", default="chains", choices=("chains", "data"),
        help="under torchrun: divide the chains among the ranks, or run every chain "
        "data-parallel across them",
    )  # fmt: skip
    p.add_argument(
        "--device", default="cpu",
        help="torch device of the chains; under torchrun 'cuda' means each rank's own GPU",
    )  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    p.add_argument(
        "--threads", type=int, default=1,
        help="torch intra-op threads (default 1: the digits networks are too small to gain)",
    )  # fmt: skip
    p.add_argument(
        "--no-report", action="store_true",
        help="write trace.nc and metrics.json only, without the figures of report.html",
    )  # fmt: skip
    add_report_options(p)


def add_report_options(p: argparse.ArgumentParser) -> None:
    """Options shared by every command that writes a report."""
    p.add_argument(
        "--replicates", type=int, default=200, metavar="N",
        help="bootstrap replicates of the Monte-Carlo errors (default 200)",
    )  # fmt: skip
    p.add_argument(
        "--ensemble", default="auto", choices=("auto", "bma", "final"),
        help="bma: average of all draws; final: last draw of each chain as a point estimate; "
        "auto: final for optimisers and T = 0, bma otherwise",
    )  # fmt: skip


def _report_options(args: argparse.Namespace) -> dict[str, Any]:
    if args.replicates < 2:
        raise CLIError(f"--replicates must be at least 2, got {args.replicates}")
    return {"n_boot": args.replicates, "ensemble": args.ensemble}


_RECIPE_KEYS = (
    "sampler", "model", "chains", "draws", "burn_in", "thin", "batch_size", "seed", "lr",
    "temperature", "prior_scale", "sigma", "eta", "option", "val_size", "threads",
    "configurational_temperature",
)  # fmt: skip
"""The arguments of ``bayesflat run`` that determine its draws (stored for ``--resume``)."""


def _run_inputs(settings: dict[str, Any]) -> tuple[Any, Any, dict[str, Any], dict[str, Any]]:
    """Model, training data, evaluation sets and :func:`bayesflat.sample` keywords of a run."""
    import torch

    from bayesflat import data as bdata
    from bayesflat import models

    options = _parse_options(settings["option"])
    for name in ("sigma", "eta"):
        if settings.get(name) is not None:
            options[name] = settings[name]
    if settings["threads"] < 1:
        raise CLIError(f"--threads must be >= 1, got {settings['threads']}")
    torch.set_num_threads(settings["threads"])
    digits = bdata.load_digits_split(val_size=settings["val_size"], flatten=True)
    eval_sets: dict[str, Any] = {"test": (digits.x_test, digits.y_test)}
    if settings["val_size"] > 0:
        eval_sets["val"] = (digits.x_val, digits.y_val)
    for name, x in bdata.ood_sets(digits).items():
        eval_sets[f"ood_{name}"] = x
    model = models.build_model(settings["model"], num_classes=digits.num_classes)
    train = (digits.x_train, digits.y_train)
    stats_fns = {}
    # runs recorded before this setting existed did not record it
    if settings.get("configurational_temperature", False):
        from bayesflat.diagnostics import diagnostic_stats

        stats_fns = diagnostic_stats(
            ["configurational_temperature"], data=train, prior=settings["prior_scale"]
        )
    kwargs = {
        "sampler": settings["sampler"],
        "chains": settings["chains"],
        "burn_in": settings["burn_in"],
        "draws": settings["draws"],
        "thin": settings["thin"],
        "batch_size": settings["batch_size"],
        "seed": settings["seed"],
        "lr": settings["lr"],
        "temperature": settings["temperature"],
        "prior": settings["prior_scale"],
        "store_logits": True,
        "stats_fns": stats_fns,
        **options,
    }
    return model, train, eval_sets, kwargs


def rebuild_run(recipe: dict[str, Any]) -> tuple[Any, Any, dict[str, Any], dict[str, Any]]:
    """What :func:`bayesflat.resume` needs to continue a run of ``bayesflat run``.

    The settings returned hold only ``stats_fns``, which are rebuilt, not stored.
    """
    model, train, eval_sets, kwargs = _run_inputs(recipe["args"])
    return model, train, eval_sets, {"stats_fns": kwargs["stats_fns"]}


def _explicit(argv: Sequence[str] | None, args: argparse.Namespace) -> dict[str, Any]:
    """The run options given on the command line (not left at their defaults)."""
    parser = build_parser()
    for action in parser._subparsers._group_actions[0].choices["run"]._actions:  # type: ignore[union-attr]
        action.default = argparse.SUPPRESS
    given = vars(parser.parse_args(argv))
    return {k: getattr(args, k) for k in given if k in _RECIPE_KEYS}


def _process_group() -> tuple[int, int]:
    """Join the process group ``torchrun`` describes in the environment; ``(rank, world)``."""
    import os

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world < 2:
        return 0, 1
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        minutes = float(os.environ.get("BAYESFLAT_DIST_TIMEOUT_MIN", "30"))
        dist.init_process_group(backend, timeout=timedelta(minutes=minutes))
    return dist.get_rank(), dist.get_world_size()


def _device(name: str) -> str:
    import os

    if name == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{os.environ['LOCAL_RANK']}"
    return name


def _shared_output(out_dir: Path, world: int) -> Path:
    """Every rank writes to the folder rank 0 named."""
    if world < 2:
        return out_dir
    import torch.distributed as dist

    box = [str(out_dir)]
    dist.broadcast_object_list(box, src=0)
    return Path(box[0])


def run_command(args: argparse.Namespace) -> int:
    """Sample the digits posterior; write ``trace.nc``, ``metrics.json`` and ``report.html``."""
    import bayesflat
    from bayesflat.report import build_report
    from bayesflat.run.sinks import RunFolder

    rank, world = _process_group()
    say = print if rank == 0 else (lambda *a, **k: None)
    report_options = _report_options(args)
    settings = {k: getattr(args, k) for k in _RECIPE_KEYS}
    if args.resume is not None:
        folder = RunFolder(args.resume)
        if not folder.exists():
            raise CLIError(f"--resume {args.resume}: no run there (run.json is missing)")
        recipe = folder.read_meta().get("recipe") or {}
        stored = recipe.get("args")
        if stored is None:
            raise CLIError(
                f"--resume {args.resume}: the run was started from Python; continue it with "
                "bayesflat.resume(folder, model, train_data, ...)"
            )
        differ = [
            f"--{k.replace('_', '-')} {getattr(args, k)!r} (run: {stored.get(k)!r})"
            for k in getattr(args, "explicit", {})
            if getattr(args, k) != stored.get(k)
        ]
        if differ:
            raise CLIError(
                f"--resume {args.resume}: options differ from the run: {', '.join(differ)}"
            )
        out_dir = folder.path
        _run_inputs(stored)  # sets the thread count the run used
        say(f"bayesflat run: resuming {out_dir}")
        call: Any = lambda: bayesflat.resume(  # noqa: E731
            out_dir, progress=not args.no_progress, workers=args.workers,
            checkpoint_every=args.checkpoint_every, parallel=args.parallel,
            device=_device(args.device),
        )  # fmt: skip
    else:
        out_dir = _shared_output(args.output or _default_output(args.sampler, args.seed), world)
        model, train, eval_sets, kwargs = _run_inputs(settings)
        say(f"bayesflat run: {args.sampler} on digits ({len(train[1])} train) -> {out_dir}")
        call = lambda: bayesflat.sample(  # noqa: E731
            model, train, eval_sets=eval_sets, progress=not args.no_progress, output=out_dir,
            overwrite=args.force, workers=args.workers, checkpoint_every=args.checkpoint_every,
            parallel=args.parallel, device=_device(args.device),
            recipe={"rebuild": "bayesflat.cli:rebuild_run", "args": settings}, **kwargs,
        )  # fmt: skip
    try:
        result = call()
    except bayesflat.SamplingError as err:
        raise CLIError(str(err)) from None
    if rank != 0:
        return 0
    report = build_report(result, figures=not args.no_report, **report_options)
    paths = report.save(out_dir, html=not args.no_report)
    print(report.headline())
    print(f"wrote {', '.join(str(p) for p in (Path(out_dir) / 'trace.nc', *paths.values()))}")
    return 0


def _trace_path(path: Path) -> Path:
    if path.is_dir():
        candidate = path / "trace.nc"
        if not candidate.is_file():
            raise CLIError(f"{path} is a folder without trace.nc; pass a trace file or run folder")
        return candidate
    return path


def add_report_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``bayesflat report``."""
    p.add_argument("trace", type=Path, help="trace file (.nc) or a run folder holding trace.nc")
    p.add_argument(
        "--output", type=Path, default=None,
        help="folder for metrics.json and report.html (default: the trace's folder)",
    )  # fmt: skip
    add_report_options(p)


def report_command(args: argparse.Namespace) -> int:
    """Write ``metrics.json`` and ``report.html`` for a saved trace."""
    from bayesflat import trace as btrace
    from bayesflat.report import build_report

    report_options = _report_options(args)
    path = _trace_path(args.trace)
    report = build_report(btrace.load(path), **report_options)
    paths = report.save(args.output or path.parent)
    print(report.headline())
    print(f"wrote {paths['json']} and {paths['html']}")
    return 0


def add_compare_arguments(p: argparse.ArgumentParser) -> None:
    """Arguments of ``bayesflat compare``."""
    p.add_argument(
        "runs", type=Path, nargs="+", metavar="RUN",
        help="run folders of `bayesflat run` (metrics.json or trace.nc), or trace files",
    )  # fmt: skip
    p.add_argument(
        "--output", type=Path, default=Path("bayesflat-compare"),
        help="folder for comparison.json, comparison.html and reliability.png "
        "(default: bayesflat-compare)",
    )  # fmt: skip
    add_report_options(p)


def _run_names(paths: Sequence[Path]) -> list[str]:
    names = [(p if p.is_dir() else p.parent).resolve().name or str(p) for p in paths]
    if len(set(names)) < len(names):
        names = [str(p) for p in paths]
    if len(set(names)) < len(names):
        raise CLIError("the same run is given twice; pass every run once")
    return names


def compare_command(args: argparse.Namespace) -> int:
    """Compare several runs: one table with Monte-Carlo errors and a combined reliability plot."""
    from bayesflat.report import compare, load_summary

    report_options = _report_options(args)
    names = _run_names(args.runs)
    summaries = {name: load_summary(path, **report_options) for name, path in
                 zip(names, args.runs, strict=True)}  # fmt: skip
    comparison = compare(summaries)
    paths = comparison.save(args.output)
    print(comparison.table())
    print(f"wrote {paths['json']}, {paths['html']} and {paths['png']}")
    return 0


def samplers_command(args: argparse.Namespace) -> int:
    """List the registry: name, kind, one-line summary, paper."""
    from bayesflat import samplers

    entries = samplers.describe()
    width = max(len(e.name) for e in entries)
    for e in entries:
        kind = "sampler" if e.is_sampler else "optimiser"
        print(f"{e.name:<{width}}  {kind:<9}  {e.summary}  [{e.reference}]")
    return 0


def diagnose_command(args: argparse.Namespace) -> int:
    """Print the diagnose table of a saved trace; write diagnostics.json and .html beside it."""
    from bayesflat.diagnostics.report import write_diagnostics

    result, json_path, html_path = write_diagnostics(args.trace)
    print(result.to_text())
    print(f"wrote {json_path} and {html_path}")
    return 0


class Command(NamedTuple):
    """One sub-command: its name, one-line help, argument builder and implementation."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None] | None
    run: Callable[[argparse.Namespace], int]


COMMANDS: list[Command] = [
    Command("run", "sample the embedded digits posterior and report it", add_run_arguments,
            run_command),
    Command("report", "write the HTML and JSON report of a saved trace", add_report_arguments,
            report_command),
    Command("compare", "compare several runs in one table and reliability plot",
            add_compare_arguments, compare_command),
    Command("samplers", "list the registered samplers and optimisers", None, samplers_command),
    Command("diagnose", "convergence, temperature and flatness verdicts of a saved trace",
            lambda p: p.add_argument("trace", type=Path, help="trace file or run folder"),
            diagnose_command),
]  # fmt: skip
"""The sub-commands of ``bayesflat``, in help order; append a :class:`Command` to add one."""


def build_parser() -> argparse.ArgumentParser:
    """The ``bayesflat`` argument parser with every sub-command of :data:`COMMANDS`."""
    parser = _Parser(prog="bayesflat", description=__doc__.splitlines()[0])
    from bayesflat import __version__

    parser.add_argument("--version", action="version", version=f"bayesflat {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for command in COMMANDS:
        p = sub.add_parser(command.name, help=command.help, description=command.help)
        if command.add_arguments is not None:
            command.add_arguments(p)
        p.set_defaults(func=command.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bayesflat`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "run" and args.resume is not None:
        args.explicit = _explicit(argv, args)
    try:
        return int(args.func(args))
    except (CLIError, ValueError, TypeError, OSError) as err:
        # One line, whatever the message holds (HDF5 errors span several).
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"bayesflat {args.command}: error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"bayesflat {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
