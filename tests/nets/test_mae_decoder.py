"""MAE decoder: mask tokens land where ``ids_restore`` says, with each view's positions, and heads shape per view."""

import pytest
import torch

from medssl.masking import MaskOutput, RandomMasking
from medssl.nets.mae_decoder import MAEDecoder

VIEWS = {
    "stack": {"image_size": (8, 8, 2), "patch_size": (4, 4, 1)},  # 8 tokens, 16 values each
    "plane": {"image_size": (8, 12), "patch_size": (4, 4), "in_channels": 2},  # 6 tokens, 32 values each
}


def decoder_input(decoder, latents, masks):
    """Run the decoder and capture what its transformer receives."""
    captured = []
    handle = decoder.transformer.register_forward_hook(lambda module, args, out: captured.append(args[0]))
    preds = decoder(latents, masks)
    handle.remove()
    return preds, captured[0]


def test_identity_ids_put_latents_first_and_mask_tokens_after():
    torch.manual_seed(0)
    decoder = MAEDecoder(
        {"stack": VIEWS["stack"]}, encoder_dim=12, decoder_dim=8, depth=1, num_heads=2, view_embedding=False
    )
    keep, total = 3, 8
    identity = MaskOutput(
        ids_keep=torch.arange(keep).expand(2, keep),
        ids_restore=torch.arange(total).expand(2, total),
        mask=(torch.arange(total) >= keep).expand(2, total),
    )
    latent = torch.randn(2, keep, 12)
    preds, x = decoder_input(decoder, {"stack": latent}, {"stack": identity})
    positions = decoder.positions("stack")
    torch.testing.assert_close(x[:, :keep], decoder.embed(latent) + positions[:keep])
    torch.testing.assert_close(x[:, keep:], (decoder.mask_token + positions[keep:]).expand(2, -1, -1))
    assert preds["stack"].shape == (2, 8, 16)


def test_random_mask_restores_grid_order_per_view():
    torch.manual_seed(0)
    decoder = MAEDecoder(VIEWS, encoder_dim=12, decoder_dim=8, depth=1, num_heads=2)
    masking = RandomMasking(0.5)
    generator = torch.Generator().manual_seed(3)
    masks = {name: masking(2, grid, generator=generator) for name, grid in (("stack", (2, 2, 2)), ("plane", (2, 3)))}
    latents = {name: torch.randn(2, mask.ids_keep.shape[1], 12) for name, mask in masks.items()}
    preds, x = decoder_input(decoder, latents, masks)
    assert x.shape == (2, 8 + 6, 8)
    offset = 0
    for name, mask in masks.items():
        n = mask.mask.shape[1]
        tokens = x[:, offset : offset + n]
        expected = decoder.mask_token.expand(2, n, -1).clone()
        for b in range(2):
            expected[b, mask.ids_keep[b]] = decoder.embed(latents[name][b])
        expected = expected + decoder.positions(name) + decoder.view_embed[name]
        torch.testing.assert_close(tokens, expected)
        offset += n
    assert {name: tuple(p.shape) for name, p in preds.items()} == {"stack": (2, 8, 16), "plane": (2, 6, 32)}


def test_decoder_validates():
    decoder = MAEDecoder(VIEWS, encoder_dim=12, decoder_dim=8, depth=1, num_heads=2)
    mask = RandomMasking(0.5)(2, (2, 2, 2))
    with pytest.raises(ValueError, match=r"view 'stack' needs a known view .* and a mask \(\[\]\)"):
        decoder({"stack": torch.randn(2, 4, 12)}, {})
    expected = r"view 'stack': latents must be \[B, K, D\] with K = 4 visible tokens, got shape \(2, 5, 12\)"
    with pytest.raises(ValueError, match=expected):
        decoder({"stack": torch.randn(2, 5, 12)}, {"stack": mask})
    with pytest.raises(ValueError, match=r"view 'plane': mask does not fit batch 2 and 6 tokens"):
        decoder({"plane": torch.randn(2, 4, 12)}, {"plane": mask})
