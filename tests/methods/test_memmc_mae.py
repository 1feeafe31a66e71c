"""MemMC-MAE: memory-augmented attention, multi-level cross-attention decoder, loss and anomaly maps."""

import math

import pytest
import torch
import torch.nn.functional as F

from medssl.methods import METHODS, MaskedAutoencoder
from medssl.methods.memmc_mae import (
    CrossAttention,
    MemMCMAE,
    anomaly_maps,
    complementary_masks,
    image_scores,
)
from medssl.nets.tokens import patchify
from medssl.nets.vit import SelfAttention, TransformerBlock, ViTEncoder

TINY = {"embed_dim": 16, "depth": 3, "num_heads": 2, "decoder_dim": 8, "decoder_depth": 2, "decoder_num_heads": 2,
        "mlp_ratio": 2.0}


def tiny(levels=None, memory_slots=3, **kw):
    torch.manual_seed(0)
    return MemMCMAE((16, 16), (4, 4), memory_slots=memory_slots, levels=levels, **{**TINY, **kw})


def direct_attention(attention, x, memory=True):
    """softmax(q [k; M_k]^T / sqrt(d)) [v; M_v] per head, from the module's parameters."""
    batch, length, dim = x.shape
    heads, head_dim = attention.num_heads, dim // attention.num_heads
    q, k, v = (x @ attention.qkv.weight.T + attention.qkv.bias).split(dim, -1)
    if memory:
        k = torch.cat([k, attention.memory_keys.expand(batch, -1, -1)], 1)
        v = torch.cat([v, attention.memory_values.expand(batch, -1, -1)], 1)

    def split(t):
        return t.reshape(batch, -1, heads, head_dim).transpose(1, 2)

    weights = torch.softmax(split(q) @ split(k).transpose(-1, -2) / math.sqrt(head_dim), -1)
    out = (weights @ split(v)).transpose(1, 2).reshape(batch, length, dim)
    return out @ attention.proj.weight.T + attention.proj.bias


def test_memory_slots_join_keys_and_values_of_every_head(monkeypatch):
    torch.manual_seed(0)
    attention = SelfAttention(12, 3, memory_slots=5)
    x = torch.randn(2, 7, 12)
    shapes = []
    real = F.scaled_dot_product_attention

    def recording(q, k, v, **kw):
        shapes.append((tuple(q.shape), tuple(k.shape), tuple(v.shape)))
        return real(q, k, v, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    out = attention(x)
    assert shapes == [((2, 3, 7, 4), (2, 3, 12, 4), (2, 3, 12, 4))]  # N + M = 7 + 5 keys and values per head
    assert out.shape == (2, 7, 12)
    torch.testing.assert_close(out, direct_attention(attention, x), atol=1e-5, rtol=1e-5)
    assert attention.memory_keys.shape == attention.memory_values.shape == (5, 12)


def test_memory_zero_is_exactly_the_plain_attention_and_adds_no_parameter():
    torch.manual_seed(0)
    plain, zero = SelfAttention(12, 3), SelfAttention(12, 3, memory_slots=0)
    zero.load_state_dict(plain.state_dict())  # strict: the same parameters
    x = torch.randn(2, 7, 12)
    assert torch.equal(zero(x), plain(x))
    torch.testing.assert_close(plain(x), direct_attention(plain, x, memory=False), atol=1e-5, rtol=1e-5)
    assert set(TransformerBlock(12, 3).state_dict()) == set(TransformerBlock(12, 3, memory_slots=0).state_dict())
    extra = set(ViTEncoder(12, 2, 3, memory_slots=4).state_dict()) - set(ViTEncoder(12, 2, 3).state_dict())
    assert extra == {f"blocks.{i}.attn.memory_{kind}" for i in range(2) for kind in ("keys", "values")}
    with pytest.raises(ValueError, match="memory_slots must be >= 0, got -1"):
        SelfAttention(12, 3, memory_slots=-1)


def test_encoder_blocks_carry_memory_and_decoder_cross_attends_to_the_chosen_levels(monkeypatch):
    model = tiny(levels=(0, 2))
    assert all(block.attn.memory_slots == 3 for block in model.encoder.vit.blocks)
    images = {"image": torch.rand(2, 1, 16, 16)}
    masks = model.draw_masks(images, torch.Generator().manual_seed(0))
    seen = {}
    decoder_forward = type(model.decoder).forward

    def recording(self, latents, masks, levels):
        seen["levels"] = levels
        return decoder_forward(self, latents, masks, levels)

    monkeypatch.setattr(type(model.decoder), "forward", recording)
    pred = model.reconstruct(images, masks)["image"]
    assert pred.shape == (2, 16, 16)
    tokens, _ = model.encoder.embed(images, masks)
    _, expected = model.encoder.vit.forward_features(tokens, (0, 2))
    assert len(seen["levels"]) == 2
    for got, want in zip(seen["levels"], expected):
        torch.testing.assert_close(got, want)

    context = model.decoder.context(seen["levels"])
    direct = torch.cat([
        embed(norm(h)) + model.decoder.level_embed[i]
        for i, (h, norm, embed) in enumerate(zip(seen["levels"], model.decoder.level_norms, model.decoder.level_embeds))
    ], 1)
    torch.testing.assert_close(context, model.decoder.context_norm(direct))
    assert context.shape == (2, 2 * 4, 8)  # 2 levels x 4 visible tokens (mask 0.75 of 16)


def test_every_level_and_memory_slot_receives_gradient():
    model = tiny(levels=(0, 1, 2))
    model({"image": torch.rand(2, 1, 16, 16)}, generator=torch.Generator().manual_seed(0))["loss"].backward()
    names = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert names == []
    assert len(model.decoder.cross) == 2


def test_cross_attention_against_a_direct_formula():
    torch.manual_seed(0)
    cross = CrossAttention(8, 2)
    x, context = torch.randn(2, 5, 8), torch.randn(2, 3, 8)
    q = cross.q(cross.norm(x)).reshape(2, 5, 2, 4).transpose(1, 2)
    k, v = (t.reshape(2, 3, 2, 4).transpose(1, 2) for t in cross.kv(context).split(8, -1))
    out = (torch.softmax(q @ k.transpose(-1, -2) / 2.0, -1) @ v).transpose(1, 2).reshape(2, 5, 8)
    torch.testing.assert_close(cross(x, context), x + cross.proj(out), atol=1e-5, rtol=1e-5)


def test_loss_is_the_mse_of_the_hidden_patches():
    model = tiny()
    images = torch.rand(2, 1, 16, 16)
    output = model({"image": images}, generator=torch.Generator().manual_seed(3))
    masks = model.draw_masks({"image": images}, torch.Generator().manual_seed(3))
    assert torch.equal(output["mask"]["image"], masks["image"].mask)
    pred, target, hidden = output["pred"]["image"], patchify(images, (4, 4)), output["mask"]["image"]
    per_patch = ((pred - target) ** 2).mean(-1)
    assert hidden.sum() == 2 * 12
    torch.testing.assert_close(output["loss"], per_patch[hidden].mean())


def test_registered_and_bad_settings():
    assert METHODS["memmc_mae"] is MemMCMAE
    with pytest.raises(ValueError, match=r"levels \[0, 3\] must be distinct encoder block indices in \[0, 3\)"):
        tiny(levels=(0, 3))
    with pytest.raises(ValueError, match="memory_slots must be at least 1"):
        tiny(memory_slots=0)
    with pytest.raises(ValueError, match=r"expected images \[B, 1, 16, 16\].*got shape \(1, 1, 8, 8\)"):
        anomaly_maps(tiny().eval(), torch.rand(1, 1, 8, 8))


def test_complementary_masks_hide_every_patch_with_two_masks_per_round():
    orders = torch.stack([torch.randperm(16, generator=torch.Generator().manual_seed(s)) for s in range(2)])
    masks = complementary_masks(orders, num_keep=4, num_masks=6, batch=3)
    hidden = torch.stack([m.mask for m in masks])  # [K, B, N]
    assert hidden.shape == (6, 3, 16) and (hidden.sum(-1) == 12).all()
    assert hidden[:2].all(0).sum() == 3 * 8 and hidden[:2].any(0).all()  # two masks already cover every patch
    assert (~hidden[:4]).sum(0).max() == 1  # within a round (4 masks) a patch is visible at most once
    for mask in masks:  # ids_restore un-shuffles: visible ones first, in ids_keep order
        assert torch.equal(mask.ids_restore.gather(1, mask.ids_keep), torch.arange(4).expand(3, 4))
    with pytest.raises(ValueError, match="mask ratio of at least 0.5"):
        complementary_masks(orders, num_keep=9, num_masks=2, batch=1)


def test_anomaly_map_is_the_mean_error_of_the_masks_that_hid_each_pixel():
    model = tiny().eval()
    images = torch.rand(2, 1, 16, 16)
    orders = torch.stack([torch.randperm(16, generator=torch.Generator().manual_seed(5))])
    maps, scores = anomaly_maps(model, images, num_masks=3, orders=orders)
    total, count = torch.zeros(2, 16, 16), torch.zeros(2, 16, 16)
    with torch.no_grad():
        for mask in complementary_masks(orders, 4, 3, 2):
            pred = model.reconstruct({"image": images}, {"image": mask})["image"]
            for b in range(2):
                for token in range(16):
                    if mask.mask[b, token]:
                        row, col = divmod(token, 4)
                        patch = pred[b, token].reshape(4, 4)
                        region = (slice(4 * row, 4 * row + 4), slice(4 * col, 4 * col + 4))
                        total[b][region] += (patch - images[b, 0][region]) ** 2
                        count[b][region] += 1
    assert count.min() >= 2  # 3 masks of one round: each patch hidden at least twice
    torch.testing.assert_close(maps[:, 0], total / count, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(scores, maps.flatten(1).mean(1))


def test_maps_are_deterministic_per_seed_independent_of_the_batch_and_work_for_plain_mae():
    model = tiny().eval()
    images = torch.rand(3, 1, 16, 16)
    first, scores = anomaly_maps(model, images, 5, torch.Generator().manual_seed(1))
    again, _ = anomaly_maps(model, images, 5, torch.Generator().manual_seed(1))
    other, _ = anomaly_maps(model, images, 5, torch.Generator().manual_seed(2))
    alone, _ = anomaly_maps(model, images[1:2], 5, torch.Generator().manual_seed(1))
    assert torch.equal(first, again) and not torch.equal(first, other)
    torch.testing.assert_close(alone, first[1:2])
    assert torch.isfinite(first).all() and first.shape == (3, 1, 16, 16) and scores.shape == (3,)
    torch.manual_seed(0)
    plain = MaskedAutoencoder((16, 16), (4, 4), **TINY).eval()
    maps, plain_scores = anomaly_maps(plain, images, 2, torch.Generator().manual_seed(1))
    assert torch.isfinite(maps).all() and plain_scores.shape == (3,)
    with pytest.raises(ValueError, match="num_masks must be at least 2"):
        anomaly_maps(plain, images, 1)


def test_image_scores_average_the_top_fraction():
    maps = torch.arange(20.0).reshape(2, 1, 10) ** 2
    torch.testing.assert_close(image_scores(maps, 0.2), torch.tensor([(81.0 + 64) / 2, (19.0**2 + 18**2) / 2]))
    torch.testing.assert_close(image_scores(maps), maps.flatten(1).mean(1))
    torch.testing.assert_close(image_scores(maps, 0.01), maps.flatten(1).max(1).values)  # at least one pixel
    with pytest.raises(ValueError, match=r"top_fraction must lie in \(0, 1\], got 0"):
        image_scores(maps, 0)
    # a margin leaves the edges out: a hot border pixel stops counting, an interior one still does
    edged = torch.zeros(1, 1, 8, 8)
    edged[0, 0, 0, 3], edged[0, 0, 4, 4] = 9.0, 2.0
    assert image_scores(edged, 0.01).item() == 9.0 and image_scores(edged, 0.01, margin=1).item() == 2.0
    torch.testing.assert_close(image_scores(edged, 1.0, margin=2), torch.tensor([2.0 / 16]))
    for bad in (-1, 4, 1.5):
        with pytest.raises(ValueError, match="margin must be a whole number of pixels"):
            image_scores(edged, 0.5, margin=bad)
