"""CNN classification on SparK weights: strict loading into the plain MONAI ResNet, modes, labelled subsets, data,
evaluation and folder inference."""

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.networks.nets import ResNet

from medssl.engine.checkpoints import save_network_weights
from medssl.errors import CheckpointError, DataError
from medssl.methods.spark import SparK
from medssl.tasks.cnn_classification import (
    CNNClassifier,
    build_resnet,
    ct_transforms,
    evaluate_cnn_classification,
    load_spark_encoder,
    predict_image_folder,
    select_fraction,
)

TINY = {"block": "basic", "layers": [1, 1, 1, 1], "block_inplanes": [4, 8, 8, 16]}
CLASSES = ["none", "solid", "ground_glass"]


def trained_spark(model=TINY, dims=2, size=(64, 64)):
    """A SparK whose CNN took an optimiser step (so its weights and BatchNorm statistics are not the init's)."""
    torch.manual_seed(0)
    spark = SparK(build_resnet(dims, **model), size, decoder_width=32)
    optimizer = torch.optim.AdamW(spark.parameters(), lr=1e-2)
    spark({"image": torch.rand(2, 1, *size, generator=torch.Generator().manual_seed(0))})["loss"].backward()
    optimizer.step()
    return spark


@pytest.mark.parametrize("dims, size", [(2, (64, 64)), (3, (64, 64, 32))])
def test_spark_weights_load_into_the_plain_resnet_and_give_identical_features(tmp_path, dims, size):
    spark = trained_spark(dims=dims, size=size).eval()
    path = save_network_weights(spark, tmp_path / "model.safetensors")
    classifier = CNNClassifier(3, dims, TINY).load_pretrained(path).eval()
    assert isinstance(classifier.backbone, ResNet) and classifier.backbone.fc is None
    for key, value in spark.encoder_state_dict().items():
        torch.testing.assert_close(classifier.backbone.state_dict()[key], value, rtol=0, atol=0)
    images = torch.rand(2, 1, *size)
    full = torch.ones(2, 1, *spark.encoder.mask_grid(size), dtype=torch.bool)
    with torch.no_grad(), spark.encoder.sparse_mask.masked(full):
        expected = spark.encoder.network(images)  # the pre-trained CNN, unmasked, with its own pooling
    with torch.no_grad():
        torch.testing.assert_close(classifier.backbone(images), expected, atol=1e-5, rtol=1e-4)
        assert classifier(images).shape == (2, 3)
    # the exported plain weights (no prefix) load the same way
    exported = save_network_weights(classifier.backbone, tmp_path / "encoder.safetensors")
    again = load_spark_encoder(build_resnet(dims, **TINY), exported)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(images), expected, atol=1e-5, rtol=1e-4)


def test_a_mismatching_checkpoint_is_refused_naming_the_keys(tmp_path):
    wide = trained_spark({**TINY, "block_inplanes": [4, 8, 8, 32]})
    other = save_network_weights(wide, tmp_path / "wide.safetensors")
    message = r"16 shape mismatches: layer4\.0\.bn1\.bias \(checkpoint \[32\] vs network \[16\]\)"
    with pytest.raises(CheckpointError, match=message):
        CNNClassifier(3, 2, TINY).load_pretrained(other)
    deeper = save_network_weights(trained_spark({**TINY, "layers": [1, 1, 1, 2]}), tmp_path / "deep.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected keys: layer4\.1\."):
        CNNClassifier(3, 2, TINY).load_pretrained(deeper)
    with pytest.raises(CheckpointError, match="must be an existing .safetensors file"):
        CNNClassifier(3, 2, TINY).load_pretrained(tmp_path / "absent.safetensors")
    with pytest.raises(CheckpointError, match="checkpoint path, or False"):
        CNNClassifier(3, 2, TINY).load_pretrained(True)
    scratch = CNNClassifier(3, 2, TINY)
    assert scratch.load_pretrained(False) is scratch and scratch.load_pretrained(None) is scratch


def test_finetune_modes():
    linear = [torch.nn.Dropout, torch.nn.Linear]
    mlp = [torch.nn.Linear, torch.nn.ReLU, torch.nn.Dropout, torch.nn.Linear]
    for mode, head in (("full", linear), ("linear_probe", linear), ("frozen", mlp)):
        network = CNNClassifier(3, 2, TINY, finetune_mode=mode).train()
        assert [type(layer) for layer in network.head] == head
        frozen = mode != "full"
        assert all(p.requires_grad != frozen for p in network.backbone.parameters())
        assert network.backbone.training != frozen and network.head.training
        logits = network(torch.rand(2, 1, 64, 64))
        assert logits.shape == (2, 3) and logits.requires_grad
    with pytest.raises(ValueError, match="finetune_mode must be one of"):
        CNNClassifier(3, 2, TINY, finetune_mode="partial")
    with pytest.raises(DataError, match=r"must not set \['num_classes'\]"):
        build_resnet(2, num_classes=3)


def test_select_fraction_draws_nested_subsets():
    items = list(range(20))
    assert select_fraction(items) == items
    half, tenth = select_fraction(items, label_fraction=0.5, seed=1), select_fraction(items, label_fraction=0.1, seed=1)
    assert len(half) == 10 and len(tenth) == 2 and set(tenth) <= set(half)
    assert select_fraction(items, num_labelled=3, seed=1) == select_fraction(items, label_fraction=0.15, seed=1)
    assert len(select_fraction(items, label_fraction=0.01)) == 1
    with pytest.raises(DataError, match="not both"):
        select_fraction(items, 3, 0.5)
    with pytest.raises(DataError, match=r"label_fraction must lie in \(0, 1\], got 1.5"):
        select_fraction(items, label_fraction=1.5)


def test_transforms_window_the_hounsfield_units_and_pad_with_air(tmp_path):
    hu = np.full((40, 24), -300, dtype=np.int16)
    hu[0, 0], hu[0, 1], hu[0, 2] = -2000, 400, 3000
    nib.save(nib.Nifti1Image(hu, np.eye(4)), tmp_path / "slice.nii.gz")
    image = ct_transforms((32, 32))({"image": str(tmp_path / "slice.nii.gz")})["image"]
    assert image.shape == (1, 32, 32) and image.dtype == torch.float32
    # cropped from 40 to 32 rows (4 each side), padded from 24 to 32 columns (4 each side) with 0 = air
    np.testing.assert_allclose(image[0, :, 4:28], np.full((32, 24), 0.5), atol=1e-6)
    assert image[0, :, :4].abs().max() == 0 and image[0, :, 28:].abs().max() == 0
    full = ct_transforms((40, 24))({"image": str(tmp_path / "slice.nii.gz")})["image"][0]
    assert full[0, :3].tolist() == [0.0, 1.0, 1.0]  # clipped to the [-1000, 400] HU window


def test_evaluation_rows_and_folder_predictions(tmp_path):
    paths = []
    for index in range(3):
        path = tmp_path / "in" / f"case{index}.nii.gz"
        path.parent.mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(np.random.default_rng(index).integers(-1000, 400, (64, 64)).astype(np.int16),
                                 np.eye(4)), path)
        paths.append(path)
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    torch.manual_seed(0)
    network = CNNClassifier(3, 2, TINY).eval()
    items = [{"image": str(path), "label": label} for path, label in zip(paths, (0, 2, 1))]
    rows = evaluate_cnn_classification(network, items, (64, 64), CLASSES, batch_size=2)
    assert [(row["image"], row["true"]) for row in rows] == [(0, "none"), (1, "ground_glass"), (2, "solid")]
    for row, path in zip(rows, paths):
        image = ct_transforms((64, 64))({"image": str(path)})["image"]
        with torch.no_grad():
            expected = torch.softmax(network(image[None]), dim=1)[0]
        assert [row[f"prob_{name}"] for name in CLASSES] == pytest.approx(expected.tolist(), abs=1e-5)
        assert row["predicted"] == CLASSES[int(expected.argmax())]
    csv_path = predict_image_folder(network, tmp_path / "in", tmp_path / "out", (64, 64), CLASSES, batch_size=2)
    with open(csv_path, newline="") as handle:
        predictions = list(csv.DictReader(handle))
    assert [p["file"] for p in predictions] == ["case0.nii.gz", "case1.nii.gz", "case2.nii.gz"]
    assert [p["predicted"] for p in predictions] == [row["predicted"] for row in rows]
    assert json.loads((tmp_path / "out" / "predictions.json").read_text())[0]["file"] == "case0.nii.gz"
    with pytest.raises(DataError, match="holds no .nii"):
        predict_image_folder(network, tmp_path / "out", tmp_path / "out2", (64, 64), CLASSES)
    with pytest.raises(DataError, match="is not a folder"):
        predict_image_folder(network, None, tmp_path / "out2", (64, 64), CLASSES)
    with pytest.raises(DataError, match="empty or lack class labels"):
        evaluate_cnn_classification(network, [{"image": str(paths[0])}], (64, 64), CLASSES)
