"""Distribution alignment (--dist-align) on hand-computed values, and its place in the FixMatch loss."""
import pytest
import torch

from fixmatch.config import Config, ConfigError, check_config
from fixmatch.core.dist_align import DistributionAlignment
from fixmatch.core.loss import fixmatch_loss


def test_uniform_target_divides_by_p_model_and_renormalises():
    align = DistributionAlignment()
    probs = torch.tensor([[0.6, 0.3, 0.1], [0.6, 0.1, 0.3]])
    out = align(probs)
    # p_model = batch mean = (0.6, 0.2, 0.2); row 0 / p_model = (1, 1.5, 0.5) -> / 3
    assert torch.allclose(out[0], torch.tensor([1 / 3, 0.5, 1 / 6]))
    assert torch.allclose(out[1], torch.tensor([1 / 3, 1 / 6, 0.5]))
    assert torch.allclose(out.sum(1), torch.ones(2))


def test_p_model_is_the_mean_of_the_last_window_batch_means():
    align = DistributionAlignment(window=2)
    for row in ([1.0, 0.0], [0.5, 0.5], [0.0, 1.0]):
        align(torch.tensor([row]).clamp(min=1e-3))
    # the first batch fell out of the window: mean of (0.5, 0.5) and (0.001, 1)
    assert torch.allclose(align.p_model(), torch.tensor([0.2505, 0.75]))


def test_labeled_class_distribution_is_the_target_when_not_uniform():
    assert DistributionAlignment.target_from_labels(torch.tensor([0, 1, 2, 0, 1, 2]), 3) is None
    target = DistributionAlignment.target_from_labels(torch.tensor([0, 0, 0, 1]), 3)
    assert torch.allclose(target, torch.tensor([0.75, 0.25, 0.0]))
    align = DistributionAlignment(torch.tensor([0.5, 0.25, 0.25]))
    out = align(torch.tensor([[0.5, 0.25, 0.25]]))  # prediction = p_model: the result is the target
    assert torch.allclose(out, torch.tensor([[0.5, 0.25, 0.25]]))


def test_reduce_sees_the_batch_mean_before_it_enters_p_model():
    seen = []
    align = DistributionAlignment(reduce=lambda t: seen.append(t.clone()) or torch.tensor([0.5, 0.5]))
    out = align(torch.tensor([[0.9, 0.1]]))
    assert torch.allclose(seen[0], torch.tensor([0.9, 0.1]))
    assert torch.allclose(out, torch.tensor([[0.9, 0.1]]))  # p_model uniform (all ranks' mean): unchanged


def test_state_round_trip_continues_identically():
    a = DistributionAlignment(window=3)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.softmax(torch.randn(4, 5, generator=gen), 1) for _ in range(6)]
    for b in batches[:4]:
        a(b)
    b = DistributionAlignment()
    b.load_state_dict(a.state_dict())
    assert b.window == 3
    for batch in batches[4:]:
        assert torch.equal(a(batch), b(batch))


def test_alignment_gives_pseudo_labels_to_an_under_predicted_class():
    # The model leans to class 0 on every sample; sample 1 is class 1 by a small margin after alignment.
    weak = torch.log(torch.tensor([[0.97, 0.02, 0.01], [0.50, 0.45, 0.05], [0.96, 0.02, 0.02]]))
    strong = torch.zeros(3, 3)
    lb, y = torch.zeros(1, 3), torch.tensor([0])
    _, plain = fixmatch_loss(lb, y, weak, strong, tau=0.51)
    _, aligned = fixmatch_loss(lb, y, weak, strong, tau=0.51, align=DistributionAlignment())
    assert plain.pseudo_label.tolist() == [0, 0, 0]
    assert aligned.pseudo_label.tolist()[1] == 1
    # confidence is read from the aligned probabilities: p_model = (0.81, 0.163, 0.027), so sample 1's
    # aligned confidence is 0.526 and passes tau 0.51, where its plain confidence 0.50 does not
    p1 = torch.tensor([0.50, 0.45, 0.05]) / torch.tensor([0.81, 0.49 / 3, 0.08 / 3])
    assert (p1 / p1.sum()).max().item() == pytest.approx(0.526, abs=1e-3)
    assert plain.mask.tolist()[1] is False and aligned.mask.tolist()[1] is True


def test_soft_targets_with_alignment_are_the_sharpened_aligned_probabilities():
    weak = torch.log(torch.tensor([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1]]))
    strong = torch.randn(2, 3, generator=torch.Generator().manual_seed(1))
    lb, y = torch.zeros(1, 3), torch.tensor([0])
    align = DistributionAlignment()
    _, stats = fixmatch_loss(lb, y, weak, strong, tau=0.0, T=0.5, align=align)
    aligned = torch.tensor([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1]]) / torch.tensor([0.45, 0.45, 0.1])
    aligned = aligned / aligned.sum(1, keepdim=True)
    target = aligned ** 2 / (aligned ** 2).sum(1, keepdim=True)
    expected = -(target * torch.log_softmax(strong, 1)).sum(1).mean()
    assert stats.loss_u.item() == pytest.approx(expected.item(), abs=1e-6)


def test_dist_align_is_a_boolean_key():
    assert Config(dist_align=True).dist_align is True
    with pytest.raises(ConfigError, match="dist_align"):
        check_config(Config(dist_align="yes"))


def test_a_class_never_predicted_does_not_turn_the_probabilities_into_nan():
    align = DistributionAlignment()
    out = align(torch.tensor([[1.0, 0.0], [0.5, 0.5]]))
    out = align(torch.tensor([[1.0, 0.0]]))  # p_model of class 1 stays > 0 from the first batch
    assert torch.isfinite(out).all()
    never = DistributionAlignment()
    out = never(torch.tensor([[1.0, 0.0], [1.0, 0.0]]))  # class 1's p_model is exactly 0
    assert torch.isfinite(out).all() and torch.allclose(out, torch.tensor([[1.0, 0.0], [1.0, 0.0]]))


def test_drop_last_restores_the_window_as_it_was_before_the_call():
    align = DistributionAlignment(window=2)
    for row in ([0.9, 0.1], [0.6, 0.4]):
        align(torch.tensor([row]))
    before = [t.clone() for t in align.history]
    align(torch.tensor([[float("nan"), float("nan")]]))  # pushes (0.9, 0.1) out of the full window
    align.drop_last()
    assert len(align.history) == 2 and all(torch.equal(a, b) for a, b in zip(align.history, before))
    short = DistributionAlignment(window=3)
    short(torch.tensor([[0.5, 0.5]]))
    short(torch.tensor([[0.7, 0.3]]))
    short.drop_last()  # nothing was evicted: only the last mean goes
    assert [t.tolist() for t in short.history] == [[0.5, 0.5]]
