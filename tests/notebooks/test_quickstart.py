"""notebooks/01_quickstart.ipynb runs top to bottom (tiny settings injected into its parameters cell)."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[2] / "notebooks" / "01_quickstart.ipynb"
ENCODER = {"embed_dim": 16, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0, "patch_embed": "linear"}
TINY = {
    "SUBJECTS": 2, "PRETRAIN_EPOCHS": 1, "LABELLED": 1, "FINETUNE_EPOCHS": 1, "EVAL_SUBJECTS": 1,
    "PRETRAIN_OVERRIDES": {
        "samples_per_subject": 1, "batch_size": 2, "cache_workers": 1, "figure_interval": 1,
        "views": {
            "sax": {"image_size": [32, 32, 4], "spacing": [4.0, 4.0, 10.0], "patch_size": [8, 8, 1]},
            "lax_2c": {"image_size": [32, 32], "spacing": [4.0, 4.0], "patch_size": [8, 8]},
            "lax_4c": {"image_size": [32, 32], "spacing": [4.0, 4.0], "patch_size": [8, 8]},
        },
        "model": {**ENCODER, "decoder_dim": 8, "decoder_depth": 1, "decoder_num_heads": 2, "mask_ratio": 0.75,
                  "norm_pix_loss": False},
    },
    "FINETUNE_OVERRIDES": {
        "batch_size": 2, "samples_per_epoch": 2, "cache_workers": 1,
        "views": {"sax": {"image_size": [32, 32, 4], "spacing": [4.0, 4.0, None], "patch_size": [8, 8, 1]}},
        "model": {**ENCODER, "drop_path_rate": 0.0, "feature_size": 4},
        "inference#overlap": 0.0,
    },
}


def with_parameters(notebook, values):
    [cell] = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
    names = {line.split("=")[0].strip() for line in cell.source.splitlines() if "=" in line and line[0] != "#"}
    assert set(values) <= names, f"unknown notebook parameters {set(values) - names}"
    cell.source += "\n" + "\n".join(f"{name} = {value!r}" for name, value in values.items())
    return notebook


@pytest.mark.slow
def test_quickstart_notebook_runs_end_to_end(tmp_path):
    notebook = with_parameters(nbformat.read(NOTEBOOK, as_version=4), TINY)
    NotebookClient(notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = [output for cell in notebook.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "exact LVEF" in text and "LVEF mean absolute error" in text and "mlflow ui --backend-store-uri" in text
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 3  # the cohort, reconstruction and EF figures
    assert (tmp_path / "runs" / "quickstart" / "cine_seg" / "evaluation" / "metrics.csv").is_file()
