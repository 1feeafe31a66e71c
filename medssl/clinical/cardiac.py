"""Ventricular volumes, ejection fraction and LV mass from short-axis (SAX) cine segmentations.

Volumes come from Simpson's method of discs on the SAX stack, the clinical standard (Schulz-Menger et al., 2020,
"Standardized image interpretation and post-processing in cardiovascular magnetic resonance - 2020 update", JCMR,
https://doi.org/10.1186/s12968-020-00610-6) and the way the ACDC challenge derives its reference values (Bernard et al.,
2018, "Deep learning techniques for automatic MRI cardiac multi-structures segmentation and diagnosis: is the problem
solved?", IEEE TMI 37(11), https://doi.org/10.1109/TMI.2018.2837502): every slice is a disc whose area is its labelled
pixel area and whose height is the slice spacing, so a structure's volume is

    V [ml] = N_voxels * dx * dy * dz / 1000        (1 ml = 1000 mm^3)

with ``dx, dy`` the in-plane pixel spacing and ``dz`` the centre-to-centre slice spacing (slice thickness plus gap), all
in mm. From the per-frame LV cavity curve, end-diastole (ED) is the frame of maximal and end-systole (ES) the frame of
minimal volume; then

    SV = EDV - ESV [ml],    EF = 100 * SV / EDV [%],    LV mass = 1.05 g/ml * V_myocardium(ED) [g].

The RV uses the LV's ED and ES frames, as ACDC does (one ED and one ES frame per subject). Label ids follow ACDC:
0 background, 1 RV cavity, 2 LV myocardium, 3 LV cavity (papillary muscles and trabeculations inside the cavity count
as cavity).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from medssl.errors import DataError

__all__ = [
    "MYOCARDIAL_DENSITY_G_PER_ML",
    "PLAUSIBLE_EF_RANGE_PCT",
    "VolumeCurves",
    "CardiacFunction",
    "ventricular_volumes",
    "cardiac_function",
    "ejection_fraction",
]

MYOCARDIAL_DENSITY_G_PER_ML = 1.05
"""Specific density of myocardium used to turn myocardial volume into LV mass (SCMR 2020; ACDC)."""

PLAUSIBLE_EF_RANGE_PCT = (5.0, 90.0)
"""Ejection fractions outside this range (in %) are flagged as implausible: almost always a segmentation or
ED/ES-frame error rather than physiology."""

_MM3_PER_ML = 1000.0
_MAX_IDS_IN_MESSAGE = 10


def _as_numpy(value: object) -> np.ndarray:
    """A numpy view of a numpy array, torch tensor (any device) or nested sequence."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


@dataclass(frozen=True)
class VolumeCurves:
    """Per-frame volumes of the cardiac structures of one SAX cine, in ml.

    Build it with :func:`ventricular_volumes`, or by hand from volume curves measured elsewhere.

    Attributes:
        lv_cavity_ml: ``[T]`` LV cavity (blood pool) volume per frame.
        rv_cavity_ml: ``[T]`` RV cavity volume per frame.
        lv_myocardium_ml: ``[T]`` LV myocardium volume per frame.
        lv_cavity_slice_ml: ``[S, T]`` LV cavity volume per slice (in stack order) and frame, used to check that the
            stack covers the whole LV; ``None`` when unknown (the coverage check is then skipped).

    Raises:
        DataError: when a curve is empty or not 1-D, the curves differ in length, a value is negative or not
            finite, or ``lv_cavity_slice_ml`` is not a non-empty ``[S, T]`` with the curves' ``T``.
    """

    lv_cavity_ml: np.ndarray
    rv_cavity_ml: np.ndarray
    lv_myocardium_ml: np.ndarray
    lv_cavity_slice_ml: np.ndarray | None = None

    def __post_init__(self) -> None:
        lengths = {}
        for field in ("lv_cavity_ml", "rv_cavity_ml", "lv_myocardium_ml", "lv_cavity_slice_ml"):
            raw = getattr(self, field)
            if raw is None:
                continue
            values = _as_numpy(raw).astype(np.float64)
            expected_ndim = 2 if field == "lv_cavity_slice_ml" else 1
            if values.ndim != expected_ndim or values.size == 0:
                raise DataError(
                    f"VolumeCurves.{field} must be a non-empty {expected_ndim}-D array, got shape {values.shape}."
                )
            if not np.isfinite(values).all() or (values < 0).any():
                raise DataError(
                    f"VolumeCurves.{field} must hold finite, non-negative volumes in ml; got min {np.min(values)} "
                    f"and {int(np.sum(~np.isfinite(values)))} non-finite value(s)."
                )
            lengths[field] = values.shape[-1]
            # The dataclass is frozen so that curves cannot drift from the checks above; this is its constructor.
            object.__setattr__(self, field, values)
        if len(set(lengths.values())) != 1:
            raise DataError(f"VolumeCurves needs the same number of frames T in every curve, got {lengths}.")

    @property
    def num_frames(self) -> int:
        """Number of frames ``T``."""
        return int(self.lv_cavity_ml.shape[0])

    def to_dict(self) -> dict[str, list]:
        """The curves as plain (JSON-serialisable) lists, keyed by field name; ``lv_cavity_slice_ml`` is ``[S][T]``
        or ``None``."""
        return {f.name: None if (v := getattr(self, f.name)) is None else v.tolist() for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class CardiacFunction:
    """Global LV and RV function of one cine, from :func:`cardiac_function`.

    Volumes are in ml, stroke volumes in ml, ejection fractions in %, mass in g; indexed values are divided by the body
    surface area (ml/m^2, g/m^2). A value that cannot be measured (no LV labelled, ED == ES, no BSA given, ...) is NaN,
    and ``flags`` says why.

    Attributes:
        ed_frame: end-diastolic frame index (maximal LV cavity volume unless given).
        es_frame: end-systolic frame index (minimal LV cavity volume unless given).
        lv_edv_ml, lv_esv_ml, lv_sv_ml, lv_ef_pct: LV end-diastolic, end-systolic and stroke volume, ejection fraction.
        rv_edv_ml, rv_esv_ml, rv_sv_ml, rv_ef_pct: the same for the RV, at the LV's ED and ES frames.
        lv_mass_g: LV myocardial mass at ED (1.05 g/ml).
        bsa_m2: body surface area used for indexing, or ``None``.
        lv_edv_index_ml_m2, lv_esv_index_ml_m2, lv_sv_index_ml_m2, rv_edv_index_ml_m2, rv_esv_index_ml_m2,
        rv_sv_index_ml_m2, lv_mass_index_g_m2: the values above divided by ``bsa_m2`` (NaN without a BSA).
        flags: human-readable plausibility warnings; empty when nothing looks wrong.
    """

    ed_frame: int
    es_frame: int
    lv_edv_ml: float
    lv_esv_ml: float
    lv_sv_ml: float
    lv_ef_pct: float
    rv_edv_ml: float
    rv_esv_ml: float
    rv_sv_ml: float
    rv_ef_pct: float
    lv_mass_g: float
    bsa_m2: float | None = None
    lv_edv_index_ml_m2: float = math.nan
    lv_esv_index_ml_m2: float = math.nan
    lv_sv_index_ml_m2: float = math.nan
    rv_edv_index_ml_m2: float = math.nan
    rv_esv_index_ml_m2: float = math.nan
    rv_sv_index_ml_m2: float = math.nan
    lv_mass_index_g_m2: float = math.nan
    flags: list[str] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, float | int | list[str] | None]:
        """A flat, JSON-serialisable dict of every field; NaN (not measurable) becomes ``None``."""
        return {
            key: None if isinstance(value, float) and math.isnan(value) else value
            for key, value in dataclasses.asdict(self).items()
        }


def ejection_fraction(edv: object, esv: object) -> float | np.ndarray:
    """Ejection fraction ``EF = 100 * (EDV - ESV) / EDV`` in %.

    Args:
        edv: end-diastolic volume(s) in ml; a number, or an array/tensor of any shape.
        esv: end-systolic volume(s) in ml, broadcastable with ``edv``.

    Returns:
        The EF in % (a float for scalar inputs, else a float64 array of the broadcast shape). It is negative when
        ``esv > edv``, which :func:`cardiac_function` flags as implausible rather than rejecting.

    Raises:
        DataError: when a volume is not finite, ``edv <= 0`` or ``esv < 0``, or the shapes do not broadcast.
    """
    edv_arr = _as_numpy(edv).astype(np.float64)
    esv_arr = _as_numpy(esv).astype(np.float64)
    try:
        edv_arr, esv_arr = np.broadcast_arrays(edv_arr, esv_arr)
    except ValueError as err:
        raise DataError(f"edv and esv shapes do not broadcast: {edv_arr.shape} vs {esv_arr.shape}.") from err
    if not (np.isfinite(edv_arr).all() and np.isfinite(esv_arr).all()):
        raise DataError("ejection_fraction got a NaN or infinite volume.")
    if (edv_arr <= 0).any():
        raise DataError(f"EDV must be > 0 ml, got {edv_arr[edv_arr <= 0].ravel()[:5].tolist()}.")
    if (esv_arr < 0).any():
        raise DataError(f"ESV must be >= 0 ml, got {esv_arr[esv_arr < 0].ravel()[:5].tolist()}.")
    ef = 100.0 * (edv_arr - esv_arr) / edv_arr
    return float(ef) if ef.ndim == 0 else ef


def _check_spacing(spacing_mm: object) -> tuple[float, float, float]:
    spacing = _as_numpy(spacing_mm).astype(np.float64).ravel()
    if spacing.shape != (3,):
        hint = (
            " (a 4-D NIfTI header's zooms end with the frame interval: pass only the three spatial spacings)"
            if spacing.size == 4
            else ""
        )
        raise DataError(f"spacing_mm must be (dx, dy, dz) in mm, got {spacing.size} value(s) {spacing.tolist()}{hint}.")
    if not np.isfinite(spacing).all() or (spacing <= 0).any():
        raise DataError(f"spacing_mm must be three finite values > 0 mm, got {spacing.tolist()}.")
    return float(spacing[0]), float(spacing[1]), float(spacing[2])


def _check_labels(labels: np.ndarray, ids: Sequence[int]) -> np.ndarray:
    """``labels`` as ``[H, W, S, T]`` after checking shape, dtype and that every voxel holds one of ``ids``."""
    if labels.ndim not in (3, 4):
        hint = " (drop the channel axis of a [C, H, W, S, T] tensor first)" if labels.ndim == 5 else ""
        raise DataError(
            f"labels must be a SAX label map [H, W, S, T] (cine) or [H, W, S] (one frame), got shape "
            f"{tuple(labels.shape)}{hint}."
        )
    if labels.size == 0:
        raise DataError(f"labels are empty, shape {tuple(labels.shape)}.")
    if not (np.issubdtype(labels.dtype, np.integer) or np.issubdtype(labels.dtype, np.floating)):
        # bool lands here too: a binary mask does not say which structure it is.
        raise DataError(f"labels must hold integer label ids (integer or float dtype), got dtype {labels.dtype}.")
    if np.issubdtype(labels.dtype, np.floating):
        num_nan = int(np.isnan(labels).sum())
        if num_nan:
            raise DataError(f"labels contain {num_nan} NaN voxel(s); expected label ids {sorted(ids)} only.")
    unexpected = labels[~np.isin(labels, ids)]
    if unexpected.size:
        values, counts = np.unique(unexpected, return_counts=True)
        order = np.argsort(-counts, kind="stable")[:_MAX_IDS_IN_MESSAGE]
        listed = ", ".join(f"{values[i].item():g} ({counts[i]} voxel{'' if counts[i] == 1 else 's'})" for i in order)
        more = f" and {values.size - order.size} more" if values.size > order.size else ""
        raise DataError(
            f"labels contain {values.size} unexpected id(s): {listed}{more}; expected only {sorted(ids)} "
            "(ACDC: 0 background, 1 RV cavity, 2 LV myocardium, 3 LV cavity). For another label convention pass "
            "rv_label, myo_label and lv_label."
        )
    return labels if labels.ndim == 4 else labels[..., None]


def ventricular_volumes(
    labels: np.ndarray | torch.Tensor,
    spacing_mm: Sequence[float] | np.ndarray | torch.Tensor,
    *,
    rv_label: int = 1,
    myo_label: int = 2,
    lv_label: int = 3,
) -> VolumeCurves:
    """Per-frame LV cavity, RV cavity and LV myocardium volumes of a SAX cine segmentation by Simpson's method of
    discs (voxel counting times voxel volume; see the module docstring and Bernard et al., 2018,
    https://doi.org/10.1109/TMI.2018.2837502).

    Args:
        labels: ``[H, W, S, T]`` SAX cine label map (``S`` slices, ``T`` frames) or ``[H, W, S]`` for one frame;
            integer ids (a float array of whole numbers, such as a MONAI label tensor, is accepted). numpy or torch.
        spacing_mm: ``(dx, dy, dz)`` in mm: in-plane pixel spacing along H and W, and the slice spacing centre to
            centre (slice thickness plus gap), not the slice thickness.
        rv_label: id of the RV cavity (ACDC: 1).
        myo_label: id of the LV myocardium (ACDC: 2).
        lv_label: id of the LV cavity (ACDC: 3).

    Returns:
        :class:`VolumeCurves` with ``[T]`` curves in ml (``T = 1`` for a single frame) and the ``[S, T]`` per-slice LV
        cavity volumes.

    Raises:
        DataError: when ``labels`` is not 3-D or 4-D, is empty, boolean, contains NaNs or ids other than background and
            the three structure ids (the message lists them with their voxel counts); when ``spacing_mm`` is not three
            finite values > 0; when the three structure ids are not distinct, non-zero integers.
    """
    structure_ids = (rv_label, myo_label, lv_label)
    integer_ids = all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in structure_ids)
    if not integer_ids or len(set(structure_ids)) != 3 or 0 in structure_ids:
        raise DataError(
            "rv_label, myo_label and lv_label must be distinct non-zero integers (0 is background), "
            f"got {structure_ids}."
        )
    spacing = _check_spacing(spacing_mm)
    label_map = _check_labels(_as_numpy(labels), (0, *structure_ids))
    ml_per_voxel = math.prod(spacing) / _MM3_PER_ML
    slice_ml = {i: (label_map == i).sum(axis=(0, 1)) * ml_per_voxel for i in structure_ids}  # each [S, T]
    return VolumeCurves(
        lv_cavity_ml=slice_ml[lv_label].sum(axis=0),
        rv_cavity_ml=slice_ml[rv_label].sum(axis=0),
        lv_myocardium_ml=slice_ml[myo_label].sum(axis=0),
        lv_cavity_slice_ml=slice_ml[lv_label],
    )


def _check_frame(name: str, frame: object, num_frames: int) -> int:
    if isinstance(frame, bool) or not isinstance(frame, (int, np.integer)) or not 0 <= frame < num_frames:
        raise DataError(f"{name} must be a frame index in [0, {num_frames - 1}], got {frame!r}.")
    return int(frame)


def _ventricle(curve: np.ndarray, ed_frame: int, es_frame: int) -> tuple[float, float, float, float]:
    """``(EDV, ESV, SV, EF)`` of one ventricle; ESV, SV and EF are NaN when ED == ES, all NaN when it is unlabelled."""
    edv, esv = float(curve[ed_frame]), float(curve[es_frame])
    if not curve.any() or edv == 0:
        return math.nan, math.nan, math.nan, math.nan
    if ed_frame == es_frame:
        return edv, math.nan, math.nan, math.nan
    return edv, esv, edv - esv, float(ejection_fraction(edv, esv))


def _coverage_flag(lv_cavity_slice_ml: np.ndarray, ed_frame: int) -> str | None:
    """A warning when the LV cavity reaches the first or last slice at ED (the stack may cut off base or apex)."""
    at_ed = lv_cavity_slice_ml[:, ed_frame]
    last = at_ed.shape[0] - 1
    ends = {0: "first", last: "last"} if last > 0 else {0: "only"}
    touched = [
        f"the {name} slice (index {index}, {at_ed[index]:.1f} ml)" for index, name in ends.items() if at_ed[index] > 0
    ]
    if not touched:
        return None
    return (
        f"LV cavity is labelled in {' and '.join(touched)} at ED: the stack may not cover the whole ventricle "
        "(base or apex cut off), so LV volumes may be underestimated."
    )


def cardiac_function(
    curves: VolumeCurves,
    *,
    ed_frame: int | None = None,
    es_frame: int | None = None,
    bsa_m2: float | None = None,
) -> CardiacFunction:
    """LV and RV end-diastolic/end-systolic/stroke volumes, ejection fractions and LV mass, with plausibility flags.

    ED is the frame of maximal, ES the frame of minimal LV cavity volume (the first such frame on ties), unless
    given; the RV is measured at the same frames, as in ACDC (Bernard et al., 2018,
    https://doi.org/10.1109/TMI.2018.2837502). ``EF = 100 (EDV - ESV) / EDV`` in %; LV mass = 1.05 g/ml x LV myocardial
    volume at ED, in g (Schulz-Menger et al., 2020, https://doi.org/10.1186/s12968-020-00610-6).

    ``flags`` warns, in plain words, when: the segmentation is empty; the LV cavity, RV cavity or LV myocardium (at ED)
    is unlabelled; ED and ES are the same frame; an EF lies outside :data:`PLAUSIBLE_EF_RANGE_PCT` (5-90 %); the LV
    cavity reaches the first or last slice of the stack at ED (incomplete coverage).

    Args:
        curves: per-frame volumes from :func:`ventricular_volumes` (or built by hand).
        ed_frame: end-diastolic frame index in ``[0, T)``, e.g. from the DICOM trigger times; default: LV maximum.
        es_frame: end-systolic frame index in ``[0, T)``; default: LV minimum.
        bsa_m2: body surface area in m^2 to index volumes and mass by; ``None`` leaves the indexed values NaN.

    Returns:
        :class:`CardiacFunction`; unmeasurable values are NaN and explained in ``flags``.

    Raises:
        DataError: when ``curves`` is not a :class:`VolumeCurves`, a frame index is out of range or not an integer, or
            ``bsa_m2`` is not a finite number > 0.
    """
    if not isinstance(curves, VolumeCurves):
        raise DataError(
            f"cardiac_function expects VolumeCurves (see ventricular_volumes), got {type(curves).__name__}."
        )
    is_number = isinstance(bsa_m2, (int, float, np.number)) and not isinstance(bsa_m2, bool)
    valid_bsa = is_number and math.isfinite(bsa_m2) and bsa_m2 > 0
    if bsa_m2 is not None and not valid_bsa:
        raise DataError(f"bsa_m2 must be a finite body surface area > 0 m^2, got {bsa_m2!r}.")
    num_frames = curves.num_frames
    lv = curves.lv_cavity_ml
    ed = int(np.argmax(lv)) if ed_frame is None else _check_frame("ed_frame", ed_frame, num_frames)
    es = int(np.argmin(lv)) if es_frame is None else _check_frame("es_frame", es_frame, num_frames)

    lv_edv, lv_esv, lv_sv, lv_ef = _ventricle(lv, ed, es)
    rv_edv, rv_esv, rv_sv, rv_ef = _ventricle(curves.rv_cavity_ml, ed, es)
    myo_ed = float(curves.lv_myocardium_ml[ed])
    lv_mass = MYOCARDIAL_DENSITY_G_PER_ML * myo_ed if myo_ed > 0 else math.nan

    flags = []
    if not (lv.any() or curves.rv_cavity_ml.any() or curves.lv_myocardium_ml.any()):
        flags.append(
            "The segmentation is empty (no RV, LV myocardium or LV cavity voxel in any frame): nothing can be measured."
        )
    else:
        for name, curve in (("LV cavity", lv), ("RV cavity", curves.rv_cavity_ml)):
            if not curve.any():
                flags.append(f"No {name} is labelled in any frame: its volumes and EF are undefined.")
            elif curve[ed] == 0:
                flags.append(f"No {name} is labelled at ED (frame {ed}): its volumes and EF are undefined.")
        if myo_ed == 0:
            flags.append(f"No LV myocardium is labelled at ED (frame {ed}): LV mass is undefined.")
        if ed == es and lv.any():
            flags.append(
                f"ED and ES are the same frame ({ed}): ESV, SV and EF are undefined (a single frame or a flat LV "
                "volume curve cannot measure function)."
            )
        low, high = PLAUSIBLE_EF_RANGE_PCT
        for name, ef in (("LV", lv_ef), ("RV", rv_ef)):
            if math.isfinite(ef) and not low <= ef <= high:
                flags.append(
                    f"{name} EF {ef:.1f} % is outside the plausible range {low:g}-{high:g} %: check the segmentation "
                    "and the ED/ES frames."
                )
        if curves.lv_cavity_slice_ml is not None and lv[ed] > 0:
            coverage = _coverage_flag(curves.lv_cavity_slice_ml, ed)
            if coverage:
                flags.append(coverage)

    indexed = {}
    if bsa_m2 is not None:
        indexed = {
            "lv_edv_index_ml_m2": lv_edv / bsa_m2,
            "lv_esv_index_ml_m2": lv_esv / bsa_m2,
            "lv_sv_index_ml_m2": lv_sv / bsa_m2,
            "rv_edv_index_ml_m2": rv_edv / bsa_m2,
            "rv_esv_index_ml_m2": rv_esv / bsa_m2,
            "rv_sv_index_ml_m2": rv_sv / bsa_m2,
            "lv_mass_index_g_m2": lv_mass / bsa_m2,
        }
    return CardiacFunction(
        ed_frame=ed,
        es_frame=es,
        lv_edv_ml=lv_edv,
        lv_esv_ml=lv_esv,
        lv_sv_ml=lv_sv,
        lv_ef_pct=lv_ef,
        rv_edv_ml=rv_edv,
        rv_esv_ml=rv_esv,
        rv_sv_ml=rv_sv,
        rv_ef_pct=rv_ef,
        lv_mass_g=lv_mass,
        bsa_m2=None if bsa_m2 is None else float(bsa_m2),
        flags=flags,
        **indexed,
    )
