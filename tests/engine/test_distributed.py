"""Distributed helpers outside a process group (the 2-process gloo path runs in the bundle's torchrun test)."""

import pytest
import torch
from torch import nn

from medssl.engine.distributed import (
    get_rank,
    get_world_size,
    init_distributed,
    is_main_process,
    local_device,
    main_process_first,
    unwrap_model,
    wrap_ddp,
)


def test_single_process_defaults():
    assert (get_rank(), get_world_size(), is_main_process()) == (0, 1, True)
    assert local_device() == torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    calls = []
    assert main_process_first(lambda x, y=0: calls.append((x, y)) or "done", 1, y=2) == "done"
    assert calls == [(1, 2)]


def test_unwrap_model():
    inner = nn.Linear(2, 2)
    assert unwrap_model(nn.DataParallel(inner)) is inner and unwrap_model(inner) is inner


def test_torchrun_environment_is_required(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match="RANK, WORLD_SIZE, MASTER_ADDR not set.*torchrun"):
        init_distributed()
    with pytest.raises(RuntimeError, match="initialised process group"):
        wrap_ddp(nn.Linear(2, 2), "cpu")
