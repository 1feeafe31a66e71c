"""The ``medssl`` command: help, argument validation and error reporting without tracebacks."""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from medssl import cli
from medssl.clinical.analyze import AnalysisResult, StudyOutcome
from medssl.clinical.cardiac import CardiacFunction
from medssl.engine import bundles
from medssl.errors import DataError

BUNDLES = Path(__file__).resolve().parents[1] / "bundles"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "medssl.cli", *args], capture_output=True, text=True, timeout=120)


def test_help_lists_every_command():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("phantom", "pretrain", "demo"):
        assert command in result.stdout


def test_no_command_prints_help_and_fails():
    result = run_cli()
    assert result.returncode == 2
    assert "usage: medssl" in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (("phantom", "--subjects", "0", "--out", "x"), "expected a positive integer, got 0"),
        (("phantom", "--subjects", "many", "--out", "x"), "expected a positive integer, got 'many'"),
        (("phantom", "--subjects", "2"), "the following arguments are required: --out"),
        (("pretrain", "no_such_recipe"), "unknown pre-training recipe 'no_such_recipe'. Known: "),
        (("pretrain", "cine_ma"), "unknown pre-training recipe 'cine_ma'. Did you mean 'cine_mae'?"),
        (("pretrain", "cine_mae", "--set", "novalue"), "expected KEY=VALUE, got 'novalue'"),
    ],
)
def test_nonsense_arguments_are_rejected_with_a_message(args, message):
    result = run_cli(*args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def _replace_handler(monkeypatch, command: str, handler) -> None:
    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser._subparsers._group_actions[0].choices[command].set_defaults(handler=handler)


def test_user_errors_print_one_line_and_exit_2(monkeypatch, capsys):
    def broken(args):
        raise DataError("no NIfTI files found in /somewhere")

    _replace_handler(monkeypatch, "demo", broken)
    assert cli.main(["demo"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "medssl demo: error: no NIfTI files found in /somewhere"


def test_unexpected_errors_are_summarised_unless_debug(monkeypatch, capsys):
    def buggy(args):
        raise ZeroDivisionError("division by zero")

    _replace_handler(monkeypatch, "demo", buggy)
    assert cli.main(["demo"]) == 1
    assert "unexpected ZeroDivisionError: division by zero" in capsys.readouterr().err
    with pytest.raises(ZeroDivisionError):
        cli.main(["--debug", "demo"])


# ---------------------------------------------------------------------------------------------------------- finetune
def _fake_bundle(root, name, train, metadata=None):
    configs = root / name / "configs"
    configs.mkdir(parents=True)
    (configs / "train.json").write_text(json.dumps(train))
    if metadata is not None:
        (configs / "metadata.json").write_text(json.dumps(metadata))


def test_finetune_recipes_are_the_bundles_with_a_pretrained_key(tmp_path, monkeypatch):
    _fake_bundle(tmp_path, "seg", {"pretrained": "x.safetensors"}, {"name": "Segmentation", "description": "Long."})
    _fake_bundle(tmp_path, "ef", {"pretrained": None}, {"description": "Ejection fraction. More words."})
    _fake_bundle(tmp_path, "mae", {"epochs": 3}, {"name": "A pre-training"})
    (tmp_path / "notes").mkdir()
    monkeypatch.setenv("MEDSSL_BUNDLES", str(tmp_path))
    assert cli.finetune_recipes() == {"ef": "Ejection fraction", "seg": "Segmentation"}


def test_a_bundle_with_a_finetune_config_is_both_a_pretraining_and_a_finetuning_recipe(tmp_path, monkeypatch):
    _fake_bundle(tmp_path, "seg", {"pretrained": "x.safetensors"}, {"name": "Segmentation"})
    _fake_bundle(tmp_path, "mae", {"epochs": 3}, {"name": "A pre-training"})
    _fake_bundle(tmp_path, "both", {"epochs": 3}, {"name": "Pre-train then fine-tune"})
    (tmp_path / "both" / "configs" / "finetune.json").write_text(json.dumps({"pretrained": False}))
    monkeypatch.setenv("MEDSSL_BUNDLES", str(tmp_path))
    assert cli.pretrain_recipes() == {"both": "Pre-train then fine-tune", "mae": "A pre-training"}
    assert cli.finetune_recipes() == {"both": "Pre-train then fine-tune", "seg": "Segmentation"}
    assert cli.finetune_config(tmp_path / "both") == "configs/finetune.json"
    assert cli.finetune_config(tmp_path / "seg") == "configs/train.json"


def test_pretrain_help_lists_the_repository_recipes():
    result = run_cli("pretrain", "--help")
    assert result.returncode == 0
    listed = result.stdout.split("recipes:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert "cine_mae" in [line.split()[0] for line in listed]
    assert "cine_seg" not in result.stdout.split("examples:")[0]


def test_finetune_help_lists_the_repository_recipes():
    expected = sorted(path.parents[1].name for path in BUNDLES.glob("*/configs/train.json")
                      if "pretrained" in json.loads((path.parents[1] / cli.finetune_config(path.parents[1])).read_text()))
    assert "cine_seg" in expected
    result = run_cli("finetune", "--help")
    assert result.returncode == 0
    listed = result.stdout.split("recipes:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert [line.split()[0] for line in listed] == expected
    assert "Cine CMR segmentation on a CineMA-style encoder" in result.stdout


def _all_parsers(parser, name="medssl"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub_parser in action.choices.items():
                yield from _all_parsers(sub_parser, f"{name} {sub_name}")


def test_every_help_text_renders_cleanly():
    parsers = dict(_all_parsers(cli.build_parser()))
    assert {"medssl study dataset-size", "medssl study anomaly", "medssl finetune"} <= set(parsers)
    for name, parser in parsers.items():
        text = parser.format_help()
        assert text.startswith(f"usage: {name}"), name
        assert "%%" not in text and "%(" not in text, f"{name}: unformatted percent sign in its help"


def test_help_lists_the_new_commands():
    result = run_cli("--help")
    assert "finetune" in result.stdout and "study" in result.stdout
    result = run_cli("study", "label-efficiency", "--help")
    assert result.returncode == 0 and "--quick" in result.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (("finetune", "cine_seg", "--labelled", "0"),
         "argument --labelled: expected a positive integer or 'all', got '0'"),
        (("finetune", "cine_seg", "--labelled", "some"), "expected a positive integer or 'all', got 'some'"),
        (("finetune", "cine_seg", "--scratch", "--pretrained", "x.safetensors"), "not allowed with argument --scratch"),
        (("finetune", "cine_seg", "--epochs", "0"), "argument --epochs: expected a positive integer, got 0"),
        (("study", "label-efficiency", "--labelled", "1,two"), "comma-separated numbers of labelled subjects"),
        (("study", "label-efficiency", "--seeds", "0"), "argument --seeds: expected a positive integer, got 0"),
        (("study",), "the following arguments are required: STUDY"),
    ],
)
def test_argument_errors_are_one_line(args, message):
    result = run_cli(*args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(f"medssl {' '.join(a for a in args[:2] if not a.startswith('cine'))}: error: ")
    assert message in result.stderr


def _finetune_main(monkeypatch, argv):
    """Run ``medssl finetune`` in-process with run_bundle recorded instead of run."""
    calls = []

    def fake_run_bundle(recipe, config_files=None, overrides=None):
        calls.append((recipe, list(config_files), dict(overrides)))
        summary = {"run_dir": overrides.get("run_dir", "runs/x"), "tracking_uri": "sqlite:////s/mlflow.db",
                   "run_id": "abc", "final_loss": 0.5}
        if len(config_files) == 2:
            summary["evaluation"] = {"metrics": {"eval_sax_dice_LV": 0.91234, "eval_sax_hd95_LV": 3.5},
                                     "num_rows": 4, "csv": "/r/evaluation/metrics.csv"}
        return summary

    monkeypatch.setattr(bundles, "run_bundle", fake_run_bundle)
    return cli.main(["finetune", *argv]), calls


def test_finetune_trains_then_evaluates_with_the_same_overrides(tmp_path, monkeypatch, capsys):
    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"")
    status, calls = _finetune_main(monkeypatch, [
        "cine_seg", "--pretrained", str(checkpoint), "--labelled", "3", "--epochs", "2", "--data", str(tmp_path),
        "--eval-data", "held", "--run-dir", str(tmp_path / "run"), "--seed", "4", "--set", "batch_size=2",
        "--set", "epochs=5",
    ])
    assert status == 0
    expected = {"dataset_dir": str(tmp_path), "eval_dataset_dir": str(Path("held").resolve()), "epochs": 5,
                "num_labelled": 3, "seed": 4, "run_dir": str(tmp_path / "run"), "batch_size": 2,
                "pretrained": str(checkpoint)}
    assert calls == [("cine_seg", ["configs/train.json"], expected),
                     ("cine_seg", ["configs/train.json", "configs/evaluate.json"], expected)]
    out = capsys.readouterr().out
    assert "eval_sax_dice_LV  0.9123" in out and "eval_sax_hd95_LV  3.5000" in out
    assert f"run folder:        {tmp_path / 'run'}" in out
    assert "open the MLflow UI: mlflow ui --backend-store-uri sqlite:////s/mlflow.db" in out


def test_finetune_from_scratch_without_evaluation(monkeypatch, capsys):
    status, calls = _finetune_main(monkeypatch, ["cine_seg", "--scratch", "--labelled", "all", "--no-evaluate"])
    assert status == 0
    assert calls == [("cine_seg", ["configs/train.json"], {"pretrained": False})]
    assert "held-out evaluation" not in capsys.readouterr().out


def test_finetune_without_a_checkpoint_says_how_to_make_one(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    status, calls = _finetune_main(monkeypatch, ["cine_seg"])
    assert status == 2 and calls == []
    default = tmp_path / "runs" / "cine_mae" / "models" / "model.safetensors"  # the recipe's default, from its cwd
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"medssl finetune: error: pretrained checkpoint {default} does not exist.")
    assert f"`medssl pretrain cine_mae --run-dir {tmp_path / 'runs' / 'cine_mae'}`" in err and "--scratch" in err
    assert "\n" not in err


def test_finetune_unknown_recipe_lists_the_known_ones(monkeypatch, capsys):
    status, calls = _finetune_main(monkeypatch, ["cine_mae"])
    assert status == 2 and calls == []
    err = capsys.readouterr().err.strip()
    assert err.startswith("medssl finetune: error: unknown fine-tuning recipe 'cine_mae'.")
    assert "Known: " in err and "cine_seg" in err and "\n" not in err


# ------------------------------------------------------------------------------------------------------------- study
def test_study_options_reach_the_study(monkeypatch, tmp_path, capsys):
    from medssl.studies import label_efficiency

    seen = {}

    def fake_study(out_dir, settings, pretrained=None, progress=True):
        seen.update(out_dir=out_dir, settings=settings, pretrained=pretrained, progress=progress)
        return {"table": "| a |", "csv": "c.csv", "markdown": "m.md", "figure": "f.png",
                "tracking_uri": "sqlite:////s/mlflow.db", "experiment_name": "medssl_label_efficiency"}

    monkeypatch.setattr(label_efficiency, "run_label_efficiency_study", fake_study)
    argv = ["study", "label-efficiency", "--quick", "--out", str(tmp_path), "--seeds", "4", "--labelled", "1, 3,all",
            "--pretrained", "p.safetensors", "--quiet"]
    assert cli.main(argv) == 0
    assert seen["settings"] == dataclasses.replace(label_efficiency.QUICK_SETTINGS, seeds=4, labelled=(1, 3, None))
    assert seen["out_dir"] == tmp_path and seen["pretrained"] == Path("p.safetensors") and not seen["progress"]
    out = capsys.readouterr().out
    assert "| a |" in out and "figure:            f.png" in out and "mlflow ui --backend-store-uri" in out
    assert cli.main(["study", "label-efficiency"]) == 0
    assert seen["settings"] == label_efficiency.DEFAULT_SETTINGS and seen["out_dir"] == Path("runs/label_efficiency")


def test_dataset_size_study_options_reach_the_study(monkeypatch, tmp_path, capsys):
    from medssl.studies import dataset_size

    seen = {}

    def fake_study(out_dir, **kwargs):
        seen.update(out_dir=out_dir, **kwargs)
        return {"table": "| b |", "csv": "c.csv", "markdown": "m.md", "figure": "f.png",
                "tracking_uri": "sqlite:////s/mlflow.db", "experiment_name": "medssl_dataset_size"}

    monkeypatch.setattr(dataset_size, "run_dataset_size_study", fake_study)
    argv = ["study", "dataset-size", "--quick", "--out", str(tmp_path), "--seeds", "2", "--percent", "100, 25",
            "--pretrained", "s.safetensors", "--quiet"]
    assert cli.main(argv) == 0
    assert seen == {"out_dir": tmp_path, "quick": True, "seeds": 2, "fractions": [1.0, 0.25],
                    "pretrained": Path("s.safetensors"), "progress": False}
    out = capsys.readouterr().out
    assert "| b |" in out and "figure:            f.png" in out and "experiment medssl_dataset_size" in out


def test_anomaly_study_options_reach_the_comparison(monkeypatch, tmp_path, capsys):
    from medssl.studies import anomaly_comparison

    seen = {}
    table = tmp_path / "comparison.md"
    table.write_text("| method | image AUROC |\n")

    def fake_comparison(out_dir, quick=False, overrides=None, seed=0):
        seen.update(out_dir=out_dir, quick=quick, overrides=overrides, seed=seed)
        return {"rows": [], "csv": "c.csv", "markdown": str(table), "tracking_uri": "sqlite:////a/mlflow.db",
                "run_id": "r"}

    monkeypatch.setattr(anomaly_comparison, "run_anomaly_comparison", fake_comparison)
    argv = ["study", "anomaly", "--out", str(tmp_path), "--epochs", "3", "--seed", "7", "--set", "batch_size=4"]
    assert cli.main(argv) == 0
    assert seen == {"out_dir": tmp_path, "quick": False, "overrides": {"batch_size": 4, "epochs": 3}, "seed": 7}
    assert "| method | image AUROC |" in capsys.readouterr().out


@pytest.mark.parametrize("percent", ["0", "120", "ten", ""])
def test_dataset_size_refuses_nonsense_percentages(percent):
    result = run_cli("study", "dataset-size", "--percent", percent)
    assert result.returncode == 2
    assert "expected comma-separated percentages in (0, 100]" in result.stderr


def test_demo_passes_its_settings_and_prints_dice_and_ef_error(monkeypatch, capsys, tmp_path):
    import medssl.demo

    seen = {}

    def fake_demo(run_dir, settings):
        seen.update(run_dir=run_dir, settings=settings)
        return {
            "pretrain": {"run_dir": str(run_dir / "cine_mae"), "final_loss": 0.05},
            "dice": {"LV": 0.91, "MYO": 0.82, "RV": 0.86},
            "lvef_mae": 3.25,
            "tracking_uri": f"sqlite:///{run_dir}/mlflow.db",
            "analysis": AnalysisResult(run_dir / "analysis", [StudyOutcome(
                "study 1 (abc123)", folder=run_dir / "analysis" / "study-1-abc123",
                function=CardiacFunction(0, 9, 150.0, 60.0, 90.0, 60.0, 160.0, 70.0, 90.0, 56.25, 120.0),
            )], [], {}),
        }

    monkeypatch.setattr(medssl.demo, "run_demo", fake_demo)
    args = ["demo", "--run-dir", str(tmp_path), "--labelled", "2", "--finetune-epochs", "5", "--eval-subjects", "3"]
    assert cli.main(args) == 0
    assert seen["run_dir"] == tmp_path.resolve()
    assert seen["settings"] == medssl.demo.DemoSettings(labelled=2, finetune_epochs=5, eval_subjects=3)
    out = capsys.readouterr().out
    assert "held-out SAX Dice (3 subjects, ED and ES, 2 labelled):  LV 0.910, MYO 0.820, RV 0.860" in out
    assert "3.2 EF points (mean)" in out
    assert f"mlflow ui --backend-store-uri sqlite:///{tmp_path.resolve()}/mlflow.db" in out
    assert f"LVEF 60.0 %; report: {tmp_path.resolve() / 'analysis' / 'study-1-abc123' / 'report.pdf'}" in out
