"""The label-efficiency study at --quick sizes: the command end to end, its table, figure and MLflow runs checked
against the per-run evaluation files, resumption, and bad settings."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread
from mlflow.tracking import MlflowClient

from medssl import cli
from medssl.errors import CheckpointError, DataError
from medssl.studies import label_efficiency
from medssl.studies.label_efficiency import EXPERIMENT_NAME, INITS, QUICK_SETTINGS, plan_runs, summary_table

LABELLED = (1, None)
SEEDS = 2
SETTINGS = dataclasses.replace(QUICK_SETTINGS, labelled=LABELLED, seeds=SEEDS)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A quick study through the command: 2 inits x (1, all) labelled x 2 seeds = 8 runs."""
    out = tmp_path_factory.mktemp("study")
    local_store = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    result = subprocess.run(
        [sys.executable, "-m", "medssl.cli", "study", "label-efficiency", "--quick", "--out", str(out),
         "--labelled", "1,all", "--seeds", str(SEEDS), "--quiet"],
        capture_output=True, text=True, timeout=900, env=local_store,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stdout


def _runs(out):
    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(EXPERIMENT_NAME)
    return client.search_runs([experiment.experiment_id])


@pytest.mark.slow
def test_one_row_per_run_matching_each_runs_own_evaluation(study):
    out, stdout = study
    table = pd.read_csv(out / "label_efficiency.csv")
    expected = {(init, "all" if n is None else str(n), seed)
                for init, n, seed in itertools.product(INITS, LABELLED, range(SEEDS))}
    assert len(table) == len(expected) == 8
    assert set(zip(table["init"], table["labelled"].astype(str), table["seed"])) == expected
    assert set(table.loc[table["labelled"] == "all", "num_labelled"]) == {QUICK_SETTINGS.num_subjects}
    for row in table.to_dict("records"):
        evaluation = out / "runs" / row["run"] / "evaluation"
        dice = pd.read_csv(evaluation / "metrics.csv")
        assert set(dice["view"]) == {"sax"}
        for structure in ("LV", "MYO", "RV"):
            assert row[f"dice_{structure}"] == pytest.approx(dice[f"dice_{structure}"].mean())
        function = pd.read_csv(evaluation / "function.csv")
        errors = (function["lv_ef_pct"] - function["lv_ef_pct_true"]).abs()
        assert np.allclose(row["lvef_mae"], errors.mean(), equal_nan=True)
        assert not (out / "runs" / row["run"] / "checkpoints").exists()  # only kept while a run trains
    # The held-out cohort is another seed than the training (and pre-training) cohort.
    seeds = {json.loads(path.read_text())["seed"] for path in (out / "cohorts").glob("*/manifest.json")}
    assert seeds == {QUICK_SETTINGS.cohort_seed, QUICK_SETTINGS.eval_seed} and len(seeds) == 2
    assert (out / "pretrain" / "models" / "model.safetensors").is_file()


@pytest.mark.slow
def test_markdown_table_is_mean_and_sd_over_seeds(study):
    out, stdout = study
    table = pd.read_csv(out / "label_efficiency.csv")
    markdown = (out / "label_efficiency.md").read_text().strip()
    assert markdown in stdout
    lines = markdown.splitlines()
    assert lines[0] == ("| labelled subjects | init | runs | SAX Dice LV | SAX Dice MYO | SAX Dice RV | "
                        "LVEF MAE (points) |")
    body = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]
    assert [row[:3] for row in body] == [["1", "scratch", "2"], ["1", "pretrained", "2"],
                                         ["3 (all)", "scratch", "2"], ["3 (all)", "pretrained", "2"]]
    runs = table[(table["init"] == "pretrained") & (table["labelled"] == "1")]["dice_LV"]
    assert body[1][3] == f"{runs.mean():.3f} ± {runs.std(ddof=1):.3f}"
    assert summary_table(table.to_dict("records")) == markdown


@pytest.mark.slow
def test_figure(study):
    out, _ = study
    image = imread(out / "label_efficiency.png")
    assert image.ndim == 3 and image.shape[1] > 2 * image.shape[0] > 200  # four panels side by side


@pytest.mark.slow
def test_every_run_is_in_one_mlflow_experiment(study):
    out, _ = study
    table = pd.read_csv(out / "label_efficiency.csv").set_index("run")
    runs = _runs(out)
    assert sorted(run.info.run_name for run in runs) == sorted(table.index)
    for run in runs:
        row = table.loc[run.info.run_name]
        assert run.data.tags["init"] == row["init"] and run.data.tags["labelled"] == str(row["labelled"])
        assert run.data.tags["seed"] == str(row["seed"]) and run.info.run_id == row["run_id"]
        assert run.data.params["num_labelled"] == str(row["num_labelled"])
        assert run.data.params["pretrained"] == str(row["init"] == "pretrained")
        assert run.data.metrics["eval_sax_dice_LV"] == pytest.approx(row["dice_LV"])
        if math.isfinite(row["lvef_mae"]):
            assert run.data.metrics["eval_sax_lvef_mae"] == pytest.approx(row["lvef_mae"])


@pytest.mark.slow
def test_a_resumed_study_trains_only_what_is_missing(study, monkeypatch):
    out, _ = study
    before = pd.read_csv(out / "label_efficiency.csv")
    calls = []
    real_run_bundle = label_efficiency.run_bundle

    def counting_run_bundle(recipe, config_files=None, overrides=None):
        calls.append((recipe, overrides["run_dir"]))
        return real_run_bundle(recipe, config_files, overrides)

    monkeypatch.setattr(label_efficiency, "run_bundle", counting_run_bundle)
    result = label_efficiency.run_label_efficiency_study(out, SETTINGS, progress=False)
    assert calls == [] and result["ran"] == 0
    pd.testing.assert_frame_equal(pd.read_csv(out / "label_efficiency.csv"), before)

    # Interrupted after the training of the last run: only that run is evaluated again, in its own MLflow run.
    last = before["run"].iloc[-1]
    (out / "runs" / last / "result.json").unlink()
    result = label_efficiency.run_label_efficiency_study(out, SETTINGS, progress=False)
    assert result["ran"] == 1 and {run_dir for _, run_dir in calls} == {str(out / "runs" / last)}
    assert {recipe for recipe, _ in calls} == {"cine_seg"}
    assert len(_runs(out)) == len(before)
    assert pd.read_csv(out / "label_efficiency.csv")["run_id"].tolist() == before["run_id"].tolist()


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"labelled": (0, 3)},
         "labelled counts must lie in 1..3 (the training cohort has 3 subjects) or be 'all', got 0"),
        ({"labelled": (1, 4)}, "got 4"),
        ({"labelled": (1, 1)}, "labelled counts repeat"),
        ({"labelled": ()}, "got none"),
        ({"seeds": 0}, "seeds must be >= 1"),
        ({"eval_seed": 0}, "is the training cohort's"),
    ],
)
def test_bad_settings(changes, message):
    with pytest.raises(DataError) as error:
        plan_runs(dataclasses.replace(QUICK_SETTINGS, **changes))
    assert message in str(error.value)


def test_the_plan_pairs_inits_seed_by_seed():
    runs = plan_runs(dataclasses.replace(QUICK_SETTINGS, labelled=(2, None), seeds=2))
    assert [run.name for run in runs] == [
        "scratch_n2_seed0", "pretrained_n2_seed0", "scratch_nall_seed0", "pretrained_nall_seed0",
        "scratch_n2_seed1", "pretrained_n2_seed1", "scratch_nall_seed1", "pretrained_nall_seed1"]
    assert len(plan_runs(label_efficiency.DEFAULT_SETTINGS)) == 30


def test_command_rejects_bad_counts_before_any_work(tmp_path, capsys):
    assert cli.main(["study", "label-efficiency", "--quick", "--out", str(tmp_path / "s"), "--labelled", "0,3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("medssl study label-efficiency: error: labelled counts must lie in 1..3 (the training cohort has "
                   "3 subjects) or be 'all', got 0.")
    assert cli.main(["study", "label-efficiency", "--quick", "--out", str(tmp_path / "s"), "--labelled", "8"]) == 2
    assert "got 8" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_missing_checkpoint_is_refused_before_any_work(tmp_path):
    with pytest.raises(CheckpointError, match="medssl pretrain cine_mae"):
        label_efficiency.run_label_efficiency_study(tmp_path / "s", QUICK_SETTINGS,
                                                    pretrained=tmp_path / "no.safetensors")
    assert not (tmp_path / "s").exists()
