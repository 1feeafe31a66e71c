"""The synthetic chest CT scene: tissue values in HU, the nodule of each class, partial volume, geometry."""

import numpy as np
import pytest

from medssl.data.ct_phantom.scene import CT_CLASSES, MIXED, TISSUES, render_scene, sample_scene
from medssl.errors import DataError

SPACING = (3.0, 3.0, 2.5)
# Textbook HU ranges (air, fat, soft tissue and blood, lung parenchyma, bone).
RANGES = {"air": (-1010, -990), "fat": (-120, -80), "soft_tissue": (0, 80), "blood": (25, 55), "lung": (-900, -800),
          "bone": (150, 900)}


def render(seed, label, shape=(128, 128), noise=(0.0, 0.0), **kwargs):
    rng = np.random.default_rng(seed)
    return sample_scene(rng, label), *render_scene(sample_scene(np.random.default_rng(seed), label), rng, shape,
                                                  SPACING, noise=noise, **kwargs)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pure_voxels_hold_their_tissue_hu(seed):
    _, hu, tissues, _, info = render(seed, 0)
    assert info == {"white_noise_hu": 0.0, "correlated_noise_hu": 0.0}
    for name, (low, high) in RANGES.items():
        values = hu[tissues == TISSUES[name]]
        assert values.size > 20, name
        # Lung texture (+-25 HU sd) is the only variation left without noise.
        assert low <= np.median(values) <= high, (name, np.median(values))
    assert (tissues == TISSUES["nodule"]).sum() == 0


def test_each_class_has_its_nodule_in_a_lung():
    for label, kind in enumerate(CT_CLASSES[1:], start=1):
        scene, hu, tissues, _, _ = render(3, label, shape=(128, 128))
        assert scene.nodule["kind"] == kind
        nodule = hu[tissues == TISSUES["nodule"]]
        if kind == "solid":
            assert 4.0 <= scene.nodule["diameter_mm"] <= 20.0 and 10 <= scene.nodule["hu"] <= 60
        else:
            assert 8.0 <= scene.nodule["diameter_mm"] <= 25.0 and -700 <= scene.nodule["hu"] <= -400
        if nodule.size:  # a nodule smaller than a voxel leaves only partial-volume voxels
            np.testing.assert_allclose(np.median(nodule), scene.nodule["hu"], atol=1.0)
        # the nodule sits inside a lung: its centre's pixel is lung, nodule or vessel, never the chest wall
        x, y, _ = scene.nodule["centre_mm"]
        i, j = (round(c / SPACING[0] + (128 - 1) / 2) for c in (x, y))
        assert tissues[i, j] in (TISSUES["lung"], TISSUES["nodule"], TISSUES["blood"], MIXED)


def test_partial_volume_voxels_lie_between_their_tissues():
    _, hu, tissues, _, _ = render(4, 0)
    mixed = tissues == MIXED
    assert 0.05 < mixed.mean() < 0.6
    assert hu[mixed].min() >= -1000.5 - 1e-3 and hu[mixed].max() <= 900


def test_noise_levels_are_the_requested_ones():
    _, clean, tissues, _, _ = render(5, 0)
    _, noisy, _, _, info = render(5, 0, noise=(20.0, 0.0))
    air = tissues == TISSUES["air"]
    assert np.std((noisy - clean)[air]) == pytest.approx(20.0, rel=0.1)
    assert info["white_noise_hu"] == 20.0


def test_volume_geometry_and_affine():
    _, hu, tissues, affine, _ = render(6, 1, shape=(32, 32, 16), supersample=(1, 1, 1))
    assert hu.shape == tissues.shape == (32, 32, 16) and hu.dtype == np.float32
    np.testing.assert_allclose(np.diag(affine)[:3], SPACING)
    # voxel centres are symmetric about (0, 0, slice_z = 0)
    np.testing.assert_allclose(affine[:3, :3] @ [31, 31, 15] + affine[:3, 3], -affine[:3, 3])


def test_bad_inputs_get_clear_errors():
    with pytest.raises(DataError, match=r"class index 0..2 of \('none', 'solid', 'ground_glass'\), got 3"):
        sample_scene(np.random.default_rng(0), 3)
    scene = sample_scene(np.random.default_rng(0), 0)
    with pytest.raises(DataError, match=r"shape must be \(H, W\) or \(H, W, D\)"):
        render_scene(scene, np.random.default_rng(0), (8,), SPACING)
