"""Write a synthetic chest radiograph as a DICOM Digital X-Ray Image (For Presentation).

One DX Image Storage instance (PS3.3 A.26), Explicit VR Little Endian, with the Patient, General Study, General
Series, DX Series, General Equipment, General Image, Image Pixel, DX Anatomy Imaged, DX Image, DX Detector, DX
Positioning, VOI LUT and SOP Common modules filled so that ``dciodvfy`` reports no errors. Pixels are stored as
12-bit values (bright = attenuating, MONOCHROME2; or inverted, MONOCHROME1, as many CR readers store them) with a
window covering the full range, so :func:`medssl.io.dx_read.read_dx` returns the input image to within 1/4095.

Identifiers are the fake ones of :class:`medssl.io.dicom_write.PhantomIdentity`; UIDs are name-based, so writing the
same image twice gives byte-identical files.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

from medssl import __version__
from medssl.errors import DataError
from medssl.io.dicom_write import MANUFACTURER, PhantomIdentity, _decimal_string, deterministic_uid

__all__ = ["DX_IMAGE_STORAGE_PRESENTATION", "write_dx_image"]

DX_IMAGE_STORAGE_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
_BITS_STORED = 12
_MAX_VALUE = (1 << _BITS_STORED) - 1


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def write_dx_image(
    image: np.ndarray,
    path: str | os.PathLike,
    *,
    spacing_mm: float,
    identity: PhantomIdentity,
    series_number: int = 1,
    monochrome1: bool = False,
) -> Path:
    """Write one PA chest radiograph as a DX For Presentation instance (atomically: temp file + rename).

    Args:
        image: float ``[H, W]`` in [0, 1], bright = attenuating, rows head -> feet, columns patient right -> left.
        path: output file.
        spacing_mm: square pixel spacing at the detector (written as ImagerPixelSpacing and PixelSpacing).
        identity: fake patient and study identifiers.
        series_number: SeriesNumber.
        monochrome1: store inverted values as MONOCHROME1 (the presented image is the same).

    Returns:
        The path written.

    Raises:
        DataError: for an image that is not 2-D, has values outside [0, 1] or NaNs, or a non-positive spacing.
    """
    image = np.asarray(image)
    if image.ndim != 2 or not np.isfinite(image).all() or image.min() < 0.0 or image.max() > 1.0:
        raise DataError(f"expected a finite [H, W] image in [0, 1], got shape {image.shape}")
    if not spacing_mm > 0:
        raise DataError(f"spacing_mm must be positive, got {spacing_mm}")
    stored = np.round(image * _MAX_VALUE).astype(np.uint16)
    if monochrome1:
        stored = _MAX_VALUE - stored
    series_uid = deterministic_uid(identity.study_instance_uid, "dx-series", series_number)
    sop_uid = deterministic_uid(series_uid, "instance", 1)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_IMAGE_STORAGE_PRESENTATION
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    spacing = [_decimal_string(spacing_mm)] * 2
    # The window [c - 0.5 - (w - 1) / 2, c - 0.5 + (w - 1) / 2] of a LINEAR VOI spans exactly 0 .. 4095.
    centre, width = _decimal_string(_MAX_VALUE / 2.0 + 0.5), _decimal_string(_MAX_VALUE + 1.0)
    attributes = {
        "SpecificCharacterSet": "ISO_IR 192",
        "SOPClassUID": DX_IMAGE_STORAGE_PRESENTATION,
        "SOPInstanceUID": sop_uid,
        **identity.patient_study_attributes("Chest radiograph (synthetic phantom)"),
        "Modality": "DX",
        "SeriesInstanceUID": series_uid,
        "SeriesNumber": series_number,
        "SeriesDescription": "PA chest (synthetic phantom)",
        "BodyPartExamined": "CHEST",
        "PresentationIntentType": "FOR PRESENTATION",
        "Manufacturer": MANUFACTURER,
        "ManufacturerModelName": "synthetic chest radiograph",
        "SoftwareVersions": f"medssl {__version__}",
        "InstanceNumber": 1,
        "PatientOrientation": ["L", "F"],
        "ContentDate": identity.study_date,
        "ContentTime": identity.study_time,
        "ImageType": ["DERIVED", "PRIMARY"],
        "AcquisitionContextSequence": Sequence([]),
        "ImageLaterality": "U",
        "AnatomicRegionSequence": Sequence([_code("51185008", "SCT", "Chest")]),
        "PixelIntensityRelationship": "LOG",
        "PixelIntensityRelationshipSign": 1,
        "RescaleIntercept": "0",
        "RescaleSlope": "1",
        "RescaleType": "US",
        "PresentationLUTShape": "IDENTITY" if not monochrome1 else "INVERSE",
        "LossyImageCompression": "00",
        "BurnedInAnnotation": "NO",
        "ImagerPixelSpacing": spacing,
        "PixelSpacing": spacing,
        "PixelSpacingCalibrationType": "GEOMETRY",
        "PixelSpacingCalibrationDescription": "synthetic projection without magnification",
        "DetectorType": "DIRECT",
        "PositionerType": "COLUMN",
        "ViewPosition": "PA",
        "ViewCodeSequence": Sequence([_code("399348003", "SCT", "postero-anterior")]),
        "PatientPosition": "",
        "WindowCenter": centre,
        "WindowWidth": width,
        "Rows": stored.shape[0],
        "Columns": stored.shape[1],
        "SamplesPerPixel": 1,
        "PhotometricInterpretation": "MONOCHROME1" if monochrome1 else "MONOCHROME2",
        "BitsAllocated": 16,
        "BitsStored": _BITS_STORED,
        "HighBit": _BITS_STORED - 1,
        "PixelRepresentation": 0,
        "PixelData": stored.tobytes(),
    }
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, staging = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        ds.save_as(staging, enforce_file_format=True)
        os.replace(staging, path)
    except BaseException:
        Path(staging).unlink(missing_ok=True)
        raise
    return path
