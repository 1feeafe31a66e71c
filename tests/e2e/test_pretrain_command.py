"""`medssl pretrain cine_mae` end to end, and its answers to bad input: one clear line, exit 2, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import save_file

# A model small enough for a test; the views keep the bundle's patch sizes.
TINY = [
    "--set", 'model={"embed_dim": 32, "depth": 1, "num_heads": 2, "decoder_dim": 16, "decoder_depth": 1, '
    '"decoder_num_heads": 2, "mlp_ratio": 2.0, "mask_ratio": 0.75, "norm_pix_loss": false, "patch_embed": "linear"}',
    "--set", "batch_size=2",
    "--set", "samples_per_subject=1",
    "--set", "cache_workers=1",
]


def _pretrain(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "medssl.cli", "pretrain", "cine_mae", *args],
        capture_output=True, text=True, timeout=600, cwd=cwd,
    )


def _assert_user_error(result: subprocess.CompletedProcess, *fragments: str) -> None:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("medssl pretrain: error: ")
    for fragment in fragments:
        assert fragment in message


@pytest.mark.slow
def test_pretrain_trains_on_a_generated_cohort_and_tracks_it(tmp_path):
    run_dir = tmp_path / "run"
    result = _pretrain("--epochs", "2", "--subjects", "2", "--run-dir", str(run_dir), *TINY)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert f"run folder:        {run_dir}" in result.stdout
    assert f"MLflow store:      {summary['tracking_uri']}" in result.stdout
    assert "open the MLflow UI: mlflow ui --backend-store-uri sqlite:///" in result.stdout
    assert (run_dir / "models" / "model.safetensors").is_file()

    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    run = client.get_run(summary["run_id"])
    assert run.data.params["epochs"] == "2"
    losses = client.get_metric_history(summary["run_id"], "loss")
    assert len(losses) == summary["iterations"] > 0
    assert np.isfinite([m.value for m in losses]).all()


def test_missing_data_folder(tmp_path):
    missing = tmp_path / "nowhere"
    _assert_user_error(_pretrain("--data", str(missing), "--run-dir", str(tmp_path / "run")), str(missing))


def test_empty_data_folder(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    _assert_user_error(_pretrain("--data", str(empty), "--run-dir", str(tmp_path / "run")), "no NIfTI", str(empty))


def test_nifti_with_the_wrong_number_of_dimensions(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 4), np.uint16), np.eye(4)), data / "flat.nii.gz")
    result = _pretrain("--data", str(data), "--run-dir", str(tmp_path / "run"))
    _assert_user_error(result, "flat.nii.gz", "(16, 16, 4)")


def test_mistyped_config_key(tmp_path):
    result = _pretrain("--set", "epoch=3", "--run-dir", str(tmp_path / "run"))
    _assert_user_error(result, "unknown config key 'epoch'", "Did you mean 'epochs'?")


def test_checkpoint_from_another_architecture(tmp_path):
    foreign = tmp_path / "resnet.safetensors"
    save_file({"conv1.weight": torch.zeros(8, 1, 3, 3), "fc.weight": torch.zeros(2, 8)}, str(foreign))
    result = _pretrain(
        "--epochs", "1", "--subjects", "2", "--run-dir", str(tmp_path / "run"), "--set", f"init_weights={foreign}", *TINY
    )
    _assert_user_error(result, "conv1.weight")
