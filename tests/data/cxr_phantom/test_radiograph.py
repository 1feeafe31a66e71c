"""Tests for medssl.data.cxr_phantom.radiograph: determinism, labels measured independently on the masks, lesion
insertion pairs, and findings that mean intensity alone does not give away."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import binary_dilation

from medssl.data.cxr_phantom import FINDINGS, LOCAL_FINDINGS, cardiothoracic_ratio, generate_radiograph
from medssl.errors import DataError

SIZE = 96


def _auroc(scores_positive: np.ndarray, scores_negative: np.ndarray) -> float:
    """Mann-Whitney estimate of P(score of a positive > score of a negative)."""
    greater = (scores_positive[:, None] > scores_negative[None, :]).mean()
    ties = (scores_positive[:, None] == scores_negative[None, :]).mean()
    return float(greater + 0.5 * ties)


def test_same_seed_same_image_and_different_seeds_differ():
    a, b, c = generate_radiograph(7, SIZE), generate_radiograph(7, SIZE), generate_radiograph(8, SIZE)
    np.testing.assert_array_equal(a.image, b.image)
    assert a.labels == b.labels and a.metadata == b.metadata
    assert a.image.shape == (SIZE, SIZE) and a.image.dtype == np.float32
    assert 0.0 <= a.image.min() and a.image.max() <= 1.0
    assert np.abs(a.image - c.image).mean() > 0.02
    assert a.metadata["anatomy"] != c.metadata["anatomy"]


def test_ctr_measured_by_hand_matches_label_and_metadata():
    for seed in range(6):
        for findings in ((), ("cardiomegaly",)):
            r = generate_radiograph(seed, SIZE, findings=findings)
            heart, thorax = r.anatomy_masks["heart"], r.anatomy_masks["thorax"]
            cols = np.where(heart.any(axis=0))[0]
            widest = max(np.ptp(np.where(row)[0]) + 1 for row in thorax if row.any())
            ctr = (cols.max() - cols.min() + 1) / widest
            assert ctr == pytest.approx(r.metadata["cardiothoracic_ratio"], abs=1e-4)
            assert r.labels["cardiomegaly"] == int(ctr > 0.5) == int(bool(findings))


def test_local_labels_follow_masks_and_masks_lie_in_the_chest():
    for seed in range(10):
        r = generate_radiograph(seed, SIZE)
        lungs_and_cavities = binary_dilation(r.anatomy_masks["thorax"], iterations=2)
        for name in LOCAL_FINDINGS:
            mask = r.finding_masks[name]
            assert r.labels[name] == int(mask.any()), (seed, name)
            assert not (mask & ~lungs_and_cavities).any(), (seed, name)
        assert set(r.labels) == set(FINDINGS)


def test_requested_findings_are_rendered_at_small_size():
    for seed in range(4):
        r = generate_radiograph(seed, 64, findings=FINDINGS)
        assert all(r.labels[name] == 1 for name in FINDINGS), r.labels
        assert generate_radiograph(seed, 64, findings=()).labels == dict.fromkeys(FINDINGS, 0)


def test_lesion_insertion_changes_only_the_lesion_pixels():
    for seed in range(3):
        normal = generate_radiograph(seed, SIZE, findings=())
        lesion = generate_radiograph(seed, SIZE, findings=LOCAL_FINDINGS)
        mask = lesion.lesion_mask
        difference = np.abs(lesion.image - normal.image)
        outside = ~binary_dilation(mask, iterations=2)
        assert difference[outside].max() < 0.03
        assert difference[outside].mean() < 1e-3
        assert difference[mask].mean() > 10 * max(difference[outside].mean(), 1e-6)
        np.testing.assert_array_equal(normal.anatomy_masks["heart"], lesion.anatomy_masks["heart"])


def test_mean_intensity_alone_does_not_separate_findings():
    # AUROC of a single score is what any monotone classifier on it (e.g. logistic regression) can reach.
    normal = np.array([generate_radiograph(1000 + s, 48, findings=()).image.mean() for s in range(14)])
    for name in FINDINGS:
        positive = np.array([generate_radiograph(s, 48, findings=(name,)).image.mean() for s in range(14)])
        auroc = _auroc(positive, normal)
        assert 0.15 < auroc < 0.85, (name, auroc)


def test_cardiothoracic_ratio_errors_and_value():
    heart = np.zeros((10, 10), bool)
    thorax = np.zeros((10, 10), bool)
    thorax[5, 1:9] = True
    heart[3, 2:4] = True
    heart[6, 5:6] = True
    assert cardiothoracic_ratio(heart, thorax) == pytest.approx(4 / 8)
    with pytest.raises(DataError, match="empty"):
        cardiothoracic_ratio(np.zeros((10, 10), bool), thorax)
    with pytest.raises(DataError, match=r"\(10, 10\) and \(4, 4\)"):
        cardiothoracic_ratio(heart, np.ones((4, 4), bool))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"seed": -1}, "non-negative"),
        ({"seed": 0, "size": 8}, "32..4096"),
        ({"seed": 0, "findings": ("edema",)}, "edema"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(DataError, match=message):
        generate_radiograph(**kwargs)
