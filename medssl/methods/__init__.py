"""Self-supervised methods: each an ``nn.Module`` whose ``forward(batch)`` returns a dict with at least ``"loss"``.

``METHODS`` maps a recipe's method name to its class (a plain dict, solo-learn style).
"""

from medssl.methods.cine_mae import CineCycleMAE, CineMAE
from medssl.methods.mae import ENCODER_PREFIX, MaskedAutoencoder, MultiViewMAE
from medssl.methods.memmc_mae import MemMCMAE
from medssl.methods.spark import SparK

METHODS = {
    "mae": MaskedAutoencoder,
    "cine_mae": CineMAE,
    "cine_cycle_mae": CineCycleMAE,
    "memmc_mae": MemMCMAE,
    "spark": SparK,
}

__all__ = [
    "CineCycleMAE",
    "CineMAE",
    "ENCODER_PREFIX",
    "METHODS",
    "MaskedAutoencoder",
    "MemMCMAE",
    "MultiViewMAE",
    "SparK",
]
