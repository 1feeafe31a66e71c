"""Reconstruction figures for masked image modelling: input, masked input and reconstruction, per view."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from ignite.engine import Engine, Events
from matplotlib.figure import Figure
from monai.data import list_data_collate
from torch import nn

from medssl.engine.checkpoints import atomic_write
from medssl.engine.distributed import is_main_process, unwrap_model

__all__ = ["RECONSTRUCTION_ROWS", "reconstruction_figure", "ReconstructionFigureHandler"]

RECONSTRUCTION_ROWS = ("input", "masked", "reconstruction")


class _ArtifactLogger(Protocol):
    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None: ...


def _display_slice(image: torch.Tensor) -> torch.Tensor:
    """``[C, H, W]`` or ``[C, H, W, S]`` -> ``[H, W]``: channel 0, middle slice of a stack."""
    image = image[0].detach().float().cpu()
    return image[..., image.shape[-1] // 2] if image.ndim == 3 else image


def reconstruction_figure(
    images: Mapping[str, Mapping[str, torch.Tensor]],
    path: str | os.PathLike,
    sample: int = 0,
    title: str | None = None,
) -> Path:
    """Draw a grid of rows input / masked / reconstruction and one column per view, saved as PNG.

    Args:
        images: ``{view: {"input", "masked", "reconstruction"}}`` with tensors ``[B, C, H, W]`` (2-D views) or
            ``[B, C, H, W, S]`` (stacks, shown at the middle slice ``S // 2``), intensities in [0, 1].
        path: destination PNG, written atomically.
        sample: batch index to draw.
        title: figure title (never put identifiers here).

    Returns:
        the written path.

    Raises:
        ValueError: when ``images`` is empty, a view lacks a row, a tensor is not 4-D or 5-D, or ``sample`` is out
            of range.
    """
    if not images:
        raise ValueError("images is empty.")
    for view, rows in images.items():
        absent = [row for row in RECONSTRUCTION_ROWS if row not in rows]
        if absent:
            raise ValueError(f"view '{view}' lacks {absent}; expected {list(RECONSTRUCTION_ROWS)}.")
        for row in RECONSTRUCTION_ROWS:
            shape = tuple(rows[row].shape)
            if len(shape) not in (4, 5) or not 0 <= sample < shape[0]:
                raise ValueError(
                    f"'{view}' {row} must be [B, C, H, W] or [B, C, H, W, S] with B > {sample}, got {shape}."
                )
    figure = Figure(figsize=(2.4 * len(images), 2.4 * len(RECONSTRUCTION_ROWS)), dpi=100, layout="constrained")
    axes = figure.subplots(len(RECONSTRUCTION_ROWS), len(images), squeeze=False)
    for column, (view, rows) in enumerate(images.items()):
        for row_index, row in enumerate(RECONSTRUCTION_ROWS):
            axis = axes[row_index][column]
            # Transposed with the origin at the bottom: the first voxel axis runs left to right.
            axis.imshow(_display_slice(rows[row][sample]).T.numpy(), cmap="gray", vmin=0.0, vmax=1.0, origin="lower")
            axis.set_xticks([])
            axis.set_yticks([])
            if row_index == 0:
                axis.set_title(view)
            if column == 0:
                axis.set_ylabel(row)
    if title:
        figure.suptitle(title)
    return atomic_write(path, lambda temporary: figure.savefig(temporary, format="png"))


class ReconstructionFigureHandler:
    """Ignite handler: draw a reconstruction figure every few epochs and when training completes (rank 0 only).

    The figure always shows the same samples (the first ``num_samples`` of ``dataset``, drawn once) masked with the
    same seeded generator, so figures of successive epochs are comparable. The network must provide
    ``forward(batch, generator=None) -> output`` and ``reconstruction_images(batch, output)`` returning
    ``{view: {"input", "masked", "reconstruction"}}`` image tensors (as :class:`medssl.methods.cine_mae.CineMAE`).

    Args:
        network: the method (a DDP wrapper is looked through, so only rank 0 runs it).
        dataset: source of the figure's samples (dicts of ``Tensor[C, *spatial]``).
        save_dir: folder of the PNGs, named ``reconstruction_epoch=NNNN.png``.
        interval: epochs between figures (>= 1); one is also drawn at the end.
        tracker: optional object with ``log_artifact(path, artifact_path)`` (e.g. the MLflow tracker); each
            figure is logged under ``"figures"``.
        num_samples: samples drawn per figure (the first is shown).
        seed: seed of the masking generator.

    Raises:
        ValueError: for ``interval`` or ``num_samples`` below 1.
    """

    def __init__(
        self,
        network: nn.Module,
        dataset: Sequence[Mapping[str, Any]],
        save_dir: str | os.PathLike,
        interval: int = 1,
        tracker: _ArtifactLogger | None = None,
        num_samples: int = 1,
        seed: int = 0,
    ) -> None:
        if interval < 1 or num_samples < 1:
            raise ValueError(f"interval and num_samples must be >= 1, got {interval} and {num_samples}.")
        self.network = network
        self.dataset = dataset
        self.save_dir = Path(save_dir)
        self.interval = interval
        self.tracker = tracker
        self.num_samples = num_samples
        self.seed = seed
        self.last_path: Path | None = None
        self._batch: dict[str, Any] | None = None
        self._drawn_epoch = -1

    def attach(self, engine: Engine) -> None:
        """Register the figure on ``EPOCH_COMPLETED`` (every ``interval``) and ``COMPLETED``, on rank 0 only."""
        if not is_main_process():
            return
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval), self)
        engine.add_event_handler(Events.COMPLETED, self)

    def _fixed_batch(self, device: torch.device) -> dict[str, Any]:
        if self._batch is None:
            count = min(self.num_samples, len(self.dataset))
            self._batch = list_data_collate([self.dataset[index] for index in range(count)])
        return {
            key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in self._batch.items()
        }

    def __call__(self, engine: Engine) -> Path | None:
        """Draw the figure for the current epoch (once per epoch) and log it; returns its path."""
        epoch = engine.state.epoch
        if epoch == self._drawn_epoch:
            return self.last_path
        module = unwrap_model(self.network)
        device = engine.state.device
        batch = self._fixed_batch(device)
        generator = torch.Generator(device=device).manual_seed(self.seed)
        was_training = module.training
        module.eval()
        try:
            with torch.no_grad():
                output = module(batch, generator=generator)
                images = module.reconstruction_images(batch, output)
        finally:
            module.train(was_training)
        path = reconstruction_figure(
            images, self.save_dir / f"reconstruction_epoch={epoch:04d}.png", title=f"epoch {epoch}"
        )
        if self.tracker is not None:
            self.tracker.log_artifact(path, "figures")
        self._drawn_epoch, self.last_path = epoch, path
        return path
