"""CineMA config.yaml -> medssl architecture: every size of CineMA's table, each model kind, and bad configs."""

from __future__ import annotations

import copy

import pytest
import yaml

from medssl.errors import ConfigError
from medssl.interop.cinema_config import CINEMA_SIZES, CINEMA_VIEWS, parse_cinema_config, read_cinema_config
from medssl.nets.cinema import CineMAEncoder, ConvUNetR, ConvViT

# CineMA's size table (fixture README section 4): encoder width, depth, heads.
SIZE_TABLE = {"tiny": (16, 1, 2), "base": (768, 12, 12), "large": (1024, 24, 16), "huge": (1280, 32, 16)}


def _config(fixture, model):
    return yaml.safe_load(fixture.config(model).read_text())


def test_the_size_table_is_cinemas():
    assert {name: (s["embed_dim"], s["depth"], s["num_heads"]) for name, s in CINEMA_SIZES.items()} == SIZE_TABLE


@pytest.mark.parametrize("size", list(SIZE_TABLE))
@pytest.mark.parametrize(("model", "section"), [("mae", "model"), ("seg", "model.convunetr"), ("cls", "model.convvit")])
def test_every_size_is_read_from_the_config(cinema_fixture, size, model, section):
    config = _config(cinema_fixture, model)
    node = config
    for part in section.split("."):
        node = node[part]
    node["size"] = size
    parsed = parse_cinema_config(config)
    encoder = parsed.network_args if model == "mae" else parsed.network_args["encoder"]
    assert (encoder["embed_dim"], encoder["depth"], encoder["num_heads"]) == SIZE_TABLE[size]
    assert parsed.size == size


def test_mae_config_has_all_four_views_and_builds_the_encoder(cinema_fixture):
    config = _config(cinema_fixture, "mae")
    config["model"]["views"] = ["sax"]  # CineMA's MAE ignores it
    parsed = parse_cinema_config(config)
    assert (parsed.model, parsed.network_class) == ("cinema_mae", CineMAEncoder)
    assert list(parsed.views) == list(CINEMA_VIEWS)
    assert parsed.views["sax"] == {"image_size": [192, 192, 16], "in_channels": 1}
    assert parsed.views["lax_3c"] == {"image_size": [256, 256], "in_channels": 1}
    assert (parsed.network_args["patch_size"], parsed.network_args["scale_factor"]) == ([4, 4, 1], [2, 2, 1])
    assert parsed.spacing["sax"] == [1.0, 1.0, 10.0]


def test_convunetr_config_reads_the_decoder_and_the_lax_data_section(cinema_fixture):
    parsed = read_cinema_config(cinema_fixture.config("landmark_heatmap"))
    assert (parsed.model, parsed.network_class, parsed.task) == ("convunetr", ConvUNetR, "segmentation")
    args = parsed.network_args
    assert args["views"] == {"lax_4c": {"image_size": [256, 256], "in_channels": 1}}
    assert (args["out_channels"], args["decoder_channels"]) == (3, [8, 16, 32, 64, 128])
    assert (args["decoder_patch_size"], args["dropout"], args["drop_path_rate"]) == ([2, 2, 1], 0.1, 0.1)


def test_convvit_outputs_follow_class_column_regression_column_then_out_chans(cinema_fixture):
    cls = read_cinema_config(cinema_fixture.config("cls"))
    assert cls.network_class is ConvViT
    assert cls.class_names == ["DCM", "HCM", "MINF", "NOR", "RV"] and cls.network_args["out_channels"] == 5
    assert cls.views["sax"]["in_channels"] == 2  # n_frames x in_chans
    reg = read_cinema_config(cinema_fixture.config("reg"))
    assert reg.network_args["out_channels"] == 1
    assert reg.regression == {"mean": 27.698811590282546, "std": 10.848138374627386}
    coordinates = read_cinema_config(cinema_fixture.config("landmark_coordinate"))
    assert (coordinates.network_args["out_channels"], coordinates.views["lax_4c"]["in_channels"]) == (6, 1)


def test_unknown_size_is_a_config_error_naming_it(cinema_fixture):
    config = _config(cinema_fixture, "seg")
    config["model"]["convunetr"]["size"] = "giant"
    with pytest.raises(ConfigError, match=r"'model\.convunetr\.size' is 'giant', not a CineMA model size; known: "
                                          r"\['tiny', 'base', 'large', 'huge'\]"):
        parse_cinema_config(config)


def test_missing_keys_unknown_models_and_views_are_config_errors(cinema_fixture, tmp_path):
    config = _config(cinema_fixture, "cls")
    broken = copy.deepcopy(config)
    del broken["model"]["convvit"]["enc_conv_chans"]
    with pytest.raises(ConfigError, match=r"no 'model\.convvit\.enc_conv_chans'"):
        parse_cinema_config(broken)
    with pytest.raises(ConfigError, match="medssl runs 'convvit' and 'convunetr'"):
        parse_cinema_config({**config, "model": {**config["model"], "name": "resnet"}})
    with pytest.raises(ConfigError, match="view 'lax_5c'"):
        parse_cinema_config({**config, "model": {**config["model"], "views": "lax_5c"}})
    (tmp_path / "config.yaml").write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        read_cinema_config(tmp_path / "config.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        read_cinema_config(tmp_path / "missing.yaml")
