"""The cine_seg bundle through its real interfaces: train -> evaluate -> inference with ``python -m monai.bundle run``.

Tiny settings throughout: a 2-subject, 4-frame phantom cohort, 32x32(x4) windows on a 4 mm grid, a 2-block 16-wide
encoder pretrained (here: initialised) as a ``CineMAE``; a one-subject held-out cohort for the evaluation.
"""

import csv
import json
import shutil
import sys
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
from medssl.tasks.segmentation import load_segmentation_predictor

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "bundles" / "cine_seg"
CONFIGS = BUNDLE / "configs"
TRAIN, EVALUATE, INFERENCE, MULTI_GPU = (
    CONFIGS / f"{name}.json" for name in ("train", "evaluate", "inference", "multi_gpu_train")
)
ENCODER = {"embed_dim": 16, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0, "patch_embed": "linear"}
VIEWS = {
    "sax": {"image_size": [32, 32, 4], "spacing": [4.0, 4.0, None], "patch_size": [8, 8, 1]},
    "lax_4c": {"image_size": [32, 32], "spacing": [4.0, 4.0], "patch_size": [8, 8]},
}
NETWORK = {"views": VIEWS, "model": {**ENCODER, "drop_path_rate": 0.1, "feature_size": 4}}
TINY = {**NETWORK, "epochs": 2, "batch_size": 2, "samples_per_subject": 1, "cache_workers": 1, "num_subjects": 2,
        "eval_num_subjects": 1}
STRUCTURES = ("RV", "MYO", "LV")


def test_bundle_files_follow_the_monai_bundle_spec():
    metadata = json.loads((CONFIGS / "metadata.json").read_text())
    train, inference = json.loads(TRAIN.read_text()), json.loads(INFERENCE.read_text())
    image, pred = (metadata["network_data_format"][part][name] for part, name in (("inputs", "image"),
                                                                                  ("outputs", "pred")))
    assert image["spatial_shape"] == pred["spatial_shape"] == train["views"]["sax"]["image_size"]
    assert pred["num_channels"] == len(train["class_names"]) == 4
    # The standalone inference config builds the same network as training.
    for key in ("views", "model", "class_names", "network_def", "finetune_mode", "inference"):
        assert inference[key] == train[key], key
    assert (BUNDLE / "LICENSE").read_text() == (REPO / "bundles" / "cine_mae" / "LICENSE").read_text()
    readme = (BUNDLE / "docs" / "README.md").read_text()
    assert "only run bundles you trust" in readme.lower()
    for phrase in ("--pretrained False", "--num_labelled", "--finetune_mode", "evaluate.json", "inference.json",
                   "--input_dir", "torchrun"):
        assert phrase in readme, phrase


@pytest.mark.slow
def test_train_evaluate_infer_through_the_monai_cli(tmp_path, cohort, pretrained, run_cli):
    run_dir = tmp_path / "run"
    common = {**TINY, "run_dir": str(run_dir), "dataset_dir": str(cohort)}
    run_cli([TRAIN], {**common, "pretrained": str(pretrained)}, tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["iterations"] == 2  # 2 subjects, batch 2
    weights = load_file(str(run_dir / "models" / "model.safetensors"))
    assert any(key.startswith("decoders.sax.") for key in weights) and any(
        key.startswith("decoders.lax_4c.") for key in weights)
    client = MlflowClient(summary["tracking_uri"])
    run = client.get_run(summary["run_id"])
    params = run.data.params
    assert params["finetune_mode"] == "full" and params["pretrained"] == "True" and params["num_labelled"] == "2"
    assert params["optim.layer_decay"] == "0.75" and params["model.drop_path_rate"] == "0.1"
    assert {"loss", "loss_sax", "loss_lax_4c", "lr"} <= set(run.data.metrics)
    assert not any(str(tmp_path) in value or "sub-0" in value for value in params.values())

    # Evaluation on the default held-out cohort: a phantom cohort with another seed, generated into the run folder.
    run_cli([TRAIN, EVALUATE], common, tmp_path)
    held_out = json.loads((run_dir / "phantom" / "n1_seed1000" / "manifest.json").read_text())
    assert held_out["seed"] == 1000 != json.loads((cohort / "manifest.json").read_text())["seed"]
    with open(run_dir / "evaluation" / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["subject"], r["view"], r["phase"]) for r in rows] == [
        ("0", "sax", "ED"), ("0", "sax", "ES"), ("0", "lax_4c", "ED"), ("0", "lax_4c", "ES")]
    assert rows[0]["frame"] == "0"  # the phantoms start at end-diastole
    for row in rows:
        for name in STRUCTURES:
            dice = float(row[f"dice_{name}"])
            assert 0.0 <= dice <= 1.0
    metrics = client.get_run(summary["run_id"]).data.metrics  # logged into the training's MLflow run
    for view in ("sax", "lax_4c"):
        for name in STRUCTURES:
            expected = np.mean([float(r[f"dice_{name}"]) for r in rows if r["view"] == view])
            assert metrics[f"eval_{view}_dice_{name}"] == pytest.approx(expected, abs=1e-6)
    evaluation = json.loads((run_dir / "summary.json").read_text())["evaluation"]
    assert evaluation["num_rows"] == 4 and evaluation["run_id"] == summary["run_id"]

    # Inference on a folder of NIfTI files: label maps with the input's grid and affine.
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    shutil.copy(cohort / "sub-0000" / "sax.nii.gz", inputs / "case.nii.gz")
    run_cli([INFERENCE], {**NETWORK, "run_dir": str(run_dir), "input_dir": str(inputs)}, tmp_path)
    source = nib.load(str(inputs / "case.nii.gz"))
    prediction = nib.load(str(run_dir / "predictions" / "case_seg.nii.gz"))
    assert prediction.shape == source.shape and prediction.get_data_dtype() == np.uint8
    np.testing.assert_allclose(prediction.affine, source.affine, atol=1e-6)
    assert set(np.unique(np.asarray(prediction.dataobj)).tolist()) <= {0, 1, 2, 3}

    # The run folder is itself a bundle with the settings it was trained with: no overrides needed to use it.
    exported = json.loads((run_dir / "configs" / "inference.json").read_text())
    assert exported["views"] == VIEWS and exported["model"] == NETWORK["model"]
    assert (run_dir / "configs" / "metadata.json").is_file()
    run_cli([run_dir / "configs" / "inference.json"], {"input_dir": str(inputs), "output_dir": str(tmp_path / "own")},
            tmp_path)
    np.testing.assert_array_equal(np.asarray(nib.load(str(tmp_path / "own" / "case_seg.nii.gz")).dataobj),
                                  np.asarray(prediction.dataobj))
    predictor = load_segmentation_predictor(run_dir)
    assert predictor.views["sax"].image_size == tuple(VIEWS["sax"]["image_size"])


def test_pretrained_or_scratch_is_one_override(tmp_path, pretrained):
    def encoder_weight(value):
        parser = ConfigParser()
        parser.read_config(str(TRAIN))
        parser.update({**NETWORK, "pretrained": value, "run_dir": str(tmp_path)})
        return parser.get_parsed_content("network_init").encoder.vit.blocks[1].mlp.fc1.weight

    torch.testing.assert_close(encoder_weight(str(pretrained)), load_file(str(pretrained))[
        "encoder.vit.blocks.1.mlp.fc1.weight"])
    for scratch in (None, False):  # False on MONAI's command line, which drops None overrides
        assert not torch.allclose(encoder_weight(scratch), encoder_weight(str(pretrained)))
    with pytest.raises(RuntimeError) as raised:  # MONAI wraps errors raised inside config expressions
        encoder_weight(str(tmp_path / "absent.safetensors"))
    assert isinstance(raised.value.__cause__, CheckpointError)
    assert "does not exist: run the cine_mae bundle first" in str(raised.value.__cause__)


def copy_cohort(cohort, destination):
    shutil.copytree(cohort, destination)
    return destination


def test_bad_inputs_get_clear_errors(tmp_path, cohort, pretrained, no_tracking_env):
    common = {**TINY, "epochs": 1, "run_dir": str(tmp_path / "run"), "dataset_dir": str(cohort),
              "pretrained": str(pretrained)}
    wider = {**NETWORK["model"], "embed_dim": 24}
    with pytest.raises(CheckpointError, match=r"the pretrained encoder in \S+model\.safetensors does not match "
                                              r"MultiViewEncoder.*shape mismatches: patch_embed\.lax_4c\.proj\.bias "
                                              r"\(checkpoint \[16\] vs network \[24\]\)"):
        run_bundle("cine_seg", overrides={**common, "model": wider})

    wrong_ids = copy_cohort(cohort, tmp_path / "wrong_ids")
    label_path = wrong_ids / "sub-0001" / "sax_label.nii.gz"
    label = nib.load(str(label_path))
    nib.save(nib.Nifti1Image(np.where(np.asarray(label.dataobj) == 3, 5, np.asarray(label.dataobj)).astype(np.uint8),
                             label.affine), str(label_path))
    with pytest.raises(DataError, match=r"sub-0001/sax_label\.nii\.gz holds values 5 outside the class ids 0\.\.3"):
        run_bundle("cine_seg", overrides={**common, "dataset_dir": str(wrong_ids)})

    wrong_shape = copy_cohort(cohort, tmp_path / "wrong_shape")
    label_path = wrong_shape / "sub-0000" / "lax_4c_label.nii.gz"
    label = nib.load(str(label_path))
    nib.save(nib.Nifti1Image(np.asarray(label.dataobj)[:-1], label.affine), str(label_path))
    with pytest.raises(DataError, match=r"lax_4c_label\.nii\.gz has shape \(\d+, \d+, 1, 4\) but its image .* has"):
        run_bundle("cine_seg", overrides={**common, "dataset_dir": str(wrong_shape)})

    unlabelled = tmp_path / "unlabelled"
    for subject in ("sub-0000", "sub-0001"):
        (unlabelled / subject).mkdir(parents=True)
        for view in ("sax", "lax_4c"):
            shutil.copy(cohort / subject / f"{view}.nii.gz", unlabelled / subject / f"{view}.nii.gz")
    with pytest.raises(DataError, match=r"2 of 2 subjects .* have no 'sax' label"):
        run_bundle("cine_seg", overrides={**common, "dataset_dir": str(unlabelled)})
    with pytest.raises(DataError, match="num_labelled=0 leaves the labelled set empty"):
        run_bundle("cine_seg", overrides={**common, "num_labelled": 0})


@pytest.mark.slow
def test_torchrun_fine_tunes_from_scratch_with_two_gloo_processes(tmp_path, cohort, run_cli):
    run_dir = tmp_path / "run"
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    overrides = {**TINY, "epochs": 1, "samples_per_subject": 2, "run_dir": str(run_dir), "dataset_dir": str(cohort),
                 "pretrained": False}  # no checkpoint: from scratch
    result = run_cli([TRAIN, MULTI_GPU], overrides, tmp_path, launcher=launcher)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["iterations"] == 1  # 2 subjects x 2 windows, split over 2 ranks, batch 2
    assert MlflowClient(summary["tracking_uri"]).get_run(summary["run_id"]).data.params["pretrained"] == "False"
    state = torch.load(sorted((run_dir / "checkpoints").iterdir())[-1], weights_only=True)
    assert any(key.startswith("decoders.sax.") for key in state["network"])  # the segmenter, saved unwrapped
    log = result.stdout + result.stderr
    assert log.count("wrapped SupervisedTask in DistributedDataParallel (2 processes, gloo)") == 1
