"""Image-level tasks (classification, regression) on the pretrained encoder with a multi-channel input.

The network (:class:`ImageLevelNetwork`) encodes one view, averages its tokens, standardises the mean token across
the batch and applies a linear layer (:class:`PooledTokenHead`): the global-pool head of MAE (He et al., 2022,
https://arxiv.org/abs/2111.06377) that CineMA uses for its classification and regression heads (Fu et al., 2025,
https://arxiv.org/abs/2506.00679), with MAE's linear-probing BatchNorm in place of its fine-tuning LayerNorm (see the
head for why). Its input has several
channels (ED and ES frames, :mod:`medssl.data.cine_phases`) where the pre-trained patch embedding has one; the
pre-trained kernel is repeated over the channels and divided by their number (:func:`inflate_input_channels`), so an
input that is the same in every channel is embedded exactly as the pre-trained encoder embeds it, the same "inflation"
I3D uses to turn 2-D kernels into 3-D ones (Carreira and Zisserman, 2017, https://arxiv.org/abs/1705.07750).

Regression targets are standardised (CineMA regresses z-scored EF): the head predicts z-scores and fixed buffers
``output_mean`` / ``output_std`` (the training targets' statistics, saved with the weights) turn them back into the
target's units, so the network outputs e.g. EF in %; :class:`StandardisedSmoothL1Loss` scores the error in z units.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from monai.data import DataLoader
from torch import Tensor, nn

from medssl.data.cine_labelled import SegmentationView
from medssl.data.cine_phases import ED_KEY, ES_KEY, cine_phase_dataset, nifti_folder_datalist
from medssl.engine.checkpoints import atomic_write
from medssl.errors import DataError
from medssl.nets.vit import MultiViewEncoder
from medssl.tasks.finetune import EncoderTaskNetwork, _write_csv

__all__ = [
    "inflate_input_channels",
    "PooledTokenHead",
    "ImageLevelNetwork",
    "StandardisedSmoothL1Loss",
    "predict_phases",
    "predict_folder",
    "write_predictions",
]

# The weight of a patch embedding's first layer: its input features are patch values ordered (*patch, C).
_FIRST_LAYER = re.compile(r"^patch_embed\.([^.]+)\.(proj|stages\.0)\.weight$")
# MAE's fine-tuning head starts close to zero, so training starts from the mean (the output buffers' mean).
_HEAD_INIT_STD = 2e-5


def inflate_input_channels(weight: Tensor, channels: int) -> Tensor:
    """A 1-channel patch kernel for ``channels`` input channels: repeated per channel and divided by the count.

    Patch tokens order their values ``(*patch, C)`` (:func:`~medssl.nets.tokens.patchify`), so column ``p`` of the
    1-channel kernel becomes columns ``p * C .. p * C + C - 1``. For an input equal in every channel, the inflated
    kernel gives exactly the 1-channel embedding: ``sum_c (w / C) x = w x``.

    Args:
        weight: ``[out, P]`` first-layer weight of a 1-channel patch embedding.
        channels: input channels ``C`` >= 1.

    Returns:
        ``[out, P * C]``.

    Raises:
        ValueError: when ``weight`` is not 2-D or ``channels`` < 1.
    """
    if weight.ndim != 2 or channels < 1:
        raise ValueError(f"need a [out, P] weight and channels >= 1, got shape {tuple(weight.shape)}, {channels}.")
    return weight.repeat_interleave(channels, dim=1) / channels


class PooledTokenHead(nn.Module):
    """Mean of the tokens, standardised across the batch (BatchNorm without affine), then a linear layer.

    MAE's linear-probing head (He et al., 2022, https://arxiv.org/abs/2111.06377, appendix A.2): the mean token of a
    pre-trained encoder is nearly the same for every image (on the phantoms its spread across subjects is under 1 %
    of its size), so a per-sample LayerNorm (MAE's fine-tuning ``fc_norm``) passes that shared part on and the linear
    layer learns from a tiny residue: in 200 steps a LayerNorm head stayed at chance on frozen ``cine_mae`` features
    where this head fitted them. The statistics are the batch's in training and running averages in evaluation; a
    lone training sample (a last batch of one) uses the running averages.

    Args:
        embed_dim: token width ``D``.
        num_outputs: outputs ``K`` (classes, or regression targets).

    Raises:
        ValueError: when a size is < 1.
    """

    def __init__(self, embed_dim: int, num_outputs: int) -> None:
        super().__init__()
        if embed_dim < 1 or num_outputs < 1:
            raise ValueError(f"embed_dim and num_outputs must be >= 1, got {embed_dim} and {num_outputs}.")
        self.norm = nn.BatchNorm1d(embed_dim, affine=False, eps=1e-6)
        self.linear = nn.Linear(embed_dim, num_outputs)
        nn.init.trunc_normal_(self.linear.weight, std=_HEAD_INIT_STD)
        nn.init.zeros_(self.linear.bias)

    def forward(self, tokens: Tensor) -> Tensor:
        """Args: tokens ``[B, N, D]``. Returns: ``[B, K]``."""
        pooled = tokens.mean(dim=1)
        if self.training and pooled.shape[0] == 1:
            norm = self.norm
            return self.linear(F.batch_norm(pooled, norm.running_mean, norm.running_var, training=False, eps=norm.eps))
        return self.linear(self.norm(pooled))


class ImageLevelNetwork(EncoderTaskNetwork):
    """Pretrained multi-view ViT encoder on one multi-channel view + a pooled-token head: one vector per image.

    Loading a 1-channel pre-training checkpoint inflates the view's patch embedding to ``in_channels``
    (:func:`inflate_input_channels`); every other weight loads strictly by name. With ``standardised`` the head's
    outputs are z-scores turned into the target's units by the buffers ``output_mean`` and ``output_std`` (set from
    the training targets with :meth:`set_output_statistics`, saved with the weights).

    Args:
        views: ``{view: {"image_size", "patch_size", ...}}`` with exactly one view (other keys such as ``spacing``
            are ignored).
        num_outputs: outputs ``K`` (e.g. 5 disease classes, or LVEF and RVEF).
        in_channels: channels of the input (2: ED and ES).
        embed_dim, depth, num_heads, mlp_ratio, patch_embed: the encoder; must match the pretrained one.
        drop_path_rate: stochastic depth of the encoder's last block (MAE fine-tuning: 0.1).
        finetune_mode: ``"full"``, or ``"frozen"`` / ``"linear_probe"`` (frozen encoder; the same here, as the head
            is already linear on the standardised mean token).
        standardised: outputs are de-standardised by ``output_mean`` / ``output_std`` (regression).

    Raises:
        ValueError: for another number of views than one, invalid geometry or widths, or an unknown mode.
    """

    def __init__(
        self,
        views: Mapping[str, Mapping[str, Any]],
        num_outputs: int,
        in_channels: int = 2,
        embed_dim: int = 192,
        depth: int = 4,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        patch_embed: str = "linear",
        drop_path_rate: float = 0.1,
        finetune_mode: str = "full",
        standardised: bool = False,
    ) -> None:
        if len(views) != 1:
            raise ValueError(f"an image-level network reads exactly one view, got {list(views)}.")
        (name, spec), = views.items()
        geometry = {
            name: {"image_size": spec["image_size"], "patch_size": spec["patch_size"], "in_channels": in_channels}
        }
        encoder = MultiViewEncoder(
            geometry,
            embed_dim=embed_dim,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            drop_path_rate=drop_path_rate,
            patch_embed=patch_embed,
            view_embedding=True,
        )
        super().__init__(encoder, finetune_mode)
        self.view = name
        self.num_outputs = num_outputs
        self.head = PooledTokenHead(embed_dim, num_outputs)
        self.standardised = standardised
        if standardised:
            self.register_buffer("output_mean", torch.zeros(num_outputs))
            self.register_buffer("output_std", torch.ones(num_outputs))

    def adapt_pretrained_weights(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Inflate the view's 1-channel first patch-embedding layer to ``in_channels``; other weights unchanged.

        Args:
            state: checkpoint encoder weights, names without ``encoder.``.

        Returns:
            the weights, the first layer inflated where the checkpoint has ``in_channels`` times fewer inputs than
            the network (any other difference is left for the strict check to report).
        """
        own = self.encoder.state_dict()
        channels = self.encoder.views[self.view].in_channels
        adapted = dict(state)
        for key, weight in state.items():
            match = _FIRST_LAYER.match(key)
            if match is None or match.group(1) != self.view or key not in own or weight.ndim != 2:
                continue
            if own[key].shape[1] == weight.shape[1] * channels != weight.shape[1]:
                adapted[key] = inflate_input_channels(weight, channels)
        return adapted

    def set_output_statistics(self, targets: Tensor | Sequence[Sequence[float]]) -> ImageLevelNetwork:
        """Set ``output_mean`` / ``output_std`` from the training targets (population standard deviation).

        Args:
            targets: ``[N, K]`` target values.

        Returns:
            the network.

        Raises:
            ValueError: when the network is not ``standardised`` or ``targets`` is not ``[N, K]`` with ``N`` >= 1.
            DataError: when a target is not finite.
        """
        if not self.standardised:
            raise ValueError("set_output_statistics needs a network built with standardised=True.")
        values = torch.as_tensor(targets, dtype=torch.float32)
        if values.ndim != 2 or values.shape[0] < 1 or values.shape[1] != self.num_outputs:
            raise ValueError(f"targets must be [N >= 1, {self.num_outputs}], got shape {tuple(values.shape)}.")
        if not torch.isfinite(values).all():
            raise DataError(f"training targets must be finite numbers, got {values.tolist()}.")
        std = values.std(dim=0, correction=0)
        # One subject, or a target that never changes, has no spread to scale by.
        std = torch.where(std > 1e-6, std, torch.ones_like(std))
        self.output_mean.copy_(values.mean(dim=0))
        self.output_std.copy_(std)
        return self

    def forward(self, image: Tensor, view: str | None = None) -> Tensor:
        """Predict one vector per image.

        Args:
            image: ``[B, in_channels, *image_size]``.
            view: the view name; None for the network's only view (a plain tensor-in, tensor-out module for MONAI's
                bundle tools and TorchScript export).

        Returns:
            ``[B, num_outputs]``: logits, or targets in their units when ``standardised``.

        Raises:
            ValueError: for another view or an image of the wrong shape.
        """
        if view is not None and view != self.view:
            raise ValueError(f"unknown view {view!r}; this network reads '{self.view}'.")
        tokens, _ = self.encode(image, self.view)
        out = self.head(tokens)
        return out * self.output_std + self.output_mean if self.standardised else out


class StandardisedSmoothL1Loss(nn.Module):
    """Smooth-L1 (Huber) loss of regression errors measured in standard deviations of the training targets.

    ``mean(smooth_l1((prediction - target) / std))``, i.e. the loss on z-scored targets (CineMA regresses z-scored EF;
    the smooth-L1 form is quadratic within one standard deviation and linear beyond, so outliers weigh less).

    Args:
        std: ``[K]`` target standard deviations (e.g. :attr:`ImageLevelNetwork.output_std`; read at every call, so
            a buffer set later is honoured).
        beta: where quadratic turns linear, in standard deviations.

    Raises:
        ValueError (on call): when prediction and target shapes differ or are not ``[B, K]``.
    """

    def __init__(self, std: Tensor, beta: float = 1.0) -> None:
        super().__init__()
        self.std = std
        self.beta = beta

    def forward(self, prediction: Tensor, target: Tensor) -> Tensor:
        """Args: prediction, target ``[B, K]``. Returns: the mean loss ``[]``."""
        if prediction.shape != target.shape or prediction.ndim != 2 or prediction.shape[1] != self.std.numel():
            raise ValueError(
                f"prediction {tuple(prediction.shape)} and target {tuple(target.shape)} must both be "
                f"[B, {self.std.numel()}]."
            )
        std = self.std.to(prediction.device)
        return F.smooth_l1_loss(prediction / std, target.to(prediction.dtype) / std, beta=self.beta)


@torch.no_grad()
def predict_phases(
    network: nn.Module,
    items: Sequence[Mapping[str, Any]],
    view: SegmentationView,
    centre: str = "heart",
    batch_size: int = 4,
    device: torch.device | str | None = None,
) -> tuple[Tensor, list[dict[str, int]]]:
    """Run a network over subjects' ED/ES windows (:func:`~medssl.data.cine_phases.cine_phase_dataset`), in order.

    Args:
        network: ``network(images) -> [B, K]``, run in eval mode.
        items: from :func:`~medssl.data.cine_phases.cine_phase_datalist` or
            :func:`~medssl.data.cine_phases.nifti_folder_datalist`.
        view: the SAX geometry of the network's input.
        centre: ``"heart"`` or ``"image"`` (as in training).
        batch_size: subjects per forward pass.
        device: where to run; default the network's device.

    Returns:
        ``[N, K]`` float32 outputs on the CPU, and per subject the ``{"ed_frame", "es_frame"}`` used.

    Raises:
        DataError: when ``items`` is empty or a cine cannot be read or has too few frames.
    """
    device = torch.device(device) if device is not None else next(network.parameters()).device
    dataset = cine_phase_dataset(items, view, centre, augment=False, progress=False)
    was_training = network.training
    network.eval()
    outputs, frames = [], []
    try:
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0):
            outputs.append(network(batch[view.name].to(device)).float().cpu())
            frames += [
                {ED_KEY: int(ed), ES_KEY: int(es)} for ed, es in zip(batch[ED_KEY].tolist(), batch[ES_KEY].tolist())
            ]
    finally:
        network.train(was_training)
    return torch.cat(outputs), frames


def predict_folder(
    network: nn.Module,
    input_dir: str | os.PathLike | None,
    output_dir: str | os.PathLike,
    view: SegmentationView,
    columns: Callable[[Tensor], dict[str, Any]],
    centre: str = "heart",
    ed_frame: int = 0,
    es_frame: int | None = None,
    batch_size: int = 4,
) -> list[Path]:
    """Predict every SAX cine of a NIfTI folder and write ``predictions.csv`` and ``predictions.json``.

    ED is ``ed_frame`` (0: ECG-triggered cines start at the R wave) and ES ``es_frame`` or, when None, the frame
    farthest from ED (:func:`~medssl.data.cine_phases.farthest_frame`); both are written beside each prediction.

    Args:
        network: ``network(images) -> [B, K]``.
        input_dir: folder of ``*.nii`` / ``*.nii.gz`` SAX cines ``[H, W, S, T]``.
        output_dir: where the two files go (created).
        view: the SAX geometry of the network's input.
        columns: one subject's output ``[K]`` -> its prediction columns (e.g. class and probabilities).
        centre: ``"heart"`` or ``"image"`` (as in training).
        ed_frame: ED frame of every cine.
        es_frame: ES frame of every cine, or None to estimate it per cine.
        batch_size: cines per forward pass.

    Returns:
        the two written paths.

    Raises:
        DataError: when the folder is missing or empty, or a cine is unreadable or has too few frames.
    """
    items = nifti_folder_datalist(input_dir, ed_frame, es_frame, view.name)
    outputs, frames = predict_phases(network, items, view, centre, batch_size)
    rows = [{"file": item["file"], **used, **columns(output)} for item, used, output in zip(items, frames, outputs)]
    return write_predictions(rows, output_dir)


def write_predictions(rows: Sequence[Mapping[str, Any]], output_dir: str | os.PathLike) -> list[Path]:
    """Write prediction rows as ``predictions.csv`` and ``predictions.json`` (atomically).

    Args:
        rows: one mapping per input file.
        output_dir: folder (created).

    Returns:
        the two paths.

    Raises:
        DataError: when ``rows`` is empty.
    """
    if not rows:
        raise DataError("nothing was predicted: no input file.")
    folder = Path(output_dir)
    text = json.dumps([dict(row) for row in rows], indent=2)
    return [
        _write_csv(rows, folder / "predictions.csv"),
        atomic_write(folder / "predictions.json", lambda temporary: Path(temporary).write_text(text)),
    ]
