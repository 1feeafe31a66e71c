"""MLflow tracking: the store in the run folder, params, per-iteration metrics, artifacts, summary, resuming."""

import json

import pytest
import torch
from mlflow.tracking import MlflowClient

from medssl.engine.tracking import MLflowTracker, flatten_params, log_to_run_folder, resolve_tracking
from medssl.engine.trainer import SSLTrainer


def test_default_store_is_sqlite_in_the_run_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri, artifacts = resolve_tracking(tmp_path / "run")
    assert uri == f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}"
    assert artifacts == (tmp_path / "run" / "mlartifacts").as_uri()
    assert resolve_tracking(tmp_path, "http://server:5000") == ("http://server:5000", None)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://shared:5000")
    assert resolve_tracking(tmp_path, "http://server:5000") == ("http://shared:5000", None)


def test_flatten_params():
    params = {"epochs": 2, "model": {"depth": 4, "views": {"sax": {"image_size": [8, 8, 2]}}}, "betas": (0.9, 0.95)}
    assert flatten_params(params) == {
        "epochs": "2", "model.depth": "4", "model.views.sax.image_size": "[8, 8, 2]", "betas": "[0.9, 0.95]"
    }


def train(toy_class, batches, tracker, epochs):
    torch.manual_seed(0)
    network = toy_class()
    optimizer = torch.optim.SGD(network.parameters(), lr=0.01)
    trainer = SSLTrainer("cpu", epochs, batches, network, optimizer, train_handlers=[tracker])
    trainer.run()
    return trainer


def test_run_is_logged_and_summarised(tmp_path, monkeypatch, toy_class, make_batches):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "run"
    weights = tmp_path / "weights.safetensors"
    weights.write_bytes(b"weights")
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "train.json").write_text("{}")
    params = {"epochs": 2, "model": {"depth": 1}}
    tracker = MLflowTracker(run_dir, params, experiment_name="exp", artifacts={"model": weights, "configs": configs})
    trainer = train(toy_class, make_batches(3), tracker, epochs=2)
    tracker.log_artifact(weights, "figures")  # stands in for a figure
    summary = tracker.finish(trainer)

    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED"
    assert {"epochs": "2", "model.depth": "1"}.items() <= run.data.params.items()
    for key in ("loss", "loss_a", "loss_b", "lr"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [1, 2, 3, 4, 5, 6]
    assert [m.value for m in client.get_metric_history(run.info.run_id, "lr")] == [0.01] * 6
    losses = [m.value for m in client.get_metric_history(run.info.run_id, "loss")]
    epoch_losses = client.get_metric_history(run.info.run_id, "epoch_loss")
    assert [m.step for m in epoch_losses] == [1, 2]
    assert epoch_losses[1].value == pytest.approx(sum(losses[3:]) / 3)
    folders = ("model", "configs", "figures")
    artifacts = {a.path for folder in folders for a in client.list_artifacts(run.info.run_id, folder)}
    assert artifacts == {"model/weights.safetensors", "configs/train.json", "figures/weights.safetensors"}
    assert run.info.artifact_uri.startswith((run_dir / "mlartifacts").as_uri())

    assert json.loads((run_dir / "summary.json").read_text()) == summary
    assert summary["iterations"] == 6 and summary["epochs"] == 2
    assert summary["final_loss"] == pytest.approx(losses[-1])
    assert summary["figure"] == str(weights) and summary["tracking_uri"] == f"sqlite:///{run_dir / 'mlflow.db'}"


def test_restarted_run_continues_the_recorded_mlflow_run(tmp_path, monkeypatch, toy_class, make_batches):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    first = MLflowTracker(tmp_path, {"lr": 0.01})
    train(toy_class, make_batches(2), first, epochs=1)  # "killed": finish() never called
    second = MLflowTracker(tmp_path, {"lr": 0.01, "new": 1})
    trainer = train(toy_class, make_batches(2), second, epochs=1)
    summary = second.finish(trainer)
    assert summary["run_id"] == first.run_id
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert len(client.search_runs([client.get_experiment_by_name("medssl").experiment_id])) == 1
    assert {"lr": "0.01", "new": "1"}.items() <= client.get_run(first.run_id).data.params.items()


def test_a_new_run_folder_never_adopts_another_folders_unfinished_run(tmp_path, monkeypatch, toy_class, make_batches):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store = f"sqlite:///{tmp_path / 'shared.db'}"
    killed = MLflowTracker(tmp_path / "a", tracking_uri=store)
    train(toy_class, make_batches(1), killed, epochs=1)  # left RUNNING
    other = MLflowTracker(tmp_path / "b", tracking_uri=store)
    trainer = train(toy_class, make_batches(1), other, epochs=1)
    assert other.finish(trainer)["run_id"] != killed.run_id


def test_results_after_training_land_in_the_folders_run(tmp_path, monkeypatch, toy_class, make_batches):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "run"
    tracker = MLflowTracker(run_dir, {"epochs": 1}, experiment_name="exp")
    summary = tracker.finish(train(toy_class, make_batches(2), tracker, epochs=1))
    table = tmp_path / "metrics.csv"
    table.write_text("subject,dice\n0,0.9\n")
    run_id = log_to_run_folder(run_dir, {"eval_dice": 0.9, "eval_hd95": float("nan")}, {"evaluation": table})
    assert run_id == summary["run_id"]  # the training's run, not a new one
    client = MlflowClient(summary["tracking_uri"])
    metrics = client.get_run(run_id).data.metrics
    assert metrics["eval_dice"] == 0.9 and "eval_hd95" not in metrics  # non-finite values are not logged
    assert [a.path for a in client.list_artifacts(run_id, "evaluation")] == ["evaluation/metrics.csv"]

    fresh = tmp_path / "fresh"  # a folder without a training run gets one of its own, recorded for later calls
    first = log_to_run_folder(fresh, {"eval_dice": 0.5}, experiment_name="exp")
    assert first != run_id and log_to_run_folder(fresh, {"eval_dice": 0.6}, experiment_name="exp") == first
    assert json.loads((fresh / "mlflow_run.json").read_text())["run_id"] == first
    history = MlflowClient(resolve_tracking(fresh)[0]).get_metric_history(first, "eval_dice")
    assert [m.value for m in history] == [0.5, 0.6]
