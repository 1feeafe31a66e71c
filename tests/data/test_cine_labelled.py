"""Labelled cine frames: view geometry, label checks, labelled-frame sampling, resampling, the cached dataset."""

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose

from medssl.data.cine import load_cine_datalist
from medssl.data.cine_labelled import (
    CheckLabelsd,
    RandLabelledFramed,
    RandWindowd,
    SegmentationView,
    check_label_values,
    cine_preprocessing,
    labelled_frame_dataset,
    parse_segmentation_views,
)
from medssl.errors import DataError

VIEWS = parse_segmentation_views({
    "sax": {"image_size": [16, 16, 4], "spacing": [2.0, 2.0, None], "patch_size": [8, 8, 1]},
    "lax_4c": {"image_size": [16, 16], "spacing": [2.0, 2.0]},
})


def write(path, array, spacing):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag([*spacing, 1.0])), str(path))
    return path


def heart_cine(shape, frames, labelled=None):
    """``[H, W, S, T]``: a bright LV disc on a dark background; its label (3 inside, 2 on a ring) in labelled frames."""
    x, y = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    radius = np.hypot(x - shape[0] / 2, y - shape[1] / 2)[..., None]
    ring = np.where(radius < 6, 3, np.where(radius < 8, 2, 0)).astype(np.uint8)
    image = np.zeros((*shape, frames), np.uint16)
    label = np.zeros((*shape, frames), np.uint8)
    for t in range(frames):
        image[..., t] = np.where(radius < 8, 1000 + t, 100)
        if labelled is None or t in labelled:
            label[..., t] = ring
    return image, label


def write_subject(folder, frames=4, labelled=None, spacing=1.5):
    sax, sax_label = heart_cine((40, 40, 6), frames, labelled)
    write(folder / "sax.nii.gz", sax, (spacing, spacing, 8.0))
    write(folder / "sax_label.nii.gz", sax_label, (spacing, spacing, 8.0))
    lax, lax_label = heart_cine((40, 40, 1), frames, labelled)
    write(folder / "lax_4c.nii.gz", lax, (spacing, spacing, 7.0))
    write(folder / "lax_4c_label.nii.gz", lax_label, (spacing, spacing, 7.0))


def test_segmentation_view_geometry():
    sax, lax = VIEWS["sax"], VIEWS["lax_4c"]
    assert sax.is_stack and sax.pixdim == [2.0, 2.0, -1.0] and sax.label == "sax_label"
    assert not lax.is_stack and lax.pixdim == [2.0, 2.0, -1.0] and lax.image_size == (16, 16)
    assert SegmentationView("sax", [8, 8, 2], [1.0, 1.0, 0.0]).spacing == (1.0, 1.0, None)
    with pytest.raises(ValueError, match="view 'lax_4c' needs 2 positive image_size values"):
        SegmentationView("lax_4c", [8, 8, 1], [1.0, 1.0])
    with pytest.raises(ValueError, match="unknown view 'sa'"):
        SegmentationView("sa", [8, 8, 2], [1.0, 1.0, 1.0])


def test_label_values_must_be_class_ids():
    check_label_values(np.array([0, 1, 2, 3]), 4, "x")
    expected = r"label f\.nii holds values 4, 255 outside the class ids 0\.\.3 \(0 background, 1 RV, 2 MYO, 3 LV\)"
    with pytest.raises(DataError, match=expected):
        check_label_values(np.array([0, 4, 255, 1]), 4, "f.nii")
    with pytest.raises(DataError, match=r"holds values 1\.5 outside"):
        check_label_values(np.array([0.0, 1.5]), 4, "f.nii")
    with pytest.raises(DataError, match="is empty"):
        check_label_values(np.zeros((0, 3)), 4, "f.nii")


def test_check_labels_transform_names_the_file():
    label = MetaTensor(torch.full((2, 4, 4, 1), 5.0), meta={"filename_or_obj": "/d/sax_label.nii.gz"})
    check = CheckLabelsd(keys=["sax_label"], image_keys=["sax"], num_classes=4)
    with pytest.raises(DataError, match=r"/d/sax_label\.nii\.gz holds values 5 outside"):
        check({"sax": torch.zeros(2, 4, 4, 1), "sax_label": label})
    with pytest.raises(DataError, match=r"has shape \(2, 4, 4, 1\) but its image has \(3, 4, 4, 1\)"):
        check({"sax": torch.zeros(3, 4, 4, 1), "sax_label": label})


def test_rand_labelled_frame_takes_labelled_frames_only_and_keeps_pairs():
    image = torch.arange(6.0).view(6, 1, 1, 1).expand(6, 3, 3, 2).clone()  # intensity = frame index
    label = torch.zeros(6, 3, 3, 2)
    label[[1, 4], 1, 1, 0] = 3
    pick = RandLabelledFramed(keys=["sax"], label_keys=["sax_label"])
    pick.set_random_state(0)
    seen = set()
    for _ in range(40):
        sample = pick({"sax": image, "sax_label": label})
        assert sample["sax"].shape == (1, 3, 3, 2) and sample["sax_label"][0, 1, 1, 0] == 3
        seen.add(int(sample["sax"][0, 0, 0, 0]))
    assert seen == {1, 4}
    with pytest.raises(DataError, match="'sax_label' has no labelled frame"):
        pick({"sax": image, "sax_label": torch.zeros_like(label)})


def test_windows_are_centred_on_the_heart_or_the_background_two_to_one():
    label = torch.zeros(1, 100, 100, 3)
    label[0, 45:55, 45:55, :] = 3  # 1 % of the image
    image = torch.arange(100.0).view(1, 100, 1, 1).expand(1, 100, 100, 3).clone()  # intensity = row index
    crop = RandWindowd(keys=["sax", "sax_label"], label_key="sax_label", spatial_size=(10, 10, 3))
    crop.set_random_state(0)
    on_heart = 0
    for _ in range(300):
        window = crop({"sax": image, "sax_label": label})
        assert window["sax"].shape == window["sax_label"].shape == (1, 10, 10, 3)
        first_row = int(window["sax"][0, 0, 0, 0])  # image and label are cut from the same place
        torch.testing.assert_close(window["sax"][0, :, 0, 0], torch.arange(first_row, first_row + 10.0))
        on_heart += bool(window["sax_label"][0, 5, 5, 0] > 0)
    assert abs(on_heart / 300 - 2 / 3) < 0.08  # background centres almost never land on a 1 % heart


def test_preprocessing_resamples_in_plane_keeps_slices_and_scales(tmp_path):
    image, label = heart_cine((40, 40, 6), 3)
    preprocess = Compose(cine_preprocessing(VIEWS["sax"], "sax", "sax_label"))
    affine = torch.as_tensor(np.diag([1.0, 1.0, 8.0, 1.0]))
    image, label = (MetaTensor(torch.as_tensor(np.moveaxis(a, -1, 0).astype(np.float32)), affine=affine)
                    for a in (image, label))
    out = preprocess({"sax": image, "sax_label": label})
    assert out["sax"].shape == out["sax_label"].shape == (3, 20, 20, 6)  # 1 mm -> 2 mm in-plane, slices kept
    np.testing.assert_allclose(np.linalg.norm(out["sax"].affine[:3, :3].numpy(), axis=0), [2.0, 2.0, 8.0])
    assert out["sax"].min() == 0.0 and out["sax"].max() == 1.0
    assert set(out["sax_label"].unique().tolist()) == {0.0, 2.0, 3.0}  # nearest: no in-between ids


def test_dataset_draws_labelled_windows_of_every_view(tmp_path):
    for name in ("a", "b"):
        write_subject(tmp_path / name, frames=5, labelled={1, 3})
    datalist = load_cine_datalist(tmp_path, views=list(VIEWS), labels=True)
    dataset = labelled_frame_dataset(datalist, VIEWS, samples_per_subject=3, progress=False)
    assert len(dataset) == 6
    for index in range(len(dataset)):
        sample = dataset[index]
        assert sample["sax"].shape == sample["sax_label"].shape == (1, 16, 16, 4)
        assert sample["lax_4c"].shape == sample["lax_4c_label"].shape == (1, 16, 16)
        assert sample["sax_label"].max() > 0 and sample["lax_4c_label"].max() > 0  # windows hold the heart
        assert set(sample["sax_label"].unique().tolist()) <= {0.0, 2.0, 3.0}
        assert all(isinstance(value, torch.Tensor) and value.dtype == torch.float32 for value in sample.values())


def test_dataset_bad_inputs(tmp_path):
    with pytest.raises(DataError, match="the labelled set is empty"):
        labelled_frame_dataset([], VIEWS)
    with pytest.raises(DataError, match=r"datalist items lack \['lax_4c', 'lax_4c_label', 'sax_label'\]"):
        labelled_frame_dataset([{"sax": "x"}], VIEWS)
    write_subject(tmp_path / "a", frames=2)
    label = np.asarray(nib.load(str(tmp_path / "a" / "sax_label.nii.gz")).dataobj).copy()
    label[0, 0, 0, 0] = 9
    write(tmp_path / "a" / "sax_label.nii.gz", label, (1.5, 1.5, 8.0))
    datalist = load_cine_datalist(tmp_path, views=list(VIEWS), labels=True)
    with pytest.raises(RuntimeError) as raised:  # MONAI wraps errors of its transforms; the DataError is the cause
        labelled_frame_dataset(datalist, VIEWS, progress=False)
    cause = raised.value
    while cause is not None and not isinstance(cause, DataError):
        cause = cause.__cause__
    assert cause is not None and "sax_label.nii.gz holds values 9 outside the class ids 0..3" in str(cause)
