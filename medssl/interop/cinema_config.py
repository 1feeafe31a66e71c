"""CineMA's ``config.yaml`` -> the medssl network that runs its checkpoint.

CineMA (Fu et al., 2025, https://arxiv.org/abs/2506.00679; weights published at huggingface.co/mathpluscode/CineMA)
ships each checkpoint with the full training config it was made with. Three model kinds are built from it, with the
keys CineMA's own loaders read:

- the pre-trained MAE (no ``model.name``): all four views (sax, lax_2c, lax_3c, lax_4c), ``model.size``,
  ``model.patch_size``, ``model.scale_factor``, ``model.enc_conv_chans``, ``model.enc_conv_n_blocks``; medssl runs
  its encoder (:class:`~medssl.nets.cinema.CineMAEncoder`, feature extraction);
- ``model.name: convvit`` (classification, regression, landmark coordinates):
  :class:`~medssl.nets.cinema.ConvViT` from ``model.convvit.*``, ``model.n_frames`` stacked as input channels;
- ``model.name: convunetr`` (segmentation, landmark heatmaps): :class:`~medssl.nets.cinema.ConvUNetR` from
  ``model.convunetr.*``.

Per view, the image size and channels come from ``data.sax`` (SAX) or ``data.lax`` / ``data.<view>`` (LAX); 3-D SAX
uses all three entries of the patch lists, 2-D LAX the first two. ``size`` picks the ViT from :data:`CINEMA_SIZES`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from torch import nn

from medssl.errors import ConfigError
from medssl.nets.cinema import CineMAEncoder, ConvUNetR, ConvViT

__all__ = ["CINEMA_SIZES", "CINEMA_VIEWS", "CineMAConfig", "parse_cinema_config", "read_cinema_config"]

#: CineMA's ViT sizes: encoder width / depth / heads (the MAE decoder's are not needed to run the encoder).
CINEMA_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"embed_dim": 16, "depth": 1, "num_heads": 2},
    "base": {"embed_dim": 768, "depth": 12, "num_heads": 12},
    "large": {"embed_dim": 1024, "depth": 24, "num_heads": 16},
    "huge": {"embed_dim": 1280, "depth": 32, "num_heads": 16},
}
#: The MAE always has these views, in this order.
CINEMA_VIEWS = ("sax", "lax_2c", "lax_3c", "lax_4c")
_NETWORKS = {"cinema_mae": CineMAEncoder, "convvit": ConvViT, "convunetr": ConvUNetR}


@dataclass(frozen=True)
class CineMAConfig:
    """What medssl needs from a CineMA ``config.yaml``.

    Args:
        model: ``"cinema_mae"``, ``"convvit"`` or ``"convunetr"``.
        task: CineMA's ``task`` (``"segmentation"``, ``"classification"``, ``"regression"``; ``"pretraining"`` for
            the MAE).
        network_args: keyword arguments of the network class (JSON-serialisable).
        spacing: view name -> target voxel spacing in mm (``data.<sax|lax>.spacing``).
        class_names: the classes of a classification, in output order; empty otherwise.
        regression: ``{"mean", "std"}`` that de-normalise a regression output; empty otherwise.
        size: the ViT size name.
    """

    model: str
    task: str
    network_args: dict[str, Any]
    spacing: dict[str, list[float]]
    class_names: list[str] = field(default_factory=list)
    regression: dict[str, float] = field(default_factory=dict)
    size: str = "tiny"

    @property
    def network_class(self) -> type[nn.Module]:
        """The medssl class that runs the checkpoint."""
        return _NETWORKS[self.model]

    @property
    def network_target(self) -> str:
        """Dotted path of :attr:`network_class`, for a bundle's ``_target_``."""
        return f"{self.network_class.__module__}.{self.network_class.__name__}"

    @property
    def views(self) -> dict[str, dict[str, Any]]:
        """View name -> ``{"image_size", "in_channels"}``."""
        return dict(self.network_args["views"])

    def build(self) -> nn.Module:
        """A new network with this architecture (random weights)."""
        return self.network_class(**self.network_args)


def _get(config: Mapping, path: str) -> Any:
    node: Any = config
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            raise ConfigError(f"CineMA config has no '{path}' (needed to build the network).")
        node = node[part]
    return node


def _ints(config: Mapping, path: str) -> list[int]:
    value = _get(config, path)
    if not isinstance(value, Sequence) or isinstance(value, str) or not all(isinstance(v, int) for v in value):
        raise ConfigError(f"CineMA config '{path}' must be a list of integers, got {value!r}.")
    return [int(v) for v in value]


def _size(config: Mapping, path: str) -> tuple[str, dict[str, int]]:
    name = _get(config, path)
    if name not in CINEMA_SIZES:
        raise ConfigError(f"CineMA config '{path}' is {name!r}, not a CineMA model size; known: {list(CINEMA_SIZES)}.")
    return name, CINEMA_SIZES[name]


def _view_data(config: Mapping, view: str) -> tuple[str, Mapping]:
    """The ``data`` section describing ``view``: ``data.sax``, else ``data.lax``, else ``data.<view>``."""
    data = _get(config, "data")
    for key in ("sax",) if view == "sax" else ("lax", view):
        if isinstance(data.get(key), Mapping):
            return f"data.{key}", data[key]
    raise ConfigError(f"CineMA config has no data section for view {view!r} (data.sax / data.lax / data.{view}).")


def _views(config: Mapping, names: Sequence[str], frames: int) -> tuple[dict[str, dict], dict[str, list[float]]]:
    views, spacing = {}, {}
    for name in names:
        if name not in CINEMA_VIEWS:
            raise ConfigError(f"CineMA config names view {name!r}; CineMA's views are {list(CINEMA_VIEWS)}.")
        path, section = _view_data(config, name)
        size = _ints(config, f"{path}.patch_size")
        if len(size) != (3 if name == "sax" else 2):
            raise ConfigError(f"CineMA config '{path}.patch_size' {size} has the wrong number of axes for {name}.")
        views[name] = {"image_size": size, "in_channels": frames * int(_get(config, f"{path}.in_chans"))}
        spacing[name] = [float(s) for s in section.get("spacing", [])]
    return views, spacing


def _encoder(config: Mapping, section: str, size: Mapping[str, int], patch: str, scale: str) -> dict[str, Any]:
    return {
        "patch_size": _ints(config, f"{section}.{patch}"),
        "scale_factor": _ints(config, f"{section}.{scale}"),
        "conv_channels": _ints(config, f"{section}.enc_conv_chans"),
        "num_blocks": int(_get(config, f"{section}.enc_conv_n_blocks")),
        **size,
    }


def _view_names(config: Mapping) -> list[str]:
    views = _get(config, "model.views")
    return [views] if isinstance(views, str) else list(views)


def parse_cinema_config(config: Mapping) -> CineMAConfig:
    """Build the description of the network a CineMA config defines.

    Args:
        config: the parsed ``config.yaml``.

    Returns:
        the :class:`CineMAConfig`.

    Raises:
        ConfigError: for an unknown ``model.name`` or size, a missing key, or malformed sizes (naming the key).
    """
    if not isinstance(config, Mapping):
        raise ConfigError(f"a CineMA config must be a YAML mapping, got {type(config).__name__}.")
    model = _get(config, "model")
    name = model.get("name")
    if name is None:
        size_name, size = _size(config, "model.size")
        views, spacing = _views(config, CINEMA_VIEWS, 1)
        args = {"views": views, **_encoder(config, "model", size, "patch_size", "scale_factor"), "fusion": True}
        return CineMAConfig("cinema_mae", "pretraining", args, spacing, size=size_name)
    if name not in ("convvit", "convunetr"):
        raise ConfigError(f"CineMA config 'model.name' is {name!r}; medssl runs 'convvit' and 'convunetr' models.")
    section = f"model.{name}"
    size_name, size = _size(config, f"{section}.size")
    encoder = _encoder(config, section, size, "enc_patch_size", "enc_scale_factor")
    task = str(config.get("task", ""))
    data = _get(config, "data")
    drop_path = float(_get(config, f"{section}.drop_path"))
    if name == "convunetr":
        views, spacing = _views(config, _view_names(config), 1)
        args = {
            "views": views,
            "out_channels": int(_get(config, "model.out_chans")),
            "encoder": encoder,
            "decoder_channels": _ints(config, f"{section}.dec_chans"),
            "decoder_patch_size": _ints(config, f"{section}.dec_patch_size"),
            "decoder_scale_factor": _ints(config, f"{section}.dec_scale_factor"),
            "dropout": float(_get(config, f"{section}.dropout")),
            "drop_path_rate": drop_path,
        }
        return CineMAConfig(name, task, args, spacing, size=size_name)
    views, spacing = _views(config, _view_names(config), int(_get(config, "model.n_frames")))
    class_names: list[str] = []
    regression: dict[str, float] = {}
    if "class_column" in data:
        class_names = [str(c) for c in _get(config, f"data.{data['class_column']}")]
        out_channels = len(class_names)
    elif "regression_column" in data:
        out_channels = 1
        stats = data.get(data["regression_column"])
        if isinstance(stats, Mapping) and {"mean", "std"} <= set(stats):
            regression = {"mean": float(stats["mean"]), "std": float(stats["std"])}
    else:
        out_channels = int(_get(config, "model.out_chans"))
    args = {"views": views, "out_channels": out_channels, "encoder": encoder, "drop_path_rate": drop_path}
    return CineMAConfig(name, task, args, spacing, class_names, regression, size_name)


def read_cinema_config(path: str | os.PathLike) -> CineMAConfig:
    """Read and parse a CineMA ``config.yaml``.

    Args:
        path: the file.

    Returns:
        the :class:`CineMAConfig`.

    Raises:
        ConfigError: when the file is missing or not YAML, or see :func:`parse_cinema_config`.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"CineMA config {path} does not exist: download it beside the checkpoint (config.yaml).")
    try:
        config = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ConfigError(f"CineMA config {path} is not valid YAML: {error}") from error
    try:
        return parse_cinema_config(config)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from error
