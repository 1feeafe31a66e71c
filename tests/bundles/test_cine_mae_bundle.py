"""The cine_mae bundle through its real interfaces: ``python -m monai.bundle run``, ``torchrun``, ``run_bundle``.

Tiny settings throughout: 2 phantom subjects, 32x32(x4) views, a one-block model, a few iterations per epoch.
"""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from monai.bundle import ConfigWorkflow
from safetensors.torch import load_file

from medssl.data.phantom import ensure_cohort
from medssl.engine.bundles import run_bundle
from medssl.engine.checkpoints import latest_checkpoint
from medssl.errors import CheckpointError, ConfigError, DataError
from medssl.methods.cine_mae import CineMAE

REPO = Path(__file__).resolve().parents[2]
BUNDLE = REPO / "bundles" / "cine_mae"
TRAIN = BUNDLE / "configs" / "train.json"
MULTI_GPU = BUNDLE / "configs" / "multi_gpu_train.json"
SUBJECTS, SAMPLES_PER_SUBJECT, BATCH = 2, 2, 2
ITERATIONS_PER_EPOCH = math.ceil(SUBJECTS * SAMPLES_PER_SUBJECT / BATCH)
TINY = {
    "num_subjects": SUBJECTS,
    "samples_per_subject": SAMPLES_PER_SUBJECT,
    "batch_size": BATCH,
    "cache_workers": 1,
    "figure_interval": 1,
    "views": {
        "sax": {"image_size": [32, 32, 4], "spacing": [6.0, 6.0, 10.0], "patch_size": [8, 8, 1]},
        "lax_2c": {"image_size": [32, 32], "spacing": [6.0, 6.0], "patch_size": [8, 8]},
        "lax_4c": {"image_size": [32, 32], "spacing": [6.0, 6.0], "patch_size": [8, 8]},
    },
    "model": {
        "embed_dim": 32, "depth": 1, "num_heads": 2, "decoder_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2,
        "mlp_ratio": 2.0, "mask_ratio": 0.75, "norm_pix_loss": False, "patch_embed": "linear",
    },
}


def tiny_network(model=None):
    views = {
        name: {"image_size": view["image_size"], "patch_size": view["patch_size"], "in_channels": 1}
        for name, view in TINY["views"].items()
    }
    return CineMAE(views=views, **(model or TINY["model"]))


def cli_args(overrides):
    """``--key value`` pairs for the MONAI bundle CLI (python-fire reads Python literals)."""
    args = []
    for key, value in overrides.items():
        args += [f"--{key}", value if isinstance(value, str) else repr(value)]
    return args


def bundle_command(overrides, config_files=(TRAIN,), launcher=(sys.executable,)):
    configs = str(config_files[0]) if len(config_files) == 1 else repr([str(f) for f in config_files])
    return [*launcher, "-m", "monai.bundle", "run", "--config_file", configs, *cli_args(overrides)]


def bundle_env():
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    env["PYTHONWARNINGS"] = "ignore"
    env["OMP_NUM_THREADS"] = "1"
    return env


def warmup_cosine_lr(step, base_lr, warmup, total):
    """LR used at 1-based iteration ``step``: linear warmup from 0, then half a cosine to 0 (MONAI's schedule)."""
    s = step - 1
    if s < warmup:
        return base_lr * s / warmup
    return base_lr * 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(1, total - warmup)))


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return ensure_cohort(tmp_path_factory.mktemp("cohort"), SUBJECTS, seed=0).parent


@pytest.fixture
def no_tracking_env(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def test_bundle_files_follow_the_monai_bundle_spec():
    metadata = json.loads((BUNDLE / "configs" / "metadata.json").read_text())
    train = json.loads(TRAIN.read_text())
    # network_data_format describes the exported SAX encoder (what MONAI's tools run), not the training network.
    sax = train["views"]["sax"]
    data_format = metadata["network_data_format"]
    assert data_format["inputs"]["image"]["spatial_shape"] == sax["image_size"]
    grid = [size // patch for size, patch in zip(sax["image_size"], sax["patch_size"])]
    assert data_format["outputs"]["pred"]["spatial_shape"] == grid
    assert data_format["outputs"]["pred"]["num_channels"] == train["model"]["embed_dim"]
    assert (BUNDLE / "LICENSE").read_text().split()[:4] == ["Apache", "License", "Version", "2.0,"]
    readme = (BUNDLE / "docs" / "README.md").read_text()
    assert "only run bundles you trust" in readme.lower() and "--dataset_dir" in readme and "torchrun" in readme


def test_bundle_provides_monai_train_properties(tmp_path, cohort):
    overrides = {**TINY, "dataset_dir": str(cohort), "run_dir": str(tmp_path)}
    workflow = ConfigWorkflow(config_file=str(TRAIN), workflow_type="train", logging_file=False, **overrides)
    workflow.initialize()
    assert workflow.check_properties() == []
    assert workflow.max_epochs == json.loads(TRAIN.read_text())["epochs"]


def test_default_run_trains_on_a_phantom_cohort_tracked_in_mlflow(tmp_path):
    run_dir = tmp_path / "run"
    epochs = 2
    result = subprocess.run(
        bundle_command({"run_dir": str(run_dir), "epochs": epochs, **TINY}), cwd=tmp_path, env=bundle_env(),
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run_dir / "phantom" / f"n{SUBJECTS}_seed0" / "manifest.json").is_file()  # generated into the run folder

    summary = json.loads((run_dir / "summary.json").read_text())
    total = epochs * ITERATIONS_PER_EPOCH
    assert summary["iterations"] == total and summary["epochs"] == epochs
    assert summary["tracking_uri"] == f"sqlite:///{run_dir / 'mlflow.db'}"
    client = MlflowClient(summary["tracking_uri"])
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["epochs"] == str(epochs) and params["model.depth"] == "1" and params["optim.lr"] == "0.001"
    assert params["views.sax.image_size"] == "[32, 32, 4]" and params["optim.betas"] == "[0.9, 0.95]"
    assert not any(str(tmp_path) in value or "sub-0" in value for value in params.values())  # no paths or identifiers
    for key in ("loss", "lr", "loss_sax", "loss_lax_2c", "loss_lax_4c"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == list(range(1, total + 1)), key
    lrs = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "lr")}
    assert lrs == pytest.approx({s: warmup_cosine_lr(s, 1e-3, ITERATIONS_PER_EPOCH, total) for s in lrs})
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "loss")]
    assert summary["final_loss"] == pytest.approx(losses[-1])

    figures = [a.path for a in client.list_artifacts(run.info.run_id, "figures")]
    assert figures == ["figures/reconstruction_epoch=0001.png", "figures/reconstruction_epoch=0002.png"]
    local_figure = client.download_artifacts(run.info.run_id, figures[-1], str(tmp_path))
    assert Path(local_figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary["figure"] == str(run_dir / "figures" / "reconstruction_epoch=0002.png")
    configs = {a.path for a in client.list_artifacts(run.info.run_id, "configs")}
    assert configs >= {"configs/train.json", "configs/metadata.json"}
    weights = client.download_artifacts(run.info.run_id, "model/model.safetensors", str(tmp_path))
    network = tiny_network()
    network.load_state_dict(load_file(weights))  # strict: the artifact is the trained network


def test_run_bundle_on_a_nifti_folder_with_a_tracking_server_uri(tmp_path, monkeypatch, cohort):
    folder = tmp_path / "nifti"
    for index, subject in enumerate(sorted(p for p in cohort.iterdir() if p.is_dir())):
        (folder / f"case{index}").mkdir(parents=True)
        for view in ("sax", "lax_2c", "lax_4c"):
            shutil.copy(subject / f"{view}.nii.gz", folder / f"case{index}" / f"{view}.nii.gz")
    store = f"sqlite:///{tmp_path / 'server' / 'store.db'}"
    (tmp_path / "server").mkdir()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    run_dir = tmp_path / "run"
    overrides = {"dataset_dir": str(folder), "run_dir": str(run_dir), "epochs": 1, **TINY}
    summary = run_bundle("cine_mae", overrides=overrides)
    assert summary["tracking_uri"] == store and summary["iterations"] == ITERATIONS_PER_EPOCH
    assert not (run_dir / "phantom").exists() and not (run_dir / "mlflow.db").exists()
    assert MlflowClient(store).get_run(summary["run_id"]).info.status == "FINISHED"
    assert Path(summary["artifacts"]["model"]).is_file()


def test_mistyped_key_and_missing_data(tmp_path, no_tracking_env):
    with pytest.raises(ConfigError, match="unknown config key 'epoch' for bundle 'cine_mae'. Did you mean 'epochs'"):
        run_bundle("cine_mae", overrides={"epoch": 1})
    with pytest.raises(DataError, match="nowhere does not exist"):
        run_bundle("cine_mae", overrides={"dataset_dir": str(tmp_path / "nowhere"), "run_dir": str(tmp_path / "r")})


def test_checkpoints_from_another_architecture_are_refused(tmp_path, cohort, no_tracking_env):
    run_dir = tmp_path / "run"
    common = {**TINY, "dataset_dir": str(cohort), "run_dir": str(run_dir)}
    first = run_bundle("cine_mae", overrides={**common, "epochs": 1})
    deeper = {**TINY["model"], "depth": 2}
    expected = r"checkpoint_epoch=1\.pt does not match CineMAE.*missing keys: \S*blocks\.1\."
    with pytest.raises(CheckpointError, match=expected):
        run_bundle("cine_mae", overrides={**common, "epochs": 2, "model": deeper})
    wider = {**TINY["model"], "embed_dim": 48}
    with pytest.raises(CheckpointError, match=r"model\.safetensors does not match CineMAE.*shape mismatches"):
        run_bundle("cine_mae", overrides={**common, "run_dir": str(tmp_path / "other"), "model": wider,
                                          "init_weights": first["artifacts"]["model"]})


@pytest.mark.slow
def test_killed_run_resumes_at_its_checkpoint_with_the_same_lr_schedule(tmp_path, cohort):
    run_dir = tmp_path / "run"
    epochs = 8
    command = bundle_command({"run_dir": str(run_dir), "epochs": epochs, "dataset_dir": str(cohort), **TINY,
                              "figure_interval": epochs})
    process = subprocess.Popen(command, cwd=tmp_path, env=bundle_env(), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while latest_checkpoint(run_dir / "checkpoints") is None and time.time() < deadline and process.poll() is None:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL  # killed mid-training, not finished
    checkpoint = latest_checkpoint(run_dir / "checkpoints")
    saved_iteration = torch.load(checkpoint, weights_only=True)["trainer"]["iteration"]
    assert 0 < saved_iteration < epochs * ITERATIONS_PER_EPOCH

    restart = subprocess.run(command, cwd=tmp_path, env=bundle_env(), capture_output=True, text=True, timeout=300)
    assert restart.returncode == 0, restart.stderr[-3000:]
    log = restart.stdout + restart.stderr
    saved_epoch = saved_iteration // ITERATIONS_PER_EPOCH
    assert f"resumed from {checkpoint} at epoch {saved_epoch}, iteration {saved_iteration}" in log

    summary = json.loads((run_dir / "summary.json").read_text())
    total = epochs * ITERATIONS_PER_EPOCH
    assert summary["iterations"] == total
    client = MlflowClient(summary["tracking_uri"])
    assert len(client.search_runs([client.get_experiment_by_name("medssl_cine_mae").experiment_id])) == 1
    history = client.get_metric_history(summary["run_id"], "lr")
    assert {m.step for m in history} == set(range(1, total + 1))
    # Steps logged before the kill and again after the restart agree: the schedule continued in place.
    for metric in history:
        expected = warmup_cosine_lr(metric.step, 1e-3, ITERATIONS_PER_EPOCH, total)
        assert metric.value == pytest.approx(expected), metric.step


@pytest.mark.slow
def test_torchrun_trains_with_two_gloo_processes(tmp_path, cohort):
    run_dir = tmp_path / "run"
    epochs = 2
    launcher = (sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2")
    command = bundle_command({"run_dir": str(run_dir), "epochs": epochs, "dataset_dir": str(cohort), **TINY},
                             config_files=(TRAIN, MULTI_GPU), launcher=launcher)
    result = subprocess.run(command, cwd=tmp_path, env=bundle_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    # Each rank sees half the samples (DistributedSampler pads to an even split).
    per_rank = math.ceil(math.ceil(SUBJECTS * SAMPLES_PER_SUBJECT / 2) / BATCH)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["iterations"] == epochs * per_rank
    client = MlflowClient(summary["tracking_uri"])
    assert len(client.search_runs([client.get_experiment_by_name("medssl_cine_mae").experiment_id])) == 1
    steps = [m.step for m in client.get_metric_history(summary["run_id"], "loss")]
    assert steps == list(range(1, epochs * per_rank + 1))
    state = torch.load(latest_checkpoint(run_dir / "checkpoints"), weights_only=True)
    assert not any(key.startswith("module.") for key in state["network"])  # saved unwrapped from DDP
    log = result.stdout + result.stderr
    assert log.count("wrapped CineMAE in DistributedDataParallel (2 processes, gloo)") == 1  # logged by rank 0 only
