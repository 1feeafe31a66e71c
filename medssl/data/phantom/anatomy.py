"""Analytic beating heart of the synthetic cine CMR phantoms: geometry, motion, exact volumes and labels.

Everything is defined by closed-form surfaces in a *heart frame* (millimetres): the origin is the centre of the
mitral (base) plane at end-diastole, ``z`` runs along the left-ventricular (LV) long axis from base to apex, ``x``
points at the lateral wall (away from the right ventricle) and ``y = z × x`` at the anterior wall. Angles ``θ``
are measured from ``+x`` towards ``+y`` (anterior 90°, septum 180°, inferior 270°).

- LV endo- and epicardium: truncated prolate ellipsoids whose cross-sections are star-shaped about the long axis,
  ``R(θ, z, t) = A(θ, s, t) · sqrt(1 - u²)`` with ``s`` the normalised base-to-apex position and ``u`` an affine
  map of ``s`` that puts the widest section slightly below the base. Wall thickness and contraction vary by
  region (hypertrophy, infarct territories); the epicardium follows from an incompressible myocardium.
- The base is a tilted, saddle-shaped mitral surface ``z = z_b(t) + ρ · q(θ)``, which descends in systole.
- The RV cavity is a crescent band of width ``W(θ, z, t)`` wrapped around the LV epicardium on the septal side,
  truncated at a tilted tricuspid plane (more apical than the mitral annulus, with a larger systolic excursion);
  its thin free wall is unlabelled.
- Atria (ellipsoids above the valve planes), papillary muscles (tapered cylinders attached to the wall) and
  trabeculations (a textured band inside the endocardium) complete the picture; the last two are dark but labelled
  LV cavity, as in ACDC.

Because every surface is explicit in ``(ρ, θ, z)``, cavity volumes are integrals over ``(θ, z)`` of closed-form
radial integrals, evaluated by quadrature to far below 0.1 ml (not by counting voxels).

References:
    Bernard et al., "Deep Learning Techniques for Automatic MRI Cardiac Multi-Structures Segmentation and Diagnosis:
    Is the Problem Solved?", IEEE TMI 2018, https://doi.org/10.1109/TMI.2018.2837502 (ACDC labels and groups).
    Kawel-Boehm et al., "Reference ranges ('normal values') for cardiovascular magnetic resonance (CMR) in adults
    and children: 2020 update", JCMR 2020, https://doi.org/10.1186/s12968-020-00683-3 (sizes, function).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from medssl.errors import DataError

__all__ = [
    "MYOCARDIAL_DENSITY_G_PER_ML",
    "CycleState",
    "Heart",
    "HeartParams",
    "Layer",
    "Placement",
    "contraction_curve",
    "end_systolic_frame",
    "linear_map",
    "mitral_slope",
    "sample_placement",
]

MYOCARDIAL_DENSITY_G_PER_ML = 1.05
ES_FRACTION_RANGE = (0.35, 0.40)
# Quadrature resolution of the exact volumes: (angles, long-axis samples). Halving both changes volumes by
# < 0.05 ml (tested), so these are converged far below any voxel-count error.
_QUADRATURE = (96, 192)


def end_systolic_frame(num_frames: int, fraction: float = 0.375) -> int:
    """Return the end-systolic (ES) frame index of a cine of ``num_frames`` frames starting at end-diastole (ED).

    The ES frame is the integer within 35-40 % of the cycle closest to ``fraction``; very short cines (where no
    integer falls inside that window) use the nearest one.

    Args:
        num_frames: frames per cardiac cycle, >= 3.
        fraction: preferred ES position as a fraction of the cycle, in [0.35, 0.40].

    Returns:
        The ES frame index, in ``1 .. num_frames - 1``.

    Raises:
        DataError: if ``num_frames < 3`` or ``fraction`` is outside [0.35, 0.40].
    """
    if num_frames < 3:
        raise DataError(f"a cine needs at least 3 frames to hold distinct ED and ES phases, got {num_frames}")
    if not ES_FRACTION_RANGE[0] <= fraction <= ES_FRACTION_RANGE[1]:
        raise DataError(f"the ES fraction must lie in {ES_FRACTION_RANGE}, got {fraction}")
    low = math.ceil(ES_FRACTION_RANGE[0] * num_frames - 1e-9)
    high = math.floor(ES_FRACTION_RANGE[1] * num_frames + 1e-9)
    target = fraction * num_frames
    frame = min(max(round(target), low), high) if low <= high else round(target)
    return int(min(max(frame, 1), num_frames - 1))


def contraction_curve(num_frames: int, es_frame: int, early_filling: float = 0.75) -> np.ndarray:
    """Return the normalised contraction ``φ`` of each frame: 0 at ED (frame 0), 1 at ES, in (0, 1) elsewhere.

    Systole is a smooth, front-loaded ejection; diastole is rapid early filling (a fraction ``early_filling`` of
    the recovery within the first 45 % of diastole), diastasis, and an atrial kick over the last 25 %. The cavities
    shrink monotonically with ``φ``, so both ventricles are largest at frame 0 and smallest at ``es_frame``.

    Args:
        num_frames: frames per cycle ``T`` (>= 3), evenly spaced from the R wave.
        es_frame: the ES frame, in ``1 .. T - 1``.
        early_filling: share of diastolic recovery done by early filling, in (0, 1).

    Returns:
        ``φ`` as float64 ``[T]``.

    Raises:
        DataError: if ``es_frame`` or ``early_filling`` is out of range.
    """
    if not 1 <= es_frame < num_frames:
        raise DataError(f"es_frame must lie in 1..{num_frames - 1} for {num_frames} frames, got {es_frame}")
    if not 0.0 < early_filling < 1.0:
        raise DataError(f"early_filling must lie in (0, 1), got {early_filling}")
    time = np.arange(num_frames) / num_frames
    t_es = es_frame / num_frames
    systole = 0.5 * (1.0 - np.cos(np.pi * np.clip(time / t_es, 0.0, 1.0) ** 0.8))
    diastole_time = np.clip((time - t_es) / (1.0 - t_es), 0.0, 1.0)
    early = 0.5 * (1.0 - np.cos(np.pi * np.clip(diastole_time / 0.45, 0.0, 1.0)))
    atrial = 0.5 * (1.0 - np.cos(np.pi * np.clip((diastole_time - 0.75) / 0.25, 0.0, 1.0)))
    recovery = early_filling * early + (1.0 - early_filling) * atrial
    return np.where(time <= t_es, systole, 1.0 - recovery)


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def _window(s: np.ndarray, start: float, stop: float, edge: float = 0.15) -> np.ndarray:
    """≈1 for ``s`` in [start, stop], 0 beyond, with smooth ramps of width ``edge`` centred on both ends."""
    return _smoothstep((s - start) / edge + 0.5) * _smoothstep((stop - s) / edge + 0.5)


def _angular_bump(cos_t: np.ndarray, sin_t: np.ndarray, angle: float, half_width: float) -> np.ndarray:
    """Smooth bump in θ: 1 at ``angle``, 0 from ``angle ± half_width`` on (half_width < π)."""
    cos_delta = cos_t * math.cos(angle) + sin_t * math.sin(angle)
    floor = math.cos(half_width)
    return _smoothstep((cos_delta - floor) / (1.0 - floor))


def _profile(s: np.ndarray, sigma: float) -> np.ndarray:
    """Ellipsoidal radius profile along the long axis: ``sqrt(1 - u²)`` with ``u = s (1 + σ) - σ``; 0 past s = 1."""
    u = s * (1.0 + sigma) - sigma
    return np.sqrt(np.clip(1.0 - u * u, 0.0, None))


def linear_map(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """``points @ matrix`` for ``points [P, 3]`` and a small ``matrix [3, N]``, without BLAS.

    OpenBLAS runs such products on spinning worker threads, which doubles the CPU time of a cohort written by
    several processes; N fused multiply-adds over the points are as fast on one core.
    """
    matrix = np.asarray(matrix, dtype=points.dtype)
    return points[:, 0:1] * matrix[0] + points[:, 1:2] * matrix[1] + points[:, 2:3] * matrix[2]


@dataclass(frozen=True)
class Placement:
    """Rigid map between the heart frame and patient coordinates (RAS, mm).

    Attributes:
        rotation: ``[3, 3]``; its columns are the heart axes ``x`` (lateral), ``y`` (anterior), ``z`` (base to
            apex) expressed in RAS.
        origin: ``[3]`` RAS position of the heart-frame origin (mitral plane centre at ED).
    """

    rotation: np.ndarray
    origin: np.ndarray

    def to_patient(self, points: np.ndarray) -> np.ndarray:
        """Map heart-frame points ``[..., 3]`` to RAS ``[..., 3]``."""
        flat = np.reshape(points, (-1, 3))
        return (linear_map(flat, self.rotation.T) + self.origin.astype(flat.dtype)).reshape(np.shape(points))

    def to_heart(self, points: np.ndarray) -> np.ndarray:
        """Map RAS points ``[..., 3]`` to the heart frame ``[..., 3]``."""
        flat = np.reshape(points, (-1, 3))
        return linear_map(flat - self.origin.astype(flat.dtype), self.rotation).reshape(np.shape(points))

    @property
    def long_axis(self) -> np.ndarray:
        """Unit RAS vector of the LV long axis, base to apex."""
        return self.rotation[:, 2]


@dataclass(frozen=True)
class HeartParams:
    """Shape, motion and appearance-free anatomy of one heart (mm, radians, fractions).

    Defaults describe a normal adult heart; :func:`medssl.data.phantom.groups.sample_heart` draws and solves
    them per disease group. ``endo_radius``, ``contraction``, ``rv_width`` and ``rv_contraction`` are the
    quantities solved for the target EDV, LVEF, RV EDV and RVEF.
    """

    length: float = 92.0  # ED base centre to epicardial apex
    apex_wall: float = 8.0  # ED apical wall thickness
    apex_thickening: float = 0.4  # fractional apical wall thickening at ES
    sigma: float = 0.35  # how far above the equator the ellipsoids are truncated (widest section below the base)
    endo_radius: float = 25.0
    shape: tuple[float, float, float, float] = (0.0, 0.0, 0.0, 0.0)  # cross-section Fourier terms cos θ .. sin 2θ
    wall: float = 8.5  # ED wall thickness outside hypertrophy / infarct
    hypertrophy: float = 0.0  # extra thickness as a multiple of ``wall`` at the centre of the hypertrophic region
    hypertrophy_angle: float = math.pi
    hypertrophy_half_width: float = 1.3
    hypertrophy_span: tuple[float, float] = (0.0, 0.7)  # along s (0 base, 1 apex)
    infarct: float = 0.0  # 0 none, 1 fully akinetic core
    infarct_angle: float = 0.5 * math.pi
    infarct_half_width: float = 1.2
    infarct_span: tuple[float, float] = (0.35, 1.0)
    infarct_thinning: float = 0.45  # fraction of wall lost in the infarct core
    contraction: float = 0.32  # endocardial radial shortening at ES outside the infarct
    base_descent: float = 12.0  # mitral plane motion towards the apex at ES
    base_tilt: float = 0.15  # slope (tan) of the mitral surface across the ventricle
    base_tilt_angle: float = 0.0
    base_saddle: float = 0.08  # saddle slope amplitude (cos 2θ)
    base_saddle_angle: float = 0.5 * math.pi
    rv_angle: float = math.radians(165.0)  # centre of the RV crescent
    rv_half_width: float = math.radians(80.0)
    rv_width: float = 28.0  # ED crescent width at its centre
    tricuspid_offset: float = 8.0  # ED tricuspid plane on the LV axis, apical of the mitral centre
    tricuspid_tilt: float = 0.2  # slope (tan) of the tricuspid plane
    tricuspid_tilt_angle: float = math.pi
    tapse: float = 20.0  # tricuspid annular systolic excursion
    rv_apex: float = 0.84  # RV apex position as a fraction of ``length``
    rv_sigma: float = 0.1
    rv_contraction: float = 0.3
    rv_wall: float = 3.5
    la_radii: tuple[float, float, float] = (24.0, 20.0, 24.0)
    la_offset: tuple[float, float] = (4.0, -6.0)  # (x, y) of the LA centre
    ra_radii: tuple[float, float, float] = (22.0, 22.0, 24.0)
    atrial_expansion: float = 0.12  # atrial radius increase at ES (reservoir phase)
    papillary_angles: tuple[float, float] = (math.radians(45.0), math.radians(285.0))
    papillary_radius: float = 5.0
    trabeculation: float = 2.5  # depth of trabeculations into the cavity
    trabeculation_waves: tuple[tuple[float, float, float, float], ...] = (
        (0.9, 0.2, 0.05, 0.0),
        (-0.3, 0.85, 0.1, 1.0),
        (0.5, -0.7, -0.08, 2.0),
    )  # (kx, ky, kz, phase), k in rad/mm
    fat: float = 1.5  # epicardial fat thickness
    groove_fat: float = 6.0  # extra fat in the interventricular and atrioventricular grooves
    pericardium: float = 1.2
    early_filling: float = 0.75


@dataclass(frozen=True)
class CycleState:
    """Per-frame scalars of the heart's motion, each shaped ``[T, 1]`` to broadcast against point arrays ``[P]``."""

    phi: np.ndarray
    z_base: np.ndarray
    z_endo_apex: np.ndarray
    stretch: np.ndarray  # longitudinal length ratio to ED (incompressibility)
    z_tricuspid: np.ndarray
    rv_scale: np.ndarray
    atrial_scale: np.ndarray


@dataclass(frozen=True)
class Layer:
    """One painted structure of the phantom: a tissue and the implicit boundaries whose intersection it fills.

    Attributes:
        tissue: a tissue name of :data:`medssl.data.phantom.torso.TISSUES` (``"blood"``, ``"myocardium"``, ...).
        bounds: fields, each an approximate signed distance in mm (negative inside), broadcastable to each other
            (``[P]`` for the static body, ``[T, P]`` for the beating heart).
    """

    tissue: str
    bounds: tuple[np.ndarray, ...]


@dataclass(frozen=True)
class Heart:
    """A heart through one cardiac cycle: parameters, contraction curve and everything derived from them.

    Args:
        params: the anatomy.
        phi: ``[T]`` contraction of each frame (:func:`contraction_curve`).
        es_frame: the end-systolic frame.
    """

    params: HeartParams
    phi: np.ndarray
    es_frame: int

    def __post_init__(self) -> None:
        p = self.params
        if self.phi.ndim != 1 or self.phi.size < 3:
            raise DataError(f"phi must be a 1-D array of at least 3 frames, got shape {self.phi.shape}")
        if p.rv_apex * p.length >= p.length - p.apex_wall:
            raise DataError(f"the RV apex ({p.rv_apex * p.length:.1f} mm) must lie above the LV endocardial apex")

    @property
    def num_frames(self) -> int:
        """Frames per cycle ``T``."""
        return int(self.phi.size)

    def state(self, phi: np.ndarray | None = None, dtype=np.float64) -> CycleState:
        """Return the motion scalars for contraction values ``phi`` (default: every frame of the cycle).

        Args:
            phi: ``[K]`` contraction values in [0, 1]; ``None`` for the ``[T]`` frames.
            dtype: float type of the arrays (float32 keeps rendering in single precision).

        Returns:
            A :class:`CycleState` whose arrays are ``[K, 1]``.
        """
        p = self.params
        phi = (self.phi if phi is None else np.asarray(phi, dtype=np.float64)).reshape(-1, 1)
        z_base = p.base_descent * phi
        apex_wall = p.apex_wall * (1.0 + p.apex_thickening * phi)
        values = {
            "phi": phi,
            "z_base": z_base,
            "z_endo_apex": p.length - apex_wall,
            "stretch": (p.length - z_base) / p.length,
            "z_tricuspid": p.tricuspid_offset + p.tapse * phi,
            "rv_scale": 1.0 - p.rv_contraction * phi,
            "atrial_scale": 1.0 + p.atrial_expansion * phi,
        }
        return CycleState(**{name: value.astype(dtype) for name, value in values.items()})

    # --- surfaces ---------------------------------------------------------------------------------------------

    def _regional(self, cos_t, sin_t, s_long):
        """Infarct weight and ED wall thickness at ``(θ, s)``; separable so short-axis slices stay cheap."""
        p = self.params
        s = np.clip(s_long, 0.0, 1.0)
        infarct = 0.0
        if p.infarct > 0:
            # A flat-topped territory: the akinetic core fills most of it, with a thin hypokinetic border zone.
            core = _angular_bump(cos_t, sin_t, p.infarct_angle, p.infarct_half_width) * _window(s, *p.infarct_span)
            infarct = p.infarct * np.minimum(1.6 * core, 1.0)
        thick = p.wall
        if p.hypertrophy > 0:
            thick = thick * (
                1.0
                + p.hypertrophy
                * _angular_bump(cos_t, sin_t, p.hypertrophy_angle, p.hypertrophy_half_width)
                * _window(s, *p.hypertrophy_span)
            )
        if p.infarct > 0:
            thick = thick * (1.0 - p.infarct_thinning * infarct)
        return infarct, thick

    def lv_surfaces(self, cos_t, sin_t, z, state: CycleState, epicardium: bool = True):
        """Endo- (and epi-) cardial radii at angle ``θ`` and height ``z``.

        Args:
            cos_t, sin_t: ``cos θ``, ``sin θ``, ``[P]`` (or broadcastable).
            z: heart-frame height, ``[P]`` or ``[1]`` (one short-axis plane) or ``[T, P]``.
            state: motion scalars ``[T, 1]``.
            epicardium: also return the epicardial radius.

        Returns:
            ``(r_endo, r_epi)`` broadcast to ``[T, P]`` (``r_epi`` is ``None`` when not requested). Radii are 0
            beyond the apex; the base truncation is separate (:meth:`base_slope`).
        """
        p = self.params
        rise = z - state.z_base
        s_long = rise / (state.z_endo_apex - state.z_base)
        shape = 1.0 + p.shape[0] * cos_t + p.shape[1] * sin_t
        shape = shape + p.shape[2] * (cos_t * cos_t - sin_t * sin_t) + 2.0 * p.shape[3] * cos_t * sin_t
        infarct, thick = self._regional(cos_t, sin_t, s_long)
        # Hypertrophy narrows the cavity by half its extra thickness; an infarct bulges outward a little.
        a_endo_ed = p.endo_radius * shape - 0.5 * (thick - p.wall) + 0.06 * p.endo_radius * infarct
        shortening = p.contraction * (1.0 - infarct)
        a_endo = a_endo_ed * (1.0 - shortening * state.phi)
        r_endo = a_endo * _profile(s_long, p.sigma)
        if not epicardium:
            return r_endo, None
        # Incompressible wall: the myocardial cross-section grows as the ventricle shortens.
        a_epi = np.sqrt(a_endo * a_endo + ((a_endo_ed + thick) ** 2 - a_endo_ed * a_endo_ed) / state.stretch)
        r_epi = a_epi * _profile(rise / (p.length - state.z_base), p.sigma)
        return r_endo, r_epi

    def base_slope(self, cos_t, sin_t) -> np.ndarray:
        """Slope ``q(θ)`` of the mitral surface ``z = z_b(t) + ρ q(θ)``; see :func:`mitral_slope`."""
        return mitral_slope(self.params, cos_t, sin_t)

    def tricuspid_slope(self, cos_t, sin_t) -> np.ndarray:
        """Slope of the tricuspid plane ``z = z_t(t) + ρ q_t(θ)`` (a tilt)."""
        p = self.params
        return p.tricuspid_tilt * (cos_t * math.cos(p.tricuspid_tilt_angle) + sin_t * math.sin(p.tricuspid_tilt_angle))

    def rv_width(self, cos_t, sin_t, z, state: CycleState) -> np.ndarray:
        """Width of the RV crescent outside the LV epicardium, ``[T, P]`` (0 outside the RV)."""
        p = self.params
        z_apex = p.rv_apex * p.length
        s_rv = (z - state.z_tricuspid) / (z_apex - state.z_tricuspid)
        across = _angular_bump(cos_t, sin_t, p.rv_angle, p.rv_half_width)
        return p.rv_width * state.rv_scale * _profile(s_rv, p.rv_sigma) * across

    # --- fields for rendering and labels --------------------------------------------------------------------------

    def _core(self, x, y, z, state: CycleState) -> dict:
        """Fields (mm, < 0 inside) of the labelled structures and the valve surfaces at heart-frame points."""
        rho = np.hypot(x, y)
        inv = 1.0 / np.maximum(rho, 1e-6)
        cos_t, sin_t = x * inv, y * inv
        r_endo, r_epi = self.lv_surfaces(cos_t, sin_t, z, state)
        outer_rv = r_epi + self.rv_width(cos_t, sin_t, z, state)
        return {
            "rho": rho,
            "cos_t": cos_t,
            "sin_t": sin_t,
            "r_endo": r_endo,
            "endo": rho - r_endo,
            "epi": rho - r_epi,
            "rv": rho - outer_rv,
            "base": state.z_base + rho * self.base_slope(cos_t, sin_t) - z,  # < 0 on the ventricular side
            "tricuspid": state.z_tricuspid + rho * self.tricuspid_slope(cos_t, sin_t) - z,
        }

    @staticmethod
    def _label(core: dict) -> np.ndarray:
        ventricle = core["base"] < 0
        shape = np.broadcast_shapes(core["endo"].shape, core["rv"].shape, core["base"].shape)
        label = np.zeros(shape, dtype=np.uint8)
        label[(core["rv"] < 0) & (core["epi"] >= 0) & (core["tricuspid"] < 0)] = 1
        label[(core["epi"] < 0) & ventricle] = 2
        label[(core["endo"] < 0) & ventricle] = 3
        return label

    def labels(self, x, y, z, state: CycleState) -> np.ndarray:
        """ACDC labels (0 background, 1 RV cavity, 2 LV myocardium, 3 LV cavity) at heart-frame points.

        Papillary muscles and trabeculations count as LV cavity; the RV free wall and the atria as background.

        Args:
            x, y: ``[P]``; z: ``[P]`` or ``[1]``.
            state: motion scalars ``[T, 1]``.

        Returns:
            uint8 ``[T, P]``.
        """
        return self._label(self._core(x, y, z, state))

    def layers(self, x, y, z, state: CycleState, *, labels: bool = False):
        """Paintable structures (back to front) and, optionally, the ACDC labels at points ``(x, y, z)``.

        Args:
            x, y: heart-frame coordinates ``[P]``.
            z: heart-frame height ``[P]``, or ``[1]`` when all points share it (a short-axis plane).
            state: motion scalars ``[T, 1]``.
            labels: also return :meth:`labels` (computed from the same fields).

        Returns:
            ``(layers, label)``: a list of :class:`Layer` and a uint8 ``[T, P]`` array (``None`` unless
            ``labels``).
        """
        p = self.params
        core = self._core(x, y, z, state)
        cos_t, sin_t, base, tricuspid = core["cos_t"], core["sin_t"], core["base"], core["tricuspid"]
        s_long = (z - state.z_base) / (state.z_endo_apex - state.z_base)
        groove = p.groove_fat * (
            _angular_bump(cos_t, sin_t, p.rv_angle + p.rv_half_width, 0.35)
            + _angular_bump(cos_t, sin_t, p.rv_angle - p.rv_half_width, 0.35)
            + _window(s_long, -1.0, 0.05, 0.2)
        )
        rv_apex = p.rv_apex * p.length + p.rv_wall
        rv_outer = core["rv"] - p.rv_wall * _angular_bump(cos_t, sin_t, p.rv_angle, p.rv_half_width + 0.3)
        envelope = rv_outer - p.fat - groove
        caps = (state.z_base - 5.0 - z, z - p.length - p.fat - 2.0)
        out = [
            Layer("pericardium", (envelope - p.pericardium, *caps)),
            Layer("fat", (envelope, *caps)),
            *self._atria(x, y, z, state, base, tricuspid),
            # The RV lies outside the LV epicardium (without that bound it would also paint the LV's base region).
            Layer("myocardium", (rv_outer, -core["epi"], tricuspid, z - rv_apex)),
            Layer("blood", (core["rv"], -core["epi"], tricuspid, z - rv_apex)),
            # Radii vanish at the apices; the caps keep the ramps from drawing a line along the axis beyond.
            Layer("myocardium", (core["epi"], base, z - p.length)),
            Layer("blood", (core["endo"], base, z - state.z_endo_apex)),
            Layer("myocardium", (self._cavity_muscle(x, y, z, core, s_long, state), core["endo"], base)),
        ]
        return out, (self._label(core) if labels else None)

    def outer_field(self, x, y, z, state: CycleState) -> np.ndarray:
        """Signed field (mm, < 0 inside) of the union of all painted heart structures, ``[T, P]``."""
        outer = None
        for layer in self.layers(x, y, z, state)[0]:
            inside = layer.bounds[0]
            for bound in layer.bounds[1:]:
                inside = np.maximum(inside, bound)
            outer = inside if outer is None else np.minimum(outer, inside)
        return outer

    def _atria(self, x, y, z, state, base, tricuspid) -> list[Layer]:
        p = self.params
        out = []
        ra_rho = p.endo_radius + p.wall + 0.55 * p.rv_width
        centres = (
            (p.la_offset[0], p.la_offset[1], state.z_base - 0.7 * p.la_radii[2], p.la_radii, -base),
            (
                ra_rho * math.cos(p.rv_angle),
                ra_rho * math.sin(p.rv_angle),
                state.z_tricuspid - 0.7 * p.ra_radii[2],
                p.ra_radii,
                -tricuspid,
            ),
        )
        for cx, cy, cz, radii, valve in centres:
            scaled = [r * state.atrial_scale for r in radii]
            norm = np.sqrt(((x - cx) / scaled[0]) ** 2 + ((y - cy) / scaled[1]) ** 2 + ((z - cz) / scaled[2]) ** 2)
            inside = (norm - 1.0) * (sum(radii) / 3.0) * state.atrial_scale  # ≈ signed distance (mm)
            out.append(Layer("myocardium", (inside - 1.5, valve)))
            out.append(Layer("blood", (inside, valve)))
        return out

    def _cavity_muscle(self, x, y, z, core: dict, s_long, state: CycleState) -> np.ndarray:
        """Signed field (mm, < 0 inside) of the two papillary muscles and the trabecular band inside the cavity.

        Evaluated only at points the cavity reaches in some frame (elsewhere +1 m): they are painted inside it.
        """
        p = self.params
        reach = (core["endo"] < 1.0).any(axis=0)
        out = np.full(core["endo"].shape, 1000.0, dtype=core["endo"].dtype)
        if not reach.any():
            return out

        def take(a):
            return a[..., reach] if np.ndim(a) and np.shape(a)[-1] == reach.size else a

        x, y, z, s_long, r_endo, rho = (take(a) for a in (x, y, z, s_long, core["r_endo"], core["rho"]))
        field = None
        for angle in p.papillary_angles:
            c, s = np.array([math.cos(angle)], dtype=x.dtype), np.array([math.sin(angle)], dtype=x.dtype)
            wall = self.lv_surfaces(c, s, z, state, epicardium=False)[0]
            along = np.clip(1.0 - ((s_long - 0.55) / 0.27) ** 2, 0.0, None)
            radius = p.papillary_radius * np.sqrt(along) * (1.0 + 0.3 * state.phi)
            centre = wall - 0.8 * radius
            muscle = np.hypot(x - centre * c, y - centre * s) - radius
            field = muscle if field is None else np.minimum(field, muscle)
        waves = sum(np.cos(kx * x + ky * y + kz * z + ph) for kx, ky, kz, ph in p.trabeculation_waves)
        # Sparse strands (the upper tail of a smooth random field), denser and deeper towards the apex.
        strands = _smoothstep((waves / len(p.trabeculation_waves) - 0.12) / 0.3)
        depth = p.trabeculation * strands * (0.25 + 0.75 * _window(s_long, 0.5, 1.2, 0.3))
        out[:, reach] = np.minimum(field, (r_endo - rho) - depth)
        return out

    # --- exact volumes ---------------------------------------------------------------------------------------

    def _quadrature(self, z_low, z_high, resolution):
        """Midpoint grid in ``(θ, z)``: cos, sin ``[N]``, z ``[K, N]`` and the cell area ``[K, 1]`` (mm²)."""
        n_theta, n_z = resolution
        theta = (np.arange(n_theta) + 0.5) * (2.0 * np.pi / n_theta)
        frac = (np.arange(n_z) + 0.5) / n_z
        cos_t = np.tile(np.cos(theta), n_z)
        sin_t = np.tile(np.sin(theta), n_z)
        z = z_low + (z_high - z_low) * np.repeat(frac, n_theta)[None, :]
        return cos_t, sin_t, z, (z_high - z_low) / n_z * (2.0 * np.pi / n_theta)

    def _lv_volume(self, state: CycleState, epicardium: bool, resolution) -> np.ndarray:
        p = self.params
        reach = 1.6 * (p.endo_radius + p.wall * (1.0 + p.hypertrophy))
        z_high = p.length if epicardium else state.z_endo_apex
        z_low = state.z_base - (abs(p.base_tilt) + abs(p.base_saddle)) * reach
        cos_t, sin_t, z, cell = self._quadrature(z_low, z_high, resolution)
        r_endo, r_epi = self.lv_surfaces(cos_t, sin_t, z, state, epicardium=epicardium)
        radius = r_epi if epicardium else r_endo
        area = _radial_integral(0.0, radius, self.base_slope(cos_t, sin_t), z - state.z_base)
        return area.sum(axis=1) * cell[:, 0] / 1000.0

    def lv_volume_ml(self, state: CycleState | None = None, resolution=_QUADRATURE) -> np.ndarray:
        """Exact LV cavity volume (ml) per state row (default: every frame), papillary muscles included (ACDC)."""
        return self._lv_volume(self.state() if state is None else state, False, resolution)

    def lv_myocardium_ml(self, state: CycleState | None = None, resolution=_QUADRATURE) -> np.ndarray:
        """Exact LV myocardial volume (ml) per state row: epicardial minus cavity volume below the mitral surface."""
        state = self.state() if state is None else state
        return self._lv_volume(state, True, resolution) - self._lv_volume(state, False, resolution)

    def rv_volume_ml(self, state: CycleState | None = None, resolution=_QUADRATURE) -> np.ndarray:
        """Exact RV cavity volume (ml) per state row (default: every frame): the crescent below the tricuspid plane."""
        p = self.params
        state = self.state() if state is None else state
        reach = p.endo_radius + p.wall * (1.0 + p.hypertrophy) + p.rv_width
        z_low = state.z_tricuspid - abs(p.tricuspid_tilt) * reach
        cos_t, sin_t, z, cell = self._quadrature(z_low, p.rv_apex * p.length, resolution)
        _, r_epi = self.lv_surfaces(cos_t, sin_t, z, state)
        outer = r_epi + self.rv_width(cos_t, sin_t, z, state)
        area = _radial_integral(r_epi, outer, self.tricuspid_slope(cos_t, sin_t), z - state.z_tricuspid)
        return area.sum(axis=1) * cell[:, 0] / 1000.0

    # --- landmarks and wall thickness -----------------------------------------------------------------------

    def mitral_hinge(self, angle: float, state: CycleState | None = None) -> np.ndarray:
        """Heart-frame point where the endocardium meets the mitral surface at angle ``angle``, ``[T, 3]``."""
        state = self.state() if state is None else state
        cos_t, sin_t = np.array([math.cos(angle)]), np.array([math.sin(angle)])
        slope = float(self.base_slope(cos_t, sin_t)[0])
        z = state.z_base
        rho = np.zeros_like(z)
        for _ in range(30):  # fixed point ρ = R_endo(θ, z_b + ρ q): a contraction since |q dR/dz| << 1
            rho = self.lv_surfaces(cos_t, sin_t, z, state, epicardium=False)[0]
            z = state.z_base + rho * slope
        return np.concatenate([rho * cos_t, rho * sin_t, z], axis=1)

    def apex(self) -> np.ndarray:
        """Heart-frame epicardial LV apex ``[3]`` (it stays put through the cycle)."""
        return np.array([0.0, 0.0, self.params.length])

    def segments(self) -> dict[str, np.ndarray]:
        """Regional ED wall thickness and systolic endocardial shortening of the 16 AHA segments.

        Rings along ``s`` (0 base, 1 endocardial apex): basal [0.02, 1/3), mid [1/3, 2/3), apical [2/3, 0.92);
        basal and mid rings have six 60° sectors starting at the anterior wall (θ = 60°..120° is segment 0, then
        anticlockwise in θ), the apical ring four 90° sectors starting at θ = 45°. Shortening compares the
        endocardial radius at the same ``s`` at ES and ED (0 = akinetic).

        Returns:
            ``{"thickness_mm": [16], "shortening": [16]}`` (shortening as a fraction).
        """
        ed, es = self.state(np.zeros(1)), self.state(np.ones(1))
        theta = np.radians(np.arange(0.5, 360.0, 1.0))
        thickness, shortening = [], []
        rings = (((0.02, 1 / 3), 60.0, 6), ((1 / 3, 2 / 3), 60.0, 6), ((2 / 3, 0.92), 45.0, 4))
        for (s_low, s_high), first, count in rings:
            s = np.linspace(s_low, s_high, 10)
            cos_t, sin_t = np.cos(np.repeat(theta, s.size)), np.sin(np.repeat(theta, s.size))
            radii = []
            for state in (ed, es):
                z = np.tile((state.z_base + s * (state.z_endo_apex - state.z_base)).ravel(), theta.size)
                radii.append(self.lv_surfaces(cos_t, sin_t, z, state))
            (endo_ed, epi_ed), (endo_es, _) = radii
            thick = (epi_ed - endo_ed).reshape(theta.size, s.size).mean(axis=1)
            short = (1.0 - endo_es / endo_ed).reshape(theta.size, s.size).mean(axis=1)
            sector = ((np.degrees(theta) - first) % 360.0 // (360.0 / count)).astype(int)
            thickness.extend(thick[sector == k].mean() for k in range(count))
            shortening.extend(short[sector == k].mean() for k in range(count))
        return {"thickness_mm": np.asarray(thickness), "shortening": np.asarray(shortening)}


def sample_placement(rng: np.random.Generator, length: float) -> Placement:
    """Draw a realistic heart orientation and position in the chest (RAS).

    The long axis points left, anterior and inferior: 35-55° from the sagittal plane towards the left and 15-35°
    below the horizontal; the RV lies to the right-anterior of the LV (the frame's ``-x``), rolled ±12° about the
    long axis. The LV mid-cavity sits within ±10 mm of the RAS origin (the magnet isocentre).

    Args:
        rng: the subject's generator.
        length: base-to-apex length (mm), to centre the ventricle.

    Returns:
        The placement.
    """
    azimuth = math.radians(rng.uniform(35.0, 55.0))
    elevation = math.radians(rng.uniform(15.0, 35.0))
    long_axis = np.array(
        [-math.sin(azimuth) * math.cos(elevation), math.cos(azimuth) * math.cos(elevation), -math.sin(elevation)]
    )
    towards_rv = np.array([1.0, 0.5, 0.0])
    towards_rv -= (towards_rv @ long_axis) * long_axis
    lateral = -towards_rv / np.linalg.norm(towards_rv)
    roll = math.radians(rng.uniform(-12.0, 12.0))
    lateral = math.cos(roll) * lateral + math.sin(roll) * np.cross(long_axis, lateral)
    rotation = np.stack([lateral, np.cross(long_axis, lateral), long_axis], axis=1)
    centre = rng.uniform(-10.0, 10.0, size=3)
    return Placement(rotation=rotation, origin=centre - 0.5 * length * long_axis)


def _radial_integral(lower, upper, slope, rise) -> np.ndarray:
    """``∫ ρ dρ`` over ``[lower, upper] ∩ {ρ : ρ · slope <= rise}``.

    That is one (θ, z) cell of a ventricle cut by a valve surface ``z = z_valve + ρ · slope(θ)``, with
    ``rise = z - z_valve``.
    """
    slope = np.where(slope == 0.0, 1e-12, slope)
    limit = rise / slope
    high = np.where(slope > 0, np.minimum(upper, limit), upper)
    low = np.where(slope < 0, np.maximum(lower, limit), lower)
    return 0.5 * np.clip(high - low, 0.0, None) * (high + low)


def mitral_slope(params: HeartParams, cos_t: np.ndarray, sin_t: np.ndarray) -> np.ndarray:
    """Slope ``q(θ)`` of the mitral surface ``z = z_b(t) + ρ q(θ)``: a tilt plus a saddle (``cos 2θ``) term.

    Args:
        params: the heart's parameters.
        cos_t, sin_t: ``cos θ``, ``sin θ`` of any shape.

    Returns:
        ``q`` with the shape of ``cos_t``.
    """
    p = params
    cos_tilt = cos_t * math.cos(p.base_tilt_angle) + sin_t * math.sin(p.base_tilt_angle)
    c2, s2 = math.cos(2 * p.base_saddle_angle), math.sin(2 * p.base_saddle_angle)
    cos_saddle = (cos_t * cos_t - sin_t * sin_t) * c2 + 2.0 * cos_t * sin_t * s2
    return p.base_tilt * cos_tilt + p.base_saddle * cos_saddle
