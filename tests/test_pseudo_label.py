"""Pseudo-label policies (core/pseudo_label.py) against hand-computed values of their papers' definitions."""
import functools
import json
import math
import os
import threading

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from run_helpers import Killed, kill_after_checkpoint, metrics_rows

import fixmatch
from fixmatch.config import Config, ConfigError, check_combinations
from fixmatch.core.loss import fairness_loss, fixmatch_loss
from fixmatch.core.pseudo_label import FixMatchPolicy, FlexMatchPolicy, FreeMatchPolicy, SoftMatchPolicy, make_policy
from fixmatch.runs.checkpoint import load_checkpoint
from fixmatch.training import distributed

QUICK = dict(dataset="synthetic", model="cnn_small", num_labels=40, batch_size=16, mu=3, lr=0.05,
             ema=0.9, eval_every=20, eval_batch_size=512, progress=False, device="cpu")


def P(*rows):
    return torch.tensor(rows, dtype=torch.float32)


# ------------------------------------------------------------------ fixmatch
@pytest.mark.parametrize("lu_norm", ["all", "masked"])
def test_the_fixmatch_policy_gives_exactly_the_loss_of_the_fixed_threshold(lu_norm):
    torch.manual_seed(0)
    lb, y, w, s = torch.randn(4, 5), torch.tensor([0, 1, 2, 3]), 4 * torch.randn(12, 5), torch.randn(12, 5)
    policy = FixMatchPolicy(5, tau=0.6)
    ref_loss, ref = fixmatch_loss(lb, y, w, s, tau=0.6, lu_norm=lu_norm)
    loss, stats = fixmatch_loss(lb, y, w, s, tau=0.6, lu_norm=lu_norm, policy=policy)
    assert 0 < ref.mask_rate < 1
    assert torch.equal(loss, ref_loss) and torch.equal(stats.mask, ref.mask) and torch.equal(stats.weight, ref.weight)
    assert policy.thresholds().tolist() == [pytest.approx(0.6)] * 5


def test_weights_scale_each_sample_and_masked_norm_divides_by_their_sum():
    w, s = P([5.0, 0, 0], [0, 5.0, 0]), P([1.0, 0, 0], [0, 0, 1.0])
    ce = torch.nn.functional.cross_entropy(s, torch.tensor([0, 1]), reduction="none")
    half = lambda probs: (probs.argmax(1), torch.tensor([1.0, 0.5]))  # noqa: E731
    _, stats = fixmatch_loss(torch.zeros(1, 3), torch.tensor([0]), w, s, policy=half)
    assert stats.loss_u.item() == pytest.approx(((ce[0] + 0.5 * ce[1]) / 2).item())
    _, stats = fixmatch_loss(torch.zeros(1, 3), torch.tensor([0]), w, s, policy=half, lu_norm="masked")
    assert stats.loss_u.item() == pytest.approx(((ce[0] + 0.5 * ce[1]) / 1.5).item())
    assert stats.mask.tolist() == [True, True] and stats.mask_rate.item() == 1.0


# ------------------------------------------------------------------ flexmatch
def test_flexmatch_first_step_has_zero_thresholds_then_learns_from_confident_samples():
    policy = FlexMatchPolicy(3, tau=0.95, pool_size=4, warmup=True)
    label, weight = policy(P([0.96, 0.02, 0.02], [0.2, 0.5, 0.3]), torch.tensor([0, 1]))
    assert label.tolist() == [0, 1] and weight.tolist() == [1.0, 1.0]  # beta = 0: T(c) = 0 at the first step
    assert policy.selected.tolist() == [0, -1, -1, -1]
    # sigma = [1, 0, 0], 3 never confident: beta = 1/3, T(0) = 0.95 * (1/3) / (2 - 1/3) = 0.19
    assert policy.thresholds().tolist() == pytest.approx([0.19, 0.0, 0.0])


def test_flexmatch_without_warmup_divides_by_the_largest_class_count():
    policy = FlexMatchPolicy(3, tau=0.9, pool_size=5, warmup=False)
    policy(P([0.95, 0.03, 0.02], [0.95, 0.03, 0.02], [0.02, 0.95, 0.03]), torch.tensor([0, 1, 2]))
    # sigma = [2, 1, 0]: beta = [1, 1/2, 0]; T = 0.9 * [1, 1/3, 0] (with warm-up: / 2 never confident, the same)
    assert policy.thresholds().tolist() == pytest.approx([0.9, 0.3, 0.0])
    # The next batch uses the updated thresholds; class 2, never predicted confidently, keeps T = 0.
    _, weight = policy(P([0.8, 0.1, 0.1], [0.2, 0.45, 0.35], [0.3, 0.3, 0.4]), torch.tensor([3, 4, 0]))
    assert weight.tolist() == [0.0, 1.0, 1.0]


def test_flexmatch_all_unconfident_batches_and_a_pool_in_one_class_leave_beta_unchanged():
    policy = FlexMatchPolicy(2, tau=0.95, pool_size=2)
    policy(P([0.6, 0.4], [0.3, 0.7]), torch.tensor([0, 1]))
    assert policy.selected.tolist() == [-1, -1] and policy.beta.tolist() == [0.0, 0.0]
    policy(P([0.99, 0.01], [0.01, 0.99]), torch.tensor([0, 1]))
    assert policy.beta.tolist() == [1.0, 1.0]  # sigma = [1, 1]
    policy(P([0.99, 0.01]), torch.tensor([1]))  # now the whole pool is class 0: no change (USB), not [1, 0]
    assert policy.selected.tolist() == [0, 0] and policy.beta.tolist() == [1.0, 1.0]


def test_flexmatch_latest_confident_class_replaces_the_earlier_one():
    policy = FlexMatchPolicy(2, tau=0.9, pool_size=3)
    policy(P([0.95, 0.05]), torch.tensor([1]))
    policy(P([0.05, 0.95]), torch.tensor([1]))
    policy(P([0.5, 0.5]), torch.tensor([1]))  # not confident: the sample keeps its latest confident class
    assert policy.selected.tolist() == [-1, 1, -1]


def test_flexmatch_needs_the_pool_indices():
    with pytest.raises(ValueError, match="pool indices"):
        FlexMatchPolicy(2, 0.95, 4)(P([0.5, 0.5]), None)


# ------------------------------------------------------------------ freematch
def test_freematch_updates_its_emas_first_then_thresholds_the_batch():
    policy = FreeMatchPolicy(2, momentum=0.5)
    assert policy.thresholds().tolist() == pytest.approx([0.5, 0.5])  # tau_0 = p_0 = 1/C
    label, weight = policy(P([0.9, 0.1], [0.52, 0.48], [0.3, 0.7]), None)
    # tau_1 = 0.5 * 0.5 + 0.5 * mean(0.9, 0.52, 0.7); p_1 = 0.5 * 0.5 + 0.5 * mean probabilities
    tau_1 = 0.25 + 0.5 * (0.9 + 0.52 + 0.7) / 3
    p_1 = [0.25 + 0.5 * (0.9 + 0.52 + 0.3) / 3, 0.25 + 0.5 * (0.1 + 0.48 + 0.7) / 3]
    assert policy.tau_t.item() == pytest.approx(tau_1)
    assert policy.p_t.tolist() == pytest.approx(p_1)
    assert policy.thresholds().tolist() == pytest.approx([tau_1, tau_1 * p_1[1] / p_1[0]])
    assert policy.hist.tolist() == pytest.approx([0.25 + 0.5 * 2 / 3, 0.25 + 0.5 / 3])
    # 0.52 passed the old threshold 0.5 but not the updated tau_1 ~ 0.603: the update comes first.
    assert label.tolist() == [0, 0, 1] and weight.tolist() == [1.0, 0.0, 1.0]


def test_fairness_loss_hand_computed():
    logits = P([0.75, 0.25], [0.25, 0.75]).log()
    p_t, hist = torch.tensor([0.6, 0.4]), torch.tensor([0.5, 0.5])
    both = torch.tensor([True, True])
    # hist_s = [1/2, 1/2], mean p_s = [1/2, 1/2]: SumNorm -> [1/2, 1/2]; target SumNorm(p_t / hist) = [0.6, 0.4]
    assert fairness_loss(logits, both, p_t, hist).item() == pytest.approx(math.log(0.5))
    # Only one masked sample, class 1 absent from hist_s: its factor is 0, so log(0 + 1e-12) weighs 0.4.
    one = torch.tensor([True, False])
    assert fairness_loss(logits, one, p_t, hist).item() == pytest.approx(0.4 * math.log(1e-12), rel=1e-5)
    assert fairness_loss(logits, torch.tensor([False, False]), p_t, hist).item() == 0.0


# ------------------------------------------------------------------ softmatch
def test_softmatch_truncated_gaussian_weights_from_updated_statistics():
    policy = SoftMatchPolicy(2, momentum=0.5, n_sigma=2.0, align=False)
    label, weight = policy(P([0.9, 0.1], [0.6, 0.4], [0.5, 0.5]), None)
    conf = [0.9, 0.6, 0.5]
    mean = sum(conf) / 3
    var = sum((c - mean) ** 2 for c in conf) / 2  # unbiased
    mu, v = 0.5 * 0.5 + 0.5 * mean, 0.5 * 1.0 + 0.5 * var  # from mu_0 = 1/C, sigma_0^2 = 1
    assert policy.mu_t.item() == pytest.approx(mu) and policy.var_t.item() == pytest.approx(v)
    assert weight.tolist() == pytest.approx([1.0, 1.0, math.exp(-(0.5 - mu) ** 2 / (2 * v / 4))])
    assert policy.thresholds().tolist() == pytest.approx([mu])
    policy(P([0.7, 0.3]), None)  # one sample: no unbiased variance, sigma^2 is kept
    assert policy.var_t.item() == pytest.approx(v)


def test_softmatch_aligns_to_uniform_from_the_first_batch_mean():
    policy = SoftMatchPolicy(2, momentum=0.5)
    label, _ = policy(P([0.9, 0.1], [0.6, 0.4]), None)
    # p_model = batch mean [0.75, 0.25]; the second sample becomes [0.6/0.75, 0.4/0.25] ~ [0.8, 1.6]: class 1
    assert policy.p_model.tolist() == pytest.approx([0.75, 0.25])
    assert label.tolist() == [0, 1]
    policy(P([0.5, 0.5], [0.5, 0.5]), None)
    assert policy.p_model.tolist() == pytest.approx([0.625, 0.375])  # then an EMA


# ------------------------------------------------------------------ state
def _policies():
    return [FixMatchPolicy(3, 0.9), FlexMatchPolicy(3, 0.9, 6), FreeMatchPolicy(3, 0.9), SoftMatchPolicy(3, 0.9)]


@pytest.mark.parametrize("index", range(4))
def test_state_round_trip_and_drop_last(index):
    torch.manual_seed(index)
    batches = [(torch.softmax(4 * torch.randn(4, 3), 1), torch.randint(0, 6, (4,))) for _ in range(3)]
    a, b = _policies()[index], _policies()[index]
    for probs, idx in batches[:2]:
        a(probs, idx)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.thresholds(), b.thresholds())
    before = a.state_dict()
    out_a, out_b = a(*batches[2]), b(*batches[2])
    assert all(torch.equal(x, y) for x, y in zip(out_a, out_b))
    a.drop_last()  # a skipped step: the state is as before it
    after = a.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k != "algorithm")
    with pytest.raises(ValueError, match="pseudo-label state"):
        _policies()[(index + 1) % 4].load_state_dict(a.state_dict())


def _two_rank_gathers():
    """all_gather for two ranks running in two threads: each gets both ranks' tensors, in rank order."""
    slots, barrier = [None, None], threading.Barrier(2)

    def gather_for(rank):
        def gather(t):
            slots[rank] = t
            barrier.wait()
            out = torch.cat(slots)
            barrier.wait()  # both have read the slots before either writes the next tensor
            return out
        return gather

    return [gather_for(0), gather_for(1)]


def test_statistics_from_the_gathered_global_batch_equal_one_process():
    # Two "ranks" in threads, each with half of the batch; gather concatenates in rank order, as all_gather does.
    torch.manual_seed(0)
    probs, idx = torch.softmax(4 * torch.randn(8, 3), 1), torch.randperm(10)[:8]
    for make in (lambda g: FlexMatchPolicy(3, 0.7, 10, gather=g), lambda g: FreeMatchPolicy(3, 0.9, gather=g),
                 lambda g: SoftMatchPolicy(3, 0.9, gather=g)):
        single = make(None)
        single(probs, idx)
        ranks = [make(gather) for gather in _two_rank_gathers()]
        threads = [threading.Thread(target=ranks[r], args=(probs[4 * r:4 * r + 4], idx[4 * r:4 * r + 4]))
                   for r in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for rank in ranks:
            s, r = single.state_dict(), rank.state_dict()
            assert all(torch.allclose(s[k], r[k], equal_nan=True) for k in s if k != "algorithm")


POLICIES = {"flexmatch": lambda g: FlexMatchPolicy(3, 0.7, 10, gather=g),
            "freematch": lambda g: FreeMatchPolicy(3, 0.9, gather=g),
            "softmatch": lambda g: SoftMatchPolicy(3, 0.9, gather=g)}


def _two_batches():
    torch.manual_seed(1)
    return [(torch.softmax(4 * torch.randn(8, 3), 1), torch.randperm(10)[:8]) for _ in range(2)]


def _policy_rank_main(rank, world_size, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    env = distributed.DistEnv(rank, world_size)
    gather = functools.partial(distributed.all_gather_cat, env=env)
    states = {}
    for name, make in POLICIES.items():
        policy = make(gather)
        for probs, idx in _two_batches():
            policy(distributed.shard(probs, env), distributed.shard(idx, env))
        states[name] = policy.state_dict()
    torch.save(states, os.path.join(out_dir, f"policies{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_gloo_processes_update_every_policy_as_one_process_does(tmp_path):
    mp.spawn(_policy_rank_main, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for name, make in POLICIES.items():
        single = make(None)
        for probs, idx in _two_batches():
            single(probs, idx)
        expected = single.state_dict()
        for rank in range(2):
            saved = torch.load(tmp_path / f"policies{rank}.pt", weights_only=True)[name]
            for key, value in expected.items():
                if key != "algorithm":
                    assert torch.allclose(saved[key], value, atol=1e-7, equal_nan=True), (name, rank, key)


# ------------------------------------------------------------------ config
def test_make_policy_follows_the_config():
    assert isinstance(make_policy(Config(), 10, 100), FixMatchPolicy)
    flex = make_policy(Config(algorithm="flexmatch", flexmatch_warmup=False), 10, 100)
    assert isinstance(flex, FlexMatchPolicy) and not flex.warmup and flex.selected.shape == (100,)
    soft = make_policy(Config(algorithm="softmatch", softmatch_n_sigma=3.0, threshold_momentum=0.99), 10, 100)
    assert soft.n_sigma == 3.0 and soft.m == 0.99
    assert make_policy(Config(algorithm="freematch"), 10, 100).m == 0.999


@pytest.mark.parametrize("overrides, message", [
    (dict(flexmatch_warmup=False), "--flexmatch-warmup applies to --algorithm flexmatch only, not fixmatch"),
    (dict(algorithm="flexmatch", threshold_momentum=0.99), "--threshold-momentum applies to --algorithm "
                                                           "freematch/softmatch only, not flexmatch"),
    (dict(algorithm="softmatch", freematch_fairness_weight=0.01), "--freematch-fairness-weight applies to "
                                                                  "--algorithm freematch only"),
    (dict(algorithm="freematch", softmatch_n_sigma=3.0), "--softmatch-n-sigma applies to --algorithm softmatch"),
    (dict(algorithm="softmatch", method="supervised"), "needs --method fixmatch"),
    (dict(algorithm="freematch", tau=0.9), "--tau applies to --algorithm fixmatch/flexmatch only, not freematch"),
])
def test_an_algorithms_keys_are_refused_for_the_others(overrides, message):
    with pytest.raises(ConfigError, match=message) as info:
        check_combinations(Config(**overrides))
    assert "\n" not in str(info.value)


def test_each_algorithm_accepts_its_own_keys():
    check_combinations(Config(algorithm="flexmatch", flexmatch_warmup=False, tau=0.9))
    check_combinations(Config(method="supervised", tau=0.9))  # as before the algorithms
    check_combinations(Config(algorithm="freematch", threshold_momentum=0.99, freematch_fairness_weight=0.01))
    check_combinations(Config(algorithm="softmatch", threshold_momentum=0.99, softmatch_n_sigma=3.0))


# ------------------------------------------------------------------ runs


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["flexmatch", "freematch", "softmatch"])
def test_a_killed_and_resumed_run_ends_as_an_uninterrupted_one(tmp_path, monkeypatch, algorithm):
    config = Config(**QUICK, steps=40, algorithm=algorithm)
    fixmatch.train(config, out=tmp_path / "straight")
    undo = kill_after_checkpoint(monkeypatch, step=20)
    with pytest.raises(Killed):
        fixmatch.train(config, out=tmp_path / "killed")
    undo()
    saved = load_checkpoint(tmp_path / "killed" / "checkpoints" / "last.pt")["pseudo_label"]["policy"]
    assert saved["algorithm"] == algorithm
    fixmatch.train(None, out=tmp_path / "killed", resume=True)
    rows = metrics_rows(tmp_path / "killed")
    assert rows == metrics_rows(tmp_path / "straight")
    assert all(k in rows[-1] for k in ("threshold_mean", "threshold_min", "weight_mean"))
    assert rows[-1]["threshold_min"] <= rows[-1]["threshold_mean"] <= 1 and 0 < rows[-1]["weight_mean"] <= 1
    per_class = rows[-1]["thresholds"]  # the report's threshold curves: one per class (SoftMatch: its mu_t)
    assert len(per_class) == (1 if algorithm == "softmatch" else 10)
    assert min(per_class) == pytest.approx(rows[-1]["threshold_min"], abs=1e-5)
    assert sum(per_class) / len(per_class) == pytest.approx(rows[-1]["threshold_mean"], abs=1e-5)


@pytest.mark.slow
def test_fixmatch_checkpoints_keep_the_keys_from_before_the_policies_and_resume(tmp_path, monkeypatch):
    config = Config(**QUICK, steps=40)
    fixmatch.train(config, out=tmp_path / "straight")
    undo = kill_after_checkpoint(monkeypatch, step=20)
    with pytest.raises(Killed):
        fixmatch.train(config, out=tmp_path / "killed")
    undo()
    assert "pseudo_label" not in load_checkpoint(tmp_path / "killed" / "checkpoints" / "last.pt")
    fixmatch.train(None, out=tmp_path / "killed", resume=True)
    rows = metrics_rows(tmp_path / "killed")
    assert rows == metrics_rows(tmp_path / "straight")
    assert "threshold_mean" not in rows[-1]  # FixMatch's rows are as before


def test_the_evaluation_line_shows_a_policys_threshold_and_weight(tmp_path, capsys):
    from fixmatch.runs.log import RunLogger
    row = {"step": 20, "test_acc": 50.0, "raw_test_acc": 49.0, "test_top5": 90.0, "loss_s": 1.0, "loss_u": 0.5,
           "mask_rate": 0.9, "pseudo_label_acc": 80.0, "lr": 0.03, "wall_s": 1.0}
    logger = RunLogger(tmp_path, 20, 0, progress=False, tensorboard=False)
    logger.evaluation(row)
    logger.evaluation({**row, "step": 40, "threshold_mean": 0.61, "threshold_min": 0.4, "weight_mean": None})
    logger.close()
    fixmatch_line, policy_line = capsys.readouterr().out.strip().splitlines()[-2:]
    assert "thr" not in fixmatch_line  # the paper's rows read as before
    assert policy_line.endswith("| lr 0.03000 | thr 0.610 (min 0.400) w -")


def test_the_summary_names_the_algorithm(tmp_path):
    from fixmatch.training.loop import summarize
    row = {"step": 10, "test_acc": 50.0, "raw_test_acc": 49.0, "test_top5": 90.0, "nonfinite_steps": 0}
    (tmp_path / "metrics.jsonl").write_text(json.dumps(row) + "\n")
    summary = summarize(tmp_path, Config(algorithm="softmatch"), wall_s=2.0)
    assert summary["algorithm"] == "softmatch" and summary["method"] == "fixmatch" and summary["steps"] == 10
