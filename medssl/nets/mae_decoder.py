"""Light-weight MAE decoder shared by one or more image views.

MAE: He et al., 2022, "Masked Autoencoders Are Scalable Vision Learners", https://arxiv.org/abs/2111.06377. The
multi-view form (one decoder over the tokens of all views, a prediction head per view) follows CineMA (Fu et al.,
2025, https://arxiv.org/abs/2506.00679).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from medssl.masking.base import MaskOutput
from medssl.nets.patch_embed import ViewSpec
from medssl.nets.tokens import gather_tokens
from medssl.nets.vit import OneDNNLinear, ViewPositions, ViTEncoder, check_mask, new_view_embeddings, parse_views

__all__ = ["MAEDecoder"]


class MAEDecoder(nn.Module):
    """Project encoded visible tokens, fill in mask tokens, restore grid order, decode all views jointly and predict
    every patch's pixels with a per-view linear head.

    Per view: ``embed`` (encoder width -> decoder width), append ``N_v - K_v`` copies of a learnable mask token,
    un-shuffle with ``ids_restore``, add the view's fixed sin-cos positions (and a learnable view embedding); then
    the views are concatenated and go through transformer blocks and a LayerNorm, and each view's tokens through its
    own head to ``prod(patch_size) * C`` values.

    Parameter names: ``embed.*``, ``mask_token``, ``view_embed.<view>``, ``transformer.*``, ``heads.<view>.*``.

    Args:
        views: view name -> :class:`~medssl.nets.patch_embed.ViewSpec` or its mapping form.
        encoder_dim: width of the encoder tokens.
        decoder_dim: decoder width (MAE 512; CineMA base 512).
        depth: decoder blocks (MAE 8; CineMA base 8).
        num_heads: decoder attention heads (MAE 16).
        mlp_ratio: MLP inner width over ``decoder_dim``.
        qkv_bias: bias on the ``qkv`` projections.
        view_embedding: add a learnable embedding per view.
        grad_checkpointing: recompute decoder blocks in the backward pass.

    Raises:
        ValueError: for invalid views or a width that is not a multiple of ``num_heads``.
    """

    def __init__(
        self,
        views: Mapping[str, ViewSpec | Mapping],
        encoder_dim: int,
        decoder_dim: int = 128,
        depth: int = 2,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        view_embedding: bool = True,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.views = parse_views(views)
        self.embed = OneDNNLinear(encoder_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.randn(1, 1, decoder_dim) * 0.02)
        self.view_embed = new_view_embeddings(self.views, decoder_dim) if view_embedding else None
        self.positions = ViewPositions(self.views, decoder_dim)
        self.transformer = ViTEncoder(
            decoder_dim, depth, num_heads, mlp_ratio, qkv_bias, grad_checkpointing=grad_checkpointing
        )
        self.heads = nn.ModuleDict(
            {name: OneDNNLinear(decoder_dim, spec.patch_dim) for name, spec in self.views.items()}
        )
        nn.init.xavier_uniform_(self.embed.weight)
        nn.init.zeros_(self.embed.bias)
        for head in self.heads.values():
            nn.init.xavier_uniform_(head.weight)
            nn.init.zeros_(head.bias)

    def forward(self, latents: Mapping[str, Tensor], masks: Mapping[str, MaskOutput]) -> dict[str, Tensor]:
        """Predict all patches of each view.

        Args:
            latents: view name -> ``[B, K_v, encoder_dim]`` encoded visible tokens in ``ids_keep`` order.
            masks: view name -> the mask that selected them (``ids_restore`` ``[B, N_v]``).

        Returns:
            View name -> ``[B, N_v, prod(patch_size) * C]`` predictions in grid order, for visible and masked tokens.

        Raises:
            ValueError: for an unknown view, a missing mask, or shapes that do not match the mask or view.
        """
        return self.predict(self.transformer(self.tokens(latents, masks)), list(latents))

    def tokens(self, latents: Mapping[str, Tensor], masks: Mapping[str, MaskOutput]) -> Tensor:
        """The decoder's input: embedded visible tokens and mask tokens of every view, in grid order, positioned.

        Args:
            latents: as :meth:`forward`.
            masks: as :meth:`forward`.

        Returns:
            ``[B, sum_v N_v, decoder_dim]``, the views concatenated in the order of ``latents``.

        Raises:
            ValueError: as :meth:`forward`.
        """
        if not latents:
            raise ValueError(f"no latents given; expected some of {list(self.views)}.")
        parts = []
        for name, latent in latents.items():
            if name not in self.views or name not in masks:
                raise ValueError(f"view {name!r} needs a known view ({list(self.views)}) and a mask ({list(masks)}).")
            spec, mask = self.views[name], masks[name]
            check_mask(name, mask, latent.shape[0], spec.num_tokens)
            if latent.ndim != 3 or latent.shape[1] != mask.ids_keep.shape[1]:
                raise ValueError(
                    f"view {name!r}: latents must be [B, K, D] with K = {mask.ids_keep.shape[1]} visible tokens, "
                    f"got shape {tuple(latent.shape)}."
                )
            x = self.embed(latent)
            filler = self.mask_token.to(x.dtype).expand(x.shape[0], spec.num_tokens - x.shape[1], -1)
            x = gather_tokens(torch.cat([x, filler], 1), mask.ids_restore) + self.positions(name)
            if self.view_embed is not None:
                x = x + self.view_embed[name]
            parts.append(x)
        return torch.cat(parts, 1) if len(parts) > 1 else parts[0]

    def predict(self, decoded: Tensor, names: Sequence[str]) -> dict[str, Tensor]:
        """Split decoded tokens by view and predict each view's patches with its head.

        Args:
            decoded: ``[B, sum_v N_v, decoder_dim]`` for the views ``names``, in that order.
            names: the views, as given to :meth:`tokens`.

        Returns:
            View name -> ``[B, N_v, prod(patch_size) * C]``.
        """
        sizes = [self.views[name].num_tokens for name in names]
        return {name: self.heads[name](x) for name, x in zip(names, decoded.split(sizes, dim=1))}
