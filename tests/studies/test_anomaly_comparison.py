"""The MemMC-MAE vs MAE comparison in quick mode: both methods trained and evaluated, one MLflow experiment."""

import csv

import pytest
from mlflow.tracking import MlflowClient

from medssl.errors import ConfigError
from medssl.studies.anomaly_comparison import EXPERIMENT_NAME, run_anomaly_comparison


def test_quick_comparison_tabulates_both_methods_in_one_experiment(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = run_anomaly_comparison(tmp_path / "cmp", quick=True)
    rows = result["rows"]
    assert [row["method"] for row in rows] == ["memmc_mae", "mae"]
    for row in rows:
        assert row["train_s"] > 0 and row["final_loss"] > 0
        assert all(0.0 <= row[key] <= 1.0 for key in ("image_auroc", "image_auroc_mean", "pixel_auroc"))
    with open(result["csv"]) as handle:
        assert [line["method"] for line in csv.DictReader(handle)] == ["memmc_mae", "mae"]
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| memmc_mae |" in table and "| mae |" in table and "pixel_auroc" in table

    client = MlflowClient(result["tracking_uri"])
    experiment = client.get_experiment_by_name(EXPERIMENT_NAME)
    runs = {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {"memmc_mae", "mae", "comparison"}
    assert runs["mae"].data.params["method"] == "mae"
    assert runs["memmc_mae"].data.metrics["eval_pixel_auroc"] == pytest.approx(rows[0]["pixel_auroc"])
    assert runs["comparison"].data.metrics["mae_image_auroc"] == pytest.approx(rows[1]["image_auroc"])
    assert {a.path for a in client.list_artifacts(result["run_id"])} >= {"comparison", "comparison_csv"}


def test_bad_method_or_reserved_override(tmp_path):
    with pytest.raises(ConfigError, match="methods must be some of"):
        run_anomaly_comparison(tmp_path, methods=("vae",))
    with pytest.raises(ConfigError, match=r"must not set \['run_dir'\]"):
        run_anomaly_comparison(tmp_path, overrides={"run_dir": "x"})
