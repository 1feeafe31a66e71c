"""ViT blocks against MONAI's TransformerBlock and a hand-written attention; the multi-view encoder's token dropping."""

import math

import pytest
import torch
from monai.networks.blocks import TransformerBlock as MonaiTransformerBlock

from medssl.masking import RandomMasking
from medssl.nets import vit
from medssl.nets.tokens import patchify
from medssl.nets.vit import MultiViewEncoder, OneDNNLinear, SelfAttention, TransformerBlock, ViTEncoder


def graph_nodes(tensor):
    """Names of the autograd nodes behind a tensor."""
    seen, stack = {}, [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is not None and id(node) not in seen:
            seen[id(node)] = type(node).__name__
            stack.extend(next_node for next_node, _ in node.next_functions)
    return set(seen.values())


@pytest.mark.parametrize("bias", [True, False])
def test_onednn_linear_matches_f_linear_with_gradients(bias, monkeypatch):
    monkeypatch.setattr(OneDNNLinear, "enabled", True)  # whatever this CPU's default
    torch.manual_seed(0)
    layer = OneDNNLinear(6, 5, bias=bias)
    x = torch.randn(3, 8, 4, 6)[:, 1:].requires_grad_()  # non-contiguous, 4-D
    grad = torch.randn(3, 7, 4, 5).transpose(1, 2).contiguous().transpose(1, 2)  # non-contiguous gradient
    out = layer(x)
    assert type(out.grad_fn).__name__ == "_OneDNNLinearFunctionBackward"
    params = [x, layer.weight] + ([layer.bias] if bias else [])
    ours = torch.autograd.grad(out, params, grad)
    expected = torch.nn.functional.linear(x, layer.weight, layer.bias)
    reference = torch.autograd.grad(expected, params, grad)
    torch.testing.assert_close(out, expected)
    for got, want in zip(ours, reference):
        torch.testing.assert_close(got, want)
    # Inputs that need no gradient get none, and only the weight gradient is computed.
    frozen = torch.randn(2, 6)
    assert torch.autograd.grad(layer(frozen).sum(), layer.weight)[0].shape == (5, 6)


def test_onednn_linear_falls_back_where_onednn_does_not_apply(monkeypatch):
    monkeypatch.setattr(OneDNNLinear, "enabled", True)
    layer = OneDNNLinear(6, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.randn(2, 6)).dtype == torch.bfloat16
    double = OneDNNLinear(6, 5).double()
    x = torch.randn(2, 6, dtype=torch.float64)
    assert type(double(x).grad_fn).__name__ == "AddmmBackward0"
    monkeypatch.setattr(OneDNNLinear, "enabled", False)
    assert type(layer(torch.randn(2, 6)).grad_fn).__name__ == "AddmmBackward0"


@pytest.mark.parametrize(
    "vendor,capability,expected",
    [("AuthenticAMD", "AVX512", True), ("GenuineIntel", "AVX512", False), ("AuthenticAMD", "AVX2", False),
     ("", "AVX512", False)],
)
def test_onednn_is_the_default_only_where_mkl_runs_below_the_cpus_avx512(vendor, capability, expected, monkeypatch):
    monkeypatch.setattr(vit, "cpu_vendor", lambda: vendor)
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(torch.backends.mkl, "is_available", lambda: True)
    assert vit.onednn_beats_blas() is expected


def test_cpu_vendor_reads_cpuinfo(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\n")
    assert vit.cpu_vendor(str(cpuinfo)) == "AuthenticAMD"
    cpuinfo.write_text("processor\t: 0\nBogoMIPS\t: 50.00\n")  # e.g. an Arm CPU: no vendor_id line
    assert vit.cpu_vendor(str(cpuinfo)) == ""
    assert vit.cpu_vendor(str(tmp_path / "missing")) == ""


def test_onednn_attention_matches_sdpa_with_gradients(monkeypatch):
    monkeypatch.setattr(OneDNNLinear, "enabled", True)
    torch.manual_seed(0)
    attn = SelfAttention(dim=12, num_heads=3)
    x = torch.randn(2, 37, 12, requires_grad=True)
    grad = torch.randn(2, 37, 12)
    assert "_OneDNNAttentionFunctionBackward" not in graph_nodes(attn(x))  # short sequences: the fused kernel
    monkeypatch.setattr(vit, "_ATTENTION_BLOCK_ELEMENTS", 37 * 10)  # blocks of 16, 16 and 5 queries
    monkeypatch.setattr(vit, "_ONEDNN_ATTENTION_MIN_TOKENS", 37)
    out = attn(x)
    assert "_OneDNNAttentionFunctionBackward" in graph_nodes(out)
    ours = torch.autograd.grad(out, [x, *attn.parameters()], grad)
    monkeypatch.setattr(OneDNNLinear, "enabled", False)
    reference = attn(x)
    assert "_OneDNNAttentionFunctionBackward" not in graph_nodes(reference)
    expected = torch.autograd.grad(reference, [x, *attn.parameters()], grad)
    torch.testing.assert_close(out, reference, atol=1e-5, rtol=1e-5)
    for got, want in zip(ours, expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_self_attention_matches_softmax_formula():
    torch.manual_seed(0)
    attn = SelfAttention(dim=12, num_heads=3).eval()
    x = torch.randn(2, 5, 12)
    q, k, v = attn.qkv(x).reshape(2, 5, 3, 3, 4).unbind(2)  # [B, N, H, Dh] each
    weights = torch.softmax(torch.einsum("bnhd,bmhd->bhnm", q, k) / math.sqrt(4), dim=-1)
    expected = attn.proj(torch.einsum("bhnm,bmhd->bnhd", weights, v).reshape(2, 5, 12))
    torch.testing.assert_close(attn(x), expected, atol=1e-5, rtol=1e-5)


def test_block_matches_monai_transformer_block():
    torch.manual_seed(0)
    ours = TransformerBlock(dim=16, num_heads=4, mlp_ratio=2.0).eval()
    monai = MonaiTransformerBlock(hidden_size=16, mlp_dim=32, num_heads=4, qkv_bias=True).eval()
    renames = {"attn.proj": "attn.out_proj", "mlp.fc1": "mlp.linear1", "mlp.fc2": "mlp.linear2"}
    state = {}
    for key, value in ours.state_dict().items():
        prefix, _, leaf = key.rpartition(".")
        state[f"{renames.get(prefix, prefix)}.{leaf}"] = value
    monai.load_state_dict(state, strict=False)
    assert set(state) <= set(monai.state_dict())
    x = torch.randn(3, 7, 16)
    torch.testing.assert_close(ours(x), monai(x), atol=1e-5, rtol=1e-5)


def test_encoder_hidden_states_and_checkpointing():
    torch.manual_seed(0)
    encoder = ViTEncoder(embed_dim=16, depth=3, num_heads=2)
    x = torch.randn(2, 6, 16, requires_grad=True)
    out, hidden = encoder.forward_features(x, [2, 0])
    manual = [x]
    for block in encoder.blocks:
        manual.append(block(manual[-1]))
    torch.testing.assert_close(hidden[0], manual[3])
    torch.testing.assert_close(hidden[1], manual[1])
    torch.testing.assert_close(out, encoder.norm(manual[3]))
    grad = torch.autograd.grad(out.square().sum(), x)[0]
    encoder.grad_checkpointing = True
    torch.testing.assert_close(torch.autograd.grad(encoder(x).square().sum(), x)[0], grad)
    with pytest.raises(ValueError, match=r"layers \[3\] must be block indices in \[0, 3\)"):
        encoder.forward_features(x, [3])
    with pytest.raises(ValueError, match=r"tokens must be \[B, N, 16\], got shape \(2, 6, 8\)"):
        encoder(torch.randn(2, 6, 8))


def test_drop_path_is_random_in_training_only():
    torch.manual_seed(0)
    encoder = ViTEncoder(embed_dim=16, depth=2, num_heads=2, drop_path_rate=0.5)
    x = torch.randn(8, 4, 16)
    assert not torch.equal(encoder(x), encoder(x))
    encoder.eval()
    assert torch.equal(encoder(x), encoder(x))
    with pytest.raises(ValueError, match="drop_path_rate must be in"):
        ViTEncoder(drop_path_rate=1.0)


VIEWS = {
    "plane": {"image_size": (8, 12), "patch_size": (4, 4)},  # 2D: 6 tokens
    "stack": {"image_size": (8, 8, 3), "patch_size": (4, 4, 1)},  # 3D: 12 tokens
    "cine": {"image_size": (8, 8, 4), "patch_size": (4, 4, 2)},  # 2D+t: 8 tokens
    "stack_cine": {"image_size": (8, 8, 2, 4), "patch_size": (4, 4, 1, 2), "in_channels": 2},  # 3D+t: 16 tokens
}


def images(batch=2, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {
        name: torch.randn(batch, spec.get("in_channels", 1), *spec["image_size"], generator=gen)
        for name, spec in VIEWS.items()
    }


def test_multi_view_encoder_sees_only_visible_tokens():
    torch.manual_seed(0)
    encoder = MultiViewEncoder(VIEWS, embed_dim=24, depth=2, num_heads=2)
    seen = []
    encoder.vit.blocks[0].register_forward_hook(lambda module, args, out: seen.append(args[0].shape))
    batch = images()
    masking = RandomMasking(0.75)
    masks = {name: masking(2, encoder.views[name].grid, generator=torch.Generator().manual_seed(1)) for name in batch}
    out = encoder(batch, masks)
    keep = {name: masking.num_keep(encoder.views[name].grid) for name in batch}
    assert seen == [torch.Size([2, sum(keep.values()), 24])]
    assert {name: tuple(x.shape) for name, x in out.items()} == {name: (2, k, 24) for name, k in keep.items()}
    # Masked pixels must not influence anything the encoder outputs.
    changed = {}
    for name, image in batch.items():
        spec = encoder.views[name]
        grid_mask = masks[name].mask.view(2, 1, *spec.grid)
        for axis, p in enumerate(spec.patch_size):
            grid_mask = grid_mask.repeat_interleave(p, dim=2 + axis)
        changed[name] = torch.where(grid_mask, torch.randn_like(image) * 100, image)
    for name, x in encoder(changed, masks).items():
        torch.testing.assert_close(x, out[name])
    # Without masks every token is encoded, in grid order.
    full = encoder({"cine": batch["cine"]})
    assert full["cine"].shape == (2, 8, 24)


def test_multi_view_encoder_adds_positions_and_view_embedding():
    torch.manual_seed(0)
    encoder = MultiViewEncoder({"a": VIEWS["plane"], "b": VIEWS["plane"]}, embed_dim=8, depth=1, num_heads=2)
    image = torch.randn(1, 1, 8, 12)
    tokens, counts = encoder.embed({"a": image, "b": image})
    assert counts == {"a": 6, "b": 6}
    patches = encoder.patch_embed["a"](patchify(image, (4, 4)))
    torch.testing.assert_close(tokens[:, :6], patches + encoder.positions("a") + encoder.view_embed["a"])
    assert encoder.positions("a").shape == (6, 8)


def test_multi_view_encoder_validates_shapes():
    encoder = MultiViewEncoder(VIEWS, embed_dim=24, depth=1, num_heads=2)
    expected = r"view 'stack': expected images \[B, 1, 8, 8, 3\] \(3 spatial axes\), got shape \(2, 1, 8, 8\)"
    with pytest.raises(ValueError, match=expected):
        encoder({"stack": torch.zeros(2, 1, 8, 8)})
    with pytest.raises(ValueError, match=r"view 'plane': expected images \[B, 1, 8, 12\].*got shape \(2, 1, 8, 16\)"):
        encoder({"plane": torch.zeros(2, 1, 8, 16)})
    with pytest.raises(ValueError, match="unknown view 'lax'"):
        encoder({"lax": torch.zeros(2, 1, 8, 12)})
    with pytest.raises(ValueError, match="views must share the batch size"):
        encoder({"plane": torch.zeros(2, 1, 8, 12), "stack": torch.zeros(3, 1, 8, 8, 3)})
    with pytest.raises(ValueError, match=r"view 'odd': .*not divisible by patch size 4"):
        MultiViewEncoder({"odd": {"image_size": (10, 8), "patch_size": (4, 4)}})
    with pytest.raises(ValueError, match="view names must be Python identifiers"):
        MultiViewEncoder({"lax.2c": VIEWS["plane"]})


def test_encoder_state_dict_loads_strictly_without_positions():
    first = MultiViewEncoder(VIEWS, embed_dim=24, depth=1, num_heads=2)
    second = MultiViewEncoder(VIEWS, embed_dim=24, depth=1, num_heads=2)
    state = first.state_dict()
    assert not any("positions" in key for key in state)
    assert {"view_embed.plane", "patch_embed.stack_cine.proj.weight", "vit.blocks.0.attn.qkv.weight"} <= set(state)
    second.load_state_dict(state, strict=True)
    batch = images()
    first.eval(), second.eval()
    for name, x in first(batch).items():
        torch.testing.assert_close(x, second(batch)[name])
