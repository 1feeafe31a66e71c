"""Cardiac disease classification from the ED and ES SAX frames: labels, metrics, evaluation, figure, inference.

The five ACDC groups (Bernard et al., 2018, https://doi.org/10.1109/TMI.2018.2837502): normal (NOR), dilated
cardiomyopathy (DCM), hypertrophic cardiomyopathy (HCM), previous myocardial infarction (MINF) and abnormal right
ventricle (ARV), classified by :class:`~medssl.tasks.image_level.ImageLevelNetwork` from the ED + ES two-channel SAX
image as in CineMA (Fu et al., 2025, https://arxiv.org/abs/2506.00679; cross-entropy with label smoothing 0.1).
Metrics as CineMA reports them: accuracy, macro-F1, Matthews correlation coefficient (multi-class form, Gorodkin,
2004, https://doi.org/10.1016/j.compbiolchem.2004.09.006) and one-vs-rest ROC AUC (Mann-Whitney form, Hanley and
McNeil, 1982, https://doi.org/10.1148/radiology.143.1.7063747), with the confusion matrix as a figure. Folders of
NIfTI cines are classified by :func:`~medssl.tasks.image_level.predict_folder` with :func:`probability_columns`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from scipy.stats import rankdata
from torch import Tensor, nn

from medssl.data.cine import SAX_VIEW
from medssl.data.cine_labelled import SegmentationView
from medssl.data.cine_phases import cine_phase_datalist
from medssl.engine.checkpoints import atomic_write
from medssl.errors import DataError
from medssl.tasks.finetune import report_evaluation
from medssl.tasks.image_level import predict_phases

__all__ = [
    "DISEASE_CLASSES",
    "LABEL_KEY",
    "disease_items",
    "confusion_matrix",
    "roc_auc",
    "classification_metrics",
    "confusion_matrix_figure",
    "evaluate_classification",
    "report_classification",
    "probability_columns",
]

#: The ACDC disease groups, by class index.
DISEASE_CLASSES = ("NOR", "DCM", "HCM", "MINF", "ARV")
#: Key of a sample's class index.
LABEL_KEY = "label"
_GROUP = "group"


def disease_items(
    datalist: Sequence[Mapping[str, str]], classes: Sequence[str] = DISEASE_CLASSES, view: str = SAX_VIEW
) -> list[dict[str, Any]]:
    """Training / evaluation items with their class index, from each subject's metadata ``group``.

    Args:
        datalist: ``{view: path, "metadata": path}`` per subject (``load_cine_datalist(source, [view],
            metadata=True)``).
        classes: class names by index.
        view: the image key.

    Returns:
        ``{view: path, "ed_frame", "es_frame", "label": class index}`` per subject.

    Raises:
        DataError: when a subject has no metadata, no group, or a group outside ``classes`` (naming the subject's
            position and the known classes).
    """
    items = cine_phase_datalist(datalist, (_GROUP,), view)
    for index, item in enumerate(items):
        group = item.pop(_GROUP)
        if group not in classes:
            raise DataError(
                f"subject #{index} has disease group {group!r}, which is not one of the classes {list(classes)}; "
                "fix its metadata.json or pass the bundle's class_names."
            )
        item[LABEL_KEY] = list(classes).index(group)
    return items


def _check_labels(true: np.ndarray, predicted: np.ndarray, num_classes: int) -> None:
    if true.ndim != 1 or true.shape != predicted.shape or true.size == 0:
        raise ValueError(f"true {true.shape} and predicted {predicted.shape} must be equal, non-empty 1-D arrays.")
    for name, values in (("true", true), ("predicted", predicted)):
        if values.min() < 0 or values.max() >= num_classes:
            shown = sorted(set(values.tolist()))
            raise ValueError(f"{name} class indices must be in 0..{num_classes - 1}, got {shown}.")


def confusion_matrix(true: Sequence[int], predicted: Sequence[int], num_classes: int) -> np.ndarray:
    """Counts of (true, predicted) class pairs.

    Args:
        true: ``[N]`` class indices.
        predicted: ``[N]`` class indices.
        num_classes: ``K``.

    Returns:
        int64 ``[K, K]``: row = true class, column = predicted class.

    Raises:
        ValueError: for arrays of different or zero length, or indices outside ``0 .. K - 1``.
    """
    true, predicted = np.asarray(true, dtype=np.int64), np.asarray(predicted, dtype=np.int64)
    _check_labels(true, predicted, num_classes)
    return np.bincount(true * num_classes + predicted, minlength=num_classes**2).reshape(num_classes, num_classes)


def roc_auc(scores: Sequence[float], positive: Sequence[bool]) -> float:
    """Area under the ROC curve: the probability that a positive scores above a negative (ties count half).

    Computed from ranks (the Mann-Whitney U statistic divided by ``n_pos * n_neg``; ties get their average rank).

    Args:
        scores: ``[N]`` scores, higher = more likely positive.
        positive: ``[N]`` whether each item is positive.

    Returns:
        the AUC in [0, 1]; NaN when there is no positive or no negative.

    Raises:
        ValueError: when the lengths differ.
    """
    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(positive, dtype=bool)
    if scores.shape != positive.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape} and positive {positive.shape} must be equal 1-D arrays.")
    num_positive = int(positive.sum())
    num_negative = positive.size - num_positive
    if num_positive == 0 or num_negative == 0:
        return math.nan
    ranks = rankdata(scores)
    u = ranks[positive].sum() - num_positive * (num_positive + 1) / 2
    return float(u / (num_positive * num_negative))


def classification_metrics(
    true: Sequence[int], probabilities: np.ndarray | Tensor, classes: Sequence[str] = DISEASE_CLASSES
) -> dict[str, float]:
    """Accuracy, macro-F1, multi-class MCC and one-vs-rest ROC AUC of class probabilities.

    Args:
        true: ``[N]`` class indices.
        probabilities: ``[N, K]`` class probabilities (or any scores); the prediction is the arg-max.
        classes: ``K`` class names.

    Returns:
        ``accuracy``; ``macro_f1`` (mean F1 over the classes that occur in the truth or the predictions; F1 =
        2TP / (2TP + FP + FN)); ``mcc`` (Gorodkin's multi-class form, 0 when undefined); ``auroc_<class>`` per class
        (NaN when the class is absent or the only one) and ``auroc_macro`` (their mean over defined values, NaN when
        none).

    Raises:
        ValueError: for probabilities that are not ``[N, K]`` or labels outside ``0 .. K - 1``.
    """
    scores = np.asarray(probabilities, dtype=np.float64)
    num_classes = len(classes)
    true = np.asarray(true, dtype=np.int64)
    if scores.ndim != 2 or scores.shape != (true.size, num_classes):
        raise ValueError(f"probabilities must be [N={true.size}, K={num_classes}], got shape {scores.shape}.")
    predicted = scores.argmax(axis=1)
    matrix = confusion_matrix(true, predicted, num_classes).astype(np.float64)
    tp = np.diag(matrix)
    fp, fn = matrix.sum(0) - tp, matrix.sum(1) - tp
    occurring = (tp + fp + fn) > 0
    f1 = 2 * tp[occurring] / (2 * tp[occurring] + fp[occurring] + fn[occurring])
    total, correct = matrix.sum(), tp.sum()
    predicted_counts, true_counts = matrix.sum(0), matrix.sum(1)
    denominator = math.sqrt((total**2 - (predicted_counts**2).sum()) * (total**2 - (true_counts**2).sum()))
    mcc = (correct * total - (predicted_counts * true_counts).sum()) / denominator if denominator > 0 else 0.0
    aurocs = {f"auroc_{name}": roc_auc(scores[:, k], true == k) for k, name in enumerate(classes)}
    defined = [value for value in aurocs.values() if math.isfinite(value)]
    return {
        "accuracy": float(correct / total),
        "macro_f1": float(f1.mean()),
        "mcc": float(mcc),
        "auroc_macro": float(np.mean(defined)) if defined else math.nan,
        **aurocs,
    }


def confusion_matrix_figure(matrix: np.ndarray, classes: Sequence[str], path: str | os.PathLike) -> Path:
    """Draw a confusion matrix with its counts written in the cells, as a PNG (atomically).

    Args:
        matrix: ``[K, K]`` counts, row = true class, column = predicted class.
        classes: ``K`` class names.
        path: the PNG file.

    Returns:
        the written path.

    Raises:
        ValueError: when ``matrix`` is not ``[K, K]``.
    """
    matrix = np.asarray(matrix)
    if matrix.shape != (len(classes), len(classes)):
        size = len(classes)
        raise ValueError(f"matrix must be [{size}, {size}] for classes {list(classes)}, got {matrix.shape}.")
    # A bare Figure (no pyplot): no global state and no display backend, on servers and in tests alike.
    figure = Figure(figsize=(1.1 * len(classes) + 2, 1.1 * len(classes) + 1.5))
    axes = figure.subplots()
    axes.imshow(matrix, cmap="Blues", vmin=0, vmax=max(int(matrix.max()), 1))
    ticks = np.arange(len(classes))
    axes.set_xticks(ticks, labels=list(classes))
    axes.set_yticks(ticks, labels=list(classes))
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title(f"confusion matrix ({int(matrix.sum())} subjects)")
    threshold = matrix.max() / 2
    for (row, column), count in np.ndenumerate(matrix):
        colour = "white" if count > threshold else "black"
        axes.text(column, row, str(int(count)), ha="center", va="center", color=colour)
    figure.tight_layout()
    return atomic_write(Path(path), lambda temporary: figure.savefig(temporary, format="png", dpi=100))


def evaluate_classification(
    network: nn.Module,
    items: Sequence[Mapping[str, Any]],
    view: SegmentationView,
    classes: Sequence[str] = DISEASE_CLASSES,
    centre: str = "heart",
    batch_size: int = 4,
) -> list[dict[str, Any]]:
    """Classify labelled subjects.

    Args:
        network: ``network(images) -> [B, K]`` logits.
        items: from :func:`disease_items`.
        view: the SAX geometry of the network's input.
        classes: class names by index.
        centre: window centring, as in training.
        batch_size: subjects per forward pass.

    Returns:
        one row per subject: ``{"subject": index, "ed_frame", "es_frame", "true", "predicted", "prob_<class>"...}``
        (class names; no identifiers).

    Raises:
        DataError: when ``items`` is empty or lacks labels, or a cine is unreadable.
    """
    if not items or any(LABEL_KEY not in item for item in items):
        raise DataError("the evaluation items are empty or lack class labels: build them with disease_items.")
    logits, frames = predict_phases(network, items, view, centre, batch_size)
    probabilities = torch.softmax(logits, dim=1)
    return [
        {
            "subject": index,
            **used,
            "true": classes[item[LABEL_KEY]],
            **_prediction_columns(row, classes),
        }
        for index, (item, used, row) in enumerate(zip(items, frames, probabilities))
    ]


def _prediction_columns(probabilities: Tensor, classes: Sequence[str]) -> dict[str, Any]:
    return {
        "predicted": classes[int(probabilities.argmax())],
        **{f"prob_{name}": float(p) for name, p in zip(classes, probabilities.tolist())},
    }


def probability_columns(classes: Sequence[str] = DISEASE_CLASSES) -> Callable[[Tensor], dict[str, Any]]:
    """The prediction columns of one subject's logits, for :func:`~medssl.tasks.image_level.predict_folder`.

    Args:
        classes: class names by index.

    Returns:
        ``logits [K] -> {"predicted": class name, "prob_<class>": softmax probability, ...}``.
    """
    return lambda logits: _prediction_columns(torch.softmax(logits, dim=0), classes)


def report_classification(
    rows: Sequence[Mapping[str, Any]],
    run_dir: str | os.PathLike,
    classes: Sequence[str] = DISEASE_CLASSES,
    experiment_name: str = "medssl",
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """Score an evaluation's rows, draw the confusion matrix, and write and log everything.

    Writes ``<run_dir>/evaluation/metrics.csv`` (the rows), ``summary.json`` and ``confusion_matrix.png``, and logs
    ``eval_accuracy``, ``eval_macro_f1``, ``eval_mcc``, ``eval_auroc_macro``, ``eval_auroc_<class>`` and the two files
    into the run folder's MLflow run (:func:`~medssl.tasks.finetune.report_evaluation`).

    Args:
        rows: from :func:`evaluate_classification`.
        run_dir: the run folder.
        classes: class names by index.
        experiment_name: MLflow experiment when the folder has no run yet.
        tracking_uri: MLflow store (default: the run folder's).

    Returns:
        the evaluation summary (``metrics``, ``num_rows``, ``csv``, ``run_id``).

    Raises:
        DataError: when ``rows`` is empty or names a class outside ``classes``.
    """
    if not rows:
        raise DataError("nothing was evaluated: the evaluation data list is empty.")
    names = list(classes)
    unknown = sorted({row[key] for row in rows for key in ("true", "predicted")} - set(names))
    if unknown:
        raise DataError(f"evaluation rows name classes {unknown} outside {names}.")
    true = [names.index(row["true"]) for row in rows]
    probabilities = np.array([[row[f"prob_{name}"] for name in names] for row in rows])
    metrics = classification_metrics(true, probabilities, names)
    matrix = confusion_matrix(true, probabilities.argmax(axis=1), len(names))
    figure = confusion_matrix_figure(matrix, names, Path(run_dir) / "evaluation" / "confusion_matrix.png")
    # Every column describes one subject (frames, classes, probabilities): the cohort metrics are the summary.
    return report_evaluation(
        rows,
        run_dir,
        id_columns=list(dict.fromkeys(column for row in rows for column in row)),
        experiment_name=experiment_name,
        tracking_uri=tracking_uri,
        cohort_metrics=metrics,
        artifacts={"figures": figure},
    )
