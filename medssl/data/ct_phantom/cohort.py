"""Synthetic chest CT cohorts on disk: axial slices or nodule-candidate patches (2D) or small volumes (3D) in HU
with an exact nodule class.

Layout (paths in the manifest are relative to it, MONAI decathlon-style)::

    OUT/manifest.json              written last; absent while a run is incomplete
    OUT/img-XXXXX/image.nii.gz     int16 HU, [H, W] (2D, slice thickness in the affine) or [H, W, D] (3D)
    OUT/img-XXXXX/metadata.json    ground truth: class, nodule centre / diameter / HU (patient frame), noise levels,
                                   geometry, patch centre (scanner frame)

``training`` and ``test`` entries carry ``image``, ``metadata``, ``label`` (class index in
:data:`~medssl.data.ct_phantom.scene.CT_CLASSES`) and ``class`` (its name). Classes are balanced in consecutive
blocks of three, in a seeded random order within each block. Image ``i`` of the training split of a cohort with
seed ``S`` uses :func:`medssl.data.phantom.subject_seed` ``(S, i)``, test image ``i`` that of ``(S, 1_000_000 + i)``,
so a smaller cohort is a prefix of a larger one and the splits never share a patient. Each image folder is written
under a temporary name and renamed when complete; writers of one folder are serialised by a lock.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from medssl.data.ct_phantom.scene import CT_CLASSES, CTImage, candidate_centre, render_scene, sample_scene
from medssl.data.cohort_files import (
    atomic_folder,
    begin_cohort,
    cohort_lock,
    cohort_settings,
    ensure_cohort_files,
    manifest_matches,
    run_jobs,
    write_manifest,
)
from medssl.data.phantom.cohort import subject_seed
from medssl.errors import DataError

__all__ = ["GENERATOR", "generate_ct_image", "write_ct_cohort", "ensure_ct_cohort", "load_ct_datalist"]

GENERATOR = "medssl.data.ct_phantom"
_TEST_OFFSET = 1_000_000
_FOV_MM = 384.0
_SLICE_MM = 2.5
_IMAGES_PER_WORKER = 24
_DEFAULTS = {"dims": 2, "size": 128, "depth": None, "num_test": 0, "patch_mm": None}
# A candidate patch's centre lands within this fraction of its width of the candidate (each axis).
_JITTER_FRACTION = 0.125


def _check_geometry(dims: int, size: int, depth: int | None, patch_mm: float | None = None) -> tuple[int, ...]:
    """The image shape of ``dims``/``size``/``depth``; raises DataError for unsupported values."""
    if patch_mm is not None and (isinstance(patch_mm, bool) or not isinstance(patch_mm, (int, float))
                                 or not 16 <= patch_mm <= _FOV_MM):
        raise DataError(f"patch_mm must be None (the whole {_FOV_MM:g} mm slice) or a width in 16..{_FOV_MM:g} mm, "
                        f"got {patch_mm!r}.")
    if dims not in (2, 3):
        raise DataError(f"dims must be 2 (axial slices) or 3 (volumes), got {dims!r}.")
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 16 <= size <= 512:
        raise DataError(f"size must be an integer in 16..512 pixels, got {size!r}.")
    if dims == 2:
        return int(size), int(size)
    depth = int(size) // 2 if depth is None else depth
    if isinstance(depth, bool) or not isinstance(depth, (int, np.integer)) or not 8 <= depth <= 512:
        raise DataError(f"depth must be an integer in 8..512 slices (or None for size // 2), got {depth!r}.")
    return int(size), int(size), int(depth)


def generate_ct_image(
    seed: int, label: int, dims: int = 2, size: int = 128, depth: int | None = None, patch_mm: float | None = None
) -> CTImage:
    """Generate one synthetic chest CT image with an exact class.

    The field of view is the whole 384 mm slice, or with ``patch_mm`` a square nodule-candidate patch that wide (as
    a detector's false-positive reduction stage sees it: centred near the nodule, or near a vessel cut by the plane
    when there is none; see :func:`~medssl.data.ct_phantom.scene.candidate_centre`). A slice is 2.5 mm thick, a
    volume has isotropic voxels.

    Args:
        seed: the image's seed (>= 0); equal arguments give identical images.
        label: class index in :data:`~medssl.data.ct_phantom.scene.CT_CLASSES` (0 none, 1 solid, 2 ground glass).
        dims: 2 for an axial slice ``[size, size]``, 3 for a volume ``[size, size, depth]``.
        size: in-plane pixels (16..512).
        depth: slices of a volume; None: ``size // 2``.
        patch_mm: None for the whole slice, else the width of a candidate patch in mm (16..384).

    Returns:
        the image in HU (int16), its tissue map, affine, label and ground truth metadata.

    Raises:
        DataError: for a negative seed, an unknown label or geometry outside the ranges above.
    """
    if int(seed) < 0:
        raise DataError(f"seed must be a non-negative integer, got {seed}.")
    shape = _check_geometry(dims, size, depth, patch_mm)
    rng = np.random.default_rng(int(seed))
    scene = sample_scene(rng, label)
    centre = (0.0, 0.0) if patch_mm is None else candidate_centre(scene, rng, jitter_mm=_JITTER_FRACTION * patch_mm)
    step = (_FOV_MM if patch_mm is None else float(patch_mm)) / shape[0]
    spacing = (step, step, _SLICE_MM if dims == 2 else step)
    supersample = (2, 2, 3) if dims == 2 else (2, 2, 2)
    hu, tissues, affine, info = render_scene(scene, rng, shape, spacing, supersample=supersample, centre_xy=centre)
    image = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    nodule = None
    if scene.nodule is not None:
        nodule = {key: ([round(v, 3) for v in value] if isinstance(value, list) else value)
                  for key, value in scene.nodule.items()}
        nodule["diameter_mm"] = round(nodule["diameter_mm"], 3)
        nodule["hu"] = round(nodule["hu"], 2)
    metadata = {
        "seed": int(seed),
        "generator": GENERATOR,
        "label": int(label),
        "class": CT_CLASSES[label],
        "nodule": nodule,
        "dims": dims,
        "shape": list(shape),
        "spacing_mm": [round(s, 6) for s in spacing],
        "patch_centre_mm": None if patch_mm is None else [round(v, 3) for v in centre],
        "body_semi_axes_mm": [round(v, 2) for v in scene.body],
        **info,
    }
    return CTImage(image=image, tissues=tissues, affine=affine, label=int(label), metadata=metadata)


def _class_of(seed: int, index: int) -> int:
    order = np.random.default_rng([int(seed), index // len(CT_CLASSES), 104729]).permutation(len(CT_CLASSES))
    return int(order[index % len(CT_CLASSES)])


def _write_image(out_dir: Path, name: str, seed: int, label: int, dims: int, size: int, depth: int | None,
                 patch_mm: float | None) -> dict:
    """Generate one image and write its folder atomically; returns its manifest entry."""
    ct = generate_ct_image(seed, label, dims, size, depth, patch_mm)
    with atomic_folder(out_dir, name) as staging:
        image = nib.Nifti1Image(ct.image, ct.affine)
        image.set_qform(ct.affine, code=1)
        image.set_sform(ct.affine, code=1)
        image.header.set_xyzt_units("mm")
        nib.save(image, staging / "image.nii.gz")
        (staging / "metadata.json").write_text(json.dumps(ct.metadata, indent=1))
    return {"image": f"{name}/image.nii.gz", "metadata": f"{name}/metadata.json", "label": ct.label,
            "class": CT_CLASSES[ct.label]}


def _validated(num_images, seed, dims, size, depth, num_test, num_workers, patch_mm) -> dict:
    if isinstance(num_images, bool) or int(num_images) < 1 or int(num_test) < 0:
        raise DataError(f"need num_images >= 1 and num_test >= 0, got {num_images} and {num_test}.")
    if int(seed) < 0:
        raise DataError(f"seed must be a non-negative integer, got {seed}.")
    if num_workers is not None and int(num_workers) < 1:
        raise DataError(f"num_workers must be >= 1 (or None for one per CPU), got {num_workers}.")
    shape = _check_geometry(dims, size, depth, patch_mm)
    return {"num_images": int(num_images), "num_test": int(num_test), "seed": int(seed), "dims": int(dims),
            "size": int(size), "shape": list(shape), "patch_mm": None if patch_mm is None else float(patch_mm)}


def _write_locked(out_dir: Path, options: dict, num_workers: int | None, progress: bool) -> Path:
    manifest_path = begin_cohort(out_dir, "img-")
    seed, dims, size, patch_mm = options["seed"], options["dims"], options["size"], options["patch_mm"]
    depth = options["shape"][2] if dims == 3 else None
    jobs = []
    for split, count, offset in (("training", options["num_images"], 0), ("test", options["num_test"], _TEST_OFFSET)):
        prefix = "img-t" if split == "test" else "img-"
        jobs += [(out_dir, f"{prefix}{i:05d}", subject_seed(seed, offset + i), _class_of(seed + offset, i), dims, size,
                  depth, patch_mm) for i in range(count)]
    entries = run_jobs(_write_image, jobs, num_workers=num_workers, desc=f"CT phantom cohort ({dims}D)", unit="image",
                       progress=progress, in_process_below=_IMAGES_PER_WORKER)
    manifest = {
        "description": (
            f"Synthetic chest CT ({'axial slices' if dims == 2 else 'volumes'}, HU"
            f"{'' if patch_mm is None else f', {patch_mm:g} mm nodule-candidate patches'}): classes "
            f"{list(CT_CLASSES)} (no nodule, solid nodule, ground-glass nodule)."
        ),
        "generator": GENERATOR,
        **options,
        "classes": list(CT_CLASSES),
        "training": entries[: options["num_images"]],
        "test": entries[options["num_images"] :],
    }
    return write_manifest(manifest_path, manifest)


def write_ct_cohort(
    out_dir: str | os.PathLike,
    num_images: int,
    seed: int = 0,
    *,
    dims: int = 2,
    size: int = 128,
    depth: int | None = None,
    num_test: int = 0,
    patch_mm: float | None = None,
    num_workers: int | None = None,
    progress: bool = True,
) -> Path:
    """Generate and write a synthetic chest CT cohort; the manifest is written last.

    Args:
        out_dir: output folder (created); an existing manifest is removed first, so an interrupted run never looks
            complete.
        num_images: training images (>= 1).
        seed: cohort seed (>= 0).
        dims: 2 (axial slices) or 3 (volumes).
        size: in-plane pixels across the field of view (the whole 384 mm slice, or ``patch_mm``).
        depth: slices of a volume (3D); None: ``size // 2``.
        num_test: held-out test images (>= 0).
        patch_mm: None for whole slices, else the width in mm of nodule-candidate patches (see
            :func:`generate_ct_image`).
        num_workers: worker processes; None uses one per CPU (this process alone below 24 images); 1 runs in this
            process.
        progress: show a tqdm progress bar.

    Returns:
        Path of ``manifest.json``.

    Raises:
        DataError: for non-positive counts, a negative seed or a geometry out of range.
    """
    options = _validated(num_images, seed, dims, size, depth, num_test, num_workers, patch_mm)
    out_dir = Path(out_dir)
    with cohort_lock(out_dir):
        return _write_locked(out_dir, options, num_workers, progress)


def ensure_ct_cohort(out_dir: str | os.PathLike, num_images: int, seed: int = 0, **kw) -> Path:
    """Return the manifest of the cohort in ``out_dir``, generating it unless a matching one is complete.

    Args:
        out_dir: cohort folder.
        num_images: training images.
        seed: cohort seed.
        **kw: :func:`write_ct_cohort` keywords (``dims``, ``size``, ``depth``, ``num_test``, ``patch_mm``,
            ``num_workers``, ``progress``).

    Returns:
        Path of ``manifest.json``.

    Raises:
        DataError: as :func:`write_ct_cohort`, or for an unknown keyword.
    """
    settings, num_workers, progress = cohort_settings(kw, _DEFAULTS, "CT cohort")
    options = _validated(num_images, seed, settings["dims"], settings["size"], settings["depth"], settings["num_test"],
                         num_workers, settings["patch_mm"])
    return ensure_cohort_files(
        out_dir,
        lambda path: manifest_matches(path, GENERATOR, options, ("image", "metadata")),
        lambda folder: _write_locked(folder, options, num_workers, progress),
    )


def load_ct_datalist(
    source: str | os.PathLike, split: str = "training", classes: Sequence[str] = CT_CLASSES
) -> list[dict]:
    """The ``{"image": absolute path, "label": class index}`` items of one split of a CT cohort.

    Args:
        source: a cohort folder or its ``manifest.json`` (this generator's, or any manifest with the same entry keys
            ``image`` and ``class``).
        split: ``"training"`` or ``"test"``.
        classes: class names by index; each entry's ``class`` must be one of them.

    Returns:
        the items, in manifest order.

    Raises:
        DataError: when the manifest is missing or unreadable, the split is absent or empty, or an entry's class is
            unknown or its image missing (named by position, never by identifier).
    """
    manifest_path = Path(source) / "manifest.json" if Path(source).is_dir() else Path(source)
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError) as error:
        raise DataError(f"cannot read the CT cohort manifest {manifest_path}: {error}") from error
    entries = manifest.get(split) if isinstance(manifest, dict) else None
    if not entries:
        raise DataError(f"{manifest_path} has no '{split}' images; splits present: "
                        f"{sorted(k for k, v in manifest.items() if isinstance(v, list) and v)}.")
    items = []
    for index, entry in enumerate(entries):
        name = entry.get("class")
        if name not in classes:
            raise DataError(f"{split} image #{index} has class {name!r}, not one of {list(classes)}.")
        path = (manifest_path.parent / entry["image"]).resolve()
        if not path.is_file():
            raise DataError(f"{split} image #{index} is missing: {path} does not exist.")
        items.append({"image": str(path), "label": list(classes).index(name)})
    return items
