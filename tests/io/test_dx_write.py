"""Tests for medssl.io.dx_write: valid DX For Presentation files (dciodvfy) that read back to the input image."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest

from medssl.errors import DataError
from medssl.io.dicom_write import PhantomIdentity
from medssl.io.dx_read import read_dx
from medssl.io.dx_write import DX_IMAGE_STORAGE_PRESENTATION, write_dx_image

IDENTITY = PhantomIdentity.for_subject("cxr-0003", 0)


@pytest.fixture
def image() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.uniform(0.0, 1.0, (40, 52)).astype(np.float32)


@pytest.mark.parametrize("monochrome1", [False, True])
def test_dx_file_is_valid_and_reads_back(tmp_path, image, dciodvfy, monochrome1):
    path = write_dx_image(image, tmp_path / "dx.dcm", spacing_mm=0.7, identity=IDENTITY, monochrome1=monochrome1)
    validation = dciodvfy(path)
    assert validation.errors == [], validation.report
    back = read_dx(path, body_part="CHEST")
    np.testing.assert_allclose(back.image, image, atol=0.5 / 4095 + 1e-6)
    assert back.spacing_mm == (0.7, 0.7) and back.spacing_source == "PixelSpacing"
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == DX_IMAGE_STORAGE_PRESENTATION and ds.Modality == "DX" and ds.ViewPosition == "PA"
    assert ds.PhotometricInterpretation == ("MONOCHROME1" if monochrome1 else "MONOCHROME2")
    assert not list(tmp_path.glob(".*.tmp"))


def test_same_input_gives_identical_bytes(tmp_path, image):
    first = write_dx_image(image, tmp_path / "a.dcm", spacing_mm=0.5, identity=IDENTITY).read_bytes()
    assert write_dx_image(image, tmp_path / "b.dcm", spacing_mm=0.5, identity=IDENTITY).read_bytes() == first


@pytest.mark.parametrize(
    ("array", "spacing", "message"),
    [
        (np.zeros((2, 2, 2)), 1.0, r"shape \(2, 2, 2\)"),
        (np.full((2, 2), 1.5), 1.0, r"in \[0, 1\]"),
        (np.zeros((2, 2)), 0.0, "positive"),
    ],
)
def test_bad_input_raises(tmp_path, array, spacing, message):
    with pytest.raises(DataError, match=message):
        write_dx_image(array, tmp_path / "x.dcm", spacing_mm=spacing, identity=IDENTITY)
