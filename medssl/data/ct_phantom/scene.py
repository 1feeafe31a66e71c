"""Synthetic chest CT in Hounsfield units: a random patient, an optional lung nodule, rendered as a slice or a volume.

The patient is an analytic 3D scene in millimetres (RAS: x towards the patient's right, y anterior, z cranial): a
body outline of subcutaneous fat around a muscle wall, ribs (bands that come and go along z), the spine (cortical
shell, cancellous body, spinal canal), two lungs that narrow towards the apex, the heart, the aorta, and pulmonary
vessels as tapering tubes running out of each hilum, which cut the plane as dots and streaks of blood density, the
look-alikes of a small nodule. A scene is rendered on a supersampled grid (the slice thickness included) and
block-averaged, so small structures are partial-volumed as in a real CT; then lung parenchyma texture, white noise
and correlated noise are added on the output grid.

Class labels (:data:`CT_CLASSES`): ``none``, ``solid`` (a soft-tissue nodule, 4-20 mm, log-uniform so that many are
small) or ``ground_glass`` (a hazy nodule 8-25 mm, 150-450 HU above the lung). A nodule of 4 mm on a 3 mm grid keeps
less than half its contrast after partial volume and looks like a vessel in cross-section, so the task is not
trivially separable. Tissue values follow the usual CT ranges (e.g. Hounsfield unit tables in Lev and Gonzalez, 2002,
"CT angiography and CT perfusion imaging", and Kalender, 2011, "Computed Tomography", 3rd ed.): air -1000, lung
about -850, fat -120 to -80, muscle and blood 30-60, cancellous bone 150-300, cortical bone 600-900.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy.ndimage import gaussian_filter

from medssl.errors import DataError

__all__ = ["CT_CLASSES", "TISSUES", "MIXED", "CTScene", "CTImage", "sample_scene", "candidate_centre", "render_scene"]

#: Class names by label index.
CT_CLASSES = ("none", "solid", "ground_glass")
#: Tissue ids of :attr:`CTImage.tissues` (the tissue at every sub-sample of a voxel; :data:`MIXED` otherwise).
TISSUES = {"air": 0, "fat": 1, "soft_tissue": 2, "lung": 3, "bone": 4, "blood": 5, "nodule": 6}
MIXED = 255
_AIR, _LUNG_HU = -1000.0, -850.0
# The bone tissue id covers cortical and cancellous bone; their values differ.
_CORTICAL_RANGE, _CANCELLOUS_RANGE = (650.0, 900.0), (180.0, 300.0)


@dataclass(frozen=True)
class CTScene:
    """A sampled patient (all lengths in mm, values in HU); see :func:`sample_scene`.

    Attributes:
        centre: ``(x, y)`` of the body centre.
        angle: in-plane rotation of the patient (radians).
        body: semi-axes ``(a, b)`` of the skin ellipse.
        fat_mm, wall_mm: subcutaneous fat and muscle wall thickness.
        hu: tissue values ``{"fat", "muscle", "blood", "cortical", "cancellous", "mediastinum"}``.
        ribs: ``(angle, phase_mm)`` of each rib (its band repeats every :attr:`rib_period_mm` along z).
        rib_period_mm: rib spacing along z.
        vessels: ``[V, 2, 3]`` start and end points of the vessel tubes; ``vessel_radii`` ``[V]`` their radii.
        nodule: ``{"kind", "centre_mm", "diameter_mm", "hu"}`` or None.
        z_extent: ``(z_min, z_max)`` of the lungs (the apex is at ``z_max``).
    """

    centre: tuple[float, float]
    angle: float
    body: tuple[float, float]
    fat_mm: float
    wall_mm: float
    hu: dict[str, float]
    ribs: tuple[tuple[float, float], ...]
    rib_period_mm: float
    vessels: np.ndarray
    vessel_radii: np.ndarray
    nodule: dict | None
    z_extent: tuple[float, float]

    @property
    def cavity(self) -> tuple[float, float]:
        """Semi-axes of the thoracic cavity (inside the muscle wall)."""
        inset = self.fat_mm + self.wall_mm
        return self.body[0] - inset, self.body[1] - inset

    def lung(self, side: int, z: np.ndarray) -> tuple[float, float, np.ndarray, np.ndarray]:
        """Centre ``(x, y)`` and z-dependent semi-axes ``(a(z), b(z))`` of the lung on side -1 or +1 of x."""
        a_t, b_t = self.cavity
        z_min, z_max = self.z_extent
        # The lungs narrow towards the apex (z_max): full width over the lower 60 %, then an elliptic taper.
        height = np.clip((z - z_min) / (z_max - z_min), 0.0, 1.0)
        scale = np.sqrt(np.clip(1.0 - np.clip((height - 0.6) / 0.45, 0.0, None) ** 2, 0.05, 1.0))
        return side * 0.48 * a_t, -0.05 * b_t, 0.44 * a_t * scale, 0.78 * b_t * scale


@dataclass(frozen=True)
class CTImage:
    """One rendered image.

    Attributes:
        image: int16 HU, ``[H, W]`` (2D) or ``[H, W, D]`` (3D); axis 0 = x (RAS), 1 = y, 2 = z.
        tissues: uint8 of the same shape: a :data:`TISSUES` id where every sub-sample of the voxel is that tissue,
            :data:`MIXED` at partial-volume voxels.
        affine: 4x4 NIfTI voxel -> RAS (mm) affine.
        label: class index in :data:`CT_CLASSES`.
        metadata: the scene's ground truth (class, nodule size, contrast, centre, noise levels).
    """

    image: np.ndarray
    tissues: np.ndarray
    affine: np.ndarray
    label: int
    metadata: dict = field(default_factory=dict)


def _uniform(rng: np.random.Generator, low: float, high: float) -> float:
    return float(rng.uniform(low, high))


def _sample_vessels(
    rng: np.random.Generator, cavity: tuple[float, float], z_mid: float
) -> tuple[np.ndarray, np.ndarray]:
    """Tapering tubes from each hilum: a tree of two generations of segments, radii 4.5 mm down to 0.8 mm."""
    segments, radii = [], []
    a_t, b_t = cavity
    for side in (-1, 1):
        hilum = np.array([side * 0.22 * a_t, -0.05 * b_t, z_mid + _uniform(rng, -15, 15)])
        for _ in range(int(rng.integers(7, 11))):
            direction = np.array([side * rng.uniform(0.2, 1.0), rng.uniform(-1.0, 1.0), rng.uniform(-1.2, 1.2)])
            direction /= np.linalg.norm(direction)
            length = _uniform(rng, 40, 90)
            end = hilum + length * direction
            segments.append((hilum, end))
            radii.append(_uniform(rng, 2.5, 4.5))
            for _ in range(int(rng.integers(2, 4))):
                branch = direction + rng.normal(0.0, 0.6, 3)
                branch /= np.linalg.norm(branch)
                start = hilum + rng.uniform(0.5, 1.0) * length * direction
                segments.append((start, start + _uniform(rng, 20, 60) * branch))
                radii.append(_uniform(rng, 0.8, 2.2))
    return np.array(segments, dtype=np.float64), np.array(radii, dtype=np.float64)


def sample_scene(rng: np.random.Generator, label: int, slice_z: float = 0.0) -> CTScene:
    """Draw a random patient and, for ``label`` > 0, a nodule in one lung that the plane ``z = slice_z`` cuts.

    Args:
        rng: the random source.
        label: class index in :data:`CT_CLASSES`.
        slice_z: the z of the imaged plane (2D) or of the volume's centre (3D); the nodule is centred within
            a quarter of its diameter of it.

    Returns:
        the scene.

    Raises:
        DataError: for a label outside :data:`CT_CLASSES`.
    """
    if label not in range(len(CT_CLASSES)):
        raise DataError(f"label must be a class index 0..{len(CT_CLASSES) - 1} of {CT_CLASSES}, got {label!r}.")
    a = _uniform(rng, 135, 185)
    b = a * _uniform(rng, 0.62, 0.78)
    fat, wall = _uniform(rng, 6, 30), _uniform(rng, 10, 18)
    hu = {
        "fat": _uniform(rng, -115, -85),
        "muscle": _uniform(rng, 35, 55),
        "blood": _uniform(rng, 30, 50),
        "mediastinum": _uniform(rng, 15, 35),
        "cortical": _uniform(rng, *_CORTICAL_RANGE),
        "cancellous": _uniform(rng, *_CANCELLOUS_RANGE),
    }
    z_extent = (slice_z - _uniform(rng, 90, 150), slice_z + _uniform(rng, 60, 110))
    cavity = (a - fat - wall, b - fat - wall)
    vessels, radii = _sample_vessels(rng, cavity, slice_z)
    period = _uniform(rng, 28, 36)
    ribs = tuple(
        (math.radians(angle + _uniform(rng, -4, 4)), _uniform(rng, 0, period))
        for angle in (*range(25, 160, 22), *range(205, 340, 22))
    )
    scene = CTScene(
        centre=(_uniform(rng, -20, 20), _uniform(rng, -15, 15)),
        angle=math.radians(_uniform(rng, -6, 6)),
        body=(a, b),
        fat_mm=fat,
        wall_mm=wall,
        hu=hu,
        ribs=ribs,
        rib_period_mm=period,
        vessels=vessels,
        vessel_radii=radii,
        nodule=None,
        z_extent=z_extent,
    )
    if label == 0:
        return scene
    kind = CT_CLASSES[label]
    if kind == "solid":
        diameter = float(np.exp(rng.uniform(math.log(4.0), math.log(20.0))))
        value = _uniform(rng, 10, 60)
    else:
        diameter = _uniform(rng, 8, 25)
        value = _LUNG_HU + _uniform(rng, 150, 450)
    side = int(rng.choice([-1, 1]))
    z = slice_z + _uniform(rng, -0.25, 0.25) * diameter
    cx, cy, la, lb = scene.lung(side, np.array(z))
    # Anywhere in the lung whose edge is at least one radius + 3 mm away (polar draw, area-uniform).
    margin = diameter / 2 + 3.0
    radius, theta = math.sqrt(rng.uniform(0, 1)), rng.uniform(0, 2 * math.pi)
    x = cx + radius * max(float(la) - margin, 0.0) * math.cos(theta)
    y = cy + radius * max(float(lb) - margin, 0.0) * math.sin(theta)
    nodule = {"kind": kind, "centre_mm": [x, y, z], "diameter_mm": diameter, "hu": value}
    return CTScene(**{**scene.__dict__, "nodule": nodule})


def candidate_centre(scene: CTScene, rng: np.random.Generator, slice_z: float = 0.0, jitter_mm: float = 0.0
                     ) -> tuple[float, float]:
    """The in-plane centre of a nodule-candidate patch, as a detector's candidate list would give it.

    A scene with a nodule is centred on the nodule; one without is centred on a vessel cut by the plane inside a
    lung (the look-alike a detector flags), or on a random lung point where no vessel crosses the plane. Either
    centre then moves by up to ``jitter_mm`` along x and y, so that a class is never read off the centre pixel.

    Args:
        scene: from :func:`sample_scene`.
        rng: the random source.
        slice_z: z of the imaged plane.
        jitter_mm: largest offset along each in-plane axis.

    Returns:
        ``(x, y)`` in mm, scanner frame.
    """
    if scene.nodule is not None:
        x, y = scene.nodule["centre_mm"][:2]
    else:
        start, end = scene.vessels[:, 0], scene.vessels[:, 1]
        dz = end[:, 2] - start[:, 2]
        t = np.divide(slice_z - start[:, 2], dz, out=np.full(len(dz), -1.0), where=np.abs(dz) > 1e-9)
        points = start + np.clip(t, 0.0, 1.0)[:, None] * (end - start)
        crossing = (t >= 0) & (t <= 1)
        in_lung = np.zeros(len(points), dtype=bool)
        for side in (-1, 1):
            cx, cy, la, lb = scene.lung(side, np.asarray(slice_z))
            in_lung |= _inside_ellipse(points[:, 0], points[:, 1], cx, cy, la, lb)
        choices = np.flatnonzero(crossing & in_lung)
        if len(choices):
            x, y = points[int(rng.choice(choices)), :2]
        else:
            cx, cy, la, lb = scene.lung(int(rng.choice([-1, 1])), np.asarray(slice_z))
            radius, theta = math.sqrt(rng.uniform(0, 1)), rng.uniform(0, 2 * math.pi)
            x, y = cx + 0.8 * radius * float(la) * math.cos(theta), cy + 0.8 * radius * float(lb) * math.sin(theta)
    # Patient frame (where the anatomy is defined) -> scanner frame (where the grid is).
    cos, sin = math.cos(scene.angle), math.sin(scene.angle)
    x, y = scene.centre[0] + cos * x - sin * y, scene.centre[1] + sin * x + cos * y
    return float(x) + _uniform(rng, -jitter_mm, jitter_mm), float(y) + _uniform(rng, -jitter_mm, jitter_mm)


def _inside_ellipse(x: np.ndarray, y: np.ndarray, cx: float, cy: float, a, b) -> np.ndarray:
    return ((x - cx) / a) ** 2 + ((y - cy) / b) ** 2 <= 1.0


def _segment_distance(points: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Distance of ``[N, 3]`` points to the segment ``start``-``end``."""
    direction = end - start
    t = np.clip((points - start) @ direction / max(float(direction @ direction), 1e-9), 0.0, 1.0)
    return np.linalg.norm(points - start - t[:, None] * direction, axis=1)


def _paint(hu: np.ndarray, tissue: np.ndarray, where: np.ndarray, value: float, tissue_id: int) -> None:
    hu[where] = value
    tissue[where] = tissue_id


def _render_fine(scene: CTScene, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HU and tissue ids at points ``(x, y, z)`` (flat arrays, scanner frame) by painting structures in order."""
    cos, sin = math.cos(scene.angle), math.sin(scene.angle)
    px, py = x - scene.centre[0], y - scene.centre[1]
    # Patient frame: undo the patient's rotation about its centre.
    x, y = cos * px + sin * py, -sin * px + cos * py
    hu = np.full(x.shape, _AIR)
    tissue = np.full(x.shape, TISSUES["air"], dtype=np.uint8)
    a, b = scene.body
    a_t, b_t = scene.cavity
    values = scene.hu
    # The table under the patient.
    _paint(hu, tissue, (y < -b - 12) & (y > -b - 22) & (np.abs(x) < 210), values["muscle"] + 60, TISSUES["soft_tissue"])
    _paint(hu, tissue, _inside_ellipse(x, y, 0, 0, a, b), values["fat"], TISSUES["fat"])
    wall = _inside_ellipse(x, y, 0, 0, a - scene.fat_mm, b - scene.fat_mm)
    _paint(hu, tissue, wall, values["muscle"], TISSUES["soft_tissue"])
    _paint(hu, tissue, _inside_ellipse(x, y, 0, 0, a_t, b_t), values["mediastinum"], TISSUES["soft_tissue"])
    for angle, phase in scene.ribs:
        present = np.mod(z + phase, scene.rib_period_mm) < 0.4 * scene.rib_period_mm
        rx, ry = (a_t + 0.35 * scene.wall_mm) * math.cos(angle), (b_t + 0.35 * scene.wall_mm) * math.sin(angle)
        rib = present & _inside_ellipse(x, y, rx, ry, 7.0, 5.0)
        _paint(hu, tissue, rib, values["cortical"], TISSUES["bone"])
        _paint(hu, tissue, rib & _inside_ellipse(x, y, rx, ry, 4.5, 2.5), values["cancellous"], TISSUES["bone"])
    lungs = np.zeros(x.shape, dtype=bool)
    for side in (-1, 1):
        cx, cy, la, lb = scene.lung(side, z)
        lungs |= _inside_ellipse(x, y, cx, cy, la, lb) & (z > scene.z_extent[0]) & (z < scene.z_extent[1])
    _paint(hu, tissue, lungs, _LUNG_HU, TISSUES["lung"])
    candidates = np.flatnonzero(lungs)
    if candidates.size:
        points = np.stack([x[candidates], y[candidates], z[candidates]], axis=1)
        vessel = np.zeros(candidates.size, dtype=bool)
        for (start, end), radius in zip(scene.vessels, scene.vessel_radii):
            vessel |= _segment_distance(points, start, end) <= radius
        _paint(hu, tissue, candidates[vessel], values["blood"], TISSUES["blood"])
    # Heart (an ellipsoid left-anterior in the mediastinum), descending aorta, spine.
    heart = ((x - 0.12 * a_t) / (0.36 * a_t)) ** 2 + ((y - 0.22 * b_t) / (0.42 * b_t)) ** 2
    heart = heart + ((z - scene.z_extent[0] - 40.0) / 70.0) ** 2 <= 1.0
    _paint(hu, tissue, heart, values["blood"], TISSUES["blood"])
    aorta = _inside_ellipse(x, y, 0.18 * a_t, -b_t + 38.0, 11.0, 11.0)
    _paint(hu, tissue, aorta, values["blood"], TISSUES["blood"])
    vertebra_y = -b_t + 8.0
    _paint(hu, tissue, _inside_ellipse(x, y, 0, vertebra_y, 20.0, 17.0), values["cortical"], TISSUES["bone"])
    _paint(hu, tissue, _inside_ellipse(x, y, 0, vertebra_y, 16.5, 13.5), values["cancellous"], TISSUES["bone"])
    arch = _inside_ellipse(x, y, 0, vertebra_y - 30.0, 14.0, 13.0) & ~_inside_ellipse(x, y, 0, vertebra_y - 28.0, 8, 8)
    _paint(hu, tissue, arch, values["cortical"], TISSUES["bone"])
    _paint(hu, tissue, _inside_ellipse(x, y, 0, vertebra_y - 28.0, 8.0, 8.0), 10.0, TISSUES["soft_tissue"])
    if scene.nodule is not None:
        nx, ny, nz = scene.nodule["centre_mm"]
        radius = scene.nodule["diameter_mm"] / 2
        inside = (x - nx) ** 2 + (y - ny) ** 2 + (z - nz) ** 2 <= radius**2
        _paint(hu, tissue, inside, scene.nodule["hu"], TISSUES["nodule"])
    return hu, tissue


def _block_reduce(values: np.ndarray, shape: tuple[int, ...], factors: tuple[int, ...]) -> np.ndarray:
    """Samples in C order of ``(n0, f0, n1, f1, ...)`` -> per-voxel blocks ``[*shape, F]``."""
    blocks = values.reshape(*(item for pair in zip(shape, factors) for item in pair))
    order = [2 * k for k in range(len(shape))] + [2 * k + 1 for k in range(len(shape))]
    return blocks.transpose(order).reshape(*shape, -1)


def render_scene(
    scene: CTScene,
    rng: np.random.Generator,
    shape: tuple[int, ...],
    spacing: tuple[float, float, float],
    slice_z: float = 0.0,
    supersample: tuple[int, int, int] = (2, 2, 3),
    noise: tuple[float, float] | None = None,
    centre_xy: tuple[float, float] = (0.0, 0.0),
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """Render a scene on a voxel grid centred on ``(*centre_xy, slice_z)``.

    Args:
        scene: from :func:`sample_scene`.
        rng: random source of the texture and noise.
        shape: ``(H, W)`` for a slice of thickness ``spacing[2]`` or ``(H, W, D)`` for a volume.
        spacing: voxel size ``(dx, dy, dz)`` in mm (``dz`` = slice thickness of a 2D image).
        slice_z: z of the slice / the volume's centre.
        supersample: sub-samples per voxel along x, y, z (partial volume).
        noise: ``(white sd, correlated sd)`` in HU; None draws 8-25 and 4-14.
        centre_xy: in-plane centre of the grid in mm (e.g. from :func:`candidate_centre`).

    Returns:
        ``(hu float32, tissues uint8, affine 4x4, info)``: ``info`` holds the noise levels.

    Raises:
        DataError: for a shape that is not 2- or 3-D, or non-positive spacing.
    """
    if len(shape) not in (2, 3) or min(shape) < 1 or min(spacing) <= 0:
        raise DataError(f"shape must be (H, W) or (H, W, D) of positive sizes and spacing > 0, got {shape}, {spacing}.")
    grid = tuple(shape) if len(shape) == 3 else (*shape, 1)
    factors = tuple(int(f) for f in supersample)
    axes = []
    origins = (float(centre_xy[0]), float(centre_xy[1]), slice_z)
    for n, f, step, origin in zip(grid, factors, spacing, origins):
        offsets = (np.arange(f) + 0.5) / f - 0.5
        centres = (np.arange(n) - (n - 1) / 2) * step + origin
        axes.append((centres[:, None] + offsets[None, :] * step).ravel())
    x, y, z = (axis.ravel() for axis in np.meshgrid(*axes, indexing="ij"))
    hu, tissue = _render_fine(scene, x, y, z)
    hu = _block_reduce(hu, grid, factors).mean(-1)
    tissue_blocks = _block_reduce(tissue, grid, factors)
    tissues = np.where((tissue_blocks == tissue_blocks[..., :1]).all(-1), tissue_blocks[..., 0], MIXED).astype(np.uint8)
    # Lung parenchyma texture: smooth fluctuations of +-25 HU, weighted by each voxel's lung fraction.
    lung_fraction = (tissue_blocks == TISSUES["lung"]).mean(-1)
    texture = gaussian_filter(rng.normal(0.0, 1.0, grid), sigma=(1.2, 1.2, 0.8 if len(shape) == 3 else 0.0))
    hu += 25.0 * texture / max(float(texture.std()), 1e-6) * lung_fraction
    white, correlated = noise if noise is not None else (_uniform(rng, 8, 25), _uniform(rng, 4, 14))
    coloured = gaussian_filter(rng.normal(0.0, 1.0, grid), sigma=(1.0, 1.0, 0.0))
    hu += rng.normal(0.0, white, grid) + correlated * coloured / max(float(coloured.std()), 1e-6)
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = [origin - (n - 1) / 2 * step for n, step, origin in zip(grid, spacing, origins)]
    if len(shape) == 2:
        hu, tissues = hu[..., 0], tissues[..., 0]
    info = {"white_noise_hu": round(white, 3), "correlated_noise_hu": round(correlated, 3)}
    return hu.astype(np.float32), tissues, affine, info
