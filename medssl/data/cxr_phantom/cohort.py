"""Synthetic chest radiograph cohorts on disk: multi-label findings, or a normal-vs-lesion anomaly benchmark.

Images are 8-bit greyscale PNG, as the public chest X-ray collections (NIH ChestX-ray14, CheXpert) distribute them,
so a pipeline written for those reads these unchanged (MONAI ``LoadImage`` reads PNG through Pillow); PNG is
lossless, a 224 x 224 image takes ~40 kB, and any viewer opens it. Pixel spacing is in each ``metadata.json``.

Layout (paths in the manifest are relative to it, MONAI decathlon-style)::

    OUT/manifest.json                  written last; absent while a run is incomplete
    OUT/img-XXXXX/image.png            uint8 [H, W], bright = attenuating
    OUT/img-XXXXX/findings.png         uint8 [H, W] bit mask: bit k set where LOCAL_FINDINGS[k] is
                                       (effusion 1, nodule 2, pneumothorax 4, consolidation 8)
    OUT/img-XXXXX/anatomy.png          uint8 [H, W]: 0 background, 1 right lung, 2 left lung, 3 heart
    OUT/img-XXXXX/metadata.json        ground truth (see :class:`~medssl.data.cxr_phantom.radiograph.Radiograph`)
    OUT/img-XXXXX/image.dcm            with ``dicom=True``: DICOM DX For Presentation (12-bit, fake identifiers)

``mode="findings"``: ``training`` and ``test`` entries carry ``label``, the multi-hot vector over ``FINDINGS``.
``mode="anomaly"``: ``training`` holds normal images only (``label`` 0); ``test`` alternates normal images and
images with one to three inserted lesions (``label`` 1), each with ``mask`` = ``findings.png`` (non-zero = lesion).

Image ``i`` of the training split of a cohort with seed ``S`` uses the seed of
:func:`medssl.data.phantom.subject_seed` ``(S, i)``, test image ``i`` that of ``(S, 1_000_000 + i)``, so a smaller
cohort is a prefix of a larger one and the splits never share a patient. Each image folder is written under a
temporary name and renamed when complete.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from medssl.data.cxr_phantom.findings import FINDINGS, LOCAL_FINDINGS
from medssl.data.cxr_phantom.radiograph import GENERATOR, Radiograph, check_size, generate_radiograph
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
from medssl.errors import DataError, MedsslError

__all__ = ["MODES", "ensure_cxr_cohort", "lesion_findings", "write_cxr_cohort"]

MODES = ("findings", "anomaly")
_DEFAULTS = {"size": 224, "mode": "findings", "num_test": 0, "dicom": False}
_TEST_OFFSET = 1_000_000


def lesion_findings(seed: int) -> tuple[str, ...]:
    """The one to three local findings inserted into anomaly-test image ``seed`` (drawn from its own stream)."""
    rng = np.random.default_rng([int(seed), 5])
    count = 1 + int(rng.random() < 0.35) + int(rng.random() < 0.1)
    return tuple(sorted(rng.choice(LOCAL_FINDINGS, size=count, replace=False).tolist()))


def _findings_bitmask(radiograph: Radiograph) -> np.ndarray:
    bits = np.zeros(radiograph.image.shape, np.uint8)
    for k, name in enumerate(LOCAL_FINDINGS):
        bits |= radiograph.finding_masks[name].astype(np.uint8) << k
    return bits


def _anatomy_labels(radiograph: Radiograph) -> np.ndarray:
    masks = radiograph.anatomy_masks
    labels = np.zeros(radiograph.image.shape, np.uint8)
    labels[masks["right_lung"]] = 1
    labels[masks["left_lung"]] = 2
    labels[masks["heart"]] = 3
    return labels


def _write_dicom(radiograph: Radiograph, path: Path) -> None:
    try:
        from medssl.io.dicom_write import PhantomIdentity
        from medssl.io.dx_write import write_dx_image
    except ImportError as error:  # pydicom is an optional extra
        raise MedsslError(f"DICOM export needs the 'dicom' extra (pip install 'medssl[dicom]'): {error}") from error
    meta = radiograph.metadata
    identity = PhantomIdentity.for_subject(meta["subject_id"], meta["seed"])
    write_dx_image(radiograph.image, path, spacing_mm=meta["spacing_mm"], identity=identity)


def _write_image(
    out_dir: Path, name: str, seed: int, size: int, findings: tuple[str, ...] | None, dicom: bool
) -> dict:
    """Generate one radiograph and write its folder atomically; returns the manifest entry (without ``label``)."""
    radiograph = generate_radiograph(seed, size, findings=findings, subject_id=name)
    with atomic_folder(out_dir, name) as staging:
        Image.fromarray(np.round(radiograph.image * 255.0).astype(np.uint8)).save(staging / "image.png")
        Image.fromarray(_findings_bitmask(radiograph)).save(staging / "findings.png")
        Image.fromarray(_anatomy_labels(radiograph)).save(staging / "anatomy.png")
        (staging / "metadata.json").write_text(json.dumps(radiograph.metadata, indent=1))
        if dicom:
            _write_dicom(radiograph, staging / "image.dcm")
    dicom_entry = {"dicom": f"{name}/image.dcm"} if dicom else {}
    return {
        **dicom_entry,
        "subject_id": name,
        "image": f"{name}/image.png",
        "findings_mask": f"{name}/findings.png",
        "anatomy": f"{name}/anatomy.png",
        "metadata": f"{name}/metadata.json",
        "findings": [finding for finding in FINDINGS if radiograph.labels[finding]],
        "multi_hot": [radiograph.labels[finding] for finding in FINDINGS],
    }


def _jobs(out_dir: Path, mode: str, seed: int, num_images: int, num_test: int, size: int, dicom: bool) -> list[tuple]:
    jobs = []
    for split, count, offset in (("training", num_images, 0), ("test", num_test, _TEST_OFFSET)):
        for i in range(count):
            image_seed = subject_seed(seed, offset + i)
            if mode == "findings":
                findings = None
            else:
                findings = lesion_findings(image_seed) if split == "test" and i % 2 == 1 else ()
            jobs.append((out_dir, f"img-{'t' if split == 'test' else ''}{i:05d}", image_seed, size, findings, dicom))
    return jobs


def _manifest_entry(entry: dict, mode: str) -> dict:
    entry = dict(entry)
    multi_hot = entry.pop("multi_hot")
    if mode == "findings":
        entry["label"] = multi_hot
    else:
        entry["label"] = int(any(multi_hot[1:]))
        entry["mask"] = entry["findings_mask"]
    return entry


def write_cxr_cohort(
    out_dir: str | os.PathLike,
    num_images: int,
    seed: int = 0,
    *,
    size: int = 224,
    mode: str = "findings",
    num_test: int = 0,
    dicom: bool = False,
    num_workers: int | None = None,
    progress: bool = True,
) -> Path:
    """Generate and write a cohort of synthetic chest radiographs; the manifest is written last.

    Args:
        out_dir: output folder (created); an existing manifest is removed first, so an interrupted run never looks
            complete.
        num_images: training images ``N`` (>= 1); normal only in ``"anomaly"`` mode.
        seed: cohort seed (>= 0).
        size: image side in pixels.
        mode: ``"findings"`` (multi-label classification) or ``"anomaly"`` (normal training images; test images
            alternate normal and inserted lesions).
        num_test: held-out test images (>= 0; at least 2 in ``"anomaly"`` mode so both classes occur).
        dicom: also write each image as a DICOM DX file ``image.dcm`` (needs the ``dicom`` extra).
        num_workers: worker processes; ``None`` uses ``min(N + num_test, CPU count)``; 1 runs in this process.
        progress: show a tqdm progress bar.

    Returns:
        Path of ``manifest.json``.

    Raises:
        DataError: for an unknown mode, non-positive counts, a negative seed or an out-of-range size.
    """
    out_dir = Path(out_dir)
    options = _validated(num_images, seed, size, mode, num_test, dicom, num_workers)
    with cohort_lock(out_dir):
        return _write_locked(out_dir, options, num_workers, progress)


def _validated(num_images, seed, size, mode, num_test, dicom, num_workers) -> dict:
    if mode not in MODES:
        raise DataError(f"unknown cohort mode {mode!r}; choose one of {MODES}")
    if int(num_images) < 1 or int(num_test) < 0:
        raise DataError(f"need num_images >= 1 and num_test >= 0, got {num_images} and {num_test}")
    if mode == "anomaly" and int(num_test) < 2:
        raise DataError(f"an anomaly cohort needs num_test >= 2 (normal and lesion images), got {num_test}")
    if int(seed) < 0:
        raise DataError(f"seed must be a non-negative integer, got {seed}")
    if num_workers is not None and int(num_workers) < 1:
        raise DataError(f"num_workers must be >= 1 (or None for one per CPU), got {num_workers}")
    return {
        "num_images": int(num_images),
        "seed": int(seed),
        "size": check_size(size),
        "mode": mode,
        "num_test": int(num_test),
        "dicom": bool(dicom),
    }


def _write_locked(out_dir: Path, options: dict, num_workers: int | None, progress: bool) -> Path:
    manifest_path = begin_cohort(out_dir, "img-")
    mode = options["mode"]
    jobs = _jobs(out_dir, mode, *(options[key] for key in ("seed", "num_images", "num_test", "size", "dicom")))
    entries = run_jobs(_write_image, jobs, num_workers=num_workers, desc=f"chest X-ray cohort ({mode})", unit="image",
                       progress=progress)
    training = [_manifest_entry(e, mode) for e in entries[: options["num_images"]]]
    test = [_manifest_entry(e, mode) for e in entries[options["num_images"] :]]
    what = "multi-label findings" if mode == "findings" else "normal training images, test images with inserted lesions"
    manifest = {
        "description": f"Synthetic PA chest radiographs ({what}); 8-bit PNG, findings {list(FINDINGS)}.",
        "generator": GENERATOR,
        **options,
        "findings": list(FINDINGS),
        "mask_bits": {name: 1 << k for k, name in enumerate(LOCAL_FINDINGS)},
        "training": training,
        "test": test,
    }
    return write_manifest(manifest_path, manifest)


def _file_keys(dicom: bool) -> tuple[str, ...]:
    """The files every manifest entry names."""
    return ("image", "findings_mask", "anatomy", "metadata") + (("dicom",) if dicom else ())


def ensure_cxr_cohort(out_dir: str | os.PathLike, num_images: int, seed: int = 0, **kw) -> Path:
    """Return the manifest of the cohort in ``out_dir``, generating it unless a matching one is complete.

    A cohort matches when its manifest names the same generator, seed, counts, size and mode and every listed file
    exists.

    Args:
        out_dir: cohort folder.
        num_images: training images.
        seed: cohort seed.
        **kw: :func:`write_cxr_cohort` keywords (``size``, ``mode``, ``num_test``, ``dicom``, ``num_workers``,
            ``progress``).

    Returns:
        Path of ``manifest.json``.

    Raises:
        DataError: as :func:`write_cxr_cohort`, or for an unknown keyword.
    """
    settings, num_workers, progress = cohort_settings(kw, _DEFAULTS, "chest X-ray cohort")
    options = _validated(
        num_images, seed, settings["size"], settings["mode"], settings["num_test"], settings["dicom"], num_workers
    )
    return ensure_cohort_files(
        out_dir,
        lambda path: manifest_matches(path, GENERATOR, options, _file_keys(options["dicom"])),
        lambda folder: _write_locked(folder, options, num_workers, progress),
    )
