"""Load CineMA's published checkpoints into medssl's own networks, with a strict key and shape map.

CineMA (Fu et al., 2025, https://arxiv.org/abs/2506.00679) saves ``model.state_dict()`` as safetensors beside the
training ``config.yaml``. :func:`load_cinema` reads both, builds the medssl network the config describes
(:mod:`medssl.interop.cinema_config`) and maps every checkpoint key onto it (:func:`convert_cinema_state`); ``E`` is
``encoder.`` (none for the MAE, whose network is the encoder itself), ``<v>`` a view:

- ``enc_down_dict.<v>.conv_blocks.<s>.patch_embed.{conv,norm}.*`` -> ``E view_encoders.<v>.stages.<s>.down.*``;
  ``...conv_blocks.<s>.conv.<b>.*`` -> ``E view_encoders.<v>.stages.<s>.blocks.<b>.*``;
- ``enc_down_dict.<v>.patch_embed.proj.*`` (a Linear over ``(*patch, C)`` features) -> ``E view_encoders.<v>.
  patch_embed.*`` (the equal ``kernel = stride`` convolution); ``enc_down_dict.<v>.linear.*`` -> ``...linear.*``;
- ``enc_down_dict.<v>.pos_embed``: checked equal to medssl's sin-cos table of the view's grid, not loaded;
- ``enc_fusion_dict.<v>.{down_convs,norm}.*`` -> ``E fusion.<v>.{convs,norm}.*``;
- ``encoder.cls_token`` / ``encoder.{blocks,norm}.*`` -> ``E vit.cls_token`` / ``E vit.{blocks,norm}.*``, with
  ``attn.q`` and ``attn.kv`` concatenated into the fused ``attn.qkv`` (rows ordered q, k, v; heads within each);
- ConvViT: ``pred_head_dict.<v or cls>.*`` -> ``heads.<v or cls>.*``;
- ConvUNetR: ``dec_image_conv_block_dict.<v>.*`` -> ``decoders.<v>.image_block.*``,
  ``dec_conv_blocks_dict.<v>.<j>.*`` -> ``decoders.<v>.skip_blocks.<j>.*``, ``dec_down_blocks_dict.<v>.0.*`` ->
  ``decoders.<v>.down.*``, ``decoder_dict.<v>.blocks.<b>.{up,conv.<c>}.*`` ->
  ``decoders.<v>.up_blocks.<b>.{up,convs.<c>}.*``, ``pred_head_dict.<v>.*`` -> ``decoders.<v>.head.*``;
- MAE: ``dec_embed_dict.*``, ``dec_linear.*``, ``decoder.*``, ``pred_head_dict.*`` are the masked-reconstruction
  decoder, which feature extraction and fine-tuning do not use: not loaded.

Anything else, anything missing and any shape that differs is an error naming the keys.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from medssl.engine.checkpoints import check_state_dict
from medssl.errors import CheckpointError, DataError
from medssl.interop.cinema_config import CineMAConfig, read_cinema_config

__all__ = [
    "CINEMA_CONFIG_NAME",
    "MAE_DECODER_KEYS",
    "find_cinema_files",
    "read_safetensors",
    "convert_cinema_state",
    "load_cinema",
]

CINEMA_CONFIG_NAME = "config.yaml"
#: Keys of the MAE's masked-reconstruction decoder, which feature extraction and fine-tuning do not use.
MAE_DECODER_KEYS = re.compile(r"^(dec_embed_dict|dec_linear|decoder|pred_head_dict)\.")
# A stored pos_embed must be the sin-cos table medssl rebuilds, up to float32 rounding of the angles (CineMA's
# numpy-1 environment computes it in float32; large angles then differ by a few 1e-6).
_POSITION_ATOL = 1e-4
_SHOWN = 8
_POSITIONS = "positions"
_QKV = "qkv"

_ENCODER_RULES = [
    (r"^enc_down_dict\.(\w+)\.conv_blocks\.(\d+)\.patch_embed\.(conv|norm)\.", r"view_encoders.\1.stages.\2.down.\3."),
    (r"^enc_down_dict\.(\w+)\.conv_blocks\.(\d+)\.conv\.(\d+)\.", r"view_encoders.\1.stages.\2.blocks.\3."),
    (r"^enc_down_dict\.(\w+)\.patch_embed\.proj\.", r"view_encoders.\1.patch_embed."),
    (r"^enc_down_dict\.(\w+)\.linear\.", r"view_encoders.\1.linear."),
    (r"^enc_down_dict\.(\w+)\.pos_embed$", _POSITIONS),
    (r"^enc_fusion_dict\.(\w+)\.down_convs\.", r"fusion.\1.convs."),
    (r"^enc_fusion_dict\.(\w+)\.norm\.", r"fusion.\1.norm."),
    (r"^encoder\.cls_token$", "vit.cls_token"),
    (r"^encoder\.blocks\.(\d+)\.attn\.(q|kv)\.", _QKV),
    (r"^encoder\.(blocks|norm)\.", r"vit.\1."),
]
_CONVVIT_RULES = [(r"^pred_head_dict\.(\w+)\.", r"heads.\1.")]
_CONVUNETR_RULES = [
    (r"^dec_image_conv_block_dict\.(\w+)\.", r"decoders.\1.image_block."),
    (r"^dec_conv_blocks_dict\.(\w+)\.(\d+)\.", r"decoders.\1.skip_blocks.\2."),
    (r"^dec_down_blocks_dict\.(\w+)\.0\.", r"decoders.\1.down."),
    (r"^decoder_dict\.(\w+)\.blocks\.(\d+)\.up\.", r"decoders.\1.up_blocks.\2.up."),
    (r"^decoder_dict\.(\w+)\.blocks\.(\d+)\.conv\.(\d+)\.", r"decoders.\1.up_blocks.\2.convs.\3."),
    (r"^pred_head_dict\.(\w+)\.", r"decoders.\1.head."),
]


def _first(keys: list[str]) -> str:
    return ", ".join(keys[:_SHOWN]) + (f" ... ({len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else "")


def find_cinema_files(source: str | os.PathLike) -> tuple[Path, Path]:
    """The checkpoint and ``config.yaml`` a user points at.

    Args:
        source: a ``*.safetensors`` file (its ``config.yaml`` is in the same folder, as CineMA publishes them), or
            a folder holding exactly one checkpoint beside a ``config.yaml`` (searched recursively when the folder
            itself has none, e.g. a downloaded ``pretrained/`` or ``finetuned/segmentation/acdc_sax/`` folder).

    Returns:
        ``(checkpoint, config)``.

    Raises:
        DataError: when the source does not exist, or a folder holds no checkpoint or several (listing them).
        ConfigError: when the checkpoint has no ``config.yaml`` beside it.
    """
    source = Path(source)
    if source.is_file():
        return source, source.parent / CINEMA_CONFIG_NAME
    if not source.is_dir():
        raise DataError(f"{source} does not exist: pass a CineMA .safetensors file or the folder holding it.")
    configs = [source / CINEMA_CONFIG_NAME] if (source / CINEMA_CONFIG_NAME).is_file() else []
    configs = configs or sorted(source.rglob(CINEMA_CONFIG_NAME))
    candidates = sorted(p for config in configs for p in config.parent.glob("*.safetensors"))
    if len(candidates) != 1:
        found = ", ".join(str(p.relative_to(source)) for p in candidates) or "none"
        raise DataError(
            f"{source} must hold exactly one CineMA checkpoint (*.safetensors beside a {CINEMA_CONFIG_NAME}); found "
            f"{found}. Pass the checkpoint file itself."
        )
    return candidates[0], candidates[0].parent / CINEMA_CONFIG_NAME


def read_safetensors(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read every tensor of a safetensors file (no pickle).

    Args:
        path: the file.

    Returns:
        key -> tensor.

    Raises:
        DataError: when the file does not exist or is not a safetensors file (CineMA publishes ``.safetensors``;
            PyTorch ``.pt`` / ``.ckpt`` pickles are refused).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"checkpoint {path} does not exist.")
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise DataError(
            f"{path} is not a safetensors file ({error}); CineMA's checkpoints are *.safetensors from "
            "huggingface.co/mathpluscode/CineMA."
        ) from error


def _rules(config: CineMAConfig) -> list[tuple[re.Pattern, str]]:
    prefix = "" if config.model == "cinema_mae" else "encoder."
    rules = [(p, t if t in (_POSITIONS, _QKV) else prefix + t) for p, t in _ENCODER_RULES]
    rules += _CONVVIT_RULES if config.model == "convvit" else _CONVUNETR_RULES if config.model == "convunetr" else []
    return [(re.compile(pattern), target) for pattern, target in rules]


def _patch_embed_kernel(weight: Tensor, target: Tensor) -> Tensor:
    """CineMA's patch projection ``[D, prod(patch) * C]`` (features ordered ``(*patch, C)``) -> a conv kernel
    ``[D, C, *patch]``."""
    out_channels, in_channels, *patch = target.shape
    if weight.ndim != 2 or weight.shape[1] != in_channels * torch.Size(patch).numel():
        return weight  # left to the shape check, which names it
    return weight.reshape(out_channels, *patch, in_channels).movedim(-1, 1).contiguous()


def _check_positions(key: str, stored: Tensor, expected: Tensor | None, source: str) -> None:
    """A stored ``pos_embed`` must be the sin-cos table medssl rebuilds for the view's grid."""
    if expected is None:
        raise CheckpointError(f"{source}: unexpected key {key} (no such view in the config's network).")
    if expected.shape != stored.shape:
        raise CheckpointError(
            f"{source}: {key} has shape {list(stored.shape)} but the config's view grid needs {list(expected.shape)} "
            "(image or patch size differ from the config)."
        )
    if not torch.allclose(stored.float(), expected, atol=_POSITION_ATOL, rtol=0):
        raise CheckpointError(
            f"{source}: {key} is not the fixed sin-cos table of the view's token grid "
            f"(max difference {float((stored - expected).abs().max()):.3g}); medssl cannot run it."
        )


def convert_cinema_state(
    state: Mapping[str, Tensor], config: CineMAConfig, network: nn.Module, source: str = "the checkpoint"
) -> dict[str, Tensor]:
    """Map a CineMA state dict onto a medssl network's names and layouts, strictly.

    Args:
        state: CineMA key -> tensor.
        config: the checkpoint's config (which model kind, hence which keys).
        network: the medssl network built from ``config`` (its state dict is the target).
        source: the checkpoint's name, for messages.

    Returns:
        medssl key -> tensor, exactly the network's persistent state.

    Raises:
        CheckpointError: naming the CineMA keys no rule maps (e.g. another model's, or half of a q / kv pair), then
            the medssl keys missing, unexpected or of another shape after the map (as
            :func:`~medssl.engine.checkpoints.check_state_dict`), and stored positions that are not the sin-cos
            table of the view's grid.
    """
    encoder_prefix = "" if config.model == "cinema_mae" else "encoder."
    buffers = dict(network.named_buffers())
    converted: dict[str, Tensor] = {}
    unmapped, qkv = [], {}
    for key, value in sorted(state.items()):
        if config.model == "cinema_mae" and MAE_DECODER_KEYS.match(key):
            continue
        rule = next(((p, t) for p, t in _rules(config) if p.match(key)), None)
        if rule is None:
            unmapped.append(key)
        elif rule[1] == _POSITIONS:
            view = rule[0].match(key).group(1)
            _check_positions(key, value, buffers.get(f"{encoder_prefix}view_encoders.{view}.pos_embed"), source)
        elif rule[1] == _QKV:
            block, part = rule[0].match(key).groups()
            fused = f"{encoder_prefix}vit.blocks.{block}.attn.qkv.{key.rsplit('.', 1)[1]}"
            qkv.setdefault(fused, {})[part] = (key, value)
        else:
            converted[rule[0].sub(rule[1], key)] = value
    for name, parts in qkv.items():
        if set(parts) == {"q", "kv"}:
            converted[name] = torch.cat([parts["q"][1], parts["kv"][1]], dim=0)
        else:
            unmapped.extend(key for key, _ in parts.values())
    if unmapped:
        raise CheckpointError(
            f"{source} does not match the CineMA {config.model} ({config.size}) its config.yaml describes: "
            f"{len(unmapped)} unexpected keys: {_first(sorted(unmapped))}."
        )
    target = network.state_dict()
    for name, value in converted.items():
        if name.endswith("patch_embed.weight") and name in target:
            converted[name] = _patch_embed_kernel(value, target[name])
    check_state_dict(network, converted, f"{source} (CineMA {config.model}, size {config.size}; medssl's key names)")
    return {name: value.float().contiguous() for name, value in converted.items()}


def load_cinema(
    source: str | os.PathLike, config: str | os.PathLike | None = None
) -> tuple[nn.Module, CineMAConfig]:
    """Load a CineMA checkpoint into medssl's network (eval mode, float32, CPU).

    Args:
        source: a CineMA ``*.safetensors`` file or its folder (see :func:`find_cinema_files`).
        config: its ``config.yaml``; default the one beside the checkpoint.

    Returns:
        the network (:class:`~medssl.nets.cinema.CineMAEncoder` for the pre-trained MAE,
        :class:`~medssl.nets.cinema.ConvViT` or :class:`~medssl.nets.cinema.ConvUNetR`) and the parsed config.

    Raises:
        DataError: for a missing source or a file that is not safetensors.
        ConfigError: for a missing or invalid config (e.g. an unknown model size).
        CheckpointError: when the checkpoint's keys or shapes do not match the config's network.
    """
    checkpoint, found_config = find_cinema_files(source)
    parsed = read_cinema_config(found_config if config is None else config)
    state = read_safetensors(checkpoint)
    network = parsed.build()
    network.load_state_dict(convert_cinema_state(state, parsed, network, str(checkpoint)))
    return network.eval(), parsed

