"""Tests for medssl.data.phantom.groups: each disease group shows its ACDC defining signs in the exact ground truth."""

from __future__ import annotations

import numpy as np
import pytest

from medssl.data.phantom.groups import GROUPS, group_violations, heart_summary, sample_bsa, sample_heart
from medssl.errors import DataError

SEEDS = (0, 1, 2)


@pytest.fixture(scope="module")
def hearts():
    return {(group, seed): sample_heart(np.random.default_rng(seed), group, 25) for group in GROUPS for seed in SEEDS}


@pytest.mark.parametrize("seed", SEEDS)
def test_groups_show_their_defining_signs(hearts, seed):
    summaries = {group: hearts[group, seed][2] for group in GROUPS}
    nor, dcm, hcm, minf, arv = (summaries[group] for group in GROUPS)

    assert nor["lv_ef_pct"] > 50 and max(nor["segment_thickness_ed_mm"]) < 12
    assert 45 <= nor["rv_ef_pct"] <= 65 and nor["rv_edv_index_ml_m2"] < 105

    assert dcm["lv_ef_pct"] < 40 and dcm["lv_edv_index_ml_m2"] > 100
    assert max(dcm["segment_thickness_ed_mm"]) < max(nor["segment_thickness_ed_mm"]) + 1.0  # thin, dilated

    assert hcm["lv_mass_index_g_m2"] > 110
    assert (np.asarray(hcm["segment_thickness_ed_mm"]) > 15).sum() >= 3
    assert hcm["lv_ef_pct"] > 55

    shortening = np.asarray(minf["segment_endocardial_shortening_pct"])
    assert minf["lv_ef_pct"] < 40 and (shortening < 10).sum() >= 3
    assert shortening.max() > 15  # regional, not global: the remote myocardium still contracts

    assert arv["rv_edv_index_ml_m2"] > 110 and arv["rv_ef_pct"] < 40 and arv["lv_ef_pct"] > 50


def test_summary_is_consistent_with_its_per_frame_volumes(hearts):
    heart, bsa, summary = hearts["NOR", 0]
    lv, rv = np.asarray(summary["lv_volume_ml"]), np.asarray(summary["rv_volume_ml"])
    assert lv.size == rv.size == heart.num_frames
    es = heart.es_frame
    assert summary["lv_edv_ml"] == pytest.approx(lv[0], abs=1e-3)
    assert summary["lv_esv_ml"] == pytest.approx(lv[es], abs=1e-3)
    assert summary["lv_sv_ml"] == pytest.approx(summary["lv_edv_ml"] - summary["lv_esv_ml"])
    assert summary["lv_ef_pct"] == pytest.approx(100 * summary["lv_sv_ml"] / summary["lv_edv_ml"])
    assert summary["rv_ef_pct"] == pytest.approx(100 * (rv[0] - rv[es]) / rv[0], abs=1e-3)
    mass = 1.05 * heart.lv_myocardium_ml(heart.state(np.zeros(1)))[0]
    assert summary["lv_mass_g"] == pytest.approx(mass) and summary["lv_mass_index_g_m2"] == pytest.approx(mass / bsa)
    quick = heart_summary(heart, bsa, per_frame=False)
    assert quick["lv_ef_pct"] == pytest.approx(summary["lv_ef_pct"]) and len(quick["lv_volume_ml"]) == 2


def test_group_violations_names_the_missing_signs():
    summary = {
        "lv_ef_pct": 60.0,
        "rv_ef_pct": 50.0,
        "lv_edv_index_ml_m2": 80.0,
        "rv_edv_index_ml_m2": 80.0,
        "lv_mass_index_g_m2": 70.0,
        "segment_thickness_ed_mm": [9.0] * 16,
        "segment_endocardial_shortening_pct": [30.0] * 16,
    }
    assert group_violations(summary, "NOR") == []
    assert group_violations(summary, "DCM") == ["LV EDV > 105 ml/m²", "LVEF < 38 %", "thin wall"]
    assert group_violations(summary, "HCM") == ["LV mass > 115 g/m²", ">= 3 segments > 15 mm"]
    assert group_violations(summary, "MINF") == ["LVEF < 40 %", ">= 3 akinetic segments"]
    summary["segment_endocardial_shortening_pct"] = [5.0] * 16  # globally hypokinetic, not regional
    assert group_violations(summary, "MINF") == ["LVEF < 40 %", "remote segments still contract (> 15 %)"]
    assert group_violations(summary, "ARV") == ["RV EDV > 115 ml/m²", "RVEF < 38 %"]
    with pytest.raises(DataError, match="unknown disease group 'XYZ'"):
        group_violations(summary, "XYZ")
    with pytest.raises(DataError, match="unknown disease group"):
        sample_heart(np.random.default_rng(0), "XYZ", 20)


def test_sample_heart_is_deterministic_and_seed_dependent():
    first, _, summary = sample_heart(np.random.default_rng(7), "NOR", 20)
    again, _, summary_again = sample_heart(np.random.default_rng(7), "NOR", 20)
    other, _, _ = sample_heart(np.random.default_rng(8), "NOR", 20)
    assert first.params == again.params and summary == summary_again
    assert first.params != other.params


def test_bsa_is_adult():
    values = [sample_bsa(np.random.default_rng(seed)) for seed in range(200)]
    assert min(values) >= 1.55 and max(values) <= 2.25 and np.std(values) > 0.1
