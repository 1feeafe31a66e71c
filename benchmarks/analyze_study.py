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
bundle's inference runs, with the same network, window and overlap, on the first ``--peer-frames`` frames;
``infer_speedup_vs_whole_fov`` compares seconds per frame.

Run: ``python benchmarks/analyze_study.py --bundle runs/cine_seg`` (a trained ``cine_seg`` run: the default recipe's
model; ``--quick`` for a smoke run on a 3-frame study). The last line of output is one JSON object with the figures.
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
QUICK = (3, 6, 96)  # --quick: frames, slices, matrix of a smoke run


def _crop(image: np.ndarray, affine: np.ndarray, slices: int, matrix: int) -> tuple[np.ndarray, np.ndarray]:
    """The central ``matrix x matrix`` pixels (zero-padded if smaller) and middle ``slices`` slices, with the affine
    moved to the new first voxel."""
    h, w, s, _ = image.shape
    starts = [(h - matrix) // 2, (w - matrix) // 2, max(0, (s - slices) // 2)]
    out = np.zeros((matrix, matrix, min(slices, s), image.shape[3]), image.dtype)
    sizes = (matrix, matrix, slices)
    src = [slice(max(0, a), max(0, a) + min(n, size)) for a, n, size in zip(starts, sizes, (h, w, s))]
    dst = [slice(max(0, -a), max(0, -a) + (sl.stop - sl.start)) for a, sl in zip(starts, src)]
    out[dst[0], dst[1], dst[2]] = image[src[0], src[1], src[2]]
    shifted = affine.copy()
    shifted[:3, 3] = affine[:3, :3] @ np.asarray(starts, dtype=np.float64) + affine[:3, 3]
    return out, shifted


def write_study(folder: Path, frames: int, slices: int, matrix: int, seed: int = 7) -> Path:
    """Write the benchmark study as DICOM into ``folder/dicom``; returns that folder."""
    subject = generate_subject(seed, num_frames=frames)
    image, affine = _crop(subject.sax_image, np.asarray(subject.sax_affine, dtype=np.float64), slices, matrix)
    target = folder / "dicom"
    write_mr_cine_series(
        image, affine, target, series_description="cine SAX", series_number=1,
        trigger_times_ms=subject.metadata["trigger_times_ms"],
        identity=PhantomIdentity.for_subject("bench-0000", seed),
    )  # fmt: skip
    return target


def whole_fov_infer_s(predictor, cine_image: np.ndarray, affine: np.ndarray, frames: int) -> float:
    """Seconds for the peer: the first ``frames`` frames through MONAI's sliding window over the whole field of
    view."""
    from monai.data import MetaTensor

    saved = predictor.roi_margin_mm
    predictor.roi_margin_mm = None  # no heart region: every frame whole, as a MONAI bundle's inference does
    try:
        cine = MetaTensor(torch.from_numpy(cine_image), affine=torch.from_numpy(affine))
        predictor.predict(cine, "sax", frames=list(range(frames)))
    finally:
        predictor.roi_margin_mm = saved
    return predictor.timings["infer_s"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=None, help="cine_seg bundle (default: medssl analyze's)")
    parser.add_argument("--work", type=Path, default=None, help="working folder (default: a temporary one)")
    parser.add_argument("--peer-frames", type=int, default=5, help="frames the whole-field-of-view peer segments")
    parser.add_argument("--quick", action="store_true", help=f"a smoke run: (frames, slices, matrix) = {QUICK}")
    args = parser.parse_args(argv)
    frames, slices, matrix = QUICK if args.quick else (FRAMES, SLICES, MATRIX)
    bundle = resolve_bundle(args.bundle)
    work = Path(args.work or tempfile.mkdtemp(prefix="medssl-analyze-bench-"))
    dicom = write_study(work, frames, slices, matrix)
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
    peer_frames = max(1, min(args.peer_frames, frames))
    peer_s = whole_fov_infer_s(predictor, scanned.sax.image, scanned.sax.affine, peer_frames)
    figures = {
        "study": {"frames": frames, "slices": int(scanned.sax.image.shape[2]),
                  "matrix": list(scanned.sax.image.shape[:2]), "files": files},
        "threads": torch.get_num_threads(),
        "scan_s": round(result.scan_s, 2),
        **{key: round(value, 2) for key, value in study.timings.items()},
        "api_total_s": round(api_s, 2),
        "command_s": round(command_s, 2),
        "goal_command_s": 60.0,
        "peer_whole_fov_infer_s_per_frame": round(peer_s / peer_frames, 2),
        "infer_s_per_frame": round(study.timings["infer_s"] / frames, 2),
        "infer_speedup_vs_whole_fov": round((peer_s / peer_frames) / (study.timings["infer_s"] / frames), 2),
        "lv_ef_pct": study.function.lv_ef_pct,
    }  # fmt: skip
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
