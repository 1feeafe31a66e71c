"""Tests for medssl.data.cxr: manifest data lists, reading PNG / DICOM radiographs, the pre-training crop-and-flip
chain, RandAugment and the fine-tuning / evaluation chains."""

from __future__ import annotations

import json
import math

import numpy as np
import pydicom
import pytest
import torch
from monai.transforms import RandScaleCropd, Resize
from PIL import Image

from medssl.data.cxr import (
    CXR_VIEW,
    FILE_KEY,
    LABEL_KEY,
    RAND_AUGMENT_OPS,
    LoadRadiographd,
    RandAugmentd,
    evaluation_transforms,
    finetuning_transforms,
    load_cxr_datalist,
    pretraining_transforms,
    radiograph_folder_files,
    read_radiograph,
)
from medssl.data.cxr_phantom import FINDINGS, ensure_cxr_cohort
from medssl.errors import DataError
from medssl.io.dx_read import read_dx


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Three training and two test radiographs of 48 x 48, with DICOM copies."""
    root = tmp_path_factory.mktemp("cxr")
    ensure_cxr_cohort(root, 3, seed=2, size=48, num_test=2, dicom=True, num_workers=1, progress=False)
    return root


def _ramp(height=40, width=40):
    rows, columns = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return ((rows * width + columns).float() / (height * width - 1))[None]


def test_datalist_reads_each_split_with_labels_and_relative_files(cohort):
    manifest = json.loads((cohort / "manifest.json").read_text())
    training = load_cxr_datalist(cohort, "training", FINDINGS)
    test = load_cxr_datalist(cohort / "manifest.json", "test", FINDINGS)
    assert [item[FILE_KEY] for item in training] == [entry["image"] for entry in manifest["training"]]
    assert [item[LABEL_KEY].tolist() for item in test] == [entry["label"] for entry in manifest["test"]]
    assert all(item[LABEL_KEY].dtype == np.float32 for item in training)
    assert all(item[CXR_VIEW] == str((cohort / item[FILE_KEY]).resolve()) for item in training)
    assert LABEL_KEY not in load_cxr_datalist(cohort, "training", labels=False)[0]


def test_datalist_errors_name_the_problem(cohort, tmp_path):
    with pytest.raises(DataError, match="no chest X-ray manifest"):
        load_cxr_datalist(tmp_path)
    with pytest.raises(DataError, match=r"labels the findings \['cardiomegaly'.*but the bundle expects \['a', 'b'\]"):
        load_cxr_datalist(cohort, "training", ["a", "b"])
    manifest = json.loads((cohort / "manifest.json").read_text())
    manifest["training"][1]["label"] = [1, 0]
    manifest["training"][1]["image"] = str((cohort / manifest["training"][1]["image"]).resolve())
    for entry in manifest["training"][::2]:
        entry["image"] = str((cohort / entry["image"]).resolve())
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "test": []}))
    with pytest.raises(DataError, match=r"item #1 of the 'training' list .* multi-hot list of 5 0/1 values, got \[1, 0\]"):
        load_cxr_datalist(tmp_path, "training", FINDINGS)
    with pytest.raises(DataError, match="the 'test' list of .* is missing or empty"):
        load_cxr_datalist(tmp_path, "test", FINDINGS)


def test_folder_files_are_recursive_and_skip_hidden_and_non_image_files(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.png", "sub/a.dcm", "sub/IM0001", "notes.txt", "meta.json", ".hidden.png"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.relative_to(tmp_path).as_posix() for p in radiograph_folder_files(tmp_path)] == [
        "b.png", "sub/IM0001", "sub/a.dcm"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no PNG, JPEG or DICOM file"):
        radiograph_folder_files(tmp_path / "empty")
    with pytest.raises(DataError, match="does not exist: pass --input_dir"):
        radiograph_folder_files(None)


def test_read_radiograph_scales_png_by_bit_depth_and_refuses_colour_and_tiny_images(tmp_path):
    pixels = np.arange(48 * 40, dtype=np.int64).reshape(48, 40)
    Image.fromarray((pixels % 256).astype(np.uint8)).save(tmp_path / "grey.png")
    np.testing.assert_array_equal(read_radiograph(tmp_path / "grey.png"), (pixels % 256).astype(np.float32) / 255)
    Image.fromarray((pixels * 30).astype(np.uint16)).save(tmp_path / "deep.png")
    np.testing.assert_allclose(read_radiograph(tmp_path / "deep.png"), pixels * 30 / 65535.0, rtol=1e-6)
    grey_rgb = np.repeat((pixels % 256).astype(np.uint8)[..., None], 3, axis=2)
    Image.fromarray(grey_rgb).save(tmp_path / "grey_rgb.png")
    np.testing.assert_array_equal(read_radiograph(tmp_path / "grey_rgb.png"), read_radiograph(tmp_path / "grey.png"))
    grey_rgb[..., 0] = 0
    Image.fromarray(grey_rgb).save(tmp_path / "colour.png")
    with pytest.raises(DataError, match=r"colour\.png: colour or non-greyscale image \(mode RGB\)"):
        read_radiograph(tmp_path / "colour.png")
    with pytest.raises(DataError, match=r"grey\.png: image is 48x40 pixels, smaller than the minimum 49x40"):
        read_radiograph(tmp_path / "grey.png", min_size=(49, 40))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match=r"broken\.png: not a readable image"):
        read_radiograph(tmp_path / "broken.png")


def test_read_radiograph_reads_dicom_through_read_dx_and_checks_the_body_part(cohort, tmp_path):
    path = cohort / "img-00000" / "image.dcm"
    np.testing.assert_array_equal(read_radiograph(path), read_dx(path).image)
    dataset = pydicom.dcmread(path)
    dataset.BodyPartExamined = "KNEE"
    dataset.save_as(tmp_path / "knee.dcm")
    with pytest.raises(DataError, match="knee.dcm: BodyPartExamined is KNEE, expected CHEST"):
        read_radiograph(tmp_path / "knee.dcm")
    assert read_radiograph(tmp_path / "knee.dcm", body_part=None).shape == (48, 48)
    with pytest.raises(DataError, match=r"image\.dcm: image is 48x48 pixels, smaller than the minimum 64x64"):
        read_radiograph(path, min_size=64)


def test_load_transform_gives_a_channel_first_float_tensor(cohort):
    sample = LoadRadiographd(CXR_VIEW)({CXR_VIEW: str(cohort / "img-00001" / "image.png"), "other": 1})
    image = sample[CXR_VIEW]
    assert image.shape == (1, 48, 48) and image.dtype == torch.float32 and sample["other"] == 1
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0


def _saved_ramp(tmp_path, height=40, width=40):
    ramp = np.round(_ramp(height, width)[0].numpy() * 255).astype(np.uint8)
    Image.fromarray(ramp).save(tmp_path / "ramp.png")
    return {CXR_VIEW: str(tmp_path / "ramp.png")}, torch.from_numpy(ramp.astype(np.float32) / 255)[None]


def test_pretraining_crop_covers_half_to_all_of_the_area_and_is_resized(tmp_path):
    chain = pretraining_transforms((16, 16), min_scale=0.5, flip_prob=0.5)
    crop = next(t for t in chain.transforms if isinstance(t, RandScaleCropd))
    crop.set_random_state(seed=0)
    areas = []
    for _ in range(200):
        height, width = crop({CXR_VIEW: torch.zeros(1, 100, 100)})[CXR_VIEW].shape[1:]
        assert 70 <= height <= 100 and 70 <= width <= 100  # sides in [sqrt(0.5), 1] of the image
        areas.append(height * width / 100**2)
    assert min(areas) < 0.55 and max(areas) > 0.95 and all(0.49 <= a <= 1.0 for a in areas)
    sample, _ = _saved_ramp(tmp_path)
    out = chain.set_random_state(seed=3)(sample)[CXR_VIEW]
    assert out.shape == (1, 16, 16) and out.dtype == torch.float32 and not hasattr(out, "meta")
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0


def test_pretraining_chain_without_crop_or_flip_is_a_resize_and_flip_mirrors_it(tmp_path):
    sample, image = _saved_ramp(tmp_path)
    resized = Resize((16, 16), mode="bilinear", anti_aliasing=True)(image)
    plain = pretraining_transforms((16, 16), min_scale=1.0, flip_prob=0.0)(sample)[CXR_VIEW]
    torch.testing.assert_close(plain, torch.as_tensor(resized).as_subclass(torch.Tensor))
    flipped = pretraining_transforms((16, 16), min_scale=1.0, flip_prob=1.0)(sample)[CXR_VIEW]
    torch.testing.assert_close(flipped, plain.flip(-1))
    torch.testing.assert_close(evaluation_transforms((16, 16))(sample)[CXR_VIEW], plain)


def test_pretraining_chain_is_deterministic_per_seed(tmp_path):
    sample, _ = _saved_ramp(tmp_path)

    def draws(seed):
        chain = pretraining_transforms((16, 16)).set_random_state(seed=seed)
        return torch.stack([chain(sample)[CXR_VIEW] for _ in range(4)])

    torch.testing.assert_close(draws(1), draws(1))
    assert not torch.equal(draws(1), draws(2))


@pytest.mark.parametrize("bad", [{"min_scale": 0.0}, {"min_scale": 1.5}, {"flip_prob": 2.0}])
def test_pretraining_chain_rejects_bad_settings(bad):
    with pytest.raises(ValueError, match="need 0 < min_scale <= 1 and 0 <= flip_prob <= 1"):
        pretraining_transforms((16, 16), **bad)


def test_rand_augment_ops_match_their_formulas():
    image = torch.rand(1, 12, 12, generator=torch.Generator().manual_seed(0))
    mean = image.mean()
    apply = RandAugmentd.apply_op
    torch.testing.assert_close(apply(image, "brightness", 0.2), image + 0.2)
    torch.testing.assert_close(apply(image, "intensity_scale", -0.4), image * 0.6)
    torch.testing.assert_close(apply(image, "contrast", 0.5), mean + (image - mean) * 1.5)
    low, high = image.min(), image.max()
    torch.testing.assert_close(apply(image, "gamma", 1.0), ((image - low) / (high - low)) ** 2 * (high - low) + low,
                               atol=1e-5, rtol=1e-5)
    dot = torch.zeros(1, 8, 8)
    dot[0, 3, 3] = 1.0
    assert apply(dot, "translate_x", 0.25)[0].nonzero().tolist() == [[3, 1]]  # 2 of 8 columns
    assert apply(dot, "translate_y", 0.25)[0].nonzero().tolist() == [[1, 3]]
    noisy = apply(torch.zeros(1, 64, 64), "noise", 0.1, seed=4)
    assert abs(float(noisy.std()) - 0.1) < 0.01 and torch.equal(noisy, apply(torch.zeros(1, 64, 64), "noise", 0.1, 4))
    smooth = apply(dot, "smooth", 1.0)
    assert math.isclose(float(smooth.sum()), 1.0, rel_tol=1e-3) and float(smooth.max()) < 0.2
    sharp = apply(dot, "sharpen", 1.0)
    assert float(sharp[0, 3, 3]) > 1.0 and float(sharp.min()) < 0.0  # unsharp mask: overshoot around the edge
    with pytest.raises(ValueError, match="unknown RandAugment operation 'solarize'"):
        apply(image, "solarize", 1.0)
    with pytest.raises(ValueError, match=r"expected a \[C, H, W\] image, got shape \(12, 12\)"):
        apply(image[0], "rotate", 1.0)


@pytest.mark.parametrize("op", RAND_AUGMENT_OPS)
def test_rand_augment_magnitude_zero_is_identity_and_the_effect_grows_with_magnitude(op):
    image = 0.25 + 0.5 * torch.rand(1, 24, 24, generator=torch.Generator().manual_seed(1))
    image = torch.as_tensor(Resize((24, 24))(image)).as_subclass(torch.Tensor)

    def change(magnitude):
        augment = RandAugmentd(CXR_VIEW, num_ops=1, magnitude=magnitude, magnitude_std=0.0, ops=(op,))
        augment.set_random_state(seed=7)
        return float((augment({CXR_VIEW: image})[CXR_VIEW] - image).abs().mean())

    assert change(0) == 0.0
    effects = [change(m) for m in (2, 5, 10)]
    assert 0 < effects[0] < effects[1] < effects[2], effects


def test_rand_augment_is_deterministic_per_seed_keeps_shape_and_range_and_augments_keys_alike():
    image = torch.rand(1, 20, 20, generator=torch.Generator().manual_seed(2))
    sample = {CXR_VIEW: image, "copy": image.clone(), LABEL_KEY: np.ones(5, np.float32)}

    def run(seed):
        augment = RandAugmentd([CXR_VIEW, "copy"], num_ops=3, magnitude=9, magnitude_std=0.5)
        augment.set_random_state(seed=seed)
        return [augment(sample) for _ in range(5)]

    first, again, other = run(0), run(0), run(1)
    for out, repeat in zip(first, again):
        torch.testing.assert_close(out[CXR_VIEW], repeat[CXR_VIEW])
        torch.testing.assert_close(out[CXR_VIEW], out["copy"])
        assert out[CXR_VIEW].shape == (1, 20, 20) and out[CXR_VIEW].dtype == torch.float32
        assert 0.0 <= float(out[CXR_VIEW].min()) and float(out[CXR_VIEW].max()) <= 1.0
        np.testing.assert_array_equal(out[LABEL_KEY], np.ones(5))
    assert any(not torch.equal(a[CXR_VIEW], b[CXR_VIEW]) for a, b in zip(first, other))


def test_rand_augment_draws_num_ops_with_clipped_magnitude_noise():
    augment = RandAugmentd(CXR_VIEW, num_ops=4, magnitude=10, magnitude_std=3.0, ops=("brightness",))
    augment.set_random_state(seed=0)
    strengths = []
    for _ in range(50):
        augment.randomize()
        assert len(augment._draws) == 4
        strengths += [abs(strength) for _, strength, _ in augment._draws]
    assert max(strengths) == pytest.approx(0.3) and min(strengths) < 0.25  # clipped at 10, spread below it


@pytest.mark.parametrize("bad", [{"magnitude": 11}, {"magnitude": -1}, {"num_ops": -1}, {"magnitude_std": -0.1},
                                 {"ops": ()}, {"ops": ("rotate", "posterize")}])
def test_rand_augment_rejects_bad_settings(bad):
    with pytest.raises(ValueError, match="ops must be|need num_ops"):
        RandAugmentd(CXR_VIEW, **bad)


def test_finetuning_chain_at_magnitude_zero_equals_evaluation_and_otherwise_augments(cohort):
    sample = {CXR_VIEW: str(cohort / "img-00002" / "image.png")}
    evaluated = evaluation_transforms((32, 32))(sample)[CXR_VIEW]
    assert evaluated.shape == (1, 32, 32) and evaluated.dtype == torch.float32
    identity = finetuning_transforms((32, 32), magnitude=0, magnitude_std=0.0)(sample)[CXR_VIEW]
    torch.testing.assert_close(identity, evaluated.clamp(0, 1))
    chain = finetuning_transforms((32, 32), num_ops=2, magnitude=6).set_random_state(seed=0)
    outputs = [chain(sample)[CXR_VIEW] for _ in range(3)]
    assert all(o.shape == (1, 32, 32) and 0 <= float(o.min()) and float(o.max()) <= 1 for o in outputs)
    assert all(not torch.equal(o, evaluated) for o in outputs)
    torch.testing.assert_close(finetuning_transforms((32, 32)).set_random_state(seed=0)(sample)[CXR_VIEW], outputs[0])


def test_evaluation_chain_from_an_image_in_memory_matches_loading_it(cohort):
    path = cohort / "img-t00000" / "image.png"
    image = torch.from_numpy(read_radiograph(path))[None]
    torch.testing.assert_close(
        evaluation_transforms((24, 24), load=False)({CXR_VIEW: image})[CXR_VIEW],
        evaluation_transforms((24, 24))({CXR_VIEW: str(path)})[CXR_VIEW],
    )
