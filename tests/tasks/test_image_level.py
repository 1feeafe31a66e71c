"""Image-level network on the pretrained encoder: channel inflation, strict loading, head, standardised outputs, loss,
prediction over subjects and folders."""

import csv
import json

import pytest
import torch
from safetensors.torch import load_file

from medssl.data.cine import load_cine_datalist
from medssl.data.cine_labelled import SegmentationView
from medssl.data.cine_phases import cine_phase_datalist
from medssl.data.phantom import ensure_cohort
from medssl.engine.checkpoints import save_network_weights
from medssl.errors import CheckpointError, DataError
from medssl.methods.cine_mae import CineMAE
from medssl.nets.vit import MultiViewEncoder
from medssl.tasks.image_level import (
    ImageLevelNetwork,
    PooledTokenHead,
    StandardisedSmoothL1Loss,
    inflate_input_channels,
    predict_folder,
    predict_phases,
    write_predictions,
)

ENCODER = {"embed_dim": 16, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0}
SAX = {"image_size": [16, 16, 2], "patch_size": [8, 8, 1]}
VIEW = SegmentationView("sax", [16, 16, 2], [12.0, 12.0, 30.0], [8, 8, 1])


def pretrained_checkpoint(path, patch_embed="linear"):
    """A cine_mae checkpoint with 1-channel SAX and LAX-4C views."""
    torch.manual_seed(0)
    views = {"sax": SAX, "lax_4c": {"image_size": [16, 16], "patch_size": [8, 8]}}
    mae = CineMAE(views=views, decoder_dim=8, decoder_depth=1, decoder_num_heads=2, patch_embed=patch_embed, **ENCODER)
    return save_network_weights(mae, path)


def network(patch_embed="linear", **kw):
    return ImageLevelNetwork({"sax": {**SAX, "spacing": [1, 1, 1]}}, 5, patch_embed=patch_embed, **ENCODER, **kw)


def test_inflate_input_channels_keeps_the_embedding_of_a_channel_constant_input():
    weight, x = torch.randn(6, 4), torch.randn(3, 4)
    inflated = inflate_input_channels(weight, 2)
    assert inflated.shape == (6, 8)
    torch.testing.assert_close(inflated[:, 0::2], weight / 2)
    torch.testing.assert_close(inflated[:, 1::2], weight / 2)
    repeated = x.repeat_interleave(2, dim=1)  # patch values ordered (*patch, C): channels innermost
    torch.testing.assert_close(repeated @ inflated.T, x @ weight.T)
    with pytest.raises(ValueError, match=r"need a \[out, P\] weight and channels >= 1"):
        inflate_input_channels(torch.randn(6, 4, 1), 2)


@pytest.mark.parametrize("patch_embed", ["linear", "conv_stem"])
def test_loading_a_cine_mae_checkpoint_inflates_the_patch_embedding(tmp_path, patch_embed):
    path = pretrained_checkpoint(tmp_path / "mae.safetensors", patch_embed)
    net = network(patch_embed).load_pretrained(path)
    state = load_file(str(path))
    for name, value in net.encoder.state_dict().items():
        if name.startswith("vit.") or name == "view_embed.sax":
            torch.testing.assert_close(value, state[f"encoder.{name}"], rtol=0, atol=0)
    # Reference: the pretrained 1-channel encoder on one frame; the same frame in both channels embeds identically.
    single = MultiViewEncoder({"sax": SAX}, patch_embed=patch_embed, **ENCODER)
    single.load_state_dict({k[len("encoder."):]: v for k, v in state.items()
                            if k.startswith("encoder.") and ".lax_4c" not in k})
    frame = torch.rand(2, 1, 16, 16, 2)
    with torch.no_grad():
        expected, _ = single.embed({"sax": frame})
        inflated, _ = net.encoder.embed({"sax": frame.expand(-1, 2, -1, -1, -1)})
    torch.testing.assert_close(inflated, expected, rtol=1e-5, atol=1e-5)


def test_a_mismatching_checkpoint_is_refused_naming_the_keys(tmp_path):
    path = pretrained_checkpoint(tmp_path / "mae.safetensors")
    wider = ImageLevelNetwork({"sax": SAX}, 5, **{**ENCODER, "embed_dim": 24})
    with pytest.raises(CheckpointError, match=r"shape mismatches: patch_embed\.sax\.proj\.bias \(checkpoint \[16\] vs "
                                              r"network \[24\]\)"):
        wider.load_pretrained(path)
    scratch = network().load_pretrained(False)
    assert scratch.encoder.patch_embed["sax"].proj.weight.shape == (16, 128)  # 8x8x1 patches, 2 channels


def test_pooled_token_head_standardises_the_mean_token_across_the_batch_then_linear():
    head = PooledTokenHead(8, 3)
    assert head.linear.weight.abs().max() < 1e-3  # MAE: the head starts near zero
    torch.nn.init.normal_(head.linear.weight)
    tokens = torch.randn(4, 5, 8) + 3.0
    pooled = tokens.mean(1)
    standardised = (pooled - pooled.mean(0)) / (pooled.var(0, correction=0) + 1e-6).sqrt()
    torch.testing.assert_close(head.train()(tokens), standardised @ head.linear.weight.T + head.linear.bias)
    # Evaluation, and a lone training sample, use the running statistics.
    running = (pooled - head.norm.running_mean) / (head.norm.running_var + 1e-6).sqrt()
    torch.testing.assert_close(head.eval()(tokens), running @ head.linear.weight.T + head.linear.bias)
    torch.testing.assert_close(head.train()(tokens[:1]), head.eval()(tokens[:1]))
    with pytest.raises(ValueError, match="embed_dim and num_outputs must be >= 1"):
        PooledTokenHead(8, 0)


def test_forward_modes_and_errors():
    x = torch.rand(3, 2, 16, 16, 2)
    net = network()
    assert net(x).shape == net(x, "sax").shape == (3, 5)
    with pytest.raises(ValueError, match="unknown view 'lax_4c'; this network reads 'sax'"):
        net(x, "lax_4c")
    with pytest.raises(ValueError, match=r"expected images \[B, 2, 16, 16, 2\] .* got shape \(3, 1, 16, 16, 2\)"):
        net(x[:, :1])
    with pytest.raises(ValueError, match="exactly one view"):
        ImageLevelNetwork({"sax": SAX, "lax_4c": {"image_size": [16, 16], "patch_size": [8, 8]}}, 5)
    probe = network(finetune_mode="linear_probe")
    assert not any(p.requires_grad for p in probe.encoder.parameters())
    assert all(p.requires_grad for p in probe.head.parameters())


def test_standardised_outputs_are_in_the_targets_units():
    net = network(standardised=True)
    targets = torch.tensor([[50.0, 40.0], [60.0, 40.0], [70.0, 40.0], [40.0, 40.0], [55.0, 40.0]])
    with pytest.raises(ValueError, match=r"targets must be \[N >= 1, 5\]"):
        net.set_output_statistics(targets)
    net = ImageLevelNetwork({"sax": SAX}, 2, standardised=True, **ENCODER).set_output_statistics(targets)
    torch.testing.assert_close(net.output_mean, torch.tensor([55.0, 40.0]))
    torch.testing.assert_close(net.output_std, torch.tensor([targets[:, 0].std(correction=0).item(), 1.0]))  # no spread
    assert {"output_mean", "output_std"} <= set(net.state_dict())  # saved with the weights
    x = torch.rand(2, 2, 16, 16, 2)
    with torch.no_grad():
        z = net.eval().head(net.encode(x, "sax")[0])
        torch.testing.assert_close(net(x), z * net.output_std + net.output_mean)
    with pytest.raises(DataError, match="must be finite numbers"):
        net.set_output_statistics(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="needs a network built with standardised=True"):
        network().set_output_statistics(targets)


def test_standardised_smooth_l1_loss_is_smooth_l1_on_z_scores():
    std = torch.tensor([10.0, 4.0])
    prediction, target = torch.tensor([[55.0, 30.0], [40.0, 52.0]]), torch.tensor([[50.0, 31.0], [60.0, 50.0]])
    z_errors = ((prediction - target) / std).abs()
    expected = torch.where(z_errors < 1, 0.5 * z_errors**2, z_errors - 0.5).mean()
    torch.testing.assert_close(StandardisedSmoothL1Loss(std)(prediction, target), expected)
    with pytest.raises(ValueError, match=r"must both be \[B, 2\]"):
        StandardisedSmoothL1Loss(std)(prediction, target[:, :1])


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return ensure_cohort(tmp_path_factory.mktemp("cohort"), 2, seed=0, num_frames=4, progress=False).parent


def test_predict_phases_and_folder(cohort, tmp_path):
    net = ImageLevelNetwork({"sax": SAX}, 2, **ENCODER)
    items = cine_phase_datalist(load_cine_datalist(cohort, ["sax"], metadata=True))
    outputs, frames = predict_phases(net.train(), items, VIEW, batch_size=1)
    assert outputs.shape == (2, 2) and net.training  # evaluated in eval mode, mode restored
    assert frames == [{"ed_frame": item["ed_frame"], "es_frame": item["es_frame"]} for item in items]
    with torch.no_grad():
        again, _ = predict_phases(net, items, VIEW, batch_size=2)
    torch.testing.assert_close(again, outputs)  # deterministic, batch-independent

    inputs = tmp_path / "inputs"
    inputs.mkdir()
    for subject in (0, 1):
        (inputs / f"case{subject}.nii.gz").write_bytes((cohort / f"sub-000{subject}" / "sax.nii.gz").read_bytes())
    written = predict_folder(net, inputs, tmp_path / "out", VIEW, lambda out: {"a": float(out[0]), "b": float(out[1])})
    assert [p.name for p in written] == ["predictions.csv", "predictions.json"]
    rows = list(csv.DictReader(open(written[0])))
    assert [row["file"] for row in rows] == ["case0.nii.gz", "case1.nii.gz"]
    # No metadata: ED is frame 0 and ES the frame farthest from it, which is the phantom's ES.
    assert [(int(r["ed_frame"]), int(r["es_frame"])) for r in rows] == [(0, f["es_frame"]) for f in frames]
    assert [float(row["a"]) for row in rows] == pytest.approx(outputs[:, 0].tolist(), abs=1e-5)
    assert json.loads(written[1].read_text())[1]["file"] == "case1.nii.gz"
    with pytest.raises(DataError, match="nothing was predicted"):
        write_predictions([], tmp_path)
