"""CineMA-style masked autoencoders for cine cardiac MRI: one cardiac phase, or the whole cycle.

CineMA: Fu et al., 2025, "CineMA: A Foundation Model for Cine Cardiac MRI", https://arxiv.org/abs/2506.00679
(code: github.com/mathpluscode/CineMA). The SAX stack (3D) and the 2-/4-chamber LAX slices (2D) of one phase are
tokenised per view, their visible tokens (75 % hidden at random per view) go through one shared ViT so attention
runs across views, one shared decoder predicts every patch and per-view heads map back to pixels; the loss is the
MSE on hidden patches, averaged over views. The whole-cycle variant tokenises SAX 3D+t and LAX 2D+t cines with tube
masking (VideoMAE, Tong et al., 2022, https://arxiv.org/abs/2203.12602).

Published scale (CineMA base): SAX 192x192x16 and LAX 256x256 with an effective 16x16(x1) patch after a conv stem,
encoder 768 x 12 (12 heads), decoder 512 x 8; pass those as arguments (``patch_embed="conv_stem"``). The defaults
below are small enough to train on a CPU.
"""

from __future__ import annotations

from collections.abc import Mapping

from medssl.masking import RandomMasking, TubeMasking
from medssl.methods.mae import MultiViewMAE
from medssl.nets.patch_embed import ViewSpec

__all__ = ["CINE_PHASE_VIEWS", "CINE_CYCLE_VIEWS", "CineMAE", "CineCycleMAE"]

#: Default views of :class:`CineMAE`: a 64x64x8 SAX stack with 8x8x1 patches (512 tokens) and 64x64 LAX slices
#: with 8x8 patches (64 tokens each).
CINE_PHASE_VIEWS = {
    "sax": {"image_size": (64, 64, 8), "patch_size": (8, 8, 1), "in_channels": 1},
    "lax_2c": {"image_size": (64, 64), "patch_size": (8, 8), "in_channels": 1},
    "lax_4c": {"image_size": (64, 64), "patch_size": (8, 8), "in_channels": 1},
}

#: Default views of :class:`CineCycleMAE`: 8 frames of a 64x64x8 SAX stack with 16x16x1x2 patches (512 tokens) and
#: of 64x64 LAX slices with 16x16x2 patches (64 tokens each); time is the last axis.
CINE_CYCLE_VIEWS = {
    "sax": {"image_size": (64, 64, 8, 8), "patch_size": (16, 16, 1, 2), "in_channels": 1},
    "lax_2c": {"image_size": (64, 64, 8), "patch_size": (16, 16, 2), "in_channels": 1},
    "lax_4c": {"image_size": (64, 64, 8), "patch_size": (16, 16, 2), "in_channels": 1},
}


class CineMAE(MultiViewMAE):
    """CineMA-style multi-view MAE on one cardiac phase: SAX ``[B, 1, H, W, S]`` and LAX ``[B, 1, H, W]`` views.

    Batches are dicts keyed by view name (``"sax"``, ``"lax_2c"``, ``"lax_4c"`` by default); any subset of the views
    may be present and other keys are ignored. See :class:`~medssl.methods.mae.MultiViewMAE` for the outputs.

    Args:
        views: view name -> ``{"image_size", "patch_size", "in_channels"}``; default :data:`CINE_PHASE_VIEWS`.
        embed_dim, depth, num_heads: shared encoder width, blocks and heads (CineMA base 768, 12, 12).
        decoder_dim, decoder_depth, decoder_num_heads: shared decoder width, blocks and heads (CineMA base 512, 8).
        mlp_ratio: MLP inner width over the block width.
        mask_ratio: fraction of each view's patches hidden, at random per view and sample (CineMA 0.75).
        norm_pix_loss: reconstruct per-patch normalised pixels (off in CineMA's release).
        drop_path_rate: encoder stochastic depth.
        patch_embed: ``"linear"`` or CineMA's ``"conv_stem"``.
        grad_checkpointing: recompute transformer blocks in the backward pass.

    Raises:
        ValueError: for invalid views or sizes, or a mask ratio outside ``[0, 1)`` or leaving a view nothing visible.
    """

    def __init__(
        self,
        views: Mapping[str, ViewSpec | Mapping] | None = None,
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
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__(
            views=self.default_views() if views is None else views,
            masking=self.mask_generator(mask_ratio),
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
            view_embedding=True,
            grad_checkpointing=grad_checkpointing,
        )
        self.mask_ratio = mask_ratio

    @staticmethod
    def default_views() -> dict[str, dict]:
        """A copy of :data:`CINE_PHASE_VIEWS`."""
        return {name: dict(spec) for name, spec in CINE_PHASE_VIEWS.items()}

    @staticmethod
    def mask_generator(mask_ratio: float) -> RandomMasking:
        """Random masking, drawn independently per view (CineMA)."""
        return RandomMasking(mask_ratio)


class CineCycleMAE(CineMAE):
    """Whole-cycle variant of :class:`CineMAE`: SAX ``[B, 1, H, W, S, T]`` and LAX ``[B, 1, H, W, T]`` cines are
    tokenised over space and time, and each view is tube-masked (one spatial mask shared by all its time patches),
    so a hidden patch cannot be copied from a neighbouring frame.

    Args:
        views: default :data:`CINE_CYCLE_VIEWS`; time must be the last axis of every view.
        Others: as :class:`CineMAE`; ``mask_ratio`` is the fraction of spatial positions hidden per view.

    Raises:
        ValueError: as :class:`CineMAE`, or when a view has no axis beside time.
    """

    @staticmethod
    def default_views() -> dict[str, dict]:
        """A copy of :data:`CINE_CYCLE_VIEWS`."""
        return {name: dict(spec) for name, spec in CINE_CYCLE_VIEWS.items()}

    @staticmethod
    def mask_generator(mask_ratio: float) -> TubeMasking:
        """Tube masking along the last (time) axis."""
        return TubeMasking(mask_ratio, time_axis=-1)
