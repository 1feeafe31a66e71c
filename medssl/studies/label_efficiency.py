"""Label efficiency of MAE pre-training for cine CMR: segmentation and LVEF, scratch vs pretrained, by labelled count.

The question of CineMA (Fu et al., 2025, https://arxiv.org/abs/2506.00679) and of MAE itself (He et al., 2022,
https://arxiv.org/abs/2111.06377): does masked-autoencoder pre-training let fine-tuning do with fewer labels? The
study fine-tunes the ``cine_seg`` bundle from scratch and from a ``cine_mae`` encoder on 1, 2, 4, 8 and all labelled
subjects of one training cohort, several seeds each (the seed draws the labelled subset and sets the initialisation
and the training order; a scratch and a pretrained run with the same seed see the same subjects), and evaluates every
run on one held-out phantom cohort whose seed neither training nor pre-training uses:

- segmentation: mean Dice per structure (RV, MYO, LV) on SAX at ED and ES (the bundle's ``evaluate.json``);
- function: LVEF from the segmentation of every frame of the cycle against the phantom's exact EF
  (:func:`medssl.tasks.ejection_fraction.evaluate_function_from_segmentation`), as the MAE in EF points.

Every run goes through the real bundles (:func:`medssl.engine.bundles.run_bundle`) and is logged to one MLflow
experiment (:data:`EXPERIMENT_NAME`; a SQLite store in the study folder unless ``MLFLOW_TRACKING_URI`` is set), named
``<init>_n<labelled>_seed<seed>`` and tagged ``init``, ``labelled``, ``seed``. The study folder::

    cohorts/train_n16_seed0/        training cohort: the labelled pool, and the pre-training data
    cohorts/heldout_n5_seed9000/    held-out cohort
    pretrain/                       the cine_mae run (unless a checkpoint is given; reused when complete)
    runs/<run name>/                one cine_seg run each; result.json marks it done
    label_efficiency.csv            one row per run
    label_efficiency.md             mean ± sd over seeds per init and labelled count
    label_efficiency.png            Dice and LVEF MAE vs labelled subjects (log2 axis), scratch vs pretrained
    mlflow.db, mlartifacts/

Resumable: a run whose ``result.json`` exists is not run again (its training checkpoints are deleted then), a run
interrupted during training continues from its last checkpoint, and the table and figure are rewritten after every
run.

Cost of the defaults (:data:`DEFAULT_SETTINGS`: SAX only on the 3 mm pre-training grid, 10 epochs of 8 iterations,
a held-out cohort of 5 subjects x 20 frames), measured end to end on the 2-core CPU this was developed on, on
2026-11-28, while other jobs shared the machine at a lower priority: 64 minutes for the whole study (the cohorts and
the 30-epoch cine_mae pre-training about 2 minutes; each of the 30 runs 112-136 s: training 81-97 s, evaluation
28-49 s, of which the 100 frames of the LVEF take most). That budget leaves each run far from the fully trained
cine_seg recipe (60 epochs at 1.5 mm: SAX Dice LV 0.91): the study compares initialisations under a small, fixed
training budget, and its runs reach Dice LV 0.56-0.71.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.tracking import MlflowClient

from medssl.data.cine import SAX_VIEW, load_cine_datalist
from medssl.data.phantom import ensure_cohort
from medssl.engine.bundles import parse_bundle_item, run_bundle
from medssl.engine.checkpoints import atomic_write
from medssl.engine.tracking import log_to_run_folder
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
from medssl.tasks.ejection_fraction import evaluate_function_from_segmentation, mean_abs_error

__all__ = [
    "EXPERIMENT_NAME",
    "INITS",
    "StudySettings",
    "StudyRun",
    "DEFAULT_SETTINGS",
    "QUICK_SETTINGS",
    "plan_runs",
    "summary_table",
    "label_efficiency_figure",
    "run_label_efficiency_study",
]

EXPERIMENT_NAME = "medssl_label_efficiency"
#: Encoder initialisations compared: random, and the cine_mae encoder.
INITS = ("scratch", "pretrained")
STRUCTURES = ("LV", "MYO", "RV")
_RECIPE, _PRETRAIN_RECIPE = "cine_seg", "cine_mae"
_CONFIGS = ("configs/train.json", "configs/evaluate.json")
_METRICS = {**{f"dice_{name}": f"SAX Dice {name}" for name in STRUCTURES}, "lvef_mae": "LVEF MAE (points)"}


@dataclass(frozen=True)
class StudySettings:
    """What a label-efficiency study trains and evaluates.

    Args:
        labelled: numbers of labelled subjects; None is the whole training cohort ("all").
        seeds: seeds per initialisation and labelled count: ``0 .. seeds - 1``.
        num_subjects: subjects in the training cohort (the labelled pool, and the pre-training data).
        frames: frames per cycle of the training cohort; None draws 20-30 per subject.
        cohort_seed: phantom seed of the training cohort.
        eval_subjects: subjects in the held-out cohort.
        eval_frames: frames per cycle of the held-out cohort (LVEF needs the whole cycle segmented); None: 20-30.
        eval_seed: phantom seed of the held-out cohort; never the training cohort's.
        finetune: ``cine_seg`` config overrides shared by every run (views, epochs, inference, ...).
        pretrain: ``cine_mae`` config overrides of the pre-training; empty runs the bundle's defaults.
    """

    labelled: tuple[int | None, ...] = (1, 2, 4, 8, None)
    seeds: int = 3
    num_subjects: int = 16
    frames: int | None = None
    cohort_seed: int = 0
    eval_subjects: int = 5
    eval_frames: int | None = None
    eval_seed: int = 9000
    finetune: Mapping[str, Any] = field(default_factory=dict)
    pretrain: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StudyRun:
    """One fine-tuning run of the study.

    Args:
        init: one of :data:`INITS`.
        labelled: labelled subjects; None for all.
        seed: seed of the labelled draw, the initialisation and the training order.
    """

    init: str
    labelled: int | None
    seed: int

    @property
    def name(self) -> str:
        """``<init>_n<labelled|all>_seed<seed>``: the run's folder and MLflow run name."""
        return f"{self.init}_n{'all' if self.labelled is None else self.labelled}_seed{self.seed}"


# SAX only: the SAX Dice and LVEF need no LAX view, and one view is cheaper to cache and train. On the 3 mm grid of
# the cine_mae pre-training (the cine_seg default is 1.5 mm), which the pretrained patch embeddings know, a 64 x 64
# window spans 192 mm and a whole-cycle segmentation (needed for LVEF) costs 3.5x less CPU time.
_SAX_3MM = {"sax": {"image_size": [64, 64, 8], "spacing": [3.0, 3.0, None], "patch_size": [8, 8, 1]}}

#: The study's defaults: 30 runs + pre-training in about 75 minutes on a 2-core CPU (see the module docstring).
DEFAULT_SETTINGS = StudySettings(
    eval_frames=20,
    # One warm-up epoch of ten keeps the recipe's short warm-up (cine_seg: 3 of 60).
    finetune={
        "views": _SAX_3MM,
        "epochs": 10,
        "optim#warmup_epochs": 1,
        "inference#overlap": 0.25,
    },
)

_TINY_MODEL = {"embed_dim": 16, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0, "patch_embed": "linear"}
_TINY_SAX = {"image_size": [32, 32, 4], "patch_size": [8, 8, 1]}
_TINY_RUN = {"batch_size": 2, "cache_workers": 1}
#: A check of the whole pipeline in a minute or two: tiny cohorts and networks, one epoch, 2 seeds.
QUICK_SETTINGS = StudySettings(
    labelled=(1, 2, None),
    seeds=2,
    num_subjects=3,
    frames=4,
    eval_subjects=1,
    eval_frames=5,
    finetune={
        **_TINY_RUN,
        "views": {"sax": {**_TINY_SAX, "spacing": [4.0, 4.0, None]}},
        "model": {**_TINY_MODEL, "drop_path_rate": 0.1, "feature_size": 4},
        "epochs": 1,
        "samples_per_epoch": 2,
        "inference#overlap": 0.0,
    },
    pretrain={
        **_TINY_RUN,
        "views": {"sax": {**_TINY_SAX, "spacing": [4.0, 4.0, 10.0]}},
        "model": {**_TINY_MODEL, "decoder_dim": 8, "decoder_depth": 1, "decoder_num_heads": 2, "mask_ratio": 0.75,
                  "norm_pix_loss": False},
        "epochs": 1,
        "samples_per_subject": 1,
    },
)


def _check_settings(settings: StudySettings) -> None:
    """Raises DataError for labelled counts outside ``1 .. num_subjects``, repeats, no seed, or a held-out seed
    that is the training cohort's."""
    available = settings.num_subjects
    bad = [n for n in settings.labelled if n is not None and (isinstance(n, bool) or not 1 <= n <= available)]
    if not settings.labelled or bad:
        raise DataError(
            f"labelled counts must lie in 1..{available} (the training cohort has {available} subjects) or be "
            f"'all', got {', '.join(map(str, bad)) or 'none'}."
        )
    if len(set(settings.labelled)) != len(settings.labelled):
        raise DataError(f"labelled counts repeat: {list(settings.labelled)}; list each once.")
    if settings.seeds < 1:
        raise DataError(f"seeds must be >= 1, got {settings.seeds}.")
    if settings.eval_seed == settings.cohort_seed:
        raise DataError(
            f"the held-out cohort's seed {settings.eval_seed} is the training cohort's: choose another eval_seed."
        )


def plan_runs(settings: StudySettings) -> list[StudyRun]:
    """Every run of a study, seed by seed, so that an interrupted study already holds whole curves.

    Args:
        settings: the study.

    Returns:
        ``len(INITS) * len(settings.labelled) * settings.seeds`` runs.

    Raises:
        DataError: for labelled counts outside ``1 .. num_subjects`` or repeated, fewer than one seed, or a
            held-out seed equal to the training cohort's.
    """
    _check_settings(settings)
    return [
        StudyRun(init, labelled, seed)
        for seed in range(settings.seeds)
        for labelled in settings.labelled
        for init in INITS
    ]


def _pretrain(out_dir: Path, settings: StudySettings, cohort: Path) -> Path:
    """The study's own cine_mae weights: pre-trained once on the training cohort's images, reused when complete."""
    run_dir = out_dir / "pretrain"
    weights = run_dir / "models" / "model.safetensors"
    if not (weights.is_file() and (run_dir / "summary.json").is_file()):
        overrides = {**settings.pretrain, "run_dir": str(run_dir), "dataset_dir": str(cohort)}
        run_bundle(_PRETRAIN_RECIPE, overrides=overrides)
    return weights


def _finetune(run: StudyRun, run_dir: Path, shared: Mapping[str, Any], weights: Path,
              eval_datalist: Sequence[Mapping[str, str]], num_subjects: int) -> dict[str, Any]:
    """Train, evaluate (Dice; LVEF over the cycle) and tag one run; returns its CSV row."""
    overrides = {
        **shared,
        "run_dir": str(run_dir),
        "seed": run.seed,
        "run_name": run.name,
        "pretrained": str(weights) if run.init == "pretrained" else False,
    }
    if run.labelled is not None:
        overrides["num_labelled"] = run.labelled
    start = time.perf_counter()
    run_bundle(_RECIPE, _CONFIGS[:1], overrides)
    trained = time.perf_counter()
    summary = run_bundle(_RECIPE, _CONFIGS, overrides)
    # The predictor of the bundle's evaluate.json: the network and inference the Dice evaluation used.
    predictor = parse_bundle_item(_RECIPE, "evaluate#predictor", _CONFIGS, overrides)
    function_rows = evaluate_function_from_segmentation(predictor, eval_datalist)
    function_csv = atomic_write(
        run_dir / "evaluation" / "function.csv",
        lambda temporary: pd.DataFrame(function_rows).to_csv(temporary, index=False),
    )
    lvef_mae, rvef_mae = (mean_abs_error(function_rows, key) for key in ("lv_ef_pct", "rv_ef_pct"))
    log_to_run_folder(
        run_dir,
        {"eval_sax_lvef_mae": lvef_mae, "eval_sax_rvef_mae": rvef_mae},
        {"evaluation": function_csv},
        experiment_name=EXPERIMENT_NAME,
        tracking_uri=shared["tracking_uri"],
    )
    client = MlflowClient(summary["tracking_uri"])
    labelled = "all" if run.labelled is None else str(run.labelled)
    for key, value in {"study": "label_efficiency", "init": run.init, "labelled": labelled, "seed": run.seed}.items():
        client.set_tag(summary["run_id"], key, str(value))
    metrics = summary["evaluation"]["metrics"]
    return {
        "run": run.name,
        "init": run.init,
        "labelled": labelled,
        "num_labelled": run.labelled or num_subjects,
        "seed": run.seed,
        **{f"dice_{name}": metrics.get(f"eval_sax_dice_{name}", math.nan) for name in STRUCTURES},
        **{f"hd95_{name}_mm": metrics.get(f"eval_sax_hd95_{name}", math.nan) for name in STRUCTURES},
        "lvef_mae": lvef_mae,
        "rvef_mae": rvef_mae,
        "train_s": round(trained - start, 1),
        "evaluate_s": round(time.perf_counter() - trained, 1),
        "run_id": summary["run_id"],
    }


def _aggregate(rows: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Mean and sd over seeds per (num_labelled, init): columns ``<metric>_mean``, ``<metric>_sd``, ``runs``."""
    return aggregate_over_seeds(rows, ["num_labelled", "labelled"], list(_METRICS), INITS)


def summary_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The markdown table of a study: mean ± sd over seeds per labelled count and initialisation.

    Args:
        rows: one per run, as in ``label_efficiency.csv`` (``init``, ``labelled``, ``num_labelled``, ``dice_LV``,
            ``dice_MYO``, ``dice_RV``, ``lvef_mae``).

    Returns:
        a markdown table, one line per (labelled count, init); sd is over seeds (sample sd; absent for one run).
    """
    header = ["labelled subjects", "init", "runs", *_METRICS.values()]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for item in _aggregate(rows).to_dict("records"):
        count = f"{item['num_labelled']} (all)" if item["labelled"] == "all" else str(item["num_labelled"])
        cells = [mean_sd(item[f"{key}_mean"], item[f"{key}_sd"], 1 if key == "lvef_mae" else 3) for key in _METRICS]
        lines.append("| " + " | ".join([count, item["init"], str(item["runs"]), *cells]) + " |")
    return "\n".join(lines)


def label_efficiency_figure(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Plot SAX Dice per structure and LVEF MAE against the number of labelled subjects, scratch vs pretrained.

    Args:
        rows: one per run (see :func:`summary_table`).
        path: the PNG to write (atomically).

    Returns:
        ``path``. Markers are means over seeds, error bars one sd, the x axis log2.
    """
    table = _aggregate(rows)
    counts = {count: str(count) for count in sorted(table["num_labelled"].unique())}
    title = "cine_seg: scratch vs MAE-pretrained encoder, held-out phantoms (mean ± sd over seeds)"
    return init_curves_figure(table, "num_labelled", _METRICS, INITS, counts, "labelled subjects", title, Path(path))


def _write_outputs(rows: Sequence[Mapping[str, Any]], out_dir: Path) -> dict[str, Any]:
    return write_study_outputs(rows, out_dir, "label_efficiency", summary_table, label_efficiency_figure)


def run_label_efficiency_study(
    out_dir: str | os.PathLike,
    settings: StudySettings = DEFAULT_SETTINGS,
    pretrained: str | os.PathLike | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run (or resume) a label-efficiency study and write its table and figure.

    Args:
        out_dir: the study folder (see the module docstring for its layout).
        settings: what to train and evaluate (:data:`DEFAULT_SETTINGS`, :data:`QUICK_SETTINGS`, or a
            ``dataclasses.replace`` of them).
        pretrained: a ``cine_mae`` checkpoint whose encoder matches ``settings.finetune``'s model; None pre-trains
            one in ``out_dir/pretrain`` with ``settings.pretrain`` on the training cohort (once: reused when
            complete).
        progress: show a progress bar over the runs.

    Returns:
        ``{"rows": one dict per run, "table": markdown, "csv", "markdown", "figure": paths, "tracking_uri",
        "experiment_name", "ran": runs trained by this call}``.

    Raises:
        DataError: for bad settings (see :func:`plan_runs`) or bad data.
        CheckpointError: when ``pretrained`` does not exist or does not match the encoder.
    """
    runs = plan_runs(settings)
    given = None if pretrained is None else given_checkpoint(pretrained, _PRETRAIN_RECIPE)
    out_dir = Path(out_dir).resolve()
    cohort = ensure_cohort(out_dir / "cohorts" / f"train_n{settings.num_subjects}_seed{settings.cohort_seed}",
                           settings.num_subjects, seed=settings.cohort_seed, num_frames=settings.frames,
                           progress=progress).parent
    held_out = ensure_cohort(out_dir / "cohorts" / f"heldout_n{settings.eval_subjects}_seed{settings.eval_seed}",
                             settings.eval_subjects, seed=settings.eval_seed, num_frames=settings.eval_frames,
                             progress=progress).parent
    weights = given or _pretrain(out_dir, settings, cohort)
    uri = study_experiment(out_dir, EXPERIMENT_NAME)
    shared = {**settings.finetune, "dataset_dir": str(cohort), "eval_dataset_dir": str(held_out),
              "experiment_name": EXPERIMENT_NAME, "tracking_uri": uri}
    eval_datalist = load_cine_datalist(held_out, views=[SAX_VIEW], metadata=True)
    rows, outputs, ran = run_resumable(
        runs,
        out_dir,
        lambda run, run_dir: _finetune(run, run_dir, shared, weights, eval_datalist, settings.num_subjects),
        _write_outputs,
        "label-efficiency runs",
        progress,
    )
    return {"rows": rows, **outputs, "tracking_uri": uri, "experiment_name": EXPERIMENT_NAME, "ran": ran}
