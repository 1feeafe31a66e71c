"""Export a pretrained encoder as a plain tensor-in, tensor-out network for MONAI's bundle tools.

MONAI's ``verify_net_in_out`` and ``ckpt_export`` feed a network one image tensor ``[B, C, *spatial]`` (the
``image`` input of a bundle's ``network_data_format``) and expect one tensor back (its ``pred`` output), while
pre-training methods take a dict of views and return a dict of losses. :class:`ViewEncoder` gives one view of a
pretrained multi-view encoder that form: an image in, its channel-first feature map out, which is what
fine-tuning heads and UNETR-style decoders read. ``ckpt_export`` loads its checkpoint with ``torch.load``, not
safetensors, so :func:`save_state_dict` writes the export network's weights in that form.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import Tensor, nn

from medssl.engine.checkpoints import atomic_write
from medssl.engine.distributed import unwrap_model
from medssl.nets.tokens import unpatchify
from medssl.nets.vit import MultiViewEncoder

__all__ = ["ViewEncoder", "save_state_dict"]


class ViewEncoder(nn.Module):
    """One view of a multi-view encoder as an image -> feature map network (for TorchScript export and MONAI's tools).

    The image is patchified, embedded and positioned as the view's tokens, all tokens are encoded (no masking) and
    the encoded tokens are laid out on the view's patch grid, channel first. For a CineMA-style model (Fu et al.,
    2025, https://arxiv.org/abs/2506.00679) this is the pretrained encoder's SAX (or LAX) representation. The
    encoder is shared, not copied, and sits under ``encoder.``, so the ``encoder.*`` entries of a masked
    autoencoder's state dict are exactly this module's state dict. It traces with ``torch.jit.trace`` for a fixed
    image size (the geometry checks become constants); the batch size stays free.

    Args:
        encoder: the (pretrained) encoder, e.g. ``CineMAE(...).encoder``.
        view: the view to expose, one of ``encoder.views``.

    Raises:
        ValueError: when ``view`` is not one of the encoder's views.
    """

    def __init__(self, encoder: MultiViewEncoder, view: str) -> None:
        super().__init__()
        if view not in encoder.views:
            raise ValueError(f"view {view!r} is not one of the encoder's views {list(encoder.views)}.")
        self.encoder = encoder
        self.view = view
        self.grid = encoder.views[view].grid

    def forward(self, image: Tensor) -> Tensor:
        """Encode one view.

        Args:
            image: ``[B, C, *image_size]`` of the view.

        Returns:
            ``[B, embed_dim, *grid]`` with ``grid = image_size // patch_size``; ``[:, :, i, j, ...]`` is the encoded
            token of patch ``(i, j, ...)``.

        Raises:
            ValueError: when ``image`` does not have the view's channels and size (the message prints its shape).
        """
        tokens = self.encoder({self.view: image})[self.view]
        # A token is a 1x...x1 "patch" of embed_dim channels, so unpatchify lays the grid out channel first.
        return unpatchify(tokens, (1,) * len(self.grid), self.grid, self.encoder.embed_dim)


def save_state_dict(network: nn.Module, path: str | os.PathLike) -> Path:
    """Save a network's state dict with ``torch.save``, atomically: the checkpoint form ``ckpt_export`` loads.

    MONAI's ``ckpt_export`` reads ``--ckpt_file`` with ``torch.load(weights_only=True)`` and loads it strictly into
    the network named by ``--net_id``; medssl's final weights are safetensors of the whole pre-training model, so an
    export network such as :class:`ViewEncoder` gets a checkpoint of its own.

    Args:
        network: the module (a DDP wrapper is looked through).
        path: destination file, e.g. ``models/sax_encoder.pt``; parent folders are created.

    Returns:
        the written path.
    """
    state = {key: value.detach().cpu() for key, value in unwrap_model(network).state_dict().items()}
    return atomic_write(path, lambda temporary: torch.save(state, temporary))
