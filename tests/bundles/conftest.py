"""Fixtures shared by the bundle tests: a tiny labelled phantom cohort, a tiny pre-training checkpoint, and the real
``python -m monai.bundle run`` command line."""

import os
import subprocess
import sys

import pytest
import torch

from medssl.data.phantom import ensure_cohort
from medssl.engine.checkpoints import save_network_weights
from medssl.methods.cine_mae import CineMAE

# The tiny encoder every fine-tuning bundle test builds on (their "model" overrides repeat these values).
TINY_ENCODER = {"embed_dim": 16, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0, "patch_embed": "linear"}


def _cli_args(overrides):
    """``--key value`` pairs for the MONAI bundle CLI (python-fire reads Python literals)."""
    return [item for key, value in overrides.items()
            for item in (f"--{key}", value if isinstance(value, str) else repr(value))]


def _run_cli(config_files, overrides, cwd, launcher=(sys.executable,)):
    """``python -m monai.bundle run --config_file <configs> --key value ...`` in ``cwd``; asserts it succeeded."""
    configs = str(config_files[0]) if len(config_files) == 1 else repr([str(f) for f in config_files])
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    env.update(PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [*launcher, "-m", "monai.bundle", "run", "--config_file", configs, *_cli_args(overrides)],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="session")
def run_cli():
    """The bundle command line as a function: ``run_cli(config_files, overrides, cwd, launcher=(python,))``."""
    return _run_cli


@pytest.fixture(scope="session")
def cohort(tmp_path_factory):
    """A 2-subject, 4-frame labelled phantom cohort (seed 0); read-only for the tests."""
    return ensure_cohort(tmp_path_factory.mktemp("cohort"), 2, seed=0, num_frames=4, progress=False).parent


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory):
    """A cine_mae-style checkpoint (SAX and both LAX views) of the tiny encoder."""
    torch.manual_seed(0)
    views = {"sax": {"image_size": (32, 32, 4), "patch_size": (8, 8, 1)},
             "lax_2c": {"image_size": (32, 32), "patch_size": (8, 8)},
             "lax_4c": {"image_size": (32, 32), "patch_size": (8, 8)}}
    mae = CineMAE(views=views, decoder_dim=8, decoder_depth=1, decoder_num_heads=2, **TINY_ENCODER)
    return save_network_weights(mae, tmp_path_factory.mktemp("pretrained") / "model.safetensors")


@pytest.fixture
def no_tracking_env(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
