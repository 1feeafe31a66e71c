"""Unsupervised anomaly detection on radiographs with a masked autoencoder: data, the exported map network, the
synthetic benchmark (image- and pixel-level AUROC, overlays) and folder inference.

The scoring is MemMC-MAE's (Tian et al., 2023, https://arxiv.org/abs/2203.11725): reconstruction error under several
random masks, :func:`medssl.methods.memmc_mae.anomaly_maps`. The benchmark is the anomaly mode of
:mod:`medssl.data.cxr_phantom` (normal training images; test images alternate normal ones and ones with inserted
lesions, with a lesion mask).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from monai.networks.layers.convutils import gaussian_1d
from monai.networks.layers.simplelayers import separable_filtering
from PIL import Image
from torch import Tensor, nn

from medssl.errors import DataError
from medssl.methods.mae import MultiViewMAE
from medssl.methods.memmc_mae import image_scores, reconstruction_error_maps
from medssl.tasks.finetune import report_evaluation
from medssl.tasks.image_level import write_predictions

__all__ = [
    "IMAGE_SUFFIXES",
    "read_radiograph",
    "anomaly_datalist",
    "RadiographDataset",
    "AnomalyMapNetwork",
    "REFERENCE_FILE",
    "normal_error_reference",
    "calibrate_anomaly_network",
    "with_error_reference",
    "roc_auc",
    "overlay_figure",
    "evaluate_anomaly",
    "report_anomaly",
    "predict_anomaly_folder",
]

IMAGE_SUFFIXES = (".png", ".dcm")
_TRUNCATE = 4.0  # Gaussian kernel radius of the map smoothing, in sigmas
logger = logging.getLogger(__name__)


def _read_pixels(path: Path) -> np.ndarray:
    """A radiograph file as float32 ``[H, W]`` in [0, 1], bright = attenuating."""
    if path.suffix.lower() == ".dcm":
        from medssl.io.dx_read import read_dx  # pydicom is an optional extra

        return read_dx(path).image
    try:
        with Image.open(path) as image:
            if image.mode not in ("L", "I;16", "I"):
                raise DataError(f"{path.name}: expected a greyscale PNG, got mode {image.mode}")
            pixels = np.asarray(image)
    except OSError as error:
        raise DataError(f"{path.name}: not a readable image ({type(error).__name__})") from error
    return pixels.astype(np.float32) / (255.0 if pixels.dtype == np.uint8 else 65535.0)


def read_radiograph(path: str | os.PathLike, image_size: Sequence[int], patch_size: Sequence[int]) -> Tensor:
    """Read a greyscale PNG (8 or 16 bit) or DX/CR DICOM radiograph and resize it to the network's input.

    Args:
        path: ``.png`` or ``.dcm`` file (DICOM through :func:`medssl.io.dx_read.read_dx`: VOI LUT, MONOCHROME1
            inverted).
        image_size: the network's ``(H, W)``.
        patch_size: its patch size, ``(p_h, p_w)``.

    Returns:
        float32 ``[1, H, W]`` in [0, 1] (bilinear, antialiased resampling).

    Raises:
        DataError: for an unreadable or colour file, or an image with fewer pixels per axis than the network has
            patches (naming both sizes).
    """
    path = Path(path)
    pixels = _read_pixels(path)
    grid = [size // patch for size, patch in zip(image_size, patch_size)]
    if pixels.ndim != 2 or any(have < need for have, need in zip(pixels.shape, grid)):
        raise DataError(
            f"{path.name}: image of shape {tuple(pixels.shape)} is smaller than the {grid[0]}x{grid[1]} patch grid "
            f"of the {image_size[0]}x{image_size[1]} network ({patch_size[0]}x{patch_size[1]}-pixel patches)."
        )
    image = torch.from_numpy(np.ascontiguousarray(pixels))[None, None]
    resized = F.interpolate(image, size=tuple(image_size), mode="bilinear", align_corners=False, antialias=True)
    return resized[0].clamp(0.0, 1.0)


def _read_mask(path: Path, image_size: Sequence[int]) -> Tensor:
    with Image.open(path) as image:
        mask = torch.from_numpy(np.asarray(image) > 0)[None, None].float()
    return F.interpolate(mask, size=tuple(image_size), mode="nearest")[0, 0] > 0


def anomaly_datalist(source: str | os.PathLike, split: str = "test") -> list[dict[str, Any]]:
    """The entries of an anomaly-mode chest radiograph manifest (:func:`medssl.data.cxr_phantom.ensure_cxr_cohort`).

    Args:
        source: ``manifest.json`` or the folder holding it.
        split: ``"training"`` or ``"test"``.

    Returns:
        One ``{"image": path, "label": 0 | 1, "mask": path | None}`` per entry (absolute paths).

    Raises:
        DataError: for a missing or malformed manifest or an empty split.
    """
    path = Path(source)
    path = path / "manifest.json" if path.is_dir() else path
    if not path.is_file():
        raise DataError(f"no anomaly manifest at {path}")
    try:
        manifest = json.loads(path.read_text())
        entries = manifest[split]
        items = [
            {
                "image": str(path.parent / entry["image"]),
                "label": int(entry.get("label", 0)),
                "mask": str(path.parent / entry["mask"]) if entry.get("mask") else None,
            }
            for entry in entries
        ]
    except (ValueError, KeyError, TypeError) as error:
        raise DataError(f"{path.name}: not an anomaly manifest with a {split!r} list ({error!r})") from error
    if not items:
        raise DataError(f"{path.name}: the {split!r} split is empty")
    return items


class RadiographDataset(torch.utils.data.Dataset):
    """Radiographs read once into memory, as ``{"image": [1, H, W]}`` samples (the masked autoencoders' batch key).

    Args:
        datalist: items with an ``"image"`` path (e.g. from :func:`anomaly_datalist`).
        image_size: network input ``(H, W)``.
        patch_size: network patch size.

    Raises:
        DataError: as :func:`read_radiograph`, or for an empty datalist.
    """

    def __init__(self, datalist: Sequence[Mapping[str, Any]], image_size: Sequence[int], patch_size: Sequence[int]):
        if not datalist:
            raise DataError("no radiograph to train on: the datalist is empty.")
        self.images = [read_radiograph(item["image"], image_size, patch_size) for item in datalist]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"image": self.images[index]}


class AnomalyMapNetwork(nn.Module):
    """A trained single-view masked autoencoder as a deterministic image -> anomaly map network (for export).

    The patch orders of the ``num_masks`` masks are drawn once from ``seed`` (a non-persistent buffer: the state
    dict is the model's, under ``model.``), so every call, batch and traced copy scores an image the same way.

    Without a reference the map is the raw squared reconstruction error. With one (:meth:`set_reference`, from
    :func:`normal_error_reference`) it is that error standardised per pixel by its mean and spread over normal images,
    so places every normal image reconstructs badly (image borders, collimation edges, the spine) stop dominating the
    map and the score. The reference is a non-persistent buffer: the weights file stays the model's own.

    With ``smooth_sigma`` > 0 the map is then smoothed by a Gaussian of that many pixels (MONAI's separable filter,
    mirrored edges), as reconstruction-based detectors usually do: a lesion's error is a blob, while an anatomical
    edge the model renders slightly off gives thin lines of error that smoothing spreads out.

    Args:
        model: :class:`~medssl.methods.memmc_mae.MemMCMAE` or ``MaskedAutoencoder`` (one view); kept in eval mode.
        num_masks: masks per image (>= 2).
        seed: seed of the patch orders.
        smooth_sigma: Gaussian smoothing of the map in pixels (0: none).

    Raises:
        ValueError: for a multi-view model, ``num_masks`` < 2, or a negative ``smooth_sigma`` or one whose kernel
            (4 sigma each side) does not fit in the image.
    """

    def __init__(self, model: MultiViewMAE, num_masks: int = 8, seed: int = 0, smooth_sigma: float = 0.0) -> None:
        super().__init__()
        if len(model.views) != 1 or num_masks < 2:
            raise ValueError(f"need a single-view model and num_masks >= 2, got {list(model.views)} and {num_masks}.")
        self.model = model.eval()
        self.num_masks = int(num_masks)
        spec = next(iter(model.views.values()))
        self.image_size, self.patch_size = spec.image_size, spec.patch_size
        per_round = max(1, spec.num_tokens // model.masking[next(iter(model.views))].num_keep(spec.grid))
        generator = torch.Generator().manual_seed(seed)
        noise = torch.rand(math.ceil(num_masks / per_round), spec.num_tokens, generator=generator)
        self.register_buffer("orders", noise.argsort(dim=1), persistent=False)
        self.register_buffer("error_mean", torch.zeros(1, 1, *self.image_size), persistent=False)
        self.register_buffer("error_scale", torch.ones(1, 1, *self.image_size), persistent=False)
        self.has_reference = False
        self.smooth_sigma = float(smooth_sigma)
        radius = math.ceil(_TRUNCATE * self.smooth_sigma)
        if self.smooth_sigma < 0 or radius >= min(self.image_size):
            raise ValueError(f"smooth_sigma must be >= 0 with a kernel radius (4 sigma = {radius} px) below the image "
                             f"size {list(self.image_size)}, got {smooth_sigma}.")
        kernel = None
        if self.smooth_sigma > 0:
            kernel = gaussian_1d(torch.tensor(self.smooth_sigma), truncated=_TRUNCATE, approx="sampled")
            kernel = kernel / kernel.sum()
        self.register_buffer("smoothing", kernel, persistent=False)

    def set_reference(self, reference: Mapping[str, Tensor]) -> AnomalyMapNetwork:
        """Standardise the maps by a normal-error reference ``{"mean": [1, 1, H, W], "scale": [1, 1, H, W]}``.

        Raises:
            DataError: when the reference maps do not have this network's image size or a scale is not positive.
        """
        mean, scale = reference.get("mean"), reference.get("scale")
        expected = (1, 1, *self.image_size)
        if mean is None or scale is None or tuple(mean.shape) != expected or tuple(scale.shape) != expected:
            raise DataError(
                f"the normal-error reference must hold 'mean' and 'scale' maps of shape {list(expected)}, got "
                f"{ {key: list(value.shape) for key, value in reference.items()} }."
            )
        if not bool((scale > 0).all()):
            raise DataError("the normal-error reference has a non-positive scale.")
        self.error_mean.copy_(mean)
        self.error_scale.copy_(scale)
        self.has_reference = True
        return self

    def train(self, mode: bool = True) -> AnomalyMapNetwork:
        """Stay in eval mode: the maps are an inference product (no dropout or drop path)."""
        return super().train(False)

    def forward(self, image: Tensor) -> Tensor:
        """Args: image ``[B, C, *image_size]``. Returns: the anomaly map ``[B, 1, *image_size]``."""
        errors = reconstruction_error_maps(self.model, image, self.num_masks, orders=self.orders)
        maps = (errors - self.error_mean) / self.error_scale
        if self.smoothing is not None:
            kernel = self.smoothing.to(maps.dtype)
            maps = separable_filtering(maps, [kernel] * len(self.image_size), mode="reflect")
        return maps


REFERENCE_FILE = "error_reference.safetensors"
"""Name of the normal-error reference beside a run's weights (``<run_dir>/models/``)."""


@torch.no_grad()
def normal_error_reference(
    network: AnomalyMapNetwork,
    datalist: Sequence[Mapping[str, Any]],
    batch_size: int = 8,
    max_images: int = 64,
    floor: float = 0.1,
) -> dict[str, Tensor]:
    """Per-pixel mean and spread of the raw reconstruction error over normal images.

    Args:
        network: the map network (its current reference is ignored).
        datalist: normal images (``{"image": path}``), e.g. the training split of the anomaly cohort.
        batch_size: images per forward pass.
        max_images: the first this many images are used (>= 2).
        floor: the scale is ``std + floor * mean(std)``, so pixels no normal image ever gets wrong (outside the
            collimation) cannot turn a tiny error into a huge score.

    Returns:
        ``{"mean": [1, 1, H, W], "scale": [1, 1, H, W]}`` (float32, CPU).

    Raises:
        DataError: for fewer than two images, or as :func:`read_radiograph`.
    """
    items = list(datalist)[: max(2, int(max_images))]
    if len(items) < 2:
        raise DataError(f"a normal-error reference needs at least 2 normal images, got {len(items)}.")
    device = next(network.parameters()).device
    maps = []
    for start in range(0, len(items), batch_size):
        images = torch.stack([read_radiograph(item["image"], network.image_size, network.patch_size)
                              for item in items[start : start + batch_size]])
        maps.append(reconstruction_error_maps(network.model, images.to(device), network.num_masks,
                                              orders=network.orders).float().cpu())
    stacked = torch.cat(maps)
    mean, std = stacked.mean(dim=0, keepdim=True), stacked.std(dim=0, keepdim=True)
    return {"mean": mean, "scale": std + floor * std.mean().clamp_min(1e-12)}


def calibrate_anomaly_network(
    network: AnomalyMapNetwork,
    normal_datalist: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    batch_size: int = 8,
    max_images: int = 64,
) -> AnomalyMapNetwork:
    """Compute the normal-error reference of ``network`` (:func:`normal_error_reference`), write it to ``path``
    (safetensors) for inference, and set it; returns the network.

    ``max_images=0`` turns the reference off: the maps stay raw errors and a reference file left at ``path`` by an
    earlier evaluation is removed, so inference scores the same way.
    """
    from safetensors.torch import save_file

    if int(max_images) == 0:
        Path(path).unlink(missing_ok=True)
        return network
    reference = normal_error_reference(network, normal_datalist, batch_size, max_images)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file({key: value.contiguous() for key, value in reference.items()}, str(path))
    return network.set_reference(reference)


def with_error_reference(network: AnomalyMapNetwork, path: str | os.PathLike | None) -> AnomalyMapNetwork:
    """Set the reference written by :func:`calibrate_anomaly_network` when ``path`` exists; otherwise keep the raw
    error maps and say so in the log. Returns the network.

    Raises:
        DataError: when the file is unreadable or its maps do not fit the network.
    """
    if path is None or not Path(path).is_file():
        logger.warning(
            f"no normal-error reference at {path}: scoring raw reconstruction errors (run evaluate.json once to write "
            "it)."
        )
        return network
    from safetensors.torch import load_file

    try:
        reference = load_file(str(path))
    except Exception as error:  # safetensors raises its own error types for damaged files
        raise DataError(f"cannot read the normal-error reference {Path(path).name}: {error}") from error
    return network.set_reference(reference)


def roc_auc(scores: Tensor, labels: Tensor) -> float:
    """Area under the ROC curve by the Mann-Whitney rank statistic, ties counted one half.

    Args:
        scores: ``[N]`` higher = more anomalous.
        labels: ``[N]`` 0/1 (or bool).

    Returns:
        AUROC in [0, 1]; NaN when only one class is present.
    """
    scores, labels = scores.flatten().double(), labels.flatten().bool()
    positives, negatives = int(labels.sum()), int((~labels).sum())
    if positives == 0 or negatives == 0:
        return float("nan")
    order = scores.argsort()
    _, inverse, counts = torch.unique_consecutive(scores[order], return_inverse=True, return_counts=True)
    # Mid-ranks (1-based) of tie groups: first rank of the group + (size - 1) / 2.
    starts = torch.cumsum(counts, 0) - counts + 1
    ranks = torch.empty_like(scores)
    ranks[order] = (starts + (counts - 1) / 2.0).double()[inverse]
    rank_sum = ranks[labels].sum().item()
    return (rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives)


def overlay_figure(
    image: Tensor, anomaly_map: Tensor, path: str | os.PathLike, mask: Tensor | None = None, title: str = ""
) -> Path:
    """Save the radiograph and its anomaly map overlaid (and the lesion outline when known) as a PNG.

    Args:
        image: ``[H, W]`` in [0, 1].
        anomaly_map: ``[H, W]``; drawn from 0 to its 99th percentile.
        path: the PNG.
        mask: optional ``[H, W]`` bool lesion mask, outlined in cyan.
        title: figure title.

    Returns:
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    values = anomaly_map.float().cpu().numpy()
    figure = Figure(figsize=(6, 3.2))
    axes = figure.subplots(1, 2)
    for axis in axes:
        axis.imshow(image.float().cpu().numpy(), cmap="gray", vmin=0, vmax=1)
        axis.set_axis_off()
    axes[1].imshow(values, cmap="inferno", alpha=0.55, vmin=0, vmax=max(float(np.percentile(values, 99)), 1e-8))
    if mask is not None and bool(mask.any()):
        for axis in axes:
            axis.contour(mask.cpu().numpy().astype(float), levels=[0.5], colors="cyan", linewidths=0.8)
    axes[0].set_title("image" + (" (lesion outlined)" if mask is not None and bool(mask.any()) else ""), fontsize=8)
    axes[1].set_title("anomaly map", fontsize=8)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    return path


@torch.no_grad()
def evaluate_anomaly(
    network: AnomalyMapNetwork,
    datalist: Sequence[Mapping[str, Any]],
    figure_dir: str | os.PathLike,
    top_fraction: float = 0.01,
    batch_size: int = 8,
    num_figures: int = 6,
    score_margin: int = 0,
) -> tuple[list[dict[str, Any]], dict[str, float], Path]:
    """Score the synthetic anomaly benchmark: image-level and pixel-level AUROC, per-image rows, overlays.

    Args:
        network: the map network (its model trained on normal images only).
        datalist: test items ``{"image", "label", "mask"}`` (:func:`anomaly_datalist`); a missing mask = no lesion.
        figure_dir: folder of the overlay PNGs ``anomaly_NNN.png`` (the first ``num_figures`` test images).
        top_fraction: the image score is the mean of this top fraction of the map (:func:`image_scores`).
        batch_size: images per forward pass.
        num_figures: overlays to draw.
        score_margin: pixels along each edge left out of the image score (:func:`image_scores`); the pixel-level
            AUROC always counts every pixel.

    Returns:
        ``(rows, metrics, figure_dir)``: one row ``{"image": index, "label", "score", "score_mean", "lesion_pct"}``
        per item; metrics ``image_auroc`` (from ``score``), ``image_auroc_mean`` (from the map mean) and
        ``pixel_auroc`` (every pixel of every test image; lesion pixels positive), NaN when a class is missing.

    Raises:
        DataError: for an empty datalist or unreadable files.
    """
    if not datalist:
        raise DataError("nothing to evaluate: the test datalist is empty.")
    device = next(network.parameters()).device
    size, patch = network.image_size, network.patch_size
    rows, pixel_scores, pixel_labels = [], [], []
    for start in range(0, len(datalist), batch_size):
        items = datalist[start : start + batch_size]
        images = torch.stack([read_radiograph(item["image"], size, patch) for item in items])
        masks = torch.stack(
            [_read_mask(Path(item["mask"]), size) if item.get("mask") else torch.zeros(size, dtype=torch.bool)
             for item in items]
        )
        maps = network(images.to(device)).float().cpu()
        scores, means = image_scores(maps, top_fraction, score_margin), maps.flatten(1).mean(1)
        for offset, item in enumerate(items):
            index = start + offset
            rows.append({
                "image": index,
                "label": int(item["label"]),
                "score": float(scores[offset]),
                "score_mean": float(means[offset]),
                "lesion_pct": 100.0 * float(masks[offset].float().mean()),
            })
            if index < num_figures:
                overlay_figure(
                    images[offset, 0], maps[offset, 0], Path(figure_dir) / f"anomaly_{index:03d}.png", masks[offset],
                    title=f"test image {index}: label {item['label']}, score {float(scores[offset]):.4f}",
                )
        pixel_scores.append(maps[:, 0].flatten())
        pixel_labels.append(masks.flatten())
    labels = torch.tensor([row["label"] for row in rows])
    metrics = {
        "image_auroc": roc_auc(torch.tensor([row["score"] for row in rows]), labels),
        "image_auroc_mean": roc_auc(torch.tensor([row["score_mean"] for row in rows]), labels),
        "pixel_auroc": roc_auc(torch.cat(pixel_scores), torch.cat(pixel_labels)),
    }
    return rows, metrics, Path(figure_dir)


def report_anomaly(
    evaluation: tuple[list[dict[str, Any]], dict[str, float], Path],
    run_dir: str | os.PathLike,
    experiment_name: str = "medssl",
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """Write and log an :func:`evaluate_anomaly` result: ``<run_dir>/evaluation/metrics.csv`` (per image: score,
    label), ``summary.json``, MLflow metrics ``eval_image_auroc``, ``eval_pixel_auroc``, ... and the overlays as the
    ``anomaly_maps`` artifact folder (:func:`medssl.tasks.finetune.report_evaluation`).

    Args:
        evaluation: ``(rows, metrics, figure_dir)``.
        run_dir: the run folder (its recorded MLflow run receives the results).
        experiment_name: MLflow experiment when the folder has no run yet.
        tracking_uri: MLflow store (default: the run folder's).

    Returns:
        The evaluation summary (``metrics``, ``num_rows``, ``csv``, ``run_id``).

    Raises:
        DataError: when nothing was evaluated.
    """
    rows, metrics, figure_dir = evaluation
    artifacts = {"anomaly_maps": figure_dir} if Path(figure_dir).is_dir() else {}
    return report_evaluation(
        rows, run_dir, id_columns=("image", "label"), experiment_name=experiment_name, tracking_uri=tracking_uri,
        cohort_metrics=metrics, artifacts=artifacts,
    )


@torch.no_grad()
def predict_anomaly_folder(
    network: AnomalyMapNetwork,
    input_dir: str | os.PathLike | None,
    output_dir: str | os.PathLike,
    top_fraction: float = 0.01,
    batch_size: int = 8,
    score_margin: int = 0,
) -> list[Path]:
    """Score every radiograph (``*.png``, ``*.dcm``) of a folder: ``predictions.csv`` / ``.json`` (file, score,
    map mean) and one overlay ``maps/<file stem>_anomaly.png`` each.

    Args:
        network: the map network.
        input_dir: folder of radiographs (not searched recursively).
        output_dir: output folder (created).
        top_fraction: image score = mean of this top fraction of the map.
        batch_size: images per forward pass.
        score_margin: pixels along each edge left out of the image score.

    Returns:
        The written ``predictions.csv`` and ``predictions.json``.

    Raises:
        DataError: for a missing or empty folder, and as :func:`read_radiograph`.
    """
    if input_dir is None or not Path(input_dir).is_dir():
        raise DataError(f"input_dir {input_dir} is not a folder of radiographs")
    files = sorted(path for path in Path(input_dir).iterdir() if path.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"no {' or '.join(IMAGE_SUFFIXES)} radiograph in {Path(input_dir).name}")
    device = next(network.parameters()).device
    rows = []
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        images = torch.stack([read_radiograph(path, network.image_size, network.patch_size) for path in chunk])
        maps = network(images.to(device)).float().cpu()
        scores = image_scores(maps, top_fraction, score_margin)
        for path, image, anomaly_map, score in zip(chunk, images, maps, scores):
            overlay_figure(image[0], anomaly_map[0], Path(output_dir) / "maps" / f"{path.stem}_anomaly.png",
                           title=f"score {float(score):.4f}")
            rows.append({"file": path.name, "score": float(score), "score_mean": float(anomaly_map.mean())})
    return write_predictions(rows, output_dir)
