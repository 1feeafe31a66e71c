"""MONAI's own bundle tools pass, offline, on every bundle under ``bundles/`` (each folder with configs/metadata.json).

Through the real command line, ``python -m monai.bundle ...`` in a subprocess whose sockets are disabled:

- ``verify_metadata`` against the repository's ``bundles/metadata_schema.json`` (given as ``--filepath``, so the
  schema is never downloaded);
- ``verify_net_in_out`` on the bundle's export network: ``export_network_def`` when the config has one, else
  ``network_def``, with weights made here (a freshly initialised network saved where the config reads them);
- ``ckpt_export`` of that network to TorchScript by tracing; the file is read back and must match the eager network
  within ``ATOL`` and carry the pretrained weights.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import load_net_with_metadata
from safetensors.torch import load_file

from medssl.engine.checkpoints import save_network_weights
from medssl.engine.export import save_state_dict

REPO = Path(__file__).resolve().parents[2]
SCHEMA = REPO / "bundles" / "metadata_schema.json"
BUNDLES = sorted(path for path in (REPO / "bundles").iterdir() if (path / "configs" / "metadata.json").is_file())
# TorchScript (plain F.linear products) against the eager network (oneDNN products on CPU), float32 outputs of unit
# scale: measured differences are about 2e-6.
ATOL = 1e-5
# Mandatory metadata keys of the MONAI Bundle Specification (https://docs.monai.io/en/latest/mb_specification.html),
# plus the changelog and schema reference every medssl bundle carries.
MANDATORY = (
    "schema", "version", "changelog", "monai_version", "pytorch_version", "numpy_version", "required_packages_version",
    "task", "description", "authors", "copyright", "network_data_format",
)
TENSOR_KEYS = (
    "type", "format", "modality", "num_channels", "spatial_shape", "dtype", "value_range", "is_patch_data",
    "channel_def",
)
NO_NETWORK = """\
import socket


def _refuse(*args, **kwargs):
    raise OSError("network access is disabled in this test")


socket.socket.connect = socket.socket.connect_ex = _refuse
socket.create_connection = socket.getaddrinfo = _refuse
"""


@pytest.fixture(scope="module")
def offline_env(tmp_path_factory):
    """Environment for subprocesses whose every network connection fails (a ``sitecustomize`` on PYTHONPATH)."""
    guard = tmp_path_factory.mktemp("offline")
    (guard / "sitecustomize.py").write_text(NO_NETWORK)
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(guard), env.get("PYTHONPATH")]))
    env["OMP_NUM_THREADS"] = "1"
    return env


def monai_bundle(command, args, env, cwd):
    """Run ``python -m monai.bundle <command> <args>``; returns the completed process with its captured output."""
    return subprocess.run(
        [sys.executable, "-m", "monai.bundle", command, *args], env=env, cwd=cwd, capture_output=True, text=True,
        timeout=300,
    )


def output_of(result):
    return f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"


def config_file(bundle):
    """The config holding the bundle's networks: ``inference.json`` when there is one, else ``train.json``."""
    configs = bundle / "configs"
    return next(configs / name for name in ("inference.json", "train.json") if (configs / name).is_file())


def read_config(config, overrides):
    parser = ConfigParser()
    parser.read_config(str(config))
    parser.update(overrides)
    return parser


def overrides_args(overrides):
    return [item for key, value in overrides.items() for item in (f"--{key}", str(value))]


@pytest.fixture(scope="module", params=BUNDLES, ids=lambda path: path.name)
def exported(request, tmp_path_factory, offline_env):
    """A bundle with made-up pretrained weights, its export network (eager) and the checkpoint ``ckpt_export`` reads.

    When the config has ``export_weights`` (a pre-training bundle), a fresh ``network_def`` saved as safetensors
    stands in for the run's weights and the bundle's ``export`` workflow (``python -m monai.bundle run export``)
    writes the export checkpoint from them. Otherwise the network's own state dict is the checkpoint.
    """
    bundle, work = request.param, tmp_path_factory.mktemp(request.param.name)
    config, meta = config_file(bundle), bundle / "configs" / "metadata.json"
    parser = read_config(config, {})
    overrides = {"run_dir": work / "run"} if "run_dir" in parser else {}
    pretrained = None
    if "export_weights" in parser:
        network = read_config(config, overrides).get_parsed_content("network_def")
        pretrained = save_network_weights(network, work / "pretrained.safetensors")
        overrides["export_weights"] = pretrained
    net_id = "export_network_def" if "export_network_def" in parser else "network_def"

    parser = read_config(config, overrides)
    if "export" in parser:
        result = monai_bundle(
            "run", ["export", "--config_file", str(config), "--finalize", "[]", *overrides_args(overrides)],
            offline_env, work,
        )
        assert result.returncode == 0, output_of(result)
        checkpoint = Path(parser.get_parsed_content("export_checkpoint"))
    else:
        checkpoint = save_state_dict(parser.get_parsed_content(net_id), work / "model.pt")
    network = parser.get_parsed_content(net_id).eval()
    return {
        "config": config, "meta": meta, "net_id": net_id, "overrides": overrides, "work": work,
        "checkpoint": checkpoint, "network": network, "pretrained": pretrained,
        "metadata": json.loads(meta.read_text()),
    }


def test_network_guard_refuses_connections(offline_env, tmp_path):
    probe = "import urllib.request; urllib.request.urlopen('https://github.com', timeout=5)"
    result = subprocess.run(
        [sys.executable, "-c", probe], env=offline_env, cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert result.returncode != 0 and "network access is disabled in this test" in result.stderr


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda path: path.name)
def test_every_bundle_has_the_spec_files_and_a_current_changelog(bundle):
    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert metadata["version"] in metadata["changelog"]
    for name in ("configs/train.json", "configs/logging.conf", "docs/README.md", "LICENSE"):
        assert (bundle / name).is_file(), name
    assert "only run bundles you trust" in (bundle / "docs" / "README.md").read_text().lower()


def _optimisers(node):
    """Every ``torch.optim.AdamW`` item of a parsed config, however deeply nested."""
    if isinstance(node, dict):
        if node.get("_target_") == "torch.optim.AdamW":
            yield node
        for value in node.values():
            yield from _optimisers(value)
    elif isinstance(node, list):
        for value in node:
            yield from _optimisers(value)


def test_every_bundle_optimiser_is_the_fused_adamw():
    # One kernel for the whole update: a 23 M-parameter step takes 19 ms instead of 73 ms on a 2-core CPU.
    found = {
        config.relative_to(REPO): list(_optimisers(json.loads(config.read_text())))
        for bundle in BUNDLES
        for config in sorted((bundle / "configs").glob("*.json"))
    }
    assert sum(len(items) for items in found.values()) >= len(BUNDLES)
    assert not {str(config) for config, items in found.items() for item in items if item.get("fused") is not True}


def test_schema_is_a_draft_07_schema_requiring_the_mandatory_keys():
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    assert set(MANDATORY) <= set(schema["required"])
    assert set(TENSOR_KEYS) <= set(schema["definitions"]["tensor"]["required"])


@pytest.mark.parametrize("bundle", BUNDLES, ids=lambda path: path.name)
def test_verify_metadata_offline_against_the_repository_schema(bundle, offline_env, tmp_path):
    meta = bundle / "configs" / "metadata.json"
    assert (meta.parent / json.loads(meta.read_text())["schema"]).resolve() == SCHEMA  # the schema field points here
    result = monai_bundle(
        "verify_metadata", ["--meta_file", str(meta), "--filepath", str(SCHEMA)], offline_env, tmp_path
    )
    assert result.returncode == 0, output_of(result)
    assert "metadata is verified with no error" in result.stderr + result.stdout


@pytest.mark.parametrize("key", MANDATORY)
def test_schema_rejects_metadata_without_a_mandatory_key(key):
    metadata = json.loads((BUNDLES[0] / "configs" / "metadata.json").read_text())
    del metadata[key]
    with pytest.raises(jsonschema.ValidationError, match=f"'{key}' is a required property"):
        jsonschema.validate(metadata, json.loads(SCHEMA.read_text()))


@pytest.mark.parametrize("key", TENSOR_KEYS)
def test_schema_rejects_a_tensor_format_without_a_mandatory_key(key):
    metadata = json.loads((BUNDLES[0] / "configs" / "metadata.json").read_text())
    del metadata["network_data_format"]["outputs"]["pred"][key]
    validator = jsonschema.Draft7Validator(json.loads(SCHEMA.read_text()))
    errors = [(list(error.absolute_path), error.message) for error in validator.iter_errors(metadata)]
    assert errors == [(["network_data_format", "outputs", "pred"], f"'{key}' is a required property")]


def test_verify_metadata_command_names_the_missing_key(offline_env, tmp_path):
    metadata = json.loads((BUNDLES[0] / "configs" / "metadata.json").read_text())
    del metadata["task"]
    broken = tmp_path / "metadata.json"
    broken.write_text(json.dumps(metadata))
    result = monai_bundle(
        "verify_metadata", ["--meta_file", str(broken), "--filepath", str(SCHEMA)], offline_env, tmp_path
    )
    assert result.returncode != 0
    assert "ValueError: 'task' is a required property" in result.stderr, output_of(result)


def test_verify_net_in_out(exported, offline_env):
    args = [exported["net_id"], "--config_file", str(exported["config"]), "--meta_file", str(exported["meta"])]
    args += overrides_args(exported["overrides"])
    result = monai_bundle("verify_net_in_out", args, offline_env, exported["work"])
    assert result.returncode == 0, output_of(result)
    assert "data shape of network is verified with no error" in result.stderr + result.stdout


def test_ckpt_export_to_torchscript_matches_the_eager_network(exported, offline_env):
    work, metadata = exported["work"], exported["metadata"]
    ts_file = work / "model.ts"
    args = [
        exported["net_id"], "--config_file", str(exported["config"]), "--meta_file", str(exported["meta"]),
        "--ckpt_file", str(exported["checkpoint"]), "--filepath", str(ts_file), "--use_trace", "True",
        "--converter_kwargs", repr({"verify": True, "rtol": 0.0, "atol": ATOL}),
    ]
    result = monai_bundle("ckpt_export", args + overrides_args(exported["overrides"]), offline_env, work)
    assert result.returncode == 0, output_of(result)

    scripted, meta, extra = load_net_with_metadata(str(ts_file), more_extra_files=(f"{exported['config'].stem}.json",))
    assert meta["version"] == metadata["version"]
    assert meta["network_data_format"] == metadata["network_data_format"]
    assert json.loads(extra[f"{exported['config'].stem}.json"]) == json.loads(exported["config"].read_text())

    image = metadata["network_data_format"]["inputs"]["image"]
    pred = metadata["network_data_format"]["outputs"]["pred"]
    x = torch.rand(2, image["num_channels"], *image["spatial_shape"], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager, traced = exported["network"](x), scripted.eval()(x)  # batch 2: traced with 1, the batch stays free
    assert traced.shape == eager.shape
    assert traced.shape[:2] == (2, pred["num_channels"])
    if all(isinstance(size, int) for size in pred["spatial_shape"]):
        assert tuple(traced.shape[2:]) == tuple(pred["spatial_shape"])
    assert (traced - eager).abs().max().item() <= ATOL

    if exported["pretrained"] is not None:  # the TorchScript file carries the pretrained weights, not a fresh init
        pretrained = load_file(str(exported["pretrained"]))
        shared = [key for key in scripted.state_dict() if key in pretrained]
        assert shared
        for key in shared:
            torch.testing.assert_close(scripted.state_dict()[key], pretrained[key], rtol=0, atol=0)
