"""The cxr_mae bundle through its real interfaces: ``python -m monai.bundle run`` for pre-training (train.json),
fine-tuning from its checkpoint (finetune.json), evaluation (+ evaluate.json) and folder inference (inference.json),
with bad files in the folder and pydicom-data's real chest CR.

Tiny settings throughout: a 6 + 4 image cohort of 48 x 48 radiographs with DICOM copies, 32 x 32 inputs with 8-pixel
patches (a 4 x 4 grid), a 2-block 16-wide encoder.
"""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from mlflow.tracking import MlflowClient
from monai.bundle import ConfigParser
from PIL import Image
from pydicom.data import get_testdata_file
from safetensors.torch import load_file

from medssl.data.cxr_phantom import FINDINGS, ensure_cxr_cohort
from medssl.errors import CheckpointError

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "bundles" / "cxr_mae"
CONFIGS = BUNDLE / "configs"
TRAIN, FINETUNE, EVALUATE, INFERENCE = (CONFIGS / f"{name}.json" for name in ("train", "finetune", "evaluate", "inference"))
ENCODER = {"embed_dim": 16, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0, "patch_embed": "linear"}
GEOMETRY = {"image_size": [32, 32], "patch_size": [8, 8]}
PRETRAIN = {**GEOMETRY, "model": {**ENCODER, "decoder_dim": 16, "decoder_depth": 1, "decoder_num_heads": 2,
                                  "norm_pix_loss": True},
            "epochs": 2, "batch_size": 4, "cache_workers": 1, "figure_interval": 1}
NETWORK = {**GEOMETRY, "model": {**ENCODER, "drop_path_rate": 0.2}}
FINETUNE_TINY = {**NETWORK, "epochs": 2, "batch_size": 3, "cache_workers": 1, "inference": {"batch_size": 2}}


@pytest.fixture(scope="module")
def cxr_cohort(tmp_path_factory):
    """Six training and four test radiographs (48 x 48, with image.dcm copies); read-only for the tests."""
    root = tmp_path_factory.mktemp("cxr_cohort")
    ensure_cxr_cohort(root, 6, seed=0, size=48, num_test=4, dicom=True, num_workers=1, progress=False)
    return root


def _colour_dicom(source, path):
    dataset = pydicom.dcmread(source)
    rows, columns = int(dataset.Rows), int(dataset.Columns)
    dataset.PhotometricInterpretation, dataset.SamplesPerPixel, dataset.PlanarConfiguration = "RGB", 3, 0
    dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation = 8, 8, 7, 0
    for name in ("WindowCenter", "WindowWidth", "RescaleSlope", "RescaleIntercept", "PresentationLUTShape"):
        if name in dataset:
            delattr(dataset, name)
    dataset.PixelData = np.zeros((rows, columns, 3), np.uint8).tobytes()
    dataset.save_as(path)


def _knee_dicom(source, path):
    dataset = pydicom.dcmread(source)
    dataset.BodyPartExamined = "KNEE"
    dataset.save_as(path)


def test_bundle_files_follow_the_monai_bundle_spec():
    metadata = json.loads((CONFIGS / "metadata.json").read_text())
    train, finetune, inference = (json.loads(path.read_text()) for path in (TRAIN, FINETUNE, INFERENCE))
    image, pred = metadata["network_data_format"]["inputs"]["image"], metadata["network_data_format"]["outputs"]["pred"]
    assert image["spatial_shape"] == inference["image_size"] and image["num_channels"] == 1
    assert pred["num_channels"] == len(inference["findings"]) and inference["findings"] == list(FINDINGS)
    for key in ("findings", "image_size", "patch_size", "views", "model", "network_def", "finetune_mode", "inference",
                "body_part", "min_size"):
        assert inference[key] == finetune[key], key  # the standalone inference config builds the fine-tuned network
    assert train["model"]["embed_dim"] == finetune["model"]["embed_dim"] == 384  # ViT-S/16 (Xiao et al.)
    assert (train["model"]["depth"], train["model"]["num_heads"], train["patch_size"]) == (12, 6, [16, 16])
    assert (train["model"]["decoder_dim"], train["model"]["decoder_depth"], train["mask_ratio"]) == (512, 2, 0.9)
    assert train["optim"]["betas"] == [0.9, 0.95] and train["model"]["norm_pix_loss"] is True
    assert finetune["model"]["drop_path_rate"] == 0.2
    # CPU defaults that learn in minutes; the published fine-tuning recipe is one overlay away
    assert finetune["optim"]["layer_decay"] == 0.75
    assert finetune["augment"] == {"num_ops": 2, "magnitude": 2, "magnitude_std": 0.5}
    parser = ConfigParser()
    parser.read_config([str(FINETUNE), str(CONFIGS / "finetune_published.json")])
    assert parser["optim"]["layer_decay"] == 0.55 and parser["optim"]["blr"] == 0.00025  # Xiao et al.
    assert parser["epochs"] == 75 and parser["optim"]["warmup_epochs"] == 5
    assert parser["augment"] == {"num_ops": 2, "magnitude": 6, "magnitude_std": 0.5}
    assert parser["optim"]["weight_decay"] == finetune["optim"]["weight_decay"]  # the rest is finetune.json's
    assert (BUNDLE / "LICENSE").read_text() == (REPO / "bundles" / "cine_mae" / "LICENSE").read_text()
    readme = (BUNDLE / "docs" / "README.md").read_text()
    assert "only run bundles you trust" in readme.lower()
    for phrase in ("finetune.json", "evaluate.json", "inference.json", "--pretrained False", "--num_labelled",
                   "--input_dir", "torchrun", "skipped.csv", "--image_size"):
        assert phrase in readme, phrase


@pytest.mark.slow
def test_pretrain_finetune_evaluate_infer_through_the_monai_cli(tmp_path, cxr_cohort, run_cli):
    pre_dir, ft_dir = tmp_path / "pre", tmp_path / "ft"
    run_cli([TRAIN], {**PRETRAIN, "run_dir": str(pre_dir), "dataset_dir": str(cxr_cohort)}, tmp_path)
    summary = json.loads((pre_dir / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["iterations"] == 4  # 6 images, batch 4
    assert (pre_dir / "figures" / "reconstruction_epoch=0002.png").is_file()
    pretrained = pre_dir / "models" / "model.safetensors"
    weights = load_file(str(pretrained))
    assert weights["encoder.patch_embed.cxr.proj.weight"].shape == (16, 64)
    assert any(key.startswith("decoder.") for key in weights)
    params = MlflowClient(summary["tracking_uri"]).get_run(summary["run_id"]).data.params
    assert params["mask_ratio"] == "0.9" and params["num_images"] == "6" and params["augment.min_scale"] == "0.5"

    common = {**FINETUNE_TINY, "run_dir": str(ft_dir), "dataset_dir": str(cxr_cohort)}
    # the published fine-tuning recipe, as an overlay on the command line
    run_cli([FINETUNE, CONFIGS / "finetune_published.json"], {**common, "pretrained": str(pretrained),
                                                               "num_labelled": 5}, tmp_path)
    summary = json.loads((ft_dir / "summary.json").read_text())
    assert summary["iterations"] == 4  # 5 labelled images, batch 3, 2 epochs
    tuned = load_file(str(ft_dir / "models" / "model.safetensors"))
    assert tuned["head.linear.weight"].shape == (5, 16)
    assert not torch.equal(tuned["encoder.vit.blocks.1.mlp.fc1.weight"], weights["encoder.vit.blocks.1.mlp.fc1.weight"])
    client = MlflowClient(summary["tracking_uri"])
    params = client.get_run(summary["run_id"]).data.params
    assert params["pretrained"] == "True" and params["num_labelled"] == "5" and params["optim.layer_decay"] == "0.55"
    assert params["augment.magnitude"] == "6" and params["model.drop_path_rate"] == "0.2"
    assert not any(str(tmp_path) in value for value in params.values())

    run_cli([FINETUNE, EVALUATE], {**common, "num_labelled": 5}, tmp_path)
    with open(ft_dir / "evaluation" / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    test = json.loads((cxr_cohort / "manifest.json").read_text())["test"]
    assert len(rows) == 4 and [[int(row[f"true_{f}"]) for f in FINDINGS] for row in rows] == [e["label"] for e in test]
    assert all(0.0 <= float(row[f"prob_{f}"]) <= 1.0 for row in rows for f in FINDINGS)
    metrics = json.loads((ft_dir / "evaluation" / "summary.json").read_text())["metrics"]
    assert "eval_auroc_mean" in metrics and all(0.0 <= value <= 1.0 for value in metrics.values())
    logged = client.get_run(summary["run_id"]).data.metrics  # logged into the fine-tuning's MLflow run
    assert logged["eval_auroc_mean"] == pytest.approx(metrics["eval_auroc_mean"])

    # Inference on a folder: PNGs, the cohort's DICOM, the real chest CR of pydicom-data, and three bad files.
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    shutil.copy(cxr_cohort / "img-t00000" / "image.png", inputs / "a.png")
    shutil.copy(cxr_cohort / "img-t00001" / "image.dcm", inputs / "b.dcm")
    shutil.copy(get_testdata_file("RG1_UNCR.dcm"), inputs / "real_cr.dcm")
    _colour_dicom(cxr_cohort / "img-t00002" / "image.dcm", inputs / "colour.dcm")
    _knee_dicom(cxr_cohort / "img-t00003" / "image.dcm", inputs / "knee.dcm")
    Image.fromarray(np.full((3, 3), 90, np.uint8)).save(inputs / "tiny.png")
    run_cli([INFERENCE], {**NETWORK, "run_dir": str(ft_dir), "input_dir": str(inputs)}, tmp_path)
    with open(ft_dir / "predictions" / "predictions.csv", newline="") as handle:
        predictions = list(csv.DictReader(handle))
    assert [row["file"] for row in predictions] == ["a.png", "b.dcm", "real_cr.dcm"]
    assert all(0.0 <= float(row[f"prob_{f}"]) <= 1.0 for row in predictions for f in FINDINGS)
    with open(ft_dir / "predictions" / "skipped.csv", newline="") as handle:
        skipped = {row["file"]: row["reason"] for row in csv.DictReader(handle)}
    assert "colour or non-greyscale image (PhotometricInterpretation RGB" in skipped["colour.dcm"]
    assert "BodyPartExamined is KNEE, expected CHEST" in skipped["knee.dcm"]
    assert "image is 3x3 pixels, smaller than the minimum 4x4" in skipped["tiny.png"]

    # The run folder is a bundle of its own, with the settings it was trained with.
    exported = json.loads((ft_dir / "configs" / "inference.json").read_text())
    assert exported["model"] == NETWORK["model"] and exported["image_size"] == GEOMETRY["image_size"]

    bad_only = tmp_path / "bad_only"
    bad_only.mkdir()
    shutil.copy(inputs / "knee.dcm", bad_only / "knee.dcm")
    command = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(INFERENCE), "--run_dir", str(ft_dir),
               "--input_dir", str(bad_only), "--output_dir", str(tmp_path / "none"), "--image_size", "[32, 32]",
               "--patch_size", "[8, 8]", "--model", repr(NETWORK["model"])]
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**env, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    assert "could be predicted (1 skipped: knee.dcm: BodyPartExamined is KNEE, expected CHEST)" in result.stderr


def test_pretrained_or_scratch_is_one_override(tmp_path):
    from medssl.engine.checkpoints import save_network_weights
    from medssl.masking import RandomMasking
    from medssl.methods.mae import MultiViewMAE

    torch.manual_seed(0)
    views = {"cxr": {**GEOMETRY, "in_channels": 1}}
    mae = MultiViewMAE(views, RandomMasking(0.9), decoder_dim=8, decoder_depth=1, decoder_num_heads=2, **ENCODER)
    pretrained = save_network_weights(mae, tmp_path / "model.safetensors")

    def encoder(value):
        parser = ConfigParser()
        parser.read_config(str(FINETUNE))
        parser.update({**NETWORK, "pretrained": value, "run_dir": str(tmp_path)})
        return parser.get_parsed_content("network_init").encoder

    state = load_file(str(pretrained))
    loaded = encoder(str(pretrained))
    for key in ("vit.blocks.1.mlp.fc1.weight", "patch_embed.cxr.proj.weight", "view_embed.cxr"):
        torch.testing.assert_close(loaded.state_dict()[key], state[f"encoder.{key}"])
    assert loaded.vit.blocks[1].drop_path.drop_prob == pytest.approx(0.2)  # the last block's stochastic depth
    for scratch in (None, False):
        assert not torch.allclose(encoder(scratch).vit.blocks[1].mlp.fc1.weight, loaded.vit.blocks[1].mlp.fc1.weight)
    with pytest.raises(RuntimeError) as raised:  # MONAI wraps errors raised inside config expressions
        encoder(str(tmp_path / "absent.safetensors"))
    assert isinstance(raised.value.__cause__, CheckpointError)
