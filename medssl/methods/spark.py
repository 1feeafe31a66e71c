"""SparK: sparse and hierarchical masked modelling for MONAI CNNs, 2D and 3D.

Tian et al., 2023, "Designing BERT for Convolutional Networks: Sparse and Hierarchical Masked Modeling", ICLR,
https://arxiv.org/abs/2301.03580 (code: github.com/keyu-tian/SparK, MIT). Medical study: Wolf et al., 2023 (ResNet-50
on LIDC-IDRI CT slices; SparK degrades least as fine-tuning labels shrink).

A fraction of the cells of the encoder's coarsest grid (60 %, each a 32 x 32 patch for a 2D ResNet-50) is hidden;
the CNN encodes the visible cells as a sparse image (:class:`~medssl.nets.sparse.SparseEncoder`). At every scale of
the encoder the sparse features are densified: a sparse norm, a learnable per-scale mask token in the hidden
positions, a projection convolution. A light UNet-style decoder upsamples from the coarsest scale by transposed
convolutions, adding the densified features of each scale, and predicts the pixels; the loss is the mean squared
error to per-patch normalised pixels on the hidden patches only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from monai.networks.blocks import Convolution, UpSample
from monai.networks.layers import Conv
from torch import Generator, Tensor, nn

from medssl.errors import ConfigError, DataError
from medssl.masking import MaskGenerator, RandomMasking
from medssl.nets.sparse import SparseBatchNorm, SparseEncoder, SparseInstanceNorm
from medssl.nets.tokens import patchify
from medssl.objectives import masked_reconstruction_images, masked_reconstruction_loss

__all__ = ["SPARK_ENCODER_PREFIX", "decoder_path", "SparKDecoder", "SparK"]

#: Prefix of the CNN's parameters in a :class:`SparK` ``state_dict``; stripped (or via ``encoder_state_dict()``),
#: the keys load strictly into the plain MONAI network the method was built from.
SPARK_ENCODER_PREFIX = "encoder.network."

_DENSIFY_NORMS = {"batch": SparseBatchNorm, "instance": SparseInstanceNorm}


def decoder_path(feature_strides: Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
    """The strides a decoder passes through from the encoder's coarsest scale to the input resolution.

    The path visits every stage stride, coarse to fine, then stride 1; between two of them each step halves the
    remaining ratio on every axis where it is even (an odd ratio is undone in one step). SparK's 2D ResNet path:
    32, 16, 8, 4, 2, 1.

    Args:
        feature_strides: the per-axis stride of every encoder stage.

    Returns:
        the strides, coarsest first, ending in all ones.

    Raises:
        ConfigError: when the stage strides do not divide each other (no single path visits them all).
    """
    strides = {tuple(int(s) for s in stride) for stride in feature_strides}
    targets = sorted(strides | {(1,) * len(next(iter(strides)))}, key=math.prod, reverse=True)
    path = [targets[0]]
    for target in targets[1:]:
        if any(coarse % fine for coarse, fine in zip(path[-1], target)):
            raise ConfigError(f"stage strides {sorted(strides)} do not divide each other; no decoder path visits all.")
        while path[-1] != target:
            ratios = [coarse // fine for coarse, fine in zip(path[-1], target)]
            path.append(tuple(c // (2 if r % 2 == 0 else r) for c, r in zip(path[-1], ratios)))
    return path


class SparKDecoder(nn.Module):
    """SparK's light UNet-style decoder (Tian et al., 2023, https://arxiv.org/abs/2301.03580), N-d.

    From the coarsest scale, each block upsamples by a transposed convolution (MONAI ``UpSample``, ``"deconv"``:
    kernel = stride = the step's factor, which also covers anisotropic 3D steps; SparK uses kernel 4, stride 2) and
    applies conv-norm-ReLU6 and conv-norm (3 x 3), halving the width; the densified features of a scale are added
    where the path reaches it; a 1 x 1 convolution maps to pixels.

    Args:
        spatial_dims: 2 or 3.
        path: strides from :func:`decoder_path`, coarsest first.
        width: channels at the coarsest scale (SparK: 768), halved at each step.
        out_channels: predicted image channels.
        norm: MONAI norm of the decoder blocks (SparK: ``"batch"``).

    Raises:
        ConfigError: when ``width`` cannot be halved ``len(path) - 1`` times.
    """

    def __init__(
        self,
        spatial_dims: int,
        path: Sequence[Sequence[int]],
        width: int = 768,
        out_channels: int = 1,
        norm: str | tuple = "batch",
    ) -> None:
        super().__init__()
        self.widths = [width // 2**step for step in range(len(path))]
        if self.widths[-1] < 1:
            raise ConfigError(f"decoder width {width} cannot be halved {len(path) - 1} times (path {list(path)}).")
        blocks = []
        for step, (coarse, fine) in enumerate(zip(path[:-1], path[1:])):
            width_in, width_out = self.widths[step], self.widths[step + 1]
            factor = tuple(c // f for c, f in zip(coarse, fine))
            blocks.append(
                nn.Sequential(
                    UpSample(spatial_dims, width_in, width_in, scale_factor=factor, mode="deconv"),
                    Convolution(spatial_dims, width_in, width_in, kernel_size=3, norm=norm, act="relu6", bias=False),
                    Convolution(spatial_dims, width_in, width_out, kernel_size=3, norm=norm, act=None, bias=False),
                )
            )
        self.blocks = nn.ModuleList(blocks)
        self.head = Conv[Conv.CONV, spatial_dims](self.widths[-1], out_channels, kernel_size=1)

    def forward(self, features: Sequence[Tensor | None]) -> Tensor:
        """Decode densified features into pixels.

        Args:
            features: one ``[B, widths[k], *spatial_k]`` map or None per path scale; the first is required.

        Returns:
            ``[B, out_channels, *spatial]`` at the input resolution.

        Raises:
            ValueError: when the number of maps differs from the path's or the first is None.
        """
        if len(features) != len(self.widths) or features[0] is None:
            raise ValueError(f"need {len(self.widths)} feature maps (or None after the first), got {len(features)}.")
        out = features[0]
        for block, feature in zip(self.blocks, features[1:]):
            out = block(out)
            if feature is not None:
                out = out + feature
        return self.head(out)


class SparK(nn.Module):
    """SparK pre-training of a MONAI CNN (Tian et al., 2023, ICLR, https://arxiv.org/abs/2301.03580).

    ``forward(batch)`` masks ``batch[image_key]`` on the encoder's coarsest grid, encodes it sparsely, densifies each
    scale (sparse norm, per-scale mask token in hidden positions, projection conv: 1 x 1 at the coarsest scale,
    3 x 3 elsewhere), decodes and returns the loss on hidden patches. When several stages share a scale (a UNet's
    last down block and bottom) the deepest one is decoded. After pre-training, :meth:`encoder_state_dict` loads
    strictly into the plain network.

    Args:
        network: the MONAI CNN (e.g. ``monai.networks.nets.resnet50(spatial_dims=2, n_input_channels=1)``,
            ``UNet``, ``DynUNet``); copied unless ``inplace``.
        image_size: the pre-training input size (divisible by the encoder's total stride).
        stages: encoder stages for networks without defaults (see :func:`~medssl.nets.sparse.encoder_stages`).
        mask_ratio: fraction of grid cells hidden (SparK: 0.6); ignored when ``masking`` is given.
        masking: a custom mask generator over the grid.
        decoder_width: decoder channels at the coarsest scale (SparK: 768).
        densify_norm: ``"batch"`` (SparK, for ResNets) or ``"instance"`` sparse norm of the densifying step.
        decoder_norm: MONAI norm of the decoder blocks (SparK: ``"batch"``).
        norm_pix_loss: per-patch normalised pixel targets (SparK: on).
        image_key: the batch key of the images.
        inplace: convert ``network`` itself.

    Raises:
        ConfigError: as :class:`~medssl.nets.sparse.SparseEncoder` (unsparsifiable layers are named), for an unknown
            ``densify_norm``, or stage strides that do not divide each other.
        DataError: when ``image_size`` is smaller than one mask patch or not a multiple of it.
        ValueError: when the mask ratio leaves no visible cell on ``image_size``'s grid.
    """

    def __init__(
        self,
        network: nn.Module,
        image_size: Sequence[int],
        stages: Sequence[Sequence[str]] | None = None,
        mask_ratio: float = 0.6,
        masking: MaskGenerator | None = None,
        decoder_width: int = 768,
        densify_norm: str = "batch",
        decoder_norm: str | tuple = "batch",
        norm_pix_loss: bool = True,
        image_key: str = "image",
        inplace: bool = False,
    ) -> None:
        super().__init__()
        if densify_norm not in _DENSIFY_NORMS:
            raise ConfigError(f"densify_norm must be one of {sorted(_DENSIFY_NORMS)}, got {densify_norm!r}.")
        self.encoder = SparseEncoder(network, image_size, stages=stages, inplace=inplace)
        self.masking = RandomMasking(mask_ratio) if masking is None else masking
        self.masking.num_keep(self.encoder.mask_grid(image_size))
        self.norm_pix_loss = norm_pix_loss
        self.image_key = image_key
        path = decoder_path(self.encoder.feature_strides)
        # The deepest stage of each scale: later stages overwrite earlier ones of the same stride.
        deepest = {stride: index for index, stride in enumerate(self.encoder.feature_strides)}
        self.decoded_stages = {path.index(stride): index for stride, index in deepest.items()}
        self.decoder = SparKDecoder(
            self.encoder.spatial_dims, path, decoder_width, self.encoder.in_channels, norm=decoder_norm
        )
        conv = Conv[Conv.CONV, self.encoder.spatial_dims]
        norms, tokens, projections = [], [], []
        for scale, index in sorted(self.decoded_stages.items()):
            channels, kernel = self.encoder.feature_channels[index], 1 if scale == 0 else 3
            norms.append(_DENSIFY_NORMS[densify_norm](channels, self.encoder.sparse_mask, affine=True))
            tokens.append(nn.Parameter(torch.zeros(1, channels, *(1,) * self.encoder.spatial_dims)))
            projections.append(conv(channels, self.decoder.widths[scale], kernel, padding=kernel // 2))
        self.densify_norms = nn.ModuleList(norms)
        self.mask_tokens = nn.ParameterList(tokens)
        self.densify_projections = nn.ModuleList(projections)
        for token in self.mask_tokens:
            nn.init.trunc_normal_(token, std=0.02, a=-0.02, b=0.02)

    def images(self, batch: Mapping[str, object]) -> Tensor:
        """The batch's images ``[B, C, *spatial]``.

        Raises:
            DataError: when ``image_key`` is missing or not a tensor.
        """
        images = batch.get(self.image_key) if isinstance(batch, Mapping) else None
        if not isinstance(images, Tensor):
            keys = sorted(map(str, batch)) if isinstance(batch, Mapping) else type(batch).__name__
            raise DataError(f"the batch has no '{self.image_key}' image tensor; its keys are {keys}.")
        return images

    def densify(self, features: Sequence[Tensor], active: Tensor) -> list[Tensor | None]:
        """SparK's densifying step: sparse norm, mask tokens in hidden positions, projection, per decoded scale.

        Args:
            features: the encoder's stage outputs.
            active: the ``[B, 1, *grid]`` visibility mask they were encoded under.

        Returns:
            one map (or None) per decoder path scale, with the decoder's width at that scale.
        """
        dense: list[Tensor | None] = [None] * len(self.decoder.widths)
        with self.encoder.sparse_mask.masked(active):
            for slot, (scale, index) in enumerate(sorted(self.decoded_stages.items())):
                normed = self.densify_norms[slot](features[index])
                filled = torch.where(self.encoder.sparse_mask.like(normed), normed, self.mask_tokens[slot])
                dense[scale] = self.densify_projections[slot](filled)
        return dense

    def forward(self, batch: Mapping[str, object], generator: Generator | None = None) -> dict:
        """Mask, encode, densify, decode and score a batch.

        Args:
            batch: ``{image_key: [B, C, *spatial], ...}``; other keys are ignored.
            generator: random source of the masks (on the images' device).

        Returns:
            ``{"loss": scalar, "pred": [B, N, P] predicted patches (normalised pixels under norm_pix_loss, in
            :func:`~medssl.nets.tokens.patchify` layout with patch = ``encoder.downsample``), "mask": [B, N] bool,
            True = hidden}``, ``N`` the cells of the grid.

        Raises:
            DataError: for a missing image, images of the wrong rank or channels, or smaller than one mask patch or
                not a multiple of it.
        """
        images = self.images(batch)
        if images.ndim != self.encoder.spatial_dims + 2:
            raise DataError(
                f"'{self.image_key}' must be [B, C, {self.encoder.spatial_dims} spatial axes], got "
                f"{tuple(images.shape)}."
            )
        grid = self.encoder.mask_grid(images.shape[2:])
        hidden = self.masking(images.shape[0], grid, device=images.device, generator=generator).mask
        active = ~hidden.view(images.shape[0], 1, *grid)
        pred = self.decoder(self.densify(self.encoder(images, active), active))
        patch = self.encoder.downsample
        pred_patches = patchify(pred, patch)
        loss = masked_reconstruction_loss(pred_patches, patchify(images, patch), hidden, norm_pix=self.norm_pix_loss)
        return {"loss": loss, "pred": pred_patches, "mask": hidden}

    @torch.no_grad()
    def reconstruction_images(self, batch: Mapping[str, object], output: Mapping) -> dict[str, dict[str, Tensor]]:
        """``{image_key: {"input", "masked", "reconstruction"}}`` images ``[B, C, *spatial]`` of a :meth:`forward`
        output on ``batch``, for the engine's reconstruction figures (see
        :func:`~medssl.objectives.masked_reconstruction_images`).
        """
        images = self.images(batch)
        figures = masked_reconstruction_images(
            images, output["pred"], output["mask"], self.encoder.downsample, norm_pix=self.norm_pix_loss
        )
        return {self.image_key: figures}

    def encoder_state_dict(self) -> dict[str, Tensor]:
        """The CNN's weights under the plain MONAI network's own names (the keys after :data:`SPARK_ENCODER_PREFIX`),
        for ``network.load_state_dict(..., strict=True)``.
        """
        return self.encoder.network.state_dict()
