"""The shared study machinery: resumable runs, outputs, experiment, checkpoint check, mean ± sd."""

import json
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from medssl.errors import CheckpointError
from medssl.studies.runner import given_checkpoint, mean_sd, run_resumable, study_experiment, write_study_outputs


@dataclass(frozen=True)
class Run:
    name: str


def table(rows):
    return f"| runs |\n|---|\n| {len(rows)} |"


def figure(rows, path):
    path.write_bytes(b"png")
    return path


def outputs(rows, out_dir):
    return write_study_outputs(rows, out_dir, "demo", table, figure)


def test_runs_are_trained_once_and_outputs_rewritten_after_each(tmp_path):
    trained = []

    def train(run, run_dir):
        (run_dir / "checkpoints").mkdir(parents=True)
        trained.append(run.name)
        return {"run": run.name, "score": len(trained)}

    runs = [Run("a"), Run("b")]
    rows, written, ran = run_resumable(runs, tmp_path, train, outputs, "demo", progress=False)
    assert ran == 2 and trained == ["a", "b"] and rows == [{"run": "a", "score": 1}, {"run": "b", "score": 2}]
    assert json.loads((tmp_path / "runs" / "b" / "result.json").read_text()) == rows[1]
    assert not (tmp_path / "runs" / "a" / "checkpoints").exists()  # only needed while training
    assert pd.read_csv(written["csv"]).to_dict("records") == rows
    assert written["markdown"].read_text() == "| runs |\n|---|\n| 2 |\n" and written["table"].endswith("| 2 |")
    assert written["figure"] == tmp_path / "demo.png"

    (tmp_path / "runs" / "b" / "result.json").unlink()  # interrupted after run a
    rows_again, _, ran = run_resumable(runs + [Run("c")], tmp_path, train, outputs, "demo", progress=False)
    assert ran == 2 and trained[2:] == ["b", "c"] and rows_again[0] == rows[0]


def test_one_experiment_in_the_study_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri = study_experiment(tmp_path, "demo_study")
    assert study_experiment(tmp_path, "demo_study") == uri
    client = MlflowClient(uri)
    assert [e.name for e in client.search_experiments() if e.name == "demo_study"] == ["demo_study"]
    assert Path(tmp_path / "mlflow.db").is_file()


def test_checkpoint_and_mean_sd(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist; make one with `medssl pretrain spark_ct`"):
        given_checkpoint(tmp_path / "absent.safetensors", "spark_ct")
    (tmp_path / "w.safetensors").write_bytes(b"")
    assert given_checkpoint(tmp_path / "w.safetensors", "spark_ct") == (tmp_path / "w.safetensors").resolve()
    assert mean_sd(0.5, 0.25, 2) == "0.50 ± 0.25"
    assert mean_sd(0.5, float("nan"), 1) == "0.5" and mean_sd(float("nan"), 0.1, 1) == "n/a"
