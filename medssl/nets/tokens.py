"""Tokens for N-d images: patch grids, ``patchify`` / ``unpatchify`` and token gathering.

Works for any number of spatial dims (2D, 3D, 2D+t, 3D+t) with a per-axis patch size. Tokens follow the row-major
order of the patch grid (last spatial axis fastest) and each token is the flattened patch in ``(*patch, C)`` order,
channel last, as in MAE (He et al., 2022, https://arxiv.org/abs/2111.06377) and MONAI's ``PatchEmbeddingBlock``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["grid_size", "patchify", "unpatchify", "gather_tokens"]


def grid_size(spatial_shape: Sequence[int], patch_size: Sequence[int]) -> tuple[int, ...]:
    """Number of patches along each spatial axis.

    Args:
        spatial_shape: image size per spatial axis, e.g. ``(H, W, S, T)``.
        patch_size: patch size per spatial axis, same length as ``spatial_shape``.

    Returns:
        The patch grid, ``spatial_shape[i] // patch_size[i]`` per axis.

    Raises:
        ValueError: when the lengths differ, a size is not positive, or an axis is not divisible by its patch size
            (the message names the axis).
    """
    spatial_shape, patch_size = tuple(int(s) for s in spatial_shape), tuple(int(p) for p in patch_size)
    if len(spatial_shape) != len(patch_size) or not spatial_shape:
        raise ValueError(
            f"spatial shape {spatial_shape} and patch size {patch_size} must have the same, non-zero number of axes."
        )
    for axis, (size, patch) in enumerate(zip(spatial_shape, patch_size)):
        if size <= 0 or patch <= 0:
            raise ValueError(f"axis {axis}: sizes must be positive, got image size {size} and patch size {patch}.")
        if size % patch:
            raise ValueError(
                f"axis {axis}: image size {size} is not divisible by patch size {patch} "
                f"(spatial shape {spatial_shape}, patch size {patch_size}); crop or pad the image to a multiple."
            )
    return tuple(size // patch for size, patch in zip(spatial_shape, patch_size))


def patchify(images: Tensor, patch_size: Sequence[int]) -> Tensor:
    """Cut images into non-overlapping patches and flatten each into a token.

    Args:
        images: ``[B, C, *spatial]`` with any number of spatial axes.
        patch_size: patch size per spatial axis.

    Returns:
        ``[B, N, prod(patch_size) * C]``: ``N = prod(grid)`` tokens in row-major grid order, each ordered
        ``(*patch, C)``.

    Raises:
        ValueError: when ``images`` has no spatial axis, the patch size has the wrong length, or an axis is not
            divisible by its patch size.
    """
    if images.ndim < 3:
        raise ValueError(
            f"images must be [B, C, *spatial] with at least one spatial axis, got shape {tuple(images.shape)}."
        )
    batch, channels, *spatial = images.shape
    grid = grid_size(spatial, patch_size)
    ndim = len(grid)
    # [B, C, g0, p0, g1, p1, ...] -> [B, g0, g1, ..., p0, p1, ..., C]
    split = images.reshape(batch, channels, *(n for pair in zip(grid, patch_size) for n in pair))
    order = (0, *range(2, 2 + 2 * ndim, 2), *range(3, 3 + 2 * ndim, 2), 1)
    return split.permute(order).reshape(batch, math.prod(grid), -1)


def unpatchify(tokens: Tensor, patch_size: Sequence[int], grid: Sequence[int], channels: int) -> Tensor:
    """Reassemble images from tokens; the exact inverse of :func:`patchify`.

    Args:
        tokens: ``[B, N, prod(patch_size) * channels]`` with ``N = prod(grid)``.
        patch_size: patch size per spatial axis.
        grid: number of patches per spatial axis, same length as ``patch_size``.
        channels: number of image channels ``C``.

    Returns:
        ``[B, C, *(grid[i] * patch_size[i])]``.

    Raises:
        ValueError: when ``grid`` and ``patch_size`` differ in length or ``tokens`` does not have the shape they imply.
    """
    patch_size, grid = tuple(int(p) for p in patch_size), tuple(int(g) for g in grid)
    if len(patch_size) != len(grid) or not grid:
        raise ValueError(f"grid {grid} and patch size {patch_size} must have the same, non-zero number of axes.")
    expected = (math.prod(grid), math.prod(patch_size) * channels)
    if tokens.ndim != 3 or tuple(tokens.shape[1:]) != expected:
        raise ValueError(
            f"tokens must be [B, {expected[0]}, {expected[1]}] for grid {grid}, patch size {patch_size} and "
            f"{channels} channels, got shape {tuple(tokens.shape)}."
        )
    ndim = len(grid)
    split = tokens.reshape(tokens.shape[0], *grid, *patch_size, channels)
    # [B, g0, ..., p0, ..., C] -> [B, C, g0, p0, g1, p1, ...]
    order = (0, 2 * ndim + 1, *(i for axis in range(ndim) for i in (1 + axis, 1 + ndim + axis)))
    return split.permute(order).reshape(tokens.shape[0], channels, *(g * p for g, p in zip(grid, patch_size)))


def gather_tokens(tokens: Tensor, ids: Tensor) -> Tensor:
    """Select tokens per sample by index (e.g. the visible tokens of a mask).

    Args:
        tokens: ``[B, N, D]``.
        ids: ``[B, K]`` integer indices into ``N``.

    Returns:
        ``[B, K, D]`` with ``out[b, k] = tokens[b, ids[b, k]]``.

    Raises:
        ValueError: when the shapes do not match or ``ids`` is not an integer tensor.
    """
    if tokens.ndim != 3 or ids.ndim != 2 or ids.shape[0] != tokens.shape[0]:
        raise ValueError(
            f"expected tokens [B, N, D] and ids [B, K], got tokens {tuple(tokens.shape)} and ids {tuple(ids.shape)}."
        )
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"ids must be an integer tensor, got dtype {ids.dtype}.")
    return torch.gather(tokens, 1, ids.long().unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
