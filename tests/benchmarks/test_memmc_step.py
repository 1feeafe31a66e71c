"""Smoke test of benchmarks/memmc_step.py: ``--quick`` runs end to end and prints the figures as JSON."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "memmc_step.py"


def test_quick_run_prints_figures():
    command = [sys.executable, str(SCRIPT), "--quick", "--threads", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True)
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("memmc_step_s", "mae_step_s", "step_time_ratio"):
        assert figures[key] > 0, key
    for key in ("memmc_peak_mb", "mae_peak_mb", "peak_memory_ratio"):
        assert key in figures, key
    assert figures["memmc_params"] > figures["mae_params"]  # memory slots and cross-attention on top
    assert figures["device"] == "cpu" and figures["batch"] == 2 and figures["image_size"] == [32, 32]
