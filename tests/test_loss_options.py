"""Lu's options (soft pseudo-labels with a temperature T, normalisation over the masked samples) on
hand-computed values."""
import math

import pytest
import torch

from fixmatch.core.loss import fixmatch_loss

# Two unlabeled samples, three classes. Sample 0 is confident (softmax max > 0.95), sample 1 is not.
W = torch.tensor([[4.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
S = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
LB, Y = torch.zeros(1, 3), torch.tensor([0])


def _log_softmax_row(row):
    z = math.log(sum(math.exp(v) for v in row))
    return [v - z for v in row]


def test_masked_normalisation_divides_by_the_masked_count():
    # confidence of sample 0: e^4 / (e^4 + 2) = 0.9647 >= 0.95; sample 1: 1/3 < 0.95
    ce0 = -_log_softmax_row([1.0, 0.0, 0.0])[0]  # hard label 0
    _, all_ = fixmatch_loss(LB, Y, W, S, tau=0.95, lu_norm="all")
    _, masked = fixmatch_loss(LB, Y, W, S, tau=0.95, lu_norm="masked")
    assert all_.mask.tolist() == [True, False]
    assert all_.loss_u.item() == pytest.approx(ce0 / 2, abs=1e-6)
    assert masked.loss_u.item() == pytest.approx(ce0 / 1, abs=1e-6)


def test_masked_normalisation_with_nothing_masked_is_zero_not_nan():
    _, stats = fixmatch_loss(LB, Y, torch.zeros(2, 3), S, tau=0.95, lu_norm="masked")
    assert stats.loss_u.item() == 0.0


@pytest.mark.parametrize("T", [0.0, 1.0])
def test_t_zero_and_one_are_the_hard_argmax_labels(T):
    _, hard = fixmatch_loss(LB, Y, W, S, tau=0.0, T=T)
    ls0, ls1 = _log_softmax_row([1.0, 0.0, 0.0]), _log_softmax_row([0.0, 2.0, 0.0])
    # argmax of sample 1's uniform weak logits is class 0 (first maximum)
    assert hard.loss_u.item() == pytest.approx((-ls0[0] - ls1[0]) / 2, abs=1e-6)


def test_soft_labels_are_the_tempered_softmax_of_the_weak_view():
    T = 2.0
    # target of sample 0: softmax([2, 0, 0]) = (e^2, 1, 1) / (e^2 + 2); sample 1: uniform
    q0 = [math.exp(2) / (math.exp(2) + 2), 1 / (math.exp(2) + 2), 1 / (math.exp(2) + 2)]
    ls0, ls1 = _log_softmax_row([1.0, 0.0, 0.0]), _log_softmax_row([0.0, 2.0, 0.0])
    ce0 = -sum(q * l for q, l in zip(q0, ls0))
    ce1 = -sum(l / 3 for l in ls1)
    _, soft = fixmatch_loss(LB, Y, W, S, tau=0.0, T=T)
    assert soft.loss_u.item() == pytest.approx((ce0 + ce1) / 2, abs=1e-6)
    # the mask uses the unsharpened softmax: with tau 0.95, only sample 0 passes whatever T is
    _, soft_masked = fixmatch_loss(LB, Y, W, S, tau=0.95, T=0.1)
    assert soft_masked.mask.tolist() == [True, False]
    # pseudo_label stays the argmax (monitoring of pseudo-label accuracy)
    assert soft_masked.pseudo_label.tolist() == [0, 0]


def test_sharp_temperature_approaches_the_hard_label():
    _, hard = fixmatch_loss(LB, Y, W, S, tau=0.95, T=1.0)
    _, sharp = fixmatch_loss(LB, Y, W, S, tau=0.95, T=0.01)
    assert sharp.loss_u.item() == pytest.approx(hard.loss_u.item(), abs=1e-6)


def test_soft_labels_give_no_gradient_to_the_weak_view():
    w = W.clone().requires_grad_(True)
    s = S.clone().requires_grad_(True)
    loss, _ = fixmatch_loss(LB, Y, w, s, tau=0.0, T=0.5)
    loss.backward()
    assert w.grad is None or torch.all(w.grad == 0)
    assert s.grad.abs().sum() > 0


def test_unknown_normalisation_is_refused():
    with pytest.raises(ValueError, match="lu_norm"):
        fixmatch_loss(LB, Y, W, S, lu_norm="batch")
