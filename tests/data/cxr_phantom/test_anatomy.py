"""Tests for medssl.data.cxr_phantom.anatomy: grid geometry, soft steps, and masks against the design."""

from __future__ import annotations

import numpy as np
import pytest

from medssl.data.cxr_phantom.anatomy import Grid, project_anatomy, sample_anatomy, soft_step


def test_grid_spacing_centre_and_tilt():
    grid = Grid.square(5, 100.0, (3.0, -4.0), 0.0)
    assert grid.spacing_mm == pytest.approx(20.0)
    assert grid.x[2, 2] == pytest.approx(3.0) and grid.y[2, 2] == pytest.approx(-4.0)
    assert grid.x[0, 1] - grid.x[0, 0] == pytest.approx(20.0) and grid.y[1, 0] - grid.y[0, 0] == pytest.approx(20.0)
    tilted = Grid.square(5, 100.0, (0.0, 0.0), 90.0)
    assert tilted.y[0, 1] - tilted.y[0, 0] == pytest.approx(20.0, abs=1e-4)


def test_soft_step_is_a_logistic_of_the_margin():
    margin = np.array([-50.0, 0.0, 2.0, 50.0])
    np.testing.assert_allclose(soft_step(margin, 1.0), 1.0 / (1.0 + np.exp(-margin)), atol=1e-12)


def test_projected_masks_are_plausible_and_heart_matches_design_ctr():
    for seed in range(3):
        anatomy = sample_anatomy(np.random.default_rng(seed), 0.45)
        grid = Grid.square(256, anatomy.fov_mm, anatomy.centre, 0.0)
        projected = project_anatomy(anatomy, grid, np.random.default_rng(seed))
        heart = projected.heart >= 0.5
        columns = np.flatnonzero(heart.any(axis=0))
        width_mm = (columns[-1] - columns[0] + 1) * grid.spacing_mm
        assert width_mm == pytest.approx(sum(anatomy.heart_extent), abs=3 * grid.spacing_mm)
        assert anatomy.cardiothoracic_ratio == pytest.approx(0.45)
        lung = projected.lung >= 0.5
        assert not (lung[0] & heart).any() and not (lung[0] & lung[1]).any()
        # Lungs hold air, the heart and mediastinum do (almost) not; the left lung lies at the image right.
        assert projected.air[lung[0]].mean() > 3 * projected.air[heart].mean()
        assert np.argwhere(lung[1])[:, 1].mean() > np.argwhere(lung[0])[:, 1].mean()
