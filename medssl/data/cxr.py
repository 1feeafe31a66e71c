"""Chest radiographs for masked-autoencoder pre-training and multi-label fine-tuning: data lists and MONAI transforms.

The recipe is Xiao et al.'s (2023, "Delving into Masked Autoencoders for Multi-Label Thorax Disease Classification",
WACV, https://arxiv.org/abs/2210.12843): pre-training sees random-resized crops of area scale 0.5-1 with horizontal
flips; fine-tuning sees the whole image under RandAugment of magnitude 6 (Cubuk et al., 2020, "RandAugment:
Practical automated data augmentation with a reduced search space", CVPR Workshops, https://arxiv.org/abs/1909.13719).

Images are ``[1, H, W]`` float32 in [0, 1], rows top to bottom and columns as stored (patient's right on the image's
left in a PA view), bright = attenuating. 8/16-bit PNG and JPEG are scaled by their bit depth; DICOM DX/CR goes
through :func:`~medssl.io.dx_read.read_dx` (Modality LUT, VOI LUT / window, MONOCHROME1 inversion). Sources:

- a cohort manifest (``manifest.json`` or its folder) with ``training`` / ``test`` lists of ``{"image": path,
  "label": multi-hot}``, as :func:`~medssl.data.cxr_phantom.ensure_cxr_cohort` writes it;
- a folder of PNG / JPEG / DICOM radiographs (inference): :func:`radiograph_folder_files`.
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
from monai.config import KeysCollection
from monai.data import load_decathlon_datalist
from monai.transforms import (
    Affine,
    AdjustContrast,
    Compose,
    EnsureTyped,
    GaussianSmooth,
    MapTransform,
    RandFlipd,
    RandGaussianNoise,
    RandomizableTransform,
    RandScaleCropd,
    Resized,
    ScaleIntensity,
    ScaleIntensityFixedMean,
    ShiftIntensity,
)
from monai.utils import convert_to_tensor
from PIL import Image, UnidentifiedImageError

from medssl.errors import DataError

__all__ = [
    "CXR_VIEW",
    "LABEL_KEY",
    "FILE_KEY",
    "IMAGE_SUFFIXES",
    "RAND_AUGMENT_OPS",
    "load_cxr_datalist",
    "radiograph_folder_files",
    "read_radiograph",
    "LoadRadiographd",
    "RandAugmentd",
    "pretraining_transforms",
    "finetuning_transforms",
    "evaluation_transforms",
]

#: Key (and view name) of the radiograph in samples, batches and the networks.
CXR_VIEW = "cxr"
#: Key of the multi-hot finding vector.
LABEL_KEY = "label"
#: Key of the image's path relative to its source (reported by inference, never patient data).
FILE_KEY = "file"
#: Suffixes read with Pillow; every other file is tried as DICOM (exports often have no suffix).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_IGNORED_SUFFIXES = (".json", ".csv", ".txt", ".md", ".xml", ".html", ".pdf")
#: RandAugment's operations here, each a MONAI transform whose strength grows linearly with the magnitude (see
#: :class:`RandAugmentd`).
RAND_AUGMENT_OPS = (
    "rotate",
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
    "contrast",
    "gamma",
    "brightness",
    "intensity_scale",
    "smooth",
    "sharpen",
    "noise",
)
# Strength of each operation at the maximum magnitude (10): degrees, shear factor, fraction of the image side,
# contrast factor about the mean, log2 of the gamma, intensity offset, intensity factor, Gaussian sigma in pixels,
# unsharp-mask amount, noise standard deviation. Geometric ranges are those of timm's RandAugment (used by Xiao et
# al.); intensity ranges keep a [0, 1] radiograph readable at magnitude 10.
_MAX_STRENGTH = {
    "rotate": 30.0,
    "shear_x": 0.3,
    "shear_y": 0.3,
    "translate_x": 0.45,
    "translate_y": 0.45,
    "contrast": 0.9,
    "gamma": 1.0,
    "brightness": 0.3,
    "intensity_scale": 0.5,
    "smooth": 2.0,
    "sharpen": 1.0,
    "noise": 0.1,
}
_SIGNED = {"rotate", "shear_x", "shear_y", "translate_x", "translate_y", "contrast", "gamma", "brightness",
           "intensity_scale"}
_SHARPEN_SIGMA = 1.0


def _manifest_path(source: str | os.PathLike) -> Path:
    path = Path(source)
    manifest = path / "manifest.json" if path.is_dir() else path
    if not manifest.is_file():
        raise DataError(
            f"{source}: no chest X-ray manifest (a manifest.json with 'training' and 'test' lists of "
            "{'image': path, 'label': multi-hot}); generate one with medssl.data.cxr_phantom.ensure_cxr_cohort."
        )
    return manifest


def load_cxr_datalist(
    source: str | os.PathLike, split: str = "training", findings: Sequence[str] | None = None, labels: bool = True
) -> list[dict[str, Any]]:
    """Read one split of a chest X-ray manifest as ``{"cxr": path, "label": [K] float, "file": relative path}`` items.

    Args:
        source: ``manifest.json`` or its folder; paths in it are relative to it (MONAI decathlon style).
        split: the list to read (``"training"`` or ``"test"``).
        findings: expected finding names, in label order; checked against the manifest's ``findings`` when it has
            them (None skips the check).
        labels: require a multi-hot ``label`` of ``len(findings)`` 0/1 values per item (pre-training passes False
            and ignores labels).

    Returns:
        the items in manifest order; ``label`` (with ``labels``) is a float32 ``[K]`` array.

    Raises:
        DataError: for a missing or malformed manifest, an absent or empty split, a manifest whose findings differ
            from ``findings``, or an item without a valid label (naming its index).
    """
    manifest = _manifest_path(source)
    try:
        header = json.loads(manifest.read_text())
        if not isinstance(header, dict) or not header.get(split):
            raise DataError(f"the '{split}' list of {manifest} is missing or empty.")
        raw = load_decathlon_datalist(manifest, is_segmentation=False, data_list_key=split)
    except (KeyError, TypeError, ValueError) as error:  # ValueError covers malformed JSON
        if isinstance(error, DataError):
            raise
        raise DataError(f"cannot read the '{split}' list of {manifest}: {error}") from error
    listed = header.get("findings")
    if findings is not None and listed is not None and list(listed) != list(findings):
        raise DataError(f"{manifest} labels the findings {list(listed)}, but the bundle expects {list(findings)}.")
    root = manifest.parent.resolve()
    items = []
    for index, entry in enumerate(raw):
        if "image" not in entry:
            raise DataError(f"item #{index} of the '{split}' list of {manifest} has no 'image'.")
        item: dict[str, Any] = {CXR_VIEW: entry["image"], FILE_KEY: os.path.relpath(entry["image"], root)}
        if labels:
            item[LABEL_KEY] = _multi_hot(entry.get(LABEL_KEY), len(findings) if findings is not None else None,
                                         f"item #{index} of the '{split}' list of {manifest}")
        items.append(item)
    return items


def _multi_hot(value: Any, size: int | None, where: str) -> np.ndarray:
    try:
        vector = np.asarray(value, dtype=np.float32)
    except (TypeError, ValueError):
        vector = np.zeros(0, np.float32)
    if vector.ndim != 1 or (size is not None and vector.size != size) or vector.size == 0 or not np.isin(
        vector, (0.0, 1.0)
    ).all():
        expected = f"{size} " if size is not None else ""
        raise DataError(f"{where}: 'label' must be a multi-hot list of {expected}0/1 values, got {value!r}.")
    return vector


def radiograph_folder_files(folder: str | os.PathLike | None) -> list[Path]:
    """The candidate radiographs under a folder (recursively, sorted): PNG / JPEG and every other file as DICOM.

    Hidden files and obvious non-images (``.json``, ``.csv``, ``.txt``, ...) are left out; whether a candidate is a
    readable chest radiograph is decided when it is read (:func:`read_radiograph`).

    Args:
        folder: the input folder.

    Returns:
        the files.

    Raises:
        DataError: when the folder is not given, does not exist or holds no candidate file.
    """
    if folder is None or not Path(folder).is_dir():
        raise DataError(f"input folder {folder} does not exist: pass --input_dir with a folder of PNG or DICOM files.")
    root = Path(folder)
    files = sorted(
        path
        for path in root.rglob("*")
        if path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(root).parts)
        and path.suffix.lower() not in _IGNORED_SUFFIXES
    )
    if not files:
        raise DataError(f"input folder {folder} holds no PNG, JPEG or DICOM file.")
    return files


def _pillow_grey(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as image:
            image.load()
            mode, array = image.mode, np.asarray(image)
    except (UnidentifiedImageError, OSError) as error:
        raise DataError(f"{path.name}: not a readable image ({type(error).__name__})") from error
    if mode in ("L", "LA"):
        return (array[..., 0] if array.ndim == 3 else array).astype(np.float32) / 255.0
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        return array.astype(np.float32) / 65535.0
    if mode in ("RGB", "RGBA"):
        colour = array[..., :3].astype(np.float32)
        # A grey radiograph saved as RGB has three equal channels; anything else is a colour picture.
        if np.array_equal(colour[..., 0], colour[..., 1]) and np.array_equal(colour[..., 0], colour[..., 2]):
            return colour[..., 0] / 255.0
    raise DataError(f"{path.name}: colour or non-greyscale image (mode {mode}); radiographs are greyscale")


def read_radiograph(
    path: str | os.PathLike, min_size: int | Sequence[int] | None = None, body_part: str | None = "CHEST"
) -> np.ndarray:
    """Read one radiograph (PNG / JPEG by bit depth, anything else as DX/CR DICOM) as float32 ``[H, W]`` in [0, 1].

    Args:
        path: the file.
        min_size: smallest accepted ``(rows, columns)`` (an int for both), e.g. the network's patch grid, so that
            every patch of the resized image holds at least one source pixel.
        body_part: expected DICOM BodyPartExamined (files that state another part are refused; files without it are
            accepted); None accepts any.

    Returns:
        the image, bright = attenuating.

    Raises:
        DataError: for an unreadable file, a colour image, a DICOM file that is not a single greyscale projection
            radiograph of ``body_part``, or an image smaller than ``min_size`` (all naming the file).
    """
    from medssl.io.dx_read import read_dx  # pydicom is imported only when a DICOM file is read

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path.name}: no such file")
    if path.suffix.lower() in IMAGE_SUFFIXES:
        image = _pillow_grey(path)
        if min_size is not None:
            need = (int(min_size),) * 2 if isinstance(min_size, int) else tuple(int(v) for v in min_size)
            if image.shape[0] < need[0] or image.shape[1] < need[1]:
                raise DataError(
                    f"{path.name}: image is {image.shape[0]}x{image.shape[1]} pixels, smaller than the minimum "
                    f"{need[0]}x{need[1]}"
                )
        return image
    return read_dx(path, min_size=min_size, body_part=body_part).image


class LoadRadiographd(MapTransform):
    """Load radiograph files into ``[1, H, W]`` float32 tensors in [0, 1] (:func:`read_radiograph`).

    Args:
        keys: keys holding file paths.
        min_size: smallest accepted ``(rows, columns)``.
        body_part: expected DICOM BodyPartExamined, or None.
        allow_missing_keys: do not raise when a key is absent.

    Raises (on call):
        DataError: see :func:`read_radiograph`.
    """

    def __init__(
        self,
        keys: KeysCollection,
        min_size: int | Sequence[int] | None = None,
        body_part: str | None = "CHEST",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.min_size = min_size
        self.body_part = body_part

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Args: data with file paths under ``keys``. Returns: a copy with ``[1, H, W]`` tensors there."""
        sample = dict(data)
        for key in self.key_iterator(sample):
            sample[key] = torch.from_numpy(read_radiograph(sample[key], self.min_size, self.body_part))[None]
        return sample


class RandAugmentd(RandomizableTransform, MapTransform):
    """RandAugment for greyscale radiographs, built from MONAI transforms (Cubuk et al., 2020,
    https://arxiv.org/abs/1909.13719).

    Per sample, ``num_ops`` operations are drawn uniformly with replacement from ``ops`` and applied in turn, each at
    strength ``m / max_magnitude * max_strength`` with a random sign for the symmetric ones; ``m`` is ``magnitude``,
    or, with ``magnitude_std`` > 0, a draw from ``N(magnitude, magnitude_std)`` clipped to ``[0, max_magnitude]``
    per operation (timm's ``mstd``; Xiao et al. fine-tune with ``rand-m6-mstd0.5``). Operations and their strength at
    magnitude 10: ``rotate`` 30 degrees, ``shear_x`` / ``shear_y`` 0.3 (MONAI ``Affine``), ``translate_x`` /
    ``translate_y`` 45 % of the side (``Affine``, zero fill), ``contrast`` factor 1 +- 0.9 about the mean
    (``ScaleIntensityFixedMean``), ``gamma`` 2**+-1 (``AdjustContrast``), ``brightness`` +-0.3 (``ShiftIntensity``),
    ``intensity_scale`` x(1 +- 0.5) (``ScaleIntensity``), ``smooth`` Gaussian sigma 2 px (``GaussianSmooth``),
    ``sharpen`` unsharp mask ``x + a (x - G_1 x)`` with amount 1 (``GaussianSmooth``), ``noise`` Gaussian of standard
    deviation 0.1 (``RandGaussianNoise``). Results are clipped to [0, 1], as an 8-bit image would be. Magnitude 0 is
    the identity. Every key of a sample gets the same operations.

    Args:
        keys: image keys, each ``[C, H, W]`` in [0, 1].
        num_ops: operations per sample ``N`` (>= 0; RandAugment's default 2).
        magnitude: ``M`` in ``[0, max_magnitude]`` (Xiao et al.: 6).
        magnitude_std: standard deviation of the per-operation magnitude (>= 0; Xiao et al.: 0.5).
        max_magnitude: the magnitude of full strength (10, as in the paper).
        ops: the operations to draw from, a subset of :data:`RAND_AUGMENT_OPS`.
        allow_missing_keys: do not raise when a key is absent.

    Raises:
        ValueError: for a negative ``num_ops`` or ``magnitude_std``, a magnitude outside ``[0, max_magnitude]``, or
            an unknown or empty list of operations.
    """

    def __init__(
        self,
        keys: KeysCollection,
        num_ops: int = 2,
        magnitude: float = 6.0,
        magnitude_std: float = 0.5,
        max_magnitude: float = 10.0,
        ops: Sequence[str] = RAND_AUGMENT_OPS,
        allow_missing_keys: bool = False,
    ) -> None:
        RandomizableTransform.__init__(self, prob=1.0)
        MapTransform.__init__(self, keys, allow_missing_keys)
        unknown = sorted(set(ops) - set(RAND_AUGMENT_OPS))
        if unknown or not ops:
            raise ValueError(f"ops must be a non-empty subset of {list(RAND_AUGMENT_OPS)}, got {list(ops)}.")
        if num_ops < 0 or magnitude_std < 0 or max_magnitude <= 0 or not 0 <= magnitude <= max_magnitude:
            raise ValueError(
                f"need num_ops >= 0, magnitude_std >= 0 and 0 <= magnitude <= max_magnitude > 0, got num_ops={num_ops}, "
                f"magnitude={magnitude}, magnitude_std={magnitude_std}, max_magnitude={max_magnitude}."
            )
        self.num_ops = int(num_ops)
        self.magnitude = float(magnitude)
        self.magnitude_std = float(magnitude_std)
        self.max_magnitude = float(max_magnitude)
        self.ops = tuple(ops)
        self._draws: list[tuple[str, float, int]] = []

    def randomize(self, data: Any = None) -> None:
        """Draw the operations, their signed strengths and the noise seeds of one sample."""
        self._draws = []
        for _ in range(self.num_ops):
            name = self.ops[int(self.R.randint(len(self.ops)))]
            level = self.magnitude
            if self.magnitude_std > 0:
                level = float(np.clip(self.R.normal(level, self.magnitude_std), 0.0, self.max_magnitude))
            strength = level / self.max_magnitude * _MAX_STRENGTH[name]
            if name in _SIGNED and self.R.uniform() < 0.5:
                strength = -strength
            self._draws.append((name, strength, int(self.R.randint(2**31))))

    @staticmethod
    def apply_op(image: torch.Tensor, name: str, strength: float, seed: int = 0) -> torch.Tensor:
        """Apply one operation at a given signed strength.

        Args:
            image: ``[C, H, W]``.
            name: one of :data:`RAND_AUGMENT_OPS`.
            strength: in the operation's units (see the class docstring); 0 is the identity.
            seed: seed of the ``noise`` operation.

        Returns:
            ``[C, H, W]`` float32, not yet clipped.

        Raises:
            ValueError: for an unknown operation or an image that is not ``[C, H, W]``.
        """
        if name not in RAND_AUGMENT_OPS:
            raise ValueError(f"unknown RandAugment operation {name!r}; choose from {list(RAND_AUGMENT_OPS)}.")
        if image.ndim != 3:
            raise ValueError(f"expected a [C, H, W] image, got shape {tuple(image.shape)}.")
        if strength == 0:
            return image
        if name in ("rotate", "shear_x", "shear_y", "translate_x", "translate_y"):
            height, width = image.shape[1:]
            params: dict[str, Any] = {
                "rotate": {"rotate_params": math.radians(strength)},
                # MONAI's 2-D shear_params (s01, s10): s01 moves rows with the column, s10 columns with the row.
                "shear_x": {"shear_params": (0.0, strength)},
                "shear_y": {"shear_params": (strength, 0.0)},
                "translate_x": {"translate_params": (0.0, strength * width)},
                "translate_y": {"translate_params": (strength * height, 0.0)},
            }[name]
            out = Affine(**params, padding_mode="zeros", mode="bilinear", image_only=True)(image)
        elif name == "contrast":
            out = ScaleIntensityFixedMean(factor=strength, fixed_mean=True)(image)
        elif name == "gamma":
            out = AdjustContrast(gamma=2.0**strength)(image)
        elif name == "brightness":
            out = ShiftIntensity(offset=strength)(image)
        elif name == "intensity_scale":
            out = ScaleIntensity(minv=None, maxv=None, factor=strength)(image)
        elif name == "smooth":
            out = GaussianSmooth(sigma=strength)(image)
        elif name == "sharpen":
            out = image + strength * (image - GaussianSmooth(sigma=_SHARPEN_SIGMA)(image))
        else:
            noise = RandGaussianNoise(prob=1.0, std=strength, sample_std=False)
            noise.set_random_state(seed=seed)
            out = noise(image)
        return convert_to_tensor(out, dtype=torch.float32, track_meta=False)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """Args: data with ``[C, H, W]`` images under ``keys``. Returns: a copy with the augmented images."""
        self.randomize()
        sample = dict(data)
        for key in self.key_iterator(sample):
            image = torch.as_tensor(sample[key], dtype=torch.float32)
            for name, strength, seed in self._draws:
                image = self.apply_op(image, name, strength, seed)
            sample[key] = image.clamp(0.0, 1.0)
        return sample


def _loading(key: str, min_size: int | Sequence[int] | None, body_part: str | None) -> list:
    return [LoadRadiographd(key, min_size, body_part)]


def _finishing(key: str) -> list:
    return [EnsureTyped(keys=key, dtype=torch.float32, track_meta=False)]


def _resize(key: str, image_size: Sequence[int]) -> Resized:
    # Anti-aliasing: radiographs on disk are usually far larger than the network's input.
    return Resized(keys=key, spatial_size=tuple(image_size), mode="bilinear", anti_aliasing=True)


def pretraining_transforms(
    image_size: Sequence[int],
    min_scale: float = 0.5,
    flip_prob: float = 0.5,
    key: str = CXR_VIEW,
    min_size: int | Sequence[int] | None = None,
    body_part: str | None = "CHEST",
) -> Compose:
    """Xiao et al.'s pre-training pipeline: load, random-resized crop of area scale ``[min_scale, 1]``, resize, flip.

    The crop is MONAI's ``RandScaleCropd`` with each side drawn uniformly in ``[sqrt(min_scale), 1]`` of the image
    side at a random position, then ``Resized`` to ``image_size``: the area fraction spans ``[min_scale, 1]`` like
    torchvision's ``RandomResizedCrop(scale=(0.5, 1))``, the aspect ratio ``[sqrt(min_scale), 1 / sqrt(min_scale)]``
    (``[0.71, 1.41]`` for 0.5, against torchvision's ``[3/4, 4/3]``).

    Args:
        image_size: ``(H, W)`` of the output.
        min_scale: smallest crop area fraction in ``(0, 1]`` (Xiao et al.: 0.5).
        flip_prob: probability of a left-right flip (Xiao et al.: 0.5).
        key: sample key of the image path.
        min_size: smallest accepted source image (see :func:`read_radiograph`).
        body_part: expected DICOM BodyPartExamined.

    Returns:
        a Compose mapping ``{key: path}`` to ``{key: [1, H, W] float32 in [0, 1]}``.

    Raises:
        ValueError: for ``min_scale`` outside ``(0, 1]`` or ``flip_prob`` outside ``[0, 1]``.
    """
    if not 0 < min_scale <= 1 or not 0 <= flip_prob <= 1:
        raise ValueError(f"need 0 < min_scale <= 1 and 0 <= flip_prob <= 1, got {min_scale} and {flip_prob}.")
    side = math.sqrt(min_scale)
    return Compose(
        _loading(key, min_size, body_part)
        + [
            RandScaleCropd(keys=key, roi_scale=side, max_roi_scale=1.0, random_center=True, random_size=True),
            _resize(key, image_size),
            RandFlipd(keys=key, prob=flip_prob, spatial_axis=1),
        ]
        + _finishing(key)
    )


def finetuning_transforms(
    image_size: Sequence[int],
    num_ops: int = 2,
    magnitude: float = 6.0,
    magnitude_std: float = 0.5,
    key: str = CXR_VIEW,
    min_size: int | Sequence[int] | None = None,
    body_part: str | None = "CHEST",
) -> Compose:
    """The fine-tuning pipeline: load, resize the whole image to ``image_size``, RandAugment (:class:`RandAugmentd`).

    Args:
        image_size: ``(H, W)`` of the output.
        num_ops, magnitude, magnitude_std: RandAugment's ``N``, ``M`` and magnitude noise (Xiao et al.: 2, 6, 0.5).
        key: sample key of the image path.
        min_size: smallest accepted source image.
        body_part: expected DICOM BodyPartExamined.

    Returns:
        a Compose mapping ``{key: path, ...}`` to ``{key: [1, H, W] float32 in [0, 1], ...}``.

    Raises:
        ValueError: for invalid RandAugment settings.
    """
    return Compose(
        _loading(key, min_size, body_part)
        + [_resize(key, image_size), RandAugmentd(key, num_ops, magnitude, magnitude_std)]
        + _finishing(key)
    )


def evaluation_transforms(
    image_size: Sequence[int],
    key: str = CXR_VIEW,
    min_size: int | Sequence[int] | None = None,
    body_part: str | None = "CHEST",
    load: bool = True,
) -> Compose:
    """Evaluation and inference: load and resize the whole image to ``image_size`` (no randomness).

    Args:
        image_size: ``(H, W)`` of the output.
        key: sample key of the image path.
        min_size: smallest accepted source image.
        body_part: expected DICOM BodyPartExamined.
        load: start by loading the file; False starts from an image already read (``[1, H, W]`` in [0, 1], e.g.
            by :func:`read_radiograph`, so that a caller can handle a bad file itself).

    Returns:
        a Compose mapping ``{key: path or image, ...}`` to ``{key: [1, H, W] float32 in [0, 1], ...}``.
    """
    loading = _loading(key, min_size, body_part) if load else []
    return Compose(loading + [_resize(key, image_size)] + _finishing(key))
