"""Command line: ``bayesflat run``, ``report``, ``compare`` and ``samplers``.

- ``bayesflat run`` samples the posterior of a reference network on the embedded digits, or on
  a user's image set (``--data PATH``, with ``--ood PATH`` sets), and writes ``trace.nc``,
  ``metrics.json`` and ``report.html`` into its output folder, then prints the headline table;
- ``bayesflat report TRACE`` writes ``metrics.json`` and ``report.html`` for a saved trace;
- ``bayesflat compare RUN...`` puts several runs in one table with a combined reliability plot;
- ``bayesflat samplers`` lists the registry.

Every command exits non-zero with a one-line message on bad input or a failed run; a run that
stops early has already saved the draws it kept. Sub-commands live in :data:`COMMANDS`.
"""

from __future__ import annotations

import argparse
import math
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
    """Arguments of ``bayesflat run``; defaults from :data:`bayesflat.defaults.DEFAULTS`.

    Without ``--data`` the run samples the embedded digits.
    """
    from bayesflat.defaults import DEFAULTS as D

    p.add_argument("--sampler", default=D.sampler, help="registry name (see `bayesflat samplers`)")
    p.add_argument(
        "--data", default=None, metavar="PATH",
        help="a labelled image set (CIFAR batches, SVHN .mat, image folder, npz, IDX; see "
        "bayesflat.data.load) instead of the embedded digits",
    )  # fmt: skip
    p.add_argument(
        "--format", default=None, help="format of --data and --ood (default: recognised)"
    )
    p.add_argument(
        "--ood", action="append", default=[], metavar="PATH",
        help="an out-of-distribution image set for --data's model, repeatable (eval set "
        "ood_<name>; its test split if it has one)",
    )  # fmt: skip
    p.add_argument(
        "--augment", action="store_true",
        help="--data: random crop (4-pixel padding) and horizontal flip of training images",
    )  # fmt: skip
    p.add_argument(
        "--model", default=D.model, choices=("mlp", "cnn", "convnet32", "resnet18"),
        help="reference network (convnet32 and resnet18 need --data)",
    )  # fmt: skip
    p.add_argument(
        "--width", type=int, default=None,
        help="channels of the first stage of cnn, convnet32 and resnet18 (default: the model's)",
    )  # fmt: skip
    p.add_argument(
        "--no-weights", action="store_true",
        help="do not store the weights of every draw (predictions and statistics only)",
    )  # fmt: skip
    p.add_argument("--chains", type=int, default=D.chains, help="independent chains")
    p.add_argument("--draws", type=int, default=D.draws, help="draws kept per chain")
    p.add_argument("--burn-in", type=int, default=D.burn_in, help="steps discarded per chain")
    p.add_argument("--thin", type=int, default=D.thin, help="steps between kept draws")
    p.add_argument("--batch-size", type=int, default=D.batch_size, help="minibatch size |B|")
    p.add_argument("--seed", type=int, default=D.seed, help="root seed of every chain")
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
    p.add_argument(
        "--probabilities", action="store_true",
        help="also store class probabilities in the trace (default: logits only; "
        "probabilities are their softmax)",
    )  # fmt: skip
    p.add_argument(
        "--float16", action="store_true",
        help="store predictions as float16 (half the space; a logit z moves by |z|/2048)",
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
        "--executor", default="auto",
        choices=("auto", "sequential", "processes", "vectorised"),
        help="where the chains run (default auto: processes when --workers > 1, the ranks "
        "under torchrun, else sequential); vectorised: all chains as one batched computation",
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
        "--mc-error", default="batch", choices=("batch", "bootstrap", "spread"),
        help="Monte-Carlo error of the BMA metrics: jackknife over batches of consecutive draws "
        "(default; accounts for autocorrelation), bootstrap over chains, or spread of chains",
    )  # fmt: skip
    p.add_argument(
        "--replicates", type=int, default=200, metavar="N",
        help="bootstrap replicates with --mc-error bootstrap (default 200)",
    )  # fmt: skip
    p.add_argument(
        "--ensemble", default="auto", choices=("auto", "bma", "final"),
        help="bma: average of all draws; final: last draw of each chain as a point estimate; "
        "auto: final for optimisers and T = 0, bma otherwise",
    )  # fmt: skip


_MAX_REPLICATES = 100_000  # bayesflat.predictive.MAX_REPLICATES, without importing torch


def _report_options(args: argparse.Namespace) -> dict[str, Any]:
    if not 2 <= args.replicates <= _MAX_REPLICATES:
        raise CLIError(
            f"--replicates must be between 2 and {_MAX_REPLICATES}, got {args.replicates}"
        )
    return {"n_boot": args.replicates, "ensemble": args.ensemble, "method": args.mc_error}


_RECIPE_KEYS = (
    "sampler", "model", "chains", "draws", "burn_in", "thin", "batch_size", "seed", "lr",
    "temperature", "prior_scale", "sigma", "eta", "option", "val_size", "threads",
    "configurational_temperature", "data", "format", "ood", "augment", "width", "no_weights",
    "probabilities", "float16",
)  # fmt: skip
"""The arguments of ``bayesflat run`` that determine its draws (stored for ``--resume``)."""


def _run_inputs(settings: dict[str, Any]) -> tuple[Any, Any, dict[str, Any], dict[str, Any]]:
    """Model, training data, evaluation sets and :func:`bayesflat.sample` keywords of a run."""
    import torch

    options = _parse_options(settings["option"])
    for name in ("sigma", "eta"):
        if settings.get(name) is not None:
            options[name] = settings[name]
    _check_threads(settings["threads"])
    torch.set_num_threads(settings["threads"])
    if settings.get("data") is None:
        train, eval_sets, model = _digits_inputs(settings)
    else:
        train, eval_sets, model = _file_inputs(settings)
    # runs recorded before this setting existed did not record it; the estimator needs the
    # training tensors, which a --data run streams from a Dataset instead
    record = settings.get("configurational_temperature", False) and isinstance(train, tuple)
    stats_fns = _temperature_stats(train, settings) if record else {}
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
        "store_weights": not settings.get("no_weights", False),
        # Runs recorded before these flags existed stored probabilities in float32.
        "store_probabilities": settings.get("probabilities", True),
        "prediction_dtype": "float16" if settings.get("float16", False) else "float32",
        **options,
    }
    return model, train, eval_sets, kwargs


def _check_threads(threads: int) -> None:
    import os

    cpus = os.cpu_count() or 1
    if not 1 <= threads <= cpus:
        raise CLIError(f"--threads must be between 1 and {cpus} (the CPUs here), got {threads}")


def _temperature_stats(train: Any, settings: dict[str, Any]) -> dict[str, Any]:
    """Record ``theta . grad L`` at every draw: the configurational temperature of the verdict.

    One gradient per kept draw on a fixed subset of 512 training points (unbiased for the
    full-data gradient, so the estimate stays unbiased).
    """
    from bayesflat.diagnostics import Budget, diagnostic_stats

    return diagnostic_stats(
        ("configurational_temperature",), data=train,
        budget=Budget(gradient_subsample=512), prior=settings["prior_scale"],
        seed=settings["seed"],
    )  # fmt: skip


def _digits_inputs(settings: dict[str, Any]) -> tuple[Any, dict[str, Any], Any]:
    """The embedded digits: training tensors, test/val/OOD sets and the model."""
    from bayesflat import data as bdata
    from bayesflat import models

    for flag in ("ood", "augment", "format"):
        if settings.get(flag):
            raise CLIError(f"--{flag} needs --data (the embedded digits have their own OOD sets)")
    if settings["model"] not in ("mlp", "cnn"):
        raise CLIError(
            f"--model {settings['model']} is for 32x32 images: give --data, or use mlp or cnn "
            "on the embedded digits"
        )
    digits = bdata.load_digits_split(val_size=settings["val_size"], flatten=True)
    eval_sets: dict[str, Any] = {"test": (digits.x_test, digits.y_test)}
    if settings["val_size"] > 0:
        eval_sets["val"] = (digits.x_val, digits.y_val)
    for name, x in bdata.ood_sets(digits).items():
        eval_sets[f"ood_{name}"] = x
    model = models.build_model(
        settings["model"], num_classes=digits.num_classes, **_width(settings)
    )
    return (digits.x_train, digits.y_train), eval_sets, model


def _width(settings: dict[str, Any]) -> dict[str, int]:
    width = settings.get("width")
    if width is None:
        return {}
    if settings["model"] == "mlp":
        raise CLIError("--width is for cnn, convnet32 and resnet18; mlp has fixed widths")
    if width < 1:
        raise CLIError(f"--width must be >= 1, got {width}")
    return {"width": width}


def _set_name(path: str) -> str:
    """``ood_<name>`` of an OOD path: its file or folder name as an identifier."""
    stem = Path(path).name.split(".")[0] or "set"
    name = "".join(c if c.isalnum() else "_" for c in stem).strip("_").lower() or "set"
    return f"ood_{name}"


def _file_inputs(settings: dict[str, Any]) -> tuple[Any, dict[str, Any], Any]:
    """A user's image set: its training Dataset, test/val/OOD sets and the model."""
    from bayesflat import data as bdata
    from bayesflat import models

    split = bdata.load(settings["data"], settings.get("format"), val_size=settings["val_size"])
    eval_sets: dict[str, Any] = dict(split.eval_sets())
    for path in settings.get("ood") or []:
        name = _set_name(path)
        if name in eval_sets:
            raise CLIError(f"two --ood sets are both named {name!r}; give their files other names")
        eval_sets[name] = bdata.load_ood(path, split, settings.get("format"))
    shape = tuple(split.x_train.shape[1:])
    name = settings["model"]
    if name == "mlp":
        model = models.MLP(in_features=math.prod(shape), num_classes=split.num_classes)
    else:
        if len(shape) != 3 or shape[1] != shape[2]:
            raise CLIError(
                f"--model {name} needs square images (C, H, H); --data holds inputs of shape "
                f"{shape}: use --model mlp"
            )
        extra = {"image_size": shape[1]} if name in ("cnn", "resnet18") else {}
        model = models.build_model(
            name, in_channels=split.channels, num_classes=split.num_classes, **extra,
            **_width(settings),
        )  # fmt: skip
    train = split.train_dataset(augment=bool(settings.get("augment")))
    return train, eval_sets, model


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


def _owned(out_dir: Path, rank: int) -> Any:
    """Hold the run folder's lock from sampling through the report (rank 0 only)."""
    import contextlib

    from bayesflat.run.lock import run_lock

    if rank != 0 or (out_dir.exists() and not out_dir.is_dir()):
        return contextlib.nullcontext()  # sample() names the problem
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CLIError(f"--output {out_dir}: cannot create the folder ({err.strerror})") from None
    return run_lock(out_dir)


def _size(train: Any) -> int:
    return len(train[1]) if isinstance(train, tuple) else len(train)


def _check_run_arguments(args: argparse.Namespace) -> None:
    """Refuse a missing path, an output that is a file or an unknown sampler at once.

    These checks need neither torch nor the data, so a typo fails before the seconds that
    importing them takes; every other setting is checked where it is used.
    """
    from bayesflat import samplers

    if args.resume is not None:
        if not args.resume.exists():
            raise CLIError(f"--resume {args.resume}: no run there ({args.resume} does not exist)")
        if not (args.resume / "run.json").is_file():
            raise CLIError(f"--resume {args.resume}: no run there (run.json is missing)")
        return  # the stored recipe holds the other settings
    samplers.entry(args.sampler)
    if args.data is not None:
        _existing(Path(args.data), "--data an image set (see `bayesflat run --help`)")
        for path in args.ood:
            _existing(Path(path), "--ood an image set (see `bayesflat run --help`)")
    if args.output is not None and args.output.exists() and not args.output.is_dir():
        raise CLIError(f"output={str(args.output)!r} is a file; give a folder for the run")


def run_command(args: argparse.Namespace) -> int:
    """Sample a posterior; write ``trace.nc``, ``metrics.json`` and ``report.html``."""
    report_options = _report_options(args)
    _check_run_arguments(args)
    import bayesflat
    from bayesflat.run.sinks import RunFolder

    rank, world = _process_group()
    say = print if rank == 0 else (lambda *a, **k: None)
    settings = {k: getattr(args, k) for k in _RECIPE_KEYS}
    if args.resume is not None:
        folder = RunFolder(args.resume)
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
            executor=args.executor, checkpoint_every=args.checkpoint_every, parallel=args.parallel,
            device=_device(args.device),
        )  # fmt: skip
    else:
        out_dir = _shared_output(args.output or _default_output(args.sampler, args.seed), world)
        model, train, eval_sets, kwargs = _run_inputs(settings)
        source = args.data or "digits"
        say(f"bayesflat run: {args.sampler} on {source} ({_size(train)} train) -> {out_dir}")
        call = lambda: bayesflat.sample(  # noqa: E731
            model, train, eval_sets=eval_sets, progress=not args.no_progress, output=out_dir,
            overwrite=args.force, workers=args.workers, executor=args.executor,
            checkpoint_every=args.checkpoint_every, parallel=args.parallel,
            device=_device(args.device),
            recipe={"rebuild": "bayesflat.cli:rebuild_run", "args": settings}, **kwargs,
        )  # fmt: skip
    args.kept_in = out_dir
    with _owned(out_dir, rank):
        try:
            result = call()
        except bayesflat.SamplingError as err:
            message = str(err).replace(
                "bayesflat.resume continues it", f"`bayesflat run --resume {out_dir}` continues it"
            )
            if isinstance(err.__cause__, KeyboardInterrupt):
                raise KeyboardInterrupt(message) from None
            raise CLIError(message) from None
        if rank != 0:
            return 0
        # Imported once the draws are kept (ArviZ, SciPy and matplotlib take a second or
        # more): sampling starts sooner, and an interrupted run never pays for them.
        from bayesflat.report import build_report

        report = build_report(result, figures=not args.no_report, **report_options)
        paths = report.save(out_dir, html=not args.no_report)
    written = [Path(out_dir) / "trace.nc", *paths.values()]
    args.payload = headline_json(report.summary, written)
    print(report.headline())
    print(f"wrote {', '.join(str(p) for p in written)}")
    return 0


def _existing(path: Path, what: str) -> Path:
    """``path`` if it exists (checked before the heavy imports, so a typo fails at once)."""
    if not path.exists():
        raise CLIError(f"{path} does not exist; pass {what}")
    return path


def _trace_path(path: Path) -> Path:
    _existing(path, "a trace file (.nc) or a run folder holding trace.nc")
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
    report_options = _report_options(args)
    path = _trace_path(args.trace)
    from bayesflat import trace as btrace
    from bayesflat.report import build_report

    report = build_report(btrace.load(path, lazy=True), **report_options)
    paths = report.save(args.output or path.parent)
    args.payload = headline_json(report.summary, list(paths.values()))
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
    report_options = _report_options(args)
    for path in args.runs:
        _existing(path, "run folders of `bayesflat run`, metrics.json files or trace files")
    names = _run_names(args.runs)
    from bayesflat.report import compare, load_summary

    summaries = {name: load_summary(path, **report_options) for name, path in
                 zip(names, args.runs, strict=True)}  # fmt: skip
    comparison = compare(summaries)
    paths = comparison.save(args.output)
    args.payload = {
        "runs": {
            run["name"]: _metrics_json(run["metrics"], run["ood_auroc"])
            for run in comparison.summary["runs"]
        },
        "files": [str(p) for p in paths.values()],
    }
    print(comparison.table())
    print(f"wrote {paths['json']}, {paths['html']} and {paths['png']}")
    return 0


def samplers_command(args: argparse.Namespace) -> int:
    """List the registry: name, kind, one-line summary, paper, and the options with defaults.

    Reads the registry's table only (torch is not imported).
    """
    from bayesflat import samplers

    entries = samplers.describe()
    args.payload = [
        {"name": e.name, "kind": "sampler" if e.is_sampler else "optimiser",
         "summary": e.summary, "reference": e.reference, "options": _json_ready(e.options)}
        for e in entries
    ]  # fmt: skip
    width = max(len(e.name) for e in entries)
    for e in entries:
        kind = "sampler" if e.is_sampler else "optimiser"
        print(f"{e.name:<{width}}  {kind:<9}  {e.summary}  [{e.reference}]")
        if e.options:
            options = ", ".join(f"{k}={v!r}" for k, v in e.options.items())
            print(f"{'':<{width}}  {'':<9}  options: {options}")
    return 0


def _json_ready(options: dict[str, Any]) -> dict[str, Any]:
    """Option defaults for JSON: a non-finite number as its text (``inf``)."""
    return {
        k: str(v) if isinstance(v, float) and not math.isfinite(v) else v
        for k, v in options.items()
    }


def diagnose_command(args: argparse.Namespace) -> int:
    """Print the diagnose table of a saved trace; write diagnostics.json and .html beside it."""
    _existing(args.trace, "a trace file (.nc) or a run folder holding trace.nc")
    from bayesflat.diagnostics.report import write_diagnostics

    result, json_path, html_path = write_diagnostics(args.trace)
    args.payload = {**result.to_dict(), "files": [str(json_path), str(html_path)]}
    print(result.to_text())
    print(f"wrote {json_path} and {html_path}")
    return 0


def _metrics_json(metrics: dict[str, Any], ood_auroc: dict[str, Any]) -> dict[str, Any]:
    out = {k: metrics[k] for k in ("accuracy", "nll", "ece") if k in metrics}
    out["ood_auroc"] = dict(ood_auroc)
    return out


def headline_json(summary: dict[str, Any], files: Sequence[Path]) -> dict[str, Any]:
    """The headline metrics of a report summary as a JSON-ready dict (``--json``).

    ``{"test_set", "n", "ensemble", "accuracy", "nll", "ece", "ood_auroc": {set: metric},
    "temperature_scaled", "files"}``; every metric is ``{"value", "mc_error"}``, AUROC of the
    predictive-entropy score.
    """
    from bayesflat.report import HEADLINE_SCORE

    test = summary["test"]
    ood = {
        name: block["scores"].get(HEADLINE_SCORE, {}).get("auroc")
        for name, block in summary.get("ood", {}).items()
    }
    scaling = test.get("temperature_scaling")
    return {
        "test_set": test["set"],
        "n": test["n"],
        "ensemble": summary["ensemble"]["kind"],
        **_metrics_json(test["metrics"], ood),
        "temperature_scaled": (
            {"temperature": scaling["temperature"], **scaling["metrics"]} if scaling else None
        ),
        "files": [str(p) for p in files],
    }


def add_output_options(p: argparse.ArgumentParser) -> None:
    """``-q/--quiet`` and ``--json``, shared by every command."""
    p.add_argument(
        "-q", "--quiet", action="store_true",
        help="print nothing but errors (no progress, tables or file list)",
    )  # fmt: skip
    p.add_argument(
        "--json", action="store_true",
        help="print only the headline results as one JSON document on stdout",
    )  # fmt: skip


class Command(NamedTuple):
    """One sub-command: its name, one-line help, argument builder and implementation."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None] | None
    run: Callable[[argparse.Namespace], int]


COMMANDS: list[Command] = [
    Command("run", "sample a network's posterior on digits or your images and report it",
            add_run_arguments, run_command),
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


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions kept as written; every option's help ends with its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (
            "default" in text
            or action.default is argparse.SUPPRESS
            or action.nargs == 0  # flags: off unless given
            or not action.option_strings
        ):
            return text
        shown = "none" if action.default is None or action.default == [] else "%(default)s"
        return f"{text} (default: {shown})"


def _description() -> str:
    """The top-level help text (plain text; the command list follows it)."""
    return (
        "bayesflat: flatness-aware stochastic-gradient MCMC for Bayesian deep learning.\n"
        "Sample neural-network posteriors, report calibration and OOD detection with\n"
        "Monte-Carlo errors, and diagnose convergence.\n"
        "`bayesflat COMMAND --help` lists the options of a command."
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``bayesflat`` argument parser with every sub-command of :data:`COMMANDS`."""
    from bayesflat import __version__

    parser = _Parser(prog="bayesflat", description=_description(), formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"bayesflat {__version__}")
    sub = parser.add_subparsers(
        dest="command",
        required=True,
        parser_class=_Parser,
        metavar="COMMAND",
        title="commands",
    )
    for command in COMMANDS:
        p = sub.add_parser(
            command.name, help=command.help, description=command.help,
            formatter_class=_HelpFormatter,
        )  # fmt: skip
        if command.add_arguments is not None:
            command.add_arguments(p)
        add_output_options(p)
        p.set_defaults(func=command.run)
    return parser


def _restore_sigint() -> None:
    """Ctrl-C raises KeyboardInterrupt from the first instruction on (even if inherited off)."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _kept(args: argparse.Namespace | None, err: BaseException) -> str:
    """One line saying what an interrupted command kept."""
    message = " ".join(str(err).split())
    if message:
        return message
    out_dir = getattr(args, "kept_in", None)
    if out_dir is None and getattr(args, "command", None) == "run":
        return "the run had not started; nothing written"
    if out_dir is None:
        return "nothing half-written (every file is replaced whole or not at all)"
    out_dir = Path(out_dir)
    done = [n for n in ("trace.nc", "metrics.json", "report.html") if (out_dir / n).is_file()]
    if done:
        return f"kept {', '.join(done)} in {out_dir}"
    if any(out_dir.glob("chains/*/checkpoint.pt")):
        return f"kept the checkpointed draws in {out_dir}; continue with --resume {out_dir}"
    return f"nothing kept in {out_dir}"


def _stdout_closed() -> int:
    """The reader of stdout went away (``| head``): stop quietly, exit 0."""
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass  # stdout is not a file descriptor (tests); nothing will be flushed to it
    return 0


def _exit_now(status: int) -> None:
    """End the process with ``status`` at once.

    An interrupt that lands inside an extension's start-up code (torch's, during its import)
    leaves CPython marked as killed by SIGINT even once handled, so a normal exit would report
    the signal instead of ``status``. Every file has been written or removed by now.
    """
    import contextlib
    import os

    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(status)


def _one_line_warning(name: str) -> Callable[..., None]:
    """A ``warnings.showwarning`` that prints bayesflat's own warnings as one line each.

    The package's warnings (``ScaleWarning``, ``DivergenceWarning``, ...) are addressed to
    the user of the command, not to the code that called ``warnings.warn``; other packages'
    warnings keep Python's format.
    """
    import warnings

    default = warnings.showwarning

    def show(message: Any, category: type, filename: str, lineno: int, *rest: Any) -> None:
        if category.__module__.split(".")[0] == "bayesflat":
            print(f"{name}: warning: {' '.join(str(message).split())}", file=sys.stderr)
        else:
            default(message, category, filename, lineno, *rest)

    return show


def _run(args: argparse.Namespace) -> int:
    """Run the command with ``--quiet`` / ``--json`` applied to what it prints."""
    import contextlib
    import io
    import json

    if not (args.quiet or args.json):
        import warnings

        with warnings.catch_warnings():
            warnings.showwarning = _one_line_warning(f"bayesflat {args.command}")
            return int(args.func(args))
    if hasattr(args, "no_progress"):
        args.no_progress = True
    import logging
    import warnings

    logging.getLogger("arviz").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        code = int(args.func(args))
    if args.json and code == 0:
        print(json.dumps(getattr(args, "payload", None), indent=2, allow_nan=False))
    return code


def _return_large_blocks() -> None:
    """Serve every allocation of 1 MiB or more from its own mapping (glibc's ``mallopt``,
    ``M_MMAP_THRESHOLD``), so that it goes back to the system when freed.

    glibc raises that threshold each time a large block is freed; the slabs of draws the
    report reads one after another then come from the heap and fragment it, and the peak
    memory of ``bayesflat run`` grew with the number of draws read (measured: +25% from 100
    to 2000 draws, +8% with the threshold fixed). A no-op where the C library has no
    ``mallopt``.
    """
    import ctypes

    if not sys.platform.startswith("linux"):
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    m_mmap_threshold = -3
    mallopt(ctypes.c_int(m_mmap_threshold), ctypes.c_int(1 << 20))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bayesflat`` command.

    Exit status: 0 on success (also when the reader of stdout goes away), 1 on an error
    (one line on stderr), 2 on a usage error, 130 on Ctrl-C (one line saying what was kept).
    """
    _restore_sigint()
    if argv is None:  # the command's own process, not a call from Python
        _return_large_blocks()
    args: argparse.Namespace | None = None
    name = "bayesflat"
    try:
        args = build_parser().parse_args(argv)
        name = f"bayesflat {args.command}"
        if args.command == "run" and args.resume is not None:
            args.explicit = _explicit(argv, args)
        try:
            code = _run(args)
            sys.stdout.flush()
            return code
        except BrokenPipeError:
            return _stdout_closed()
        except (CLIError, ValueError, TypeError, OSError) as err:
            # One line, whatever the message holds (HDF5 errors span several).
            message = " ".join(str(err).split()) or type(err).__name__
            print(f"{name}: error: {message}", file=sys.stderr)
            return 1
    except KeyboardInterrupt as err:
        print(f"{name}: interrupted: {_kept(args, err)}", file=sys.stderr)
        if argv is None:
            _exit_now(130)
        return 130
    except BrokenPipeError:
        return _stdout_closed()


if __name__ == "__main__":
    sys.exit(main())
