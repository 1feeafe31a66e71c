"""Mask generators: which tokens an encoder sees. Each returns a :class:`MaskOutput` with an exact keep count."""

from medssl.masking.base import MaskGenerator, MaskOutput
from medssl.masking.block import BlockMasking
from medssl.masking.random import RandomMasking
from medssl.masking.tube import TubeMasking

__all__ = ["BlockMasking", "MaskGenerator", "MaskOutput", "RandomMasking", "TubeMasking"]
