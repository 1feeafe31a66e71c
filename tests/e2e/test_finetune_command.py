"""`medssl finetune cine_seg` end to end in a subprocess: train, evaluate on held-out data, print and track the results;
and its answers to bad input: one clear line, exit 2, no traceback."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch
from mlflow.tracking import MlflowClient

from medssl.data.phantom import ensure_cohort
from medssl.engine.checkpoints import save_network_weights
from medssl.methods.cine_mae import CineMAE

ENCODER = {"embed_dim": 16, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0, "patch_embed": "linear"}
SAX = {"image_size": [32, 32, 4], "patch_size": [8, 8, 1]}
# A network small enough for a test, on SAX only; the encoder matches the checkpoint below.
TINY = [
    "--set", f"views={json.dumps({'sax': {**SAX, 'spacing': [4.0, 4.0, None]}})}",
    "--set", f"model={json.dumps({**ENCODER, 'drop_path_rate': 0.1, 'feature_size': 4})}",
    "--set", "batch_size=2",
    "--set", "samples_per_epoch=2",
    "--set", "cache_workers=1",
    "--set", 'inference={"sw_batch_size": 4, "overlap": 0.0}',
]


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohorts")
    train = ensure_cohort(root / "train", 2, seed=0, num_frames=4, progress=False).parent
    held_out = ensure_cohort(root / "held_out", 1, seed=1, num_frames=4, progress=False).parent
    return train, held_out


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    torch.manual_seed(0)
    mae = CineMAE(views={"sax": {**SAX, "in_channels": 1}}, decoder_dim=8, decoder_depth=1, decoder_num_heads=2,
                  **ENCODER)
    return save_network_weights(mae, tmp_path_factory.mktemp("pretrained") / "model.safetensors")


def _finetune(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medssl.cli", "finetune", *args], capture_output=True, text=True,
                          timeout=600)


def _user_error(result: subprocess.CompletedProcess) -> str:
    """The line a user error ends with: exit status 2, no traceback (log lines may come before it)."""
    assert (result.returncode, "Traceback" in result.stderr) == (2, False), result.stderr[-2000:]
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("medssl finetune: error: ")
    return line


@pytest.mark.slow
def test_finetune_trains_evaluates_and_tracks(tmp_path, cohorts, pretrained, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    train, held_out = cohorts
    run_dir = tmp_path / "run"
    result = _finetune(
        "cine_seg", "--pretrained", str(pretrained), "--labelled", "1", "--epochs", "2", "--seed", "3",
        "--data", str(train), "--eval-data", str(held_out), "--run-dir", str(run_dir), *TINY,
        # A 2-epoch model's LV cavity is rarely ringed by myocardium: keep it, so that every metric is defined.
        "--set", "min_lv_enclosure=null",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    evaluation = summary["evaluation"]
    assert evaluation["num_rows"] == 2  # one held-out subject, SAX at ED and ES
    assert set(evaluation["metrics"]) == {f"eval_sax_{m}_{s}" for m in ("dice", "hd95") for s in ("RV", "MYO", "LV")}
    for name, value in evaluation["metrics"].items():
        assert re.search(rf"^  {name} +{value:.4f}$", result.stdout, re.MULTILINE), name
    assert f"run folder:        {run_dir}" in result.stdout
    assert f"MLflow store:      {summary['tracking_uri']}  (run {summary['run_id']})" in result.stdout
    assert f"open the MLflow UI: mlflow ui --backend-store-uri {summary['tracking_uri']}" in result.stdout

    run = MlflowClient(summary["tracking_uri"]).get_run(summary["run_id"])
    assert run.data.params["num_labelled"] == "1" and run.data.params["seed"] == "3"
    assert run.data.params["pretrained"] == "True" and run.data.params["epochs"] == "2"
    assert run.data.metrics["eval_sax_dice_LV"] == pytest.approx(evaluation["metrics"]["eval_sax_dice_LV"])
    assert summary["iterations"] == 2  # one labelled subject drawn twice per epoch, batch 2


def test_more_labelled_subjects_than_the_data_has(tmp_path, cohorts):
    train, held_out = cohorts
    result = _finetune("cine_seg", "--scratch", "--labelled", "5", "--data", str(train), "--run-dir",
                       str(tmp_path / "run"), *TINY)
    assert "num_labelled=5 is outside 1..2" in _user_error(result)


def test_missing_checkpoint_says_how_to_make_one(tmp_path):
    missing = tmp_path / "nowhere" / "models" / "model.safetensors"
    result = _finetune("cine_seg", "--pretrained", str(missing), "--run-dir", str(tmp_path / "run"))
    line = _user_error(result)
    assert str(missing) in line and "--scratch" in line
    assert f"medssl pretrain cine_mae --run-dir {tmp_path / 'nowhere'}" in line
    assert not (tmp_path / "run").exists()  # refused before any data was generated


def test_mismatching_checkpoint_names_the_keys(tmp_path, cohorts, pretrained):
    train, _ = cohorts
    result = _finetune("cine_seg", "--pretrained", str(pretrained), "--data", str(train), "--run-dir",
                       str(tmp_path / "run"), *TINY, "--set", 'model={"embed_dim": 32, "depth": 2, "num_heads": 2, '
                       '"mlp_ratio": 2.0, "patch_embed": "linear", "drop_path_rate": 0.1, "feature_size": 4}')
    line = _user_error(result)
    assert str(pretrained) in line and "vit.blocks.0.attn.proj.weight (checkpoint [16, 16] vs network [32, 32])" in line
