"""MemMC-MAE against the plain MAE on the synthetic chest radiograph anomaly benchmark, trained the same way in one run.

Both methods go through the real ``memmc_mae`` bundle (:func:`medssl.engine.bundles.run_bundle`: ``train.json``, then
``train.json`` + ``evaluate.json``) with the same cohort, sizes, schedule and seed; only ``method`` differs
(``"memmc_mae"``: Tian et al., 2023, https://arxiv.org/abs/2203.11725; ``"mae"``: He et al., 2022,
https://arxiv.org/abs/2111.06377). Every run is logged to one MLflow experiment in ``<out_dir>/mlflow.db``, plus a
comparison run carrying ``comparison.md`` and ``comparison.csv``.

Layout::

    OUT/cohort/                 the anomaly-mode cohort (normal training images; test images with lesions)
    OUT/<method>/               each method's bundle run folder (weights, figures, evaluation/metrics.csv, overlays)
    OUT/comparison.csv          one row per method: training time, final loss, AUROCs
    OUT/comparison.md           the same as a markdown table
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from medssl.data.cxr_phantom import ensure_cxr_cohort
from medssl.engine.bundles import bundle_dir, run_bundle
from medssl.engine.checkpoints import atomic_write
from medssl.engine.tracking import log_to_run_folder
from medssl.errors import ConfigError
from medssl.studies.runner import study_experiment

__all__ = ["EXPERIMENT_NAME", "QUICK_OVERRIDES", "run_anomaly_comparison"]

EXPERIMENT_NAME = "medssl_memmc_comparison"
_RECIPE = "memmc_mae"
_METHODS = ("memmc_mae", "mae")
#: Tiny settings for a smoke run (seconds on a CPU).
QUICK_OVERRIDES: dict[str, Any] = {
    "num_images": 8,
    "num_test": 6,
    "cohort_size": 64,
    "image_size": [32, 32],
    "patch_size": [8, 8],
    "batch_size": 4,
    "epochs": 2,
    "figure_interval": 2,
    "num_masks": 4,
    "num_figures": 2,
    "model": {
        "embed_dim": 16, "depth": 2, "num_heads": 2, "decoder_dim": 16, "decoder_depth": 1, "decoder_num_heads": 2,
        "mlp_ratio": 2.0, "mask_ratio": 0.75, "norm_pix_loss": False, "patch_embed": "linear",
    },
    "memmc": {"memory_slots": 4, "levels": None},
}
_COLUMNS = ("method", "train_s", "eval_s", "final_loss", "image_auroc", "image_auroc_mean", "pixel_auroc")


def _bundle_defaults(keys: Sequence[str]) -> dict[str, Any]:
    train = json.loads((bundle_dir(_RECIPE) / "configs" / "train.json").read_text())
    return {key: train[key] for key in keys}


def _table(rows: Sequence[Mapping[str, Any]]) -> str:
    def cell(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    lines += ["| " + " | ".join(cell(row[column]) for column in _COLUMNS) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _write(path: Path, text: str) -> Path:
    return atomic_write(path, lambda temporary: Path(temporary).write_text(text))


def run_anomaly_comparison(
    out_dir: str | os.PathLike,
    quick: bool = False,
    methods: Sequence[str] = _METHODS,
    overrides: Mapping[str, Any] | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Train and evaluate MemMC-MAE and the plain MAE on one anomaly cohort and tabulate the results.

    Args:
        out_dir: the comparison folder (created; see the module docstring for its layout).
        quick: use :data:`QUICK_OVERRIDES` (a smoke run) under ``overrides``.
        methods: ``method`` values of the bundle to compare, in order (``"memmc_mae"``, ``"mae"``).
        overrides: more ``memmc_mae`` bundle overrides applied to every method (e.g. ``{"epochs": 10}``); not
            ``method``, ``run_dir``, ``dataset_dir``, ``seed`` or the tracking keys, which the comparison sets.
        seed: cohort and training seed.

    Returns:
        ``{"rows": [one dict per method with the columns of comparison.csv], "csv", "markdown", "tracking_uri",
        "run_id"}`` (``run_id``: the comparison's MLflow run).

    Raises:
        ConfigError: for an unknown method, an override the comparison sets itself, or an unknown bundle key.
        DataError: from cohort generation or the runs.
    """
    unknown = [method for method in methods if method not in _METHODS]
    reserved = sorted(set(overrides or {}) & {"method", "run_dir", "dataset_dir", "seed", "experiment_name",
                                               "tracking_uri", "run_name"})
    if unknown or reserved or not methods:
        raise ConfigError(f"methods must be some of {list(_METHODS)} (got {list(methods)}) and overrides must not set "
                          f"{reserved}.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {**(QUICK_OVERRIDES if quick else {}), **(overrides or {})}
    cohort = {**_bundle_defaults(("num_images", "num_test", "cohort_size")), **settings}
    manifest = ensure_cxr_cohort(
        out_dir / "cohort", cohort["num_images"], seed=seed, size=cohort["cohort_size"], mode="anomaly",
        num_test=cohort["num_test"],
    )
    uri = study_experiment(out_dir, EXPERIMENT_NAME)
    rows = []
    for method in methods:
        common = {
            **settings, "method": method, "run_dir": str(out_dir / method), "dataset_dir": str(manifest),
            "seed": seed, "experiment_name": EXPERIMENT_NAME, "tracking_uri": uri, "run_name": method,
        }
        start = time.perf_counter()
        trained = run_bundle(_RECIPE, overrides=common)
        middle = time.perf_counter()
        evaluated = run_bundle(_RECIPE, ["configs/train.json", "configs/evaluate.json"], overrides=common)
        metrics = evaluated["evaluation"]["metrics"]
        rows.append({
            "method": method,
            "train_s": middle - start,
            "eval_s": time.perf_counter() - middle,
            "final_loss": float(trained["final_loss"]),
            **{name: float(metrics.get(f"eval_{name}", float("nan"))) for name in _COLUMNS[4:]},
        })
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(_COLUMNS), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    csv_path = _write(out_dir / "comparison.csv", buffer.getvalue())
    title = "# Anomaly detection: " + " vs ".join(methods) + " (synthetic chest radiographs, same training)\n\n"
    markdown = _write(out_dir / "comparison.md", title + _table(rows))
    summary_metrics = {f"{row['method']}_{name}": row[name] for row in rows for name in _COLUMNS[1:]}
    run_id = log_to_run_folder(
        out_dir, summary_metrics, {"comparison": out_dir / "comparison.md", "comparison_csv": csv_path},
        experiment_name=EXPERIMENT_NAME, tracking_uri=uri, run_name="comparison",
    )
    return {"rows": rows, "csv": str(csv_path), "markdown": str(markdown), "tracking_uri": uri, "run_id": run_id}
