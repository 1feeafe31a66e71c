"""Disease groups of the cine phantoms (ACDC definitions) and the sampling of a heart that shows them.

Each group draws target volumes and function (indexed by a body surface area), a wall geometry and a regional
pattern, then solves the heart's free parameters so the *exact* volumes hit the targets: the endocardial radius
for the LV end-diastolic volume (EDV), the radial shortening for the LVEF, the RV crescent width for the RV EDV and
the RV shortening for the RVEF (each a monotone scalar root). A draw that misses its group's defining signs is redrawn.

| group | defining signs checked here |
|---|---|
| NOR | LVEF > 52 %, LV EDV < 95 ml/m², ED wall < 12 mm everywhere, RV EDV < 105 ml/m², RVEF > 45 % |
| DCM | LV EDV > 105 ml/m², LVEF < 38 %, thin wall (< 8.5 mm) |
| HCM | LV mass > 115 g/m², >= 3 basal/mid segments > 15 mm at ED, LVEF > 55 % |
| MINF | LVEF < 40 %, >= 3 segments with < 10 % endocardial shortening (akinetic), >= 3 remote ones > 15 % |
| ARV | RV EDV > 115 ml/m², RVEF < 38 % (LVEF > 50 %) |

References:
    Bernard et al., IEEE TMI 2018, https://doi.org/10.1109/TMI.2018.2837502 (ACDC groups).
    Cerqueira et al., "Standardized myocardial segmentation ... for tomographic imaging of the heart", Circulation
    2002, https://doi.org/10.1161/hc0402.102975 (AHA segments, coronary territories).
    Mosteller, "Simplified calculation of body-surface area", NEJM 1987 (BSA).
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
from scipy.optimize import brentq

from medssl.data.phantom.anatomy import (
    MYOCARDIAL_DENSITY_G_PER_ML,
    Heart,
    HeartParams,
    contraction_curve,
    end_systolic_frame,
    mitral_slope,
)
from medssl.errors import DataError

__all__ = ["GROUPS", "group_violations", "heart_summary", "sample_bsa", "sample_heart"]

GROUPS = ("NOR", "DCM", "HCM", "MINF", "ARV")
_MAX_DRAWS = 40
_MAX_CONTRACTION = 0.7


def sample_bsa(rng: np.random.Generator) -> float:
    """Draw an adult body surface area (m², Mosteller) from a plausible height and weight, within 1.55-2.25."""
    height_cm = rng.normal(172.0, 9.0)
    weight_kg = rng.normal(78.0, 13.0)
    return float(np.clip(math.sqrt(max(height_cm, 140.0) * max(weight_kg, 40.0) / 3600.0), 1.55, 2.25))


def _u(rng: np.random.Generator, low: float, high: float) -> float:
    return float(rng.uniform(low, high))


def _group_geometry(rng: np.random.Generator, group: str, size: float) -> tuple[dict, dict]:
    """Group-specific parameter overrides and targets (indexed volumes in ml/m², fractions in %)."""
    targets = {
        "lv_edv_index": _u(rng, 62, 88),
        "lv_ef": _u(rng, 56, 70),
        "rv_edv_index": _u(rng, 62, 92),
        "rv_ef": _u(rng, 48, 62),
    }
    params = {
        "length": _u(rng, 86, 100) * size,
        "wall": _u(rng, 7.0, 9.5),
        "base_descent": _u(rng, 10, 15),
        "tapse": _u(rng, 17, 25),
        "early_filling": _u(rng, 0.68, 0.85),
    }
    if group == "DCM":
        targets.update(lv_edv_index=_u(rng, 112, 160), lv_ef=_u(rng, 14, 36), rv_ef=_u(rng, 42, 55))
        params.update(
            length=_u(rng, 98, 115) * size,
            wall=_u(rng, 5.0, 7.0),
            sigma=_u(rng, 0.15, 0.25),  # spherical: widest near the base
            base_descent=_u(rng, 4, 8),
            tapse=_u(rng, 12, 18),
            early_filling=_u(rng, 0.55, 0.8),
        )
    elif group == "HCM":
        # ACDC's HCM is severe: LV mass > 110 g/m² needs ~18 mm mean wall, with asymmetric septal bulging.
        wall = _u(rng, 12.0, 15.0)
        septal = _u(rng, 21.0, 30.0)
        if rng.uniform() < 0.3:  # concentric variant
            wall = _u(rng, 16.0, 19.0)
            septal = wall + _u(rng, 2.0, 5.0)
        targets.update(lv_edv_index=_u(rng, 50, 80), lv_ef=_u(rng, 62, 78))
        params.update(
            length=_u(rng, 84, 98) * size,
            wall=wall,
            hypertrophy=septal / wall - 1.0,
            hypertrophy_angle=math.radians(_u(rng, 140, 190)),
            hypertrophy_half_width=_u(rng, 1.2, 1.7),
            hypertrophy_span=(0.0, _u(rng, 0.75, 0.9)) if rng.uniform() < 0.8 else (0.35, 1.2),
            base_descent=_u(rng, 8, 12),
            early_filling=_u(rng, 0.45, 0.62),
        )
    elif group == "MINF":
        territory = rng.integers(3)
        # LAD: anterior/anteroseptal, mid to apex; RCA: inferior, base to mid; LCx: (infero)lateral, base to mid.
        angle, span = [
            (_u(rng, 95, 145), (_u(rng, 0.25, 0.4), 1.15)),
            (_u(rng, 250, 290), (-0.15, _u(rng, 0.6, 0.75))),
            (_u(rng, -25, 20), (-0.15, _u(rng, 0.6, 0.75))),
        ][territory]
        targets.update(lv_edv_index=_u(rng, 85, 130), lv_ef=_u(rng, 24, 38), rv_ef=_u(rng, 44, 58))
        params.update(
            infarct=_u(rng, 0.9, 1.0),
            infarct_angle=math.radians(angle),
            infarct_half_width=_u(rng, 1.3, 1.7),
            infarct_span=span,
            infarct_thinning=_u(rng, 0.35, 0.55),
            wall=_u(rng, 7.5, 10.0),
            base_descent=_u(rng, 5, 9),
            tapse=_u(rng, 13, 20),
            early_filling=_u(rng, 0.55, 0.8),
        )
    elif group == "ARV":
        targets.update(
            lv_edv_index=_u(rng, 55, 80), lv_ef=_u(rng, 52, 65), rv_edv_index=_u(rng, 118, 170), rv_ef=_u(rng, 20, 36)
        )
        params.update(
            base_descent=_u(rng, 6, 9),
            tapse=_u(rng, 7, 11),
            rv_apex=_u(rng, 0.87, 0.9),
            rv_half_width=math.radians(_u(rng, 85, 95)),
        )
    return params, targets


def _common_geometry(rng: np.random.Generator) -> dict:
    """Anatomical variety shared by all groups."""
    # Trabeculae: thin strands running mostly along the long axis, from waves with small kz and mixed lengths.
    waves = []
    for _ in range(5):
        direction = rng.normal(size=3) * np.array([1.0, 1.0, 0.3])
        k = 2.0 * math.pi / _u(rng, 4.0, 14.0)
        kx, ky, kz = k * direction / np.linalg.norm(direction)
        waves.append((float(kx), float(ky), float(kz), _u(rng, 0, 2 * math.pi)))
    return {
        "apex_thickening": _u(rng, 0.25, 0.5),
        "sigma": _u(rng, 0.3, 0.45),  # the base narrows towards the mitral annulus
        "shape": tuple(float(v) for v in np.clip(rng.normal(0.0, 0.025, 4), -0.05, 0.05)),
        # The mitral annulus is a saddle about 10 mm high, slightly tilted to the short axis.
        "base_tilt": _u(rng, 0.05, 0.2),
        "base_tilt_angle": _u(rng, 0, 2 * math.pi),
        "base_saddle": _u(rng, 0.14, 0.24),
        "base_saddle_angle": _u(rng, 0, math.pi),
        "tricuspid_tilt": _u(rng, 0.15, 0.3),
        "tricuspid_tilt_angle": math.radians(_u(rng, 120, 240)),
        "rv_angle": math.radians(_u(rng, 155, 175)),
        "rv_half_width": math.radians(_u(rng, 70, 85)),
        "tricuspid_offset": _u(rng, 5, 10),
        "rv_apex": _u(rng, 0.8, 0.87),
        "rv_sigma": _u(rng, 0.05, 0.15),
        "rv_wall": _u(rng, 3.0, 4.5),
        "la_radii": (_u(rng, 23, 29), _u(rng, 20, 25), _u(rng, 24, 31)),
        "la_offset": (_u(rng, 0, 8), _u(rng, -10, -2)),
        "ra_radii": (_u(rng, 21, 27), _u(rng, 20, 26), _u(rng, 23, 30)),
        "atrial_expansion": _u(rng, 0.08, 0.16),
        "papillary_angles": (math.radians(_u(rng, 35, 55)), math.radians(_u(rng, 270, 295))),
        "papillary_radius": _u(rng, 4.0, 6.0),
        "trabeculation": _u(rng, 1.5, 4.0),
        "trabeculation_waves": tuple(waves),
        "fat": _u(rng, 0.8, 2.5),
        "groove_fat": _u(rng, 2.0, 6.0),
        "pericardium": _u(rng, 1.0, 1.5),
    }


def _fit(heart: Heart | None, name: str, bounds: tuple[float, float], volume, phi: float, target: float):
    """Set parameter ``name`` within ``bounds`` so that ``volume(heart, state(phi))`` equals ``target`` (ml).

    The volume is monotone in each solved parameter, so a sign change of the gap brackets a unique root; without
    one (or with ``heart`` already ``None``) the target is out of reach and ``None`` is returned.
    """
    if heart is None:
        return None

    def candidate(value: float) -> Heart:
        return replace(heart, params=replace(heart.params, **{name: value}))

    def gap(value: float) -> float:
        trial = candidate(value)  # rebuild the state too: RV shortening is part of it
        return float(volume(trial, trial.state(np.array([phi])))[0]) - target

    if gap(bounds[0]) * gap(bounds[1]) > 0:
        return None
    return candidate(brentq(gap, *bounds, xtol=1e-5))


def _solve(heart: Heart, targets: dict, bsa: float) -> Heart | None:
    """Solve the free parameters for the target volumes; ``None`` when a target is out of reach."""
    edv, rv_edv = targets["lv_edv_index"] * bsa, targets["rv_edv_index"] * bsa
    heart = _fit(heart, "endo_radius", (8.0, 70.0), Heart.lv_volume_ml, 0.0, edv)
    esv, rv_esv = edv * (1 - targets["lv_ef"] / 100), rv_edv * (1 - targets["rv_ef"] / 100)
    heart = _fit(heart, "contraction", (0.0, _MAX_CONTRACTION), Heart.lv_volume_ml, 1.0, esv)
    heart = _fit(heart, "rv_width", (2.0, 90.0), Heart.rv_volume_ml, 0.0, rv_edv)
    return _fit(heart, "rv_contraction", (0.0, 0.9), Heart.rv_volume_ml, 1.0, rv_esv)


def heart_summary(heart: Heart, bsa: float, *, per_frame: bool = True) -> dict:
    """Exact ground truth of a heart: volumes per frame, ED/ES volumes, EF, mass and regional measures.

    Args:
        heart: the heart.
        bsa: body surface area (m²) for indexed values.
        per_frame: volumes at every frame; ``False`` computes only ED and ES (the volume lists then hold those
            two), which is all :func:`group_violations` needs.

    Returns:
        A JSON-ready dict (ml, %, g, mm; ``*_index`` per m²).
    """
    state = heart.state() if per_frame else heart.state(np.array([0.0, 1.0]))
    lv = heart.lv_volume_ml(state)
    rv = heart.rv_volume_ml(state)
    es = heart.es_frame if per_frame else 1
    mass = float(heart.lv_myocardium_ml(heart.state(np.zeros(1)))[0]) * MYOCARDIAL_DENSITY_G_PER_ML
    segments = heart.segments()
    out = {
        "lv_volume_ml": [round(float(v), 3) for v in lv],
        "rv_volume_ml": [round(float(v), 3) for v in rv],
        "lv_edv_ml": float(lv[0]),
        "lv_esv_ml": float(lv[es]),
        "lv_sv_ml": float(lv[0] - lv[es]),
        "lv_ef_pct": float(100.0 * (lv[0] - lv[es]) / lv[0]),
        "rv_edv_ml": float(rv[0]),
        "rv_esv_ml": float(rv[es]),
        "rv_sv_ml": float(rv[0] - rv[es]),
        "rv_ef_pct": float(100.0 * (rv[0] - rv[es]) / rv[0]),
        "lv_mass_g": mass,
        "lv_edv_index_ml_m2": float(lv[0] / bsa),
        "rv_edv_index_ml_m2": float(rv[0] / bsa),
        "lv_mass_index_g_m2": mass / bsa,
        "segment_thickness_ed_mm": [round(float(v), 2) for v in segments["thickness_mm"]],
        "segment_endocardial_shortening_pct": [round(float(v), 2) for v in 100.0 * segments["shortening"]],
    }
    return out


def group_violations(summary: dict, group: str) -> list[str]:
    """List the defining signs of ``group`` (table in the module docstring) that ``summary`` misses.

    Args:
        summary: :func:`heart_summary` output.
        group: one of :data:`GROUPS`.

    Returns:
        Human-readable violations; empty when the heart shows every sign.

    Raises:
        DataError: for an unknown group.
    """
    if group not in GROUPS:
        raise DataError(f"unknown disease group {group!r}; choose one of {GROUPS}")
    lvef, rvef = summary["lv_ef_pct"], summary["rv_ef_pct"]
    lv_edvi, rv_edvi = summary["lv_edv_index_ml_m2"], summary["rv_edv_index_ml_m2"]
    thickness = np.asarray(summary["segment_thickness_ed_mm"])
    shortening = np.asarray(summary["segment_endocardial_shortening_pct"])
    checks = {
        "NOR": [
            (lvef > 52, "LVEF > 52 %"),
            (lv_edvi < 95, "LV EDV < 95 ml/m²"),
            (thickness.max() < 12, "ED wall < 12 mm"),
            (rv_edvi < 105 and rvef > 45, "normal RV"),
        ],
        "DCM": [
            (lv_edvi > 105, "LV EDV > 105 ml/m²"),
            (lvef < 38, "LVEF < 38 %"),
            (thickness.max() < 8.5, "thin wall"),
        ],
        "HCM": [
            (summary["lv_mass_index_g_m2"] > 115, "LV mass > 115 g/m²"),
            ((thickness[:12] > 15).sum() >= 3, ">= 3 segments > 15 mm"),
            (lvef > 55, "LVEF > 55 %"),
        ],
        "MINF": [
            (lvef < 40, "LVEF < 40 %"),
            ((shortening < 10).sum() >= 3, ">= 3 akinetic segments"),
            ((shortening > 15).sum() >= 3, "remote segments still contract (> 15 %)"),
        ],
        "ARV": [(rv_edvi > 115, "RV EDV > 115 ml/m²"), (rvef < 38, "RVEF < 38 %"), (lvef > 50, "LVEF > 50 %")],
    }[group]
    if group != "ARV":
        checks.append((rv_edvi < 110 and rvef > 40, "RV not dilated/failing"))
    return [text for ok, text in checks if not ok]


def sample_heart(rng: np.random.Generator, group: str, num_frames: int) -> tuple[Heart, float, dict]:
    """Draw a heart of ``group`` and a BSA, solved for exact target volumes and checked for the group's signs.

    Args:
        rng: the subject's random generator (consumed deterministically).
        group: one of :data:`GROUPS`.
        num_frames: frames per cycle ``T`` (>= 3); ES falls at 35-40 % of the cycle.

    Returns:
        ``(heart, bsa_m2, summary)`` with ``summary`` from :func:`heart_summary`.

    Raises:
        DataError: for an unknown group or ``num_frames < 3``, or if no draw meets the group's signs (a bug).
    """
    if group not in GROUPS:
        raise DataError(f"unknown disease group {group!r}; choose one of {GROUPS}")
    es_frame = end_systolic_frame(num_frames, _u(rng, 0.35, 0.40))
    bsa = sample_bsa(rng)
    size = (bsa / 1.9) ** (1.0 / 3.0)
    for _ in range(_MAX_DRAWS):
        params, targets = _group_geometry(rng, group, size)
        params = {**_common_geometry(rng), **params}
        params["apex_wall"] = params["wall"] * _u(rng, 0.8, 1.0)
        if group == "MINF" and params["infarct_span"][1] > 1.0:  # LAD infarcts thin the apex too
            params["apex_wall"] *= 1.0 - params["infarct_thinning"]
        params["tapse"] = max(params["tapse"], params["base_descent"] + 1.0)
        # The RV apex stays above the LV endocardial apex.
        params["rv_apex"] = min(params["rv_apex"], 1.0 - (params["apex_wall"] + 4.0) / params["length"])
        draft = HeartParams(**params)
        # Where the RV meets the septum (ρ ≈ LV epicardial radius) the tricuspid plane lies apical of the mitral
        # surface, so the RV always borders LV myocardium.
        angles = np.linspace(draft.rv_angle - draft.rv_half_width, draft.rv_angle + draft.rv_half_width, 64)
        radii = np.linspace(20.0, 45.0, 6)[:, None]
        cos_t, sin_t = np.cos(angles), np.sin(angles)
        heart_draft = Heart(draft, np.zeros(3), 1)
        rise = (radii * (mitral_slope(draft, cos_t, sin_t) - heart_draft.tricuspid_slope(cos_t, sin_t))).max()
        draft = replace(draft, tricuspid_offset=max(draft.tricuspid_offset, rise + 2.0))
        phi = contraction_curve(num_frames, es_frame, draft.early_filling)
        heart = _solve(Heart(draft, phi, es_frame), targets, bsa)
        if heart is not None and not group_violations(heart_summary(heart, bsa, per_frame=False), group):
            return heart, bsa, heart_summary(heart, bsa)
    raise DataError(f"could not draw a {group} heart meeting its defining signs in {_MAX_DRAWS} tries")
