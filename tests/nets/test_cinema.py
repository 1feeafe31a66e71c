"""CineMA's building blocks and networks against direct formulas and their documented structure (exactness against
CineMA's own outputs is tested in tests/interop/test_cinema_import.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from medssl.nets.cinema import (
    ChannelLayerNorm,
    CineMAEncoder,
    CineMAViewEncoder,
    ClassTokenViT,
    ConvResBlock,
    ConvUNetR,
    ConvViT,
    DepthwiseConvBlock,
)
from medssl.nets.pos_embed import sincos_pos_embed

TINY = {"patch_size": [4, 4, 1], "scale_factor": [2, 2, 1], "conv_channels": [8, 16], "num_blocks": 1,
        "embed_dim": 16, "depth": 1, "num_heads": 2}


def test_channel_layer_norm_is_the_per_voxel_formula():
    torch.manual_seed(0)
    norm = ChannelLayerNorm(5)
    torch.nn.init.normal_(norm.weight), torch.nn.init.normal_(norm.bias)
    x = torch.randn(2, 5, 3, 4, 2)
    mean, var = x.mean(1, keepdim=True), x.var(1, unbiased=False, keepdim=True)
    expected = (x - mean) / torch.sqrt(var + 1e-6) * norm.weight.view(1, 5, 1, 1, 1) + norm.bias.view(1, 5, 1, 1, 1)
    torch.testing.assert_close(norm(x), expected, rtol=1e-5, atol=1e-5)


def test_depthwise_block_is_two_residual_branches():
    torch.manual_seed(0)
    block = DepthwiseConvBlock(2, 4)
    x = torch.randn(1, 4, 9, 9)
    depthwise = F.conv2d(block.conv1(block.norm1(x)), block.dw_conv.weight, block.dw_conv.bias, padding=2, groups=4)
    h = x + block.conv2(depthwise)
    expected = h + block.mlp["fc2"](F.gelu(block.mlp["fc1"](block.norm2(h))))
    torch.testing.assert_close(block(x), expected)
    assert block.dw_conv.weight.shape == (4, 1, 5, 5)


def test_single_channel_res_block_sees_the_image_through_its_shortcut_only():
    torch.manual_seed(0)
    block = ConvResBlock(3, 1, 4).eval()
    a, b = torch.randn(1, 1, 6, 6, 6), torch.randn(1, 1, 6, 6, 6)
    # norm1 over one channel outputs its bias everywhere: away from the zero-padded border the residual branch is
    # the same for any image.
    residual = (block(a) - block.shortcut(a)) - (block(b) - block.shortcut(b))
    assert residual[..., 2:-2, 2:-2, 2:-2].abs().max() < 1e-5


def test_view_encoder_geometry_and_positions():
    encoder = CineMAViewEncoder((64, 32, 6), 2, (4, 4, 1), (2, 2, 1), (8, 16), 1, 16)
    assert encoder.effective_patch == (16, 16, 1) and encoder.spec.grid == (4, 2, 6)
    torch.testing.assert_close(encoder.pos_embed[0], sincos_pos_embed((4, 2, 6), 16))
    tokens, skips = encoder(torch.rand(1, 2, 64, 32, 6))
    assert tokens.shape == (1, 48, 16)
    assert [s.shape for s in skips] == [(1, 8, 16, 8, 6), (1, 16, 8, 4, 6)]
    with pytest.raises(ValueError, match="same number of axes"):
        CineMAViewEncoder((64, 32), 1, (4, 4, 1), (2, 2, 1), (8, 16), 1, 16)


def test_class_token_vit_hides_the_class_token_from_fine_tuning_code():
    vit = ClassTokenViT(16, 2, 2).eval()
    tokens = torch.randn(2, 5, 16)
    full = vit.forward_with_class_token(tokens)
    out, hidden = vit.forward_features(tokens, [0])
    assert full.shape == (2, 6, 16) and hidden[0].shape == (2, 5, 16)
    torch.testing.assert_close(out, full[:, 1:])


def test_encoder_concatenates_views_and_refuses_masks_and_wrong_shapes():
    encoder = CineMAEncoder({"sax": {"image_size": [32, 32, 2]}, "lax_4c": {"image_size": [32, 32]}}, **TINY).eval()
    images = {"sax": torch.rand(1, 1, 32, 32, 2), "lax_4c": torch.rand(1, 1, 32, 32)}
    features = encoder(images)
    shapes = {k: tuple(v.shape) for k, v in features.items()}
    assert shapes == {"cls": (1, 1, 16), "sax": (1, 8, 16), "lax_4c": (1, 4, 16)}
    tokens, counts = encoder.embed(images)
    assert tokens.shape == (1, 12, 16) and counts == {"sax": 8, "lax_4c": 4}
    with pytest.raises(ValueError, match="token masks are not supported"):
        encoder.embed(images, masks={"sax": object()})
    with pytest.raises(ValueError, match=r"view .sax.: expected images \[B, 1, 32, 32, 2\] \(3 spatial axes\), "
                                         r"got shape \(1, 1, 32, 32\)"):
        encoder({"sax": torch.rand(1, 1, 32, 32)})
    with pytest.raises(ValueError, match="unknown view .lax_2c.; this model has views"):
        encoder({"lax_2c": torch.rand(1, 1, 32, 32)})


def test_convvit_reductions_average_the_heads():
    torch.manual_seed(0)
    network = ConvViT({"sax": {"image_size": [32, 32, 2], "in_channels": 2}}, 3, TINY).eval()
    image = torch.rand(2, 2, 32, 32, 2)
    cls, patch = network(image, reduce="cls"), network(image, reduce="patch")
    torch.testing.assert_close(network(image), (cls + patch) / 2)
    features = network.encoder({"sax": image})
    torch.testing.assert_close(patch, network.heads["sax"](features["sax"].mean(1)))
    with pytest.raises(ValueError, match="reduce must be one of"):
        network(image, reduce="max")


def test_convunetr_gives_logits_at_image_resolution():
    network = ConvUNetR({"lax_4c": {"image_size": [64, 32]}}, 3, TINY, [4, 4, 8, 8, 8], [2, 2, 1], [2, 2, 1]).eval()
    assert network(torch.rand(1, 1, 64, 32)).shape == (1, 3, 64, 32)
    with pytest.raises(ValueError, match="need at least 5 levels"):
        ConvUNetR({"lax_4c": {"image_size": [64, 32]}}, 3, TINY, [4, 4, 8], [2, 2, 1], [2, 2, 1])
