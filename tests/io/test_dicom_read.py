"""Tests for medssl.io.dicom_read: discovery, classification and assembly of phantom and real DICOM folders.

The reference is the phantom's own NIfTI (written from the same arrays as its DICOM): the assembled SAX and LAX
arrays must equal it exactly and the affines to float32 rounding (NIfTI stores the affine as float32).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

from medssl.errors import DataError
from medssl.io.dicom_read import DicomStudy, scan_dicom_folder
from medssl.io.dicom_write import deterministic_uid

AFFINE_ATOL_MM = 1e-4  # float32 NIfTI affine vs DS strings with 12 significant digits


def _reference(subject: Path, view: str) -> tuple[np.ndarray, np.ndarray]:
    image = nib.load(subject / f"{view}.nii.gz")
    return np.asarray(image.dataobj).astype(np.float32), image.affine


def _assert_matches_phantom(study: DicomStudy, subject: Path, views=("sax", "lax_2c", "lax_4c")) -> None:
    for view in views:
        cine = study.sax if view == "sax" else study.lax[view]
        image, affine = _reference(subject, view)
        assert cine.view == view
        assert cine.image.dtype == np.float32 and cine.image.shape == image.shape, (view, cine.image.shape)
        np.testing.assert_array_equal(cine.image, image, err_msg=view)
        np.testing.assert_allclose(cine.affine, affine, atol=AFFINE_ATOL_MM, err_msg=view)


def _scan(root: Path) -> tuple[list[DicomStudy], list]:
    return scan_dicom_folder(root, progress=False)


def _only_study(root: Path) -> DicomStudy:
    studies, _ = _scan(root)
    assert len(studies) == 1
    return studies[0]


def test_one_series_equals_phantom_nifti_with_sources(dicom_study_layout):
    layout = dicom_study_layout("one_series")
    studies, skipped = _scan(layout.root)
    assert skipped == [] and len(studies) == 1
    study = studies[0]
    _assert_matches_phantom(study, layout.subjects[0])
    assert study.ignored == [] and study.sax.warnings == []
    assert study.study_instance_uid == layout.study_uids[0]
    assert study.label.startswith("study 1 (")
    times = np.array(json.loads((layout.subjects[0] / "metadata.json").read_text())["trigger_times_ms"])
    np.testing.assert_allclose(study.sax.trigger_times_ms, times, atol=1e-6)
    _, _, slices, frames = study.sax.image.shape
    step = np.linalg.norm(study.sax.affine[:3, 2])
    np.testing.assert_allclose(study.sax.slice_positions_mm, np.arange(slices) * step, atol=1e-6)
    # Sources: [S][T], each the instance whose pixels sit at that slot, header only.
    assert len(study.sax.sources) == slices and all(len(row) == frames for row in study.sax.sources)
    for s, t in [(0, 0), (slices - 1, frames - 1), (2, 1)]:
        source = study.sax.sources[s][t]
        full = pydicom.dcmread(source.path)
        assert "PixelData" not in source.dataset
        assert source.sop_instance_uid == full.SOPInstanceUID and source.sop_class_uid == full.SOPClassUID
        assert source.series_instance_uid == full.SeriesInstanceUID
        np.testing.assert_array_equal(full.pixel_array.T, study.sax.image[:, :, s, t])
    assert study.sax.series_numbers == (10,) and study.lax["lax_4c"].series_numbers == (30,)


@pytest.mark.parametrize("kind", ["series_per_slice", "shuffled", "extra_series", "dicomdir"])
def test_layouts_equal_phantom_nifti(dicom_study_layout, kind):
    layout = dicom_study_layout(kind)
    studies, skipped = _scan(layout.root)
    assert skipped == [] and len(studies) == 1
    _assert_matches_phantom(studies[0], layout.subjects[0])
    if kind == "series_per_slice":
        assert studies[0].sax.series_numbers == tuple(range(100, 100 + studies[0].sax.image.shape[2]))
    if kind == "extra_series":
        assert studies[0].ignored == ["series 1: localiser", "series 2: single frame, not a cine"]
    if kind == "dicomdir":
        assert not any(path.suffix == ".dcm" for path in layout.root.rglob("*"))
        studies, skipped = _scan(layout.root / "DICOMDIR")  # the DICOMDIR file itself may be given
        assert skipped == [] and studies[0].sax.image.shape == _reference(layout.subjects[0], "sax")[0].shape


def test_dicomdir_reference_to_a_missing_file_is_reported(dicom_study_layout):
    layout = dicom_study_layout("dicomdir", views=("sax",))
    dicomdir = pydicom.dcmread(layout.root / "DICOMDIR")
    first_image = next(r for r in dicomdir.DirectoryRecordSequence if r.DirectoryRecordType == "IMAGE")
    missing = Path(*first_image.ReferencedFileID)
    (layout.root / missing).unlink()
    studies, skipped = _scan(layout.root)
    assert [(s.path, s.reason) for s in skipped] == [(missing.as_posix(), "referenced by a DICOMDIR but missing")]
    assert studies[0].sax.image.shape[2] == _reference(layout.subjects[0], "sax")[0].shape[2] - 1


def test_two_studies_in_one_folder(dicom_study_layout):
    layout = dicom_study_layout("two_studies")
    studies, _ = _scan(layout.root)
    assert sorted(s.study_instance_uid for s in studies) == sorted(layout.study_uids)
    assert len({s.label for s in studies}) == 2
    for study in studies:
        _assert_matches_phantom(study, layout.subjects[layout.study_uids.index(study.study_instance_uid)])


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless], ids=["rle", "jpeg-ls", "j2k"])
def test_compressed_transfer_syntaxes_decode_to_the_same_arrays(dicom_study_layout, syntax):
    layout = dicom_study_layout("shuffled", transfer_syntax=syntax)
    sample = next(p for p in layout.root.rglob("*") if p.is_file())
    assert pydicom.dcmread(sample, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    _assert_matches_phantom(_only_study(layout.root), layout.subjects[0])


def _sax_files(root: Path) -> list[Path]:
    return sorted((root / "sax").iterdir())


def test_undecodable_frame_drops_only_its_slice(dicom_study_layout):
    layout = dicom_study_layout("one_series", transfer_syntax=JPEGLSLossless)
    broken = _sax_files(layout.root)[4]  # slice 1, frame 1 (3 frames per slice)
    dataset = pydicom.dcmread(broken)
    dataset.PixelData = encapsulate([b"\x00" * 64])  # no JPEG-LS markers: the decoder must fail
    dataset.save_as(broken)
    study = _only_study(layout.root)
    image, _ = _reference(layout.subjects[0], "sax")
    np.testing.assert_array_equal(study.sax.image, np.delete(image, 1, axis=2))
    assert any("could not be decoded" in w and "slice dropped" in w for w in study.sax.warnings)
    _assert_matches_phantom(study, layout.subjects[0], views=("lax_2c", "lax_4c"))


def test_missing_slice_is_reported_as_a_gap(dicom_study_layout):
    layout = dicom_study_layout("one_series")
    frames = layout.num_frames
    for path in _sax_files(layout.root)[3 * frames : 4 * frames]:  # slice 3
        path.unlink()
    study = _only_study(layout.root)
    image, affine = _reference(layout.subjects[0], "sax")
    np.testing.assert_array_equal(study.sax.image, np.delete(image, 3, axis=2))
    np.testing.assert_allclose(study.sax.affine, affine, atol=AFFINE_ATOL_MM)
    step = np.linalg.norm(affine[:3, 2])
    expected = np.delete(np.arange(image.shape[2]), 3) * step
    np.testing.assert_allclose(study.sax.slice_positions_mm, expected, atol=1e-6)
    assert any(w.startswith("gap of") and "between slices 2 and 3" in w for w in study.sax.warnings)


def _rewrite(path: Path, target: Path, **changes) -> None:
    dataset = pydicom.dcmread(path)
    for keyword, value in changes.items():
        setattr(dataset, keyword, value)
    if "SOPInstanceUID" in changes:
        dataset.file_meta.MediaStorageSOPInstanceUID = changes["SOPInstanceUID"]
    dataset.save_as(target, enforce_file_format=True)


def test_duplicates_keep_the_latest_acquisition(dicom_study_layout):
    layout = dicom_study_layout("one_series")
    files = _sax_files(layout.root)
    shutil.copy(files[0], layout.root / "copy_of_first")  # the same SOP instance twice
    original = pydicom.dcmread(files[5])
    replaced = (original.pixel_array[::-1] // 2).astype(np.uint16)  # a re-acquisition with other pixels
    _rewrite(
        files[5], layout.root / "sax" / "IM_repeat.dcm", SOPInstanceUID=deterministic_uid("repeat"),
        InstanceNumber=9999, PixelData=replaced.tobytes(),
    )
    studies, skipped = _scan(layout.root)
    # Files directly in the folder are read before subfolders, so the copy is the one kept.
    assert [(s.path, s.reason) for s in skipped] == [("sax/IM_000001.dcm", "same SOP instance as copy_of_first")]
    sax = studies[0].sax
    image, _ = _reference(layout.subjects[0], "sax")
    expected = image.copy()
    expected[:, :, 1, 2] = replaced.T
    np.testing.assert_array_equal(sax.image, expected)
    assert sax.sources[1][2].sop_instance_uid == deterministic_uid("repeat")
    assert any(w.startswith("2 instances at slice position") and "instance 9999" in w for w in sax.warnings)


def test_inconsistent_matrix_slices_are_dropped(dicom_study_layout):
    layout = dicom_study_layout("one_series")
    frames = layout.num_frames
    for path in _sax_files(layout.root)[2 * frames : 3 * frames]:  # slice 2 stored with a cropped matrix
        dataset = pydicom.dcmread(path)
        cropped = np.ascontiguousarray(dataset.pixel_array[:-16, :])
        dataset.Rows = cropped.shape[0]
        dataset.PixelData = cropped.tobytes()
        dataset.save_as(path)
    study = _only_study(layout.root)
    image, _ = _reference(layout.subjects[0], "sax")
    np.testing.assert_array_equal(study.sax.image, np.delete(image, 2, axis=2))
    assert any("dropped (not resampled)" in w for w in study.sax.warnings)
    assert any(w.startswith("gap of") for w in study.sax.warnings)


def test_bad_files_are_skipped_with_reasons(dicom_study_layout):
    layout = dicom_study_layout("one_series")
    files = _sax_files(layout.root)
    (layout.root / "notes.txt").write_text("exported by the PACS\n")
    (layout.root / "nested" / "deeper").mkdir(parents=True)
    (layout.root / "nested" / "deeper" / "zeros").write_bytes(b"\x00" * 300)
    truncated = files[1].read_bytes()
    files[1].write_bytes(truncated[: len(truncated) - 1000])  # slice 0, frame 1 cut short
    _rewrite(files[0], layout.root / "header_only.dcm", SOPInstanceUID=deterministic_uid("header only"))
    header_only = pydicom.dcmread(layout.root / "header_only.dcm")
    del header_only.PixelData
    header_only.save_as(layout.root / "header_only.dcm")
    studies, skipped = _scan(layout.root)
    reasons = {s.path: s.reason for s in skipped}
    assert reasons["notes.txt"] == "not a DICOM file"
    assert reasons["nested/deeper/zeros"] == "not a DICOM file"
    assert reasons["sax/IM_000002.dcm"].startswith("truncated pixel data (")
    assert reasons["header_only.dcm"] == "no pixel data (MR Image Storage)"
    assert len(reasons) == 4
    image, _ = _reference(layout.subjects[0], "sax")
    np.testing.assert_array_equal(studies[0].sax.image, image[:, :, 1:])
    assert any("has 2 frames, the stack 3: slice dropped" in w for w in studies[0].sax.warnings)


def test_real_pydicom_files_mixed_in_are_reported_cleanly(dicom_study_layout, pydicom_test_files, caplog):
    layout = dicom_study_layout("one_series")
    names = pydicom_test_files(layout.root / "odd")
    caplog.set_level(logging.DEBUG)
    studies, skipped = _scan(layout.root)
    assert len(names) >= 6
    reasons = {s.path: s.reason for s in skipped}
    assert reasons["odd/rtplan.dcm"] == "no pixel data (RT Plan Storage)"
    assert reasons["odd/no_meta.dcm"] == "not a DICOM file"  # a stray byte before its first element
    assert reasons["odd/MR_truncated.dcm"] == "truncated pixel data (8130 of 8192 bytes) (MR Image Storage)"
    phantom = next(s for s in studies if s.study_instance_uid == layout.study_uids[0])
    _assert_matches_phantom(phantom, layout.subjects[0])
    others = [reason for s in studies if s is not phantom for reason in s.ignored]
    assert any("multi-frame object" in r for r in others)  # emri_small_RLE.dcm
    assert any("single frame, not a cine" in r for r in others)  # MR_small_jpeg_ls_lossless.dcm and friends
    assert any("colour image" in r for r in others)  # SC_rgb_jpeg_gdcm.dcm
    accounted = len(skipped) + sum(1 for s in studies if s is not phantom)
    assert accounted >= len(names) - 1  # every odd file is skipped or forms its own (unused) study
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


def test_no_cine_sax_raises_with_what_was_found(dicom_study_layout):
    layout = dicom_study_layout("extra_series", views=("lax_2c", "lax_4c"))
    with pytest.raises(DataError, match=r"no cine short-axis \(SAX\) stack found .*series 1: localiser") as error:
        _scan(layout.root)
    assert "series 20: single-slice cine, not used without a short-axis stack" in str(error.value)


def test_empty_and_non_dicom_folders_raise(tmp_path):
    with pytest.raises(DataError, match="does not exist or is not a folder"):
        _scan(tmp_path / "absent")
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(DataError, match="is empty: no files found"):
        _scan(tmp_path / "empty")
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.dcm").write_text("not dicom")
    with pytest.raises(DataError, match=r"no DICOM image found .*1 file\(s\) skipped \(1 x not a DICOM file\)"):
        _scan(tmp_path / "text")


def test_lax_views_come_from_geometry_not_descriptions(dicom_study_layout):
    layout = dicom_study_layout("one_series")
    for view, wrong in (("lax_2c", "cine LAX 4CH"), ("lax_4c", "cine LAX 2CH")):
        for path in (layout.root / view).iterdir():
            _rewrite(path, path, SeriesDescription=wrong)
    study = _only_study(layout.root)
    _assert_matches_phantom(study, layout.subjects[0], views=("lax_2c", "lax_4c"))
    assert any("SeriesDescription suggests lax_4c" in w for w in study.lax["lax_2c"].warnings)


def test_three_chamber_description_and_parallel_single_slice_are_ignored(dicom_study_layout):
    layout = dicom_study_layout("one_series")
    for path in (layout.root / "lax_2c").iterdir():
        _rewrite(path, path, SeriesDescription="cine 3CH")
    study = _only_study(layout.root)
    assert set(study.lax) == {"lax_4c"}
    assert "series 20: long-axis cine described as a 3-chamber / outflow-tract view, not used" in study.ignored


def test_identifiers_never_reach_logs_messages_or_labels(dicom_study_layout, caplog, capsys):
    planted = {
        "PatientName": "ZQXNAME^PLANTED",
        "PatientID": "ZQXID12345",
        "PatientBirthDate": "19010203",
        "AccessionNumber": "ZQXACC987",
    }
    layout = dicom_study_layout("extra_series", identifiers=planted)
    (layout.root / "junk.bin").write_bytes(b"junk")
    caplog.set_level(logging.DEBUG)
    studies, skipped = scan_dicom_folder(layout.root, progress=True)
    assert studies[0].sax.sources[0][0].dataset.PatientID == planted["PatientID"]  # kept for the DICOM outputs
    no_sax = dicom_study_layout("one_series", views=("lax_4c",), identifiers=planted)
    with pytest.raises(DataError) as error:
        scan_dicom_folder(no_sax.root, progress=True)
    texts = [r.getMessage() for r in caplog.records] + [str(error.value), *capsys.readouterr()]
    texts += [s.label for s in studies] + [r for s in studies for r in s.ignored + s.sax.warnings]
    texts += [f"{s.path} {s.reason}" for s in skipped]
    joined = "\n".join(texts)
    assert "series 1: localiser" in joined  # the texts searched are the real ones
    for value in planted.values():
        assert value not in joined


def test_uneven_spacing_is_reported_and_true_positions_kept(dicom_study_layout):
    layout = dicom_study_layout("one_series")
    frames = layout.num_frames
    files = _sax_files(layout.root)
    header = pydicom.dcmread(files[0], stop_before_pixels=True)
    cosines = np.array(header.ImageOrientationPatient, dtype=float)
    normal = np.cross(cosines[:3], cosines[3:])
    for path in files[5 * frames : 6 * frames]:  # slice 5 moved 1 mm towards the base (along +n)
        position = np.array(pydicom.dcmread(path, stop_before_pixels=True).ImagePositionPatient, dtype=float)
        _rewrite(path, path, ImagePositionPatient=[f"{v:.10g}" for v in position + normal])
    sax = _only_study(layout.root).sax
    step = np.linalg.norm(_reference(layout.subjects[0], "sax")[1][:3, 2])
    expected = np.arange(sax.image.shape[2]) * step
    expected[5] -= 1.0
    np.testing.assert_allclose(sax.slice_positions_mm, expected, atol=1e-6)
    assert [w for w in sax.warnings if w.startswith("uneven slice spacing")]


def _cine_from_real_file(name: str, root: Path, **changes) -> Path:
    """A 2-slice, 2-frame transverse cine made of copies of one real pydicom test file (geometry and times set)."""
    from pydicom.data import get_testdata_file

    source = get_testdata_file(name)
    for slice_index in range(2):
        for frame_index in range(2):
            uid = deterministic_uid("real", name, slice_index, frame_index)
            dataset = pydicom.dcmread(source)
            for keyword, value in {
                "StudyInstanceUID": deterministic_uid("real", name, "study"),
                "SeriesInstanceUID": deterministic_uid("real", name, "series"),
                "FrameOfReferenceUID": deterministic_uid("real", name, "frame of reference"),
                "SOPInstanceUID": uid,
                "ImageType": ["ORIGINAL", "PRIMARY"],
                "ImageOrientationPatient": [1, 0, 0, 0, 1, 0],
                "ImagePositionPatient": [0, 0, 5 * slice_index],
                "PixelSpacing": [1, 1],
                "SliceThickness": 5,
                "TriggerTime": 100 * frame_index,
                **changes,
            }.items():
                setattr(dataset, keyword, value)
            dataset.file_meta.MediaStorageSOPInstanceUID = uid
            dataset.save_as(root / f"{name}-{slice_index}-{frame_index}")
    return Path(source)


@pytest.mark.parametrize(
    ("name", "reference"),
    [
        ("MR_small_RLE.dcm", "MR_small.dcm"),
        ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"),
        ("MR_small_jp2klossless.dcm", "MR_small.dcm"),
        ("MR_small_bigendian.dcm", "MR_small.dcm"),
        ("JPGLosslessP14SV1_1s_1f_8b.dcm", None),  # JPEG lossless (process 14): no uncompressed twin shipped
    ],
)
def test_real_compressed_files_decode_with_rescale(tmp_path, name, reference):
    from pydicom.data import get_testdata_file

    source = _cine_from_real_file(name, tmp_path, RescaleSlope=2.5, RescaleIntercept=-100)
    raw = pydicom.dcmread(get_testdata_file(reference) if reference else source).pixel_array.astype(np.float32)
    study = _only_study(tmp_path)
    expected = np.broadcast_to((raw.T * 2.5 - 100)[:, :, None, None], (*raw.T.shape, 2, 2))
    np.testing.assert_array_equal(study.sax.image, expected)
    assert any("within 10 degrees of a transverse" in w for w in study.sax.warnings)
    # Slices go along -n: the transverse stack's n is +z (superior), so slice 0 is the upper one (z = 5 mm).
    np.testing.assert_allclose(study.sax.affine[:3, 3], [0, 0, 5])
    np.testing.assert_allclose(study.sax.affine[:3, :3], np.diag([-1.0, -1.0, -5.0]))


def test_temporal_position_orders_frames_without_trigger_time(dicom_study_layout):
    layout = dicom_study_layout("shuffled", views=("sax",))
    for path in (p for p in layout.root.rglob("*") if p.is_file()):
        dataset = pydicom.dcmread(path)
        del dataset.TriggerTime
        dataset.save_as(path)
    sax = _only_study(layout.root).sax
    np.testing.assert_array_equal(sax.image, _reference(layout.subjects[0], "sax")[0])
    assert np.isnan(sax.trigger_times_ms).all() and sax.trigger_times_ms.shape == (layout.num_frames,)
    assert "no TriggerTime: frames ordered by TemporalPositionIdentifier, trigger_times_ms is NaN" in sax.warnings


def test_frames_missing_from_every_slice_are_reported(dicom_study_layout):
    layout = dicom_study_layout("one_series", views=("sax",))
    files = _sax_files(layout.root)
    for path in files[layout.num_frames - 1 :: layout.num_frames]:  # the last frame of each slice
        path.unlink()
    sax = _only_study(layout.root).sax
    np.testing.assert_array_equal(sax.image, _reference(layout.subjects[0], "sax")[0][..., :-1])
    assert sax.warnings == ["CardiacNumberOfImages is 3 but 2 frames were found per slice"]


def test_invalid_geometry_excludes_the_series(dicom_study_layout):
    layout = dicom_study_layout("one_series")
    for path in (layout.root / "lax_2c").iterdir():
        _rewrite(path, path, ImageOrientationPatient=[1, 0, 0, 1, 0, 0])  # row == column: no plane
    study = _only_study(layout.root)
    assert set(study.lax) == {"lax_4c"}
    assert "series 20: no valid ImagePositionPatient / ImageOrientationPatient / PixelSpacing" in " ".join(study.ignored)


def test_image_without_geometry_is_dropped_not_its_series(dicom_study_layout):
    layout = dicom_study_layout("one_series", views=("sax",))
    broken = _sax_files(layout.root)[0]
    dataset = pydicom.dcmread(broken)
    del dataset.ImagePositionPatient
    dataset.save_as(broken)
    study = _only_study(layout.root)
    np.testing.assert_array_equal(study.sax.image, _reference(layout.subjects[0], "sax")[0][:, :, 1:])
    assert study.ignored == [
        "series 10: 1 image(s) without valid ImagePositionPatient / ImageOrientationPatient / PixelSpacing, not used"
    ]
