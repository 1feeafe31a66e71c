"""Ejection fraction of cine CMR: from the segmentation of the whole cardiac cycle, scored against exact targets.

From segmentation (the clinical route): every frame of the SAX stack is segmented
(:class:`~medssl.tasks.segmentation.CineSegmentationPredictor`), the LV and RV cavity volumes of each frame follow by
Simpson's method of discs, end-diastole (ED) and end-systole (ES) are the frames of largest and smallest LV cavity,
and EDV, ESV, SV and EF follow (:mod:`medssl.clinical.cardiac`). CineMA evaluates EF the same way from its
segmentations (Fu et al., 2025, https://arxiv.org/abs/2506.00679). Scores are absolute errors in EF points against the
exact EF the phantom generator computed from its analytic anatomy (``metadata.json``), not against label voxel
counts, so the partial-volume error of the stack itself counts against the method.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from monai.data import MetaTensor
from monai.transforms import LoadImage

from medssl.clinical.cardiac import CardiacFunction, cardiac_function, ventricular_volumes
from medssl.data.cine import METADATA_KEY, SAX_VIEW, label_key
from medssl.errors import DataError
from medssl.tasks.segmentation import CineSegmentationPredictor, as_cine

__all__ = [
    "FUNCTION_TARGETS",
    "function_from_labels",
    "read_function_targets",
    "function_errors",
    "mean_abs_error",
    "evaluate_function_from_segmentation",
    "evaluate_function_from_reference_labels",
]

FUNCTION_TARGETS = ("lv_edv_ml", "lv_esv_ml", "lv_sv_ml", "lv_ef_pct", "rv_edv_ml", "rv_esv_ml", "rv_sv_ml", "rv_ef_pct")
"""Quantities scored against a subject's exact values (metadata keys of the same names)."""


def function_from_labels(labels: np.ndarray, affine: np.ndarray | Any) -> CardiacFunction:
    """LV and RV function of a SAX cine segmentation on its own voxel grid.

    Args:
        labels: ``[H, W, S, T]`` class ids (0 background, 1 RV, 2 LV myocardium, 3 LV cavity).
        affine: the ``4 x 4`` voxel-to-world affine of the grid (mm); its column norms are the voxel spacing, the
            third the slice spacing centre to centre.

    Returns:
        :class:`~medssl.clinical.cardiac.CardiacFunction`, ED and ES from the LV volume curve.

    Raises:
        DataError: for labels that are not a 4-D map of the cardiac ids (see
            :func:`~medssl.clinical.cardiac.ventricular_volumes`).
    """
    if np.ndim(labels) != 4:
        raise DataError(f"expected a SAX label cine [H, W, S, T], got shape {np.shape(labels)}.")
    spacing = np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)
    return cardiac_function(ventricular_volumes(labels, spacing))


def read_function_targets(path: str) -> dict[str, float]:
    """A subject's exact volumes and EFs, and its ED and ES frames, from its ``metadata.json``.

    Args:
        path: the subject's metadata file (``load_cine_datalist(..., metadata=True)`` lists it).

    Returns:
        ``{name: value}`` for :data:`FUNCTION_TARGETS` and ``ed_frame``, ``es_frame``.

    Raises:
        DataError: when the file cannot be read or lacks one of the values.
    """
    try:
        with open(path) as handle:
            metadata = json.load(handle)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read subject metadata {path}: {e}") from e
    wanted = (*FUNCTION_TARGETS, "ed_frame", "es_frame")
    missing = [key for key in wanted if not isinstance(metadata.get(key), (int, float))]
    if missing:
        raise DataError(f"subject metadata {path} has no numeric {', '.join(missing)}: it cannot score EF.")
    return {key: metadata[key] for key in wanted}


def function_errors(function: CardiacFunction, targets: Mapping[str, float]) -> dict[str, Any]:
    """Measured values beside their exact targets, with absolute errors.

    Args:
        function: what was measured.
        targets: exact values from :func:`read_function_targets`.

    Returns:
        per quantity ``q`` of :data:`FUNCTION_TARGETS`: ``q`` (measured; NaN when not measurable), ``q_true`` and
        ``q_abs_error``; ``ed_frame``, ``es_frame``, their true values, and ``num_flags`` (plausibility warnings).
    """
    row: dict[str, Any] = {}
    for key in FUNCTION_TARGETS:
        measured = float(getattr(function, key))
        row.update({key: measured, f"{key}_true": float(targets[key]), f"{key}_abs_error": abs(measured - targets[key])})
    row.update(
        ed_frame=function.ed_frame,
        ed_frame_true=int(targets["ed_frame"]),
        es_frame=function.es_frame,
        es_frame_true=int(targets["es_frame"]),
        num_flags=len(function.flags),
    )
    return row


def _load_sax(path: str) -> MetaTensor:
    return as_cine(LoadImage(image_only=True, dtype=np.float32)(path), SAX_VIEW, path)


def _subjects(datalist: Sequence[Mapping[str, str]], needs: Sequence[str]) -> None:
    if not datalist:
        raise DataError("the evaluation data list is empty: no subject to measure.")
    for index, item in enumerate(datalist):
        missing = [key for key in needs if key not in item]
        if missing:
            raise DataError(
                f"subject #{index} of the evaluation data list has no {', '.join(missing)}; list the data with "
                "load_cine_datalist(..., metadata=True) (and labels=True for reference labels)."
            )


def evaluate_function_from_segmentation(
    predictor: CineSegmentationPredictor, datalist: Sequence[Mapping[str, str]]
) -> list[dict[str, Any]]:
    """Segment every SAX frame of each subject, measure LV/RV function and score it against the exact values.

    Args:
        predictor: a predictor with a ``"sax"`` view.
        datalist: ``{"sax": path, "metadata": path}`` per subject (``load_cine_datalist(source, ["sax"],
            metadata=True)``).

    Returns:
        one row per subject: ``{"subject": index, "method": "segmentation", **function_errors(...)}`` (no
        identifiers: subjects are numbered).

    Raises:
        DataError: when the data list is empty, a subject lacks its SAX cine or metadata, or a file is unreadable.
    """
    _subjects(datalist, (SAX_VIEW, METADATA_KEY))
    rows = []
    for subject, item in enumerate(datalist):
        cine = _load_sax(item[SAX_VIEW])
        function = function_from_labels(predictor.predict(cine, SAX_VIEW), cine.affine)
        targets = read_function_targets(item[METADATA_KEY])
        rows.append({"subject": subject, "method": "segmentation", **function_errors(function, targets)})
    return rows


def evaluate_function_from_reference_labels(datalist: Sequence[Mapping[str, str]]) -> list[dict[str, Any]]:
    """Measure LV/RV function from each subject's reference label cine and score it against the exact values.

    The sanity check of a synthetic cohort: voxel counting on the stack's own labels already differs from the exact
    analytic volumes (partial volume, slice gaps); a method cannot be expected to beat this floor.

    Args:
        datalist: ``{"sax": path, "sax_label": path, "metadata": path}`` per subject.

    Returns:
        one row per subject, as :func:`evaluate_function_from_segmentation` with ``"method": "reference_labels"``.

    Raises:
        DataError: when the data list is empty or a subject lacks a file, or a label is not a 4-D cardiac label map.
    """
    _subjects(datalist, (label_key(SAX_VIEW), METADATA_KEY))
    rows = []
    for subject, item in enumerate(datalist):
        path = item[label_key(SAX_VIEW)]
        label = LoadImage(image_only=True, dtype=np.uint8)(path)
        function = function_from_labels(np.asarray(label), label.affine)
        targets = read_function_targets(item[METADATA_KEY])
        rows.append({"subject": subject, "method": "reference_labels", **function_errors(function, targets)})
    return rows


def mean_abs_error(rows: Sequence[Mapping[str, Any]], key: str = "lv_ef_pct") -> float:
    """Mean absolute error of ``key`` over rows, skipping values that could not be measured (NaN)."""
    errors = [row[f"{key}_abs_error"] for row in rows if math.isfinite(row[f"{key}_abs_error"])]
    return float(np.mean(errors)) if errors else math.nan
