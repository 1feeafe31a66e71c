"""Tube masking for videos and cine: one spatial mask shared by all frames."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Generator, Tensor

from medssl.masking.base import MaskGenerator

__all__ = ["TubeMasking"]


class TubeMasking(MaskGenerator):
    """Mask the same spatial tokens in every frame, so a masked patch cannot be copied from a neighbouring frame;
    VideoMAE (Tong et al., 2022, https://arxiv.org/abs/2203.12602).

    Args:
        mask_ratio: fraction of spatial tokens to mask, in ``[0, 1)``; VideoMAE uses 0.9.
        time_axis: the grid axis of time (negative counts from the end); -1 is the last axis, as in cine
            ``[C, H, W, S, T]`` tensors.

    Raises:
        ValueError: when ``mask_ratio`` is outside ``[0, 1)``; at call time, when the grid has fewer than two axes,
            ``time_axis`` is out of range, or the ratio leaves no visible token.
    """

    def __init__(self, mask_ratio: float, time_axis: int = -1) -> None:
        super().__init__(mask_ratio)
        self.time_axis = int(time_axis)

    def _split_time(self, grid: Sequence[int]) -> tuple[int, tuple[int, ...]]:
        """The time axis index (non-negative) and the grid."""
        grid = self._check_grid(1, grid)
        if len(grid) < 2 or not -len(grid) <= self.time_axis < len(grid):
            raise ValueError(
                f"time_axis {self.time_axis} must index a grid with at least one spatial axis beside time, "
                f"got grid {grid}."
            )
        return self.time_axis % len(grid), grid

    def num_keep(self, grid: Sequence[int]) -> int:
        """``int(N_spatial * (1 - mask_ratio)) * T`` visible tokens."""
        time_axis, grid = self._split_time(grid)
        frames = grid[time_axis]
        return self._keep_from_ratio(math.prod(grid) // frames, grid) * frames

    def _shuffle(
        self, batch_size: int, grid: tuple[int, ...], num_keep: int, device: torch.device, generator: Generator | None
    ) -> Tensor:
        time_axis = self.time_axis % len(grid)
        frames, after = grid[time_axis], math.prod(grid[time_axis + 1 :])
        noise = torch.rand(batch_size, math.prod(grid) // frames, device=device, generator=generator)
        spatial_order = noise.argsort(dim=1)
        # Spatial flat index -> grid flat index of frame 0, then one tube per spatial token: its T frames follow each
        # other in the shuffle, so the first K * T entries are K whole tubes.
        first_frame = spatial_order // after * (frames * after) + spatial_order % after
        frame_offset = torch.arange(frames, device=device) * after
        return (first_frame.unsqueeze(-1) + frame_offset).reshape(batch_size, -1)
