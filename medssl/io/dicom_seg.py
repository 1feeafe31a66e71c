"""DICOM Segmentation (SEG) of a short-axis cine: RV cavity, LV myocardium and LV cavity on the source MR instances.

The SEG is a BINARY Segmentation Storage instance (DICOM PS3.3 A.51) built with highdicom (Herrmann et al., 2022,
"Highdicom: a Python library for standardized encoding of image annotations and machine learning model outputs in
pathology and radiology", J Digit Imaging 35, https://doi.org/10.1007/s10278-022-00683-y). Its three segments keep the
ACDC label ids as segment numbers (1 RV cavity, 2 LV myocardium, 3 LV cavity), coded with SNOMED CT concepts from
CID 7150/7151/7152 (category Anatomical Structure, types Right ventricle, Left ventricle myocardium, Left ventricle;
anatomic region Heart). Every frame of the SEG points at its source MR instance (Derivation Image Sequence), and the
Patient and Study modules are copied from the source series, as the standard requires.

A cine has several instances at each slice position (one per cardiac phase), which highdicom refuses in one call
(its dimension index is the plane position only). So one SEG is built per cardiac phase and the phases are merged
into one instance with a third dimension, the Temporal Position Index of the Frame Content Sequence (set to the
1-based cine frame number), the way the Enhanced MR family organises cine frames.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
from pydicom import Dataset
from pydicom.dataelem import DataElement
from pydicom.pixels import pack_bits, unpack_bits
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.tag import Tag

from medssl import __version__
from medssl.engine.checkpoints import atomic_write
from medssl.errors import DataError

__all__ = ["MANUFACTURER", "SEGMENTS", "cine_segmentation", "write_dicom"]

MANUFACTURER = "medssl"
SEGMENTS = (
    (1, "RV cavity", codes.SCT.RightVentricle),
    (2, "LV myocardium", codes.SCT.LeftVentricleMyocardium),
    (3, "LV cavity", codes.SCT.LeftVentricle),
)
"""``(segment number == ACDC label id, segment label, SNOMED CT segmented property type)`` of each segment."""

_TEMPORAL_POSITION_INDEX = Tag("TemporalPositionIndex")
_FRAME_CONTENT_SEQUENCE = Tag("FrameContentSequence")
_SERIES_INSTANCE_UID = Tag("SeriesInstanceUID")


def write_dicom(dataset: Dataset, path: str | Path) -> Path:
    """Save a DICOM dataset (with its file meta information) through a temporary sibling file and a rename.

    Args:
        dataset: the instance to save, e.g. from :func:`cine_segmentation` or
            :func:`medssl.io.dicom_sr.measurement_report`.
        path: destination file; parent folders are created.

    Returns:
        ``path``. A failure leaves no file at ``path`` (nor a temporary one).
    """
    return atomic_write(path, lambda temporary: dataset.save_as(temporary, enforce_file_format=True))


def _check_inputs(
    labels: np.ndarray, sources: Sequence[Sequence[Dataset]], frames: Sequence[int] | None
) -> list[int]:
    """The cine frame indices to encode, after checking ``labels`` against ``sources``."""
    if not isinstance(labels, np.ndarray) or labels.ndim != 4 or labels.size == 0:
        raise DataError(
            f"labels must be a non-empty numpy label map [H, W, S, T], got {type(labels).__name__} of shape "
            f"{getattr(labels, 'shape', None)}."
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"labels must hold integer label ids, got dtype {labels.dtype}.")
    unexpected = np.setdiff1d(np.unique(labels), [0, *(number for number, _, _ in SEGMENTS)])
    if unexpected.size:
        raise DataError(
            f"labels contain ids {unexpected.tolist()[:10]}; expected only 0 (background), 1 (RV cavity), "
            "2 (LV myocardium), 3 (LV cavity)."
        )
    height, width, slices, num_frames = labels.shape
    grid = [len(row) for row in sources]
    if len(grid) != slices or any(length != num_frames for length in grid):
        raise DataError(
            f"sources must be a [S][T] = [{slices}][{num_frames}] nested list of datasets matching labels "
            f"{labels.shape}; got {len(grid)} slice(s) with frame counts {sorted(set(grid))}."
        )
    for row in sources:
        for source in row:
            # A DICOM row runs along label axis H (see medssl.io.dicom_write), so Columns == H and Rows == W.
            if (int(source.Rows), int(source.Columns)) != (width, height):
                raise DataError(
                    f"a source instance has Rows x Columns {source.Rows} x {source.Columns}, but labels [H, W] = "
                    f"[{height}, {width}] need Rows == W and Columns == H."
                )
    chosen = list(range(num_frames)) if frames is None else [int(frame) for frame in frames]
    if not chosen or len(set(chosen)) != len(chosen) or not all(0 <= frame < num_frames for frame in chosen):
        raise DataError(
            f"frames must be distinct cine frame indices in [0, {num_frames - 1}], got {list(frames)}."
        )
    return sorted(chosen)


def _segment_descriptions(model_name: str, model_version: str) -> list[hd.seg.SegmentDescription]:
    algorithm = hd.AlgorithmIdentificationSequence(
        name=f"medssl {model_name}"[:64],
        version=model_version[:64],
        family=codes.DCM.ArtificialIntelligence,
    )
    return [
        hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=label,
            segmented_property_category=codes.SCT.AnatomicalStructure,
            segmented_property_type=property_type,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            anatomic_regions=[codes.SCT.Heart],
        )
        for number, label, property_type in SEGMENTS
    ]


def _as_one_series(images: list[Dataset]) -> list[Dataset]:
    """The images as highdicom accepts them, from one series.

    Some vendors store a cine stack as one series per slice; highdicom refuses sources from several series, so they
    get copies that share the first image's Series Instance UID (the originals are left untouched).
    :func:`_merge_phases` then lists the real series in the Referenced Series Sequence; the per-frame references
    name SOP instances only, so they are right either way.
    """
    series = images[0].SeriesInstanceUID
    if all(image.SeriesInstanceUID == series for image in images):
        return images
    proxies = []
    for image in images:
        proxy = Dataset(dict(image.items()))  # a new element dict: replacing one element leaves `image` as it was
        proxy[_SERIES_INSTANCE_UID] = DataElement(_SERIES_INSTANCE_UID, "UI", series)
        proxies.append(proxy)
    return proxies


def _referenced_series(images: list[Dataset]) -> DicomSequence:
    """Referenced Series Sequence items listing ``images`` under their own series, in order of appearance."""
    by_series: dict[str, list[Dataset]] = {}
    for image in images:
        reference = Dataset()
        reference.ReferencedSOPClassUID = image.SOPClassUID
        reference.ReferencedSOPInstanceUID = image.SOPInstanceUID
        by_series.setdefault(image.SeriesInstanceUID, []).append(reference)
    items = []
    for series, references in by_series.items():
        item = Dataset()
        item.SeriesInstanceUID = series
        item.ReferencedInstanceSequence = DicomSequence(references)
        items.append(item)
    return DicomSequence(items)


def _merge_phases(phases: list[hd.seg.Segmentation], frames: list[int], images: list[Dataset]) -> Dataset:
    """One SEG holding the frames of every single-phase SEG, indexed by segment, position and temporal position;
    ``images`` are the source instances of every phase, listed in the Referenced Series Sequence. The phases are
    consumed: their items move into the result, which is built on the first phase."""
    merged = phases[0]
    per_frame, pixels = [], []
    for frame, phase in zip(frames, phases):
        for item in phase.PerFrameFunctionalGroupsSequence:
            content = item.FrameContentSequence[0]
            content.TemporalPositionIndex = frame + 1
            content.DimensionIndexValues = [*content.DimensionIndexValues, frame + 1]
            per_frame.append(item)
        num_pixels = int(phase.NumberOfFrames) * int(phase.Rows) * int(phase.Columns)
        pixels.append(unpack_bits(phase.PixelData)[:num_pixels])
    temporal = Dataset()
    temporal.DimensionOrganizationUID = merged.DimensionIndexSequence[0].DimensionOrganizationUID
    temporal.DimensionIndexPointer = _TEMPORAL_POSITION_INDEX
    temporal.FunctionalGroupPointer = _FRAME_CONTENT_SEQUENCE
    temporal.DimensionDescriptionLabel = "Temporal Position Index"
    merged.DimensionIndexSequence.append(temporal)

    merged.ReferencedSeriesSequence = _referenced_series(images)
    merged.SourceImageSequence = DicomSequence([item for phase in phases for item in phase.SourceImageSequence])
    merged.PerFrameFunctionalGroupsSequence = DicomSequence(per_frame)
    merged.NumberOfFrames = len(per_frame)
    merged.PixelData = pack_bits(np.concatenate(pixels))
    # A plain Dataset: the copy's highdicom frame index still describes phase one only.
    plain = Dataset(dict(merged.items()))
    plain.file_meta = merged.file_meta
    return plain


def cine_segmentation(
    labels: np.ndarray,
    sources: Sequence[Sequence[Dataset]],
    *,
    frames: Sequence[int] | None = None,
    model_name: str = "cine_seg",
    model_version: str = __version__,
    series_number: int = 901,
    series_description: str = "medssl cine segmentation",
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
) -> Dataset:
    """Encode a SAX cine label map as one BINARY DICOM Segmentation that references its source MR instances.

    Segment numbers equal the ACDC label ids (:data:`SEGMENTS`). Every chosen cine frame contributes one SEG frame per
    segment and slice (empty ones included, so a reader finds every referenced source instance), each referencing
    its source instance and carrying the slice position and the 1-based cine frame number as Temporal Position Index.

    Args:
        labels: integer label map ``[H, W, S, T]`` (0 background, 1 RV cavity, 2 LV myocardium, 3 LV cavity) on the
            native grid of the source series; ``labels[:, :, s, t].T`` lies pixel for pixel on ``sources[s][t]``
            (``H`` runs along a DICOM row, the :mod:`medssl.io.dicom_write` convention).
        sources: ``[S][T]`` headers of the source MR Image instances (pixel data not needed), aligned with
            ``labels``; one series, or one series per slice as some vendors store cine stacks.
        frames: 0-based cine frames to encode, e.g. ``[ed, es]``; default every frame.
        model_name: name of the segmentation model, recorded in the algorithm identification ("medssl <name>") and
            as Manufacturer's Model Name.
        model_version: algorithm version; default the medssl version.
        series_number: Series Number of the new SEG series.
        series_description: Series Description of the new SEG series (64 characters at most).
        series_instance_uid: UID of the new series; default a new UID.
        sop_instance_uid: UID of the SEG instance; default a new UID.

    Returns:
        The Segmentation Storage dataset with file meta information; save it with :func:`write_dicom`
        (``highdicom.seg.Segmentation.from_dataset`` turns it into a highdicom object for frame/segment queries).

    Raises:
        DataError: when ``labels`` is not a 4-D integer array of ids 0-3, ``sources`` is not ``[S][T]`` or its
            matrix size does not match, ``frames`` holds an index outside ``[0, T)`` or a duplicate, or highdicom
            rejects the sources (e.g. instances without Image Plane attributes or of different frames of reference).
    """
    chosen = _check_inputs(labels, sources, frames)
    descriptions = _segment_descriptions(model_name, model_version)
    series_instance_uid = series_instance_uid or hd.UID()
    sop_instance_uid = sop_instance_uid or hd.UID()
    phases = []
    for frame in chosen:
        try:
            phases.append(
                hd.seg.Segmentation(
                    source_images=_as_one_series([row[frame] for row in sources]),
                    pixel_array=np.ascontiguousarray(labels[:, :, :, frame].transpose(2, 1, 0), dtype=np.uint8),
                    segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
                    segment_descriptions=descriptions,
                    series_instance_uid=series_instance_uid,
                    series_number=series_number,
                    sop_instance_uid=sop_instance_uid,
                    instance_number=1,
                    manufacturer=MANUFACTURER,
                    manufacturer_model_name=model_name[:64],
                    software_versions=f"medssl {__version__}",
                    device_serial_number="none",
                    series_description=series_description[:64],
                    omit_empty_frames=False,
                    content_label="CINE_SEG",
                    content_description=f"{model_name} segmentation"[:64],
                )
            )
        except (ValueError, TypeError, AttributeError) as err:
            raise DataError(f"cannot build a DICOM SEG on the source series (cine frame {frame}): {err}") from err
    return _merge_phases(phases, chosen, [row[frame] for frame in chosen for row in sources])
