"""Tests for medssl.data.phantom.render: scanner-like planning, bSSFP contrast, partial volume and Rician noise."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from medssl.data.phantom.anatomy import sample_placement
from medssl.data.phantom.groups import sample_heart
from medssl.data.phantom.render import (
    MAX_STORED_VALUE,
    Scene,
    acquire,
    label_volumes_ml,
    plan_views,
    render_view,
    sample_appearance,
)
from medssl.data.phantom.torso import TISSUES, sample_torso
from medssl.errors import DataError


def _scene(seed: int, group: str = "NOR", frames: int = 6, **plan) -> tuple[Scene, dict]:
    rng = np.random.default_rng(seed)
    heart, _, _ = sample_heart(rng, group, frames)
    placement = sample_placement(rng, heart.params.length)
    torso = sample_torso(rng, heart, placement)
    scene = Scene(heart, placement, torso, sample_appearance(rng, torso))
    return scene, plan_views(rng, heart, placement, **plan)


@pytest.fixture(scope="module")
def rendered():
    scene, views = _scene(4)
    return scene, views, {name: render_view(scene, view) for name, view in views.items()}


@pytest.mark.parametrize("seed", range(8))
def test_planning_follows_cmr_practice(seed):
    scene, views = _scene(seed, frames=4)
    sax, lax_2c, lax_4c = views["sax"], views["lax_2c"], views["lax_4c"]
    long_axis = scene.placement.long_axis
    height, width, slices = sax.shape
    assert 8 <= slices <= 14 and height == width and 160 <= height <= 224
    assert 1.55 <= sax.spacing[0] == sax.spacing[1] <= 1.95 and 6.0 <= sax.spacing[2] <= 10.0
    assert 290 <= height * sax.spacing[0] <= 370
    assert 6.0 <= sax.thickness <= sax.spacing[2]
    np.testing.assert_allclose(sax.axes[:, 2], long_axis, atol=1e-12)  # slice normal = LV long axis
    for view in views.values():
        np.testing.assert_allclose(view.axes.T @ view.axes, np.eye(3), atol=1e-12)
        np.testing.assert_allclose(view.affine[:3, :3], view.axes * np.asarray(view.spacing))
    for view in (lax_2c, lax_4c):
        assert view.shape == (height, width, 1)
        assert abs(view.axes[:, 2] @ long_axis) < 1e-12  # the long axis lies in both LAX planes
        assert np.linalg.det(view.axes) == pytest.approx(1.0)
    assert abs(lax_2c.axes[:, 2] @ lax_4c.axes[:, 2]) < 1e-12  # 2C ⟂ 4C
    # The four-chamber plane passes through the RV centre (±8°), so its normal is ⟂ that direction.
    heart = scene.heart.params
    rv_direction = scene.placement.rotation @ np.array([math.cos(heart.rv_angle), math.sin(heart.rv_angle), 0.0])
    assert abs(lax_4c.axes[:, 2] @ rv_direction) < math.sin(math.radians(8.01))
    # Short-axis display: anterior wall up (j runs towards the inferior wall), RV on the image left.
    anterior_wall = scene.placement.rotation[:, 1]
    assert sax.axes[:, 1] @ anterior_wall < 0 and sax.axes[:, 0] @ rv_direction < 0


def test_voxel_inverts_points_including_breath_hold_shifts():
    _, views = _scene(1, frames=4, breath_hold_shift_mm=4.0)
    sax = views["sax"]
    assert np.abs(sax.shifts).max() > 0.5 and np.linalg.norm(sax.shifts, axis=1).max() <= 4.0
    rng = np.random.default_rng(0)
    for k in (0, sax.shape[2] - 1):
        points = sax.points(k).reshape(-1, 3)
        pick = rng.integers(0, points.shape[0], 50)
        voxel = sax.voxel(points[pick].astype(np.float64), k)
        np.testing.assert_allclose(voxel[:, 2], k, atol=1e-3)
        np.testing.assert_allclose(voxel[:, 0], pick % sax.shape[0], atol=1e-3)
        np.testing.assert_allclose(voxel[:, 1], pick // sax.shape[0], atol=1e-3)


def test_planning_options_are_validated_and_applied():
    _, full = _scene(2, frames=4)
    _, fewer = _scene(2, frames=4, missing_apical_slice=True)
    assert fewer["sax"].shape[2] == full["sax"].shape[2] - 1
    with pytest.raises(DataError, match="breath_hold_shift_mm must lie in"):
        _scene(2, frames=4, breath_hold_shift_mm=-1.0)


def test_rendered_labels_match_the_label_only_volumes(rendered):
    scene, views, images = rendered
    for name, view in views.items():
        signal, label = images[name]
        frames, slices, width, height = signal.shape
        assert signal.dtype == np.float32 and label.dtype == np.uint8
        assert (frames, slices, width, height) == (scene.heart.num_frames, view.shape[2], view.shape[1], view.shape[0])
        assert set(np.unique(label)) <= {0, 1, 2, 3}
        counts = np.stack([(label == value).sum(axis=(1, 2, 3)) for value in (1, 2, 3)], axis=1)
        volumes = counts * np.prod(view.spacing) / 1000.0
        state = scene.heart.state(dtype=np.float32)
        np.testing.assert_allclose(volumes, label_volumes_ml(scene.heart, scene.placement, view, state))
        assert counts[:, 2].min() > 0  # every view cuts the LV cavity at every frame


def test_bssfp_contrast_ordering(rendered):
    """Blood brightest, myocardium dark grey (blood/myocardium 3-5), lungs the darkest tissue in the body."""
    scene, views, images = rendered
    signal, label = images["sax"]
    k = views["sax"].shape[2] // 2
    image, lab = signal[0, k], label[0, k]
    blood = image[ndimage.binary_erosion(lab == 3, iterations=3)]
    myocardium = image[ndimage.binary_erosion(lab == 2, iterations=1)]
    ratio = np.median(blood) / np.median(myocardium)
    assert 3.0 <= ratio <= 5.0
    tissue = scene.torso.classify(views["sax"].points(k).reshape(-1, 3)).reshape(image.shape)
    means = {}
    for index, name in enumerate(TISSUES):
        region = ndimage.binary_erosion((tissue == index) & (lab == 0), iterations=2)
        if region.sum() > 50:
            means[name] = float(image[region].mean())
    assert "lung" in means and "liver" in means
    inside_body = {name: value for name, value in means.items() if name != "air"}
    assert min(inside_body, key=inside_body.get) == "lung"
    # Fat is bright (near the anterior coils even brighter than the blood pool at the heart).
    assert means["lung"] < 0.1 * np.median(blood) and means["fat"] > 2.0 * np.median(myocardium)


def test_partial_volume_blurs_every_boundary(rendered):
    """Supersampled edges: between blood and myocardium the signal takes intermediate values."""
    _, views, images = rendered
    signal, label = images["sax"]
    k = views["sax"].shape[2] // 2
    image, lab = signal[0, k], label[0, k]
    blood, myocardium = np.median(image[lab == 3]), np.median(image[lab == 2])
    edge = (lab == 3) & ndimage.binary_dilation(lab == 2)
    margin = 0.15 * (blood - myocardium)
    between = (image[edge] > myocardium + margin) & (image[edge] < blood - margin)
    assert between.mean() > 0.2


def test_acquire_adds_rician_noise_and_stores_12_bit_integers():
    scene, _ = _scene(0, frames=4)
    appearance = scene.appearance
    rng = np.random.default_rng(0)
    zeros = acquire(np.zeros(200_000, dtype=np.float32), appearance, "sax", rng).astype(float)
    sigma = appearance.gain * appearance.series_gain["sax"] / appearance.snr
    # Zero signal gives Rayleigh-distributed magnitudes: mean σ sqrt(π/2), never a constant background.
    assert zeros.mean() == pytest.approx(sigma * math.sqrt(math.pi / 2), rel=0.03)
    assert zeros.std() == pytest.approx(sigma * math.sqrt(2 - math.pi / 2), rel=0.05)
    bright = acquire(np.ones(200_000, dtype=np.float32), appearance, "sax", rng).astype(float)
    gain = appearance.gain * appearance.series_gain["sax"]
    assert bright.mean() == pytest.approx(gain, rel=0.01) and bright.std() == pytest.approx(sigma, rel=0.05)
    saturated = acquire(np.full(10, 100.0, dtype=np.float32), appearance, "sax", rng)
    assert saturated.dtype == np.uint16 and saturated.max() == MAX_STORED_VALUE


def test_appearance_ranges():
    scene, _ = _scene(3, frames=4)
    appearance = scene.appearance
    assert 20 <= appearance.snr <= 80
    assert 3.2 <= 1.0 / appearance.intensity["myocardium"] <= 4.6
    spread = sample_appearance(np.random.default_rng(0), scene.torso, 0.1).series_gain.values()
    assert all(0.9 <= gain <= 1.1 for gain in spread)
    assert set(sample_appearance(np.random.default_rng(0), scene.torso, 0.0).series_gain.values()) == {1.0}
    # Coil shading: brighter towards the anterior chest wall.
    front = np.array([[0.0, scene.torso.body_centre[1] + scene.torso.body_radii[1] - 5.0, 0.0]], dtype=np.float32)
    assert appearance.sensitivity(front)[0] > appearance.sensitivity(np.zeros((1, 3), dtype=np.float32))[0] * 1.2
    with pytest.raises(DataError, match="series_intensity_spread"):
        sample_appearance(np.random.default_rng(0), scene.torso, -0.1)
