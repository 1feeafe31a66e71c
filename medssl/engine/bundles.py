"""Locate and run medssl's MONAI bundles in-process (the Python API and ``medssl pretrain`` share the configs).

Bundles live in ``bundles/<recipe>`` at the repository root, next to the ``medssl`` package; the
``MEDSSL_BUNDLES`` environment variable points elsewhere. Bundle configs can execute code (``$`` expressions,
``_target_``): only run bundles you trust.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from monai.bundle import ConfigParser, ConfigWorkflow
from monai.bundle.reference_resolver import ReferenceResolver
from monai.bundle.utils import ID_SEP_KEY

import medssl
from medssl.errors import ConfigError, MedsslError

__all__ = [
    "BUNDLES_ENV",
    "bundles_root",
    "bundle_dir",
    "validate_overrides",
    "run_bundle",
    "parse_bundle_item",
    "export_inference_bundle",
]

BUNDLES_ENV = "MEDSSL_BUNDLES"
_DEFAULT_CONFIG = "configs/train.json"


def bundles_root() -> Path:
    """The folder holding the bundles: ``$MEDSSL_BUNDLES``, else ``bundles/`` beside the ``medssl`` package."""
    configured = os.environ.get(BUNDLES_ENV)
    return Path(configured) if configured else Path(medssl.__file__).resolve().parent.parent / "bundles"


def _is_path(recipe: str | os.PathLike) -> bool:
    """Whether ``recipe`` names a folder (absolute, or with a path separator) rather than a recipe."""
    text = os.fspath(recipe)
    return os.path.isabs(text) or os.sep in text or (os.altsep is not None and os.altsep in text)


def bundle_dir(recipe: str | os.PathLike) -> Path:
    """The folder of a bundle: ``<bundles_root()>/<recipe>`` for a recipe name (``"cine_seg"``), or the folder itself
    for a path (absolute or containing a separator, e.g. ``runs/cine_seg``: a run folder made a bundle by
    :func:`export_inference_bundle`, or an imported one).

    Raises:
        ConfigError: when there is no such bundle (no ``configs/`` folder); for a name, lists the close matches and
            the available recipes.
    """
    if _is_path(recipe):
        path = Path(recipe).resolve()
        if not (path / "configs").is_dir():
            raise ConfigError(f"{recipe} is not a bundle folder: it has no configs/ folder.")
        return path
    root = bundles_root()
    path = root / recipe
    if (path / "configs").is_dir():
        return path
    available = sorted(p.name for p in root.iterdir() if (p / "configs").is_dir()) if root.is_dir() else []
    close = difflib.get_close_matches(recipe, available, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise ConfigError(
        f"no bundle '{recipe}' in {root} (set {BUNDLES_ENV} to another folder).{hint} "
        f"Available: {', '.join(available) or 'none'}."
    )


def validate_overrides(parser: ConfigParser, overrides: Mapping[str, Any], recipe: str) -> None:
    """Check that every override names an existing config id (``key`` or nested ``key#sub``).

    Args:
        parser: the bundle's parsed configs.
        overrides: config id -> value.
        recipe: bundle name for the message.

    Raises:
        ConfigError: for an unknown id, with a "did you mean" suggestion among the keys at that level.
    """
    for key in overrides:
        if key in parser:
            continue
        parts = ReferenceResolver.split_id(key)
        parent = ID_SEP_KEY.join(parts[:-1])
        siblings = parser[parent] if parent in parser else None  # parser[""] is the whole config
        known = sorted(k for k in siblings if not str(k).startswith("_")) if isinstance(siblings, Mapping) else []
        close = difflib.get_close_matches(parts[-1], known, n=1)
        # Shown with "#", the separator of MONAI's command-line examples (--net#input_chns).
        hint = f" Did you mean '{'#'.join([*parts[:-1], close[0]])}'?" if close else ""
        scope = f"under '{'#'.join(parts[:-1])}'" if parent else "at the top level"
        raise ConfigError(
            f"unknown config key '{key}' for bundle '{recipe}'.{hint} Keys {scope}: {', '.join(known) or 'none'}."
        )


def _user_error(error: BaseException) -> MedsslError | None:
    """The first MedsslError in an exception's cause chain (MONAI wraps errors raised inside config expressions)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, MedsslError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def _read_configs(
    recipe: str | os.PathLike, config_files: Sequence[str] | None, overrides: Mapping[str, Any] | None
) -> tuple[list[Path], ConfigParser, dict[str, Any]]:
    """A bundle's config files (checked), merged and parsed, and the validated overrides (with ``bundle_root``)."""
    root = bundle_dir(recipe)
    files = [root / name for name in (config_files or [_DEFAULT_CONFIG])]
    absent = [str(path) for path in files if not path.is_file()]
    if absent:
        raise ConfigError(f"bundle '{recipe}' has no config file {', '.join(absent)}.")
    parser = ConfigParser()
    parser.read_config([str(path) for path in files])
    overrides = dict(overrides or {})
    validate_overrides(parser, overrides, recipe)
    if "bundle_root" in parser:
        overrides.setdefault("bundle_root", str(root))
    return files, parser, overrides


@contextlib.contextmanager
def _unwrapped_user_errors() -> Iterator[None]:
    """Re-raise a user error (bad data, bad checkpoint) that MONAI wrapped while evaluating a config expression."""
    try:
        yield
    except Exception as e:
        user_error = _user_error(e)
        if user_error is not None:
            # Its own traceback still points into the config expression that raised it.
            raise user_error from None
        raise


def parse_bundle_item(
    recipe: str | os.PathLike, item: str, config_files: Sequence[str] | None = None, overrides: Mapping[str, Any] | None = None
) -> Any:
    """Instantiate one item of a bundle's configs (a network, a predictor, a data list) without running it.

    Args:
        recipe: bundle name, e.g. ``"cine_seg"``, or a bundle folder (see :func:`bundle_dir`).
        item: the config id, e.g. ``"predictor"`` or ``"network_def"``.
        config_files: config files relative to the bundle folder (merged in order); default
            ``["configs/train.json"]``.
        overrides: config id -> value, validated as for :func:`run_bundle`.

    Returns:
        the parsed, instantiated content of ``item``.

    Raises:
        ConfigError: for an unknown bundle, config file, override key or item.
        DataError, CheckpointError: from instantiating it.
    """
    _, parser, overrides = _read_configs(recipe, config_files, overrides)
    if item not in parser:
        raise ConfigError(f"bundle '{recipe}' has no config item '{item}'.")
    parser.update(overrides)
    with _unwrapped_user_errors():
        return parser.get_parsed_content(item)


def export_inference_bundle(
    bundle_root: str | os.PathLike, run_dir: str | os.PathLike, settings: Mapping[str, Any]
) -> Path | None:
    """Make a finished run folder a self-contained MONAI bundle for inference, with the settings it was trained with.

    A training run's ``models/model.safetensors`` only fits the network the run built, and a run started with
    command-line overrides (another view geometry, a smaller model) builds another network than the recipe's
    defaults. Called at the end of training (``finalize``), this writes ``<run_dir>/configs/inference.json``: the
    recipe's ``inference.json`` with ``settings`` (the resolved values of the training config) in place of its
    defaults and with ``run_dir`` pointing at the run folder; and copies ``metadata.json`` and ``logging.conf``
    beside it. The run folder is then a bundle: ``python -m monai.bundle run --config_file
    <run_dir>/configs/inference.json --input_dir ...`` and ``medssl analyze --bundle <run_dir>`` use it as trained,
    and :func:`parse_bundle_item` takes it as a path. Only the main process writes (under ``torchrun``).

    Args:
        bundle_root: the recipe's bundle folder (holding ``configs/inference.json``).
        run_dir: the run folder.
        settings: inference config id -> resolved value, e.g. ``{"views": ..., "model": ..., "class_names": ...}``;
            JSON-serialisable, each already present in the recipe's ``inference.json``.

    Returns:
        the written ``inference.json``, or None on a non-main process.

    Raises:
        ConfigError: when the recipe has no ``inference.json`` or a setting is not one of its keys.
    """
    from medssl.engine.checkpoints import atomic_write
    from medssl.engine.distributed import is_main_process

    if not is_main_process():
        return None
    source = Path(bundle_root) / "configs"
    if not (source / "inference.json").is_file():
        raise ConfigError(f"bundle {bundle_root} has no configs/inference.json to export.")
    config = json.loads((source / "inference.json").read_text())
    unknown = sorted(set(settings) - set(config))
    if unknown:
        raise ConfigError(f"cannot export {unknown}: not keys of {source / 'inference.json'}.")
    run_dir = Path(run_dir).resolve()
    config.update(settings)
    config.update({"bundle_root": str(run_dir), "run_dir": "@bundle_root"})
    target = run_dir / "configs"
    for name in ("metadata.json", "logging.conf"):
        if (source / name).is_file():
            atomic_write(target / name, lambda tmp, name=name: Path(tmp).write_bytes((source / name).read_bytes()))
    return atomic_write(target / "inference.json", lambda tmp: Path(tmp).write_text(json.dumps(config, indent=4)))


def run_bundle(
    recipe: str, config_files: Sequence[str] | None = None, overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Run a bundle's training workflow in this process (``initialize``, ``run``, ``finalize``).

    Equivalent to ``python -m monai.bundle run --config_file <configs> --<key> <value> ...`` but with the overrides
    validated first and user errors (bad data, bad checkpoints) re-raised as the medssl error they are.

    Args:
        recipe: bundle name, e.g. ``"cine_mae"``.
        config_files: config files relative to the bundle folder (merged in order); default
            ``["configs/train.json"]``.
        overrides: config id -> value, e.g. ``{"dataset_dir": "/data/cine", "epochs": 5, "run_dir": "runs/x"}``.

    Returns:
        the run's summary (``<run_dir>/summary.json``): ``run_dir``, ``tracking_uri``, ``experiment_name``,
        ``run_id``, ``epochs``, ``iterations``, ``final_loss``, ``epoch_loss``, ``figure``, ``artifacts``.

    Raises:
        ConfigError: for an unknown bundle or override key, or a missing config file.
        DataError, CheckpointError: from the run, unwrapped from MONAI's config-evaluation errors.
    """
    files, parser, overrides = _read_configs(recipe, config_files, overrides)
    # metadata.json and logging.conf are read from the first config file's folder, as the MONAI CLI does.
    workflow = ConfigWorkflow(config_file=[str(path) for path in files], workflow_type="train", **overrides)
    with _unwrapped_user_errors():
        workflow.initialize()
        workflow.run()
        workflow.finalize()
    run_dir = Path(workflow.parser.get_parsed_content("run_dir"))
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        raise ConfigError(f"bundle '{recipe}' finished without writing {summary_path}; does it track the run?")
    return json.loads(summary_path.read_text())
