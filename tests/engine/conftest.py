"""A tiny method with the engine's contract, shared by the engine tests."""

import pytest
import torch
from torch import nn


class ToyMethod(nn.Module):
    """``forward(batch) -> {"loss", "loss_a", "loss_b"}``: squared error of a linear map, split into two parts.

    ``reconstruction_images`` mimics a masked autoencoder so the figure handler can draw it.
    """

    def __init__(self, features=4):
        super().__init__()
        self.linear = nn.Linear(features, features)
        self.norm = nn.LayerNorm(features)
        self.autocast_seen = []

    def forward(self, batch, generator=None):
        self.autocast_seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))
        x = batch["x"]
        error = (self.norm(self.linear(x)) - batch["y"]).float() ** 2
        loss_a, loss_b = error[:, :2].mean(), error[:, 2:].mean()
        return {"loss": (loss_a + loss_b) / 2, "loss_a": loss_a, "loss_b": loss_b, "pred": error}

    def reconstruction_images(self, batch, output):
        image = batch["x"][:, None, :, None].expand(-1, 1, -1, 4).clamp(0, 1)
        return {"view": {"input": image, "masked": image * 0, "reconstruction": image.flip(2)}}


def toy_batches(count, batch_size=2, features=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    draw = lambda: torch.rand(batch_size, features, generator=generator)  # noqa: E731
    return [{"x": draw(), "y": draw()} for _ in range(count)]


@pytest.fixture
def toy_method():
    torch.manual_seed(0)
    return ToyMethod()


@pytest.fixture
def make_batches():
    return toy_batches


@pytest.fixture
def toy_class():
    return ToyMethod
