"""How every synthetic cohort (cine CMR, chest radiograph, chest CT) reaches the disk safely.

A cohort folder holds one sub-folder per subject or image and a ``manifest.json`` written last, so a folder whose
manifest exists is complete. The pieces here make that hold when writers crash or run at the same time:

- :func:`atomic_folder`: each item is written under a hidden staging name and renamed when complete;
- :func:`cohort_lock`: writers of one folder (e.g. several DDP ranks) are serialised by an advisory lock;
- :func:`begin_cohort`: the manifest and stale staging folders of an earlier, interrupted run are removed first;
- :func:`run_jobs`: items are generated in spawned worker processes, with a progress bar, failing fast;
- :func:`write_manifest`: the manifest is replaced atomically;
- :func:`ensure_cohort_files`: reuse a complete matching cohort, else (re)write it under the lock;
- :func:`cohort_settings`: the options of an ``ensure_*`` call, checked against the generator's;
- :func:`manifest_matches`: whether a written cohort is complete and was made with given options.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from medssl.errors import DataError

__all__ = [
    "atomic_folder",
    "begin_cohort",
    "cohort_lock",
    "cohort_settings",
    "ensure_cohort_files",
    "manifest_matches",
    "run_jobs",
    "write_manifest",
]

MANIFEST = "manifest.json"


@contextlib.contextmanager
def atomic_folder(out_dir: Path, name: str) -> Iterator[Path]:
    """Yield a hidden staging folder in ``out_dir`` that replaces ``out_dir / name`` when the block completes.

    On any exception the staging folder is removed and ``out_dir / name`` is left as it was, so a crashed writer
    never leaves a half-written item that looks complete. Stale staging folders are named ``.{name}.tmp-*``.
    """
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=out_dir))
    try:
        yield staging
        target = out_dir / name
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextlib.contextmanager
def cohort_lock(out_dir: Path) -> Iterator[None]:
    """Serialise writers of one cohort folder (created if needed) with an advisory lock on ``out_dir/.lock``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; concurrent writers must be avoided by the caller
        yield
        return
    with open(out_dir / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def begin_cohort(out_dir: Path, item_prefix: str) -> Path:
    """Prepare ``out_dir`` for a fresh write: remove its manifest (so an interrupted run never looks complete) and
    the staging folders crashed writers left behind (``.{item_prefix}*.tmp-*``); returns the manifest path."""
    manifest_path = out_dir / MANIFEST
    manifest_path.unlink(missing_ok=True)
    for stale in out_dir.glob(f".{item_prefix}*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return manifest_path


def run_jobs(
    function: Callable[..., Any],
    jobs: Sequence[tuple],
    *,
    num_workers: int | None,
    desc: str,
    unit: str,
    progress: bool,
    in_process_below: int = 0,
) -> list[Any]:
    """``[function(*job) for job in jobs]``, in job order, with a progress bar, in worker processes.

    Args:
        function: a module-level (picklable) function.
        jobs: its argument tuples.
        num_workers: worker processes; None: one per CPU (or this process alone for fewer than
            ``in_process_below`` jobs: a spawned worker spends seconds importing before its first item); 1 runs
            everything in this process.
        desc, unit: progress bar text.
        progress: show the progress bar.
        in_process_below: see ``num_workers``.

    Returns:
        the results, in the order of ``jobs``.

    Raises:
        whatever ``function`` raises, for the first failing job; the jobs not started yet are cancelled.
    """
    default = 1 if len(jobs) < in_process_below else os.cpu_count() or 1
    workers = max(1, min(len(jobs), int(num_workers or default)))
    results: list[Any] = [None] * len(jobs)
    with tqdm(total=len(jobs), desc=desc, unit=unit, disable=not progress) as bar:
        if workers == 1:
            for index, job in enumerate(jobs):
                results[index] = function(*job)
                bar.update()
            return results
        # spawn: workers start clean, safe beside threads (torch, MLflow) in the parent.
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            futures = {pool.submit(function, *job): index for index, job in enumerate(jobs)}
            try:
                for future in as_completed(futures):
                    results[futures[future]] = future.result()
                    bar.update()
            except BaseException:
                for future in futures:  # fail fast instead of finishing the queue
                    future.cancel()
                raise
    return results


def write_manifest(manifest_path: Path, manifest: dict) -> Path:
    """Write ``manifest`` as JSON through a staging file and an atomic rename; returns ``manifest_path``."""
    staging = manifest_path.with_name(f".manifest.{os.getpid()}.tmp")
    staging.write_text(json.dumps(manifest, indent=1))
    os.replace(staging, manifest_path)
    return manifest_path


def ensure_cohort_files(
    out_dir: str | os.PathLike, matches: Callable[[Path], bool], write: Callable[[Path], Path]
) -> Path:
    """The manifest of the cohort in ``out_dir`` when ``matches(manifest_path)``, else ``write(out_dir)``'s.

    The check is repeated under :func:`cohort_lock`, since another process may have finished the cohort while this
    one waited for the lock; ``write`` runs under the lock.
    """
    out_dir = Path(out_dir)
    manifest_path = out_dir / MANIFEST
    if matches(manifest_path):
        return manifest_path
    with cohort_lock(out_dir):
        if matches(manifest_path):
            return manifest_path
        return write(out_dir)


def cohort_settings(kw: dict[str, Any], defaults: dict[str, Any], what: str) -> tuple[dict[str, Any], int | None, bool]:
    """Split an ``ensure_*`` call's keywords into the generator's settings and how to write.

    Args:
        kw: the keywords: generator options (names of ``defaults``), ``num_workers`` and ``progress``.
        defaults: the generator's options and their defaults.
        what: the cohort's name in an error message, e.g. ``"CT cohort"``.

    Returns:
        ``(settings, num_workers, progress)``: ``defaults`` updated by ``kw``; ``num_workers`` (None) and
        ``progress`` (True).

    Raises:
        DataError: for a keyword that is not an option, naming the valid ones.
    """
    options = dict(kw)
    num_workers, progress = options.pop("num_workers", None), options.pop("progress", True)
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise DataError(f"unknown {what} option(s) {unknown}; valid are {sorted(defaults)}.")
    return {**defaults, **options}, num_workers, progress


def manifest_matches(manifest_path: Path, generator: str, options: dict[str, Any], file_keys: Sequence[str]) -> bool:
    """Whether ``manifest_path`` is a complete cohort of ``generator`` written with ``options``.

    The manifest must name the generator, hold every option with the same value, list
    ``options["num_images"] + options["num_test"]`` entries under ``training`` and ``test``, and every entry's files
    under ``file_keys`` must exist. An unreadable or malformed manifest does not match.
    """
    try:
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("generator") != generator or any(manifest.get(key) != value for key, value in options.items()):
            return False
        entries = manifest["training"] + manifest["test"]
        if len(entries) != options["num_images"] + options["num_test"]:
            return False
        root = manifest_path.parent
        return all((root / entry[key]).is_file() for entry in entries for key in file_keys)
    except (OSError, ValueError, KeyError, TypeError):
        return False
