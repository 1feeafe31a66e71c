"""Tests for medssl.data.phantom.torso: the body is laid out around the heart the way a chest is."""

from __future__ import annotations

import numpy as np
import pytest

from medssl.data.phantom.anatomy import sample_placement
from medssl.data.phantom.groups import sample_heart
from medssl.data.phantom.torso import TISSUES, heart_extent, sample_torso


@pytest.fixture(scope="module", params=[0, 1, 2])
def subject(request):
    rng = np.random.default_rng(request.param)
    heart, _, _ = sample_heart(rng, "NOR", 20)
    placement = sample_placement(rng, heart.params.length)
    return heart, placement, sample_torso(rng, heart, placement)


def _tissue(torso, points) -> list[str]:
    return [TISSUES[i] for i in torso.classify(np.asarray(points, dtype=np.float32))]


def test_heart_sits_in_the_chest_on_the_diaphragm(subject):
    heart, placement, torso = subject
    inside = heart_extent(heart, placement)
    bx, by = torso.body_centre
    rx, ry = torso.body_radii
    assert np.all(((inside[:, 0] - bx) / rx) ** 2 + ((inside[:, 1] - by) / ry) ** 2 < 1.0)
    # Left of the body's midline and in front of its centre, as a heart is.
    assert inside[:, 0].mean() < bx and inside[:, 1].mean() > by
    lowest = inside[np.argmin(inside[:, 2])]
    top, cx, cy, drx, dry, rise = torso.diaphragm
    dome = top - 0.5 * ((lowest[0] - cx) ** 2 / drx + (lowest[1] - cy) ** 2 / dry) + rise * (lowest[0] - cx)
    assert 0.5 <= lowest[2] - dome <= 5.0


def test_classification_follows_the_anatomy(subject):
    heart, placement, torso = subject
    bx, by = torso.body_centre
    rx, ry = torso.body_radii
    top = torso.diaphragm[0]
    level = top + 40.0  # above the diaphragm: chest
    assert _tissue(torso, [[bx + rx + 10, by, level]]) == ["air"]
    assert _tissue(torso, [[bx + rx - 2, by, level]]) == ["fat"]  # subcutaneous fat under the skin
    right_lung = [bx + 0.6 * torso.cavity_radii[0], torso.cavity_centre[1], level]
    assert _tissue(torso, [right_lung])[0] in ("lung", "lung_vessel")
    assert _tissue(torso, [[bx + 40.0, by + 10.0, top - 80.0]]) in (["liver"], ["liver_vessel"])
    sx, sy = torso.spine_centre
    assert _tissue(torso, [[sx, sy, level]]) == ["marrow"]
    assert _tissue(torso, [[*torso.aorta_centre, level]]) == ["blood"]


def test_lungs_fill_much_of_the_chest_and_vessels_are_sparse(subject):
    _, _, torso = subject
    rng = np.random.default_rng(0)
    cx, cy = torso.cavity_centre
    points = np.stack(
        [
            cx + rng.uniform(-1, 1, 20000) * torso.cavity_radii[0],
            cy + rng.uniform(-1, 1, 20000) * torso.cavity_radii[1],
            np.full(20000, torso.diaphragm[0] + 60.0),
        ],
        axis=1,
    )
    tissue = np.array(_tissue(torso, points))
    lung, vessel = (tissue == "lung").mean(), (tissue == "lung_vessel").mean()
    assert lung > 0.3 and 0.0 < vessel < 0.1 * lung


def test_texture_is_smooth_and_bounded(subject):
    _, _, torso = subject
    line = np.stack([np.linspace(0, 100, 1001), np.zeros(1001), np.zeros(1001)], axis=1).astype(np.float32)
    texture = torso.texture(line)
    assert np.abs(texture).max() <= 1.5 + 1e-5 and texture.std() > 0.1
    assert np.abs(np.diff(texture)).max() < 0.1  # 0.1 mm steps: no jumps
