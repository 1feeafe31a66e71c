"""EF from the segmentation of the whole cycle (medssl/tasks/ejection_fraction.py, segmentation part), scored against
exact targets; the phantom sanity check (EF from its own labels within 2 points of the exact EF)."""

import json
import math

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from medssl.data.cine import load_cine_datalist
from medssl.data.cine_labelled import parse_segmentation_views
from medssl.data.phantom import ensure_cohort
from medssl.errors import DataError
from medssl.tasks.ejection_fraction import (
    FUNCTION_TARGETS,
    evaluate_function_from_reference_labels,
    evaluate_function_from_segmentation,
    function_from_labels,
    mean_abs_error,
)
from medssl.tasks.segmentation import CineSegmentationPredictor

SPACING = (1.5, 1.5, 8.0)


class IntensityOracle(nn.Module):
    """A perfect 'network' for images whose intensity is class id x 1000."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))

    def forward(self, image, view=None):
        return torch.cat([-((3 * image - k) ** 2) * 20 for k in range(4)], dim=1) + self.anchor


def beating_labels(frames=5):
    """Nested boxes whose LV cavity shrinks to frame 2 and grows back; RV shrinks less."""
    label = np.zeros((40, 40, 4, frames), np.uint8)
    for t in range(frames):
        squeeze = min(t, frames - 1 - t) * 2
        label[4 + squeeze // 2:36, 2:18, :, t] = 1
        label[8:34, 18:38, :, t] = 2
        label[12 + squeeze:30 - squeeze, 22:34, :, t] = 3
    return label


def counted(label, t, class_id):
    return (label[..., t] == class_id).sum() * math.prod(SPACING) / 1000.0


def write_subject(folder, label, targets):
    folder.mkdir(parents=True)
    affine = np.diag([*SPACING, 1.0])
    nib.save(nib.Nifti1Image(label.astype(np.int16) * 1000, affine), str(folder / "sax.nii.gz"))
    nib.save(nib.Nifti1Image(label, affine), str(folder / "sax_label.nii.gz"))
    (folder / "metadata.json").write_text(json.dumps(targets))


def exact_targets(label, **changes):
    edv, esv = counted(label, 0, 3), counted(label, 2, 3)
    rv_edv, rv_esv = counted(label, 0, 1), counted(label, 2, 1)
    targets = {
        "lv_edv_ml": edv, "lv_esv_ml": esv, "lv_sv_ml": edv - esv, "lv_ef_pct": 100 * (edv - esv) / edv,
        "rv_edv_ml": rv_edv, "rv_esv_ml": rv_esv, "rv_sv_ml": rv_edv - rv_esv,
        "rv_ef_pct": 100 * (rv_edv - rv_esv) / rv_edv, "ed_frame": 0, "es_frame": 2, "group": "NOR",
    }
    return {**targets, **changes}


def test_function_from_labels_counts_voxels_with_the_affines_spacing():
    label = beating_labels()
    rotation = np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(SPACING)  # spacing is the column norm, whatever the orientation
    function = function_from_labels(label, affine)
    assert (function.ed_frame, function.es_frame) == (0, 2)
    assert function.lv_edv_ml == pytest.approx(counted(label, 0, 3))
    assert function.lv_ef_pct == pytest.approx(100 * (1 - counted(label, 2, 3) / counted(label, 0, 3)))
    assert function.rv_esv_ml == pytest.approx(counted(label, 2, 1))
    with pytest.raises(DataError, match=r"expected a SAX label cine \[H, W, S, T\], got shape \(40, 40, 4\)"):
        function_from_labels(label[..., 0], affine)


def test_segmentation_route_scores_each_subject_against_its_exact_values(tmp_path):
    label = beating_labels()
    write_subject(tmp_path / "a", label, exact_targets(label))
    write_subject(tmp_path / "b", label, exact_targets(label, lv_ef_pct=50.0, es_frame=3))
    datalist = load_cine_datalist(tmp_path, views=["sax"], metadata=True)
    views = parse_segmentation_views({"sax": {"image_size": [16, 16, 4], "spacing": [1.5, 1.5, None]}})
    rows = evaluate_function_from_segmentation(CineSegmentationPredictor(IntensityOracle(), views), datalist)
    assert [(row["subject"], row["method"]) for row in rows] == [(0, "segmentation"), (1, "segmentation")]
    for key in FUNCTION_TARGETS:
        assert rows[0][f"{key}_abs_error"] == pytest.approx(0.0, abs=1e-6), key
    true_ef = 100 * (1 - counted(label, 2, 3) / counted(label, 0, 3))
    assert rows[1]["lv_ef_pct_abs_error"] == pytest.approx(abs(true_ef - 50.0))
    assert (rows[1]["es_frame"], rows[1]["es_frame_true"]) == (2, 3)
    assert mean_abs_error(rows) == pytest.approx(abs(true_ef - 50.0) / 2)
    assert "subject_id" not in json.dumps(rows)


def test_bad_inputs_name_the_problem(tmp_path):
    label = beating_labels()
    write_subject(tmp_path / "a", label, {"lv_ef_pct": 60.0})
    datalist = load_cine_datalist(tmp_path, views=["sax"], labels=True, metadata=True)
    with pytest.raises(DataError, match=r"metadata\.json has no numeric lv_edv_ml, .*rv_ef_pct, ed_frame, es_frame"):
        evaluate_function_from_reference_labels(datalist)
    with pytest.raises(DataError, match=r"subject #0 of the evaluation data list has no metadata"):
        evaluate_function_from_reference_labels([{"sax_label": datalist[0]["sax_label"]}])
    with pytest.raises(DataError, match="the evaluation data list is empty"):
        evaluate_function_from_reference_labels([])


@pytest.mark.slow
def test_phantom_labels_give_the_exact_ef_within_two_points(tmp_path):
    """Issue 3's sanity check: the phantom's own label stacks measure its exact EF within 2 points."""
    cohort = ensure_cohort(tmp_path / "cohort", 5, seed=11, progress=False)
    rows = evaluate_function_from_reference_labels(load_cine_datalist(cohort, ["sax"], labels=True, metadata=True))
    assert len(rows) == 5
    assert max(row["lv_ef_pct_abs_error"] for row in rows) <= 2.0
    assert max(row["rv_ef_pct_abs_error"] for row in rows) <= 3.0
    assert all(row["ed_frame"] == row["ed_frame_true"] for row in rows)
