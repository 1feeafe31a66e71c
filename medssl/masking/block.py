"""Blockwise masking over N-d patch grids."""

from __future__ import annotations

import math
import random

import numpy as np
import torch
from torch import Generator, Tensor

from medssl.masking.base import MaskGenerator

__all__ = ["BlockMasking"]


class BlockMasking(MaskGenerator):
    """Mask random boxes of tokens, BEiT style (Bao et al., 2022, https://arxiv.org/abs/2106.08254), on grids of
    any number of axes.

    Boxes are placed one after the other until ``N - K`` tokens are masked. Each box draws a volume uniformly in
    ``[min_num_patches, remaining budget]`` (capped by ``max_num_patches``), and for every axis but the last a side
    ratio to the last axis, log-uniform in ``[min_aspect, max_aspect]``; in 2-D this is BEiT's ``h = sqrt(s * r)``,
    ``w = sqrt(s / r)``. Sides are rounded and clamped to the grid (BEiT rejects oversized boxes instead; clamping
    keeps singleton axes, such as one LAX slice, usable). A box is kept when it masks at least one new token and
    no more than the remaining budget; after ``max_attempts`` failed boxes the loop stops. Because boxes rarely hit
    the budget exactly and never pass it, the missing tokens are then masked uniformly at random among the visible
    ones, so every sample has exactly ``K = int(N * (1 - mask_ratio))`` visible tokens.

    The boxes are drawn on the CPU (a short Python loop per sample: a data-side generator), and the result is moved
    to ``device``.

    Args:
        mask_ratio: fraction of tokens to mask, in ``[0, 1)``; BEiT masks 75 of 196 tokens (about 0.4).
        min_num_patches: smallest box volume in tokens (BEiT: 16).
        max_num_patches: largest box volume in tokens; None means no cap beyond the remaining budget (BEiT).
        min_aspect: smallest side ratio of a box (BEiT: 0.3).
        max_aspect: largest side ratio; None means ``1 / min_aspect`` (BEiT).
        max_attempts: box draws allowed to fail in a row before the loop stops (BEiT: 10).

    Raises:
        ValueError: when an argument is out of range; at call time, when the grid is invalid or the ratio leaves no
            visible token.
    """

    def __init__(
        self,
        mask_ratio: float,
        min_num_patches: int = 16,
        max_num_patches: int | None = None,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        max_attempts: int = 10,
    ) -> None:
        super().__init__(mask_ratio)
        max_aspect = 1.0 / min_aspect if max_aspect is None and min_aspect > 0 else max_aspect
        if min_num_patches < 1 or (max_num_patches is not None and max_num_patches < min_num_patches):
            raise ValueError(
                f"need 1 <= min_num_patches <= max_num_patches, got {min_num_patches} and {max_num_patches}."
            )
        if not 0 < min_aspect <= max_aspect:
            raise ValueError(f"need 0 < min_aspect <= max_aspect, got {min_aspect} and {max_aspect}.")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {max_attempts}.")
        self.min_num_patches = int(min_num_patches)
        self.max_num_patches = max_num_patches
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))
        self.max_attempts = int(max_attempts)

    def _shuffle(
        self, batch_size: int, grid: tuple[int, ...], num_keep: int, device: torch.device, generator: Generator | None
    ) -> Tensor:
        # One seed from ``generator`` drives the CPU box draws, so one generator state gives one mask.
        seed_device = generator.device if generator is not None else "cpu"
        rng = random.Random(int(torch.randint(0, 2**62, (1,), device=seed_device, generator=generator)))
        blocks = np.zeros((batch_size, *grid), dtype=bool)
        for sample in blocks:
            self._fill(sample, math.prod(grid) - num_keep, rng)
        block_mask = torch.from_numpy(blocks.reshape(batch_size, -1)).to(device)
        # Visible first: unmasked tokens rank below block tokens and uniform noise orders each group, so the cut at
        # K masks the tokens the boxes left short at random.
        noise = torch.rand(block_mask.shape, device=device, generator=generator)
        return (noise + block_mask).argsort(dim=1)

    def _fill(self, mask: np.ndarray, target: int, rng: random.Random) -> None:
        """Place boxes in ``mask`` (a grid-shaped bool array, edited in place) until ``target`` tokens or failure."""
        count = 0
        cap = target if self.max_num_patches is None else self.max_num_patches
        while count < target:
            added = self._place_box(mask, min(target - count, cap), rng)
            if added == 0:
                return
            count += added

    def _place_box(self, mask: np.ndarray, budget: int, rng: random.Random) -> int:
        """Mask one random box adding between 1 and ``budget`` tokens; returns how many it added (0 on failure)."""
        shape = mask.shape
        for _ in range(self.max_attempts):
            volume = rng.uniform(self.min_num_patches, budget)
            log_ratios = [rng.uniform(*self.log_aspect) for _ in shape[1:]] + [0.0]
            log_last = (math.log(volume) - sum(log_ratios)) / len(shape)
            sides = [min(max(round(math.exp(log_last + r)), 1), size) for r, size in zip(log_ratios, shape)]
            starts = [rng.randint(0, size - side) for side, size in zip(sides, shape)]
            box = tuple(slice(start, start + side) for start, side in zip(starts, sides))
            added = math.prod(sides) - int(np.count_nonzero(mask[box]))
            if 0 < added <= budget:
                mask[box] = True
                return added
        return 0
