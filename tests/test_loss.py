import math

import pytest
import torch
import torch.nn.functional as F

from fixmatch.core.loss import fixmatch_loss


def _confident(labels, num_classes=3, margin=10.0):
    """Logits whose softmax puts > 0.99 on the given labels."""
    logits = torch.zeros(len(labels), num_classes)
    logits[torch.arange(len(labels)), torch.tensor(labels)] = margin
    return logits


def test_supervised_part_is_cross_entropy():
    logits_lb = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    y = torch.tensor([0, 2])
    loss, stats = fixmatch_loss(logits_lb, y, None, None)
    # hand computed: -log softmax
    l0 = -(2.0 - math.log(math.exp(2) + 1 + math.exp(-1)))
    l1 = -(0.0 - math.log(1 + math.e + 1))
    assert loss.item() == pytest.approx((l0 + l1) / 2, abs=1e-6)
    assert stats.loss_u.item() == 0.0


def test_all_masked_unlabeled_loss_is_mean_ce_to_pseudo_labels():
    logits_lb, y = torch.zeros(2, 3), torch.tensor([0, 1])
    w = _confident([2, 0, 1, 1])
    s = torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.5, 0.2, 0.1], [0.0, 0.0, 0.0]])
    loss, stats = fixmatch_loss(logits_lb, y, w, s, tau=0.95, lambda_u=2.0)
    expected_u = F.cross_entropy(s, torch.tensor([2, 0, 1, 1])).item()
    assert stats.mask_rate.item() == 1.0
    assert stats.loss_u.item() == pytest.approx(expected_u, abs=1e-6)
    assert loss.item() == pytest.approx(math.log(3) + 2.0 * expected_u, abs=1e-5)


def test_none_masked_gives_zero_unlabeled_loss():
    w = torch.zeros(4, 3)  # uniform: confidence 1/3 < tau
    s = torch.randn(4, 3)
    loss, stats = fixmatch_loss(torch.zeros(2, 3), torch.tensor([0, 1]), w, s, tau=0.95)
    assert stats.mask_rate.item() == 0.0
    assert stats.loss_u.item() == 0.0
    assert loss.item() == pytest.approx(math.log(3), abs=1e-6)


def test_mixed_mask_averages_over_all_unlabeled_samples():
    w = torch.cat([_confident([1]), torch.zeros(1, 3), _confident([0]), torch.zeros(1, 3)])
    s = torch.tensor([[0.0, 2.0, 0.0], [5.0, 0.0, 0.0], [1.0, 0.0, 3.0], [0.0, 0.0, 9.0]])
    _, stats = fixmatch_loss(torch.zeros(1, 3), torch.tensor([0]), w, s, tau=0.95)
    ce = F.cross_entropy(s, torch.tensor([1, 0, 0, 2]), reduction="none")
    # divided by all 4 samples, not by the 2 masked ones
    assert stats.loss_u.item() == pytest.approx((ce[0] + ce[2]).item() / 4, abs=1e-6)
    assert stats.mask.tolist() == [True, False, True, False]
    assert stats.mask_rate.item() == 0.5


def test_threshold_is_inclusive():
    p = 0.95
    w = torch.log(torch.tensor([[p, (1 - p) / 2, (1 - p) / 2]], dtype=torch.float64)).float()
    conf = torch.softmax(w, 1).max().item()
    _, stats = fixmatch_loss(torch.zeros(1, 3), torch.tensor([0]), w, torch.zeros(1, 3), tau=conf)
    assert stats.mask.item()


def test_no_gradient_flows_into_pseudo_labels():
    w = _confident([0, 1]).requires_grad_(True)
    s = torch.randn(2, 3, requires_grad=True)
    loss, _ = fixmatch_loss(torch.zeros(1, 3, requires_grad=True), torch.tensor([0]), w, s)
    loss.backward()
    assert w.grad is None or torch.all(w.grad == 0)
    assert s.grad is not None and s.grad.abs().sum() > 0


def test_shared_logits_get_gradient_only_through_strong_and_labeled_slices():
    logits = torch.randn(1 + 2 + 2, 3)
    logits[1:3] = _confident([2, 2])
    logits.requires_grad_(True)
    loss, _ = fixmatch_loss(logits[:1], torch.tensor([0]), logits[1:3], logits[3:])
    loss.backward()
    assert torch.all(logits.grad[1:3] == 0)
    assert logits.grad[0].abs().sum() > 0 and logits.grad[3:].abs().sum() > 0
