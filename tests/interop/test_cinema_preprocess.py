"""CineMA's input pre-processing: geometry from the config, resampling, intensity range and the crop around the
heart, checked on hand-made images whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from medssl.data.cine_labelled import SegmentationView
from medssl.errors import ConfigError, DataError
from medssl.interop.cinema_config import read_cinema_config
from medssl.interop.cinema_preprocess import CropAroundHeartd, cinema_views, prepare_cinema_input


def test_views_come_from_the_config(cinema_fixture):
    views = cinema_views(read_cinema_config(cinema_fixture.config("seg")))
    assert list(views) == ["sax"]
    assert (views["sax"].image_size, views["sax"].spacing) == ((192, 192, 16), (1.0, 1.0, 10.0))
    lax = cinema_views(read_cinema_config(cinema_fixture.config("landmark_coordinate")))["lax_4c"]
    assert (lax.image_size, lax.spacing) == ((256, 256), (1.0, 1.0))
    with pytest.raises(ConfigError, match="'lax_3c' cannot be pre-processed"):
        cinema_views(read_cinema_config(cinema_fixture.config("mae")))


def test_small_images_are_centred_and_slices_padded_at_the_end():
    affine = torch.eye(4)
    image = MetaTensor(torch.ones(1, 10, 10, 3), affine=affine)
    out = CropAroundHeartd("image", (16, 16, 4))({"image": image})["image"]
    assert out.shape == (1, 16, 16, 4)
    expected = torch.zeros(1, 16, 16, 4)
    expected[:, 3:13, 3:13, :3] = 1
    torch.testing.assert_close(out.as_tensor(), expected)
    # the same world point: voxel (3, 3, 0) of the output is voxel (0, 0, 0) of the input
    np.testing.assert_allclose(np.asarray(out.affine)[:3, 3], [-3, -3, 0])


def test_the_window_is_centred_on_the_heart_in_world_coordinates():
    spacing, origin = np.array([2.0, 2.0, 10.0]), np.array([-40.0, 25.0, 7.0])
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    grid = np.stack(np.meshgrid(*(np.arange(n) for n in (50, 60, 5)), indexing="ij"), -1)
    heart_voxel = np.array([31, 17, 2])
    blob = np.exp(-(((grid - heart_voxel) * spacing) ** 2).sum(-1) / (2 * 6.0**2))
    frames = np.stack([blob * (t + 1) * 100 for t in range(3)], -1)
    frames[:2] = 1000.0  # a bright chest wall, outside the window, sets the upper percentile
    cine = MetaTensor(torch.as_tensor(frames, dtype=torch.float32), affine=torch.as_tensor(affine))
    view = SegmentationView("sax", (40, 40, 8), (1.0, 1.0, 10.0))
    center_mm = origin + heart_voxel * spacing
    image = prepare_cinema_input(cine, view, frames=[2, 0], center_mm=center_mm)
    assert image.shape == (1, 2, 40, 40, 8) and image.dtype == torch.float32
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    for channel in (0, 1):
        peak = np.unravel_index(int(image[0, channel].argmax()), (40, 40, 8))
        assert abs(peak[0] - 20) <= 1 and abs(peak[1] - 20) <= 1 and peak[2] == 2
    assert image[0, 0, ..., 5:].abs().max() == 0  # slices beyond the stack are zero padding
    # One intensity scale for the whole cine, frames in the order asked: frame 2 is 3x frame 0.
    torch.testing.assert_close(image[0, 0].max() / image[0, 1].max(), torch.tensor(3.0), rtol=0.02, atol=0)


def test_bad_frames_and_centres_are_data_errors():
    cine = MetaTensor(torch.rand(20, 20, 2, 3), affine=torch.eye(4))
    view = SegmentationView("sax", (16, 16, 4), (1.0, 1.0, 1.0))
    with pytest.raises(DataError, match=r"frames \[3\] out of range for a cine of 3 frames"):
        prepare_cinema_input(cine, view, [3])
    with pytest.raises(DataError, match="the heart centre lies outside the image"):
        prepare_cinema_input(cine, view, [0], center_mm=[500.0, 0.0, 0.0])
    with pytest.raises(DataError, match=r"expected a lax_4c cine"):
        prepare_cinema_input(cine, SegmentationView("lax_4c", (16, 16), (1.0, 1.0)), [0])
