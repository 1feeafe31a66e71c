"""Tests for medssl.data.cxr_phantom.cohort: files, manifest, PNG round trip, reuse, anomaly splits."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from medssl.data.cxr_phantom import FINDINGS, LOCAL_FINDINGS, ensure_cxr_cohort, generate_radiograph, write_cxr_cohort
from medssl.data.phantom import subject_seed
from medssl.errors import DataError


def test_findings_cohort_files_match_the_generator(tmp_path):
    manifest_path = write_cxr_cohort(tmp_path, 3, seed=4, size=64, num_test=1, num_workers=1, progress=False)
    manifest = json.loads(manifest_path.read_text())
    assert manifest["findings"] == list(FINDINGS) and len(manifest["training"]) == 3 and len(manifest["test"]) == 1
    assert not list(tmp_path.glob(".img-*"))
    for index, entry in enumerate(manifest["training"]):
        radiograph = generate_radiograph(subject_seed(4, index), 64)
        image = np.asarray(Image.open(tmp_path / entry["image"]))
        assert image.dtype == np.uint8 and image.shape == (64, 64)
        np.testing.assert_array_equal(image, np.round(radiograph.image * 255).astype(np.uint8))
        bits = np.asarray(Image.open(tmp_path / entry["findings_mask"]))
        for k, name in enumerate(LOCAL_FINDINGS):
            np.testing.assert_array_equal((bits >> k) & 1, radiograph.finding_masks[name])
            assert manifest["mask_bits"][name] == 1 << k
        anatomy = np.asarray(Image.open(tmp_path / entry["anatomy"]))
        np.testing.assert_array_equal(anatomy == 3, radiograph.anatomy_masks["heart"])
        assert entry["label"] == [radiograph.labels[name] for name in FINDINGS]
        assert json.loads((tmp_path / entry["metadata"]).read_text())["seed"] == subject_seed(4, index)
    assert manifest["test"][0]["subject_id"] == "img-t00000"


def test_ensure_reuses_a_complete_cohort_and_rewrites_an_incomplete_one(tmp_path):
    first = ensure_cxr_cohort(tmp_path, 2, seed=1, size=48, progress=False, num_workers=1)
    stamp = first.stat().st_mtime_ns
    assert ensure_cxr_cohort(tmp_path, 2, seed=1, size=48, progress=False).stat().st_mtime_ns == stamp
    (tmp_path / "img-00001" / "image.png").unlink()
    again = ensure_cxr_cohort(tmp_path, 2, seed=1, size=48, progress=False, num_workers=1)
    assert (tmp_path / "img-00001" / "image.png").is_file() and again.stat().st_mtime_ns != stamp
    bigger = json.loads(ensure_cxr_cohort(tmp_path, 3, seed=1, size=48, progress=False, num_workers=1).read_text())
    assert len(bigger["training"]) == 3


def test_anomaly_cohort_has_normal_training_and_alternating_lesion_test(tmp_path):
    manifest = json.loads(
        write_cxr_cohort(tmp_path, 2, size=48, mode="anomaly", num_test=4, num_workers=1, progress=False).read_text()
    )
    assert [entry["label"] for entry in manifest["training"]] == [0, 0]
    assert [entry["label"] for entry in manifest["test"]] == [0, 1, 0, 1]
    for entry in manifest["training"] + manifest["test"]:
        mask = np.asarray(Image.open(tmp_path / entry["mask"]))
        assert bool(mask.any()) == bool(entry["label"])
        assert entry["findings"] == [] or entry["label"] == 1
        assert "cardiomegaly" not in entry["findings"]


def test_parallel_workers_give_the_same_files(tmp_path):
    serial = write_cxr_cohort(tmp_path / "a", 2, size=40, num_workers=1, progress=False)
    parallel = write_cxr_cohort(tmp_path / "b", 2, size=40, num_workers=2, progress=False)
    for name in ("img-00000", "img-00001"):
        a = np.asarray(Image.open(serial.parent / name / "image.png"))
        np.testing.assert_array_equal(a, np.asarray(Image.open(parallel.parent / name / "image.png")))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_images": 0}, "num_images >= 1"),
        ({"num_images": 1, "mode": "segmentation"}, "unknown cohort mode"),
        ({"num_images": 1, "mode": "anomaly", "num_test": 1}, "num_test >= 2"),
        ({"num_images": 1, "size": 16}, "32..4096"),
        ({"num_images": 1, "seed": -2}, "non-negative"),
    ],
)
def test_bad_cohort_arguments_raise(tmp_path, kwargs, message):
    with pytest.raises(DataError, match=message):
        write_cxr_cohort(tmp_path, progress=False, **kwargs)
    assert not (tmp_path / "manifest.json").exists()


def test_ensure_rejects_unknown_options(tmp_path):
    with pytest.raises(DataError, match=r"unknown chest X-ray cohort option"):
        ensure_cxr_cohort(tmp_path, 1, frames=3)


def test_dicom_export_reads_back_as_the_png(tmp_path):
    from medssl.io.dx_read import read_dx

    manifest = json.loads(write_cxr_cohort(tmp_path, 1, size=48, dicom=True, num_workers=1, progress=False).read_text())
    entry = manifest["training"][0]
    png = np.asarray(Image.open(tmp_path / entry["image"])) / 255.0
    dx = read_dx(tmp_path / entry["dicom"], body_part="CHEST", min_size=48)
    np.testing.assert_allclose(dx.image, png, atol=0.5 / 255 + 0.5 / 4095)
    assert manifest["dicom"] is True
