"""Shared fine-tuning machinery: pretrained encoders, fine-tune modes, layer-wise LR decay, labelled subsets, reports.

Every cine task (segmentation, ejection fraction, classification, landmarks) is a :class:`EncoderTaskNetwork`: the
pretrained multi-view ViT encoder (:class:`~medssl.nets.vit.MultiViewEncoder`, parameters ``encoder.*``) plus task
heads. The recipe is the MAE / BEiT fine-tuning recipe that CineMA follows (He et al., 2022, "Masked Autoencoders
Are Scalable Vision Learners", https://arxiv.org/abs/2111.06377; Bao et al., 2022, "BEiT: BERT Pre-Training of
Image Transformers", ICLR, https://arxiv.org/abs/2106.08254; Fu et al., 2025, CineMA,
https://arxiv.org/abs/2506.00679):

- the encoder is loaded from a pre-training checkpoint with a strict key map (:func:`load_pretrained_encoder`);
- one of three modes (:data:`FINETUNE_MODES`): ``"full"`` fine-tuning, a ``"frozen"`` encoder under a trainable
  head, or a ``"linear_probe"`` (frozen encoder, linear head);
- layer-wise LR decay (:func:`layer_decay_param_groups`; CineMA 0.75) and stochastic depth in the encoder
  (``drop_path_rate``), with MONAI's ``WarmupCosineSchedule`` per iteration;
- the number of labelled subjects is one argument (:func:`select_labelled`);
- training runs on the engine's trainer through :class:`SupervisedTask` (network + loss -> ``{"loss": ...}``), and
  an evaluation ends in :func:`report_evaluation` (CSV per subject, summary, MLflow).
"""

from __future__ import annotations

import csv
import importlib
import io
import json
import logging
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor, nn

from medssl.engine.checkpoints import atomic_write, check_state_dict
from medssl.engine.distributed import unwrap_model
from medssl.engine.optim import weight_decay_param_groups
from medssl.engine.tracking import log_to_run_folder
from medssl.errors import CheckpointError, DataError
from medssl.methods.mae import ENCODER_PREFIX
from medssl.nets.patch_embed import ViewSpec
from medssl.nets.vit import MultiViewEncoder, ViTEncoder

__all__ = [
    "FINETUNE_MODES",
    "ENCODER_METADATA_KEY",
    "checkpoint_encoder_description",
    "described_encoder_checkpoint",
    "build_described_encoder",
    "load_pretrained_encoder",
    "EncoderTaskNetwork",
    "layer_decay_param_groups",
    "select_labelled",
    "SupervisedTask",
    "report_evaluation",
]

#: ``"full"``: train everything; ``"frozen"``: keep the encoder fixed, train the task head; ``"linear_probe"``:
#: frozen encoder and a linear head (the standard test of a representation).
FINETUNE_MODES = ("full", "frozen", "linear_probe")

#: safetensors metadata key of a checkpoint whose encoder is not a MultiViewEncoder (e.g. an imported CineMA encoder):
#: JSON ``{"target": "medssl.nets.<module>.<Class>", "args": {...}, "prefix": "<its keys' prefix>"}``; the class is
#: built as ``Class(views, **args)`` with the task's views ``{name: {"image_size", "in_channels"}}``.
ENCODER_METADATA_KEY = "medssl_encoder"
# Per-view parameters of an encoder: "patch_embed.<view>.*" and "view_embed.<view>" (MultiViewEncoder),
# "view_encoders.<view>.*" and "fusion.<view>.*" (CineMAEncoder).
_VIEW_PARAMETER = re.compile(r"^(patch_embed|view_embed|view_encoders|fusion)\.([^.]+)(\.|$)")
_T = TypeVar("_T")
logger = logging.getLogger(__name__)


def checkpoint_encoder_description(path: str | os.PathLike) -> dict[str, Any] | None:
    """The encoder architecture a checkpoint carries in its safetensors metadata (:data:`ENCODER_METADATA_KEY`).

    Args:
        path: a checkpoint.

    Returns:
        the description, or None when the file is missing, not safetensors or has none (a MultiViewEncoder).

    Raises:
        CheckpointError: when the description is not valid JSON or names a class outside ``medssl.nets``.
    """
    try:
        with safe_open(str(path), framework="pt") as handle:
            text = (handle.metadata() or {}).get(ENCODER_METADATA_KEY)
    except (SafetensorError, OSError, ValueError):
        return None
    if text is None:
        return None
    try:
        description = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: its '{ENCODER_METADATA_KEY}' metadata is not JSON: {e}") from e
    target = description.get("target", "") if isinstance(description, dict) else ""
    # Metadata comes with the file: only medssl's own network classes may be built from it.
    if not re.fullmatch(r"medssl\.nets\.\w+\.\w+", target) or not isinstance(description.get("args"), dict):
        raise CheckpointError(
            f"{path}: its '{ENCODER_METADATA_KEY}' metadata must name a medssl.nets class and its args, got {text!r}."
        )
    return description


def described_encoder_checkpoint(path: str | os.PathLike | bool | None) -> str | None:
    """The absolute path of a pre-training checkpoint that describes its own encoder (an imported one), else None.

    What a finished run records for inference (:func:`medssl.engine.bundles.export_inference_bundle`): a run
    fine-tuned from such a checkpoint rebuilds that encoder from it (:meth:`EncoderTaskNetwork.use_checkpoint_encoder`);
    a run from a medssl checkpoint or from scratch needs nothing.

    Raises:
        CheckpointError: see :func:`checkpoint_encoder_description`.
    """
    if not isinstance(path, (str, os.PathLike)) or not str(path):
        return None
    return os.path.abspath(path) if checkpoint_encoder_description(path) is not None else None


def build_described_encoder(description: Mapping[str, Any], views: Mapping[str, ViewSpec]) -> nn.Module:
    """A new encoder of the architecture a checkpoint describes, for the task's views (random weights).

    Args:
        description: from :func:`checkpoint_encoder_description`.
        views: the task's view geometries (image size and channels are used; the patch size is the encoder's own).

    Returns:
        the encoder, with the interface fine-tuning uses (``views``, ``embed_dim``, ``embed``, ``vit``).

    Raises:
        CheckpointError: when the class does not exist or rejects the views.
    """
    module, name = description["target"].rsplit(".", 1)
    try:
        encoder_class = getattr(importlib.import_module(module), name)
        geometry = {view: {"image_size": s.image_size, "in_channels": s.in_channels} for view, s in views.items()}
        return encoder_class(geometry, **description["args"])
    except (ImportError, AttributeError, TypeError, ValueError) as e:
        raise CheckpointError(
            f"cannot build the checkpoint's encoder {description['target']} for views {dict(views)}: {e}"
        ) from e


def load_pretrained_encoder(
    encoder: MultiViewEncoder,
    path: str | os.PathLike,
    prefix: str = ENCODER_PREFIX,
    adapt: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None,
) -> list[str]:
    """Load a pre-trained encoder's weights strictly, by name, from a safetensors file.

    The key map: checkpoint key ``<prefix><name>`` -> encoder parameter ``<name>``. Keys outside ``prefix`` (a
    masked autoencoder's decoder, a task network's heads) and the per-view parameters of views the encoder does not
    have (e.g. ``patch_embed.lax_2c.*`` when fine-tuning SAX only) are skipped; every other key must match the
    encoder's names and shapes exactly. Positions are not weights (rebuilt from each view's grid), so a different
    image size with the same patch size loads.

    Args:
        encoder: the task network's encoder.
        path: ``*.safetensors`` written by a pre-training (``<run_dir>/models/model.safetensors`` of ``cine_mae``)
            or fine-tuning run.
        prefix: prefix of the encoder's keys in the checkpoint.
        adapt: maps the kept weights (names without ``prefix``) before the strict check, e.g. to widen a 1-channel
            patch embedding for a multi-channel input; None keeps them as they are.

    Returns:
        the skipped checkpoint keys of other views, sorted.

    Raises:
        CheckpointError: when the file does not exist, is not safetensors, cannot be read, holds no ``prefix`` keys,
            or its encoder keys are missing, unexpected or of another shape than the encoder's (the message names
            them, as :func:`~medssl.engine.checkpoints.check_state_dict`).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"pretrained checkpoint {path} does not exist: run the cine_mae bundle first (it writes "
            "<run_dir>/models/model.safetensors) or pass --pretrained False to train from scratch."
        )
    if path.suffix != ".safetensors":
        raise CheckpointError(
            f"pretrained checkpoint {path} must be a .safetensors file (e.g. <run_dir>/models/model.safetensors)."
        )
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot read pretrained checkpoint {path}: {e}") from e
    selected = {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}
    if not selected:
        shown = ", ".join(sorted(state)[:5]) or "none"
        raise CheckpointError(f"{path} holds no '{prefix}*' encoder weights (its keys start: {shown}).")
    skipped = sorted(
        prefix + key
        for key in selected
        if (match := _VIEW_PARAMETER.match(key)) is not None and match.group(2) not in encoder.views
    )
    kept = {key: value for key, value in selected.items() if prefix + key not in skipped}
    if adapt is not None:
        kept = adapt(kept)
    check_state_dict(encoder, kept, f"the pretrained encoder in {path}")
    encoder.load_state_dict(kept)
    if skipped:
        logger.info(f"pretrained encoder loaded from {path}; skipped the weights of views it does not use: {skipped}")
    return skipped


class EncoderTaskNetwork(nn.Module):
    """Base of task networks on a pretrained multi-view encoder: fine-tune modes and per-view encoding.

    Subclasses add their heads and define ``forward``; ``self.encoder`` is the shared
    :class:`~medssl.nets.vit.MultiViewEncoder` whose parameters are named ``encoder.*`` like a ``CineMAE``'s. With a
    frozen encoder (``"frozen"`` / ``"linear_probe"``) its parameters get no gradient, :meth:`encode` runs it without
    autograd, and ``train()`` keeps it in eval mode so stochastic depth stays off.

    Args:
        encoder: the encoder.
        finetune_mode: one of :data:`FINETUNE_MODES`.

    Raises:
        ValueError: for an unknown ``finetune_mode``.
    """

    def __init__(self, encoder: MultiViewEncoder, finetune_mode: str = "full") -> None:
        super().__init__()
        if finetune_mode not in FINETUNE_MODES:
            raise ValueError(f"finetune_mode must be one of {FINETUNE_MODES}, got {finetune_mode!r}.")
        self.encoder = encoder
        self.finetune_mode = finetune_mode
        self.encoder.requires_grad_(not self.encoder_frozen)

    @property
    def encoder_frozen(self) -> bool:
        """Whether the encoder is kept fixed (``"frozen"`` and ``"linear_probe"``)."""
        return self.finetune_mode != "full"

    def train(self: _T, mode: bool = True) -> _T:
        """``nn.Module.train``, except that a frozen encoder stays in eval mode."""
        super().train(mode)
        if self.encoder_frozen:
            self.encoder.eval()
        return self

    def no_weight_decay(self) -> list[str]:
        """The view embeddings and a class token: learnable tokens get no weight decay, as MAE's positional embedding
        and class token."""
        names = (
            name
            for name, _ in self.encoder.named_parameters()
            if name.startswith("view_embed.") or name == "vit.cls_token"
        )
        return [f"{ENCODER_PREFIX}{name}" for name in names]

    def load_pretrained(self: _T, path: str | os.PathLike | bool | None) -> _T:
        """Load the encoder from a pre-training checkpoint (:func:`load_pretrained_encoder`).

        Args:
            path: the checkpoint; ``None``, ``False`` or ``""`` keep the random initialisation (training from
                scratch; ``--pretrained False`` on MONAI's command line, which drops ``None`` overrides).

        Returns:
            the network.

        Raises:
            CheckpointError: for ``True``, or see :func:`load_pretrained_encoder`.
        """
        if path is None or path is False or path == "":
            return self
        if path is True:
            raise CheckpointError("pretrained must be a checkpoint path, or False / None to train from scratch.")
        description = checkpoint_encoder_description(path)
        self.use_checkpoint_encoder(path)
        prefix = ENCODER_PREFIX if description is None else str(description.get("prefix", ENCODER_PREFIX))
        load_pretrained_encoder(self.encoder, path, prefix=prefix, adapt=self.adapt_pretrained_weights)
        return self

    def use_checkpoint_encoder(self: _T, path: str | os.PathLike | bool | None) -> _T:
        """Give the network the encoder architecture a checkpoint describes (:data:`ENCODER_METADATA_KEY`), without
        loading weights; checkpoints without a description (a MultiViewEncoder) leave the encoder as it is.

        A run fine-tuned from such a checkpoint is reloaded with
        ``load_network_weights(network_def.use_checkpoint_encoder(pretrained), final_weights)``.

        Args:
            path: the pre-training checkpoint; ``None``, ``False`` or ``""`` change nothing.

        Returns:
            the network.

        Raises:
            CheckpointError: see :func:`checkpoint_encoder_description`, :func:`build_described_encoder` and
                :meth:`replace_encoder`.
        """
        if path is None or path is False or path == "" or path is True:
            return self
        description = checkpoint_encoder_description(path)
        if description is not None:
            self.replace_encoder(build_described_encoder(description, self.encoder.views))
        return self

    def replace_encoder(self, encoder: nn.Module) -> None:
        """Swap in an encoder of another architecture; subclasses that can rebuild their heads for it override this.

        Raises:
            CheckpointError: always here: this task network's heads are tied to its encoder.
        """
        raise CheckpointError(
            f"{type(self).__name__} cannot fine-tune a {type(encoder).__name__} encoder; use a medssl pre-training "
            "checkpoint (or one for a task that supports it, e.g. cine_seg)."
        )

    def adapt_pretrained_weights(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Hook for subclasses whose encoder differs from the pre-trained one in a known way (e.g. input channels).

        Args:
            state: the checkpoint's encoder weights, names without ``encoder.``.

        Returns:
            the weights to load strictly; here ``state`` unchanged.
        """
        return state

    def encode(self, image: Tensor, view: str, layers: Sequence[int] = ()) -> tuple[Tensor, list[Tensor]]:
        """Encode one view alone through the shared encoder.

        Args:
            image: ``[B, C, *image_size]`` of ``view``.
            view: the view name.
            layers: ViT blocks whose hidden states to return as well.

        Returns:
            ``[B, N, D]`` tokens after the final norm (all patches, grid order) and one ``[B, N, D]`` per layer.

        Raises:
            ValueError: for an unknown view or an image of the wrong shape (naming the view).
        """
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.encoder_frozen):
            tokens, _ = self.encoder.embed({view: image})
            return self.encoder.vit.forward_features(tokens, layers)


def _layer_id(name: str, depth: int) -> int:
    """BEiT's layer of a parameter: 0 embeddings, ``i + 1`` ViT block ``i``, ``depth + 1`` the rest (norm, heads)."""
    vit = f"{ENCODER_PREFIX}vit."
    if name.startswith(f"{vit}blocks."):
        return int(name[len(f"{vit}blocks.") :].split(".", 1)[0]) + 1
    if name.startswith(ENCODER_PREFIX) and not name.startswith(vit):
        return 0
    return depth + 1


def layer_decay_param_groups(
    network: nn.Module, lr: float, weight_decay: float, layer_decay: float = 0.75
) -> list[dict[str, Any]]:
    """Optimiser parameter groups with layer-wise LR decay (BEiT, Bao et al., 2022; MAE fine-tuning, He et al., 2022).

    Layers are counted from the input: the encoder's embeddings (patch and view embeddings) are layer 0, ViT block
    ``i`` is layer ``i + 1``, and everything else (the encoder's final norm and the task heads) is layer
    ``depth + 1``; a parameter of layer ``l`` trains at ``lr * layer_decay ** (depth + 1 - l)``, so the heads get
    ``lr`` and the embeddings the smallest rate. Weight decay is split as in
    :func:`~medssl.engine.optim.weight_decay_param_groups` (none on biases, norms and ``no_weight_decay()``).

    Args:
        network: a network whose encoder is ``network.encoder`` (a :class:`~medssl.nets.vit.MultiViewEncoder`,
            see :class:`EncoderTaskNetwork`); a DDP wrapper is looked through.
        lr: the heads' learning rate (> 0).
        weight_decay: decay of weight matrices (>= 0; CineMA 0.05).
        layer_decay: factor per layer in ``(0, 1]`` (CineMA 0.75; 1 turns it off).

    Returns:
        ``[{"params", "lr", "weight_decay", "lr_scale", "layer_id"}, ...]``, highest layer first (so the first
        group's rate, which the trainer logs, is ``lr``); frozen parameters are left out. LR schedulers built on
        ``LambdaLR`` (MONAI's ``WarmupCosineSchedule``) scale each group's own rate.

    Raises:
        ValueError: when ``lr`` <= 0, ``layer_decay`` is outside ``(0, 1]``, the network has no ``encoder.vit``, or
            no parameter is trainable.
    """
    if lr <= 0 or not 0 < layer_decay <= 1:
        raise ValueError(f"lr must be > 0 and layer_decay in (0, 1], got lr={lr}, layer_decay={layer_decay}.")
    module = unwrap_model(network)
    encoder = getattr(module, "encoder", None)
    if not isinstance(getattr(encoder, "vit", None), ViTEncoder):
        raise ValueError(
            f"{type(module).__name__} has no MultiViewEncoder 'encoder' (nor another encoder with a ViTEncoder 'vit') "
            "to count layers in."
        )
    depth = len(encoder.vit.blocks)
    decayed = {id(p) for p in weight_decay_param_groups(module, weight_decay)[0]["params"]}
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, parameter in module.named_parameters():
        if not parameter.requires_grad:
            continue
        layer, decays = _layer_id(name, depth), id(parameter) in decayed
        scale = layer_decay ** (depth + 1 - layer)
        group = groups.setdefault(
            (layer, decays),
            {
                "params": [],
                "lr": lr * scale,
                "weight_decay": weight_decay if decays else 0.0,
                "lr_scale": scale,
                "layer_id": layer,
            },
        )
        group["params"].append(parameter)
    if not groups:
        raise ValueError(f"{type(module).__name__} has no trainable parameter.")
    return [groups[key] for key in sorted(groups, key=lambda key: (-key[0], not key[1]))]


def select_labelled(datalist: Sequence[_T], num_labelled: int | None, seed: int = 0) -> list[_T]:
    """The labelled subjects a fine-tuning run uses: all of them, or ``num_labelled`` drawn at random.

    The draw is one seeded permutation, so with the same seed the ``n`` subjects are a subset of the ``n + 1``
    subjects (nested label-efficiency curves); the selection keeps the data list's order.

    Args:
        datalist: one item per labelled subject.
        num_labelled: how many to use, ``1 .. len(datalist)``; None uses all.
        seed: seed of the draw.

    Returns:
        the selected items.

    Raises:
        DataError: when the data list is empty, or ``num_labelled`` is not an integer in ``1 .. len(datalist)``.
    """
    if not datalist:
        raise DataError("the labelled set is empty: the data source lists no subject with labels.")
    if num_labelled is None:
        return list(datalist)
    if isinstance(num_labelled, bool) or not isinstance(num_labelled, (int, np.integer)):
        raise DataError(f"num_labelled must be an integer or None (all), got {num_labelled!r}.")
    if num_labelled < 1:
        raise DataError(
            f"num_labelled={num_labelled} leaves the labelled set empty; use 1..{len(datalist)} or None for all."
        )
    if num_labelled > len(datalist):
        raise DataError(
            f"num_labelled={num_labelled} is outside 1..{len(datalist)} (the data source has {len(datalist)} "
            "labelled subjects); use None for all of them."
        )
    order = np.random.default_rng(seed).permutation(len(datalist))
    return [datalist[index] for index in sorted(order[: int(num_labelled)].tolist())]


class SupervisedTask(nn.Module):
    """A task network and its loss as an engine method: ``forward(batch) -> {"loss", "loss_<input>"}``.

    The engine's trainer (:class:`~medssl.engine.trainer.SSLTrainer`) only needs a module returning a scalar
    ``"loss"``; this adapter lets it train any supervised head. For each ``input_key -> target_key`` present in the
    batch, ``prediction = network(batch[input_key], input_key)`` and ``loss(prediction, batch[target_key])``; the
    loss is the mean over the inputs present (e.g. the views of a multi-view segmentation).

    Args:
        network: called as ``network(inputs, input_key)``.
        loss: ``loss(prediction, target) -> Tensor[]``, e.g. MONAI ``DiceCELoss``.
        targets: input key -> target key, e.g. ``{"sax": "sax_label", "lax_4c": "lax_4c_label"}``.

    Raises:
        ValueError: when ``targets`` is empty.
    """

    def __init__(self, network: nn.Module, loss: Callable[[Any, Any], Tensor], targets: Mapping[str, str]) -> None:
        super().__init__()
        if not targets:
            raise ValueError("targets must map at least one input key to its target key.")
        self.network = network
        self.loss = loss
        self.targets = dict(targets)

    def forward(self, batch: Mapping[str, Any]) -> dict[str, Tensor]:
        """Predict and score a batch.

        Args:
            batch: collated samples holding some inputs of ``targets`` and their targets.

        Returns:
            ``{"loss": Tensor[], "loss_<input>": Tensor[] per input present}``.

        Raises:
            KeyError: when the batch holds none of the inputs, or an input without its target.
        """
        present = [key for key in self.targets if key in batch]
        if not present:
            raise KeyError(f"the batch has none of the inputs {list(self.targets)}; its keys are {sorted(batch)}.")
        losses = {}
        for key in present:
            target = self.targets[key]
            if target not in batch:
                raise KeyError(f"the batch has input '{key}' but not its target '{target}'.")
            losses[key] = self.loss(self.network(batch[key], key), batch[target])
        return {"loss": torch.stack(list(losses.values())).mean(), **{f"loss_{k}": v for k, v in losses.items()}}


def _write_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    columns = list(dict.fromkeys(column for row in rows for column in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write(path, lambda temporary: Path(temporary).write_text(buffer.getvalue()))


def _mean(values: list[Any]) -> float | None:
    finite = [float(v) for v in values if isinstance(v, (int, float, np.number)) and math.isfinite(float(v))]
    return float(np.mean(finite)) if finite else None


def report_evaluation(
    rows: Sequence[Mapping[str, Any]],
    run_dir: str | os.PathLike,
    id_columns: Sequence[str] = ("subject",),
    group_by: Sequence[str] = (),
    experiment_name: str = "medssl",
    tracking_uri: str | None = None,
    prefix: str = "eval_",
    cohort_metrics: Mapping[str, float] | None = None,
    artifacts: Mapping[str, str | os.PathLike] | None = None,
) -> dict[str, Any]:
    """Write an evaluation's per-subject metrics and summary, and log the summary into the run's MLflow run.

    Writes ``<run_dir>/evaluation/metrics.csv`` (one row per item of ``rows``) and ``summary.json``; adds the
    summary under ``"evaluation"`` to ``<run_dir>/summary.json``; logs every mean as an MLflow metric
    ``<prefix>[<group values>_]<metric>`` into the run recorded in the run folder (the training's run), with the
    CSV as artifact. Means skip missing and non-finite values (e.g. a distance to an empty prediction).

    Args:
        rows: one mapping per evaluated item; numeric columns other than ``id_columns`` and ``group_by`` are
            averaged.
        run_dir: the run folder.
        id_columns: columns identifying an item (subject index, frame, ...), never averaged.
        group_by: columns whose values split the means, e.g. ``("view",)`` -> ``eval_sax_dice_LV``.
        experiment_name: MLflow experiment when the folder has no recorded run yet.
        tracking_uri: MLflow store (default: the run folder's; ``MLFLOW_TRACKING_URI`` wins).
        prefix: MLflow metric name prefix.
        cohort_metrics: metrics of the whole evaluated set that are no mean of rows (e.g. macro-F1, AUROC), logged
            and summarised as ``<prefix><name>`` beside the means; undefined (non-finite) ones are left out.
        artifacts: more files to log, ``{MLflow artifact folder: file}`` (e.g. a figure).

    Returns:
        ``{"metrics": {name: value}, "num_rows", "csv", "run_id"}``.

    Raises:
        DataError: when ``rows`` is empty (nothing was evaluated).
    """
    if not rows:
        raise DataError("nothing was evaluated: the evaluation data list is empty.")
    run_dir = Path(run_dir)
    folder = run_dir / "evaluation"
    csv_path = _write_csv(rows, folder / "metrics.csv")
    groups: dict[str, list[Mapping[str, Any]]] = {}
    for row in rows:
        groups.setdefault("_".join(str(row[column]) for column in group_by), []).append(row)
    metrics = {}
    for group, members in groups.items():
        for column in members[0]:
            if column in group_by or column in id_columns:
                continue
            mean = _mean([row.get(column) for row in members])
            if mean is not None:
                metrics[f"{prefix}{group + '_' if group else ''}{column}"] = mean
    cohort = {f"{prefix}{name}": float(value) for name, value in (cohort_metrics or {}).items()}
    metrics.update({name: value for name, value in cohort.items() if math.isfinite(value)})
    run_id = log_to_run_folder(
        run_dir,
        metrics,
        {"evaluation": csv_path, **(artifacts or {})},
        experiment_name=experiment_name,
        tracking_uri=tracking_uri,
    )
    summary = {"metrics": metrics, "num_rows": len(rows), "csv": str(csv_path.resolve()), "run_id": run_id}
    text = json.dumps(summary, indent=2)
    atomic_write(folder / "summary.json", lambda temporary: Path(temporary).write_text(text))
    run_summary_path = run_dir / "summary.json"
    run_summary = json.loads(run_summary_path.read_text()) if run_summary_path.is_file() else {}
    run_summary["evaluation"] = summary
    text = json.dumps(run_summary, indent=2)
    atomic_write(run_summary_path, lambda temporary: Path(temporary).write_text(text))
    return summary
