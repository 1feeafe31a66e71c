"""Smoke test of benchmarks/spark_step.py: ``--quick`` times SparK, dense and masked-dense steps on tiny ResNets in 2D
and 3D and prints the figures as JSON; ``--help`` documents the options. No timing is asserted, only consistency."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from medssl.nets.sparse import SparseBatchNorm

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "spark_step.py"
KINDS = ("spark", "dense", "masked_dense")
PAIRS = (("spark", "dense"), ("masked_dense", "dense"), ("spark", "masked_dense"))


@pytest.fixture(scope="module")
def benchmark():
    """The script as a module, for its argument parser (a subprocess would pay the imports again)."""
    spec = importlib.util.spec_from_file_location("spark_step_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    # Dataclasses resolve their annotations through sys.modules while the module executes.
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def test_help_lists_the_options(benchmark, capsys):
    with pytest.raises(SystemExit) as exit_info:
        benchmark.parse_args(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--device", "--quick", "--repeats", "--warmup", "--threads", "--configs"):
        assert option in out


def test_bad_options_are_refused(benchmark, capsys):
    parse_args = benchmark.parse_args
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            parse_args(["--device", "cuda", "--quick"])
        assert "CUDA is not available" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--repeats", "0"])
    assert "--repeats must be >= 1" in capsys.readouterr().err
    assert (parse_args(["--quick"]).repeats, parse_args([]).repeats) == (2, 3)


def test_masked_dense_step_is_spark_without_the_sparse_layers(benchmark):
    steps = benchmark.build_steps(benchmark.QUICK_CONFIGS[0], torch.device("cpu"))
    spark, masked_dense = steps["spark"].model.encoder, steps["masked_dense"].model.encoder
    assert spark.network.state_dict().keys() == masked_dense.network.state_dict().keys()
    assert any(isinstance(layer, SparseBatchNorm) for layer in spark.network.modules())
    assert not any(isinstance(layer, SparseBatchNorm) for layer in masked_dense.network.modules())
    torch.manual_seed(0)
    images = torch.rand(2, 1, 64, 64)
    active = torch.tensor([[True, False], [True, True]]).expand(2, 1, 2, 2)
    with torch.no_grad():
        sparse_out, dense_out = spark(images, active)[-1], masked_dense(images, active)[-1]
    # On the 2 x 2 grid of the last stage, the hidden cell is exactly zero only under SparK's re-masking.
    assert torch.count_nonzero(sparse_out[:, :, 0, 1]) == 0
    assert torch.count_nonzero(dense_out[:, :, 0, 1]) > 0


@pytest.mark.slow
def test_quick_run_prints_consistent_figures():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, str(SCRIPT), "--quick", "--threads", "1"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert figures["device"] == "cpu" and figures["threads"] == 1 and figures["mask_ratio"] == 0.6
    assert figures["repeats"] == 2 and figures["warmup"] == 1
    on_linux = Path("/proc/self/clear_refs").exists()
    assert (figures["memory_method"] is not None) == on_linux
    for name, dims in (("2d", 2), ("3d", 3)):
        config = figures[name]
        assert len(config["config"]["image_size"]) == dims
        assert len(config["mask_grid"]) == dims
        cells = 1
        for size in config["mask_grid"]:
            cells *= size
        # SparK keeps int(cells * (1 - 0.6)) cells visible.
        assert config["visible_fraction"] == int(cells * 0.4) / cells
        batch = config["config"]["batch"]
        for kind in KINDS:
            assert config[f"step_s_{kind}"] > 0 and config[f"step_cpu_s_{kind}"] > 0, (name, kind)
            assert config[f"samples_per_s_{kind}"] == pytest.approx(batch / config[f"step_s_{kind}"])
            assert config[f"gflop_{kind}"] > 0, (name, kind)
            if on_linux:
                assert config[f"peak_memory_mb_{kind}"] >= 0, (name, kind)
        for kind, reference in PAIRS:
            ratio = config[f"time_ratio_{kind}_vs_{reference}"]
            assert ratio > 0
            assert ratio == pytest.approx(config[f"step_s_{kind}"] / config[f"step_s_{reference}"])
            cpu_ratio = config[f"cpu_time_ratio_{kind}_vs_{reference}"]
            assert cpu_ratio == pytest.approx(config[f"step_cpu_s_{kind}"] / config[f"step_cpu_s_{reference}"])
            flop_ratio = config[f"flop_ratio_{kind}_vs_{reference}"]
            assert flop_ratio == pytest.approx(config[f"gflop_{kind}"] / config[f"gflop_{reference}"])
            if on_linux and config[f"peak_memory_mb_{reference}"] > 0:
                memory = config[f"peak_memory_mb_{kind}"] / config[f"peak_memory_mb_{reference}"]
                assert config[f"memory_ratio_{kind}_vs_{reference}"] == pytest.approx(memory)
        # Emulated sparsity computes every position: SparK's arithmetic is the masked-dense step's, and both add a
        # decoder to the dense network.
        assert config["flop_ratio_spark_vs_masked_dense"] == pytest.approx(1.0)
        assert config["flop_ratio_spark_vs_dense"] > 1
