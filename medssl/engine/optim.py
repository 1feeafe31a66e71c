"""Optimiser parameter groups."""

from __future__ import annotations

from torch import nn

from medssl.engine.distributed import unwrap_model

__all__ = ["weight_decay_param_groups"]


def weight_decay_param_groups(network: nn.Module, weight_decay: float) -> list[dict]:
    """Split trainable parameters into a decayed group and a group without weight decay.

    Biases and normalisation weights (every parameter with at most one dimension) and the parameters the network
    names in an optional ``no_weight_decay()`` method (e.g. positional embeddings, mask tokens) get no decay, as in
    the MAE recipe (He et al., "Masked Autoencoders Are Scalable Vision Learners", CVPR 2022,
    https://arxiv.org/abs/2111.06377) that CineMA follows.

    Args:
        network: the model (a DDP wrapper is looked through, so names match the unwrapped module).
        weight_decay: decay of the first group, >= 0 (CineMA: 0.05).

    Returns:
        ``[{"params": decayed, "weight_decay": weight_decay}, {"params": others, "weight_decay": 0.0}]``, ready for
        ``torch.optim.AdamW``; frozen parameters (``requires_grad=False``) are left out.

    Raises:
        ValueError: when ``weight_decay`` is negative or ``no_weight_decay()`` names unknown parameters.
    """
    if weight_decay < 0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}.")
    module = unwrap_model(network)
    named = dict(module.named_parameters())
    skip = set(module.no_weight_decay()) if hasattr(module, "no_weight_decay") else set()
    unknown = sorted(skip - set(named))
    if unknown:
        raise ValueError(f"no_weight_decay() names parameters the network does not have: {unknown[:5]}.")
    decay, no_decay = [], []
    for name, parameter in named.items():
        if not parameter.requires_grad:
            continue
        (no_decay if parameter.ndim <= 1 or name in skip else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
