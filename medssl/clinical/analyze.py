"""``medssl analyze``: ventricular volumes, ejection fraction, DICOM SEG and SR and a readable report from a folder of
DICOM files, for people who do not write code.

Per run::

    OUT_DIR/analysis.json                      what was analysed, skipped or ignored, and why (no identifiers)
    OUT_DIR/<study>/measurements.json, .csv    LV/RV EDV, ESV, SV, EF, LV mass, ED/ES frames, volume curves, flags
    OUT_DIR/<study>/segmentation.dcm           DICOM SEG (RV, LV myocardium, LV cavity) referencing the source MR
    OUT_DIR/<study>/measurements_sr.dcm        DICOM SR, TID 1500 measurement report referencing the SEG
    OUT_DIR/<study>/sax_labels.nii.gz          the label cine on the native SAX grid (uint8 [H, W, S, T])
    OUT_DIR/<study>/report.png, report.pdf     overlays at ED and ES, volume curves, numbers with reference ranges

``<study>`` is a neutral name (``study-1-3fa2c1``: order of acquisition and a hash of the StudyInstanceUID), never a
patient identifier; the DICOM outputs carry the source study's identifiers, as the standard requires, and nothing
else does (logs, console, file names, JSON, CSV, report).

Each study is written into a hidden staging folder and renamed into place when complete, so a failure leaves no
folder that looks finished, and a previous result of the same study is replaced only by a complete new one. A
study that fails (no SAX stack, a segmentation error) is reported and the others are still analysed.

The model is a segmentation bundle: a ``cine_seg`` run folder (training makes it a bundle; default
``runs/cine_seg``, or ``$MEDSSL_CINE_SEG``) or an imported one. It resamples each frame to its own spacing and maps
the labels back to the native grid (:meth:`~medssl.tasks.segmentation.CineSegmentationPredictor.predict`).
Volumes use Simpson's method of discs on that grid (:mod:`medssl.clinical.cardiac`).
"""

from __future__ import annotations

import csv
import dataclasses
import inspect
import io
import json
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor

from medssl import __version__
from medssl.clinical.cardiac import CardiacFunction, VolumeCurves, cardiac_function, ventricular_volumes
from medssl.errors import ConfigError, DataError, MedsslError
from medssl.io.dicom_read import CineSeries, DicomStudy, SkippedFile, scan_dicom_folder

__all__ = [
    "BUNDLE_ENV",
    "DEFAULT_BUNDLES",
    "EXIT_PARTIAL",
    "StudyOutcome",
    "AnalysisResult",
    "resolve_bundle",
    "study_folder_name",
    "analyze_study",
    "analyze_dicom_folder",
]

logger = logging.getLogger(__name__)

BUNDLE_ENV = "MEDSSL_CINE_SEG"
DEFAULT_BUNDLES = (Path("runs") / "cine_seg", Path("runs") / "demo" / "cine_seg")
"""Where a trained model is looked for by default, relative to the working folder: where ``medssl finetune
cine_seg`` writes it, then where ``make demo`` does."""
EXIT_PARTIAL = 3
"""Exit status when some studies were analysed and others failed (bad input overall: 2; all analysed: 0)."""

_MEASUREMENTS = (
    ("lv_edv_ml", "ml"), ("lv_esv_ml", "ml"), ("lv_sv_ml", "ml"), ("lv_ef_pct", "%"),
    ("rv_edv_ml", "ml"), ("rv_esv_ml", "ml"), ("rv_sv_ml", "ml"), ("rv_ef_pct", "%"),
    ("lv_mass_g", "g"), ("ed_frame", "frame index"), ("es_frame", "frame index"),
)  # fmt: skip


@dataclass
class StudyOutcome:
    """What became of one study.

    Attributes:
        label: the study's neutral label (``"study 1 (3fa2c1)"``).
        folder: its output folder, or None when it could not be analysed.
        function: the measurements, or None.
        warnings: data problems met on the way (duplicates, a missing slice, uneven spacing, ...).
        error: why the study was not analysed, or None.
        skipped: True when the study holds no cine SAX stack (nothing to analyse, e.g. another exam in the same
            folder); False when it has one and its analysis failed, or it was analysed.
        timings: seconds per stage: ``resample_s``, ``infer_s``, ``restore_s`` (the model, when it reports them),
            ``segment_s`` (all three), ``write_s`` (SEG, SR, NIfTI, tables, report).
    """

    label: str
    folder: Path | None = None
    function: CardiacFunction | None = None
    warnings: list[str] = field(default_factory=list)
    error: str | None = None
    skipped: bool = False
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def analysed(self) -> bool:
        """Whether outputs were written."""
        return self.error is None

    @property
    def status(self) -> str:
        """``"analysed"``, ``"skipped"`` (no cine SAX stack) or ``"failed"``."""
        return "analysed" if self.analysed else "skipped" if self.skipped else "failed"

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary (no identifiers)."""
        return {
            "study": self.label,
            "status": self.status,
            "folder": None if self.folder is None else self.folder.name,
            "error": self.error,
            "warnings": self.warnings,
            "flags": [] if self.function is None else self.function.flags,
            "measurements": None if self.function is None else self.function.to_dict(),
            "timings_s": {key: round(value, 3) for key, value in self.timings.items()},
        }


@dataclass
class AnalysisResult:
    """The outcome of one ``medssl analyze`` run.

    Attributes:
        out_dir: the output folder.
        studies: one outcome per study found.
        skipped_files: files not used, with the reason (paths relative to the input folder).
        ignored: per study label, the series not used and why.
        scan_s: seconds spent finding, reading and assembling the DICOM files.
    """

    out_dir: Path
    studies: list[StudyOutcome]
    skipped_files: list[SkippedFile]
    ignored: dict[str, list[str]]
    scan_s: float = 0.0

    @property
    def exit_code(self) -> int:
        """:data:`EXIT_PARTIAL` when the analysis of a study with a cine SAX stack failed, else 0 (studies without
        one are skipped and listed; when nothing at all was analysed the CLI exits 2)."""
        return EXIT_PARTIAL if any(study.status == "failed" for study in self.studies) else 0


def _has_model(path: Path) -> bool:
    return (path / "models").is_dir() and any((path / "models").glob("*.safetensors"))


def resolve_bundle(bundle: str | os.PathLike | None = None) -> Path:
    """The segmentation bundle to use: ``bundle``, else ``$MEDSSL_CINE_SEG``, else the first of
    :data:`DEFAULT_BUNDLES` that holds a model.

    Raises:
        ConfigError: when the chosen folder holds no trained model; says how to train or import one.
    """
    if bundle is None and not os.environ.get(BUNDLE_ENV):
        found = [path.resolve() for path in DEFAULT_BUNDLES if _has_model(path)]
        if found:
            return found[0]
        where = " or ".join(str(path.resolve()) for path in DEFAULT_BUNDLES)
    else:
        path = Path(bundle if bundle is not None else os.environ[BUNDLE_ENV]).expanduser().resolve()
        if _has_model(path):
            return path
        where = f"{path} ({'--bundle' if bundle is not None else '$' + BUNDLE_ENV})"
    raise ConfigError(
        f"no trained segmentation model in {where}. Train one: `make demo` (writes runs/demo/cine_seg) or "
        "`medssl pretrain cine_mae && medssl finetune cine_seg` (writes runs/cine_seg); or import CineMA's with "
        "`medssl import-cinema`; then pass the folder with --bundle."
    )


def study_folder_name(label: str) -> str:
    """A file-system-safe folder name for a study label: ``"study 1 (3fa2c1)"`` -> ``"study-1-3fa2c1"``."""
    return re.sub(r"[^A-Za-z0-9]+", "-", label).strip("-").lower() or "study"


def _check_output_folder(out_dir: Path) -> None:
    """Create ``out_dir`` and prove it writable before any long work starts."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out_dir, prefix=".medssl-write-test-"):
            pass
    except OSError as e:
        raise DataError(f"cannot write to the output folder {out_dir}: {e.strerror or e}.") from None


def _bundle_setting(bundle: Path, key: str) -> Any:
    """A plain setting of a bundle's inference config (a run folder without configs: the cine_seg recipe's), or None
    when it has none."""
    from medssl.engine.bundles import bundle_dir

    own = bundle / "configs" / "inference.json"
    try:
        config = json.loads((own if own.is_file() else bundle_dir("cine_seg") / own.relative_to(bundle)).read_text())
    except (OSError, ValueError):
        return None
    value = config.get(key)
    return None if isinstance(value, str) and value[:1] in "$@" else value


def _load_predictor(bundle: Path) -> Any:
    from medssl.tasks.segmentation import load_segmentation_predictor

    return load_segmentation_predictor(bundle)


def _segment(predictor: Any, sax: CineSeries, progress: bool) -> np.ndarray:
    cine = MetaTensor(torch.from_numpy(np.ascontiguousarray(sax.image)), affine=torch.from_numpy(sax.affine))
    kwargs = {"progress": progress} if "progress" in inspect.signature(predictor.predict).parameters else {}
    labels = np.asarray(predictor.predict(cine, "sax", None, **kwargs))
    if labels.shape != sax.image.shape:
        raise DataError(f"the model returned labels of shape {labels.shape} for a SAX cine of shape {sax.image.shape}.")
    return labels.astype(np.uint8)


def _spacing(affine: np.ndarray) -> np.ndarray:
    return np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)


def _patient_sex(sax: CineSeries) -> str | None:
    sex = str(sax.sources[0][0].dataset.get("PatientSex", "") or "").upper()
    return sex if sex in ("M", "F") else None


def _measurement_rows(function: CardiacFunction) -> list[dict[str, Any]]:
    values = function.to_dict()
    return [{"measurement": key, "value": values[key], "unit": unit} for key, unit in _MEASUREMENTS]


def _write_tables(folder: Path, label: str, function: CardiacFunction, curves: VolumeCurves, sax: CineSeries,
                  model: str, warnings: Sequence[str]) -> None:  # fmt: skip
    document = {
        "study": label,
        "model": model,
        "medssl_version": __version__,
        "measurements": function.to_dict(),
        "flags": function.flags,
        "warnings": list(warnings),
        "volume_curves_ml": {key: value for key, value in curves.to_dict().items() if key != "lv_cavity_slice_ml"},
        "trigger_times_ms": [None if np.isnan(t) else float(t) for t in sax.trigger_times_ms],
        "sax_shape": list(sax.image.shape),
        "sax_spacing_mm": _spacing(sax.affine).round(4).tolist(),
    }
    (folder / "measurements.json").write_text(json.dumps(document, indent=1))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["measurement", "value", "unit"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(_measurement_rows(function))
    (folder / "measurements.csv").write_text(buffer.getvalue())


def _write_outputs(folder: Path, study: DicomStudy, labels: np.ndarray, model: str, synthetic: bool) -> StudyOutcome:
    """Every output of one study into ``folder`` (the staging folder)."""
    from medssl.clinical.report import write_report
    from medssl.io.dicom_seg import cine_segmentation, write_dicom
    from medssl.io.dicom_sr import measurement_report

    sax = study.sax
    assert sax is not None
    curves = ventricular_volumes(labels, _spacing(sax.affine))
    function = cardiac_function(curves)
    warnings = list(sax.warnings)
    sources = [[instance.dataset for instance in row] for row in sax.sources]
    segmentation = cine_segmentation(labels, sources, model_name=model)
    write_dicom(segmentation, folder / "segmentation.dcm")
    try:
        report = measurement_report(function, segmentation, sources, model_name=model)
    except DataError as e:  # nothing measurable (e.g. no ventricle found): the flags say so, an empty SR would not
        warnings.append(f"no DICOM SR written: {e}")
    else:
        write_dicom(report, folder / "measurements_sr.dcm")
    nib.save(nib.Nifti1Image(labels, sax.affine), str(folder / "sax_labels.nii.gz"))
    _write_tables(folder, study.label, function, curves, sax, model, warnings)
    times = sax.trigger_times_ms
    write_report(
        sax.image, labels, curves, function, folder / "report.png", folder / "report.pdf",
        spacing_mm=_spacing(sax.affine), trained_on_synthetic_only=synthetic, model_name=model,
        frame_times_ms=None if np.isnan(times).any() else times, sex=_patient_sex(sax),
    )  # fmt: skip
    return StudyOutcome(study.label, function=function, warnings=warnings)


def _replace_folder(staging: Path, final: Path) -> None:
    """Move a complete staging folder into place, replacing an earlier result only once the new one is complete."""
    previous = final.with_name(f".{final.name}.previous-{uuid.uuid4().hex[:8]}") if final.exists() else None
    if previous is not None:
        os.replace(final, previous)
    os.replace(staging, final)
    if previous is not None:
        shutil.rmtree(previous, ignore_errors=True)


def analyze_study(
    study: DicomStudy, predictor: Any, out_dir: Path, *, model: str, synthetic: bool, progress: bool = True
) -> StudyOutcome:
    """Segment one study's SAX cine and write all its outputs into ``out_dir/<study folder>``, atomically.

    Args:
        study: from :func:`medssl.io.dicom_read.scan_dicom_folder`.
        predictor: ``predict(cine, view, frames) -> labels`` on the cine's grid (a segmentation bundle's predictor).
        out_dir: the run's output folder.
        model: model name for the outputs.
        synthetic: whether the model was trained on synthetic data only (the report says so).
        progress: show progress while segmenting.

    Returns:
        the outcome; failures are caught and reported in ``error``, never raised (other studies go on).
    """
    if study.sax is None:
        reasons = "; ".join(study.ignored) or "no series qualified"
        return StudyOutcome(study.label, error=f"no cine SAX stack ({reasons})", skipped=True)
    final = out_dir / study_folder_name(study.label)
    staging = Path(tempfile.mkdtemp(dir=out_dir, prefix=f".{final.name}.partial-"))
    try:
        logger.info("%s: segmenting %d slices x %d frames", study.label, *study.sax.image.shape[2:])
        started = time.perf_counter()
        labels = _segment(predictor, study.sax, progress)
        segmented = time.perf_counter()
        outcome = _write_outputs(staging, study, labels, model, synthetic)
        _replace_folder(staging, final)
        outcome.timings = {**getattr(predictor, "timings", {}), "segment_s": segmented - started,
                           "write_s": time.perf_counter() - segmented}  # fmt: skip
    except MedsslError as e:
        shutil.rmtree(staging, ignore_errors=True)
        return StudyOutcome(study.label, warnings=list(study.sax.warnings), error=str(e))
    except Exception as e:  # one study's failure must not stop the others; the message names no identifier
        shutil.rmtree(staging, ignore_errors=True)
        logger.debug("%s failed", study.label, exc_info=True)
        return StudyOutcome(study.label, warnings=list(study.sax.warnings), error=f"{type(e).__name__}: {e}")
    outcome.folder = final
    return outcome


def analyze_dicom_folder(
    dicom_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    bundle: str | os.PathLike | None = None,
    *,
    progress: bool = True,
) -> AnalysisResult:
    """Analyse every cine CMR study in a folder of DICOM files (see the module docstring for the outputs).

    Args:
        dicom_dir: folder to scan recursively (or a DICOMDIR).
        out_dir: output folder; created if needed, and checked writable before the long work starts.
        bundle: segmentation bundle folder; default :func:`resolve_bundle`'s.
        progress: progress bars per stage.

    Returns:
        the outcomes; ``analysis.json`` in ``out_dir`` says the same.

    Raises:
        ConfigError: when there is no trained model.
        DataError: when the output folder is not writable, or the input holds no usable DICOM image at all.
    """
    # highdicom logs every module it copies from the source images, naming their UIDs: noise for a clinician.
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    out_dir = Path(out_dir).expanduser().resolve()
    bundle_path = resolve_bundle(bundle)
    _check_output_folder(out_dir)
    predictor = _load_predictor(bundle_path)
    metadata = _bundle_setting(bundle_path, "trained_on_synthetic_data")
    synthetic = bool(metadata)
    model = str(bundle_path.name)
    started = time.perf_counter()
    studies, skipped = scan_dicom_folder(dicom_dir, progress=progress)
    scan_s = time.perf_counter() - started
    for entry in skipped:
        logger.info("skipped %s: %s", entry.path, entry.reason)
    outcomes = []
    for study in studies:
        outcome = analyze_study(study, predictor, out_dir, model=model, synthetic=synthetic, progress=progress)
        if outcome.error:
            log = logger.info if outcome.skipped else logger.warning
            log("%s: %s: %s", study.label, outcome.status, outcome.error)
        outcomes.append(outcome)
    result = AnalysisResult(out_dir, outcomes, skipped, {study.label: study.ignored for study in studies}, scan_s)
    summary = {
        "medssl_version": __version__,
        "model": model,
        "trained_on_synthetic_data": metadata,
        "studies": [outcome.to_dict() for outcome in outcomes],
        "ignored_series": result.ignored,
        "skipped_files": [dataclasses.asdict(entry) for entry in skipped],
        "scan_s": round(scan_s, 3),
    }
    from medssl.engine.checkpoints import atomic_write

    atomic_write(out_dir / "analysis.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=1)))
    return result
