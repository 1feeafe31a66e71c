"""Segmentation network, whole-image prediction back on the input grid, metrics against scipy, evaluation, NIfTI out."""

import math

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scipy import ndimage
from torch import nn

from medssl.data.cine_labelled import parse_segmentation_views
from medssl.engine.checkpoints import save_network_weights
from medssl.errors import CheckpointError, DataError
from medssl.methods.cine_mae import CineMAE
from medssl.nets.patch_embed import ViewSpec
from medssl.nets.unetr import UNETRDecoder
from medssl.tasks.segmentation import (
    CineSegmentationPredictor,
    LinearSegmentationHead,
    ViTSegmenter,
    ed_es_frames,
    evaluate_segmentation,
    exclude_unenclosed_lv_slices,
    keep_largest_components,
    load_segmentation_predictor,
    segment_folder,
    segmentation_metrics,
)

NET_VIEWS = {"sax": {"image_size": (16, 16, 4), "patch_size": (8, 8, 1)}, "lax_4c": {"image_size": (16, 16),
                                                                                     "patch_size": (8, 8)}}
WIDTH = {"embed_dim": 12, "depth": 2, "num_heads": 2, "feature_size": 2}
SPACING = 1.5
GEOMETRY = parse_segmentation_views({
    "sax": {"image_size": [16, 16, 4], "spacing": [SPACING, SPACING, None]},
    "lax_4c": {"image_size": [16, 16], "spacing": [SPACING, SPACING]},
})


class IntensityOracle(nn.Module):
    """Stands in for a trained network: class ``k`` wherever the (scaled) intensity is closest to ``k / 3``."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the predictor a device to read

    def forward(self, image, view=None):
        return torch.cat([-((3 * image - k) ** 2) * 20 for k in range(4)], dim=1) + self.anchor


def test_segmenter_shapes_names_and_default_view():
    net = ViTSegmenter(NET_VIEWS, **WIDTH)
    assert net(torch.randn(2, 1, 16, 16, 4), "sax").shape == (2, 4, 16, 16, 4)
    assert net(torch.randn(2, 1, 16, 16), "lax_4c").shape == (2, 4, 16, 16)
    assert net(torch.randn(1, 1, 16, 16, 4)).shape == (1, 4, 16, 16, 4)  # the first view, for MONAI's tools
    assert isinstance(net.decoders["sax"], UNETRDecoder) and net.layers == {"sax": [0, 0], "lax_4c": [0, 0]}
    assert {name.split(".")[0] for name, _ in net.named_parameters()} == {"encoder", "decoders"}
    with pytest.raises(ValueError, match=r"unknown view 'lax_2c'; this network segments \['sax', 'lax_4c'\]"):
        net(torch.randn(1, 1, 16, 16), "lax_2c")


def test_segmenter_starts_from_a_cine_mae_encoder(tmp_path):
    torch.manual_seed(0)
    mae = CineMAE(views={"sax": {"image_size": (32, 32, 4), "patch_size": (8, 8, 1)}}, embed_dim=12, depth=2,
                  num_heads=2, decoder_dim=8, decoder_depth=1, decoder_num_heads=2)
    path = save_network_weights(mae, tmp_path / "model.safetensors")
    net = ViTSegmenter({"sax": NET_VIEWS["sax"]}, **WIDTH).load_pretrained(path)
    torch.testing.assert_close(net.encoder.patch_embed["sax"].proj.weight, mae.encoder.patch_embed["sax"].proj.weight)


def test_linear_probe_has_a_linear_head_on_a_frozen_encoder():
    net = ViTSegmenter(NET_VIEWS, finetune_mode="linear_probe", **WIDTH)
    assert isinstance(net.decoders["sax"], LinearSegmentationHead)
    trainable = {name for name, p in net.named_parameters() if p.requires_grad}
    assert trainable == {f"decoders.{view}.proj.{part}" for view in NET_VIEWS for part in ("weight", "bias")}
    assert net(torch.randn(2, 1, 16, 16), "lax_4c").shape == (2, 4, 16, 16)


def test_linear_head_puts_each_tokens_logits_on_its_own_patch():
    torch.manual_seed(0)
    head = LinearSegmentationHead(ViewSpec((16, 24), (8, 8)), embed_dim=5, num_classes=3)
    tokens = torch.randn(2, 6, 5)
    out = head(tokens)
    assert out.shape == (2, 3, 16, 24)
    token = 1 * 3 + 2  # grid row 1, column 2
    expected = head.proj(tokens[:, token]).view(2, 8, 8, 3).permute(0, 3, 1, 2)  # patch pixels (y, x), class last
    torch.testing.assert_close(out[:, :, 8:16, 16:24], expected)


def surface_distance_hd95(a, b, spacing):
    """Independent HD95: distances between the boundary voxels of two masks with scipy's exact EDT."""
    edge_a, edge_b = a ^ ndimage.binary_erosion(a), b ^ ndimage.binary_erosion(b)
    to_b = ndimage.distance_transform_edt(~edge_b, sampling=spacing)[edge_a]
    to_a = ndimage.distance_transform_edt(~edge_a, sampling=spacing)[edge_b]
    return max(np.percentile(to_b, 95), np.percentile(to_a, 95))


def test_metrics_match_the_dice_formula_and_a_scipy_hd95():
    label = np.zeros((40, 40, 6), np.uint8)
    label[5:20, 5:20, 1:5] = 1
    label[22:35, 10:30, 1:5] = 3
    label[20:22, 10:30, 1:5] = 2
    prediction = np.zeros_like(label)
    prediction[7:21, 5:22, 1:6] = 1
    prediction[23:35, 12:30, 1:5] = 3
    prediction[21:23, 10:30, 1:5] = 2
    spacing = (1.5, 1.25, 8.0)
    metrics = segmentation_metrics(prediction, label, spacing)
    for index, name in enumerate(["RV", "MYO", "LV"], start=1):
        a, b = prediction == index, label == index
        assert metrics[f"dice_{name}"] == pytest.approx(2 * (a & b).sum() / (a.sum() + b.sum()))
        assert metrics[f"hd95_{name}"] == pytest.approx(surface_distance_hd95(a, b, spacing), rel=1e-5)
    assert list(metrics) == ["dice_RV", "dice_MYO", "dice_LV", "hd95_RV", "hd95_MYO", "hd95_LV"]


def test_metrics_of_absent_structures_are_nan():
    label = np.zeros((20, 20), np.uint8)
    label[5:15, 5:15] = 3
    metrics = segmentation_metrics(label, label, (1.0, 1.0))
    assert metrics["dice_LV"] == 1.0 and metrics["hd95_LV"] == 0.0
    assert math.isnan(metrics["dice_RV"]) and math.isnan(metrics["hd95_RV"])
    with pytest.raises(ValueError, match=r"same shape, with one spacing value per axis"):
        segmentation_metrics(label, label, (1.0, 1.0, 1.0))


def test_ed_es_frames_from_the_lv_cavity_of_labelled_frames():
    label = np.zeros((10, 10, 2, 5), np.uint8)
    for frame, size in [(1, 6), (2, 3), (3, 5)]:  # frame 0 and 4 are unlabelled
        label[:size, :size, :, frame] = 3
    assert ed_es_frames(label) == [1, 2]
    single = np.zeros((4, 4, 1, 3), np.uint8)
    single[0, 0, 0, 2] = 2
    assert ed_es_frames(single) == [2]
    with pytest.raises(DataError, match="no labelled frame"):
        ed_es_frames(np.zeros((4, 4, 1, 3), np.uint8))


def test_exclude_unenclosed_lv_slices_drops_the_atrium_but_keeps_ringed_cavities():
    labels = np.zeros((12, 12, 3), np.uint8)
    labels[3:9, 3:9, 0] = 2  # slice 0: a full myocardial ring around the cavity
    labels[4:8, 4:8, 0] = 3
    labels[3:9, 3:9, 1] = 2  # slice 1: myocardium on one side only (3 of the 4 sides open)
    labels[3:9, 4:9, 1] = 0
    labels[4:8, 4:8, 1] = 3
    labels[4:8, 4:8, 2] = 3  # slice 2: a blood pool with no myocardium at all
    kept = exclude_unenclosed_lv_slices(labels)
    np.testing.assert_array_equal(kept[..., 0], labels[..., 0])
    assert not (kept[..., 1] == 3).any() and (kept[..., 1] == 2).sum() == (labels[..., 1] == 2).sum()
    assert not kept[..., 2].any()
    # The border of slice 1 (the 4-connected dilation of the cavity minus the cavity) is 16 pixels, 4 of them
    # myocardium: an enclosure of 0.25, kept at a bar of 0.2.
    np.testing.assert_array_equal(exclude_unenclosed_lv_slices(labels, min_enclosure=0.2)[..., 1], labels[..., 1])
    with pytest.raises(ValueError, match=r"\[H, W, S\]"):
        exclude_unenclosed_lv_slices(labels[..., 0])
    with pytest.raises(ValueError, match="min_enclosure"):
        exclude_unenclosed_lv_slices(labels, min_enclosure=1.5)


def test_keep_largest_components_removes_what_is_apart_from_the_heart():
    heart = np.zeros((30, 30, 3), np.uint8)
    heart[5:20, 5:20] = 2
    heart[8:17, 8:17] = 3
    heart[5:20, 20:24] = 1  # the RV against the septum
    noisy = heart.copy()
    noisy[26:29, 26:29, 1] = 3  # a false positive elsewhere in the field of view
    noisy[0, 0, 0] = 1
    noisy[21:23, 2:4, 1] = 2  # myocardium touching nothing
    noisy[10:12, 10:12, 1] = 1  # an RV island inside the LV cavity: connected to the heart, not to the RV
    expected = heart.copy()
    expected[10:12, 10:12, 1] = 0
    np.testing.assert_array_equal(keep_largest_components(noisy), expected)
    np.testing.assert_array_equal(keep_largest_components(heart), heart)
    np.testing.assert_array_equal(keep_largest_components(np.zeros((4, 4), np.uint8)), np.zeros((4, 4)))
    diagonal = np.zeros((4, 4), np.uint8)
    diagonal[0, 0] = diagonal[1, 1] = 3  # corner neighbours are connected
    np.testing.assert_array_equal(keep_largest_components(diagonal), diagonal)


def block_labels(shape, frames):
    """Nested blocks 1 > 2 > 3, each at least 6 voxels across, with the innermost shrinking in odd frames.

    Every boundary separates consecutive ids, so the intensity oracle has no spurious class where an interpolated
    intensity passes between them.
    """
    label = np.zeros((*shape, frames), np.uint8)
    for t in range(frames):
        shrink = 2 * (t % 2)
        label[4:36, 4:32, ..., t] = 1
        label[10:30, 10:26, ..., t] = 2
        label[15 + shrink:25, 14:22, ..., t] = 3
    return label


def oblique_affine(spacing, angle=0.4):
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(spacing)
    affine[:3, 3] = (-30.0, 12.0, 40.0)
    return affine


def cine_of(label, affine):
    """The image the oracle segments perfectly: intensity = class id / 3 (scaled to scanner-like integers)."""
    return MetaTensor(torch.as_tensor(label * 1000.0, dtype=torch.float32), affine=torch.as_tensor(affine))


def predictor(**kwargs):
    return CineSegmentationPredictor(IntensityOracle(), GEOMETRY, sw_batch_size=2, **kwargs)


def test_prediction_on_the_network_grid_is_exact_and_windows_cover_the_image():
    label = block_labels((40, 36, 5), frames=2)  # larger than the 16x16x4 window in every axis
    prediction = predictor().predict(cine_of(label, oblique_affine((SPACING, SPACING, 8.0))), "sax")
    assert prediction.dtype == np.uint8 and prediction.shape == label.shape
    np.testing.assert_array_equal(prediction, label)


def test_prediction_is_resampled_back_onto_the_input_grid():
    label = block_labels((40, 40, 5), frames=2)
    cine = cine_of(label, oblique_affine((2.2, 1.9, 8.0)))  # resampled to 1.5 mm and back
    prediction = predictor().predict(cine, "sax", frames=[1])
    assert prediction.shape == (40, 40, 5, 1)
    interior = ndimage.binary_erosion(np.ones((40, 40), bool), iterations=2)
    agreement = (prediction[..., 0] == label[..., 1])[interior].mean()
    assert agreement > 0.97
    for index in (1, 2, 3):  # every structure keeps its size within a voxel layer
        assert abs((prediction[..., 0] == index).sum() / (label[..., 1] == index).sum() - 1) < 0.1


def test_lax_cines_are_segmented_in_2d():
    label = block_labels((40, 40, 1), frames=3)
    prediction = predictor().predict(cine_of(label, oblique_affine((SPACING, SPACING, 7.0))), "lax_4c")
    np.testing.assert_array_equal(prediction, label)
    with pytest.raises(ValueError, match=r"frames \[3\] out of range for a cine of 3 frames"):
        predictor().predict(cine_of(label, np.eye(4)), "lax_4c", frames=[3])
    with pytest.raises(ValueError, match="unknown view 'lax_2c'"):
        predictor().predict(cine_of(label, np.eye(4)), "lax_2c")


class CountingOracle(IntensityOracle):
    """The oracle, counting the windows it is shown."""

    windows = 0

    def forward(self, x, view):
        self.windows += x.shape[0]
        return super().forward(x, view)


def test_later_frames_are_segmented_around_the_heart_of_the_first():
    label = np.zeros((96, 96, 5, 3), np.uint8)
    label[30:70, 40:76, :, :2] = block_labels((40, 36, 5), frames=2)
    label[30:70, 40:76, :, 2] = block_labels((40, 36, 5), frames=1)[..., 0]
    label[0:4, 0:4, :, 1] = 1  # far from the heart of frame 0: outside the region the later frames are searched in
    label[88:94, 88:94, :, 0] = 2  # a stray false positive in frame 0 does not stretch that region
    cine = cine_of(label, oblique_affine((SPACING, SPACING, 8.0)))
    counters = {margin: CountingOracle() for margin in (None, 3.0)}
    predictions = {
        margin: CineSegmentationPredictor(oracle, GEOMETRY, roi_margin_mm=margin, largest_component=False).predict(
            cine, "sax")
        for margin, oracle in counters.items()
    }
    expected = label.copy()
    np.testing.assert_array_equal(predictions[None], expected)
    expected[0:4, 0:4, :, 1] = 0
    np.testing.assert_array_equal(predictions[3.0], expected)
    assert counters[3.0].windows < counters[None].windows / 2
    with pytest.raises(ValueError, match=r"roi_margin_mm must be >= 0 mm or None, got -1"):
        CineSegmentationPredictor(IntensityOracle(), GEOMETRY, roi_margin_mm=-1)


def save(path, array, affine):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def test_segment_folder_writes_label_maps_with_the_inputs_affine(tmp_path):
    label = block_labels((40, 36, 5), frames=2)
    affine = oblique_affine((SPACING, SPACING, 8.0))
    save(tmp_path / "in" / "cine.nii.gz", (label.astype(np.uint16) * 1000), affine)
    save(tmp_path / "in" / "frame.nii", (label[..., 1].astype(np.int16) * 1000), affine)  # one 3-D frame
    (tmp_path / "in" / "notes.txt").write_text("ignored")
    written = segment_folder(predictor(), tmp_path / "in", tmp_path / "out", "sax")
    assert [p.name for p in written] == ["cine_seg.nii.gz", "frame_seg.nii.gz"]
    for path, expected in zip(written, (label, label[..., 1])):
        image = nib.load(str(path))
        assert image.get_data_dtype() == np.uint8
        np.testing.assert_allclose(image.affine, affine, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(image.dataobj), expected)
    assert not list((tmp_path / "out").glob(".*"))  # no temporary files left behind


def test_segment_folder_errors(tmp_path):
    with pytest.raises(DataError, match="no input folder given: pass --input_dir"):
        segment_folder(predictor(), None, tmp_path / "out")
    with pytest.raises(DataError, match="does not exist"):
        segment_folder(predictor(), tmp_path / "absent", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no NIfTI files \(\*\.nii, \*\.nii\.gz\)"):
        segment_folder(predictor(), tmp_path / "empty", tmp_path / "out")
    save(tmp_path / "bad" / "x.nii.gz", np.zeros((8, 8), np.int16), np.eye(4))
    with pytest.raises(DataError, match=r"x\.nii\.gz: expected a sax image \[H, W, S\] or \[H, W, S, T\], got shape "
                                        r"\(8, 8\)"):
        segment_folder(predictor(), tmp_path / "bad", tmp_path / "out")


def labelled_subject(folder, label, affine):
    save(folder / "sax.nii.gz", (label.astype(np.uint16) * 1000), affine)
    save(folder / "sax_label.nii.gz", label, affine)
    return {"sax": str(folder / "sax.nii.gz"), "sax_label": str(folder / "sax_label.nii.gz")}


def test_evaluation_scores_ed_and_es_of_every_subject(tmp_path):
    label = block_labels((40, 36, 5), frames=3)
    label[..., 2] = 0  # an unlabelled frame
    affine = oblique_affine((SPACING, SPACING, 8.0))
    datalist = [labelled_subject(tmp_path / name, label, affine) for name in ("a", "b")]
    sax_only = CineSegmentationPredictor(IntensityOracle(), {"sax": GEOMETRY["sax"]})
    rows = evaluate_segmentation(sax_only, datalist)
    assert [(r["subject"], r["view"], r["phase"], r["frame"]) for r in rows] == [
        (0, "sax", "ED", 0), (0, "sax", "ES", 1), (1, "sax", "ED", 0), (1, "sax", "ES", 1)
    ]  # frame 0 has the larger LV cavity
    for row in rows:
        assert [row[f"dice_{n}"] for n in ("RV", "MYO", "LV")] == [1.0, 1.0, 1.0]
        assert [row[f"hd95_{n}"] for n in ("RV", "MYO", "LV")] == [0.0, 0.0, 0.0]
    assert len(evaluate_segmentation(sax_only, datalist[:1], frames="all")) == 2


def test_evaluation_rejects_bad_labels(tmp_path):
    label = block_labels((40, 36, 5), frames=2)
    item = labelled_subject(tmp_path / "a", label, np.eye(4))
    save(tmp_path / "a" / "sax_label.nii.gz", np.where(label == 3, 7, label).astype(np.uint8), np.eye(4))
    sax_only = CineSegmentationPredictor(IntensityOracle(), {"sax": GEOMETRY["sax"]})
    with pytest.raises(DataError, match=r"sax_label\.nii\.gz holds values 7 outside the class ids 0\.\.3"):
        evaluate_segmentation(sax_only, [item])
    with pytest.raises(DataError, match="the evaluation data list is empty"):
        evaluate_segmentation(sax_only, [])
    with pytest.raises(ValueError, match="frames must be 'ed_es' or 'all'"):
        evaluate_segmentation(sax_only, [item], frames="es")


def test_a_trained_run_loads_as_a_predictor(tmp_path):
    views = {"sax": {"image_size": [16, 16, 4], "spacing": [SPACING, SPACING, None], "patch_size": [8, 8, 1]}}
    model = {"embed_dim": 12, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0, "patch_embed": "linear",
             "drop_path_rate": 0.0, "feature_size": 2}
    overrides = {"views": views, "model": model, "inference#sw_batch_size": 2, "inference#overlap": 0.25}
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_segmentation_predictor(tmp_path / "run", overrides)
    trained = ViTSegmenter({"sax": {"image_size": (16, 16, 4), "patch_size": (8, 8, 1)}}, num_classes=4, **model)
    save_network_weights(trained, tmp_path / "run" / "models" / "model.safetensors")
    predictor = load_segmentation_predictor(tmp_path / "run", overrides)
    assert isinstance(predictor, CineSegmentationPredictor) and list(predictor.views) == ["sax"]
    assert not predictor.network.training
    for name, value in trained.state_dict().items():
        assert torch.equal(predictor.network.state_dict()[name], value), name
    assert predictor.predict(cine_of(block_labels((20, 20, 4), 2), np.eye(4)), "sax").shape == (20, 20, 4, 2)
