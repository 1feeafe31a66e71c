"""What every study shares: its MLflow experiment, a resumable loop over runs, and its CSV + markdown + PNG outputs.

A study trains many runs through the real bundles; each run lives in ``<study>/runs/<run.name>/`` and is done when
its ``result.json`` (the run's CSV row) exists. :func:`run_resumable` skips finished runs, deletes a finished run's
training checkpoints (only needed to resume a training), and rewrites the study's outputs after every run, so an
interrupted study already holds its table and figure so far.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import pandas as pd
from matplotlib.figure import Figure
from mlflow.tracking import MlflowClient
from tqdm.auto import tqdm

from medssl.engine.checkpoints import atomic_write
from medssl.engine.tracking import resolve_tracking
from medssl.errors import CheckpointError

__all__ = [
    "NamedRun",
    "study_experiment",
    "given_checkpoint",
    "mean_sd",
    "aggregate_over_seeds",
    "init_curves_figure",
    "write_study_outputs",
    "run_resumable",
]

RESULT = "result.json"
Rows = list[dict[str, Any]]


class NamedRun(Protocol):
    """A study run: its ``name`` is its folder and MLflow run name."""

    @property
    def name(self) -> str: ...


def study_experiment(out_dir: Path, experiment_name: str) -> str:
    """The study's tracking URI, with its experiment created (artifacts in the study folder for the local store).

    Args:
        out_dir: the study folder (the default SQLite store lives there; ``MLFLOW_TRACKING_URI`` wins).
        experiment_name: the study's one MLflow experiment.

    Returns:
        the tracking URI.
    """
    uri, artifact_location = resolve_tracking(out_dir)
    client = MlflowClient(uri)
    if client.get_experiment_by_name(experiment_name) is None:
        client.create_experiment(experiment_name, artifact_location=artifact_location)
    return uri


def given_checkpoint(pretrained: str | os.PathLike, recipe: str) -> Path:
    """The absolute path of a pre-training checkpoint given to a study.

    Args:
        pretrained: the checkpoint.
        recipe: the pre-training bundle that makes one (named in the message).

    Returns:
        the resolved path.

    Raises:
        CheckpointError: when the file does not exist.
    """
    path = Path(pretrained).resolve()
    if not path.is_file():
        raise CheckpointError(
            f"pretrained checkpoint {path} does not exist; make one with `medssl pretrain {recipe}`, or give none "
            "to pre-train in the study folder."
        )
    return path


def mean_sd(mean: float, sd: float, digits: int) -> str:
    """``"mean ± sd"`` with ``digits`` decimals; ``"mean"`` when sd is undefined (one run), ``"n/a"`` without mean."""
    if not math.isfinite(mean):
        return "n/a"
    return f"{mean:.{digits}f}" if not math.isfinite(sd) else f"{mean:.{digits}f} ± {sd:.{digits}f}"


def aggregate_over_seeds(
    rows: Sequence[Mapping[str, Any]],
    groups: Sequence[str],
    metrics: Sequence[str],
    inits: Sequence[str],
    descending: bool = False,
) -> pd.DataFrame:
    """Mean and sample sd over seeds of each metric per group and initialisation.

    Args:
        rows: one per run, with the ``groups`` columns, ``init`` and the metrics.
        groups: the columns of a study point (e.g. ``("num_labelled", "labelled")``); the first orders the table.
        metrics: the metric columns.
        inits: the initialisations, in table order within a point.
        descending: order the points from the largest first.

    Returns:
        one row per (point, init): the ``groups`` columns, ``init``, ``<metric>_mean``, ``<metric>_sd`` (NaN for
        one run), ``runs``.
    """
    grouped = pd.DataFrame(rows).groupby([*groups, "init"], sort=False)[list(metrics)]
    table = grouped.mean().add_suffix("_mean").join(grouped.std().add_suffix("_sd"))
    table["runs"] = grouped.size()
    table = table.reset_index()
    table["init_order"] = table["init"].map(list(inits).index)
    table = table.sort_values([groups[0], "init_order"], ascending=[not descending, True])
    return table.drop(columns="init_order").reset_index(drop=True)


def init_curves_figure(
    table: pd.DataFrame,
    x: str,
    metrics: Mapping[str, str],
    inits: Sequence[str],
    labels: Mapping[float, str],
    xlabel: str,
    title: str,
    path: Path,
) -> Path:
    """One panel per metric: mean ± sd against ``x`` (log2 axis), one curve per initialisation, as a PNG.

    Args:
        table: from :func:`aggregate_over_seeds`.
        x: the column on the x axis.
        metrics: metric column -> panel title.
        inits: the initialisations to draw (absent ones are skipped).
        labels: x tick value -> its label.
        xlabel: the x axis label.
        title: the figure title.
        path: the PNG (written atomically).

    Returns:
        ``path``.
    """
    figure = Figure(figsize=(4 * len(metrics), 3.6), layout="constrained")
    for axis, (key, panel) in zip(figure.subplots(1, len(metrics)), metrics.items()):
        for init in inits:
            part = table[table["init"] == init]
            if part.empty:
                continue
            axis.errorbar(part[x], part[f"{key}_mean"], yerr=part[f"{key}_sd"].fillna(0.0), marker="o", capsize=3,
                          label=init)
        axis.set_xscale("log", base=2)
        axis.set_xticks(list(labels), labels=list(labels.values()))
        axis.minorticks_off()
        axis.set_xlabel(xlabel)
        axis.set_title(panel)
        axis.grid(alpha=0.3)
    axis.legend()
    figure.suptitle(title)
    return atomic_write(path, lambda temporary: figure.savefig(temporary, format="png", dpi=110))


def write_study_outputs(
    rows: Sequence[Mapping[str, Any]],
    out_dir: Path,
    stem: str,
    table: Callable[[Sequence[Mapping[str, Any]]], str],
    figure: Callable[[Sequence[Mapping[str, Any]], Path], Path],
) -> dict[str, Any]:
    """Write ``<stem>.csv`` (one row per run), ``<stem>.md`` (the table) and ``<stem>.png`` (the figure), atomically.

    Args:
        rows: one per run.
        out_dir: the study folder.
        stem: the files' name.
        table: rows -> markdown table.
        figure: (rows, PNG path) -> the written PNG.

    Returns:
        ``{"table": markdown, "csv", "markdown", "figure": paths}``.
    """
    markdown = table(rows)
    paths = {
        "csv": atomic_write(out_dir / f"{stem}.csv",
                            lambda temporary: pd.DataFrame(rows).to_csv(temporary, index=False)),
        "markdown": atomic_write(out_dir / f"{stem}.md", lambda temporary: Path(temporary).write_text(markdown + "\n")),
        "figure": figure(rows, out_dir / f"{stem}.png"),
    }
    return {"table": markdown, **paths}


def run_resumable(
    runs: Sequence[NamedRun],
    out_dir: Path,
    train: Callable[[Any, Path], dict[str, Any]],
    write_outputs: Callable[[Rows, Path], dict[str, Any]],
    desc: str,
    progress: bool = True,
) -> tuple[Rows, dict[str, Any], int]:
    """Train every unfinished run of a study in order, keeping each run's row, and rewrite the outputs after each.

    Args:
        runs: the study's runs, in order.
        out_dir: the study folder; run ``r`` lives in ``out_dir/runs/<r.name>``.
        train: ``(run, run_dir) -> row``: trains and evaluates one run (a run interrupted in training resumes from
            its checkpoints there).
        write_outputs: ``(rows so far, out_dir) -> outputs`` (e.g. :func:`write_study_outputs`).
        desc: the progress bar's label.
        progress: show a progress bar over the runs.

    Returns:
        ``(rows, outputs of the last write, number of runs trained by this call)``.
    """
    rows: Rows = []
    outputs: dict[str, Any] = {}
    ran = 0
    with tqdm(total=len(runs), desc=desc, unit="run", disable=not progress) as bar:
        for run in runs:
            run_dir = out_dir / "runs" / run.name
            result = run_dir / RESULT
            bar.set_postfix_str(run.name)
            if not result.is_file():
                row = train(run, run_dir)
                atomic_write(result, lambda temporary: Path(temporary).write_text(json.dumps(row, indent=1)))
                shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # only needed to resume the training
                ran += 1
            rows.append(json.loads(result.read_text()))
            outputs = write_outputs(rows, out_dir)
            bar.update()
    return rows, outputs, ran
