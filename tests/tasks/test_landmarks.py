"""Landmark heatmaps: soft-argmax against the formula, the loss, coordinates through the affines, data, prediction."""

import json
import re

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from medssl.engine.checkpoints import save_network_weights
from medssl.errors import DataError
from medssl.methods.cine_mae import CineMAE
from medssl.nets.unetr import UNETRDecoder
from medssl.tasks.landmarks import (
    LANDMARK_NAMES,
    CineLandmarkPredictor,
    LandmarkHeatmapNetwork,
    LandmarkLoss,
    evaluate_landmarks,
    gaussian_heatmaps,
    landmark_figure,
    landmark_frame_transforms,
    landmark_view,
    load_landmarks,
    locate_landmarks_folder,
    patient_to_pixel,
    pixel_to_patient,
    soft_argmax,
)
from medssl.tasks.segmentation import LinearSegmentationHead

NET_VIEWS = {"lax_4c": {"image_size": (16, 16), "patch_size": (8, 8)}}
WIDTH = {"embed_dim": 12, "depth": 2, "num_heads": 2, "feature_size": 2}
WINDOW = 40
VIEW = landmark_view({"lax_4c": {"image_size": [WINDOW, WINDOW], "spacing": [1.5, 1.5]}})
SOURCE_SPACING = (1.87, 1.87, 6.5)


# --- soft-argmax, heatmaps, loss --------------------------------------------------------------------------------


def test_soft_argmax_of_a_delta_is_its_position():
    logits = torch.full((2, 3, 7, 9), -1e4)
    positions = [[(0, 0), (6, 8), (3, 5)], [(2, 1), (5, 0), (0, 8)]]
    for b, row in enumerate(positions):
        for k, (i, j) in enumerate(row):
            logits[b, k, i, j] = 0.0
    coordinates, probabilities = soft_argmax(logits)
    assert torch.equal(coordinates, torch.tensor(positions, dtype=torch.float32))
    torch.testing.assert_close(probabilities.sum(dim=(2, 3)), torch.ones(2, 3))


def test_soft_argmax_of_symmetric_blobs_is_their_centre_in_2d_and_3d():
    i, j, k = torch.meshgrid(torch.arange(12.0), torch.arange(9.0), torch.arange(6.0), indexing="ij")
    # Centres on pixels and between them, each the middle of its axis: the grid is symmetric about them too.
    blob = -((i - 5.5) ** 2 / 2 + (j - 4.0) ** 2 / 3 + (k - 2.5) ** 2)
    coordinates, _ = soft_argmax(blob[None, None])
    torch.testing.assert_close(coordinates, torch.tensor([[[5.5, 4.0, 2.5]]]), atol=1e-4, rtol=0)
    flat = -((i[..., 0] - 5.5).abs() + (j[..., 0] - 4.0).abs())  # a pyramid, not a Gaussian
    torch.testing.assert_close(soft_argmax(flat[None, None], temperature=0.3)[0], torch.tensor([[[5.5, 4.0]]]),
                               atol=1e-4, rtol=0)


def test_soft_argmax_matches_the_expectation_formula():
    logits = torch.randn(2, 3, 5, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    coordinates, probabilities = soft_argmax(logits, temperature=0.5)
    weights = np.exp(2.0 * logits.numpy())
    weights /= weights.sum(axis=(2, 3), keepdims=True)
    rows, columns = np.meshgrid(np.arange(5), np.arange(4), indexing="ij")
    expected = np.stack([(weights * rows).sum(axis=(2, 3)), (weights * columns).sum(axis=(2, 3))], axis=-1)
    np.testing.assert_allclose(coordinates.numpy(), expected, rtol=0, atol=1e-12)
    np.testing.assert_allclose(probabilities.numpy(), weights, rtol=0, atol=1e-12)


def test_soft_argmax_rejects_bad_inputs():
    with pytest.raises(ValueError, match=r"logits must be \[B, K, \*spatial\].*got \(2, 3\)"):
        soft_argmax(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="temperature must be a positive number, got 0"):
        soft_argmax(torch.zeros(1, 1, 4, 4), temperature=0)


def test_gaussian_heatmaps_follow_the_density_formula():
    centre = torch.tensor([[[3.25, 5.0]]])
    heatmap = gaussian_heatmaps(centre, (8, 11), sigma=(1.5, 2.0))[0, 0].numpy()
    rows, columns = np.meshgrid(np.arange(8), np.arange(11), indexing="ij")
    expected = np.exp(-((rows - 3.25) ** 2) / (2 * 1.5**2) - (columns - 5.0) ** 2 / (2 * 2.0**2))
    np.testing.assert_allclose(heatmap, expected / expected.sum(), rtol=1e-5, atol=1e-9)
    with pytest.raises(ValueError, match=r"points must be \[B, K, 2\] for a 2-D grid, got \(1, 3\)"):
        gaussian_heatmaps(torch.zeros(1, 3), (8, 8), 2.0)
    with pytest.raises(ValueError, match="sigma must be positive"):
        gaussian_heatmaps(centre, (8, 8), 0.0)


def test_loss_is_the_coordinate_l1_in_mm_plus_the_kl_to_the_gaussian():
    target = torch.tensor([[[10.0, 12.0], [20.0, 8.0]]])
    spacing = (1.5, 2.0)
    # Logits that are the log of the Gaussian target: soft-argmax at the target (to its discrete symmetry), KL 0.
    perfect = torch.log(gaussian_heatmaps(target, (32, 24), (3.0 / 1.5, 3.0 / 2.0)))
    assert LandmarkLoss(spacing=spacing)(perfect, target).item() == pytest.approx(0.0, abs=1e-3)

    logits = torch.randn(1, 2, 32, 24, generator=torch.Generator().manual_seed(1))
    coordinates, probabilities = soft_argmax(logits)
    l1 = ((coordinates - target).abs() * torch.tensor(spacing)).sum(-1).mean()
    assert LandmarkLoss(spacing=spacing, heatmap_weight=0.0)(logits, target).item() == pytest.approx(l1.item())
    goal = gaussian_heatmaps(target, (32, 24), (2.0, 1.5))
    kl = (goal * (goal.log() - probabilities.log())).sum(dim=(2, 3)).mean()
    both = LandmarkLoss(spacing=spacing, heatmap_weight=0.5)(logits, target).item()
    assert both == pytest.approx(l1.item() + 0.5 * kl.item(), rel=1e-5)


def test_loss_gradient_moves_the_prediction_towards_the_target():
    logits = torch.zeros(1, 1, 16, 16, requires_grad=True)
    target = torch.tensor([[[12.0, 3.0]]])
    LandmarkLoss()(logits, target).backward()
    moved = soft_argmax(logits.detach() - 5.0 * logits.grad)[0]
    assert torch.linalg.norm(moved - target) < torch.linalg.norm(soft_argmax(logits.detach())[0] - target)


def test_loss_rejects_mismatching_targets_and_settings():
    with pytest.raises(ValueError, match=r"target must be \[B, K, 2\] = \[2, 3, 2\] for logits \(2, 3, 8, 8\), got "
                                         r"\(2, 2, 2\)"):
        LandmarkLoss()(torch.zeros(2, 3, 8, 8), torch.zeros(2, 2, 2))
    with pytest.raises(ValueError, match="sigma_mm and temperature must be > 0 and heatmap_weight >= 0"):
        LandmarkLoss(heatmap_weight=-1.0)
    with pytest.raises(ValueError, match=r"spacing must be positive mm, got \[1\.5, 0\.0\]"):
        LandmarkLoss(spacing=[1.5, 0.0])


# --- network ----------------------------------------------------------------------------------------------------


def test_network_predicts_one_heatmap_per_landmark_on_the_segmenter_decoder():
    net = LandmarkHeatmapNetwork(NET_VIEWS, **WIDTH)
    assert net(torch.randn(2, 1, 16, 16)).shape == (2, 3, 16, 16)
    assert isinstance(net.decoders["lax_4c"], UNETRDecoder)
    assert {name.split(".")[0] for name, _ in net.named_parameters()} == {"encoder", "decoders"}
    probe = LandmarkHeatmapNetwork(NET_VIEWS, num_landmarks=2, finetune_mode="linear_probe", **WIDTH)
    assert isinstance(probe.decoders["lax_4c"], LinearSegmentationHead)
    assert probe(torch.randn(1, 1, 16, 16)).shape == (1, 2, 16, 16)
    with pytest.raises(ValueError, match=r"located on the 'lax_4c' view alone, got views \['sax'\]"):
        LandmarkHeatmapNetwork({"sax": {"image_size": (16, 16, 4), "patch_size": (8, 8, 1)}}, **WIDTH)
    with pytest.raises(ValueError, match="num_landmarks must be >= 1, got 0"):
        LandmarkHeatmapNetwork(NET_VIEWS, num_landmarks=0, **WIDTH)


def test_network_starts_from_a_cine_mae_encoder(tmp_path):
    torch.manual_seed(0)
    views = {"sax": {"image_size": (16, 16, 4), "patch_size": (8, 8, 1)}, **NET_VIEWS}
    mae = CineMAE(views=views, embed_dim=12, depth=2, num_heads=2, decoder_dim=8, decoder_depth=1,
                  decoder_num_heads=2)
    path = save_network_weights(mae, tmp_path / "model.safetensors")
    net = LandmarkHeatmapNetwork(NET_VIEWS, **WIDTH).load_pretrained(path)
    torch.testing.assert_close(net.encoder.vit.blocks[1].mlp.fc1.weight, mae.encoder.vit.blocks[1].mlp.fc1.weight)


# --- coordinates through the affines ----------------------------------------------------------------------------


def oblique_affine(spacing, origin=(-30.0, 12.0, 40.0)):
    """A LAX-like plane: rotated about an axis that is not a coordinate axis, so every voxel axis is oblique."""
    axis = np.array([1.0, 2.0, 2.0]) / 3.0
    angle = 0.7
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    rotation = np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(spacing)
    affine[:3, 3] = origin
    return affine


def test_pixel_and_patient_coordinates_round_trip_through_the_affine():
    affine = oblique_affine(SOURCE_SPACING)
    pixel = np.array([[[3.25, 7.5], [0.0, 0.0]], [[40.0, 1.125], [12.5, 30.0]]])
    mm = pixel_to_patient(pixel, affine)
    np.testing.assert_allclose(mm[0, 0], affine[:3, 0] * 3.25 + affine[:3, 1] * 7.5 + affine[:3, 3], atol=1e-12)
    np.testing.assert_allclose(patient_to_pixel(mm, affine), pixel, atol=1e-12)
    normal = affine[:3, 2] / np.linalg.norm(affine[:3, 2])
    with pytest.raises(DataError, match=r"landmarks lie up to 2\.0 mm off the slice plane of case\.nii .* is it the "
                                        r"lax_4c view\?"):
        patient_to_pixel(mm + 2.0 * normal, affine, source="case.nii")
    with pytest.raises(ValueError, match=r"pixel coordinates must be \[\.\.\., 2\], got shape \(4, 3\)"):
        pixel_to_patient(np.zeros((4, 3)), affine)


def blob_cine(shape, centres, affine, sigma=2.5):
    """A LAX cine ``[H, W, 1, T]`` with one bright Gaussian blob per landmark and frame, at ``centres [T, K, 2]``."""
    rows, columns = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    frames = []
    for points in centres:
        frame = sum(np.exp(-((rows - i) ** 2 + (columns - j) ** 2) / (2 * sigma**2)) for i, j in points)
        frame = 100.0 + 2000.0 * frame
        # A bright first row, outside every window: the 99.5th-percentile clip of the pre-processing then spares the
        # blobs' peaks (a clipped peak is a plateau of whole pixels, whose centre is quantised).
        frame[0] = 5000.0
        frames.append(frame)
    return np.stack(frames, axis=-1)[:, :, None, :].astype(np.float32), affine


def write_subject(folder, image, affine, centres, **extra):
    folder.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image, affine), str(folder / "lax_4c.nii.gz"))
    landmarks = {"names": list(LANDMARK_NAMES), "pixel": np.asarray(centres).tolist(),
                 "patient_mm": pixel_to_patient(centres, affine).tolist()}
    metadata = {"ed_frame": 0, "es_frame": 1, "landmarks_lax_4c": landmarks, **extra}
    (folder / "metadata.json").write_text(json.dumps(metadata))
    return folder


# Three landmarks that move over three frames, at fractional pixel positions.
CENTRES = np.array([
    [[14.3, 20.6], [25.2, 26.1], [30.7, 12.4]],
    [[15.1, 19.2], [24.6, 24.9], [30.7, 12.4]],
    [[15.8, 18.4], [24.1, 23.7], [30.7, 12.4]],
])


def local_centroid(image, point, radius=5):
    """Intensity-weighted centroid of ``image [H, W]`` (background removed) in a disc around ``point``."""
    rows, columns = np.meshgrid(np.arange(image.shape[0]), np.arange(image.shape[1]), indexing="ij")
    weight = np.clip(image - np.median(image), 0, None) * ((rows - point[0]) ** 2 + (columns - point[1]) ** 2
                                                             <= radius**2)
    return np.array([(weight * rows).sum(), (weight * columns).sum()]) / weight.sum()


@pytest.mark.parametrize("max_shift_mm", [0.0, 6.0])
def test_training_windows_and_targets_move_together(tmp_path, max_shift_mm):
    """Resampling (1.87 -> 1.5 mm), padding and a random shift move the blobs and the targets alike."""
    image, affine = blob_cine((44, 38), CENTRES, oblique_affine(SOURCE_SPACING))
    subject = write_subject(tmp_path / "s", image, affine, CENTRES)
    transforms = landmark_frame_transforms(VIEW, max_shift_mm=max_shift_mm, augment=False)
    transforms.set_random_state(seed=3)
    for _ in range(4):
        sample = transforms({"lax_4c": str(subject / "lax_4c.nii.gz"), "metadata": str(subject / "metadata.json")})
        window, targets = sample["lax_4c"], sample["lax_4c_landmarks"]
        assert window.shape == (1, WINDOW, WINDOW) and targets.shape == (3, 2) and targets.dtype == torch.float32
        for point in targets.numpy():
            # To interpolation accuracy (bilinear resampling of the blobs); a half-pixel slip would be 0.5.
            np.testing.assert_allclose(local_centroid(window[0].numpy(), point), point, atol=0.1)


class BlobOracle(nn.Module):
    """Stands in for a trained network: every heatmap is the (scaled) image, so soft-argmax finds its one blob."""

    def __init__(self, num_landmarks=3):
        super().__init__()
        self.num_landmarks = num_landmarks
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the predictor a device to read

    def forward(self, image, view=None):
        return 40.0 * image.expand(-1, self.num_landmarks, -1, -1) + self.anchor


def one_blob_subject(folder, spacing=SOURCE_SPACING, shape=(44, 38)):
    """A subject whose three landmarks sit on the one blob of each frame (the oracle's prediction)."""
    centres = np.repeat(CENTRES[:, :1], 3, axis=1)
    image, affine = blob_cine(shape, centres[:, :1], oblique_affine(spacing), sigma=3.0)
    return write_subject(folder, image, affine, centres), centres, affine


def test_prediction_returns_to_the_file_grid_and_patient_mm(tmp_path):
    subject, centres, affine = one_blob_subject(tmp_path / "s")
    predictor = CineLandmarkPredictor(BlobOracle(), VIEW, batch_size=2)
    cine = predictor.load(subject / "lax_4c.nii.gz")
    result = predictor.predict(cine, [2, 0])
    assert result["pixel"].shape == (2, 3, 2) and result["patient_mm"].shape == (2, 3, 3)
    np.testing.assert_allclose(result["pixel"], centres[[2, 0]], atol=0.05)
    np.testing.assert_allclose(result["patient_mm"], pixel_to_patient(result["pixel"], affine), atol=1e-9)
    with pytest.raises(ValueError, match=r"frames \[3\] out of range for a cine of 3 frames"):
        predictor.predict(cine, [3])


def test_evaluation_scores_ed_and_es_in_mm(tmp_path):
    subject, _, _ = one_blob_subject(tmp_path / "sub-0000")
    other, _, _ = one_blob_subject(tmp_path / "sub-0001", spacing=(1.3, 1.3, 8.0), shape=(52, 50))
    datalist = [{"lax_4c": str(folder / "lax_4c.nii.gz"), "metadata": str(folder / "metadata.json")}
                for folder in (subject, other)]
    predictor = CineLandmarkPredictor(BlobOracle(), VIEW)
    rows = evaluate_landmarks(predictor, datalist)
    assert [(row["subject"], row["phase"], row["frame"]) for row in rows] == [
        (0, "ED", 0), (0, "ES", 1), (1, "ED", 0), (1, "ES", 1)]
    for row in rows:
        assert row["mean_error_mm"] < 0.1 and row["within_5mm_pct"] == 100.0
        assert row["mean_error_mm"] == pytest.approx(np.mean([row[f"error_mm_{n}"] for n in LANDMARK_NAMES]))
    assert [row["frame"] for row in evaluate_landmarks(predictor, datalist[:1], frames="all")] == [0, 1, 2]

    # Against shifted truth: the error is the shift's length in mm (the predicted blob stays put).
    metadata = json.loads((tmp_path / "sub-0000" / "metadata.json").read_text())
    metadata["landmarks_lax_4c"]["pixel"] = (np.asarray(metadata["landmarks_lax_4c"]["pixel"]) + [3.0, 4.0]).tolist()
    del metadata["landmarks_lax_4c"]["patient_mm"]
    (tmp_path / "sub-0000" / "metadata.json").write_text(json.dumps(metadata))
    shifted = evaluate_landmarks(predictor, datalist[:1])
    assert shifted[0]["mean_error_mm"] == pytest.approx(5.0 * SOURCE_SPACING[0], abs=0.1)
    assert shifted[0]["within_5mm_pct"] == 0.0

    figure = landmark_figure(predictor, datalist, tmp_path / "figure.png", max_subjects=1)
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="frames must be 'ed_es' or 'all', got 'es'"):
        evaluate_landmarks(predictor, datalist, frames="es")
    with pytest.raises(DataError, match="the evaluation data list is empty"):
        evaluate_landmarks(predictor, [])


def test_landmarks_are_read_and_checked(tmp_path):
    subject, centres, _ = one_blob_subject(tmp_path / "s")
    landmarks = load_landmarks(subject / "metadata.json", num_frames=3)
    np.testing.assert_array_equal(landmarks["pixel"], centres)
    assert landmarks["ed_frame"] == 0 and landmarks["es_frame"] == 1
    metadata = json.loads((subject / "metadata.json").read_text())

    def broken(change, name):
        path = tmp_path / f"{name}.json"
        document = json.loads(json.dumps(metadata))
        change(document)
        path.write_text(json.dumps(document))
        return path

    with pytest.raises(DataError, match=r"has no 'landmarks_lax_4c' with 'pixel' coordinates \[T\]\[K\]\[2\]"):
        load_landmarks(broken(lambda d: d.pop("landmarks_lax_4c"), "none"))
    with pytest.raises(DataError, match=r"'landmarks_lax_4c\.pixel' must be \[T, 3, 2\] with T = 3 frames, got shape "
                                        r"\(3, 2, 2\)"):
        load_landmarks(broken(lambda d: d["landmarks_lax_4c"].update(pixel=centres[:, :2].tolist()), "two"), 3)
    with pytest.raises(DataError, match=r"must be \[T, 3, 2\] with T = 4 frames, got shape \(3, 3, 2\)"):
        load_landmarks(subject / "metadata.json", num_frames=4)
    with pytest.raises(DataError, match=r"annotates landmarks \['apex', 'a', 'b'\], expected \['mitral_hinge_septal'"):
        load_landmarks(broken(lambda d: d["landmarks_lax_4c"].update(names=["apex", "a", "b"]), "names"))
    with pytest.raises(DataError, match=r"es_frame 7 is not a frame index in 0\.\.2"):
        load_landmarks(broken(lambda d: d.update(es_frame=7), "es"))
    with pytest.raises(DataError, match="cannot read subject metadata"):
        load_landmarks(tmp_path / "absent.json")


def test_landmarks_of_another_view_are_refused(tmp_path):
    """A LAX-2C (or any other) image in place of the LAX-4C: its affine does not carry the landmarks."""
    subject, _, _ = one_blob_subject(tmp_path / "s")
    image = nib.load(str(subject / "lax_4c.nii.gz"))
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), oblique_affine((1.5, 1.5, 6.0), (0.0, 0.0, 0.0))),
             str(subject / "lax_4c.nii.gz"))
    transforms = landmark_frame_transforms(VIEW, augment=False)
    with pytest.raises(RuntimeError) as raised:  # MONAI wraps errors raised inside a transform
        transforms({"lax_4c": str(subject / "lax_4c.nii.gz"), "metadata": str(subject / "metadata.json")})
    assert isinstance(raised.value.__cause__, DataError)
    assert re.search(r"pixel coordinates land up to \d+\.\d mm from their patient_mm through the affine of "
                     r"\S+lax_4c\.nii\.gz.*is it the lax_4c view\?", str(raised.value.__cause__))


def test_folder_inference_writes_json_and_csv_per_file(tmp_path):
    subject, centres, affine = one_blob_subject(tmp_path / "s")
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "case.nii.gz").write_bytes((subject / "lax_4c.nii.gz").read_bytes())
    predictor = CineLandmarkPredictor(BlobOracle(), VIEW)
    written = locate_landmarks_folder(predictor, inputs, tmp_path / "out")
    assert [path.name for path in written] == ["case_landmarks.json", "case_landmarks.csv"]
    # The JSON has the phantom's landmark layout, so the landmark reader takes it back.
    landmarks = load_landmarks(written[0], num_frames=3)
    np.testing.assert_allclose(landmarks["pixel"], centres, atol=0.05)
    np.testing.assert_allclose(landmarks["patient_mm"], pixel_to_patient(landmarks["pixel"], affine), atol=1e-3)
    table = pd.read_csv(written[1])
    assert list(table.columns) == ["frame", "landmark", "i", "j", "x_mm", "y_mm", "z_mm"]
    assert len(table) == 9 and list(table["landmark"][:3]) == list(LANDMARK_NAMES)
    np.testing.assert_allclose(table[["i", "j"]].to_numpy().reshape(3, 3, 2), landmarks["pixel"], atol=1e-3)

    with pytest.raises(DataError, match="no input folder given"):
        locate_landmarks_folder(predictor, None, tmp_path / "out")
    with pytest.raises(DataError, match=r"no NIfTI files \(\*\.nii, \*\.nii\.gz\) in"):
        locate_landmarks_folder(predictor, tmp_path / "out", tmp_path / "out2")
    sax = tmp_path / "sax"
    sax.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4, 2), np.float32), np.eye(4)), str(sax / "stack.nii.gz"))
    with pytest.raises(DataError, match=r"stack\.nii\.gz: expected a lax_4c image \[H, W\], \[H, W, 1\] or "
                                        r"\[H, W, 1, T\], got shape \(8, 8, 4, 2\)"):
        locate_landmarks_folder(predictor, sax, tmp_path / "out3")
