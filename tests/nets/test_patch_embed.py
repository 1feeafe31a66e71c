"""Patch embeddings against torch convolutions with ``kernel = stride`` (the definition they implement)."""

import pytest
import torch
import torch.nn.functional as F

from medssl.nets.patch_embed import ConvStemPatchEmbed, PatchEmbed, ViewSpec, build_patch_embed, conv_stem_strides
from medssl.nets.tokens import patchify


def conv_weight(linear_weight, stride, in_channels):
    """A linear weight over ``(*stride, C)``-ordered inputs as a conv kernel ``[out, C, *stride]``."""
    out = linear_weight.shape[0]
    kernel = linear_weight.reshape(out, *stride, in_channels)
    return kernel.permute(0, kernel.ndim - 1, *range(1, kernel.ndim - 1))


def conv_tokens(features):
    """``[B, D, *grid]`` conv output as ``[B, N, D]`` tokens in row-major grid order."""
    return features.flatten(2).transpose(1, 2)


@pytest.mark.parametrize(
    "image_shape, patch", [((2, 3, 8, 12), (4, 4)), ((2, 2, 8, 8, 3), (4, 2, 1))], ids=["2d", "3d"]
)
def test_linear_patch_embed_equals_strided_conv(image_shape, patch):
    torch.manual_seed(0)
    images = torch.randn(image_shape)
    embed = PatchEmbed(patch, in_channels=image_shape[1], embed_dim=10)
    conv = F.conv2d if len(patch) == 2 else F.conv3d
    expected = conv(images, conv_weight(embed.proj.weight, patch, image_shape[1]), embed.proj.bias, stride=patch)
    torch.testing.assert_close(embed(patchify(images, patch)), conv_tokens(expected), atol=1e-5, rtol=1e-5)


def test_linear_patch_embed_in_four_dims_sums_frame_convs():
    """A 4-D ``kernel = stride`` conv is the sum of 3-D convs over the kernel's time offsets."""
    torch.manual_seed(0)
    images = torch.randn(2, 1, 4, 4, 2, 6)  # [B, C, H, W, S, T]
    patch = (2, 2, 1, 3)
    embed = PatchEmbed(patch, in_channels=1, embed_dim=5)
    kernel = conv_weight(embed.proj.weight, patch, 1)  # [out, C, 2, 2, 1, 3]

    def frame_conv(offset):
        frames = images[..., offset::3].movedim(-1, 1).flatten(0, 1)  # every 3rd frame, frames folded into batch
        out = F.conv3d(frames, kernel[..., offset], stride=patch[:3])
        return out.unflatten(0, (2, -1)).movedim(1, -1)  # [B, out, 2, 2, 2, T / 3]

    expected = sum(frame_conv(offset) for offset in range(3)) + embed.proj.bias.view(1, -1, 1, 1, 1, 1)
    torch.testing.assert_close(embed(patchify(images, patch)), conv_tokens(expected), atol=1e-5, rtol=1e-5)


def test_conv_stem_strides():
    assert conv_stem_strides((16, 16, 1)) == [(4, 4, 1), (2, 2, 1), (2, 2, 1)]
    assert conv_stem_strides((8, 8, 2)) == [(2, 2, 1), (2, 2, 1), (2, 2, 2)]
    assert conv_stem_strides((16, 16)) == [(4, 4), (2, 2), (2, 2)]
    assert conv_stem_strides((3, 5), num_stages=2) == [(3, 5), (1, 1)]
    with pytest.raises(ValueError, match="need num_stages >= 1"):
        conv_stem_strides((4, 4), num_stages=0)


def test_conv_stem_equals_strided_conv_layers():
    """CineMA's stem on a 16x16x1 patch: stride-4 conv, then two stride-2 convs, LayerNorm + GELU in between."""
    torch.manual_seed(0)
    images = torch.randn(2, 1, 32, 16, 3)
    stem = ConvStemPatchEmbed((16, 16, 1), in_channels=1, embed_dim=12, channels=(4, 8))
    x = images
    for index, (stride, stage) in enumerate(zip(stem.strides, stem.stages)):
        x = F.conv3d(x, conv_weight(stage.weight, stride, x.shape[1]), stage.bias, stride=stride)
        if index < len(stem.norms):
            x = F.gelu(stem.norms[index](x.movedim(1, -1))).movedim(-1, 1)
    assert x.shape == (2, 12, 2, 1, 3)
    torch.testing.assert_close(stem(patchify(images, (16, 16, 1))), conv_tokens(x), atol=1e-5, rtol=1e-5)


def test_conv_stem_token_sees_only_its_patch():
    torch.manual_seed(0)
    stem = ConvStemPatchEmbed((8, 8, 2), in_channels=2, embed_dim=6)
    images = torch.randn(1, 2, 16, 8, 4)
    before = stem(patchify(images, (8, 8, 2)))
    images[:, :, 8:, :, 2:] += 1.0  # the last patch of the (2, 1, 2) grid only
    after = stem(patchify(images, (8, 8, 2)))
    changed = (after - before).abs().amax(dim=-1)[0] > 0
    assert changed.tolist() == [False, False, False, True]


def test_embeddings_validate():
    with pytest.raises(ValueError, match=r"patches must be \[B, K, 16\] \(patchify output\), got shape \(2, 3, 8\)"):
        PatchEmbed((4, 4), 1, 8)(torch.zeros(2, 3, 8))
    with pytest.raises(ValueError, match=r"strides \[\(2, 2\)\] must be 2 stages"):
        ConvStemPatchEmbed((4, 4), 1, 8, channels=(4,), strides=[(2, 2)])
    with pytest.raises(ValueError, match="unknown patch embedding 'pixel'"):
        build_patch_embed("pixel", (4, 4), 1, 8)
    assert isinstance(build_patch_embed("conv_stem", (4, 4), 1, 8), ConvStemPatchEmbed)


def test_view_spec():
    spec = ViewSpec.of({"image_size": [64, 64, 8], "patch_size": [8, 8, 1], "in_channels": 2})
    assert (spec.grid, spec.num_tokens, spec.patch_dim) == ((8, 8, 8), 512, 128)
    assert ViewSpec.of(spec) is spec
    with pytest.raises(ValueError, match=r"missing \['patch_size'\], unknown \['size'\]"):
        ViewSpec.of({"image_size": [8, 8], "size": 3})
    with pytest.raises(ValueError, match="not divisible"):
        ViewSpec((10, 8), (4, 4))
    with pytest.raises(ValueError, match="in_channels must be at least 1"):
        ViewSpec((8, 8), (4, 4), in_channels=0)
