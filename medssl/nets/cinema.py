"""CineMA's networks: convolutional view encoders, a shared ViT with a class token, multi-scale fusion, and the
ConvViT (classification / regression) and ConvUNetR (segmentation / heatmaps) task networks.

CineMA: Fu et al., 2025, "CineMA: A Foundation Model for Cine Cardiac MRI", https://arxiv.org/abs/2506.00679. Each
view (SAX stack in 3-D, LAX slice in 2-D) goes through its own convolutional encoder: a ``kernel = stride``
convolution + channel LayerNorm + GELU per stage (the first with ``patch_size``, later ones with ``scale_factor``),
depthwise 5x5(x5) blocks as in ConvNeXt (Liu et al., 2022, https://arxiv.org/abs/2201.03545) and ConvMAE (Gao et
al., 2022, https://arxiv.org/abs/2205.03892), then a patch embedding over ``scale_factor`` patches, a linear map and
fixed sin-cos positions. The tokens of all views, with one class token in front, run through one shared ViT; for
features the stage outputs are added back to the view's tokens (multi-scale fusion). These modules are
re-implemented from the published architecture description; parameter names are medssl's own (the strict map from
CineMA's checkpoint names is :mod:`medssl.interop.cinema_import`).

Unlike :class:`~medssl.nets.patch_embed.ConvStemPatchEmbed`, the depthwise blocks see neighbouring patches, so these
encoders run on whole images (no token dropping).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medssl.nets.patch_embed import ViewSpec
from medssl.nets.pos_embed import sincos_pos_embed
from medssl.nets.vit import ViTEncoder, check_view_images

__all__ = [
    "ChannelLayerNorm",
    "ConvNormAct",
    "DepthwiseConvBlock",
    "ConvResBlock",
    "CineMAViewEncoder",
    "MultiScaleFusion",
    "ClassTokenViT",
    "CineMAEncoder",
    "ConvViT",
    "ConvUNetRDecoder",
    "ConvUNetR",
    "CONVVIT_REDUCTIONS",
]

# CineMA's channel LayerNorm eps; its ViT LayerNorms keep PyTorch's 1e-5.
CHANNEL_NORM_EPS = 1e-6
CONVVIT_REDUCTIONS = ("all", "cls", "patch")


def _conv(ndim: int) -> type[nn.Module]:
    if ndim not in (2, 3):
        raise ValueError(f"CineMA's networks are 2-D (LAX) or 3-D (SAX), got {ndim} spatial axes.")
    return nn.Conv3d if ndim == 3 else nn.Conv2d


def _conv_transpose(ndim: int) -> type[nn.Module]:
    return nn.ConvTranspose3d if _conv(ndim) is nn.Conv3d else nn.ConvTranspose2d


def _tokens(feature_map: Tensor) -> Tensor:
    """``[B, C, *grid]`` -> ``[B, prod(grid), C]``, row-major over the grid."""
    return feature_map.flatten(2).transpose(1, 2)


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channel axis of ``[B, C, *spatial]`` feature maps, at every voxel (eps 1e-6 as CineMA).

    Args:
        channels: ``C``.
        eps: added to the variance.
    """

    def __init__(self, channels: int, eps: float = CHANNEL_NORM_EPS) -> None:
        super().__init__(channels, eps=eps)

    def forward(self, x: Tensor) -> Tensor:
        """Args: x ``[B, C, *spatial]``. Returns: the same shape."""
        return super().forward(x.movedim(1, -1)).movedim(-1, 1)


class ConvNormAct(nn.Module):
    """Down-sampling: a ``kernel = stride`` convolution, channel LayerNorm, GELU.

    Args:
        ndim: 2 or 3 spatial axes.
        in_channels: input channels.
        out_channels: output channels.
        stride: kernel and stride per axis.
    """

    def __init__(self, ndim: int, in_channels: int, out_channels: int, stride: Sequence[int]) -> None:
        super().__init__()
        self.conv = _conv(ndim)(in_channels, out_channels, kernel_size=tuple(stride), stride=tuple(stride))
        self.norm = ChannelLayerNorm(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        """Args: x ``[B, C_in, *spatial]``. Returns: ``[B, C_out, *(spatial / stride)]``."""
        return F.gelu(self.norm(self.conv(x)))


class DepthwiseConvBlock(nn.Module):
    """``x + conv2(dw_conv(conv1(norm1(x))))`` then ``x + fc2(GELU(fc1(norm2(x))))``, all 1x1 but ``dw_conv``.

    ``dw_conv`` is a depthwise ``kernel_size`` convolution (5, cubic for 3-D) with zero "same" padding; the MLP is a
    pair of 1x1 convolutions ``C -> mlp_ratio * C -> C``.

    Args:
        ndim: 2 or 3 spatial axes.
        channels: ``C``.
        kernel_size: depthwise kernel side (odd).
        mlp_ratio: MLP width over ``C``.
    """

    def __init__(self, ndim: int, channels: int, kernel_size: int = 5, mlp_ratio: int = 4) -> None:
        super().__init__()
        conv = _conv(ndim)
        self.norm1 = ChannelLayerNorm(channels)
        self.conv1 = conv(channels, channels, 1)
        self.dw_conv = conv(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)
        self.conv2 = conv(channels, channels, 1)
        self.norm2 = ChannelLayerNorm(channels)
        hidden = mlp_ratio * channels
        self.mlp = nn.ModuleDict({"fc1": conv(channels, hidden, 1), "fc2": conv(hidden, channels, 1)})

    def forward(self, x: Tensor) -> Tensor:
        """Args: x ``[B, C, *spatial]``. Returns: the same shape."""
        x = x + self.conv2(self.dw_conv(self.conv1(self.norm1(x))))
        return x + self.mlp["fc2"](F.gelu(self.mlp["fc1"](self.norm2(x))))


class ConvResBlock(nn.Module):
    """Pre-activation residual block: ``conv2(GELU(norm2(conv1(GELU(norm1(x)))))) + shortcut(x)``.

    The shortcut is a 1x1 convolution when the width changes, else the identity. With one input channel ``norm1``
    outputs its bias everywhere, so the image reaches the output through the shortcut only; CineMA's raw-image block
    is built this way and a faithful copy must be too.

    Args:
        ndim: 2 or 3 spatial axes.
        in_channels: input channels.
        out_channels: output channels.
        kernel_size: convolution side ("same" zero padding).
        dropout: dropout before ``conv2`` (training only).
    """

    def __init__(
        self, ndim: int, in_channels: int, out_channels: int, kernel_size: int = 3, dropout: float = 0.0
    ) -> None:
        super().__init__()
        conv = _conv(ndim)
        self.norm1 = ChannelLayerNorm(in_channels)
        self.conv1 = conv(in_channels, out_channels, kernel_size, padding=kernel_size // 2)
        self.norm2 = ChannelLayerNorm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = conv(out_channels, out_channels, kernel_size, padding=kernel_size // 2)
        self.shortcut = conv(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        """Args: x ``[B, C_in, *spatial]``. Returns: ``[B, C_out, *spatial]``."""
        h = self.conv1(F.gelu(self.norm1(x)))
        h = self.conv2(self.dropout(F.gelu(self.norm2(h))))
        return h + self.shortcut(x)


class _ConvStage(nn.Module):
    """One stage of a view encoder: :class:`ConvNormAct` down-sampling then depthwise blocks."""

    def __init__(self, ndim: int, in_channels: int, out_channels: int, stride: Sequence[int], num_blocks: int) -> None:
        super().__init__()
        self.down = ConvNormAct(ndim, in_channels, out_channels, stride)
        self.blocks = nn.Sequential(*(DepthwiseConvBlock(ndim, out_channels) for _ in range(num_blocks)))

    def forward(self, x: Tensor) -> Tensor:
        return self.blocks(self.down(x))


class CineMAViewEncoder(nn.Module):
    """One view's convolutional encoder: stages, patch embedding, linear map and fixed sin-cos positions.

    The effective patch of a token is ``patch_size * scale_factor ** len(conv_channels)`` per axis (CineMA:
    16x16x1 for SAX, 16x16 for LAX). Positions are :func:`~medssl.nets.pos_embed.sincos_pos_embed` over the token
    grid, a non-persistent buffer rebuilt from the geometry (CineMA's stored table is the same sin-cos table).

    Args:
        image_size: spatial size, 2 or 3 axes.
        in_channels: image channels (CineMA's classification and EF models stack 2 frames here).
        patch_size: kernel = stride of the first stage, per axis.
        scale_factor: kernel = stride of the later stages and of the patch embedding, per axis.
        conv_channels: stage widths (CineMA: 64, 128).
        num_blocks: depthwise blocks per stage (CineMA: 2).
        embed_dim: token width ``D``.

    Raises:
        ValueError: when the sizes disagree in length or the image size is not a multiple of the effective patch.
    """

    def __init__(
        self,
        image_size: Sequence[int],
        in_channels: int,
        patch_size: Sequence[int],
        scale_factor: Sequence[int],
        conv_channels: Sequence[int],
        num_blocks: int,
        embed_dim: int,
    ) -> None:
        super().__init__()
        ndim = len(image_size)
        if len(patch_size) != ndim or len(scale_factor) != ndim or not conv_channels:
            raise ValueError(
                f"image_size {tuple(image_size)}, patch_size {tuple(patch_size)} and scale_factor "
                f"{tuple(scale_factor)} need the same number of axes, and conv_channels at least one stage."
            )
        stages = len(conv_channels)
        self.effective_patch = tuple(int(p) * int(s) ** stages for p, s in zip(patch_size, scale_factor))
        self.spec = ViewSpec(tuple(image_size), self.effective_patch, in_channels)
        widths = [in_channels, *conv_channels]
        self.stages = nn.ModuleList(
            _ConvStage(ndim, widths[i], widths[i + 1], patch_size if i == 0 else scale_factor, num_blocks)
            for i in range(stages)
        )
        self.patch_embed = _conv(ndim)(conv_channels[-1], embed_dim, tuple(scale_factor), stride=tuple(scale_factor))
        self.linear = nn.Linear(embed_dim, embed_dim)
        self.register_buffer("pos_embed", sincos_pos_embed(self.spec.grid, embed_dim)[None], persistent=False)

    def forward(self, image: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Encode one view.

        Args:
            image: ``[B, C, *image_size]``.

        Returns:
            tokens ``[B, N, D]`` (row-major grid order, positioned) and the stage outputs ``[B, C_i, *size_i]``.
        """
        skips = []
        x = image
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        return self.linear(_tokens(self.patch_embed(x))) + self.pos_embed, skips


class MultiScaleFusion(nn.Module):
    """Add every encoder stage back to the view's ViT tokens, then LayerNorm (CineMA's multi-scale fusion).

    Stage ``i`` (of ``L``) is brought to the token grid by a ``kernel = stride = scale_factor ** (L - i)``
    convolution to ``D`` channels.

    Args:
        ndim: 2 or 3 spatial axes.
        conv_channels: stage widths.
        scale_factor: per-axis scale between stages (the first ``ndim`` values are used).
        embed_dim: token width ``D``.
    """

    def __init__(self, ndim: int, conv_channels: Sequence[int], scale_factor: Sequence[int], embed_dim: int) -> None:
        super().__init__()
        stages = len(conv_channels)
        kernels = [tuple(int(s) ** (stages - i) for s in scale_factor[:ndim]) for i in range(stages)]
        self.convs = nn.ModuleList(
            _conv(ndim)(width, embed_dim, kernel, stride=kernel) for width, kernel in zip(conv_channels, kernels)
        )
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, tokens: Tensor, skips: Sequence[Tensor]) -> Tensor:
        """Args: tokens ``[B, N, D]``; skips: the stage outputs. Returns: fused ``[B, N, D]``."""
        for conv, skip in zip(self.convs, skips):
            tokens = tokens + _tokens(conv(skip))
        return self.norm(tokens)


class ClassTokenViT(ViTEncoder):
    """:class:`~medssl.nets.vit.ViTEncoder` with a learnable class token prepended to every sequence (CineMA, ViT).

    ``forward_features`` (the interface of fine-tuning code) returns the other tokens only, so the class token
    attends but is not a patch; :meth:`forward_with_class_token` returns it too. Arguments as ``ViTEncoder``.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.cls_token = nn.Parameter(torch.randn(1, 1, self.embed_dim) * 0.02)

    def forward_with_class_token(self, tokens: Tensor) -> Tensor:
        """Args: tokens ``[B, N, D]``. Returns: ``[B, 1 + N, D]``, the class token first, after the final norm."""
        return super().forward_features(self._prepend(tokens), ())[0]

    def forward_features(self, tokens: Tensor, layers: Sequence[int]) -> tuple[Tensor, list[Tensor]]:
        """As ``ViTEncoder.forward_features``, with the class token removed from every output."""
        out, hidden = super().forward_features(self._prepend(tokens), layers)
        return out[:, 1:], [h[:, 1:] for h in hidden]

    def _prepend(self, tokens: Tensor) -> Tensor:
        return torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)


class CineMAEncoder(nn.Module):
    """CineMA's multi-view encoder: one :class:`CineMAViewEncoder` per view, one shared :class:`ClassTokenViT`, and
    (``fusion``) a :class:`MultiScaleFusion` per view.

    It also offers the interface of :class:`~medssl.nets.vit.MultiViewEncoder` that fine-tuning code uses
    (``views``, ``embed``, ``vit.forward_features``), so medssl's task networks can fine-tune it.

    Args:
        views: view name -> ``{"image_size", "in_channels"}``; 3 axes for SAX, 2 for LAX.
        patch_size: first-stage kernel per axis (3 values; 2-D views take the first 2).
        scale_factor: later-stage kernel per axis (3 values; likewise).
        conv_channels: stage widths.
        num_blocks: depthwise blocks per stage.
        embed_dim: token width.
        depth: ViT blocks.
        num_heads: attention heads.
        mlp_ratio: ViT MLP width over ``embed_dim``.
        drop_path_rate: stochastic depth of the last ViT block.
        fusion: build the multi-scale fusion (CineMA MAE and ConvViT; ConvUNetR has none).
        grad_checkpointing: recompute ViT blocks in the backward pass.

    Raises:
        ValueError: for no view, a non-identifier name, or an invalid geometry (naming the view).
    """

    def __init__(
        self,
        views: Mapping[str, Mapping],
        patch_size: Sequence[int],
        scale_factor: Sequence[int],
        conv_channels: Sequence[int],
        num_blocks: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        fusion: bool = True,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        if not views:
            raise ValueError("at least one view is needed.")
        self.embed_dim = embed_dim
        encoders = {}
        for name, spec in views.items():
            if not str(name).isidentifier():
                raise ValueError(f"view names must be Python identifiers, got {name!r}.")
            size = tuple(int(s) for s in spec["image_size"])
            ndim = len(size)
            try:
                encoders[name] = CineMAViewEncoder(
                    size,
                    int(spec.get("in_channels", 1)),
                    patch_size[:ndim],
                    scale_factor[:ndim],
                    conv_channels,
                    num_blocks,
                    embed_dim,
                )
            except ValueError as error:
                raise ValueError(f"view {name!r}: {error}") from error
        self.view_encoders = nn.ModuleDict(encoders)
        self.views = {name: encoder.spec for name, encoder in encoders.items()}
        self.fusion = None
        if fusion:
            self.fusion = nn.ModuleDict(
                {
                    name: MultiScaleFusion(len(spec.image_size), conv_channels, scale_factor, embed_dim)
                    for name, spec in self.views.items()
                }
            )
        self.vit = ClassTokenViT(embed_dim, depth, num_heads, mlp_ratio, True, drop_path_rate, grad_checkpointing)

    def embed_views(self, images: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, int], dict[str, list[Tensor]]]:
        """Run the view encoders and concatenate their tokens in the order of ``images``.

        Args:
            images: view name -> ``[B, C, *image_size]``.

        Returns:
            tokens ``[B, sum_v N_v, D]``, token count per view, and the stage outputs per view.

        Raises:
            ValueError: for an unknown view or an image of the wrong shape.
        """
        check_view_images(self.views, images)
        tokens, skips = {}, {}
        for name, image in images.items():
            tokens[name], skips[name] = self.view_encoders[name](image)
        counts = {name: t.shape[1] for name, t in tokens.items()}
        return torch.cat(list(tokens.values()), dim=1), counts, skips

    def embed(self, images: Mapping[str, Tensor], masks: Mapping | None = None) -> tuple[Tensor, dict[str, int]]:
        """:meth:`MultiViewEncoder.embed`'s interface: tokens of all patches and their count per view.

        Raises:
            ValueError: when masks are given (the depthwise blocks see across patches, so masked tokens cannot be
                dropped before the encoder), or see :meth:`embed_views`.
        """
        if masks:
            raise ValueError("CineMAEncoder encodes whole images; token masks are not supported.")
        tokens, counts, _ = self.embed_views(images)
        return tokens, counts

    def encode(self, images: Mapping[str, Tensor]) -> tuple[Tensor, dict[str, Tensor], dict[str, list[Tensor]]]:
        """Encode the views jointly, without fusion.

        Args:
            images: view name -> ``[B, C, *image_size]``.

        Returns:
            the class token ``[B, 1, D]``, view name -> ``[B, N_v, D]`` ViT outputs, and the stage outputs per view.
        """
        tokens, counts, skips = self.embed_views(images)
        out = self.vit.forward_with_class_token(tokens)
        return out[:, :1], dict(zip(counts, out[:, 1:].split(list(counts.values()), dim=1))), skips

    def forward(self, images: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """CineMA's feature extraction (no masking).

        Args:
            images: view name -> ``[B, C, *image_size]``; a view's features depend on the other views passed.

        Returns:
            ``{"cls": [B, 1, D], view: [B, N_v, D]}``: the class token after the final norm and each view's tokens,
            fused with its stage outputs when the encoder has fusion.
        """
        cls, tokens, skips = self.encode(images)
        if self.fusion is not None:
            tokens = {name: self.fusion[name](t, skips[name]) for name, t in tokens.items()}
        return {"cls": cls, **tokens}


def _encoder(
    views: Mapping[str, Mapping], encoder: Mapping, drop_path_rate: float, fusion: bool
) -> CineMAEncoder:
    return CineMAEncoder(views, **encoder, drop_path_rate=drop_path_rate, fusion=fusion)


class ConvViT(nn.Module):
    """CineMA's classification / regression network: :class:`CineMAEncoder` (with fusion) and linear heads.

    One head per view on the mean of the view's fused tokens and one on the class token. ``reduce="all"`` (CineMA's
    default) averages the predictions of every view head and the class head; ``"cls"`` uses the class head only,
    ``"patch"`` the mean of the view heads.

    Args:
        views: view name -> ``{"image_size", "in_channels"}`` (``in_channels`` = frames stacked as channels).
        out_channels: outputs (classes, 1 for a regression, 6 for three 2-D landmarks).
        encoder: :class:`CineMAEncoder` arguments other than ``views``, ``drop_path_rate`` and ``fusion``.
        drop_path_rate: stochastic depth (CineMA fine-tuning: 0.1).

    Raises:
        ValueError: when ``out_channels`` < 1, or see :class:`CineMAEncoder`.
    """

    def __init__(
        self, views: Mapping[str, Mapping], out_channels: int, encoder: Mapping, drop_path_rate: float = 0.0
    ) -> None:
        super().__init__()
        if out_channels < 1:
            raise ValueError(f"out_channels must be >= 1, got {out_channels}.")
        self.encoder = _encoder(views, encoder, drop_path_rate, fusion=True)
        width = self.encoder.embed_dim
        self.heads = nn.ModuleDict({name: nn.Linear(width, out_channels) for name in [*self.encoder.views, "cls"]})

    def forward(self, images: Mapping[str, Tensor] | Tensor, reduce: str = "all") -> Tensor:
        """Predict.

        Args:
            images: view name -> ``[B, C, *image_size]``, or one tensor for the first view.
            reduce: ``"all"``, ``"cls"`` or ``"patch"``.

        Returns:
            ``[B, out_channels]`` logits (or normalised regression outputs).

        Raises:
            ValueError: for an unknown ``reduce``, or invalid images.
        """
        if reduce not in CONVVIT_REDUCTIONS:
            raise ValueError(f"reduce must be one of {CONVVIT_REDUCTIONS}, got {reduce!r}.")
        if isinstance(images, Tensor):
            images = {next(iter(self.encoder.views)): images}
        features = self.encoder(images)
        cls = self.heads["cls"](features["cls"][:, 0])
        if reduce == "cls":
            return cls
        per_view = [self.heads[name](features[name].mean(dim=1)) for name in images]
        predictions = per_view if reduce == "patch" else [*per_view, cls]
        return torch.stack(predictions, dim=1).mean(dim=1)


class _UpBlock(nn.Module):
    """Transposed ``kernel = stride`` up-sampling, then two :class:`ConvResBlock`."""

    def __init__(self, ndim: int, in_channels: int, out_channels: int, stride: Sequence[int], dropout: float) -> None:
        super().__init__()
        self.up = _conv_transpose(ndim)(in_channels, out_channels, tuple(stride), stride=tuple(stride))
        self.convs = nn.Sequential(*(ConvResBlock(ndim, out_channels, out_channels, dropout=dropout) for _ in range(2)))

    def forward(self, x: Tensor, skip: Tensor | None) -> Tensor:
        x = self.up(x)
        return self.convs(x if skip is None else x + skip)


class ConvUNetRDecoder(nn.Module):
    """CineMA's ConvUNetR decoder for one view: encoder stages and ViT tokens -> per-voxel logits.

    Decoder inputs from fine to coarse: a :class:`ConvResBlock` on the raw image (full resolution), nothing at the
    levels the encoder skips (1/2 for CineMA), then one :class:`ConvResBlock` on each encoder stage, on the token
    grid and on the token grid down-sampled once more (``down``). From the coarsest, each up-block up-samples
    (``scale_factor``; the last ``patch_size``), adds the decoder input of its resolution and convolves; a 1x1
    convolution gives the logits. UNETR-like (Hatamizadeh et al., 2022, https://arxiv.org/abs/2103.10504).

    Args:
        ndim: 2 or 3 spatial axes.
        in_channels: image channels.
        conv_channels: the encoder's stage widths.
        embed_dim: token width.
        channels: decoder widths, full resolution first (CineMA: 32, 64, 128, 256, 512).
        out_channels: logits per voxel.
        patch_size: the last up-sampling, per axis.
        scale_factor: the other up-samplings and the extra down-sampling, per axis.
        dropout: dropout inside the residual blocks (training only).

    Raises:
        ValueError: when there are fewer decoder widths than encoder features + 1.
    """

    def __init__(
        self,
        ndim: int,
        in_channels: int,
        conv_channels: Sequence[int],
        embed_dim: int,
        channels: Sequence[int],
        out_channels: int,
        patch_size: Sequence[int],
        scale_factor: Sequence[int],
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        features = [*conv_channels, embed_dim, embed_dim]
        self.gaps = len(channels) - len(features)
        if self.gaps < 0:
            raise ValueError(
                f"decoder channels {list(channels)} need at least {len(features) + 1} levels for the encoder's "
                f"{len(features)} feature maps and the image."
            )
        conv = _conv(ndim)
        self.image_block = ConvResBlock(ndim, in_channels, channels[0], dropout=dropout)
        self.down = conv(embed_dim, embed_dim, tuple(scale_factor), stride=tuple(scale_factor))
        self.skip_blocks = nn.ModuleList(
            ConvResBlock(ndim, width, channels[self.gaps + j], dropout=dropout) for j, width in enumerate(features)
        )
        outs = [*reversed(channels[:-1]), channels[0]]
        ins = [channels[-1], *outs[:-1]]
        strides = [scale_factor] * (len(outs) - 1) + [patch_size]
        self.up_blocks = nn.ModuleList(
            _UpBlock(ndim, c_in, c_out, stride, dropout) for c_in, c_out, stride in zip(ins, outs, strides)
        )
        self.head = conv(channels[0], out_channels, 1)

    def forward(self, image: Tensor, skips: Sequence[Tensor], grid: Tensor) -> Tensor:
        """Decode.

        Args:
            image: ``[B, C, *image_size]``.
            skips: the encoder's stage outputs.
            grid: the view's ViT tokens on their grid, ``[B, D, *grid]``.

        Returns:
            ``[B, out_channels, *image_size]`` logits.
        """
        features = [*skips, grid, self.down(grid)]
        inputs = [self.image_block(image), *([None] * self.gaps)]
        inputs += [block(f) for block, f in zip(self.skip_blocks, features)]
        x = inputs[-1]
        for block, skip in zip(self.up_blocks, reversed(inputs[:-1])):
            x = block(x, skip)
        return self.head(x)


class ConvUNetR(nn.Module):
    """CineMA's segmentation / landmark-heatmap network: :class:`CineMAEncoder` (no fusion) and a
    :class:`ConvUNetRDecoder` per view.

    Args:
        views: view name -> ``{"image_size", "in_channels"}``.
        out_channels: logits per voxel (4 for background/RV/MYO/LV, 3 landmark heatmaps).
        encoder: :class:`CineMAEncoder` arguments other than ``views``, ``drop_path_rate`` and ``fusion``.
        decoder_channels: decoder widths, full resolution first.
        decoder_patch_size: last up-sampling per axis (3 values; 2-D views take the first 2).
        decoder_scale_factor: other up-samplings per axis (likewise).
        dropout: dropout in the decoder blocks.
        drop_path_rate: stochastic depth of the encoder.

    Raises:
        ValueError: see :class:`CineMAEncoder` and :class:`ConvUNetRDecoder`.
    """

    def __init__(
        self,
        views: Mapping[str, Mapping],
        out_channels: int,
        encoder: Mapping,
        decoder_channels: Sequence[int],
        decoder_patch_size: Sequence[int],
        decoder_scale_factor: Sequence[int],
        dropout: float = 0.0,
        drop_path_rate: float = 0.0,
    ) -> None:
        super().__init__()
        self.encoder = _encoder(views, encoder, drop_path_rate, fusion=False)
        self.decoders = nn.ModuleDict(
            {
                name: ConvUNetRDecoder(
                    len(spec.image_size),
                    spec.in_channels,
                    encoder["conv_channels"],
                    self.encoder.embed_dim,
                    decoder_channels,
                    out_channels,
                    decoder_patch_size[: len(spec.image_size)],
                    decoder_scale_factor[: len(spec.image_size)],
                    dropout,
                )
                for name, spec in self.encoder.views.items()
            }
        )

    def forward(self, image: Tensor, view: str | None = None) -> Tensor:
        """Segment one view (the calling convention of :class:`~medssl.tasks.segmentation.ViTSegmenter`).

        Args:
            image: ``[B, C, *image_size]``.
            view: the view; None for the first (tensor-in, tensor-out for MONAI's bundle tools).

        Returns:
            ``[B, out_channels, *image_size]`` logits.

        Raises:
            ValueError: for an unknown view or an image of the wrong shape.
        """
        view = next(iter(self.decoders)) if view is None else view
        _, tokens, skips = self.encoder.encode({view: image})
        spec = self.encoder.views[view]
        grid = tokens[view].transpose(1, 2).reshape(image.shape[0], -1, *spec.grid)
        return self.decoders[view](image, skips[view], grid)

