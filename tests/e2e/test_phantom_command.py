"""`medssl phantom` end to end: NIfTI + DICOM cohort on disk, read back by nibabel, pydicom and SimpleITK."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import SimpleITK as sitk


def _medssl(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medssl.cli", *args], capture_output=True, text=True, timeout=600)


def test_phantom_command_writes_nifti_and_dicom(tmp_path):
    out = tmp_path / "cohort"
    result = _medssl("phantom", "--subjects", "2", "--seed", "5", "--out", str(out), "--dicom", "--quiet")
    assert result.returncode == 0, result.stderr
    assert f"manifest: {out / 'manifest.json'}" in result.stdout

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seed"] == 5 and manifest["num_subjects"] == 2
    assert [entry["subject_id"] for entry in manifest["training"]] == ["sub-0000", "sub-0001"]

    entry = manifest["training"][0]
    sax = nib.load(out / entry["sax"])
    sax_label = nib.load(out / entry["sax_label"])
    height, width, slices, frames = sax.shape
    assert sax.get_data_dtype() == np.uint16 and sax_label.shape == sax.shape
    assert 8 <= slices <= 14 and 20 <= frames <= 30
    assert set(np.unique(np.asarray(sax_label.dataobj))) <= {0, 1, 2, 3}
    metadata = json.loads((out / entry["metadata"]).read_text())
    assert metadata["lv_ef_pct"] == metadata["lv_ef_pct"] and len(metadata["lv_volume_ml"]) == frames

    dicom_dir = out / "sub-0000" / "dicom"
    for view, expected in (("sax", slices * frames), ("lax_2c", frames), ("lax_4c", frames)):
        files = sorted((dicom_dir / view).iterdir())
        assert len(files) == expected, view
        datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
        assert len({ds.SeriesInstanceUID for ds in datasets}) == 1
        assert {int(ds.CardiacNumberOfImages) for ds in datasets} == {frames}
        assert "PHANTOM" in str(datasets[0].PatientName)

    # SimpleITK reads the SAX geometry of frame 0 as the NIfTI affine says (ITK is LPS, NIfTI RAS).
    frame0 = [f for f in sorted((dicom_dir / "sax").iterdir()) if int(pydicom.dcmread(f).TemporalPositionIdentifier) == 1]
    frame0.sort(key=lambda f: int(pydicom.dcmread(f).InstanceNumber))
    image = sitk.ReadImage([str(f) for f in frame0])
    ras_origin = sax.affine[:3, 3] * np.array([-1, -1, 1])
    assert np.allclose(image.GetOrigin(), ras_origin, atol=1e-3)
    pixels = sitk.GetArrayFromImage(image)  # [S, rows, cols] = [S, W, H]
    assert np.array_equal(pixels.transpose(2, 1, 0), np.asarray(sax.dataobj)[..., 0])

    dciodvfy = shutil.which("dciodvfy") or str(Path(sys.executable).with_name("dciodvfy"))
    report = subprocess.run([dciodvfy, str(frame0[0])], capture_output=True, text=True)
    errors = [line for line in (report.stdout + report.stderr).splitlines() if line.startswith("Error")]
    assert errors == []


def test_phantom_command_rejects_an_unwritable_output(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    result = _medssl("phantom", "--subjects", "1", "--out", str(blocker / "cohort"), "--quiet")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
