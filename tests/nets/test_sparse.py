"""Sparse masked encoding (SparK): hidden positions stay zero, visible-only norm statistics, plain-network parity."""

import copy

import pytest
import torch
import torch.nn.functional as F
from monai.networks.nets import BasicUNet, DynUNet, ResNet, UNet
from torch import nn

from medssl.errors import ConfigError, DataError
from medssl.nets.sparse import (
    SparseBatchNorm,
    SparseEncoder,
    SparseInstanceNorm,
    SparseLayerNorm,
    SparseMask,
    encoder_stages,
)


def tiny_resnet(dims, **kwargs):
    return ResNet("basic", [1, 1, 1, 1], [4, 4, 8, 8], spatial_dims=dims, n_input_channels=1, num_classes=3, **kwargs)


NETWORKS = {
    "resnet_2d": (lambda: tiny_resnet(2, conv1_t_stride=2), (64, 64)),
    "resnet_3d_shortcut_a": (lambda: tiny_resnet(3, shortcut_type="A"), (32, 32, 16)),
    "unet_2d": (lambda: UNet(2, 1, 2, channels=(4, 8, 8), strides=(2, 2), num_res_units=1), (16, 16)),
    "unet_3d": (lambda: UNet(3, 1, 2, channels=(4, 8, 8), strides=(2, 2), num_res_units=2, dropout=0.1), (8, 8, 8)),
    "dynunet_3d": (
        lambda: DynUNet(
            3, 1, 2, [3, 3, 3], [1, 2, (2, 2, 1)], [2, (2, 2, 1)], filters=[4, 8, 8], res_block=True
        ),
        (16, 16, 8),
    ),
    "basicunet_2d": (lambda: BasicUNet(2, 1, 2, features=(4, 4, 4, 8, 8, 4)), (32, 32)),
}


def random_active(batch, grid, seed=0):
    """A [B, 1, *grid] visibility mask with at least one visible and one hidden cell per sample."""
    active = torch.rand(batch, 1, *grid, generator=torch.Generator().manual_seed(seed)) < 0.5
    flat = active.view(batch, -1)
    flat[:, 0], flat[:, -1] = True, False
    return active


def nearest(active, spatial):
    """Independent resize of a mask to a feature map: nearest-neighbour interpolation."""
    return F.interpolate(active.float(), size=tuple(spatial), mode="nearest").bool()


@pytest.mark.parametrize("name", NETWORKS, ids=list(NETWORKS))
def test_hidden_positions_stay_exactly_zero_through_every_layer(name):
    build, size = NETWORKS[name]
    torch.manual_seed(0)
    encoder = SparseEncoder(build(), size)
    outputs = []
    for stage in encoder.stages:
        for root in stage:
            for layer in encoder.network.get_submodule(root).modules():
                layer.register_forward_hook(lambda module, args, out: outputs.append(out.detach().clone()))
    images = torch.randn(2, 1, *size) + 3.0
    active = random_active(2, encoder.mask_grid(size))
    features = encoder(images, active)
    assert [f.shape[1] for f in features] == encoder.feature_channels
    assert len(outputs) > 10
    for out in [*outputs, *features]:
        visible = nearest(active, out.shape[2:]).expand_as(out)
        assert torch.count_nonzero(out[~visible]) == 0
        assert torch.count_nonzero(out[visible]) > 0


def norm_case(kind, dims):
    """A dense norm with non-trivial affine parameters, its sparse twin and an input [B, C, *spatial]."""
    spatial = (4, 6) if dims == 2 else (4, 2, 6)
    channels = 3
    dense = {
        "batch": lambda: (nn.BatchNorm2d if dims == 2 else nn.BatchNorm3d)(channels),
        "instance": lambda: (nn.InstanceNorm2d if dims == 2 else nn.InstanceNorm3d)(channels, affine=True),
        "layer": lambda: nn.LayerNorm((channels, *spatial)),
    }[kind]()
    with torch.no_grad():
        for parameter in dense.parameters():
            parameter.copy_(torch.randn_like(parameter))
    sparse_class = {"batch": SparseBatchNorm, "instance": SparseInstanceNorm, "layer": SparseLayerNorm}[kind]
    mask = SparseMask()
    torch.manual_seed(1)
    features = torch.randn(2, channels, *spatial) * 2 + 1
    return dense, sparse_class.from_dense(copy.deepcopy(dense), mask), mask, features


NORM_CASES = [(kind, dims) for kind in ("batch", "instance", "layer") for dims in (2, 3)]


@pytest.mark.parametrize("kind,dims", NORM_CASES, ids=[f"{k}_{d}d" for k, d in NORM_CASES])
def test_sparse_norm_statistics_are_the_dense_statistics_of_the_visible_positions(kind, dims):
    dense, sparse, mask, features = norm_case(kind, dims)
    grid = tuple(s // 2 for s in features.shape[2:])
    active = random_active(2, grid, seed=3)
    visible = nearest(active, features.shape[2:])[:, 0]  # [B, *spatial]
    with mask.masked(active):
        out = sparse(features)
    assert torch.count_nonzero(out.movedim(1, -1)[~visible]) == 0
    eps = dense.eps
    if kind == "batch":
        rows = features.movedim(1, -1)[visible]  # [N_visible, C], the whole batch
        expected = (rows - rows.mean(0)) / (rows.var(0, unbiased=False) + eps).sqrt() * dense.weight + dense.bias
        torch.testing.assert_close(out.movedim(1, -1)[visible], expected)
        torch.testing.assert_close(sparse.running_mean, 0.1 * rows.mean(0))
        torch.testing.assert_close(sparse.running_var, 0.9 + 0.1 * rows.var(0, unbiased=True))
        assert int(sparse.num_batches_tracked) == 1
    for b in range(features.shape[0]):
        sample = features[b][:, visible[b]]  # [C, n_visible] of this sample
        got = out[b][:, visible[b]]
        if kind == "instance":  # PyTorch's own instance norm on the visible positions only
            expected = F.instance_norm(sample.unsqueeze(0), weight=dense.weight, bias=dense.bias, eps=eps)[0]
            torch.testing.assert_close(got, expected)
        elif kind == "layer":
            normed = (sample - sample.mean()) / (sample.var(unbiased=False) + eps).sqrt()
            expected = normed * dense.weight[:, visible[b]] + dense.bias[:, visible[b]]
            torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("kind,dims", NORM_CASES, ids=[f"{k}_{d}d" for k, d in NORM_CASES])
def test_sparse_norm_without_a_mask_is_the_dense_norm_with_the_same_state(kind, dims):
    dense, sparse, _, features = norm_case(kind, dims)
    assert sparse.state_dict().keys() == dense.state_dict().keys()
    torch.testing.assert_close(sparse(features), dense(features))
    for name, buffer in dense.named_buffers():
        torch.testing.assert_close(sparse.get_buffer(name), buffer)


@pytest.mark.parametrize("kind", ["batch", "instance"])
def test_sparse_norms_build_where_pytorch_norms_take_no_bias_argument(kind, monkeypatch):
    # PyTorch 2.11 (seen on a GPU machine) has no ``bias`` argument on BatchNorm / InstanceNorm: a norm with a bias
    # must convert there, keeping the dense parameters.
    dense, _, _, features = norm_case(kind, 2)
    base = {"batch": nn.modules.batchnorm._BatchNorm, "instance": nn.modules.instancenorm._InstanceNorm}[kind]
    original = base.__init__

    def without_bias_argument(self, *args, **kwargs):
        if "bias" in kwargs:
            raise TypeError("__init__() got an unexpected keyword argument 'bias'")
        original(self, *args, **kwargs)

    monkeypatch.setattr(base, "__init__", without_bias_argument)
    sparse_class = {"batch": SparseBatchNorm, "instance": SparseInstanceNorm}[kind]
    sparse = sparse_class.from_dense(dense, SparseMask())
    assert sparse.bias is dense.bias and sparse.weight is dense.weight
    torch.testing.assert_close(sparse(features), dense(features))


def stage_outputs_of_plain_forward(network, stages, images):
    """Reference features: hooks on the last module of every stage during the network's own forward()."""
    captured = []
    hook = lambda module, args, out: captured.append(out.clone())  # noqa: E731
    handles = [network.get_submodule(stage[-1]).register_forward_hook(hook) for stage in stages]
    output = network(images)
    for handle in handles:
        handle.remove()
    return captured, output


@pytest.mark.parametrize("name", NETWORKS, ids=list(NETWORKS))
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_full_mask_reproduces_the_plain_network(name, training):
    build, size = NETWORKS[name]
    torch.manual_seed(0)
    plain = build().train(training)
    encoder = SparseEncoder(plain, size)
    assert encoder.network.state_dict().keys() == plain.state_dict().keys()
    images = torch.randn(2, 1, *size)
    full = torch.ones(2, 1, *encoder.mask_grid(size), dtype=torch.bool)
    torch.manual_seed(1)  # the same dropout draws in both passes
    expected, plain_output = stage_outputs_of_plain_forward(plain, encoder.stages, images)
    torch.manual_seed(1)
    for got, reference in zip(encoder(images, full), expected, strict=True):
        torch.testing.assert_close(got, reference, atol=1e-5, rtol=1e-4)
    if isinstance(plain, ResNet):  # the whole converted classifier, run under the full mask
        with encoder.sparse_mask.masked(full):
            torch.testing.assert_close(encoder.network(images), plain_output, atol=1e-5, rtol=1e-4)


def test_conversion_in_place_keeps_parameters_and_copies_read_their_own_mask():
    plain = tiny_resnet(2, conv1_t_stride=2)
    weights = {name: parameter for name, parameter in plain.named_parameters()}
    encoder = SparseEncoder(plain, (64, 64), inplace=True)
    assert encoder.network is plain and isinstance(plain.bn1, SparseBatchNorm)
    assert all(parameter is weights[name] for name, parameter in plain.named_parameters())
    assert plain.fc is not None and isinstance(plain.avgpool, nn.AdaptiveAvgPool2d)  # head untouched
    twin = copy.deepcopy(encoder)
    assert twin.sparse_mask is not encoder.sparse_mask
    active = random_active(1, (2, 2))
    last = twin(torch.randn(1, 1, 64, 64), active)[-1]
    assert torch.count_nonzero(last[~active.expand_as(last)]) == 0
    with pytest.raises(ConfigError, match="sparse already"):
        SparseEncoder(plain, (64, 64))


def test_a_layer_that_cannot_be_sparsified_is_named():
    network = tiny_resnet(2, norm=("group", {"num_groups": 2}))
    with pytest.raises(ConfigError, match=r"'bn1' \(GroupNorm\)"):
        SparseEncoder(network, (64, 64))
    tracked = UNet(2, 1, 2, channels=(4, 8), strides=(2,), norm=("instance", {"track_running_stats": True}))
    with pytest.raises(ConfigError, match=r"'model\.0\.adn\.N' \(InstanceNorm2d\)"):
        SparseEncoder(tracked, (16, 16))


def test_inputs_the_mask_grid_does_not_fit_are_rejected():
    encoder = SparseEncoder(tiny_resnet(2, conv1_t_stride=2), (64, 64))
    assert encoder.downsample == (32, 32) and encoder.mask_grid((96, 64)) == (3, 2)
    with pytest.raises(DataError, match=r"\(16, 64\) is smaller than one mask patch \(32, 32\)"):
        encoder(torch.zeros(1, 1, 16, 64), torch.ones(1, 1, 0, 2, dtype=torch.bool))
    with pytest.raises(DataError, match="not a multiple of the mask patch"):
        encoder.mask_grid((48, 64))
    with pytest.raises(DataError, match=r"active must be a \[1, 1, 2, 2\] bool mask"):
        encoder(torch.zeros(1, 1, 64, 64), torch.ones(1, 1, 2, 3, dtype=torch.bool))


def test_default_stages_and_their_errors():
    assert encoder_stages(tiny_resnet(2, no_max_pool=True))[0] == ["conv1", "bn1", "act", "layer1"]
    unet = UNet(2, 1, 2, channels=(4, 8, 8, 8), strides=(2, 2, 2))
    assert encoder_stages(unet) == [
        ["model.0"],
        ["model.1.submodule.0"],
        ["model.1.submodule.1.submodule.0"],
        ["model.1.submodule.1.submodule.1.submodule"],
    ]
    with pytest.raises(ConfigError, match="no default encoder stages for Sequential"):
        encoder_stages(nn.Sequential(nn.Conv2d(1, 2, 3)))
    with pytest.raises(ConfigError, match="no submodule 'nope'"):
        SparseEncoder(nn.Sequential(nn.Conv2d(1, 2, 3, stride=2)), (8, 8), stages=[["nope"]])
