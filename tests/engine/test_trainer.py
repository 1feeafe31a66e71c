"""SSLTrainer: one iteration equals a hand-written AdamW step; logging outputs, autocast and error cases."""

import copy

import pytest
import torch
from ignite.engine import Events

from medssl.engine.trainer import EPOCH_LOSS, ProgressBarHandler, SSLTrainer


def make_trainer(network, batches, **kwargs):
    optimizer = torch.optim.AdamW(network.parameters(), lr=0.1, betas=(0.9, 0.95), weight_decay=0.05)
    return SSLTrainer(
        device="cpu", max_epochs=1, train_data_loader=batches, network=network, optimizer=optimizer, **kwargs
    )


@pytest.mark.parametrize("clip", [None, 0.01])
def test_iteration_matches_a_manual_adamw_step(toy_method, make_batches, clip):
    batches = make_batches(1)
    reference = copy.deepcopy(toy_method)
    trainer = make_trainer(toy_method, batches, grad_clip_norm=clip)
    trainer.run()

    optimizer = torch.optim.AdamW(reference.parameters(), lr=0.1, betas=(0.9, 0.95), weight_decay=0.05)
    loss = reference(batches[0])["loss"]
    loss.backward()
    if clip is not None:
        total = torch.sqrt(sum((p.grad**2).sum() for p in reference.parameters()))
        assert total > clip  # clipping is active in this case
        for p in reference.parameters():
            p.grad *= clip / (total + 1e-6)
    optimizer.step()
    for trained, expected in zip(toy_method.parameters(), reference.parameters()):
        torch.testing.assert_close(trained, expected)
    assert trainer.state.output["loss"] == pytest.approx(loss.item())


def test_output_carries_loss_parts_and_the_lr_used(toy_method, make_batches):
    batches = make_batches(3)
    trainer = make_trainer(toy_method, batches)
    seen = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda engine: seen.append(dict(engine.state.output)))
    trainer.run()
    assert [sorted(out) for out in seen] == [["loss", "loss_a", "loss_b", "lr"]] * 3
    assert all(out["lr"] == 0.1 for out in seen)
    assert all(out["loss"] == pytest.approx((out["loss_a"] + out["loss_b"]) / 2) for out in seen)
    assert trainer.state.metrics[EPOCH_LOSS] == pytest.approx(sum(out["loss"] for out in seen) / 3)


def test_the_network_is_called_through_the_inferer(toy_method, make_batches):
    calls = []

    def inferer(batch, network):
        calls.append(sorted(batch))
        return network(batch)

    make_trainer(toy_method, make_batches(2), inferer=inferer).run()
    assert calls == [["x", "y"], ["x", "y"]]


def test_bfloat16_autocast_wraps_the_forward(toy_method, make_batches):
    make_trainer(toy_method, make_batches(1), autocast_dtype="bfloat16").run()
    assert toy_method.autocast_seen == [(True, torch.bfloat16)]


def test_float16_autocast_steps_through_a_gradient_scaler(toy_method, make_batches):
    before = [p.detach().clone() for p in toy_method.parameters()]
    trainer = make_trainer(toy_method, make_batches(2), autocast_dtype="float16", grad_clip_norm=1.0)
    trainer.run()
    assert trainer.grad_scaler is not None and toy_method.autocast_seen[0] == (True, torch.float16)
    assert any(not torch.equal(a, b) for a, b in zip(before, toy_method.parameters()))


def test_no_autocast_by_default(toy_method, make_batches):
    trainer = make_trainer(toy_method, make_batches(1))
    trainer.run()
    assert toy_method.autocast_seen == [(False, torch.get_autocast_dtype("cpu"))] and trainer.grad_scaler is None


def test_non_finite_loss_stops_training(toy_method, make_batches):
    batches = make_batches(2)
    batches[1]["y"][0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="loss is nan at iteration 2"):
        make_trainer(toy_method, batches).run()


def test_output_without_loss(make_batches):
    network = torch.nn.Linear(1, 1)
    network.forward = lambda batch: {"reconstruction": batch["x"]}
    with pytest.raises(KeyError, match="no 'loss'; keys: \\['reconstruction'\\]"):
        make_trainer(network, make_batches(1)).run()


@pytest.mark.parametrize(
    "kwargs, message", [({"autocast_dtype": "int8"}, "autocast_dtype"), ({"grad_clip_norm": 0}, "grad_clip_norm")]
)
def test_invalid_arguments(toy_method, make_batches, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_trainer(toy_method, make_batches(1), **kwargs)


def test_progress_bar_shows_the_loss(toy_method, make_batches, capsys):
    trainer = make_trainer(toy_method, make_batches(2), train_handlers=[ProgressBarHandler()])
    trainer.run()
    assert "loss=" in capsys.readouterr().err
