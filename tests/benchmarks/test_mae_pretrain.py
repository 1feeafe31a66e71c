"""Smoke test of benchmarks/mae_pretrain.py: ``--quick`` runs end to end and prints the figures as JSON."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "mae_pretrain.py"


def test_quick_run_prints_figures():
    command = [sys.executable, str(SCRIPT), "--quick", "--threads", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True)
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("speedup_vs_monai", "speedup_vs_monai_sdpa", "speedup_bf16_vs_monai_sdpa", "mfu"):
        assert figures[key] > 0, key
        assert figures[f"small_{key}"] > 0, key
    assert figures["step_gflop"] > 0 and figures["peak_gflops_mm"] > 0
    assert figures["loss_fp32_last"] < figures["loss_fp32_first"]
    assert abs(figures["loss_bf16_last"] - figures["loss_fp32_last"]) < 0.05
