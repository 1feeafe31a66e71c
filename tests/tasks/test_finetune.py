"""Fine-tuning machinery: strict encoder loading, fine-tune modes, layer-wise LR decay, labelled subsets, reports."""

import csv
import json

import pytest
import torch
from mlflow.tracking import MlflowClient
from monai.losses import DiceCELoss
from monai.optimizers import WarmupCosineSchedule
from torch import nn

from medssl.engine.checkpoints import save_network_weights
from medssl.engine.tracking import resolve_tracking
from medssl.errors import CheckpointError, DataError
from medssl.methods.cine_mae import CineMAE
from medssl.nets.vit import MultiViewEncoder
from medssl.tasks.finetune import (
    EncoderTaskNetwork,
    SupervisedTask,
    layer_decay_param_groups,
    load_pretrained_encoder,
    report_evaluation,
    select_labelled,
)

VIEWS = {
    "sax": {"image_size": (16, 16, 2), "patch_size": (8, 8, 1)},
    "lax_2c": {"image_size": (16, 16), "patch_size": (8, 8)},
    "lax_4c": {"image_size": (16, 16), "patch_size": (8, 8)},
}
WIDTH = {"embed_dim": 12, "depth": 2, "num_heads": 2}


def pretrained_mae(tmp_path, **overrides):
    torch.manual_seed(0)
    mae = CineMAE(views=overrides.pop("views", VIEWS), decoder_dim=8, decoder_depth=1, decoder_num_heads=2,
                  **{**WIDTH, **overrides})
    return mae, save_network_weights(mae, tmp_path / "model.safetensors")


class TinyTask(EncoderTaskNetwork):
    """A minimal task network: mean-pooled tokens of one view -> linear head."""

    def __init__(self, views, finetune_mode="full", **width):
        super().__init__(MultiViewEncoder(views, **{**WIDTH, **width}), finetune_mode)
        self.head = nn.Linear(self.encoder.embed_dim, 2)

    def forward(self, image, view="sax"):
        return self.head(self.encode(image, view)[0].mean(1))


def test_encoder_loads_strictly_from_a_cine_mae_checkpoint(tmp_path):
    mae, path = pretrained_mae(tmp_path)
    # Fine-tuning SAX and LAX-4C on a larger SAX window: positions are rebuilt, the LAX-2C weights are skipped.
    encoder = MultiViewEncoder({"sax": {"image_size": (32, 32, 4), "patch_size": (8, 8, 1)},
                                "lax_4c": VIEWS["lax_4c"]}, **WIDTH)
    skipped = load_pretrained_encoder(encoder, path)
    assert skipped == ["encoder.patch_embed.lax_2c.proj.bias", "encoder.patch_embed.lax_2c.proj.weight",
                       "encoder.view_embed.lax_2c"]
    reference = mae.encoder.state_dict()
    for key, value in encoder.state_dict().items():
        torch.testing.assert_close(value, reference[key], rtol=0, atol=0)


def test_mismatching_encoder_names_the_keys(tmp_path):
    _, path = pretrained_mae(tmp_path)
    wider = MultiViewEncoder({"sax": VIEWS["sax"]}, embed_dim=16, depth=2, num_heads=2)
    with pytest.raises(CheckpointError, match=r"shape mismatches: patch_embed\.sax\.proj\.bias \(checkpoint \[12\] vs "
                                              r"network \[16\]\)"):
        load_pretrained_encoder(wider, path)
    deeper = MultiViewEncoder({"sax": VIEWS["sax"]}, embed_dim=12, depth=3, num_heads=2)
    with pytest.raises(CheckpointError, match=r"missing keys: vit\.blocks\.2\.attn\.proj\.bias"):
        load_pretrained_encoder(deeper, path)
    other_patch = MultiViewEncoder({"sax": {"image_size": (16, 16, 2), "patch_size": (4, 4, 1)}}, **WIDTH)
    with pytest.raises(CheckpointError, match=r"patch_embed\.sax\.proj\.weight \(checkpoint \[12, 64\] vs network "
                                              r"\[12, 16\]\)"):
        load_pretrained_encoder(other_patch, path)


def test_a_view_the_checkpoint_lacks_is_reported_missing(tmp_path):
    _, path = pretrained_mae(tmp_path, views={"sax": VIEWS["sax"]})
    encoder = MultiViewEncoder({"sax": VIEWS["sax"], "lax_4c": VIEWS["lax_4c"]}, **WIDTH)
    with pytest.raises(CheckpointError, match=r"missing keys: patch_embed\.lax_4c\.proj\.bias, "
                                              r"patch_embed\.lax_4c\.proj\.weight, view_embed\.lax_4c"):
        load_pretrained_encoder(encoder, path)


def test_unusable_checkpoint_files(tmp_path):
    encoder = MultiViewEncoder({"sax": VIEWS["sax"]}, **WIDTH)
    with pytest.raises(CheckpointError, match="does not exist: run the cine_mae bundle first .* --pretrained False"):
        load_pretrained_encoder(encoder, tmp_path / "absent.safetensors")
    (tmp_path / "model.pt").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"must be a \.safetensors file"):
        load_pretrained_encoder(encoder, tmp_path / "model.pt")
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read pretrained checkpoint"):
        load_pretrained_encoder(encoder, tmp_path / "broken.safetensors")
    other = save_network_weights(nn.Linear(2, 2), tmp_path / "linear.safetensors")
    with pytest.raises(CheckpointError, match=r"holds no 'encoder\.\*' encoder weights \(its keys start: bias, weight"):
        load_pretrained_encoder(encoder, other)


def test_task_network_loads_pretrained_weights_or_stays_random(tmp_path):
    mae, path = pretrained_mae(tmp_path)
    task = TinyTask({"sax": VIEWS["sax"]}).load_pretrained(path)
    torch.testing.assert_close(task.encoder.vit.blocks[1].mlp.fc2.weight, mae.encoder.vit.blocks[1].mlp.fc2.weight)
    scratch = TinyTask({"sax": VIEWS["sax"]})
    before = scratch.encoder.vit.blocks[1].mlp.fc2.weight.clone()
    for nothing in (None, False, ""):
        torch.testing.assert_close(scratch.load_pretrained(nothing).encoder.vit.blocks[1].mlp.fc2.weight, before)
    with pytest.raises(CheckpointError, match="pretrained must be a checkpoint path, or False / None"):
        scratch.load_pretrained(True)


@pytest.mark.parametrize("mode", ["frozen", "linear_probe"])
def test_frozen_modes_keep_the_encoder_fixed_and_in_eval_mode(mode):
    task = TinyTask({"sax": VIEWS["sax"]}, finetune_mode=mode, drop_path_rate=0.5).train()
    assert task.training and task.head.training and not task.encoder.training
    assert not any(p.requires_grad for p in task.encoder.parameters())
    image = torch.randn(2, 1, 16, 16, 2)
    torch.testing.assert_close(task(image), task(image))  # drop path stays off in a frozen encoder
    tokens, _ = task.encode(image, "sax")
    assert not tokens.requires_grad
    task(image).sum().backward()
    assert task.head.weight.grad is not None


def test_full_mode_trains_everything_with_drop_path():
    task = TinyTask({"sax": VIEWS["sax"]}, drop_path_rate=0.5).train()
    assert task.encoder.training and all(p.requires_grad for p in task.parameters())
    image = torch.randn(4, 1, 16, 16, 2)
    assert not torch.allclose(task(image), task(image))  # stochastic depth is active
    with pytest.raises(ValueError, match=r"finetune_mode must be one of \('full', 'frozen', 'linear_probe'\)"):
        TinyTask({"sax": VIEWS["sax"]}, finetune_mode="partial")


def expected_layer(name, depth):
    """BEiT / MAE's layer ids, written out for the names of this network."""
    if name.startswith("encoder.patch_embed") or name.startswith("encoder.view_embed"):
        return 0
    if name.startswith("encoder.vit.blocks."):
        return int(name.split(".")[3]) + 1
    return depth + 1


def test_layer_decay_groups_follow_the_beit_formula():
    task = TinyTask({"sax": VIEWS["sax"], "lax_4c": VIEWS["lax_4c"]})
    lr, decay, depth = 1e-3, 0.75, 2
    groups = layer_decay_param_groups(task, lr, weight_decay=0.05, layer_decay=decay)
    assert groups[0]["lr"] == lr  # the heads come first: the trainer logs the first group's rate
    by_id = {id(p): group for group in groups for p in group["params"]}
    assert len(by_id) == sum(len(group["params"]) for group in groups) == len(list(task.parameters()))
    for name, parameter in task.named_parameters():
        group = by_id[id(parameter)]
        layer = expected_layer(name, depth)
        assert group["layer_id"] == layer, name
        assert group["lr"] == pytest.approx(lr * decay ** (depth + 1 - layer)), name
        no_decay = parameter.ndim <= 1 or name.startswith("encoder.view_embed")
        assert group["weight_decay"] == (0.0 if no_decay else 0.05), name


def test_layer_decay_ratios_survive_the_warmup_cosine_schedule():
    task = TinyTask({"sax": VIEWS["sax"]})
    optimizer = torch.optim.AdamW(layer_decay_param_groups(task, 1e-3, 0.05, 0.5), lr=1e-3)
    schedule = WarmupCosineSchedule(optimizer, warmup_steps=2, t_total=10)
    for _ in range(4):
        optimizer.step()
        schedule.step()
    head = optimizer.param_groups[0]["lr"]
    assert 0 < head < 1e-3
    for group in optimizer.param_groups:
        assert group["lr"] == pytest.approx(head * group["lr_scale"])


def test_layer_decay_leaves_frozen_parameters_out_and_validates():
    frozen = TinyTask({"sax": VIEWS["sax"]}, finetune_mode="frozen")
    groups = layer_decay_param_groups(frozen, 1e-3, 0.05)
    assert {id(p) for g in groups for p in g["params"]} == {id(frozen.head.weight), id(frozen.head.bias)}
    with pytest.raises(ValueError, match=r"layer_decay in \(0, 1\], got lr=0.001, layer_decay=1.5"):
        layer_decay_param_groups(frozen, 1e-3, 0.05, 1.5)
    with pytest.raises(ValueError, match="Linear has no MultiViewEncoder 'encoder'"):
        layer_decay_param_groups(nn.Linear(2, 2), 1e-3, 0.05)


def test_select_labelled_is_seeded_nested_and_keeps_order():
    subjects = [f"s{i}" for i in range(10)]
    assert select_labelled(subjects, None) == subjects
    three = select_labelled(subjects, 3, seed=7)
    assert len(three) == 3 and three == sorted(three, key=subjects.index)
    assert three == select_labelled(subjects, 3, seed=7)
    assert set(three) < set(select_labelled(subjects, 4, seed=7))  # label-efficiency curves are nested
    assert three != select_labelled(subjects, 3, seed=8)
    assert select_labelled(subjects, 10) == subjects


@pytest.mark.parametrize(
    ("datalist", "count", "message"),
    [
        ([], None, "the labelled set is empty"),
        (["a", "b"], 0, r"num_labelled=0 leaves the labelled set empty; use 1\.\.2 or None for all"),
        (["a", "b"], 3, r"num_labelled=3 is outside 1\.\.2"),
        (["a", "b"], 1.5, "num_labelled must be an integer or None"),
        (["a", "b"], True, "num_labelled must be an integer or None"),
    ],
)
def test_select_labelled_errors(datalist, count, message):
    with pytest.raises(DataError, match=message):
        select_labelled(datalist, count)


def test_supervised_task_averages_the_loss_over_the_inputs_present():
    torch.manual_seed(0)
    network = lambda image, view: image * (2.0 if view == "sax" else 3.0)  # noqa: E731
    loss = DiceCELoss(to_onehot_y=True, softmax=True)
    task = SupervisedTask(network, loss, {"sax": "sax_label", "lax_4c": "lax_4c_label"})
    batch = {
        "sax": torch.randn(2, 4, 8, 8, 2), "sax_label": torch.randint(0, 4, (2, 1, 8, 8, 2)).float(),
        "lax_4c": torch.randn(2, 4, 8, 8), "lax_4c_label": torch.randint(0, 4, (2, 1, 8, 8)).float(),
    }
    out = task(batch)
    sax = loss(batch["sax"] * 2.0, batch["sax_label"])
    lax = loss(batch["lax_4c"] * 3.0, batch["lax_4c_label"])
    torch.testing.assert_close(out["loss_sax"], sax)
    torch.testing.assert_close(out["loss_lax_4c"], lax)
    torch.testing.assert_close(out["loss"], (sax + lax) / 2)
    only_sax = task({"sax": batch["sax"], "sax_label": batch["sax_label"]})
    assert set(only_sax) == {"loss", "loss_sax"}
    with pytest.raises(KeyError, match="has input 'sax' but not its target 'sax_label'"):
        task({"sax": batch["sax"]})
    with pytest.raises(KeyError, match=r"none of the inputs \['sax', 'lax_4c'\]"):
        task({"image": batch["sax"]})


def test_report_evaluation_writes_csv_summary_and_mlflow(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    rows = [
        {"subject": 0, "view": "sax", "phase": "ED", "dice_LV": 0.9, "hd95_LV": 2.0},
        {"subject": 0, "view": "sax", "phase": "ES", "dice_LV": 0.8, "hd95_LV": float("nan")},
        {"subject": 1, "view": "lax_4c", "phase": "ED", "dice_LV": 0.6, "hd95_LV": 4.0},
    ]
    summary = report_evaluation(rows, tmp_path, id_columns=("subject", "phase"), group_by=("view",),
                                experiment_name="test")
    expected = {"eval_sax_dice_LV": 0.85, "eval_sax_hd95_LV": 2.0, "eval_lax_4c_dice_LV": 0.6,
                "eval_lax_4c_hd95_LV": 4.0}
    assert summary["metrics"] == pytest.approx(expected)
    with open(summary["csv"], newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [row["subject"] for row in table] == ["0", "0", "1"] and float(table[0]["dice_LV"]) == 0.9
    assert json.loads((tmp_path / "summary.json").read_text())["evaluation"]["metrics"] == summary["metrics"]
    client = MlflowClient(resolve_tracking(tmp_path)[0])
    run = client.get_run(summary["run_id"])
    assert run.data.metrics == pytest.approx(expected)
    assert [a.path for a in client.list_artifacts(summary["run_id"], "evaluation")] == ["evaluation/metrics.csv"]
    again = report_evaluation(rows[:1], tmp_path, experiment_name="test")  # the folder's run is continued
    assert again["run_id"] == summary["run_id"] and again["metrics"]["eval_dice_LV"] == 0.9
    with pytest.raises(DataError, match="nothing was evaluated"):
        report_evaluation([], tmp_path)
