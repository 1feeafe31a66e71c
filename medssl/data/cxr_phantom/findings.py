"""Radiographic findings rendered into a projected anatomy, each with an exact pixel mask.

Findings change the attenuation where they are and nowhere else: fluid or exudate replaces lung air (effusion,
consolidation), a nodule adds a small dense sphere, a pneumothorax replaces the lung markings at the periphery by
pleural air behind a thin visceral pleural line. Cardiomegaly is not drawn here: it is a heart built larger by
:func:`medssl.data.cxr_phantom.anatomy.sample_anatomy` (cardiothoracic ratio above 0.5).

Presence is drawn per image with the prevalences in :data:`PREVALENCE` (effusion is three times as likely with
cardiomegaly, as in heart failure), or requested explicitly; sizes run from subtle (a blunted costophrenic angle,
a 6 mm nodule behind a rib, a faint patch) to obvious.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

from medssl.data.cxr_phantom.anatomy import MU_BONE, MU_TISSUE, ChestAnatomy, Grid, ProjectedAnatomy, soft_step
from medssl.errors import DataError

__all__ = ["FINDINGS", "LOCAL_FINDINGS", "PREVALENCE", "FindingLayers", "render_findings", "sample_findings"]

FINDINGS = ("cardiomegaly", "effusion", "nodule", "pneumothorax", "consolidation")
LOCAL_FINDINGS = FINDINGS[1:]  # findings with a pixel mask (cardiomegaly is a whole-heart property)
PREVALENCE = {"cardiomegaly": 0.25, "effusion": 0.15, "nodule": 0.2, "pneumothorax": 0.12, "consolidation": 0.2}
_EFFUSION_WITH_CARDIOMEGALY = 0.45
# Hearts are built away from the CTR = 0.5 threshold by at least this much, so the requested label survives pixel
# rounding of the measured ratio.
_CTR_NORMAL = (0.36, 0.475)
_CTR_ENLARGED = (0.525, 0.66)


def sample_findings(rng: np.random.Generator, requested: Sequence[str] | None) -> tuple[frozenset[str], float]:
    """Decide which findings an image has and the cardiothoracic ratio its heart is built for.

    Args:
        rng: random generator (the findings stream of the radiograph's seed).
        requested: finding names to render exactly, or ``None`` to draw them with :data:`PREVALENCE`.

    Returns:
        ``(present findings, target cardiothoracic ratio)``.

    Raises:
        DataError: for a name not in :data:`FINDINGS`.
    """
    draws = rng.random(len(FINDINGS) + 1)
    if requested is None:
        present = {name for name, u in zip(FINDINGS, draws) if u < PREVALENCE[name]}
        if "cardiomegaly" in present and draws[1] < _EFFUSION_WITH_CARDIOMEGALY:
            present.add("effusion")
    else:
        unknown = sorted(set(requested) - set(FINDINGS))
        if unknown:
            raise DataError(f"unknown finding(s) {unknown}; choose from {list(FINDINGS)}")
        present = set(requested)
    low, high = _CTR_ENLARGED if "cardiomegaly" in present else _CTR_NORMAL
    return frozenset(present), float(low + (high - low) * draws[-1])


@dataclass(frozen=True)
class FindingLayers:
    """What the findings add to one image.

    Attributes:
        attenuation: ``[H, W]`` line integral added to the anatomy (negative where air is added).
        vessel_scale: ``[H, W]`` factor on the lung markings (0 where a finding hides them).
        masks: ``{name: bool [H, W]}`` for every name in :data:`LOCAL_FINDINGS` (all-false when absent).
        details: ``{name: parameters}`` of the rendered findings (sizes in mm, sides, densities).
    """

    attenuation: np.ndarray
    vessel_scale: np.ndarray
    masks: dict[str, np.ndarray]
    details: dict[str, object]


def _pick_lung_point(rng: np.random.Generator, projected: ProjectedAnatomy, grid: Grid, side: int, margin: float):
    """A random pixel centre inside lung ``side`` at least ``margin`` mm from its lateral wall and apex (x, y mm)."""
    inside = (projected.lung[side] > 0.9) & (projected.wall_margin[side] > margin)
    if not inside.any():
        inside = projected.lung[side] > 0.5
    flat = np.flatnonzero(inside)
    index = flat[int(rng.integers(flat.size))]
    return float(grid.x.flat[index]), float(grid.y.flat[index])


def _effusion(rng, anatomy: ChestAnatomy, projected: ProjectedAnatomy, grid: Grid, layers: dict) -> dict:
    """Pleural fluid at the base: a meniscus rising along the lateral wall, blunting the costophrenic angle."""
    sides = [(0,), (1,), (0, 1)][int(rng.choice(3, p=[0.4, 0.35, 0.25]))]
    detail = {"sides": [["right", "left"][s] for s in sides], "height_mm": []}
    for side in sides:
        height = float(rng.uniform(10.0, 95.0) if rng.random() < 0.7 else rng.uniform(95.0, 150.0))
        width = anatomy.thorax_half_width[side]
        u = np.clip((-1.0 if side == 0 else 1.0) * (grid.x - anatomy.rotation_mm) / width, 0.0, 1.0)
        top = anatomy.costophrenic_y[side] - height * (0.3 + 0.7 * u**2)
        fluid = soft_step(grid.y - top, 1.5) * projected.hemithorax[side]
        # Fluid layers thicker downwards: a graded density under the meniscus.
        density = rng.uniform(0.85, 1.0) * np.clip(0.6 + (grid.y - top) / 30.0, 0.0, 1.0)
        layers["attenuation"] += MU_TISSUE * projected.air * fluid * density
        layers["vessel_scale"] *= 1.0 - fluid
        layers["masks"]["effusion"] |= fluid >= 0.5
        detail["height_mm"].append(round(height, 2))
    return detail


def _nodule(rng, anatomy: ChestAnatomy, projected: ProjectedAnatomy, grid: Grid, layers: dict) -> dict:
    """One to three round, slightly lobulated nodules; one in ten calcified."""
    detail = []
    for _ in range(1 + int(rng.random() < 0.3) + int(rng.random() < 0.1)):
        radius = float(math.exp(rng.uniform(math.log(3.0), math.log(15.0))))
        side = int(rng.integers(2))
        cx, cy = _pick_lung_point(rng, projected, grid, side, radius + 5.0)
        dx, dy = grid.x - cx, grid.y - cy
        angle = np.arctan2(dy, dx)
        lobes, phase = int(rng.integers(3, 7)), rng.uniform(0.0, 2.0 * math.pi)
        edge = radius * (1.0 + rng.uniform(0.0, 0.15) * np.sin(lobes * angle + phase))
        distance = np.hypot(dx, dy)
        calcified = bool(rng.random() < 0.1)
        mu = MU_BONE if calcified else MU_TISSUE * rng.uniform(0.55, 1.0)
        chord = 2.0 * np.sqrt(np.clip(edge**2 - distance**2, 0.0, None))
        layers["attenuation"] += mu * chord
        layers["masks"]["nodule"] |= distance < edge
        detail.append({"side": ["right", "left"][side], "centre_mm": [round(cx, 2), round(cy, 2)],
                       "radius_mm": round(radius, 2), "calcified": calcified})
    return {"nodules": detail}


def _pneumothorax(rng, anatomy: ChestAnatomy, projected: ProjectedAnatomy, grid: Grid, layers: dict) -> dict:
    """Pleural air along the apex and lateral wall: no lung markings beyond a fine visceral pleural line."""
    side = int(rng.integers(2))
    depth = float(rng.uniform(4.0, 20.0) if rng.random() < 0.6 else rng.uniform(20.0, 55.0))
    margin = projected.wall_margin[side]
    space = soft_step(depth - margin, 0.8) * projected.lung[side]
    layers["vessel_scale"] *= 1.0 - space
    layers["attenuation"] -= MU_TISSUE * 0.12 * projected.air * space
    line = 2.0 * np.sqrt(np.clip(0.5**2 - (margin - depth) ** 2, 0.0, None)) * projected.lung[side]
    layers["attenuation"] += MU_TISSUE * 4.0 * line
    layers["masks"]["pneumothorax"] |= space >= 0.5
    return {"side": ["right", "left"][side], "depth_mm": round(depth, 2)}


def _consolidation(rng, anatomy: ChestAnatomy, projected: ProjectedAnatomy, grid: Grid, layers: dict) -> dict:
    """An irregular patch of airspace opacity, denser centrally, often in a lower zone."""
    side = int(rng.integers(2))
    radius = float(rng.uniform(18.0, 60.0))
    cx, cy = _pick_lung_point(rng, projected, grid, side, 8.0)
    noise = gaussian_filter(rng.standard_normal(grid.x.shape).astype(np.float32), 7.0 / grid.spacing_mm)
    noise /= max(float(noise.std()), 1e-6)
    shape = 1.0 - np.hypot(grid.x - cx, grid.y - cy) / radius + 0.2 * noise
    patch = soft_step(shape, 0.08) * projected.lung[side]
    fill = float(rng.uniform(0.3, 0.9))
    layers["attenuation"] += MU_TISSUE * projected.air * fill * patch * np.clip(0.6 + shape, 0.0, 1.0)
    layers["vessel_scale"] *= 1.0 - 0.7 * patch
    layers["masks"]["consolidation"] |= patch >= 0.5
    return {"side": ["right", "left"][side], "centre_mm": [round(cx, 2), round(cy, 2)], "radius_mm": round(radius, 2),
            "fill": round(fill, 3)}


_RENDERERS = {"effusion": _effusion, "nodule": _nodule, "pneumothorax": _pneumothorax, "consolidation": _consolidation}


def render_findings(
    present: frozenset[str], anatomy: ChestAnatomy, projected: ProjectedAnatomy, grid: Grid, rng: np.random.Generator
) -> FindingLayers:
    """Render the local findings of ``present`` (cardiomegaly is already in the anatomy).

    Args:
        present: finding names (from :func:`sample_findings`).
        anatomy: the patient.
        projected: its projection on ``grid`` (``[H, W]`` maps).
        grid: pixel centres in mm.
        rng: random generator (the findings stream).

    Returns:
        The attenuation change, lung-marking factor, masks and parameters.
    """
    shape = grid.x.shape
    layers = {
        "attenuation": np.zeros(shape, np.float32),
        "vessel_scale": np.ones(shape, np.float32),
        "masks": {name: np.zeros(shape, bool) for name in LOCAL_FINDINGS},
    }
    details = {
        name: _RENDERERS[name](rng, anatomy, projected, grid, layers) for name in LOCAL_FINDINGS if name in present
    }
    return FindingLayers(layers["attenuation"], layers["vessel_scale"], layers["masks"], details)
