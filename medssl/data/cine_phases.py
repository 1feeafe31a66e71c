"""End-diastolic and end-systolic SAX frames as a two-channel image: the input of image-level cine tasks.

CineMA (Fu et al., 2025, https://arxiv.org/abs/2506.00679) classifies disease and regresses the ejection fraction
from the SAX stack at end-diastole (ED) and end-systole (ES) stacked as channels, ``[2, H, W, S]``. Pre-processing is
the segmentation's (:func:`~medssl.data.cine_labelled.cine_preprocessing`: resample, clip to the 0.95th-99.5th
intensity percentiles of the whole cine, scale to [0, 1]); then the two frames are taken and a window of the
network's ``image_size`` is cut around the heart or the image centre.

Where ED and ES come from:

- training and evaluation data with targets list each subject's ``metadata.json`` (``load_cine_datalist(...,
  metadata=True)``): its ``ed_frame`` and ``es_frame``;
- plain NIfTI cines (inference) have no metadata: ED is frame 0, as ECG-triggered cines start at the R wave, unless
  given; ES, unless given, is the frame that differs most from ED (:func:`farthest_frame`), the point of the cycle
  where the ventricles are smallest.

Heart centring needs no label: the heart is the part of a cine that moves, so the window is centred in-plane on the
bright part of the temporal standard deviation (:func:`motion_centre`), through-plane on the stack's centre. The
temporal-variation map is a classic way of finding the heart in cine MRI without a model (e.g. Lin et al., 2006,
"Automated detection of left ventricle in 4D MR images", https://doi.org/10.1117/12.652590).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset
from monai.transforms import (
    BorderPad,
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    RandAffined,
    RandScaleIntensityd,
    RandShiftIntensityd,
    SpatialCrop,
)

from torch.utils.data import ConcatDataset, Dataset

from medssl.data.cine import METADATA_KEY, SAX_VIEW
from medssl.data.cine_labelled import SegmentationView, cine_preprocessing
from medssl.errors import DataError

__all__ = [
    "PHASES",
    "CROP_CENTRES",
    "ED_KEY",
    "ES_KEY",
    "read_subject_metadata",
    "cine_phase_datalist",
    "nifti_folder_datalist",
    "farthest_frame",
    "motion_centre",
    "CinePhasesd",
    "cine_phase_transforms",
    "cine_phase_dataset",
]

#: The channels of the image, in order.
PHASES = ("ED", "ES")
#: Where the window is centred: ``"heart"`` (the moving part of the cine, :func:`motion_centre`) or ``"image"``.
CROP_CENTRES = ("heart", "image")
ED_KEY, ES_KEY = "ed_frame", "es_frame"
_NIFTI_SUFFIXES = (".nii.gz", ".nii")
# Fraction of the strongest temporal variation a voxel needs to count as moving: keeps the beating heart, drops the
# noise floor that would pull the centre towards the middle of the image.
_MOTION_FRACTION = 0.5


def read_subject_metadata(path: str | os.PathLike, keys: Sequence[str]) -> dict[str, Any]:
    """Some values of a subject's ``metadata.json``.

    Args:
        path: the file.
        keys: the values wanted; each must be present and not null.

    Returns:
        ``{key: value}`` for ``keys``.

    Raises:
        DataError: when the file cannot be read or lacks a key.
    """
    try:
        with open(path) as handle:
            metadata = json.load(handle)
    except (OSError, ValueError) as e:
        raise DataError(f"cannot read subject metadata {path}: {e}") from e
    missing = [key for key in keys if metadata.get(key) is None] if isinstance(metadata, dict) else list(keys)
    if missing:
        raise DataError(f"subject metadata {path} has no {', '.join(missing)}.")
    return {key: metadata[key] for key in keys}


def cine_phase_datalist(
    datalist: Sequence[Mapping[str, str]], fields: Sequence[str] = (), view: str = SAX_VIEW
) -> list[dict[str, Any]]:
    """Data list items for :func:`cine_phase_dataset`: the cine, its ED and ES frames and target values.

    Args:
        datalist: ``{view: path, "metadata": path}`` per subject (``load_cine_datalist(source, [view],
            metadata=True)``).
        fields: metadata values to carry as targets, e.g. ``("group",)`` or ``("lv_ef_pct", "rv_ef_pct")``.
        view: the image key.

    Returns:
        ``{view: path, "ed_frame": int, "es_frame": int, **{field: value}}`` per subject, in order (no identifiers).

    Raises:
        DataError: when the list is empty, a subject has no image or metadata, or its metadata lacks a value or has
            frames that are not integers.
    """
    if not datalist:
        raise DataError("the data list is empty: no subject to read ED and ES frames for.")
    items = []
    for index, item in enumerate(datalist):
        missing = [key for key in (view, METADATA_KEY) if key not in item]
        if missing:
            raise DataError(
                f"subject #{index} has no {' or '.join(missing)}: list the data with "
                f"load_cine_datalist(source, ['{view}'], metadata=True); ED/ES frames and targets come from each "
                "subject's metadata.json."
            )
        values = read_subject_metadata(item[METADATA_KEY], (ED_KEY, ES_KEY, *fields))
        frames = [values[ED_KEY], values[ES_KEY]]
        if not all(isinstance(frame, int) and not isinstance(frame, bool) for frame in frames):
            raise DataError(
                f"subject metadata {item[METADATA_KEY]}: ed_frame and es_frame must be integers, got {frames}."
            )
        items.append({view: item[view], **values})
    return items


def nifti_folder_datalist(
    input_dir: str | os.PathLike | None, ed_frame: int = 0, es_frame: int | None = None, view: str = SAX_VIEW
) -> list[dict[str, Any]]:
    """Data list items for the NIfTI cines of a folder (inference): ED and ES given, or ED 0 and ES estimated.

    Args:
        input_dir: a folder of ``*.nii`` / ``*.nii.gz`` SAX cines ``[H, W, S, T]`` (not recursive).
        ed_frame: ED frame of every cine (0: ECG-triggered cines start at the R wave).
        es_frame: ES frame of every cine; None estimates it per cine (:func:`farthest_frame`).
        view: the image key.

    Returns:
        ``{view: path, "ed_frame": int, "es_frame": int or None, "file": name}`` per file, in file-name order.

    Raises:
        DataError: when no folder is given, it does not exist or holds no NIfTI file.
    """
    if input_dir is None:
        raise DataError("no input folder given: pass --input_dir <folder of NIfTI SAX cines>.")
    folder = Path(input_dir)
    if not folder.is_dir():
        raise DataError(f"input folder {folder} does not exist.")
    files = sorted(path for path in folder.iterdir() if path.is_file() and path.name.endswith(_NIFTI_SUFFIXES))
    if not files:
        raise DataError(f"no NIfTI files (*.nii, *.nii.gz) in {folder}.")
    return [{view: str(path), ED_KEY: ed_frame, ES_KEY: es_frame, "file": path.name} for path in files]


def farthest_frame(cine: torch.Tensor, reference: int = 0) -> int:
    """The frame that differs most from a reference frame (mean squared difference): ES when the reference is ED.

    Blood is the brightest tissue of a bSSFP cine and the ventricles hold the least of it at end-systole, so the
    frame farthest from ED is ES; on the phantoms it finds the exact ES frame.

    Args:
        cine: ``[T, *spatial]``, time first.
        reference: the reference frame.

    Returns:
        the frame index (``reference`` itself for a single-frame cine).

    Raises:
        DataError: when ``reference`` is outside ``0 .. T - 1``.
    """
    frames = cine.shape[0]
    if not 0 <= reference < frames:
        raise DataError(
            f"reference frame {reference} is outside 0..{frames - 1} of a cine of shape {tuple(cine.shape)}."
        )
    difference = (cine.float() - cine[reference : reference + 1].float()).pow(2).flatten(1).mean(1)
    return int(difference.argmax())


def motion_centre(cine: torch.Tensor) -> list[float]:
    """Centre of a cine's moving part: in-plane, the centroid of the strong temporal standard deviation.

    Args:
        cine: ``[T, H, W, S]``, time first.

    Returns:
        ``[i, j, k]`` voxel coordinates: ``(i, j)`` weighted by the temporal standard deviation (summed over slices)
        above half its maximum, ``k`` the middle of the stack; the image centre when nothing moves.

    Raises:
        ValueError: when ``cine`` is not 4-D.
    """
    if cine.ndim != 4:
        raise ValueError(f"cine must be [T, H, W, S], got shape {tuple(cine.shape)}.")
    spatial = cine.shape[1:]
    middle = [(size - 1) / 2 for size in spatial]
    variation = cine.float().std(dim=0, correction=0).sum(dim=2)  # [H, W]
    weights = (variation - _MOTION_FRACTION * variation.max()).clamp(min=0)
    total = weights.sum()
    if not total > 0:
        return middle
    rows = torch.arange(spatial[0], dtype=weights.dtype)
    columns = torch.arange(spatial[1], dtype=weights.dtype)
    i = float((weights.sum(1) * rows).sum() / total)
    j = float((weights.sum(0) * columns).sum() / total)
    return [i, j, middle[2]]


class CinePhasesd(MapTransform):
    """Take the ED and ES frames of a time-first cine as two channels and cut a window around the heart or centre.

    Args:
        keys: image keys, each ``[T, H, W, S]`` (pre-processed).
        spatial_size: the window ``[H', W', S']``; the image is zero-padded where the window leaves it.
        centre: ``"heart"`` (:func:`motion_centre`) or ``"image"``.
        ed_key: key of the ED frame (an integer).
        es_key: key of the ES frame (an integer, or None to use :func:`farthest_frame` from ED).

    Returns (on call):
        a copy of the sample with each image replaced by ``[2, *spatial_size]`` (ED, ES) and the frames used stored
        under ``ed_key`` / ``es_key``.

    Raises:
        ValueError: for an unknown ``centre`` or a ``spatial_size`` that is not three positive sizes.
        DataError (on call): when a frame is outside the cine, naming the cine's shape.
    """

    def __init__(
        self,
        keys: Sequence[Hashable] | Hashable,
        spatial_size: Sequence[int],
        centre: str = "heart",
        ed_key: str = ED_KEY,
        es_key: str = ES_KEY,
    ) -> None:
        super().__init__(keys)
        if centre not in CROP_CENTRES:
            raise ValueError(f"centre must be one of {CROP_CENTRES}, got {centre!r}.")
        self.spatial_size = tuple(int(s) for s in spatial_size)
        if len(self.spatial_size) != 3 or min(self.spatial_size) < 1:
            raise ValueError(f"spatial_size must be three positive sizes [H, W, S], got {list(spatial_size)}.")
        self.centre = centre
        self.ed_key, self.es_key = ed_key, es_key
        # Padding by half a window on every side lets the window sit anywhere on the image, even across its edge.
        self.pad = BorderPad(spatial_border=[size // 2 + 1 for size in self.spatial_size])

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        sample = dict(data)
        for key in self.key_iterator(sample):
            cine = sample[key]
            frames = cine.shape[0]
            ed = int(sample[self.ed_key])
            es = farthest_frame(cine, ed) if sample.get(self.es_key) is None else int(sample[self.es_key])
            if not (0 <= ed < frames and 0 <= es < frames):
                raise DataError(
                    f"ED frame {ed} / ES frame {es} outside the cine of {frames} frames (shape {tuple(cine.shape)}, "
                    "time first); check ed_frame / es_frame."
                )
            centre = motion_centre(cine) if self.centre == "heart" else [(s - 1) / 2 for s in cine.shape[1:]]
            padded = self.pad(cine[[ed, es]])
            offsets = [size // 2 + 1 for size in self.spatial_size]
            # The window's first voxel: its centre at the nearest voxel (halves round up, after float32 round-off is
            # rounded away), in padded coordinates.
            start = [
                math.floor(round(c - (size - 1) / 2, 3) + 0.5) + o
                for c, o, size in zip(centre, offsets, self.spatial_size)
            ]
            crop = SpatialCrop(roi_start=start, roi_end=[s + size for s, size in zip(start, self.spatial_size)])
            sample[key] = crop(padded)
            sample[self.ed_key], sample[self.es_key] = ed, es
        return sample


def cine_phase_transforms(view: SegmentationView, centre: str = "heart", augment: bool = False) -> Compose:
    """From a SAX cine path to the ``[2, H, W, S]`` ED/ES window; the deterministic part is cacheable.

    Deterministic: load, time to the channel axis, resample and scale as segmentation does
    (:func:`~medssl.data.cine_labelled.cine_preprocessing`), take ED and ES and cut the window
    (:class:`CinePhasesd`). Random (``augment``, training): a rotation about the slice axis of up to 15 degrees and
    an in-plane shift of up to 4 voxels (half the time; no flips or zooms, which would change the anatomy and the
    volumes the tasks read), then intensities scaled and shifted by up to 10 %, as for segmentation.

    Args:
        view: the SAX geometry (``image_size`` is the window, ``spacing`` the grid).
        centre: ``"heart"`` or ``"image"`` (see :class:`CinePhasesd`).
        augment: add the random steps.

    Returns:
        a ``Compose`` mapping ``{view.name: path, "ed_frame": int, "es_frame": int or None, ...}`` to the same with
        the image ``float32 [2, *view.image_size]``.

    Raises:
        ValueError: when the view is not a 3-D stack or ``centre`` is unknown.
    """
    if not view.is_stack:
        raise ValueError(f"the ED/ES input is a SAX stack; got view '{view.name}'.")
    key = view.name
    transforms: list = [
        LoadImaged(keys=key, image_only=True, dtype=np.float32),
        EnsureChannelFirstd(keys=key, channel_dim=-1),
        *cine_preprocessing(view, key),
        CinePhasesd(keys=key, spatial_size=view.image_size, centre=centre),
        EnsureTyped(keys=key, dtype=torch.float32, track_meta=False),
    ]
    if augment:
        transforms += [
            RandAffined(
                keys=key,
                prob=0.5,
                rotate_range=(0.0, 0.0, np.pi / 12),
                translate_range=(4, 4, 0),
                mode="bilinear",
                padding_mode="zeros",
            ),
            RandScaleIntensityd(keys=key, factors=0.1, prob=1.0),
            RandShiftIntensityd(keys=key, offsets=0.1, prob=1.0),
            EnsureTyped(keys=key, dtype=torch.float32, track_meta=False),
        ]
    return Compose(transforms)


def cine_phase_dataset(
    items: Sequence[Mapping[str, Any]],
    view: SegmentationView,
    centre: str = "heart",
    augment: bool = False,
    samples_per_subject: int = 1,
    cache_workers: int = 1,
    progress: bool = True,
) -> Dataset:
    """A cached dataset of ED/ES windows, each subject drawn ``samples_per_subject`` times (random steps per draw).

    Args:
        items: from :func:`cine_phase_datalist` or :func:`nifti_folder_datalist`; other keys (targets) pass through.
        view: the SAX geometry.
        centre: ``"heart"`` or ``"image"``.
        augment: random rotation, shift and intensity changes (training).
        samples_per_subject: draws per subject per epoch (>= 1); the draws share one cached window.
        cache_workers: threads filling the cache.
        progress: show a progress bar while caching.

    Returns:
        a dataset of ``len(items) * samples_per_subject`` samples ``{view.name: float32 [2, *image_size],
        "ed_frame", "es_frame", ...}``.

    Raises:
        DataError: when ``items`` is empty or an item has no image or ED frame.
        ValueError: when ``samples_per_subject`` < 1.
    """
    if samples_per_subject < 1:
        raise ValueError(f"samples_per_subject must be >= 1, got {samples_per_subject}.")
    if not items:
        raise DataError("the data list is empty: no subject to build ED/ES images from.")
    lacking = sorted({key for item in items for key in (view.name, ED_KEY) if key not in item})
    if lacking:
        raise DataError(
            f"data list items lack {lacking}; build them with cine_phase_datalist or nifti_folder_datalist."
        )
    cached = CacheDataset(
        data=[dict(item) for item in items],
        transform=cine_phase_transforms(view, centre, augment),
        # The random steps compute new tensors from the cached window; none writes in place.
        copy_cache=False,
        num_workers=cache_workers,
        progress=progress,
    )
    return cached if samples_per_subject == 1 else ConcatDataset([cached] * samples_per_subject)
