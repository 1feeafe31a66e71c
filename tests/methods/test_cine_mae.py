"""CineMAE / CineCycleMAE: multi-view batches, cross-view attention, gradients to every view, tube masks."""

import math

import pytest
import torch

from medssl.methods.cine_mae import CINE_CYCLE_VIEWS, CINE_PHASE_VIEWS, CineCycleMAE, CineMAE
from medssl.nets.tokens import patchify
from medssl.objectives import masked_reconstruction_loss

TINY = {"embed_dim": 24, "depth": 1, "num_heads": 2, "decoder_dim": 16, "decoder_depth": 1, "decoder_num_heads": 2}
PHASE_VIEWS = {
    "sax": {"image_size": (16, 16, 3), "patch_size": (8, 8, 1), "in_channels": 1},  # 12 tokens
    "lax_2c": {"image_size": (16, 16), "patch_size": (4, 4), "in_channels": 1},  # 16 tokens
    "lax_4c": {"image_size": (16, 16), "patch_size": (4, 4), "in_channels": 1},
}
CYCLE_VIEWS = {
    "sax": {"image_size": (16, 16, 2, 6), "patch_size": (8, 8, 1, 2), "in_channels": 1},  # 8 positions x 3 times
    "lax_4c": {"image_size": (16, 16, 6), "patch_size": (4, 4, 3), "in_channels": 1},  # 16 positions x 2 times
}


def seeded(seed):
    return torch.Generator().manual_seed(seed)


def batch_for(views, batch=2, seed=0):
    gen = seeded(seed)
    return {name: torch.rand(batch, 1, *spec["image_size"], generator=gen) for name, spec in views.items()}


def test_phase_model_outputs_and_loss():
    torch.manual_seed(0)
    model = CineMAE(PHASE_VIEWS, **TINY)
    batch = dict(batch_for(PHASE_VIEWS), subject="ignored", spacing=torch.ones(2, 3))
    out = model(batch, generator=seeded(0))
    sizes = {"sax": (12, 64), "lax_2c": (16, 16), "lax_4c": (16, 16)}
    assert {name: tuple(p.shape) for name, p in out["pred"].items()} == {n: (2, *s) for n, s in sizes.items()}
    per_view = {}
    for name, spec in PHASE_VIEWS.items():
        target = patchify(batch[name], spec["patch_size"])
        per_view[name] = masked_reconstruction_loss(out["pred"][name], target, out["mask"][name])
    for name, loss in per_view.items():
        torch.testing.assert_close(out[f"loss_{name}"], loss)
    torch.testing.assert_close(out["loss"], torch.stack(list(per_view.values())).mean())
    assert [out["mask"][name].sum(1).tolist() for name in sizes] == [[12 - 3] * 2, [16 - 4] * 2, [16 - 4] * 2]


def test_any_subset_of_views_works():
    model = CineMAE(PHASE_VIEWS, **TINY)
    batch = batch_for(PHASE_VIEWS)
    for subset in (["sax"], ["lax_4c"], ["lax_2c", "sax"]):
        out = model({name: batch[name] for name in subset}, generator=seeded(0))
        assert sorted(out["pred"]) == sorted(subset)
        assert set(out) == {"loss", "pred", "mask", *(f"loss_{name}" for name in subset)}
        figures = model.reconstruction_images(batch, out)
        for name in subset:
            assert figures[name]["reconstruction"].shape == batch[name].shape


def test_gradient_reaches_every_view_and_views_attend_to_each_other():
    torch.manual_seed(0)
    model = CineMAE(PHASE_VIEWS, **TINY)
    batch = batch_for(PHASE_VIEWS)
    out = model(batch, generator=seeded(0))
    out["loss"].backward()
    for name in PHASE_VIEWS:
        for module in (model.encoder.patch_embed[name], model.decoder.heads[name]):
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters()), name
        assert model.encoder.view_embed[name].grad.abs().sum() > 0
        assert model.decoder.view_embed[name].grad.abs().sum() > 0
    # One shared encoder over all views: changing a LAX image changes the SAX prediction.
    with torch.no_grad():
        changed = dict(batch, lax_4c=1.0 - batch["lax_4c"])
        before = model(batch, generator=seeded(0))["pred"]["sax"]
        after = model(changed, generator=seeded(0))["pred"]["sax"]
    assert not torch.allclose(before, after)


def test_masks_follow_the_generator_per_view():
    model = CineMAE(PHASE_VIEWS, **TINY)
    batch = batch_for(PHASE_VIEWS)
    first, again, other = (model(batch, generator=seeded(s))["mask"] for s in (1, 1, 2))
    for name in PHASE_VIEWS:
        assert torch.equal(first[name], again[name])
    assert not all(torch.equal(first[name], other[name]) for name in PHASE_VIEWS)
    assert not torch.equal(first["lax_2c"], first["lax_4c"])  # drawn independently per view


def test_cycle_model_uses_tube_masks():
    torch.manual_seed(0)
    model = CineCycleMAE(CYCLE_VIEWS, **TINY)
    batch = batch_for(CYCLE_VIEWS)
    out = model(batch, generator=seeded(0))
    assert out["pred"]["sax"].shape == (2, 24, 128) and out["pred"]["lax_4c"].shape == (2, 32, 48)
    for name, grid in (("sax", (2, 2, 2, 3)), ("lax_4c", (4, 4, 2))):
        tubes = out["mask"][name].view(2, *grid)
        assert torch.equal(tubes, tubes[..., :1].expand_as(tubes)), name  # same spatial mask at every time
        spatial = math.prod(grid[:-1])
        assert out["mask"][name].sum(1).tolist() == [(spatial - int(spatial * 0.25)) * grid[-1]] * 2
    out["loss"].backward()
    assert all(model.encoder.patch_embed[name].proj.weight.grad.abs().sum() > 0 for name in CYCLE_VIEWS)


def test_defaults_and_conv_stem():
    phase, cycle = CineMAE(**TINY), CineCycleMAE(patch_embed="conv_stem", **TINY)
    assert list(phase.views) == list(CINE_PHASE_VIEWS) == ["sax", "lax_2c", "lax_4c"]
    assert phase.views["sax"].num_tokens == 512 and phase.views["lax_2c"].num_tokens == 64
    assert cycle.views["sax"].image_size == tuple(CINE_CYCLE_VIEWS["sax"]["image_size"]) == (64, 64, 8, 8)
    out = cycle(batch_for({"lax_2c": CINE_CYCLE_VIEWS["lax_2c"]}, batch=1), generator=seeded(0))
    assert out["pred"]["lax_2c"].shape == (1, 64, 512)


def test_errors_name_the_view():
    model = CineMAE(PHASE_VIEWS, **TINY)
    expected = r"view 'sax': expected images \[B, 1, 16, 16, 3\] \(3 spatial axes\), got shape \(2, 1, 16, 16\)"
    with pytest.raises(ValueError, match=expected):
        model({"sax": torch.zeros(2, 1, 16, 16)})
    with pytest.raises(ValueError, match=r"view 'lax_2c': expected images \[B, 1, 16, 16\].*\(2, 1, 16, 20\)"):
        model({"lax_2c": torch.zeros(2, 1, 16, 20)})
    with pytest.raises(ValueError, match=r"view 'sax': .*not divisible"):
        CineMAE({"sax": {"image_size": (16, 16, 3), "patch_size": (6, 8, 1)}}, **TINY)


def test_encoder_state_dict_round_trip():
    first, second = CineMAE(PHASE_VIEWS, **TINY), CineMAE(PHASE_VIEWS, **TINY)
    second.encoder.load_state_dict(first.encoder_state_dict(), strict=True)
    batch = batch_for(PHASE_VIEWS)
    first.eval(), second.eval()
    for name, tokens in first.encoder(batch).items():
        torch.testing.assert_close(second.encoder(batch)[name], tokens)
