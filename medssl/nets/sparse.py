"""Sparse masked encoding for MONAI CNNs: the encoder side of SparK.

SparK: Tian et al., 2023, "Designing BERT for Convolutional Networks: Sparse and Hierarchical Masked Modeling",
ICLR, https://arxiv.org/abs/2301.03580 (code: github.com/keyu-tian/SparK, MIT). Masked patches of the input are
treated as empty space of a sparse image, and sparse convolution is emulated on dense tensors: the masked input is
zeroed and every convolution and pooling output is multiplied again by the mask (resized to the feature map), so
hidden positions stay exactly zero at every depth; normalisation layers take their statistics over the visible
positions only. The mask lives on the encoder's coarsest grid, so one hidden cell is one patch of the input
(32 x 32 pixels for a 2D ResNet) and a hidden cell is hidden at every scale.

:class:`SparseEncoder` converts a MONAI network (``ResNet`` / ``resnet18`` ..., ``UNet``, ``DynUNet``, ``BasicUNet``,
or any CNN given its stages), in place or by copy, without renaming a parameter: its ``network.state_dict()``
loads strictly into the plain MONAI network for fine-tuning. Outside a masked forward pass the converted layers
behave as their dense selves.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence

import torch
from monai.networks.blocks.activation import MemoryEfficientSwish, Mish, Swish
from monai.networks.layers import SkipConnection
from monai.networks.nets import BasicUNet, DynUNet, ResNet, UNet
from torch import Tensor, nn

from medssl.errors import ConfigError, DataError

__all__ = [
    "SparseMask",
    "SparseBatchNorm",
    "SparseInstanceNorm",
    "SparseLayerNorm",
    "sparsify_",
    "encoder_stages",
    "run_stages",
    "SparseEncoder",
]

_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)

#: Layers whose output is multiplied again by the mask (SparK's sparse convolution and pooling).
REMASKED_LAYERS: tuple[type[nn.Module], ...] = (
    *_CONVOLUTIONS,
    nn.MaxPool1d,
    nn.MaxPool2d,
    nn.MaxPool3d,
    nn.AvgPool1d,
    nn.AvgPool2d,
    nn.AvgPool3d,
)

#: Element-wise layers with ``f(0) == 0``: a hidden (zero) position stays zero through them.
ZERO_PRESERVING_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Identity,
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Hardtanh,
    nn.Tanh,
    nn.Softsign,
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    Swish,
    MemoryEfficientSwish,
    Mish,
)


class SparseMask:
    """The visible positions of the current masked forward pass, shared by the sparse layers of one network.

    The mask is set on the encoder's coarsest grid and resized to each feature map by nearest-neighbour repetition
    (SparK's ``_get_active_ex_or_ii``), once per feature-map size and forward pass. Deep copies of a network copy
    its mask holder with it, so a copy never reads the original's mask.
    """

    def __init__(self) -> None:
        self._active: Tensor | None = None
        self._resized: dict[tuple[int, ...], Tensor] = {}

    @property
    def active(self) -> Tensor | None:
        """``[B, 1, *grid]`` bool (True = visible) during a masked forward pass, else None."""
        return self._active

    @contextlib.contextmanager
    def masked(self, active: Tensor) -> Iterator[None]:
        """Run the sparse layers under ``active`` inside the ``with`` block; the previous mask is restored after it.

        Args:
            active: ``[B, 1, *grid]`` bool, True where the grid cell is visible.

        Raises:
            ValueError: when ``active`` is not a bool tensor with a singleton channel axis.
        """
        if active.dtype != torch.bool or active.ndim < 3 or active.shape[1] != 1:
            raise ValueError(f"active must be a [B, 1, *grid] bool tensor, got {active.dtype} {tuple(active.shape)}.")
        previous = (self._active, self._resized)
        self._active, self._resized = active, {}
        try:
            yield
        finally:
            self._active, self._resized = previous

    def like(self, features: Tensor) -> Tensor | None:
        """The mask resized to a feature map, or None outside a masked forward pass.

        Args:
            features: ``[B, C, *spatial]``; every spatial size must be a whole multiple of the grid's.

        Returns:
            ``[B, 1, *spatial]`` bool, True where visible.

        Raises:
            DataError: when the batch differs from the mask's or a size is not a whole multiple of the grid's.
        """
        if self._active is None:
            return None
        spatial, grid = tuple(features.shape[2:]), tuple(self._active.shape[2:])
        if spatial not in self._resized:
            if features.shape[0] != self._active.shape[0] or len(spatial) != len(grid):
                raise DataError(
                    f"feature map {tuple(features.shape)} does not match the mask {tuple(self._active.shape)} "
                    "(batch and number of spatial axes must agree)."
                )
            if any(size % cells for size, cells in zip(spatial, grid)):
                raise DataError(
                    f"feature map {spatial} is not a whole multiple of the mask grid {grid}: every stage of the "
                    "encoder must downsample the input by a factor that divides the coarsest stage's."
                )
            resized = self._active
            for axis, (size, cells) in enumerate(zip(spatial, grid), start=2):
                resized = resized.repeat_interleave(size // cells, dim=axis)
            self._resized[spatial] = resized
        return self._resized[spatial]

    def zero_hidden(self, features: Tensor) -> Tensor:
        """``features`` ``[B, C, *spatial]`` with hidden positions set to exactly zero (unchanged outside a masked
        forward pass).

        Raises:
            DataError: as :meth:`like`.
        """
        active = self.like(features)
        # where(), not a product: an inf or NaN at a hidden position would survive multiplication by zero.
        return features if active is None else torch.where(active, features, features.new_zeros(()))


class _ReMask:
    """Forward hook zeroing a layer's output at hidden positions (SparK's sparse convolution and pooling)."""

    def __init__(self, mask: SparseMask) -> None:
        self.mask = mask

    def __call__(self, module: nn.Module, inputs: tuple, output: Tensor) -> Tensor:
        return self.mask.zero_hidden(output)


def _visible_moments(features: Tensor, active: Tensor | None, dims: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Mean and biased variance of ``features`` over ``dims``, counting visible positions only (all when None)."""
    if active is None:
        return features.mean(dims, keepdim=True), features.var(dims, unbiased=False, keepdim=True)
    weights = active.to(features.dtype).expand_as(features)
    # A group with no visible position (e.g. a fully hidden row under LayerNorm) is zeroed afterwards anyway.
    count = weights.sum(dims, keepdim=True).clamp_min(1.0)
    mean = (features * weights).sum(dims, keepdim=True) / count
    var = ((features - mean).square() * weights).sum(dims, keepdim=True) / count
    return mean, var


class SparseBatchNorm(nn.BatchNorm1d):
    """Batch normalisation over the visible positions of a sparse feature map, any number of spatial axes.

    SparK's sparse BatchNorm (Tian et al., 2023, https://arxiv.org/abs/2301.03580): the visible positions of the
    whole batch are gathered into ``[N_visible, C]`` rows and normalised by ``BatchNorm1d`` (so batch statistics,
    running statistics, momentum and eval mode are exactly PyTorch's, over the visible positions only); hidden
    positions are zero in the output. Subclassing ``BatchNorm1d`` also keeps the parameter and buffer names of
    ``BatchNorm{1,2,3}d``, so state dicts are interchangeable.

    Args:
        num_features: channels ``C``.
        mask: the network's :class:`SparseMask`.
        eps, momentum, affine, track_running_stats, bias: as ``torch.nn.BatchNorm2d``.
    """

    def __init__(
        self,
        num_features: int,
        mask: SparseMask,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        bias: bool = True,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, **_bias_option(bias))
        self.sparse_mask = mask

    @classmethod
    def from_dense(cls, norm: nn.modules.batchnorm._BatchNorm, mask: SparseMask) -> SparseBatchNorm:
        """The sparse twin of a BatchNorm layer, sharing its parameters and running statistics."""
        sparse = cls(
            norm.num_features,
            mask,
            eps=norm.eps,
            momentum=norm.momentum,
            affine=norm.affine,
            track_running_stats=norm.track_running_stats,
            bias=norm.bias is not None,
        )
        return _adopt(norm, sparse)

    def forward(self, features: Tensor) -> Tensor:
        """Args: features ``[B, C, *spatial]``. Returns the normalised features, zero at hidden positions."""
        active = self.sparse_mask.like(features)
        rows = features.movedim(1, -1)
        if active is None:
            return super().forward(rows.reshape(-1, rows.shape[-1])).reshape(rows.shape).movedim(-1, 1)
        visible = active.squeeze(1)
        out = rows.new_zeros(rows.shape)
        out[visible] = super().forward(rows[visible])
        return out.movedim(-1, 1)


class SparseInstanceNorm(nn.InstanceNorm1d):
    """Instance normalisation over the visible positions of a sparse feature map, any number of spatial axes.

    The 3D counterpart MONAI's UNet / DynUNet need (their default norm) of SparK's sparse norms (Tian et al., 2023,
    https://arxiv.org/abs/2301.03580): each sample's channel is normalised by the mean and biased variance of its
    visible positions, then the affine map is applied and hidden positions are zeroed. Subclassing
    ``InstanceNorm1d`` keeps the parameter names of ``InstanceNorm{1,2,3}d``. Running statistics are not supported.

    Args:
        num_features: channels ``C``.
        mask: the network's :class:`SparseMask`.
        eps, affine, bias: as ``torch.nn.InstanceNorm2d``.
    """

    def __init__(self, num_features: int, mask: SparseMask, eps: float = 1e-5, affine: bool = False, bias: bool = True):
        super().__init__(num_features, eps=eps, affine=affine, track_running_stats=False, **_bias_option(bias))
        self.sparse_mask = mask

    @classmethod
    def from_dense(cls, norm: nn.modules.instancenorm._InstanceNorm, mask: SparseMask) -> SparseInstanceNorm:
        """The sparse twin of an InstanceNorm layer without running statistics, sharing its parameters."""
        return _adopt(norm, cls(norm.num_features, mask, eps=norm.eps, affine=norm.affine, bias=norm.bias is not None))

    def forward(self, features: Tensor) -> Tensor:
        """Args: features ``[B, C, *spatial]``. Returns the normalised features, zero at hidden positions."""
        active = self.sparse_mask.like(features)
        mean, var = _visible_moments(features, active, tuple(range(2, features.ndim)))
        out = (features - mean) * torch.rsqrt(var + self.eps)
        channel_shape = (1, -1) + (1,) * (features.ndim - 2)
        if self.weight is not None:
            out = out * self.weight.view(channel_shape)
        if self.bias is not None:
            out = out + self.bias.view(channel_shape)
        return self.sparse_mask.zero_hidden(out)


class SparseLayerNorm(nn.LayerNorm):
    """Layer normalisation over the trailing axes of a sparse feature map, counting visible positions only.

    SparK's sparse LayerNorm (Tian et al., 2023, https://arxiv.org/abs/2301.03580), for channel-first MONAI
    feature maps: the statistics of each group (the trailing ``len(normalized_shape)`` axes, as ``nn.LayerNorm``)
    are over its visible positions; the element-wise affine map is applied and hidden positions are zeroed.

    Args:
        normalized_shape: the trailing shape normalised over, as ``nn.LayerNorm``.
        mask: the network's :class:`SparseMask`.
        eps, elementwise_affine, bias: as ``nn.LayerNorm``.

    Raises:
        ValueError: (forward) when the features' trailing shape is not ``normalized_shape``.
    """

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        mask: SparseMask,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
    ) -> None:
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, bias=bias)
        self.sparse_mask = mask

    @classmethod
    def from_dense(cls, norm: nn.LayerNorm, mask: SparseMask) -> SparseLayerNorm:
        """The sparse twin of a LayerNorm layer, sharing its parameters."""
        sparse = cls(norm.normalized_shape, mask, norm.eps, norm.elementwise_affine, bias=norm.bias is not None)
        return _adopt(norm, sparse)

    def forward(self, features: Tensor) -> Tensor:
        """Args: features ``[B, C, *spatial]``. Returns the normalised features, zero at hidden positions."""
        axes = len(self.normalized_shape)
        if tuple(features.shape[-axes:]) != tuple(self.normalized_shape):
            raise ValueError(
                f"features {tuple(features.shape)} do not end in normalized_shape {tuple(self.normalized_shape)}."
            )
        active = self.sparse_mask.like(features)
        mean, var = _visible_moments(features, active, tuple(range(features.ndim - axes, features.ndim)))
        out = (features - mean) * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            out = out * self.weight
        if self.bias is not None:
            out = out + self.bias
        return self.sparse_mask.zero_hidden(out)


def _bias_option(bias: bool) -> dict[str, bool]:
    """``bias=False`` for a Batch/InstanceNorm constructor, or nothing: older PyTorch (2.11, for one) has no such
    argument (its norms always have a bias when affine), so a norm without one only exists, and only needs saying,
    on newer ones."""
    return {} if bias else {"bias": False}


def _adopt(dense: nn.Module, sparse: nn.Module) -> nn.Module:
    """Give ``sparse`` the very parameter and buffer tensors of ``dense`` (same names) and its train/eval mode."""
    for name, tensor in [*dense.named_parameters(recurse=False), *dense.named_buffers(recurse=False)]:
        setattr(sparse, name, tensor)
    return sparse.train(dense.training)


def _sparse_norm(norm: nn.Module, mask: SparseMask) -> nn.Module | None:
    """The sparse twin of a supported norm layer, else None."""
    if isinstance(norm, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
        return SparseBatchNorm.from_dense(norm, mask)
    if isinstance(norm, (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)) and not norm.track_running_stats:
        return SparseInstanceNorm.from_dense(norm, mask)
    if isinstance(norm, nn.LayerNorm):
        return SparseLayerNorm.from_dense(norm, mask)
    return None


_SPARSE_TYPES = (SparseBatchNorm, SparseInstanceNorm, SparseLayerNorm)


def sparsify_(network: nn.Module, module_names: Sequence[str], mask: SparseMask) -> list[str]:
    """Convert the named submodules of a network, and everything inside them, to sparse layers in place.

    Convolutions and pooling layers get a forward hook that re-applies the mask to their output; BatchNorm,
    InstanceNorm (without running statistics) and LayerNorm are replaced by :class:`SparseBatchNorm`,
    :class:`SparseInstanceNorm` and :class:`SparseLayerNorm` holding the same tensors under the same names;
    zero-preserving activations and dropout are kept. Any other layer would fill hidden positions, so the whole
    conversion is refused before anything changes. Code in a module's own ``forward`` (sums, concatenation) is
    not inspected: it must map zeros to zeros, as residual sums and concatenations do.

    Args:
        network: the network owning the modules.
        module_names: dotted names of the submodules to convert (e.g. ``["conv1", "layer1"]``).
        mask: the mask holder the sparse layers read.

    Returns:
        the names of the converted layers, relative to ``network``.

    Raises:
        ConfigError: when a name is not a submodule of ``network``, or when some layer cannot be sparsified (the
            message names every such layer and its type).
    """
    layers: dict[str, nn.Module] = {}
    for root in module_names:
        try:
            module = network.get_submodule(root)
        except AttributeError as e:
            raise ConfigError(f"the network has no submodule '{root}': {e}") from e
        for name, layer in module.named_modules(prefix=root):
            if not any(True for _ in layer.children()):
                layers[name] = layer
    unsupported = [
        f"'{name}' ({type(layer).__name__})"
        for name, layer in layers.items()
        if not isinstance(layer, (*REMASKED_LAYERS, *ZERO_PRESERVING_LAYERS, *_SPARSE_TYPES))
        and _sparse_norm(layer, mask) is None
    ]
    if unsupported:
        raise ConfigError(
            f"SparK cannot sparsify layer(s) {', '.join(unsupported)}: they would fill masked positions. Only "
            "convolutions, max/average pooling, BatchNorm, InstanceNorm without running statistics, LayerNorm and "
            "zero-preserving activations or dropout can be sparsified; build the network with norm='batch' or "
            "'instance' (e.g. GroupNorm -> InstanceNorm)."
        )
    already = [name for name, layer in layers.items() if isinstance(layer, _SPARSE_TYPES) or _remask_hook(layer)]
    if already:
        raise ConfigError(
            f"layer(s) {already[:3]} are sparse already: convert a plain network (SparseEncoder copies it by default)."
        )
    for name, layer in layers.items():
        if isinstance(layer, REMASKED_LAYERS):
            layer.register_forward_hook(_ReMask(mask))
        elif (sparse := _sparse_norm(layer, mask)) is not None:
            parent, _, attribute = name.rpartition(".")
            setattr(network.get_submodule(parent), attribute, sparse)
    return list(layers)


def _remask_hook(layer: nn.Module) -> bool:
    """Whether a layer carries SparK's re-masking hook already."""
    return any(isinstance(hook, _ReMask) for hook in layer._forward_hooks.values())


def encoder_stages(network: nn.Module) -> list[list[str]]:
    """The encoder path of a MONAI CNN as stages: each a list of submodule names run in order, whose output is one
    feature scale.

    - ``ResNet`` (``resnet18`` ... ``resnet200``, ``ResNetFeatures``): stem (+ max-pool) with ``layer1``, then
      ``layer2``, ``layer3``, ``layer4``, the four scales SparK decodes from: strides 4, 8, 16, 32 with a stride-2
      stem (``conv1_t_stride=2``, as SparK's ResNets); MONAI's default stem stride 1 halves them.
    - ``UNet``: the down-sampling block of every level, then the bottom block.
    - ``DynUNet``: ``input_block``, every ``downsamples`` block, ``bottleneck``.
    - ``BasicUNet``: ``conv_0``, ``down_1`` ... ``down_4``.

    Args:
        network: a MONAI network of one of these classes.

    Returns:
        the stages, shallow to deep.

    Raises:
        ConfigError: for any other network (pass its stages explicitly to :class:`SparseEncoder`).
    """
    if isinstance(network, ResNet):
        stem = ["conv1", "bn1", "act"] + ([] if network.no_max_pool else ["maxpool"])
        return [[*stem, "layer1"], ["layer2"], ["layer3"], ["layer4"]]
    if isinstance(network, UNet):
        # UNet nests levels as Sequential(down, SkipConnection(next level), up); the innermost level is the bottom.
        stages, level = [], "model"
        while _is_unet_level(network.get_submodule(level)):
            stages.append([f"{level}.0"])
            level = f"{level}.1.submodule"
        return [*stages, [level]]
    if isinstance(network, DynUNet):
        downs = [[f"downsamples.{index}"] for index in range(len(network.downsamples))]
        return [["input_block"], *downs, ["bottleneck"]]
    if isinstance(network, BasicUNet):
        return [["conv_0"], ["down_1"], ["down_2"], ["down_3"], ["down_4"]]
    raise ConfigError(
        f"no default encoder stages for {type(network).__name__}: pass stages=[[submodule names], ...] (shallow to "
        "deep) for it, or use a MONAI ResNet, UNet, DynUNet or BasicUNet."
    )


def _is_unet_level(module: nn.Module) -> bool:
    """Whether a module is one of MONAI UNet's nested levels, ``Sequential(down, SkipConnection, up)``."""
    return isinstance(module, nn.Sequential) and len(module) == 3 and isinstance(module[1], SkipConnection)


def run_stages(network: nn.Module, stages: Sequence[Sequence[str]], images: Tensor) -> list[Tensor]:
    """Run a network's encoder stages in order and collect each stage's output.

    Args:
        network: the network owning the stage modules (plain or sparse).
        stages: stages from :func:`encoder_stages` (or given by hand).
        images: ``[B, C, *spatial]``.

    Returns:
        one ``[B, C_i, *spatial_i]`` feature map per stage.
    """
    features, out = [], images
    for stage in stages:
        for name in stage:
            out = network.get_submodule(name)(out)
        features.append(out)
    return features


class SparseEncoder(nn.Module):
    """A MONAI CNN encoder turned into SparK's sparse masked encoder (Tian et al., 2023, ICLR,
    https://arxiv.org/abs/2301.03580).

    The network is converted by :func:`sparsify_` (a deep copy by default, or in place), only inside its encoder
    stages: a classifier head or a UNet's decoder path stays dense and untouched. ``forward`` zeroes the hidden
    patches of the input, runs the stages under the mask and returns one feature map per stage, each exactly zero at
    hidden positions. The mask is a ``[B, 1, *grid]`` bool over the coarsest stage's grid (``grid = spatial //
    downsample``); SparK hides 60 % of its cells. ``network.state_dict()`` has the plain network's keys.

    Args:
        network: a MONAI CNN (see :func:`encoder_stages`) or any CNN with ``stages`` given.
        image_size: a spatial input size the encoder accepts (e.g. the pre-training crop), used once on the meta
            device to find each stage's channels and stride.
        stages: encoder stages (lists of submodule names, shallow to deep); default :func:`encoder_stages`.
        inplace: convert ``network`` itself instead of a copy.

    Raises:
        ConfigError: for a network without default stages, a layer that cannot be sparsified (named), a stage
            without a convolution before it, or an ``image_size`` the stages do not divide exactly.
    """

    def __init__(
        self,
        network: nn.Module,
        image_size: Sequence[int],
        stages: Sequence[Sequence[str]] | None = None,
        inplace: bool = False,
    ) -> None:
        super().__init__()
        stages = encoder_stages(network) if stages is None else [list(stage) for stage in stages]
        if not stages or not all(stages):
            raise ConfigError(f"stages must be a non-empty list of non-empty lists of submodule names, got {stages}.")
        self.stages = stages
        self.sparse_mask = SparseMask()
        self.network = network if inplace else copy.deepcopy(network)
        sparsify_(self.network, [name for stage in stages for name in stage], self.sparse_mask)
        first_stage = [module for name in stages[0] for module in self.network.get_submodule(name).modules()]
        first_conv = next((module for module in first_stage if isinstance(module, _CONVOLUTIONS)), None)
        if first_conv is None:
            raise ConfigError(f"the first stage {stages[0]} has no convolution to take the input's channels from.")
        self.in_channels = int(first_conv.in_channels)
        self.spatial_dims = first_conv.weight.ndim - 2
        image_size = tuple(int(size) for size in image_size)
        if len(image_size) != self.spatial_dims:
            raise ConfigError(f"image_size {image_size} must have {self.spatial_dims} axes for this network.")
        self.feature_channels, self.feature_strides = self._probe(image_size)
        self.downsample = self.feature_strides[-1]

    def _probe(self, image_size: tuple[int, ...]) -> tuple[list[int], list[tuple[int, ...]]]:
        """Channels and per-axis strides of every stage, from one forward pass on the meta device (no compute)."""
        # eval(): batch statistics of a 1-sample probe with a 1 x 1 coarsest map would be undefined.
        probe = copy.deepcopy(self.network).to("meta").eval()
        with torch.no_grad():
            features = run_stages(probe, self.stages, torch.empty(1, self.in_channels, *image_size, device="meta"))
        strides = []
        for index, feature in enumerate(features):
            spatial = tuple(feature.shape[2:])
            if any(size % out for size, out in zip(image_size, spatial)):
                raise ConfigError(
                    f"image_size {image_size} gives stage {index} a {spatial} feature map, not an exact downsampling: "
                    "use a size divisible by the encoder's total stride (e.g. a multiple of 32 for a 2D ResNet)."
                )
            strides.append(tuple(size // out for size, out in zip(image_size, spatial)))
        coarsest = strides[-1]
        if any(last % stride for stride in strides for stride, last in zip(stride, coarsest)):
            raise ConfigError(f"every stage stride must divide the coarsest one, got strides {strides}.")
        return [int(feature.shape[1]) for feature in features], strides

    def mask_grid(self, spatial_shape: Sequence[int]) -> tuple[int, ...]:
        """The coarsest grid of an input: ``spatial_shape // downsample`` per axis.

        Args:
            spatial_shape: the input's spatial size.

        Returns:
            cells per axis.

        Raises:
            DataError: when an axis is smaller than one mask patch or not a multiple of it.
        """
        spatial_shape = tuple(int(size) for size in spatial_shape)
        if len(spatial_shape) != self.spatial_dims:
            raise DataError(f"input spatial shape {spatial_shape} must have {self.spatial_dims} axes.")
        if any(size < patch for size, patch in zip(spatial_shape, self.downsample)):
            raise DataError(
                f"input spatial shape {spatial_shape} is smaller than one mask patch {self.downsample} of the "
                "encoder's coarsest grid: SparK needs at least one grid cell per axis; use larger images."
            )
        if any(size % patch for size, patch in zip(spatial_shape, self.downsample)):
            raise DataError(
                f"input spatial shape {spatial_shape} is not a multiple of the mask patch {self.downsample} (the "
                "encoder's total stride); crop or pad the images to a multiple."
            )
        return tuple(size // patch for size, patch in zip(spatial_shape, self.downsample))

    def forward(self, images: Tensor, active: Tensor) -> list[Tensor]:
        """Encode the visible patches of a batch.

        Args:
            images: ``[B, C, *spatial]``.
            active: ``[B, 1, *grid]`` bool, True where a cell of :meth:`mask_grid` is visible (all True: the dense
                network).

        Returns:
            one ``[B, C_i, *spatial / stride_i]`` feature map per stage (``feature_channels``, ``feature_strides``),
            zero at hidden positions.

        Raises:
            DataError: for images of the wrong rank or channels, a spatial size the grid does not fit, or a mask of
                the wrong shape.
        """
        if images.ndim != self.spatial_dims + 2 or images.shape[1] != self.in_channels:
            raise DataError(
                f"images must be [B, {self.in_channels}, {self.spatial_dims} spatial axes], got {tuple(images.shape)}."
            )
        expected = (images.shape[0], 1, *self.mask_grid(images.shape[2:]))
        if tuple(active.shape) != expected or active.dtype != torch.bool:
            raise DataError(f"active must be a {list(expected)} bool mask, got {active.dtype} {tuple(active.shape)}.")
        with self.sparse_mask.masked(active):
            return run_stages(self.network, self.stages, self.sparse_mask.zero_hidden(images))
