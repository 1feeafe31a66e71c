"""Cine CMR pre-training samples: one cardiac phase per sample and view, pre-processed as in CineMA.

A subject contributes a short-axis (SAX) stack ``[H, W, S, T]`` and optionally long-axis two- and four-chamber
slices (LAX-2C / LAX-4C, ``[H, W, 1, T]`` on disk). Each draw picks one random cardiac phase and returns, per view,
a channel-first image of that phase: SAX ``[1, H, W, S]``, LAX ``[1, H, W]``, resampled to a target spacing,
centre-cropped or padded to the view's ``image_size`` and scaled to [0, 1] between the 0.95th and 99.5th intensity
percentiles (Fu et al., "CineMA: A Foundation Model for Cine Cardiac MRI", 2025,
https://arxiv.org/abs/2506.00679).

The time axis rides along as the channel axis through the deterministic transforms, so a subject's whole cine is
resampled once and cached (MONAI ``CacheDataset``); a draw then only selects a frame. The images keep their
acquisition axes (no ``Orientationd``): cardiac planes are oblique, and re-orienting could swap the SAX slice axis
with an in-plane one.

Data sources accepted by :func:`load_cine_datalist`:

- a manifest JSON (the phantom cohort's ``manifest.json``, or any file with a ``"training"`` list whose items name
  the views' NIfTI files relative to the manifest; a MONAI decathlon-style ``"image"`` key is read as the SAX view),
- a folder holding such a ``manifest.json``,
- a folder of subject sub-folders, each with ``sax.nii.gz`` (+ optional ``lax_2c.nii.gz``, ``lax_4c.nii.gz``),
- a flat folder of 4-D SAX cine ``*.nii`` / ``*.nii.gz`` files.

Segmentation labels, when asked for, sit beside each image as ``<view>_label.nii.gz`` (the phantom cohort's layout;
manifest key ``<view>_label``; in a flat folder ``<name>_label.nii.gz`` beside ``<name>.nii.gz``).
"""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import CacheDataset, load_decathlon_datalist
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    Randomizable,
    ResizeWithPadOrCropd,
    ScaleIntensityRangePercentilesd,
    Spacingd,
    SqueezeDimd,
)
from torch.utils.data import ConcatDataset, Dataset

from medssl.errors import DataError

__all__ = [
    "SAX_VIEW",
    "LAX_VIEWS",
    "CINE_VIEWS",
    "INTENSITY_PERCENTILES",
    "LABEL_SUFFIX",
    "METADATA_KEY",
    "label_key",
    "load_cine_datalist",
    "RandCardiacPhased",
    "cine_transforms",
    "cine_dataset",
]

SAX_VIEW = "sax"
LAX_VIEWS = ("lax_2c", "lax_4c")
CINE_VIEWS = (SAX_VIEW, *LAX_VIEWS)
INTENSITY_PERCENTILES = (0.95, 99.5)
LABEL_SUFFIX = "_label"
METADATA_KEY = "metadata"
METADATA_FILE = "metadata.json"
_NIFTI_SUFFIXES = (".nii", ".nii.gz")
_EXPECTED_LAYOUT = (
    "expected a manifest.json, subject folders containing sax.nii.gz (+ optional lax_2c.nii.gz, lax_4c.nii.gz), "
    "or a flat folder of 4-D SAX cine NIfTI files (*.nii / *.nii.gz)"
)


def label_key(view: str) -> str:
    """Key (and file stem) of a view's segmentation label: ``"sax"`` -> ``"sax_label"``."""
    return f"{view}{LABEL_SUFFIX}"


def _is_nifti(path: Path) -> bool:
    return path.is_file() and path.name.endswith(_NIFTI_SUFFIXES)


def _nifti_stem(path: Path) -> str:
    return path.name[: -len(".nii.gz")] if path.name.endswith(".nii.gz") else path.name[: -len(".nii")]


def _view_file(folder: Path, view: str) -> Path | None:
    for suffix in _NIFTI_SUFFIXES:
        candidate = folder / f"{view}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def _items_from_manifest(manifest: Path) -> list[dict[str, Any]]:
    try:
        items = load_decathlon_datalist(manifest, is_segmentation=False, data_list_key="training")
    except (KeyError, TypeError, ValueError) as e:  # ValueError covers malformed JSON
        raise DataError(
            f"cannot read the data list in {manifest}: {e}. Expected a JSON object with a 'training' list whose items "
            f"name the views' NIfTI files ({', '.join(CINE_VIEWS)}) relative to the manifest."
        ) from e
    for item in items:
        if SAX_VIEW not in item and "image" in item:
            item[SAX_VIEW] = item["image"]
    return items


def _items_from_folder(folder: Path) -> list[dict[str, Any]]:
    subject_folders = sorted(p for p in folder.iterdir() if p.is_dir() and _view_file(p, SAX_VIEW) is not None)
    if subject_folders:
        items = []
        for subject in subject_folders:
            files = {key: _view_file(subject, key) for view in CINE_VIEWS for key in (view, label_key(view))}
            files[METADATA_KEY] = subject / METADATA_FILE if (subject / METADATA_FILE).is_file() else None
            items.append({key: str(path) for key, path in files.items() if path is not None})
        return items
    files = {_nifti_stem(path): path for path in sorted(folder.iterdir()) if _is_nifti(path)}
    items = []
    for stem, path in files.items():
        if stem.endswith(LABEL_SUFFIX) and stem[: -len(LABEL_SUFFIX)] in files:
            continue  # the label of another file, not a cine
        label = files.get(label_key(stem))
        items.append({SAX_VIEW: str(path), **({label_key(SAX_VIEW): str(label)} if label else {})})
    return items


def _check_cine_shape(path: str, view: str) -> tuple[int, ...]:
    try:
        shape = tuple(nib.load(path).shape)
    except Exception as e:  # nibabel raises several unrelated types for unreadable files
        raise DataError(f"cannot read NIfTI file {path}: {e}") from e
    if view == SAX_VIEW and len(shape) != 4:
        raise DataError(f"{path}: expected a 4-D SAX cine [H, W, S, T], got shape {shape}.")
    if view != SAX_VIEW and (len(shape) != 4 or shape[2] != 1):
        raise DataError(f"{path}: expected a 4-D {view} cine [H, W, 1, T], got shape {shape}.")
    return shape


def load_cine_datalist(
    source: str | os.PathLike, views: Sequence[str] = CINE_VIEWS, labels: bool = False, metadata: bool = False
) -> list[dict[str, str]]:
    """List the cine NIfTI files of every subject of a data source, checked for presence and dimensions.

    Only the requested views' file paths are kept (subject identifiers and other fields are dropped, so they
    cannot reach logs). NIfTI headers are read to check dimensions; the images themselves are not loaded.

    Args:
        source: a manifest JSON file, a folder containing ``manifest.json``, a folder of subject folders
            (``sax.nii.gz`` + optional ``lax_2c.nii.gz`` / ``lax_4c.nii.gz``), or a flat folder of 4-D SAX cines.
        views: views every subject must provide, a subset of ``("sax", "lax_2c", "lax_4c")``.
        labels: also list each view's segmentation label ``<view>_label`` (a 4-D file of the image's shape).
        metadata: also list each subject's ``metadata.json`` (the phantom generator's targets: exact volumes and
            EF, disease group, landmarks) under ``"metadata"``; the manifest key ``"metadata"`` or a
            ``metadata.json`` in the subject folder.

    Returns:
        one dict per subject, ``{view: absolute NIfTI path}`` for each requested view, plus
        ``{"<view>_label": path}`` with ``labels`` and ``{"metadata": path}`` with ``metadata``.

    Raises:
        DataError: when the source does not exist, holds no NIfTI files, a subject lacks a requested view (or its
            label), a listed file is missing, a file does not have the cine dimensions (SAX ``[H, W, S, T]``, LAX
            ``[H, W, 1, T]``), or a label's shape differs from its image's.
        ValueError: when ``views`` is empty or names an unknown view.
    """
    unknown = [view for view in views if view not in CINE_VIEWS]
    if not views or unknown:
        raise ValueError(f"views must be a non-empty subset of {CINE_VIEWS}, got {list(views)}.")
    path = Path(source).expanduser().absolute()
    if not path.exists():
        raise DataError(f"data source {path} does not exist; {_EXPECTED_LAYOUT}.")
    if path.is_dir() and (path / "manifest.json").is_file():
        path = path / "manifest.json"
    items = _items_from_manifest(path) if path.is_file() else _items_from_folder(path)
    if not items:
        raise DataError(f"no NIfTI files found in {path}; {_EXPECTED_LAYOUT}.")

    # Malformed files are reported before missing views: a wrong file is the likelier cause of both.
    datalist = []
    for item in items:
        entry = {}
        for view in views:
            if not item.get(view):
                continue
            shape = _check_cine_shape(_listed_file(item[view], path, f"{view} image", entry, view), view)
            key = label_key(view)
            if labels and item.get(key):
                label_shape = _check_cine_shape(_listed_file(item[key], path, f"{view} label", entry, key), view)
                if label_shape != shape:
                    raise DataError(
                        f"label {entry[key]} has shape {label_shape} but its image {entry[view]} has {shape}; "
                        "a label must have one value per image voxel and frame."
                    )
        if metadata and item.get(METADATA_KEY):
            _listed_file(item[METADATA_KEY], path, "subject metadata", entry, METADATA_KEY)
        datalist.append(entry)
    for view in views:
        for key, what in ((view, "image"), *(((label_key(view), "label"),) if labels else ())):
            lacking = [index for index, entry in enumerate(datalist) if key not in entry]
            if lacking:
                raise DataError(
                    f"{len(lacking)} of {len(items)} subjects in {path} have no '{view}' {what} (first: subject "
                    f"#{lacking[0]}); add the file ('{key}') or remove '{view}' from the bundle's 'views'."
                )
    lacking = [index for index, entry in enumerate(datalist) if metadata and METADATA_KEY not in entry]
    if lacking:
        raise DataError(
            f"{len(lacking)} of {len(items)} subjects in {path} have no {METADATA_FILE} with their targets (first: "
            f"subject #{lacking[0]}); list it in the manifest ('{METADATA_KEY}') or put it in the subject folder."
        )
    return datalist


def _listed_file(name: str, source: Path, what: str, entry: dict[str, str], key: str) -> str:
    """Resolve a file listed by ``source``, check that it exists and store its absolute path in ``entry[key]``."""
    file = Path(name)
    if not file.is_absolute():  # MONAI keeps paths relative when the file does not exist
        file = source.parent / file
    if not file.is_file():
        raise DataError(f"{what} {file} listed in {source} does not exist.")
    entry[key] = str(file.resolve())
    return entry[key]


class RandCardiacPhased(Randomizable, MapTransform):
    """Select one random cardiac phase from cine images stored time-first (``[T, *spatial]``).

    One phase fraction ``u ~ U[0, 1)`` is drawn per call and each view takes frame ``floor(u * T_view)``, so views
    with different frame counts show the same point of the cardiac cycle.

    Args:
        keys: keys of the cine images, each ``[T, *spatial]`` with ``T >= 1``.
        allow_missing_keys: do not raise when a key is absent.

    Returns (on call):
        a copy of the sample with each key replaced by ``[1, *spatial]``, the selected frame.

    Raises:
        ValueError: when an image has no frames.
    """

    def __init__(self, keys: Sequence[Hashable] | Hashable, allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self._phase = 0.0

    def randomize(self, data: Any = None) -> None:
        self._phase = float(self.R.uniform(0.0, 1.0))

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        self.randomize()
        sample = dict(data)
        for key in self.key_iterator(sample):
            frames = sample[key].shape[0]
            if frames < 1:
                raise ValueError(f"'{key}' has no frames: shape {tuple(sample[key].shape)}.")
            index = min(int(self._phase * frames), frames - 1)
            sample[key] = sample[key][index : index + 1]
        return sample


def _view_geometry(views: Mapping[str, Mapping[str, Sequence[float]]]) -> dict[str, tuple[list[int], list[float]]]:
    geometry = {}
    for view, spec in views.items():
        if view not in CINE_VIEWS:
            raise ValueError(f"unknown view '{view}'; expected one of {CINE_VIEWS}.")
        dims = 3 if view == SAX_VIEW else 2
        image_size = [int(s) for s in spec["image_size"]]
        spacing = [float(s) for s in spec["spacing"]]
        if len(image_size) != dims or len(spacing) != dims or min(image_size) < 1 or min(spacing) <= 0:
            raise ValueError(
                f"view '{view}' needs {dims} positive image_size and spacing values, "
                f"got image_size={image_size}, spacing={spacing}."
            )
        geometry[view] = (image_size, spacing)
    return geometry


def cine_transforms(views: Mapping[str, Mapping[str, Sequence[float]]], random_phase: bool = True) -> Compose:
    """MONAI dictionary transforms from NIfTI paths to pre-processed cine images (CineMA pre-processing).

    Deterministic steps (cacheable): load, move time to the channel axis, resample to ``spacing`` (LAX keeps its
    through-plane thickness), centre crop/pad to ``image_size``, clip to the 0.95th-99.5th intensity percentiles of
    the whole cine and scale to [0, 1]. The random step (:class:`RandCardiacPhased`) then picks one phase.

    Args:
        views: per view, ``{"image_size": [H, W, S] for SAX or [H, W] for LAX, "spacing": mm per axis}``; other
            keys (e.g. a network's ``patch_size``) are ignored. CineMA: SAX 192x192x16 at 1x1x10 mm, LAX 256x256
            at 1x1 mm.
        random_phase: append :class:`RandCardiacPhased`; without it each view stays ``[T, *image_size]``.

    Returns:
        a ``Compose`` mapping ``{view: path}`` to ``{view: float32 Tensor[1, *image_size]}``
        (``[T, *image_size]`` when ``random_phase`` is False).

    Raises:
        ValueError: for an unknown view or an image_size / spacing of the wrong length or sign.
    """
    geometry = _view_geometry(views)
    keys = list(geometry)
    lax_keys = [view for view in keys if view != SAX_VIEW]
    transforms: list = [
        LoadImaged(keys=keys, image_only=True, dtype=np.float32),
        EnsureChannelFirstd(keys=keys, channel_dim=-1),
    ]
    for view, (image_size, spacing) in geometry.items():
        # LAX is [T, H, W, 1]: a non-positive pixdim keeps the slice thickness along the singleton axis.
        pixdim = spacing if view == SAX_VIEW else [*spacing, -1.0]
        size = image_size if view == SAX_VIEW else [*image_size, 1]
        transforms += [
            Spacingd(keys=view, pixdim=pixdim, mode="bilinear", dtype=torch.float32),
            ResizeWithPadOrCropd(keys=view, spatial_size=size),
        ]
    if lax_keys:
        transforms.append(SqueezeDimd(keys=lax_keys, dim=3))
    lower, upper = INTENSITY_PERCENTILES
    transforms += [
        ScaleIntensityRangePercentilesd(keys=keys, lower=lower, upper=upper, b_min=0.0, b_max=1.0, clip=True),
        EnsureTyped(keys=keys, dtype=torch.float32, track_meta=False),
    ]
    if random_phase:
        transforms.append(RandCardiacPhased(keys=keys))
    return Compose(transforms)


def cine_dataset(
    datalist: Sequence[Mapping[str, str]],
    views: Mapping[str, Mapping[str, Sequence[float]]],
    samples_per_subject: int = 1,
    cache_workers: int = 1,
    progress: bool = True,
) -> Dataset:
    """A cached dataset of single-phase cine samples, each subject drawn ``samples_per_subject`` times per epoch.

    Every subject's pre-processed cine is cached once (MONAI ``CacheDataset``); the repeats share that cache and
    differ only in the random phase.

    Args:
        datalist: output of :func:`load_cine_datalist`.
        views: view geometry, see :func:`cine_transforms`.
        samples_per_subject: draws per subject per epoch (>= 1).
        cache_workers: threads used to fill the cache.
        progress: show a progress bar while caching.

    Returns:
        a dataset of ``len(datalist) * samples_per_subject`` samples ``{view: Tensor[1, *image_size]}``.

    Raises:
        ValueError: when ``samples_per_subject`` < 1, the datalist is empty or lacks a view.
    """
    if samples_per_subject < 1:
        raise ValueError(f"samples_per_subject must be >= 1, got {samples_per_subject}.")
    if not datalist:
        raise ValueError("datalist is empty.")
    lacking = sorted({view for item in datalist for view in views if view not in item})
    if lacking:
        raise ValueError(f"datalist items lack the views {lacking}.")
    cached = CacheDataset(
        data=[{view: item[view] for view in views} for item in datalist],
        transform=cine_transforms(views),
        # The random step only slices the cached cine into a new dict, so the cache needs no defensive deep copy.
        copy_cache=False,
        num_workers=cache_workers,
        progress=progress,
    )
    return cached if samples_per_subject == 1 else ConcatDataset([cached] * samples_per_subject)
