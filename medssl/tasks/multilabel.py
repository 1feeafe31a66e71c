"""Multi-label chest X-ray classification: BCE-with-logits training, per-finding and mean AUROC, folder inference.

Xiao et al. (2023, "Delving into Masked Autoencoders for Multi-Label Thorax Disease Classification", WACV,
https://arxiv.org/abs/2210.12843) fine-tune a pre-trained ViT with a global-average-pooled head, one logit per finding
and the binary cross-entropy with logits summed over findings and averaged over images; they report the AUROC of each
finding and their mean (NIH ChestX-ray14). The network is :class:`~medssl.tasks.image_level.ImageLevelNetwork` with
one input channel; a finding's probability is the sigmoid of its logit. AUROC is
:func:`~medssl.tasks.classification.roc_auc` (Mann-Whitney form); a finding without both positive and negative
images in the evaluated set has none, and the mean is over the findings that have one.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import DataLoader, Dataset
from torch import Tensor, nn

from medssl.data.cxr import (
    CXR_VIEW,
    FILE_KEY,
    LABEL_KEY,
    evaluation_transforms,
    radiograph_folder_files,
    read_radiograph,
)
from medssl.errors import DataError
from medssl.tasks.classification import roc_auc
from medssl.tasks.finetune import _write_csv, report_evaluation
from medssl.tasks.image_level import write_predictions

__all__ = [
    "multilabel_loss",
    "multilabel_metrics",
    "predict_probabilities",
    "evaluate_multilabel",
    "report_multilabel",
    "predict_radiograph_folder",
]

logger = logging.getLogger(__name__)


class _MultiHotBCEWithLogits(nn.BCEWithLogitsLoss):
    """``nn.BCEWithLogitsLoss`` that checks shapes (a ``[B]`` target would silently broadcast) and casts the target."""

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        if logits.ndim != 2 or target.shape != logits.shape:
            raise ValueError(
                f"logits {tuple(logits.shape)} and multi-hot targets {tuple(target.shape)} must both be [B, K]."
            )
        return super().forward(logits, target.to(logits.dtype))


def multilabel_loss(pos_weight: Sequence[float] | None = None) -> nn.Module:
    """Binary cross-entropy with logits over the findings, averaged over images and findings (Xiao et al., 2023).

    Args:
        pos_weight: optional ``[K]`` weight of the positive term per finding (e.g. negatives / positives); None
            weighs both terms equally, as Xiao et al.

    Returns:
        ``loss(logits [B, K], multi-hot [B, K]) -> Tensor[]``; it raises ValueError for other shapes.
    """
    weight = None if pos_weight is None else torch.as_tensor(pos_weight, dtype=torch.float32)
    return _MultiHotBCEWithLogits(pos_weight=weight)


def multilabel_metrics(
    labels: np.ndarray | Sequence[Sequence[float]], probabilities: np.ndarray | Tensor, findings: Sequence[str]
) -> dict[str, float]:
    """AUROC of every finding and their mean.

    Args:
        labels: ``[N, K]`` multi-hot truth.
        probabilities: ``[N, K]`` scores (probabilities or logits), higher = more likely present.
        findings: ``K`` finding names.

    Returns:
        ``{"auroc_mean", "auroc_<finding>", ...}``; a finding that is present in all or none of the images has NaN,
        and the mean is over the defined ones (NaN when none is).

    Raises:
        ValueError: when the arrays are not both ``[N, K]`` with ``N`` >= 1.
    """
    truth = np.asarray(labels, dtype=np.float64)
    scores = np.asarray(probabilities, dtype=np.float64)
    if truth.ndim != 2 or truth.shape != scores.shape or truth.shape[1] != len(findings) or truth.shape[0] < 1:
        raise ValueError(
            f"labels {truth.shape} and probabilities {scores.shape} must both be [N >= 1, K={len(findings)}]."
        )
    aurocs = {f"auroc_{name}": roc_auc(scores[:, k], truth[:, k] > 0.5) for k, name in enumerate(findings)}
    defined = [value for value in aurocs.values() if math.isfinite(value)]
    return {"auroc_mean": float(np.mean(defined)) if defined else math.nan, **aurocs}


@torch.no_grad()
def _sigmoid_outputs(
    network: nn.Module, samples: Sequence[Mapping[str, Any]], batch_size: int, device: torch.device | str | None
) -> Tensor:
    """``sigmoid(network(images))`` over samples holding ``[1, H, W]`` images under ``cxr``, in order, eval mode."""
    device = torch.device(device) if device is not None else next(network.parameters()).device
    was_training = network.training
    network.eval()
    try:
        outputs = [
            torch.sigmoid(network(batch[CXR_VIEW].to(device)).float()).cpu()
            for batch in DataLoader(samples, batch_size=batch_size, shuffle=False, num_workers=0)
        ]
    finally:
        network.train(was_training)
    return torch.cat(outputs)


def predict_probabilities(
    network: nn.Module,
    items: Sequence[Mapping[str, Any]],
    image_size: Sequence[int],
    batch_size: int = 16,
    device: torch.device | str | None = None,
) -> Tensor:
    """Finding probabilities of radiographs, in item order (evaluation transforms, network in eval mode).

    Args:
        network: ``network(images [B, 1, H, W]) -> logits [B, K]``.
        items: ``{"cxr": path, ...}`` per image.
        image_size: ``(H, W)`` of the network's input.
        batch_size: images per forward pass.
        device: where to run; default the network's device.

    Returns:
        ``[N, K]`` float32 sigmoid probabilities on the CPU.

    Raises:
        DataError: when ``items`` is empty.
        RuntimeError: when an image cannot be read (MONAI wraps the :class:`~medssl.errors.DataError` naming it).
    """
    if not items:
        raise DataError("nothing to predict: the data list is empty.")
    dataset = Dataset([{CXR_VIEW: item[CXR_VIEW]} for item in items], evaluation_transforms(image_size))
    return _sigmoid_outputs(network, dataset, batch_size, device)


def _probability_columns(probabilities: Tensor, findings: Sequence[str]) -> dict[str, float]:
    return {f"prob_{name}": float(p) for name, p in zip(findings, probabilities.tolist())}


def evaluate_multilabel(
    network: nn.Module,
    items: Sequence[Mapping[str, Any]],
    image_size: Sequence[int],
    findings: Sequence[str],
    batch_size: int = 16,
) -> list[dict[str, Any]]:
    """Predict labelled radiographs: one row per image with its truth and probabilities.

    Args:
        network: ``network(images) -> logits [B, K]``.
        items: from :func:`~medssl.data.cxr.load_cxr_datalist` (``cxr`` and ``label``).
        image_size: ``(H, W)`` of the network's input.
        findings: ``K`` finding names, in label order.
        batch_size: images per forward pass.

    Returns:
        ``{"image": index, "true_<finding>": 0/1, ..., "prob_<finding>": probability, ...}`` per image (no paths).

    Raises:
        DataError: when ``items`` is empty, lacks labels or has labels of another length than ``findings``.
    """
    if not items or any(len(np.atleast_1d(item.get(LABEL_KEY, ()))) != len(findings) for item in items):
        raise DataError(
            f"the evaluation items are empty or lack multi-hot labels over {list(findings)}: build them with "
            "medssl.data.cxr.load_cxr_datalist."
        )
    probabilities = predict_probabilities(network, items, image_size, batch_size)
    return [
        {
            "image": index,
            **{f"true_{name}": int(value) for name, value in zip(findings, np.asarray(item[LABEL_KEY]).tolist())},
            **_probability_columns(row, findings),
        }
        for index, (item, row) in enumerate(zip(items, probabilities))
    ]


def report_multilabel(
    rows: Sequence[Mapping[str, Any]],
    run_dir: str | os.PathLike,
    findings: Sequence[str],
    experiment_name: str = "medssl",
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """Score an evaluation's rows and write and log them (:func:`~medssl.tasks.finetune.report_evaluation`).

    Writes ``<run_dir>/evaluation/metrics.csv`` (the rows) and ``summary.json``, and logs ``eval_auroc_mean`` and
    ``eval_auroc_<finding>`` (those defined) with the CSV into the run folder's MLflow run.

    Args:
        rows: from :func:`evaluate_multilabel`.
        run_dir: the run folder.
        findings: finding names.
        experiment_name: MLflow experiment when the folder has no run yet.
        tracking_uri: MLflow store (default: the run folder's).

    Returns:
        the evaluation summary (``metrics``, ``num_rows``, ``csv``, ``run_id``).

    Raises:
        DataError: when ``rows`` is empty or lacks a finding's columns.
    """
    if not rows:
        raise DataError("nothing was evaluated: the evaluation data list is empty.")
    missing = [name for name in findings if f"true_{name}" not in rows[0] or f"prob_{name}" not in rows[0]]
    if missing:
        raise DataError(f"evaluation rows have no true_/prob_ columns for {missing}.")
    truth = np.array([[row[f"true_{name}"] for name in findings] for row in rows], dtype=np.float64)
    probabilities = np.array([[row[f"prob_{name}"] for name in findings] for row in rows], dtype=np.float64)
    # Every column describes one image: the cohort AUROCs are the summary, not means of columns.
    return report_evaluation(
        rows,
        run_dir,
        id_columns=list(dict.fromkeys(column for row in rows for column in row)),
        experiment_name=experiment_name,
        tracking_uri=tracking_uri,
        cohort_metrics=multilabel_metrics(truth, probabilities, findings),
    )


def predict_radiograph_folder(
    network: nn.Module,
    input_dir: str | os.PathLike | None,
    output_dir: str | os.PathLike,
    findings: Sequence[str],
    image_size: Sequence[int],
    min_size: int | Sequence[int] | None = None,
    body_part: str | None = "CHEST",
    batch_size: int = 16,
) -> list[Path]:
    """Predict every readable radiograph of a folder; report and skip the others.

    Each candidate file (:func:`~medssl.data.cxr.radiograph_folder_files`) is read first; one that is not a
    greyscale chest radiograph of at least ``min_size`` (a colour or non-chest DICOM, a tiny image, a non-image) is
    logged with the reason and listed in ``skipped.csv``, and the others are predicted.

    Args:
        network: ``network(images [B, 1, H, W]) -> logits [B, K]``.
        input_dir: folder of PNG / JPEG / DICOM files (searched recursively).
        output_dir: where ``predictions.csv``, ``predictions.json`` (``file`` relative to ``input_dir`` and
            ``prob_<finding>`` per image) and, when files were skipped, ``skipped.csv`` (``file``, ``reason``) go.
        findings: ``K`` finding names.
        image_size: ``(H, W)`` of the network's input.
        min_size: smallest accepted source image, e.g. the patch grid.
        body_part: expected DICOM BodyPartExamined.
        batch_size: images per forward pass.

    Returns:
        the written paths.

    Raises:
        DataError: when the folder is missing or empty, or no file in it could be predicted (the message lists the
            reasons).
    """
    root = Path(input_dir) if input_dir is not None else None
    resize = evaluation_transforms(image_size, load=False)
    samples, skipped = [], []
    for path in radiograph_folder_files(root):
        relative = path.relative_to(root).as_posix()  # type: ignore[union-attr]
        try:
            image = read_radiograph(path, min_size, body_part)
        except DataError as error:
            logger.warning(f"skipped {relative}: {error}")
            skipped.append({FILE_KEY: relative, "reason": str(error)})
            continue
        samples.append({**resize({CXR_VIEW: torch.from_numpy(image)[None]}), FILE_KEY: relative})
    written, skipped_csv = [], Path(output_dir) / "skipped.csv"
    if skipped:
        written.append(_write_csv(skipped, skipped_csv))
    else:
        skipped_csv.unlink(missing_ok=True)  # from an earlier run on this output folder
    if not samples:
        reasons = "; ".join(entry["reason"] for entry in skipped[:5])
        raise DataError(f"no file in {input_dir} could be predicted ({len(skipped)} skipped: {reasons}).")
    probabilities = _sigmoid_outputs(network, [{CXR_VIEW: s[CXR_VIEW]} for s in samples], batch_size, None)
    rows = [{FILE_KEY: s[FILE_KEY], **_probability_columns(p, findings)} for s, p in zip(samples, probabilities)]
    return write_predictions(rows, output_dir) + written
