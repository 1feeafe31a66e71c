"""Analytic posteroanterior chest anatomy, projected to attenuation line integrals on a pixel grid.

Geometry lives in patient millimetres on the detector plane: ``x`` runs from the patient's right (image left, the
radiological PA convention) to the patient's left, ``y`` from head to feet. Every structure is an analytic shape
with a soft edge (a logistic of the signed margin in mm), so images have no aliasing at any size and the binary
masks (soft value >= 0.5) are exact.

Attenuation is a sum of ``mu * thickness`` terms (unitless line integrals): soft tissue of the body, minus the air
of the lungs and trachea, plus bone (spine, ribs, clavicles, humeral heads) and lung vessels. The lungs carry the
air; the heart and mediastinum are where the lungs are not, which is what makes their borders visible, as on a
real radiograph (the silhouette sign).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

__all__ = ["ChestAnatomy", "Grid", "ProjectedAnatomy", "project_anatomy", "sample_anatomy", "soft_step"]

MU_TISSUE = 0.020  # 1/mm, water-like soft tissue at the effective energy of a chest exposure (~60 keV)
MU_BONE = 0.045  # 1/mm, trabecular-cortical mixture
_EDGE_MM = 0.9  # logistic width of tissue boundaries
_RETROCARDIAC_AIR = 0.2  # lung behind the heart keeps a fifth of its depth (visible as a faint shade)
_RETROMEDIASTINAL_AIR = 0.08  # the lungs meet behind the mediastinum only in a thin recess


def soft_step(margin: np.ndarray, width: float) -> np.ndarray:
    """Logistic step: 0.5 at ``margin == 0``, ~1 for ``margin >> width`` (margins and width in mm)."""
    return 0.5 * (1.0 + np.tanh(margin / (2.0 * width)))


@dataclass(frozen=True)
class Grid:
    """Pixel centres of a square detector field in patient mm.

    Attributes:
        x: ``[H, W]`` lateral coordinate (patient right -> left), mm.
        y: ``[H, W]`` cranio-caudal coordinate (head -> feet), mm.
        spacing_mm: pixel spacing (square pixels).
    """

    x: np.ndarray
    y: np.ndarray
    spacing_mm: float

    @classmethod
    def square(cls, size: int, fov_mm: float, centre: tuple[float, float], tilt_deg: float) -> Grid:
        """A ``size x size`` grid over ``fov_mm`` centred on ``centre`` (x, y mm), tilted in plane by ``tilt_deg``."""
        spacing = fov_mm / size
        axis = (np.arange(size, dtype=np.float32) - (size - 1) / 2.0) * spacing
        v, u = np.meshgrid(axis, axis, indexing="ij")
        c, s = math.cos(math.radians(tilt_deg)), math.sin(math.radians(tilt_deg))
        return cls(x=c * u - s * v + centre[0], y=s * u + c * v + centre[1], spacing_mm=spacing)


@dataclass(frozen=True)
class ChestAnatomy:
    """Parameters of one patient's chest as imaged (all lengths in mm, ``x`` of the patient's midline = 0).

    Attributes:
        fov_mm: side of the square detector field.
        centre: detector centre ``(x, y)``.
        tilt_deg: in-plane rotation of the patient on the detector.
        rotation_mm: axial rotation, expressed as the shift of the sternum/mediastinum against the spinous processes.
        body_half_width: half width of the chest wall (outer skin).
        body_depth: anteroposterior body thickness.
        thorax_half_width: inner half widths of the right and left hemithorax at their widest.
        apex_y: y of the lung apices.
        costophrenic_y: y of the right and left costophrenic angles (inspiration depth).
        dome_height: height of the right and left diaphragm domes above their costophrenic angle.
        heart_extent: ``(right, left)`` maximal distances of the heart borders from the midline.
        heart_height: height of the cardiac silhouette above its base.
        mediastinum_half_width: half width of the upper mediastinum.
        aortic_knob: ``(x, y, radius)`` of the aortic arch shadow.
        lung_depth: anteroposterior depth of the lungs at their base.
        rib_spacing: vertical distance between consecutive posterior ribs at the spine.
        first_rib_y: y of the first posterior rib at the spine.
        rib_thickness: vertical thickness of the ribs.
        clavicle: ``(y of sternal end, rise to the acromial end)``.
        spine_half_width: half width of the vertebral bodies.
        breast: ``(radius, y of the lower fold)``, radius 0 for none.
        gastric_bubble: radius of the stomach gas bubble under the left dome (0 for none).
        hilum: ``(distance from midline, y)`` of the hila, origin of the vascular trees.
    """

    fov_mm: float
    centre: tuple[float, float]
    tilt_deg: float
    rotation_mm: float
    body_half_width: float
    body_depth: float
    thorax_half_width: tuple[float, float]
    apex_y: float
    costophrenic_y: tuple[float, float]
    dome_height: tuple[float, float]
    heart_extent: tuple[float, float]
    heart_height: float
    mediastinum_half_width: float
    aortic_knob: tuple[float, float, float]
    lung_depth: float
    rib_spacing: float
    first_rib_y: float
    rib_thickness: float
    clavicle: tuple[float, float]
    spine_half_width: float
    breast: tuple[float, float]
    gastric_bubble: float
    hilum: tuple[float, float]

    def dome_y(self, x: np.ndarray, side: int) -> np.ndarray:
        """Diaphragm contour of hemithorax ``side`` (0 right, 1 left) at lateral positions ``x`` (any shape)."""
        width = self.thorax_half_width[side]
        u = np.clip(np.abs(x - self.rotation_mm) / width, 0.0, 1.2)
        # Highest at ~45 % of the hemithorax, meets the lateral wall at the costophrenic angle (u = 1).
        medial = 0.67 + 0.33 * np.sin(0.5 * np.pi * u / 0.45)
        bulge = np.where(u < 0.45, medial, np.cos(0.5 * np.pi * (u - 0.45) / 0.55))
        return self.costophrenic_y[side] - self.dome_height[side] * np.clip(bulge, 0.0, 1.0)

    @property
    def heart_base_y(self) -> float:
        """Lower end of the cardiac shape; the left dome cuts it, below the row of its widest diameter."""
        return self.costophrenic_y[1] - 0.5 * self.dome_height[1]

    @property
    def cardiothoracic_ratio(self) -> float:
        """Design CTR: transverse heart diameter over the widest inner thoracic diameter."""
        return sum(self.heart_extent) / sum(self.thorax_half_width)


def sample_anatomy(rng: np.random.Generator, target_ctr: float) -> ChestAnatomy:
    """Draw one patient: body habitus, inspiration, positioning and a heart sized to ``target_ctr``.

    Args:
        rng: random generator (the anatomy stream of the radiograph's seed).
        target_ctr: cardiothoracic ratio the heart is built for (0.3-0.7).

    Returns:
        The anatomy parameters.
    """
    size = rng.uniform(0.88, 1.14)  # overall body scale: small women to large men
    thorax = 138.0 * size * rng.uniform(0.95, 1.05, 2)
    thorax[0] *= rng.uniform(1.0, 1.05)  # the right hemithorax is usually a little wider
    apex = -150.0 * size + rng.normal(0.0, 8.0)
    lung_height = rng.uniform(200.0, 265.0) * size  # shallow -> deep inspiration
    right_cp = apex + lung_height
    left_cp = right_cp + rng.uniform(5.0, 22.0)
    dome = rng.uniform(14.0, 32.0, 2) * (1.2 - 0.2 * (lung_height / (250.0 * size)))
    share = rng.uniform(0.25, 0.36)  # right share of the transverse heart diameter
    transverse = target_ctr * float(thorax.sum())
    heart_height = transverse * rng.uniform(0.8, 0.95)
    rib_spacing = lung_height / rng.uniform(9.0, 10.5)
    mediastinum = rng.uniform(22.0, 32.0) * size
    return ChestAnatomy(
        fov_mm=float(rng.uniform(360.0, 420.0) * size),
        centre=(float(rng.normal(0.0, 10.0)), float(rng.normal(15.0, 12.0))),
        tilt_deg=float(rng.normal(0.0, 2.0)),
        rotation_mm=float(rng.normal(0.0, 6.0)),
        body_half_width=float(thorax.max() * rng.uniform(1.12, 1.3)),
        body_depth=float(rng.uniform(180.0, 260.0) * size),
        thorax_half_width=(float(thorax[0]), float(thorax[1])),
        apex_y=float(apex),
        costophrenic_y=(float(right_cp), float(left_cp)),
        dome_height=(float(dome[0]), float(dome[1])),
        heart_extent=(float(share * transverse), float((1.0 - share) * transverse)),
        heart_height=float(heart_height),
        mediastinum_half_width=float(mediastinum),
        aortic_knob=(
            float(mediastinum + rng.uniform(-2.0, 6.0)),
            float(apex + rng.uniform(55.0, 75.0)),
            float(rng.uniform(10.0, 16.0)),
        ),
        lung_depth=float(rng.uniform(120.0, 170.0) * size),
        rib_spacing=float(rib_spacing),
        first_rib_y=float(apex + rng.uniform(-8.0, 6.0)),
        rib_thickness=float(rng.uniform(8.0, 12.0) * size),
        clavicle=(float(apex + rng.uniform(10.0, 35.0)), float(rng.uniform(5.0, 40.0))),
        spine_half_width=float(rng.uniform(18.0, 24.0) * size),
        breast=(
            float(rng.uniform(60.0, 95.0) * size) if rng.random() < 0.45 else 0.0,
            float(right_cp - rng.uniform(0.0, 40.0)),
        ),
        gastric_bubble=float(rng.uniform(10.0, 24.0)) if rng.random() < 0.6 else 0.0,
        hilum=(float(rng.uniform(38.0, 52.0) * size), float(apex + rng.uniform(80.0, 105.0))),
    )


@dataclass(frozen=True)
class ProjectedAnatomy:
    """Attenuation and masks of one anatomy on one grid (all arrays ``[H, W]`` float32 unless stated).

    Attributes:
        attenuation: total line integral without vessels.
        vessels: line integral of the lung vessels (already restricted to aerated lung).
        air: air thickness in mm along each ray (lungs and retrocardiac lung).
        lung: soft masks ``[2, H, W]`` of the right and left lung fields (heart and mediastinum excluded).
        hemithorax: soft masks ``[2, H, W]`` of the right and left pleural cavities (lung + what may fill it).
        heart: soft mask of the cardiac silhouette above the diaphragm.
        wall_margin: ``[2, H, W]`` distance in mm inside each pleural cavity from its lateral wall and apex.
    """

    attenuation: np.ndarray
    vessels: np.ndarray
    air: np.ndarray
    lung: np.ndarray
    hemithorax: np.ndarray
    heart: np.ndarray
    wall_margin: np.ndarray


def _band(distance: np.ndarray, half_width: float) -> np.ndarray:
    """Chord length through a tube of radius ``half_width`` at ``distance`` from its axis (hollow cortex ignored)."""
    return 2.0 * np.sqrt(np.clip(half_width**2 - distance**2, 0.0, None))


def _hemithorax_margins(anatomy: ChestAnatomy, grid: Grid, side: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Signed margins (mm, positive inside) of one pleural cavity: to its lateral wall/apex, to the diaphragm, and
    the lateral coordinate ``u`` (distance from the midline towards that side)."""
    sign = -1.0 if side == 0 else 1.0
    u = sign * (grid.x - anatomy.rotation_mm)
    width = anatomy.thorax_half_width[side]
    t = np.clip((grid.y - anatomy.apex_y) / (anatomy.costophrenic_y[side] - anatomy.apex_y), 0.0, 1.0)
    lateral = width * (t * (2.0 - t)) ** 0.55
    # The apex margin is the vertical distance below the rounded top; combined with the lateral one by a soft min.
    wall = np.minimum(lateral - u, (grid.y - anatomy.apex_y) * 1.2)
    diaphragm = anatomy.dome_y(grid.x, side) - grid.y
    return wall, diaphragm, u


def _heart_margins(anatomy: ChestAnatomy, grid: Grid) -> np.ndarray:
    """Signed margin (mm, positive inside) of the cardiac silhouette; widest row at 82 % (left) / 62 % (right) of
    its height, so its transverse diameter equals ``heart_extent`` summed."""
    base, height = anatomy.heart_base_y, anatomy.heart_height
    t = (grid.y - (base - height)) / height
    x = grid.x - anatomy.rotation_mm

    def profile(peak: float) -> np.ndarray:
        # From the pulmonary trunk (40 % of the widest diameter) the border bulges out as a circular arc.
        rising = 0.4 + 0.6 * np.sqrt(np.clip(1.0 - (1.0 - t / peak) ** 2, 0.0, 1.0))
        falling = 1.0 - 0.4 * ((t - peak) / (1.0 - peak)) ** 2
        return np.where(t <= peak, rising, np.clip(falling, 0.0, 1.0))

    right, left = anatomy.heart_extent
    return np.minimum(np.minimum(left * profile(0.82) - x, x + right * profile(0.62)), t * height)


def project_anatomy(anatomy: ChestAnatomy, grid: Grid, rng: np.random.Generator) -> ProjectedAnatomy:
    """Project the anatomy onto the grid.

    Args:
        anatomy: the patient.
        grid: pixel centres in mm.
        rng: random generator for the lung texture (vessel trees and parenchymal noise).

    Returns:
        Attenuation, air thickness and masks (see :class:`ProjectedAnatomy`).
    """
    x, y, edge = grid.x, grid.y, max(_EDGE_MM, 0.5 * grid.spacing_mm)
    mid = x - anatomy.rotation_mm

    # Body: an elliptic cylinder over the chest, a neck above the shoulders, soft tissue of the shoulders and arms.
    shoulder_y = anatomy.apex_y - 10.0
    half_width = np.where(y > shoulder_y, anatomy.body_half_width, 0.42 * anatomy.body_half_width)
    body_chord = np.sqrt(np.clip(1.0 - (x / half_width) ** 2, 0.0, None))
    body = soft_step(half_width - np.abs(x), edge)
    for sign in (-1.0, 1.0):
        arm = np.hypot((x - sign * anatomy.body_half_width * 1.02) / 60.0, (y - shoulder_y - 30.0) / 110.0)
        body_chord = np.maximum(body_chord, 0.6 * np.sqrt(np.clip(1.0 - arm**2, 0.0, None)))
        body = np.maximum(body, soft_step(1.0 - arm, edge / 60.0))
    tissue = MU_TISSUE * anatomy.body_depth * body_chord * body
    if anatomy.breast[0] > 0:
        for sign in (-1.0, 1.0):
            r = np.hypot(x - sign * 0.55 * anatomy.body_half_width, (y - anatomy.breast[1] + anatomy.breast[0]) * 1.1)
            # Only the lower half casts a shadow (the breast hangs over the lung bases), fading in from its centre.
            lower = np.clip((y - anatomy.breast[1] + anatomy.breast[0]) / anatomy.breast[0], 0.0, 1.0) ** 2
            tissue += MU_TISSUE * 0.45 * _band(r, anatomy.breast[0]) * lower

    # Pleural cavities, heart, mediastinum and lungs.
    hemithorax, lung, wall_margin, air = [], [], [], np.zeros_like(x)
    heart_margin = _heart_margins(anatomy, grid)
    knob = anatomy.aortic_knob
    mediastinum_margin = np.maximum(
        anatomy.mediastinum_half_width + 3.0 * np.tanh((y - anatomy.hilum[1]) / 30.0) - np.abs(mid),
        knob[2] - np.hypot(mid - knob[0], y - knob[1]),
    )
    above_diaphragm = []
    for side in (0, 1):
        wall, diaphragm, u = _hemithorax_margins(anatomy, grid, side)
        cavity = soft_step(wall, edge) * soft_step(diaphragm, edge) * soft_step(u, edge)
        outside_mediastinum = soft_step(-mediastinum_margin, edge)
        field = cavity * soft_step(-heart_margin, edge) * outside_mediastinum
        # Lungs are deepest at the base and thin towards the apex and the lateral wall.
        height = np.clip((y - anatomy.apex_y) / (anatomy.costophrenic_y[side] - anatomy.apex_y), 0.0, 1.0)
        depth = anatomy.lung_depth * (0.4 + 0.6 * height)
        depth *= np.sqrt(np.clip(wall / 10.0, 0.0, 1.0))
        behind_heart = cavity * outside_mediastinum - field
        behind_mediastinum = cavity * (1.0 - outside_mediastinum)
        air += depth * (field + _RETROCARDIAC_AIR * behind_heart + _RETROMEDIASTINAL_AIR * behind_mediastinum)
        hemithorax.append(cavity)
        lung.append(field)
        wall_margin.append(wall)
        above_diaphragm.append(soft_step(diaphragm, edge) * (u > -1.0))
    diaphragm_free = np.clip(above_diaphragm[0] + above_diaphragm[1], 0.0, 1.0)
    heart = soft_step(heart_margin, edge) * diaphragm_free

    # Trachea and main bronchi: a dark column in the upper mediastinum down to the carina.
    carina_y = anatomy.hilum[1] - 20.0
    trachea = _band(mid - 0.3 * anatomy.rotation_mm, 9.0) * soft_step(carina_y - y, 3.0) * body
    for sign in (-1.0, 1.0):
        along = np.clip((y - carina_y) / 35.0, 0.0, 1.0)
        bronchus = soft_step(y - carina_y, 3.0) * soft_step(carina_y + 35.0 - y, 3.0)
        trachea += _band(mid - sign * 30.0 * along, 6.0) * bronchus
    air += 0.7 * trachea

    # Gastric bubble under the left dome.
    if anatomy.gastric_bubble > 0:
        dome_left = anatomy.dome_y(np.asarray(anatomy.rotation_mm + 0.45 * anatomy.thorax_half_width[1]), 1)
        r = np.hypot(mid - 0.45 * anatomy.thorax_half_width[1], (y - dome_left - 1.2 * anatomy.gastric_bubble) * 1.4)
        air += _band(r, anatomy.gastric_bubble) * 0.8

    attenuation = tissue - MU_TISSUE * air + MU_BONE * _bones(anatomy, grid)
    vessels = _vessels(anatomy, grid, rng) * np.clip(air / anatomy.lung_depth, 0.0, 1.0)
    return ProjectedAnatomy(
        attenuation=attenuation.astype(np.float32),
        vessels=vessels.astype(np.float32),
        air=air.astype(np.float32),
        lung=np.stack(lung).astype(np.float32),
        hemithorax=np.stack(hemithorax).astype(np.float32),
        heart=heart.astype(np.float32),
        wall_margin=np.stack(wall_margin).astype(np.float32),
    )


def _bones(anatomy: ChestAnatomy, grid: Grid) -> np.ndarray:
    """Bone thickness (mm) along each ray: spine, posterior and anterior ribs, clavicles, humeral heads."""
    x, y = grid.x, grid.y
    # The spine stays at x = 0; axial rotation shows as the mediastinum and sternum (rotation_mm) moving against it.
    spine_x = x
    bone = np.zeros_like(x)
    # Vertebral bodies with disc spaces, pedicles and spinous processes.
    phase = (y - anatomy.first_rib_y) / anatomy.rib_spacing
    discs = 0.75 + 0.25 * soft_step(np.abs(np.sin(np.pi * phase)) - 0.2, 0.08)
    bone += 0.3 * _band(spine_x, anatomy.spine_half_width) * discs
    for sign in (-1.0, 1.0):
        from_level = np.sin(np.pi * phase) * anatomy.rib_spacing / np.pi  # mm from the nearest vertebral level
        r = np.hypot((spine_x - sign * 0.75 * anatomy.spine_half_width) / 5.0, from_level / 7.0)
        bone += 4.0 * np.clip(1.0 - r, 0.0, 1.0)

    # Ribs: twelve pairs; posterior arcs run laterally and downwards, anterior arcs back medially and downwards.
    half = anatomy.rib_thickness / 2.0
    for side, sign in ((0, -1.0), (1, 1.0)):
        u = sign * (x - anatomy.rotation_mm * 0.5)
        for k in range(12):
            y0 = anatomy.first_rib_y + k * anatomy.rib_spacing * (0.8 + 0.02 * k)
            t_cage = np.clip((y0 - anatomy.apex_y) / (anatomy.costophrenic_y[side] - anatomy.apex_y), 0.05, 1.0)
            width = anatomy.thorax_half_width[side] * (t_cage * (2.0 - t_cage)) ** 0.55 + 6.0
            s = np.clip(u / width, 0.0, 1.1)
            posterior = y0 - 0.10 * width * s + 0.42 * width * s**2.2
            reach = soft_step(u - anatomy.spine_half_width * 0.6, 2.0) * soft_step(width * 1.03 - u, 3.0)
            rib = _band(y - posterior, half * (0.8 + 0.2 * (k > 0))) * reach
            lateral_y = y0 + 0.32 * width
            anterior = lateral_y + 0.55 * (width - u) * (0.55 + 0.03 * k)
            front = soft_step(u - 0.38 * width, 4.0) * soft_step(width * 1.02 - u, 3.0)
            # Ribs below the costophrenic angle lie over the dense upper abdomen and show faintly.
            faint = 0.4 + 0.6 * soft_step(anatomy.costophrenic_y[side] - y, 15.0)
            bone += (0.55 * rib + 0.25 * _band(y - anterior, half * 1.15) * front) * faint
        # Clavicle: from the sternal notch up and out to the acromion, gently S-shaped.
        sternal_y, rise = anatomy.clavicle
        s = np.clip((u - 12.0) / (anatomy.thorax_half_width[side] + 30.0), 0.0, 1.0)
        clavicle_y = sternal_y - rise * s + 6.0 * np.sin(2.0 * np.pi * s)
        extent = soft_step(u - 12.0, 2.0) * soft_step(anatomy.thorax_half_width[side] + 40.0 - u, 4.0)
        bone += 0.8 * _band(y - clavicle_y, 6.5) * extent
        # Humeral head at the upper corner of the field.
        r = np.hypot(u - (anatomy.body_half_width * 1.0), y - (anatomy.apex_y + 10.0))
        bone += 0.4 * _band(r, 24.0)
    return bone


def _segment_distance(px: np.ndarray, py: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Distance from points ``(px, py)`` to the segment ``a -> b``."""
    d = b - a
    t = np.clip(((px - a[0]) * d[0] + (py - a[1]) * d[1]) / max(float(d @ d), 1e-9), 0.0, 1.0)
    return np.hypot(px - a[0] - t * d[0], py - a[1] - t * d[1])


def _vessels(anatomy: ChestAnatomy, grid: Grid, rng: np.random.Generator) -> np.ndarray:
    """Pulmonary vessel trees branching from each hilum, plus fine parenchymal texture (line integral)."""
    x, y, spacing = grid.x, grid.y, grid.spacing_mm
    out = np.zeros_like(x)
    origin_x, origin_y = float(x[0, 0]), float(y[0, 0])
    # Unit steps of the (tilted) grid along columns and rows, to find each segment's pixel bounding box.
    rows, cols = x.shape
    ex = np.array([x[0, 1] - x[0, 0], y[0, 1] - y[0, 0]]) / spacing
    ey = np.array([x[1, 0] - x[0, 0], y[1, 0] - y[0, 0]]) / spacing

    def draw(a: np.ndarray, b: np.ndarray, radius: float, density: float) -> None:
        corners = np.array([a, b])
        rel = corners - [origin_x, origin_y]
        col, row = rel @ ex / spacing, rel @ ey / spacing
        pad = radius / spacing + 2
        r0, r1 = int(max(row.min() - pad, 0)), int(min(row.max() + pad + 1, rows))
        c0, c1 = int(max(col.min() - pad, 0)), int(min(col.max() + pad + 1, cols))
        if r0 >= r1 or c0 >= c1:
            return
        distance = _segment_distance(x[r0:r1, c0:c1], y[r0:r1, c0:c1], a, b)
        out[r0:r1, c0:c1] = np.maximum(out[r0:r1, c0:c1], density * _band(distance, radius))

    for side, sign in ((0, -1.0), (1, 1.0)):
        hilum = np.array([anatomy.rotation_mm + sign * anatomy.hilum[0], anatomy.hilum[1]])
        stack = [(hilum, math.radians(a), 4.5, 0) for a in rng.uniform(-20, 20, 5) + [-75, -35, 0, 40, 80]]
        while stack:
            start, angle, radius, depth = stack.pop()
            length = rng.uniform(22.0, 40.0) * (0.85**depth) * (1.3 if depth == 0 else 1.0)
            direction = np.array([sign * math.cos(angle), math.sin(angle)])
            end = start + length * direction
            draw(start, end, radius, MU_TISSUE * rng.uniform(1.2, 1.8))
            if depth < 5 and radius > 0.6:
                for turn in (-1.0, 1.0):
                    stack.append((end, angle + turn * math.radians(rng.uniform(12.0, 32.0)), radius * 0.74, depth + 1))
    # Parenchymal texture: band-pass noise (secondary lobules, small vessels seen end-on).
    noise = rng.standard_normal(x.shape).astype(np.float32)
    fine = gaussian_filter(noise, 1.2 / spacing) - gaussian_filter(noise, 4.0 / spacing)
    return out + 1.5 * MU_TISSUE * np.clip(fine / max(float(fine.std()), 1e-6), -3.0, 3.0)
