"""Masked autoencoders: the generic multi-view machinery and the single-image MAE.

MAE: He et al., 2022, "Masked Autoencoders Are Scalable Vision Learners", https://arxiv.org/abs/2111.06377. Random
patches are hidden, the encoder sees only the visible ones, a light decoder predicts the pixels of every patch and
the loss is the mean squared error on the hidden patches (optionally against per-patch normalised pixels).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from medssl.masking import MaskGenerator, MaskOutput, RandomMasking
from medssl.nets.mae_decoder import MAEDecoder
from medssl.nets.patch_embed import ViewSpec
from medssl.nets.tokens import patchify
from medssl.nets.vit import MultiViewEncoder
from medssl.objectives import masked_reconstruction_images, masked_reconstruction_loss

__all__ = ["ENCODER_PREFIX", "MultiViewMAE", "MaskedAutoencoder"]

#: Prefix of the encoder's parameters in a masked autoencoder's ``state_dict``; strip it (or use
#: ``encoder_state_dict()``) to load them strictly into a :class:`~medssl.nets.vit.MultiViewEncoder` of the same
#: configuration.
ENCODER_PREFIX = "encoder."


class MultiViewMAE(nn.Module):
    """Masked autoencoder over one or more image views with one shared encoder and one shared decoder.

    Each view present in a batch is masked by its own generator; the visible tokens of all views are encoded
    together (:class:`~medssl.nets.vit.MultiViewEncoder`) and decoded together (:class:`~medssl.nets.mae_decoder.
    MAEDecoder`); the loss is :func:`~medssl.objectives.masked_reconstruction_loss` per view, averaged over the views
    present. Masks are drawn on the images' device, view after view in the model's view order, from ``generator``.

    Args:
        views: view name -> ``{"image_size": [...], "patch_size": [...], "in_channels": 1}`` (or a ``ViewSpec``).
        masking: one mask generator for all views, or one per view name.
        embed_dim: encoder width.
        depth: encoder blocks.
        num_heads: encoder heads.
        decoder_dim: decoder width.
        decoder_depth: decoder blocks.
        decoder_num_heads: decoder heads.
        mlp_ratio: MLP inner width over the block width.
        norm_pix_loss: reconstruct per-patch normalised pixels (MAE's ``norm_pix_loss``).
        drop_path_rate: encoder stochastic depth.
        patch_embed: ``"linear"`` or ``"conv_stem"``.
        view_embedding: learnable per-view embeddings in encoder and decoder.
        grad_checkpointing: recompute transformer blocks in the backward pass to save memory.
        memory_slots: learnable memory slots joined to the keys and values of every encoder block (see
            :class:`~medssl.nets.vit.SelfAttention`; 0: plain attention).

    Raises:
        ValueError: for invalid views, sizes, or a masking mapping that misses a view.
    """

    def __init__(
        self,
        views: Mapping[str, ViewSpec | Mapping],
        masking: MaskGenerator | Mapping[str, MaskGenerator],
        embed_dim: int = 192,
        depth: int = 4,
        num_heads: int = 3,
        decoder_dim: int = 128,
        decoder_depth: int = 2,
        decoder_num_heads: int = 4,
        mlp_ratio: float = 4.0,
        norm_pix_loss: bool = False,
        drop_path_rate: float = 0.0,
        patch_embed: str = "linear",
        view_embedding: bool = True,
        grad_checkpointing: bool = False,
        memory_slots: int = 0,
    ) -> None:
        super().__init__()
        self.encoder = MultiViewEncoder(
            views,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            drop_path_rate=drop_path_rate,
            patch_embed=patch_embed,
            view_embedding=view_embedding,
            grad_checkpointing=grad_checkpointing,
            memory_slots=memory_slots,
        )
        self.views = self.encoder.views
        self.decoder = MAEDecoder(
            self.views,
            encoder_dim=embed_dim,
            decoder_dim=decoder_dim,
            depth=decoder_depth,
            num_heads=decoder_num_heads,
            mlp_ratio=mlp_ratio,
            view_embedding=view_embedding,
            grad_checkpointing=grad_checkpointing,
        )
        if isinstance(masking, MaskGenerator):
            masking = {name: masking for name in self.views}
        missing = set(self.views) - set(masking)
        if missing:
            raise ValueError(f"masking has no generator for views {sorted(missing)}.")
        self.masking = {name: masking[name] for name in self.views}
        for name, spec in self.views.items():
            self.masking[name].num_keep(spec.grid)  # fails now, not mid-training, if a ratio leaves nothing visible
        self.norm_pix_loss = norm_pix_loss

    def view_images(self, batch: Mapping[str, object]) -> dict[str, Tensor]:
        """The view images of a batch, in model view order; other keys are ignored.

        Raises:
            ValueError: when the batch has none of the views.
        """
        images = {name: batch[name] for name in self.views if name in batch}
        if not images:
            raise ValueError(
                f"the batch has none of the views {list(self.views)}; its keys are {sorted(map(str, batch))}."
            )
        return images

    def draw_masks(
        self, images: Mapping[str, Tensor], generator: torch.Generator | None = None
    ) -> dict[str, MaskOutput]:
        """Draw one mask per view image, on the images' device.

        Args:
            images: view name -> ``[B, C, *image_size]``.
            generator: random source; the same seed gives the same masks.

        Returns:
            View name -> mask over the view's patch grid.

        Raises:
            ValueError: for invalid images.
        """
        batch = self.encoder.check_images(images)
        return {
            name: self.masking[name](batch, self.views[name].grid, device=image.device, generator=generator)
            for name, image in images.items()
        }

    def reconstruct(self, images: Mapping[str, Tensor], masks: Mapping[str, MaskOutput]) -> dict[str, Tensor]:
        """Encode the visible patches and predict every patch.

        Args:
            images: view name -> ``[B, C, *image_size]``.
            masks: view name -> its mask (e.g. from :meth:`draw_masks`).

        Returns:
            View name -> ``[B, N_v, P_v]`` predictions in :func:`~medssl.nets.tokens.patchify` layout.

        Raises:
            ValueError: for invalid images or masks that do not fit them.
        """
        return self.decoder(self.encoder(images, masks), masks)

    def forward(self, batch: Mapping[str, object], generator: torch.Generator | None = None) -> dict:
        """Mask, encode, decode and score a batch.

        Args:
            batch: view name -> ``[B, C, *image_size]`` for any subset of the views; other keys are ignored.
            generator: random source for the masks.

        Returns:
            ``{"loss": scalar, "loss_<view>": scalar per view, "pred": {view: [B, N_v, P_v]}, "mask": {view:
            [B, N_v] bool, True = masked}}``; ``pred`` is in (normalised, with ``norm_pix_loss``) pixel units, in
            :func:`~medssl.nets.tokens.patchify` layout.

        Raises:
            ValueError: for a batch without views, or view images of the wrong shape (naming the view).
        """
        images = self.view_images(batch)
        masks = self.draw_masks(images, generator)
        preds = self.reconstruct(images, masks)
        losses = {
            name: masked_reconstruction_loss(
                preds[name], patchify(image, self.views[name].patch_size), masks[name].mask, norm_pix=self.norm_pix_loss
            )
            for name, image in images.items()
        }
        output: dict = {"loss": torch.stack(list(losses.values())).mean()}
        output.update({f"loss_{name}": loss for name, loss in losses.items()})
        output["pred"] = preds
        output["mask"] = {name: mask.mask for name, mask in masks.items()}
        return output

    @torch.no_grad()
    def reconstruction_images(self, batch: Mapping[str, object], output: Mapping) -> dict[str, dict[str, Tensor]]:
        """Images for figures from a batch and the output of :meth:`forward` on it.

        Args:
            batch: the batch given to :meth:`forward`.
            output: its output.

        Returns:
            View name -> ``{"input", "masked", "reconstruction"}``, each ``[B, C, *image_size]``: the input, the
            input with hidden patches zeroed, and the visible input patches completed by the predicted hidden ones
            (mapped back to pixels with the target's own patch statistics under ``norm_pix_loss``).
        """
        return {
            name: masked_reconstruction_images(
                batch[name], pred, output["mask"][name], self.views[name].patch_size, norm_pix=self.norm_pix_loss
            )
            for name, pred in output["pred"].items()
        }

    def encoder_state_dict(self) -> dict[str, Tensor]:
        """The encoder's parameters without :data:`ENCODER_PREFIX`, for a ``MultiViewEncoder`` of the same config.

        Returns:
            ``{"patch_embed.<view>.*", "view_embed.<view>", "vit.*": tensor}``.
        """
        return self.encoder.state_dict()


class MaskedAutoencoder(MultiViewMAE):
    """MAE on one image of any number of spatial axes (2D, 3D, 2D+t, 3D+t); the batch key is ``"image"``.

    He et al., 2022, https://arxiv.org/abs/2111.06377: mask ratio 0.75, ViT-B encoder (768 x 12, 12 heads) with a
    512 x 8 decoder (16 heads), ``norm_pix_loss`` in their best setting. The defaults here are small, for CPU.

    Args:
        image_size: spatial size per axis.
        patch_size: patch size per axis (dividing ``image_size``).
        in_channels: image channels.
        embed_dim, depth, num_heads: encoder width, blocks and heads.
        decoder_dim, decoder_depth, decoder_num_heads: decoder width, blocks and heads.
        mlp_ratio: MLP inner width over the block width.
        mask_ratio: fraction of patches hidden, uniformly at random per sample (ignored when ``masking`` is given).
        norm_pix_loss: reconstruct per-patch normalised pixels.
        drop_path_rate: encoder stochastic depth.
        patch_embed: ``"linear"`` or ``"conv_stem"``.
        masking: a custom mask generator (e.g. block or tube masking) instead of random masking.
        grad_checkpointing: recompute transformer blocks in the backward pass.

    Raises:
        ValueError: for sizes that do not divide, or a mask ratio outside ``[0, 1)`` or leaving nothing visible.
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
        norm_pix_loss: bool = False,
        drop_path_rate: float = 0.0,
        patch_embed: str = "linear",
        masking: MaskGenerator | None = None,
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__(
            views={"image": {"image_size": image_size, "patch_size": patch_size, "in_channels": in_channels}},
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
            grad_checkpointing=grad_checkpointing,
        )
