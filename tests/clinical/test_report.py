"""Tests for medssl.clinical.report: valid PNG/PDF files, the synthetic-data banner, numbers, ranges, slice choice."""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np
import pytest
from matplotlib.image import imread

from medssl.clinical.cardiac import cardiac_function, ventricular_volumes
from medssl.clinical.report import REFERENCE_RANGES, SYNTHETIC_DATA_WARNING, write_report
from medssl.errors import DataError

SPACING = (1.5, 1.5, 8.0)


@pytest.fixture(scope="module")
def cine() -> tuple[np.ndarray, np.ndarray]:
    """A hand-made ``[H, W, S, T]`` cine: LV labelled on slices 1-4 (largest cavity on slice 4), RV beside it."""
    height, width, slices, frames = 48, 40, 6, 5
    rows, columns = np.mgrid[:height, :width]
    labels = np.zeros((height, width, slices, frames), dtype=np.uint8)
    for frame in range(frames):
        squeeze = 1.0 - 0.25 * math.sin(math.pi * frame / (frames - 1))  # ED at frame 0 and 4, ES at 2
        for index in range(1, 5):
            radius = (3.0 + index) * squeeze
            distance = np.hypot(rows - 24, columns - 24)
            labels[..., index, frame][distance < radius + 3] = 2
            labels[..., index, frame][distance < radius] = 3
            labels[..., index, frame][(np.abs(rows - 24) < 6) & (np.abs(columns - 8) < 4 * squeeze + 1)] = 1
    image = np.random.default_rng(0).normal(100.0, 10.0, labels.shape) + 200.0 * (labels == 3)
    return image, labels


@pytest.fixture(scope="module")
def report(cine, tmp_path_factory):
    image, labels = cine
    curves = ventricular_volumes(labels, SPACING)
    function = cardiac_function(curves)
    folder = tmp_path_factory.mktemp("report")
    rendered = write_report(
        image, labels, curves, function, folder / "report.png", folder / "report.pdf", spacing_mm=SPACING,
        trained_on_synthetic_only=True, frame_times_ms=[0.0, 200.0, 400.0, 600.0, 800.0],
    )
    return rendered, function, curves


def test_png_and_pdf_are_valid_two_page_documents(report):
    rendered, _, _ = report
    png = imread(rendered.png)
    assert png.shape[2] == 4 and png.shape[0] > 2 * png.shape[1]  # two A4 portrait pages one above the other
    assert png.shape[1] >= 800  # readable: at least ~100 dpi across an A4 page
    data = rendered.pdf.read_bytes()
    assert data.startswith(b"%PDF-") and data.rstrip().endswith(b"%%EOF")
    assert len(re.findall(rb"/Type\s*/Page(?![s\w])", data)) == 2
    assert not list(rendered.png.parent.glob(".*.tmp"))  # no temporary file left behind


def test_synthetic_banner_numbers_and_flags_are_drawn(report):
    rendered, function, _ = report
    text = "\n".join(rendered.text)
    assert text.count(SYNTHETIC_DATA_WARNING) == 2  # on both pages
    for value, unit in ((function.lv_edv_ml, "ml"), (function.rv_esv_ml, "ml"), (function.lv_mass_g, "g")):
        assert f"{value:.1f} {unit}" in text
    assert f"{function.lv_ef_pct:.0f} %" in text
    assert f"ED = frame {function.ed_frame}, ES = frame {function.es_frame}" in text
    assert function.flags == [] and "None: the results passed the plausibility checks." in text
    assert "Kawel-Boehm" in text and "Hudsmith" in text


def test_basal_mid_and_apical_slices_are_chosen_from_the_lv(report):
    rendered, function, _ = report
    titles = [line for line in rendered.text if "(slice" in line]
    # LV on slices 1..4, larger cavity on 4: basal 4, apical 1, mid = the middle of [1, 2, 3, 4].
    assert titles[:3] == [f"{name} (slice {index}), ED (frame {function.ed_frame})"
                          for name, index in (("basal", 4), ("mid", 3), ("apical", 1))]


def test_values_outside_the_reference_range_are_highlighted(cine, tmp_path):
    image, labels = cine
    curves = ventricular_volumes(labels, SPACING)
    function = dataclasses.replace(
        cardiac_function(curves), lv_edv_ml=200.0, lv_ef_pct=30.0, rv_edv_ml=150.0, lv_mass_g=math.nan,
        flags=["No LV myocardium is labelled at ED (frame 0): LV mass is undefined."],
    )
    men, women = REFERENCE_RANGES["lv_edv_ml"].men, REFERENCE_RANGES["lv_edv_ml"].women
    assert men[0] <= 200.0 <= men[1] and not women[0] <= 200.0 <= women[1]  # the case the test is about
    kwargs = {"spacing_mm": SPACING, "trained_on_synthetic_only": False}
    either = write_report(image, labels, curves, function, tmp_path / "a.png", tmp_path / "a.pdf", **kwargs)
    woman = write_report(image, labels, curves, function, tmp_path / "b.png", tmp_path / "b.pdf", sex="F", **kwargs)
    assert "lv_ef_pct" in either.out_of_range and "lv_edv_ml" not in either.out_of_range
    assert {"lv_ef_pct", "lv_edv_ml"} <= set(woman.out_of_range)
    assert "lv_mass_g" not in woman.out_of_range and "not measurable" in woman.text
    assert "30 %  (!)" in either.text and "200.0 ml  (!)" in woman.text
    assert SYNTHETIC_DATA_WARNING not in either.text
    assert "- No LV myocardium is labelled at ED (frame 0): LV mass is undefined." in "\n".join(either.text)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"labels": np.zeros((4, 4, 1, 5), np.uint8)}, "labels must be a numpy array of the image's shape"),
        ({"spacing_mm": (1.5, 0.0, 8.0)}, "spacing_mm must be three finite values > 0"),
        ({"frame_times_ms": [0.0, 1.0]}, "frame_times_ms must hold T = 5 times"),
        ({"sex": "female"}, "sex must be 'M', 'F' or None"),
    ],
)
def test_bad_inputs_raise_and_write_nothing(cine, tmp_path, change, message):
    image, labels = cine
    curves = ventricular_volumes(labels, SPACING)
    arguments = {"image": image, "labels": labels, "curves": curves, "function": cardiac_function(curves),
                 "png_path": tmp_path / "r.png", "pdf_path": tmp_path / "r.pdf", "spacing_mm": SPACING,
                 "trained_on_synthetic_only": True} | change
    with pytest.raises(DataError, match=re.escape(message)):
        write_report(**arguments)
    assert list(tmp_path.iterdir()) == []
