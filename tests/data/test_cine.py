"""Cine data sources, CineMA pre-processing and single-phase sampling."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from medssl.data.cine import RandCardiacPhased, cine_dataset, cine_transforms, load_cine_datalist
from medssl.errors import DataError


def write_nifti(path, array, spacing):
    """Save ``array`` with a diagonal affine of the given voxel spacing (mm)."""
    affine = np.diag([*spacing, 1.0])
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(array), affine), str(path))
    return path


def write_subject(folder, frames=4, lax=True, rng=None):
    rng = rng or np.random.default_rng(0)
    write_nifti(folder / "sax.nii.gz", rng.integers(0, 4000, (20, 20, 5, frames), dtype=np.uint16), (2.0, 2.0, 10.0))
    if lax:
        for view in ("lax_2c", "lax_4c"):
            lax = rng.integers(0, 4000, (20, 20, 1, frames), dtype=np.uint16)
            write_nifti(folder / f"{view}.nii.gz", lax, (2.0, 2.0, 8.0))


VIEWS = {
    "sax": {"image_size": [20, 20, 5], "spacing": [2.0, 2.0, 10.0]},
    "lax_2c": {"image_size": [20, 20], "spacing": [2.0, 2.0]},
    "lax_4c": {"image_size": [20, 20], "spacing": [2.0, 2.0]},
}


def test_subject_folders_list_every_view(tmp_path):
    for name in ("b", "a"):
        write_subject(tmp_path / name)
    datalist = load_cine_datalist(tmp_path)
    assert [sorted(item) for item in datalist] == [["lax_2c", "lax_4c", "sax"]] * 2
    assert datalist[0]["sax"] == str((tmp_path / "a" / "sax.nii.gz").resolve())
    assert datalist[1]["lax_4c"] == str((tmp_path / "b" / "lax_4c.nii.gz").resolve())


def test_flat_folder_of_sax_cines(tmp_path):
    for name in ("p2.nii.gz", "p1.nii"):
        write_nifti(tmp_path / name, np.zeros((8, 8, 3, 4), np.uint16), (2, 2, 10))
    (tmp_path / "notes.txt").write_text("not an image")
    datalist = load_cine_datalist(tmp_path, views=["sax"])
    assert datalist == [{"sax": str(tmp_path / "p1.nii")}, {"sax": str(tmp_path / "p2.nii.gz")}]


def test_manifest_paths_are_relative_to_it_and_identifiers_dropped(tmp_path):
    write_subject(tmp_path / "sub-0000")
    manifest = {
        "training": [
            {"subject_id": "sub-0000", "group": "NOR", "sax": "sub-0000/sax.nii.gz", "lax_2c": "sub-0000/lax_2c.nii.gz",
             "lax_4c": "sub-0000/lax_4c.nii.gz", "metadata": "sub-0000/metadata.json"}
        ]
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    datalist = load_cine_datalist(tmp_path)  # the folder holding manifest.json
    assert datalist == [{view: str(tmp_path / "sub-0000" / f"{view}.nii.gz") for view in ("sax", "lax_2c", "lax_4c")}]


def test_relative_manifest_path(tmp_path, monkeypatch):
    write_subject(tmp_path / "cohort" / "s1", lax=False)
    (tmp_path / "cohort" / "manifest.json").write_text(json.dumps({"training": [{"sax": "s1/sax.nii.gz"}]}))
    monkeypatch.chdir(tmp_path)
    assert load_cine_datalist("cohort", views=["sax"]) == [{"sax": str(tmp_path / "cohort" / "s1" / "sax.nii.gz")}]


def test_decathlon_datalist_image_key_is_the_sax_view(tmp_path):
    write_subject(tmp_path / "s", lax=False)
    (tmp_path / "list.json").write_text(json.dumps({"training": [{"image": "s/sax.nii.gz"}]}))
    assert load_cine_datalist(tmp_path / "list.json", views=["sax"]) == [{"sax": str(tmp_path / "s" / "sax.nii.gz")}]


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_cine_datalist(tmp_path / "nowhere")


def test_empty_folder_says_what_is_expected(tmp_path):
    with pytest.raises(DataError, match=r"no NIfTI files found in .*; expected .*sax\.nii\.gz"):
        load_cine_datalist(tmp_path)


def test_wrong_number_of_dimensions_names_file_and_shape(tmp_path):
    path = write_nifti(tmp_path / "short.nii.gz", np.zeros((8, 8, 3), np.uint16), (2, 2, 10))
    expected = r"short\.nii\.gz: expected a 4-D SAX cine \[H, W, S, T\], got shape \(8, 8, 3\)"
    with pytest.raises(DataError, match=expected):
        load_cine_datalist(path.parent, views=["sax"])


def test_lax_must_be_a_single_slice(tmp_path):
    write_subject(tmp_path / "s")
    write_nifti(tmp_path / "s" / "lax_2c.nii.gz", np.zeros((8, 8, 2, 4), np.uint16), (2, 2, 8))
    expected = r"lax_2c\.nii\.gz: expected a 4-D lax_2c cine \[H, W, 1, T\], got shape \(8, 8, 2, 4\)"
    with pytest.raises(DataError, match=expected):
        load_cine_datalist(tmp_path)


def test_missing_view(tmp_path):
    write_subject(tmp_path / "a")
    write_subject(tmp_path / "b", lax=False)
    with pytest.raises(DataError, match=r"1 of 2 subjects .* have no 'lax_2c' image \(first: subject #1\)"):
        load_cine_datalist(tmp_path)
    assert len(load_cine_datalist(tmp_path, views=["sax"])) == 2


def test_file_listed_in_manifest_must_exist(tmp_path):
    (tmp_path / "manifest.json").write_text(json.dumps({"training": [{"sax": "gone/sax.nii.gz"}]}))
    with pytest.raises(DataError, match=r"sax image .*gone/sax\.nii\.gz listed in .*manifest\.json does not exist"):
        load_cine_datalist(tmp_path, views=["sax"])


def test_intensity_is_clipped_to_cinema_percentiles_over_the_whole_cine(tmp_path):
    """Spacing and size already on target: the output is exactly the percentile scaling (direct formula)."""
    raw = np.random.default_rng(1).gamma(2.0, 300.0, (20, 20, 5, 3)).astype(np.float32)
    write_nifti(tmp_path / "sax.nii.gz", raw, (2.0, 2.0, 10.0))
    out = cine_transforms({"sax": VIEWS["sax"]}, random_phase=False)({"sax": str(tmp_path / "sax.nii.gz")})["sax"]
    low, high = np.percentile(raw, [0.95, 99.5])
    expected = np.clip((raw - low) / (high - low), 0.0, 1.0)
    assert out.shape == (3, 20, 20, 5) and out.dtype == torch.float32
    np.testing.assert_allclose(out.numpy(), np.moveaxis(expected, -1, 0), atol=1e-5)


def test_resampling_and_centre_crop_pad(tmp_path):
    """SAX 1x1x5 mm, 40x30x8 -> 2x2x10 mm gives 20x15x4, then crop/pad to 16x18x6 around the centre."""
    sax = np.zeros((40, 30, 8, 2), np.float32)
    sax[18:22, 13:17, :, :] = 1000.0  # a bright bar through the centre of every slice
    sax[0, 0, 0, :] = 1.0  # keeps the low percentile at 0 (background)
    write_nifti(tmp_path / "sax.nii.gz", sax, (1.0, 1.0, 5.0))
    lax = np.zeros((30, 50, 1, 2), np.float32)
    lax[13:17, 23:27, 0, :] = 1000.0
    write_nifti(tmp_path / "lax_2c.nii.gz", lax, (1.0, 1.0, 8.0))
    views = {
        "sax": {"image_size": [16, 18, 6], "spacing": [2, 2, 10]},
        "lax_2c": {"image_size": [12, 12], "spacing": [2, 2]},
    }
    sample = cine_transforms(views, random_phase=False)({v: str(tmp_path / f"{v}.nii.gz") for v in views})
    assert sample["sax"].shape == (2, 16, 18, 6)
    assert sample["lax_2c"].shape == (2, 12, 12)
    # 20x15x4 cropped by 2 in x, padded by (1, 2) in y and (1, 1) in z: the bar stays at the centre.
    bright = torch.nonzero(sample["sax"][0, :, :, 3] > 0.5)
    assert bright[:, 0].float().mean().item() == pytest.approx(7.5, abs=0.6)
    assert bright[:, 1].float().mean().item() == pytest.approx(8.5, abs=0.6)
    assert sample["sax"][0, :, :, 0].abs().max() == 0 and sample["sax"][0, :, :, 5].abs().max() == 0  # z padding
    lax_bright = torch.nonzero(sample["lax_2c"][0] > 0.5).float().mean(0)
    assert lax_bright.tolist() == pytest.approx([5.5, 5.5], abs=0.6)


def test_rand_cardiac_phase_takes_the_same_phase_in_every_view():
    sax = torch.arange(10.0).reshape(10, 1, 1, 1).expand(10, 2, 2, 2)  # value = frame index
    lax = torch.arange(20.0).reshape(20, 1, 1).expand(20, 2, 2)
    transform = RandCardiacPhased(keys=["sax", "lax_2c"]).set_random_state(seed=3)
    frames = []
    for _ in range(50):
        out = transform({"sax": sax, "lax_2c": lax, "other": "kept"})
        assert out["sax"].shape == (1, 2, 2, 2) and out["lax_2c"].shape == (1, 2, 2) and out["other"] == "kept"
        sax_frame, lax_frame = int(out["sax"][0, 0, 0, 0]), int(out["lax_2c"][0, 0, 0])
        assert sax_frame == lax_frame // 2  # floor(u * 10) == floor(floor(u * 20) / 2)
        frames.append(sax_frame)
    assert len(set(frames)) > 5  # many phases are drawn
    again = RandCardiacPhased(keys=["sax"]).set_random_state(seed=3)
    assert [int(again({"sax": sax})["sax"][0, 0, 0, 0]) for _ in range(50)] == frames


def test_cine_dataset_repeats_subjects_with_one_cache(tmp_path):
    for name in ("a", "b"):
        write_subject(tmp_path / name, frames=6)
    datalist = load_cine_datalist(tmp_path)
    dataset = cine_dataset(datalist, VIEWS, samples_per_subject=3, progress=False)
    assert len(dataset) == 6
    assert len({id(part) for part in dataset.datasets}) == 1  # the repeats share one cache
    sample = dataset[4]
    assert {key: tuple(value.shape) for key, value in sample.items()} == {
        "sax": (1, 20, 20, 5), "lax_2c": (1, 20, 20), "lax_4c": (1, 20, 20)
    }
    assert 0.0 <= sample["sax"].min() and sample["sax"].max() <= 1.0


@pytest.mark.parametrize(
    "views, message",
    [
        ({"sax": {"image_size": [8, 8], "spacing": [1, 1, 1]}}, "needs 3 positive image_size and spacing"),
        ({"lax_3c": {"image_size": [8, 8], "spacing": [1, 1]}}, "unknown view 'lax_3c'"),
        ({"lax_2c": {"image_size": [8, 8], "spacing": [1, 0]}}, "needs 2 positive"),
    ],
)
def test_view_geometry_is_validated(views, message):
    with pytest.raises(ValueError, match=message):
        cine_transforms(views)


def write_labels(folder, views=("sax", "lax_2c", "lax_4c")):
    """A label cine beside each view's image, with the image's shape and affine."""
    for view in views:
        image = nib.load(str(folder / f"{view}.nii.gz"))
        write_nifti(folder / f"{view}_label.nii.gz", np.zeros(image.shape, np.uint8), image.header.get_zooms()[:3])


def test_labels_are_listed_beside_their_images_in_subject_folders(tmp_path):
    for name in ("a", "b"):
        write_subject(tmp_path / name)
        write_labels(tmp_path / name, views=("sax", "lax_4c"))
    datalist = load_cine_datalist(tmp_path, views=["sax", "lax_4c"], labels=True)
    assert datalist[1] == {
        key: str((tmp_path / "b" / f"{key}.nii.gz").resolve()) for key in ("sax", "sax_label", "lax_4c", "lax_4c_label")
    }
    assert load_cine_datalist(tmp_path, views=["sax"]) == [{"sax": item["sax"]} for item in datalist]
    expected = r"2 of 2 subjects .* have no 'lax_2c' label \(first: subject #0\); add the file \('lax_2c_label'\)"
    with pytest.raises(DataError, match=expected):
        load_cine_datalist(tmp_path, views=["sax", "lax_2c"], labels=True)


def test_labels_from_a_manifest_and_a_flat_folder(tmp_path):
    write_subject(tmp_path / "cohort" / "s1", lax=False)
    write_labels(tmp_path / "cohort" / "s1", views=("sax",))
    manifest = {"training": [{"subject_id": "s1", "sax": "s1/sax.nii.gz", "sax_label": "s1/sax_label.nii.gz"}]}
    (tmp_path / "cohort" / "manifest.json").write_text(json.dumps(manifest))
    assert load_cine_datalist(tmp_path / "cohort", views=["sax"], labels=True) == [
        {"sax": str(tmp_path / "cohort" / "s1" / "sax.nii.gz"), "sax_label": str(tmp_path / "cohort" / "s1" /
                                                                                 "sax_label.nii.gz")}
    ]
    flat = tmp_path / "flat"
    for name in ("p1", "p2"):
        write_nifti(flat / f"{name}.nii.gz", np.zeros((8, 8, 3, 4), np.uint16), (2, 2, 10))
    write_nifti(flat / "p1_label.nii.gz", np.zeros((8, 8, 3, 4), np.uint8), (2, 2, 10))
    # The label is paired with its image, not listed as a cine of its own; p2 has none.
    assert load_cine_datalist(flat, views=["sax"]) == [{"sax": str(flat / f"{name}.nii.gz")} for name in ("p1", "p2")]
    with pytest.raises(DataError, match=r"1 of 2 subjects .* have no 'sax' label \(first: subject #1\)"):
        load_cine_datalist(flat, views=["sax"], labels=True)


def test_label_must_have_its_images_shape(tmp_path):
    write_subject(tmp_path / "a", lax=False)
    write_nifti(tmp_path / "a" / "sax_label.nii.gz", np.zeros((20, 20, 5, 3), np.uint8), (2.0, 2.0, 10.0))
    with pytest.raises(DataError, match=r"sax_label\.nii\.gz has shape \(20, 20, 5, 3\) but its image .* has "
                                        r"\(20, 20, 5, 4\)"):
        load_cine_datalist(tmp_path, views=["sax"], labels=True)


def test_subject_metadata_is_listed_on_request(tmp_path):
    write_subject(tmp_path / "subjects" / "a", lax=False)
    (tmp_path / "subjects" / "a" / "metadata.json").write_text(json.dumps({"lv_ef_pct": 60.0}))
    [entry] = load_cine_datalist(tmp_path / "subjects", views=["sax"], metadata=True)
    assert entry["metadata"] == str((tmp_path / "subjects" / "a" / "metadata.json").resolve())
    assert "metadata" not in load_cine_datalist(tmp_path / "subjects", views=["sax"])[0]

    write_subject(tmp_path / "listed" / "s", lax=False)
    manifest = {"training": [{"sax": "s/sax.nii.gz", "metadata": "s/targets.json"}]}
    (tmp_path / "listed" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=r"subject metadata .*targets\.json listed in .*manifest\.json does not exist"):
        load_cine_datalist(tmp_path / "listed", views=["sax"], metadata=True)
    (tmp_path / "listed" / "s" / "targets.json").write_text("{}")
    assert load_cine_datalist(tmp_path / "listed", views=["sax"], metadata=True)[0]["metadata"].endswith("targets.json")


def test_missing_subject_metadata_is_named(tmp_path):
    write_subject(tmp_path / "a", lax=False)
    with pytest.raises(DataError, match=r"1 of 1 subjects .* have no metadata\.json with their targets"):
        load_cine_datalist(tmp_path, views=["sax"], metadata=True)
