"""The cine_cls bundle through its real interfaces: train -> evaluate -> inference with ``python -m monai.bundle run``.

Tiny settings throughout: a 2-subject, 4-frame phantom cohort, 32x32x4 ED/ES windows on a 6 x 6 x 20 mm grid, a
2-block 16-wide encoder pretrained (here: initialised) as a ``CineMAE``; a one-subject held-out cohort.
"""

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from monai.bundle import ConfigParser
from safetensors.torch import load_file

from medssl.engine.bundles import run_bundle
from medssl.errors import CheckpointError, DataError

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "bundles" / "cine_cls"
CONFIGS = BUNDLE / "configs"
TRAIN, EVALUATE, INFERENCE = (CONFIGS / f"{name}.json" for name in ("train", "evaluate", "inference"))
ENCODER = {"embed_dim": 16, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0, "patch_embed": "linear"}
VIEWS = {"sax": {"image_size": [32, 32, 4], "spacing": [6.0, 6.0, 20.0], "patch_size": [8, 8, 1]}}
NETWORK = {"views": VIEWS, "model": {**ENCODER, "drop_path_rate": 0.1}}
TINY = {**NETWORK, "epochs": 2, "batch_size": 2, "samples_per_epoch": 4, "cache_workers": 1, "num_subjects": 2,
        "eval_num_subjects": 1}
CLASSES = ["NOR", "DCM", "HCM", "MINF", "ARV"]


def test_bundle_files_follow_the_monai_bundle_spec():
    metadata = json.loads((CONFIGS / "metadata.json").read_text())
    train, inference = json.loads(TRAIN.read_text()), json.loads(INFERENCE.read_text())
    image, pred = metadata["network_data_format"]["inputs"]["image"], metadata["network_data_format"]["outputs"]["pred"]
    assert image["spatial_shape"] == train["views"]["sax"]["image_size"] and image["num_channels"] == 2
    assert pred["num_channels"] == len(train["class_names"]) == 5 and train["class_names"] == CLASSES
    for key in ("views", "model", "class_names", "centre", "phase_view", "network_def", "finetune_mode", "inference"):
        assert inference[key] == train[key], key  # the standalone inference config builds the training network
    assert (BUNDLE / "LICENSE").read_text() == (REPO / "bundles" / "cine_mae" / "LICENSE").read_text()
    readme = (BUNDLE / "docs" / "README.md").read_text()
    assert "only run bundles you trust" in readme.lower()
    for phrase in ("--pretrained False", "--num_labelled", "--finetune_mode", "evaluate.json", "inference.json",
                   "--input_dir", "--es_frame", "torchrun", "confusion_matrix.png"):
        assert phrase in readme, phrase


@pytest.mark.slow
def test_train_evaluate_infer_through_the_monai_cli(tmp_path, cohort, pretrained, run_cli):
    run_dir = tmp_path / "run"
    common = {**TINY, "run_dir": str(run_dir), "dataset_dir": str(cohort)}
    run_cli([TRAIN], {**common, "pretrained": str(pretrained)}, tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["iterations"] == 4  # 2 subjects x 2 draws, batch 2
    weights = load_file(str(run_dir / "models" / "model.safetensors"))
    assert weights["encoder.patch_embed.sax.proj.weight"].shape == (16, 128)  # inflated to ED + ES
    assert weights["head.linear.weight"].shape == (5, 16)
    client = MlflowClient(summary["tracking_uri"])
    params = client.get_run(summary["run_id"]).data.params
    assert params["finetune_mode"] == "full" and params["pretrained"] == "True" and params["num_labelled"] == "2"
    assert params["optim.layer_decay"] == "0.75" and params["optim.label_smoothing"] == "0.1"
    assert not any(str(tmp_path) in value or "sub-0" in value for value in params.values())

    # Evaluation on the default held-out cohort (another seed, generated into the run folder).
    run_cli([TRAIN, EVALUATE], common, tmp_path)
    held_out = run_dir / "phantom" / "n1_seed1000"
    metadata = json.loads((held_out / "sub-0000" / "metadata.json").read_text())
    with open(run_dir / "evaluation" / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1 and rows[0]["true"] == metadata["group"] and rows[0]["predicted"] in CLASSES
    assert (int(rows[0]["ed_frame"]), int(rows[0]["es_frame"])) == (metadata["ed_frame"], metadata["es_frame"])
    probabilities = [float(rows[0][f"prob_{name}"]) for name in CLASSES]
    assert sum(probabilities) == pytest.approx(1.0, abs=1e-5)
    assert rows[0]["predicted"] == CLASSES[int(np.argmax(probabilities))]
    metrics = client.get_run(summary["run_id"]).data.metrics  # logged into the training's MLflow run
    assert metrics["eval_accuracy"] == float(rows[0]["predicted"] == rows[0]["true"])
    assert {"eval_macro_f1", "eval_mcc"} <= set(metrics) and "eval_auroc_macro" not in metrics  # undefined: 1 subject
    assert (run_dir / "evaluation" / "confusion_matrix.png").is_file()
    assert {a.path for a in client.list_artifacts(summary["run_id"], "figures")} == {"figures/confusion_matrix.png"}

    # Inference on a folder of NIfTI cines: ED frame 0, ES estimated, or given.
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    shutil.copy(cohort / "sub-0001" / "sax.nii.gz", inputs / "case.nii.gz")
    run_cli([INFERENCE], {**NETWORK, "run_dir": str(run_dir), "input_dir": str(inputs)}, tmp_path)
    predictions = json.loads((run_dir / "predictions" / "predictions.json").read_text())
    es = json.loads((cohort / "sub-0001" / "metadata.json").read_text())["es_frame"]
    assert [(p["file"], p["ed_frame"], p["es_frame"]) for p in predictions] == [("case.nii.gz", 0, es)]
    assert predictions[0]["predicted"] in CLASSES
    run_cli([INFERENCE], {**NETWORK, "run_dir": str(run_dir), "input_dir": str(inputs), "es_frame": 1,
                          "output_dir": str(tmp_path / "out")}, tmp_path)
    with open(tmp_path / "out" / "predictions.csv", newline="") as handle:
        assert next(csv.DictReader(handle))["es_frame"] == "1"


def test_pretrained_or_scratch_is_one_override(tmp_path, pretrained):
    def encoder(value):
        parser = ConfigParser()
        parser.read_config(str(TRAIN))
        parser.update({**NETWORK, "pretrained": value, "run_dir": str(tmp_path)})
        return parser.get_parsed_content("network_init").encoder

    state = load_file(str(pretrained))
    loaded = encoder(str(pretrained))
    torch.testing.assert_close(loaded.vit.blocks[1].mlp.fc1.weight, state["encoder.vit.blocks.1.mlp.fc1.weight"])
    kernel = state["encoder.patch_embed.sax.proj.weight"]
    torch.testing.assert_close(loaded.patch_embed["sax"].proj.weight, kernel.repeat_interleave(2, dim=1) / 2)
    for scratch in (None, False):
        assert not torch.allclose(encoder(scratch).vit.blocks[1].mlp.fc1.weight, loaded.vit.blocks[1].mlp.fc1.weight)
    with pytest.raises(RuntimeError) as raised:  # MONAI wraps errors raised inside config expressions
        encoder(str(tmp_path / "absent.safetensors"))
    assert isinstance(raised.value.__cause__, CheckpointError)


def test_bad_inputs_get_clear_errors(tmp_path, cohort, pretrained, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    common = {**TINY, "epochs": 1, "run_dir": str(tmp_path / "run"), "dataset_dir": str(cohort),
              "pretrained": str(pretrained)}
    with pytest.raises(CheckpointError, match=r"shape mismatches: patch_embed\.sax\.proj\.bias \(checkpoint \[16\] vs "
                                              r"network \[24\]\)"):
        run_bundle("cine_cls", overrides={**common, "model": {**NETWORK["model"], "embed_dim": 24}})

    no_metadata = tmp_path / "no_metadata"
    shutil.copytree(cohort, no_metadata)
    (no_metadata / "manifest.json").unlink()  # a plain folder of subject folders
    (no_metadata / "sub-0001" / "metadata.json").unlink()
    with pytest.raises(DataError, match=r"1 of 2 subjects .* have no metadata\.json with their targets"):
        run_bundle("cine_cls", overrides={**common, "dataset_dir": str(no_metadata)})

    unknown = tmp_path / "unknown_group"
    shutil.copytree(cohort, unknown)
    path = unknown / "sub-0000" / "metadata.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "group": "AMYLOID"}))
    with pytest.raises(DataError, match=r"subject #0 has disease group 'AMYLOID', which is not one of the classes"):
        run_bundle("cine_cls", overrides={**common, "dataset_dir": str(unknown)})

    one_frame = tmp_path / "one_frame"
    shutil.copytree(cohort, one_frame)
    path = one_frame / "sub-0001" / "sax.nii.gz"
    image = nib.load(str(path))
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[..., 0], image.affine), str(path))
    with pytest.raises(DataError, match=r"sub-0001/sax\.nii\.gz: expected a 4-D SAX cine \[H, W, S, T\], got shape"):
        run_bundle("cine_cls", overrides={**common, "dataset_dir": str(one_frame)})

    with pytest.raises(DataError, match="num_labelled=0 leaves the labelled set empty"):
        run_bundle("cine_cls", overrides={**common, "num_labelled": 0})
