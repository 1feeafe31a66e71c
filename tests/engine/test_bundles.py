"""Locating bundles, validating overrides, running a bundle in-process and surfacing user errors."""

import json
from pathlib import Path

import pytest
from monai.bundle import ConfigParser

import medssl
from medssl.engine.bundles import (
    BUNDLES_ENV,
    bundle_dir,
    bundles_root,
    parse_bundle_item,
    run_bundle,
    validate_overrides,
)
from medssl.errors import ConfigError, DataError


def write_bundle(root, name, config):
    configs = root / name / "configs"
    configs.mkdir(parents=True)
    (configs / "train.json").write_text(json.dumps(config))
    (configs / "metadata.json").write_text(json.dumps({"version": "0.0.1"}))
    return root / name


def test_bundles_live_next_to_the_package_unless_the_environment_says_otherwise(tmp_path, monkeypatch):
    monkeypatch.delenv(BUNDLES_ENV, raising=False)
    repo = bundles_root().parent
    assert (repo / "medssl").resolve() == Path(medssl.__file__).resolve().parent
    assert bundle_dir("cine_mae") == repo / "bundles" / "cine_mae"
    write_bundle(tmp_path, "mine", {})
    monkeypatch.setenv(BUNDLES_ENV, str(tmp_path))
    assert bundle_dir("mine") == tmp_path / "mine"


def test_unknown_bundle_suggests_the_closest(tmp_path, monkeypatch):
    write_bundle(tmp_path, "cine_mae", {})
    monkeypatch.setenv(BUNDLES_ENV, str(tmp_path))
    with pytest.raises(ConfigError, match="no bundle 'cine_mea' .* Did you mean 'cine_mae'\\? Available: cine_mae"):
        bundle_dir("cine_mea")


CONFIG = {"epochs": 2, "run_dir": "runs", "model": {"depth": 4, "embed_dim": 8}}


@pytest.mark.parametrize(
    "key, message",
    [
        ("epoch", "key 'epoch' for bundle 'b'. Did you mean 'epochs'\\? Keys at the top level: epochs, model, run_dir"),
        ("model#dept", "key 'model#dept' .* Did you mean 'model#depth'\\? Keys under 'model': depth, embed_dim"),
        ("zzz", "unknown config key 'zzz' for bundle 'b'. Keys at the top level"),
    ],
)
def test_mistyped_override(key, message):
    parser = ConfigParser(CONFIG)
    with pytest.raises(ConfigError, match=message):
        validate_overrides(parser, {key: 1}, "b")
    validate_overrides(parser, {"epochs": 3, "model#depth": 2, "model::embed_dim": 4}, "b")


def test_run_bundle_runs_the_workflow_and_returns_its_summary(tmp_path, monkeypatch):
    config = {
        "imports": ["$import json", "$import os"],
        "run_dir": str(tmp_path / "run"),
        "value": 1,
        "initialize": ["$os.makedirs(@run_dir, exist_ok=True)"],
        "run": ["$open(os.path.join(@run_dir, 'summary.json'), 'w').write(json.dumps({'value': @value}))"],
    }
    write_bundle(tmp_path, "tiny", config)
    monkeypatch.setenv(BUNDLES_ENV, str(tmp_path))
    assert run_bundle("tiny", overrides={"value": 7}) == {"value": 7}
    with pytest.raises(ConfigError, match="Did you mean 'value'"):
        run_bundle("tiny", overrides={"valeu": 7})
    with pytest.raises(ConfigError, match="has no config file .*other.json"):
        run_bundle("tiny", config_files=["configs/other.json"])


def test_user_errors_raised_inside_config_expressions_come_out_unwrapped(tmp_path, monkeypatch):
    config = {
        "imports": ["$import medssl", "$import medssl.data.cine"],
        "dataset_dir": None,
        "run_dir": str(tmp_path),
        "run": ["$medssl.data.cine.load_cine_datalist(@dataset_dir)"],
    }
    write_bundle(tmp_path, "data", config)
    monkeypatch.setenv(BUNDLES_ENV, str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no NIfTI files found in .*empty"):
        run_bundle("data", overrides={"dataset_dir": str(tmp_path / "empty")})
    with pytest.raises(DataError, match="missing does not exist"):
        run_bundle("data", overrides={"dataset_dir": str(tmp_path / "missing")})


def test_parse_bundle_item_instantiates_one_item_without_running(tmp_path, monkeypatch):
    config = {
        "imports": ["$import medssl", "$import medssl.data.cine"],
        "dataset_dir": None,
        "size": 2,
        "shape": "$[@size] * 3",
        "datalist": "$medssl.data.cine.load_cine_datalist(@dataset_dir)",
        "run": ["$1 / 0"],
    }
    write_bundle(tmp_path, "items", config)
    monkeypatch.setenv(BUNDLES_ENV, str(tmp_path))
    assert parse_bundle_item("items", "shape", overrides={"size": 4}) == [4, 4, 4]
    with pytest.raises(ConfigError, match="bundle 'items' has no config item 'network'"):
        parse_bundle_item("items", "network")
    with pytest.raises(ConfigError, match="Did you mean 'size'"):
        parse_bundle_item("items", "shape", overrides={"sise": 4})
    with pytest.raises(DataError, match="missing does not exist"):
        parse_bundle_item("items", "datalist", overrides={"dataset_dir": str(tmp_path / "missing")})
