"""Write cine CMR arrays as standard-conformant single-frame DICOM MR Image series.

The synthetic phantoms are exported the way a scanner would store a cine study: one MR Image Storage instance per
slice and cardiac phase, Explicit VR Little Endian, with the Patient, General Study, General Series, Frame of
Reference, General Equipment, General Image, Image Plane, Image Pixel, MR Image, VOI LUT and SOP Common modules of
the MR Image IOD (DICOM PS3.3 A.4, C.8.3.1) filled so that ``dciodvfy`` reports no errors.

Geometry follows the NIfTI -> DICOM convention used by nibabel and ITK: the NIfTI affine maps voxel ``(i, j, k)`` to
RAS millimetres, DICOM uses LPS, so x and y are negated. A DICOM column index (position along a row) is NIfTI axis
``i`` and a row index is axis ``j``: ``pixel_array[r, c] == image[c, r, s, t]``.

All identifiers written here are fake (:class:`PhantomIdentity`); they appear only inside the DICOM headers, never
in file names, logs or error messages. UIDs are UUID-derived (``2.25.<int>``, PS3.5 B.2) from a name-based UUID,
so rewriting the same subject gives byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

from medssl import __version__
from medssl.errors import DataError

__all__ = ["MR_IMAGE_STORAGE", "PhantomIdentity", "deterministic_uid", "write_mr_cine_series"]

MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
MANUFACTURER = "medssl phantom"
BITS_STORED = 12
_MAX_STORED_VALUE = (1 << BITS_STORED) - 1
# Name-based UUIDs need a namespace; a fixed one keeps every medssl phantom UID reproducible across machines.
_UID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/medssl/medssl/phantom-dicom")
# Columns of an affine count as orthogonal when the cosine between them is below this (float32 NIfTI headers
# carry ~1e-7 relative error; anything above 1e-4 is a sheared grid that DICOM's Image Plane cannot describe).
_ORTHOGONALITY_TOLERANCE = 1e-4
_RAS_TO_LPS = np.array([-1.0, -1.0, 1.0])
_FILE_NAME_STYLES = ("numbered", "uid")

# Typical 1.5 T balanced SSFP cine parameters; the phantom images are rendered with matching contrast.
_FIELD_STRENGTH_T = 1.5
_LARMOR_MHZ_PER_T = 42.577478518
_REPETITION_TIME_MS = 3.0
_ECHO_TIME_MS = 1.5
_FLIP_ANGLE_DEG = 60.0
_DEFAULT_RR_MS = 1000.0  # 60 bpm, for a single-frame series whose R-R interval cannot be inferred


def deterministic_uid(*parts: str | int) -> str:
    """Return a reproducible UUID-derived DICOM UID (``2.25.<decimal UUID>``, DICOM PS3.5 B.2) for ``parts``.

    Args:
        parts: strings or integers naming the entity (e.g. the study UID, ``"series"``, a series number).
            They are JSON-encoded together, so ``("ab", "c")`` and ``("a", "bc")`` give different UIDs.

    Returns:
        A UID string of at most 44 characters, the same for the same ``parts`` on every machine and run.
    """
    name = json.dumps([str(part) for part in parts])
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}"


@dataclass(frozen=True)
class PhantomIdentity:
    """Obviously fake patient and study identifiers for one synthetic subject.

    Attributes:
        patient_name: DICOM PN, e.g. ``"PHANTOM^SUB0007"``.
        patient_id: e.g. ``"MEDSSL-PH-SUB0007-3fa2c1"`` (the suffix hashes the subject id and seed).
        patient_birth_date: DICOM DA ``YYYYMMDD``.
        patient_sex: ``"M"`` or ``"F"``.
        study_instance_uid: UUID-derived UID of the one study holding every view of the subject.
        accession_number: DICOM SH (16 characters at most), e.g. ``"PH3FA2C1D0"``.
        study_date: DICOM DA ``YYYYMMDD``.
        study_time: DICOM TM ``HHMMSS``.
    """

    patient_name: str
    patient_id: str
    patient_birth_date: str
    patient_sex: str
    study_instance_uid: str
    accession_number: str
    study_date: str
    study_time: str

    @classmethod
    def for_subject(cls, subject_id: str, seed: int) -> PhantomIdentity:
        """Derive the identity of a synthetic subject deterministically from its id and the cohort seed.

        Args:
            subject_id: the phantom's subject id, e.g. ``"sub0007"``; letters and digits are kept (upper-cased)
                in the name and patient id, other characters dropped.
            seed: the cohort seed; a different seed gives a different patient id, dates and UIDs.

        Returns:
            The identity; equal inputs give equal identities.

        Raises:
            DataError: if ``subject_id`` has no letter or digit.
        """
        label = "".join(ch for ch in str(subject_id).upper() if ch.isascii() and ch.isalnum())[:40]
        if not label:
            raise DataError(f"subject_id must contain at least one ASCII letter or digit, got {subject_id!r}")
        digest = hashlib.sha256(json.dumps([str(subject_id), int(seed)]).encode()).digest()
        number = int.from_bytes(digest[:8], "big")
        birth_year, birth_month, birth_day = 1940 + number % 50, 1 + (number >> 8) % 12, 1 + (number >> 12) % 28
        study_year, study_month, study_day = 2018 + (number >> 20) % 6, 1 + (number >> 24) % 12, 1 + (number >> 28) % 28
        study_hour, study_minute, study_second = 8 + (number >> 36) % 10, (number >> 40) % 60, (number >> 46) % 60
        return cls(
            patient_name=f"PHANTOM^{label}",
            patient_id=f"MEDSSL-PH-{label}-{digest.hex()[:6]}",
            patient_birth_date=f"{birth_year:04d}{birth_month:02d}{birth_day:02d}",
            patient_sex="MF"[(number >> 52) % 2],
            study_instance_uid=deterministic_uid("study", subject_id, seed),
            accession_number=f"PH{digest.hex()[6:14].upper()}",
            study_date=f"{study_year:04d}{study_month:02d}{study_day:02d}",
            study_time=f"{study_hour:02d}{study_minute:02d}{study_second:02d}",
        )

    def patient_study_attributes(self, study_description: str) -> dict[str, str]:
        """Patient and General Study module attributes (DICOM keyword -> value) of this identity."""
        return {
            "PatientName": self.patient_name,
            "PatientID": self.patient_id,
            "PatientBirthDate": self.patient_birth_date,
            "PatientSex": self.patient_sex,
            "StudyInstanceUID": self.study_instance_uid,
            "StudyDate": self.study_date,
            "StudyTime": self.study_time,
            "ReferringPhysicianName": "",
            "StudyID": self.accession_number[-8:],
            "AccessionNumber": self.accession_number,
            "StudyDescription": study_description,
        }

    @property
    def frame_of_reference_uid(self) -> str:
        """The Frame of Reference UID shared by every series of the study, so SAX and LAX geometry is comparable."""
        return deterministic_uid(self.study_instance_uid, "frame-of-reference")


@dataclass(frozen=True)
class _SliceGeometry:
    """DICOM Image Plane values of one slice, in LPS millimetres."""

    position: np.ndarray  # [3] centre of the first transmitted pixel
    orientation: np.ndarray  # [6] row direction cosines then column direction cosines
    pixel_spacing: tuple[float, float]  # (between rows, between columns)
    slice_location: float


def _validate_image(image: np.ndarray) -> None:
    if not isinstance(image, np.ndarray):
        raise DataError(f"image must be a numpy array, got {type(image).__name__}")
    if image.ndim != 4:
        raise DataError(f"image must have 4 dimensions [H, W, S, T] (LAX: S == 1), got shape {image.shape}")
    if image.dtype != np.uint16:
        raise DataError(f"image must be uint16 (scanner-like stored values), got dtype {image.dtype}")
    if min(image.shape) == 0:
        raise DataError(f"image must not have an empty axis, got shape {image.shape}")
    if image.max() > _MAX_STORED_VALUE:
        raise DataError(
            f"image values must fit in {BITS_STORED} bits (0..{_MAX_STORED_VALUE}), got maximum {int(image.max())}"
        )


def _validate_affine(affine: np.ndarray) -> np.ndarray:
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise DataError(f"affine must be 4x4, got shape {affine.shape}")
    if not np.all(np.isfinite(affine)):
        raise DataError(f"affine must be finite, got\n{affine}")
    if not np.allclose(affine[3], [0.0, 0.0, 0.0, 1.0]):
        raise DataError(f"affine's last row must be [0, 0, 0, 1], got {affine[3].tolist()}")
    axes = affine[:3, :3]
    lengths = np.linalg.norm(axes, axis=0)
    if np.any(lengths <= 0):
        raise DataError(f"affine has a zero-length voxel axis; column lengths (mm) are {lengths.tolist()}")
    cosines = (axes.T @ axes) / np.outer(lengths, lengths)
    off_diagonal = np.abs(cosines - np.eye(3)).max()
    if off_diagonal > _ORTHOGONALITY_TOLERANCE:
        raise DataError(
            "affine's voxel axes must be orthogonal (DICOM Image Plane cannot describe a sheared grid); "
            f"largest |cosine| between columns is {off_diagonal:.3g}, affine:\n{affine}"
        )
    return affine


def _validate_trigger_times(trigger_times_ms: Sequence[float], frames: int) -> np.ndarray:
    times = np.asarray(trigger_times_ms, dtype=np.float64)
    if times.ndim != 1 or times.shape[0] != frames:
        raise DataError(
            f"trigger_times_ms must hold one time per frame: image has T={frames} frames, got shape {times.shape}"
        )
    if not np.all(np.isfinite(times)) or np.any(times < 0) or np.any(np.diff(times) <= 0):
        raise DataError(f"trigger_times_ms must be finite, >= 0 and strictly increasing, got {times.tolist()}")
    return times


def _slice_geometries(affine: np.ndarray, slices: int) -> list[_SliceGeometry]:
    column_step, row_step, slice_step = (affine[:3, axis] * _RAS_TO_LPS for axis in range(3))
    row_cosines = column_step / np.linalg.norm(column_step)  # moving along a row = increasing column index = i
    column_cosines = row_step / np.linalg.norm(row_step)
    normal = np.cross(row_cosines, column_cosines)
    origin = affine[:3, 3] * _RAS_TO_LPS
    geometries = []
    for index in range(slices):
        position = origin + index * slice_step
        geometries.append(
            _SliceGeometry(
                position=position,
                orientation=np.concatenate([row_cosines, column_cosines]),
                pixel_spacing=(float(np.linalg.norm(row_step)), float(np.linalg.norm(column_step))),
                slice_location=float(normal @ position),
            )
        )
    return geometries


def _decimal_string(value: float) -> str:
    """Format a float as DICOM DS (16 characters at most) with as many significant digits as fit."""
    for digits in range(12, 1, -1):
        text = f"{value:.{digits}g}"
        if len(text) <= 16:
            return text
    return f"{value:.1g}"


def _window(image: np.ndarray) -> tuple[str, str]:
    """Series-wide window centre/width spanning the 0.5-99.5 percentile range, so every frame displays alike."""
    low, high = np.percentile(image, [0.5, 99.5])
    width = max(float(high - low), 1.0)
    return _decimal_string(float(low) + width / 2.0), _decimal_string(width)


def _base_dataset(
    identity: PhantomIdentity,
    series_uid: str,
    series_description: str,
    series_number: int,
    frames: int,
    slice_spacing: float,
    slice_thickness: float,
    nominal_interval_ms: float,
    window: tuple[str, str],
) -> dict[str, object]:
    """Attributes shared by every instance of the series, keyed by DICOM keyword."""
    return {
        "SpecificCharacterSet": "ISO_IR 192",
        "SOPClassUID": MR_IMAGE_STORAGE,
        **identity.patient_study_attributes("Cine CMR (synthetic phantom)"),
        # General Series
        "Modality": "MR",
        "SeriesInstanceUID": series_uid,
        "SeriesNumber": series_number,
        "SeriesDate": identity.study_date,
        "SeriesTime": identity.study_time,
        "SeriesDescription": series_description,
        "ProtocolName": series_description,
        "BodyPartExamined": "HEART",
        "PatientPosition": "HFS",
        # Frame of Reference
        "FrameOfReferenceUID": identity.frame_of_reference_uid,
        "PositionReferenceIndicator": "",
        # General Equipment
        "Manufacturer": MANUFACTURER,
        "ManufacturerModelName": "synthetic cine CMR",
        "SoftwareVersions": f"medssl {__version__}",
        # General Image
        "ImageType": ["ORIGINAL", "PRIMARY", "OTHER"],
        "ContentDate": identity.study_date,
        "ContentTime": identity.study_time,
        "AcquisitionDate": identity.study_date,
        "BurnedInAnnotation": "NO",
        "LossyImageCompression": "00",
        # Image Plane (per-slice values are set per instance)
        "SliceThickness": _decimal_string(slice_thickness),
        # Image Pixel
        "SamplesPerPixel": 1,
        "PhotometricInterpretation": "MONOCHROME2",
        "BitsAllocated": 16,
        "BitsStored": BITS_STORED,
        "HighBit": BITS_STORED - 1,
        "PixelRepresentation": 0,
        # MR Image
        "ScanningSequence": ["GR"],
        "SequenceVariant": ["SS"],  # balanced steady state free precession
        "ScanOptions": ["CG"],  # cardiac gating, which makes TriggerTime required
        "MRAcquisitionType": "2D",
        "SequenceName": "bSSFP_cine",
        "AngioFlag": "N",
        "RepetitionTime": _decimal_string(_REPETITION_TIME_MS),
        "EchoTime": _decimal_string(_ECHO_TIME_MS),
        "EchoTrainLength": 1,
        "NumberOfAverages": "1",
        "ImagingFrequency": _decimal_string(_FIELD_STRENGTH_T * _LARMOR_MHZ_PER_T),
        "ImagedNucleus": "1H",
        "EchoNumbers": "1",
        "MagneticFieldStrength": _decimal_string(_FIELD_STRENGTH_T),
        "SpacingBetweenSlices": _decimal_string(slice_spacing),
        "FlipAngle": _decimal_string(_FLIP_ANGLE_DEG),
        "NominalInterval": str(round(nominal_interval_ms)),
        "HeartRate": str(round(60_000.0 / nominal_interval_ms)),
        "CardiacNumberOfImages": frames,
        "NumberOfTemporalPositions": frames,
        "TemporalResolution": _decimal_string(nominal_interval_ms / frames),
        # VOI LUT
        "WindowCenter": window[0],
        "WindowWidth": window[1],
        "WindowCenterWidthExplanation": "phantom series 0.5-99.5 percentile",
    }


def _instance(
    shared: dict[str, object],
    pixels: np.ndarray,
    geometry: _SliceGeometry,
    instance_number: int,
    slice_index: int,
    frame_index: int,
    trigger_time_ms: float,
    series_uid: str,
) -> FileDataset:
    sop_instance_uid = deterministic_uid(series_uid, "instance", instance_number)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MR_IMAGE_STORAGE
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = f"MEDSSL_{__version__}"[:16]
    dataset = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    for keyword, value in shared.items():
        setattr(dataset, keyword, value)
    dataset.SOPInstanceUID = sop_instance_uid
    dataset.InstanceNumber = instance_number
    # Each SAX slice is its own breath-hold acquisition on a scanner; frames of one slice share it.
    dataset.AcquisitionNumber = slice_index + 1
    dataset.ImagePositionPatient = [_decimal_string(value) for value in geometry.position]
    dataset.ImageOrientationPatient = [_decimal_string(value) for value in geometry.orientation]
    dataset.PixelSpacing = [_decimal_string(value) for value in geometry.pixel_spacing]
    dataset.SliceLocation = _decimal_string(geometry.slice_location)
    dataset.TriggerTime = _decimal_string(trigger_time_ms)
    dataset.TemporalPositionIdentifier = frame_index + 1
    dataset.Rows, dataset.Columns = pixels.shape
    dataset.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    return dataset


def _replace_directory(staging: Path, out_dir: Path) -> None:
    if out_dir.exists():
        # Only an empty folder may be replaced, so a rerun never silently merges with or destroys earlier output.
        out_dir.rmdir()
    os.replace(staging, out_dir)


def write_mr_cine_series(
    image: np.ndarray,
    affine: np.ndarray,
    out_dir: Path,
    *,
    series_description: str,
    series_number: int,
    trigger_times_ms: Sequence[float],
    identity: PhantomIdentity,
    series_uid: str | None = None,
    file_names: str = "numbered",
    slice_thickness_mm: float | None = None,
    nominal_interval_ms: float | None = None,
) -> list[Path]:
    """Write a cine CMR array as one DICOM MR Image Storage series of single-frame instances.

    Instances are numbered slice-major then frame (``InstanceNumber = s * T + t + 1``); all share one
    SeriesInstanceUID, the identity's StudyInstanceUID and its Frame of Reference UID. The folder is written
    under a temporary name beside ``out_dir`` and renamed at the end, so a crash never leaves a partial series.

    Args:
        image: uint16 array ``[H, W, S, T]`` with values in 0..4095 (12 bits stored); LAX views have ``S == 1``.
            Axis ``H`` (NIfTI i) runs along DICOM rows (columns index), ``W`` (NIfTI j) down the columns.
        affine: 4x4 NIfTI-style voxel -> RAS (mm) affine with orthogonal columns; column 2 is the slice step.
            With ``S == 1`` DICOM keeps only its length (SpacingBetweenSlices): readers rebuild the slice axis as
            row x column cosines, so a left-handed single-slice affine comes back with column 2 negated.
        out_dir: folder to create; it must not exist or be empty. Parents are created.
        series_description: DICOM SeriesDescription (and ProtocolName), e.g. ``"cine SAX"``; 64 characters at most.
        series_number: DICOM SeriesNumber, 0..2**31-1.
        trigger_times_ms: ``[T]`` strictly increasing times after the R wave (ms), one per frame.
        identity: the fake patient/study identity (:meth:`PhantomIdentity.for_subject`).
        series_uid: SeriesInstanceUID to use; by default derived from the study UID, series number and description.
        file_names: ``"numbered"`` for ``IM_000001.dcm``, ... or ``"uid"`` for suffix-less SOP Instance UID names.
        slice_thickness_mm: SliceThickness; defaults to the slice spacing ``|affine[:3, 2]|`` (no gap).
        nominal_interval_ms: R-R interval (NominalInterval, HeartRate); defaults to ``T`` times the median frame
            step, exact for frames evenly spread over one cycle from 0 ms (1000 ms when ``T == 1``).

    Returns:
        The written file paths, ``S * T`` of them, in InstanceNumber order.

    Raises:
        DataError: if ``image`` is not a 4-D uint16 array within 12 bits, ``affine`` is not a finite 4x4 affine with
            orthogonal non-zero columns, ``trigger_times_ms`` does not hold ``T`` strictly increasing times,
            ``out_dir`` exists and is not an empty folder, or another argument is out of range.
    """
    _validate_image(image)
    affine = _validate_affine(affine)
    _, _, slices, frames = image.shape
    times = _validate_trigger_times(trigger_times_ms, frames)
    if file_names not in _FILE_NAME_STYLES:
        raise DataError(f"file_names must be one of {_FILE_NAME_STYLES}, got {file_names!r}")
    if not 0 <= int(series_number) < 2**31:
        raise DataError(f"series_number must be in 0..2**31-1, got {series_number}")
    if len(series_description) > 64 or "\\" in series_description:
        raise DataError(
            f"series_description must be at most 64 characters without backslashes, got {series_description!r}"
        )
    if slice_thickness_mm is not None and not slice_thickness_mm > 0:
        raise DataError(f"slice_thickness_mm must be > 0, got {slice_thickness_mm}")
    if nominal_interval_ms is None:
        nominal_interval_ms = frames * float(np.median(np.diff(times))) if frames > 1 else _DEFAULT_RR_MS
    if not nominal_interval_ms > times[-1]:
        raise DataError(
            f"nominal_interval_ms must exceed the last trigger time {times[-1]} ms, got {nominal_interval_ms}"
        )
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DataError(f"output folder {out_dir} already exists and is not empty; remove it or choose another")

    slice_spacing = float(np.linalg.norm(affine[:3, 2]))
    series_uid = series_uid or deterministic_uid(
        identity.study_instance_uid, "series", int(series_number), series_description
    )
    shared = _base_dataset(
        identity,
        series_uid,
        series_description,
        int(series_number),
        frames,
        slice_spacing,
        slice_spacing if slice_thickness_mm is None else float(slice_thickness_mm),
        float(nominal_interval_ms),
        _window(image),
    )
    geometries = _slice_geometries(affine, slices)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.partial-", dir=out_dir.parent))
    names = []
    try:
        for slice_index, geometry in enumerate(geometries):
            for frame_index, trigger_time in enumerate(times):
                instance_number = slice_index * frames + frame_index + 1
                dataset = _instance(
                    shared,
                    image[:, :, slice_index, frame_index].T,
                    geometry,
                    instance_number,
                    slice_index,
                    frame_index,
                    float(trigger_time),
                    series_uid,
                )
                name = f"IM_{instance_number:06d}.dcm" if file_names == "numbered" else dataset.SOPInstanceUID
                dataset.save_as(staging / name, enforce_file_format=True)
                names.append(name)
        _replace_directory(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return [out_dir / name for name in names]
