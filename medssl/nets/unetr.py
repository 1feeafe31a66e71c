"""A UNETR-style convolutional decoder over ViT tokens, for 2-D and 3-D images.

UNETR: Hatamizadeh et al., 2022, "UNETR: Transformers for 3D Medical Image Segmentation", WACV,
https://arxiv.org/abs/2103.10504. The image's patch tokens are reshaped into a feature map on the patch grid; hidden
states of intermediate ViT blocks are projected and upsampled by transposed convolutions into skip features at
1/2, 1/4, ... of the image resolution, a convolutional block on the raw image gives the full-resolution skip, and a
chain of (upsample, concatenate skip, convolve) blocks climbs from the last ViT layer back to the image. CineMA
(Fu et al., 2025, https://arxiv.org/abs/2506.00679) fine-tunes its encoder for segmentation with such a decoder
(widths 32 to 512 at the published size). Built from MONAI's ``UnetrBasicBlock``, ``UnetrPrUpBlock``,
``UnetrUpBlock`` and ``UnetOutBlock``.

With a patch size of ``2**L`` the decoder has ``L`` levels: level ``k`` (``0 <= k < L``) works at ``1 / 2**k`` of
the image resolution with ``feature_size * 2**k`` channels. Patch axes of size 1 (a SAX stack's slice axis with
CineMA's 16x16x1 patches) are never up-sampled.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock
from torch import Tensor, nn

from medssl.nets.tokens import grid_size

__all__ = ["decoder_levels", "hidden_state_layers", "UNETRDecoder"]


def decoder_levels(patch_size: Sequence[int]) -> int:
    """Number of 2x up-sampling levels ``L`` from the patch grid to the image, ``log2`` of the largest patch side.

    Args:
        patch_size: patch size per axis; every side must be 1 or the same power of two ``2**L`` (``L >= 1``),
            e.g. ``(16, 16, 1)``, ``(8, 8)``.

    Returns:
        ``L``.

    Raises:
        ValueError: when a side is neither 1 nor the common power of two (MONAI's up-sampling blocks use one stride
            for every step, so mixed factors such as ``(16, 16, 2)`` cannot be climbed with them).
    """
    sides = tuple(int(p) for p in patch_size)
    largest = max(sides, default=0)
    levels = int(round(math.log2(largest))) if largest > 1 else 0
    if levels < 1 or 2**levels != largest or any(side not in (1, largest) for side in sides):
        raise ValueError(
            f"a UNETR decoder needs every patch side to be 1 or the same power of two >= 2, got patch size {sides}."
        )
    return levels


def hidden_state_layers(depth: int, levels: int) -> list[int]:
    """0-based ViT blocks whose outputs feed the skip connections, evenly spread as in UNETR.

    UNETR takes blocks 3, 6 and 9 of 12 (1-based) for its 1/2, 1/4 and 1/8 skips; block ``k * depth // levels``
    (1-based) feeds the skip at ``1 / 2**k``, ``k = 1 .. levels - 1``, so shallower blocks feed finer skips.

    Args:
        depth: ViT blocks (>= 1).
        levels: decoder levels ``L`` (>= 1).

    Returns:
        ``levels - 1`` block indices in ``[0, depth)``, finest skip first.

    Raises:
        ValueError: when ``depth`` or ``levels`` is below 1.
    """
    if depth < 1 or levels < 1:
        raise ValueError(f"depth and levels must be >= 1, got {depth} and {levels}.")
    return [max(k * depth // levels - 1, 0) for k in range(1, levels)]


class UNETRDecoder(nn.Module):
    """UNETR decoder: ViT tokens (last and intermediate blocks) plus the image -> per-voxel class logits.

    Args:
        spatial_dims: 2 or 3.
        image_size: spatial size of the images, e.g. ``(96, 96, 8)``.
        patch_size: the encoder's patch size; every side 1 or the same ``2**L``.
        in_channels: image channels (the full-resolution skip convolves the raw image).
        embed_dim: token width ``D``.
        out_channels: classes ``K`` (4 for background, RV, MYO, LV).
        feature_size: channels at full resolution; level ``k`` has ``feature_size * 2**k`` (UNETR: 16; CineMA's
            decoder spans 32 to 512).
        norm_name: MONAI normalisation of the convolutional blocks (UNETR: ``"instance"``).
        res_block: residual convolutional blocks (UNETR: True).

    Raises:
        ValueError: when ``spatial_dims`` is not 2 or 3, the sizes disagree with it or do not divide, or the patch
            size is not UNETR-compatible (see :func:`decoder_levels`).
    """

    def __init__(
        self,
        spatial_dims: int,
        image_size: Sequence[int],
        patch_size: Sequence[int],
        in_channels: int,
        embed_dim: int,
        out_channels: int,
        feature_size: int = 16,
        norm_name: str | tuple = "instance",
        res_block: bool = True,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3) or len(image_size) != spatial_dims:
            raise ValueError(
                f"spatial_dims must be 2 or 3 and match image_size, got {spatial_dims} and {tuple(image_size)}."
            )
        if feature_size < 1 or out_channels < 1 or in_channels < 1:
            raise ValueError(
                f"feature_size, out_channels and in_channels must be >= 1, got {feature_size}, {out_channels}, "
                f"{in_channels}."
            )
        self.grid = grid_size(image_size, patch_size)
        self.levels = decoder_levels(patch_size)
        self.embed_dim = embed_dim
        # One 2x step on the axes the patch spans, none on size-1 axes.
        step = tuple(2 if int(p) > 1 else 1 for p in patch_size)
        width = [feature_size * 2**k for k in range(self.levels)]
        common = {"spatial_dims": spatial_dims, "norm_name": norm_name}
        self.image_skip = UnetrBasicBlock(
            in_channels=in_channels, out_channels=width[0], kernel_size=3, stride=1, res_block=res_block, **common
        )
        self.token_skips = nn.ModuleList(
            UnetrPrUpBlock(
                in_channels=embed_dim,
                out_channels=width[k],
                num_layer=self.levels - k - 1,
                kernel_size=3,
                stride=1,
                upsample_kernel_size=step,
                conv_block=True,
                res_block=res_block,
                **common,
            )
            for k in range(1, self.levels)
        )
        # ups[j] climbs from level L - j to level L - j - 1.
        self.ups = nn.ModuleList(
            UnetrUpBlock(
                in_channels=embed_dim if k == self.levels else width[k],
                out_channels=width[k - 1],
                kernel_size=3,
                upsample_kernel_size=step,
                res_block=res_block,
                **common,
            )
            for k in range(self.levels, 0, -1)
        )
        self.head = UnetOutBlock(spatial_dims, width[0], out_channels)

    def _feature_map(self, tokens: Tensor) -> Tensor:
        """``[B, N, D]`` tokens in grid order -> ``[B, D, *grid]``."""
        return tokens.transpose(1, 2).reshape(tokens.shape[0], self.embed_dim, *self.grid)

    def forward(self, image: Tensor, tokens: Tensor, hidden: Sequence[Tensor]) -> Tensor:
        """Decode.

        Args:
            image: ``[B, C, *image_size]``, the encoder's input.
            tokens: ``[B, N, D]`` output of the last ViT block (after its norm), all ``N = prod(grid)`` tokens in
                grid order.
            hidden: ``L - 1`` tensors ``[B, N, D]`` from the blocks of :func:`hidden_state_layers`, finest skip
                first.

        Returns:
            ``[B, out_channels, *image_size]`` logits.

        Raises:
            ValueError: when the tokens do not cover the grid or the number of hidden states is not ``L - 1``.
        """
        expected = (math.prod(self.grid), self.embed_dim)
        shapes = [tuple(t.shape) for t in (tokens, *hidden)]
        if len(hidden) != self.levels - 1 or any(len(s) != 3 or s[1:] != expected for s in shapes):
            raise ValueError(
                f"expected tokens and {self.levels - 1} hidden states, each [B, {expected[0]}, {expected[1]}], got "
                f"{len(hidden)} hidden states and shapes {shapes}."
            )
        skips = [self.image_skip(image)]
        skips += [block(self._feature_map(h)) for block, h in zip(self.token_skips, hidden)]
        x = self._feature_map(tokens)
        for up, skip in zip(self.ups, reversed(skips)):
            x = up(x, skip)
        return self.head(x)
