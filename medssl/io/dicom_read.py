"""Find, sort and assemble cine CMR series from a folder of DICOM files, as a scanner or PACS exports them.

:func:`scan_dicom_folder` is the input half of ``medssl analyze``. It works in three stages, each with its own
progress bar and log line:

1. **Discover**: every file under the folder, recursively, with or without a ``.dcm`` suffix, plus the files a
   ``DICOMDIR`` references. Only headers are read (``stop_before_pixels``). A file that is not DICOM, is truncated,
   has no pixel data or is a DICOMDIR/non-image object is skipped and reported (path relative to the folder +
   reason); one bad file never stops the scan.
2. **Classify** per study (StudyInstanceUID) and series, from geometry and temporal tags, not from descriptions:

   - a *cine* is a set of single-frame images of one orientation with at least two distinct times (TriggerTime,
     else TemporalPositionIdentifier) at each position;
   - cines of one study and Frame of Reference with parallel planes (row and column cosines within 2 degrees), the
     same matrix, pixel spacing and frame count are merged into one *stack*, so a vendor that stores one series per
     slice position gives the same stack as one that stores the whole stack in one series;
   - the **SAX** stack is the stack with the most slice positions (at least two);
   - **LAX** candidates are single-position cines whose plane contains the SAX normal (the LV long axis; plane
     normal at least 70 degrees from it). The four-chamber plane runs through both ventricles and lies close to the
     transverse plane, the two-chamber plane close to a vertical one, so the candidate's *elevation* (angle between
     its normal and the transverse plane) decides: >= 55 degrees is 4C, <= 35 degrees is 2C. Between 35 and 55
     degrees SeriesDescription decides when it names the view (``4CH``, ``HLA``, ``four chamber`` / ``2CH``,
     ``VLA``, ``two chamber``), otherwise the view complementary to a decisively classified other candidate whose
     elevation differs by at least 10 degrees; a description naming another view (3CH, LVOT, RVOT) excludes the
     candidate. When geometry is decisive and the description disagrees, geometry wins and a warning says so.
   - everything else (localisers, single frames, multi-frame objects, other orientations) is listed in
     :attr:`DicomStudy.ignored` with the reason.
3. **Load** the pixels of the chosen series (pydicom pixel handlers; pylibjpeg / pyjpegls decode JPEG-LS,
   JPEG 2000, RLE and JPEG lossless) and assemble ``[H, W, S, T]`` float32 arrays with RescaleSlope/Intercept
   applied and a NIfTI-style voxel -> RAS (mm) affine.

Geometry (DICOM PS3.3 C.7.6.2): the slice normal is ``n = row x column`` cosines (LPS). Array axis ``H`` (NIfTI i)
runs along a row (``pixel_array[r, c] == image[c, r, s, t]``), as :mod:`medssl.io.dicom_write` writes it. SAX slices
are ordered along ``-n``: with the standard short-axis display (viewed from the apex, patient left on the image
right) that is base -> apex, the order of medssl's phantoms and of ACDC. A single-slice (LAX) view gets the slice
axis ``+n`` scaled by SliceThickness (else SpacingBetweenSlices). The affine's slice step is the median distance
between neighbouring slices; uneven spacing and gaps (a missing slice) are reported in :attr:`CineSeries.warnings`
and the true positions kept in :attr:`CineSeries.slice_positions_mm`.

Imperfections: several instances at one position and time (duplicates) keep the latest acquisition (highest
SeriesNumber, AcquisitionNumber, InstanceNumber) and are reported; files holding the same SOP Instance UID are read
once. Slices whose matrix or pixel spacing differs from the majority of the stack, whose frame count differs, or
with a frame that cannot be decoded are dropped and reported (not resampled), so other slices and series still load.

Identifiers: patient names, IDs, birth dates and accession numbers never enter messages, logs or labels; studies
are labelled ``"study 1 (3fa2c1)"`` (order of study date and time, then a hash of the StudyInstanceUID), series
by SeriesNumber. pydicom's own validation warnings, which quote element values, are silenced while reading.
Reported file paths are relative to the scanned folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import re
import struct
import time
import warnings
from collections import Counter, defaultdict, deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian
from tqdm.auto import tqdm

from medssl.errors import DataError

__all__ = ["CineSeries", "DicomStudy", "SkippedFile", "SourceInstance", "scan_dicom_folder"]

logger = logging.getLogger(__name__)

MEDIA_STORAGE_DIRECTORY_STORAGE = "1.2.840.10008.1.3.10"  # the SOP class of a DICOMDIR (PS3.4 Annex F)
_PIXEL_DATA_TAGS = {(0x7FE0, 0x0010), (0x7FE0, 0x0008), (0x7FE0, 0x0009)}  # Pixel, Float and Double Float Pixel Data
_UNDEFINED_LENGTH = 0xFFFFFFFF
# Raw datasets without preamble/meta (old ACR-NEMA style exports) start with a group 0002 or 0008 element.
_RAW_DATASET_STARTS = (b"\x02\x00", b"\x08\x00")
# Planes count as parallel (mergeable into one stack) within 2 degrees: breath-hold repositioning moves slices,
# it does not rotate them, while a re-planned stack is usually rotated by more.
_GEOMETRY_TAGS = "ImagePositionPatient / ImageOrientationPatient / PixelSpacing"
_PARALLEL_COSINE = math.cos(math.radians(2.0))
_ORTHOGONAL_COSINE = 0.01  # |cos| between row and column directions of a valid ImageOrientationPatient
_LONG_AXIS_MIN_ANGLE_DEG = 70.0  # a LAX plane contains the LV long axis (SAX normal) within 20 degrees
_FOUR_CHAMBER_MIN_ELEVATION_DEG = 55.0
_TWO_CHAMBER_MAX_ELEVATION_DEG = 35.0
_COMPLEMENT_MIN_ELEVATION_GAP_DEG = 10.0
_CARDINAL_COSINE = math.cos(math.radians(10.0))
# A slice step more than 1.5 times the median is a gap (a missing slice); steps differing by more than 10 % from
# the median are uneven spacing. Both leave the median-step affine wrong for some slices, hence the warnings.
_GAP_FACTOR = 1.5
_UNEVEN_TOLERANCE = 0.1
_IN_PLANE_OFFSET_TOLERANCE = 0.5  # pixels: larger in-plane offsets between slices cannot be held by one affine
_TIME_DECIMALS = 2  # trigger times equal to 0.01 ms are the same frame
_LPS_TO_RAS = np.array([-1.0, -1.0, 1.0])


def _view_pattern(digit: str, word: str, *abbreviations: str) -> re.Pattern:
    """Case-insensitive whole-token match of ``4CH``, ``4-ch``, ``4c``, ``four chamber`` and the abbreviations."""
    names = [rf"{digit} ?-?ch?(amber)?", rf"{word}[ _-]?ch(amber)?", *abbreviations]
    return re.compile(rf"(?<![a-z0-9])({'|'.join(names)})(?![a-z0-9])", re.IGNORECASE)


_DESCRIBED_VIEWS = (
    ("lax_4c", _view_pattern("4", "four", "hla")),
    ("lax_2c", _view_pattern("2", "two", "vla")),
    ("other", _view_pattern("3", "three", "lvot", "rvot")),
)


@dataclass(frozen=True)
class SkippedFile:
    """A file the scan did not use.

    Attributes:
        path: path relative to the scanned folder (POSIX separators).
        reason: why, e.g. ``"not a DICOM file"``, ``"truncated pixel data (8000 of 8192 bytes)"``.
    """

    path: str
    reason: str


@dataclass(frozen=True)
class SourceInstance:
    """The DICOM instance one assembled slice/frame came from (what a DICOM SEG or SR must reference).

    Attributes:
        path: the file.
        sop_class_uid: SOPClassUID of the instance.
        sop_instance_uid: SOPInstanceUID of the instance.
        series_instance_uid: SeriesInstanceUID of its series.
        dataset: its header (everything before the pixel data; no PixelData element).
    """

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    dataset: Dataset


@dataclass
class CineSeries:
    """One assembled cine view.

    Attributes:
        view: ``"sax"``, ``"lax_2c"`` or ``"lax_4c"``.
        image: float32 ``[H, W, S, T]`` (LAX: ``S == 1``), RescaleSlope/Intercept applied; ``H`` runs along the
            DICOM rows (column index), ``W`` down the columns.
        affine: float64 4x4 NIfTI-style voxel -> RAS (mm) affine of ``image``.
        trigger_times_ms: float64 ``[T]`` median TriggerTime of each frame over the slices (NaN without TriggerTime).
        slice_positions_mm: float64 ``[S]`` true position of each slice along the affine's slice axis, relative to
            slice 0 (equals ``k * step`` for an evenly spaced stack).
        sources: ``[S][T]`` nested list of :class:`SourceInstance`, aligned with ``image``.
        series_numbers: SeriesNumber of every series the view was assembled from (several when one series per slice).
        warnings: what was imperfect (duplicates, dropped slices, uneven spacing, ...), free of identifiers.
    """

    view: str
    image: np.ndarray
    affine: np.ndarray
    trigger_times_ms: np.ndarray
    slice_positions_mm: np.ndarray
    sources: list[list[SourceInstance]]
    series_numbers: tuple[int, ...]
    warnings: list[str] = field(default_factory=list)


@dataclass
class DicomStudy:
    """The cines of one study.

    Attributes:
        label: neutral label, e.g. ``"study 1 (3fa2c1)"`` (the hash is of the StudyInstanceUID).
        study_instance_uid: StudyInstanceUID (for the DICOM outputs; not for messages).
        sax: the short-axis stack, ``None`` when the study has none (see ``ignored``).
        lax: long-axis views found, keyed ``"lax_2c"`` / ``"lax_4c"``.
        ignored: series (or parts) not used and why, e.g. ``"series 5: single frame, not a cine"``.
    """

    label: str
    study_instance_uid: str
    sax: CineSeries | None
    lax: dict[str, CineSeries]
    ignored: list[str]


@dataclass(frozen=True, eq=False)
class _Header:
    """What the classification needs from one single-frame image header (geometry in LPS mm)."""

    path: Path
    dataset: Dataset
    series_label: str
    series_number: int
    row_cosines: np.ndarray | None  # [3]
    column_cosines: np.ndarray | None  # [3]
    position: np.ndarray | None  # [3]
    pixel_spacing: tuple[float, float] | None  # (between rows, between columns)
    matrix: tuple[int, int]  # (Rows, Columns)
    trigger_time: float | None
    temporal_position: int | None

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_cosines, self.column_cosines)

    @property
    def has_geometry(self) -> bool:
        return self.position is not None and self.row_cosines is not None and self.pixel_spacing is not None

    @property
    def acquisition_order(self) -> tuple[int, int, int, str]:
        """Larger is later: re-acquired images replace earlier ones at the same position and time."""
        ds = self.dataset
        return (self.series_number, _int(ds.get("AcquisitionNumber")), _int(ds.get("InstanceNumber")), str(self.path))


@dataclass(eq=False)
class _Stack:
    """Cine images of one study sharing a plane orientation, matrix and frame count (from one or more series)."""

    headers: list[_Header]
    frames: int
    positions: int

    @property
    def first(self) -> _Header:
        return self.headers[0]

    @property
    def series_numbers(self) -> tuple[int, ...]:
        return tuple(sorted({h.series_number for h in self.headers}))

    @property
    def label(self) -> str:
        labels = sorted({h.series_label for h in self.headers})
        return labels[0] if len(labels) == 1 else f"series {', '.join(str(n) for n in self.series_numbers)}"

    @property
    def descriptions(self) -> str:
        return " ".join(sorted({str(h.dataset.get("SeriesDescription", "")) for h in self.headers}))


def _int(value: object, default: int = 0) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _float(value: object) -> float | None:
    try:
        result = float(value)
    except (TypeError, ValueError):
        return None
    return result if math.isfinite(result) else None


def _vector(value: object, length: int) -> np.ndarray | None:
    try:
        result = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return result if result.shape == (length,) and np.all(np.isfinite(result)) else None


def _short_hash(uid: str) -> str:
    return hashlib.sha256(uid.encode()).hexdigest()[:6]


def _relative(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


@contextlib.contextmanager
def _quiet_pydicom() -> Iterator[None]:
    """Silence pydicom's validation warnings and log records while scanning: they quote element values, which may
    be patient identifiers. Values are read as stored (no validation)."""
    pydicom_logger = logging.getLogger("pydicom")
    mode, level = pydicom.config.settings.reading_validation_mode, pydicom_logger.level
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    pydicom_logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        pydicom.config.settings.reading_validation_mode = mode
        pydicom_logger.setLevel(level)


def _walk_files(root: Path) -> list[Path]:
    files = []
    for folder, subfolders, names in os.walk(root):
        subfolders.sort()
        files.extend(Path(folder) / name for name in sorted(names))
    return files


def _pixel_data_problem(handle, dataset: Dataset, size: int) -> str | None:
    """Inspect the element the header read stopped at: ``None`` when pixel data follows complete, else the reason.

    ``dcmread(stop_before_pixels=True)`` leaves the file positioned at the pixel data tag, so its length field tells
    whether the file is truncated without reading the pixels. Encapsulated (compressed) data has an undefined length
    and is checked when decoded.
    """
    start = handle.tell()
    head = handle.read(12)
    implicit, little = dataset.original_encoding
    if len(head) < 8:
        return "no pixel data"
    order = "<" if little else ">"
    tag = struct.unpack(f"{order}HH", head[:4])
    if tag not in _PIXEL_DATA_TAGS:
        return "no pixel data"
    if implicit:
        (length,), header_bytes = struct.unpack(f"{order}I", head[4:8]), 8
    else:
        if len(head) < 12:
            return "truncated pixel data header"
        (length,), header_bytes = struct.unpack(f"{order}I", head[8:12]), 12
    if length == _UNDEFINED_LENGTH:
        return None
    available = size - start - header_bytes
    return None if available >= length else f"truncated pixel data ({max(available, 0)} of {length} bytes)"


def _read_header(path: Path) -> tuple[Dataset | None, str | None]:
    """Read one file's header: ``(dataset, None)``, or ``(None, reason)`` when it is unusable."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            try:
                dataset = pydicom.dcmread(handle, stop_before_pixels=True)
            except InvalidDicomError:
                handle.seek(0)
                if handle.read(2) not in _RAW_DATASET_STARTS:
                    return None, "not a DICOM file"
                handle.seek(0)
                dataset = pydicom.dcmread(handle, stop_before_pixels=True, force=True)
            # pydicom converts element values lazily; converting them all now makes a corrupt value fail here,
            # where it skips this file, instead of later in the middle of a stack.
            dataset.walk(lambda *_: None)
            syntax = getattr(dataset, "file_meta", Dataset()).get("TransferSyntaxUID")
            if _is_dicomdir(dataset):
                return dataset, None
            problem = None if syntax == DeflatedExplicitVRLittleEndian else _pixel_data_problem(handle, dataset, size)
    except OSError as error:
        return None, f"cannot be read ({type(error).__name__})"
    except Exception as error:  # noqa: BLE001 - any parser failure on a corrupt file must only skip that file
        # The message may quote header bytes, so only the exception type is reported.
        return None, f"corrupt or truncated DICOM header ({type(error).__name__})"
    if problem is not None:
        sop_class = dataset.get("SOPClassUID")
        kind = f" ({UID(str(sop_class)).name})" if sop_class else ""
        return None, f"{problem}{kind}"
    return dataset, None


def _is_dicomdir(dataset: Dataset) -> bool:
    meta = getattr(dataset, "file_meta", Dataset())
    is_directory = meta.get("MediaStorageSOPClassUID") == MEDIA_STORAGE_DIRECTORY_STORAGE
    return is_directory or "DirectoryRecordSequence" in dataset


def _dicomdir_references(dicomdir: Dataset, folder: Path) -> list[Path]:
    """Files referenced by a DICOMDIR's directory records (ReferencedFileID is relative to the DICOMDIR's folder)."""
    paths = []
    for record in dicomdir.get("DirectoryRecordSequence", []):
        file_id = record.get("ReferencedFileID")
        if file_id:
            parts = [file_id] if isinstance(file_id, str) else list(file_id)
            paths.append(folder.joinpath(*parts))
    return paths


def _header_record(path: Path, dataset: Dataset) -> _Header:
    number = dataset.get("SeriesNumber")
    series_label = (
        f"series {_int(number)}" if number not in (None, "") else f"series #{_short_hash(dataset.SeriesInstanceUID)}"
    )
    orientation = _vector(dataset.get("ImageOrientationPatient"), 6)
    spacing = _vector(dataset.get("PixelSpacing"), 2)
    if orientation is not None:
        norms = np.linalg.norm(orientation.reshape(2, 3), axis=1)
        orientation = None if np.any(norms < 0.5) else (orientation.reshape(2, 3) / norms[:, None]).ravel()
    if orientation is not None and abs(float(orientation[:3] @ orientation[3:])) > _ORTHOGONAL_COSINE:
        orientation = None  # row and column directions must be perpendicular to define a plane
    temporal = dataset.get("TemporalPositionIdentifier")
    return _Header(
        path=path,
        dataset=dataset,
        series_label=series_label,
        series_number=_int(number),
        row_cosines=None if orientation is None else orientation[:3],
        column_cosines=None if orientation is None else orientation[3:],
        position=_vector(dataset.get("ImagePositionPatient"), 3),
        pixel_spacing=None if spacing is None or np.any(spacing <= 0) else (float(spacing[0]), float(spacing[1])),
        matrix=(_int(dataset.get("Rows")), _int(dataset.get("Columns"))),
        trigger_time=_float(dataset.get("TriggerTime")),
        temporal_position=None if temporal in (None, "") else _int(temporal),
    )


def _discover(root: Path, progress: bool) -> tuple[list[_Header], list[SkippedFile]]:
    """Stage 1: read the headers of every file under ``root`` (and every DICOMDIR reference)."""
    files = _walk_files(root)
    logger.info("discover: %d files under the folder", len(files))
    seen: set[Path] = set()
    queue = deque(files)
    headers: list[_Header] = []
    skipped: list[SkippedFile] = []
    sop_files: dict[str, Path] = {}
    bar = tqdm(total=len(queue), desc="read DICOM headers", unit="file", disable=not progress)
    while queue:
        path = queue.popleft()
        resolved = path.resolve()
        if resolved in seen:
            continue
        seen.add(resolved)
        bar.update()
        relative = _relative(path, root)
        if not path.is_file():
            skipped.append(SkippedFile(relative, "referenced by a DICOMDIR but missing"))
            continue
        dataset, reason = _read_header(path)
        if dataset is not None and _is_dicomdir(dataset):
            references = _dicomdir_references(dataset, path.parent)
            new = [p for p in references if p.resolve() not in seen]
            logger.info("discover: DICOMDIR %s references %d files", relative, len(references))
            queue.extend(new)
            bar.total += len(new)
            continue
        if dataset is not None:
            reason = _instance_problem(dataset)
        if reason is not None:
            skipped.append(SkippedFile(relative, reason))
            continue
        sop = str(dataset.SOPInstanceUID)
        if sop in sop_files:
            skipped.append(SkippedFile(relative, f"same SOP instance as {_relative(sop_files[sop], root)}"))
            continue
        sop_files[sop] = path
        headers.append(_header_record(path, dataset))
    bar.close()
    for entry in skipped:
        logger.info("skipped %s: %s", entry.path, entry.reason)
    return headers, skipped


def _instance_problem(dataset: Dataset) -> str | None:
    """Why an image-bearing dataset cannot take part in a cine at all (before any grouping), or ``None``."""
    required = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
    missing = [keyword for keyword in required if not dataset.get(keyword)]
    if missing:
        return f"missing {', '.join(missing)}"
    if "Rows" not in dataset or "Columns" not in dataset:
        return f"no image pixel attributes ({UID(str(dataset.SOPClassUID)).name})"
    return None


def _series_problem(headers: Sequence[_Header]) -> str | None:
    """Why a whole series is not a cine candidate, or ``None``."""
    first = headers[0].dataset
    if _int(first.get("NumberOfFrames"), 1) > 1:
        return (
            f"multi-frame object ({UID(str(first.SOPClassUID)).name}, {_int(first.get('NumberOfFrames'))} frames) "
            "not supported; export the cine as single-frame images"
        )
    if any(_int(h.dataset.get("SamplesPerPixel"), 1) != 1 for h in headers):
        return "colour image, not a cine MR magnitude"
    if any("LOCALIZER" in [str(v).upper() for v in h.dataset.get("ImageType", [])] for h in headers):
        return "localiser"
    if not any(h.has_geometry for h in headers):
        return f"no valid {_GEOMETRY_TAGS} (not a cross-sectional image)"
    return None


def _split_orientations(headers: Sequence[_Header]) -> list[list[_Header]]:
    groups: list[list[_Header]] = []
    for header in headers:
        for group in groups:
            if _parallel(group[0], header):
                group.append(header)
                break
        else:
            groups.append([header])
    return groups


def _parallel(a: _Header, b: _Header) -> bool:
    rows, columns = a.row_cosines @ b.row_cosines, a.column_cosines @ b.column_cosines
    return bool(rows >= _PARALLEL_COSINE and columns >= _PARALLEL_COSINE)


def _temporal_key(header: _Header, use_trigger: bool) -> float | int | None:
    return round(header.trigger_time, _TIME_DECIMALS) if use_trigger else header.temporal_position


def _uses_trigger_time(headers: Iterable[_Header]) -> bool:
    return all(h.trigger_time is not None for h in headers)


def _position_clusters(headers: Sequence[_Header], normal: np.ndarray) -> list[list[_Header]]:
    """Group headers by position along ``normal``: a new slice starts where the distance jumps by > 0.5 mm
    (or a quarter of the slice thickness when that is smaller), sorted by increasing ``normal . position``."""
    thickness = _float(headers[0].dataset.get("SliceThickness")) or 2.0
    tolerance = min(0.5, 0.25 * thickness)
    ordered = sorted(headers, key=lambda h: float(normal @ h.position))
    clusters: list[list[_Header]] = []
    last = -math.inf
    for header in ordered:
        distance = float(normal @ header.position)
        if distance - last > tolerance:
            clusters.append([])
        clusters[-1].append(header)
        last = distance
    return clusters


def _cine_frames(group: Sequence[_Header]) -> tuple[int, int] | str:
    """``(frames, positions)`` of an orientation group, or the reason it is not a cine."""
    if len(group) == 1:
        return "single frame, not a cine"
    use_trigger = _uses_trigger_time(group)
    if not use_trigger and not all(h.temporal_position is not None for h in group):
        return "no temporal tags (TriggerTime / TemporalPositionIdentifier), not a cine"
    clusters = _position_clusters(group, group[0].normal)
    counts = Counter(len({_temporal_key(h, use_trigger) for h in cluster}) for cluster in clusters)
    frames = counts.most_common(1)[0][0]
    if frames < 2:
        return "one time point per position, not a cine"
    return frames, len(clusters)


def _majority_matrix(headers: Sequence[_Header]) -> tuple:
    return Counter(_matrix_key(h) for h in headers).most_common(1)[0][0]


def _matrix_key(header: _Header) -> tuple:
    return (*header.matrix, *(round(v, 3) for v in header.pixel_spacing))


def _same_stack(a: _Stack, b: _Stack) -> bool:
    return (
        _parallel(a.first, b.first)
        and a.frames == b.frames
        and _majority_matrix(a.headers) == _majority_matrix(b.headers)
        and a.first.dataset.get("FrameOfReferenceUID") == b.first.dataset.get("FrameOfReferenceUID")
    )


def _stacks(study: Sequence[_Header], ignored: list[str]) -> list[_Stack]:
    """Cine orientation groups of a study, merged across series into stacks; non-cines go to ``ignored``."""
    by_series: dict[str, list[_Header]] = defaultdict(list)
    for header in study:
        by_series[str(header.dataset.SeriesInstanceUID)].append(header)
    stacks: list[_Stack] = []
    for headers in sorted(by_series.values(), key=lambda hs: (hs[0].series_number, hs[0].series_label)):
        label = headers[0].series_label
        problem = _series_problem(headers)
        if problem is not None:
            ignored.append(f"{label}: {problem}")
            continue
        located = [h for h in headers if h.has_geometry]
        if len(located) < len(headers):
            ignored.append(f"{label}: {len(headers) - len(located)} image(s) without valid {_GEOMETRY_TAGS}, not used")
        groups = _split_orientations(located)
        for index, group in enumerate(groups):
            where = label if len(groups) == 1 else f"{label} (orientation {index + 1} of {len(groups)})"
            found = _cine_frames(group)
            if isinstance(found, str):
                ignored.append(f"{where}: {found}")
                continue
            stack = _Stack(list(group), *found)
            for other in stacks:
                if _same_stack(other, stack):
                    other.headers.extend(stack.headers)
                    other.positions = len(_position_clusters(other.headers, other.first.normal))
                    break
            else:
                stacks.append(stack)
    return stacks


def _described_view(description: str) -> str | None:
    for view, pattern in _DESCRIBED_VIEWS:
        if pattern.search(description):
            return view
    return None


def _elevation_deg(normal: np.ndarray) -> float:
    """Angle (degrees) between a plane's normal and the patient's transverse plane (LPS z is superior)."""
    return math.degrees(math.asin(min(1.0, abs(float(normal[2])))))


def _geometric_view(elevation: float) -> str | None:
    if elevation >= _FOUR_CHAMBER_MIN_ELEVATION_DEG:
        return "lax_4c"
    if elevation <= _TWO_CHAMBER_MAX_ELEVATION_DEG:
        return "lax_2c"
    return None


def _classify_lax(candidates: Sequence[_Stack], sax: _Stack, ignored: list[str]) -> dict[str, tuple[_Stack, list[str]]]:
    """Pick the 2C and 4C stacks among single-position cines (rules in the module docstring)."""
    sax_normal = sax.first.normal
    decided: list[tuple[_Stack, str | None, float, list[str]]] = []
    for stack in candidates:
        normal = stack.first.normal
        angle = math.degrees(math.acos(min(1.0, abs(float(normal @ sax_normal)))))
        if angle < _LONG_AXIS_MIN_ANGLE_DEG:
            ignored.append(
                f"{stack.label}: single-slice cine whose plane is {angle:.0f} degrees from the short-axis planes "
                f"(a long-axis view needs >= {_LONG_AXIS_MIN_ANGLE_DEG:.0f}); not a 2- or 4-chamber view"
            )
            continue
        described = _described_view(stack.descriptions)
        if described == "other":
            ignored.append(f"{stack.label}: long-axis cine described as a 3-chamber / outflow-tract view, not used")
            continue
        elevation = _elevation_deg(normal)
        geometric = _geometric_view(elevation)
        notes = []
        if geometric is not None and described is not None and described != geometric:
            notes.append(
                f"SeriesDescription suggests {described}, but the plane geometry (elevation {elevation:.0f} degrees) "
                f"says {geometric}; geometry used"
            )
        decided.append((stack, geometric or described, elevation, notes))
    resolved = []
    for stack, view, elevation, notes in decided:
        if view is None:
            for other, other_view, other_elevation, _ in decided:
                if other is stack or other_view is None or _geometric_view(other_elevation) is None:
                    continue
                if abs(elevation - other_elevation) >= _COMPLEMENT_MIN_ELEVATION_GAP_DEG:
                    higher = elevation > other_elevation
                    if (other_view == "lax_2c") == higher:
                        view = "lax_4c" if higher else "lax_2c"
                        break
        if view is None:
            ignored.append(
                f"{stack.label}: long-axis cine of undetermined type (elevation {elevation:.0f} degrees, "
                "no 2CH/4CH in its description)"
            )
            continue
        resolved.append((stack, view, notes))
    chosen: dict[str, tuple[_Stack, list[str]]] = {}
    for view in ("lax_2c", "lax_4c"):
        options = [(s, n) for s, v, n in resolved if v == view]
        # Prefer a description that agrees, then more frames, then the latest series (a repeat replaces a failed one).
        options.sort(key=lambda o: (_described_view(o[0].descriptions) == view, o[0].frames, o[0].series_numbers))
        if options:
            chosen[view] = options[-1]
        for stack, _ in options[:-1]:
            ignored.append(f"{stack.label}: another {view} candidate ({options[-1][0].label}) was chosen")
    return chosen


@dataclass
class _Plan:
    """The stacks chosen for one study, before any pixel is read."""

    label: str
    study_instance_uid: str
    views: dict[str, tuple[_Stack, list[str]]]
    ignored: list[str]


def _plan_study(label: str, uid: str, study: Sequence[_Header]) -> _Plan:
    """Stage 2: classify one study's images (rules in the module docstring)."""
    ignored: list[str] = []
    stacks = _stacks(study, ignored)
    multi = sorted((s for s in stacks if s.positions >= 2), key=lambda s: (s.positions, s.frames, s.series_numbers))
    single = [s for s in stacks if s.positions < 2]
    if not multi:
        ignored.append("no cine short-axis stack (no cine with two or more parallel slice positions)")
        for stack in single:
            ignored.append(f"{stack.label}: single-slice cine, not used without a short-axis stack")
        return _Plan(label, uid, {}, ignored)
    sax = multi[-1]
    for stack in multi[:-1]:
        ignored.append(
            f"{stack.label}: another multi-slice cine stack ({stack.positions} slices); the one with the most "
            f"slices ({sax.label}, {sax.positions}) is used as the short-axis stack"
        )
    notes = []
    if np.abs(sax.first.normal).max() >= _CARDINAL_COSINE:
        notes.append(
            "the short-axis stack is within 10 degrees of a transverse, coronal or sagittal plane; check that it "
            "is a short-axis stack"
        )
    views = {"sax": (sax, notes), **_classify_lax(single, sax, ignored)}
    return _Plan(label, uid, views, ignored)


def _group_studies(headers: Sequence[_Header]) -> list[tuple[str, str, list[_Header]]]:
    by_study: dict[str, list[_Header]] = defaultdict(list)
    for header in headers:
        by_study[str(header.dataset.StudyInstanceUID)].append(header)
    order = sorted(
        by_study,
        key=lambda uid: (
            str(by_study[uid][0].dataset.get("StudyDate", "")),
            str(by_study[uid][0].dataset.get("StudyTime", "")),
            _short_hash(uid),
        ),
    )
    return [(f"study {k + 1} ({_short_hash(uid)})", uid, by_study[uid]) for k, uid in enumerate(order)]


def _pixels(header: _Header) -> np.ndarray:
    """Decode one instance's frame as float32 ``[Columns, Rows]`` with the modality rescale applied."""
    pixels = pydicom.dcmread(header.path).pixel_array
    if pixels.shape != header.matrix:
        raise ValueError(f"decoded shape {pixels.shape} differs from Rows x Columns {header.matrix}")
    slope = _float(header.dataset.get("RescaleSlope"))
    intercept = _float(header.dataset.get("RescaleIntercept"))
    values = pixels.astype(np.float64) * (1.0 if slope is None else slope) + (intercept or 0.0)
    return values.T.astype(np.float32)


def _source(header: _Header) -> SourceInstance:
    ds = header.dataset
    return SourceInstance(header.path, str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), ds)


def _drop_odd_matrices(stack: _Stack, notes: list[str]) -> list[_Header]:
    majority = _majority_matrix(stack.headers)
    kept = [h for h in stack.headers if _matrix_key(h) == majority]
    odd = Counter(_matrix_key(h) for h in stack.headers if _matrix_key(h) != majority)
    for key, count in odd.items():
        notes.append(
            f"{count} image(s) with matrix {key[0]}x{key[1]} and pixel spacing {key[2]}x{key[3]} mm differ from "
            f"the stack's {majority[0]}x{majority[1]} / {majority[2]}x{majority[3]} mm: dropped (not resampled)"
        )
    return kept


def _slice_frames(
    cluster: Sequence[_Header], use_trigger: bool, position_mm: float, notes: list[str]
) -> list[_Header]:
    """One slice's frames sorted by time, keeping the latest acquisition of duplicated times."""
    by_time: dict[float | int, list[_Header]] = defaultdict(list)
    for header in cluster:
        by_time[_temporal_key(header, use_trigger)].append(header)
    frames = []
    for key in sorted(by_time):
        copies = sorted(by_time[key], key=lambda h: h.acquisition_order)
        if len(copies) > 1:
            unit = " ms" if use_trigger else " (temporal position)"
            notes.append(
                f"{len(copies)} instances at slice position {position_mm:.1f} mm, time {key}{unit}: kept the latest "
                f"({copies[-1].series_label}, instance {_int(copies[-1].dataset.get('InstanceNumber'))})"
            )
        frames.append(copies[-1])
    return frames


def _spacing_notes(distances: np.ndarray, notes: list[str]) -> float:
    """Median step between neighbouring slices; gaps and uneven steps are noted."""
    steps = np.abs(np.diff(distances))
    step = float(np.median(steps))
    for k, value in enumerate(steps):
        if value > _GAP_FACTOR * step:
            notes.append(
                f"gap of {value:.2f} mm between slices {k} and {k + 1} (median step {step:.2f} mm): a slice is "
                "probably missing; the affine uses the median step, slice_positions_mm holds the true positions"
            )
    uneven = np.abs(steps - step) > _UNEVEN_TOLERANCE * step
    if uneven.any() and not np.any(steps > _GAP_FACTOR * step):
        notes.append(
            f"uneven slice spacing: steps {np.round(steps, 2).tolist()} mm (median {step:.2f} mm); the affine uses "
            "the median step"
        )
    return step


def _assemble(view: str, stack: _Stack, notes: list[str], bar: tqdm) -> CineSeries | str:
    """Stage 3: read the pixels of a stack and build the array, affine and source references (or a reason)."""
    headers = _drop_odd_matrices(stack, notes)
    normal = headers[0].normal
    use_trigger = _uses_trigger_time(headers)
    slices = []
    for cluster in _position_clusters(headers, normal):
        distance = float(normal @ cluster[0].position)
        slices.append((distance, _slice_frames(cluster, use_trigger, distance, notes)))
    frames = Counter(len(f) for _, f in slices).most_common(1)[0][0]
    for distance, slice_frames in slices:
        if len(slice_frames) != frames:
            notes.append(
                f"slice at {distance:.1f} mm has {len(slice_frames)} frames, the stack {frames}: slice dropped"
            )
    announced = _int(headers[0].dataset.get("CardiacNumberOfImages"), frames)
    if announced != frames:
        notes.append(f"CardiacNumberOfImages is {announced} but {frames} frames were found per slice")
    # SAX along -n (base -> apex in the standard view); descending distance along n.
    slices = sorted((s for s in slices if len(s[1]) == frames), key=lambda s: -s[0])
    rows = []
    kept = []
    for distance, slice_frames in slices:
        try:
            decoded = []
            for header in slice_frames:
                bar.update()
                decoded.append(_pixels(header))
        except Exception as error:  # noqa: BLE001 - one undecodable frame drops its slice, not the study
            reason = f"{type(error).__name__}: {str(error)[:200]}"
            notes.append(f"slice at {distance:.1f} mm: a frame could not be decoded ({reason}); slice dropped")
            continue
        rows.append(np.stack(decoded, axis=-1))
        kept.append((distance, slice_frames))
    if not kept or (view == "sax" and len(kept) < 2):
        return f"{len(kept)} usable slice(s) left after dropping the ones listed above"
    image = np.stack(rows, axis=2)  # [H, W, S, T]
    first = kept[0][1][0]
    row_spacing, column_spacing = first.pixel_spacing
    distances = np.array([d for d, _ in kept])
    if view == "sax":
        slice_axis = -normal * _spacing_notes(distances, notes)
    else:
        thickness = _float(first.dataset.get("SliceThickness")) or _float(first.dataset.get("SpacingBetweenSlices"))
        if thickness is None:
            notes.append("no SliceThickness or SpacingBetweenSlices: the slice axis is 1 mm long")
        slice_axis = normal * (thickness or 1.0)
    affine = np.eye(4)
    affine[:3, 0] = first.row_cosines * column_spacing
    affine[:3, 1] = first.column_cosines * row_spacing
    affine[:3, 2] = slice_axis
    affine[:3, 3] = first.position
    _check_in_plane_offsets(affine, kept, notes)
    affine[:3] *= _LPS_TO_RAS[:, None]
    times = np.array(
        [[h.trigger_time if h.trigger_time is not None else np.nan for h in f] for _, f in kept], dtype=np.float64
    )
    if not use_trigger:
        notes.append("no TriggerTime: frames ordered by TemporalPositionIdentifier, trigger_times_ms is NaN")
    return CineSeries(
        view=view,
        image=image,
        affine=affine,
        trigger_times_ms=np.median(times, axis=0) if use_trigger else np.full(frames, np.nan),
        slice_positions_mm=distances[0] - distances,
        sources=[[_source(h) for h in f] for _, f in kept],
        series_numbers=stack.series_numbers,
        warnings=notes,
    )


def _check_in_plane_offsets(affine_lps: np.ndarray, kept: Sequence[tuple[float, list[_Header]]], notes: list[str]):
    """Note slices whose origin is shifted in-plane from where the single affine puts them."""
    inverse = np.linalg.inv(affine_lps)
    for k, (distance, slice_frames) in enumerate(kept):
        voxel = inverse @ np.append(slice_frames[0].position, 1.0)
        offset = float(np.hypot(voxel[0], voxel[1]))
        if offset > _IN_PLANE_OFFSET_TOLERANCE:
            notes.append(
                f"slice {k} (at {distance:.1f} mm) is shifted {offset:.1f} pixels in-plane from the stack's grid; "
                "the affine places it as if unshifted"
            )


def _load_study(plan: _Plan, bar: tqdm) -> DicomStudy:
    ignored = list(plan.ignored)
    assembled: dict[str, CineSeries] = {}
    for view, (stack, notes) in plan.views.items():
        done = bar.n
        result = _assemble(view, stack, list(notes), bar)
        bar.update(len(stack.headers) - (bar.n - done))  # images dropped before decoding count as done
        if isinstance(result, str):
            ignored.append(f"{stack.label} ({view}): {result}")
            continue
        assembled[view] = result
        for note in result.warnings:
            logger.warning("%s, %s (%s): %s", plan.label, stack.label, view, note)
    if "sax" not in assembled and plan.views:
        ignored.append("no usable cine short-axis stack")
    lax = {view: series for view, series in assembled.items() if view != "sax"}
    return DicomStudy(plan.label, plan.study_instance_uid, assembled.get("sax"), lax, ignored)


def scan_dicom_folder(
    root: str | os.PathLike, *, progress: bool = True
) -> tuple[list[DicomStudy], list[SkippedFile]]:
    """Find the cine SAX stack and LAX 2C/4C views of every study in a folder of DICOM files and assemble them.

    See the module docstring for how files are found, how series are classified (geometry and temporal tags;
    SeriesDescription only to break 2C/4C ties) and how imperfect data is handled.

    Args:
        root: folder to scan recursively (files with or without ``.dcm``, DICOMDIR honoured), or the path of a
            ``DICOMDIR`` file, which scans its folder.
        progress: show a tqdm bar per stage (header reading, pixel loading).

    Returns:
        ``(studies, skipped)``: every study found, in study date order (a study without a usable SAX stack has
        ``sax=None`` and says why in ``ignored``; its LAX views are not loaded), and the files that were not used
        with the reason. Each :class:`CineSeries` holds ``image`` float32 ``[H, W, S, T]``, a 4x4 voxel -> RAS
        affine and ``sources`` ``[S][T]``.

    Raises:
        DataError: if ``root`` is not a folder, holds no files, holds no readable DICOM image, or no study holds a
            cine short-axis stack (the message lists, per study, what was found instead).
    """
    root = Path(root)
    if root.is_file() and root.name.upper() == "DICOMDIR":
        root = root.parent  # a CD/DVD export is often opened through its DICOMDIR
    if not root.is_dir():
        raise DataError(f"DICOM folder {root} does not exist or is not a folder")
    with _quiet_pydicom():
        return _scan(root, progress)


def _scan(root: Path, progress: bool) -> tuple[list[DicomStudy], list[SkippedFile]]:
    start = time.perf_counter()
    headers, skipped = _discover(root, progress)
    if not headers:
        if not skipped:
            raise DataError(f"DICOM folder {root} is empty: no files found (subfolders included)")
        reasons = Counter(entry.reason for entry in skipped)
        summary = "; ".join(f"{count} x {reason}" for reason, count in reasons.most_common(5))
        raise DataError(f"no DICOM image found under {root}: {len(skipped)} file(s) skipped ({summary})")
    plans = [_plan_study(label, uid, study) for label, uid, study in _group_studies(headers)]
    discovered = time.perf_counter()
    logger.info(
        "discover: %d images in %d studies, %d files skipped (%.1f s)",
        len(headers),
        len(plans),
        len(skipped),
        discovered - start,
    )
    total = sum(len(stack.headers) for plan in plans for stack, _ in plan.views.values())
    with tqdm(total=total, desc="load DICOM pixels", unit="image", disable=not progress) as bar:
        studies = [_load_study(plan, bar) for plan in plans]
    logger.info("load: %d images (%.1f s)", total, time.perf_counter() - discovered)
    for study in studies:
        for reason in study.ignored:
            logger.info("%s, not used: %s", study.label, reason)
    if not any(study.sax is not None for study in studies):
        details = " | ".join(f"{s.label}: {'; '.join(s.ignored) or 'no cine images'}" for s in studies)
        raise DataError(f"no cine short-axis (SAX) stack found under {root}. {details}")
    return studies, skipped
