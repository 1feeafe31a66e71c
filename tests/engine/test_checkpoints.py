"""Checkpoints: atomic files, weights round trips, architecture mismatches, and resuming an interrupted run."""

import os

import pytest
import torch
from ignite.engine import Events
from monai.handlers import LrScheduleHandler
from monai.optimizers import WarmupCosineSchedule
from safetensors.torch import load_file
from torch import nn

from medssl.engine.checkpoints import (
    CheckpointHandler,
    atomic_write,
    check_state_dict,
    latest_checkpoint,
    load_checkpoint,
    load_network_weights,
    save_checkpoint,
    save_network_weights,
)
from medssl.engine.trainer import SSLTrainer
from medssl.errors import CheckpointError


def test_atomic_write_leaves_nothing_when_writing_fails(tmp_path):
    def fail(temporary):
        with open(temporary, "w") as f:
            f.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(tmp_path / "out.txt", fail)
    assert os.listdir(tmp_path) == []
    atomic_write(tmp_path / "sub" / "out.txt", lambda temporary: open(temporary, "w").write("done"))
    assert (tmp_path / "sub" / "out.txt").read_text() == "done" and os.listdir(tmp_path / "sub") == ["out.txt"]


def test_safetensors_round_trip(tmp_path, toy_method):
    path = save_network_weights(nn.DataParallel(toy_method), tmp_path / "w.safetensors")
    assert sorted(load_file(str(path))) == sorted(toy_method.state_dict())  # no "module." prefix
    fresh = type(toy_method)()
    load_network_weights(fresh, path)
    for a, b in zip(fresh.state_dict().values(), toy_method.state_dict().values()):
        assert torch.equal(a, b)


def test_training_checkpoint_round_trip(tmp_path, toy_method):
    optimizer = torch.optim.AdamW(toy_method.parameters(), lr=0.5)
    toy_method(  # one step so the optimiser has moments to save
        {"x": torch.rand(2, 4), "y": torch.rand(2, 4)}
    )["loss"].backward()
    optimizer.step()
    path = save_checkpoint(tmp_path / "c.pt", {"network": toy_method, "optimizer": optimizer})
    fresh = type(toy_method)()
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=0.1)
    load_checkpoint(path, {"network": fresh, "optimizer": fresh_optimizer})
    assert torch.equal(fresh.linear.weight, toy_method.linear.weight)
    assert fresh_optimizer.param_groups[0]["lr"] == 0.5
    moments = [o.state_dict()["state"][0]["exp_avg"] for o in (fresh_optimizer, optimizer)]
    assert torch.equal(*moments)
    load_network_weights(fresh, path)  # the network entry of a training checkpoint
    with pytest.raises(CheckpointError, match=r"has no entries for \['lr_scheduler'\]"):
        load_checkpoint(path, {"lr_scheduler": WarmupCosineSchedule(fresh_optimizer, 1, 10)})


class Wider(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 6)
        self.head = nn.Linear(6, 1)


def test_architecture_mismatch_names_the_keys(tmp_path, toy_method):
    path = save_network_weights(Wider(), tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError) as error:
        load_network_weights(toy_method, path)
    message = str(error.value)
    assert "other.safetensors does not match ToyMethod" in message
    assert "2 missing keys: norm.bias, norm.weight" in message
    assert "2 unexpected keys: head.bias, head.weight" in message
    assert "linear.weight (checkpoint [6, 4] vs network [4, 4])" in message


def test_long_key_lists_are_cut(toy_method):
    state = {f"extra.{i}": torch.zeros(1) for i in range(8)} | toy_method.state_dict()
    expected = r"8 unexpected keys: extra.0, extra.1, extra.2, extra.3, extra.4, \.\.\. \(3 more\)"
    with pytest.raises(CheckpointError, match=expected):
        check_state_dict(toy_method, state, "test")


def test_missing_and_unreadable_files(tmp_path, toy_method):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_network_weights(toy_method, tmp_path / "none.pt")
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_network_weights(toy_method, tmp_path / "bad.pt")


EPOCHS, ITERATIONS = 3, 3


def build_run(network_class, save_dir, batches, final_weights=None, n_saved=2):
    """A fresh toy training run: same seed, same batches, warmup-cosine LR stepped per iteration."""
    torch.manual_seed(0)
    network = network_class()
    optimizer = torch.optim.AdamW(network.parameters(), lr=0.1)
    scheduler = WarmupCosineSchedule(optimizer, warmup_steps=2, t_total=EPOCHS * ITERATIONS)
    handler = CheckpointHandler(
        save_dir, {"network": network, "optimizer": optimizer, "lr_scheduler": scheduler}, n_saved=n_saved,
        final_weights=final_weights,
    )
    trainer = SSLTrainer(
        device="cpu", max_epochs=EPOCHS, train_data_loader=batches, network=network, optimizer=optimizer,
        train_handlers=[LrScheduleHandler(scheduler, epoch_level=False, print_lr=False), handler],
    )
    lrs = {}
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED, lambda engine: lrs.__setitem__(engine.state.iteration, engine.state.output["lr"])
    )
    return trainer, network, lrs


def test_killed_run_resumes_where_its_checkpoint_left_off(tmp_path, make_batches, toy_class):
    batches = make_batches(ITERATIONS)
    reference, reference_network, reference_lrs = build_run(toy_class, tmp_path / "reference", batches)
    reference.run()

    first, _, first_lrs = build_run(toy_class, tmp_path / "run", batches)
    first.add_event_handler(Events.EPOCH_COMPLETED(once=1), lambda engine: engine.terminate())  # "killed"
    first.run()
    assert latest_checkpoint(tmp_path / "run").name == "checkpoint_epoch=1.pt"

    final = tmp_path / "final.safetensors"
    second, network, second_lrs = build_run(toy_class, tmp_path / "run", batches, final_weights=final)
    second.run()
    assert sorted(second_lrs) == list(range(ITERATIONS + 1, EPOCHS * ITERATIONS + 1))  # continues at iteration 4
    assert {**first_lrs, **second_lrs} == reference_lrs  # the LR schedule continues in place
    for a, b in zip(network.parameters(), reference_network.parameters()):
        torch.testing.assert_close(a, b)  # same optimiser moments and order: the same model
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint_epoch=2.pt", "checkpoint_epoch=3.pt"]
    assert sorted(load_file(str(final))) == sorted(network.state_dict())


def test_resume_refuses_a_different_epoch_length(tmp_path, make_batches, toy_class):
    build_run(toy_class, tmp_path, make_batches(ITERATIONS))[0].run()
    trainer, _, _ = build_run(toy_class, tmp_path, make_batches(ITERATIONS + 1))
    with pytest.raises(CheckpointError, match="written with 3 iterations per epoch, this run has 4"):
        trainer.run()


def test_resume_refuses_a_checkpoint_beyond_the_configured_epochs(tmp_path, make_batches, toy_class):
    build_run(toy_class, tmp_path, make_batches(ITERATIONS))[0].run()
    trainer, _, _ = build_run(toy_class, tmp_path, make_batches(ITERATIONS))
    trainer.state.max_epochs = 2
    with pytest.raises(CheckpointError, match="at epoch 3, beyond this run's 2 epochs"):
        trainer.run()


def test_handler_arguments_are_checked(tmp_path, toy_method):
    with pytest.raises(ValueError, match="must not name 'trainer'"):
        CheckpointHandler(tmp_path, {"trainer": object()})
    with pytest.raises(ValueError, match="needs 'network' for final_weights"):
        CheckpointHandler(tmp_path, {"model": toy_method}, final_weights=tmp_path / "w.safetensors")
    with pytest.raises(ValueError, match=">= 1"):
        CheckpointHandler(tmp_path, {"network": toy_method}, save_interval=0)
