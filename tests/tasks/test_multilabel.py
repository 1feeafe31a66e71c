"""Tests for medssl.tasks.multilabel: BCE-with-logits loss, per-finding and mean AUROC (against scikit-learn and a
hand-counted example), evaluation rows, the MLflow report and folder inference with bad files skipped."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image
from torch import nn

from medssl.data.cxr import CXR_VIEW, LABEL_KEY, evaluation_transforms
from medssl.engine.tracking import resolve_tracking
from medssl.errors import DataError
from medssl.tasks.multilabel import (
    evaluate_multilabel,
    multilabel_loss,
    multilabel_metrics,
    predict_probabilities,
    predict_radiograph_folder,
    report_multilabel,
)

FINDINGS = ("a", "b", "c")


class MeanBrightness(nn.Module):
    """Logit k = (k + 1) * (mean intensity - 0.5): a known, image-dependent output."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.arange(1.0, 4.0))

    def forward(self, image):
        return (image.mean(dim=(1, 2, 3))[:, None] - 0.5) * self.scale


def _png(path, value, size=(20, 24)):
    Image.fromarray(np.full(size, value, np.uint8)).save(path)
    return path


def test_loss_is_the_mean_binary_cross_entropy_over_images_and_findings():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
    target = torch.tensor([[1, 0, 0], [1, 1, 0]])
    p = torch.sigmoid(logits)
    expected = -(target * p.log() + (1 - target) * (1 - p).log()).mean()
    torch.testing.assert_close(multilabel_loss()(logits, target), expected)
    weighted = multilabel_loss([2.0, 1.0, 1.0])(logits, target)
    expected_weighted = -(target * p.log() * torch.tensor([2.0, 1.0, 1.0]) + (1 - target) * (1 - p).log()).mean()
    torch.testing.assert_close(weighted, expected_weighted)
    with pytest.raises(ValueError, match=r"logits \(2, 3\) and multi-hot targets \(2,\) must both be \[B, K\]"):
        multilabel_loss()(logits, target[:, 0])


def test_auroc_matches_a_hand_count():
    labels = [[1, 0], [1, 1], [0, 0], [0, 1]]
    scores = [[0.9, 0.3], [0.4, 0.3], [0.4, 0.8], [0.1, 0.2]]
    metrics = multilabel_metrics(labels, scores, ("x", "y"))
    # x: positives 0.9, 0.4 vs negatives 0.4, 0.1 -> pairs won 1 + 1 + 0.5 (tie) + 1 = 3.5 of 4.
    assert metrics["auroc_x"] == pytest.approx(3.5 / 4)
    # y: positives 0.3, 0.2 vs negatives 0.3, 0.8 -> 0.5 (tie) + 0 + 0 + 0 = 0.5 of 4.
    assert metrics["auroc_y"] == pytest.approx(0.5 / 4)
    assert metrics["auroc_mean"] == pytest.approx((3.5 + 0.5) / 8)


def test_auroc_matches_scikit_learn_and_skips_undefined_findings():
    metrics_module = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    labels = (rng.random((40, 3)) < 0.4).astype(int)
    labels[:, 2] = 0  # never present: no AUROC
    scores = np.round(labels * 0.3 + rng.random((40, 3)), 1)  # rounded: ties occur
    metrics = multilabel_metrics(labels, scores, FINDINGS)
    for k, name in enumerate(FINDINGS[:2]):
        assert metrics[f"auroc_{name}"] == pytest.approx(metrics_module.roc_auc_score(labels[:, k], scores[:, k]))
    assert math.isnan(metrics["auroc_c"])
    assert metrics["auroc_mean"] == pytest.approx((metrics["auroc_a"] + metrics["auroc_b"]) / 2)
    with pytest.raises(ValueError, match=r"labels \(40, 3\) and probabilities \(40, 2\) must both be \[N >= 1, K=3\]"):
        multilabel_metrics(labels, scores[:, :2], FINDINGS)


def test_evaluation_rows_report_and_mlflow(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    values = (30, 200, 90, 250)
    items = [{CXR_VIEW: str(_png(tmp_path / f"{i}.png", v)), LABEL_KEY: np.array(label, np.float32)}
             for i, (v, label) in enumerate(zip(values, ([0, 1, 0], [1, 0, 0], [0, 1, 0], [1, 1, 0])))]
    network = MeanBrightness()
    rows = evaluate_multilabel(network, items, (8, 8), FINDINGS, batch_size=3)
    assert [row["image"] for row in rows] == [0, 1, 2, 3] and rows[3]["true_a"] == 1 and rows[0]["true_b"] == 1
    for row, item in zip(rows, items):
        image = evaluation_transforms((8, 8))(item)[CXR_VIEW]
        expected = torch.sigmoid((image.mean() - 0.5) * torch.arange(1.0, 4.0))
        assert [row[f"prob_{name}"] for name in FINDINGS] == pytest.approx(expected.tolist(), abs=1e-6)
    assert network.training  # put back in training mode
    summary = report_multilabel(rows, tmp_path / "run", FINDINGS, experiment_name="test_multilabel")
    # Brightness orders the images 30 < 90 < 200 < 250: finding a (images 1, 3) ranks above every negative; finding b
    # (images 0, 2, 3) beats its one negative (200) only with image 3: 1 of 3 pairs.
    metrics = summary["metrics"]
    assert metrics["eval_auroc_a"] == 1.0 and metrics["eval_auroc_b"] == pytest.approx(1 / 3)
    assert metrics["eval_auroc_mean"] == pytest.approx(2 / 3) and "eval_auroc_c" not in metrics
    assert not any(name.startswith("eval_prob") or name.startswith("eval_true") for name in summary["metrics"])
    with open(summary["csv"], newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 4
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["evaluation"]["run_id"] == summary["run_id"]
    client = MlflowClient(resolve_tracking(tmp_path / "run")[0])
    logged = client.get_run(summary["run_id"]).data.metrics
    assert logged["eval_auroc_mean"] == pytest.approx(2 / 3) and logged["eval_auroc_a"] == 1.0
    with pytest.raises(DataError, match="lack multi-hot labels over"):
        evaluate_multilabel(network, [{CXR_VIEW: items[0][CXR_VIEW]}], (8, 8), FINDINGS)
    with pytest.raises(DataError, match="nothing was evaluated"):
        report_multilabel([], tmp_path / "run", FINDINGS)


def test_folder_inference_skips_bad_files_and_fails_only_when_nothing_is_readable(tmp_path):
    inputs = tmp_path / "in"
    (inputs / "nested").mkdir(parents=True)
    _png(inputs / "bright.png", 220)
    _png(inputs / "nested" / "dark.png", 20)
    _png(inputs / "tiny.png", 100, size=(3, 3))
    (inputs / "broken.dcm").write_bytes(b"DICM? no")
    (inputs / "notes.txt").write_text("ignored")
    network = MeanBrightness()
    paths = predict_radiograph_folder(network, inputs, tmp_path / "out", FINDINGS, (8, 8), min_size=(4, 4))
    assert sorted(p.name for p in paths) == ["predictions.csv", "predictions.json", "skipped.csv"]
    predictions = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert [p["file"] for p in predictions] == ["bright.png", "nested/dark.png"]
    assert predictions[0]["prob_c"] > 0.5 > predictions[1]["prob_c"]
    probabilities = predict_probabilities(network, [{CXR_VIEW: str(inputs / "bright.png")}], (8, 8))
    assert predictions[0]["prob_a"] == pytest.approx(float(probabilities[0, 0]))
    with open(tmp_path / "out" / "skipped.csv", newline="") as handle:
        skipped = {row["file"]: row["reason"] for row in csv.DictReader(handle)}
    assert set(skipped) == {"broken.dcm", "tiny.png"}
    assert "smaller than the minimum 4x4" in skipped["tiny.png"] and "not a readable DICOM" in skipped["broken.dcm"]

    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    _png(only_bad / "tiny.png", 100, size=(3, 3))
    with pytest.raises(DataError, match=r"no file in .* could be predicted \(1 skipped: tiny\.png: image is 3x3"):
        predict_radiograph_folder(network, only_bad, tmp_path / "out2", FINDINGS, (8, 8), min_size=(4, 4))
    predict_radiograph_folder(network, inputs / "nested", tmp_path / "out", FINDINGS, (8, 8))
    assert not (tmp_path / "out" / "skipped.csv").exists()  # a stale list from the earlier run is removed
