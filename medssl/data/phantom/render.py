"""Cut cine planes from the phantom anatomy and render them like balanced SSFP magnitude images.

Planning follows scanner practice: a short-axis (SAX) stack perpendicular to the LV long axis from above the base
to beyond the apex, and two- and four-chamber long-axis (LAX) planes through the long axis. In-plane axes follow
the nearest standard orientation (``i`` to the patient's left / back, ``j`` to the back / feet), so the views look
as on a scanner console when ``i`` runs across the screen and ``j`` down it.

Rendering is analytic, per plane, in each plane's own coordinates: the static body is painted once per slice, the
heart once per frame on the pixels it can reach, every boundary with a linear partial-volume ramp (a pixel wide,
plus the boundary's in-plane travel across the slab for oblique surfaces), averaged over three sub-planes across
the slice thickness. The image is ``signal × coil sensitivity × gain`` with Rician noise (the magnitude of
complex Gaussian noise), rounded to 12-bit unsigned integers.

References:
    Wissmann et al., "MRXCAT: Realistic numerical phantoms for cardiovascular magnetic resonance", JCMR 2014,
    https://doi.org/10.1186/s12968-014-0063-3 (bSSFP tissue contrast, noise and coil maps of cardiac phantoms).
    Gudbjartsson and Patz, "The Rician distribution of noisy MRI data", MRM 1995,
    https://doi.org/10.1002/mrm.1910340618.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from medssl.data.phantom.anatomy import Heart, Placement, linear_map
from medssl.data.phantom.torso import TISSUES, Torso
from medssl.errors import DataError

__all__ = [
    "MAX_STORED_VALUE",
    "VIEWS",
    "Appearance",
    "Scene",
    "ViewGeometry",
    "acquire",
    "label_volumes_ml",
    "plan_views",
    "render_view",
    "sample_appearance",
]

VIEWS = ("sax", "lax_2c", "lax_4c")
MAX_STORED_VALUE = 4095  # 12 bits stored, as on most MR scanners
_SUBPLANES = 3
_LEFT, _POSTERIOR, _INFERIOR = np.array([-1.0, 0, 0]), np.array([0, -1.0, 0]), np.array([0, 0, -1.0])
# Short-axis "down": posterior-inferior, which puts the LV anterior wall up and the septum/RV on the left.
_SAX_DOWN = np.array([0.0, -0.5, -1.0])


@dataclass(frozen=True)
class ViewGeometry:
    """Where one cine series samples the body.

    Attributes:
        name: ``"sax"``, ``"lax_2c"`` or ``"lax_4c"``.
        shape: ``(H, W, S)``: voxels along ``i``, ``j`` and slices.
        spacing: ``(di, dj, ds)`` mm; ``ds`` is the slice step (SAX) or the slice thickness (LAX).
        thickness: slice thickness (mm).
        axes: ``[3, 3]`` unit RAS columns: ``i`` direction, ``j`` direction, slice normal.
        origin: RAS centre of voxel ``(0, 0, 0)``.
        shifts: ``[S, 2]`` in-plane displacement (mm along ``i``, ``j``) of the body seen in each slice, from
            inconsistent breath-holds (zeros when off).
    """

    name: str
    shape: tuple[int, int, int]
    spacing: tuple[float, float, float]
    thickness: float
    axes: np.ndarray
    origin: np.ndarray
    shifts: np.ndarray

    @property
    def affine(self) -> np.ndarray:
        """4x4 NIfTI voxel ``(i, j, k)`` -> RAS (mm) affine."""
        out = np.eye(4)
        out[:3, :3] = self.axes * np.asarray(self.spacing)
        out[:3, 3] = self.origin
        return out

    def points(self, slice_index: int, offset: float = 0.0, rows=slice(None), cols=slice(None)) -> np.ndarray:
        """RAS points of the body imaged at voxels of one slice, ``[rows * cols, 3]`` with ``i`` fastest.

        Args:
            slice_index: slice ``k``.
            offset: displacement (mm) along the slice normal, for sub-plane sampling of the slice thickness.
            rows: range of ``j`` (image rows); cols: range of ``i``.

        Returns:
            float32 points at voxel centres, moved by the slice's breath-hold shift.
        """
        height, width, _ = self.shape
        i = np.arange(height, dtype=np.float64)[cols] * self.spacing[0] + self.shifts[slice_index, 0]
        j = np.arange(width, dtype=np.float64)[rows] * self.spacing[1] + self.shifts[slice_index, 1]
        base = self.origin + self.axes[:, 2] * (slice_index * self.spacing[2] + offset)
        points = base + j[:, None, None] * self.axes[:, 1] + i[None, :, None] * self.axes[:, 0]
        return points.astype(np.float32)

    def voxel(self, points: np.ndarray, slice_index: int = 0) -> np.ndarray:
        """Continuous voxel indices ``[..., 3]`` at which RAS ``points`` ``[..., 3]`` appear in slice ``k``."""
        shift = self.shifts[slice_index, 0] * self.axes[:, 0] + self.shifts[slice_index, 1] * self.axes[:, 1]
        flat = np.reshape(np.asarray(points, dtype=np.float64), (-1, 3)) - shift - self.origin
        return (linear_map(flat, self.axes) / np.asarray(self.spacing)).reshape(np.shape(points))


@dataclass(frozen=True)
class Appearance:
    """Signal model of one subject.

    Attributes:
        intensity: tissue -> bSSFP signal relative to blood (1.0).
        texture: tissue -> relative amplitude of its smooth texture.
        snr: blood signal-to-noise ratio (before coil shading).
        gain: stored value of unit signal at the heart.
        series_gain: view -> extra scaling of that series.
        coil: ``(anterior weight, posterior weight, decay mm, anterior y, posterior y, reference y)`` of the
            receive sensitivity ``w_a exp(-(y_a - y)/λ) + w_p exp(-(y - y_p)/λ)``, normalised to 1 at the heart.
    """

    intensity: dict
    texture: dict
    snr: float
    gain: float
    series_gain: dict
    coil: tuple[float, float, float, float, float, float]

    def sensitivity(self, points: np.ndarray) -> np.ndarray:
        """Receive-coil sensitivity at RAS points ``[P, 3]``, ``[P]``, brighter near the anterior chest wall."""
        w_a, w_p, decay, front, back, reference = self.coil

        def raw(y):
            return 0.35 + w_a * np.exp(-(front - y) / decay) + w_p * np.exp(-(y - back) / decay)

        return (raw(points[:, 1].astype(np.float64)) / raw(reference)).astype(np.float32)


@dataclass(frozen=True)
class Scene:
    """Everything needed to render a subject: heart, its placement, the body and the signal model."""

    heart: Heart
    placement: Placement
    torso: Torso
    appearance: Appearance


def sample_appearance(rng: np.random.Generator, torso: Torso, series_intensity_spread: float = 0.0) -> Appearance:
    """Draw bSSFP contrast, SNR, gain and coil shading for one subject.

    Args:
        rng: the subject's generator.
        torso: its body (for the coil positions).
        series_intensity_spread: each series' gain is multiplied by ``exp(U(-a, a))`` (0 = same gain).

    Returns:
        The appearance; blood/myocardium contrast is 3.2-4.6, lungs are the darkest tissue in the body.

    Raises:
        DataError: if ``series_intensity_spread`` is negative or above 1.
    """
    if not 0.0 <= series_intensity_spread <= 1.0:
        raise DataError(f"series_intensity_spread must lie in [0, 1], got {series_intensity_spread}")
    u = rng.uniform
    intensity = {
        "air": 0.0,
        "blood": 1.0,
        "myocardium": 1.0 / u(3.2, 4.6),
        "fat": u(0.75, 0.95),
        "pericardium": u(0.06, 0.12),
        "muscle": u(0.18, 0.26),
        "bone": u(0.08, 0.14),
        "marrow": u(0.45, 0.6),
        "mediastinum": u(0.5, 0.7),
        "lung": u(0.03, 0.06),
        "lung_vessel": u(0.25, 0.4),
        "liver": u(0.32, 0.45),
        "liver_vessel": u(0.7, 0.9),
        "stomach": u(0.2, 0.5),
        "csf": u(0.9, 1.1),
        "cord": u(0.3, 0.4),
        "oesophagus": u(0.25, 0.35),
    }
    texture = {tissue: 0.05 for tissue in TISSUES}
    texture.update(fat=0.12, muscle=0.12, mediastinum=0.15, liver=0.08, stomach=0.25, marrow=0.15, lung=0.35)
    texture.update(blood=0.04, myocardium=0.06)
    body_y, body_ry = torso.body_centre[1], torso.body_radii[1]
    coil = (
        u(0.6, 1.0),
        u(0.25, 0.6),
        u(90.0, 150.0),
        body_y + body_ry,
        body_y - body_ry,
        0.0,
    )
    return Appearance(
        intensity=intensity,
        texture=texture,
        snr=float(math.exp(u(math.log(20.0), math.log(80.0)))),
        gain=u(400.0, 900.0),
        series_gain={view: float(math.exp(u(-1.0, 1.0) * series_intensity_spread)) for view in VIEWS},
        coil=coil,
    )


def _in_plane_axes(normal: np.ndarray, across: np.ndarray, down: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """In-plane unit axes: ``j`` (image down) along ``down``, ``i`` (image right) as close to ``across`` as allowed."""
    j = down - (down @ normal) * normal
    j /= np.linalg.norm(j)
    i = across - (across @ normal) * normal - (across @ j) * j
    return i / np.linalg.norm(i), j


def _random_shifts(rng: np.random.Generator, count: int, max_shift: float) -> np.ndarray:
    if max_shift <= 0:
        return np.zeros((count, 2))
    angle = rng.uniform(0, 2 * math.pi, count)
    radius = max_shift * np.sqrt(rng.uniform(0, 1, count))
    return np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1)


def plan_views(
    rng: np.random.Generator,
    heart: Heart,
    placement: Placement,
    *,
    breath_hold_shift_mm: float = 0.0,
    missing_apical_slice: bool = False,
) -> dict[str, ViewGeometry]:
    """Plan the SAX stack and the LAX two- and four-chamber planes of one subject.

    SAX: 8-14 slices (one fewer with ``missing_apical_slice``), 6-8 mm thick with 0-1.5 mm gaps (wider for long
    hearts), from just above the ED mitral plane to beyond the apex, normal along the LV long axis. All views
    share in-plane spacing 1.55-1.95 mm and a matrix (multiple of 16, 160-224) giving a field of view of about
    300-360 mm. The four-chamber plane contains the long axis and the RV centre (±8°), the two-chamber plane is
    perpendicular to it.

    Args:
        rng: the subject's generator.
        heart: the heart (long axis length, RV direction).
        placement: its placement in RAS.
        breath_hold_shift_mm: largest in-plane shift (mm) of the body between breath-holds (each SAX slice and
            each LAX series gets its own), 0 = consistent breath-holds.
        missing_apical_slice: drop the most apical SAX slice.

    Returns:
        ``{"sax": ..., "lax_2c": ..., "lax_4c": ...}``.

    Raises:
        DataError: if ``breath_hold_shift_mm`` is negative or above 20 mm.
    """
    if not 0.0 <= breath_hold_shift_mm <= 20.0:
        raise DataError(f"breath_hold_shift_mm must lie in [0, 20], got {breath_hold_shift_mm}")
    p = heart.params
    spacing = rng.uniform(1.55, 1.95)
    matrix = int(np.clip(round(rng.uniform(300.0, 360.0) / spacing / 16.0) * 16, 160, 224))
    rotation = placement.rotation
    long_axis = rotation[:, 2]

    thickness = rng.uniform(6.0, 8.0)
    step = thickness + rng.uniform(0.0, 1.5)
    first = -rng.uniform(0.2, 1.0) * step
    while True:
        count = math.ceil((p.length - first) / step - 0.3) + 1
        if count <= 14 or step >= 10.0:
            break
        step = min(step + 0.5, 10.0)
    count = int(np.clip(count, 8, 14)) - int(missing_apical_slice)
    i, j = _in_plane_axes(long_axis, _LEFT, _SAX_DOWN)
    centre = placement.to_patient(np.array([0.0, 0.0, first])) + rng.uniform(-15, 15) * i + rng.uniform(-15, 15) * j
    views = {
        "sax": ViewGeometry(
            name="sax",
            shape=(matrix, matrix, count),
            spacing=(spacing, spacing, step),
            thickness=thickness,
            axes=np.stack([i, j, long_axis], axis=1),
            origin=centre - (matrix - 1) / 2.0 * spacing * (i + j),
            shifts=_random_shifts(rng, count, breath_hold_shift_mm),
        )
    }
    angle_4c = p.rv_angle + math.radians(rng.uniform(-8.0, 8.0))
    lax_thickness = rng.uniform(6.0, 8.0)
    for name, angle, across, down in (
        ("lax_4c", angle_4c, _LEFT, _POSTERIOR),
        ("lax_2c", angle_4c - 0.5 * math.pi, _POSTERIOR, _INFERIOR),
    ):
        in_plane = rotation @ np.array([math.cos(angle), math.sin(angle), 0.0])
        normal = np.cross(long_axis, in_plane)
        i, j = _in_plane_axes(normal, across, down)
        normal = np.cross(i, j)  # right-handed, so a single-slice DICOM series keeps the same normal
        centre = placement.to_patient(np.array([0.0, 0.0, 0.35 * p.length]))
        centre = centre + rng.uniform(-10, 10) * i + rng.uniform(-10, 10) * j
        views[name] = ViewGeometry(
            name=name,
            shape=(matrix, matrix, 1),
            spacing=(spacing, spacing, lax_thickness),
            thickness=lax_thickness,
            axes=np.stack([i, j, normal], axis=1),
            origin=centre - (matrix - 1) / 2.0 * spacing * (i + j),
            shifts=_random_shifts(rng, 1, breath_hold_shift_mm),
        )
    return views


def label_volumes_ml(heart: Heart, placement: Placement, view: ViewGeometry, state) -> np.ndarray:
    """Voxel-count volumes of the labels a view would hold, without rendering images.

    Args:
        heart: the heart.
        placement: its placement.
        view: the series geometry (each voxel counts ``di * dj * ds``).
        state: motion scalars ``[K, 1]`` (:meth:`Heart.state`).

    Returns:
        ``[K, 3]`` volumes (ml) of labels 1 (RV cavity), 2 (LV myocardium) and 3 (LV cavity).
    """
    counts = np.zeros((state.phi.shape[0], 3))
    for k in range(view.shape[2]):
        x, y, z = placement.to_heart(view.points(k).reshape(-1, 3)).T
        if np.ptp(z) < 1e-3:
            z = z[:1]
        label = heart.labels(x, y, z, state)
        counts += np.stack([(label == value).sum(axis=1) for value in (1, 2, 3)], axis=1)
    return counts * float(np.prod(view.spacing)) / 1000.0


def _ramp(field: np.ndarray, width: float) -> np.ndarray:
    """Partial-volume coverage of a voxel by the region ``field < 0`` (linear ramp over ``width`` mm)."""
    return np.clip(0.5 - field / width, 0.0, 1.0, dtype=np.float32)


def _tissue_values(appearance: Appearance, tissue: str, texture: np.ndarray) -> np.ndarray:
    return np.float32(appearance.intensity[tissue]) * (1.0 + np.float32(appearance.texture[tissue]) * texture)


def _paint(image: np.ndarray, layers, appearance: Appearance, texture: np.ndarray, widths) -> None:
    """Paint ``layers`` back to front into ``image`` in place.

    Args:
        image: float32 ``[P]`` or ``[T, P]`` signal, overwritten.
        layers: :class:`~medssl.data.phantom.anatomy.Layer` list.
        appearance: tissue intensities and textures.
        texture: ``[P]`` texture values.
        widths: one ramp width (mm) for every bound, or per layer a list of per-bound widths (arrays allowed).
    """
    for index, layer in enumerate(layers):
        cover = None
        for bound, field in enumerate(layer.bounds):
            ramp = _ramp(field, widths if np.isscalar(widths) else widths[index][bound])
            cover = ramp if cover is None else cover * ramp
            if not cover.any():  # e.g. atria far from a mid-ventricular slice
                break
        else:
            image += cover * (_tissue_values(appearance, layer.tissue, texture) - image)


def _heart_pixels(scene: Scene, view: ViewGeometry, slice_index: int, offsets, stride: int = 4) -> np.ndarray:
    """Flat indices (``i`` fastest) of the pixels of a slice that the heart can reach at any frame."""
    height, width, _ = view.shape
    extremes = scene.heart.state(np.array([0.0, 1.0]), dtype=np.float32)
    rows, cols = slice(stride // 2, None, stride), slice(stride // 2, None, stride)
    coarse = (len(range(width)[rows]), len(range(height)[cols]))
    near = np.zeros(coarse, dtype=bool)
    for offset in offsets:
        points = view.points(slice_index, offset, rows, cols).reshape(-1, 3)
        x, y, z = scene.placement.to_heart(points).T.astype(np.float32)
        outer = scene.heart.outer_field(x, y, z, extremes).min(axis=0)
        near |= (outer < stride * view.spacing[0]).reshape(coarse)
    # Grow by one coarse cell so every full-resolution pixel within reach of the heart is kept.
    grown = near.copy()
    grown[1:] |= near[:-1]
    grown[:-1] |= near[1:]
    grown[:, 1:] |= grown[:, :-1].copy()
    grown[:, :-1] |= grown[:, 1:].copy()
    full = np.repeat(np.repeat(grown, stride, axis=0), stride, axis=1)
    full = np.pad(full, ((0, max(width - full.shape[0], 0)), (0, max(height - full.shape[1], 0))), mode="edge")
    return np.flatnonzero(full[:width, :height])


def _through_plane_widths(stack: list, pixel: float) -> list[list]:
    """Ramp width of every bound: a pixel plus how far the boundary moves between neighbouring sub-planes.

    A boundary crossing the slab obliquely (the apex or a valve plane in a short-axis slice) thus blurs over its
    in-plane footprint instead of showing one step per sub-plane.

    Args:
        stack: per sub-plane, the heart's list of :class:`~medssl.data.phantom.anatomy.Layer` (same structure).
        pixel: in-plane pixel size (mm).

    Returns:
        Per layer and bound, a width in mm (scalar or array broadcastable to the bound).
    """
    steps = len(stack) - 1
    return [
        [pixel + np.abs(a - b) * np.float32(1.0 / steps) for a, b in zip(first.bounds, last.bounds)]
        for first, last in zip(stack[0], stack[-1])
    ]


def render_view(scene: Scene, view: ViewGeometry) -> tuple[np.ndarray, np.ndarray]:
    """Render the noise-free signal and the labels of one cine series.

    Args:
        scene: the subject.
        view: the series geometry.

    Returns:
        ``(signal, label)``: float32 ``[T, S, W, H]`` (signal × coil sensitivity, blood ≈ 1 at the heart) and uint8
        ``[T, S, W, H]`` ACDC labels at slice centres. Transposing (``.T``) gives the NIfTI layout ``[H, W, S, T]``.
    """
    heart, placement, appearance = scene.heart, scene.placement, scene.appearance
    height, width, slices = view.shape
    frames = heart.num_frames
    state = heart.state(dtype=np.float32)
    pixel = view.spacing[0]
    offsets = [view.thickness * (m / _SUBPLANES - (_SUBPLANES - 1) / (2 * _SUBPLANES)) for m in range(_SUBPLANES)]
    centre = _SUBPLANES // 2
    signal = np.empty((frames, slices, width * height), dtype=np.float32)
    label = np.zeros((frames, slices, width * height), dtype=np.uint8)
    for k in range(slices):
        centre_points = view.points(k).reshape(-1, 3)
        texture = scene.torso.texture(centre_points)
        static = np.zeros(centre_points.shape[0], dtype=np.float32)
        _paint(static, scene.torso.layers(centre_points), appearance, texture, pixel)
        signal[:, k] = static
        pixels = _heart_pixels(scene, view, k, offsets)
        if pixels.size:
            stack = []
            for m, offset in enumerate(offsets):
                points = view.points(k, offset).reshape(-1, 3)[pixels]
                x, y, z = placement.to_heart(points).T.astype(np.float32)
                if np.ptp(z) < 1e-3:  # a plane across the long axis: one height for all its points
                    z = z[:1]
                layers, labels = heart.layers(x, y, z, state, labels=m == centre)
                stack.append(layers)
                if m == centre:
                    label[:, k, pixels] = labels
            widths = _through_plane_widths(stack, pixel)
            moving = np.zeros((frames, pixels.size), dtype=np.float32)
            for layers in stack:
                painted = np.repeat(static[None, pixels], frames, axis=0)
                _paint(painted, layers, appearance, texture[pixels], widths)
                moving += painted
            signal[:, k, pixels] = moving * np.float32(1.0 / _SUBPLANES)
        signal[:, k] *= appearance.sensitivity(centre_points)
    return signal.reshape(frames, slices, width, height), label.reshape(frames, slices, width, height)


def acquire(signal: np.ndarray, appearance: Appearance, view_name: str, rng: np.random.Generator) -> np.ndarray:
    """Turn a noise-free signal into stored magnitude values: gain, Rician noise, rounding to 12 bits.

    The magnitude ``|s + σ (n1 + i n2)|`` of complex Gaussian noise is drawn in polar form (Box-Muller):
    ``n1 + i n2 = r e^{iα}`` with ``r² = -2 ln u1`` and ``α = 2π u2``, so
    ``|s + σ r e^{iα}|² = s² + 2 s σ r cos α + σ² r²`` needs two uniforms, one log, one cosine and two roots.

    Args:
        signal: float32 signal of any shape (blood ≈ 1); consumed (overwritten) to save memory.
        appearance: gain, SNR and the series' extra gain.
        view_name: which series (for its gain).
        rng: generator of the noise.

    Returns:
        uint16 array of ``signal``'s shape in ``0..4095``.
    """
    gain = np.float32(appearance.gain * appearance.series_gain[view_name])
    sigma = np.float32(gain / appearance.snr)
    magnitude = signal
    magnitude *= gain
    radius_sq = rng.random(signal.shape, dtype=np.float32)
    np.subtract(np.float32(1.0), radius_sq, out=radius_sq)  # (0, 1], so the log is finite
    np.log(radius_sq, out=radius_sq)
    radius_sq *= np.float32(-2.0) * sigma * sigma  # σ² r²
    cross = rng.random(signal.shape, dtype=np.float32)
    cross *= np.float32(2.0 * math.pi)
    np.cos(cross, out=cross)
    cross *= np.sqrt(radius_sq)
    cross *= np.float32(2.0)
    cross *= magnitude  # 2 s σ r cos α
    np.square(magnitude, out=magnitude)
    magnitude += radius_sq
    magnitude += cross
    np.maximum(magnitude, 0.0, out=magnitude)
    np.sqrt(magnitude, out=magnitude)
    np.rint(magnitude, out=magnitude)
    np.clip(magnitude, 0, MAX_STORED_VALUE, out=magnitude)
    return magnitude.astype(np.uint16)
