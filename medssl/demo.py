"""The end-to-end demo (``medssl demo`` / ``make demo``) on synthetic data, through the real bundles.

1. ``cine_mae``: generate a phantom cine CMR cohort and pre-train a small CineMA-style MAE on it;
2. ``cine_seg``: fine-tune the pretrained encoder to segment the heart with only a few labelled subjects;
3. evaluate on a held-out phantom cohort (a seed never trained on): Dice per structure on SAX ED and ES frames, and
   the LVEF measured from the segmentation of the whole cycle against each subject's exact EF;
4. ``medssl analyze`` on one more held-out subject written as DICOM, as a clinician would run it: volumes, EF, DICOM
   SEG and SR, and the report.

Both runs share one MLflow store in the demo folder, so ``mlflow ui`` shows them side by side; the EF error is logged
into the fine-tuning run.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from medssl.errors import ConfigError

__all__ = ["DemoSettings", "run_demo"]

_SEG_CONFIGS = ["configs/train.json", "configs/evaluate.json"]


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo; the defaults run in about ten minutes on a 2-core CPU.

    Attributes:
        subjects: phantom subjects to pre-train on (the labelled subset is drawn from them).
        pretrain_epochs: MAE pre-training epochs.
        labelled: labelled subjects for fine-tuning.
        finetune_epochs: segmentation fine-tuning epochs (64 windows each).
        eval_subjects: held-out subjects to evaluate on.
        seed: cohort and training seed; the held-out cohort uses ``seed + 1000``.
    """

    subjects: int = 16
    pretrain_epochs: int = 80
    labelled: int = 4
    finetune_epochs: int = 30
    eval_subjects: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("subjects", "pretrain_epochs", "labelled", "finetune_epochs", "eval_subjects"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"demo setting {name} must be a positive integer, got {value!r}.")
        if self.labelled > self.subjects:
            raise ConfigError(
                f"demo setting labelled={self.labelled} exceeds the {self.subjects} subjects of the cohort."
            )


def run_demo(
    run_dir: str | os.PathLike,
    settings: DemoSettings = DemoSettings(),
    pretrain_overrides: dict[str, Any] | None = None,
    finetune_overrides: dict[str, Any] | None = None,
    report: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Pre-train, fine-tune with few labels and evaluate, in ``run_dir``.

    Args:
        run_dir: the demo folder (``cine_mae/``, ``cine_seg/`` and ``mlflow.db`` go inside).
        settings: sizes of the demo.
        pretrain_overrides: further ``cine_mae`` config overrides (e.g. a smaller ``model`` for a test).
        finetune_overrides: further ``cine_seg`` config overrides; the network keys among them (``views``, ``model``,
            ``finetune_mode``, ``inference``) also build the predictor for the EF evaluation.
        report: called with one line per step, for the console.

    Returns:
        ``{"pretrain": summary, "finetune": summary (with "evaluation"), "dice": {structure: mean SAX Dice},
        "lvef_mae": LVEF mean absolute error in points, "function_rows": per-subject EF rows, "tracking_uri",
        "analysis": the :class:`~medssl.clinical.analyze.AnalysisResult` of the DICOM study}``.

    Raises:
        ConfigError, DataError, CheckpointError: from the bundles.
    """
    from medssl.data.cine import load_cine_datalist
    from medssl.engine.bundles import parse_bundle_item, run_bundle
    from medssl.engine.tracking import log_to_run_folder
    from medssl.tasks.ejection_fraction import evaluate_function_from_segmentation, mean_abs_error
    from medssl.clinical.analyze import analyze_dicom_folder
    from medssl.data.phantom import ensure_cohort
    from medssl.tasks.segmentation import load_segmentation_predictor

    run_dir = Path(run_dir).resolve()
    tracking_uri = f"sqlite:///{run_dir / 'mlflow.db'}"
    run_dir.mkdir(parents=True, exist_ok=True)

    report(f"[1/4] pre-training a cine MAE on {settings.subjects} synthetic subjects ({settings.pretrain_epochs} epochs)")
    mae_overrides = {
        "run_dir": str(run_dir / "cine_mae"),
        "num_subjects": settings.subjects,
        "epochs": settings.pretrain_epochs,
        "seed": settings.seed,
        "tracking_uri": tracking_uri,
        **(pretrain_overrides or {}),
    }
    pretrain = run_bundle("cine_mae", overrides=mae_overrides)
    cohort = parse_bundle_item("cine_mae", "data_source", overrides=mae_overrides)

    report(f"[2/4] fine-tuning segmentation with {settings.labelled} labelled subjects ({settings.finetune_epochs} epochs)")
    seg_overrides = {
        "run_dir": str(run_dir / "cine_seg"),
        "dataset_dir": str(cohort),
        "pretrained": pretrain["artifacts"]["model"],
        "num_labelled": settings.labelled,
        "epochs": settings.finetune_epochs,
        "eval_num_subjects": settings.eval_subjects,
        "seed": settings.seed,
        "tracking_uri": tracking_uri,
        **(finetune_overrides or {}),
    }
    run_bundle("cine_seg", overrides=seg_overrides)

    report(f"[3/4] evaluating on {settings.eval_subjects} held-out subjects: Dice, and LVEF over the whole cycle")
    finetune = run_bundle("cine_seg", _SEG_CONFIGS, overrides=seg_overrides)
    metrics = finetune["evaluation"]["metrics"]
    dice = {name: metrics[f"eval_sax_dice_{name}"] for name in ("LV", "MYO", "RV")}
    # The finished run folder is a bundle with the settings it was trained with.
    predictor = load_segmentation_predictor(run_dir / "cine_seg")
    held_out = parse_bundle_item("cine_seg", "eval_data_source", _SEG_CONFIGS, seg_overrides)
    rows = evaluate_function_from_segmentation(predictor, load_cine_datalist(held_out, ["sax"], metadata=True))
    lvef_mae = mean_abs_error(rows, "lv_ef_pct")
    log_to_run_folder(run_dir / "cine_seg", {"eval_lvef_mae": lvef_mae}, tracking_uri=tracking_uri)

    report("[4/4] medssl analyze on a synthetic DICOM study: volumes, EF, DICOM SEG and SR, report")
    study = ensure_cohort(run_dir / "dicom_study", 1, seed=settings.seed + 2000, dicom=True, progress=False)
    analysis = analyze_dicom_folder(study.parent / "sub-0000" / "dicom", run_dir / "analysis", run_dir / "cine_seg")
    return {
        "pretrain": pretrain,
        "finetune": finetune,
        "dice": dice,
        "lvef_mae": lvef_mae,
        "function_rows": rows,
        "tracking_uri": tracking_uri,
        "analysis": analysis,
    }
