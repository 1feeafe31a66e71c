"""One synthetic PA chest radiograph: anatomy + findings + acquisition, with exact labels and masks.

Acquisition follows a digital radiography chain: primary transmission ``exp(-A)`` plus scatter (a broad blur of
the transmitted field, scatter-to-primary ratio 0.3-1.0), quantum noise, log conversion, dynamic range compression
(subtracting part of a 15 mm low-pass, as CR/DR processing does so the spine shows through the heart), edge
enhancement, detector blur, a window from the image's own percentiles with jitter (exposure and contrast vary), a
display gamma, and optional collimation (unexposed borders are white).

Everything the processing derives from the whole image (scatter, low-pass, window, noise level) is computed from
the finding-free anatomy, so adding findings changes pixels only within the findings' masks (dilated by the ~2 mm
edge-enhancement kernel). Rendering one seed with and without findings therefore gives an exact lesion-insertion
pair for anomaly detection. Random streams: ``SeedSequence([seed, k])`` with k = 0 anatomy, 1 lung texture,
2 findings, 3 noise, 4 acquisition.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy.ndimage import gaussian_filter

from medssl.data.cxr_phantom.anatomy import Grid, project_anatomy, sample_anatomy
from medssl.data.cxr_phantom.findings import FINDINGS, LOCAL_FINDINGS, render_findings, sample_findings
from medssl.errors import DataError

__all__ = ["GENERATOR", "Radiograph", "cardiothoracic_ratio", "check_size", "generate_radiograph"]

GENERATOR = "medssl.data.cxr_phantom"
_MIN_SIZE = 32
_MAX_SIZE = 4096


@dataclass(frozen=True)
class Radiograph:
    """One synthetic chest radiograph in memory.

    Arrays are ``[H, W]``: rows run head -> feet, columns from the patient's right to left (PA view as displayed).

    Attributes:
        image: float32 ``[H, W]`` in [0, 1], bright = attenuating (MONOCHROME2 display).
        labels: ``{finding: 0 or 1}`` for every name in :data:`~medssl.data.cxr_phantom.findings.FINDINGS`.
        finding_masks: ``{finding: bool [H, W]}`` for every local finding (all-false when absent).
        anatomy_masks: bool ``[H, W]`` masks ``right_lung``, ``left_lung``, ``heart``, ``thorax`` (both pleural
            cavities with the mediastinum between them) and ``field`` (the collimated, exposed area).
        metadata: ground truth and parameters (JSON-serialisable): ``seed``, ``size``, ``spacing_mm``,
            ``labels``, ``cardiothoracic_ratio`` (measured on the masks), ``findings`` (parameters),
            ``anatomy``, ``acquisition``.
    """

    image: np.ndarray
    labels: dict[str, int]
    finding_masks: dict[str, np.ndarray]
    anatomy_masks: dict[str, np.ndarray]
    metadata: dict

    @property
    def lesion_mask(self) -> np.ndarray:
        """Union of the local finding masks (bool ``[H, W]``): the anomaly ground truth."""
        return np.logical_or.reduce([self.finding_masks[name] for name in LOCAL_FINDINGS])


def cardiothoracic_ratio(heart: np.ndarray, thorax: np.ndarray) -> float:
    """Cardiothoracic ratio measured on masks: horizontal extent of the heart (rightmost to leftmost heart pixel, on
    any rows) over the widest horizontal extent of the thorax on one row.

    Args:
        heart: bool ``[H, W]`` cardiac silhouette.
        thorax: bool ``[H, W]`` inner thorax (pleural cavities and mediastinum).

    Returns:
        The ratio (pixels / pixels).

    Raises:
        DataError: when either mask is empty or they differ in shape.
    """
    if heart.shape != thorax.shape or heart.ndim != 2:
        raise DataError(f"heart and thorax masks must be equal-shape [H, W], got {heart.shape} and {thorax.shape}")
    if not heart.any() or not thorax.any():
        raise DataError("cannot measure a cardiothoracic ratio: the heart or thorax mask is empty")
    columns = np.flatnonzero(heart.any(axis=0))
    heart_width = columns[-1] - columns[0] + 1
    rows = [np.flatnonzero(row) for row in thorax if row.any()]
    thorax_width = max(row[-1] - row[0] + 1 for row in rows)
    return float(heart_width / thorax_width)


def check_size(size: int) -> int:
    """Validate an image side length.

    Raises:
        DataError: when ``size`` lies outside 32-4096 pixels.
    """
    if not _MIN_SIZE <= int(size) <= _MAX_SIZE:
        raise DataError(f"size must lie in {_MIN_SIZE}..{_MAX_SIZE} pixels, got {size}")
    return int(size)


def _sample_acquisition(rng: np.random.Generator) -> dict:
    collimate = rng.random() < 0.5
    return {
        "dose": float(np.exp(rng.uniform(np.log(2e3), np.log(4e4)))),
        "scatter_to_primary": float(rng.uniform(0.3, 1.0)),
        "range_compression": float(rng.uniform(0.25, 0.6)),
        "edge_enhancement": float(rng.uniform(0.0, 1.2)),
        "detector_blur_mm": float(rng.uniform(0.2, 0.6)),
        "window_percentiles": [float(rng.uniform(0.2, 3.0)), float(rng.uniform(97.0, 99.9))],
        "gamma": float(rng.uniform(0.8, 1.25)),
        "collimation": [float(v) for v in rng.uniform(0.0, 0.07, 4)] if collimate else [0.0, 0.0, 0.0, 0.0],
    }


def _field_mask(size: int, margins: Sequence[float]) -> np.ndarray:
    """Exposed area inside collimator margins ``(top, bottom, left, right)`` given as fractions of the side."""
    top, bottom, left, right = (int(round(m * size)) for m in margins)
    field = np.zeros((size, size), bool)
    field[top : size - bottom, left : size - right] = True
    return field


def generate_radiograph(
    seed: int,
    size: int = 224,
    *,
    findings: Sequence[str] | None = None,
    subject_id: str = "cxr-0000",
) -> Radiograph:
    """Generate one synthetic PA chest radiograph with exact findings.

    Args:
        seed: non-negative integer; equal arguments give identical images.
        size: side of the square image in pixels (32-4096); the field of view (about 320-480 mm) is drawn per patient,
            so the pixel spacing is ``fov / size``.
        findings: names from :data:`~medssl.data.cxr_phantom.findings.FINDINGS` to render (``()`` for a normal
            image), or ``None`` to draw them with their prevalences. The same seed with different findings gives
            the same patient and acquisition: only the findings' pixels (and, for cardiomegaly, the heart) change.
        subject_id: identifier stored in the metadata.

    Returns:
        The radiograph with labels, masks and metadata. A local finding's label is 1 exactly when its mask is not
        empty inside the exposed field; cardiomegaly's is 1 exactly when the measured CTR exceeds 0.5.

    Raises:
        DataError: for a negative seed, a size out of range or an unknown finding.
    """
    if int(seed) < 0:
        raise DataError(f"seed must be a non-negative integer, got {seed}")
    size = check_size(size)
    streams = [np.random.default_rng([int(seed), k]) for k in range(5)]
    present, target_ctr = sample_findings(streams[2], findings)
    anatomy = sample_anatomy(streams[0], target_ctr)
    grid = Grid.square(size, anatomy.fov_mm, anatomy.centre, anatomy.tilt_deg)
    projected = project_anatomy(anatomy, grid, streams[1])
    layers = render_findings(present, anatomy, projected, grid, streams[2])
    acquisition = _sample_acquisition(streams[4])
    field = _field_mask(size, acquisition["collimation"])
    pixel = grid.spacing_mm

    normal = projected.attenuation + projected.vessels
    total = normal + layers.attenuation + projected.vessels * (layers.vessel_scale - 1.0)
    primary = np.exp(-normal)
    scatter = acquisition["scatter_to_primary"] * gaussian_filter(primary, 30.0 / pixel, mode="nearest") + 1e-4
    log_normal = -np.log(primary + scatter)
    log_total = -np.log(np.exp(-total) + scatter)
    low_pass = acquisition["range_compression"] * gaussian_filter(log_normal, 15.0 / pixel, mode="nearest")

    def process(log_signal: np.ndarray) -> np.ndarray:
        blurred = gaussian_filter(log_signal - low_pass, acquisition["detector_blur_mm"] / pixel, mode="nearest")
        detail = blurred - gaussian_filter(blurred, 2.0 / pixel, mode="nearest")
        return blurred + acquisition["edge_enhancement"] * detail

    reference = process(log_normal)
    low, high = np.percentile(reference[field], acquisition["window_percentiles"])
    # Quantum noise: relative fluctuation 1/sqrt(quanta) in the log signal, quanta scale with dose * transmission
    # and with the pixel area (a larger pixel collects more quanta).
    quanta = acquisition["dose"] * (primary + scatter) * (pixel / 0.2) ** 2
    noise = streams[3].standard_normal((size, size)).astype(np.float32) / np.sqrt(quanta)
    display = np.clip((process(log_total) + noise - low) / max(high - low, 1e-6), 0.0, 1.0) ** acquisition["gamma"]
    display = np.where(field, display, np.clip(0.92 + 0.02 * noise / max(float(noise.std()), 1e-6), 0.0, 1.0))

    masks = {name: layers.masks[name] & field for name in LOCAL_FINDINGS}
    anatomy_masks = {
        "right_lung": projected.lung[0] >= 0.5,
        "left_lung": projected.lung[1] >= 0.5,
        "heart": projected.heart >= 0.5,
        "thorax": np.maximum(projected.hemithorax[0], projected.hemithorax[1]) >= 0.5,
        "field": field,
    }
    ctr = cardiothoracic_ratio(anatomy_masks["heart"], anatomy_masks["thorax"])
    labels = {"cardiomegaly": int(ctr > 0.5), **{name: int(masks[name].any()) for name in LOCAL_FINDINGS}}
    metadata = {
        "subject_id": subject_id,
        "seed": int(seed),
        "generator": GENERATOR,
        "size": size,
        "spacing_mm": round(pixel, 6),
        "labels": labels,
        "findings_requested": None if findings is None else sorted(set(findings)),
        "cardiothoracic_ratio": round(ctr, 5),
        "findings": layers.details,
        "anatomy": dataclasses.asdict(anatomy),
        "acquisition": acquisition,
    }
    ordered = {name: labels[name] for name in FINDINGS}
    return Radiograph(display.astype(np.float32), ordered, masks, anatomy_masks, metadata)
