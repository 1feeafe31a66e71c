"""Patch embeddings for N-d images (2D, 3D, 2D+t, 3D+t) that work on patch tokens, so masked patches are never embedded.

Both embeddings take the output of :func:`medssl.nets.tokens.patchify` (or the visible subset of it) and return one
vector per patch:

- :class:`PatchEmbed`: one linear map per patch, identical to a convolution with ``kernel = stride = patch`` (the
  ViT patch embedding of Dosovitskiy et al., 2021, https://arxiv.org/abs/2010.11929) but defined for any number of
  axes.
- :class:`ConvStemPatchEmbed`: a small convolutional stem in the spirit of CineMA (Fu et al., 2025,
  https://arxiv.org/abs/2506.00679; ConvMAE, Gao et al., 2022, https://arxiv.org/abs/2205.03892): a stride-4
  stage then two stride-2 stages (per axis), LayerNorm + GELU between stages, reaching e.g. an effective 16x16x1
  patch. Every stage has ``kernel = stride``, so a token depends on its own patch only: masked patches cannot leak
  into visible tokens and the stem can run on the visible patches alone. CineMA's depthwise 5x5 blocks and
  multi-scale fusion, which see across patches and need a masked convolution, are left out on purpose.

A convolution with ``kernel = stride`` is a space-to-depth rearrangement followed by a matrix product; that is how
both modules compute it, which makes them fast on CPU and valid beyond three axes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from medssl.nets.tokens import grid_size

__all__ = ["ViewSpec", "PatchEmbed", "ConvStemPatchEmbed", "conv_stem_strides", "build_patch_embed", "PATCH_EMBEDS"]


@dataclass(frozen=True)
class ViewSpec:
    """Geometry of one image view: its size, patch size and channels.

    Args:
        image_size: spatial size per axis, e.g. ``(H, W, S)`` for a SAX stack, ``(H, W, T)`` for a LAX cine.
        patch_size: patch size per axis, dividing ``image_size``.
        in_channels: image channels ``C``.

    Raises:
        ValueError: when the sizes disagree in length, are not positive or do not divide, or ``in_channels`` < 1.
    """

    image_size: tuple[int, ...]
    patch_size: tuple[int, ...]
    in_channels: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_size", tuple(int(s) for s in self.image_size))
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        if self.in_channels < 1:
            raise ValueError(f"in_channels must be at least 1, got {self.in_channels}.")
        grid_size(self.image_size, self.patch_size)  # validates lengths and divisibility

    @classmethod
    def of(cls, spec: ViewSpec | Mapping) -> ViewSpec:
        """Build from a mapping ``{"image_size": [...], "patch_size": [...], "in_channels": 1}`` or pass through.

        Raises:
            ValueError: when keys are missing or unknown, or the geometry is invalid.
        """
        if isinstance(spec, ViewSpec):
            return spec
        unknown = set(spec) - {"image_size", "patch_size", "in_channels"}
        missing = {"image_size", "patch_size"} - set(spec)
        if unknown or missing:
            raise ValueError(
                f"a view spec needs image_size, patch_size and optionally in_channels; missing {sorted(missing)}, "
                f"unknown {sorted(unknown)}."
            )
        return cls(tuple(spec["image_size"]), tuple(spec["patch_size"]), int(spec.get("in_channels", 1)))

    @property
    def grid(self) -> tuple[int, ...]:
        """Patches per axis."""
        return grid_size(self.image_size, self.patch_size)

    @property
    def num_tokens(self) -> int:
        """Number of patches ``N``."""
        return math.prod(self.grid)

    @property
    def patch_dim(self) -> int:
        """Values per patch token, ``prod(patch_size) * in_channels``."""
        return math.prod(self.patch_size) * self.in_channels


def _check_patches(patches: Tensor, patch_dim: int) -> None:
    if patches.ndim != 3 or patches.shape[-1] != patch_dim:
        raise ValueError(f"patches must be [B, K, {patch_dim}] (patchify output), got shape {tuple(patches.shape)}.")


class PatchEmbed(nn.Module):
    """Linear patch embedding for any number of axes, equal to a ``kernel = stride = patch`` convolution.

    Args:
        patch_size: patch size per axis.
        in_channels: image channels ``C``.
        embed_dim: output width ``D``.
    """

    def __init__(self, patch_size: Sequence[int], in_channels: int, embed_dim: int) -> None:
        super().__init__()
        self.patch_size = tuple(int(p) for p in patch_size)
        self.patch_dim = math.prod(self.patch_size) * in_channels
        self.proj = nn.Linear(self.patch_dim, embed_dim)
        # MAE initialises the patch projection like a linear layer: Xavier on the flattened kernel.
        nn.init.xavier_uniform_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, patches: Tensor) -> Tensor:
        """Embed patches.

        Args:
            patches: ``[B, K, prod(patch_size) * C]`` from :func:`medssl.nets.tokens.patchify`, any subset of tokens.

        Returns:
            ``[B, K, embed_dim]``.

        Raises:
            ValueError: when ``patches`` does not have the patch width.
        """
        _check_patches(patches, self.patch_dim)
        return self.proj(patches)


def conv_stem_strides(patch_size: Sequence[int], num_stages: int = 3) -> list[tuple[int, ...]]:
    """Per-axis strides of a stem whose stages multiply to the patch: the later stages halve where they can.

    For CineMA's 16x16x1 patch and three stages this gives ``(4, 4, 1), (2, 2, 1), (2, 2, 1)``; an 8x8x2 patch gives
    ``(2, 2, 1), (2, 2, 1), (2, 2, 2)``.

    Args:
        patch_size: patch size per axis.
        num_stages: number of stages (at least 1).

    Returns:
        ``num_stages`` stride tuples whose per-axis product is ``patch_size``.

    Raises:
        ValueError: when ``num_stages`` < 1 or a patch size is not positive.
    """
    if num_stages < 1 or min(patch_size, default=0) < 1:
        raise ValueError(f"need num_stages >= 1 and positive patch sizes, got {num_stages} and {tuple(patch_size)}.")
    strides: list[tuple[int, ...]] = []
    remaining = [int(p) for p in patch_size]
    for _ in range(num_stages - 1):
        stage = tuple(2 if r % 2 == 0 else 1 for r in remaining)
        remaining = [r // s for r, s in zip(remaining, stage)]
        strides.insert(0, stage)
    return [tuple(remaining), *strides]


def _space_to_depth(x: Tensor, stride: Sequence[int]) -> Tensor:
    """``[M, *size, C]`` -> ``[M, *(size / stride), prod(stride) * C]``, each block ordered ``(*stride, C)``."""
    batch, *size, channels = x.shape
    ndim = len(size)
    grid = [s // k for s, k in zip(size, stride)]
    split = x.reshape(batch, *(n for pair in zip(grid, stride) for n in pair), channels)
    order = (0, *range(1, 2 * ndim, 2), *range(2, 2 * ndim + 1, 2), 2 * ndim + 1)
    return split.permute(order).reshape(batch, *grid, -1)


class ConvStemPatchEmbed(nn.Module):
    """Convolutional stem on each patch: ``kernel = stride`` stages with LayerNorm + GELU between them.

    Stage ``i`` is a convolution with kernel and stride ``strides[i]`` (computed as space-to-depth + linear); the
    per-axis product of the strides is the patch size, so the last stage leaves one vector per patch.

    Args:
        patch_size: patch size per axis, e.g. ``(16, 16, 1)``.
        in_channels: image channels ``C``.
        embed_dim: output width ``D``.
        channels: widths of the intermediate stages (CineMA: 64, 128); the stem has ``len(channels) + 1`` stages.
        strides: per-stage strides; default :func:`conv_stem_strides` (stride 4, then 2, 2 for a 16 patch).

    Raises:
        ValueError: when the strides do not multiply to ``patch_size`` per axis or their count does not match
            ``channels``.
    """

    def __init__(
        self,
        patch_size: Sequence[int],
        in_channels: int,
        embed_dim: int,
        channels: Sequence[int] = (64, 128),
        strides: Sequence[Sequence[int]] | None = None,
    ) -> None:
        super().__init__()
        self.patch_size = tuple(int(p) for p in patch_size)
        self.in_channels = in_channels
        self.patch_dim = math.prod(self.patch_size) * in_channels
        stage_strides = conv_stem_strides(self.patch_size, len(channels) + 1) if strides is None else strides
        self.strides = [tuple(int(s) for s in stride) for stride in stage_strides]
        products = tuple(math.prod(axis) for axis in zip(*self.strides))
        if len(self.strides) != len(channels) + 1 or products != self.patch_size:
            raise ValueError(
                f"strides {self.strides} must be {len(channels) + 1} stages whose per-axis product is the patch size "
                f"{self.patch_size}, got product {products}."
            )
        widths = [in_channels, *channels, embed_dim]
        self.stages = nn.ModuleList(
            nn.Linear(math.prod(stride) * c_in, c_out) for stride, c_in, c_out in zip(self.strides, widths, widths[1:])
        )
        self.norms = nn.ModuleList(nn.LayerNorm(c) for c in channels)

    def forward(self, patches: Tensor) -> Tensor:
        """Embed patches.

        Args:
            patches: ``[B, K, prod(patch_size) * C]`` from :func:`medssl.nets.tokens.patchify`.

        Returns:
            ``[B, K, embed_dim]``.

        Raises:
            ValueError: when ``patches`` does not have the patch width.
        """
        _check_patches(patches, self.patch_dim)
        batch, count, _ = patches.shape
        x = patches.reshape(batch * count, *self.patch_size, self.in_channels)
        for index, (stride, stage) in enumerate(zip(self.strides, self.stages)):
            x = stage(_space_to_depth(x, stride))
            if index < len(self.norms):
                x = F.gelu(self.norms[index](x))
        return x.reshape(batch, count, -1)


PATCH_EMBEDS = {"linear": PatchEmbed, "conv_stem": ConvStemPatchEmbed}


def build_patch_embed(kind: str, patch_size: Sequence[int], in_channels: int, embed_dim: int) -> nn.Module:
    """Patch embedding by name.

    Args:
        kind: ``"linear"`` (:class:`PatchEmbed`) or ``"conv_stem"`` (:class:`ConvStemPatchEmbed`).
        patch_size: patch size per axis.
        in_channels: image channels.
        embed_dim: output width.

    Returns:
        The module, mapping ``[B, K, prod(patch_size) * in_channels]`` to ``[B, K, embed_dim]``.

    Raises:
        ValueError: when ``kind`` is unknown.
    """
    if kind not in PATCH_EMBEDS:
        raise ValueError(f"unknown patch embedding {kind!r}; choose one of {sorted(PATCH_EMBEDS)}.")
    return PATCH_EMBEDS[kind](patch_size, in_channels, embed_dim)
