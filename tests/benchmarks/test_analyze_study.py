"""Smoke test of benchmarks/analyze_study.py: ``--quick`` times every stage of ``medssl analyze`` on a small DICOM
study with a tiny (untrained) cine_seg bundle and prints the figures as JSON."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medssl.engine.bundles import bundle_dir, export_inference_bundle, parse_bundle_item
from medssl.engine.checkpoints import save_network_weights

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "analyze_study.py"
SETTINGS = {
    "views": {"sax": {"image_size": [32, 32, 4], "spacing": [4.0, 4.0, None], "patch_size": [8, 8, 1]}},
    "model": {"embed_dim": 16, "depth": 1, "num_heads": 2, "mlp_ratio": 2.0, "patch_embed": "linear",
              "drop_path_rate": 0.0, "feature_size": 4},
}


@pytest.mark.slow
def test_quick_run_prints_stage_figures(tmp_path):
    torch.manual_seed(0)
    network = parse_bundle_item("cine_seg", "network_def", ["configs/inference.json"], SETTINGS)
    save_network_weights(network, tmp_path / "bundle" / "models" / "model.safetensors")
    export_inference_bundle(bundle_dir("cine_seg"), tmp_path / "bundle", SETTINGS)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, str(SCRIPT), "--quick", "--bundle", str(tmp_path / "bundle"),
               "--work", str(tmp_path / "work"), "--peer-frames", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["study"]["frames"] == 3 and figures["study"]["matrix"] == [96, 96]
    for key in ("scan_s", "resample_s", "infer_s", "restore_s", "write_s", "command_s", "infer_speedup_vs_whole_fov"):
        assert figures[key] > 0, key
    assert figures["segment_s"] >= figures["infer_s"]
    assert (tmp_path / "work" / "cli" / "analysis.json").is_file()
