"""EF by direct regression from the ED and ES frames (the segmentation route is tested in
test_ejection_fraction_from_segmentation.py)."""

import csv
import json
import logging

import numpy as np
import pytest
import torch
from torch import nn

from medssl.data.cine import load_cine_datalist
from medssl.data.cine_labelled import SegmentationView
from medssl.data.phantom import ensure_cohort
from medssl.errors import DataError
from medssl.tasks.image_level import predict_folder
from medssl.tasks.ejection_fraction import (
    EF_TARGETS,
    ef_regression_items,
    evaluate_ef_regression,
    evaluate_function_with_segmentation_bundle,
    regression_targets,
    target_columns,
)

VIEW = SegmentationView("sax", [16, 16, 2], [12.0, 12.0, 30.0], [8, 8, 1])


class ConstantEF(nn.Module):
    """Predicts the same LVEF and RVEF for every image (an independent stand-in for a trained network)."""

    def __init__(self, values):
        super().__init__()
        self.values = nn.Parameter(torch.tensor(values))

    def forward(self, image):
        assert image.shape[1:] == (2, 16, 16, 2)
        return self.values.expand(image.shape[0], -1)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return ensure_cohort(tmp_path_factory.mktemp("cohort"), 2, seed=0, num_frames=4, progress=False).parent


@pytest.fixture(scope="module")
def datalist(cohort):
    return load_cine_datalist(cohort, ["sax"], metadata=True)


def exact(datalist, key):
    return [json.loads(open(item["metadata"]).read())[key] for item in datalist]


def test_regression_items_carry_the_exact_targets(datalist):
    items = ef_regression_items(datalist)
    targets = regression_targets(items)
    assert targets.dtype == np.float32 and targets.shape == (2, 2)
    np.testing.assert_allclose(targets[:, 0], exact(datalist, "lv_ef_pct"), rtol=1e-6)
    np.testing.assert_allclose(targets[:, 1], exact(datalist, "rv_ef_pct"), rtol=1e-6)
    assert [item["es_frame"] for item in items] == exact(datalist, "es_frame")
    assert regression_targets(ef_regression_items(datalist, ["lv_edv_ml"])).shape == (2, 1)


def test_regression_items_errors(datalist, tmp_path):
    metadata = json.loads(open(datalist[1]["metadata"]).read())
    for name, value, message in (
        ("missing.json", {k: v for k, v in metadata.items() if k != "rv_ef_pct"}, r"has no rv_ef_pct"),
        ("text.json", {**metadata, "lv_ef_pct": "high"}, r"subject #1: regression targets .* finite numbers"),
    ):
        (tmp_path / name).write_text(json.dumps(value))
        with pytest.raises(DataError, match=message):
            ef_regression_items([datalist[0], {**datalist[1], "metadata": str(tmp_path / name)}])
    with pytest.raises(DataError, match="no regression target given"):
        ef_regression_items(datalist, [])
    with pytest.raises(DataError, match="lack targets"):
        regression_targets([{"sax": "x"}])


def test_regression_evaluation_scores_absolute_errors_against_the_exact_ef(datalist):
    rows = evaluate_ef_regression(ConstantEF([55.0, 50.0]), ef_regression_items(datalist), VIEW)
    assert [row["subject"] for row in rows] == [0, 1] and {row["method"] for row in rows} == {"regression"}
    for row, lv, rv, es in zip(rows, exact(datalist, "lv_ef_pct"), exact(datalist, "rv_ef_pct"),
                               exact(datalist, "es_frame")):
        assert row["lv_ef_pct"] == 55.0 and row["lv_ef_pct_true"] == pytest.approx(lv)
        assert row["lv_ef_pct_abs_error"] == pytest.approx(abs(55.0 - lv), abs=1e-4)
        assert row["rv_ef_pct_abs_error"] == pytest.approx(abs(50.0 - rv), abs=1e-4)
        assert (row["ed_frame"], row["es_frame"]) == (0, es)
    with pytest.raises(ValueError, match=r"predicts \(2,\) values per subject for the targets \['lv_ef_pct'\]"):
        evaluate_ef_regression(ConstantEF([55.0, 50.0]), ef_regression_items(datalist, ["lv_ef_pct"]), VIEW,
                               ["lv_ef_pct"])


def test_regression_folder_inference_writes_ef_per_file(cohort, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "case.nii.gz").write_bytes((cohort / "sub-0000" / "sax.nii.gz").read_bytes())
    written = predict_folder(ConstantEF([61.5, 48.0]), inputs, tmp_path / "out", VIEW, target_columns(), es_frame=2)
    rows = list(csv.DictReader(open(written[0])))
    assert rows == [{"file": "case.nii.gz", "ed_frame": "0", "es_frame": "2", "lv_ef_pct": "61.5", "rv_ef_pct": "48.0"}]
    assert EF_TARGETS == ("lv_ef_pct", "rv_ef_pct")


def test_regression_only_without_a_segmentation_model(datalist, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="medssl.tasks.ejection_fraction"):
        assert evaluate_function_with_segmentation_bundle(tmp_path / "no_seg_run", datalist) == []
        assert evaluate_function_with_segmentation_bundle(None, datalist) == []
    assert "no cine_seg model at" in caplog.text and "evaluating the direct EF regression only" in caplog.text
