"""Tests for medssl.data.phantom.cohort: subjects (determinism, geometry, ground truth checked against the images
and labels), the on-disk layout other modules code against, atomic writing and cohort re-use."""

from __future__ import annotations

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from medssl.data.phantom import GROUPS, PhantomOptions, ensure_cohort, generate_subject, subject_seed, write_cohort
from medssl.data.phantom import cohort as cohort_module
from medssl.errors import DataError

METADATA_KEYS = {
    "subject_id", "seed", "group", "bsa_m2", "num_frames", "frame_interval_ms", "trigger_times_ms", "ed_frame",
    "es_frame", "lv_volume_ml", "rv_volume_ml", "lv_edv_ml", "lv_esv_ml", "lv_sv_ml", "lv_ef_pct", "rv_edv_ml",
    "rv_esv_ml", "rv_sv_ml", "rv_ef_pct", "lv_mass_g", "views", "landmarks_lax_4c",
}  # fmt: skip
ENTRY_KEYS = [
    "subject_id", "group", "sax", "sax_label", "lax_2c", "lax_2c_label", "lax_4c", "lax_4c_label", "metadata",
]  # fmt: skip


@pytest.fixture(scope="module")
def by_group():
    """One 10-frame subject per disease group."""
    return {group: generate_subject(100 + i, group=group, num_frames=10) for i, group in enumerate(GROUPS)}


def _label_volumes(phantom) -> tuple[np.ndarray, np.ndarray]:
    """LV and RV cavity volumes (ml) per frame from SAX label voxel counts."""
    voxel_ml = np.prod(phantom.metadata["views"]["sax"]["spacing_mm"]) / 1000.0
    lv = (phantom.sax_label == 3).sum(axis=(0, 1, 2)) * voxel_ml
    rv = (phantom.sax_label == 1).sum(axis=(0, 1, 2)) * voxel_ml
    return lv, rv


def _ef(volume: np.ndarray) -> float:
    return float(100.0 * (volume.max() - volume.min()) / volume.max())


def _ray_profile(label: np.ndarray, centre: np.ndarray, angle: float, length: int = 80) -> np.ndarray:
    """Labels along a ray from ``centre`` (nearest neighbour, 0.25-pixel steps) in the (i, j) plane."""
    steps = np.arange(0, length, 0.25)
    i = np.clip(np.rint(centre[0] + steps * math.cos(angle)).astype(int), 0, label.shape[0] - 1)
    j = np.clip(np.rint(centre[1] + steps * math.sin(angle)).astype(int), 0, label.shape[1] - 1)
    return label[i, j]


def test_subject_is_deterministic_per_seed_and_differs_across_seeds():
    first, again, other = (generate_subject(seed, num_frames=5) for seed in (7, 7, 8))
    for name in ("sax", "lax_2c", "lax_4c"):
        for a, b in zip(first.view(name), again.view(name)):
            np.testing.assert_array_equal(a, b)
    assert first.metadata == again.metadata
    assert first.metadata["seed"] == 7 and other.metadata["lv_edv_ml"] != first.metadata["lv_edv_ml"]
    assert first.sax_image.shape != other.sax_image.shape or not np.array_equal(first.sax_image, other.sax_image)


def test_default_subject_shapes_dtypes_and_cycle():
    phantom = generate_subject(3)
    meta = phantom.metadata
    height, width, slices, frames = phantom.sax_image.shape
    assert 20 <= frames <= 30 and 8 <= slices <= 14 and 160 <= height == width <= 224
    assert phantom.sax_image.dtype == np.uint16 and phantom.sax_label.dtype == np.uint8
    assert phantom.sax_label.shape == phantom.sax_image.shape and phantom.sax_image.max() <= 4095
    for name in ("lax_2c", "lax_4c"):
        image, label = getattr(phantom, f"{name}_image"), getattr(phantom, f"{name}_label")
        assert image.shape == label.shape == (height, width, frames) and image.dtype == np.uint16
        assert meta["views"][name]["shape"] == [height, width, 1, frames]
    assert set(np.unique(phantom.sax_label)) == {0, 1, 2, 3}
    assert meta["num_frames"] == frames and meta["ed_frame"] == 0
    assert 0.35 <= meta["es_frame"] / frames <= 0.40
    lv = np.asarray(meta["lv_volume_ml"])
    assert lv.argmax() == 0 and lv.argmin() == meta["es_frame"]
    assert np.allclose(np.diff(meta["trigger_times_ms"]), meta["frame_interval_ms"])
    assert 600 <= frames * meta["frame_interval_ms"] <= 1100  # 55-95 bpm


def test_metadata_holds_the_ground_truth():
    phantom = generate_subject(11, num_frames=6, group="HCM")
    meta = phantom.metadata
    assert METADATA_KEYS <= set(meta)
    assert meta["group"] == "HCM" and 1.55 <= meta["bsa_m2"] <= 2.25
    assert len(meta["lv_volume_ml"]) == len(meta["rv_volume_ml"]) == 6
    assert meta["lv_ef_pct"] == pytest.approx(100 * (meta["lv_edv_ml"] - meta["lv_esv_ml"]) / meta["lv_edv_ml"])
    assert meta["rv_sv_ml"] == pytest.approx(meta["rv_edv_ml"] - meta["rv_esv_ml"])
    for name, view in meta["views"].items():
        np.testing.assert_allclose(view["affine"], getattr(phantom, f"{name}_affine"), atol=1e-5)
        assert len(view["spacing_mm"]) == 3 and view["slice_thickness_mm"] > 0
    landmarks = meta["landmarks_lax_4c"]
    assert landmarks["names"] == ["mitral_hinge_septal", "mitral_hinge_lateral", "apex"]
    assert np.asarray(landmarks["patient_mm"]).shape == (6, 3, 3) and np.asarray(landmarks["pixel"]).shape == (6, 3, 2)
    json.dumps(meta)  # JSON-ready


def test_landmarks_map_through_the_affine_onto_the_four_chamber_anatomy():
    phantom = generate_subject(21, num_frames=8)
    meta = phantom.metadata["landmarks_lax_4c"]
    affine = phantom.lax_4c_affine
    for frame in (0, phantom.metadata["es_frame"]):
        patient = np.asarray(meta["patient_mm"][frame])
        voxel = (np.linalg.inv(affine) @ np.c_[patient, np.ones(3)].T).T[:, :3]
        np.testing.assert_allclose(voxel[:, :2], meta["pixel"][frame], atol=1e-3)
        np.testing.assert_allclose(voxel[:, 2], 0.0, atol=1e-3)  # in the four-chamber plane
        label = phantom.lax_4c_label[:, :, frame]
        near = np.rint(voxel[:, :2]).astype(int)
        spacing = phantom.metadata["views"]["lax_4c"]["spacing_mm"][0]
        for (i, j), allowed in zip(near, ({3, 2}, {3, 2}, {2})):
            window = label[max(i - 2, 0) : i + 3, max(j - 2, 0) : j + 3]
            assert allowed & set(np.unique(window)), "landmark not on the LV in the 4C labels"
        # Hinges sit on the cavity border: background or myocardium within 2 pixels.
        for i, j in near[:2]:
            window = label[max(i - 2, 0) : i + 3, max(j - 2, 0) : j + 3]
            assert {3} < set(np.unique(window))
        length = np.linalg.norm(patient[2] - patient[:2].mean(axis=0))
        assert 60.0 <= length <= 130.0 and length / spacing > 30


def test_views_share_one_anatomy_through_their_affines():
    """LV cavity pixels of the 4C slice land on LV cavity voxels of the SAX stack (same frame)."""
    phantom = generate_subject(5, num_frames=4)
    sax_to_voxel = np.linalg.inv(phantom.sax_affine)
    thickness = phantom.metadata["views"]["sax"]["slice_thickness_mm"]
    step = phantom.metadata["views"]["sax"]["spacing_mm"][2]
    agree = total = 0
    for name in ("lax_4c", "lax_2c"):
        i, j = np.nonzero(ndimage.binary_erosion(getattr(phantom, f"{name}_label")[:, :, 0] == 3, iterations=2))
        patient = getattr(phantom, f"{name}_affine") @ np.stack([i, j, np.zeros_like(i), np.ones_like(i)])
        voxel = (sax_to_voxel @ patient)[:3]
        k = np.rint(voxel[2]).astype(int)
        near_centre = (np.abs(voxel[2] - k) * step < 0.25 * thickness) & (k >= 0) & (k < phantom.sax_label.shape[2])
        si, sj = np.rint(voxel[0]).astype(int)[near_centre], np.rint(voxel[1]).astype(int)[near_centre]
        agree += (phantom.sax_label[si, sj, k[near_centre], 0] == 3).sum()
        total += near_centre.sum()
    assert total > 100 and agree / total > 0.95
    axis = phantom.sax_affine[:3, 2] / np.linalg.norm(phantom.sax_affine[:3, 2])
    assert axis @ np.asarray(phantom.metadata["lv_long_axis_ras"]) > 0.999


def test_ef_from_label_voxel_counts_is_within_2_points_of_the_exact_ef(by_group):
    for phantom in by_group.values():
        lv, rv = _label_volumes(phantom)
        assert abs(_ef(lv) - phantom.metadata["lv_ef_pct"]) <= 2.0
        assert abs(_ef(rv) - phantom.metadata["rv_ef_pct"]) <= 4.0
        assert lv[0] == pytest.approx(phantom.metadata["lv_edv_ml"], rel=0.05)


def test_disease_groups_show_their_signs_in_the_labels(by_group):
    bsa = {group: phantom.metadata["bsa_m2"] for group, phantom in by_group.items()}
    volumes = {group: _label_volumes(phantom) for group, phantom in by_group.items()}
    assert _ef(volumes["NOR"][0]) > 50
    assert _ef(volumes["DCM"][0]) < 40 and volumes["DCM"][0][0] / bsa["DCM"] > 100
    assert _ef(volumes["MINF"][0]) < 40
    assert volumes["ARV"][1][0] / bsa["ARV"] > 110 and _ef(volumes["ARV"][1]) < 40

    # HCM: in mid-ventricular slices, several 60° sectors have an ED wall over 15 mm.
    hcm = by_group["HCM"]
    spacing = hcm.metadata["views"]["sax"]["spacing_mm"][0]
    thick_sectors = 0
    label = hcm.sax_label[..., 0]
    cavity = (label == 3).sum(axis=(0, 1))
    for k in np.argsort(cavity)[::-1][:3]:
        centre = np.array(ndimage.center_of_mass(label[:, :, k] == 3))
        angles = np.radians(np.arange(0, 360, 5))
        wall = np.array([(_ray_profile(label[:, :, k], centre, a) == 2).sum() * 0.25 * spacing for a in angles])
        thick_sectors = max(thick_sectors, (wall.reshape(6, 12).mean(axis=1) > 15).sum())
    assert thick_sectors >= 2

    # MINF: in some short-axis slice, 30° sectors of the endocardium barely move while others contract.
    minf = by_group["MINF"]
    es = minf.metadata["es_frame"]
    regional = []
    for k in range(minf.sax_label.shape[2]):
        ed_label, es_label = minf.sax_label[:, :, k, 0], minf.sax_label[:, :, k, es]
        if (ed_label == 3).sum() < 200 or (es_label == 3).sum() < 100:
            continue
        centre = np.array(ndimage.center_of_mass(ed_label == 3))
        angles = np.radians(np.arange(0, 360, 5))
        radius = np.array(
            [[np.argmax(_ray_profile(lab, centre, a) != 3) for a in angles] for lab in (ed_label, es_label)], float
        )
        shortening = 1.0 - radius[1].reshape(12, 6).mean(axis=1) / radius[0].reshape(12, 6).mean(axis=1)
        regional.append(shortening.min() < 0.05 and shortening.max() > 0.12)
    assert any(regional)


def test_images_have_rician_noise_and_papillary_muscles_are_labelled_cavity():
    phantom = generate_subject(9, num_frames=4, group="NOR")
    corner = phantom.sax_image[:12, :12].astype(float)  # air outside the body
    assert corner.mean() > 1.0 and corner.std() > 1.0 and np.unique(corner).size > 5
    # Dark structures inside the bright cavity (papillary muscles, trabeculations) carry label 3.
    label, image = phantom.sax_label, phantom.sax_image.astype(float)
    blood = np.median(image[label == 3])
    myocardium = np.median(image[label == 2])
    dark_cavity = (label == 3) & (image < 0.5 * (blood + myocardium))
    assert dark_cavity.sum() > 20


def test_options_switch_imperfections_on():
    plain = generate_subject(4, num_frames=4)
    missing = generate_subject(4, num_frames=4, missing_apical_slice=True)
    assert missing.metadata["options"]["missing_apical_slice"] is True
    shifted = generate_subject(4, num_frames=4, breath_hold_shift_mm=5.0)
    assert shifted.metadata["options"]["breath_hold_shift_mm"] == 5.0
    assert not np.array_equal(plain.sax_label, shifted.sax_label) or plain.sax_label.shape != shifted.sax_label.shape
    assert missing.sax_image.shape[2] <= 13
    with pytest.raises(DataError, match="unknown disease group 'FOO'"):
        generate_subject(1, group="FOO")
    with pytest.raises(DataError, match="num_frames must lie in 3..100"):
        generate_subject(1, num_frames=2)
    with pytest.raises(DataError, match="seed must be a non-negative integer"):
        generate_subject(-1)


def test_subject_seeds_make_cohorts_with_different_seeds_disjoint():
    first = {subject_seed(0, i) for i in range(200)}
    second = {subject_seed(1, i) for i in range(200)}
    assert len(first) == 200 and not first & second
    groups = [cohort_module._cohort_group(0, i) for i in range(20)]
    assert all(sorted(groups[b : b + 5]) == sorted(GROUPS) for b in range(0, 20, 5))
    assert groups[:5] != groups[5:10] or groups[5:10] != groups[10:15]  # shuffled per block


def _check_layout(manifest_path: Path, num_subjects: int, seed: int, frames: int) -> dict:
    manifest = json.loads(manifest_path.read_text())
    assert list(manifest) == ["description", "generator", "seed", "num_subjects", "training"]
    assert manifest["generator"] == "medssl.data.phantom" and manifest["seed"] == seed
    assert manifest["num_subjects"] == num_subjects == len(manifest["training"])
    root = manifest_path.parent
    for index, entry in enumerate(manifest["training"]):
        subject = f"sub-{index:04d}"
        assert list(entry) == ENTRY_KEYS and entry["subject_id"] == subject and entry["group"] in GROUPS
        for key in ENTRY_KEYS[2:-1]:
            assert entry[key] == f"{subject}/{key}.nii.gz"
        assert entry["metadata"] == f"{subject}/metadata.json"
        meta = json.loads((root / entry["metadata"]).read_text())
        assert meta["subject_id"] == subject and meta["seed"] == subject_seed(seed, index)
        assert meta["group"] == entry["group"] and METADATA_KEYS <= set(meta)
        for name in ("sax", "lax_2c", "lax_4c"):
            image, label = nib.load(root / entry[name]), nib.load(root / entry[f"{name}_label"])
            assert image.get_data_dtype() == np.uint16 and label.get_data_dtype() == np.uint8
            assert list(image.shape) == list(label.shape) == meta["views"][name]["shape"]
            assert image.shape[3] == frames
            np.testing.assert_allclose(image.affine, meta["views"][name]["affine"], atol=1e-4)
            assert image.header.get_zooms()[3] == pytest.approx(meta["frame_interval_ms"], rel=1e-5)
            assert image.header.get_xyzt_units() == ("mm", "msec")
            assert set(np.unique(np.asarray(label.dataobj))) <= {0, 1, 2, 3}
    return manifest


def test_write_cohort_layout_matches_the_contract(tmp_path):
    manifest_path = write_cohort(tmp_path / "cohort", 2, seed=3, num_workers=1, progress=False, num_frames=4)
    assert manifest_path == tmp_path / "cohort" / "manifest.json"
    _check_layout(manifest_path, 2, 3, 4)
    # The files are exactly what generate_subject returns for the subject's seed.
    meta = json.loads((tmp_path / "cohort" / "sub-0001" / "metadata.json").read_text())
    phantom = generate_subject(meta["seed"], group=meta["group"], subject_id="sub-0001", **meta["options"])
    sax = np.asarray(nib.load(tmp_path / "cohort/sub-0001/sax.nii.gz").dataobj)
    np.testing.assert_array_equal(sax, phantom.sax_image)
    lax = np.asarray(nib.load(tmp_path / "cohort/sub-0001/lax_4c_label.nii.gz").dataobj)
    np.testing.assert_array_equal(lax[:, :, 0], phantom.lax_4c_label)
    # MONAI reads the manifest as a decathlon datalist with paths resolved against the cohort folder.
    from monai.data import load_decathlon_datalist

    items = load_decathlon_datalist(manifest_path, is_segmentation=False, data_list_key="training")
    assert Path(items[0]["sax"]) == tmp_path / "cohort" / "sub-0000" / "sax.nii.gz"
    assert not list((tmp_path / "cohort").glob(".sub-*"))


def test_interrupted_writing_leaves_no_manifest(tmp_path, monkeypatch):
    out = tmp_path / "cohort"
    write_cohort(out, 1, seed=0, num_workers=1, progress=False, num_frames=3)
    assert (out / "manifest.json").exists()
    real = cohort_module.generate_subject
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of a cohort
        return real(*args, **kwargs)

    monkeypatch.setattr(cohort_module, "generate_subject", flaky)
    with pytest.raises(KeyboardInterrupt):
        write_cohort(out, 3, seed=0, num_workers=1, progress=False, num_frames=3)
    assert not (out / "manifest.json").exists()
    assert not list(out.glob(".sub-*")) and not (out / "sub-0001").exists()


def test_ensure_cohort_reuses_a_matching_cohort_and_regenerates_otherwise(tmp_path):
    out = tmp_path / "cohort"
    first = ensure_cohort(out, 1, seed=2, num_workers=1, progress=False, num_frames=3)
    stamp = (out / "sub-0000" / "sax.nii.gz").stat().st_mtime_ns
    assert ensure_cohort(out, 1, seed=2, num_workers=1, progress=False, num_frames=3) == first
    assert (out / "sub-0000" / "sax.nii.gz").stat().st_mtime_ns == stamp
    ensure_cohort(out, 1, seed=3, num_workers=1, progress=False, num_frames=3)
    assert json.loads(first.read_text())["seed"] == 3
    ensure_cohort(out, 1, seed=3, num_workers=1, progress=False, num_frames=4)
    assert nib.load(out / "sub-0000" / "sax.nii.gz").shape[3] == 4
    (out / "sub-0000" / "lax_2c.nii.gz").unlink()  # a damaged cohort is regenerated
    ensure_cohort(out, 1, seed=3, num_workers=1, progress=False, num_frames=4)
    assert (out / "sub-0000" / "lax_2c.nii.gz").exists()


def test_write_cohort_validates_its_arguments(tmp_path):
    with pytest.raises(DataError, match="num_subjects must be >= 1"):
        write_cohort(tmp_path, 0)
    with pytest.raises(DataError, match=r"unknown phantom option\(s\) \['frames'\]"):
        write_cohort(tmp_path, 1, frames=3)
    with pytest.raises(DataError, match="num_workers must be >= 1"):
        write_cohort(tmp_path, 1, num_workers=0)
    assert PhantomOptions.from_kwargs({"num_frames": 5}).num_frames == 5


def test_parallel_workers_write_the_same_cohort(tmp_path):
    serial = write_cohort(tmp_path / "serial", 2, seed=5, num_workers=1, progress=False, num_frames=3)
    parallel = write_cohort(tmp_path / "parallel", 2, seed=5, num_workers=2, progress=False, num_frames=3)
    assert json.loads(serial.read_text()) == json.loads(parallel.read_text())
    for name in ("sub-0000/sax.nii.gz", "sub-0001/lax_4c_label.nii.gz", "sub-0001/metadata.json"):
        a, b = serial.parent / name, parallel.parent / name
        if name.endswith(".json"):
            assert a.read_text() == b.read_text()
        else:
            np.testing.assert_array_equal(np.asarray(nib.load(a).dataobj), np.asarray(nib.load(b).dataobj))


def test_dicom_export_writes_one_series_per_view_in_one_study(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    manifest = write_cohort(tmp_path, 1, seed=1, dicom=True, num_workers=1, progress=False, num_frames=3)
    meta = json.loads((tmp_path / "sub-0000" / "metadata.json").read_text())
    studies, series = set(), set()
    for name in ("sax", "lax_2c", "lax_4c"):
        files = sorted((tmp_path / "sub-0000" / "dicom" / name).glob("*.dcm"))
        slices = meta["views"][name]["shape"][2]
        assert len(files) == slices * 3
        dataset = pydicom.dcmread(files[0])
        studies.add(dataset.StudyInstanceUID)
        series.add(dataset.SeriesInstanceUID)
        assert dataset.Rows == meta["views"][name]["shape"][1] and dataset.Columns == meta["views"][name]["shape"][0]
    assert len(studies) == 1 and len(series) == 3
    assert ensure_cohort(tmp_path, 1, seed=1, dicom=True, num_workers=1, progress=False, num_frames=3) == manifest
