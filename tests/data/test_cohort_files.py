"""The shared cohort-writing machinery: ordered parallel jobs, atomic item folders and manifests, reuse or rewrite."""

from __future__ import annotations

import json

import pytest

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
from medssl.errors import DataError


def _square_or_fail(value: int) -> int:
    if value < 0:
        raise ValueError(f"negative job {value}")
    return value * value


@pytest.mark.parametrize("num_workers", [1, 2])
def test_run_jobs_returns_results_in_job_order(num_workers):
    jobs = [(value,) for value in (5, 0, 3, 9, 1, 7)]
    assert run_jobs(_square_or_fail, jobs, num_workers=num_workers, desc="t", unit="job", progress=False) == [
        25, 0, 9, 81, 1, 49]


def test_run_jobs_raises_the_failing_jobs_error():
    with pytest.raises(ValueError, match="negative job -2"):
        run_jobs(_square_or_fail, [(1,), (-2,), (3,)], num_workers=2, desc="t", unit="job", progress=False)


def test_run_jobs_stays_in_process_below_the_threshold(monkeypatch):
    import medssl.data.cohort_files as cohort_files

    def no_pool(*args, **kwargs):
        raise AssertionError("a worker pool was started")

    monkeypatch.setattr(cohort_files, "ProcessPoolExecutor", no_pool)
    assert run_jobs(lambda v: v + 1, [(1,), (2,)], num_workers=None, desc="t", unit="job", progress=False,
                    in_process_below=3) == [2, 3]


def test_atomic_folder_replaces_on_success_and_keeps_the_old_folder_on_error(tmp_path):
    (tmp_path / "item").mkdir()
    (tmp_path / "item" / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_folder(tmp_path, "item") as staging:
            (staging / "new.txt").write_text("new")
            raise RuntimeError("crash mid-write")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["item"]
    assert sorted(p.name for p in (tmp_path / "item").iterdir()) == ["old.txt"]
    with atomic_folder(tmp_path, "item") as staging:
        (staging / "new.txt").write_text("new")
    assert sorted(p.name for p in (tmp_path / "item").iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["item"]


def test_begin_cohort_removes_the_manifest_and_stale_staging_folders_only(tmp_path):
    write_manifest(tmp_path / "manifest.json", {"training": []})
    (tmp_path / ".img-00001.tmp-abc").mkdir()
    (tmp_path / ".sub-0001.tmp-abc").mkdir()
    (tmp_path / "img-00000").mkdir()
    manifest_path = begin_cohort(tmp_path, "img-")
    assert manifest_path == tmp_path / "manifest.json" and not manifest_path.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".sub-0001.tmp-abc", "img-00000"]


def test_write_manifest_leaves_no_staging_file(tmp_path):
    path = write_manifest(tmp_path / "manifest.json", {"a": [1, 2]})
    assert json.loads(path.read_text()) == {"a": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]


def test_ensure_cohort_files_writes_only_when_nothing_matches(tmp_path):
    out = tmp_path / "cohort"
    writes = []

    def write(folder):
        writes.append(folder)
        return write_manifest(folder / "manifest.json", {"version": 2})

    def matches(path):
        return path.is_file() and json.loads(path.read_text()).get("version") == 2

    assert ensure_cohort_files(out, matches, write) == out / "manifest.json"
    assert ensure_cohort_files(out, matches, write) == out / "manifest.json"
    assert writes == [out]
    write_manifest(out / "manifest.json", {"version": 1})
    ensure_cohort_files(out, matches, write)
    assert writes == [out, out] and matches(out / "manifest.json")


def test_cohort_lock_creates_the_folder(tmp_path):
    with cohort_lock(tmp_path / "new" / "cohort"):
        assert (tmp_path / "new" / "cohort" / ".lock").is_file()


def test_cohort_settings_fills_defaults_and_names_unknown_options():
    settings, workers, progress = cohort_settings({"size": 64, "num_workers": 2, "progress": False},
                                                  {"size": 224, "mode": "findings"}, "test cohort")
    assert settings == {"size": 64, "mode": "findings"} and workers == 2 and progress is False
    assert cohort_settings({}, {"size": 224}, "test cohort") == ({"size": 224}, None, True)
    with pytest.raises(DataError, match=r"unknown test cohort option\(s\) \['colour'\]; valid are \['size'\]"):
        cohort_settings({"colour": True}, {"size": 224}, "test cohort")


def test_manifest_matches_needs_generator_options_counts_and_files(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "image.png").write_bytes(b"x")
    options = {"num_images": 1, "num_test": 0, "size": 64}
    manifest = {"generator": "gen", **options, "training": [{"image": "a/image.png"}], "test": []}
    path = write_manifest(tmp_path / "manifest.json", manifest)
    assert manifest_matches(path, "gen", options, ("image",))
    assert not manifest_matches(path, "other", options, ("image",))
    assert not manifest_matches(path, "gen", {**options, "size": 32}, ("image",))
    assert not manifest_matches(path, "gen", {**options, "num_test": 1}, ("image",))
    assert not manifest_matches(path, "gen", options, ("image", "mask"))  # an entry lacks a file key
    (tmp_path / "a" / "image.png").unlink()
    assert not manifest_matches(path, "gen", options, ("image",))
    path.write_text("{not json")
    assert not manifest_matches(path, "gen", options, ("image",))
