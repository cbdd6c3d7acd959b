"""Command line: ``bayesflat run``, ``bayesflat samplers``.

Every command exits non-zero with a one-line message on bad input or a failed run; a run that
stops early has already saved the draws it kept.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

__all__ = ["main"]


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
    """Arguments of ``bayesflat run`` (the defaults are the embedded digits run)."""
    p.add_argument("--sampler", default="fsgld", help="registry name (see `bayesflat samplers`)")
    p.add_argument("--model", default="mlp", choices=("mlp", "cnn"), help="reference network")
    p.add_argument("--chains", type=int, default=4)
    p.add_argument("--draws", type=int, default=100, help="draws kept per chain")
    p.add_argument("--burn-in", type=int, default=1500, help="steps discarded per chain")
    p.add_argument("--thin", type=int, default=20, help="steps between kept draws")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=0.05, help="step size, mean-loss units")
    p.add_argument(
        "--temperature", type=float, default=None, help="T (default 1; 0 for optimisers)"
    )
    p.add_argument("--prior-scale", type=float, default=1.0, help="Gaussian prior std")
    p.add_argument("--sigma", type=float, default=None, help="fSGLD perturbation scale")
    p.add_argument("--eta", type=float, default=None, help="fSGLD coupling exponent in (0, 1)")
    p.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE",
        help="further sampler option, repeatable (e.g. --option num_perturbations=2)",
    )  # fmt: skip
    p.add_argument("--val-size", type=float, default=0.1, help="validation fraction of train")
    p.add_argument("--output", type=Path, default=None, help="output folder (default: named)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")


def run_command(args: argparse.Namespace) -> int:
    """Sample the digits posterior and write ``trace.nc`` and ``metrics.json``."""
    import torch

    from bayesflat import data as bdata
    from bayesflat import models, sampling

    options = _parse_options(args.option)
    for name in ("sigma", "eta"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    out_dir = args.output or _default_output(args.sampler, args.seed)
    digits = bdata.load_digits_split(val_size=args.val_size, flatten=True)
    eval_sets: dict[str, Any] = {"test": (digits.x_test, digits.y_test)}
    if args.val_size > 0:
        eval_sets["val"] = (digits.x_val, digits.y_val)
    for name, x in bdata.ood_sets(digits).items():
        eval_sets[f"ood_{name}"] = x
    torch.manual_seed(args.seed)
    model = models.build_model(args.model, num_classes=digits.num_classes)
    out_dir.mkdir(parents=True, exist_ok=True)
    trace_path = out_dir / "trace.nc"
    print(f"bayesflat run: {args.sampler} on digits ({digits.num_train} train) -> {out_dir}")
    try:
        result = sampling.sample(
            model,
            (digits.x_train, digits.y_train),
            sampler=args.sampler,
            chains=args.chains,
            burn_in=args.burn_in,
            draws=args.draws,
            thin=args.thin,
            batch_size=args.batch_size,
            eval_sets=eval_sets,
            seed=args.seed,
            progress=not args.no_progress,
            lr=args.lr,
            temperature=args.temperature,
            prior=args.prior_scale,
            log_likelihood_set="test",
            store_logits=True,
            output=trace_path,
            **options,
        )
    except sampling.SamplingError as err:
        raise CLIError(str(err)) from None
    summary = summarise_run(result)
    (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(format_summary(summary))
    print(f"wrote {trace_path} and {out_dir / 'metrics.json'}")
    return 0


def summarise_run(result: Any) -> dict[str, Any]:
    """Headline numbers of a trace: accuracy and NLL of the model average on the test set."""
    import numpy as np

    from bayesflat import trace as btrace

    groups = btrace.groups(result)
    attrs = btrace.trace_attrs(result)
    probs = groups["predictions"]["test"].values
    labels = groups["observed_data"]["test"].values.astype(int)
    bma = probs.reshape(-1, *probs.shape[2:]).mean(axis=0)
    p_true = np.clip(bma[np.arange(labels.size), labels], np.finfo(np.float64).tiny, None)
    return {
        "sampler": attrs.get("sampler"),
        "chains": int(probs.shape[0]),
        "draws": int(probs.shape[1]),
        "test": {
            "accuracy": float(np.mean(bma.argmax(axis=1) == labels)),
            "nll": float(-np.mean(np.log(p_true))),
        },
    }


def format_summary(summary: dict[str, Any]) -> str:
    """A short text table of :func:`summarise_run`'s numbers."""
    rows = [("metric", "value")] + [(k, f"{v:.4f}") for k, v in summary["test"].items()]
    width = max(len(r[0]) for r in rows)
    lines = [f"Bayesian model average on the test split ({summary['sampler']}, "
             f"{summary['chains']} chains x {summary['draws']} draws)"]  # fmt: skip
    lines += [f"  {name:<{width}}  {value}" for name, value in rows]
    return "\n".join(lines)


def samplers_command(args: argparse.Namespace) -> int:
    """List the registry: name, kind, one-line summary, paper."""
    from bayesflat import samplers

    entries = samplers.describe()
    width = max(len(e.name) for e in entries)
    for e in entries:
        kind = "sampler" if e.is_sampler else "optimiser"
        print(f"{e.name:<{width}}  {kind:<9}  {e.summary}  [{e.reference}]")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``bayesflat`` argument parser with every sub-command."""
    parser = _Parser(prog="bayesflat", description=__doc__.splitlines()[0])
    from bayesflat import __version__

    parser.add_argument("--version", action="version", version=f"bayesflat {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    commands: list[tuple[str, str, Callable[[argparse.ArgumentParser], None] | None, Any]] = [
        ("run", "sample the embedded digits posterior", add_run_arguments, run_command),
        ("samplers", "list the registered samplers and optimisers", None, samplers_command),
    ]
    for name, help_text, add_args, func in commands:
        p = sub.add_parser(name, help=help_text, description=help_text)
        if add_args is not None:
            add_args(p)
        p.set_defaults(func=func)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``bayesflat`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except (CLIError, ValueError, TypeError, FileNotFoundError, OSError) as err:
        print(f"bayesflat {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"bayesflat {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
