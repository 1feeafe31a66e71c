"""Read one projection radiograph (DX, CR) from DICOM as a display-ready float image.

The pixel pipeline is the one DICOM prescribes for presentation (PS3.3 C.11, PS3.4 N.2): stored values ->
Modality LUT (RescaleSlope/Intercept, or a Modality LUT Sequence; applied by pydicom) -> VOI LUT (the first
window of WindowCenter/WindowWidth with its VOILUTFunction LINEAR, LINEAR_EXACT or SIGMOID, or the first VOI LUT
Sequence item; when both are present the LUT wins unless ``prefer_window``) -> presentation: MONOCHROME1 (bright =
low values, as most CR) or a Presentation LUT Shape of INVERSE is inverted (once) so that the result always reads
MONOCHROME2, bright = attenuating. Without any VOI transform the modality values are scaled from their minimum to
their maximum. Compressed transfer syntaxes
(JPEG, JPEG-LS, JPEG 2000, RLE) decode through pydicom's handlers (pylibjpeg, pyjpegls).

Pixel spacing (PS3.3 C.8.11.7 / 10.7.1.3): ``PixelSpacing`` when present and positive (calibrated to the patient),
else ``ImagerPixelSpacing`` (at the detector) divided by ``EstimatedRadiographicMagnificationFactor`` when given;
zero or missing values give ``spacing_mm = None`` and the source says why.

Errors are :class:`~medssl.errors.DataError` naming the file and what is wrong (no pixel data, colour, multi-frame,
too small, another modality or body part); they never quote patient identifiers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut

from medssl.errors import DataError
from medssl.io.dicom_read import _quiet_pydicom

__all__ = ["PROJECTION_MODALITIES", "DxImage", "apply_voi", "read_dx", "read_dx_dataset"]

_MONOCHROME = ("MONOCHROME1", "MONOCHROME2")
PROJECTION_MODALITIES = ("CR", "DX", "RG")


@dataclass(frozen=True)
class DxImage:
    """A radiograph ready for a network.

    Attributes:
        image: float32 ``[H, W]`` in [0, 1], bright = attenuating (MONOCHROME2 presentation).
        spacing_mm: ``(row spacing, column spacing)`` in mm, or ``None`` when the file does not give a usable one.
        spacing_source: ``"PixelSpacing"``, ``"ImagerPixelSpacing"``, ``"ImagerPixelSpacing / magnification"``, or
            the reason there is none.
        voi: the VOI transform applied (``"VOI LUT Sequence"``, ``"window LINEAR c=... w=..."``, ``"min-max"``).
        photometric: the stored PhotometricInterpretation (MONOCHROME1 images were inverted).
        modality: the Modality attribute (``DX``, ``CR``, ...), ``""`` when absent.
        body_part: BodyPartExamined, ``""`` when absent.
    """

    image: np.ndarray
    spacing_mm: tuple[float, float] | None
    spacing_source: str
    voi: str
    photometric: str
    modality: str
    body_part: str


def _positive_pair(value: object) -> tuple[float, float] | None:
    """Two finite positive numbers from a DS pair, else None (absent, zero, malformed)."""
    try:
        pair = [float(v) for v in value]  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return None
    if len(pair) != 2 or not all(math.isfinite(v) and v > 0 for v in pair):
        return None
    return pair[0], pair[1]


def _spacing(dataset: Dataset) -> tuple[tuple[float, float] | None, str]:
    calibrated = _positive_pair(dataset.get("PixelSpacing"))
    if calibrated:
        return calibrated, "PixelSpacing"
    imager = _positive_pair(dataset.get("ImagerPixelSpacing"))
    if imager:
        magnification = dataset.get("EstimatedRadiographicMagnificationFactor")
        try:
            factor = float(magnification) if magnification is not None else None
        except (TypeError, ValueError):
            factor = None
        if factor and factor > 0:
            return (imager[0] / factor, imager[1] / factor), "ImagerPixelSpacing / magnification"
        return imager, "ImagerPixelSpacing"
    if "PixelSpacing" in dataset or "ImagerPixelSpacing" in dataset:
        return None, "spacing attributes present but zero or invalid"
    return None, "no PixelSpacing or ImagerPixelSpacing"


def _first(value: object) -> float:
    """First value of a possibly multi-valued DS attribute."""
    if isinstance(value, (list, tuple, MultiValue)):
        value = value[0]
    return float(value)


def apply_voi(values: np.ndarray, dataset: Dataset, *, prefer_window: bool = False) -> tuple[np.ndarray, str]:
    """Apply the dataset's VOI transform, mapping to [0, 1] (before any MONOCHROME1 inversion).

    Formulas of DICOM PS3.3 C.11.2.1.2 with the output range [0, 1]: LINEAR ``((x - (c - 0.5)) / (w - 1) + 0.5)``,
    LINEAR_EXACT ``((x - c) / w + 0.5)``, both clipped; SIGMOID ``1 / (1 + exp(-4 (x - c) / w))``. A VOI LUT
    Sequence item maps ``x`` to ``LUTData[clip(x - first_mapped, 0, n - 1)] / (2**bits - 1)``.

    Args:
        values: float ``[H, W]`` modality values (after rescale / Modality LUT).
        dataset: the image's dataset (VOI attributes are read from it).
        prefer_window: use the window when both a window and a VOI LUT Sequence are present.

    Returns:
        ``(float32 [H, W] in [0, 1], description of the transform)``.

    Raises:
        DataError: for a window width below 1 (LINEAR) or not positive (LINEAR_EXACT, SIGMOID), or a malformed VOI
            LUT.
    """
    has_window = "WindowCenter" in dataset and "WindowWidth" in dataset
    has_lut = "VOILUTSequence" in dataset and len(dataset.VOILUTSequence) > 0
    if has_lut and not (prefer_window and has_window):
        item = dataset.VOILUTSequence[0]
        try:
            entries, first_mapped, bits = (int(v) for v in item.LUTDescriptor)
            data = item.LUTData
            # OW-encoded LUT Data reads as raw bytes of 16-bit words; US-encoded as a list of ints.
            lut = np.frombuffer(data, dtype="<u2") if isinstance(data, bytes) else np.asarray(data, dtype=np.float64)
            lut = lut.astype(np.float64).ravel()
        except (AttributeError, TypeError, ValueError) as error:
            raise DataError(f"malformed VOI LUT Sequence: {error}") from error
        entries = entries or 65536  # PS3.3: 0 entries means 2**16
        if lut.size < entries or bits < 1:
            raise DataError(f"malformed VOI LUT: descriptor says {entries} entries of {bits} bits, data has {lut.size}")
        index = np.clip(np.round(values) - first_mapped, 0, entries - 1).astype(np.int64)
        return (lut[index] / (2**bits - 1)).astype(np.float32), "VOI LUT Sequence"
    if has_window:
        center, width = _first(dataset.WindowCenter), _first(dataset.WindowWidth)
        function = str(dataset.get("VOILUTFunction", "LINEAR")).upper() or "LINEAR"
        if function == "LINEAR" and width < 1 or width <= 0:
            raise DataError(f"window width must be >= 1 (LINEAR) or > 0 ({function}), got {width}")
        if function == "SIGMOID":
            out = 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
        elif function == "LINEAR_EXACT":
            out = np.clip((values - center) / width + 0.5, 0.0, 1.0)
        elif width == 1:  # the LINEAR formula degenerates to a threshold at c - 0.5
            out = (values > center - 0.5).astype(np.float64)
        else:
            out = np.clip((values - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)
        return out.astype(np.float32), f"window {function} c={center:g} w={width:g}"
    low, high = float(values.min()), float(values.max())
    return ((values - low) / max(high - low, 1e-12)).astype(np.float32), "min-max"


def read_dx_dataset(
    dataset: Dataset,
    *,
    source: str = "dataset",
    min_size: int | Sequence[int] | None = None,
    body_part: str | None = None,
    modalities: Sequence[str] | None = PROJECTION_MODALITIES,
    prefer_window: bool = False,
) -> DxImage:
    """Turn a projection-radiograph dataset into a [0, 1] float image (see the module docstring for the pipeline).

    Args:
        dataset: a pydicom dataset with pixel data.
        source: how to name the input in error messages (a file name, never patient data).
        min_size: smallest accepted ``(rows, columns)`` (an int for both), e.g. a ViT's patch grid.
        body_part: expected BodyPartExamined (e.g. ``"CHEST"``); a file stating another part is refused, one
            without the attribute is accepted.
        modalities: accepted Modality values (default CR, DX, RG: projection radiography); None accepts any, e.g.
            radiographs stored as secondary captures.
        prefer_window: see :func:`apply_voi`.

    Returns:
        The image, ``[H, W]`` float32 in [0, 1], with spacing and what was applied.

    Raises:
        DataError: no pixel data (names the SOP class), another modality, not greyscale (colour), multi-frame,
            smaller than ``min_size``, another body part, or undecodable pixel data.
    """
    if "PixelData" not in dataset and "FloatPixelData" not in dataset:
        sop = dataset.get("SOPClassUID")
        name = getattr(sop, "name", None) or "unknown SOP class"
        raise DataError(f"{source}: not an image (no pixel data; {name}); expected a DX or CR radiograph")
    modality = str(dataset.get("Modality", "")).upper()
    if modalities is not None and modality not in {m.upper() for m in modalities}:
        raise DataError(
            f"{source}: Modality {modality or 'missing'} is not a projection radiograph (expected one of "
            f"{', '.join(modalities)}); pass modalities=None to read it anyway"
        )
    photometric = str(dataset.get("PhotometricInterpretation", "")).upper()
    samples = int(dataset.get("SamplesPerPixel", 1))
    if samples != 1 or photometric not in _MONOCHROME:
        raise DataError(
            f"{source}: colour or non-greyscale image (PhotometricInterpretation {photometric or 'missing'}, "
            f"{samples} samples per pixel); radiographs are MONOCHROME1 or MONOCHROME2"
        )
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if frames != 1:
        raise DataError(f"{source}: multi-frame image ({frames} frames); expected a single radiograph")
    rows, columns = int(dataset.get("Rows", 0)), int(dataset.get("Columns", 0))
    if min_size is not None:
        need = (int(min_size), int(min_size)) if isinstance(min_size, int) else tuple(int(v) for v in min_size)
        if rows < need[0] or columns < need[1]:
            raise DataError(f"{source}: image is {rows}x{columns} pixels, smaller than the minimum {need[0]}x{need[1]}")
    stated_part = str(dataset.get("BodyPartExamined", "")).strip().upper()
    if body_part is not None and stated_part and stated_part != body_part.upper():
        raise DataError(f"{source}: BodyPartExamined is {stated_part}, expected {body_part.upper()}")
    try:
        stored = dataset.pixel_array
    except Exception as error:  # pydicom raises several types for missing handlers or corrupt streams
        syntax = getattr(dataset.file_meta, "TransferSyntaxUID", None) if hasattr(dataset, "file_meta") else None
        what = getattr(syntax, "name", syntax)
        raise DataError(f"{source}: cannot decode pixel data ({what}): {type(error).__name__}") from error
    values = np.asarray(apply_modality_lut(stored, dataset), dtype=np.float64)
    image, voi = apply_voi(values, dataset, prefer_window=prefer_window)
    if photometric == "MONOCHROME1" or str(dataset.get("PresentationLUTShape", "")).upper() == "INVERSE":
        image = 1.0 - image
    spacing, spacing_source = _spacing(dataset)
    return DxImage(
        image=np.ascontiguousarray(image, dtype=np.float32),
        spacing_mm=spacing,
        spacing_source=spacing_source,
        voi=voi,
        photometric=photometric,
        modality=modality,
        body_part=stated_part,
    )


def read_dx(
    path: str | Path,
    *,
    min_size: int | Sequence[int] | None = None,
    body_part: str | None = None,
    modalities: Sequence[str] | None = PROJECTION_MODALITIES,
    prefer_window: bool = False,
) -> DxImage:
    """Read a DX/CR DICOM file as a [0, 1] float image with its pixel spacing.

    Args:
        path: the DICOM file.
        min_size: smallest accepted ``(rows, columns)`` (an int for both).
        body_part: expected BodyPartExamined (e.g. ``"CHEST"``), or None to accept any.
        modalities: accepted Modality values, or None to accept any.
        prefer_window: see :func:`apply_voi`.

    Returns:
        See :func:`read_dx_dataset`.

    Raises:
        DataError: for a missing or non-DICOM file, and as :func:`read_dx_dataset`.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path.name}: no such file")
    with _quiet_pydicom():
        try:
            dataset = pydicom.dcmread(path)
        except (InvalidDicomError, OSError, EOFError, ValueError) as error:
            raise DataError(f"{path.name}: not a readable DICOM file ({type(error).__name__})") from error
        return read_dx_dataset(
            dataset,
            source=path.name,
            min_size=min_size,
            body_part=body_part,
            modalities=modalities,
            prefer_window=prefer_window,
        )
