"""LAX-4C landmark localisation on a pretrained ViT encoder: heatmaps, soft-argmax, coordinates through the affines.

CineMA (Fu et al., 2025, https://arxiv.org/abs/2506.00679) localises the two mitral-valve hinge points and the LV
apex on long-axis views, either with heatmaps (Gaussian targets of sigma 3 mm) read out by a soft-argmax or with
coordinate regression. Here: the pretrained multi-view encoder with the segmentation network's UNETR-style decoder
(:class:`~medssl.tasks.segmentation.ViTSegmenter`) predicts one heatmap per landmark (:class:`LandmarkHeatmapNetwork`);
a differentiable soft-argmax turns each into expected pixel coordinates (:func:`soft_argmax`; the integral /
DSNT read-out of Sun et al., 2018, https://arxiv.org/abs/1711.08229 and Nibali et al., 2018,
https://arxiv.org/abs/1801.07372); the loss is the L1 distance of those coordinates in mm plus a divergence between
each heatmap and a Gaussian of sigma 3 mm around its target (:class:`LandmarkLoss`).

Coordinates ride through pre-processing in patient space: a landmark given in pixels ``(i, j)`` of the LAX-4C file is
mapped to patient mm through the file's affine (:func:`pixel_to_patient`) and back to pixels of whatever grid the
image is on after resampling and cropping (:func:`patient_to_pixel`, through that grid's affine, which MONAI's
spatial transforms keep up to date), so resampling, padding and cropping move images and targets alike; predictions
go the same way back to the file's pixels and to patient mm. Pre-processing is the segmentation recipe's
(:func:`~medssl.data.cine_labelled.cine_preprocessing`: an in-plane grid, intensity percentiles of the whole cine)
followed by a window centred on the image (LAX slices are planned through the heart; training shifts the window at
random). Every frame of the cycle is annotated; training draws random frames, evaluation scores ED and ES (or all).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from monai.data import CacheDataset, MetaTensor
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImage,
    LoadImaged,
    MapTransform,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandSpatialCropd,
    ResizeWithPadOrCropd,
    SqueezeDimd,
)
from torch import Tensor, nn
from torch.utils.data import ConcatDataset, Dataset

from medssl.data.cine import METADATA_KEY, RandCardiacPhased
from medssl.data.cine_labelled import SegmentationView, cine_preprocessing, parse_segmentation_views
from medssl.data.phantom.cohort import LANDMARK_NAMES
from medssl.engine.checkpoints import atomic_write
from medssl.errors import DataError
from medssl.tasks.segmentation import ViTSegmenter, as_cine

__all__ = [
    "LANDMARK_VIEW",
    "LANDMARK_NAMES",
    "landmark_key",
    "landmark_view",
    "soft_argmax",
    "gaussian_heatmaps",
    "LandmarkLoss",
    "LandmarkHeatmapNetwork",
    "pixel_to_patient",
    "patient_to_pixel",
    "load_landmarks",
    "LoadLandmarksd",
    "LandmarksToGridd",
    "landmark_frame_transforms",
    "landmark_frame_dataset",
    "CineLandmarkPredictor",
    "evaluate_landmarks",
    "landmark_figure",
    "locate_landmarks_folder",
]

#: The view the landmarks are annotated on (the phantom's metadata key is ``landmarks_lax_4c``).
LANDMARK_VIEW = "lax_4c"
#: Predictions farther than this from the truth count as misses in ``within_5mm_pct``.
_HIT_RADIUS_MM = 5.0
# Landmarks mapped onto a grid must lie in its slice plane: pixel and patient coordinates that disagree by more than
# this belong to another image (e.g. a LAX-2C or SAX file where the LAX-4C was expected).
_PLANE_TOLERANCE_MM = 1.0
_NIFTI_SUFFIXES = (".nii.gz", ".nii")


def landmark_key(view: str = LANDMARK_VIEW) -> str:
    """Sample key of a view's landmark coordinates: ``"lax_4c"`` -> ``"lax_4c_landmarks"``."""
    return f"{view}_landmarks"


def landmark_view(views: Mapping[str, Mapping[str, Any]]) -> SegmentationView:
    """The one view of a landmark bundle's ``views`` config, checked: ``{"lax_4c": {image_size, spacing, ...}}``.

    Raises:
        ValueError: when ``views`` holds anything but the LAX-4C view, or its geometry is invalid.
    """
    return parse_segmentation_views(_check_views(views))[LANDMARK_VIEW]


def _check_views(views: Mapping[str, Mapping[str, Any]]) -> Mapping[str, Mapping[str, Any]]:
    if list(views) != [LANDMARK_VIEW]:
        raise ValueError(f"landmarks are located on the '{LANDMARK_VIEW}' view alone, got views {list(views)}.")
    return views


def _pixel_grid(spatial_size: Sequence[int], device: torch.device, dtype: torch.dtype) -> Tensor:
    """``[N, D]`` index coordinates of every pixel of a grid, in row-major (flattening) order."""
    axes = [torch.arange(size, device=device, dtype=dtype) for size in spatial_size]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(spatial_size))


def soft_argmax(logits: Tensor, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """Expected pixel coordinates under a spatial softmax of each heatmap (differentiable arg-max).

    ``p = softmax(logits / temperature)`` over all pixels of a heatmap, then ``x_d = sum_pixels p * index_d``: the
    integral regression of Sun et al., 2018 (https://arxiv.org/abs/1711.08229) and DSNT of Nibali et al., 2018
    (https://arxiv.org/abs/1801.07372), with coordinates in pixel units of the heatmap's grid (pixel centres at
    integers, ``0 .. size - 1`` along each axis, axis order of the tensor). A lower temperature sharpens the
    distribution towards the arg-max; a trained network sets the scale of its logits itself, so 1 is the default.

    Args:
        logits: ``[B, K, *spatial]`` heatmap logits (one heatmap per landmark).
        temperature: divides the logits before the softmax (> 0).

    Returns:
        coordinates ``[B, K, len(spatial)]`` (float32 or the logits' float type) and the probabilities
        ``[B, K, *spatial]`` (each heatmap sums to 1).

    Raises:
        ValueError: when ``logits`` has fewer than 3 dimensions or ``temperature`` is not a positive number.
    """
    if logits.ndim < 3:
        raise ValueError(f"logits must be [B, K, *spatial] with at least one spatial axis, got {tuple(logits.shape)}.")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}.")
    dtype = logits.dtype if logits.is_floating_point() else torch.float32
    probabilities = torch.softmax(logits.to(dtype).flatten(2) / temperature, dim=-1)
    spatial = logits.shape[2:]
    return probabilities @ _pixel_grid(spatial, logits.device, dtype), probabilities.reshape(logits.shape)


def _per_axis(value: float | Sequence[float], dims: int, name: str) -> Tensor:
    values = torch.as_tensor([float(value)] * dims if isinstance(value, (int, float)) else [float(v) for v in value])
    if values.numel() != dims or not bool((values > 0).all()):
        raise ValueError(f"{name} must be positive, one value or one per spatial axis ({dims}), got {value!r}.")
    return values


def gaussian_heatmaps(points: Tensor, spatial_size: Sequence[int], sigma: float | Sequence[float]) -> Tensor:
    """Normalised Gaussian heatmaps (each sums to 1 over the grid) centred on points given in pixel coordinates.

    ``g(x) ∝ exp(-sum_d (x_d - mu_d)^2 / (2 sigma_d^2))`` on the pixel centres, normalised by its sum over the grid
    (a softmax of the log-density, so points near or outside the border still give a proper distribution).

    Args:
        points: ``[B, K, D]`` centres in pixel units (as :func:`soft_argmax` returns them).
        spatial_size: the grid, ``D`` sizes.
        sigma: standard deviation in pixels, one value or one per axis (CineMA: 3 mm).

    Returns:
        ``[B, K, *spatial_size]`` float heatmaps.

    Raises:
        ValueError: when ``points`` is not ``[B, K, D]`` with ``D = len(spatial_size)`` or ``sigma`` is not positive.
    """
    dims = len(spatial_size)
    if points.ndim != 3 or points.shape[-1] != dims:
        raise ValueError(f"points must be [B, K, {dims}] for a {dims}-D grid, got {tuple(points.shape)}.")
    sigmas = _per_axis(sigma, dims, "sigma").to(points.device, points.dtype)
    grid = _pixel_grid(spatial_size, points.device, points.dtype)
    log_density = -0.5 * (((grid - points[:, :, None, :]) / sigmas) ** 2).sum(-1)  # [B, K, N]
    return torch.softmax(log_density, dim=-1).reshape(*points.shape[:2], *spatial_size)


class LandmarkLoss(nn.Module):
    """Soft-argmax coordinate L1 in mm plus a heatmap term: KL divergence to a Gaussian target of ``sigma_mm``.

    ``loss = mean_{b,k} sum_d |x_d - y_d| * spacing_d + heatmap_weight * mean_{b,k} KL(g_{b,k} || p_{b,k})``, with
    ``x = soft_argmax(logits / temperature)`` and ``g`` the normalised Gaussian of :func:`gaussian_heatmaps` at the
    target. The coordinate term optimises the reported error directly (in mm, so anisotropic grids weigh axes by
    their true length). It alone is satisfied by any distribution whose mean hits the target, a broad or two-peaked
    heatmap included, and its gradient reaches the pixels only through that mean; the heatmap term, DSNT's
    regulariser (Nibali et al., 2018, https://arxiv.org/abs/1801.07372; KL where DSNT uses Jensen-Shannon),
    asks for one compact peak there, which gives every pixel a gradient from the first step and keeps the read-out
    robust. CineMA trains heatmaps with Dice + BCE on per-pixel sigmoids of Gaussians of sigma 3 mm (Fu et al., 2025,
    https://arxiv.org/abs/2506.00679); a spatial softmax is what the soft-argmax reads, so the Gaussian (same sigma)
    is matched as a distribution instead.

    Args:
        spacing: pixel spacing of the training grid in mm, one value or one per axis (1.5).
        sigma_mm: standard deviation of the Gaussian target in mm (CineMA: 3).
        heatmap_weight: weight of the KL term (>= 0; 0 trains on coordinates alone).
        temperature: soft-argmax temperature (see :func:`soft_argmax`).

    Raises:
        ValueError: for a non-positive spacing, sigma or temperature, or a negative weight.
    """

    def __init__(
        self,
        spacing: float | Sequence[float] = 1.5,
        sigma_mm: float = 3.0,
        heatmap_weight: float = 1.0,
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        if not sigma_mm > 0 or not heatmap_weight >= 0 or not temperature > 0:
            raise ValueError(
                f"sigma_mm and temperature must be > 0 and heatmap_weight >= 0, got sigma_mm={sigma_mm}, "
                f"temperature={temperature}, heatmap_weight={heatmap_weight}."
            )
        if not (np.asarray(spacing, dtype=np.float64) > 0).all():
            raise ValueError(f"spacing must be positive mm, got {spacing!r}.")
        self.spacing = spacing
        self.sigma_mm = float(sigma_mm)
        self.heatmap_weight = float(heatmap_weight)
        self.temperature = float(temperature)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        """Score heatmaps against target coordinates.

        Args:
            logits: ``[B, K, *spatial]`` heatmap logits.
            target: ``[B, K, D]`` target pixel coordinates on the same grid.

        Returns:
            the scalar loss.

        Raises:
            ValueError: when ``target`` is not ``[B, K, D]`` for the logits' batch, landmarks and spatial axes.
        """
        dims = logits.ndim - 2
        if target.shape != (*logits.shape[:2], dims):
            raise ValueError(
                f"target must be [B, K, {dims}] = {[*logits.shape[:2], dims]} for logits {tuple(logits.shape)}, "
                f"got {tuple(target.shape)}."
            )
        spacing = _per_axis(self.spacing, dims, "spacing").to(logits.device)
        target = target.float()
        coordinates, probabilities = soft_argmax(logits.float(), self.temperature)
        loss = ((coordinates - target).abs() * spacing).sum(-1).mean()
        if self.heatmap_weight > 0:
            goal = gaussian_heatmaps(target, logits.shape[2:], (self.sigma_mm / spacing).tolist()).flatten(2)
            log_p = torch.log_softmax(logits.float().flatten(2) / self.temperature, dim=-1)
            kl = (goal * (torch.log(goal.clamp_min(1e-30)) - log_p)).sum(-1).mean()
            loss = loss + self.heatmap_weight * kl
        return loss


class LandmarkHeatmapNetwork(ViTSegmenter):
    """Pretrained multi-view encoder + UNETR-style decoder on the LAX-4C view, one heatmap (logits) per landmark.

    The segmentation network (:class:`~medssl.tasks.segmentation.ViTSegmenter`) with ``K`` output channels read as
    heatmaps rather than classes: same encoder (``encoder.*``, loaded from a ``cine_mae`` checkpoint), same decoder
    (``decoders.lax_4c.*``; the per-patch linear head in ``"linear_probe"`` mode), same fine-tune modes.
    :func:`soft_argmax` turns the output into coordinates.

    Args:
        views: ``{"lax_4c": {"image_size": [H, W], "patch_size": [p, p], ...}}`` (the window).
        num_landmarks: heatmaps ``K`` (3: two mitral hinges and the apex).
        **kwargs: the encoder and decoder settings of :class:`~medssl.tasks.segmentation.ViTSegmenter`
            (``embed_dim``, ``depth``, ``num_heads``, ``mlp_ratio``, ``patch_embed``, ``drop_path_rate``,
            ``feature_size``, ``finetune_mode``, ``norm_name``).

    Raises:
        ValueError: when ``views`` is not the LAX-4C view alone, ``num_landmarks`` < 1, or see ``ViTSegmenter``.
    """

    def __init__(self, views: Mapping[str, Mapping[str, Any]], num_landmarks: int = len(LANDMARK_NAMES), **kwargs: Any):
        _check_views(views)
        if num_landmarks < 1:
            raise ValueError(f"num_landmarks must be >= 1, got {num_landmarks}.")
        super().__init__(views, num_classes=num_landmarks, **kwargs)


def _as_points(points: np.ndarray | Sequence, width: int, what: str) -> np.ndarray:
    array = np.asarray(points, dtype=np.float64)
    if array.ndim < 1 or array.shape[-1] != width:
        raise ValueError(f"{what} must be [..., {width}], got shape {array.shape}.")
    return array


def pixel_to_patient(pixel: np.ndarray | Sequence, affine: np.ndarray | Tensor) -> np.ndarray:
    """Pixel coordinates ``(i, j)`` of a slice image -> patient coordinates in mm through its NIfTI-style affine.

    The slice is voxel ``k = 0`` of a ``[H, W, 1]`` grid: ``mm = affine @ (i, j, 0, 1)``.

    Args:
        pixel: ``[..., 2]`` coordinates along array axes 0 and 1 (pixel centres at integers).
        affine: ``[4, 4]`` voxel -> RAS mm.

    Returns:
        ``[..., 3]`` float64 patient coordinates (mm).

    Raises:
        ValueError: when ``pixel`` is not ``[..., 2]`` or ``affine`` not ``[4, 4]``.
    """
    pixel = _as_points(pixel, 2, "pixel coordinates")
    matrix = np.asarray(affine, dtype=np.float64)
    if matrix.shape != (4, 4):
        raise ValueError(f"affine must be [4, 4], got {matrix.shape}.")
    return pixel @ matrix[:3, :2].T + matrix[:3, 3]


def patient_to_pixel(
    points_mm: np.ndarray | Sequence,
    affine: np.ndarray | Tensor,
    tolerance_mm: float = _PLANE_TOLERANCE_MM,
    source: str = "the image",
) -> np.ndarray:
    """Patient coordinates in mm -> pixel coordinates ``(i, j)`` of a slice image, checked to lie in its plane.

    ``(i, j, k) = affine^-1 @ (mm, 1)``; ``k`` (in slice thicknesses) must be 0 within ``tolerance_mm``.

    Args:
        points_mm: ``[..., 3]`` RAS mm.
        affine: ``[4, 4]`` voxel -> RAS mm of the ``[H, W, 1]`` grid.
        tolerance_mm: largest distance from the slice plane accepted.
        source: the image, for the message.

    Returns:
        ``[..., 2]`` float64 pixel coordinates.

    Raises:
        ValueError: for shapes other than ``[..., 3]`` and ``[4, 4]``.
        DataError: when a point lies farther than ``tolerance_mm`` from the plane (landmarks of another view).
    """
    points_mm = _as_points(points_mm, 3, "patient coordinates")
    matrix = np.asarray(affine, dtype=np.float64)
    if matrix.shape != (4, 4):
        raise ValueError(f"affine must be [4, 4], got {matrix.shape}.")
    voxel = (points_mm - matrix[:3, 3]) @ np.linalg.inv(matrix[:3, :3]).T
    off_plane = np.abs(voxel[..., 2]) * np.linalg.norm(matrix[:3, 2])
    if off_plane.size and float(off_plane.max()) > tolerance_mm:
        raise DataError(
            f"landmarks lie up to {float(off_plane.max()):.1f} mm off the slice plane of {source} (tolerance "
            f"{tolerance_mm} mm): they were not annotated on this image; is it the {LANDMARK_VIEW} view?"
        )
    return voxel[..., :2]


def load_landmarks(
    path: str | os.PathLike, num_frames: int | None = None, names: Sequence[str] = LANDMARK_NAMES
) -> dict[str, Any]:
    """Read a subject's LAX-4C landmarks from its ``metadata.json`` (the phantom's ``landmarks_lax_4c``), checked.

    Args:
        path: the metadata file: ``{"landmarks_lax_4c": {"names": [K], "pixel": [T][K][2] (i, j on the LAX-4C
            array), "patient_mm": [T][K][3] (optional)}, "ed_frame", "es_frame"}``.
        num_frames: frames ``T`` of the cine they annotate, when known.
        names: the landmarks expected, in order.

    Returns:
        ``{"names", "pixel": float64 [T, K, 2], "patient_mm": float64 [T, K, 3] or None, "ed_frame", "es_frame"}``
        (ED defaults to frame 0 and ES to None when the file does not say).

    Raises:
        DataError: when the file is unreadable, has no ``landmarks_lax_4c`` or ``pixel`` entry, other names, arrays
            of another shape than ``[T, K, 2]`` / ``[T, K, 3]``, non-finite values, another frame count than
            ``num_frames``, or ED / ES frames out of range.
    """
    path = Path(path)
    try:
        metadata = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read subject metadata {path}: {e}") from e
    entry = metadata.get(f"landmarks_{LANDMARK_VIEW}") if isinstance(metadata, dict) else None
    if not isinstance(entry, dict) or "pixel" not in entry:
        raise DataError(
            f"{path} has no 'landmarks_{LANDMARK_VIEW}' with 'pixel' coordinates [T][K][2]; landmark training and "
            "evaluation need them for every subject."
        )
    if list(entry.get("names", names)) != list(names):
        raise DataError(f"{path} annotates landmarks {entry.get('names')}, expected {list(names)} in this order.")
    arrays = {}
    for key, width in (("pixel", 2), ("patient_mm", 3)):
        if entry.get(key) is None:
            arrays[key] = None
            continue
        try:
            array = np.asarray(entry[key], dtype=np.float64)
        except (TypeError, ValueError) as e:
            raise DataError(f"{path}: 'landmarks_{LANDMARK_VIEW}.{key}' is not a numeric array: {e}") from e
        frames = num_frames if num_frames is not None else (array.shape[0] if array.ndim else 0)
        if array.shape != (frames, len(names), width) or frames < 1:
            raise DataError(
                f"{path}: 'landmarks_{LANDMARK_VIEW}.{key}' must be [T, {len(names)}, {width}]"
                f"{f' with T = {num_frames} frames' if num_frames is not None else ''}, got shape {array.shape}."
            )
        if not np.isfinite(array).all():
            raise DataError(f"{path}: 'landmarks_{LANDMARK_VIEW}.{key}' holds non-finite values.")
        arrays[key] = array
    frames = arrays["pixel"].shape[0]
    ed, es = metadata.get("ed_frame", 0), metadata.get("es_frame")
    for name, frame in (("ed_frame", ed), ("es_frame", es)):
        if frame is not None and not (isinstance(frame, int) and 0 <= frame < frames):
            raise DataError(f"{path}: {name} {frame!r} is not a frame index in 0..{frames - 1}.")
    return {"names": list(names), **arrays, "ed_frame": ed, "es_frame": es}


def _source_landmarks_mm(landmarks: Mapping[str, Any], affine: np.ndarray | Tensor, source: str) -> np.ndarray:
    """The landmarks in patient mm through the image's affine, checked against their own ``patient_mm``."""
    mm = pixel_to_patient(landmarks["pixel"], affine)
    if landmarks["patient_mm"] is not None:
        gap = float(np.linalg.norm(mm - landmarks["patient_mm"], axis=-1).max())
        if gap > _PLANE_TOLERANCE_MM:
            raise DataError(
                f"the landmarks' pixel coordinates land up to {gap:.1f} mm from their patient_mm through the affine "
                f"of {source}: the landmarks were not annotated on this image; is it the {LANDMARK_VIEW} view?"
            )
    return mm


class LoadLandmarksd(MapTransform):
    """Read each subject's landmarks beside its time-first LAX-4C cine and store them in patient mm.

    Patient coordinates do not change under resampling, padding or cropping; :class:`LandmarksToGridd` maps them to
    the pixels of the grid the image ends on.

    Args:
        keys: the metadata path key (``"metadata"``); removed from the sample.
        image_key: the loaded cine, a MetaTensor ``[T, H, W, 1]`` with the file's affine.
        landmark_key: where the landmarks go: float64 ``[T, K, 3]`` mm.
        names: the landmarks expected, in order.

    Raises (on call):
        DataError: see :func:`load_landmarks`, or when the landmarks do not fit the image (another frame count, or
            pixel and patient coordinates that disagree through its affine: another view).
    """

    def __init__(
        self,
        keys: Hashable | Sequence[Hashable] = METADATA_KEY,
        image_key: Hashable = LANDMARK_VIEW,
        landmark_key: Hashable = landmark_key(),
        names: Sequence[str] = LANDMARK_NAMES,
    ) -> None:
        super().__init__(keys)
        self.image_key, self.landmark_key, self.names = image_key, landmark_key, tuple(names)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        sample = dict(data)
        image = sample[self.image_key]
        source = str(image.meta.get("filename_or_obj", self.image_key))
        for key in self.key_iterator(sample):
            landmarks = load_landmarks(sample.pop(key), image.shape[0], self.names)
            sample[self.landmark_key] = torch.as_tensor(_source_landmarks_mm(landmarks, image.affine, source))
        return sample


class LandmarksToGridd(MapTransform):
    """Map landmarks from patient mm to pixel coordinates ``(i, j)`` of the grid the image is on now.

    Args:
        keys: landmark keys, ``[..., K, 3]`` mm.
        image_key: the image, a MetaTensor ``[C, H, W, 1]`` whose affine follows every spatial transform.

    Returns (on call):
        the sample with each landmark key as float32 ``[..., K, 2]`` pixels of the image's grid.
    """

    def __init__(self, keys: Hashable | Sequence[Hashable] = landmark_key(), image_key: Hashable = LANDMARK_VIEW):
        super().__init__(keys)
        self.image_key = image_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        sample = dict(data)
        affine = sample[self.image_key].affine
        for key in self.key_iterator(sample):
            pixel = patient_to_pixel(torch.as_tensor(sample[key]).numpy(), affine, source=str(self.image_key))
            sample[key] = torch.as_tensor(pixel, dtype=torch.float32)
        return sample


def _window(view: SegmentationView, margin_mm: float = 0.0) -> list[int]:
    """Size of a LAX window on the ``[H, W, 1]`` grid, grown by ``margin_mm`` (whole pixels) on every side."""
    return [*(size + 2 * round(margin_mm / spacing) if margin_mm else size
              for size, spacing in zip(view.image_size, view.spacing)), 1]


def landmark_frame_transforms(
    view: SegmentationView, max_shift_mm: float = 24.0, augment: bool = True, names: Sequence[str] = LANDMARK_NAMES
) -> Compose:
    """The training pipeline for landmark frames; MONAI's ``CacheDataset`` caches its deterministic part.

    Deterministic: load the cine (time to the channel axis) and its landmarks (:class:`LoadLandmarksd`, in mm),
    resample and scale (:func:`~medssl.data.cine_labelled.cine_preprocessing`), centre-crop or pad to the window
    plus ``max_shift_mm`` on every side. Random: one frame of the cycle (:class:`~medssl.data.cine.RandCardiacPhased`,
    landmarks and image together), a window shifted by up to ``max_shift_mm`` per axis from the centre (MONAI
    ``RandSpatialCropd``), the landmarks onto that window (:class:`LandmarksToGridd`), and (``augment``) intensity
    scaling and shifting by up to 10 %.

    Args:
        view: the LAX-4C geometry (window ``image_size``, ``spacing``; both axes resampled, not ``None``).
        max_shift_mm: largest shift of the window from the image centre (>= 0; whole pixels): the landmarks must
            stay inside the window, so at most half the window's field of view less their distance from the
            image centre (about 60 mm on the phantoms).
        augment: random intensity scaling and shifting.
        names: the landmarks expected, in order.

    Returns:
        a ``Compose`` mapping ``{"lax_4c": path, "metadata": path}`` to ``{"lax_4c": float32 [1, H, W],
        "lax_4c_landmarks": float32 [K, 2]}`` (pixels of the window).

    Raises:
        ValueError: for a negative ``max_shift_mm`` or a view that keeps an axis's acquired spacing.
    """
    if not max_shift_mm >= 0 or None in view.spacing:
        raise ValueError(
            f"max_shift_mm must be >= 0 and the view resampled along both axes, got max_shift_mm={max_shift_mm}, "
            f"spacing={list(view.spacing)}."
        )
    image, points = view.name, landmark_key(view.name)
    transforms: list = [
        LoadImaged(keys=image, image_only=True, dtype=np.float32),
        EnsureChannelFirstd(keys=image, channel_dim=-1),
        LoadLandmarksd(METADATA_KEY, image, points, names),
        *cine_preprocessing(view, image),
        ResizeWithPadOrCropd(keys=image, spatial_size=_window(view, max_shift_mm)),
        # Cached in half precision (intensities in [0, 1]) with the affine, which the random crop still needs.
        EnsureTyped(keys=image, dtype=torch.float16),
    ]
    random: list = [
        RandCardiacPhased(keys=[image, points]),
        RandSpatialCropd(keys=image, roi_size=_window(view), random_size=False),
        LandmarksToGridd(points, image),
        SqueezeDimd(keys=image, dim=3),
        SqueezeDimd(keys=points, dim=0),
    ]
    if augment:
        random += [
            RandScaleIntensityd(keys=image, factors=0.1, prob=1.0),
            RandShiftIntensityd(keys=image, offsets=0.1, prob=1.0),
        ]
    random.append(EnsureTyped(keys=[image, points], dtype=torch.float32, track_meta=False))
    return Compose(transforms + random)


def landmark_frame_dataset(
    datalist: Sequence[Mapping[str, str]],
    view: SegmentationView,
    max_shift_mm: float = 24.0,
    samples_per_subject: int = 1,
    augment: bool = True,
    names: Sequence[str] = LANDMARK_NAMES,
    cache_workers: int = 1,
    progress: bool = True,
) -> Dataset:
    """A cached dataset of random annotated frames and windows, each subject drawn ``samples_per_subject`` times.

    Args:
        datalist: ``{"lax_4c": path, "metadata": path}`` per subject (``load_cine_datalist(source, ["lax_4c"],
            metadata=True)``).
        view: the LAX-4C geometry.
        max_shift_mm: largest random shift of the window from the image centre.
        samples_per_subject: draws per subject per epoch (>= 1).
        augment: random intensity scaling and shifting.
        names: the landmarks expected, in order.
        cache_workers: threads filling the cache.
        progress: show a progress bar while caching.

    Returns:
        a dataset of ``len(datalist) * samples_per_subject`` samples (see :func:`landmark_frame_transforms`).

    Raises:
        DataError: when the data list is empty or an item lacks the view or its metadata; see also
            :class:`LoadLandmarksd`.
        ValueError: when ``samples_per_subject`` < 1.
    """
    if samples_per_subject < 1:
        raise ValueError(f"samples_per_subject must be >= 1, got {samples_per_subject}.")
    if not datalist:
        raise DataError("the labelled set is empty: no subject to train on; check the data source and num_labelled.")
    keys = (view.name, METADATA_KEY)
    lacking = sorted({key for item in datalist for key in keys if key not in item})
    if lacking:
        raise DataError(f"datalist items lack {lacking}; list the data with views=['{view.name}'], metadata=True.")
    cached = CacheDataset(
        data=[{key: item[key] for key in keys} for item in datalist],
        transform=landmark_frame_transforms(view, max_shift_mm, augment, names),
        copy_cache=False,  # the random steps slice and crop into new tensors; none writes in place
        num_workers=cache_workers,
        progress=progress,
    )
    return cached if samples_per_subject == 1 else ConcatDataset([cached] * samples_per_subject)


class CineLandmarkPredictor:
    """Locate the landmarks in frames of whole LAX-4C cines, in the file's pixels and in patient mm.

    Per cine: time to the channel axis, resample and scale as in training
    (:func:`~medssl.data.cine_labelled.cine_preprocessing`), take the window centred on the image (MONAI
    ``ResizeWithPadOrCrop``, which keeps the affine), predict heatmaps, read them out with :func:`soft_argmax`, and
    map the window's pixels through its affine to patient mm and through the file's affine to the file's pixels.

    Args:
        network: ``network(windows [B, 1, H, W], view) -> heatmap logits [B, K, H, W]``
            (:class:`LandmarkHeatmapNetwork`); put in eval mode while predicting.
        view: the LAX-4C geometry the network was trained on.
        temperature: soft-argmax temperature, as in training.
        batch_size: frames per forward pass.
        device: where the network runs; default the network's device.
    """

    def __init__(
        self,
        network: nn.Module,
        view: SegmentationView,
        temperature: float = 1.0,
        batch_size: int = 8,
        device: torch.device | str | None = None,
    ) -> None:
        self.network = network
        self.view = view
        self.temperature = temperature
        self.batch_size = batch_size
        self.device = torch.device(device) if device is not None else next(network.parameters()).device
        self.preprocessing = Compose(
            [*cine_preprocessing(view, "image"), ResizeWithPadOrCropd(keys="image", spatial_size=_window(view))]
        )

    @torch.no_grad()
    def predict(self, cine: MetaTensor, frames: Sequence[int] | None = None) -> dict[str, np.ndarray]:
        """Locate the landmarks in frames of one cine.

        Args:
            cine: ``[H, W, 1, T]`` MetaTensor with its affine, as MONAI ``LoadImage`` reads a LAX-4C NIfTI.
            frames: the frames; None for all.

        Returns:
            ``{"frames": [F], "pixel": float64 [F, K, 2] (i, j) on the cine's array, "patient_mm": [F, K, 3]}``.

        Raises:
            ValueError: for a cine that is not ``[H, W, 1, T]`` or out-of-range frames.
        """
        if cine.ndim != 4 or cine.shape[2] != 1:
            raise ValueError(f"expected a {self.view.name} cine [H, W, 1, T], got shape {tuple(cine.shape)}.")
        num_frames = cine.shape[-1]
        frames = list(range(num_frames)) if frames is None else [int(t) for t in frames]
        if any(not 0 <= t < num_frames for t in frames):
            raise ValueError(f"frames {frames} out of range for a cine of {num_frames} frames.")
        # The whole cine is pre-processed, as in training: its intensity percentiles are those of every frame.
        channel_first = MetaTensor(cine.as_tensor().float().permute(3, 0, 1, 2), affine=cine.affine)
        windows = self.preprocessing({"image": channel_first})["image"]
        was_training = self.network.training
        self.network.eval()
        try:
            chosen = windows.as_tensor()[frames, ..., 0][:, None]  # [F, 1, H, W]
            coordinates = []
            for start in range(0, len(frames), self.batch_size):
                batch = chosen[start : start + self.batch_size].to(self.device, torch.float32)
                logits = self.network(batch, self.view.name)
                coordinates.append(soft_argmax(logits.float(), self.temperature)[0].cpu())
        finally:
            self.network.train(was_training)
        mm = pixel_to_patient(torch.cat(coordinates).double().numpy(), windows.affine)
        pixel = patient_to_pixel(mm, cine.affine, source=str(cine.meta.get("filename_or_obj", "the cine")))
        return {"frames": np.asarray(frames), "pixel": pixel, "patient_mm": mm}

    def load(self, path: str | os.PathLike) -> MetaTensor:
        """Read a LAX-4C NIfTI (``[H, W, 1, T]``, ``[H, W, 1]`` or ``[H, W]``) as a cine ``[H, W, 1, T]``.

        Raises:
            DataError: when the file cannot be read or is not a single-slice image (e.g. a SAX stack).
        """
        try:
            image = LoadImage(image_only=True, dtype=np.float32)(str(path))
        except Exception as e:  # nibabel and MONAI raise several unrelated types for unreadable files
            raise DataError(f"cannot read NIfTI file {path}: {e}") from e
        return as_cine(image, self.view.name, str(path))


def _errors_mm(predicted_mm: np.ndarray, true_mm: np.ndarray, names: Sequence[str]) -> dict[str, float]:
    distance = np.linalg.norm(predicted_mm - true_mm, axis=-1)  # [K]
    return {
        **{f"error_mm_{name}": float(d) for name, d in zip(names, distance)},
        "mean_error_mm": float(distance.mean()),
        "within_5mm_pct": float(100.0 * (distance <= _HIT_RADIUS_MM).mean()),
    }


def _evaluated_frames(landmarks: Mapping[str, Any], frames: str) -> list[tuple[str, int]]:
    if frames == "all":
        return [("", t) for t in range(landmarks["pixel"].shape[0])]
    chosen = [("ED", landmarks["ed_frame"])]
    if landmarks["es_frame"] is not None and landmarks["es_frame"] != landmarks["ed_frame"]:
        chosen.append(("ES", landmarks["es_frame"]))
    return chosen


def evaluate_landmarks(
    predictor: CineLandmarkPredictor,
    datalist: Sequence[Mapping[str, str]],
    frames: str = "ed_es",
    names: Sequence[str] = LANDMARK_NAMES,
) -> list[dict[str, Any]]:
    """Locate the landmarks of annotated subjects and score the distance to the truth in patient mm.

    Args:
        predictor: the predictor.
        datalist: ``{"lax_4c": path, "metadata": path}`` per subject.
        frames: ``"ed_es"`` (the metadata's ``ed_frame`` and ``es_frame``) or ``"all"`` frames of the cycle.
        names: the landmarks expected, in order.

    Returns:
        one row per subject and frame: ``{"subject": index in the data list, "phase": "ED" / "ES" / "", "frame",
        "error_mm_<name>" per landmark, "mean_error_mm", "within_5mm_pct"}`` (no identifiers: subjects are
        numbered).

    Raises:
        DataError: when the data list is empty, or a subject's image or landmarks are unreadable or do not fit (see
            :func:`load_landmarks`).
        ValueError: for an unknown ``frames`` choice.
    """
    if frames not in ("ed_es", "all"):
        raise ValueError(f"frames must be 'ed_es' or 'all', got {frames!r}.")
    if not datalist:
        raise DataError("the evaluation data list is empty: no annotated subject to evaluate.")
    rows = []
    for subject, item in enumerate(datalist):
        cine = predictor.load(item[predictor.view.name])
        landmarks = load_landmarks(item[METADATA_KEY], cine.shape[-1], names)
        true_mm = _source_landmarks_mm(landmarks, cine.affine, item[predictor.view.name])
        chosen = _evaluated_frames(landmarks, frames)
        predicted = predictor.predict(cine, [frame for _, frame in chosen])
        for index, (phase, frame) in enumerate(chosen):
            errors = _errors_mm(predicted["patient_mm"][index], true_mm[frame], names)
            rows.append({"subject": subject, "phase": phase, "frame": frame, **errors})
    return rows


def landmark_figure(
    predictor: CineLandmarkPredictor,
    datalist: Sequence[Mapping[str, str]],
    path: str | os.PathLike,
    max_subjects: int = 4,
    names: Sequence[str] = LANDMARK_NAMES,
) -> Path:
    """Draw LAX-4C frames (ED above ES) of the first subjects with the true (o) and predicted (+) landmarks, as PNG.

    Args:
        predictor: the predictor.
        datalist: ``{"lax_4c": path, "metadata": path}`` per subject.
        path: destination PNG, written atomically.
        max_subjects: columns (the first subjects of the data list).
        names: the landmarks expected, in order.

    Returns:
        the written path.

    Raises:
        DataError: when the data list is empty; see :func:`evaluate_landmarks`.
    """
    if not datalist:
        raise DataError("the evaluation data list is empty: no annotated subject to draw.")
    subjects = list(datalist)[: max(1, max_subjects)]
    figure = Figure(figsize=(2.6 * len(subjects), 5.4), dpi=100, layout="constrained")
    axes = figure.subplots(2, len(subjects), squeeze=False)
    colours = ("tab:orange", "tab:cyan", "tab:pink")
    for column, item in enumerate(subjects):
        cine = predictor.load(item[predictor.view.name])
        landmarks = load_landmarks(item[METADATA_KEY], cine.shape[-1], names)
        chosen = _evaluated_frames(landmarks, "ed_es")
        predicted = predictor.predict(cine, [frame for _, frame in chosen])
        for row in range(2):
            axis = axes[row][column]
            axis.set_xticks([])
            axis.set_yticks([])
            if row >= len(chosen):
                axis.set_axis_off()
                continue
            phase, frame = chosen[row]
            image = cine.as_tensor()[:, :, 0, frame].numpy()
            low, high = np.percentile(image, [0.95, 99.5])
            # Transposed with the origin at the bottom (as the reconstruction figures): axis 0 runs left to right.
            axis.imshow(image.T, cmap="gray", vmin=low, vmax=max(high, low + 1e-6), origin="lower")
            for k, name in enumerate(names):
                colour = colours[k % len(colours)]
                true_i, true_j = landmarks["pixel"][frame, k]
                axis.plot(true_i, true_j, "o", markersize=7, markerfacecolor="none", color=colour, label=name)
                axis.plot(*predicted["pixel"][row, k], "+", markersize=9, mew=1.8, color=colour)
            error = _errors_mm(predicted["patient_mm"][row], pixel_to_patient(landmarks["pixel"][frame], cine.affine),
                               names)["mean_error_mm"]
            axis.set_title(f"#{column} {phase} frame {frame}: {error:.1f} mm", fontsize=8)
    axes[0][0].legend(fontsize=6, loc="lower left")
    figure.suptitle("LAX-4C landmarks: o truth, + prediction", fontsize=9)
    return atomic_write(path, lambda temporary: figure.savefig(temporary, format="png"))


def _nifti_stem(name: str) -> str | None:
    return next((name[: -len(suffix)] for suffix in _NIFTI_SUFFIXES if name.endswith(suffix)), None)


def locate_landmarks_folder(
    predictor: CineLandmarkPredictor,
    input_dir: str | os.PathLike | None,
    output_dir: str | os.PathLike,
    names: Sequence[str] = LANDMARK_NAMES,
) -> list[Path]:
    """Locate the landmarks in every frame of every LAX-4C NIfTI of a folder; write JSON and CSV per file.

    For ``<name>.nii.gz`` it writes ``<name>_landmarks.json`` (``{"num_frames", "landmarks_lax_4c": {"names",
    "pixel_axes", "pixel": [T][K][2], "patient_mm": [T][K][3]}}``, the layout of the phantom's metadata, so
    :func:`load_landmarks` reads it back)
    and ``<name>_landmarks.csv`` (one row per frame and landmark: ``frame, landmark, i, j, x_mm, y_mm, z_mm``; RAS
    patient coordinates), atomically.

    Args:
        predictor: the predictor.
        input_dir: folder of ``*.nii`` / ``*.nii.gz`` LAX-4C images ``[H, W, 1, T]``, ``[H, W, 1]`` or ``[H, W]``
            (not recursive).
        output_dir: where the files go (created).
        names: the landmark names, in the network's channel order.

    Returns:
        the written paths (JSON, CSV per input), in file-name order.

    Raises:
        DataError: when no folder is given, it does not exist or holds no NIfTI file, or a file cannot be read or is
            not a single-slice image.
    """
    if input_dir is None:
        raise DataError("no input folder given: pass --input_dir <folder of LAX-4C NIfTI cines>.")
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if not input_dir.is_dir():
        raise DataError(f"input folder {input_dir} does not exist.")
    files = sorted(p for p in input_dir.iterdir() if p.is_file() and _nifti_stem(p.name) is not None)
    if not files:
        raise DataError(f"no NIfTI files (*.nii, *.nii.gz) in {input_dir}.")
    written = []
    for path in files:
        result = predictor.predict(predictor.load(path))
        stem = f"{_nifti_stem(path.name)}_landmarks"
        landmarks = {
            "names": list(names),
            "pixel_axes": ["i (H, array axis 0)", "j (W, array axis 1)"],
            "pixel": np.round(result["pixel"], 4).tolist(),
            "patient_mm": np.round(result["patient_mm"], 4).tolist(),
        }
        document = {"num_frames": len(result["frames"]), f"landmarks_{LANDMARK_VIEW}": landmarks}
        text = json.dumps(document, indent=1)
        written.append(atomic_write(output_dir / f"{stem}.json", lambda temporary: Path(temporary).write_text(text)))
        table = pd.DataFrame(
            [
                {"frame": int(frame), "landmark": name, "i": pixel[0], "j": pixel[1], "x_mm": mm[0], "y_mm": mm[1],
                 "z_mm": mm[2]}
                for frame, pixels, points in zip(result["frames"], result["pixel"], result["patient_mm"])
                for name, pixel, mm in zip(names, pixels, points)
            ]
        )
        csv_path = output_dir / f"{stem}.csv"
        written.append(
            atomic_write(csv_path, lambda temporary: table.to_csv(temporary, index=False, float_format="%.4f"))
        )
    return written
