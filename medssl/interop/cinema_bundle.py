"""Turn a CineMA checkpoint and its ``config.yaml`` into a medssl bundle: medssl's network, weights in medssl's names.

The bundle (a MONAI bundle folder) holds::

    configs/metadata.json      MONAI metadata, with network_data_format and the CineMA provenance
    configs/inference.json     network_def (medssl.nets.cinema), network (weights loaded), and for a SAX / LAX-4C
                               segmentation model a ``predictor`` with CineMA's pre-processing
    configs/cinema_config.yaml the config.yaml it came from
    models/model.safetensors   the converted weights; their metadata describe the encoder (``medssl_encoder``), so
                               ``medssl finetune cine_seg --pretrained <bundle>/models/model.safetensors`` can
                               rebuild and fine-tune it
    docs/README.md

CineMA: Fu et al., 2025, https://arxiv.org/abs/2506.00679; weights at https://huggingface.co/mathpluscode/CineMA.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import monai
import numpy as np
import safetensors
import torch
from safetensors.torch import save_file
from torch import nn

from medssl.errors import DataError
from medssl.interop.cinema_config import CineMAConfig
from medssl.interop.cinema_import import find_cinema_files, load_cinema
from medssl.interop.cinema_preprocess import cinema_views
from medssl.tasks.finetune import ENCODER_METADATA_KEY

__all__ = ["import_cinema", "encoder_description", "inference_config", "is_segmentation"]

_SEGMENTATION_CLASSES = ["background", "RV", "MYO", "LV"]
_INFERENCE = {"sw_batch_size": 1, "overlap": 0.25}


def is_segmentation(config: CineMAConfig) -> bool:
    """Whether the model is a cardiac segmentation (ConvUNetR, 4 classes, SAX or LAX-4C): CineMA's ACDC / M&Ms label
    order 0 background, 1 RV, 2 MYO, 3 LV is medssl's, so class ids pass through unchanged."""
    return (
        config.model == "convunetr"
        and config.task == "segmentation"
        and config.network_args["out_channels"] == len(_SEGMENTATION_CLASSES)
        and set(config.views) <= {"sax", "lax_4c"}
    )


def encoder_description(config: CineMAConfig) -> dict[str, Any]:
    """The encoder architecture fine-tuning rebuilds (:data:`~medssl.tasks.finetune.ENCODER_METADATA_KEY`).

    Args:
        config: the parsed CineMA config.

    Returns:
        ``{"target", "args", "prefix"}``: :class:`~medssl.nets.cinema.CineMAEncoder`, its arguments other than the
        views, and the prefix of its keys in the bundle's weights.
    """
    args = config.network_args
    if config.model == "cinema_mae":
        encoder = {key: value for key, value in args.items() if key != "views"}
        prefix = ""
    else:
        encoder = {**args["encoder"], "fusion": config.model == "convvit"}
        prefix = "encoder."
    return {"target": "medssl.nets.cinema.CineMAEncoder", "args": encoder, "prefix": prefix}


def inference_config(config: CineMAConfig, bundle_root: str = ".") -> dict[str, Any]:
    """The bundle's ``inference.json``.

    Args:
        config: the parsed CineMA config.
        bundle_root: the bundle folder (``bundle_root``; override it when the folder moves).

    Returns:
        the config: ``network_def``, ``network``; for segmentation models also ``predictor`` (a
        :class:`~medssl.tasks.segmentation.CineSegmentationPredictor` on CineMA's spacing and window) and a ``run``
        that segments a folder of NIfTI files.
    """
    content: dict[str, Any] = {
        "imports": [
            "$import os",
            "$import torch",
            "$import medssl",
            "$import medssl.engine.checkpoints",
            "$import medssl.nets.cinema",
        ],
        "bundle_root": bundle_root,
        "weights": "$os.path.join(@bundle_root, 'models', 'model.safetensors')",
        "device": "$torch.device('cuda' if torch.cuda.is_available() else 'cpu')",
        "network_def": {"_target_": config.network_target, **config.network_args},
        "network": "$medssl.engine.checkpoints.load_network_weights(@network_def, @weights).to(@device).eval()",
        "initialize": [],
        "run": [],
        "finalize": [],
    }
    if is_segmentation(config):
        views = cinema_views(config)
        content["imports"] += ["$import medssl.data.cine_labelled", "$import medssl.tasks.segmentation"]
        content.update(
            {
                "class_names": _SEGMENTATION_CLASSES,
                "view": next(iter(views)),
                "input_dir": None,
                "output_dir": "$os.path.join(@bundle_root, 'predictions')",
                "views": {n: {"image_size": list(v.image_size), "spacing": list(v.spacing)} for n, v in views.items()},
                "inference": dict(_INFERENCE),
                "predictor": {
                    "_target_": "medssl.tasks.segmentation.CineSegmentationPredictor",
                    "network": "@network",
                    "views": "$medssl.data.cine_labelled.parse_segmentation_views(@views)",
                    "sw_batch_size": "@inference#sw_batch_size",
                    "overlap": "@inference#overlap",
                },
                "run": ["$medssl.tasks.segmentation.segment_folder(@predictor, @input_dir, @output_dir, @view)"],
            }
        )
    return content


def _data_format(config: CineMAConfig) -> dict[str, Any]:
    view, spec = next(iter(config.views.items()))
    channels = {str(c): f"frame {c} of a {view} cine (CineMA pre-processing)" for c in range(spec["in_channels"])}
    image = {
        "type": "image",
        "format": "magnitude",
        "modality": "MR",
        "num_channels": spec["in_channels"],
        "spatial_shape": spec["image_size"],
        "dtype": "float32",
        "value_range": [0, 1],
        "is_patch_data": False,
        "channel_def": channels,
    }
    if config.model == "convunetr":
        count = config.network_args["out_channels"]
        names = _SEGMENTATION_CLASSES if is_segmentation(config) else [f"channel {c}" for c in range(count)]
        output = {
            "type": "image",
            "format": "segmentation" if is_segmentation(config) else "heatmap",
            "num_channels": len(names),
            "spatial_shape": spec["image_size"],
            "channel_def": dict(enumerate(names)),
        }
    elif config.model == "convvit":
        names = config.class_names or [f"output {c}" for c in range(config.network_args["out_channels"])]
        output = {"type": "probabilities" if config.class_names else "regression", "num_channels": len(names),
                  "spatial_shape": [len(names)], "channel_def": dict(enumerate(names))}
    else:
        output = {"type": "feature", "num_channels": config.network_args["embed_dim"], "spatial_shape": [],
                  "channel_def": {"0": "tokens [B, N, D] per view and the class token"}}
    output.update({"dtype": "float32", "value_range": [], "is_patch_data": False, "modality": "n/a"})
    output["channel_def"] = {str(k): v for k, v in output["channel_def"].items()}
    return {"inputs": {"image": image}, "outputs": {"pred": output}}


def _metadata(config: CineMAConfig, checkpoint: Path) -> dict[str, Any]:
    kind = {"cinema_mae": "pre-trained masked autoencoder (encoder)", "convvit": "ConvViT", "convunetr": "ConvUNetR"}
    return {
        "version": "0.1.0",
        "changelog": {"0.1.0": f"imported from CineMA checkpoint {checkpoint.name}"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
        "required_packages_version": {"medssl": "0.1.0", "safetensors": safetensors.__version__},
        "name": f"CineMA {kind[config.model]} ({config.task}, {', '.join(config.views)}, size {config.size})",
        "task": config.task,
        "description": (
            f"CineMA's {kind[config.model]} ({config.task}) imported into medssl's own network "
            f"{config.network_target}; weights converted from {checkpoint.name} with a strict key map."
        ),
        "authors": "Fu Y et al. (CineMA); imported by medssl",
        "copyright": "CineMA: MIT licence (mathpluscode/CineMA); see the model card for the weights' terms",
        "data_source": "CineMA's training data (UK Biobank pre-training; ACDC / M&Ms / landmark data for fine-tuning)",
        "data_type": "nifti",
        "image_classes": (
            "cine CMR frames resampled to CineMA's spacing, clipped to the 0.95-99.5 percentiles, scaled to [0, 1]"
        ),
        "cinema": {
            "model": config.model,
            "size": config.size,
            "checkpoint": checkpoint.name,
            "class_names": config.class_names,
            "regression": config.regression,
            "spacing": config.spacing,
        },
        "intended_use": "Research only; not a diagnostic device",
        "references": [
            "Fu Y et al. CineMA: A Foundation Model for Cine Cardiac MRI. 2025. https://arxiv.org/abs/2506.00679"
        ],
        "network_data_format": _data_format(config),
    }


def _readme(config: CineMAConfig, checkpoint: Path) -> str:
    lines = [
        f"# CineMA {config.model} imported into medssl",
        "",
        f"Imported from `{checkpoint.name}` (CineMA, Fu et al. 2025, https://arxiv.org/abs/2506.00679; weights from "
        "https://huggingface.co/mathpluscode/CineMA). The network is medssl's own "
        f"`{config.network_target}`, size `{config.size}`; `configs/cinema_config.yaml` is the original config.",
        "",
        "Input: CineMA's pre-processing (`medssl.interop.cinema_preprocess`): resample, clip to the 0.95-99.5th "
        "intensity percentiles, scale to [0, 1], and take a window around the heart; per view: "
        + "; ".join(
            f"{name} {' x '.join(map(str, config.spacing[name]))} mm, window {' x '.join(map(str, spec['image_size']))}"
            f", {spec['in_channels']} frame(s) as channels"
            for name, spec in config.views.items()
        )
        + ".",
    ]
    if is_segmentation(config):
        lines += [
            "",
            "Segmentation: `predictor` in `configs/inference.json` segments whole cines "
            "(`predict(cine, view, frames)`, class ids 0 background, 1 RV, 2 MYO, 3 LV on the input grid); "
            "`python -m monai.bundle run --config_file configs/inference.json --input_dir <NIfTI folder>` (add "
            "`--bundle_root <this folder>` after moving it).",
        ]
    if config.regression:
        std, mean = config.regression["std"], config.regression["mean"]
        lines += ["", f"Regression output is z-scored: value = output * {std} + {mean}."]
    if config.class_names:
        lines += ["", f"Classes, in output order: {', '.join(config.class_names)}."]
    lines += [
        "",
        "Fine-tuning: `models/model.safetensors` carries its encoder architecture in its metadata, so "
        "`medssl finetune cine_seg --pretrained models/model.safetensors` fine-tunes this encoder.",
        "",
        "Bundle configs can execute code: only run bundles you trust.",
        "",
    ]
    return "\n".join(lines)


def _save_weights(network: nn.Module, config: CineMAConfig, path: Path) -> None:
    state = {key: value.detach().cpu().contiguous() for key, value in network.state_dict().items()}
    metadata = {
        "format": "pt",
        ENCODER_METADATA_KEY: json.dumps(encoder_description(config)),
        "cinema_model": config.model,
        "cinema_size": config.size,
    }
    save_file(state, str(path), metadata=metadata)


def import_cinema(source: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Import a CineMA checkpoint (+ its ``config.yaml``) as a medssl bundle.

    Args:
        source: a CineMA ``*.safetensors`` file (``config.yaml`` beside it) or the folder holding them.
        out_dir: the bundle folder to create; must not exist or be empty.

    Returns:
        the bundle folder.

    Raises:
        DataError: for a missing source, a file that is not safetensors, or a non-empty ``out_dir``.
        ConfigError: for a missing or invalid ``config.yaml`` (e.g. an unknown model size).
        CheckpointError: when the checkpoint's keys or shapes do not match its config.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DataError(f"{out_dir} already exists and is not an empty folder; choose a new bundle folder.")
    checkpoint, config_path = find_cinema_files(source)
    network, config = load_cinema(checkpoint)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the destination and rename, so a failed import never leaves a half-written bundle.
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        for folder in ("configs", "models", "docs"):
            (staging / folder).mkdir()
        _save_weights(network, config, staging / "models" / "model.safetensors")
        inference = inference_config(config, str(out_dir.resolve()))
        (staging / "configs" / "inference.json").write_text(json.dumps(inference, indent=4) + "\n")
        (staging / "configs" / "metadata.json").write_text(json.dumps(_metadata(config, checkpoint), indent=4) + "\n")
        shutil.copyfile(config_path, staging / "configs" / "cinema_config.yaml")
        (staging / "docs" / "README.md").write_text(_readme(config, checkpoint))
        if out_dir.exists():
            out_dir.rmdir()
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir
