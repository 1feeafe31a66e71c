"""The CineMA reference fixture (``../shared/fixtures/cinema`` beside the repository): checkpoints made by CineMA's own
code with seeded random weights, their configs, inputs and reference outputs. Tests that need it fail (not skip)
when it is missing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

CINEMA_FIXTURE = Path(__file__).resolve().parents[2].parent / "shared" / "fixtures" / "cinema"
# The fixture README's recommended tolerance for CPU float32 re-implementations.
RTOL, ATOL = 1e-5, 3e-5
# Checkpoint folder of each fixture model (the HuggingFace layout, relative to the model's folder).
CHECKPOINTS = {
    "mae": "mae/pretrained/cinema.safetensors",
    "seg": "seg/finetuned/segmentation/acdc_sax/acdc_sax_0.safetensors",
    "cls": "cls/finetuned/classification_cvd/acdc_sax/acdc_sax_0.safetensors",
    "reg": "reg/finetuned/regression_ef/acdc_sax/acdc_sax_0.safetensors",
    "landmark_heatmap": "landmark_heatmap/finetuned/landmark_heatmap/lax_4c/lax_4c_0.safetensors",
    "landmark_coordinate": "landmark_coordinate/finetuned/landmark_coordinate/lax_4c/lax_4c_0.safetensors",
}


class CinemaFixture:
    """The fixture folder and its files by model name (``mae``, ``seg``, ``cls``, ``reg``, ``landmark_heatmap``,
    ``landmark_coordinate``)."""

    tolerance = {"rtol": RTOL, "atol": ATOL}

    def __init__(self, root: Path) -> None:
        self.root = root

    def checkpoint(self, model: str) -> Path:
        """The model's checkpoint file."""
        return self.root / CHECKPOINTS[model]

    def config(self, model: str) -> Path:
        """The model's config.yaml."""
        return self.checkpoint(model).parent / "config.yaml"

    def reference(self, model: str) -> dict[str, torch.Tensor]:
        """The model's ``io.safetensors``: inputs, reference outputs and debug tensors."""
        return load_file(str(self.root / model / "io.safetensors"))


@pytest.fixture(scope="session")
def cinema_fixture() -> CinemaFixture:
    """The fixture; fails the test with a clear message when it (or one of its checkpoints) is missing."""
    missing = [name for name in CHECKPOINTS.values() if not (CINEMA_FIXTURE / name).is_file()]
    if missing:
        pytest.fail(
            f"CineMA reference fixture missing or incomplete at {CINEMA_FIXTURE} (expected ../shared/fixtures/cinema "
            f"beside the repository); missing: {missing}"
        )
    return CinemaFixture(CINEMA_FIXTURE)
