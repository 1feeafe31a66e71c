"""medssl: self-supervised pre-training and label-efficient fine-tuning for medical images."""

__version__ = "0.1.0"
