"""The ``medssl`` command.

Thin on purpose: it parses arguments and calls the library, so the command, the Python API and the bundles share one
implementation. Problems with the user's input (:class:`medssl.errors.MedsslError`) are printed as one line without a
traceback and exit with status 2; ``--debug`` shows the traceback of anything else.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import textwrap
from pathlib import Path
from typing import Callable, Mapping, Sequence

from medssl import __version__
from medssl.errors import MedsslError

EXIT_USAGE = 2
EXIT_INTERNAL = 1
EXIT_INTERRUPTED = 130

TRAIN_CONFIG = "configs/train.json"
# A bundle that both pre-trains (train.json) and fine-tunes keeps its fine-tuning in finetune.json.
FINETUNE_CONFIG = "configs/finetune.json"
EVALUATE_CONFIG = "configs/evaluate.json"


class _CommandParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line, as the commands' own errors are; help text may be computed
    when asked for (``help_epilog``), so listing the bundles costs nothing on every other call."""

    def __init__(self, *args, help_epilog: Callable[[], str] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.help_epilog = help_epilog

    def format_help(self) -> str:
        if self.help_epilog is not None:
            self.epilog = self.help_epilog()
        return super().format_help()

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


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


def _labelled_count(text: str) -> int | None:
    """``--labelled``: a positive number of labelled subjects, or ``all`` (None)."""
    if text.strip().lower() == "all":
        return None
    try:
        return _positive_int(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {text!r}") from None


def _percentages(text: str) -> list[float]:
    """``--percent 100,50,25,10``: comma-separated shares of the labelled set, each in (0, 100]."""
    try:
        values = [float(item) for item in text.split(",")]
    except ValueError:
        values = []
    if not values or not all(0 < value <= 100 for value in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated percentages in (0, 100] (e.g. 100,50,25,10), "
                                         f"got {text!r}")
    return values


def _labelled_counts(text: str) -> list[int | None]:
    """``--labelled 1,2,4,8,all``: comma-separated counts of labelled subjects; ``all`` is None. The values are
    checked against the data by the study (0 or more than there are subjects is its error to report)."""
    counts = []
    for item in text.split(","):
        item = item.strip()
        if item.lower() == "all":
            counts.append(None)
            continue
        try:
            counts.append(int(item))
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated numbers of labelled subjects or 'all' (e.g. 1,2,4,8,all), got {text!r}"
            ) from None
    return counts


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


# ------------------------------------------------------------------------------------------------- bundle overrides
# Command-line option -> bundle config key, for whichever of them a command has.
_OPTION_KEYS = {
    "data": "dataset_dir",
    "eval_data": "eval_dataset_dir",
    "epochs": "epochs",
    "subjects": "num_subjects",
    "labelled": "num_labelled",
    "seed": "seed",
    "run_dir": "run_dir",
}
_PATH_OPTIONS = ("data", "eval_data", "run_dir")


def _bundle_overrides(args: argparse.Namespace) -> dict:
    """Bundle config overrides from a command's options; ``--set KEY=VALUE`` comes last and wins."""
    overrides: dict = {}
    for option, key in _OPTION_KEYS.items():
        value = getattr(args, option, None)
        if value is not None:
            overrides[key] = str(Path(value).resolve()) if option in _PATH_OPTIONS else value
    for key, value in args.set or ():
        overrides[key] = _parse_value(value)
    return overrides


def _parse_value(text: str):
    """Read a ``--set`` value as JSON when it is JSON (numbers, lists, booleans), else keep the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


# ---------------------------------------------------------------------------------------------------------- pretrain
def _print_run_summary(summary: dict) -> None:
    run_dir = summary.get("run_dir")
    print("")
    print(f"run folder:        {run_dir}")
    if summary.get("final_loss") is not None:
        print(f"final loss:        {summary['final_loss']:.4f}")
    if summary.get("figure"):
        print(f"reconstruction:    {summary['figure']}")
    if summary.get("tracking_uri"):
        _print_tracking(summary["tracking_uri"], f"run {summary.get('run_id', '?')}")


def _print_tracking(uri: str, what: str) -> None:
    print(f"MLflow store:      {uri}  ({what})")
    if str(uri).startswith("sqlite:"):
        print(f"open the MLflow UI: mlflow ui --backend-store-uri {uri}")


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from medssl.engine.bundles import run_bundle

    _known_recipe(args.recipe, pretrain_recipes(), "pre-training")
    summary = run_bundle(args.recipe, [TRAIN_CONFIG], _bundle_overrides(args))
    _print_run_summary(summary)
    return 0


# ---------------------------------------------------------------------------------------------------------- finetune
def _one_line_about(bundle: Path) -> str:
    """A bundle in one line: its metadata's ``name``, else the first sentence of its ``description``."""
    try:
        metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    except (OSError, ValueError):
        return ""
    return str(metadata.get("name") or str(metadata.get("description", "")).split(". ")[0]).strip()


def _read_json(path: Path) -> dict | None:
    try:
        content = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return content if isinstance(content, dict) else None


def finetune_config(bundle: Path) -> str:
    """The config a bundle fine-tunes with: ``configs/finetune.json`` when it has one, else ``configs/train.json``."""
    return FINETUNE_CONFIG if (bundle / FINETUNE_CONFIG).is_file() else TRAIN_CONFIG


def _recipes(fine_tuning: bool) -> dict[str, str]:
    from medssl.engine.bundles import bundles_root

    root = bundles_root()
    recipes = {}
    for bundle in sorted(root.iterdir()) if root.is_dir() else ():
        config = _read_json(bundle / (finetune_config(bundle) if fine_tuning else TRAIN_CONFIG))
        if config is not None and ("pretrained" in config) == fine_tuning:
            recipes[bundle.name] = _one_line_about(bundle)
    return recipes


def finetune_recipes() -> dict[str, str]:
    """The fine-tuning recipes: bundles whose fine-tuning config (:func:`finetune_config`) has a ``pretrained`` key.

    Returns:
        recipe name -> one-line description, sorted by name (empty when the bundles folder is missing).
    """
    return _recipes(fine_tuning=True)


def pretrain_recipes() -> dict[str, str]:
    """The pre-training recipes: bundles whose ``configs/train.json`` has no ``pretrained`` key.

    Returns:
        recipe name -> one-line description, sorted by name (empty when the bundles folder is missing).
    """
    return _recipes(fine_tuning=False)


def _known_recipe(recipe: str, recipes: Mapping[str, str], kind: str) -> Path:
    """The folder of ``recipe``; raises ConfigError listing the known recipes of its kind for any other name."""
    import difflib

    from medssl.engine.bundles import bundle_dir
    from medssl.errors import ConfigError

    if recipe not in recipes:
        close = difflib.get_close_matches(recipe, list(recipes), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"unknown {kind} recipe '{recipe}'.{hint} Known: {', '.join(recipes) or 'none'}.")
    return bundle_dir(recipe)


def _recipes_epilog(recipes: Mapping[str, str], examples: Sequence[str]) -> str:
    width = max(map(len, recipes), default=0)
    listed = "\n".join(f"  {name:<{width}}  {about}" for name, about in recipes.items()) or "  (none found)"
    return f"recipes:\n{listed}\n\nexamples:\n" + "\n".join(f"  {example}" for example in examples)


def _finetune_epilog() -> str:
    return _recipes_epilog(finetune_recipes(), (
        "medssl pretrain cine_mae --run-dir runs/cine_mae",
        "medssl finetune cine_seg --pretrained runs/cine_mae/models/model.safetensors --labelled 4",
        "medssl finetune cine_seg --scratch --epochs 20 --run-dir runs/cine_seg_scratch",
    ))


def _pretrain_epilog() -> str:
    return _recipes_epilog(pretrain_recipes(), (
        "medssl pretrain cine_mae --epochs 30 --run-dir runs/cine_mae",
        "medssl pretrain cine_mae --data /data/cine_nifti",
        "medssl pretrain cine_mae --set batch_size=16 --set model#mask_ratio=0.9",
    ))


def _pretrained_checkpoint(args: argparse.Namespace, bundle: Path) -> str | bool | None:
    """The ``pretrained`` override: False with ``--scratch``, else the checkpoint (``--pretrained`` or the recipe's
    default), checked to exist before any data is generated; None leaves a computed default to the bundle."""
    from medssl.errors import CheckpointError

    if args.scratch:
        return False
    path = args.pretrained
    if path is None:
        default = json.loads((bundle / finetune_config(bundle)).read_text())["pretrained"]
        if not isinstance(default, str) or not default or default[0] in "$@%":
            return None
        path = Path(default)
    path = Path(path).resolve()
    if not path.is_file():
        # The default checkpoints are runs/<pre-training recipe>/models/model.safetensors.
        run_dir = path.parent.parent if path.parent.name == "models" else Path("runs", bundle.name).resolve()
        recipe = run_dir.name if run_dir.name in pretrain_recipes() else "cine_mae"
        raise CheckpointError(
            f"pretrained checkpoint {path} does not exist. Make one with `medssl pretrain {recipe} --run-dir "
            f"{run_dir}` (it writes {run_dir / 'models' / 'model.safetensors'}) and pass it with --pretrained, "
            "or train from scratch with --scratch."
        )
    return str(path)


def _print_evaluation(evaluation: dict) -> None:
    metrics = evaluation.get("metrics", {})
    width = max(map(len, metrics), default=0)
    print("")
    print(f"held-out evaluation ({evaluation.get('num_rows', '?')} rows, per item in {evaluation.get('csv')}):")
    for name, value in metrics.items():
        print(f"  {name:<{width}}  {value:.4f}")


def _cmd_finetune(args: argparse.Namespace) -> int:
    from medssl.engine.bundles import run_bundle

    bundle = _known_recipe(args.recipe, finetune_recipes(), "fine-tuning")
    overrides = _bundle_overrides(args)
    if "pretrained" not in overrides:
        pretrained = _pretrained_checkpoint(args, bundle)
        if pretrained is not None:
            overrides["pretrained"] = pretrained
    configs = [finetune_config(bundle), EVALUATE_CONFIG]
    summary = run_bundle(args.recipe, configs[:1], overrides)
    if not args.no_evaluate:
        summary = run_bundle(args.recipe, configs, overrides)
        _print_evaluation(summary["evaluation"])
    _print_run_summary(summary)
    return 0


# ------------------------------------------------------------------------------------------------------------- study
def _cmd_study_label_efficiency(args: argparse.Namespace) -> int:
    import dataclasses

    from medssl.studies.label_efficiency import DEFAULT_SETTINGS, QUICK_SETTINGS, run_label_efficiency_study

    settings = QUICK_SETTINGS if args.quick else DEFAULT_SETTINGS
    chosen = {"seeds": args.seeds, "labelled": None if args.labelled is None else tuple(args.labelled)}
    settings = dataclasses.replace(settings, **{key: value for key, value in chosen.items() if value is not None})
    result = run_label_efficiency_study(args.out, settings, pretrained=args.pretrained, progress=not args.quiet)
    _print_study_result(result)
    return 0


def _cmd_study_dataset_size(args: argparse.Namespace) -> int:
    from medssl.studies.dataset_size import run_dataset_size_study

    fractions = None if args.percent is None else [percent / 100 for percent in args.percent]
    result = run_dataset_size_study(
        args.out, quick=args.quick, seeds=args.seeds, fractions=fractions, pretrained=args.pretrained,
        progress=not args.quiet,
    )
    _print_study_result(result)
    return 0


def _print_study_result(result: Mapping) -> None:
    print("")
    print(result["table"])
    print("")
    print(f"table:             {result['csv']}")
    print(f"                   {result['markdown']}")
    print(f"figure:            {result['figure']}")
    _print_tracking(result["tracking_uri"], f"experiment {result['experiment_name']}")


def _cmd_study_anomaly(args: argparse.Namespace) -> int:
    from medssl.studies.anomaly_comparison import EXPERIMENT_NAME, run_anomaly_comparison

    overrides = {key: _parse_value(value) for key, value in (args.set or ())}
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    result = run_anomaly_comparison(args.out, quick=args.quick, overrides=overrides or None, seed=args.seed)
    print("")
    print(Path(result["markdown"]).read_text().strip())
    print("")
    print(f"table:             {result['csv']}")
    print(f"                   {result['markdown']}")
    _print_tracking(result["tracking_uri"], f"experiment {EXPERIMENT_NAME}")
    return 0


# -------------------------------------------------------------------------------------------------------------- demo
def _cmd_demo(args: argparse.Namespace) -> int:
    from medssl.demo import DemoSettings, run_demo

    run_dir = Path(args.run_dir).resolve()
    settings = DemoSettings(
        subjects=args.subjects,
        pretrain_epochs=args.epochs,
        labelled=args.labelled,
        finetune_epochs=args.finetune_epochs,
        eval_subjects=args.eval_subjects,
    )
    print(f"medssl demo: synthetic cine CMR -> MAE pre-training -> few-label segmentation -> EF, in {run_dir}")
    result = run_demo(run_dir, settings)
    _print_run_summary(result["pretrain"])
    dice = ", ".join(f"{name} {value:.3f}" for name, value in result["dice"].items())
    print("")
    print(f"held-out SAX Dice ({settings.eval_subjects} subjects, ED and ES, {settings.labelled} labelled):  {dice}")
    print(f"held-out LVEF error from the segmentation of the whole cycle:  {result['lvef_mae']:.1f} EF points (mean)")
    print(f"fine-tuning run:   {run_dir / 'cine_seg'}")
    print(f"open the MLflow UI on both runs: mlflow ui --backend-store-uri {result['tracking_uri']}")
    for study in result["analysis"].studies:
        if study.analysed:
            lvef = study.function.to_dict()["lv_ef_pct"]
            print(f"medssl analyze on a synthetic DICOM study: LVEF {_format_value(lvef, '%')}; "
                  f"report: {study.folder / 'report.pdf'} (and report.png, DICOM SEG/SR, measurements.csv)")
        else:
            print(f"medssl analyze on a synthetic DICOM study: {study.status}: {study.error}")
    return 0


# ----------------------------------------------------------------------------------------------------------- analyze
def _format_value(value: float | None, unit: str) -> str:
    return "n/a" if value is None else f"{value:.1f} {unit}"


def _cmd_analyze(args: argparse.Namespace) -> int:
    from medssl.clinical.analyze import analyze_dicom_folder

    result = analyze_dicom_folder(args.dicom_dir, args.out, args.bundle, progress=not args.quiet)
    print(f"medssl analyze: {len(result.studies)} study(ies) in {args.dicom_dir}; outputs in {result.out_dir}")
    if result.skipped_files:
        print(f"skipped {len(result.skipped_files)} file(s) (reasons in analysis.json), e.g.:")
        for entry in result.skipped_files[:5]:
            print(f"  {entry.path}: {entry.reason}")
    for outcome in result.studies:
        if not outcome.analysed:
            print(f"{outcome.label}: {'skipped' if outcome.skipped else 'NOT ANALYSED'}: {outcome.error}")
            continue
        m = outcome.function.to_dict()
        print(
            f"{outcome.label}: LVEF {_format_value(m['lv_ef_pct'], '%')}, LVEDV {_format_value(m['lv_edv_ml'], 'ml')}, "
            f"LVESV {_format_value(m['lv_esv_ml'], 'ml')}, RVEF {_format_value(m['rv_ef_pct'], '%')}, "
            f"LV mass {_format_value(m['lv_mass_g'], 'g')} (ED frame {m['ed_frame']}, ES frame {m['es_frame']})"
        )
        for flag in outcome.function.flags:
            print(f"  CHECK: {flag}")
        for warning in outcome.warnings:
            print(f"  note: {warning}")
        print(f"  -> {outcome.folder}")
    if not any(outcome.analysed for outcome in result.studies):
        print("medssl analyze: error: no study could be analysed", file=sys.stderr)
        return EXIT_USAGE
    return result.exit_code


# ----------------------------------------------------------------------------------------------------- import-cinema
def _cmd_import_cinema(args: argparse.Namespace) -> int:
    from medssl.interop import import_cinema

    bundle = import_cinema(args.source, args.out)
    weights = bundle / "models" / "model.safetensors"
    print(f"medssl import-cinema: wrote bundle {bundle} (weights: {weights})")
    if "predictor" in json.loads((bundle / "configs" / "inference.json").read_text()):
        print(f"analyze DICOM studies with it:  medssl analyze DICOM_DIR --out OUT_DIR --bundle {bundle}")
    if args.source.name == "pretrained" or "pretrained" in args.source.parts:
        print(f"fine-tune from it:  medssl finetune cine_seg --pretrained {weights}")
    return 0


# ------------------------------------------------------------------------------------------------------------ parser
def build_parser() -> argparse.ArgumentParser:
    parser = _CommandParser(
        prog="medssl",
        description="Self-supervised pre-training and label-efficient fine-tuning for medical images.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=textwrap.dedent(
            """\
            examples:
              medssl phantom --subjects 20 --seed 0 --out cohort --dicom
              medssl pretrain cine_mae --epochs 5 --run-dir runs/cine_mae
              medssl finetune cine_seg --pretrained runs/cine_mae/models/model.safetensors --labelled 4
              medssl study label-efficiency --quick
              medssl demo
              medssl analyze DICOM_DIR --out results
              medssl import-cinema cinema/finetuned/segmentation/acdc_sax --out bundles_local/cinema_seg
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
        description=textwrap.fill(
            "Run a pre-training recipe (a MONAI bundle under bundles/<recipe>, its configs/train.json). Without "
            "--data it trains on a generated synthetic cohort. Results are tracked in MLflow (local SQLite store in "
            "the run folder, or MLFLOW_TRACKING_URI).",
            width=100,
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help_epilog=_pretrain_epilog,
    )
    pretrain.add_argument("recipe", help="recipe name (listed below)")
    pretrain.add_argument("--data", type=Path, default=None, help="a NIfTI folder or a manifest.json")
    pretrain.add_argument("--epochs", type=_positive_int, default=None, help="training epochs")
    pretrain.add_argument("--subjects", type=_positive_int, default=None, help="size of the generated cohort")
    pretrain.add_argument("--run-dir", type=Path, default=None, help="run folder (checkpoints, MLflow store)")
    pretrain.add_argument(
        "--set", type=_override, action="append", metavar="KEY=VALUE", help="any other bundle config key (repeatable)"
    )
    pretrain.set_defaults(handler=_cmd_pretrain)

    finetune = commands.add_parser(
        "finetune",
        help="fine-tune a pretrained encoder on a task bundle, then evaluate it on a held-out cohort",
        description=textwrap.fill(
            "Run a fine-tuning recipe (a MONAI bundle under bundles/<recipe>): train from a pre-training checkpoint "
            "(or from scratch) on all or N labelled subjects, then evaluate on a held-out cohort and log the metrics "
            "into the same MLflow run. Without --data / --eval-data it uses generated synthetic cohorts.",
            width=100,
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        help_epilog=_finetune_epilog,
    )
    finetune.add_argument("recipe", help="recipe name (listed below)")
    initialisation = finetune.add_mutually_exclusive_group()
    initialisation.add_argument(
        "--pretrained", type=Path, default=None, metavar="CKPT",
        help="pre-training checkpoint (*.safetensors; default: the recipe's, runs/cine_mae/models/model.safetensors)",
    )
    initialisation.add_argument("--scratch", action="store_true", help="train from a random initialisation")
    finetune.add_argument(
        "--labelled", type=_labelled_count, default=None, metavar="N",
        help="labelled subjects to train on, or 'all' (default all)",
    )
    finetune.add_argument("--epochs", type=_positive_int, default=None, metavar="N", help="training epochs")
    finetune.add_argument(
        "--data", type=Path, default=None, metavar="DIR", help="labelled training data: a NIfTI folder or manifest"
    )
    finetune.add_argument(
        "--eval-data", type=Path, default=None, metavar="DIR", help="labelled held-out data for the evaluation"
    )
    finetune.add_argument(
        "--run-dir", type=Path, default=None, metavar="DIR", help="run folder (weights, metrics, MLflow store)"
    )
    finetune.add_argument(
        "--seed", type=_non_negative_int, default=None, metavar="S", help="seed of the labelled subset and training"
    )
    finetune.add_argument(
        "--set", type=_override, action="append", metavar="KEY=VALUE", help="any other bundle config key (repeatable)"
    )
    finetune.add_argument("--no-evaluate", action="store_true", help="train only")
    finetune.set_defaults(handler=_cmd_finetune)

    study = commands.add_parser(
        "study", help="run a study (many trainings, one table and figure)", description="Run a study."
    )
    studies = study.add_subparsers(dest="study", metavar="STUDY", required=True)
    label_efficiency = studies.add_parser(
        "label-efficiency",
        help="cine segmentation and LVEF from scratch vs MAE-pretrained, by number of labelled subjects",
        description="Fine-tune cine_seg from scratch and from the cine_mae encoder on 1, 2, 4, 8 and all labelled "
        "subjects, several seeds each, evaluate every run on one held-out phantom cohort (SAX Dice per structure; "
        "LVEF from the segmentation of the whole cycle vs the exact EF), and write a CSV, a markdown table and a "
        "figure. Every run is logged to one MLflow experiment; an interrupted study resumes where it stopped.",
    )
    label_efficiency.add_argument(
        "--out", type=Path, default=Path("runs/label_efficiency"), help="study folder (default runs/label_efficiency)"
    )
    label_efficiency.add_argument("--quick", action="store_true", help="tiny sizes: a 1-2 minute check of the pipeline")
    label_efficiency.add_argument(
        "--seeds", type=_positive_int, default=None, metavar="N", help="seeds per setting (default 3; 2 with --quick)"
    )
    label_efficiency.add_argument(
        "--labelled", type=_labelled_counts, default=None, metavar="N,N,...",
        help="numbers of labelled subjects (default 1,2,4,8,all; 1,2,all with --quick)",
    )
    label_efficiency.add_argument(
        "--pretrained", type=Path, default=None, metavar="CKPT",
        help="cine_mae checkpoint (default: pre-train one in the study folder, or reuse it)",
    )
    label_efficiency.add_argument("--quiet", action="store_true", help="no progress bars")
    label_efficiency.set_defaults(handler=_cmd_study_label_efficiency)

    dataset_size = studies.add_parser(
        "dataset-size",
        help="chest CT classification from scratch vs SparK-pretrained, by share of the labelled set",
        description="Pre-train the spark_ct bundle (SparK on a MONAI ResNet) on a synthetic CT cohort, fine-tune "
        "nodule classification from scratch and from the SparK weights on 100, 50, 25 and 10 % of the labelled "
        "images, several seeds each, evaluate every run on the cohort's test split (accuracy, macro-F1, AUROC), and "
        "write a CSV, a markdown table and a figure. Every run is logged to one MLflow experiment; an interrupted "
        "study resumes where it stopped.",
    )
    dataset_size.add_argument(
        "--out", type=Path, default=Path("runs/dataset_size"), help="study folder (default runs/dataset_size)"
    )
    dataset_size.add_argument("--quick", action="store_true", help="tiny sizes: a check of the pipeline")
    dataset_size.add_argument(
        "--seeds", type=_positive_int, default=None, metavar="N", help="seeds per setting (default 3; 2 with --quick)"
    )
    dataset_size.add_argument(
        "--percent", type=_percentages, default=None, metavar="P,P,...",
        help="shares of the labelled images in %% (default 100,50,25,10; 100,50 with --quick)",
    )
    dataset_size.add_argument(
        "--pretrained", type=Path, default=None, metavar="CKPT",
        help="spark_ct pre-training checkpoint (default: pre-train one in the study folder, or reuse it)",
    )
    dataset_size.add_argument("--quiet", action="store_true", help="no progress bars")
    dataset_size.set_defaults(handler=_cmd_study_dataset_size)

    anomaly = studies.add_parser(
        "anomaly",
        help="chest radiograph anomaly detection: MemMC-MAE vs the plain MAE, trained the same way",
        description="Train MemMC-MAE and a plain MAE of the same size on the normal images of a synthetic chest "
        "radiograph cohort through the memmc_mae bundle, score the test images (normal and with inserted lesions) "
        "under several random masks, and compare image-level and pixel-level AUROC in one table. Both runs and the "
        "comparison are logged to one MLflow experiment.",
    )
    anomaly.add_argument(
        "--out", type=Path, default=Path("runs/anomaly"), help="study folder (default runs/anomaly)"
    )
    anomaly.add_argument("--quick", action="store_true", help="tiny sizes: a check of the pipeline")
    anomaly.add_argument("--epochs", type=_positive_int, default=None, metavar="N", help="training epochs of each")
    anomaly.add_argument("--seed", type=_non_negative_int, default=0, metavar="S", help="seed (default 0)")
    anomaly.add_argument(
        "--set", type=_override, action="append", metavar="KEY=VALUE", help="any other bundle config key (repeatable)"
    )
    anomaly.set_defaults(handler=_cmd_study_anomaly)

    demo = commands.add_parser(
        "demo",
        help="the end-to-end demo on synthetic data (what `make demo` runs)",
        description="Generate a synthetic cine CMR cohort, pre-train a small cine MAE on it, fine-tune segmentation "
        "with a few labelled subjects and report held-out Dice and LVEF error; both runs tracked in one MLflow store.",
    )
    demo.add_argument("--run-dir", type=Path, default=Path("runs/demo"), help="demo folder (default runs/demo)")
    demo.add_argument("--subjects", type=_positive_int, default=16, help="cohort size (default 16)")
    demo.add_argument("--epochs", type=_positive_int, default=80, help="pre-training epochs (default 80)")
    demo.add_argument("--labelled", type=_positive_int, default=4, help="labelled subjects to fine-tune on (default 4)")
    demo.add_argument(
        "--finetune-epochs", type=_positive_int, default=30, help="segmentation fine-tuning epochs (default 30)"
    )
    demo.add_argument(
        "--eval-subjects", type=_positive_int, default=4, help="held-out subjects to evaluate on (default 4)"
    )
    demo.set_defaults(handler=_cmd_demo)

    analyze = commands.add_parser(
        "analyze",
        help="cardiac volumes, EF, DICOM SEG/SR and a report from a folder of DICOM files",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Find the cine short-axis stack of every study in a folder of DICOM files (any layout, with or "
        "without .dcm, DICOMDIR), segment every frame, and write LV/RV volumes, ejection fraction and LV mass as "
        "measurements.json/.csv, a DICOM SEG, a DICOM SR (TID 1500), NIfTI masks and a report (PNG, PDF) per study. "
        "Patient identifiers appear only inside the DICOM outputs.",
        epilog=textwrap.dedent(
            """\
            exit status: 0 every cine study analysed (others in the folder are listed as skipped),
                         3 the analysis of some cine studies failed (see analysis.json),
                         2 bad input or no model (nothing analysed), 1 internal error
            model: --bundle, else $MEDSSL_CINE_SEG, else runs/cine_seg (what `medssl finetune cine_seg` trains)
            example:
              medssl analyze /media/export --out results/patient-study
            """
        ),
    )
    analyze.add_argument("dicom_dir", type=Path, help="folder of DICOM files (searched recursively) or a DICOMDIR")
    analyze.add_argument("--out", type=Path, required=True, metavar="OUT_DIR", help="output folder (created)")
    analyze.add_argument(
        "--bundle", type=Path, default=None, metavar="PATH",
        help="segmentation bundle folder: a cine_seg run or an imported CineMA bundle",
    )  # fmt: skip
    analyze.add_argument("--quiet", action="store_true", help="no progress bars")
    analyze.set_defaults(handler=_cmd_analyze)

    cinema = commands.add_parser(
        "import-cinema",
        help="turn a CineMA checkpoint (+ its config.yaml) into a medssl bundle",
        description="Convert a checkpoint published by CineMA (Fu et al., 2025; safetensors with its config.yaml "
        "beside it, as laid out in CineMA's model repository, which you download yourself) into a medssl bundle "
        "whose network is medssl's own: configs/, models/model.safetensors, docs/.",
    )
    cinema.add_argument("source", type=Path, help="a CineMA .safetensors file, or the folder holding it")
    cinema.add_argument("--out", type=Path, required=True, metavar="BUNDLE_DIR", help="new bundle folder")
    cinema.set_defaults(handler=_cmd_import_cinema)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, format="%(levelname)s %(message)s")
    handler: Callable[[argparse.Namespace], int] | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return EXIT_USAGE
    command = " ".join(name for name in (args.command, getattr(args, "study", None)) if name)
    try:
        return handler(args)
    except MedsslError as error:
        print(f"medssl {command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"medssl {command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as error:  # a bug, not bad input: keep the console readable unless asked
        if args.debug:
            raise
        print(
            f"medssl {command}: unexpected {type(error).__name__}: {error}\n"
            f"rerun with `medssl --debug {command} ...` for the traceback",
            file=sys.stderr,
        )
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
