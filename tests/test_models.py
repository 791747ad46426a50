"""Tests for the model registry and architectures (CPU only, small batches to stay fast)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fixmatch.models import (
    ModelError,
    WideResNet,
    count_parameters,
    create_model,
    list_models,
    register_model,
)
from fixmatch.models.wideresnet import BasicBlock

MODELS = list_models()
# The registry-wide tests below build and run each model several times on the CPU: the paper's models.
# tests/test_backbones.py runs every registered model once, at small inputs.
PAPER_MODELS = ["cnn_small", "wrn28_2", "wrn28_8", "wrn37_2"]


def test_registry_contents() -> None:
    assert {"wrn28_2", "wrn28_8", "cnn_small"} | set(PAPER_MODELS) <= set(MODELS)
    assert MODELS == sorted(MODELS)


@pytest.mark.parametrize("name", PAPER_MODELS)
@pytest.mark.parametrize("in_channels", [1, 3])
@pytest.mark.parametrize("size", [28, 32])
def test_output_shape(name: str, in_channels: int, size: int) -> None:
    model = create_model(name, num_classes=7, in_channels=in_channels).eval()
    with torch.no_grad():
        out = model(torch.randn(2, in_channels, size, size))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


@pytest.mark.slow
@pytest.mark.parametrize("name", PAPER_MODELS)
def test_forward_backward_reaches_all_parameters(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=5, in_channels=3).train()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 5, (4,))
    nn.functional.cross_entropy(model(x), y).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


def test_wrn28_2_parameter_count_exact() -> None:
    assert count_parameters(create_model("wrn28_2", num_classes=10)) == 1_467_610


def test_wrn28_8_parameter_count() -> None:
    n = count_parameters(create_model("wrn28_8", num_classes=100))
    assert abs(n - 23.4e6) / 23.4e6 < 0.01


def test_count_parameters_trainable_only() -> None:
    model = create_model("cnn_small", num_classes=10, in_channels=1)
    total = count_parameters(model)
    model.fc.weight.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == total - model.fc.weight.numel()
    assert count_parameters(model) == total


def test_wrn_hyperparameters_match_official() -> None:
    model = create_model("wrn28_2", num_classes=10)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    acts = [m for m in model.modules() if isinstance(m, nn.LeakyReLU)]
    assert bns and acts
    assert all(m.momentum == pytest.approx(0.001) and m.eps == pytest.approx(1e-3) for m in bns)
    assert all(m.negative_slope == pytest.approx(0.1) for m in acts)
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))
    # 3 groups x 4 blocks, widths 32/64/128, strides 1/2/2; only the very first block
    # shares its activation with the shortcut.
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 12
    assert [b.conv1.out_channels for b in blocks[::4]] == [32, 64, 128]
    assert [b.conv1.stride[0] for b in blocks[::4]] == [1, 2, 2]
    assert [b.activate_before_residual for b in blocks] == [True] + [False] * 11
    assert model.stem.out_channels == 16


def test_wrn_initialisation() -> None:
    torch.manual_seed(0)
    model = WideResNet(num_classes=10, widen_factor=2)
    conv = model.groups[2][1].conv1  # 128 -> 128 3x3: std sqrt(2 / (9 * 128))
    assert conv.weight.std().item() == pytest.approx((2 / (9 * 128)) ** 0.5, rel=0.05)
    assert torch.all(model.fc.bias == 0)
    assert torch.all(model.bn.weight == 1) and torch.all(model.bn.bias == 0)


def test_wrn_rejects_bad_depth() -> None:
    with pytest.raises(ValueError):
        WideResNet(num_classes=10, depth=27)


def test_kwargs_reach_constructor() -> None:
    model = create_model("cnn_small", num_classes=3, in_channels=1, widths=(8, 16), bn_momentum=0.1)
    assert model.fc.in_features == 16
    assert all(m.momentum == 0.1 for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_unknown_model_raises() -> None:
    with pytest.raises(ModelError, match="wrn28_2") as info:
        create_model("resnet9000", num_classes=10)
    assert isinstance(info.value, ValueError)
    assert "\n" not in str(info.value)


def test_duplicate_registration_rejected() -> None:
    with pytest.raises(ValueError):
        register_model("wrn28_2")(lambda num_classes, in_channels=3: nn.Identity())


@pytest.mark.parametrize("name", PAPER_MODELS)
def test_same_seed_same_initial_weights(name: str) -> None:
    states = []
    for _ in range(2):
        torch.manual_seed(123)
        states.append(create_model(name, num_classes=10).state_dict())
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    torch.manual_seed(124)
    other = create_model(name, num_classes=10).state_dict()
    assert not all(torch.equal(states[0][k], other[k]) for k in states[0])
