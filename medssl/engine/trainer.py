"""A MONAI trainer for self-supervised methods, and a progress bar for it.

The engine is method-agnostic: a method is any ``nn.Module`` whose ``forward(batch)`` takes the collated sample
dict and returns a dict with a scalar ``"loss"`` (plus optional ``"loss_<part>"`` scalars that are logged too).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from ignite.engine import Engine
from ignite.handlers import ProgressBar
from ignite.metrics import Average
from monai.engines import Trainer
from monai.engines.utils import IterationEvents
from monai.inferers import Inferer, SimpleInferer
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

__all__ = ["SSLTrainer", "ProgressBarHandler", "EPOCH_LOSS"]

EPOCH_LOSS = "epoch_loss"
_AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def _resolve_autocast_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or (isinstance(dtype, torch.dtype) and dtype in _AUTOCAST_DTYPES.values()):
        return dtype
    if isinstance(dtype, str) and dtype in _AUTOCAST_DTYPES:
        return _AUTOCAST_DTYPES[dtype]
    raise ValueError(f"autocast_dtype must be None, 'bfloat16' or 'float16', got {dtype!r}.")


class SSLTrainer(Trainer):
    """MONAI ``Trainer`` running ``loss = network(batch)["loss"]``, backward and an optimiser step per iteration.

    Each iteration moves the batch's tensors to ``device``, runs the forward pass (optionally under
    ``torch.autocast``), back-propagates, clips the gradient norm and steps the optimiser. ``float16`` autocast uses
    a gradient scaler whose gradients are unscaled before clipping; ``bfloat16`` needs none. ``engine.state.output``
    is ``{"loss": float, "loss_<part>": float, ..., "lr": float}`` (``lr``: the rate this step used, of the first
    parameter group), and ``engine.state.metrics["epoch_loss"]`` is the epoch's mean loss (averaged over ranks).
    The LR schedule is stepped by a handler (e.g. MONAI ``LrScheduleHandler(epoch_level=False)``).

    Args:
        device: device of the network and batches.
        max_epochs: epochs to train.
        train_data_loader: yields collated sample dicts (view name -> ``Tensor[B, C, *spatial]``, ...).
        network: the SSL method; ``forward(batch) -> {"loss": Tensor[], ...}``; may be DDP-wrapped.
        optimizer: optimiser of the network's parameters.
        epoch_length: iterations per epoch, default ``len(train_data_loader)``.
        non_blocking: asynchronous host-to-device copies.
        train_handlers: handlers with ``attach(engine)`` (checkpoints, tracking, ...), attached after the
            epoch-loss metric so they can read it at ``EPOCH_COMPLETED``.
        grad_clip_norm: max global gradient norm (CineMA: 5.0); None for no clipping.
        autocast_dtype: ``"bfloat16"`` (CineMA on GPU), ``"float16"`` or None for float32.
        inferer: how the network is called on the batch, ``inferer(batch, network)``; default MONAI
            ``SimpleInferer`` (``network(batch)``).

    Raises:
        ValueError: for an unknown ``autocast_dtype`` or a non-positive ``grad_clip_norm``.
        KeyError: (per iteration) when the network output has no ``"loss"``.
        FloatingPointError: (per iteration) when the loss is NaN or infinite.
    """

    def __init__(
        self,
        device: torch.device | str,
        max_epochs: int,
        train_data_loader: Iterable | DataLoader,
        network: nn.Module,
        optimizer: Optimizer,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        train_handlers: Sequence | None = None,
        grad_clip_norm: float | None = None,
        autocast_dtype: str | torch.dtype | None = None,
        inferer: Inferer | None = None,
    ) -> None:
        if grad_clip_norm is not None and grad_clip_norm <= 0:
            raise ValueError(f"grad_clip_norm must be positive or None, got {grad_clip_norm}.")
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            decollate=False,
        )
        self.network = network
        self.optimizer = optimizer
        self.inferer = SimpleInferer() if inferer is None else inferer
        self.grad_clip_norm = grad_clip_norm
        self.autocast_dtype = _resolve_autocast_dtype(autocast_dtype)
        device_type = self.state.device.type
        self.grad_scaler = torch.amp.GradScaler(device_type) if self.autocast_dtype == torch.float16 else None
        Average(output_transform=lambda output: output["loss"], device="cpu").attach(self, EPOCH_LOSS)
        if train_handlers:
            self._register_handlers(train_handlers)

    def _iteration(self, engine: Engine, batchdata: dict[str, Any]) -> dict[str, float]:
        if not isinstance(batchdata, dict):
            raise TypeError(f"SSLTrainer expects collated sample dicts, got {type(batchdata).__name__}.")
        device = engine.state.device
        batch = {
            key: value.to(device, non_blocking=self.non_blocking) if isinstance(value, torch.Tensor) else value
            for key, value in batchdata.items()
        }
        self.network.train()
        self.optimizer.zero_grad(set_to_none=True)
        lr = float(self.optimizer.param_groups[0]["lr"])
        with torch.autocast(device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
            output = self.inferer(batch, self.network)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        if "loss" not in output:
            raise KeyError(f"the network's output has no 'loss'; keys: {sorted(output)}.")
        loss = output["loss"]
        loss_value = float(loss.detach())
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"loss is {loss_value} at iteration {engine.state.iteration}.")
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        if self.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), self.grad_clip_norm)
        if self.grad_scaler is not None:
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            self.optimizer.step()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        scalars = {
            key: float(value.detach())
            for key, value in output.items()
            if key.startswith("loss_") and isinstance(value, torch.Tensor) and value.numel() == 1
        }
        return {"loss": loss_value, **scalars, "lr": lr}


class ProgressBarHandler:
    """A tqdm progress bar (ignite ``ProgressBar``) showing the loss, on the main process only.

    Args:
        output_key: key of ``engine.state.output`` shown next to the bar.
        persist: keep each epoch's bar on screen when it finishes.
    """

    def __init__(self, output_key: str = "loss", persist: bool = False) -> None:
        self.output_key = output_key
        self.persist = persist

    def attach(self, engine: Engine) -> None:
        """Attach the bar to ``engine`` unless this process is not rank 0."""
        if getattr(engine.state, "rank", 0) != 0:
            return
        ProgressBar(persist=self.persist).attach(
            engine, output_transform=lambda output: {self.output_key: output[self.output_key]}
        )
