"""Dataset-size study of SparK on chest CT: nodule classification from scratch vs SparK-pretrained, by label fraction.

The question of Wolf et al., 2023 ("Self-supervised pre-training with contrastive and masked autoencoder methods for
dealing with small datasets in deep learning for medical imaging", Scientific Reports,
https://doi.org/10.1038/s41598-023-46433-0): how much does a SparK-pretrained CNN (Tian et al., 2023, ICLR,
https://arxiv.org/abs/2301.03580) lose when the fine-tuning labels shrink, against the same CNN trained from scratch?
The study pre-trains the ``spark_ct`` bundle once on the training images of one synthetic CT cohort (labels unused),
then fine-tunes it from scratch and from the SparK weights on 100, 50, 25 and 10 % of the labelled training images,
several seeds each (the seed draws the labelled subset, nested across fractions, and sets the initialisation and the
training order; a scratch and a SparK run with the same seed see the same images), and evaluates every run on the
cohort's test split (accuracy, macro-F1, MCC, one-vs-rest AUROC).

Every run goes through the real bundle (:func:`medssl.engine.bundles.run_bundle`: ``configs/train.json``, then
``configs/finetune.json`` and ``configs/finetune.json`` + ``configs/evaluate.json``) and is logged to one MLflow
experiment (:data:`EXPERIMENT_NAME`; a SQLite store in the study folder unless ``MLFLOW_TRACKING_URI`` is set), named
``<init>_p<percent>_seed<seed>`` and tagged ``study``, ``init``, ``label_fraction``, ``seed``. The study folder::

    cohort/                   the synthetic CT cohort (training images: pre-training data and labelled pool; test)
    pretrain/                 the SparK run (unless a checkpoint is given; reused when complete)
    runs/<run name>/          one fine-tuning run each; result.json marks it done
    dataset_size.csv          one row per run
    dataset_size.md           mean ± sd over seeds per init and label fraction
    dataset_size.png          test metrics vs label fraction (log axis), scratch vs SparK
    mlflow.db, mlartifacts/

Resumable: a run whose ``result.json`` exists is not run again (its training checkpoints are deleted then), a run
interrupted during training continues from its last checkpoint, and the table and figure are rewritten after every
run.

Cost of the defaults (:data:`DEFAULT_SETTINGS`: the bundle's 300 + 150 image cohort of 96 mm nodule-candidate
patches at 128 x 128 and its SparK pre-training, then 24 fine-tuning runs of the bundle's 15 epochs of 10 iterations
of batch 32, each evaluated on the 150 test patches): see the spark_ct bundle README for the time measured.
:data:`QUICK_SETTINGS` checks the whole pipeline on tiny data.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.tracking import MlflowClient

from medssl.data.ct_phantom import ensure_ct_cohort
from medssl.engine.bundles import run_bundle
from medssl.errors import DataError
from medssl.studies.runner import (
    aggregate_over_seeds,
    given_checkpoint,
    init_curves_figure,
    mean_sd,
    run_resumable,
    study_experiment,
    write_study_outputs,
)

__all__ = [
    "EXPERIMENT_NAME",
    "INITS",
    "DatasetSizeSettings",
    "SizeRun",
    "DEFAULT_SETTINGS",
    "QUICK_SETTINGS",
    "plan_runs",
    "summary_table",
    "dataset_size_figure",
    "run_dataset_size_study",
]

EXPERIMENT_NAME = "medssl_dataset_size"
#: Initialisations compared: random, and the SparK-pretrained CNN.
INITS = ("scratch", "spark")
_RECIPE = "spark_ct"
_PRETRAIN, _FINETUNE, _EVALUATE = "configs/train.json", "configs/finetune.json", "configs/evaluate.json"
_METRICS = {"accuracy": "accuracy", "macro_f1": "macro-F1", "auroc_macro": "AUROC (macro, one-vs-rest)"}


@dataclass(frozen=True)
class DatasetSizeSettings:
    """What a dataset-size study trains and evaluates.

    Args:
        fractions: shares of the labelled training images, each in ``(0, 1]``.
        seeds: seeds per initialisation and fraction: ``0 .. seeds - 1``.
        num_images: training images of the cohort (the labelled pool, and the pre-training data).
        num_test: test images of the cohort (the evaluation set).
        cohort_seed: seed of the synthetic cohort.
        image_size: the slice (2 axes) or volume (3 axes) size, every axis a multiple of 32.
        patch_mm: width of the nodule-candidate patches in mm (None: whole slices); see
            :func:`medssl.data.ct_phantom.generate_ct_image`.
        finetune: ``finetune.json`` overrides shared by every run (model, epochs, ...).
        pretrain: ``train.json`` overrides of the pre-training.
    """

    fractions: tuple[float, ...] = (1.0, 0.5, 0.25, 0.1)
    seeds: int = 3
    num_images: int = 300
    num_test: int = 150
    cohort_seed: int = 0
    image_size: tuple[int, ...] = (128, 128)
    patch_mm: float | None = 96.0
    finetune: Mapping[str, Any] = field(default_factory=dict)
    pretrain: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class SizeRun:
    """One fine-tuning run of the study.

    Args:
        init: one of :data:`INITS`.
        fraction: share of the labelled training images.
        seed: seed of the labelled draw, the initialisation and the training order.
    """

    init: str
    fraction: float
    seed: int

    @property
    def name(self) -> str:
        """``<init>_p<percent, 3 digits>_seed<seed>``: the run's folder and MLflow run name."""
        return f"{self.init}_p{round(100 * self.fraction):03d}_seed{self.seed}"


#: The study's defaults: the bundle's SparK pre-training (12 epochs), then 24 fine-tuning runs at the bundle's
#: defaults (15 epochs of 10 iterations of 32 each, whatever the label fraction).
DEFAULT_SETTINGS = DatasetSizeSettings()

_TINY_MODEL = {"block": "basic", "layers": [1, 1, 1, 1], "block_inplanes": [4, 8, 8, 16]}
_TINY_RUN = {"model": _TINY_MODEL, "batch_size": 2, "cache_workers": 1, "epochs": 1}
#: A check of the whole pipeline in about a minute: a 6 + 3 image cohort of 64 x 64 slices, a tiny ResNet, 1 epoch.
QUICK_SETTINGS = DatasetSizeSettings(
    fractions=(1.0, 0.5),
    seeds=2,
    num_images=6,
    num_test=3,
    image_size=(64, 64),
    finetune={**_TINY_RUN, "samples_per_epoch": 4},
    pretrain={**_TINY_RUN,
              "spark": {"mask_ratio": 0.6, "decoder_width": 32, "densify_norm": "batch", "decoder_norm": "batch",
                        "norm_pix_loss": True}},
)


def plan_runs(settings: DatasetSizeSettings) -> list[SizeRun]:
    """Every run of a study, seed by seed, so that an interrupted study already holds whole curves.

    Args:
        settings: the study.

    Returns:
        ``len(INITS) * len(settings.fractions) * settings.seeds`` runs.

    Raises:
        DataError: for fractions outside ``(0, 1]``, repeated or none, fewer than one seed, or a fraction that
            leaves fewer than one labelled image.
    """
    fractions = settings.fractions
    bad = [f for f in fractions if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1]
    if not fractions or bad:
        raise DataError(f"label fractions must lie in (0, 1], got {list(fractions) if not bad else bad}.")
    names = [round(100 * f) for f in fractions]
    if len(set(names)) != len(names):
        raise DataError(f"label fractions repeat (to the percent): {list(fractions)}; list each once.")
    if settings.seeds < 1:
        raise DataError(f"seeds must be >= 1, got {settings.seeds}.")
    return [SizeRun(init, float(fraction), seed) for seed in range(settings.seeds) for fraction in fractions
            for init in INITS]


def _geometry(settings: DatasetSizeSettings) -> dict[str, Any]:
    return {"image_size": list(settings.image_size), "spatial_dims": len(settings.image_size),
            "patch_mm": settings.patch_mm}


def _pretrain(out_dir: Path, settings: DatasetSizeSettings, cohort: Path, uri: str) -> Path:
    """The study's SparK weights: pre-trained once on the cohort's training images, reused when complete."""
    run_dir = out_dir / "pretrain"
    weights = run_dir / "models" / "model.safetensors"
    if not (weights.is_file() and (run_dir / "summary.json").is_file()):
        overrides = {**settings.pretrain, **_geometry(settings), "run_dir": str(run_dir), "dataset_dir": str(cohort),
                     "experiment_name": EXPERIMENT_NAME, "tracking_uri": uri, "run_name": "spark_pretrain"}
        run_bundle(_RECIPE, [_PRETRAIN], overrides)
    return weights


def _finetune(run: SizeRun, run_dir: Path, shared: Mapping[str, Any], weights: Path, pool: int) -> dict[str, Any]:
    """Fine-tune, evaluate and tag one run; returns its CSV row."""
    overrides = {
        **shared,
        "run_dir": str(run_dir),
        "seed": run.seed,
        "run_name": run.name,
        "pretrained": str(weights) if run.init == "spark" else False,
        "label_fraction": run.fraction,
    }
    start = time.perf_counter()
    run_bundle(_RECIPE, [_FINETUNE], overrides)
    trained = time.perf_counter()
    summary = run_bundle(_RECIPE, [_FINETUNE, _EVALUATE], overrides)
    client = MlflowClient(summary["tracking_uri"])
    tags = {"study": "dataset_size", "init": run.init, "label_fraction": run.fraction, "seed": run.seed}
    for key, value in tags.items():
        client.set_tag(summary["run_id"], key, str(value))
    metrics = summary["evaluation"]["metrics"]
    return {
        "run": run.name,
        "init": run.init,
        "label_fraction": run.fraction,
        "num_labelled": max(1, round(run.fraction * pool)),
        "seed": run.seed,
        **{key: metrics.get(f"eval_{key}", math.nan) for key in (*_METRICS, "mcc")},
        "train_s": round(trained - start, 1),
        "evaluate_s": round(time.perf_counter() - trained, 1),
        "run_id": summary["run_id"],
    }


def _aggregate(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Mean and sd over seeds per (label_fraction, init), largest fraction first (see ``aggregate_over_seeds``)."""
    table = aggregate_over_seeds(rows, ["label_fraction", "num_labelled"], list(_METRICS), INITS, descending=True)
    table["percent"] = 100 * table["label_fraction"]
    return table


def summary_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The markdown table of a study: mean ± sd over seeds per label fraction and initialisation.

    Args:
        rows: one per run, as in ``dataset_size.csv`` (``init``, ``label_fraction``, ``num_labelled``,
            ``accuracy``, ``macro_f1``, ``auroc_macro``).

    Returns:
        a markdown table, one line per (fraction, init), largest fraction first; sd is the sample sd over seeds
        (absent for one run).
    """
    header = ["labels", "init", "runs", *_METRICS.values()]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for item in _aggregate(rows).to_dict("records"):
        labels = f"{round(100 * item['label_fraction'])} % ({item['num_labelled']})"
        cells = [mean_sd(item[f"{key}_mean"], item[f"{key}_sd"], 3) for key in _METRICS]
        lines.append("| " + " | ".join([labels, item["init"], str(item["runs"]), *cells]) + " |")
    return "\n".join(lines)


def dataset_size_figure(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Plot the test metrics against the label fraction, scratch vs SparK.

    Args:
        rows: one per run (see :func:`summary_table`).
        path: the PNG to write (atomically).

    Returns:
        ``path``. Markers are means over seeds, error bars one sd, the x axis logarithmic (percent of the images).
    """
    table = _aggregate(rows)
    percents = {percent: f"{percent:g} %" for percent in sorted(table["percent"].unique())}
    title = "spark_ct nodule classification: scratch vs SparK-pretrained, test split (mean ± sd over seeds)"
    return init_curves_figure(table, "percent", _METRICS, INITS, percents, "labelled training images", title,
                              Path(path))


def _write_outputs(rows: Sequence[Mapping[str, Any]], out_dir: Path) -> dict[str, Any]:
    return write_study_outputs(rows, out_dir, "dataset_size", summary_table, dataset_size_figure)


def run_dataset_size_study(
    out_dir: str | os.PathLike,
    *,
    quick: bool = False,
    seeds: int | None = None,
    fractions: Sequence[float] | None = None,
    pretrained: str | os.PathLike | None = None,
    progress: bool = True,
    settings: DatasetSizeSettings | None = None,
) -> dict[str, Any]:
    """Run (or resume) a dataset-size study and write its table and figure.

    Args:
        out_dir: the study folder (see the module docstring for its layout).
        quick: use :data:`QUICK_SETTINGS` (a tiny pipeline check) instead of :data:`DEFAULT_SETTINGS`.
        seeds: seeds per initialisation and fraction (default: the settings', 3 / quick 2).
        fractions: label fractions in ``(0, 1]`` (default: the settings', 1.0, 0.5, 0.25, 0.1 / quick 1.0, 0.5).
        pretrained: a ``spark_ct`` pre-training checkpoint whose CNN matches the fine-tuning model; None pre-trains
            one in ``out_dir/pretrain`` on the cohort's training images (once: reused when complete).
        progress: show progress bars.
        settings: full settings, overriding ``quick`` (``seeds`` and ``fractions`` still apply).

    Returns:
        ``{"rows": one dict per run, "table": markdown, "csv", "markdown", "figure": paths, "tracking_uri",
        "experiment_name", "ran": runs trained by this call}``.

    Raises:
        DataError: for bad settings (see :func:`plan_runs`) or bad data.
        CheckpointError: when ``pretrained`` does not exist or does not match the CNN.
    """
    settings = settings or (QUICK_SETTINGS if quick else DEFAULT_SETTINGS)
    if seeds is not None:
        settings = replace(settings, seeds=int(seeds))
    if fractions is not None:
        settings = replace(settings, fractions=tuple(fractions))
    runs = plan_runs(settings)
    given = None if pretrained is None else given_checkpoint(pretrained, _RECIPE)
    out_dir = Path(out_dir).resolve()
    geometry = _geometry(settings)
    shape = settings.image_size
    cohort = ensure_ct_cohort(out_dir / "cohort", settings.num_images, seed=settings.cohort_seed,
                              dims=len(shape), size=shape[0], depth=shape[2] if len(shape) == 3 else None,
                              num_test=settings.num_test, patch_mm=settings.patch_mm, progress=progress).parent
    uri = study_experiment(out_dir, EXPERIMENT_NAME)
    weights = given or _pretrain(out_dir, settings, cohort, uri)
    shared = {**settings.finetune, **geometry, "dataset_dir": str(cohort), "experiment_name": EXPERIMENT_NAME,
              "tracking_uri": uri}
    rows, outputs, ran = run_resumable(
        runs,
        out_dir,
        lambda run, run_dir: _finetune(run, run_dir, shared, weights, settings.num_images),
        _write_outputs,
        "dataset-size runs",
        progress,
    )
    return {"rows": rows, **outputs, "tracking_uri": uri, "experiment_name": EXPERIMENT_NAME, "ran": ran}
