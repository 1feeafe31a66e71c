"""The cine_ef bundle through its real interfaces: train -> evaluate (regression, from a cine_seg model) -> inference.

Tiny settings throughout: a 2-subject, 4-frame phantom cohort, 32x32x4 ED/ES windows on a 6 x 6 x 20 mm grid, a
2-block 16-wide encoder pretrained (here: initialised) as a ``CineMAE``, a tiny untrained ``cine_seg`` network for
the segmentation route; a one-subject held-out cohort.
"""

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from medssl.engine.bundles import parse_bundle_item, run_bundle
from medssl.engine.checkpoints import save_network_weights
from medssl.errors import DataError

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "bundles" / "cine_ef"
CONFIGS = BUNDLE / "configs"
TRAIN, EVALUATE, INFERENCE = (CONFIGS / f"{name}.json" for name in ("train", "evaluate", "inference"))
ENCODER = {"embed_dim": 16, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0, "patch_embed": "linear"}
VIEWS = {"sax": {"image_size": [32, 32, 4], "spacing": [6.0, 6.0, 20.0], "patch_size": [8, 8, 1]}}
NETWORK = {"views": VIEWS, "model": {**ENCODER, "drop_path_rate": 0.1}}
TINY = {**NETWORK, "epochs": 2, "batch_size": 2, "samples_per_epoch": 4, "cache_workers": 1, "num_subjects": 2,
        "eval_num_subjects": 1}
SEGMENTATION = {"views": {"sax": {"image_size": [32, 32, 4], "spacing": [6.0, 6.0, None], "patch_size": [8, 8, 1]}},
                "model": {**ENCODER, "drop_path_rate": 0.1, "feature_size": 4},
                # Untrained weights: keep every LV cavity, ringed by myocardium or not, so that EF is defined.
                "min_lv_enclosure": None}


def exact(cohort, subject, key):
    return json.loads((cohort / f"sub-{subject:04d}" / "metadata.json").read_text())[key]


def test_bundle_files_follow_the_monai_bundle_spec():
    metadata = json.loads((CONFIGS / "metadata.json").read_text())
    train, inference = json.loads(TRAIN.read_text()), json.loads(INFERENCE.read_text())
    image, pred = metadata["network_data_format"]["inputs"]["image"], metadata["network_data_format"]["outputs"]["pred"]
    assert image["spatial_shape"] == train["views"]["sax"]["image_size"] and image["num_channels"] == 2
    assert pred["num_channels"] == len(train["targets"]) == 2 and train["targets"] == ["lv_ef_pct", "rv_ef_pct"]
    for key in ("views", "model", "targets", "centre", "phase_view", "network_def", "finetune_mode", "inference"):
        assert inference[key] == train[key], key
    # The two fine-tuning bundles on the ED/ES input keep parallel configs (cine_cls trains on a larger cohort: its
    # five groups need more subjects each, see its README).
    cls = json.loads((REPO / "bundles" / "cine_cls" / "configs" / "train.json").read_text())
    for key in ("views", "model", "centre", "phase_view", "epochs", "batch_size"):
        assert cls[key] == train[key], key
    assert (BUNDLE / "LICENSE").read_text() == (REPO / "bundles" / "cine_mae" / "LICENSE").read_text()
    readme = (BUNDLE / "docs" / "README.md").read_text()
    assert "only run bundles you trust" in readme.lower()
    for phrase in ("--pretrained False", "--num_labelled", "--finetune_mode", "evaluate.json", "inference.json",
                   "--input_dir", "--es_frame", "--segmentation_run_dir", "torchrun"):
        assert phrase in readme, phrase


@pytest.mark.slow
def test_train_evaluate_both_ways_infer_through_the_monai_cli(tmp_path, cohort, pretrained, run_cli):
    run_dir = tmp_path / "run"
    common = {**TINY, "run_dir": str(run_dir), "dataset_dir": str(cohort)}
    run_cli([TRAIN], {**common, "pretrained": str(pretrained)}, tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    weights = load_file(str(run_dir / "models" / "model.safetensors"))
    lv = [exact(cohort, subject, "lv_ef_pct") for subject in (0, 1)]
    # The z-scoring statistics of the training targets travel with the weights.
    np.testing.assert_allclose(weights["output_mean"][0].item(), np.mean(lv), rtol=1e-5)
    np.testing.assert_allclose(weights["output_std"][0].item(), np.std(lv), rtol=1e-4)
    params = MlflowClient(summary["tracking_uri"]).get_run(summary["run_id"]).data.params
    assert params["targets"] == "['lv_ef_pct', 'rv_ef_pct']" and params["pretrained"] == "True"

    # Without a cine_seg model (none at the default runs/cine_seg): the regression alone, said in the log.
    result = run_cli([TRAIN, EVALUATE], common, tmp_path)
    assert "no cine_seg model at runs/cine_seg/models/model.safetensors" in result.stdout + result.stderr
    with open(run_dir / "evaluation" / "metrics.csv", newline="") as handle:
        assert [row["method"] for row in csv.DictReader(handle)] == ["regression"]

    # With one: both routes in one CSV and one MLflow run.
    segmentation_run = tmp_path / "seg_run"
    segmenter = parse_bundle_item("cine_seg", "network_def", ["configs/inference.json"], SEGMENTATION)
    save_network_weights(segmenter, segmentation_run / "models" / "model.safetensors")
    run_cli([TRAIN, EVALUATE], {**common, "segmentation_run_dir": str(segmentation_run),
                                "segmentation_overrides": SEGMENTATION}, tmp_path)
    with open(run_dir / "evaluation" / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["subject"], row["method"]) for row in rows] == [("0", "regression"), ("0", "segmentation")]
    held_out = run_dir / "phantom" / "n1_seed1000"
    for row in rows:
        assert float(row["lv_ef_pct_true"]) == pytest.approx(exact(held_out, 0, "lv_ef_pct"), abs=1e-4)
        assert float(row["lv_ef_pct_abs_error"]) == pytest.approx(
            abs(float(row["lv_ef_pct"]) - float(row["lv_ef_pct_true"])), abs=1e-4)
    metrics = MlflowClient(summary["tracking_uri"]).get_run(summary["run_id"]).data.metrics
    for method in ("regression", "segmentation"):
        row = next(r for r in rows if r["method"] == method)
        assert metrics[f"eval_{method}_lv_ef_pct_abs_error"] == pytest.approx(float(row["lv_ef_pct_abs_error"]))

    # Inference on a folder of NIfTI cines.
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    shutil.copy(cohort / "sub-0000" / "sax.nii.gz", inputs / "case.nii.gz")
    run_cli([INFERENCE], {**NETWORK, "run_dir": str(run_dir), "input_dir": str(inputs)}, tmp_path)
    with open(run_dir / "predictions" / "predictions.csv", newline="") as handle:
        predictions = list(csv.DictReader(handle))
    assert [(p["file"], p["ed_frame"], p["es_frame"]) for p in predictions] == [
        ("case.nii.gz", "0", str(exact(cohort, 0, "es_frame")))]
    assert 0.0 < float(predictions[0]["lv_ef_pct"]) < 100.0


def test_missing_targets_get_clear_errors(tmp_path, cohort, pretrained, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    broken = tmp_path / "no_rvef"
    shutil.copytree(cohort, broken)
    path = broken / "sub-0001" / "metadata.json"
    metadata = json.loads(path.read_text())
    del metadata["rv_ef_pct"]
    path.write_text(json.dumps(metadata))
    overrides = {**TINY, "epochs": 1, "run_dir": str(tmp_path / "run"), "dataset_dir": str(broken),
                 "pretrained": str(pretrained)}
    with pytest.raises(DataError, match=r"sub-0001/metadata\.json has no rv_ef_pct"):
        run_bundle("cine_ef", overrides=overrides)
    with pytest.raises(DataError, match="num_labelled=3 is outside 1..2"):
        run_bundle("cine_ef", overrides={**overrides, "dataset_dir": str(cohort), "num_labelled": 3})
