"""The UNETR-style decoder against MONAI's own UNETR (same blocks, weights copied across), and its geometry rules."""

import re

import pytest
import torch
from monai.networks.nets import UNETR

from medssl.nets.unetr import UNETRDecoder, decoder_levels, hidden_state_layers


@pytest.mark.parametrize(
    ("patch", "levels"), [((16, 16, 16), 4), ((16, 16, 1), 4), ((8, 8, 1), 3), ((8, 8), 3), ((2, 2), 1)]
)
def test_decoder_levels_is_log2_of_the_patch(patch, levels):
    assert decoder_levels(patch) == levels


@pytest.mark.parametrize("patch", [(16, 16, 2), (12, 12), (1, 1), (8, 4)])
def test_decoder_levels_rejects_mixed_or_non_power_of_two_patches(patch):
    with pytest.raises(ValueError, match=r"patch side to be 1 or the same power of two.*" + re.escape(str(patch))):
        decoder_levels(patch)


def test_hidden_state_layers_spread_like_unetr():
    assert hidden_state_layers(12, 4) == [2, 5, 8]  # the paper's z3, z6, z9 (1-based)
    assert hidden_state_layers(4, 3) == [0, 1]
    assert hidden_state_layers(1, 3) == [0, 0]
    with pytest.raises(ValueError, match="depth and levels must be >= 1"):
        hidden_state_layers(0, 3)


# MONAI UNETR module -> ours: the same blocks in the same roles.
MONAI_TO_OURS = {
    "encoder1.": "image_skip.", "encoder2.": "token_skips.0.", "encoder3.": "token_skips.1.",
    "encoder4.": "token_skips.2.", "decoder5.": "ups.0.", "decoder4.": "ups.1.", "decoder3.": "ups.2.",
    "decoder2.": "ups.3.", "out.": "head.",
}


def test_decoder_equals_monai_unetr_given_its_vit_features():
    torch.manual_seed(0)
    reference = UNETR(
        in_channels=1, out_channels=3, img_size=(32, 32, 32), feature_size=4, hidden_size=24, mlp_dim=48,
        num_heads=2, norm_name="instance", res_block=True,
    ).eval()
    ours = UNETRDecoder(3, (32, 32, 32), (16, 16, 16), in_channels=1, embed_dim=24, out_channels=3, feature_size=4)
    state = {}
    for key, value in reference.state_dict().items():
        prefix = next((p for p in MONAI_TO_OURS if key.startswith(p)), None)
        if prefix is not None:
            state[MONAI_TO_OURS[prefix] + key[len(prefix):]] = value
    ours.load_state_dict(state, strict=True)  # every decoder weight has its MONAI counterpart
    image = torch.randn(2, 1, 32, 32, 32)
    with torch.no_grad():
        tokens, hidden = reference.vit(image)  # MONAI's UNETR reads hidden_states_out[3], [6], [9]
        expected = reference(image)
        got = ours.eval()(image, tokens, [hidden[3], hidden[6], hidden[9]])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    ("image_size", "patch"), [((32, 32, 4), (8, 8, 1)), ((32, 32), (8, 8)), ((32, 32, 32), (16, 16, 16))]
)
def test_output_has_the_image_size_and_gradients_reach_every_input(image_size, patch):
    decoder = UNETRDecoder(len(image_size), image_size, patch, in_channels=1, embed_dim=12, out_channels=4,
                           feature_size=2)
    grid = [s // p for s, p in zip(image_size, patch)]
    count = torch.tensor(grid).prod().item()
    image = torch.randn(2, 1, *image_size, requires_grad=True)
    tokens = torch.randn(2, count, 12, requires_grad=True)
    hidden = [torch.randn(2, count, 12, requires_grad=True) for _ in range(decoder.levels - 1)]
    out = decoder(image, tokens, hidden)
    assert out.shape == (2, 4, *image_size)
    out.square().mean().backward()
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in (image, tokens, *hidden))


def test_tokens_are_read_in_grid_order():
    """Perturbing one token changes the output around its own patch first (the receptive field grows from there)."""
    torch.manual_seed(0)
    # Batch norm in eval mode (running statistics) keeps the decoder local; instance norm would mix everything.
    decoder = UNETRDecoder(2, (32, 32), (8, 8), 1, 8, 2, feature_size=2, norm_name="batch").eval()
    image, tokens = torch.zeros(1, 1, 32, 32), torch.randn(1, 16, 8)
    hidden = [torch.zeros(1, 16, 8)] * 2
    with torch.no_grad():
        base = decoder(image, tokens, hidden)
        moved = tokens.clone()
        moved[0, 1 * 4 + 2] += 10.0  # grid row 1, column 2 -> pixels [8:16, 16:24]
        change = (decoder(image, moved, hidden) - base).abs().sum(1)[0]
    assert change[8:16, 16:24].mean() > 5 * change[24:, :8].mean()


def test_wrong_token_shapes_are_reported():
    decoder = UNETRDecoder(2, (32, 32), (8, 8), in_channels=1, embed_dim=8, out_channels=2)
    with pytest.raises(ValueError, match=r"expected tokens and 2 hidden states, each \[B, 16, 8\].*\(1, 15, 8\)"):
        decoder(torch.zeros(1, 1, 32, 32), torch.zeros(1, 15, 8), [torch.zeros(1, 16, 8)] * 2)
    with pytest.raises(ValueError, match="got 1 hidden states"):
        decoder(torch.zeros(1, 1, 32, 32), torch.zeros(1, 16, 8), [torch.zeros(1, 16, 8)])


def test_invalid_configuration():
    with pytest.raises(ValueError, match="spatial_dims must be 2 or 3"):
        UNETRDecoder(3, (32, 32), (8, 8), 1, 8, 2)
    with pytest.raises(ValueError, match="not divisible"):
        UNETRDecoder(2, (30, 32), (8, 8), 1, 8, 2)
    with pytest.raises(ValueError, match="feature_size, out_channels and in_channels must be >= 1"):
        UNETRDecoder(2, (32, 32), (8, 8), 1, 8, 2, feature_size=0)
