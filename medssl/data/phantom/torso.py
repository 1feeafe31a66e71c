"""Static surroundings of the phantom heart: chest wall, ribs, lungs, mediastinum, liver, spine and great vessels.

All structures are analytic in patient coordinates (RAS, mm) and placed relative to the heart, so every view of a
subject cuts the same body. They do not move during the (breath-held) cine; the heart is painted over them.
Like the heart, each structure is a :class:`~medssl.data.phantom.anatomy.Layer`: a tissue and the signed fields
(≈ mm, negative inside) whose intersection it fills.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from medssl.data.phantom.anatomy import Heart, Layer, Placement, linear_map

__all__ = ["TISSUES", "Torso", "heart_extent", "sample_torso"]

# Every tissue the renderer knows, heart tissues included; the index is the tissue id of :meth:`Torso.classify`.
TISSUES = (
    "air",
    "fat",
    "muscle",
    "bone",
    "marrow",
    "mediastinum",
    "lung",
    "lung_vessel",
    "liver",
    "liver_vessel",
    "stomach",
    "csf",
    "cord",
    "oesophagus",
    "blood",
    "myocardium",
    "pericardium",
)


def _ellipse(dx: np.ndarray, dy: np.ndarray, rx: float, ry: float) -> np.ndarray:
    """Signed distance along the ray from the centre to an ellipse boundary (exact on the axes)."""
    distance = np.hypot(dx, dy)
    boundary = 1.0 / np.sqrt((dx / rx) ** 2 + (dy / ry) ** 2 + 1e-12) * distance
    return distance - boundary


def _segment_distance(points: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    start, end = start.astype(points.dtype), end.astype(points.dtype)
    axis = end - start
    t = np.clip(linear_map(points - start, axis[:, None])[:, 0] / (axis @ axis), 0.0, 1.0)
    return np.linalg.norm(points - start - t[:, None] * axis, axis=1)


def _waves(points: np.ndarray, waves: np.ndarray) -> np.ndarray:
    """Mean of cosines ``cos(k·p + phase)`` for waves ``[N, 4]`` (kx, ky, kz, phase): a smooth random field."""
    waves = waves.astype(points.dtype)
    return np.cos(linear_map(points, waves[:, :3].T) + waves[:, 3]).mean(axis=1)


@dataclass(frozen=True)
class Torso:
    """Analytic thorax and upper abdomen around one heart (RAS mm; see :func:`sample_torso` for the ranges)."""

    body_centre: tuple[float, float]
    body_radii: tuple[float, float]
    subcutaneous_fat: tuple[float, float]  # (everywhere, extra anteriorly)
    cavity_centre: tuple[float, float]
    cavity_radii: tuple[float, float]
    mediastinum: tuple[float, float, float, float]  # x centre, half width; above z and behind y of the heart
    diaphragm: tuple[float, float, float, float, float, float]  # top z, centre x, y, radii x, y, right rise
    stomach: tuple[tuple[float, float, float], tuple[float, float, float]]  # centre, radii
    spine_centre: tuple[float, float]
    vertebra_radius: float
    aorta_centre: tuple[float, float]
    aorta_radius: float
    ascending_aorta: tuple[tuple[float, float, float], tuple[float, float, float], float]  # start, end, radius
    pulmonary_trunk: tuple[tuple[float, float, float], tuple[float, float, float], float]
    rib_period: float
    rib_phase: float
    texture_waves: np.ndarray  # [N, 4]
    vessel_waves: np.ndarray  # [2, N, 4]: two fields whose common zero set forms vessels

    def layers(self, points: np.ndarray) -> list[Layer]:
        """Structures at RAS points ``[P, 3]`` (back to front), each as a :class:`Layer`."""
        x, y, z = points[:, 0], points[:, 1], points[:, 2]
        bx, by = self.body_centre
        body = _ellipse(x - bx, y - by, *self.body_radii)
        anterior = np.clip((y - by) / self.body_radii[1], 0.0, 1.0)
        under_fat = body + self.subcutaneous_fat[0] + self.subcutaneous_fat[1] * anterior
        cavity = _ellipse(x - self.cavity_centre[0], y - self.cavity_centre[1], *self.cavity_radii)
        top, dcx, dcy, drx, dry, rise = self.diaphragm
        diaphragm = top - 0.5 * ((x - dcx) ** 2 / drx + (y - dcy) ** 2 / dry) + rise * (x - dcx)
        above = diaphragm - z
        mid, half, heart_top, heart_back = self.mediastinum
        outside_mediastinum = half - np.abs(x - mid)
        # The mediastinum shows above the heart (great vessels) and behind it (aorta, oesophagus); beside the
        # heart the lungs reach the pericardium.
        mediastinal_level = np.minimum(heart_top - z, y - heart_back)
        lung_part = np.minimum(outside_mediastinum, -mediastinal_level)  # < 0 outside the mediastinum
        centre, radii = (np.asarray(v, dtype=points.dtype) for v in self.stomach)
        stomach = (np.linalg.norm((points - centre) / radii, axis=1) - 1.0) * radii.min()
        along = (z - 0.35 * y) / self.rib_period + self.rib_phase
        # Ribs: oval cross-sections (≈ 12 x 8 mm) on a shell 8 mm outside the thoracic cavity.
        rib = (np.hypot((along - np.round(along)) * self.rib_period / 6.0, (cavity - 8.0) / 4.0) - 1.0) * 4.0
        # Vessels: tubes where two smooth random fields are both near zero (intersections of their level sets).
        vessels = (
            np.maximum(np.abs(_waves(points, self.vessel_waves[0])), np.abs(_waves(points, self.vessel_waves[1])))
            - 0.08
        ) * 60.0
        sx, sy = self.spine_centre
        vertebra = np.hypot(x - sx, y - sy) - self.vertebra_radius
        canal = np.hypot(x - sx, y - (sy - self.vertebra_radius - 11.0))
        aorta = np.hypot(x - self.aorta_centre[0], y - self.aorta_centre[1]) - self.aorta_radius
        oesophagus = np.hypot(x - (sx + 4.0), y - (sy + self.vertebra_radius + 8.0)) - 7.0
        great = [
            _segment_distance(points, np.asarray(start), np.asarray(end)) - radius
            for start, end, radius in (self.ascending_aorta, self.pulmonary_trunk)
        ]
        return [
            Layer("fat", (body,)),
            Layer("muscle", (under_fat,)),
            Layer("bone", (rib,)),
            Layer("marrow", (rib + 1.5,)),
            Layer("lung", (cavity, above)),
            Layer("mediastinum", (cavity, -outside_mediastinum, mediastinal_level, above)),
            Layer("lung_vessel", (cavity + 3.0, above + 3.0, lung_part + 3.0, vessels)),
            Layer("liver", (cavity, -above)),
            Layer("liver_vessel", (cavity + 5.0, -above - 5.0, vessels + 1.0)),
            Layer("stomach", (cavity + 3.0, -above - 3.0, stomach)),
            Layer("bone", (vertebra - 2.0,)),
            Layer("marrow", (vertebra,)),
            Layer("csf", (canal - 8.0,)),
            Layer("cord", (canal - 4.5,)),
            Layer("oesophagus", (oesophagus,)),
            Layer("blood", (aorta,)),
            *(Layer("blood", (vessel,)) for vessel in great),
        ]

    def texture(self, points: np.ndarray) -> np.ndarray:
        """Smooth random texture in about [-1, 1] at RAS points ``[P, 3]`` (shared by all tissues)."""
        return _waves(points, self.texture_waves) * 1.5

    def classify(self, points: np.ndarray) -> np.ndarray:
        """Index into :data:`TISSUES` of the front-most structure containing each RAS point ``[P, 3]``."""
        tissue = np.zeros(points.shape[0], dtype=np.uint8)
        for layer in self.layers(points):
            inside = np.ones(points.shape[0], dtype=bool)
            for bound in layer.bounds:
                inside &= bound < 0
            tissue[inside] = TISSUES.index(layer.tissue)
        return tissue


def _random_waves(rng: np.random.Generator, count: int, wavelength: tuple[float, float]) -> np.ndarray:
    directions = rng.normal(size=(count, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    k = 2.0 * math.pi / rng.uniform(*wavelength, size=(count, 1))
    return np.concatenate([directions * k, rng.uniform(0, 2 * math.pi, size=(count, 1))], axis=1)


def heart_extent(heart: Heart, placement: Placement, spacing: float = 4.0) -> np.ndarray:
    """RAS points ``[N, 3]`` on a coarse grid inside the ED heart (ventricles, fat envelope and atria)."""
    p = heart.params
    reach = p.endo_radius + p.wall * (1.0 + p.hypertrophy) + p.rv_width + 30.0
    axis = np.arange(-reach, reach, spacing)
    along = np.arange(-70.0, p.length + 10.0, spacing)
    x, y, z = (g.ravel() for g in np.meshgrid(axis, axis, along, indexing="ij"))
    outer = heart.outer_field(x, y, z, heart.state(np.zeros(1)))[0]
    inside = np.stack([x, y, z], axis=1)[outer < 0]
    return placement.to_patient(inside)


def sample_torso(rng: np.random.Generator, heart: Heart, placement: Placement) -> Torso:
    """Draw a body around a placed heart: the heart sits left-anterior in the chest on the diaphragm.

    Args:
        rng: the subject's generator.
        heart: the heart (its ED extent positions the chest wall and diaphragm).
        placement: the heart's placement in RAS.

    Returns:
        The torso.
    """
    inside = heart_extent(heart, placement)
    centre = inside.mean(axis=0)
    front = inside[:, 1].max()
    lowest = inside[np.argmin(inside[:, 2])]
    body_ry = rng.uniform(105.0, 130.0)
    chest = rng.uniform(20.0, 38.0)  # anterior chest wall (fat, muscle, ribs) in front of the heart
    by = front + chest - body_ry
    bx = centre[0] + rng.uniform(22.0, 40.0)
    body_rx = rng.uniform(150.0, 185.0)
    fat = (rng.uniform(5.0, 12.0), rng.uniform(0.0, min(15.0, chest - 12.0)))
    # The heart touches the inner anterior chest wall; the back muscles are thicker than the lateral wall.
    cavity_front = front + rng.uniform(1.0, 5.0)
    cavity_back = by - body_ry + rng.uniform(45.0, 60.0)
    cavity_centre = (bx, 0.5 * (cavity_front + cavity_back))
    cavity_ry = 0.5 * (cavity_front - cavity_back)
    cavity_rx = body_rx - rng.uniform(20.0, 30.0)
    drx, dry = rng.uniform(180.0, 260.0), rng.uniform(150.0, 220.0)
    dcx, dcy = bx + rng.uniform(-10.0, 20.0), by + rng.uniform(0.0, 30.0)
    rise = rng.uniform(0.05, 0.15)
    top = lowest[2] - rng.uniform(1.0, 4.0)
    top += 0.5 * ((lowest[0] - dcx) ** 2 / drx + (lowest[1] - dcy) ** 2 / dry) - rise * (lowest[0] - dcx)
    vertebra = rng.uniform(16.0, 21.0)
    spine = (bx + rng.uniform(-6.0, 6.0), cavity_back + vertebra * 0.4)
    aorta_radius = rng.uniform(10.0, 13.5)
    aorta = (spine[0] - rng.uniform(20.0, 28.0), spine[1] + vertebra + aorta_radius * 0.6)
    # Great vessels leave the base: the aorta anteroseptally, upwards and to the right; the pulmonary trunk from
    # the RV outflow, upwards, leftwards and backwards.
    p = heart.params
    root = placement.to_patient(np.array([-0.35 * p.endo_radius, 0.45 * p.endo_radius, -4.0]))
    rv_out = p.endo_radius + p.wall + 0.6 * p.rv_width
    outflow = placement.to_patient(
        np.array([rv_out * math.cos(math.radians(115)), rv_out * math.sin(math.radians(115)), p.tricuspid_offset - 12])
    )
    up_right = np.array([0.3, 0.2, 1.0]) / np.linalg.norm([0.3, 0.2, 1.0])
    up_left = np.array([-0.5, -0.45, 0.75]) / np.linalg.norm([-0.5, -0.45, 0.75])
    ascending = (tuple(root), tuple(root + rng.uniform(60, 85) * up_right), rng.uniform(12.0, 16.0))
    trunk = (tuple(outflow), tuple(outflow + rng.uniform(45, 60) * up_left), rng.uniform(11.0, 14.0))
    return Torso(
        body_centre=(float(bx), float(by)),
        body_radii=(float(body_rx), float(body_ry)),
        subcutaneous_fat=fat,
        cavity_centre=(float(cavity_centre[0]), float(cavity_centre[1])),
        cavity_radii=(float(cavity_rx), float(cavity_ry)),
        mediastinum=(
            float(bx + rng.uniform(-5.0, 5.0)),
            rng.uniform(14.0, 20.0),
            float(inside[:, 2].max() - rng.uniform(15.0, 30.0)),
            float(inside[:, 1].min() + rng.uniform(5.0, 15.0)),
        ),
        diaphragm=(float(top), float(dcx), float(dcy), float(drx), float(dry), float(rise)),
        stomach=(
            (
                float(bx - rng.uniform(60.0, 90.0)),
                float(by + rng.uniform(0.0, 30.0)),
                float(top - rng.uniform(45.0, 65.0)),
            ),
            (rng.uniform(35.0, 50.0), rng.uniform(30.0, 45.0), rng.uniform(35.0, 50.0)),
        ),
        spine_centre=(float(spine[0]), float(spine[1])),
        vertebra_radius=vertebra,
        aorta_centre=(float(aorta[0]), float(aorta[1])),
        aorta_radius=aorta_radius,
        ascending_aorta=ascending,
        pulmonary_trunk=trunk,
        rib_period=rng.uniform(22.0, 30.0),
        rib_phase=rng.uniform(0.0, 1.0),
        texture_waves=_random_waves(rng, 6, (10.0, 40.0)),
        vessel_waves=np.stack([_random_waves(rng, 3, (30.0, 70.0)) for _ in range(2)]),
    )
