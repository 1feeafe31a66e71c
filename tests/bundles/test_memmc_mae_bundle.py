"""The memmc_mae bundle through ``python -m monai.bundle run``: train -> evaluate -> inference, at tiny sizes."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "bundles" / "memmc_mae" / "configs"
MODEL = {"embed_dim": 16, "depth": 2, "num_heads": 2, "decoder_dim": 16, "decoder_depth": 1, "decoder_num_heads": 2,
         "mlp_ratio": 2.0, "mask_ratio": 0.75, "norm_pix_loss": False, "patch_embed": "linear"}
TINY = {"num_images": 8, "num_test": 6, "cohort_size": 64, "image_size": [32, 32], "patch_size": [8, 8],
        "batch_size": 4, "epochs": 2, "figure_interval": 2, "model": MODEL,
        "memmc": {"memory_slots": 4, "levels": None}}


def test_metadata_describes_the_inference_network():
    metadata = json.loads((CONFIGS / "metadata.json").read_text())
    inference = json.loads((CONFIGS / "inference.json").read_text())
    train = json.loads((CONFIGS / "train.json").read_text())
    data_format = metadata["network_data_format"]
    assert data_format["inputs"]["image"]["spatial_shape"] == inference["image_size"] == train["image_size"]
    assert data_format["outputs"]["pred"]["spatial_shape"] == inference["image_size"]
    for key in ("model", "memmc", "patch_size", "num_masks", "top_fraction", "smooth_sigma", "score_margin", "seed"):
        assert inference[key] == train[key], key  # inference rebuilds the trained network and scoring
    readme = (CONFIGS.parent / "docs" / "README.md").read_text()
    assert "only run bundles you trust" in readme.lower() and "method mae" in readme


def test_train_evaluate_and_infer_through_the_monai_command(tmp_path, run_cli):
    run_dir = tmp_path / "run"
    overrides = {**TINY, "run_dir": str(run_dir)}
    run_cli([CONFIGS / "train.json"], overrides, tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["iterations"] == 2 * 2  # 8 normal images, batch 4, 2 epochs
    weights = run_dir / "models" / "model.safetensors"
    assert weights.is_file()

    run_cli([CONFIGS / "train.json", CONFIGS / "evaluate.json"],
            {**overrides, "num_masks": 3, "num_figures": 2, "reference_images": 8}, tmp_path)
    evaluation = json.loads((run_dir / "evaluation" / "summary.json").read_text())
    metrics = evaluation["metrics"]
    for key in ("eval_image_auroc", "eval_image_auroc_mean", "eval_pixel_auroc"):
        assert 0.0 <= metrics[key] <= 1.0, key
    with open(run_dir / "evaluation" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["label"]) for row in rows] == [0, 1, 0, 1, 0, 1]
    scores = [float(row["score"]) for row in rows]  # standardised by the normal-error reference: any sign
    assert all(np.isfinite(scores)) and len(set(scores)) == len(scores)
    assert (run_dir / "models" / "error_reference.safetensors").is_file()  # the normal-error reference, for inference
    client = MlflowClient(summary["tracking_uri"])
    run = client.get_run(summary["run_id"])  # the evaluation is logged into the training's run
    assert run.data.metrics["eval_pixel_auroc"] == pytest.approx(metrics["eval_pixel_auroc"])
    assert run.data.params["method"] == "memmc_mae" and run.data.params["memmc.memory_slots"] == "4"
    # the scoring settings; the margin defaults to one patch (8 px here)
    assert run.data.params["scoring.smooth_sigma"] == "4.0" and run.data.params["scoring.score_margin"] == "8"
    overlays = [a.path for a in client.list_artifacts(summary["run_id"], "anomaly_maps")]
    assert overlays == ["anomaly_maps/anomaly_000.png", "anomaly_maps/anomaly_001.png"]
    assert {a.path for a in client.list_artifacts(summary["run_id"], "evaluation")} == {"evaluation/metrics.csv"}

    images = tmp_path / "images"
    images.mkdir()
    cohort = next((run_dir / "cohort").iterdir())
    Image.open(cohort / "img-t00001" / "image.png").save(images / "lesion.png")
    inference = {key: TINY[key] for key in ("image_size", "patch_size", "model", "memmc")}
    inference.update(run_dir=str(run_dir), input_dir=str(images), num_masks=3)
    run_cli([CONFIGS / "inference.json"], inference, tmp_path)
    with open(run_dir / "predictions" / "predictions.csv") as handle:
        predicted = list(csv.DictReader(handle))
    assert [row["file"] for row in predicted] == ["lesion.png"]
    # same masks, same reference: inference scores the image exactly as the evaluation did
    assert float(predicted[0]["score"]) == pytest.approx(float(rows[1]["score"]), rel=1e-4)
    assert (run_dir / "predictions" / "maps" / "lesion_anomaly.png").is_file()
