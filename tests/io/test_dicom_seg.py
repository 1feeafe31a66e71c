"""Tests for medssl.io.dicom_seg: dciodvfy conformance, pixel/reference round trip, coded segments, identifiers."""

from __future__ import annotations

import copy
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest

from medssl.errors import DataError
from medssl.io.dicom_seg import cine_segmentation, write_dicom


@pytest.fixture(scope="module")
def cine(phantom_dicom_cohort) -> tuple[np.ndarray, list[list[pydicom.Dataset]]]:
    """A phantom SAX label map ``[H, W, S, T]`` and its ``[S][T]`` DICOM headers (written by write_mr_cine_series)."""
    subject = phantom_dicom_cohort() / "sub-0000"
    labels = np.asarray(nib.load(subject / "sax_label.nii.gz").dataobj).astype(np.uint8)
    slices, frames = labels.shape[2:]
    # dicom_write numbers instances slice-major: InstanceNumber = s * T + t + 1.
    headers = {
        int(ds.InstanceNumber): ds
        for ds in (pydicom.dcmread(path, stop_before_pixels=True) for path in (subject / "dicom" / "sax").iterdir())
    }
    sources = [[headers[s * frames + t + 1] for t in range(frames)] for s in range(slices)]
    return labels, sources


@pytest.fixture(scope="module")
def written(cine, tmp_path_factory) -> Path:
    labels, sources = cine
    return write_dicom(cine_segmentation(labels, sources), tmp_path_factory.mktemp("seg") / "seg.dcm")


def test_dciodvfy_reports_no_errors(written, dciodvfy):
    errors = dciodvfy(written).errors
    assert errors == []


def test_every_frame_matches_its_source_instance(cine, written):
    labels, sources = cine
    seg = pydicom.dcmread(written)
    where = {src.SOPInstanceUID: (s, t) for s, row in enumerate(sources) for t, src in enumerate(row)}
    pixels = seg.pixel_array
    slices, frames = labels.shape[2:]
    assert seg.SegmentationType == "BINARY"
    assert int(seg.NumberOfFrames) == pixels.shape[0] == 3 * slices * frames
    seen = set()
    for index, item in enumerate(seg.PerFrameFunctionalGroupsSequence):
        source = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        s, t = where[source]
        segment = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        np.testing.assert_array_equal(pixels[index], labels[:, :, s, t].T == segment)
        content = item.FrameContentSequence[0]
        assert int(content.TemporalPositionIndex) == t + 1 == int(sources[s][t].TemporalPositionIdentifier)
        assert list(content.DimensionIndexValues)[-1] == t + 1
        np.testing.assert_allclose(
            np.asarray(item.PlanePositionSequence[0].ImagePositionPatient, float),
            np.asarray(sources[s][t].ImagePositionPatient, float),
            atol=1e-3,
        )
        seen.add((source, segment))
    assert seen == {(uid, segment) for uid in where for segment in (1, 2, 3)}
    pointers = [item.DimensionIndexPointer for item in seg.DimensionIndexSequence]
    assert pointers == [
        pydicom.tag.Tag("ReferencedSegmentNumber"),
        pydicom.tag.Tag("ImagePositionPatient"),
        pydicom.tag.Tag("TemporalPositionIndex"),
    ]


def test_highdicom_reads_it_back_by_source_instance(cine, written):
    labels, sources = cine
    seg = hd.seg.segread(written)
    chosen = [sources[s][t] for s in (0, labels.shape[2] // 2) for t in range(labels.shape[3])]
    combined = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=[src.SOPInstanceUID for src in chosen], combine_segments=True
    )
    expected = [labels[:, :, s, t].T for s in (0, labels.shape[2] // 2) for t in range(labels.shape[3])]
    np.testing.assert_array_equal(combined, np.stack(expected))


def test_segments_are_coded_and_identify_the_algorithm(written):
    seg = pydicom.dcmread(written)
    expected = [(1, "RV cavity", "53085002"), (2, "LV myocardium", "49848007"), (3, "LV cavity", "87878005")]
    for item, (number, label, type_code) in zip(seg.SegmentSequence, expected, strict=True):
        assert (int(item.SegmentNumber), item.SegmentLabel) == (number, label)
        category = item.SegmentedPropertyCategoryCodeSequence[0]
        kind = item.SegmentedPropertyTypeCodeSequence[0]
        region = item.AnatomicRegionSequence[0]
        assert (category.CodingSchemeDesignator, category.CodeValue) == ("SCT", "91723000")
        assert (kind.CodingSchemeDesignator, kind.CodeValue) == ("SCT", type_code)
        assert (region.CodingSchemeDesignator, region.CodeValue) == ("SCT", "80891009")
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        assert algorithm.AlgorithmName == "medssl cine_seg"
        assert algorithm.AlgorithmFamilyCodeSequence[0].CodeValue == "123110"  # Artificial Intelligence
    assert (seg.Manufacturer, seg.ManufacturerModelName) == ("medssl", "cine_seg")


def test_study_identifiers_are_copied_from_the_source(cine, written):
    _, sources = cine
    seg, source = pydicom.dcmread(written), sources[0][0]
    for keyword in (
        "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyDate", "StudyID",
        "AccessionNumber", "FrameOfReferenceUID",
    ):
        assert seg[keyword].value == source[keyword].value, keyword
    assert seg.SeriesInstanceUID != source.SeriesInstanceUID
    assert seg.Modality == "SEG"


def test_frame_subset_references_only_those_frames(cine, tmp_path, dciodvfy):
    labels, sources = cine
    chosen = [0, labels.shape[3] - 1]
    path = write_dicom(cine_segmentation(labels, sources, frames=chosen[::-1]), tmp_path / "ed_es.dcm")
    errors = dciodvfy(path).errors
    assert errors == []
    seg = pydicom.dcmread(path)
    assert int(seg.NumberOfFrames) == 3 * labels.shape[2] * len(chosen)
    referenced = {ref.ReferencedSOPInstanceUID for ref in seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence}
    assert referenced == {row[t].SOPInstanceUID for row in sources for t in chosen}
    items = seg.PerFrameFunctionalGroupsSequence
    temporal = {int(item.FrameContentSequence[0].TemporalPositionIndex) for item in items}
    assert temporal == {t + 1 for t in chosen}


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda labels, sources: (labels + 1, sources), "labels contain ids [4]"),
        (lambda labels, sources: (labels.astype(np.float32), sources), "integer label ids"),
        (lambda labels, sources: (labels[..., 0], sources), "[H, W, S, T]"),
        (lambda labels, sources: (labels, sources[:-1]), "nested list of datasets"),
        (lambda labels, sources: (labels[:-1], sources), "Rows == W and Columns == H"),
    ],
)
def test_bad_inputs_raise_clear_errors(cine, change, message):
    labels, sources = change(*cine)
    with pytest.raises(DataError) as error:
        cine_segmentation(labels, sources)
    assert message in str(error.value)


@pytest.mark.parametrize("frames", [[], [0, 0], [99], [-1]])
def test_bad_frame_choice_is_rejected(cine, frames):
    with pytest.raises(DataError, match="distinct cine frame indices"):
        cine_segmentation(*cine, frames=frames)


def test_write_dicom_leaves_nothing_when_saving_fails(tmp_path):
    incomplete = pydicom.Dataset()  # no file meta information: enforce_file_format refuses to write it
    with pytest.raises(Exception):
        write_dicom(incomplete, tmp_path / "out.dcm")
    assert list(tmp_path.iterdir()) == []


def test_one_series_per_slice_is_referenced_series_by_series(cine, tmp_path, dciodvfy):
    labels, sources = cine
    # Some vendors store each slice position of a cine stack as its own series.
    per_slice = [[copy.deepcopy(source) for source in row] for row in sources]
    for index, row in enumerate(per_slice):
        for source in row:
            source.SeriesInstanceUID = f"{sources[0][0].SeriesInstanceUID}.{index + 1}"
    path = write_dicom(cine_segmentation(labels, per_slice, frames=[1]), tmp_path / "seg.dcm")
    errors = dciodvfy(path).errors
    assert errors == []
    listed = {
        item.SeriesInstanceUID: [ref.ReferencedSOPInstanceUID for ref in item.ReferencedInstanceSequence]
        for item in pydicom.dcmread(path).ReferencedSeriesSequence
    }
    assert listed == {row[1].SeriesInstanceUID: [row[1].SOPInstanceUID] for row in per_slice}
    assert [row[0].SeriesInstanceUID for row in per_slice][-1].endswith(f".{len(per_slice)}")  # inputs untouched
