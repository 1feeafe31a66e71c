"""Checkpoints: atomic saving, safe loading with clear mismatch errors, and resuming an interrupted run.

Training checkpoints hold the state dicts of the network, optimiser, LR scheduler and trainer (epoch, iteration),
saved with ``torch.save`` and read back with ``weights_only=True`` (no pickled code). Final weights are written as
safetensors. Every file is written to a temporary name and renamed, so a killed run never leaves a truncated file
that looks complete.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from safetensors.torch import load_file, save_file
from torch import nn

from medssl.engine.distributed import is_main_process, unwrap_model
from medssl.errors import CheckpointError

__all__ = [
    "atomic_write",
    "check_state_dict",
    "load_network_weights",
    "save_network_weights",
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "CheckpointHandler",
]

_CHECKPOINT_NAME = "checkpoint_epoch={epoch}.pt"
_CHECKPOINT_PATTERN = re.compile(r"^checkpoint_epoch=(\d+)\.pt$")
_SHOWN_KEYS = 5
logger = logging.getLogger(__name__)


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> Path:
    """Write a file through a temporary sibling and rename it into place.

    Args:
        path: destination; parent folders are created.
        write: called with the temporary path, must write the whole file there.

    Returns:
        the destination path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(temporary)
        # mkstemp creates the file private (0600); the result gets the permissions of any file created here.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return path


def _first(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOWN_KEYS])
    return shown + (f", ... ({len(keys) - _SHOWN_KEYS} more)" if len(keys) > _SHOWN_KEYS else "")


def check_state_dict(network: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Check that a state dict has exactly the network's keys and shapes.

    Args:
        network: the target module (a DDP wrapper is looked through).
        state_dict: parameter name -> tensor, e.g. read from a checkpoint.
        source: where the state dict came from, for the message.

    Raises:
        CheckpointError: naming the first few missing, unexpected and shape-mismatched keys.
    """
    expected = unwrap_model(network).state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = sorted(
        f"{key} (checkpoint {list(state_dict[key].shape)} vs network {list(expected[key].shape)})"
        for key in set(expected) & set(state_dict)
        if tuple(state_dict[key].shape) != tuple(expected[key].shape)
    )
    if not (missing or unexpected or mismatched):
        return
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing keys: {_first(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected keys: {_first(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatches: {_first(mismatched)}")
    raise CheckpointError(
        f"{source} does not match {type(unwrap_model(network)).__name__} (was it saved from another architecture "
        f"or configuration?): {'; '.join(problems)}."
    )


def _read_state(path: Path) -> Mapping[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist.")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch and safetensors raise several types for corrupt or unsafe files
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e


def load_network_weights(network: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load weights into a network from a safetensors file, a state-dict ``.pt`` or a training checkpoint.

    Args:
        network: the target module (a DDP wrapper is looked through).
        path: ``*.safetensors``, or a ``torch.save`` file holding a state dict or a training checkpoint with a
            ``"network"`` entry; read with ``weights_only=True``.

    Returns:
        the network, with the weights loaded.

    Raises:
        CheckpointError: when the file is missing or unreadable, or its keys or shapes do not match the network.
    """
    path = Path(path)
    state = _read_state(path)
    if "network" in state and isinstance(state["network"], Mapping):
        state = state["network"]
    check_state_dict(network, state, f"checkpoint {path}")
    unwrap_model(network).load_state_dict(state)
    return network


def save_network_weights(network: nn.Module, path: str | os.PathLike) -> Path:
    """Save a network's weights as safetensors, atomically.

    Args:
        network: the module (a DDP wrapper is looked through).
        path: destination ``*.safetensors`` file.

    Returns:
        the written path.
    """
    state = {key: value.detach().cpu().contiguous() for key, value in unwrap_model(network).state_dict().items()}
    return atomic_write(path, lambda temporary: save_file(state, temporary))


def _state_of(item: Any) -> Any:
    return unwrap_model(item).state_dict() if isinstance(item, nn.Module) else item.state_dict()


def save_checkpoint(path: str | os.PathLike, objects: Mapping[str, Any]) -> Path:
    """Save the state dicts of several objects to one file, atomically.

    Args:
        path: destination file.
        objects: name -> object with ``state_dict()`` (network, optimizer, lr_scheduler, trainer, ...).

    Returns:
        the written path.
    """
    states = {name: _state_of(item) for name, item in objects.items()}
    return atomic_write(path, lambda temporary: torch.save(states, temporary))


def _restore(state: Mapping[str, Any], objects: Mapping[str, Any], path: Path) -> None:
    absent = sorted(set(objects) - set(state))
    if absent:
        raise CheckpointError(f"checkpoint {path} has no entries for {absent}; it holds {sorted(state)}.")
    for name, item in objects.items():
        if isinstance(item, nn.Module):
            check_state_dict(item, state[name], f"'{name}' in checkpoint {path}")
            unwrap_model(item).load_state_dict(state[name])
            continue
        try:
            item.load_state_dict(state[name])
        except (KeyError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"cannot restore '{name}' from checkpoint {path}: {e}") from e


def load_checkpoint(path: str | os.PathLike, objects: Mapping[str, Any]) -> None:
    """Restore several objects from a checkpoint written by :func:`save_checkpoint`.

    Args:
        path: the checkpoint, read with ``weights_only=True``.
        objects: name -> object with ``load_state_dict()``; every name must be in the checkpoint.

    Raises:
        CheckpointError: when the file is unreadable, lacks an object, or a network or optimiser does not match.
    """
    path = Path(path)
    _restore(_read_state(path), objects, path)


def _checkpoints(directory: Path) -> list[tuple[int, Path]]:
    if not directory.is_dir():
        return []
    return sorted(
        (int(match.group(1)), path) for path in directory.iterdir() if (match := _CHECKPOINT_PATTERN.match(path.name))
    )


def latest_checkpoint(directory: str | os.PathLike) -> Path | None:
    """The checkpoint with the highest epoch in ``directory`` (``checkpoint_epoch=N.pt``), or None."""
    found = _checkpoints(Path(directory))
    return found[-1][1] if found else None


class CheckpointHandler:
    """Ignite handler: checkpoint every few epochs, resume from the latest checkpoint on (re)start.

    The engine it is attached to is saved as ``"trainer"`` beside ``save_dict`` (its epoch and iteration). On
    ``STARTED`` every rank restores them from the newest ``checkpoint_epoch=N.pt`` in ``save_dir``, so a killed run
    started again continues at the saved epoch and iteration with the same optimiser moments and LR schedule
    position. On ``EPOCH_COMPLETED`` (every ``save_interval`` epochs) rank 0 writes a new checkpoint and keeps the
    newest ``n_saved``; on ``COMPLETED`` it writes the network's final weights as safetensors.

    Args:
        save_dir: folder of the checkpoints.
        save_dict: name -> object with ``state_dict()`` / ``load_state_dict()`` (network, optimizer, lr_scheduler);
            needs ``"network"`` for ``final_weights``; ``"trainer"`` is reserved for the engine.
        save_interval: epochs between checkpoints (>= 1).
        n_saved: checkpoints kept (>= 1).
        resume: restore from the latest checkpoint at start.
        final_weights: safetensors path for the network's weights when training completes; None to skip.

    Raises:
        ValueError: for an interval or ``n_saved`` below 1, or a save_dict naming ``"trainer"`` or lacking
            ``"network"`` when ``final_weights`` is set.
        CheckpointError: (at start) when the latest checkpoint does not match the objects, or was written with a
            different epoch length or beyond the configured number of epochs.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike,
        save_dict: Mapping[str, Any],
        save_interval: int = 1,
        n_saved: int = 2,
        resume: bool = True,
        final_weights: str | os.PathLike | None = None,
    ) -> None:
        if save_interval < 1 or n_saved < 1:
            raise ValueError(f"save_interval and n_saved must be >= 1, got {save_interval} and {n_saved}.")
        if "trainer" in save_dict or (final_weights is not None and "network" not in save_dict):
            raise ValueError(
                f"save_dict needs 'network' for final_weights and must not name 'trainer' (the attached engine), "
                f"got {sorted(save_dict)}."
            )
        self.save_dir = Path(save_dir)
        self.save_dict = dict(save_dict)
        self.save_interval = save_interval
        self.n_saved = n_saved
        self.resume = resume
        self.final_weights = None if final_weights is None else Path(final_weights)

    def attach(self, engine: Engine) -> None:
        """Register the resume, save and final-weights handlers on ``engine`` and checkpoint it as ``"trainer"``."""
        self.save_dict["trainer"] = engine
        if self.resume:
            engine.add_event_handler(Events.STARTED, self.load_latest)
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.save_interval), self.save)
        if self.final_weights is not None:
            engine.add_event_handler(Events.COMPLETED, self.save_final_weights)

    def load_latest(self, engine: Engine) -> Path | None:
        """Restore ``save_dict`` from the newest checkpoint, if any; returns its path."""
        path = latest_checkpoint(self.save_dir)
        if path is None:
            return None
        state = _read_state(path)
        trainer_state = state.get("trainer", {})
        saved_length = trainer_state.get("epoch_length")
        max_epochs, epoch_length = engine.state.max_epochs, engine.state.epoch_length
        if saved_length != epoch_length:
            raise CheckpointError(
                f"checkpoint {path} was written with {saved_length} iterations per epoch, this run has "
                f"{epoch_length} (data, batch size or world size changed); use a new run folder."
            )
        saved_epoch = trainer_state.get("iteration", 0) // epoch_length
        if saved_epoch > max_epochs:
            raise CheckpointError(
                f"checkpoint {path} is at epoch {saved_epoch}, beyond this run's {max_epochs} epochs; "
                "raise the number of epochs or use a new run folder."
            )
        _restore(state, self.save_dict, path)
        # The checkpoint's own epoch count must not shorten or extend the configured run.
        engine.state.max_epochs = max_epochs
        logger.info(f"resumed from {path} at epoch {engine.state.epoch}, iteration {engine.state.iteration}")
        return path

    def save(self, engine: Engine) -> Path | None:
        """Write ``checkpoint_epoch=<epoch>.pt`` on rank 0 and delete checkpoints beyond ``n_saved``."""
        if not is_main_process():
            return None
        path = save_checkpoint(self.save_dir / _CHECKPOINT_NAME.format(epoch=engine.state.epoch), self.save_dict)
        for _, old in _checkpoints(self.save_dir)[: -self.n_saved]:
            old.unlink()
        return path

    def save_final_weights(self, engine: Engine) -> Path | None:
        """Write the network's weights to ``final_weights`` on rank 0."""
        if not is_main_process() or self.final_weights is None:
            return None
        return save_network_weights(self.save_dict["network"], self.final_weights)
