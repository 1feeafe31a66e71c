"""Disease classification: labels from metadata, metrics against hand-computed values and MONAI, figure, report."""

import csv
import json
import math

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from monai.metrics import compute_roc_auc

from medssl.data.cine import load_cine_datalist
from medssl.data.phantom import ensure_cohort
from medssl.errors import DataError
from medssl.tasks.classification import (
    DISEASE_CLASSES,
    classification_metrics,
    confusion_matrix,
    confusion_matrix_figure,
    disease_items,
    probability_columns,
    report_classification,
    roc_auc,
)

# Six subjects of three classes; the arg-max predictions are [0, 1, 1, 1, 2, 0].
TRUE = [0, 0, 1, 1, 2, 2]
PROBABILITIES = np.array([
    [0.7, 0.2, 0.1], [0.3, 0.6, 0.1], [0.2, 0.7, 0.1], [0.1, 0.5, 0.4], [0.2, 0.2, 0.6], [0.5, 0.1, 0.4],
])


def test_confusion_matrix_counts_true_rows_and_predicted_columns():
    np.testing.assert_array_equal(confusion_matrix(TRUE, [0, 1, 1, 1, 2, 0], 3), [[1, 1, 0], [0, 2, 0], [1, 0, 1]])
    with pytest.raises(ValueError, match=r"predicted class indices must be in 0\.\.2, got \[0, 3\]"):
        confusion_matrix([0, 1], [0, 3], 3)
    with pytest.raises(ValueError, match="equal, non-empty 1-D arrays"):
        confusion_matrix([0, 1], [0], 3)


def test_roc_auc_against_hand_values_and_monai():
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]) == pytest.approx(0.75)  # 3 of 4 pairs
    assert roc_auc([0.5, 0.5, 0.2], [True, False, False]) == pytest.approx(0.75)  # a tie counts half
    assert math.isnan(roc_auc([0.1, 0.2], [True, True]))
    rng = np.random.default_rng(0)
    scores, positive = rng.random(40), rng.random(40) > 0.5
    expected = compute_roc_auc(torch.as_tensor(scores), torch.as_tensor(positive.astype(np.int64)))
    assert roc_auc(scores, positive) == pytest.approx(expected)
    with pytest.raises(ValueError, match="must be equal 1-D arrays"):
        roc_auc([0.1, 0.2], [True])


def test_classification_metrics_against_hand_computed_values():
    metrics = classification_metrics(TRUE, PROBABILITIES, ["a", "b", "c"])
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    # F1 = 2TP / (2TP + FP + FN): a 2/4, b 4/5, c 2/3.
    assert metrics["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    # Gorodkin: (c s - sum p_k t_k) / sqrt((s^2 - sum p_k^2)(s^2 - sum t_k^2)), c = 4 correct of s = 6, predicted
    # counts p = (2, 3, 1), true counts t = (2, 2, 2).
    assert metrics["mcc"] == pytest.approx((4 * 6 - 12) / math.sqrt((36 - 14) * (36 - 12)))
    one_hot = torch.nn.functional.one_hot(torch.tensor(TRUE), 3)
    per_class = compute_roc_auc(torch.as_tensor(PROBABILITIES), one_hot, average="none")
    for name, value in zip("abc", per_class):
        assert metrics[f"auroc_{name}"] == pytest.approx(value)
    assert metrics["auroc_macro"] == pytest.approx(np.mean(per_class))


def test_binary_mcc_is_the_classic_formula_and_absent_classes_are_handled():
    true, scores = [1, 1, 1, 0, 0, 0, 0], np.array([[0.2, 0.8]] * 2 + [[0.9, 0.1]] + [[0.6, 0.4]] * 3 + [[0.3, 0.7]])
    tp, tn, fp, fn = 2, 3, 1, 1
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert classification_metrics(true, scores, ["neg", "pos"])["mcc"] == pytest.approx(expected)
    # One class only: AUROC undefined (NaN), MCC 0, F1 over the occurring classes.
    metrics = classification_metrics([0, 0], np.array([[0.9, 0.1, 0.0], [0.8, 0.2, 0.0]]), ["a", "b", "c"])
    assert metrics["accuracy"] == 1.0 and metrics["macro_f1"] == 1.0 and metrics["mcc"] == 0.0
    assert math.isnan(metrics["auroc_a"]) and math.isnan(metrics["auroc_macro"])
    with pytest.raises(ValueError, match=r"probabilities must be \[N=2, K=3\], got shape \(2, 2\)"):
        classification_metrics([0, 1], np.ones((2, 2)), ["a", "b", "c"])


def test_confusion_matrix_figure_is_a_png(tmp_path):
    path = confusion_matrix_figure(np.array([[3, 1], [0, 4]]), ["NOR", "DCM"], tmp_path / "figures" / "cm.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    with pytest.raises(ValueError, match=r"matrix must be \[3, 3\]"):
        confusion_matrix_figure(np.ones((2, 2)), ["a", "b", "c"], tmp_path / "x.png")


@pytest.fixture(scope="module")
def datalist(tmp_path_factory):
    cohort = ensure_cohort(tmp_path_factory.mktemp("cohort"), 2, seed=0, num_frames=4, progress=False).parent
    return load_cine_datalist(cohort, ["sax"], metadata=True)


def test_disease_items_label_subjects_by_their_metadata_group(datalist, tmp_path):
    items = disease_items(datalist)
    groups = [json.loads(open(item["metadata"]).read())["group"] for item in datalist]
    assert [DISEASE_CLASSES[item["label"]] for item in items] == groups
    assert set(items[0]) == {"sax", "ed_frame", "es_frame", "label"}
    metadata = json.loads(open(datalist[1]["metadata"]).read())
    unknown = tmp_path / "metadata.json"
    unknown.write_text(json.dumps({**metadata, "group": "XYZ"}))
    with pytest.raises(DataError, match=r"subject #1 has disease group 'XYZ', which is not one of the classes \['NOR'"):
        disease_items([datalist[0], {**datalist[1], "metadata": str(unknown)}])
    with pytest.raises(DataError, match="subject #0 has no metadata"):
        disease_items([{"sax": datalist[0]["sax"]}])


def test_report_classification_writes_csv_figure_summary_and_mlflow(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    classes = ["a", "b", "c"]
    rows = [{"subject": i, "ed_frame": 0, "es_frame": 3, "true": classes[t], "predicted": classes[int(p.argmax())],
             **{f"prob_{name}": float(v) for name, v in zip(classes, p)}}
            for i, (t, p) in enumerate(zip(TRUE, PROBABILITIES))]
    summary = report_classification(rows, tmp_path, classes, experiment_name="test_cls")
    expected = classification_metrics(TRUE, PROBABILITIES, classes)
    assert summary["metrics"] == pytest.approx({f"eval_{name}": value for name, value in expected.items()})
    assert "eval_prob_a" not in summary["metrics"]  # per-subject columns are not averaged
    with open(tmp_path / "evaluation" / "metrics.csv", newline="") as handle:
        assert [row["predicted"] for row in csv.DictReader(handle)] == ["a", "b", "b", "b", "c", "a"]
    assert (tmp_path / "evaluation" / "confusion_matrix.png").is_file()
    client = MlflowClient(json.loads((tmp_path / "mlflow_run.json").read_text())["tracking_uri"])
    logged = client.get_run(summary["run_id"]).data.metrics
    assert logged["eval_mcc"] == pytest.approx(expected["mcc"]) and logged["eval_accuracy"] == pytest.approx(4 / 6)
    artifacts = {artifact.path for folder in ("evaluation", "figures")
                 for artifact in client.list_artifacts(summary["run_id"], folder)}
    assert artifacts == {"evaluation/metrics.csv", "figures/confusion_matrix.png"}
    with pytest.raises(DataError, match=r"evaluation rows name classes \['z'\] outside"):
        report_classification([{**rows[0], "true": "z"}], tmp_path, classes)


def test_probability_columns_name_the_arg_max_class_and_the_softmax():
    columns = probability_columns(["a", "b"])(torch.tensor([0.0, math.log(3.0)]))
    assert columns == {"predicted": "b", "prob_a": pytest.approx(0.25), "prob_b": pytest.approx(0.75)}
