"""MemMC-MAE: a memory-augmented, multi-level cross-attentional masked autoencoder for anomaly detection.

Tian et al., 2023, "Unsupervised Anomaly Detection in Medical Images with a Memory-augmented Multi-level
Cross-attentional Masked Autoencoder", MLMI 2023 (LNCS 14349), https://arxiv.org/abs/2203.11725 (no official code).
A masked autoencoder trained on normal images only: every encoder block's self-attention also attends to a learnable
memory of normal patterns (memory slots joined to its keys and values, :class:`~medssl.nets.vit.SelfAttention`), and
every decoder block cross-attends to the encoder's features at several levels (block outputs). A large mask ratio
hides most of an anomaly; where it stays visible, the memory and the cross-attention pull the reconstruction towards
normal patterns, so anomalies reconstruct badly. The anomaly map of an image is its reconstruction error under
several random masks (:func:`anomaly_maps`); the image score is the map's mean (or the mean of its top fraction).

Sizes, memory size and levels here are medssl's choices for CPU runs; the paper's exact settings are not public as
code.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from medssl.masking import MaskGenerator, MaskOutput, RandomMasking
from medssl.methods.mae import MultiViewMAE
from medssl.nets.mae_decoder import MAEDecoder
from medssl.nets.patch_embed import ViewSpec
from medssl.nets.tokens import patchify, unpatchify
from medssl.nets.vit import OneDNNLinear, init_transformer_weights
from medssl.objectives import masked_reconstruction_images

__all__ = [
    "CrossAttention",
    "MultiLevelCrossAttentionDecoder",
    "MemMCMAE",
    "complementary_masks",
    "anomaly_maps",
    "reconstruction_error_maps",
    "image_scores",
]


class CrossAttention(nn.Module):
    """Pre-norm residual multi-head cross-attention: ``x + proj(attention(q(norm(x)), k(context), v(context)))``.

    Args:
        dim: width ``D`` of the queries and the context.
        num_heads: heads; ``D`` must be a multiple of it.
        qkv_bias: bias on the query and key/value projections.

    Raises:
        ValueError: when ``dim`` is not a positive multiple of ``num_heads``.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim <= 0 or num_heads <= 0 or dim % num_heads:
            raise ValueError(f"width {dim} must be a positive multiple of num_heads {num_heads}.")
        self.num_heads = num_heads
        self.norm = nn.LayerNorm(dim)
        self.q = OneDNNLinear(dim, dim, bias=qkv_bias)
        self.kv = OneDNNLinear(dim, 2 * dim, bias=qkv_bias)
        self.proj = OneDNNLinear(dim, dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        """Args: x ``[B, N, D]`` queries; context ``[B, L, D]`` (already normalised). Returns ``[B, N, D]``."""
        batch, length, dim = x.shape
        heads, head_dim = self.num_heads, dim // self.num_heads
        q = self.q(self.norm(x)).view(batch, length, heads, head_dim).transpose(1, 2)
        k, v = self.kv(context).view(batch, context.shape[1], 2, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        out = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, length, dim)
        return x + self.proj(out)


class MultiLevelCrossAttentionDecoder(MAEDecoder):
    """MAE decoder whose blocks also cross-attend to the encoder's features at several levels (MemMC-MAE's decoder).

    The decoder tokens are MAE's (embedded visible latents and mask tokens, positioned; :meth:`MAEDecoder.tokens`).
    The context is the concatenation over levels ``l`` of ``embed_l(LayerNorm_l(h_l)) + level_embed[l]``, ``h_l`` the
    encoder's visible tokens after block ``levels[l]``. Each decoder block ``i`` is ``cross[i]`` (queries: decoder
    tokens; keys and values: the context of all levels) followed by MAE's self-attention block
    ``transformer.blocks[i]``; then the final norm and the per-view heads (Tian et al., 2023,
    https://arxiv.org/abs/2203.11725).

    Args:
        views: view name -> geometry (see :class:`~medssl.nets.mae_decoder.MAEDecoder`).
        encoder_dim: encoder width.
        num_levels: number of encoder levels given to :meth:`forward` (>= 1).
        decoder_dim, depth, num_heads, mlp_ratio, qkv_bias, view_embedding: as :class:`MAEDecoder`.

    Raises:
        ValueError: for ``num_levels`` < 1 and as :class:`MAEDecoder`.
    """

    def __init__(
        self,
        views: Mapping[str, ViewSpec | Mapping],
        encoder_dim: int,
        num_levels: int,
        decoder_dim: int = 128,
        depth: int = 2,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        view_embedding: bool = True,
    ) -> None:
        if num_levels < 1:
            raise ValueError(f"num_levels must be at least 1, got {num_levels}.")
        super().__init__(views, encoder_dim, decoder_dim, depth, num_heads, mlp_ratio, qkv_bias, view_embedding)
        self.level_norms = nn.ModuleList(nn.LayerNorm(encoder_dim) for _ in range(num_levels))
        self.level_embeds = nn.ModuleList(OneDNNLinear(encoder_dim, decoder_dim) for _ in range(num_levels))
        self.level_embed = nn.Parameter(torch.randn(num_levels, 1, decoder_dim) * 0.02)
        self.context_norm = nn.LayerNorm(decoder_dim)
        self.cross = nn.ModuleList(CrossAttention(decoder_dim, num_heads, qkv_bias) for _ in range(depth))
        for module in (self.level_norms, self.level_embeds, self.context_norm, self.cross):
            module.apply(init_transformer_weights)

    def context(self, levels: Sequence[Tensor]) -> Tensor:
        """The cross-attention context of encoder features.

        Args:
            levels: one ``[B, K, encoder_dim]`` per level (the encoder's visible tokens after a block).

        Returns:
            ``[B, num_levels * K, decoder_dim]``, the levels in the order given.

        Raises:
            ValueError: when the number of levels differs from ``num_levels`` or their shapes differ.
        """
        if len(levels) != len(self.level_norms) or any(h.shape != levels[0].shape for h in levels):
            raise ValueError(
                f"expected {len(self.level_norms)} encoder levels of one shape [B, K, D], got shapes "
                f"{[tuple(h.shape) for h in levels]}."
            )
        parts = [
            embed(norm(h)) + self.level_embed[index]
            for index, (h, norm, embed) in enumerate(zip(levels, self.level_norms, self.level_embeds))
        ]
        return self.context_norm(torch.cat(parts, 1))

    def forward(  # type: ignore[override]
        self, latents: Mapping[str, Tensor], masks: Mapping[str, MaskOutput], levels: Sequence[Tensor]
    ) -> dict[str, Tensor]:
        """Predict all patches of each view, cross-attending to the encoder levels.

        Args:
            latents: view name -> ``[B, K_v, encoder_dim]`` encoded visible tokens in ``ids_keep`` order.
            masks: view name -> its mask.
            levels: one ``[B, sum_v K_v, encoder_dim]`` per level.

        Returns:
            View name -> ``[B, N_v, prod(patch_size) * C]`` predictions in grid order.

        Raises:
            ValueError: as :meth:`MAEDecoder.forward` and :meth:`context`.
        """
        x, context = self.tokens(latents, masks), self.context(levels)
        for cross, block in zip(self.cross, self.transformer.blocks):
            x = block(cross(x, context))
        return self.predict(self.transformer.norm(x), list(latents))


class MemMCMAE(MultiViewMAE):
    """MemMC-MAE on one image of any number of spatial axes; the batch key is ``"image"`` (as
    :class:`~medssl.methods.mae.MaskedAutoencoder`, so the same data, loss and :func:`anomaly_maps` serve both).

    Tian et al., 2023, https://arxiv.org/abs/2203.11725: the encoder's blocks have memory-augmented self-attention
    (``memory_slots`` learnable key/value slots each), the decoder is a
    :class:`MultiLevelCrossAttentionDecoder` over the encoder levels ``levels``; the loss is MAE's mean squared error
    on the hidden patches (:func:`~medssl.objectives.masked_reconstruction_loss`). Train on normal images only.

    Args:
        image_size: spatial size per axis.
        patch_size: patch size per axis (dividing ``image_size``).
        in_channels: image channels.
        embed_dim, depth, num_heads: encoder width, blocks and heads.
        decoder_dim, decoder_depth, decoder_num_heads: decoder width, blocks and heads.
        mlp_ratio: MLP inner width over the block width.
        mask_ratio: fraction of patches hidden (ignored when ``masking`` is given); "large" in the paper.
        memory_slots: memory slots per encoder block (>= 1).
        levels: 0-based encoder blocks whose outputs the decoder attends to; None for every block.
        norm_pix_loss: reconstruct per-patch normalised pixels.
        drop_path_rate: encoder stochastic depth.
        patch_embed: ``"linear"`` or ``"conv_stem"``.
        masking: a custom mask generator instead of random masking.

    Raises:
        ValueError: for sizes that do not divide, a bad mask ratio, ``memory_slots`` < 1, or levels that are not
            distinct block indices.
    """

    def __init__(
        self,
        image_size: Sequence[int],
        patch_size: Sequence[int],
        in_channels: int = 1,
        embed_dim: int = 192,
        depth: int = 4,
        num_heads: int = 3,
        decoder_dim: int = 128,
        decoder_depth: int = 2,
        decoder_num_heads: int = 4,
        mlp_ratio: float = 4.0,
        mask_ratio: float = 0.75,
        memory_slots: int = 16,
        levels: Sequence[int] | None = None,
        norm_pix_loss: bool = False,
        drop_path_rate: float = 0.0,
        patch_embed: str = "linear",
        masking: MaskGenerator | None = None,
    ) -> None:
        if memory_slots < 1:
            raise ValueError(f"memory_slots must be at least 1 (use MaskedAutoencoder for none), got {memory_slots}.")
        levels = tuple(range(depth)) if levels is None else tuple(int(level) for level in levels)
        if not levels or len(set(levels)) != len(levels) or any(not 0 <= level < depth for level in levels):
            raise ValueError(f"levels {list(levels)} must be distinct encoder block indices in [0, {depth}).")
        views = {"image": {"image_size": image_size, "patch_size": patch_size, "in_channels": in_channels}}
        super().__init__(
            views=views,
            masking=RandomMasking(mask_ratio) if masking is None else masking,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            decoder_dim=decoder_dim,
            decoder_depth=decoder_depth,
            decoder_num_heads=decoder_num_heads,
            mlp_ratio=mlp_ratio,
            norm_pix_loss=norm_pix_loss,
            drop_path_rate=drop_path_rate,
            patch_embed=patch_embed,
            view_embedding=False,
            memory_slots=memory_slots,
        )
        self.levels = levels
        # Replaces MultiViewMAE's plain MAE decoder: same token and head layout, plus the multi-level cross-attention.
        self.decoder = MultiLevelCrossAttentionDecoder(
            self.views, embed_dim, len(levels), decoder_dim, decoder_depth, decoder_num_heads, mlp_ratio,
            view_embedding=False,
        )

    def reconstruct(self, images: Mapping[str, Tensor], masks: Mapping[str, MaskOutput]) -> dict[str, Tensor]:
        """Encode the visible patches through the memory-augmented encoder, keep its ``levels`` and decode.

        Args:
            images: ``{"image": [B, C, *image_size]}``.
            masks: ``{"image": mask}``.

        Returns:
            ``{"image": [B, N, P]}`` predictions in :func:`~medssl.nets.tokens.patchify` layout.

        Raises:
            ValueError: for invalid images or masks.
        """
        tokens, counts = self.encoder.embed(images, masks)
        latent, levels = self.encoder.vit.forward_features(tokens, self.levels)
        latents = dict(zip(counts, latent.split(list(counts.values()), dim=1)))
        return self.decoder(latents, masks, levels)


def complementary_masks(orders: Tensor, num_keep: int, num_masks: int, batch: int) -> list[MaskOutput]:
    """Masks whose visible sets are consecutive blocks of random patch orders: each round of ``N // num_keep`` masks
    shows every patch at most once, so with two or more masks per round every patch is hidden at least once.

    Mask ``k`` uses order ``k // (N // num_keep)`` rolled left by ``(k mod (N // num_keep)) * num_keep``; the same
    masks serve every sample, so an image's map does not depend on the rest of its batch.

    Args:
        orders: ``[R, N]`` long, random permutations of the ``N`` patches (``R >= ceil(num_masks / (N // num_keep))``).
        num_keep: visible patches per mask (``1 <= num_keep <= N // 2``).
        num_masks: masks ``K`` to build.
        batch: batch size ``B``.

    Returns:
        ``K`` masks, each :class:`~medssl.masking.MaskOutput` over ``B`` samples.

    Raises:
        ValueError: when ``num_keep`` leaves fewer than two masks per round or there are too few orders.
    """
    num_tokens = orders.shape[1]
    per_round = num_tokens // num_keep if num_keep > 0 else 0
    if per_round < 2:
        raise ValueError(
            f"{num_keep} visible of {num_tokens} patches leave fewer than two disjoint masks: anomaly maps need a mask "
            "ratio of at least 0.5 so that every patch is hidden by one of them."
        )
    if orders.shape[0] < math.ceil(num_masks / per_round):
        raise ValueError(f"{num_masks} masks of {per_round} per order need more than {orders.shape[0]} orders.")
    positions = torch.arange(num_tokens, device=orders.device).expand(batch, num_tokens)
    masks = []
    for k in range(num_masks):
        shuffle = orders[k // per_round].roll(-(k % per_round) * num_keep).expand(batch, num_tokens)
        restore = torch.empty_like(shuffle).scatter_(1, shuffle, positions)
        masks.append(MaskOutput(ids_keep=shuffle[:, :num_keep], ids_restore=restore, mask=restore >= num_keep))
    return masks


def _check_fraction(top_fraction: float) -> None:
    if not 0.0 < top_fraction <= 1.0:
        raise ValueError(f"top_fraction must lie in (0, 1], got {top_fraction}.")


def _single_view(model: MultiViewMAE) -> tuple[str, ViewSpec]:
    if len(model.views) != 1:
        raise ValueError(f"anomaly maps need a single-view model, got views {list(model.views)}.")
    return next(iter(model.views.items()))


@torch.no_grad()
def anomaly_maps(
    model: MultiViewMAE,
    images: Tensor,
    num_masks: int = 8,
    generator: torch.Generator | None = None,
    orders: Tensor | None = None,
    top_fraction: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Pixel anomaly maps and image scores from the reconstruction error under ``K`` random masks (MemMC-MAE's
    inference, Tian et al., 2023, https://arxiv.org/abs/2203.11725; works for any single-view masked autoencoder).

    Each mask hides the model's share of patches (:func:`complementary_masks`); the pixels of a hidden patch get the
    squared error of its reconstruction (averaged over channels, in pixel units also under ``norm_pix_loss``); a
    pixel's score is the mean of its errors over the masks that hid it (:func:`reconstruction_error_maps`); the image
    score is :func:`image_scores` of the map.

    Args:
        model: a single-view :class:`~medssl.methods.mae.MultiViewMAE` (:class:`MemMCMAE`, ``MaskedAutoencoder``),
            called in its current mode (put it in eval mode first).
        images: ``[B, C, *image_size]``.
        num_masks: masks ``K`` (>= 2).
        generator: random source of the patch orders (on the images' device); a seed gives the same maps.
        orders: fixed ``[R, N]`` patch orders instead of drawing them (e.g. an exported network's buffer).
        top_fraction: the image score is the mean of this highest fraction of the map's pixels (1: the mean).

    Returns:
        ``(maps [B, 1, *image_size], scores [B])``.

    Raises:
        ValueError: for a multi-view model, ``num_masks`` < 2, ``top_fraction`` outside ``(0, 1]``, images that do
            not fit the model (naming the shapes), or a mask ratio below 0.5.
    """
    _check_fraction(top_fraction)
    maps = reconstruction_error_maps(model, images, num_masks, generator, orders)
    return maps, image_scores(maps, top_fraction)


@torch.no_grad()
def reconstruction_error_maps(
    model: MultiViewMAE,
    images: Tensor,
    num_masks: int = 8,
    generator: torch.Generator | None = None,
    orders: Tensor | None = None,
) -> Tensor:
    """The pixel maps of :func:`anomaly_maps` alone (traceable with fixed ``orders``, e.g. for TorchScript export).

    Args:
        model, images, num_masks, generator, orders: as :func:`anomaly_maps`.

    Returns:
        ``[B, 1, *image_size]``.

    Raises:
        ValueError: as :func:`anomaly_maps`.
    """
    if num_masks < 2:
        raise ValueError(f"num_masks must be at least 2 so that every patch is hidden once, got {num_masks}.")
    name, spec = _single_view(model)
    model.encoder.check_images({name: images})
    num_tokens, num_keep = spec.num_tokens, model.masking[name].num_keep(spec.grid)
    if orders is None:
        rounds = math.ceil(num_masks / max(1, num_tokens // num_keep))
        noise = torch.rand(rounds, num_tokens, device=images.device, generator=generator)
        orders = noise.argsort(dim=1)
    errors = images.new_zeros(images.shape[0], 1, *spec.image_size)
    counts = torch.zeros_like(errors)
    for mask in complementary_masks(orders, num_keep, num_masks, images.shape[0]):
        pred = model.reconstruct({name: images}, {name: mask})[name]
        completed = masked_reconstruction_images(
            images, pred, mask.mask, spec.patch_size, norm_pix=model.norm_pix_loss
        )["reconstruction"]
        hidden = patchify(torch.ones_like(images[:, :1]), spec.patch_size) * mask.mask.unsqueeze(-1)
        errors += (completed - images).square().mean(dim=1, keepdim=True)  # zero on visible patches
        counts += unpatchify(hidden, spec.patch_size, spec.grid, 1)
    return errors / counts


def image_scores(maps: Tensor, top_fraction: float = 1.0, margin: int = 0) -> Tensor:
    """Image anomaly scores: the mean of the highest ``top_fraction`` of each map's pixels.

    Args:
        maps: ``[B, C, *spatial]`` anomaly maps.
        top_fraction: fraction of pixels averaged, in ``(0, 1]`` (1: the whole map's mean; at least one pixel).
        margin: pixels left out along every edge of every spatial axis (e.g. a radiograph's collimation edges and
            markers), >= 0 and leaving at least one pixel.

    Returns:
        ``[B]``.

    Raises:
        ValueError: for ``top_fraction`` outside ``(0, 1]`` or a margin that is negative or leaves no pixel.
    """
    _check_fraction(top_fraction)
    spatial = maps.shape[2:]
    if isinstance(margin, bool) or int(margin) != margin or margin < 0 or 2 * margin >= min(spatial, default=0):
        raise ValueError(f"margin must be a whole number of pixels >= 0 that leaves part of the {list(spatial)} map, "
                         f"got {margin}.")
    if margin:
        maps = maps[(slice(None), slice(None), *(slice(margin, -margin) for _ in spatial))]
    flat = maps.flatten(1)
    return flat.topk(max(1, round(top_fraction * flat.shape[1])), dim=1).values.mean(dim=1)
