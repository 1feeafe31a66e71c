"""Fixed N-d sin-cos positional embeddings for patch grids."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["sincos_pos_embed"]


def sincos_pos_embed(grid: Sequence[int], dim: int, temperature: float = 10000.0) -> Tensor:
    """N-d sin-cos positional embedding: one 1-D sin-cos embedding per grid axis, concatenated.

    The 1-D embedding of Vaswani et al. (2017, https://arxiv.org/abs/1706.03762) for ``d`` channels is
    ``[sin(x * omega), cos(x * omega)]`` with ``omega_k = temperature ** (-k / (d / 2))``, ``k < d / 2``. Each grid
    axis gets ``d = floor(dim / (2 * ndim)) * 2`` channels; channels left over at the end are zero.

    The axis blocks are laid out in the order (axis 1, axis 0, axis 2, axis 3, ...): MAE (He et al., 2022,
    https://arxiv.org/abs/2111.06377) builds its 2-D grid with ``meshgrid(w, h)`` and so puts the width block first,
    and MONAI's ``build_sincos_position_embedding`` does the same in 2-D and 3-D. Following them makes this function
    equal to both wherever they are defined (2-D with ``dim % 4 == 0``, 3-D with ``dim % 6 == 0``), so weights trained
    with either load with the same positions.

    Args:
        grid: number of patches per axis, e.g. ``(H', W', S', T')``.
        dim: embedding width.
        temperature: the frequency base (10000 in the papers above).

    Returns:
        ``[prod(grid), dim]`` float32, rows in the row-major grid order of :func:`medssl.nets.tokens.patchify`.

    Raises:
        ValueError: when the grid is empty or has a non-positive size, or ``dim`` leaves fewer than 2 channels per
            axis.
    """
    grid = tuple(int(g) for g in grid)
    if not grid or min(grid) <= 0:
        raise ValueError(f"grid must be a non-empty sequence of positive sizes, got {grid}.")
    ndim = len(grid)
    axis_dim = dim // (2 * ndim) * 2
    if axis_dim == 0:
        raise ValueError(f"dim {dim} is too small for a {ndim}-d grid: each axis needs at least 2 channels.")
    half = axis_dim // 2
    # float64 then float32, as MAE does in numpy: positions times high frequencies lose digits in float32.
    omega = temperature ** (-torch.arange(half, dtype=torch.float64) / half)
    embed = torch.zeros(*grid, dim, dtype=torch.float64)
    axis_order = (1, 0, *range(2, ndim)) if ndim > 1 else (0,)
    for slot, axis in enumerate(axis_order):
        angles = torch.arange(grid[axis], dtype=torch.float64)[:, None] * omega
        view = [1] * ndim + [axis_dim]
        view[axis] = grid[axis]
        embed[..., slot * axis_dim : (slot + 1) * axis_dim] = torch.cat([angles.sin(), angles.cos()], -1).view(view)
    return embed.reshape(math.prod(grid), dim).float()
