"""MaskedAutoencoder: shapes in 2D/3D/2D+t/3D+t, the loss, token dropping, MONAI parity, figures and weights."""

import math

import pytest
import torch
from monai.networks.nets import MaskedAutoEncoderViT

from medssl.methods.mae import ENCODER_PREFIX, MaskedAutoencoder
from medssl.nets.tokens import grid_size, patchify
from medssl.nets.vit import MultiViewEncoder
from medssl.objectives import masked_reconstruction_loss

TINY = {"embed_dim": 24, "depth": 1, "num_heads": 2, "decoder_dim": 16, "decoder_depth": 1, "decoder_num_heads": 2}

CASES = {
    "2d": ((16, 12), (4, 4), 1),
    "3d": ((8, 8, 4), (4, 4, 1), 1),
    "2d+t": ((8, 8, 6), (4, 4, 2), 1),
    "3d+t": ((8, 8, 2, 4), (4, 4, 1, 2), 2),
}


def seeded(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_shapes_loss_and_visible_tokens(case):
    image_size, patch_size, channels = CASES[case]
    torch.manual_seed(0)
    model = MaskedAutoencoder(image_size, patch_size, in_channels=channels, **TINY)
    seen = []
    model.encoder.vit.register_forward_hook(lambda module, args, out: seen.append(args[0].shape))
    image = torch.rand(2, channels, *image_size)
    out = model({"image": image, "label": "ignored"}, generator=seeded(0))
    n = math.prod(grid_size(image_size, patch_size))
    p = math.prod(patch_size) * channels
    keep = int(n * 0.25)
    assert seen == [torch.Size([2, keep, 24])]
    assert out["pred"]["image"].shape == (2, n, p)
    assert out["mask"]["image"].shape == (2, n) and out["mask"]["image"].dtype == torch.bool
    assert out["mask"]["image"].sum(1).tolist() == [n - keep] * 2
    expected = masked_reconstruction_loss(out["pred"]["image"], patchify(image, patch_size), out["mask"]["image"])
    torch.testing.assert_close(out["loss"], expected)
    torch.testing.assert_close(out["loss_image"], expected)


def test_norm_pix_loss_and_figures():
    torch.manual_seed(0)
    model = MaskedAutoencoder((8, 8), (4, 4), norm_pix_loss=True, **TINY)
    image = torch.rand(3, 1, 8, 8)
    out = model({"image": image}, generator=seeded(1))
    target = patchify(image, (4, 4))
    mask = out["mask"]["image"]
    expected = masked_reconstruction_loss(out["pred"]["image"], target, mask, norm_pix=True)
    torch.testing.assert_close(out["loss"], expected)
    # A perfect normalised prediction must map back to the input exactly.
    mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
    perfect = dict(out, pred={"image": (target - mean) / (var + 1e-6).sqrt()})
    figures = model.reconstruction_images({"image": image}, perfect)["image"]
    torch.testing.assert_close(figures["reconstruction"], image)
    torch.testing.assert_close(figures["input"], image)
    hidden = patchify(figures["masked"], (4, 4))
    assert torch.equal(hidden[mask], torch.zeros_like(hidden[mask]))
    assert torch.equal(hidden[~mask], target[~mask])


def test_figures_combine_visible_input_and_predicted_hidden_patches():
    torch.manual_seed(0)
    model = MaskedAutoencoder((8, 8, 2), (4, 4, 1), **TINY)
    image = torch.rand(2, 1, 8, 8, 2)
    out = model({"image": image}, generator=seeded(2))
    recon = patchify(model.reconstruction_images({"image": image}, out)["image"]["reconstruction"], (4, 4, 1))
    mask = out["mask"]["image"]
    assert torch.equal(recon[~mask], patchify(image, (4, 4, 1))[~mask])
    assert torch.equal(recon[mask], out["pred"]["image"].detach()[mask])


def test_agrees_with_monai_mae():
    """Same configuration as MONAI's MaskedAutoEncoderViT: same prediction shape, masked-token count and mask
    meaning (MONAI returns 1 for the tokens left out of its encoder, i.e. True = hidden, as medssl)."""
    config = dict(image_size=(32, 32, 16), patch_size=(8, 8, 4), mask_ratio=0.6)
    torch.manual_seed(0)
    ours = MaskedAutoencoder(
        config["image_size"], config["patch_size"], mask_ratio=config["mask_ratio"], **dict(TINY, decoder_dim=18)
    )
    monai = MaskedAutoEncoderViT(
        in_channels=1,
        img_size=config["image_size"],
        patch_size=config["patch_size"],
        hidden_size=24,
        mlp_dim=96,
        num_layers=1,
        num_heads=2,
        masking_ratio=config["mask_ratio"],
        decoder_hidden_size=18,
        decoder_mlp_dim=72,
        decoder_num_layers=1,
        decoder_num_heads=2,
        spatial_dims=3,
    )
    kept = []
    masking = monai._masking
    monai._masking = lambda x, masking_ratio=None: kept.append(masking(x, masking_ratio)) or kept[-1]
    image = torch.rand(2, 1, *config["image_size"])
    monai_pred, monai_mask = monai(image)
    out = ours({"image": image}, generator=seeded(0))
    assert out["pred"]["image"].shape == monai_pred.shape == (2, 64, 256)
    assert out["mask"]["image"].sum(1).tolist() == monai_mask.sum(1).tolist() == [64 - int(64 * 0.4)] * 2
    _, monai_visible, _ = kept[0]
    assert not monai_mask.gather(1, monai_visible).any()  # MONAI: 0 on the tokens its encoder saw
    seen = []
    ours.encoder.vit.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[1]))
    out = ours({"image": image}, generator=seeded(0))
    assert seen == [monai_visible.shape[1]] == [int(64 * 0.4)]


def test_masks_follow_the_generator():
    model = MaskedAutoencoder((16, 16), (4, 4), **TINY)
    image = torch.rand(2, 1, 16, 16)
    first, again, other = (model({"image": image}, generator=seeded(s))["mask"]["image"] for s in (5, 5, 6))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_gradient_steps_reduce_the_loss():
    torch.manual_seed(0)
    model = MaskedAutoencoder((16, 16), (4, 4), **TINY)
    image = torch.linspace(0, 1, 256).view(1, 1, 16, 16).expand(4, 1, 16, 16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model({"image": image}, generator=seeded(0))["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_bf16_autocast_and_conv_stem():
    torch.manual_seed(0)
    model = MaskedAutoencoder((16, 16, 2), (8, 8, 1), patch_embed="conv_stem", **TINY)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model({"image": torch.rand(2, 1, 16, 16, 2)}, generator=seeded(0))
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    out["loss"].backward()
    assert model.encoder.patch_embed["image"].stages[0].weight.grad.abs().sum() > 0


def test_encoder_weights_load_strictly():
    model = MaskedAutoencoder((8, 8), (4, 4), **TINY)
    encoder_keys = {k[len(ENCODER_PREFIX) :] for k in model.state_dict() if k.startswith(ENCODER_PREFIX)}
    state = model.encoder_state_dict()
    assert set(state) == encoder_keys
    assert not any(key.startswith("view_embed") for key in state)
    views = {"image": {"image_size": (8, 8), "patch_size": (4, 4)}}
    fresh = MultiViewEncoder(views, embed_dim=24, depth=1, num_heads=2, view_embedding=False)
    fresh.load_state_dict(state, strict=True)


def test_validation_errors():
    model = MaskedAutoencoder((8, 8), (4, 4), **TINY)
    expected = r"view 'image': expected images \[B, 1, 8, 8\] \(2 spatial axes\), got shape \(2, 1, 8, 8, 1\)"
    with pytest.raises(ValueError, match=expected):
        model({"image": torch.zeros(2, 1, 8, 8, 1)})
    with pytest.raises(ValueError, match=r"view 'image': expected images \[B, 1, 8, 8\].*got shape \(2, 1, 12, 8\)"):
        model({"image": torch.zeros(2, 1, 12, 8)})
    with pytest.raises(ValueError, match=r"the batch has none of the views \['image'\]; its keys are \['img'\]"):
        model({"img": torch.zeros(2, 1, 8, 8)})
    with pytest.raises(ValueError, match=r"view 'image': .*image size 10 is not divisible by patch size 4"):
        MaskedAutoencoder((10, 8), (4, 4), **TINY)
    with pytest.raises(ValueError, match="leaves no visible token"):
        MaskedAutoencoder((8, 8), (4, 4), mask_ratio=0.9, **TINY)
