"""A cardiac function report for a person: PNG and two-page PDF from a SAX cine and its segmentation.

Page 1 holds the numbers (LV and RV EDV, ESV, SV, EF, LV mass) beside adult reference ranges, values outside the
range highlighted, the plausibility warnings of :func:`medssl.clinical.cardiac.cardiac_function`, and the LV and RV
volume-time curves with ED and ES marked. Page 2 overlays the segmentation on the ED and ES frames of a basal, a mid
and an apical slice. When the model was trained on synthetic data only, a red banner says so at the top of both
pages. The PNG is the two pages one above the other.

The report takes arrays and numbers only, never DICOM headers, so no patient identifier can reach it.

Reference ranges are mean +- 2 SD of healthy adults on bSSFP cine CMR, for men and women separately:

* LV (papillary muscles counted as mass): the pooled values of Kawel-Boehm et al., 2015, "Normal values for
  cardiovascular magnetic resonance in adults and children", JCMR 17:29, https://doi.org/10.1186/s12968-015-0111-7,
  as tabulated (mean +- SD) in Cardiovasc Diagn Ther 2020;10(6):1918-1945, Table 3,
  https://doi.org/10.21037/cdt-20-530. Kawel-Boehm et al., 2020, "Reference ranges ('normal values') for
  cardiovascular magnetic resonance (CMR) in adults and children: 2020 update", JCMR 22:87,
  https://doi.org/10.1186/s12968-020-00683-3, pools these with newer cohorts.
* RV EDV and ESV: Hudsmith et al., 2005, "Normal human left and right ventricular and left atrial dimensions using
  steady state free precession magnetic resonance imaging", JCMR 7(5):775-782,
  https://doi.org/10.1080/10976640500295516 (one of the cohorts pooled by Kawel-Boehm et al.).
* RV SV and EF: no range shown (none verified for this release).
"""

from __future__ import annotations

import datetime
import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.backends.backend_pdf import PdfPages
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.image import imsave
from matplotlib.patches import Patch

from medssl import __version__
from medssl.clinical.cardiac import CardiacFunction, VolumeCurves
from medssl.engine.checkpoints import atomic_write
from medssl.errors import DataError

__all__ = ["REFERENCE_RANGES", "REFERENCE_SOURCES", "SYNTHETIC_DATA_WARNING", "ReferenceRange", "RenderedReport",
           "write_report"]

SYNTHETIC_DATA_WARNING = "MODEL TRAINED ON SYNTHETIC DATA ONLY - NOT VALIDATED ON PATIENTS - NOT FOR CLINICAL USE"
REFERENCE_SOURCES = (
    "Reference ranges: healthy adults, bSSFP, mean +/- 2 SD. LV: Kawel-Boehm et al., JCMR 2015;17:29 (pooled; "
    "tabulated in Cardiovasc Diagn Ther 2020;10:1918), see also the 2020 update, JCMR 2020;22:87. "
    "RV EDV/ESV: Hudsmith et al., JCMR 2005;7:775. No range is shown for RV SV and EF."
)


@dataclass(frozen=True)
class ReferenceRange:
    """Adult normal range of one measurement, ``[low, high]`` in its unit, for men and for women."""

    men: tuple[float, float]
    women: tuple[float, float]


def _mean_2sd(men: tuple[float, float], women: tuple[float, float]) -> ReferenceRange:
    """A range from ``(mean, SD)`` per sex, as mean +- 2 SD (the convention of Kawel-Boehm et al.)."""
    return ReferenceRange(men=(men[0] - 2 * men[1], men[0] + 2 * men[1]),
                          women=(women[0] - 2 * women[1], women[0] + 2 * women[1]))


REFERENCE_RANGES = {
    "lv_edv_ml": _mean_2sd((160, 27), (132, 23)),
    "lv_esv_ml": _mean_2sd((54, 14), (44, 11)),
    "lv_sv_ml": _mean_2sd((108, 18), (87, 15)),
    "lv_ef_pct": _mean_2sd((67, 5), (67, 5)),
    "lv_mass_g": _mean_2sd((134, 21), (98, 21)),
    "rv_edv_ml": _mean_2sd((190, 33), (148, 35)),
    "rv_esv_ml": _mean_2sd((78, 20), (56, 18)),
}
"""Adult reference ranges keyed by :class:`CardiacFunction` field (see the module docstring for the sources)."""

_ROWS = (
    ("LV end-diastolic volume", "lv_edv_ml", "ml"),
    ("LV end-systolic volume", "lv_esv_ml", "ml"),
    ("LV stroke volume", "lv_sv_ml", "ml"),
    ("LV ejection fraction", "lv_ef_pct", "%"),
    ("LV mass (1.05 g/ml)", "lv_mass_g", "g"),
    ("RV end-diastolic volume", "rv_edv_ml", "ml"),
    ("RV end-systolic volume", "rv_esv_ml", "ml"),
    ("RV stroke volume", "rv_sv_ml", "ml"),
    ("RV ejection fraction", "rv_ef_pct", "%"),
)
_SEXES = {None: ("men", "women"), "M": ("men",), "F": ("women",)}
# ACDC ids 1 RV cavity, 2 LV myocardium, 3 LV cavity; colour-blind-safe (Okabe-Ito) blue, green, vermillion.
_LABEL_COLOURS = ("#0072B2", "#009E73", "#D55E00")
_LABEL_NAMES = ("RV cavity", "LV myocardium", "LV cavity")
_OUT_OF_RANGE = "#F4B6B6"
_PAGE_INCHES = (8.27, 11.69)  # A4 portrait
_PNG_DPI = 110
_CROP_MARGIN = 0.25


@dataclass(frozen=True)
class RenderedReport:
    """The written report.

    Attributes:
        png: path of the PNG (both pages stacked).
        pdf: path of the two-page PDF.
        text: every string drawn on the pages, in drawing order (titles, table cells, warnings, legends), so callers
            and tests can check what a reader sees.
        out_of_range: :class:`CardiacFunction` fields whose value lies outside the applicable reference range.
    """

    png: Path
    pdf: Path
    text: tuple[str, ...]
    out_of_range: tuple[str, ...]


def _check_inputs(
    image: np.ndarray,
    labels: np.ndarray,
    curves: VolumeCurves,
    function: CardiacFunction,
    spacing_mm: Sequence[float],
    frame_times_ms: Sequence[float] | None,
    sex: str | None,
) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 4 or image.size == 0:
        raise DataError(
            f"image must be a non-empty [H, W, S, T] numpy array, got shape {getattr(image, 'shape', None)}."
        )
    if not isinstance(labels, np.ndarray) or labels.shape != image.shape:
        raise DataError(
            f"labels must be a numpy array of the image's shape {image.shape}, got {getattr(labels, 'shape', None)}."
        )
    if not isinstance(curves, VolumeCurves) or not isinstance(function, CardiacFunction):
        raise DataError(
            f"curves must be VolumeCurves and function CardiacFunction, got {type(curves).__name__} and "
            f"{type(function).__name__}."
        )
    num_frames = image.shape[3]
    frames_in_range = all(0 <= frame < num_frames for frame in (function.ed_frame, function.es_frame))
    if curves.num_frames != num_frames or not frames_in_range:
        raise DataError(
            f"curves ({curves.num_frames} frames) and the ED/ES frames ({function.ed_frame}, {function.es_frame}) must "
            f"match the image's T = {num_frames}."
        )
    spacing = np.asarray(spacing_mm, dtype=float).ravel()
    if spacing.shape != (3,) or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise DataError(f"spacing_mm must be three finite values > 0 (dx, dy, dz in mm), got {spacing.tolist()}.")
    if frame_times_ms is not None and len(frame_times_ms) != num_frames:
        raise DataError(f"frame_times_ms must hold T = {num_frames} times, got {len(frame_times_ms)}.")
    if sex not in _SEXES:
        raise DataError(f"sex must be 'M', 'F' or None (both ranges shown), got {sex!r}.")


def _outside(field: str, value: float, sex: str | None) -> bool:
    """Whether ``value`` lies outside the range of ``sex`` (outside both ranges when the sex is unknown)."""
    if field not in REFERENCE_RANGES or not math.isfinite(value):
        return False
    ranges = REFERENCE_RANGES[field]
    return all(not low <= value <= high for low, high in (getattr(ranges, name) for name in _SEXES[sex]))


def _format(value: float, unit: str) -> str:
    if not math.isfinite(value):
        return "not measurable"
    return f"{value:.0f} {unit}" if unit == "%" else f"{value:.1f} {unit}"


def _banner(figure: Figure, trained_on_synthetic_only: bool, model_name: str, page: str) -> None:
    figure.text(0.5, 0.975, f"Cardiac function from cine SAX MRI - {page}", ha="center", va="top", fontsize=15,
                weight="bold")
    figure.text(
        0.5, 0.948,
        f"Automatic analysis by medssl {__version__}, model '{model_name}', {datetime.date.today().isoformat()}.\n"
        "Research software, not a medical device: a clinician must review every contour and number.",
        ha="center", va="top", fontsize=8.5,
    )
    if trained_on_synthetic_only:
        figure.text(0.5, 0.912, SYNTHETIC_DATA_WARNING, ha="center", va="top", fontsize=9.5, weight="bold",
                    color="white", bbox={"facecolor": "#B00020", "edgecolor": "none", "pad": 6})


def _summary_page(
    function: CardiacFunction,
    curves: VolumeCurves,
    frame_times_ms: Sequence[float] | None,
    sex: str | None,
    trained_on_synthetic_only: bool,
    model_name: str,
) -> tuple[Figure, list[str]]:
    figure = Figure(figsize=_PAGE_INCHES)
    _banner(figure, trained_on_synthetic_only, model_name, "measurements")

    sexes = _SEXES[sex]
    header = ["Measurement", "Value", *(f"Normal, {name}" for name in sexes)]
    cells, colours, outside = [], [], []
    for name, field, unit in _ROWS:
        value = getattr(function, field)
        ranges = REFERENCE_RANGES.get(field)
        limits = [f"{getattr(ranges, s)[0]:.0f} - {getattr(ranges, s)[1]:.0f} {unit}" if ranges else "-" for s in sexes]
        flagged = _outside(field, value, sex)
        outside += [field] if flagged else []
        cells.append([name, _format(value, unit) + ("  (!)" if flagged else ""), *limits])
        colours.append(["white", _OUT_OF_RANGE if flagged else "white", *(["white"] * len(sexes))])
    figure.text(
        0.06, 0.875,
        f"ED = frame {function.ed_frame}, ES = frame {function.es_frame} (0-based, from the LV volume curve). "
        "Red with (!): outside the normal range" + (" of both sexes." if sex is None else "."),
        fontsize=9, va="top",
    )
    table_axes = figure.add_axes((0.06, 0.64, 0.88, 0.225))
    table_axes.axis("off")
    table = table_axes.table(cellText=cells, cellColours=colours, colLabels=header, loc="upper center",
                             cellLoc="left", colLoc="left",
                             colWidths=[0.36, 0.22, *([0.42 / len(sexes)] * len(sexes))])
    table.auto_set_font_size(False)
    table.set_fontsize(9.5)
    table.scale(1.0, 1.45)
    for (row, _), cell in table.get_celld().items():
        if row == 0:
            cell.set_text_props(weight="bold")
            cell.set_facecolor("#E6E6E6")
    figure.text(0.06, 0.63, "\n".join(textwrap.wrap(REFERENCE_SOURCES, 125)), fontsize=7, va="top", color="#333333")

    flags = function.flags or ["None: the results passed the plausibility checks."]
    flag_lines = [line for flag in flags for line in textwrap.wrap(("- " + flag) if function.flags else flag, 110)]
    figure.text(0.06, 0.585, "Plausibility warnings", fontsize=11, weight="bold", va="top")
    figure.text(0.06, 0.56, "\n".join(flag_lines), fontsize=8.5, va="top",
                color="#B00020" if function.flags else "#1B5E20")

    axes = figure.add_axes((0.1, 0.06, 0.84, 0.37))
    times = np.arange(curves.num_frames) if frame_times_ms is None else np.asarray(frame_times_ms, dtype=float)
    axes.plot(times, curves.lv_cavity_ml, "o-", color=_LABEL_COLOURS[2], label="LV cavity", markersize=3)
    axes.plot(times, curves.rv_cavity_ml, "s-", color=_LABEL_COLOURS[0], label="RV cavity", markersize=3)
    for frame, name, style in ((function.ed_frame, "ED", "--"), (function.es_frame, "ES", ":")):
        axes.axvline(times[frame], color="black", linestyle=style, linewidth=1)
        axes.annotate(f"{name} (frame {frame})", (times[frame], 1.0), xycoords=("data", "axes fraction"),
                      xytext=(3, -12), textcoords="offset points", fontsize=8.5)
    axes.set_xlabel("time after R wave (ms)" if frame_times_ms is not None else "cine frame")
    axes.set_ylabel("volume (ml)")
    axes.set_ylim(bottom=0)
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right", fontsize=9)
    axes.set_title("Ventricular volume over the cardiac cycle", fontsize=11, weight="bold", loc="left")
    return figure, outside


def _representative_slices(labels: np.ndarray, ed_frame: int) -> list[tuple[str, int]]:
    """``(name, slice index)`` of a basal, mid and apical slice among those with LV labelled at ED.

    The base is the end of the LV's slice range with the larger LV cavity, whichever way the stack is ordered.
    """
    at_ed = labels[:, :, :, ed_frame]
    lv_slices = np.flatnonzero(np.isin(at_ed, (2, 3)).any(axis=(0, 1)))
    if lv_slices.size == 0:
        lv_slices = np.arange(labels.shape[2])
    first, last = int(lv_slices[0]), int(lv_slices[-1])
    cavity = (at_ed == 3).sum(axis=(0, 1))
    basal, apical = (first, last) if cavity[first] >= cavity[last] else (last, first)
    mid = int(lv_slices[lv_slices.size // 2])
    return [("basal", basal), ("mid", mid), ("apical", apical)]


def _crop(labels: np.ndarray) -> tuple[slice, slice]:
    """Row/column window (of the displayed, transposed slice) around every labelled voxel, with a margin."""
    foreground = labels.any(axis=(2, 3)).T if labels.any() else np.ones(labels.shape[1::-1][:2], dtype=bool)
    rows, columns = np.flatnonzero(foreground.any(axis=1)), np.flatnonzero(foreground.any(axis=0))
    windows = []
    for indices, size in ((rows, foreground.shape[0]), (columns, foreground.shape[1])):
        margin = int(round(_CROP_MARGIN * (indices[-1] - indices[0] + 1))) + 2
        windows.append(slice(max(0, indices[0] - margin), min(size, indices[-1] + margin + 1)))
    return windows[0], windows[1]


def _overlay_page(
    image: np.ndarray,
    labels: np.ndarray,
    function: CardiacFunction,
    spacing_mm: Sequence[float],
    trained_on_synthetic_only: bool,
    model_name: str,
) -> Figure:
    figure = Figure(figsize=_PAGE_INCHES)
    _banner(figure, trained_on_synthetic_only, model_name, "segmentation")
    rows, columns = _crop(labels)
    # The displayed slice is image[:, :, s, t].T (DICOM row/column order): rows step dy, columns step dx.
    aspect = float(spacing_mm[1]) / float(spacing_mm[0])
    colour_map = ListedColormap(_LABEL_COLOURS)
    slices = _representative_slices(labels, function.ed_frame)
    grid = figure.add_gridspec(3, 2, left=0.06, right=0.94, top=0.87, bottom=0.09, hspace=0.12, wspace=0.04)
    for column, (phase, frame) in enumerate((("ED", function.ed_frame), ("ES", function.es_frame))):
        for row, (name, index) in enumerate(slices):
            axes = figure.add_subplot(grid[row, column])
            picture = image[:, :, index, frame].T[rows, columns].astype(float)
            low, high = np.percentile(picture, [1, 99]) if picture.size else (0.0, 1.0)
            axes.imshow(picture, cmap="gray", vmin=low, vmax=max(high, low + 1e-6), aspect=aspect,
                        interpolation="nearest")
            mask = labels[:, :, index, frame].T[rows, columns]
            axes.imshow(np.ma.masked_equal(mask, 0), cmap=colour_map, vmin=0.5, vmax=3.5, alpha=0.45, aspect=aspect,
                        interpolation="nearest")
            axes.set_title(f"{name} (slice {index}), {phase} (frame {frame})", fontsize=10)
            axes.set_xticks([])
            axes.set_yticks([])
    figure.legend(handles=[Patch(color=c, alpha=0.6, label=n) for c, n in zip(_LABEL_COLOURS, _LABEL_NAMES)],
                  loc="lower center", ncol=3, fontsize=10, frameon=False, bbox_to_anchor=(0.5, 0.035))
    figure.text(0.5, 0.025, "Slices with LV labelled at ED; basal = end with the larger LV cavity. Display windowed "
                "per panel (1st-99th percentile).", ha="center", fontsize=8)
    return figure


def _rendered_text(figures: Sequence[Figure]) -> tuple[str, ...]:
    """Every word a reader sees (titles, labels, annotations, table cells, legends), without tick labels."""
    texts = []
    for figure in figures:
        texts += [text.get_text() for text in figure.texts]
        texts += [text.get_text() for legend in figure.legends for text in legend.get_texts()]
        for axes in figure.axes:
            texts += [axes.get_title(loc) for loc in ("left", "center", "right")]
            texts += [axes.get_xlabel(), axes.get_ylabel(), *(text.get_text() for text in axes.texts)]
            texts += [cell.get_text().get_text() for table in axes.tables for cell in table.get_celld().values()]
            legend = axes.get_legend()
            texts += [text.get_text() for text in legend.get_texts()] if legend else []
    return tuple(text for text in texts if text.strip())


def _rgba(figure: Figure) -> np.ndarray:
    canvas = FigureCanvasAgg(figure)
    figure.set_dpi(_PNG_DPI)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba()).copy()


def write_report(
    image: np.ndarray,
    labels: np.ndarray,
    curves: VolumeCurves,
    function: CardiacFunction,
    png_path: str | Path,
    pdf_path: str | Path,
    *,
    spacing_mm: Sequence[float],
    trained_on_synthetic_only: bool,
    model_name: str = "cine_seg",
    frame_times_ms: Sequence[float] | None = None,
    sex: str | None = None,
) -> RenderedReport:
    """Render the cardiac function report (see the module docstring) as a PNG and a two-page PDF.

    Both files are written through temporary siblings and renamed, so a failure never leaves a file that looks
    complete.

    Args:
        image: ``[H, W, S, T]`` SAX cine intensities (any real dtype) on the grid of ``labels``.
        labels: ``[H, W, S, T]`` label map (0 background, 1 RV cavity, 2 LV myocardium, 3 LV cavity).
        curves: per-frame volumes (:func:`medssl.clinical.cardiac.ventricular_volumes`), ``T`` frames.
        function: measurements and plausibility flags (:func:`medssl.clinical.cardiac.cardiac_function`).
        png_path: destination of the PNG.
        pdf_path: destination of the PDF.
        spacing_mm: ``(dx, dy, dz)`` voxel spacing in mm, used for the displayed pixel aspect ratio.
        trained_on_synthetic_only: draw the red "trained on synthetic data only" banner on every page.
        model_name: model name shown in the header.
        frame_times_ms: ``[T]`` trigger times for the curve's x axis; default the frame index.
        sex: ``"M"`` or ``"F"`` to compare with that sex's range; ``None`` (default) shows both and highlights a
            value only when it lies outside both.

    Returns:
        :class:`RenderedReport` with both paths, every drawn string and the out-of-range fields.

    Raises:
        DataError: when the arrays are not matching non-empty ``[H, W, S, T]`` arrays, ``curves`` or the ED/ES
            frames do not match ``T``, ``spacing_mm`` is not three positive values, ``frame_times_ms`` has the wrong
            length or ``sex`` is not ``"M"``, ``"F"`` or ``None``.
    """
    _check_inputs(image, labels, curves, function, spacing_mm, frame_times_ms, sex)
    summary, outside = _summary_page(function, curves, frame_times_ms, sex, trained_on_synthetic_only, model_name)
    overlays = _overlay_page(image, labels, function, spacing_mm, trained_on_synthetic_only, model_name)
    pages = (summary, overlays)

    def write_pdf(temporary: str) -> None:
        metadata = {"Title": "Cardiac function report", "Creator": f"medssl {__version__}"}
        with PdfPages(temporary, metadata=metadata) as pdf:
            for page in pages:
                pdf.savefig(page)

    pdf = atomic_write(pdf_path, write_pdf)
    stacked = np.concatenate([_rgba(page) for page in pages], axis=0)
    png = atomic_write(png_path, lambda temporary: imsave(temporary, stacked, format="png"))
    return RenderedReport(png=png, pdf=pdf, text=_rendered_text(pages), out_of_range=tuple(outside))
