"""Tests for medssl.data.phantom.anatomy: cycle timing, exact volumes (closed form, convergence, voxel counts),
placement, labels and landmarks of the analytic heart."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from medssl.data.phantom.anatomy import (
    Heart,
    HeartParams,
    contraction_curve,
    end_systolic_frame,
    linear_map,
    sample_placement,
)
from medssl.data.phantom.groups import sample_heart
from medssl.errors import DataError


def _plain_heart(**changes) -> Heart:
    """A heart whose LV cavity is an exact truncated ellipsoid of revolution (no tilt, saddle, shape or regions)."""
    params = replace(
        HeartParams(), base_tilt=0.0, base_saddle=0.0, shape=(0.0, 0.0, 0.0, 0.0), tricuspid_tilt=0.0, **changes
    )
    return Heart(params, contraction_curve(20, 7), 7)


@pytest.mark.parametrize("frames", range(20, 31))
def test_end_systole_falls_at_35_to_40_percent_of_the_cycle(frames):
    for fraction in (0.35, 0.375, 0.40):
        es = end_systolic_frame(frames, fraction)
        assert 0.35 <= es / frames <= 0.40


def test_end_systolic_frame_rejects_bad_input():
    with pytest.raises(DataError, match="at least 3 frames"):
        end_systolic_frame(2)
    with pytest.raises(DataError, match=r"ES fraction must lie in \(0.35, 0.4\), got 0.5"):
        end_systolic_frame(25, 0.5)


def test_contraction_curve_is_zero_at_ed_one_at_es_and_in_between_elsewhere():
    phi = contraction_curve(25, 9, early_filling=0.7)
    assert phi[0] == 0.0 and phi[9] == pytest.approx(1.0)
    others = np.delete(phi, [0, 9])
    assert np.all((others > 0) & (others < 1))
    assert np.all(np.diff(phi[:10]) > 0) and np.all(np.diff(phi[9:]) <= 1e-12)  # eject, then only refill
    # Early filling recovers most of the stroke volume by 60 % of diastole, the atrial kick the rest.
    diastole = phi[9:]
    assert diastole[int(0.6 * diastole.size)] < 0.4 and diastole[-1] > 0.0
    with pytest.raises(DataError, match="es_frame must lie in 1..24"):
        contraction_curve(25, 25)
    with pytest.raises(DataError, match="early_filling"):
        contraction_curve(25, 9, early_filling=1.0)


def test_lv_cavity_volume_matches_the_closed_form_truncated_ellipsoid():
    heart = _plain_heart(endo_radius=26.0, sigma=0.3, hypertrophy=0.0, infarct=0.0)
    state = heart.state(np.array([0.0, 1.0]))
    volume = heart.lv_volume_ml(state)
    p = heart.params
    for row in range(2):
        a = p.endo_radius * (1.0 - p.contraction * state.phi[row, 0])
        length = state.z_endo_apex[row, 0] - state.z_base[row, 0]
        sigma = p.sigma
        # π a² ∫ (1 - u²) dz with u = s (1 + σ) - σ running from -σ (base) to 1 (apex).
        expected = math.pi * a * a * length / (1 + sigma) * ((1 + sigma) - (1 + sigma**3) / 3.0) / 1000.0
        assert volume[row] == pytest.approx(expected, rel=2e-4)


def test_exact_volumes_are_converged():
    heart, _, _ = sample_heart(np.random.default_rng(3), "MINF", 20)
    state = heart.state(np.array([0.0, 1.0]))
    for method in (heart.lv_volume_ml, heart.rv_volume_ml, heart.lv_myocardium_ml):
        coarse, fine = method(state, resolution=(48, 96)), method(state, resolution=(192, 384))
        np.testing.assert_allclose(method(state), fine, atol=0.05)
        assert np.abs(coarse - fine).max() < 0.5


@pytest.mark.parametrize("group", ["NOR", "HCM", "ARV"])
def test_exact_volumes_agree_with_voxel_counts_of_high_resolution_labels(group):
    """Counting 0.8 mm voxels of :meth:`Heart.labels` reproduces the exact volumes to within 1 %."""
    heart, _, _ = sample_heart(np.random.default_rng(11), group, 20)
    state = heart.state(np.array([0.0, 1.0]), dtype=np.float32)
    step = 0.8
    reach = heart.params.endo_radius + heart.params.wall * (1 + heart.params.hypertrophy) + heart.params.rv_width + 5
    axis = np.arange(-reach, reach, step, dtype=np.float32) + step / 2
    x, y = (g.ravel() for g in np.meshgrid(axis, axis, indexing="ij"))
    counts = np.zeros((2, 4))
    for z in np.arange(-25.0, heart.params.length + 1, step, dtype=np.float32):
        label = heart.labels(x, y, np.array([z], dtype=np.float32), state)
        counts += np.stack([(label == value).sum(axis=1) for value in range(4)], axis=1)
    voxel_ml = step**3 / 1000.0
    exact_state = heart.state(np.array([0.0, 1.0]))
    np.testing.assert_allclose(counts[:, 3] * voxel_ml, heart.lv_volume_ml(exact_state), rtol=0.01)
    np.testing.assert_allclose(counts[:, 1] * voxel_ml, heart.rv_volume_ml(exact_state), rtol=0.01)
    np.testing.assert_allclose(counts[:, 2] * voxel_ml, heart.lv_myocardium_ml(exact_state), rtol=0.01)


def test_volumes_peak_at_ed_and_bottom_out_at_es():
    heart, _, _ = sample_heart(np.random.default_rng(5), "NOR", 27)
    for volume in (heart.lv_volume_ml(), heart.rv_volume_ml()):
        assert int(np.argmax(volume)) == 0
        assert int(np.argmin(volume)) == heart.es_frame


def test_linear_map_equals_matrix_product():
    rng = np.random.default_rng(0)
    points, matrix = rng.normal(size=(50, 3)), rng.normal(size=(3, 4))
    np.testing.assert_allclose(linear_map(points, matrix), points @ matrix, rtol=1e-12)


def test_placement_is_rigid_and_points_the_apex_left_anterior_inferior():
    for seed in range(20):
        placement = sample_placement(np.random.default_rng(seed), 90.0)
        np.testing.assert_allclose(placement.rotation.T @ placement.rotation, np.eye(3), atol=1e-12)
        assert np.linalg.det(placement.rotation) == pytest.approx(1.0)
        left, anterior, inferior = -placement.long_axis[0], placement.long_axis[1], -placement.long_axis[2]
        assert left > 0.4 and anterior > 0.4 and inferior > 0.2
        # The RV (heart -x) lies to the patient's right of the LV.
        assert placement.rotation[0, 0] < 0
        points = np.random.default_rng(seed).normal(size=(10, 3)) * 50
        np.testing.assert_allclose(placement.to_heart(placement.to_patient(points)), points, atol=1e-9)
        np.testing.assert_allclose(placement.to_patient(np.zeros(3)), placement.origin)


def test_labels_are_acdc_ids_with_rv_beside_the_septum():
    heart, _, _ = sample_heart(np.random.default_rng(2), "NOR", 20)
    p = heart.params
    state = heart.state(np.zeros(1), dtype=np.float32)
    z = np.array([0.45 * p.length], dtype=np.float32)
    radius = np.arange(0.0, 90.0, 0.5, dtype=np.float32)

    def ray(angle):
        x, y = radius * np.float32(math.cos(angle)), radius * np.float32(math.sin(angle))
        return heart.labels(x, y, z, state)[0]

    septal, lateral = ray(p.rv_angle), ray(p.rv_angle + math.pi)
    # From the axis outwards: cavity, then myocardium, then (septal side only) RV cavity, then background.
    assert septal[0] == 3 and lateral[0] == 3
    assert list(dict.fromkeys(septal.tolist())) == [3, 2, 1, 0]
    assert list(dict.fromkeys(lateral.tolist())) == [3, 2, 0]
    wall = (lateral == 2).sum() * 0.5
    assert 6.0 <= wall <= 12.0


def test_mitral_hinge_lies_on_the_endocardium_and_the_mitral_surface():
    heart, _, _ = sample_heart(np.random.default_rng(4), "DCM", 20)
    state = heart.state()
    for angle in (0.3, 2.5, 4.0):
        hinge = heart.mitral_hinge(angle, state)
        rho = np.hypot(hinge[:, 0], hinge[:, 1])
        cos_t, sin_t = hinge[:, 0] / rho, hinge[:, 1] / rho
        r_endo, _ = heart.lv_surfaces(cos_t[:, None], sin_t[:, None], hinge[:, 2:3], state)
        np.testing.assert_allclose(rho, r_endo[:, 0], atol=1e-6)
        surface = state.z_base[:, 0] + rho * heart.base_slope(cos_t, sin_t)
        np.testing.assert_allclose(hinge[:, 2], surface, atol=1e-6)
    # The base descends towards the (fixed) apex in systole.
    assert heart.mitral_hinge(0.3, state)[heart.es_frame, 2] - heart.mitral_hinge(0.3, state)[0, 2] > 3.0


def test_heart_rejects_an_rv_longer_than_the_lv():
    with pytest.raises(DataError, match="RV apex"):
        Heart(replace(HeartParams(), rv_apex=0.99), contraction_curve(20, 7), 7)
