"""The ``medssl`` command.

Thin on purpose: it parses arguments and calls the library, so the command, the Python API and the bundles share one
implementation. Problems with the user's input (:class:`medssl.errors.MedsslError`) are printed as one line without a
traceback and exit with status 2; ``--debug`` shows the traceback of anything else.
"""

from __future__ import annotations

import argparse
import logging
import sys
import textwrap
from pathlib import Path
from typing import Callable, Sequence

from medssl import __version__
from medssl.errors import MedsslError

EXIT_USAGE = 2
EXIT_INTERNAL = 1
EXIT_INTERRUPTED = 130

PRETRAIN_RECIPES = ("cine_mae",)


def _integer_at_least(minimum: int, name: str) -> Callable[[str], int]:
    """An argparse type accepting integers ``>= minimum``, with a message naming what was expected."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {name} integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected a {name} integer, got {value}")
        return value

    return parse


_positive_int = _integer_at_least(1, "positive")
_non_negative_int = _integer_at_least(0, "non-negative")


def _override(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value


# ----------------------------------------------------------------------------------------------------------- phantom
def _cmd_phantom(args: argparse.Namespace) -> int:
    from medssl.data.phantom import write_cohort

    manifest = write_cohort(
        args.out, args.subjects, seed=args.seed, dicom=args.dicom, num_workers=args.workers, progress=not args.quiet
    )
    print(f"wrote {args.subjects} synthetic cine CMR subject(s) (seed {args.seed}) to {Path(args.out)}")
    print(f"manifest: {manifest}")
    return 0


# ---------------------------------------------------------------------------------------------------------- pretrain
def _pretrain_overrides(args: argparse.Namespace) -> dict:
    overrides: dict = {}
    if args.data is not None:
        overrides["dataset_dir"] = str(Path(args.data).resolve())
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    if args.subjects is not None:
        overrides["num_subjects"] = args.subjects
    if args.run_dir is not None:
        overrides["run_dir"] = str(Path(args.run_dir).resolve())
    for key, value in args.set or ():
        overrides[key] = _parse_value(value)
    return overrides


def _parse_value(text: str):
    """Read a ``--set`` value as JSON when it is JSON (numbers, lists, booleans), else keep the string."""
    import json

    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _print_run_summary(summary: dict) -> None:
    run_dir = summary.get("run_dir")
    print("")
    print(f"run folder:        {run_dir}")
    if summary.get("final_loss") is not None:
        print(f"final loss:        {summary['final_loss']:.4f}")
    if summary.get("figure"):
        print(f"reconstruction:    {summary['figure']}")
    if summary.get("tracking_uri"):
        print(f"MLflow store:      {summary['tracking_uri']}  (run {summary.get('run_id', '?')})")
        if str(summary["tracking_uri"]).startswith("sqlite:"):
            print(f"open the MLflow UI: mlflow ui --backend-store-uri {summary['tracking_uri']}")


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from medssl.engine.bundles import run_bundle

    summary = run_bundle(args.recipe, overrides=_pretrain_overrides(args))
    _print_run_summary(summary)
    return 0


# -------------------------------------------------------------------------------------------------------------- demo
def _cmd_demo(args: argparse.Namespace) -> int:
    from medssl.engine.bundles import run_bundle

    run_dir = Path(args.run_dir).resolve()
    print(f"medssl demo: synthetic cine CMR cohort -> cine MAE pre-training, in {run_dir}")
    overrides = {"run_dir": str(run_dir / "cine_mae"), "num_subjects": args.subjects, "epochs": args.epochs}
    summary = run_bundle("cine_mae", overrides=overrides)
    _print_run_summary(summary)
    return 0


# ------------------------------------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="medssl",
        description="Self-supervised pre-training and label-efficient fine-tuning for medical images.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=textwrap.dedent(
            """\
            examples:
              medssl phantom --subjects 20 --seed 0 --out cohort --dicom
              medssl pretrain cine_mae --epochs 5 --run-dir runs/cine_mae
              medssl demo
            """
        ),
    )
    parser.add_argument("--version", action="version", version=f"medssl {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks and debug logging")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    phantom = commands.add_parser(
        "phantom",
        help="generate a synthetic cine CMR cohort (NIfTI, optionally DICOM) with exact ground truth",
        description="Generate synthetic cine cardiac MRI subjects: SAX stack and LAX 2C/4C cine with labels, "
        "exact volumes, EF, LV mass, disease group and LAX-4C landmarks.",
    )
    phantom.add_argument("--subjects", type=_positive_int, default=10, help="number of subjects (default 10)")
    phantom.add_argument("--seed", type=_non_negative_int, default=0, help="cohort seed (default 0)")
    phantom.add_argument("--out", type=Path, required=True, help="output folder")
    phantom.add_argument("--dicom", action="store_true", help="also write DICOM MR series (one per view)")
    phantom.add_argument("--workers", type=_positive_int, default=None, help="worker processes (default: all cores)")
    phantom.add_argument("--quiet", action="store_true", help="no progress bar")
    phantom.set_defaults(handler=_cmd_phantom)

    pretrain = commands.add_parser(
        "pretrain",
        help="run a self-supervised pre-training bundle",
        description="Run a pre-training recipe (a MONAI bundle under bundles/<recipe>). Without --data it trains "
        "on a generated synthetic cohort. Results are tracked in MLflow (local SQLite store in the run folder, or "
        "MLFLOW_TRACKING_URI).",
    )
    pretrain.add_argument("recipe", choices=PRETRAIN_RECIPES, help="recipe name")
    pretrain.add_argument("--data", type=Path, default=None, help="a NIfTI folder or a manifest.json")
    pretrain.add_argument("--epochs", type=_positive_int, default=None, help="training epochs")
    pretrain.add_argument("--subjects", type=_positive_int, default=None, help="size of the generated cohort")
    pretrain.add_argument("--run-dir", type=Path, default=None, help="run folder (checkpoints, MLflow store)")
    pretrain.add_argument(
        "--set", type=_override, action="append", metavar="KEY=VALUE", help="any other bundle config key (repeatable)"
    )
    pretrain.set_defaults(handler=_cmd_pretrain)

    demo = commands.add_parser(
        "demo",
        help="the end-to-end demo on synthetic data (what `make demo` runs)",
        description="Generate a synthetic cine CMR cohort and pre-train a small cine MAE on it, tracked in MLflow.",
    )
    demo.add_argument("--run-dir", type=Path, default=Path("runs/demo"), help="demo folder (default runs/demo)")
    demo.add_argument("--subjects", type=_positive_int, default=16, help="cohort size (default 16)")
    demo.add_argument("--epochs", type=_positive_int, default=80, help="pre-training epochs (default 80)")
    demo.set_defaults(handler=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="%(levelname)s %(message)s")
    handler: Callable[[argparse.Namespace], int] | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return handler(args)
    except MedsslError as error:
        print(f"medssl {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"medssl {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # a bug, not bad input: keep the console readable unless asked
        if args.debug:
            raise
        print(
            f"medssl {args.command}: unexpected {type(error).__name__}: {error}\n"
            f"rerun with `medssl --debug {args.command} ...` for the traceback",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
