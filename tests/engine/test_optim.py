"""weight_decay_param_groups: no decay on biases, norms and the parameters a network lists."""

import pytest
import torch
from torch import nn

from medssl.engine.optim import weight_decay_param_groups


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 3)
        self.norm = nn.LayerNorm(3)
        self.token = nn.Parameter(torch.zeros(1, 1, 3))
        self.frozen = nn.Parameter(torch.zeros(2, 2), requires_grad=False)

    def no_weight_decay(self):
        return {"token"}


def names(network, group):
    lookup = {id(p): n for n, p in network.named_parameters()}
    return sorted(lookup[id(p)] for p in group["params"])


def test_groups_split_by_dimension_and_no_weight_decay():
    network = Net()
    decay, no_decay = weight_decay_param_groups(network, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert names(network, decay) == ["linear.weight"]
    assert names(network, no_decay) == ["linear.bias", "norm.bias", "norm.weight", "token"]


def test_adamw_leaves_no_decay_parameters_untouched_without_gradient():
    network = Net()
    with torch.no_grad():
        for p in network.parameters():
            p.fill_(1.0)
    optimizer = torch.optim.AdamW(weight_decay_param_groups(network, 0.5), lr=0.1)
    for p in network.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    assert torch.allclose(network.linear.weight, torch.full((3, 3), 1 - 0.1 * 0.5))  # decoupled decay only
    assert torch.equal(network.linear.bias, torch.ones(3)) and torch.equal(network.token, torch.ones(1, 1, 3))


def test_ddp_style_wrapper_is_looked_through():
    network = Net()
    wrapped = nn.DataParallel(network)
    assert [len(g["params"]) for g in weight_decay_param_groups(wrapped, 0.1)] == [1, 4]


def test_invalid_inputs():
    with pytest.raises(ValueError, match="weight_decay must be >= 0"):
        weight_decay_param_groups(Net(), -1)
    network = Net()
    network.no_weight_decay = lambda: {"pos_embed"}
    with pytest.raises(ValueError, match="pos_embed"):
        weight_decay_param_groups(network, 0.1)
