"""Labelled cine CMR frames for fine-tuning: one labelled cardiac phase per sample, cropped around the heart.

A subject contributes per view a cine ``[H, W, S, T]`` (LAX ``[H, W, 1, T]``) and a label cine of the same shape
(ACDC ids: 0 background, 1 RV cavity, 2 LV myocardium, 3 LV cavity; frames without any foreground count as
unlabelled, as in ACDC where only ED and ES are drawn). Pre-processing follows CineMA (Fu et al., 2025,
https://arxiv.org/abs/2506.00679): resample to a target spacing, clip to the 0.95th-99.5th intensity percentiles of
the whole cine and scale to [0, 1]. Unlike pre-training, images are not centre-cropped: a network sees windows of
its ``image_size`` (random windows in training, a sliding window over the whole image at inference), so a heart
far from the image centre is still found. Training windows are centred on the heart or anywhere in the background
(2 : 1, MONAI ``RandCropByPosNegLabeld``), so the network learns the whole field of view it will slide over.

The time axis rides along as the channel axis through the deterministic transforms, so each subject is resampled
once and cached (MONAI ``CacheDataset``); a draw then picks one labelled frame and a random window.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import CacheDataset
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    RandCropByPosNegLabeld,
    Randomizable,
    RandScaleIntensityd,
    RandShiftIntensityd,
    Lambdad,
    ScaleIntensityRangePercentilesd,
    Spacing,
    SpatialPadd,
    SqueezeDimd,
)
from torch.utils.data import ConcatDataset, Dataset

from medssl.data.cine import CINE_VIEWS, INTENSITY_PERCENTILES, SAX_VIEW, label_key
from medssl.errors import DataError

__all__ = [
    "CARDIAC_CLASSES",
    "SegmentationView",
    "parse_segmentation_views",
    "check_label_values",
    "CheckLabelsd",
    "RandLabelledFramed",
    "RandWindowd",
    "cine_preprocessing",
    "labelled_frame_transforms",
    "labelled_frame_dataset",
]

#: Segmentation classes by label id (ACDC): 0 background, 1 RV cavity, 2 LV myocardium, 3 LV cavity.
CARDIAC_CLASSES = ("background", "RV", "MYO", "LV")
_SHOWN_IDS = 10


class SegmentationView:
    """Geometry of one view for a segmentation network.

    Args:
        name: ``"sax"`` (3-D stack ``[H, W, S]``) or a LAX view (2-D ``[H, W]``).
        image_size: the network's window, per spatial axis.
        spacing: target voxel spacing in mm per axis; ``None`` (or a non-positive value) keeps the acquired
            spacing along that axis, e.g. ``[1.5, 1.5, None]`` keeps the SAX slice spacing.
        patch_size: the encoder's patch size (carried for the network; not used by the data).

    Raises:
        ValueError: for an unknown view, sizes of the wrong length, or a non-positive image size.
    """

    def __init__(
        self,
        name: str,
        image_size: Sequence[int],
        spacing: Sequence[float | None],
        patch_size: Sequence[int] | None = None,
    ) -> None:
        if name not in CINE_VIEWS:
            raise ValueError(f"unknown view '{name}'; expected one of {CINE_VIEWS}.")
        dims = 3 if name == SAX_VIEW else 2
        self.name = name
        self.image_size = tuple(int(s) for s in image_size)
        self.spacing = tuple(None if s is None or s <= 0 else float(s) for s in spacing)
        self.patch_size = None if patch_size is None else tuple(int(p) for p in patch_size)
        if len(self.image_size) != dims or len(self.spacing) != dims or min(self.image_size) < 1:
            raise ValueError(
                f"view '{name}' needs {dims} positive image_size values and {dims} spacing values, got "
                f"image_size={list(image_size)}, spacing={list(spacing)}."
            )

    @property
    def is_stack(self) -> bool:
        """Whether the view is a 3-D stack (SAX) rather than a 2-D slice (LAX)."""
        return self.name == SAX_VIEW

    @property
    def pixdim(self) -> list[float]:
        """MONAI ``Spacing`` pixdim for the 3-D file grid; ``-1`` keeps an axis (always the LAX slice normal)."""
        values = [-1.0 if s is None else s for s in self.spacing]
        return values if self.is_stack else [*values, -1.0]

    @property
    def label(self) -> str:
        """Key of the view's label."""
        return label_key(self.name)


def parse_segmentation_views(views: Mapping[str, Mapping[str, Any]]) -> dict[str, SegmentationView]:
    """``{view: {"image_size", "spacing", "patch_size"}}`` (bundle config form) -> ``{view: SegmentationView}``.

    Raises:
        ValueError: when empty or a view is invalid (see :class:`SegmentationView`).
    """
    if not views:
        raise ValueError(f"at least one view is needed, from {CINE_VIEWS}.")
    return {
        name: SegmentationView(name, spec["image_size"], spec["spacing"], spec.get("patch_size"))
        for name, spec in views.items()
    }


def check_label_values(label: np.ndarray | torch.Tensor, num_classes: int, source: str) -> None:
    """Check that a label map holds integer class ids ``0 .. num_classes - 1`` only.

    Args:
        label: any shape.
        num_classes: number of classes ``K`` (4 for background, RV, MYO, LV).
        source: the file or sample, for the message.

    Raises:
        DataError: naming the source and the offending values.
    """
    label = torch.as_tensor(label)
    if label.numel() == 0:
        raise DataError(f"label {source} is empty: shape {tuple(label.shape)}.")
    if label.min() >= 0 and label.max() < num_classes and bool((label == label.round()).all()):
        return
    values = label.unique()
    bad = values[(values != values.round()) | (values < 0) | (values >= num_classes)]
    if bad.numel():
        shown = ", ".join(f"{v:g}" for v in bad[:_SHOWN_IDS].tolist())
        raise DataError(
            f"label {source} holds values {shown}{' ...' if bad.numel() > _SHOWN_IDS else ''} outside the class ids "
            f"0..{num_classes - 1} ({', '.join(f'{i} {n}' for i, n in enumerate(CARDIAC_CLASSES[:num_classes]))})."
        )


class CheckLabelsd(MapTransform):
    """Check label maps for unexpected ids and for a shape that differs from their image's.

    Args:
        keys: label keys.
        image_keys: the image key of each label (same order), whose shape the label must have.
        num_classes: number of classes ``K``.

    Raises (on call):
        DataError: naming the label's file and the offending ids or shapes.
    """

    def __init__(self, keys: Sequence[Hashable], image_keys: Sequence[Hashable], num_classes: int) -> None:
        super().__init__(keys)
        if len(image_keys) != len(self.keys):
            raise ValueError(f"one image key per label key needed, got {list(image_keys)} for {list(self.keys)}.")
        self.image_keys = tuple(image_keys)
        self.num_classes = num_classes

    def __call__(self, data: Mapping[Hashable, Any]) -> Mapping[Hashable, Any]:
        for key, image_key in zip(self.keys, self.image_keys):
            label = data[key]
            source = str(getattr(label, "meta", {}).get("filename_or_obj", key))
            if tuple(label.shape) != tuple(data[image_key].shape):
                raise DataError(
                    f"label {source} has shape {tuple(label.shape)} but its image has {tuple(data[image_key].shape)} "
                    "(time first); a label needs one value per image voxel and frame."
                )
            check_label_values(label, self.num_classes, source)
        return data


class RandLabelledFramed(Randomizable, MapTransform):
    """Pick one random labelled frame per view from time-first cines (``[T, *spatial]``).

    A frame is labelled when its label has any foreground. Each ``(image, label)`` pair draws its own frame.

    Args:
        keys: image keys.
        label_keys: the label key of each image (same order).

    Returns (on call):
        a copy of the sample with each image and label replaced by ``[1, *spatial]``, the drawn frame.

    Raises:
        DataError: when a label has no labelled frame.
    """

    def __init__(self, keys: Sequence[Hashable], label_keys: Sequence[Hashable]) -> None:
        MapTransform.__init__(self, keys)
        if len(label_keys) != len(self.keys):
            raise ValueError(f"one label key per image key needed, got {list(label_keys)} for {list(self.keys)}.")
        self.label_keys = tuple(label_keys)

    def randomize(self, data: Any = None) -> None:
        """Nothing to draw ahead: each pair draws its frame in ``__call__``."""

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        sample = dict(data)
        for key, label in zip(self.keys, self.label_keys):
            frames = torch.nonzero(sample[label].flatten(1).amax(dim=1) > 0).flatten()
            if frames.numel() == 0:
                raise DataError(f"'{label}' has no labelled frame (every frame is background only).")
            index = int(frames[self.R.randint(frames.numel())])
            sample[key], sample[label] = sample[key][index : index + 1], sample[label][index : index + 1]
        return sample


class RandWindowd(Randomizable, MapTransform):
    """One random window of an image and its label, centred on a labelled voxel or on background.

    MONAI's ``RandCropByPosNegLabeld`` with one sample, returning the sample itself rather than a list of one, so
    several views can be cropped one after the other in a single ``Compose``.

    Args:
        keys: the image and label keys to crop.
        label_key: the label whose foreground (any id > 0) and background draw the centres.
        spatial_size: the window; the images must be at least this large (pad first).
        pos: weight of foreground centres.
        neg: weight of background centres.
    """

    def __init__(
        self, keys: Sequence[Hashable], label_key: Hashable, spatial_size: Sequence[int], pos: float = 2.0,
        neg: float = 1.0,
    ) -> None:
        MapTransform.__init__(self, keys)
        self.crop = RandCropByPosNegLabeld(
            keys=keys, label_key=label_key, spatial_size=spatial_size, pos=pos, neg=neg, num_samples=1
        )

    def set_random_state(self, seed: int | None = None, state: np.random.RandomState | None = None) -> RandWindowd:
        super().set_random_state(seed, state)
        self.crop.set_random_state(seed, state)
        return self

    def randomize(self, data: Any = None) -> None:
        """Nothing to draw ahead: the wrapped crop draws its centre when called."""

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        return dict(self.crop(data)[0])


def cine_preprocessing(view: SegmentationView, image_key: str, label_key: str | None = None) -> list:
    """Deterministic steps from time-first cine tensors to the network's grid and intensity range.

    Expects ``[T, H, W, S]`` MetaTensors (LAX ``[T, H, W, 1]``, time moved to the channel axis) with their affine:
    resample the image (bilinear) and label (nearest) to ``view.spacing`` keeping the acquisition axes, then clip the
    image to the 0.95th-99.5th percentiles of the whole cine and scale it to [0, 1] (CineMA). LAX views keep their
    singleton slice axis here; squeeze it afterwards.

    Args:
        view: the view geometry.
        image_key: key of the image.
        label_key: key of its label, or None.

    Returns:
        the list of MONAI dictionary transforms.
    """
    # Array transforms under Lambdad: MONAI's Spacingd takes every key starting with "<key>_" for a metadata dict
    # of <key>, so it cannot resample "sax" next to "sax_label".
    resample = [Lambdad(keys=image_key, func=Spacing(pixdim=view.pixdim, mode="bilinear", dtype=torch.float32))]
    if label_key is not None:
        resample.append(Lambdad(keys=label_key, func=Spacing(pixdim=view.pixdim, mode="nearest", dtype=torch.float32)))
    lower, upper = INTENSITY_PERCENTILES
    return [
        *resample,
        ScaleIntensityRangePercentilesd(keys=image_key, lower=lower, upper=upper, b_min=0.0, b_max=1.0, clip=True),
    ]


def labelled_frame_transforms(
    views: Mapping[str, SegmentationView], num_classes: int = len(CARDIAC_CLASSES), augment: bool = True
) -> Compose:
    """The training pipeline for labelled cine frames; MONAI's ``CacheDataset`` caches its deterministic part.

    Deterministic: load the views and labels, time to the channel axis, check the labels, resample and scale
    (:func:`cine_preprocessing`). Random: pick a labelled frame (:class:`RandLabelledFramed`), pad to the window,
    crop a window on the heart or the background (:class:`RandWindowd`, 2 : 1), drop the LAX slice axis, and
    (``augment``) scale and shift intensities by up to 10 %.

    Args:
        views: view name -> geometry.
        num_classes: number of label classes.
        augment: random intensity scaling and shifting.

    Returns:
        a ``Compose`` mapping ``{view: path, "<view>_label": path}`` to ``{view: float32 [1, *image_size],
        "<view>_label": float32 [1, *image_size]}`` (LAX ``image_size`` is ``[H, W]``).
    """
    images = list(views)
    labels = [view.label for view in views.values()]
    keys = images + labels
    transforms: list = [
        LoadImaged(keys=keys, image_only=True, dtype=np.float32),
        EnsureChannelFirstd(keys=keys, channel_dim=-1),
        CheckLabelsd(keys=labels, image_keys=images, num_classes=num_classes),
    ]
    random: list = [
        RandLabelledFramed(keys=images, label_keys=labels),
        EnsureTyped(keys=images, dtype=torch.float32, track_meta=False),
    ]
    for name, view in views.items():
        pair = [name, view.label]
        window = list(view.image_size) if view.is_stack else [*view.image_size, 1]
        transforms += cine_preprocessing(view, name, view.label)
        random += [
            SpatialPadd(keys=pair, spatial_size=window),
            RandWindowd(keys=pair, label_key=view.label, spatial_size=window),
        ]
        if not view.is_stack:
            random.append(SqueezeDimd(keys=pair, dim=3))
    # Whole-field-of-view cines are large: images are cached in half precision (ample for intensities in [0, 1])
    # and labels as bytes; the drawn frame is turned back into float32.
    transforms += [
        EnsureTyped(keys=images, dtype=torch.float16, track_meta=False),
        EnsureTyped(keys=labels, dtype=torch.uint8, track_meta=False),
    ]
    if augment:
        random += [
            RandScaleIntensityd(keys=images, factors=0.1, prob=1.0),
            RandShiftIntensityd(keys=images, offsets=0.1, prob=1.0),
        ]
    random.append(EnsureTyped(keys=keys, dtype=torch.float32, track_meta=False))
    return Compose(transforms + random)


def labelled_frame_dataset(
    datalist: Sequence[Mapping[str, str]],
    views: Mapping[str, SegmentationView],
    num_classes: int = len(CARDIAC_CLASSES),
    samples_per_subject: int = 1,
    augment: bool = True,
    cache_workers: int = 1,
    progress: bool = True,
) -> Dataset:
    """A cached dataset of random labelled frames and windows, each subject drawn ``samples_per_subject`` times.

    Args:
        datalist: ``{view: path, "<view>_label": path}`` per subject, e.g. from
            ``medssl.data.cine.load_cine_datalist(source, views, labels=True)``.
        views: view name -> geometry.
        num_classes: number of label classes (ids ``0 .. K - 1``).
        samples_per_subject: draws per subject per epoch (>= 1).
        augment: random intensity scaling and shifting.
        cache_workers: threads filling the cache.
        progress: show a progress bar while caching.

    Returns:
        a dataset of ``len(datalist) * samples_per_subject`` samples ``{view: [1, *image_size],
        "<view>_label": [1, *image_size]}``.

    Raises:
        DataError: when the datalist is empty (no labelled subject) or an item lacks a view or label.
        ValueError: when ``samples_per_subject`` < 1.
    """
    if samples_per_subject < 1:
        raise ValueError(f"samples_per_subject must be >= 1, got {samples_per_subject}.")
    if not datalist:
        raise DataError("the labelled set is empty: no subject to train on; check the data source and num_labelled.")
    keys = [key for view in views.values() for key in (view.name, view.label)]
    lacking = sorted({key for item in datalist for key in keys if key not in item})
    if lacking:
        raise DataError(f"datalist items lack {lacking}; list the data with labels=True.")
    cached = CacheDataset(
        data=[{key: item[key] for key in keys} for item in datalist],
        transform=labelled_frame_transforms(views, num_classes, augment),
        # The random steps slice the cached cines into new dicts and compute new tensors; none writes in place.
        copy_cache=False,
        num_workers=cache_workers,
        progress=progress,
    )
    return cached if samples_per_subject == 1 else ConcatDataset([cached] * samples_per_subject)
