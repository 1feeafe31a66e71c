"""Cardiac segmentation on a pretrained ViT encoder: network, whole-image prediction, metrics, evaluation, NIfTI out.

The network (:class:`ViTSegmenter`) is the pretrained multi-view encoder with one UNETR-style decoder per view
(Hatamizadeh et al., 2022, https://arxiv.org/abs/2103.10504), fine-tuned with Dice + cross-entropy as in CineMA (Fu
et al., 2025, https://arxiv.org/abs/2506.00679): SAX stacks are segmented in 3-D, LAX slices in 2-D, with the ACDC
classes 0 background, 1 RV cavity, 2 LV myocardium, 3 LV cavity. Whole images are segmented by a sliding window
(MONAI ``SlidingWindowInferer``) on the network's grid, and the class probabilities are resampled back onto the
image's own voxel grid before the arg-max (:class:`CineSegmentationPredictor`), so predictions and metrics live in
the acquisition space; what is disconnected from the heart is removed (:func:`keep_largest_components`). Metrics per
structure: Dice and the 95th-percentile Hausdorff distance in mm (MONAI).
"""

from __future__ import annotations

import gzip
import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import SlidingWindowInferer
from monai.metrics import compute_dice, compute_hausdorff_distance
from monai.networks.utils import one_hot
from monai.transforms import Compose, LoadImage, SpatialResample
from scipy import ndimage
from torch import Tensor, nn
from tqdm.auto import tqdm

from medssl.data.cine import SAX_VIEW, label_key
from medssl.data.cine_labelled import CARDIAC_CLASSES, SegmentationView, check_label_values, cine_preprocessing
from medssl.engine.checkpoints import atomic_write
from medssl.errors import DataError
from medssl.nets.patch_embed import ViewSpec
from medssl.nets.tokens import unpatchify
from medssl.nets.unetr import UNETRDecoder, decoder_levels, hidden_state_layers
from medssl.nets.vit import MultiViewEncoder
from medssl.tasks.finetune import EncoderTaskNetwork

__all__ = [
    "LinearSegmentationHead",
    "ViTSegmenter",
    "segmentation_metrics",
    "ed_es_frames",
    "keep_largest_components",
    "exclude_unenclosed_lv_slices",
    "as_cine",
    "CineSegmentationPredictor",
    "evaluate_segmentation",
    "segment_folder",
    "load_segmentation_predictor",
]

_NIFTI_SUFFIXES = (".nii.gz", ".nii")


class LinearSegmentationHead(nn.Module):
    """Linear per-token decoder (the linear-probe head): each token predicts the class logits of its own patch.

    As SETR's naive decoder (Zheng et al., 2021, https://arxiv.org/abs/2012.15840) without up-sampling convolutions:
    ``Linear(D, K * prod(patch))`` per token, then the patches are put back in place.

    Args:
        view: the view geometry (image size, patch size).
        embed_dim: token width ``D``.
        num_classes: classes ``K``.
    """

    def __init__(self, view: ViewSpec, embed_dim: int, num_classes: int) -> None:
        super().__init__()
        self.view = view
        self.num_classes = num_classes
        self.proj = nn.Linear(embed_dim, num_classes * math.prod(view.patch_size))

    def forward(self, tokens: Tensor) -> Tensor:
        """Args: tokens ``[B, N, D]`` in grid order. Returns: ``[B, K, *image_size]`` logits."""
        return unpatchify(self.proj(tokens), self.view.patch_size, self.view.grid, self.num_classes)


class ViTSegmenter(EncoderTaskNetwork):
    """Pretrained multi-view ViT encoder + one segmentation decoder per view (UNETR-style; linear for a probe).

    Each view is encoded on its own (a SAX window, or a LAX window) through the shared encoder; its decoder turns
    the last block's tokens, the hidden states of earlier blocks (:func:`~medssl.nets.unetr.hidden_state_layers`)
    and the image into per-voxel logits. Parameter names: ``encoder.*`` (as in ``CineMAE``, loaded by
    :meth:`~medssl.tasks.finetune.EncoderTaskNetwork.load_pretrained`) and ``decoders.<view>.*``.

    Args:
        views: view name -> ``{"image_size", "patch_size", "in_channels"}`` (the window); extra keys such as
            ``spacing`` are ignored. Patch sides must be 1 or one power of two (see
            :func:`~medssl.nets.unetr.decoder_levels`).
        num_classes: classes ``K`` (4: background, RV, MYO, LV).
        embed_dim, depth, num_heads, mlp_ratio, patch_embed: the encoder; must match the pretrained one.
        drop_path_rate: stochastic depth of the encoder's last block (MAE fine-tuning: 0.1).
        feature_size: decoder channels at full resolution, doubling per level (UNETR 16; CineMA 32..512).
        finetune_mode: ``"full"``, ``"frozen"`` (frozen encoder, UNETR decoders) or ``"linear_probe"`` (frozen
            encoder, :class:`LinearSegmentationHead`).
        norm_name: normalisation of the decoder's convolutions.

    Raises:
        ValueError: for invalid views, widths, a patch size the UNETR decoder cannot climb, or an unknown mode.
    """

    def __init__(
        self,
        views: Mapping[str, Mapping[str, Any]],
        num_classes: int = len(CARDIAC_CLASSES),
        embed_dim: int = 192,
        depth: int = 4,
        num_heads: int = 3,
        mlp_ratio: float = 4.0,
        patch_embed: str = "linear",
        drop_path_rate: float = 0.1,
        feature_size: int = 16,
        finetune_mode: str = "full",
        norm_name: str | tuple = "instance",
    ) -> None:
        geometry = {
            name: {key: spec[key] for key in ("image_size", "patch_size", "in_channels") if key in spec}
            for name, spec in views.items()
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
        self.num_classes = num_classes
        self.feature_size = feature_size
        self.norm_name = norm_name
        self._build_decoders()

    def _build_decoders(self) -> None:
        """One decoder per view of ``self.encoder``, for its width, depth and patch size."""
        embed_dim, depth = self.encoder.embed_dim, len(self.encoder.vit.blocks)
        self.layers: dict[str, list[int]] = {}
        decoders = {}
        for name, spec in self.encoder.views.items():
            if self.finetune_mode == "linear_probe":
                decoders[name] = LinearSegmentationHead(spec, embed_dim, self.num_classes)
                self.layers[name] = []
                continue
            self.layers[name] = hidden_state_layers(depth, decoder_levels(spec.patch_size))
            decoders[name] = UNETRDecoder(
                spatial_dims=len(spec.image_size),
                image_size=spec.image_size,
                patch_size=spec.patch_size,
                in_channels=spec.in_channels,
                embed_dim=embed_dim,
                out_channels=self.num_classes,
                feature_size=self.feature_size,
                norm_name=self.norm_name,
            )
        self.decoders = nn.ModuleDict(decoders)

    def replace_encoder(self, encoder: nn.Module) -> None:
        """Fine-tune another encoder architecture (e.g. an imported CineMA encoder): new decoders fitted to its width,
        depth and patch size, for the same views.

        Args:
            encoder: an encoder with the interface of :class:`~medssl.nets.vit.MultiViewEncoder` that fine-tuning
                uses (``views``, ``embed_dim``, ``embed``, ``vit.forward_features``).

        Raises:
            ValueError: when its patch size cannot be climbed by the UNETR decoder.
        """
        self.encoder = encoder
        self.encoder.requires_grad_(not self.encoder_frozen)
        self._build_decoders()

    def forward(self, image: Tensor, view: str | None = None) -> Tensor:
        """Segment windows of one view.

        Args:
            image: ``[B, C, *image_size]`` windows of ``view``.
            view: the view name; None for the first view (so the network is a plain tensor-in, tensor-out module
                for MONAI's bundle tools and TorchScript export).

        Returns:
            ``[B, num_classes, *image_size]`` logits.

        Raises:
            ValueError: for an unknown view or a window of the wrong shape.
        """
        view = next(iter(self.decoders)) if view is None else view
        if view not in self.decoders:
            raise ValueError(f"unknown view {view!r}; this network segments {list(self.decoders)}.")
        tokens, hidden = self.encode(image, view, self.layers[view])
        decoder = self.decoders[view]
        return decoder(tokens) if isinstance(decoder, LinearSegmentationHead) else decoder(image, tokens, hidden)


def segmentation_metrics(
    prediction: np.ndarray | Tensor,
    label: np.ndarray | Tensor,
    spacing: Sequence[float],
    class_names: Sequence[str] = CARDIAC_CLASSES,
) -> dict[str, float]:
    """Dice and 95th-percentile Hausdorff distance (mm) per foreground structure of one image (MONAI metrics).

    Args:
        prediction: ``[*spatial]`` class ids (2-D or 3-D).
        label: ``[*spatial]`` reference class ids.
        spacing: voxel spacing in mm per spatial axis.
        class_names: names of the classes by id; the first (background) is not scored.

    Returns:
        ``{"dice_<name>": ..., "hd95_<name>": ...}`` for every foreground class; NaN where the reference has no such
        structure, and for the distance where the prediction has none either.

    Raises:
        ValueError: when the shapes differ or ``spacing`` has the wrong length.
    """
    prediction, label = torch.as_tensor(np.asarray(prediction)), torch.as_tensor(np.asarray(label))
    if prediction.shape != label.shape or len(spacing) != label.ndim:
        raise ValueError(
            f"prediction {tuple(prediction.shape)} and label {tuple(label.shape)} must have the same shape, with one "
            f"spacing value per axis, got spacing {list(spacing)}."
        )
    num_classes = len(class_names)
    pred_onehot = one_hot(prediction[None, None].long(), num_classes)
    label_onehot = one_hot(label[None, None].long(), num_classes)
    dice = compute_dice(pred_onehot, label_onehot, include_background=False, ignore_empty=True)[0]
    # MONAI warns about empty structures on its own; the NaN it returns is what the caller sees.
    hd95 = compute_hausdorff_distance(
        pred_onehot, label_onehot, include_background=False, percentile=95, spacing=[float(s) for s in spacing]
    )[0]
    metrics = {f"dice_{name}": float(dice[index]) for index, name in enumerate(class_names[1:])}
    for index, name in enumerate(class_names[1:]):
        distance = float(hd95[index])
        metrics[f"hd95_{name}"] = distance if math.isfinite(distance) else float("nan")
    return metrics


def ed_es_frames(label: np.ndarray, lv_id: int = CARDIAC_CLASSES.index("LV")) -> list[int]:
    """End-diastolic and end-systolic frames of a label cine: most and fewest LV cavity voxels among labelled frames.

    Args:
        label: ``[..., T]`` class ids, time last; frames with no foreground are unlabelled.
        lv_id: the LV cavity's id.

    Returns:
        ``[ed, es]``, or ``[frame]`` when one frame is labelled.

    Raises:
        DataError: when no frame is labelled.
    """
    frames = label.reshape(-1, label.shape[-1])
    labelled = np.flatnonzero(frames.max(axis=0) > 0)
    if labelled.size == 0:
        raise DataError("the label cine has no labelled frame (every frame is background only).")
    lv = (frames[:, labelled] == lv_id).sum(axis=0)
    ed, es = int(labelled[np.argmax(lv)]), int(labelled[np.argmin(lv)])
    return [ed] if ed == es else [ed, es]


def _largest_region(mask: np.ndarray) -> np.ndarray:
    """The largest connected region of a boolean mask (face, edge and corner neighbours connect)."""
    regions, count = ndimage.label(mask, structure=np.ones((3,) * mask.ndim))
    if count <= 1:
        return mask
    sizes = np.bincount(regions.ravel())
    sizes[0] = 0
    return regions == sizes.argmax()


def keep_largest_components(labels: np.ndarray) -> np.ndarray:
    """Remove everything disconnected from the heart: the largest connected foreground region, then per class its
    largest region inside it.

    The structures of one heart touch each other (the RV the septum, the LV cavity its myocardium), so anything
    apart from the largest region is a false positive elsewhere in the field of view; nnU-Net keeps the largest
    component for the same reason (Isensee et al., 2021, https://doi.org/10.1038/s41592-020-01008-z).

    Args:
        labels: class ids of one image, 2-D or 3-D (0 background).

    Returns:
        a copy with the removed voxels set to background.
    """
    heart = _largest_region(labels > 0)
    kept = np.where(heart, labels, 0).astype(labels.dtype)
    for class_id in np.unique(kept[kept > 0]):
        mask = kept == class_id
        kept[mask & ~_largest_region(mask)] = 0
    return kept


def exclude_unenclosed_lv_slices(labels: np.ndarray, min_enclosure: float = 0.5) -> np.ndarray:
    """Drop the LV cavity from SAX slices where myocardium does not surround it: the SCMR basal-slice rule.

    At end-systole the base descends towards the apex, and the basal slices of a stack cut through the left atrium, a
    blood pool that looks like the LV cavity but has no ventricular myocardium around it. SCMR's post-processing
    standard counts a basal slice as LV only when at least 50 % of its blood pool is surrounded by LV myocardium
    (Schulz-Menger et al., 2020, https://doi.org/10.1186/s12968-020-00610-6). Here the enclosure of a slice is the
    fraction of the pixels bordering its LV cavity (the cavity's dilation minus the cavity) that are myocardium.

    Args:
        labels: class ids ``[H, W, S]`` of one SAX frame (ACDC ids: 2 LV myocardium, 3 LV cavity).
        min_enclosure: slices whose LV cavity is enclosed less than this (in ``[0, 1]``) lose their cavity.

    Returns:
        a copy with the LV cavity of the unenclosed slices set to background.

    Raises:
        ValueError: when ``labels`` is not 3-D or ``min_enclosure`` is outside ``[0, 1]``.
    """
    if labels.ndim != 3:
        raise ValueError(f"expected one SAX frame [H, W, S], got shape {labels.shape}.")
    if not 0.0 <= min_enclosure <= 1.0:
        raise ValueError(f"min_enclosure must lie in [0, 1], got {min_enclosure!r}.")
    lv, myo = CARDIAC_CLASSES.index("LV"), CARDIAC_CLASSES.index("MYO")
    kept = labels.copy()
    for s in range(labels.shape[2]):
        cavity = labels[:, :, s] == lv
        if not cavity.any():
            continue
        border = ndimage.binary_dilation(cavity) & ~cavity
        if border.any() and (labels[:, :, s][border] == myo).mean() < min_enclosure:
            kept[:, :, s][cavity] = 0
    return kept


def as_cine(image: MetaTensor, view: str, source: str) -> MetaTensor:
    """A loaded NIfTI as a 4-D cine ``[H, W, S, T]`` (LAX ``[H, W, 1, T]``); 3-D files are one frame."""
    shape = tuple(image.shape)
    if view == SAX_VIEW and len(shape) == 3:
        return image[..., None]
    if view != SAX_VIEW and len(shape) == 2:
        return image[:, :, None, None]
    if view != SAX_VIEW and len(shape) == 3 and shape[2] == 1:
        return image[..., None]
    if len(shape) == 4 and (view == SAX_VIEW or shape[2] == 1):
        return image
    expected = "[H, W, S] or [H, W, S, T]" if view == SAX_VIEW else "[H, W], [H, W, 1] or [H, W, 1, T]"
    raise DataError(f"{source}: expected a {view} image {expected}, got shape {shape}.")


class CineSegmentationPredictor:
    """Segment whole cine images, frame by frame, and return class ids on each image's own voxel grid.

    Per image: time to the channel axis, resample and scale as in training
    (:func:`~medssl.data.cine_labelled.cine_preprocessing`), slide the network's window over each frame (MONAI
    ``SlidingWindowInferer``, Gaussian-weighted overlaps), resample the softmax probabilities back onto the input
    grid (bilinear, through the affines), take the arg-max and (``largest_component``) remove what is disconnected
    from the heart (:func:`keep_largest_components`).

    Whole cycles are segmented in two passes: the first requested frame over the whole field of view, the others only
    in a region around the heart found in it (its in-plane bounding box grown by ``roi_margin_mm``; everything outside
    is background). The heart moves a few millimetres through the cycle, far less than the margin, and the window
    count falls with the field of view: a 300 mm field of view shrinks to about 120 mm, some 5x fewer windows.

    Args:
        network: ``network(windows, view) -> logits`` (e.g. :class:`ViTSegmenter`), in eval mode while predicting.
        views: view name -> geometry (window = ``image_size``).
        sw_batch_size: windows per forward pass.
        overlap: fraction of overlap between windows.
        largest_component: keep only the largest connected heart region and the largest region per class.
        device: where the network runs; default the network's device.
        roi_margin_mm: margin around the heart of the first frame within which the other frames are segmented; None
            segments every frame over the whole field of view.
        min_lv_enclosure: on SAX stacks, slices whose LV cavity is surrounded by less than this fraction of
            myocardium lose their cavity (the atrium at the base, :func:`exclude_unenclosed_lv_slices`); None keeps
            every slice.
    """

    def __init__(
        self,
        network: nn.Module,
        views: Mapping[str, SegmentationView],
        sw_batch_size: int = 4,
        overlap: float = 0.5,
        largest_component: bool = True,
        device: torch.device | str | None = None,
        roi_margin_mm: float | None = 20.0,
        min_lv_enclosure: float | None = 0.5,
    ) -> None:
        if roi_margin_mm is not None and not roi_margin_mm >= 0:
            raise ValueError(f"roi_margin_mm must be >= 0 mm or None, got {roi_margin_mm!r}.")
        if min_lv_enclosure is not None and not 0.0 <= min_lv_enclosure <= 1.0:
            raise ValueError(f"min_lv_enclosure must lie in [0, 1] or be None, got {min_lv_enclosure!r}.")
        self.min_lv_enclosure = min_lv_enclosure
        self.timings: dict[str, float] = {}  # seconds per stage of the last predict()
        self.network = network
        self.largest_component = largest_component
        self.roi_margin_mm = roi_margin_mm
        self.views = dict(views)
        self.device = torch.device(device) if device is not None else next(network.parameters()).device
        self.inferers = {
            name: SlidingWindowInferer(
                roi_size=view.image_size, sw_batch_size=sw_batch_size, overlap=overlap, mode="gaussian"
            )
            for name, view in self.views.items()
        }
        self.preprocessing = {name: Compose(cine_preprocessing(view, "image")) for name, view in self.views.items()}

    def _view(self, view: str) -> SegmentationView:
        if view not in self.views:
            raise ValueError(f"unknown view {view!r}; the predictor segments {list(self.views)}.")
        return self.views[view]

    @torch.no_grad()
    def predict(
        self, cine: MetaTensor, view: str, frames: Sequence[int] | None = None, progress: bool = False
    ) -> np.ndarray:
        """Segment frames of one cine.

        Args:
            cine: ``[H, W, S, T]`` (LAX ``[H, W, 1, T]``) MetaTensor with its affine, as MONAI ``LoadImage`` reads
                it.
            view: the view name.
            frames: the frames to segment; None for all.
            progress: show a progress bar over the frames.

        Returns:
            uint8 ``[H, W, S, len(frames)]`` (LAX ``[H, W, 1, len(frames)]``) class ids on the input grid.

        Raises:
            ValueError: for an unknown view or out-of-range frames.
        """
        spec = self._view(view)
        num_frames = cine.shape[-1]
        frames = list(range(num_frames)) if frames is None else [int(t) for t in frames]
        if any(not 0 <= t < num_frames for t in frames):
            raise ValueError(f"frames {frames} out of range for a cine of {num_frames} frames.")
        started = time.perf_counter()
        # The whole cine is pre-processed, as in training: its intensity percentiles are those of every frame.
        channel_first = MetaTensor(cine.as_tensor().float().permute(3, 0, 1, 2), affine=cine.affine)
        resampled = self.preprocessing[view]({"image": channel_first})["image"]
        resampled_at = time.perf_counter()
        was_training = self.network.training
        self.network.eval()
        try:
            out = [self._frame_probabilities(resampled[frames[0] : frames[0] + 1], spec)]
            roi = self._heart_roi(out[0], resampled) if len(frames) > 1 else None
            rest = tqdm(frames[1:], desc="segmenting frames", unit="frame", initial=1, total=len(frames),
                        disable=not progress, leave=False)  # fmt: skip
            out += [self._frame_probabilities(resampled[t : t + 1], spec, roi) for t in rest]
        finally:
            self.network.train(was_training)
        inferred_at = time.perf_counter()
        restore = SpatialResample(mode="bilinear", padding_mode="border")
        labels = []
        for probabilities in out:
            back = restore(probabilities, dst_affine=cine.affine, spatial_size=tuple(cine.shape[:3]))
            frame = back.argmax(dim=0).to(torch.uint8).cpu().numpy()
            if self.largest_component:
                frame = keep_largest_components(frame)
            if spec.is_stack and self.min_lv_enclosure is not None:
                frame = exclude_unenclosed_lv_slices(frame, self.min_lv_enclosure)
            labels.append(frame)
        self.timings = {
            "resample_s": resampled_at - started,
            "infer_s": inferred_at - resampled_at,
            "restore_s": time.perf_counter() - inferred_at,
        }
        return np.stack(labels, axis=-1)

    def _heart_roi(self, probabilities: MetaTensor, resampled: MetaTensor) -> tuple[slice, slice] | None:
        """In-plane ``(rows, columns)`` of the network grid around the predicted heart, grown by the margin; None when
        there is no margin or no heart (then every frame is segmented whole)."""
        if self.roi_margin_mm is None:
            return None
        foreground = probabilities.as_tensor().argmax(dim=0).numpy() > 0
        if not foreground.any():
            return None
        # Stray false positives elsewhere in the field of view would stretch the box to all of it.
        heart = torch.from_numpy(_largest_region(foreground).any(axis=2))  # [H', W'] projected over slices
        spacing = np.linalg.norm(np.asarray(resampled.affine)[:3, :2], axis=0)
        roi = []
        for axis, size in enumerate(heart.shape):
            present = torch.nonzero(heart.any(dim=1 - axis)).flatten()
            margin = math.ceil(self.roi_margin_mm / spacing[axis])
            roi.append(slice(max(0, int(present[0]) - margin), min(size, int(present[-1]) + 1 + margin)))
        return roi[0], roi[1]

    def _frame_probabilities(
        self, frame: MetaTensor, spec: SegmentationView, roi: tuple[slice, slice] | None = None
    ) -> MetaTensor:
        """One resampled frame ``[1, H', W', S']`` -> softmax ``[K, H', W', S']`` with the frame's affine; with an
        ``roi``, only that in-plane region is segmented and the rest is background."""
        x = frame.as_tensor().to(self.device)[None]
        if roi is not None:
            x = x[:, :, roi[0], roi[1]]
        if not spec.is_stack:
            x = x[..., 0]
        logits = self.inferers[spec.name](x, self.network, spec.name)
        probabilities = torch.softmax(logits.float(), dim=1)[0].cpu()
        if not spec.is_stack:
            probabilities = probabilities[..., None]
        if roi is not None:
            whole = torch.zeros((probabilities.shape[0], *frame.shape[1:]), dtype=probabilities.dtype)
            whole[0] = 1.0
            whole[:, roi[0], roi[1]] = probabilities
            probabilities = whole
        return MetaTensor(probabilities, affine=frame.affine)

    def predict_file(self, path: str | os.PathLike, view: str) -> tuple[np.ndarray, nib.Nifti1Image]:
        """Segment every frame of a NIfTI file.

        Args:
            path: a cine ``[H, W, S, T]`` or one frame ``[H, W, S]`` (LAX ``[H, W, 1, T]``, ``[H, W, 1]`` or
                ``[H, W]``).
            view: the view it shows.

        Returns:
            uint8 class ids with the file's array shape, and the file's nibabel image (for its header and affine).

        Raises:
            DataError: when the file cannot be read or has an unexpected shape.
        """
        path = Path(path)
        try:
            source = nib.load(str(path))
            image = LoadImage(image_only=True, dtype=np.float32)(str(path))
        except Exception as e:  # nibabel and MONAI raise several unrelated types for unreadable files
            raise DataError(f"cannot read NIfTI file {path}: {e}") from e
        labels = self.predict(as_cine(image, view, str(path)), view)
        return labels.reshape(source.shape), source


def _load_label(path: str, shape: tuple[int, ...]) -> np.ndarray:
    label = np.asarray(nib.load(path).dataobj)
    check_label_values(label, len(CARDIAC_CLASSES), path)
    if label.shape != shape:
        raise DataError(f"label {path} has shape {label.shape} but its image has {shape}.")
    return label.astype(np.uint8)


def evaluate_segmentation(
    predictor: CineSegmentationPredictor, datalist: Sequence[Mapping[str, str]], frames: str = "ed_es"
) -> list[dict[str, Any]]:
    """Segment labelled subjects and score each view and frame against its reference, in the acquisition space.

    Args:
        predictor: the predictor (its views are evaluated).
        datalist: ``{view: path, "<view>_label": path}`` per subject (``load_cine_datalist(..., labels=True)``).
        frames: ``"ed_es"`` (end-diastole and end-systole, from the reference's LV cavity size, as ACDC) or
            ``"all"`` labelled frames.

    Returns:
        one row per subject, view and frame: ``{"subject": index in the data list, "view", "phase": "ED" / "ES" /
        "", "frame", "dice_RV", ..., "hd95_LV"}`` (no identifiers: subjects are numbered).

    Raises:
        DataError: when the data list is empty, a label is unreadable, holds unexpected ids or another shape than
            its image, or has no labelled frame.
        ValueError: for an unknown ``frames`` choice.
    """
    if frames not in ("ed_es", "all"):
        raise ValueError(f"frames must be 'ed_es' or 'all', got {frames!r}.")
    if not datalist:
        raise DataError("the evaluation data list is empty: no labelled subject to evaluate.")
    rows = []
    for subject, item in enumerate(datalist):
        for view in predictor.views:
            image = LoadImage(image_only=True, dtype=np.float32)(item[view])
            cine = as_cine(image, view, item[view])
            label = _load_label(item[label_key(view)], tuple(image.shape)).reshape(cine.shape)
            if frames == "ed_es":
                chosen = ed_es_frames(label)
                phases = ["ED", "ES"][: len(chosen)]
            else:
                chosen = np.flatnonzero(label.reshape(-1, label.shape[-1]).max(axis=0) > 0).tolist()
                phases = [""] * len(chosen)
            prediction = predictor.predict(cine, view, chosen)
            spacing = np.linalg.norm(np.asarray(cine.affine)[:3, :3], axis=0)
            if view != SAX_VIEW:
                prediction, label, spacing = prediction[:, :, 0], label[:, :, 0], spacing[:2]
            for index, (frame, phase) in enumerate(zip(chosen, phases)):
                metrics = segmentation_metrics(prediction[..., index], label[..., frame], spacing)
                rows.append({"subject": subject, "view": view, "phase": phase, "frame": frame, **metrics})
    return rows


def _nifti_stem(name: str) -> str:
    return next(name[: -len(suffix)] for suffix in _NIFTI_SUFFIXES if name.endswith(suffix))


def _save_labels(labels: np.ndarray, source: nib.Nifti1Image, path: Path) -> Path:
    """Write class ids with the source image's affine and header (uint8, no scaling), atomically, gzip by name."""
    header = source.header.copy()
    header.set_data_dtype(np.uint8)
    image = nib.Nifti1Image(labels.astype(np.uint8), source.affine, header=header)
    image.header.set_slope_inter(1.0, 0.0)
    data = image.to_bytes()
    payload = gzip.compress(data, compresslevel=6) if path.name.endswith(".gz") else data
    return atomic_write(path, lambda temporary: Path(temporary).write_bytes(payload))


def segment_folder(
    predictor: CineSegmentationPredictor,
    input_dir: str | os.PathLike | None,
    output_dir: str | os.PathLike,
    view: str = SAX_VIEW,
) -> list[Path]:
    """Segment every NIfTI file of a folder and write ``<name>_seg.nii.gz`` label maps with the input's affine.

    Args:
        predictor: the predictor.
        input_dir: folder of ``*.nii`` / ``*.nii.gz`` images of ``view`` (cines or single frames; not recursive).
        output_dir: where the label maps go (created); each has its input's shape, affine and header, uint8 ids.
        view: the view every file shows.

    Returns:
        the written paths, in file-name order.

    Raises:
        DataError: when no folder is given, it does not exist or holds no NIfTI file, or a file cannot be segmented.
    """
    if input_dir is None:
        raise DataError("no input folder given: pass --input_dir <folder of NIfTI images>.")
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if not input_dir.is_dir():
        raise DataError(f"input folder {input_dir} does not exist.")
    files = sorted(p for p in input_dir.iterdir() if p.is_file() and p.name.endswith(_NIFTI_SUFFIXES))
    if not files:
        raise DataError(f"no NIfTI files (*.nii, *.nii.gz) in {input_dir}.")
    written = []
    for path in files:
        labels, source = predictor.predict_file(path, view)
        written.append(_save_labels(labels, source, output_dir / f"{_nifti_stem(path.name)}_seg.nii.gz"))
    return written


def load_segmentation_predictor(
    run_dir: str | os.PathLike, overrides: Mapping[str, Any] | None = None
) -> CineSegmentationPredictor:
    """The predictor of a trained segmentation bundle: its ``configs/inference.json`` item ``predictor``.

    A finished ``cine_seg`` run folder is such a bundle (training exports its configs there, with the settings it was
    trained with; :func:`medssl.engine.bundles.export_inference_bundle`), and so is a bundle imported from another
    toolkit. For a run folder without configs (trained before the export existed), the recipe's ``inference.json``
    is used, with ``overrides`` repeating the settings the run was trained with.

    Args:
        run_dir: the bundle or run folder (``<run_dir>/models/model.safetensors`` holds medssl's weights).
        overrides: inference config id -> value, e.g. the ``views``, ``model``, ``inference`` settings.

    Returns:
        the predictor (``predict(cine, view, frames)``), its network in eval mode on the config's device.

    Raises:
        CheckpointError: when the bundle has no weights or they do not fit the network.
        ConfigError: for an unknown override key, or a bundle without a ``predictor``.
    """
    from medssl.engine.bundles import parse_bundle_item

    run_dir = Path(run_dir).resolve()
    if (run_dir / "configs" / "inference.json").is_file():
        predictor = parse_bundle_item(run_dir, "predictor", ["configs/inference.json"], overrides)
    else:
        overrides = {**(overrides or {}), "run_dir": str(run_dir)}
        predictor = parse_bundle_item("cine_seg", "predictor", ["configs/inference.json"], overrides)
    predictor.network.eval()
    return predictor
