import math

import pytest
import torch
from torch import nn

from fixmatch.core.ema import EMA
from fixmatch.core.optim import cosine_lr, make_optimizer, parameter_groups


def test_cosine_schedule_values():
    K = 2**20
    assert cosine_lr(0, K, 0.03) == pytest.approx(0.03)
    assert cosine_lr(2**17, K, 0.03) == pytest.approx(0.029558, abs=5e-7)
    assert cosine_lr(K, K, 0.03) == pytest.approx(0.03 * math.cos(7 * math.pi / 16))
    values = [cosine_lr(k, 1000, 0.1) for k in range(0, 1001, 50)]
    assert all(a > b for a, b in zip(values, values[1:]))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=True)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 2)


def test_weight_decay_only_on_conv_and_linear_weights():
    net = _Net()
    decay, no_decay = parameter_groups(net, 5e-4)
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(decay["params"]) == ids([net.conv.weight, net.fc.weight])
    assert ids(no_decay["params"]) == ids([net.conv.bias, net.bn.weight, net.bn.bias, net.fc.bias])


def test_optimizer_is_nesterov_sgd_and_decay_acts_as_l2():
    net = nn.Linear(1, 1, bias=False)
    net.weight.data.fill_(2.0)
    opt = make_optimizer(net, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.5)
    assert opt.param_groups[0]["nesterov"] is True
    net.weight.grad = torch.zeros_like(net.weight)
    opt.step()
    # grad = 0 + wd * w = 1; nesterov first step: buf = 1, update = g + 0.9 * buf = 1.9
    assert net.weight.item() == pytest.approx(2.0 - 0.1 * 1.9)


def test_ema_update_averages_parameters_and_copies_buffers():
    net = _Net()
    ema = EMA(net, decay=0.9)
    before = ema.module.fc.weight.clone()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
        net.bn.running_mean.fill_(3.0)
    ema.update(net)
    assert torch.allclose(ema.module.fc.weight, 0.9 * before + 0.1 * net.fc.weight)
    assert torch.equal(ema.module.bn.running_mean, net.bn.running_mean)
    assert not any(p.requires_grad for p in ema.module.parameters())


def test_ema_with_zero_decay_is_a_copy():
    net = _Net()
    ema = EMA(net, decay=0.0)
    with torch.no_grad():
        net.fc.weight.mul_(3)
    ema.update(net)
    assert torch.equal(ema.module.fc.weight, net.fc.weight)
