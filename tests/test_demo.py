"""The demo's pipeline (pre-train -> fine-tune with few labels -> held-out Dice and LVEF error) at tiny sizes."""

import math

import pytest
from mlflow.tracking import MlflowClient

from medssl.demo import DemoSettings, run_demo
from medssl.errors import ConfigError

ENCODER = {"embed_dim": 16, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0, "patch_embed": "linear"}
PRETRAIN = {
    "samples_per_subject": 1, "batch_size": 2, "cache_workers": 1, "figure_interval": 1,
    "views": {
        "sax": {"image_size": [32, 32, 4], "spacing": [4.0, 4.0, 10.0], "patch_size": [8, 8, 1]},
        "lax_2c": {"image_size": [32, 32], "spacing": [4.0, 4.0], "patch_size": [8, 8]},
        "lax_4c": {"image_size": [32, 32], "spacing": [4.0, 4.0], "patch_size": [8, 8]},
    },
    "model": {**ENCODER, "decoder_dim": 8, "decoder_depth": 1, "decoder_num_heads": 2, "mask_ratio": 0.75,
              "norm_pix_loss": False},
}
FINETUNE = {
    "batch_size": 2, "samples_per_epoch": 2, "cache_workers": 1,
    "views": {"sax": {"image_size": [32, 32, 4], "spacing": [4.0, 4.0, None], "patch_size": [8, 8, 1]}},
    "model": {**ENCODER, "drop_path_rate": 0.0, "feature_size": 4},
    "inference#overlap": 0.0,
}


@pytest.mark.slow
def test_demo_pretrains_finetunes_and_reports_dice_and_ef_error(tmp_path):
    lines = []
    settings = DemoSettings(subjects=2, pretrain_epochs=1, labelled=1, finetune_epochs=1, eval_subjects=1)
    result = run_demo(tmp_path / "demo", settings, PRETRAIN, FINETUNE, report=lines.append)

    assert [line[:5] for line in lines] == ["[1/4]", "[2/4]", "[3/4]", "[4/4]"]
    assert set(result["dice"]) == {"LV", "MYO", "RV"}
    assert all(0.0 <= value <= 1.0 for value in result["dice"].values())
    [row] = result["function_rows"]
    assert row["lv_ef_pct_true"] > 0  # the exact EF of the held-out phantom
    if math.isfinite(row["lv_ef_pct"]):  # a one-epoch model may segment no LV at all
        assert row["lv_ef_pct_abs_error"] == pytest.approx(abs(row["lv_ef_pct"] - row["lv_ef_pct_true"]))
    assert result["finetune"]["evaluation"]["num_rows"] == 2  # one held-out subject: its ED and ES frames
    client = MlflowClient(result["tracking_uri"])
    experiments = {e.name: e.experiment_id for e in client.search_experiments()}
    assert {"medssl_cine_mae", "medssl_cine_seg"} <= set(experiments)
    [seg_run] = client.search_runs([experiments["medssl_cine_seg"]])
    assert seg_run.data.params["num_labelled"] == "1" and seg_run.data.params["pretrained"] == "True"
    if math.isfinite(result["lvef_mae"]):
        assert seg_run.data.metrics["eval_lvef_mae"] == pytest.approx(result["lvef_mae"])
    assert "eval_sax_dice_LV" in seg_run.data.metrics
    [study] = result["analysis"].studies  # medssl analyze on a synthetic DICOM study, with the demo's model
    assert study.analysed and (study.folder / "report.pdf").is_file() and (study.folder / "segmentation.dcm").is_file()
    assert study.folder.parent == tmp_path / "demo" / "analysis"


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"labelled": 0}, "labelled must be a positive integer, got 0"),
        ({"subjects": 2, "labelled": 3}, "labelled=3 exceeds the 2 subjects"),
        ({"finetune_epochs": 1.5}, "finetune_epochs must be a positive integer, got 1.5"),
    ],
)
def test_demo_settings_are_checked(changes, message):
    with pytest.raises(ConfigError, match=message):
        DemoSettings(**changes)
