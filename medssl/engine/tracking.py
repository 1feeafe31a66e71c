"""MLflow experiment tracking for training runs (rank 0 only), built on MONAI's ``MLFlowHandler``.

By default the store is a local SQLite database in the run folder (``sqlite:///<run_dir>/mlflow.db``) with
artifacts under ``<run_dir>/mlartifacts`` (set explicitly on the experiment: MLflow 3 refuses plain file stores);
``MLFLOW_TRACKING_URI`` switches to a shared server. A run logs its hyperparameters as params, every scalar of the
trainer's output (``loss``, ``loss_<view>``, ``lr``) per iteration, the epoch metrics per epoch, artifacts (figures,
weights, configs), and writes ``<run_dir>/summary.json``. A run folder keeps its MLflow run id, so a resumed
training continues the same MLflow run, and results computed later (an evaluation) land in it too
(:func:`log_to_run_folder`). Only hyperparameters and file artifacts are logged: never data paths or
subject identifiers.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ignite.engine import Engine
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from monai.handlers import MLFlowHandler
from monai.utils import path_to_sqlite_uri, path_to_uri

from medssl.engine.checkpoints import atomic_write
from medssl.engine.distributed import is_main_process
from medssl.engine.trainer import EPOCH_LOSS

__all__ = ["TRACKING_URI_ENV", "resolve_tracking", "flatten_params", "MLflowTracker", "log_to_run_folder"]

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
_RUN_RECORD = "mlflow_run.json"
_SUMMARY = "summary.json"
logger = logging.getLogger(__name__)


def resolve_tracking(run_dir: str | os.PathLike, tracking_uri: str | None = None) -> tuple[str, str | None]:
    """Tracking URI and experiment artifact location of a run folder.

    Args:
        run_dir: the run folder.
        tracking_uri: explicit URI; ``MLFLOW_TRACKING_URI`` (if set) takes precedence over it.

    Returns:
        ``(uri, artifact_location)``: for the default local store ``sqlite:///<run_dir>/mlflow.db`` and the URI of
        ``<run_dir>/mlartifacts``; for any other store the URI and None (the server decides where artifacts go).
    """
    uri = os.environ.get(TRACKING_URI_ENV) or tracking_uri
    if uri:
        return uri, None
    run_dir = Path(run_dir).resolve()
    return path_to_sqlite_uri(str(run_dir / "mlflow.db")), path_to_uri(run_dir / "mlartifacts")


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Flatten nested hyperparameters into MLflow params with dotted names.

    Args:
        params: nested mapping; sequences are kept whole (``[96, 96, 8]``).
        prefix: prepended to every name.

    Returns:
        ``{"model.depth": "4", "views.sax.image_size": "[96, 96, 8]", ...}``.
    """
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, prefix=f"{name}."))
        else:
            flat[name] = str(list(value) if isinstance(value, tuple) else value)
    return flat


def _recorded_run(client: MlflowClient, record: Path, tracking_uri: str) -> Any:
    """The MLflow run a run folder recorded, if it is in this store and still exists; else None."""
    if not record.is_file():
        return None
    recorded = json.loads(record.read_text())
    if recorded.get("tracking_uri") != tracking_uri:
        return None
    try:
        return client.get_run(recorded["run_id"])
    except (MlflowException, KeyError):
        logger.warning(f"the MLflow run recorded in {record} is gone; starting a new run.")
        return None


def _record_run(record: Path, run_id: str, tracking_uri: str) -> None:
    text = json.dumps({"run_id": run_id, "tracking_uri": tracking_uri})
    atomic_write(record, lambda temporary: Path(temporary).write_text(text))


def _new_run_name() -> str:
    return f"run_{time.strftime('%Y%m%d_%H%M%S')}"


def _scalars(output: Any) -> dict[str, float] | None:
    if not isinstance(output, Mapping):
        return None
    return {key: float(value) for key, value in output.items() if isinstance(value, (int, float))}


class _RunFolderMLFlowHandler(MLFlowHandler):
    """``MLFlowHandler`` that continues the MLflow run recorded in the run folder and logs only new params."""

    def __init__(self, record: Path, params: dict[str, str], tracking_uri: str, **kwargs: Any) -> None:
        super().__init__(tracking_uri=tracking_uri, **kwargs)
        self.record = record
        self.params = params
        self.tracking_uri = tracking_uri

    def start(self, engine: Engine) -> None:
        # MONAI would otherwise adopt any unfinished run of the experiment, e.g. another folder's killed run on a
        # shared server: continue this folder's own run, or start a new one.
        self._set_experiment()
        if self.cur_run is None:
            self.cur_run = _recorded_run(self.client, self.record, self.tracking_uri)
        if self.cur_run is None:
            name = self.run_name or _new_run_name()
            self.cur_run = self.client.create_run(self.experiment.experiment_id, run_name=name)
        super().start(engine)
        params = dict(self.params)
        self._delete_exist_param_in_dict(params)
        self._log_params(params)
        _record_run(self.record, self.run_id, self.tracking_uri)

    @property
    def run_id(self) -> str | None:
        return None if self.cur_run is None else self.cur_run.info.run_id


class MLflowTracker:
    """Track a training run in MLflow (rank 0 only); see the module docstring for what is logged.

    Attach it to the trainer, then call :meth:`finish` after training to log the final artifacts, write
    ``<run_dir>/summary.json`` and end the MLflow run.

    Args:
        run_dir: the run folder (default store, run record, summary).
        params: hyperparameters, nested mappings allowed (flattened with :func:`flatten_params`).
        experiment_name: MLflow experiment.
        run_name: MLflow run name; None for a timestamp.
        tracking_uri: store URI; None for the run folder's SQLite store. ``MLFLOW_TRACKING_URI`` overrides both.
        artifacts: ``{artifact folder: file or folder path}`` logged by :meth:`finish` (e.g. final weights,
            bundle configs); missing paths are skipped with a warning.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike,
        params: Mapping[str, Any] | None = None,
        experiment_name: str = "medssl",
        run_name: str | None = None,
        tracking_uri: str | None = None,
        artifacts: Mapping[str, str | os.PathLike] | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.params = flatten_params(params or {})
        self.experiment_name = experiment_name
        self.run_name = run_name
        self.tracking_uri, self.artifact_location = resolve_tracking(run_dir, tracking_uri)
        self.artifacts = dict(artifacts or {})
        self.handler: _RunFolderMLFlowHandler | None = None
        self.last_figure: Path | None = None

    def attach(self, engine: Engine) -> None:
        """Start tracking ``engine`` (on rank 0 only: other ranks never touch the store)."""
        if not is_main_process():
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.handler = _RunFolderMLFlowHandler(
            record=self.run_dir / _RUN_RECORD,
            params=self.params,
            tracking_uri=self.tracking_uri,
            artifact_location=self.artifact_location,
            experiment_name=self.experiment_name,
            run_name=self.run_name,
            output_transform=_scalars,
            optimizer_param_names=(),  # the trainer's output already carries the LR each step used
            iteration_log=True,
            epoch_log=True,
        )
        self.handler.attach(engine)

    @property
    def run_id(self) -> str | None:
        """The MLflow run id once tracking has started on this rank, else None."""
        return None if self.handler is None else self.handler.run_id

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        """Log a file or folder into the run under ``artifact_path`` (no-op off rank 0 or before the run starts).

        The last file logged under ``"figures"`` becomes the summary's ``"figure"``.
        """
        if self.handler is None or self.handler.cur_run is None:
            return
        path = Path(path)
        log = self.handler.client.log_artifacts if path.is_dir() else self.handler.client.log_artifact
        log(self.run_id, str(path), artifact_path)
        if artifact_path == "figures":
            self.last_figure = path

    def finish(self, engine: Engine) -> dict[str, Any] | None:
        """Log the artifacts, write ``<run_dir>/summary.json``, end the MLflow run; returns the summary (rank 0).

        Args:
            engine: the trainer that ran.

        Returns:
            ``{"run_dir", "tracking_uri", "experiment_name", "run_id", "epochs", "iterations", "final_loss",
            "epoch_loss", "figure", "artifacts"}``; None off rank 0 or when tracking never started.
        """
        if self.handler is None or self.handler.cur_run is None:
            return None
        for folder, path in self.artifacts.items():
            if Path(path).exists():
                self.log_artifact(path, folder)
            else:
                logger.warning(f"artifact {path} for '{folder}' does not exist; not logged.")
        output = engine.state.output if isinstance(engine.state.output, Mapping) else {}
        epoch_loss = engine.state.metrics.get(EPOCH_LOSS)
        summary = {
            "run_dir": str(self.run_dir.resolve()),
            "tracking_uri": self.tracking_uri,
            "experiment_name": self.experiment_name,
            "run_id": self.run_id,
            "epochs": engine.state.epoch,
            "iterations": engine.state.iteration,
            "final_loss": output.get("loss"),
            "epoch_loss": None if epoch_loss is None or math.isnan(float(epoch_loss)) else float(epoch_loss),
            "figure": None if self.last_figure is None else str(self.last_figure.resolve()),
            "artifacts": {folder: str(Path(path).resolve()) for folder, path in self.artifacts.items()},
        }
        text = json.dumps(summary, indent=2)
        atomic_write(self.run_dir / _SUMMARY, lambda temporary: Path(temporary).write_text(text))
        self.handler.close()
        return summary


def log_to_run_folder(
    run_dir: str | os.PathLike,
    metrics: Mapping[str, float],
    artifacts: Mapping[str, str | os.PathLike] | None = None,
    experiment_name: str = "medssl",
    tracking_uri: str | None = None,
    run_name: str | None = None,
) -> str | None:
    """Log results computed after training (e.g. an evaluation) into the MLflow run of a run folder (rank 0 only).

    Continues the run recorded in the folder (the training's, see :class:`MLflowTracker`) when it lives in the same
    store; otherwise creates a run in ``experiment_name`` and records it, so later calls and a later training add to
    it. Non-finite metric values are skipped with a warning (MLflow cannot compare them).

    Args:
        run_dir: the run folder.
        metrics: metric name -> value, logged at step 0.
        artifacts: ``{artifact folder: file or folder}`` to log.
        experiment_name: experiment of a new run.
        tracking_uri: store URI; None for the run folder's SQLite store. ``MLFLOW_TRACKING_URI`` overrides both.
        run_name: name of a new run; None for a timestamp.

    Returns:
        the MLflow run id; None off rank 0.
    """
    if not is_main_process():
        return None
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    uri, artifact_location = resolve_tracking(run_dir, tracking_uri)
    client = MlflowClient(uri)
    record = run_dir / _RUN_RECORD
    run = _recorded_run(client, record, uri)
    if run is None:
        experiment = client.get_experiment_by_name(experiment_name)
        experiment_id = (
            experiment.experiment_id
            if experiment is not None
            else client.create_experiment(experiment_name, artifact_location=artifact_location)
        )
        run = client.create_run(experiment_id, run_name=run_name or _new_run_name())
        client.set_terminated(run.info.run_id)
        _record_run(record, run.info.run_id, uri)
    run_id = run.info.run_id
    values = {name: float(value) for name, value in metrics.items()}
    skipped = sorted(name for name, value in values.items() if not math.isfinite(value))
    if skipped:
        logger.warning(f"not logging non-finite metrics {skipped}.")
    timestamp = int(time.time() * 1000)
    client.log_batch(
        run_id, metrics=[Metric(name, value, timestamp, 0) for name, value in values.items() if name not in skipped]
    )
    for folder, path in (artifacts or {}).items():
        path = Path(path)
        (client.log_artifacts if path.is_dir() else client.log_artifact)(run_id, str(path), folder)
    return run_id
