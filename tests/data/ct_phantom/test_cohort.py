"""Synthetic CT cohorts on disk: determinism, splits, labels, manifest, resumability, 3D volumes, the data list."""

import json
import os

import nibabel as nib
import numpy as np
import pytest

from medssl.data.ct_phantom import CT_CLASSES, TISSUES, ensure_ct_cohort, generate_ct_image, load_ct_datalist
from medssl.data.phantom import subject_seed
from medssl.errors import DataError

SIZE = 32


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """7 training and 3 test slices of 32 x 32 (12 mm pixels), seed 0; read-only."""
    out = tmp_path_factory.mktemp("ct")
    return ensure_ct_cohort(out, 7, seed=0, size=SIZE, num_test=3, num_workers=1, progress=False)


def test_images_are_deterministic_per_seed_and_differ_between_seeds():
    first, again, other = generate_ct_image(11, 1, size=SIZE), generate_ct_image(11, 1, size=SIZE), \
        generate_ct_image(12, 1, size=SIZE)
    np.testing.assert_array_equal(first.image, again.image)
    assert first.metadata == again.metadata
    assert not np.array_equal(first.image, other.image)
    assert first.image.dtype == np.int16 and first.image.shape == (SIZE, SIZE)
    assert first.metadata["class"] == "solid" and first.metadata["nodule"]["kind"] == "solid"
    assert generate_ct_image(11, 0, size=SIZE).metadata["nodule"] is None


def test_manifest_lists_every_image_with_its_class(cohort):
    manifest = json.loads(cohort.read_text())
    assert (manifest["num_images"], manifest["num_test"], manifest["seed"], manifest["shape"]) == (7, 3, 0, [32, 32])
    assert manifest["classes"] == list(CT_CLASSES)
    assert len(manifest["training"]) == 7 and len(manifest["test"]) == 3
    for split, prefix, offset in (("training", "img-", 0), ("test", "img-t", 1_000_000)):
        for i, entry in enumerate(manifest[split]):
            assert entry["image"] == f"{prefix}{i:05d}/image.nii.gz"
            metadata = json.loads((cohort.parent / entry["metadata"]).read_text())
            assert metadata["seed"] == subject_seed(0, offset + i)  # splits never share a patient
            assert entry["class"] == metadata["class"] == CT_CLASSES[entry["label"]]
            image = nib.load(cohort.parent / entry["image"])
            assert image.shape == (SIZE, SIZE) and image.get_data_dtype() == np.int16
            np.testing.assert_allclose(image.header.get_zooms(), (12.0, 12.0))
            # the image on disk is the generator's
            np.testing.assert_array_equal(np.asarray(image.dataobj), generate_ct_image(metadata["seed"], entry["label"],
                                                                                         size=SIZE).image)


def test_classes_are_balanced_in_blocks_of_three(cohort):
    labels = [entry["label"] for entry in json.loads(cohort.read_text())["training"]]
    assert sorted(labels[:3]) == sorted(labels[3:6]) == [0, 1, 2]


def test_ensure_reuses_a_complete_cohort_and_a_prefix_is_shared(cohort, tmp_path):
    stamp = os.stat(cohort).st_mtime_ns
    assert ensure_ct_cohort(cohort.parent, 7, seed=0, size=SIZE, num_test=3, progress=False) == cohort
    assert os.stat(cohort).st_mtime_ns == stamp
    smaller = ensure_ct_cohort(tmp_path / "small", 2, seed=0, size=SIZE, num_workers=1, progress=False)
    for name in ("img-00000", "img-00001"):
        np.testing.assert_array_equal(np.asarray(nib.load(smaller.parent / name / "image.nii.gz").dataobj),
                                      np.asarray(nib.load(cohort.parent / name / "image.nii.gz").dataobj))


def test_an_incomplete_cohort_is_rewritten(tmp_path):
    manifest = ensure_ct_cohort(tmp_path, 2, seed=3, size=SIZE, num_workers=1, progress=False)
    (tmp_path / "img-00001" / "image.nii.gz").unlink()
    (tmp_path / ".img-00005.tmp-stale").mkdir()  # a crashed writer's staging folder
    assert ensure_ct_cohort(tmp_path, 2, seed=3, size=SIZE, num_workers=1, progress=False) == manifest
    assert (tmp_path / "img-00001" / "image.nii.gz").is_file() and not (tmp_path / ".img-00005.tmp-stale").exists()


def test_volumes(tmp_path):
    manifest = ensure_ct_cohort(tmp_path, 1, seed=0, dims=3, size=32, depth=16, num_workers=1, progress=False)
    image = nib.load(manifest.parent / "img-00000" / "image.nii.gz")
    assert image.shape == (32, 32, 16)
    np.testing.assert_allclose(image.header.get_zooms(), (12.0, 12.0, 12.0))
    assert generate_ct_image(0, 2, dims=3, size=32).image.shape == (32, 32, 16)  # depth defaults to size // 2


def test_candidate_patches_are_centred_on_the_nodule_or_a_vessel_look_alike(tmp_path):
    """A 48 mm patch of 48 pixels (1 mm): the nodule lies within the jitter (1/8 of the width) of the patch centre,
    the grid's affine places it where the metadata says, and a patch without a nodule is centred on blood."""
    for seed in range(6):
        ct = generate_ct_image(seed, 1 + seed % 2, size=48, patch_mm=48.0)
        centre, nodule = np.array(ct.metadata["patch_centre_mm"]), np.array(ct.metadata["nodule"]["centre_mm"])
        np.testing.assert_allclose(ct.metadata["spacing_mm"][:2], (1.0, 1.0))
        voxel_centre = ct.affine @ np.array([23.5, 23.5, 0.0, 1.0])
        np.testing.assert_allclose(voxel_centre[:2], centre, atol=1e-3)  # metadata: 3 decimals
        # (the metadata's nodule centre is in the patient frame; its voxels give it in the scanner frame)
        nodule_voxels = np.argwhere(ct.tissues == TISSUES["nodule"])
        nodule_mm = (ct.affine[:2, :2] @ nodule_voxels.mean(0) + ct.affine[:2, 3])
        assert np.abs(nodule_mm - centre).max() <= 48.0 / 8 + 1.0, (seed, nodule_mm, centre, nodule)
    on_blood = 0
    for seed in range(6):
        ct = generate_ct_image(seed, 0, size=48, patch_mm=48.0)
        assert ct.metadata["nodule"] is None and len(ct.metadata["patch_centre_mm"]) == 2
        near_centre = ct.tissues[18:30, 18:30]
        on_blood += bool((near_centre == TISSUES["blood"]).any())
        assert not (ct.tissues == TISSUES["nodule"]).any()
    assert on_blood >= 5  # a vessel crosses the plane near the centre unless no vessel crosses the lungs at all
    whole = generate_ct_image(0, 1, size=SIZE)
    assert whole.metadata["patch_centre_mm"] is None
    np.testing.assert_allclose(whole.metadata["spacing_mm"][:2], (12.0, 12.0))
    manifest = ensure_ct_cohort(tmp_path, 2, seed=0, size=48, patch_mm=48.0, num_workers=1, progress=False)
    assert json.loads(manifest.read_text())["patch_mm"] == 48.0
    with pytest.raises(DataError, match=r"patch_mm must be None \(the whole 384 mm slice\) or a width in 16..384"):
        ensure_ct_cohort(tmp_path / "bad", 1, patch_mm=4.0)


def test_datalist(cohort):
    items = load_ct_datalist(cohort.parent, "test")
    manifest = json.loads(cohort.read_text())
    assert [item["label"] for item in items] == [entry["label"] for entry in manifest["test"]]
    assert all(os.path.isabs(item["image"]) and os.path.isfile(item["image"]) for item in items)
    with pytest.raises(DataError, match=r"class 'none', not one of \['solid', 'ground_glass'\]"):
        load_ct_datalist(cohort, "training", ["solid", "ground_glass"])
    with pytest.raises(DataError, match="has no 'validation' images"):
        load_ct_datalist(cohort, "validation")


def test_bad_options_get_clear_errors(tmp_path):
    with pytest.raises(DataError, match="dims must be 2"):
        ensure_ct_cohort(tmp_path, 1, dims=4)
    with pytest.raises(DataError, match="size must be an integer in 16..512"):
        ensure_ct_cohort(tmp_path, 1, size=8)
    with pytest.raises(DataError, match=r"unknown CT cohort option\(s\) \['colour'\]"):
        ensure_ct_cohort(tmp_path, 1, colour=True)
    with pytest.raises(DataError, match="num_images >= 1"):
        ensure_ct_cohort(tmp_path, 0)
    with pytest.raises(DataError, match="cannot read the CT cohort manifest"):
        load_ct_datalist(tmp_path)
