"""The spark_ct bundle through its real interfaces: SparK pre-training -> fine-tuning from its checkpoint -> evaluation
-> inference, each with ``python -m monai.bundle run``.

Tiny settings throughout: a 6 + 3 image cohort of 64 x 64 slices (6 mm pixels), a ResNet of widths 4-16, a decoder of
width 32, one or two epochs of batch 2.
"""

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from monai.bundle import ConfigParser
from safetensors.torch import load_file

from medssl.data.ct_phantom import ensure_ct_cohort
from medssl.engine.checkpoints import save_network_weights
from medssl.methods.spark import SPARK_ENCODER_PREFIX

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "bundles" / "spark_ct"
CONFIGS = BUNDLE / "configs"
TRAIN, FINETUNE, EVALUATE, INFERENCE = (CONFIGS / f"{name}.json" for name in ("train", "finetune", "evaluate",
                                                                               "inference"))
MODEL = {"block": "basic", "layers": [1, 1, 1, 1], "block_inplanes": [4, 8, 8, 16]}
NETWORK = {"model": MODEL, "image_size": [64, 64]}
TINY = {**NETWORK, "batch_size": 2, "cache_workers": 1}
SPARK = {"mask_ratio": 0.6, "decoder_width": 32, "densify_norm": "batch", "decoder_norm": "batch",
         "norm_pix_loss": True}
CLASSES = ["none", "solid", "ground_glass"]


@pytest.fixture(scope="module")
def ct_cohort(tmp_path_factory):
    return ensure_ct_cohort(tmp_path_factory.mktemp("ct"), 6, seed=0, size=64, num_test=3, num_workers=1,
                            progress=False).parent


def test_bundle_files_follow_the_monai_bundle_spec():
    metadata = json.loads((CONFIGS / "metadata.json").read_text())
    train, finetune, inference = (json.loads(path.read_text()) for path in (TRAIN, FINETUNE, INFERENCE))
    image, pred = metadata["network_data_format"]["inputs"]["image"], metadata["network_data_format"]["outputs"]["pred"]
    assert image["spatial_shape"] == finetune["image_size"] == train["image_size"] and image["num_channels"] == 1
    assert pred["num_channels"] == len(finetune["class_names"]) == 3 and finetune["class_names"] == CLASSES
    for key in ("model", "spatial_dims", "image_size", "class_names", "finetune_mode", "inference"):
        assert inference[key] == finetune[key], key  # the standalone inference config builds the fine-tuned network
    assert train["model"] == finetune["model"] and train["spark"]["mask_ratio"] == 0.6  # SparK's published ratio
    assert (BUNDLE / "LICENSE").read_text() == (REPO / "bundles" / "cine_mae" / "LICENSE").read_text()
    readme = (BUNDLE / "docs" / "README.md").read_text()
    assert "only run bundles you trust" in readme.lower()
    for phrase in ("--pretrained False", "--num_labelled", "--label_fraction", "--finetune_mode", "evaluate.json",
                   "inference.json", "--input_dir", "torchrun", "'decoder_width': 768", "--epochs 1600"):
        assert phrase in readme, phrase


@pytest.mark.slow
def test_pretrain_finetune_evaluate_infer_through_the_monai_cli(tmp_path, ct_cohort, run_cli, no_tracking_env):
    pre_dir, run_dir = tmp_path / "pre", tmp_path / "run"
    run_cli([TRAIN], {**TINY, "run_dir": str(pre_dir), "dataset_dir": str(ct_cohort), "epochs": 2, "spark": SPARK},
            tmp_path)
    summary = json.loads((pre_dir / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["iterations"] == 6  # 6 images, batch 2
    weights = load_file(str(pre_dir / "models" / "model.safetensors"))
    assert f"{SPARK_ENCODER_PREFIX}conv1.weight" in weights and "mask_tokens.0" in weights
    assert (pre_dir / "figures" / "reconstruction_epoch=0002.png").is_file()

    common = {**TINY, "run_dir": str(run_dir), "dataset_dir": str(ct_cohort), "epochs": 1, "samples_per_epoch": 4}
    run_cli([FINETUNE], {**common, "pretrained": str(pre_dir / "models" / "model.safetensors"),
                         "label_fraction": 0.5}, tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["iterations"] == 2  # samples_per_epoch 4, batch 2
    client = MlflowClient(summary["tracking_uri"])
    params = client.get_run(summary["run_id"]).data.params
    assert params["pretrained"] == "True" and params["num_labelled"] == "3" and params["label_fraction"] == "0.5"
    assert not any(str(tmp_path) in value for value in params.values())
    tuned = load_file(str(run_dir / "models" / "model.safetensors"))
    assert tuned["head.1.weight"].shape == (3, 16)
    # one optimiser step from the SparK weights: the stem moved, but started from the pre-trained kernel
    start = weights[f"{SPARK_ENCODER_PREFIX}conv1.weight"]
    assert not torch.equal(tuned["backbone.conv1.weight"], start)
    assert (tuned["backbone.conv1.weight"] - start).abs().max() < 0.05

    run_cli([FINETUNE, EVALUATE], common, tmp_path)
    with open(run_dir / "evaluation" / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    manifest = json.loads((ct_cohort / "manifest.json").read_text())
    assert [row["true"] for row in rows] == [entry["class"] for entry in manifest["test"]]
    assert all(sum(float(row[f"prob_{name}"]) for name in CLASSES) == pytest.approx(1.0, abs=1e-5) for row in rows)
    metrics = client.get_run(summary["run_id"]).data.metrics  # logged into the fine-tuning's MLflow run
    accuracy = sum(row["true"] == row["predicted"] for row in rows) / 3
    assert metrics["eval_accuracy"] == pytest.approx(accuracy)
    assert {"eval_macro_f1", "eval_auroc_macro", "eval_mcc"} <= set(metrics)
    assert (run_dir / "evaluation" / "confusion_matrix.png").is_file()

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    shutil.copy(ct_cohort / manifest["test"][0]["image"], inputs / "case.nii.gz")
    # inference.json with the run's settings, as the fine-tuning exported it: the run folder is a bundle
    exported = json.loads((run_dir / "configs" / "inference.json").read_text())
    assert exported["model"] == MODEL and exported["image_size"] == [64, 64] and exported["run_dir"] == "@bundle_root"
    run_cli([run_dir / "configs" / "inference.json"], {"input_dir": str(inputs)}, tmp_path)
    with open(run_dir / "predictions" / "predictions.csv", newline="") as handle:
        predictions = list(csv.DictReader(handle))
    assert [p["file"] for p in predictions] == ["case.nii.gz"] and predictions[0]["predicted"] == rows[0]["predicted"]
    assert float(predictions[0]["prob_solid"]) == pytest.approx(float(rows[0]["prob_solid"]), abs=1e-6)


def test_pretrained_or_scratch_is_one_override(tmp_path):
    def backbone(value, model=MODEL):
        parser = ConfigParser()
        parser.read_config(str(FINETUNE))
        parser.update({**NETWORK, "model": model, "pretrained": value, "run_dir": str(tmp_path)})
        return parser.get_parsed_content("network_init").backbone

    parser = ConfigParser()
    parser.read_config(str(TRAIN))
    parser.update({**NETWORK, "spark": SPARK, "run_dir": str(tmp_path)})
    spark = parser.get_parsed_content("network_def")
    path = save_network_weights(spark, tmp_path / "model.safetensors")
    loaded = backbone(str(path))
    torch.testing.assert_close(loaded.layer3[0].conv1.weight, spark.encoder.network.layer3[0].conv1.weight)
    for scratch in (None, False):
        assert not torch.allclose(backbone(scratch).layer3[0].conv1.weight, loaded.layer3[0].conv1.weight)
    with pytest.raises(RuntimeError) as raised:  # MONAI wraps errors raised inside config expressions
        backbone(str(path), {**MODEL, "block_inplanes": [4, 8, 8, 32]})
    assert "layer4.0" in str(raised.value.__cause__)
