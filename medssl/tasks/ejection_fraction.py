"""Ejection fraction of cine CMR: from the segmentation of the whole cardiac cycle, scored against exact targets.

From segmentation (the clinical route): every frame of the SAX stack is segmented
(:class:`~medssl.tasks.segmentation.CineSegmentationPredictor`), the LV and RV cavity volumes of each frame follow by
Simpson's method of discs, end-diastole (ED) and end-systole (ES) are the frames of largest and smallest LV cavity,
and EDV, ESV, SV and EF follow (:mod:`medssl.clinical.cardiac`). CineMA evaluates EF the same way from its
segmentations (Fu et al., 2025, https://arxiv.org/abs/2506.00679). Scores are absolute errors in EF points against the
exact EF the phantom generator computed from its analytic anatomy (``metadata.json``), not against label voxel
counts, so the partial-volume error of the stack itself counts against the method.

By direct regression (CineMA's second route): the ED and ES SAX frames as two channels
(:mod:`medssl.data.cine_phases`) go through a standardised
:class:`~medssl.tasks.image_level.ImageLevelNetwork` that outputs LVEF and RVEF in %, trained with a smooth-L1 loss on
z-scored targets; it is scored the same way (:func:`evaluate_ef_regression`). Folders of NIfTI cines are measured by
:func:`~medssl.tasks.image_level.predict_folder` with :func:`target_columns`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from monai.data import MetaTensor
from monai.transforms import LoadImage
from torch import Tensor, nn

from medssl.clinical.cardiac import CardiacFunction, cardiac_function, ventricular_volumes
from medssl.data.cine import METADATA_KEY, SAX_VIEW, label_key
from medssl.data.cine_labelled import SegmentationView
from medssl.data.cine_phases import cine_phase_datalist
from medssl.errors import DataError
from medssl.tasks.image_level import predict_phases
from medssl.tasks.segmentation import CineSegmentationPredictor, as_cine, load_segmentation_predictor

__all__ = [
    "FUNCTION_TARGETS",
    "function_from_labels",
    "read_function_targets",
    "function_errors",
    "mean_abs_error",
    "evaluate_function_from_segmentation",
    "evaluate_function_from_reference_labels",
    "EF_TARGETS",
    "REGRESSION_TARGET_KEY",
    "ef_regression_items",
    "regression_targets",
    "evaluate_ef_regression",
    "evaluate_function_with_segmentation_bundle",
    "target_columns",
]

FUNCTION_TARGETS = ("lv_edv_ml", "lv_esv_ml", "lv_sv_ml", "lv_ef_pct", "rv_edv_ml", "rv_esv_ml", "rv_sv_ml", "rv_ef_pct")
"""Quantities scored against a subject's exact values (metadata keys of the same names)."""
EF_TARGETS = ("lv_ef_pct", "rv_ef_pct")
"""What the direct regression predicts by default: LVEF and RVEF in % (metadata keys of the same names)."""
REGRESSION_TARGET_KEY = "target"
"""Key of a regression sample's ``[K]`` float32 targets."""
logger = logging.getLogger(__name__)


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


# Direct regression from the ED and ES frames (CineMA's second route).


def ef_regression_items(
    datalist: Sequence[Mapping[str, str]], targets: Sequence[str] = EF_TARGETS, view: str = SAX_VIEW
) -> list[dict[str, Any]]:
    """Training / evaluation items for EF regression: the cine, its ED and ES frames and the exact targets.

    Args:
        datalist: ``{view: path, "metadata": path}`` per subject (``load_cine_datalist(source, [view],
            metadata=True)``).
        targets: metadata values to regress (default LVEF and RVEF in %).
        view: the image key.

    Returns:
        ``{view: path, "ed_frame", "es_frame", "target": float32 [len(targets)]}`` per subject.

    Raises:
        DataError: when ``targets`` is empty, a subject has no metadata, or a target is missing or not a finite
            number (naming the subject's position).
    """
    if not targets:
        raise DataError("no regression target given: name metadata values such as 'lv_ef_pct'.")
    items = cine_phase_datalist(datalist, targets, view)
    for index, item in enumerate(items):
        values = [item.pop(name) for name in targets]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            raise DataError(
                f"subject #{index}: regression targets {list(targets)} must be finite numbers, got {values}."
            )
        item[REGRESSION_TARGET_KEY] = np.asarray(values, dtype=np.float32)
    return items


def regression_targets(items: Sequence[Mapping[str, Any]]) -> np.ndarray:
    """The ``[N, K]`` target values of :func:`ef_regression_items` (e.g. for
    :meth:`~medssl.tasks.image_level.ImageLevelNetwork.set_output_statistics`).

    Raises:
        DataError: when ``items`` is empty or lacks targets.
    """
    if not items or any(REGRESSION_TARGET_KEY not in item for item in items):
        raise DataError("the regression items are empty or lack targets: build them with ef_regression_items.")
    return np.stack([np.asarray(item[REGRESSION_TARGET_KEY], dtype=np.float32) for item in items])


def evaluate_ef_regression(
    network: nn.Module,
    items: Sequence[Mapping[str, Any]],
    view: SegmentationView,
    targets: Sequence[str] = EF_TARGETS,
    centre: str = "heart",
    batch_size: int = 4,
) -> list[dict[str, Any]]:
    """Regress EF directly from each subject's ED/ES image and score it against the exact values.

    Args:
        network: ``network(images) -> [B, len(targets)]`` in the targets' units (a standardised
            :class:`~medssl.tasks.image_level.ImageLevelNetwork`).
        items: from :func:`ef_regression_items` with the same ``targets``.
        view: the SAX geometry of the network's input.
        targets: the names of the network's outputs.
        centre: window centring, as in training.
        batch_size: subjects per forward pass.

    Returns:
        one row per subject: ``{"subject": index, "method": "regression", "ed_frame", "es_frame", q, q_true,
        q_abs_error}`` per target ``q`` (the columns of :func:`evaluate_function_from_segmentation`).

    Raises:
        DataError: when ``items`` is empty or lacks targets, or a cine is unreadable.
        ValueError: when the network's outputs are not one per target.
    """
    true = regression_targets(items)
    predicted, frames = predict_phases(network, items, view, centre, batch_size)
    if predicted.shape != true.shape or true.shape[1] != len(targets):
        raise ValueError(
            f"the network predicts {tuple(predicted.shape[1:])} values per subject for the targets {list(targets)} "
            f"(items hold {true.shape[1]})."
        )
    rows = []
    for subject, (values, exact, used) in enumerate(zip(predicted.tolist(), true.tolist(), frames)):
        row: dict[str, Any] = {"subject": subject, "method": "regression", **used}
        for name, value, target in zip(targets, values, exact):
            row.update({name: value, f"{name}_true": target, f"{name}_abs_error": abs(value - target)})
        rows.append(row)
    return rows


def evaluate_function_with_segmentation_bundle(
    run_dir: str | os.PathLike | None,
    datalist: Sequence[Mapping[str, str]],
    overrides: Mapping[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """EF from a trained ``cine_seg`` run (:func:`evaluate_function_from_segmentation`), or nothing without one.

    The predictor is the run's own (:func:`~medssl.tasks.segmentation.load_segmentation_predictor`: the run
    folder's ``configs/inference.json`` with the settings it was trained with, or the recipe's with ``overrides``).

    Args:
        run_dir: the ``cine_seg`` run folder (its weights: ``<run_dir>/models/model.safetensors``, or the
            ``weights`` override); None skips the segmentation route.
        datalist: ``{"sax": path, "metadata": path}`` per subject.
        overrides: more ``cine_seg`` inference overrides, e.g. ``{"views": ..., "model": ...}``.

    Returns:
        the rows of :func:`evaluate_function_from_segmentation`; an empty list (with a warning in the log) when
        there is no run folder or no weights in it.

    Raises:
        ConfigError: for an override ``cine_seg`` does not know.
        CheckpointError: when the weights do not match the ``cine_seg`` network.
        DataError: see :func:`evaluate_function_from_segmentation`.
    """
    overrides = dict(overrides or {})
    weights = Path(overrides.get("weights") or Path(run_dir or "") / "models" / "model.safetensors")
    if run_dir is None or not weights.is_file():
        logger.warning(
            f"no cine_seg model at {weights}: evaluating the direct EF regression only (train cine_seg and pass "
            "--segmentation_run_dir to add EF from segmentation)."
        )
        return []
    predictor = load_segmentation_predictor(run_dir, overrides)
    return evaluate_function_from_segmentation(predictor, datalist)


def target_columns(targets: Sequence[str] = EF_TARGETS) -> Callable[[Tensor], dict[str, float]]:
    """The prediction columns of one subject's regression output, for
    :func:`~medssl.tasks.image_level.predict_folder` (which writes them beside the file and its ED/ES frames).

    Args:
        targets: the names of the network's outputs.

    Returns:
        ``values [K] -> {target: value, ...}``, e.g. ``{"lv_ef_pct": 61.2, "rv_ef_pct": 50.3}``.
    """
    return lambda values: dict(zip(targets, values.tolist()))
