"""The dataset-size study: the plan, the table, and the quick study end to end through the real spark_ct bundle
(rows, table, figure, one MLflow experiment, resume)."""

import math
from dataclasses import replace

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from medssl.errors import CheckpointError, DataError
from medssl.studies.dataset_size import (
    EXPERIMENT_NAME,
    QUICK_SETTINGS,
    SizeRun,
    plan_runs,
    run_dataset_size_study,
    summary_table,
)


def test_plan_covers_every_init_fraction_and_seed_seed_by_seed():
    runs = plan_runs(QUICK_SETTINGS)
    assert runs[:4] == [SizeRun("scratch", 1.0, 0), SizeRun("spark", 1.0, 0), SizeRun("scratch", 0.5, 0),
                        SizeRun("spark", 0.5, 0)]
    assert len(runs) == 2 * 2 * 2 and runs[-1] == SizeRun("spark", 0.5, 1)
    assert SizeRun("spark", 0.1, 2).name == "spark_p010_seed2"
    for fractions, message in (((0.0,), "must lie in"), ((1.5,), "must lie in"), ((0.5, 0.5), "repeat"),
                               ((), "must lie in")):
        with pytest.raises(DataError, match=message):
            plan_runs(replace(QUICK_SETTINGS, fractions=fractions))
    with pytest.raises(DataError, match="seeds must be >= 1"):
        plan_runs(replace(QUICK_SETTINGS, seeds=0))


def test_summary_table_is_mean_and_sd_over_seeds():
    rows = [
        {"init": init, "label_fraction": 0.5, "num_labelled": 5, "seed": seed, "accuracy": acc, "macro_f1": 0.5,
         "auroc_macro": math.nan}
        for init, seed, acc in (("spark", 0, 0.6), ("spark", 1, 0.8), ("scratch", 0, 0.4))
    ]
    lines = summary_table(rows).splitlines()
    assert lines[0] == "| labels | init | runs | accuracy | macro-F1 | AUROC (macro, one-vs-rest) |"
    sd = pd.Series([0.6, 0.8]).std()
    assert lines[2] == "| 50 % (5) | scratch | 1 | 0.400 | 0.500 | n/a |"
    assert lines[3] == f"| 50 % (5) | spark | 2 | 0.700 ± {sd:.3f} | 0.500 ± 0.000 | n/a |"


@pytest.mark.slow
def test_quick_study_end_to_end_and_resume(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = run_dataset_size_study(tmp_path, quick=True, seeds=1, progress=False)
    assert result["ran"] == 4 and result["experiment_name"] == EXPERIMENT_NAME
    frame = pd.read_csv(result["csv"])
    assert list(frame["run"]) == ["scratch_p100_seed0", "spark_p100_seed0", "scratch_p050_seed0", "spark_p050_seed0"]
    assert list(frame["num_labelled"]) == [6, 6, 3, 3]
    assert frame[["accuracy", "macro_f1"]].notna().all().all()
    assert result["table"].count("\n") == 5 and (tmp_path / "dataset_size.md").read_text().strip() == result["table"]
    assert result["figure"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    client = MlflowClient(result["tracking_uri"])
    experiment = client.get_experiment_by_name(EXPERIMENT_NAME)
    runs = {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])}
    assert set(runs) == {*frame["run"], "spark_pretrain"}  # every run, the pre-training too, in one experiment
    tuned = runs["spark_p050_seed0"]
    assert tuned.data.tags["init"] == "spark" and tuned.data.tags["label_fraction"] == "0.5"
    assert tuned.data.params["pretrained"] == "True" and tuned.data.params["num_labelled"] == "3"
    assert runs["scratch_p050_seed0"].data.params["pretrained"] == "False"
    assert tuned.data.metrics["eval_accuracy"] == pytest.approx(frame.loc[3, "accuracy"])
    assert not (tmp_path / "runs" / "spark_p050_seed0" / "checkpoints").exists()

    again = run_dataset_size_study(tmp_path, quick=True, seeds=1, progress=False)
    assert again["ran"] == 0 and again["rows"] == result["rows"]
    assert len(client.search_runs([experiment.experiment_id])) == 5
    with pytest.raises(CheckpointError, match="does not exist"):
        run_dataset_size_study(tmp_path, quick=True, pretrained=tmp_path / "absent.safetensors", progress=False)
