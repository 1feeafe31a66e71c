"""The mask contract shared by every mask generator."""

from __future__ import annotations

import abc
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Generator, Tensor

__all__ = ["MaskOutput", "MaskGenerator"]


@dataclass(frozen=True)
class MaskOutput:
    """Which tokens of a patch grid an encoder sees, in the index form of MAE (He et al., 2022,
    https://arxiv.org/abs/2111.06377).

    Attributes:
        ids_keep: ``[B, K]`` long, indices of the visible tokens (in no particular order).
        ids_restore: ``[B, N]`` long, the position of each original token in ``cat([visible, masked])`` order, so
            ``gather(cat([visible, masked], 1), ids_restore)`` restores the original token order.
        mask: ``[B, N]`` bool, True where a token is masked (hidden from the encoder); ``N - K`` per row.
    """

    ids_keep: Tensor
    ids_restore: Tensor
    mask: Tensor


class MaskGenerator(abc.ABC):
    """Draws token masks with the same number of visible tokens in every sample (static shapes).

    Args:
        mask_ratio: fraction of tokens to mask, in ``[0, 1)``.

    Raises:
        ValueError: when ``mask_ratio`` is outside ``[0, 1)``.
    """

    def __init__(self, mask_ratio: float) -> None:
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}.")
        self.mask_ratio = float(mask_ratio)

    def num_keep(self, grid: Sequence[int]) -> int:
        """Number of visible tokens per sample for a patch grid: ``int(N * (1 - mask_ratio))`` for
        ``N = prod(grid)``, the rounding of MAE and MONAI's ``MaskedAutoEncoderViT`` (kept for parity with their masks).

        Args:
            grid: number of patches per axis.

        Returns:
            The exact keep count ``K``.

        Raises:
            ValueError: when the grid is invalid or the ratio leaves no visible token.
        """
        grid = self._check_grid(1, grid)
        return self._keep_from_ratio(math.prod(grid), grid)

    def __call__(
        self,
        batch_size: int,
        grid: Sequence[int],
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
    ) -> MaskOutput:
        """Draw one mask per sample.

        Args:
            batch_size: number of samples ``B``.
            grid: number of patches per axis; ``N = prod(grid)`` tokens in row-major order.
            device: where the returned tensors live.
            generator: random source for reproducible masks; it must live on ``device``.

        Returns:
            A :class:`MaskOutput` with ``K = num_keep(grid)`` visible tokens per sample.

        Raises:
            ValueError: when ``batch_size`` or the grid is invalid, or the ratio leaves no visible token.
        """
        grid = self._check_grid(batch_size, grid)
        num_keep = self.num_keep(grid)
        ids_shuffle = self._shuffle(batch_size, grid, num_keep, torch.device(device), generator)
        # Inverting the permutation by scatter is O(N), where MAE's argsort(argsort) is O(N log N).
        positions = torch.arange(ids_shuffle.shape[1], device=ids_shuffle.device).expand_as(ids_shuffle)
        ids_restore = torch.empty_like(ids_shuffle).scatter_(1, ids_shuffle, positions)
        return MaskOutput(ids_keep=ids_shuffle[:, :num_keep], ids_restore=ids_restore, mask=ids_restore >= num_keep)

    @abc.abstractmethod
    def _shuffle(
        self, batch_size: int, grid: tuple[int, ...], num_keep: int, device: torch.device, generator: Generator | None
    ) -> Tensor:
        """A ``[B, N]`` long permutation of ``range(N)`` per row on ``device``; its first ``num_keep`` are visible."""

    @staticmethod
    def _check_grid(batch_size: int, grid: Sequence[int]) -> tuple[int, ...]:
        grid = tuple(int(g) for g in grid)
        if not grid or min(grid) <= 0:
            raise ValueError(f"grid must be a non-empty sequence of positive sizes, got {grid}.")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        return grid

    def _keep_from_ratio(self, num_tokens: int, grid: Sequence[int]) -> int:
        keep = int(num_tokens * (1.0 - self.mask_ratio))
        if keep == 0:
            raise ValueError(
                f"mask_ratio {self.mask_ratio} leaves no visible token on grid {tuple(grid)} ({num_tokens} tokens to "
                "mask from); lower the ratio or use smaller patches."
            )
        return keep

    def __repr__(self) -> str:
        return f"{type(self).__name__}(mask_ratio={self.mask_ratio})"

