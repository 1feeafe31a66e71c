"""Tests for medssl.data.cxr_phantom.findings: presence sampling and the CTR ranges hearts are built for."""

from __future__ import annotations

import numpy as np
import pytest

from medssl.data.cxr_phantom.findings import FINDINGS, PREVALENCE, sample_findings
from medssl.errors import DataError


def test_requested_findings_are_exact_and_ctr_ranges_stay_off_the_threshold():
    rng = np.random.default_rng(0)
    for _ in range(50):
        present, ctr = sample_findings(rng, ("cardiomegaly", "nodule"))
        assert present == {"cardiomegaly", "nodule"} and 0.52 < ctr < 0.67
        present, ctr = sample_findings(rng, ())
        assert present == frozenset() and 0.35 < ctr < 0.48


def test_sampled_prevalences_and_effusion_with_cardiomegaly():
    rng = np.random.default_rng(1)
    draws = [sample_findings(rng, None)[0] for _ in range(4000)]
    for name in ("nodule", "pneumothorax", "consolidation", "cardiomegaly"):
        assert np.mean([name in d for d in draws]) == pytest.approx(PREVALENCE[name], abs=0.03)
    with_heart = np.mean([("effusion" in d) for d in draws if "cardiomegaly" in d])
    without = np.mean([("effusion" in d) for d in draws if "cardiomegaly" not in d])
    assert with_heart > 2 * without
    assert sum(not d for d in draws) > 0.25 * len(draws)  # a good share of normal images


def test_unknown_finding_lists_the_valid_ones():
    with pytest.raises(DataError, match="mass.*cardiomegaly"):
        sample_findings(np.random.default_rng(0), ("mass",))
    assert len(FINDINGS) == 5
