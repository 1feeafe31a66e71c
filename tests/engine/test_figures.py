"""Reconstruction figures: the PNG grid and the handler that draws it during training."""

import pytest
import torch
from matplotlib.image import imread

from medssl.engine.figures import ReconstructionFigureHandler, reconstruction_figure
from medssl.engine.trainer import SSLTrainer


def images(batch=2):
    sax = torch.zeros(batch, 1, 8, 8, 3)
    sax[:, :, :, :, 1] = 1.0  # only the middle slice is white
    lax = torch.full((batch, 1, 8, 8), 0.5)
    return {view: {"input": x, "masked": x * 0, "reconstruction": x} for view, x in (("sax", sax), ("lax_2c", lax))}


def test_grid_has_rows_input_masked_reconstruction_and_a_column_per_view(tmp_path):
    path = reconstruction_figure(images(), tmp_path / "f.png", title="epoch 1")
    pixels = imread(path)
    assert pixels.shape[:2] == (3 * 240, 2 * 240)  # 2.4 inches per panel at 100 dpi
    assert [p.name for p in tmp_path.iterdir()] == ["f.png"]  # written atomically, no temporary left
    top, middle = pixels[: 240, : 240, :3].mean(), pixels[240:480, : 240, :3].mean()
    assert top > middle  # the SAX input shows its white middle slice, the masked row is black


@pytest.mark.parametrize(
    "bad, message",
    [
        ({}, "images is empty"),
        ({"sax": {"input": torch.zeros(1, 1, 4, 4)}}, "lacks \\['masked', 'reconstruction'\\]"),
        ({"sax": {k: torch.zeros(4, 4) for k in ("input", "masked", "reconstruction")}}, "got \\(4, 4\\)"),
    ],
)
def test_bad_images(tmp_path, bad, message):
    with pytest.raises(ValueError, match=message):
        reconstruction_figure(bad, tmp_path / "f.png")


class Recorder:
    def __init__(self):
        self.logged = []

    def log_artifact(self, path, artifact_path=None):
        self.logged.append((path.name, artifact_path))


def test_handler_draws_every_interval_and_at_the_end_once_per_epoch(tmp_path, toy_class, make_batches):
    network = toy_class()
    dataset = [{"x": torch.rand(4), "y": torch.rand(4)} for _ in range(3)]
    tracker = Recorder()
    handler = ReconstructionFigureHandler(network, dataset, tmp_path, interval=2, tracker=tracker)
    optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
    SSLTrainer("cpu", 3, make_batches(2), network, optimizer, train_handlers=[handler]).run()
    expected = ["reconstruction_epoch=0002.png", "reconstruction_epoch=0003.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == expected
    assert tracker.logged == [(name, "figures") for name in expected]
    assert handler.last_path == tmp_path / "reconstruction_epoch=0003.png"
    assert network.training  # the figure's eval pass restores training mode
