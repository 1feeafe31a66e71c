"""Time the synthetic cine CMR cohort generator: N subjects (SAX + LAX-2C + LAX-4C cines, NIfTI) with W workers.

The goal (issue: embedded default data) is 100 subjects in at most 120 s on a 2-core machine with 2 workers. As a
peer measured in the same run, the script times nibabel's standard writer saving the generated arrays themselves
(serially: the floor of merely writing this data the usual way), and reports the ratio.

Usage::

    python benchmarks/phantom_cohort.py [--subjects 100] [--workers 2] [--seed 0] [--out DIR]

The last line printed is JSON: wall seconds, subjects per second, the CPU seconds the generator processes used
(on a shared machine the wall time also pays for other processes; ``cpu_seconds / workers`` is the wall time an
idle machine would need), the 1-minute load average before the run, the nibabel-write floor and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

from medssl.data.phantom import write_cohort


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children (the worker processes)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _nifti_floor(manifest: Path) -> float:
    """Seconds nibabel's standard writer (gzip level 1) takes to save the cohort's own arrays, serially."""
    root = manifest.parent
    seconds = 0.0
    with tempfile.TemporaryDirectory() as scratch:
        for entry in json.loads(manifest.read_text())["training"]:
            for key in ("sax", "sax_label", "lax_2c", "lax_2c_label", "lax_4c", "lax_4c_label"):
                image = nib.load(root / entry[key])
                copy = nib.Nifti1Image(np.asarray(image.dataobj), image.affine, image.header)
                start = time.perf_counter()
                nib.save(copy, Path(scratch) / "copy.nii.gz")
                seconds += time.perf_counter() - start
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: a temporary one)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        out = args.out or Path(scratch) / "cohort"
        load = os.getloadavg()[0]
        cpu_before = _cpu_seconds()
        start = time.perf_counter()
        manifest = write_cohort(out, args.subjects, args.seed, num_workers=args.workers, progress=False)
        seconds = time.perf_counter() - start
        cpu = _cpu_seconds() - cpu_before
        size_mb = sum(f.stat().st_size for f in out.rglob("*.nii.gz")) / 1e6
        floor = _nifti_floor(manifest)
    result = {
        "benchmark": "phantom_cohort",
        "subjects": args.subjects,
        "workers": args.workers,
        "cpus": os.cpu_count(),
        "seconds": round(seconds, 2),
        "subjects_per_s": round(args.subjects / seconds, 3),
        "cpu_seconds": round(cpu, 1),
        "cpu_seconds_per_subject": round(cpu / args.subjects, 3),
        "load_average_before": round(load, 2),
        "nifti_mb": round(size_mb, 1),
        "nibabel_save_same_arrays_s_serial": round(floor, 2),
        "ratio_to_nibabel_save": round(seconds / floor, 2),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
