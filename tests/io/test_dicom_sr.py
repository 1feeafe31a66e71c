"""Tests for medssl.io.dicom_sr: dciodvfy conformance, coded values and units, references, NaN handling."""

from __future__ import annotations

import copy
import dataclasses
import math

import nibabel as nib
import numpy as np
import pydicom
import pytest

from medssl.clinical.cardiac import cardiac_function, ventricular_volumes
from medssl.errors import DataError
from medssl.io.dicom_seg import cine_segmentation, write_dicom
from medssl.io.dicom_sr import measurement_report

# (CardiacFunction field, coding scheme, code value, UCUM unit) of every measurement the report may hold.
EXPECTED = [
    ("lv_edv_ml", "LN", "8821-1", "ml"),
    ("lv_esv_ml", "LN", "8823-7", "ml"),
    ("lv_sv_ml", "SCT", "90096001", "ml"),
    ("lv_ef_pct", "LN", "8811-2", "%"),
    ("rv_edv_ml", "LN", "8822-9", "ml"),
    ("rv_esv_ml", "LN", "8824-5", "ml"),
    ("rv_sv_ml", "SCT", "429483009", "ml"),
    ("rv_ef_pct", "LN", "8818-7", "%"),
    ("lv_mass_g", "LN", "18087-7", "g"),
]


def _walk(items):
    """Every content item of an SR content tree, depth first."""
    for item in items:
        yield item
        yield from _walk(item.get("ContentSequence", []))


def _numbers(report: pydicom.Dataset) -> dict[tuple[str, str], tuple[float, str, pydicom.Dataset]]:
    """NUM content items keyed by (scheme, code value): (value, UCUM unit, item)."""
    found = {}
    for item in _walk(report.ContentSequence):
        if item.ValueType == "NUM":
            concept = item.ConceptNameCodeSequence[0]
            measured = item.MeasuredValueSequence[0]
            unit = measured.MeasurementUnitsCodeSequence[0]
            assert unit.CodingSchemeDesignator == "UCUM"
            key = (concept.CodingSchemeDesignator, concept.CodeValue)
            found[key] = (float(measured.NumericValue), unit.CodeValue, item)
    return found


@pytest.fixture(scope="module")
def study(phantom_dicom_cohort, tmp_path_factory):
    """Phantom labels, their DICOM headers ``[S][T]``, the cardiac function, the SEG and a written SR."""
    subject = phantom_dicom_cohort() / "sub-0001"
    label_image = nib.load(subject / "sax_label.nii.gz")
    labels = np.asarray(label_image.dataobj).astype(np.uint8)
    slices, frames = labels.shape[2:]
    headers = {
        int(ds.InstanceNumber): ds
        for ds in (pydicom.dcmread(path, stop_before_pixels=True) for path in (subject / "dicom" / "sax").iterdir())
    }
    sources = [[headers[s * frames + t + 1] for t in range(frames)] for s in range(slices)]
    function = cardiac_function(ventricular_volumes(labels, label_image.header.get_zooms()[:3]))
    segmentation = cine_segmentation(labels, sources)
    path = write_dicom(measurement_report(function, segmentation, sources), tmp_path_factory.mktemp("sr") / "sr.dcm")
    return {"labels": labels, "sources": sources, "function": function, "seg": segmentation, "path": path}


def test_dciodvfy_reports_no_errors(study, dciodvfy):
    assert dciodvfy(study["path"]).errors == []


def test_values_codes_and_units(study):
    report, function = pydicom.dcmread(study["path"]), study["function"]
    numbers = _numbers(report)
    assert len(numbers) == len(EXPECTED)
    for field, scheme, code, unit in EXPECTED:
        value, written_unit, _ = numbers[(scheme, code)]
        assert written_unit == unit
        assert value == pytest.approx(getattr(function, field), rel=1e-9, abs=1e-9)
    assert report.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR
    template = report.ContentTemplateSequence[0]
    assert (template.MappingResource, template.TemplateIdentifier) == ("DCMR", "1500")


def test_measurements_reference_the_frames_they_were_measured_on(study):
    report, function, sources = pydicom.dcmread(study["path"]), study["function"], study["sources"]
    ed = {row[function.ed_frame].SOPInstanceUID for row in sources}
    es = {row[function.es_frame].SOPInstanceUID for row in sources}
    numbers = _numbers(report)

    def referenced(code: tuple[str, str]) -> set[str]:
        item = numbers[code][2]
        return {
            child.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            for child in item.ContentSequence
            if child.ValueType == "IMAGE"
        }

    assert referenced(("LN", "8821-1")) == ed
    assert referenced(("LN", "8823-7")) == es
    assert referenced(("LN", "8811-2")) == ed | es
    assert referenced(("LN", "18087-7")) == ed


def test_segments_of_the_seg_are_referenced(study):
    report, seg = pydicom.dcmread(study["path"]), study["seg"]
    segments = {
        int(reference.ReferencedSegmentNumber)
        for item in _walk(report.ContentSequence)
        if item.ValueType == "IMAGE"
        for reference in item.ReferencedSOPSequence
        if reference.ReferencedSOPInstanceUID == seg.SOPInstanceUID
    }
    assert segments == {1, 2, 3}
    evidence = {
        instance.ReferencedSOPInstanceUID
        for study_item in report.CurrentRequestedProcedureEvidenceSequence
        for series in study_item.ReferencedSeriesSequence
        for instance in series.ReferencedSOPSequence
    }
    assert seg.SOPInstanceUID in evidence


def test_observer_is_the_medssl_device_and_identifiers_are_copied(study):
    report, source = pydicom.dcmread(study["path"]), study["sources"][0][0]
    observer_types = [
        item.ConceptCodeSequence[0].CodeValue
        for item in report.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue == "121005"  # Observer Type
    ]
    assert observer_types == ["121007"]  # Device
    names = [item.TextValue for item in report.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "121013"]
    assert names == ["medssl cine_seg"]
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "StudyInstanceUID", "AccessionNumber"):
        assert report[keyword].value == source[keyword].value, keyword


def test_nan_values_are_left_out(study, tmp_path, dciodvfy):
    no_rv = dataclasses.replace(
        study["function"], rv_edv_ml=math.nan, rv_esv_ml=math.nan, rv_sv_ml=math.nan, rv_ef_pct=math.nan,
        lv_esv_ml=math.nan,
    )
    path = write_dicom(measurement_report(no_rv, study["seg"], study["sources"]), tmp_path / "sr.dcm")
    assert dciodvfy(path).errors == []
    codes = set(_numbers(pydicom.dcmread(path)))
    assert codes == {("LN", "8821-1"), ("SCT", "90096001"), ("LN", "8811-2"), ("LN", "18087-7")}


def test_nothing_measurable_is_an_error(study):
    empty = dataclasses.replace(study["function"], **{field: math.nan for field, *_ in EXPECTED})
    with pytest.raises(DataError, match="nothing to put"):
        measurement_report(empty, study["seg"], study["sources"])


def test_mismatched_inputs_are_rejected(study):
    function, seg, sources = study["function"], study["seg"], study["sources"]
    with pytest.raises(DataError, match=f"es_frame = 99 is outside the {len(sources[0])} frame"):
        measurement_report(dataclasses.replace(function, es_frame=99), seg, sources)
    with pytest.raises(DataError, match="must be a DICOM Segmentation"):
        measurement_report(function, sources[0][0], sources)
    with pytest.raises(DataError, match="must be a CardiacFunction"):
        measurement_report(function.to_dict(), seg, sources)


def test_stack_stored_as_one_series_per_slice(study, tmp_path, dciodvfy):
    """Some vendors store each slice position of a cine stack as its own series."""
    per_slice = [[copy.deepcopy(source) for source in row] for row in study["sources"]]
    for index, row in enumerate(per_slice):
        for source in row:
            source.SeriesInstanceUID = f"{source.SeriesInstanceUID}.{index + 1}"
    segmentation = cine_segmentation(study["labels"], per_slice)
    path = write_dicom(measurement_report(study["function"], segmentation, per_slice), tmp_path / "sr.dcm")
    assert dciodvfy(path).errors == []
