"""Image classification with a plain MONAI CNN, from SparK pre-training or from scratch: network, data, evaluation.

The network is MONAI's ``ResNet`` (``conv1_t_stride=2``, as SparK's ResNets; 2D or 3D, one input channel) without its
fully connected layer, so that its ``state_dict`` is exactly the one SparK pre-trains
(:meth:`medssl.methods.spark.SparK.encoder_state_dict`, keys ``encoder.network.*`` in the pre-training checkpoint),
plus a classification head on the globally pooled features. SparK: Tian et al., 2023, "Designing BERT for
Convolutional Networks: Sparse and Hierarchical Masked Modeling", ICLR, https://arxiv.org/abs/2301.03580; its medical
study (ResNet-50 on LIDC-IDRI CT slices, classification with shrinking label sets): Wolf et al., 2023, "Self-supervised
pre-training with contrastive and masked autoencoder methods for dealing with small datasets in deep learning for
medical imaging", Scientific Reports, https://doi.org/10.1038/s41598-023-46433-0.

Fine-tuning modes as :data:`~medssl.tasks.finetune.FINETUNE_MODES`: ``full``; ``frozen`` (fixed backbone in eval
mode, a two-layer MLP head); ``linear_probe`` (fixed backbone, linear head). Images are CT in HU, windowed to
``[-1000, 400]`` HU and scaled to ``[0, 1]`` (:data:`CT_WINDOW`), padded or cropped to the network's input size.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from monai.data import CacheDataset, Dataset
from monai.networks.nets import ResNet
from monai.transforms import (
    Compose,
    EnsureChannelFirstd,
    EnsureTyped,
    LoadImaged,
    RandAffined,
    RandFlipd,
    ResizeWithPadOrCropd,
    ScaleIntensityRanged,
)
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.utils.data import DataLoader

from medssl.engine.checkpoints import atomic_write, check_state_dict
from medssl.errors import CheckpointError, DataError
from medssl.methods.spark import SPARK_ENCODER_PREFIX
from medssl.tasks.classification import probability_columns
from medssl.tasks.finetune import FINETUNE_MODES, select_labelled

__all__ = [
    "CT_WINDOW",
    "RESNET_DEFAULTS",
    "build_resnet",
    "select_fraction",
    "load_spark_encoder",
    "CNNClassifier",
    "ct_transforms",
    "ct_dataset",
    "evaluate_cnn_classification",
    "predict_image_folder",
]

#: HU window mapped to [0, 1] (clipped): air to bone, lungs and soft tissue both visible.
CT_WINDOW = (-1000.0, 400.0)
#: A small ResNet-10 for CPU runs; Wolf et al.'s ResNet-50 is ``{"block": "bottleneck", "layers": [3, 4, 6, 3],
#: "block_inplanes": [64, 128, 256, 512]}``.
RESNET_DEFAULTS = {"block": "basic", "layers": [1, 1, 1, 1], "block_inplanes": [32, 64, 128, 256]}
_T = TypeVar("_T")


def build_resnet(spatial_dims: int = 2, **model: Any) -> ResNet:
    """The plain MONAI ResNet that SparK pre-trains and classification fine-tunes: stem stride 2, one input channel,
    no fully connected layer (``forward`` returns the ``[B, C]`` pooled features).

    Args:
        spatial_dims: 2 or 3.
        **model: ``block``, ``layers``, ``block_inplanes`` (default :data:`RESNET_DEFAULTS`) and any other MONAI
            ``ResNet`` argument except the fixed ones.

    Returns:
        the network.

    Raises:
        DataError: for ``spatial_dims`` other than 2 or 3, or a fixed argument given.
    """
    if spatial_dims not in (2, 3):
        raise DataError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}.")
    fixed = sorted({"spatial_dims", "n_input_channels", "conv1_t_stride", "feed_forward", "num_classes"} & set(model))
    if fixed:
        raise DataError(f"model must not set {fixed}: they are fixed by the SparK / classification recipe.")
    return ResNet(
        **{**RESNET_DEFAULTS, **model},
        spatial_dims=spatial_dims,
        n_input_channels=1,
        conv1_t_stride=2,
        feed_forward=False,
    )


def select_fraction(
    datalist: Sequence[_T], num_labelled: int | None = None, label_fraction: float | None = None, seed: int = 0
) -> list[_T]:
    """The labelled images a fine-tuning run uses: all, ``num_labelled`` of them, or a fraction, drawn with ``seed``.

    A fraction ``f`` keeps ``max(1, round(f * N))`` of the ``N`` images; the draw is
    :func:`~medssl.tasks.finetune.select_labelled`'s (nested: with one seed, smaller subsets lie inside larger ones).

    Args:
        datalist: one item per labelled image.
        num_labelled: how many to use; None: see ``label_fraction``.
        label_fraction: the share to use, in ``(0, 1]``; None with ``num_labelled`` None uses all.
        seed: seed of the draw.

    Returns:
        the selected items, in data-list order.

    Raises:
        DataError: when both are given, the fraction is outside ``(0, 1]``, or see ``select_labelled``.
    """
    if label_fraction is not None:
        if num_labelled is not None:
            raise DataError(f"give num_labelled ({num_labelled}) or label_fraction ({label_fraction}), not both.")
        if isinstance(label_fraction, bool) or not 0 < float(label_fraction) <= 1:
            raise DataError(f"label_fraction must lie in (0, 1], got {label_fraction!r}.")
        num_labelled = max(1, round(float(label_fraction) * len(datalist)))
    return select_labelled(datalist, num_labelled, seed)


def load_spark_encoder(network: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load the CNN of a SparK pre-training checkpoint strictly into the plain network.

    Args:
        network: the plain MONAI network SparK was built from (:func:`build_resnet` with the same settings).
        path: ``*.safetensors`` of a SparK run (keys :data:`~medssl.methods.spark.SPARK_ENCODER_PREFIX` ``*``) or of
            its exported encoder (the plain network's keys).

    Returns:
        ``network`` with the weights loaded.

    Raises:
        CheckpointError: when the file is missing, unreadable or not safetensors, or its encoder keys are missing,
            unexpected or of other shapes than the network's (named).
    """
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        raise CheckpointError(
            f"pretrained checkpoint {path} must be an existing .safetensors file (the spark_ct pre-training writes "
            "<run_dir>/models/model.safetensors); pass --pretrained False to train from scratch."
        )
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read pretrained checkpoint {path}: {e}") from e
    if any(key.startswith(SPARK_ENCODER_PREFIX) for key in state):
        prefix = len(SPARK_ENCODER_PREFIX)
        state = {key[prefix:]: value for key, value in state.items() if key.startswith(SPARK_ENCODER_PREFIX)}
    check_state_dict(network, state, f"the SparK encoder in {path}")
    network.load_state_dict(state)
    return network


class CNNClassifier(nn.Module):
    """A plain MONAI ResNet backbone (:func:`build_resnet`) and a classification head.

    Args:
        num_classes: ``K``.
        spatial_dims: 2 or 3.
        model: :func:`build_resnet` settings; must equal the pre-training's to load its weights.
        finetune_mode: one of :data:`~medssl.tasks.finetune.FINETUNE_MODES`.
        dropout: dropout before the (last) linear layer.

    Raises:
        ValueError: for an unknown ``finetune_mode`` or fewer than two classes.
        DataError: see :func:`build_resnet`.
    """

    def __init__(
        self,
        num_classes: int,
        spatial_dims: int = 2,
        model: Mapping[str, Any] | None = None,
        finetune_mode: str = "full",
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if finetune_mode not in FINETUNE_MODES:
            raise ValueError(f"finetune_mode must be one of {FINETUNE_MODES}, got {finetune_mode!r}.")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}.")
        self.backbone = build_resnet(spatial_dims, **dict(model or {}))
        self.finetune_mode = finetune_mode
        width = self.backbone.in_planes  # MONAI ResNet: channels of the last stage after construction
        if finetune_mode == "frozen":
            layers = [nn.Linear(width, width), nn.ReLU(), nn.Dropout(dropout), nn.Linear(width, num_classes)]
        else:
            layers = [nn.Dropout(dropout), nn.Linear(width, num_classes)]
        self.head = nn.Sequential(*layers)
        self.backbone.requires_grad_(finetune_mode == "full")

    def train(self: _T, mode: bool = True) -> _T:
        """``nn.Module.train``, except that a frozen backbone stays in eval mode (its BatchNorm statistics fixed)."""
        super().train(mode)
        if self.finetune_mode != "full":
            self.backbone.eval()
        return self

    def load_pretrained(self: _T, path: str | os.PathLike | bool | None) -> _T:
        """Load the backbone from a SparK checkpoint (:func:`load_spark_encoder`).

        Args:
            path: the checkpoint; None, False or "" keep the random initialisation (from scratch).

        Returns:
            the network.

        Raises:
            CheckpointError: for ``True`` or see :func:`load_spark_encoder`.
        """
        if path is None or path is False or path == "":
            return self
        if path is True:
            raise CheckpointError("pretrained must be a checkpoint path, or False / None to train from scratch.")
        load_spark_encoder(self.backbone, path)
        return self

    def forward(self, image: Tensor, key: str | None = None) -> Tensor:
        """Class logits.

        Args:
            image: ``[B, 1, *spatial]``.
            key: the batch key (given by :class:`~medssl.tasks.finetune.SupervisedTask`; unused).

        Returns:
            ``[B, K]`` logits.
        """
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.finetune_mode == "full"):
            features = self.backbone(image)
        return self.head(features)


def ct_transforms(image_size: Sequence[int], augment: bool = False, window: Sequence[float] = CT_WINDOW) -> Compose:
    """Load a CT image in HU, window it to [0, 1] and pad / crop it to ``image_size``; optionally augment.

    Augmentation (training): a left-right flip and a random affine (rotation up to 0.2 rad in plane, scaling
    +-10 %, shifts up to 8 % of the size), each with probability 0.5, padding with 0 (air).

    Args:
        image_size: the network's spatial input size.
        augment: add the random transforms.
        window: ``(low, high)`` HU.

    Returns:
        a MONAI ``Compose`` on ``{"image": path, ...}`` items giving ``[1, *image_size]`` float32 images.
    """
    size = [int(s) for s in image_size]
    steps = [
        LoadImaged("image", image_only=True),
        EnsureChannelFirstd("image", channel_dim="no_channel"),
        ScaleIntensityRanged("image", a_min=window[0], a_max=window[1], b_min=0.0, b_max=1.0, clip=True),
        ResizeWithPadOrCropd("image", spatial_size=size),
        EnsureTyped("image", dtype=torch.float32, track_meta=False),
    ]
    if augment:
        rotate = (0.2,) + (0.0,) * (len(size) - 1)
        steps += [
            RandFlipd("image", prob=0.5, spatial_axis=0),
            RandAffined("image", prob=0.5, rotate_range=rotate, scale_range=0.1,
                        translate_range=[0.08 * s for s in size], padding_mode="zeros"),
        ]
    return Compose(steps)


def ct_dataset(
    items: Sequence[Mapping[str, Any]],
    image_size: Sequence[int],
    augment: bool = False,
    cache_workers: int = 1,
    progress: bool = False,
) -> CacheDataset:
    """A cached dataset of CT items (the windowed, resized images are cached; augmentation runs per draw).

    Args:
        items: ``{"image": path, "label": class index}`` (e.g. :func:`~medssl.data.ct_phantom.load_ct_datalist`).
        image_size: network input size.
        augment: training augmentation (see :func:`ct_transforms`).
        cache_workers: threads filling the cache.
        progress: show the caching progress.

    Returns:
        the dataset; samples are ``{"image": [1, *image_size], "label": int}``.

    Raises:
        DataError: when ``items`` is empty.
    """
    if not items:
        raise DataError("the CT data list is empty: nothing to train or evaluate on.")
    return CacheDataset(list(items), ct_transforms(image_size, augment), num_workers=cache_workers, progress=progress)


def _logits(network: nn.Module, dataset: Dataset, batch_size: int) -> Tensor:
    device = next(network.parameters()).device
    network.eval()
    chunks = []
    with torch.no_grad():
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            chunks.append(network(batch["image"].to(device)).float().cpu())
    return torch.cat(chunks)


def evaluate_cnn_classification(
    network: nn.Module,
    items: Sequence[Mapping[str, Any]],
    image_size: Sequence[int],
    classes: Sequence[str],
    batch_size: int = 16,
) -> list[dict[str, Any]]:
    """Classify labelled images.

    Args:
        network: ``network(images [B, 1, *image_size]) -> [B, K]`` logits.
        items: ``{"image": path, "label": class index}``.
        image_size: network input size.
        classes: class names by index.
        batch_size: images per forward pass.

    Returns:
        one row per image: ``{"image": index, "true", "predicted", "prob_<class>"...}`` (no file names), for
        :func:`medssl.tasks.classification.report_classification`.

    Raises:
        DataError: when ``items`` is empty or lacks labels.
    """
    if not items or any("label" not in item for item in items):
        raise DataError("the evaluation items are empty or lack class labels.")
    logits = _logits(network, ct_dataset(items, image_size), batch_size)
    columns = probability_columns(classes)
    return [{"image": index, "true": classes[int(item["label"])], **columns(row)}
            for index, (item, row) in enumerate(zip(items, logits))]


def predict_image_folder(
    network: nn.Module,
    input_dir: str | os.PathLike,
    output_dir: str | os.PathLike,
    image_size: Sequence[int],
    classes: Sequence[str],
    batch_size: int = 16,
) -> Path:
    """Classify every NIfTI image (``*.nii`` / ``*.nii.gz``, in HU) of a folder.

    Args:
        network: as in :func:`evaluate_cnn_classification`.
        input_dir: the folder (not searched recursively).
        output_dir: where ``predictions.csv`` and ``predictions.json`` go (created).
        image_size: network input size.
        classes: class names by index.
        batch_size: images per forward pass.

    Returns:
        the path of ``predictions.csv``: ``file, predicted, prob_<class>...`` per image, sorted by file name.

    Raises:
        DataError: when the folder does not exist or holds no NIfTI file.
    """
    folder = Path(input_dir or "")
    if not input_dir or not folder.is_dir():
        raise DataError(f"input_dir {input_dir!r} is not a folder: pass --input_dir with NIfTI images.")
    files = sorted(p for p in folder.iterdir() if p.name.endswith((".nii", ".nii.gz")))
    if not files:
        raise DataError(f"{folder} holds no .nii / .nii.gz image.")
    dataset = Dataset([{"image": str(path)} for path in files], ct_transforms(image_size))
    logits = _logits(network, dataset, batch_size)
    columns = probability_columns(classes)
    rows = [{"file": path.name, **columns(row)} for path, row in zip(files, logits)]
    out = Path(output_dir)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(out / "predictions.json", lambda temporary: Path(temporary).write_text(json.dumps(rows, indent=1)))
    return atomic_write(out / "predictions.csv", lambda temporary: Path(temporary).write_text(buffer.getvalue()))
