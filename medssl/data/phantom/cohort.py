"""Synthetic cine CMR subjects and cohorts: generate in memory, write NIfTI (+ DICOM), manifest, ensure on disk.

A subject is fully determined by its integer seed (and options): the seed drives the disease group (unless
given), the heart, the body, the acquisition planning, the contrast and the noise. Subject ``i`` of a cohort
with seed ``S`` uses ``numpy.random.SeedSequence([S, i])``, so cohorts with different seeds are disjoint
held-out sets and a cohort of ``N`` subjects is a prefix of the same cohort with more.

On disk (paths in the manifest are relative to it, MONAI decathlon-style)::

    OUT/manifest.json                      written last; absent while a run is incomplete
    OUT/sub-XXXX/sax.nii.gz                uint16 [H, W, S, T]   sax_label.nii.gz uint8 [H, W, S, T]
    OUT/sub-XXXX/lax_2c.nii.gz, lax_4c...  uint16 [H, W, 1, T]   *_label.nii.gz   uint8 [H, W, 1, T]
    OUT/sub-XXXX/metadata.json             exact ground truth (below)
    OUT/sub-XXXX/dicom/{sax,lax_2c,lax_4c}/*.dcm   with ``dicom=True``

NIfTI affines map voxel ``(i, j, k)`` to RAS mm (qform = sform, code 1); zooms are ``(di, dj, dk, frame interval
ms)``. Labels: 0 background, 1 RV cavity, 2 LV myocardium, 3 LV cavity (papillary muscles and trabeculations
included), at slice centres. Each subject folder is written under a temporary name and renamed when complete.

``metadata.json`` holds: ``subject_id``, ``seed``, ``group``, ``generator``, ``options``, ``bsa_m2``,
``num_frames``, ``heart_rate_bpm``, ``frame_interval_ms``, ``trigger_times_ms`` [T], ``ed_frame`` (0),
``es_frame``; exact volumes ``lv_volume_ml`` / ``rv_volume_ml`` [T] (from the analytic surfaces, not voxel
counts), ``lv_edv_ml``, ``lv_esv_ml``, ``lv_sv_ml``, ``lv_ef_pct``, the same for ``rv_``, ``lv_mass_g``
(1.05 g/ml at ED), ``lv_edv_index_ml_m2``, ``rv_edv_index_ml_m2``, ``lv_mass_index_g_m2``,
``segment_thickness_ed_mm`` and ``segment_endocardial_shortening_pct`` (16 AHA segments); ``lv_long_axis_ras``;
``views`` ``{name: {shape, spacing_mm, slice_thickness_mm, affine}}``; and ``landmarks_lax_4c``
``{names: [mitral_hinge_septal, mitral_hinge_lateral, apex], patient_mm: [T][3][3], pixel: [T][3][2]}`` with
pixel coordinates ``(i, j)`` along the first two array axes of the LAX-4C image.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from medssl.data.cohort_files import (
    atomic_folder,
    begin_cohort,
    cohort_lock,
    ensure_cohort_files,
    run_jobs,
    write_manifest,
)
from medssl.data.phantom.anatomy import sample_placement
from medssl.data.phantom.groups import GROUPS, sample_heart
from medssl.data.phantom.render import (
    VIEWS,
    Scene,
    acquire,
    label_volumes_ml,
    plan_views,
    render_view,
    sample_appearance,
)
from medssl.data.phantom.torso import sample_torso
from medssl.errors import DataError, MedsslError

__all__ = [
    "CinePhantom",
    "PhantomOptions",
    "ensure_cohort",
    "generate_subject",
    "is_phantom_cohort",
    "subject_seed",
    "write_cohort",
]

GENERATOR = "medssl.data.phantom"
LANDMARK_NAMES = ("mitral_hinge_septal", "mitral_hinge_lateral", "apex")
_SERIES = {"sax": (10, "cine SAX"), "lax_2c": (20, "cine LAX 2CH"), "lax_4c": (30, "cine LAX 4CH")}
_FRAME_RANGE = (20, 30)
_MAX_FRAMES = 100
# A SAX stack samples the ventricle every 6-10 mm, so LV volumes counted from its labels differ from the exact ones;
# stacks whose label-count EF misses the exact EF by more than this are re-planned (about 1 in 50), which keeps
# every subject's segmentation-derived EF within 2 points of the truth.
_EF_TOLERANCE = 1.5
_MAX_PLANS = 8


@dataclass(frozen=True)
class PhantomOptions:
    """Acquisition switches of a phantom (the imperfections of real cine studies).

    Attributes:
        num_frames: frames per cycle; ``None`` draws 20-30 per subject.
        breath_hold_shift_mm: largest in-plane shift between breath-holds (each SAX slice and LAX series gets a
            random one; 1-5 mm is typical); 0 = off (default).
        missing_apical_slice: drop the most apical SAX slice (default off).
        series_intensity_spread: each series' intensity scaling differs by a factor ``exp(U(-a, a))``; the mild
            default 0.1 mimics per-series scanner scaling.
    """

    num_frames: int | None = None
    breath_hold_shift_mm: float = 0.0
    missing_apical_slice: bool = False
    series_intensity_spread: float = 0.1

    def __post_init__(self) -> None:
        if self.num_frames is not None and not 3 <= int(self.num_frames) <= _MAX_FRAMES:
            raise DataError(f"num_frames must lie in 3..{_MAX_FRAMES} (or None for 20-30), got {self.num_frames}")

    @classmethod
    def from_kwargs(cls, options: dict) -> PhantomOptions:
        """Build from keyword options, rejecting unknown names with the list of valid ones."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise DataError(f"unknown phantom option(s) {unknown}; valid options are {sorted(names)}")
        return cls(**options)


@dataclass(frozen=True)
class CinePhantom:
    """One synthetic subject in memory.

    Attributes:
        sax_image: uint16 ``[H, W, S, T]`` short-axis cine (12-bit values).
        sax_label: uint8 ``[H, W, S, T]`` (0 background, 1 RV cavity, 2 LV myocardium, 3 LV cavity).
        sax_affine: 4x4 NIfTI voxel -> RAS (mm) affine.
        lax_2c_image, lax_4c_image: uint16 ``[H, W, T]`` long-axis cines.
        lax_2c_label, lax_4c_label: uint8 ``[H, W, T]``.
        lax_2c_affine, lax_4c_affine: 4x4 affines of the ``[H, W, 1, T]`` arrays stored on disk.
        metadata: the exact ground truth (see the module docstring of :mod:`medssl.data.phantom`).
    """

    sax_image: np.ndarray
    sax_label: np.ndarray
    sax_affine: np.ndarray
    lax_2c_image: np.ndarray
    lax_2c_label: np.ndarray
    lax_2c_affine: np.ndarray
    lax_4c_image: np.ndarray
    lax_4c_label: np.ndarray
    lax_4c_affine: np.ndarray
    metadata: dict

    def view(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(image, label, affine)`` of view ``name`` as stored on disk: 4-D ``[H, W, S, T]`` (LAX ``S == 1``).

        Raises:
            DataError: for an unknown view.
        """
        if name not in VIEWS:
            raise DataError(f"unknown view {name!r}; choose one of {VIEWS}")
        image, label, affine = (getattr(self, f"{name}_{part}") for part in ("image", "label", "affine"))
        if image.ndim == 3:
            image, label = image[:, :, None, :], label[:, :, None, :]
        return image, label, affine


def subject_seed(cohort_seed: int, index: int) -> int:
    """Seed of subject ``index`` of the cohort with seed ``cohort_seed`` (``SeedSequence([S, i])``, 64 bits)."""
    return int(np.random.SeedSequence([int(cohort_seed), int(index)]).generate_state(1, np.uint64)[0])


def _cohort_group(cohort_seed: int, index: int) -> str:
    """Groups are balanced in consecutive blocks of five, in a seeded random order within each block."""
    order = np.random.default_rng([int(cohort_seed), index // len(GROUPS), 7919]).permutation(len(GROUPS))
    return GROUPS[order[index % len(GROUPS)]]


def _label_ef_error(heart, placement, sax, summary: dict) -> float:
    """|EF from the SAX labels' voxel counts at ED and ES - exact EF| (EF points)."""
    lv = label_volumes_ml(heart, placement, sax, heart.state(np.array([0.0, 1.0]), dtype=np.float32))[:, 2]
    return abs(100.0 * (lv[0] - lv[1]) / lv[0] - summary["lv_ef_pct"])


def _landmarks(scene: Scene, view, frames: int) -> dict:
    """LAX-4C landmarks per frame, in RAS mm as imaged (breath-hold shift included) and in pixel ``(i, j)``."""
    heart, placement = scene.heart, scene.placement
    normal = placement.rotation.T @ view.axes[:, 2]  # plane normal in the heart frame
    direction = np.cross(normal, [0.0, 0.0, 1.0])
    septal = math.atan2(direction[1], direction[0])
    if math.cos(septal - heart.params.rv_angle) < 0:
        septal += math.pi
    points = np.stack(
        [
            heart.mitral_hinge(septal),
            heart.mitral_hinge(septal + math.pi),
            np.broadcast_to(heart.apex(), (frames, 3)),
        ],
        axis=1,
    )  # [T, 3, 3] heart frame
    voxel = view.voxel(placement.to_patient(points))  # k ≈ 0: the plane contains the long axis and both hinges
    imaged = voxel @ (view.axes * np.asarray(view.spacing)).T + view.origin
    return {
        "names": list(LANDMARK_NAMES),
        "pixel_axes": ["i (H, array axis 0)", "j (W, array axis 1)"],
        "patient_mm": np.round(imaged, 4).tolist(),
        "pixel": np.round(voxel[..., :2], 4).tolist(),
    }


def generate_subject(
    seed: int,
    *,
    num_frames: int | None = None,
    group: str | None = None,
    subject_id: str = "sub-0000",
    breath_hold_shift_mm: float = 0.0,
    missing_apical_slice: bool = False,
    series_intensity_spread: float = 0.1,
) -> CinePhantom:
    """Generate one synthetic cine CMR subject (SAX stack, LAX 2C and 4C) with exact ground truth.

    Args:
        seed: the subject's seed (any non-negative integer); equal arguments give identical subjects.
        num_frames: frames per cycle ``T``; ``None`` draws 20-30.
        group: disease group (``"NOR"``, ``"DCM"``, ``"HCM"``, ``"MINF"``, ``"ARV"``); ``None`` draws one.
        subject_id: identifier stored in the metadata.
        breath_hold_shift_mm: see :class:`PhantomOptions`.
        missing_apical_slice: see :class:`PhantomOptions`.
        series_intensity_spread: see :class:`PhantomOptions`.

    Returns:
        The subject; SAX arrays are ``[H, W, S, T]``, LAX ``[H, W, T]``.

    Raises:
        DataError: for a negative seed, an unknown group or out-of-range options.
    """
    if int(seed) < 0:
        raise DataError(f"seed must be a non-negative integer, got {seed}")
    options = PhantomOptions(num_frames, breath_hold_shift_mm, missing_apical_slice, series_intensity_spread)
    if group is not None and group not in GROUPS:
        raise DataError(f"unknown disease group {group!r}; choose one of {GROUPS}")
    rng = np.random.default_rng(int(seed))
    noise_rng = np.random.default_rng([int(seed), 1])
    group = group or GROUPS[int(rng.integers(len(GROUPS)))]
    frames = num_frames or int(rng.integers(_FRAME_RANGE[0], _FRAME_RANGE[1] + 1))
    heart, bsa, summary = sample_heart(rng, group, frames)
    placement = sample_placement(rng, heart.params.length)
    torso = sample_torso(rng, heart, placement)
    appearance = sample_appearance(rng, torso, series_intensity_spread)
    for _ in range(_MAX_PLANS):
        views = plan_views(
            rng,
            heart,
            placement,
            breath_hold_shift_mm=breath_hold_shift_mm,
            missing_apical_slice=missing_apical_slice,
        )
        if missing_apical_slice or _label_ef_error(heart, placement, views["sax"], summary) <= _EF_TOLERANCE:
            break
    scene = Scene(heart, placement, torso, appearance)
    heart_rate = float(rng.uniform(55.0, 85.0) if group in ("NOR", "HCM") else rng.uniform(60.0, 95.0))
    interval = 60000.0 / heart_rate / frames

    arrays = {}
    for name in VIEWS:
        signal, label = render_view(scene, views[name])
        image = acquire(signal, appearance, name, noise_rng)
        arrays[name] = (image.T, label.T) if name == "sax" else (image.T[:, :, 0, :], label.T[:, :, 0, :])

    metadata = {
        "subject_id": subject_id,
        "seed": int(seed),
        "group": group,
        "generator": GENERATOR,
        "options": dataclasses.asdict(options),
        "bsa_m2": round(bsa, 4),
        "num_frames": frames,
        "heart_rate_bpm": round(heart_rate, 3),
        "frame_interval_ms": round(interval, 4),
        "trigger_times_ms": [round(t * interval, 4) for t in range(frames)],
        "ed_frame": 0,
        "es_frame": heart.es_frame,
        **summary,
        "lv_long_axis_ras": placement.long_axis.round(6).tolist(),
        "views": {
            name: {
                "shape": [*view.shape, frames],
                "spacing_mm": [round(float(v), 6) for v in view.spacing],
                "slice_thickness_mm": round(view.thickness, 6),
                "affine": view.affine.round(6).tolist(),
            }
            for name, view in views.items()
        },
        "landmarks_lax_4c": _landmarks(scene, views["lax_4c"], frames),
    }
    return CinePhantom(
        sax_image=arrays["sax"][0],
        sax_label=arrays["sax"][1],
        sax_affine=views["sax"].affine,
        lax_2c_image=arrays["lax_2c"][0],
        lax_2c_label=arrays["lax_2c"][1],
        lax_2c_affine=views["lax_2c"].affine,
        lax_4c_image=arrays["lax_4c"][0],
        lax_4c_label=arrays["lax_4c"][1],
        lax_4c_affine=views["lax_4c"].affine,
        metadata=metadata,
    )


def _save_nifti(array: np.ndarray, affine: np.ndarray, path: Path, frame_interval_ms: float) -> None:
    """Write a ``.nii.gz`` (qform = sform = ``affine``, zooms in mm and ms).

    The gzip stream uses zlib's run-length strategy: on noisy 12-bit magnitudes string matching finds almost
    nothing, so it is 40 % faster than nibabel's default level-1 deflate for 7 % more bytes (and smaller labels);
    the output is ordinary gzip that every NIfTI reader accepts.
    """
    image = nib.Nifti1Image(array, affine)
    image.header.set_xyzt_units("mm", "msec")
    image.header.set_zooms((*np.linalg.norm(affine[:3, :3], axis=0), frame_interval_ms))
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    compressor = zlib.compressobj(1, zlib.DEFLATED, 16 + zlib.MAX_WBITS, 9, zlib.Z_RLE)
    with open(path, "wb") as handle:
        handle.write(compressor.compress(image.to_bytes()))
        handle.write(compressor.flush())


def _entry(subject_id: str, group: str) -> dict:
    entry = {"subject_id": subject_id, "group": group}
    for name in VIEWS:
        entry[name] = f"{subject_id}/{name}.nii.gz"
        entry[f"{name}_label"] = f"{subject_id}/{name}_label.nii.gz"
    entry["metadata"] = f"{subject_id}/metadata.json"
    return entry


def _write_subject(out_dir: Path, index: int, seed: int, group: str, dicom: bool, options: dict) -> dict:
    """Generate subject ``index`` and write it atomically; returns its manifest entry."""
    subject_id = f"sub-{index:04d}"
    phantom = generate_subject(seed, group=group, subject_id=subject_id, **options)
    with atomic_folder(out_dir, subject_id) as staging:
        interval = phantom.metadata["frame_interval_ms"]
        for name in VIEWS:
            image, label, affine = phantom.view(name)
            _save_nifti(image, affine, staging / f"{name}.nii.gz", interval)
            _save_nifti(label, affine, staging / f"{name}_label.nii.gz", interval)
        if dicom:
            _write_dicom(phantom, staging / "dicom")
        (staging / "metadata.json").write_text(json.dumps(phantom.metadata, indent=1))
    return _entry(subject_id, group)


def _write_dicom(phantom: CinePhantom, folder: Path) -> None:
    try:
        from medssl.io.dicom_write import PhantomIdentity, write_mr_cine_series
    except ImportError as error:  # pydicom is an optional extra
        raise MedsslError(f"DICOM export needs the 'dicom' extra (pip install 'medssl[dicom]'): {error}") from error
    meta = phantom.metadata
    identity = PhantomIdentity.for_subject(meta["subject_id"], meta["seed"])
    rr_interval = meta["frame_interval_ms"] * meta["num_frames"]
    for name in VIEWS:
        image, _, affine = phantom.view(name)
        number, description = _SERIES[name]
        write_mr_cine_series(
            image,
            affine,
            folder / name,
            series_description=description,
            series_number=number,
            trigger_times_ms=meta["trigger_times_ms"],
            identity=identity,
            slice_thickness_mm=meta["views"][name]["slice_thickness_mm"],
            nominal_interval_ms=rr_interval,
        )


def write_cohort(
    out_dir: str | os.PathLike,
    num_subjects: int,
    seed: int = 0,
    *,
    dicom: bool = False,
    num_workers: int | None = None,
    progress: bool = True,
    **options,
) -> Path:
    """Generate and write a cohort of synthetic cine CMR subjects; the manifest is written last.

    Args:
        out_dir: output folder (created); an existing manifest is removed first, so an interrupted run never
            looks complete. Existing subject folders are replaced.
        num_subjects: number of subjects ``N`` (>= 1); groups are balanced in blocks of five.
        seed: cohort seed ``S`` (>= 0); subject ``i`` uses ``SeedSequence([S, i])``.
        dicom: also write each view as a DICOM MR series (needs the ``dicom`` extra).
        num_workers: worker processes; ``None`` uses ``min(N, CPU count)``; 1 runs in this process.
        progress: show a tqdm progress bar.
        **options: :class:`PhantomOptions` fields (``num_frames``, ``breath_hold_shift_mm``,
            ``missing_apical_slice``, ``series_intensity_spread``).

    Returns:
        Path of ``manifest.json``.

    Raises:
        DataError: for ``num_subjects < 1``, a negative seed or ``num_workers``, or an unknown option.
    """
    if int(num_subjects) < 1:
        raise DataError(f"num_subjects must be >= 1, got {num_subjects}")
    if int(seed) < 0:
        raise DataError(f"seed must be a non-negative integer, got {seed}")
    if num_workers is not None and int(num_workers) < 1:
        raise DataError(f"num_workers must be >= 1 (or None for one per CPU), got {num_workers}")
    options = dataclasses.asdict(PhantomOptions.from_kwargs(options))
    out_dir = Path(out_dir)
    with cohort_lock(out_dir):
        return _write_cohort_locked(out_dir, int(num_subjects), int(seed), bool(dicom), num_workers, progress, options)


def _write_cohort_locked(
    out_dir: Path, num_subjects: int, seed: int, dicom: bool, num_workers: int | None, progress: bool, options: dict
) -> Path:
    manifest_path = begin_cohort(out_dir, "sub-")
    jobs = [(out_dir, i, subject_seed(seed, i), _cohort_group(seed, i), dicom, options) for i in range(num_subjects)]
    entries = run_jobs(_write_subject, jobs, num_workers=num_workers, desc="phantom cohort", unit="subject",
                       progress=progress)
    manifest = {
        "description": (
            f"Synthetic cine CMR cohort ({num_subjects} subjects, seed {seed}): SAX stack and LAX 2C/4C cines "
            "with ACDC labels (0 background, 1 RV cavity, 2 LV myocardium, 3 LV cavity), exact volumes and "
            f"disease groups {'/'.join(GROUPS)}."
        ),
        "generator": GENERATOR,
        "seed": seed,
        "num_subjects": num_subjects,
        "training": entries,
    }
    return write_manifest(manifest_path, manifest)


def _cohort_matches(manifest_path: Path, num_subjects: int, seed: int, dicom: bool, options: dict) -> bool:
    try:
        manifest = json.loads(manifest_path.read_text())
        entries = manifest["training"]
        if (manifest.get("generator"), manifest.get("seed"), manifest.get("num_subjects"), len(entries)) != (
            GENERATOR,
            seed,
            num_subjects,
            num_subjects,
        ):
            return False
        root = manifest_path.parent
        for entry in entries:
            if not all((root / entry[key]).is_file() for key in entry if key not in ("subject_id", "group")):
                return False
            if dicom and not all((root / entry["subject_id"] / "dicom" / name).is_dir() for name in VIEWS):
                return False
        first = json.loads((root / entries[0]["metadata"]).read_text())
        return first.get("options") == options
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return False


def ensure_cohort(out_dir: str | os.PathLike, num_subjects: int, seed: int = 0, **kw) -> Path:
    """Return the manifest of the cohort in ``out_dir``, generating it unless a matching one is complete.

    A cohort matches when its manifest names the same generator, seed and subject count, every listed file
    exists (and the DICOM folders, with ``dicom=True``), and its options equal the requested ones.

    Args:
        out_dir: cohort folder.
        num_subjects: number of subjects.
        seed: cohort seed.
        **kw: :func:`write_cohort` keywords (``dicom``, ``num_workers``, ``progress`` and phantom options).

    Returns:
        Path of ``manifest.json``.

    Raises:
        DataError: as :func:`write_cohort`.
    """
    dicom = bool(kw.pop("dicom", False))
    num_workers, progress = kw.pop("num_workers", None), kw.pop("progress", True)
    options = dataclasses.asdict(PhantomOptions.from_kwargs(kw))
    return ensure_cohort_files(
        out_dir,
        lambda path: _cohort_matches(path, int(num_subjects), int(seed), dicom, options),
        lambda folder: _write_cohort_locked(folder, int(num_subjects), int(seed), dicom, num_workers, progress, options),
    )


def is_phantom_cohort(source: str | os.PathLike | None) -> bool:
    """Whether training data is synthetic: ``None`` (the bundles then generate a phantom cohort) or a cohort folder
    (or its ``manifest.json``) written by this generator.

    Bundles record it with their trained model, so that whoever applies the model learns that it has seen
    synthetic images only (``medssl analyze`` says so on its report).

    Args:
        source: a bundle's ``dataset_dir``: a folder, a manifest path, or None.

    Returns:
        True for generated phantom data; False for anything else, including unreadable manifests.
    """
    if source is None:
        return True
    manifest = Path(source) / "manifest.json" if Path(source).is_dir() else Path(source)
    try:
        return json.loads(manifest.read_text()).get("generator") == GENERATOR
    except (OSError, ValueError, AttributeError):
        return False
