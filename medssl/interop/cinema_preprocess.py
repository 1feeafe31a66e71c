"""CineMA's expected input as MONAI transforms: view geometry, spacing, intensity clipping and scaling, heart crop.

CineMA (Fu et al., 2025, https://arxiv.org/abs/2506.00679) runs on images resampled to its config's
``data.<sax|lax>.spacing`` (SAX 1 x 1 x 10 mm, LAX 1 x 1 mm), intensities clipped to the 0.95th-99.5th percentiles
and scaled to [0, 1], and cropped to ``data.<view>.patch_size`` (SAX 192 x 192 x 16, LAX 256 x 256) around the heart,
SAX slices zero-padded at the end. The resampling and intensity steps are medssl's own cine pre-processing
(:func:`~medssl.data.cine_labelled.cine_preprocessing`, which follows CineMA); :class:`CropAroundHeartd` adds the
crop. Whole-image segmentation (:class:`~medssl.tasks.segmentation.CineSegmentationPredictor`) slides the window over
the resampled image instead of cropping once, so the heart need not be at a known place.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import BorderPad, MapTransform, SpatialCrop

from medssl.data.cine_labelled import SegmentationView, cine_preprocessing
from medssl.errors import ConfigError, DataError
from medssl.interop.cinema_config import CineMAConfig

__all__ = ["cinema_views", "CropAroundHeartd", "cinema_preprocessing", "prepare_cinema_input"]


def cinema_views(config: CineMAConfig) -> dict[str, SegmentationView]:
    """The views of a CineMA model as medssl view geometries: window = ``patch_size``, spacing from the config.

    Args:
        config: the parsed CineMA config.

    Returns:
        view name -> :class:`~medssl.data.cine_labelled.SegmentationView`.

    Raises:
        ConfigError: for a view medssl's cine pipeline does not read (``lax_3c``) or a spacing of the wrong length.
    """
    views = {}
    for name, spec in config.views.items():
        try:
            views[name] = SegmentationView(name, spec["image_size"], config.spacing[name])
        except ValueError as error:
            raise ConfigError(f"CineMA view {name!r} cannot be pre-processed by medssl: {error}") from error
    return views


class CropAroundHeartd(MapTransform):
    """Crop or zero-pad ``[C, *spatial]`` images to a window centred in-plane on the heart (CineMA's input crop).

    The two in-plane axes are centred on ``center_mm`` (the heart centre in world millimetres; the image centre when
    None); further axes (SAX slices) keep the first ``spatial_size`` entries and are zero-padded at the end, as
    CineMA pads its 16-slice stacks; axes beyond ``spatial_size`` (a LAX file's singleton slice axis) are kept.
    Affines are updated (MONAI ``SpatialCrop`` / ``BorderPad``).

    Args:
        keys: the images.
        spatial_size: the window, 2 (LAX) or 3 (SAX) axes.
        center_mm: heart centre ``(x, y, z)`` in the affine's world coordinates, or None.
        allow_missing_keys: skip absent keys.
    """

    def __init__(
        self,
        keys: KeysCollection,
        spatial_size: Sequence[int],
        center_mm: Sequence[float] | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.spatial_size = tuple(int(s) for s in spatial_size)
        self.center_mm = None if center_mm is None else np.asarray(center_mm, dtype=float)

    def _starts(self, image: MetaTensor) -> list[int]:
        """First voxel of the window per axis (negative or past the end where it must be padded)."""
        dims = image.shape[1 : 1 + len(self.spatial_size)]
        if self.center_mm is None:
            in_plane = [(dim - size) // 2 for dim, size in zip(dims[:2], self.spatial_size)]
        else:
            voxel = np.linalg.inv(np.asarray(image.affine, dtype=float)) @ np.append(self.center_mm, 1.0)
            in_plane = [int(round(voxel[axis])) - self.spatial_size[axis] // 2 for axis in range(2)]
            if any(not 0 <= voxel[axis] < dims[axis] for axis in range(2)):
                raise DataError(f"the heart centre lies outside the image (voxel {np.round(voxel[:3], 1).tolist()}).")
        return in_plane + [0] * (len(self.spatial_size) - 2)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        out = dict(data)
        for key in self.key_iterator(out):
            image = out[key]
            if image.ndim - 1 < len(self.spatial_size):
                raise DataError(
                    f"{key}: image {tuple(image.shape)} has fewer axes than the window {self.spatial_size}."
                )
            starts = self._starts(image)
            dims = image.shape[1 : 1 + len(self.spatial_size)]
            lows = [max(start, 0) for start in starts]
            highs = [min(start + size, dim) for start, size, dim in zip(starts, self.spatial_size, dims)]
            kept = list(image.shape[1 + len(self.spatial_size) :])
            cropped = SpatialCrop(roi_start=lows + [0] * len(kept), roi_end=highs + kept)(image)
            border = []
            for start, size, low, high in zip(starts, self.spatial_size, lows, highs):
                before = low - start
                border += [before, size - (high - low) - before]
            out[key] = BorderPad(spatial_border=border + [0, 0] * len(kept))(cropped)
        return out


def cinema_preprocessing(view: SegmentationView, key: str, center_mm: Sequence[float] | None = None) -> list:
    """CineMA's input chain for time-first cines ``[T, H, W, S]`` (LAX ``[T, H, W, 1]``) with their affine.

    Args:
        view: the view geometry (:func:`cinema_views`).
        key: the image key.
        center_mm: heart centre in world mm for the crop; None centres the window on the image.

    Returns:
        MONAI dictionary transforms: resample to the view's spacing, clip to the 0.95-99.5th percentiles and scale to
        [0, 1], crop or pad to the window (:class:`CropAroundHeartd`).
    """
    return [*cine_preprocessing(view, key), CropAroundHeartd(key, view.image_size, center_mm)]


def prepare_cinema_input(
    cine: MetaTensor,
    view: SegmentationView,
    frames: Sequence[int],
    center_mm: Sequence[float] | None = None,
) -> torch.Tensor:
    """A CineMA network's input from a cine: the chosen frames stacked as channels, pre-processed and cropped.

    CineMA's classification and EF models take the ED and ES frames as 2 channels; its segmentation and landmark
    models take one frame.

    Args:
        cine: ``[H, W, S, T]`` (LAX ``[H, W, 1, T]``) MetaTensor with its affine.
        view: the view geometry (:func:`cinema_views`).
        frames: the frames, in channel order.
        center_mm: heart centre in world mm; None for the image centre.

    Returns:
        float32 ``[1, len(frames), *view.image_size]``.

    Raises:
        DataError: for frames outside the cine or a cine of the wrong shape.
    """
    if cine.ndim != 4 or not view.is_stack and cine.shape[2] != 1:
        raise DataError(f"expected a {view.name} cine [H, W, S, T] (LAX S = 1), got shape {tuple(cine.shape)}.")
    chosen = [int(t) for t in frames]
    if not chosen or any(not 0 <= t < cine.shape[-1] for t in chosen):
        raise DataError(f"frames {chosen} out of range for a cine of {cine.shape[-1]} frames.")
    # Intensity percentiles over the whole cine, as for training, then the chosen frames.
    data = {"image": MetaTensor(cine.as_tensor().float().permute(3, 0, 1, 2), affine=cine.affine)}
    # A plain loop rather than Compose, which would wrap the crop's DataError in a RuntimeError.
    for transform in cinema_preprocessing(view, "image", center_mm):
        data = transform(data)
    image = data["image"].as_tensor()[chosen]
    return (image if view.is_stack else image[..., 0])[None].float()
