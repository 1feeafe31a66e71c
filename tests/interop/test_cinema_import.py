"""CineMA checkpoints in medssl's networks: every fixture model reproduces CineMA's own outputs (fixture README's
tolerance, on the outputs and on the intermediate tensors), and bad checkpoints fail with errors naming the keys."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from medssl.errors import CheckpointError, ConfigError, DataError
from medssl.interop.cinema_import import find_cinema_files, load_cinema, read_safetensors
from medssl.nets.cinema import CineMAEncoder, ConvUNetR, ConvViT

MAE_VIEWS = ("sax", "lax_2c", "lax_3c", "lax_4c")


def _close(actual, expected, fixture, what):
    torch.testing.assert_close(actual, expected, **fixture.tolerance, msg=lambda m: f"{what}: {m}")


def _check_encoder_internals(network, io, fixture, images, prefix="debug."):
    """The view encoders' tokens and the ViT output (class token + tokens) against CineMA's."""
    tokens, counts, _ = network.embed_views(images)
    for view, part in zip(counts, tokens.split(list(counts.values()), dim=1)):
        _close(part, io[f"{prefix}enc_down_tokens.{view}"], fixture, f"{view} view-encoder tokens")
    _close(network.vit.forward_with_class_token(tokens), io[f"{prefix}encoder_out"], fixture, "ViT output")


@torch.no_grad()
def test_mae_encoder_features_match_cinema(cinema_fixture):
    network, config = load_cinema(cinema_fixture.checkpoint("mae"))
    assert isinstance(network, CineMAEncoder) and config.size == "tiny"
    io = cinema_fixture.reference("mae")
    calls = {"all_views": MAE_VIEWS, **{f"{view}_only": (view,) for view in MAE_VIEWS}}
    for call, views in calls.items():
        images = {view: io[f"input.{view}"] for view in views}
        _check_encoder_internals(network, io, cinema_fixture, images, f"debug.{call}.")
        features = network(images)
        for key in ("cls", *views):
            _close(features[key], io[f"output.{call}.{key}"], cinema_fixture, f"{call} {key}")


@pytest.mark.parametrize(("model", "view", "channels"), [("seg", "sax", 4), ("landmark_heatmap", "lax_4c", 3)])
@torch.no_grad()
def test_convunetr_logits_match_cinema(cinema_fixture, model, view, channels):
    network, config = load_cinema(cinema_fixture.checkpoint(model).parent)  # the folder works as well as the file
    assert isinstance(network, ConvUNetR) and list(config.views) == [view]
    io = cinema_fixture.reference(model)
    image = io[f"input.{view}"]
    _check_encoder_internals(network.encoder, io, cinema_fixture, {view: image})
    logits = network(image, view)
    assert logits.shape == (1, channels, *image.shape[2:])
    _close(logits, io[f"output.{view}"], cinema_fixture, f"{model} logits")


@pytest.mark.parametrize(("model", "view"), [("cls", "sax"), ("reg", "sax"), ("landmark_coordinate", "lax_4c")])
@torch.no_grad()
def test_convvit_outputs_match_cinema(cinema_fixture, model, view):
    network, _ = load_cinema(cinema_fixture.checkpoint(model))
    assert isinstance(network, ConvViT)
    io = cinema_fixture.reference(model)
    images = {view: io[f"input.{view}"]}
    _check_encoder_internals(network.encoder, io, cinema_fixture, images)
    features = network.encoder(images)
    for key in ("cls", view):
        _close(features[key], io[f"output.features.{key}"], cinema_fixture, f"{model} features {key}")
    _close(network(images), io["output.logits"], cinema_fixture, f"{model} logits")
    # The other reductions from the same features (forward's reductions are unit-tested in tests/nets).
    cls, patch = network.heads["cls"](features["cls"][:, 0]), network.heads[view](features[view].mean(1))
    _close(cls, io["output.logits_reduce_cls"], cinema_fixture, f"{model} reduce=cls")
    _close(patch, io["output.logits_reduce_patch"], cinema_fixture, f"{model} reduce=patch")


@pytest.fixture
def cls_copy(cinema_fixture, tmp_path):
    """A writable copy of the classification checkpoint and its config, and its tensors."""
    folder = tmp_path / "cls"
    folder.mkdir()
    shutil.copyfile(cinema_fixture.config("cls"), folder / "config.yaml")
    return folder, load_file(str(cinema_fixture.checkpoint("cls")))


def _without(*keys):
    return lambda state: {key: value for key, value in state.items() if key not in keys}


def _with(key, change):
    return lambda state: {**state, key: change(state.get(key))}


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (_with("enc_down_dict.sax.extra.weight", lambda _: torch.zeros(2)),
         r"1 unexpected keys: enc_down_dict\.sax\.extra\.weight"),
        (_without("encoder.norm.bias"), r"1 missing keys: encoder\.vit\.norm\.bias\."),
        # The q half of a fused projection without its kv half cannot be mapped.
        (_without("encoder.blocks.0.attn.kv.weight"), r"1 unexpected keys: encoder\.blocks\.0\.attn\.q\.weight"),
        (_with("pred_head_dict.sax.weight", lambda _: torch.zeros(3, 16)),
         r"1 shape mismatches: heads\.sax\.weight \(checkpoint \[3, 16\] vs network \[5, 16\]\)"),
        (_with("enc_down_dict.sax.pos_embed", lambda table: table + 0.01),
         r"enc_down_dict\.sax\.pos_embed is not the fixed sin-cos table"),
        (_with("enc_down_dict.sax.pos_embed", lambda table: table[:, :100]),
         r"pos_embed has shape \[1, 100, 16\] but the config's view grid needs \[1, 2304, 16\]"),
    ],
    ids=["unexpected", "missing", "half_qkv", "shape", "positions", "position_grid"],
)
def test_checkpoints_unlike_their_config_are_refused_naming_the_keys(cls_copy, mutate, message):
    folder, state = cls_copy
    save_file(mutate(state), str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match=message):
        load_cinema(folder / "model.safetensors")


def test_not_safetensors_is_a_data_error(cls_copy):
    folder, _ = cls_copy
    (folder / "model.safetensors").write_bytes(b"PK\x03\x04 a torch zip pickle, say")
    with pytest.raises(DataError, match=r"model\.safetensors is not a safetensors file"):
        load_cinema(folder / "model.safetensors")
    with pytest.raises(DataError, match="does not exist"):
        read_safetensors(folder / "absent.safetensors")


def test_unknown_size_in_config_is_a_config_error(cls_copy):
    folder, state = cls_copy
    save_file(state, str(folder / "model.safetensors"))
    text = (folder / "config.yaml").read_text()
    (folder / "config.yaml").write_text(text.replace("size: tiny", "size: giant"))
    with pytest.raises(ConfigError, match=r"config\.yaml: CineMA config 'model\.convvit\.size' is 'giant'"):
        load_cinema(folder)


def test_folders_must_hold_one_checkpoint(cls_copy):
    folder, state = cls_copy
    for seed in (0, 1):
        save_file(state, str(folder / f"acdc_sax_{seed}.safetensors"))
    with pytest.raises(DataError, match=r"exactly one CineMA checkpoint .* found cls/acdc_sax_0\.safetensors, "
                                        r"cls/acdc_sax_1\.safetensors"):
        find_cinema_files(folder.parent)
    assert find_cinema_files(folder / "acdc_sax_1.safetensors") == (folder / "acdc_sax_1.safetensors",
                                                                    folder / "config.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        load_cinema(folder / "acdc_sax_1.safetensors", config=folder / "absent.yaml")
