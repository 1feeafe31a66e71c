"""Masked reconstruction loss for masked autoencoders."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medssl.nets.tokens import grid_size, patchify, unpatchify

__all__ = ["masked_reconstruction_loss", "masked_reconstruction_images", "MaskedReconstructionLoss"]


def masked_reconstruction_loss(
    pred: Tensor, target: Tensor, mask: Tensor, norm_pix: bool = False, eps: float = 1e-6
) -> Tensor:
    """Mean squared error of reconstructed tokens, averaged over the masked tokens only; MAE (He et al., 2022,
    https://arxiv.org/abs/2111.06377).

    Each token's error is the MSE over its ``P`` values; the loss is ``sum(error * mask) / sum(mask)``. With
    ``norm_pix`` the target of each token is first normalised by its own mean and unbiased variance,
    ``(t - mean) / sqrt(var + eps)``, MAE's ``norm_pix_loss`` (off in MAE's and CineMA's defaults; SparK uses it).

    Args:
        pred: ``[B, N, P]`` predicted tokens.
        target: ``[B, N, P]`` true tokens (e.g. :func:`medssl.nets.tokens.patchify` of the image).
        mask: ``[B, N]`` bool (or 0/1), True where a token was masked.
        norm_pix: normalise each target token before the error.
        eps: added to the variance under ``norm_pix``.

    Returns:
        The scalar loss (float32 under autocast, as ``mse_loss`` runs in float32 there).

    Raises:
        ValueError: when the shapes disagree or no token is masked.
    """
    if pred.shape != target.shape or pred.ndim != 3 or tuple(mask.shape) != tuple(pred.shape[:2]):
        raise ValueError(
            f"expected pred and target [B, N, P] and mask [B, N], got pred {tuple(pred.shape)}, "
            f"target {tuple(target.shape)} and mask {tuple(mask.shape)}."
        )
    if norm_pix:
        if target.shape[-1] < 2:
            raise ValueError(f"norm_pix needs at least 2 values per token, got target {tuple(target.shape)}.")
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + eps).sqrt()
    per_token = F.mse_loss(pred, target, reduction="none").mean(dim=-1)
    weights = mask.to(per_token.dtype)
    num_masked = weights.sum()
    # A data-dependent check costs one host sync per step; a silent 0/0 NaN would cost the whole run.
    if not bool(num_masked > 0):
        raise ValueError(f"mask {tuple(mask.shape)} masks no token: the reconstruction loss is undefined.")
    return (per_token * weights).sum() / num_masked


@torch.no_grad()
def masked_reconstruction_images(
    image: Tensor, pred: Tensor, mask: Tensor, patch_size: Sequence[int], norm_pix: bool = False, eps: float = 1e-6
) -> dict[str, Tensor]:
    """Figure images of a masked reconstruction: the input, what the encoder saw and the completed image.

    Args:
        image: ``[B, C, *spatial]`` the input.
        pred: ``[B, N, P]`` predicted patches in :func:`~medssl.nets.tokens.patchify` layout (per-patch normalised
            under ``norm_pix``, as :func:`masked_reconstruction_loss` scores them).
        mask: ``[B, N]`` bool, True where a patch was hidden.
        patch_size: patch size per spatial axis.
        norm_pix: map ``pred`` back to pixels with each target patch's own mean and unbiased variance.
        eps: the variance offset of ``norm_pix``.

    Returns:
        ``{"input", "masked", "reconstruction"}``, each ``[B, C, *spatial]``: the input, the input with hidden patches
        zeroed, and the visible patches completed by the predicted hidden ones.

    Raises:
        ValueError: when the patch size does not divide the image or ``pred`` does not have its patches' shape.
    """
    target = patchify(image, patch_size)
    pred = pred.detach().to(target.dtype)
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} must have the image's patch shape {tuple(target.shape)}.")
    if norm_pix:
        pred = pred * (target.var(dim=-1, keepdim=True) + eps).sqrt() + target.mean(dim=-1, keepdim=True)
    hidden = mask.unsqueeze(-1)
    grid = grid_size(image.shape[2:], patch_size)
    return {
        "input": image,
        "masked": unpatchify(target.masked_fill(hidden, 0.0), patch_size, grid, image.shape[1]),
        "reconstruction": unpatchify(torch.where(hidden, pred, target), patch_size, grid, image.shape[1]),
    }


class MaskedReconstructionLoss(nn.Module):
    """Module form of :func:`masked_reconstruction_loss` (MAE, He et al., 2022, https://arxiv.org/abs/2111.06377).

    Args:
        norm_pix: normalise each target token by its mean and unbiased variance (MAE's ``norm_pix_loss``).
        eps: added to the variance under ``norm_pix``.
    """

    def __init__(self, norm_pix: bool = False, eps: float = 1e-6) -> None:
        super().__init__()
        self.norm_pix = norm_pix
        self.eps = eps

    def forward(self, pred: Tensor, target: Tensor, mask: Tensor) -> Tensor:
        """Args: pred ``[B, N, P]``, target ``[B, N, P]``, mask ``[B, N]`` (True = masked). Returns the scalar loss.

        Raises:
            ValueError: as :func:`masked_reconstruction_loss`.
        """
        return masked_reconstruction_loss(pred, target, mask, norm_pix=self.norm_pix, eps=self.eps)

    def extra_repr(self) -> str:
        return f"norm_pix={self.norm_pix}, eps={self.eps}"
