"""The cine_landmark bundle through its real interfaces: train -> evaluate -> inference with ``monai.bundle run``.

Tiny settings throughout: a 2-subject, 4-frame phantom cohort, 32x32 LAX-4C windows on a 4 mm grid, a 2-block
16-wide encoder pretrained (here: initialised) as a ``CineMAE``; a one-subject held-out cohort for the evaluation.
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
from medssl.tasks.landmarks import LANDMARK_NAMES, load_landmarks, pixel_to_patient

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "bundles" / "cine_landmark"
CONFIGS = BUNDLE / "configs"
TRAIN, EVALUATE, INFERENCE = (CONFIGS / f"{name}.json" for name in ("train", "evaluate", "inference"))
ENCODER = {"embed_dim": 16, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0, "patch_embed": "linear"}
VIEWS = {"lax_4c": {"image_size": [32, 32], "spacing": [4.0, 4.0], "patch_size": [8, 8]}}
NETWORK = {"views": VIEWS, "model": {**ENCODER, "drop_path_rate": 0.1, "feature_size": 4}}
TINY = {**NETWORK, "epochs": 2, "batch_size": 2, "samples_per_subject": 1, "cache_workers": 1, "num_subjects": 2,
        "eval_num_subjects": 1, "max_shift_mm": 8.0}


def test_bundle_files_follow_the_monai_bundle_spec():
    metadata = json.loads((CONFIGS / "metadata.json").read_text())
    train, inference = json.loads(TRAIN.read_text()), json.loads(INFERENCE.read_text())
    image, pred = (metadata["network_data_format"][part][name] for part, name in (("inputs", "image"),
                                                                                  ("outputs", "pred")))
    assert image["spatial_shape"] == pred["spatial_shape"] == train["views"]["lax_4c"]["image_size"]
    assert pred["num_channels"] == len(train["landmark_names"]) == 3
    assert train["landmark_names"] == list(LANDMARK_NAMES)
    # The standalone inference config builds the same network and read-out as training.
    for key in ("views", "model", "landmark_names", "network_def", "finetune_mode", "heatmap", "landmark_view"):
        assert inference[key] == train[key], key
    for name in ("LICENSE",):
        assert (BUNDLE / name).read_text() == (REPO / "bundles" / "cine_seg" / name).read_text()
    for name in ("logging.conf", "multi_gpu_train.json"):
        assert (CONFIGS / name).is_file()
    readme = (BUNDLE / "docs" / "README.md").read_text()
    assert "only run bundles you trust" in readme.lower()
    for phrase in ("--pretrained False", "--num_labelled", "--finetune_mode", "evaluate.json", "inference.json",
                   "--input_dir", "torchrun", "soft-argmax"):
        assert phrase in readme, phrase


@pytest.mark.slow
def test_train_evaluate_infer_through_the_monai_cli(tmp_path, cohort, pretrained, run_cli):
    run_dir = tmp_path / "run"
    common = {**TINY, "run_dir": str(run_dir), "dataset_dir": str(cohort)}
    run_cli([TRAIN], {**common, "pretrained": str(pretrained)}, tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["iterations"] == 2  # 2 subjects, batch 2
    weights = load_file(str(run_dir / "models" / "model.safetensors"))
    assert weights["decoders.lax_4c.head.conv.conv.weight"].shape[0] == 3  # one heatmap per landmark
    client = MlflowClient(summary["tracking_uri"])
    run = client.get_run(summary["run_id"])
    params = run.data.params
    assert params["finetune_mode"] == "full" and params["pretrained"] == "True" and params["num_labelled"] == "2"
    assert params["optim.layer_decay"] == "0.75" and params["heatmap.sigma_mm"] == "3.0"
    assert {"loss", "loss_lax_4c", "lr"} <= set(run.data.metrics)
    assert not any(str(tmp_path) in value or "sub-0" in value for value in params.values())

    # Evaluation on the default held-out cohort: a phantom cohort with another seed, generated into the run folder.
    run_cli([TRAIN, EVALUATE], common, tmp_path)
    held_out_dir = run_dir / "phantom" / "n1_seed1000"
    assert json.loads((held_out_dir / "manifest.json").read_text())["seed"] == 1000
    with open(run_dir / "evaluation" / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    held_out = json.loads((held_out_dir / "sub-0000" / "metadata.json").read_text())
    assert [(r["subject"], r["phase"], r["frame"]) for r in rows] == [
        ("0", "ED", "0"), ("0", "ES", str(held_out["es_frame"]))]
    for row in rows:
        errors = [float(row[f"error_mm_{name}"]) for name in LANDMARK_NAMES]
        assert all(error >= 0 for error in errors)
        assert float(row["mean_error_mm"]) == pytest.approx(np.mean(errors), abs=1e-6)
        assert float(row["within_5mm_pct"]) == pytest.approx(100 * np.mean([e <= 5.0 for e in errors]))
    metrics = client.get_run(summary["run_id"]).data.metrics  # logged into the training's MLflow run
    for column in ("mean_error_mm", "within_5mm_pct", *(f"error_mm_{name}" for name in LANDMARK_NAMES)):
        assert metrics[f"eval_{column}"] == pytest.approx(np.mean([float(r[column]) for r in rows]), abs=1e-6)
    assert (run_dir / "evaluation" / "landmarks.png").read_bytes()[:4] == b"\x89PNG"
    artifacts = {item.path for item in client.list_artifacts(summary["run_id"], "evaluation")}
    assert {"evaluation/metrics.csv", "evaluation/landmarks.png"} <= artifacts

    # Inference on a folder of LAX-4C NIfTI cines: landmarks per frame, in the file's pixels and in patient mm.
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    shutil.copy(cohort / "sub-0000" / "lax_4c.nii.gz", inputs / "case.nii.gz")
    run_cli([INFERENCE], {**NETWORK, "run_dir": str(run_dir), "input_dir": str(inputs)}, tmp_path)
    predicted = load_landmarks(run_dir / "predictions" / "case_landmarks.json", num_frames=4)
    affine = nib.load(str(inputs / "case.nii.gz")).affine
    np.testing.assert_allclose(predicted["patient_mm"], pixel_to_patient(predicted["pixel"], affine), atol=1e-3)
    with open(run_dir / "predictions" / "case_landmarks.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 4 * 3 and [row["landmark"] for row in table[:3]] == list(LANDMARK_NAMES)


def test_pretrained_or_scratch_is_one_override(tmp_path, pretrained):
    def encoder_weight(value):
        parser = ConfigParser()
        parser.read_config(str(TRAIN))
        parser.update({**NETWORK, "pretrained": value, "run_dir": str(tmp_path)})
        return parser.get_parsed_content("network_init").encoder.vit.blocks[1].mlp.fc1.weight

    torch.testing.assert_close(encoder_weight(str(pretrained)), load_file(str(pretrained))[
        "encoder.vit.blocks.1.mlp.fc1.weight"])
    assert not torch.allclose(encoder_weight(False), encoder_weight(str(pretrained)))


def edited_cohort(cohort, destination, subject, edit):
    """A copy of the cohort whose ``subject``'s metadata is passed through ``edit``."""
    shutil.copytree(cohort, destination)
    path = destination / subject / "metadata.json"
    metadata = json.loads(path.read_text())
    edit(metadata)
    path.write_text(json.dumps(metadata))
    return destination


def test_bad_inputs_get_clear_errors(tmp_path, cohort, pretrained, no_tracking_env):
    common = {**TINY, "epochs": 1, "run_dir": str(tmp_path / "run"), "dataset_dir": str(cohort),
              "pretrained": str(pretrained)}
    wider = {**NETWORK["model"], "embed_dim": 24}
    with pytest.raises(CheckpointError, match=r"the pretrained encoder in \S+model\.safetensors does not match "
                                              r"MultiViewEncoder.*shape mismatches: patch_embed\.lax_4c\.proj\.bias "
                                              r"\(checkpoint \[16\] vs network \[24\]\)"):
        run_bundle("cine_landmark", overrides={**common, "model": wider})

    without = edited_cohort(cohort, tmp_path / "without", "sub-0001", lambda m: m.pop("landmarks_lax_4c"))
    with pytest.raises(DataError, match=r"sub-0001/metadata\.json has no 'landmarks_lax_4c' with 'pixel' coordinates"):
        run_bundle("cine_landmark", overrides={**common, "dataset_dir": str(without)})

    def drop_a_frame(metadata):
        metadata["landmarks_lax_4c"]["pixel"] = metadata["landmarks_lax_4c"]["pixel"][:-1]

    short = edited_cohort(cohort, tmp_path / "short", "sub-0000", drop_a_frame)
    with pytest.raises(DataError, match=r"sub-0000/metadata\.json: 'landmarks_lax_4c\.pixel' must be \[T, 3, 2\] with "
                                        r"T = 4 frames, got shape \(3, 3, 2\)"):
        run_bundle("cine_landmark", overrides={**common, "dataset_dir": str(short)})

    # Another view in place of the LAX-4C: a LAX-2C slice (same shape, another plane) or a SAX stack.
    for view, message in (
        ("lax_2c", r"land up to \d+\.\d mm from their patient_mm through the affine of \S+sub-0001/lax_4c\.nii\.gz"
                   r".*is it the lax_4c view\?"),
        ("sax", r"sub-0001/lax_4c\.nii\.gz: expected a 4-D lax_4c cine \[H, W, 1, T\]"),
    ):
        swapped = tmp_path / f"swapped_{view}"
        shutil.copytree(cohort, swapped)
        shutil.copy(swapped / "sub-0001" / f"{view}.nii.gz", swapped / "sub-0001" / "lax_4c.nii.gz")
        with pytest.raises(DataError, match=message):
            run_bundle("cine_landmark", overrides={**common, "dataset_dir": str(swapped)})

    with pytest.raises(DataError, match="num_labelled=0 leaves the labelled set empty"):
        run_bundle("cine_landmark", overrides={**common, "num_labelled": 0})

    # Inference: no folder, and a SAX stack among the inputs.
    network = run_bundle("cine_landmark", overrides=common)  # weights to run inference with
    inference = {**NETWORK, "run_dir": network["run_dir"]}
    with pytest.raises(DataError, match="no input folder given: pass --input_dir"):
        run_bundle("cine_landmark", ["configs/inference.json"], inference)
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    shutil.copy(cohort / "sub-0000" / "sax.nii.gz", inputs / "stack.nii.gz")
    with pytest.raises(DataError, match=r"stack\.nii\.gz: expected a lax_4c image \[H, W\], \[H, W, 1\] or "
                                        r"\[H, W, 1, T\], got shape \(\d+, \d+, \d+, 4\)"):
        run_bundle("cine_landmark", ["configs/inference.json"], {**inference, "input_dir": str(inputs)})
