"""SparK on MONAI CNNs: decoder path, loss, mask tokens, training on the engine, weights back into the plain network."""

import pytest
import torch
from monai.networks.nets import DynUNet, ResNet, UNet

from medssl.engine.trainer import SSLTrainer
from medssl.errors import ConfigError, DataError
from medssl.methods.spark import SPARK_ENCODER_PREFIX, SparK, decoder_path
from medssl.nets.sparse import run_stages
from medssl.nets.tokens import patchify


def tiny_resnet(dims=2, **kwargs):
    return ResNet(
        "basic", [1, 1, 1, 1], [4, 4, 8, 8], spatial_dims=dims, n_input_channels=1, num_classes=3, conv1_t_stride=2,
        **kwargs,
    )


CASES = {
    "resnet_2d": (tiny_resnet, (64, 64), {"decoder_width": 32}),
    "dynunet_3d": (
        lambda: DynUNet(3, 1, 2, [3, 3, 3], [1, 2, (2, 2, 1)], [2, (2, 2, 1)], filters=[4, 8, 8]),
        (16, 16, 8),
        {"densify_norm": "instance", "decoder_norm": "instance"},
    ),
    "unet_2d": (lambda: UNet(2, 1, 2, channels=(4, 8, 8), strides=(2, 2), num_res_units=1), (16, 16), {}),
}


def build(case, **kwargs):
    network, size, options = CASES[case]
    torch.manual_seed(0)
    return SparK(network(), size, **{"decoder_width": 16, **options, **kwargs}), size


def test_decoder_path_visits_every_stage_stride():
    assert decoder_path([(4, 4), (8, 8), (16, 16), (32, 32)]) == [(32, 32), (16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    assert decoder_path([(1, 1, 1), (2, 2, 2), (4, 4, 2)]) == [(4, 4, 2), (2, 2, 2), (1, 1, 1)]
    assert decoder_path([(12,)]) == [(12,), (6,), (3,), (1,)]
    with pytest.raises(ConfigError, match="do not divide each other"):
        decoder_path([(4,), (6,)])


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_loss_is_the_norm_pix_error_on_hidden_patches(case):
    model, size = build(case)
    images = torch.rand(2, 1, *size)
    out = model({"image": images, "label": "ignored"}, generator=torch.Generator().manual_seed(0))
    cells = torch.Size(model.encoder.mask_grid(size)).numel()
    patch = model.encoder.downsample
    assert out["mask"].shape == (2, cells) and out["pred"].shape == (2, cells, torch.Size(patch).numel())
    assert out["mask"].sum(1).tolist() == [cells - int(cells * 0.4)] * 2  # SparK's 60 % hidden
    target = patchify(images, patch)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    per_patch = ((out["pred"] - target) ** 2).mean(-1)
    torch.testing.assert_close(out["loss"], per_patch[out["mask"]].mean())


def test_reconstruction_images_of_a_perfect_prediction_are_the_input():
    model, size = build("resnet_2d")
    images = torch.rand(2, 1, *size)
    out = model({"image": images})
    target = patchify(images, model.encoder.downsample)
    perfect = {**out, "pred": (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()}
    figures = model.reconstruction_images({"image": images}, perfect)["image"]
    torch.testing.assert_close(figures["reconstruction"], images)
    masked = patchify(figures["masked"], model.encoder.downsample)
    assert torch.count_nonzero(masked[out["mask"]]) == 0
    torch.testing.assert_close(masked[~out["mask"]], target[~out["mask"]])


def test_hidden_cells_of_the_coarsest_scale_hold_the_projected_mask_token():
    model, size = build("resnet_2d")
    grid = model.encoder.mask_grid(size)
    active = torch.tensor([[True, False], [False, True]]).view(1, 1, *grid)
    images = torch.rand(1, 1, *size)
    dense = model.densify(model.encoder(images, active), active)
    coarsest = next(slot for slot, scale in enumerate(sorted(model.decoded_stages)) if scale == 0)
    projection = model.densify_projections[coarsest]
    expected = projection(model.mask_tokens[coarsest])[0, :, 0, 0]
    hidden_cells = dense[0][0].permute(1, 2, 0)[~active[0, 0]]
    torch.testing.assert_close(hidden_cells, expected.expand_as(hidden_cells))
    assert [d is not None for d in dense] == [True, True, True, True, False, False]


def test_loss_decreases_and_every_part_learns():
    model, size = build("resnet_2d")
    images = torch.rand(4, 1, *size, generator=torch.Generator().manual_seed(1))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        out = model({"image": images}, generator=torch.Generator().manual_seed(0))
        optimizer.zero_grad()
        out["loss"].backward()
        if not losses:
            assert all(token.grad.abs().sum() > 0 for token in model.mask_tokens)
            assert model.encoder.network.conv1.weight.grad.abs().sum() > 0
        optimizer.step()
        losses.append(float(out["loss"]))
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_pretrained_encoder_loads_strictly_into_the_plain_network_and_matches_it(case):
    model, size = build(case)
    batches = [{"image": torch.rand(2, 1, *size, generator=torch.Generator().manual_seed(i))} for i in range(3)]
    first_conv = next(model.encoder.network.parameters()).detach().clone()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    SSLTrainer(device="cpu", max_epochs=1, train_data_loader=batches, network=model, optimizer=optimizer).run()
    assert not torch.equal(next(model.encoder.network.parameters()), first_conv)  # it did train

    plain = CASES[case][0]()
    state = model.encoder_state_dict()
    prefixed = {key for key in model.state_dict() if key.startswith(SPARK_ENCODER_PREFIX)}
    assert state.keys() == {key[len(SPARK_ENCODER_PREFIX) :] for key in prefixed}
    plain.load_state_dict(state, strict=True)
    plain.eval(), model.eval()
    images = torch.rand(2, 1, *size)
    full = torch.ones(2, 1, *model.encoder.mask_grid(size), dtype=torch.bool)
    with torch.no_grad():
        # run_stages on a plain network is checked against the network's own forward() in tests/nets/test_sparse.py.
        expected = run_stages(plain, model.encoder.stages, images)
        for got, reference in zip(model.encoder(images, full), expected, strict=True):
            torch.testing.assert_close(got, reference, atol=1e-5, rtol=1e-4)
        if isinstance(plain, ResNet):
            with model.encoder.sparse_mask.masked(full):
                torch.testing.assert_close(model.encoder.network(images), plain(images), atol=1e-5, rtol=1e-4)


def test_bad_networks_and_inputs_get_clear_errors():
    with pytest.raises(ConfigError, match=r"'bn1' \(GroupNorm\)"):
        SparK(tiny_resnet(norm=("group", {"num_groups": 2})), (64, 64), decoder_width=16)
    with pytest.raises(ConfigError, match="densify_norm must be one of"):
        SparK(tiny_resnet(), (64, 64), densify_norm="group")
    with pytest.raises(ValueError, match="leaves no visible token"):
        SparK(tiny_resnet(), (32, 32), mask_ratio=0.6)  # a 1 x 1 grid
    model, _ = build("resnet_2d")
    with pytest.raises(DataError, match=r"\(16, 64\) is smaller than one mask patch \(32, 32\)"):
        model({"image": torch.rand(1, 1, 16, 64)})
    with pytest.raises(DataError, match="no 'image' image tensor; its keys are \\['sax'\\]"):
        model({"sax": torch.rand(1, 1, 64, 64)})
    with pytest.raises(DataError, match=r"must be \[B, C, 2 spatial axes\]"):
        model({"image": torch.rand(1, 1, 64, 64, 4)})
