"""Uniform random token masking."""

from __future__ import annotations

import math

import torch
from torch import Generator, Tensor

from medssl.masking.base import MaskGenerator

__all__ = ["RandomMasking"]


class RandomMasking(MaskGenerator):
    """Mask a uniformly random subset of tokens, independently per sample, as in MAE (He et al., 2022,
    https://arxiv.org/abs/2111.06377): the ``K`` tokens with the lowest uniform noise stay visible.

    Args:
        mask_ratio: fraction of tokens to mask, in ``[0, 1)``; MAE uses 0.75, CineMA 0.75, chest X-ray MAE 0.9.

    Raises:
        ValueError: when ``mask_ratio`` is outside ``[0, 1)``; at call time, when the grid is invalid or the ratio
            leaves no visible token.
    """

    def _shuffle(
        self, batch_size: int, grid: tuple[int, ...], num_keep: int, device: torch.device, generator: Generator | None
    ) -> Tensor:
        noise = torch.rand(batch_size, math.prod(grid), device=device, generator=generator)
        return noise.argsort(dim=1)
