"""ED/ES two-channel SAX images: metadata, folders, ES estimate, heart centring, windows, the cached pipeline."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, EnsureChannelFirst, LoadImage

from medssl.data.cine import load_cine_datalist
from medssl.data.cine_labelled import SegmentationView, cine_preprocessing
from medssl.data.cine_phases import (
    CinePhasesd,
    cine_phase_datalist,
    cine_phase_dataset,
    farthest_frame,
    motion_centre,
    nifti_folder_datalist,
    read_subject_metadata,
)
from medssl.data.phantom import ensure_cohort
from medssl.errors import DataError

VIEW = SegmentationView("sax", [32, 32, 4], [6.0, 6.0, 20.0], [8, 8, 1])


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return ensure_cohort(tmp_path_factory.mktemp("cohort"), 2, seed=0, num_frames=4, progress=False).parent


@pytest.fixture(scope="module")
def datalist(cohort):
    return load_cine_datalist(cohort, ["sax"], metadata=True)


def metadata_of(cohort, subject):
    return json.loads((cohort / f"sub-{subject:04d}" / "metadata.json").read_text())


def test_read_subject_metadata_names_missing_keys_and_unreadable_files(tmp_path):
    path = tmp_path / "metadata.json"
    path.write_text(json.dumps({"ed_frame": 0, "es_frame": None, "group": "NOR"}))
    assert read_subject_metadata(path, ["ed_frame", "group"]) == {"ed_frame": 0, "group": "NOR"}
    with pytest.raises(DataError, match=r"metadata\.json has no es_frame, lv_ef_pct"):
        read_subject_metadata(path, ["ed_frame", "es_frame", "lv_ef_pct"])
    path.write_text("{not json")
    with pytest.raises(DataError, match="cannot read subject metadata"):
        read_subject_metadata(path, ["ed_frame"])


def test_cine_phase_datalist_reads_frames_and_fields_from_metadata(cohort, datalist):
    items = cine_phase_datalist(datalist, ("group", "lv_ef_pct"))
    for subject, item in enumerate(items):
        metadata = metadata_of(cohort, subject)
        assert item == {"sax": datalist[subject]["sax"], "ed_frame": metadata["ed_frame"],
                        "es_frame": metadata["es_frame"], "group": metadata["group"],
                        "lv_ef_pct": metadata["lv_ef_pct"]}
    assert items[0]["ed_frame"] == 0 < items[0]["es_frame"] < 4


def test_cine_phase_datalist_errors(datalist, tmp_path):
    with pytest.raises(DataError, match="data list is empty"):
        cine_phase_datalist([])
    with pytest.raises(DataError, match=r"subject #1 has no metadata: list the data with .*metadata=True"):
        cine_phase_datalist([datalist[0], {"sax": datalist[1]["sax"]}])
    broken = tmp_path / "metadata.json"
    broken.write_text(json.dumps({"ed_frame": 0, "es_frame": 1.5}))
    with pytest.raises(DataError, match=r"ed_frame and es_frame must be integers, got \[0, 1\.5\]"):
        cine_phase_datalist([{"sax": datalist[0]["sax"], "metadata": str(broken)}])


def test_nifti_folder_datalist(tmp_path):
    with pytest.raises(DataError, match="no input folder given"):
        nifti_folder_datalist(None)
    with pytest.raises(DataError, match="does not exist"):
        nifti_folder_datalist(tmp_path / "absent")
    (tmp_path / "notes.txt").write_text("")
    with pytest.raises(DataError, match=r"no NIfTI files \(\*\.nii, \*\.nii\.gz\)"):
        nifti_folder_datalist(tmp_path)
    for name in ("b.nii.gz", "a.nii"):
        (tmp_path / name).write_bytes(b"")
    assert nifti_folder_datalist(tmp_path, es_frame=3) == [
        {"sax": str(tmp_path / "a.nii"), "ed_frame": 0, "es_frame": 3, "file": "a.nii"},
        {"sax": str(tmp_path / "b.nii.gz"), "ed_frame": 0, "es_frame": 3, "file": "b.nii.gz"},
    ]


def pulsing_cine(centre=(5, 12), frames=6, size=(16, 20, 3)):
    """A bright disc whose radius follows a cycle (largest at frame 0, smallest at frame 2) on a static background."""
    cine = torch.zeros(frames, *size)
    cine[:, :, :4] = 0.3  # static structure: no temporal variation
    ii, jj = torch.meshgrid(torch.arange(size[0]), torch.arange(size[1]), indexing="ij")
    distance = ((ii - centre[0]) ** 2 + (jj - centre[1]) ** 2).float().sqrt()
    for t, radius in enumerate([4.0, 3.0, 1.5, 2.5, 3.5, 4.0][:frames]):
        cine[t] += (distance <= radius).float()[..., None]
    return cine


def test_farthest_frame_is_the_smallest_ventricle():
    cine = pulsing_cine()
    assert farthest_frame(cine, 0) == 2
    difference = [(cine[t] - cine[0]).pow(2).mean().item() for t in range(6)]
    assert farthest_frame(cine, 0) == int(np.argmax(difference))
    assert farthest_frame(cine[:1], 0) == 0
    with pytest.raises(DataError, match=r"reference frame 6 is outside 0\.\.5"):
        farthest_frame(cine, 6)


def test_farthest_frame_finds_the_phantoms_es(cohort, datalist):
    for subject, item in enumerate(datalist):
        cine = EnsureChannelFirst(channel_dim=-1)(LoadImage(image_only=True)(item["sax"]))
        assert farthest_frame(cine, 0) == metadata_of(cohort, subject)["es_frame"]


def test_motion_centre():
    centre = motion_centre(pulsing_cine(centre=(5, 12)))
    assert centre[:2] == pytest.approx([5.0, 12.0], abs=0.01)  # a symmetric disc: its centre exactly
    assert centre[2] == 1.0  # middle of 3 slices
    assert motion_centre(torch.ones(3, 8, 10, 4)) == [3.5, 4.5, 1.5]  # nothing moves: the image centre
    with pytest.raises(ValueError, match=r"cine must be \[T, H, W, S\], got shape \(3, 8, 10\)"):
        motion_centre(torch.ones(3, 8, 10))


def test_cine_phasesd_cuts_ed_and_es_windows_around_the_heart_or_the_image_centre():
    cine = torch.rand(1, 16, 20, 3) * 0.1 + pulsing_cine(centre=(5, 12))  # a static texture does not move
    heart = CinePhasesd("image", spatial_size=(6, 6, 3))({"image": cine, "ed_frame": 0, "es_frame": None})
    assert heart["image"].shape == (2, 6, 6, 3) and heart["es_frame"] == 2 and heart["ed_frame"] == 0
    torch.testing.assert_close(heart["image"], cine[[0, 2], 3:9, 10:16])  # centre (5, 12), halves round up
    middle = CinePhasesd("image", spatial_size=(4, 4, 3), centre="image")({"image": cine, "ed_frame": 1, "es_frame": 4})
    torch.testing.assert_close(middle["image"], cine[[1, 4], 6:10, 8:12])
    # A window larger than the image is zero-padded around it.
    padded = CinePhasesd("image", (20, 20, 5), centre="image")({"image": cine, "ed_frame": 0, "es_frame": 2})
    assert padded["image"].shape == (2, 20, 20, 5)
    torch.testing.assert_close(padded["image"][:, 2:18, :, 1:4], cine[[0, 2]])
    assert padded["image"][:, :2].abs().sum() == 0 and padded["image"][..., 0].abs().sum() == 0


def test_cine_phasesd_errors():
    cine = torch.zeros(4, 8, 8, 2)
    with pytest.raises(DataError, match=r"ED frame 0 / ES frame 4 outside the cine of 4 frames \(shape \(4, 8, 8, 2\)"):
        CinePhasesd("image", spatial_size=(4, 4, 2))({"image": cine, "ed_frame": 0, "es_frame": 4})
    with pytest.raises(ValueError, match="centre must be one of"):
        CinePhasesd("image", spatial_size=(4, 4, 2), centre="apex")
    with pytest.raises(ValueError, match=r"spatial_size must be three positive sizes"):
        CinePhasesd("image", spatial_size=(4, 4))


def test_dataset_is_the_segmentation_preprocessing_then_the_ed_es_window(cohort, datalist):
    items = cine_phase_datalist(datalist, ("group",))
    dataset = cine_phase_dataset(items, VIEW, progress=False)
    sample = dataset[1]
    assert sample["sax"].shape == (2, 32, 32, 4) and sample["sax"].dtype == torch.float32
    assert sample["group"] == metadata_of(cohort, 1)["group"]
    # Reference: the segmentation's pre-processing of the whole cine, then the two frames around the moving part.
    image = LoadImage(image_only=True, dtype=np.float32)(items[1]["sax"])
    cine = MetaTensor(image.as_tensor().permute(3, 0, 1, 2), affine=image.affine)
    resampled = Compose(cine_preprocessing(VIEW, "sax"))({"sax": cine})["sax"]
    expected = CinePhasesd("sax", VIEW.image_size)({"sax": resampled, "ed_frame": 0, "es_frame": items[1]["es_frame"]})
    torch.testing.assert_close(sample["sax"], torch.as_tensor(expected["sax"]).float())
    assert 0.0 <= sample["sax"].min() and sample["sax"].max() <= 1.0

    augmented = cine_phase_dataset(items, VIEW, augment=True, samples_per_subject=3, progress=False)
    assert len(augmented) == 6
    draws = [augmented[1]["sax"] for _ in range(2)]
    assert draws[0].shape == (2, 32, 32, 4) and not torch.equal(draws[0], draws[1])


def test_dataset_errors(datalist):
    with pytest.raises(DataError, match="data list is empty"):
        cine_phase_dataset([], VIEW)
    with pytest.raises(DataError, match=r"data list items lack \['ed_frame'\]"):
        cine_phase_dataset([{"sax": datalist[0]["sax"]}], VIEW)
    with pytest.raises(ValueError, match="samples_per_subject must be >= 1"):
        cine_phase_dataset(cine_phase_datalist(datalist), VIEW, samples_per_subject=0)


def test_a_cine_with_too_few_frames_gets_a_clear_error(tmp_path, datalist):
    source = nib.load(datalist[0]["sax"])
    path = tmp_path / "short.nii.gz"
    nib.save(nib.Nifti1Image(np.asarray(source.dataobj)[..., :2], source.affine), str(path))
    items = [{"sax": str(path), "ed_frame": 0, "es_frame": 3}]
    with pytest.raises(RuntimeError) as raised:  # MONAI wraps errors raised inside transforms; the bundles unwrap them
        cine_phase_dataset(items, VIEW, progress=False)
    assert isinstance(raised.value.__cause__, DataError)
    assert "ED frame 0 / ES frame 3 outside the cine of 2 frames" in str(raised.value.__cause__)
