"""``medssl analyze`` on one cine CMR study: time per stage and for the whole command.

The study: a synthetic phantom subject with 25 frames, its SAX stack cut to 10 slices and cropped to 192 x 192 pixels
(the size of a typical clinical cine), written as DICOM (one instance per slice and frame). Stages, measured through
the Python API (:func:`medssl.clinical.analyze.analyze_dicom_folder`):

- ``scan_s``: discover the files, read headers, classify series, load and assemble the pixels;
- ``resample_s``: resample the cine to the model's grid and scale intensities;
- ``infer_s``: sliding-window inference on every frame (the heart region of the first frame bounds the others);
- ``restore_s``: class probabilities back to the native grid, arg-max, connected components, basal-slice rule;
- ``write_s``: DICOM SEG, DICOM SR, NIfTI labels, measurements, report (PNG + PDF);

then the whole command (``medssl analyze``, a fresh process: imports, model loading and all of the above) wall time.
Peer, in the same run: MONAI's ``SlidingWindowInferer`` over the whole field of view of every frame, the way a MONAI
bundle's inference runs, with the same network, window and overlap (``infer_speedup_vs_whole_fov``).

Run: ``python benchmarks/analyze_study.py --bundle runs/cine_seg`` (a trained ``cine_seg`` run: the default recipe's
model). The last line of output is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from medssl.clinical.analyze import analyze_dicom_folder, resolve_bundle
from medssl.data.phantom import generate_subject
from medssl.io.dicom_write import PhantomIdentity, write_mr_cine_series
from medssl.tasks.segmentation import load_segmentation_predictor

FRAMES, SLICES, MATRIX = 25, 10, 192


def _crop(image: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The central ``MATRIX x MATRIX`` pixels (zero-padded if smaller) and middle ``SLICES`` slices, with the affine
    moved to the new first voxel."""
    h, w, s, _ = image.shape
    starts = [(h - MATRIX) // 2, (w - MATRIX) // 2, max(0, (s - SLICES) // 2)]
    out = np.zeros((MATRIX, MATRIX, min(SLICES, s), image.shape[3]), image.dtype)
    sizes = (MATRIX, MATRIX, SLICES)
    src = [slice(max(0, a), max(0, a) + min(n, size)) for a, n, size in zip(starts, sizes, (h, w, s))]
    dst = [slice(max(0, -a), max(0, -a) + (sl.stop - sl.start)) for a, sl in zip(starts, src)]
    out[dst[0], dst[1], dst[2]] = image[src[0], src[1], src[2]]
    shifted = affine.copy()
    shifted[:3, 3] = affine[:3, :3] @ np.asarray(starts, dtype=np.float64) + affine[:3, 3]
    return out, shifted


def write_study(folder: Path, seed: int = 7) -> Path:
    """Write the benchmark study as DICOM into ``folder/dicom``; returns that folder."""
    subject = generate_subject(seed, num_frames=FRAMES)
    image, affine = _crop(subject.sax_image, np.asarray(subject.sax_affine, dtype=np.float64))
    target = folder / "dicom"
    write_mr_cine_series(
        image, affine, target, series_description="cine SAX", series_number=1,
        trigger_times_ms=subject.metadata["trigger_times_ms"],
        identity=PhantomIdentity.for_subject("bench-0000", seed),
    )  # fmt: skip
    return target


def whole_fov_infer_s(predictor, cine_image: np.ndarray, affine: np.ndarray) -> float:
    """Seconds for the peer: every frame through MONAI's sliding window over the whole field of view."""
    from monai.data import MetaTensor

    saved = predictor.roi_margin_mm
    predictor.roi_margin_mm = None  # no heart region: every frame whole, as a MONAI bundle's inference does
    try:
        predictor.predict(MetaTensor(torch.from_numpy(cine_image), affine=torch.from_numpy(affine)), "sax")
    finally:
        predictor.roi_margin_mm = saved
    return predictor.timings["infer_s"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=None, help="cine_seg bundle (default: medssl analyze's)")
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    args = parser.parse_args(argv)
    bundle = resolve_bundle(args.bundle)
    work = Path(args.work or tempfile.mkdtemp(prefix="medssl-analyze-bench-"))
    dicom = write_study(work)
    files = sum(1 for _ in dicom.rglob("*") if _.is_file())

    started = time.perf_counter()
    result = analyze_dicom_folder(dicom, work / "api", bundle, progress=False)
    api_s = time.perf_counter() - started
    (study,) = result.studies
    assert study.analysed, study.error

    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "medssl.cli", "analyze", str(dicom), "--out", str(work / "cli"),
                    "--bundle", str(bundle), "--quiet"], check=True, env=env, capture_output=True)  # fmt: skip
    command_s = time.perf_counter() - started

    from medssl.io.dicom_read import scan_dicom_folder

    (scanned,), _ = scan_dicom_folder(dicom, progress=False)
    predictor = load_segmentation_predictor(bundle)
    peer_s = whole_fov_infer_s(predictor, scanned.sax.image, scanned.sax.affine)
    figures = {
        "study": {"frames": FRAMES, "slices": int(scanned.sax.image.shape[2]),
                  "matrix": list(scanned.sax.image.shape[:2]), "files": files},
        "threads": torch.get_num_threads(),
        "scan_s": round(result.scan_s, 2),
        **{key: round(value, 2) for key, value in study.timings.items()},
        "api_total_s": round(api_s, 2),
        "command_s": round(command_s, 2),
        "goal_command_s": 60.0,
        "peer_whole_fov_infer_s": round(peer_s, 2),
        "infer_speedup_vs_whole_fov": round(peer_s / study.timings["infer_s"], 2),
        "lv_ef_pct": study.function.lv_ef_pct,
    }  # fmt: skip
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
