"""``import_cinema``: a CineMA checkpoint becomes a medssl bundle whose network reproduces CineMA, whose segmentation
predictor runs on a cine with CineMA's pre-processing, and whose encoder ``cine_seg`` fine-tunes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from medssl import cli
from medssl.data.phantom import ensure_cohort, generate_subject
from medssl.engine.checkpoints import load_network_weights
from medssl.errors import CheckpointError, ConfigError, DataError
from medssl.interop.cinema_bundle import import_cinema
from medssl.nets.cinema import CineMAEncoder
from medssl.tasks.finetune import ENCODER_METADATA_KEY, layer_decay_param_groups
from medssl.tasks.image_level import ImageLevelNetwork
from medssl.tasks.segmentation import CineSegmentationPredictor, ViTSegmenter, load_segmentation_predictor

TINY_SAX = {"sax": {"image_size": [32, 32, 4], "spacing": [4.0, 4.0, None], "patch_size": [8, 8, 1]}}
TINY_MODEL = {"embed_dim": 16, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0, "patch_embed": "linear",
              "drop_path_rate": 0.1, "feature_size": 4}


def _parse(bundle, item):
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / "inference.json"))
    parser["bundle_root"] = str(bundle)
    return parser.get_parsed_content(item)


@pytest.fixture(scope="module")
def mae_bundle(cinema_fixture, tmp_path_factory):
    return import_cinema(cinema_fixture.checkpoint("mae").parent, tmp_path_factory.mktemp("bundles") / "mae")


def test_imported_bundle_runs_medssls_network_with_cinemas_outputs(cinema_fixture, tmp_path):
    bundle = import_cinema(cinema_fixture.checkpoint("cls"), tmp_path / "cls")
    assert {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()} == {
        "configs/inference.json", "configs/metadata.json", "configs/cinema_config.yaml", "models/model.safetensors",
        "docs/README.md"}
    assert json.loads((bundle / "configs" / "inference.json").read_text())["bundle_root"] == str(bundle.resolve())
    network = _parse(bundle, "network")
    weights = load_file(str(bundle / "models" / "model.safetensors"))
    assert set(weights) == set(network.state_dict()) and "encoder.vit.blocks.0.attn.qkv.weight" in weights
    io = cinema_fixture.reference("cls")
    with torch.no_grad():
        torch.testing.assert_close(network({"sax": io["input.sax"]}), io["output.logits"], **cinema_fixture.tolerance)
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert metadata["cinema"]["class_names"] == ["DCM", "HCM", "MINF", "NOR", "RV"]
    assert metadata["network_data_format"]["inputs"]["image"]["num_channels"] == 2
    assert "predictor" not in json.loads((bundle / "configs" / "inference.json").read_text())
    assert "only run bundles you trust" in (bundle / "docs" / "README.md").read_text()


def test_segmentation_bundle_predicts_class_ids_on_the_input_grid(cinema_fixture, tmp_path):
    bundle = import_cinema(cinema_fixture.checkpoint("seg"), tmp_path / "seg")
    predictor = _parse(bundle, "predictor")
    assert isinstance(predictor, CineSegmentationPredictor)
    view = predictor.views["sax"]
    assert (view.image_size, view.spacing) == ((192, 192, 16), (1.0, 1.0, 10.0))  # CineMA's window and spacing
    phantom = generate_subject(0, num_frames=3)
    image, _, affine = phantom.view("sax")
    # A 96 x 96 crop (about 190 mm) around the centre: one CineMA window per frame keeps the test fast.
    start = (image.shape[0] - 96) // 2
    crop_affine = affine.copy()
    crop_affine[:3, 3] += affine[:3, :2] @ [start, start]
    cine = MetaTensor(torch.as_tensor(image[start:start + 96, start:start + 96].astype(np.float32)),
                      affine=torch.as_tensor(crop_affine))
    labels = predictor.predict(cine, "sax", frames=[1, 0])
    assert labels.dtype == np.uint8 and labels.shape == (96, 96, image.shape[2], 2)
    assert set(np.unique(labels).tolist()) <= {0, 1, 2, 3}  # random weights: nonsense, but valid class ids


def test_import_refuses_a_used_folder_and_leaves_nothing_when_it_fails(cinema_fixture, tmp_path):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "file").write_text("x")
    with pytest.raises(DataError, match="already exists and is not an empty folder"):
        import_cinema(cinema_fixture.checkpoint("reg"), tmp_path / "used")
    source = tmp_path / "source"
    source.mkdir()
    (source / "config.yaml").write_text(cinema_fixture.config("reg").read_text().replace("size: tiny", "size: giant"))
    save_file(load_file(str(cinema_fixture.checkpoint("reg"))), str(source / "reg.safetensors"))
    with pytest.raises(ConfigError, match="'giant', not a CineMA model size"):
        import_cinema(source, tmp_path / "bundles" / "reg")
    assert not (tmp_path / "bundles").exists()


def test_cine_seg_network_fine_tunes_the_imported_encoder(mae_bundle, tmp_path):
    weights = mae_bundle / "models" / "model.safetensors"
    with safe_open(str(weights), framework="pt") as handle:
        description = json.loads(handle.metadata()[ENCODER_METADATA_KEY])
    assert description["target"] == "medssl.nets.cinema.CineMAEncoder" and description["prefix"] == ""
    network = ViTSegmenter(TINY_SAX, **TINY_MODEL).load_pretrained(weights)
    assert isinstance(network.encoder, CineMAEncoder) and network.encoder.views["sax"].patch_size == (16, 16, 1)
    imported = load_file(str(weights))
    for key, value in network.encoder.state_dict().items():  # the other views' weights are skipped
        torch.testing.assert_close(value, imported[key], rtol=0, atol=0)
    logits = network(torch.rand(2, 1, 32, 32, 4), "sax")
    assert logits.shape == (2, 4, 32, 32, 4)
    logits.mean().backward()
    assert network.encoder.vit.cls_token.grad is not None
    groups = layer_decay_param_groups(network, 1e-3, 0.05, 0.75)
    assert max(g["layer_id"] for g in groups) == 2 and min(g["layer_id"] for g in groups) == 0  # 1 block (tiny)
    # A trained run reloads through the same description.
    save_file({k: v.contiguous() for k, v in network.state_dict().items()}, str(tmp_path / "run.safetensors"))
    fresh = ViTSegmenter(TINY_SAX, **TINY_MODEL).use_checkpoint_encoder(weights)
    load_network_weights(fresh, tmp_path / "run.safetensors")


def test_foreign_encoders_are_refused_where_they_cannot_be_used(mae_bundle, tmp_path):
    network = ImageLevelNetwork({"sax": {"image_size": [32, 32, 4], "patch_size": [8, 8, 1]}}, 1, embed_dim=16,
                                depth=1, num_heads=2)
    with pytest.raises(CheckpointError, match="ImageLevelNetwork cannot fine-tune a CineMAEncoder encoder"):
        network.load_pretrained(mae_bundle / "models" / "model.safetensors")
    save_file({"w": torch.zeros(1)}, str(tmp_path / "evil.safetensors"),
              metadata={ENCODER_METADATA_KEY: json.dumps({"target": "os.system", "args": {}})})
    with pytest.raises(CheckpointError, match="must name a medssl.nets class"):
        ViTSegmenter(TINY_SAX, **TINY_MODEL).load_pretrained(tmp_path / "evil.safetensors")


@pytest.mark.slow
def test_medssl_finetune_trains_and_evaluates_cine_seg_from_the_imported_encoder(mae_bundle, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cohort = ensure_cohort(tmp_path / "cohort", 1, seed=0, num_frames=3, progress=False).parent
    settings = {"views": TINY_SAX, "model": TINY_MODEL, "batch_size": 2, "samples_per_subject": 2, "cache_workers": 1,
                "num_subjects": 1, "eval_num_subjects": 1, "inference#sw_batch_size": 16, "inference#overlap": 0.0}
    sets = [item for key, value in settings.items() for item in ("--set", f"{key}={json.dumps(value)}")]
    run_dir = tmp_path / "run"
    status = cli.main(["finetune", "cine_seg", "--pretrained", str(mae_bundle / "models" / "model.safetensors"),
                       "--epochs", "1", "--data", str(cohort), "--eval-data", str(cohort), "--run-dir", str(run_dir),
                       *sets])
    assert status == 0
    trained = load_file(str(run_dir / "models" / "model.safetensors"))
    assert "encoder.view_encoders.sax.stages.0.down.conv.weight" in trained
    # evaluate.json rebuilt the CineMA encoder from the imported checkpoint to reload the run.
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["evaluation"]["num_rows"] == 2  # ED and ES of the one subject
    # So does the run folder, a bundle of its own.
    predictor = load_segmentation_predictor(run_dir)
    assert type(predictor.network.encoder).__name__ != "MultiViewEncoder"

@pytest.mark.parametrize("damage, message", [
    ("not_safetensors", "is not a safetensors file"),
    ("unknown_size", "'gigantic', not a CineMA model size"),
    ("unexpected_key", "unexpected"),
])
def test_the_command_refuses_bad_checkpoints_with_one_line_and_status_2(cinema_fixture, tmp_path, capsys, damage,
                                                                        message):
    source = tmp_path / "source"
    source.mkdir()
    checkpoint = cinema_fixture.checkpoint("cls")
    config = (checkpoint.parent / "config.yaml").read_text()
    if damage == "unknown_size":
        config = config.replace("size: tiny", "size: gigantic")
    (source / "config.yaml").write_text(config)
    if damage == "not_safetensors":
        (source / checkpoint.name).write_bytes(b"not a checkpoint")
    else:
        state = load_file(str(checkpoint))
        if damage == "unexpected_key":
            state["head.extra_bias"] = torch.zeros(3)
        save_file(state, str(source / checkpoint.name))
    assert cli.main(["import-cinema", str(source / checkpoint.name), "--out", str(tmp_path / "bundle")]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "bundle").exists()
