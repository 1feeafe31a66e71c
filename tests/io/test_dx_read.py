"""Tests for medssl.io.dx_read on pydicom-data's chest CR (RG1, uncompressed and JPEG 2000) and on synthetic DX
files whose expected pixels are computed by hand from the DICOM VOI formulas."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medssl.errors import DataError
from medssl.io.dx_read import apply_voi, read_dx, read_dx_dataset

DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
IDENTIFIER = "Doe^Jane"


def _dx(pixels: np.ndarray, path, photometric: str = "MONOCHROME2", **attributes):
    """Write a minimal single-frame DX file with 16-bit unsigned pixels."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = DX_STORAGE, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.Modality = IDENTIFIER, "ID-12345", "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    for name, value in attributes.items():
        setattr(ds, name, value)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def ramp() -> np.ndarray:
    return (np.arange(16 * 20).reshape(16, 20) * 200).astype(np.uint16)  # 0 .. 63800: full 16-bit span


def test_chest_cr_monochrome1_window_inverted_and_j2k_twin_identical():
    path = get_testdata_file("RG1_UNCR.dcm")
    result = read_dx(path, min_size=224, body_part="chest")
    stored = pydicom.dcmread(path).pixel_array.astype(np.float64)
    expected = 1.0 - np.clip((stored - (15000 - 0.5)) / (30000 - 1) + 0.5, 0.0, 1.0)  # MONOCHROME1, c 15000 w 30000
    np.testing.assert_allclose(result.image, expected, atol=1e-6)
    assert result.image.shape == (1955, 1841) and result.image.dtype == np.float32
    assert (result.photometric, result.modality, result.body_part) == ("MONOCHROME1", "CR", "CHEST")
    # The file's PixelSpacing is "0.000\0.000": refused as a spacing, with the reason.
    assert result.spacing_mm is None and "zero or invalid" in result.spacing_source
    lossless = read_dx(get_testdata_file("RG1_J2KR.dcm"))
    np.testing.assert_array_equal(lossless.image, result.image)
    lossy = read_dx(get_testdata_file("RG1_J2KI.dcm"))
    assert np.abs(lossy.image - result.image).mean() < 0.005
    # Bright = attenuating: the mediastinum (centre column) is brighter than the lungs beside it.
    centre = result.image[700:1100]
    assert centre[:, 880:960].mean() > centre[:, 400:600].mean() + 0.1


def test_extremity_cr_refused_as_chest_and_accepted_without_expectation():
    path = get_testdata_file("RG3_UNCR.dcm")
    with pytest.raises(DataError, match="BodyPartExamined is EXTREMITY, expected CHEST"):
        read_dx(path, body_part="CHEST")
    image = read_dx(path).image
    np.testing.assert_array_equal(image, read_dx(get_testdata_file("RG3_J2KR.dcm")).image)
    assert image.shape == (1760, 1760)


def test_monochrome1_and_monochrome2_encodings_read_the_same(tmp_path, ramp):
    two = _dx(ramp, tmp_path / "m2.dcm", WindowCenter=30000, WindowWidth=40001)
    # LINEAR windows are centred on c - 0.5, so the mirrored centre of 65535 - x is 65535 - c + 1.
    one = _dx(65535 - ramp, tmp_path / "m1.dcm", "MONOCHROME1", WindowCenter=65536 - 30000, WindowWidth=40001)
    np.testing.assert_allclose(read_dx(one).image, read_dx(two).image, atol=1e-5)
    plain_one, plain_two = _dx(65535 - ramp, tmp_path / "p1.dcm", "MONOCHROME1"), _dx(ramp, tmp_path / "p2.dcm")
    np.testing.assert_allclose(read_dx(plain_one).image, read_dx(plain_two).image, atol=1e-6)
    # A MONOCHROME1 file that also states the (matching) INVERSE Presentation LUT is inverted once, not twice.
    stated = _dx(65535 - ramp, tmp_path / "s1.dcm", "MONOCHROME1", PresentationLUTShape="INVERSE")
    np.testing.assert_array_equal(read_dx(stated).image, read_dx(plain_one).image)
    inverse_two = _dx(ramp, tmp_path / "i2.dcm", PresentationLUTShape="INVERSE")
    np.testing.assert_allclose(read_dx(inverse_two).image, 1.0 - read_dx(plain_two).image, atol=1e-6)
    assert read_dx(plain_two).voi == "min-max"
    assert read_dx(plain_two).image.max() == 1.0 and read_dx(plain_two).image.min() == 0.0


@pytest.mark.parametrize("vr", ["OW", "US"])
def test_voi_lut_sequence_against_hand_lookup(tmp_path, ramp, vr):
    item = Dataset()
    item.LUTDescriptor = [256, 10000, 12]  # 256 entries, first mapped value 10000, 12-bit output
    lut = (np.arange(256) ** 2 * 4095 // 255**2).astype(np.uint16)
    item.add_new(0x00283006, vr, lut.astype("<u2").tobytes() if vr == "OW" else lut.tolist())  # LUT Data
    path = _dx(ramp, tmp_path / "lut.dcm", VOILUTSequence=Sequence([item]), WindowCenter=1, WindowWidth=2)
    result = read_dx(path)
    index = np.clip(ramp.astype(np.int64) - 10000, 0, 255)
    np.testing.assert_allclose(result.image, lut[index] / 4095.0, atol=1e-6)
    assert result.voi == "VOI LUT Sequence"
    assert read_dx(path, prefer_window=True).voi.startswith("window LINEAR")


def test_rescale_then_window_functions_by_hand(tmp_path, ramp):
    common = {"RescaleSlope": 0.5, "RescaleIntercept": -100, "WindowCenter": 8000, "WindowWidth": 12000}
    values = ramp * 0.5 - 100
    linear = read_dx(_dx(ramp, tmp_path / "linear.dcm", **common)).image
    np.testing.assert_allclose(linear, np.clip((values - 7999.5) / 11999 + 0.5, 0, 1), atol=1e-6)
    exact = read_dx(_dx(ramp, tmp_path / "exact.dcm", VOILUTFunction="LINEAR_EXACT", **common)).image
    np.testing.assert_allclose(exact, np.clip((values - 8000) / 12000 + 0.5, 0, 1), atol=1e-6)
    sigmoid = read_dx(_dx(ramp, tmp_path / "sigmoid.dcm", VOILUTFunction="SIGMOID", **common)).image
    np.testing.assert_allclose(sigmoid, 1 / (1 + np.exp(-4 * (values - 8000) / 12000)), atol=1e-6)
    multi = read_dx(_dx(ramp, tmp_path / "multi.dcm", WindowCenter=[8000, 1], WindowWidth=[12000, 2])).image
    np.testing.assert_allclose(multi, np.clip((ramp - 7999.5) / 11999 + 0.5, 0, 1), atol=1e-6)


def test_pixel_spacing_sources(tmp_path, ramp):
    calibrated = read_dx(_dx(ramp, tmp_path / "a.dcm", PixelSpacing=[0.2, 0.25], ImagerPixelSpacing=[0.3, 0.3]))
    assert calibrated.spacing_mm == (0.2, 0.25) and calibrated.spacing_source == "PixelSpacing"
    magnified = {"ImagerPixelSpacing": [0.3, 0.3], "EstimatedRadiographicMagnificationFactor": 1.2}
    imager = read_dx(_dx(ramp, tmp_path / "b.dcm", **magnified))
    assert imager.spacing_mm == pytest.approx((0.25, 0.25)) and "magnification" in imager.spacing_source
    assert read_dx(_dx(ramp, tmp_path / "c.dcm")).spacing_mm is None


def test_errors_name_the_problem_and_never_the_patient(tmp_path, ramp):
    messages = []
    cases = [
        (lambda: read_dx(get_testdata_file("SC_rgb.dcm"), modalities=None), "colour or non-greyscale image .*RGB"),
        (
            lambda: read_dx(_dx(ramp, tmp_path / "small.dcm"), min_size=(224, 224)),
            "16x20 pixels, smaller than the minimum 224x224",
        ),
        (lambda: read_dx(_dx(ramp, tmp_path / "frames.dcm", NumberOfFrames=2)), "multi-frame"),
        (lambda: read_dx(get_testdata_file("CT_small.dcm")), "Modality CT is not a projection radiograph"),
        (lambda: read_dx(tmp_path / "missing.dcm"), "no such file"),
    ]
    (tmp_path / "text.dcm").write_text("not dicom")
    cases.append((lambda: read_dx(tmp_path / "text.dcm"), "not a readable DICOM file"))
    report = pydicom.dcmread(_dx(ramp, tmp_path / "sr.dcm"))
    del report.PixelData
    report.SOPClassUID = "1.2.840.10008.5.1.4.1.1.88.22"  # Enhanced SR
    cases.append((lambda: read_dx_dataset(report, source="sr.dcm"), "not an image .*Enhanced SR"))
    for call, pattern in cases:
        with pytest.raises(DataError, match=pattern) as caught:
            call()
        messages.append(str(caught.value))
    assert not any(IDENTIFIER in m or "12345" in m for m in messages)


def test_apply_voi_rejects_a_zero_width_window():
    ds = Dataset()
    ds.WindowCenter, ds.WindowWidth = 10, 0
    with pytest.raises(DataError, match=r"window width must be >= 1 \(LINEAR\) or > 0 \(LINEAR\), got 0"):
        apply_voi(np.zeros((2, 2)), ds)
    ds.WindowWidth = 1  # LINEAR with width 1 is a threshold at c - 0.5
    np.testing.assert_array_equal(apply_voi(np.array([[9.0, 9.6]]), ds)[0], [[0.0, 1.0]])
