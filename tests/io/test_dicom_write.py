"""Tests for medssl.io.dicom_write: IOD conformance (dciodvfy), geometry and pixel round trips, identifiers, UIDs."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from medssl.errors import DataError
from medssl.io.dicom_write import MR_IMAGE_STORAGE, PhantomIdentity, write_mr_cine_series

with warnings.catch_warnings():
    # nibabel warns on import that its DICOM readers are experimental; the single-frame wrapper used here is stable.
    warnings.simplefilter("ignore", UserWarning)
    from nibabel.nicom.dicomwrappers import wrapper_from_data

SAX_TIMES = [0.0, 200.0, 400.0, 600.0]
# Frame times of a real heart rate do not round nicely; every DS value must still fit in 16 characters.
LAX_TIMES = [0.0, 1000 / 28.5, 2000 / 28.5, 3000 / 28.5]
LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _rotation(axis: list[float], angle_deg: float) -> np.ndarray:
    """Rodrigues' rotation matrix about ``axis``."""
    k = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    angle = np.deg2rad(angle_deg)
    return np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross


def _affine(rotation: np.ndarray, spacing: list[float], origin: list[float]) -> np.ndarray:
    affine = np.eye(4)
    affine[:3, :3] = rotation * np.asarray(spacing)
    affine[:3, 3] = origin
    return affine


# SAX: oblique and left-handed (like a NIfTI stored LAS), 3 slices with an 8 mm step.
SAX_AFFINE = _affine(_rotation([0.3, -0.5, 0.8], 37.0), [1.5, 1.4, -8.0], [-60.2, 35.7, 12.3])
# LAX: one oblique right-handed slice, as the 4-chamber view of the phantoms.
LAX_AFFINE = _affine(_rotation([-0.7, 0.2, 0.4], 71.0), [1.3, 1.3, 6.0], [80.1, -20.4, -15.5])


@pytest.fixture(scope="module")
def identity() -> PhantomIdentity:
    return PhantomIdentity.for_subject("sub0007", seed=11)


@pytest.fixture(scope="module")
def sax_image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 4096, size=(32, 24, 3, 4), dtype=np.uint16)


@pytest.fixture(scope="module")
def lax_image() -> np.ndarray:
    return np.random.default_rng(1).integers(0, 4096, size=(20, 28, 1, 4), dtype=np.uint16)


@pytest.fixture(scope="module")
def study(tmp_path_factory, identity, sax_image, lax_image) -> dict[str, list[Path]]:
    root = tmp_path_factory.mktemp("study")
    sax = write_mr_cine_series(
        sax_image, SAX_AFFINE, root / "sax", series_description="cine SAX", series_number=5,
        trigger_times_ms=SAX_TIMES, identity=identity,
    )
    lax = write_mr_cine_series(
        lax_image, LAX_AFFINE, root / "lax4c", series_description="cine 4CH", series_number=6,
        trigger_times_ms=LAX_TIMES, identity=identity, file_names="uid",
    )
    return {"sax": sax, "lax": lax}


def _read(paths: list[Path]) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(path) for path in paths]


def _affine_from_dicom(datasets: list[pydicom.Dataset]) -> np.ndarray:
    """RAS affine from DICOM Image Plane tags (nibabel's recipe, with NIfTI i = DICOM column index)."""
    first, last = datasets[0], datasets[-1]
    orientation = np.asarray(first.ImageOrientationPatient, dtype=float)
    row_spacing, column_spacing = map(float, first.PixelSpacing)
    affine = np.eye(4)
    affine[:3, 0] = orientation[:3] * column_spacing
    affine[:3, 1] = orientation[3:] * row_spacing
    if len(datasets) > 1:
        span = np.asarray(last.ImagePositionPatient, float) - np.asarray(first.ImagePositionPatient, float)
        affine[:3, 2] = span / (len(datasets) - 1)
    else:
        affine[:3, 2] = np.cross(orientation[:3], orientation[3:]) * float(first.SpacingBetweenSlices)
    affine[:3, 3] = np.asarray(first.ImagePositionPatient, dtype=float)
    return LPS_FROM_RAS @ affine


@pytest.mark.parametrize("view", ["sax", "lax"])
def test_dciodvfy_reports_no_errors(study, view, dciodvfy):
    for path in study[view]:
        validation = dciodvfy(path)
        assert "MRImage" in validation.report, f"dciodvfy did not recognise an MR Image in {path.name}"
        assert validation.errors == [], f"dciodvfy errors in {path.name}:\n{validation.report}"


def test_file_meta_and_sop_common(study):
    datasets = _read(study["sax"] + study["lax"])
    for dataset in datasets:
        assert dataset.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert dataset.SOPClassUID == MR_IMAGE_STORAGE == dataset.file_meta.MediaStorageSOPClassUID
        assert dataset.SOPInstanceUID == dataset.file_meta.MediaStorageSOPInstanceUID
        assert (dataset.Manufacturer, dataset.Modality, dataset.MRAcquisitionType) == ("medssl phantom", "MR", "2D")
        assert dataset.ScanningSequence == "GR"
        pixel_format = (dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation)
        assert pixel_format == (16, 12, 11, 0)
    assert len({dataset.SOPInstanceUID for dataset in datasets}) == len(datasets)
    # One Frame of Reference for the whole study so SAX and LAX geometry is comparable; one series per call.
    assert len({dataset.FrameOfReferenceUID for dataset in datasets}) == 1
    assert len({dataset.StudyInstanceUID for dataset in datasets}) == 1
    assert len({dataset.SeriesInstanceUID for dataset in datasets}) == 2


@pytest.mark.parametrize("view", ["sax", "lax"])
def test_instance_order_and_cardiac_tags(study, view, sax_image, lax_image):
    image, times = (sax_image, SAX_TIMES) if view == "sax" else (lax_image, LAX_TIMES)
    slices, frames = image.shape[2:]
    datasets = _read(study[view])
    assert len(datasets) == slices * frames
    for index, dataset in enumerate(datasets):
        slice_index, frame_index = divmod(index, frames)
        assert dataset.InstanceNumber == index + 1
        assert float(dataset.TriggerTime) == pytest.approx(times[frame_index])
        assert dataset.TemporalPositionIdentifier == frame_index + 1
        assert dataset.NumberOfTemporalPositions == dataset.CardiacNumberOfImages == frames
        assert dataset.AcquisitionNumber == slice_index + 1
        # Evenly spread frames from 0 ms: the R-R interval is T times the frame step.
        assert int(dataset.NominalInterval) == round(frames * (times[1] - times[0]))  # IS: whole ms
        assert float(dataset.TemporalResolution) == pytest.approx(times[1] - times[0], rel=1e-9)
        center, width = float(dataset.WindowCenter), float(dataset.WindowWidth)
        assert 0 < center - width / 2 < center + width / 2 <= 4095 + 1


@pytest.mark.parametrize("view", ["sax", "lax"])
def test_pydicom_round_trip_of_pixels_and_geometry(study, view, sax_image, lax_image):
    image, affine = (sax_image, SAX_AFFINE) if view == "sax" else (lax_image, LAX_AFFINE)
    slices, frames = image.shape[2:]
    datasets = _read(study[view])
    for index, dataset in enumerate(datasets):
        slice_index, frame_index = divmod(index, frames)
        assert dataset.pixel_array.dtype == np.uint16
        np.testing.assert_array_equal(dataset.pixel_array, image[:, :, slice_index, frame_index].T)
        # nibabel's wrapper maps (row, column, slice) to LPS; our i is the column index, so swap its first two axes.
        nib_affine = wrapper_from_data(dataset).affine
        expected = LPS_FROM_RAS @ affine
        np.testing.assert_allclose(nib_affine[:3, [1, 0]], expected[:3, :2], atol=1e-6)
        position = expected[:3, :3] @ [0, 0, slice_index] + expected[:3, 3]
        np.testing.assert_allclose(nib_affine[:3, 3], position, atol=1e-4)
        np.testing.assert_allclose(abs(nib_affine[:3, 2] @ expected[:3, 2]), np.linalg.norm(affine[:3, 2]) ** 2)
    first_frame = datasets[::frames]
    np.testing.assert_allclose(_affine_from_dicom(first_frame), affine, atol=1e-4)


def test_simpleitk_reads_one_series_with_the_input_geometry(study, sax_image):
    directory = str(study["sax"][0].parent)
    reader = sitk.ImageSeriesReader()
    series_ids = reader.GetGDCMSeriesIDs(directory)
    assert len(series_ids) == 1
    names = reader.GetGDCMSeriesFileNames(directory, series_ids[0])
    assert sorted(names) == sorted(str(path) for path in study["sax"])
    # GDCM cannot sort a cine series by position alone (each position holds T frames), so pick each frame's
    # slices in slice order; ITK then takes the slice direction from the positions, as for any stack.
    headers = {name: pydicom.dcmread(name, stop_before_pixels=True) for name in names}
    expected = LPS_FROM_RAS @ SAX_AFFINE
    for frame_index in range(sax_image.shape[3]):
        frame_files = sorted(
            (name for name in names if headers[name].TemporalPositionIdentifier == frame_index + 1),
            key=lambda name: headers[name].InstanceNumber,
        )
        reader.SetFileNames(frame_files)
        volume = reader.Execute()
        direction = np.asarray(volume.GetDirection()).reshape(3, 3)
        np.testing.assert_allclose(direction * np.asarray(volume.GetSpacing()), expected[:3, :3], atol=1e-4)
        np.testing.assert_allclose(volume.GetOrigin(), expected[:3, 3], atol=1e-4)
        # ITK arrays are [z, y, x] = [slice, row, column].
        np.testing.assert_array_equal(
            sitk.GetArrayFromImage(volume), sax_image[:, :, :, frame_index].transpose(2, 1, 0)
        )


def test_simpleitk_reads_the_oblique_lax_slice(study, lax_image):
    image = sitk.ReadImage(str(study["lax"][2]))
    expected = LPS_FROM_RAS @ LAX_AFFINE
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    np.testing.assert_allclose(direction * np.asarray(image.GetSpacing()), expected[:3, :3], atol=1e-4)
    np.testing.assert_allclose(image.GetOrigin(), expected[:3, 3], atol=1e-4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image)[0], lax_image[:, :, 0, 2].T)


def test_identifiers_are_fake_and_only_in_headers(study, identity):
    assert identity.patient_name.startswith("PHANTOM^")
    assert identity.patient_id.startswith("MEDSSL-PH-")
    for dataset in _read(study["sax"] + study["lax"]):
        assert str(dataset.PatientName) == identity.patient_name
        assert dataset.PatientID == identity.patient_id
        assert dataset.PatientBirthDate == identity.patient_birth_date
        assert dataset.AccessionNumber == identity.accession_number
    secrets = [identity.patient_name, identity.patient_id, identity.accession_number, "SUB0007", "PHANTOM"]
    for path in study["sax"] + study["lax"]:
        assert path.name.startswith("IM_") or path.name == pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        assert not any(secret.lower() in str(path).lower() for secret in secrets)
    assert [path.name for path in study["sax"]] == [f"IM_{number:06d}.dcm" for number in range(1, 13)]
    assert not any(path.name.endswith(".dcm") for path in study["lax"])
    # No staging folder is left beside the outputs.
    assert sorted(path.name for path in study["sax"][0].parent.parent.iterdir()) == ["lax4c", "sax"]


def test_phantom_identity_is_deterministic_and_valid():
    first, again = PhantomIdentity.for_subject("sub0007", 11), PhantomIdentity.for_subject("sub0007", 11)
    other_seed, other_subject = PhantomIdentity.for_subject("sub0007", 12), PhantomIdentity.for_subject("sub0008", 11)
    assert first == again
    assert len({first.study_instance_uid, other_seed.study_instance_uid, other_subject.study_instance_uid}) == 3
    assert first.patient_id != other_seed.patient_id
    assert first.patient_name == "PHANTOM^SUB0007"
    assert first.patient_sex in ("M", "F")
    assert len(first.accession_number) <= 16 and len(first.patient_id) <= 64
    for date in (first.patient_birth_date, first.study_date):
        assert len(date) == 8 and date.isdigit()
    assert pydicom.uid.UID(first.study_instance_uid).is_valid
    with pytest.raises(DataError, match="ASCII letter or digit"):
        PhantomIdentity.for_subject("--", 0)


def test_rewrite_is_byte_identical(study, identity, sax_image, tmp_path):
    again = write_mr_cine_series(
        sax_image, SAX_AFFINE, tmp_path / "sax", series_description="cine SAX", series_number=5,
        trigger_times_ms=SAX_TIMES, identity=identity,
    )
    for original, rewritten in zip(study["sax"], again, strict=True):
        assert original.read_bytes() == rewritten.read_bytes()
    other_series = write_mr_cine_series(
        sax_image, SAX_AFFINE, tmp_path / "sax7", series_description="cine SAX", series_number=7,
        trigger_times_ms=SAX_TIMES, identity=identity, series_uid="1.2.3.4",
    )
    assert pydicom.dcmread(other_series[0]).SeriesInstanceUID == "1.2.3.4"


def test_failed_write_leaves_nothing(identity, sax_image, tmp_path, monkeypatch):
    written = []

    def failing_save(self, filename, **kwargs):
        if written:
            raise OSError("disk full")
        written.append(filename)
        Path(filename).write_bytes(b"partial")

    monkeypatch.setattr(pydicom.dataset.FileDataset, "save_as", failing_save)
    with pytest.raises(OSError, match="disk full"):
        write_mr_cine_series(
            sax_image, SAX_AFFINE, tmp_path / "sax", series_description="cine SAX", series_number=5,
            trigger_times_ms=SAX_TIMES, identity=identity,
        )
    assert list(tmp_path.iterdir()) == []


def _sheared() -> np.ndarray:
    affine = SAX_AFFINE.copy()
    affine[:3, 1] += 0.05 * affine[:3, 0]
    return affine


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"image": np.zeros((8, 6, 2, 4), dtype=np.float32)}, "must be uint16.*float32"),
        ({"image": np.full((8, 6, 2, 4), 4096, dtype=np.uint16)}, r"fit in 12 bits.*maximum 4096"),
        ({"image": np.zeros((8, 6, 4), dtype=np.uint16)}, r"4 dimensions.*\(8, 6, 4\)"),
        ({"trigger_times_ms": [0.0, 10.0, 20.0]}, r"T=4 frames, got shape \(3,\)"),
        ({"trigger_times_ms": [0.0, 20.0, 10.0, 30.0]}, "strictly increasing"),
        ({"affine": _sheared()}, "orthogonal"),
        ({"affine": np.eye(3)}, r"4x4, got shape \(3, 3\)"),
        ({"file_names": "patient"}, "file_names must be one of"),
        ({"series_description": "x" * 65}, "at most 64 characters"),
    ],
)
def test_invalid_input_is_rejected(change, message, identity, tmp_path):
    arguments = {
        "image": np.zeros((8, 6, 2, 4), dtype=np.uint16), "affine": SAX_AFFINE, "out_dir": tmp_path / "out",
        "series_description": "cine SAX", "series_number": 1, "trigger_times_ms": SAX_TIMES, "identity": identity,
        "file_names": "numbered",
    }
    arguments.update(change)
    with pytest.raises(DataError, match=message) as raised:
        write_mr_cine_series(**arguments)
    assert identity.patient_id not in str(raised.value)
    assert list(tmp_path.iterdir()) == []


def test_non_empty_output_folder_is_refused(identity, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("earlier result")
    with pytest.raises(DataError, match="not empty"):
        write_mr_cine_series(
            np.zeros((8, 6, 1, 4), dtype=np.uint16), LAX_AFFINE, tmp_path / "out", series_description="cine 2CH",
            series_number=2, trigger_times_ms=LAX_TIMES, identity=identity,
        )
    assert (tmp_path / "out" / "keep.txt").read_text() == "earlier result"
