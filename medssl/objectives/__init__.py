"""Training objectives (losses) for self-supervised methods."""

from medssl.objectives.reconstruction import (
    MaskedReconstructionLoss,
    masked_reconstruction_images,
    masked_reconstruction_loss,
)

__all__ = ["MaskedReconstructionLoss", "masked_reconstruction_images", "masked_reconstruction_loss"]
