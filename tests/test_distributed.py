"""Several processes (gloo on the CPU): one step on 2 ranks equals one step on 1 process with the same global
batch; a 2-process run writes one set of outputs, stops on a signal and resumes with 2 or with 1 process.
Speed options that cannot run here are refused in one line before anything is written."""
import dataclasses
import functools
import gc
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fixmatch
from fixmatch.augment import CTAChoices, CTAugment
from fixmatch.config import Config, ConfigError, check_batch_sizes
from fixmatch.core.dist_align import DistributionAlignment
from fixmatch.core.ema import EMA
from fixmatch.core.optim import make_optimizer
from fixmatch.runs.checkpoint import load_checkpoint
from fixmatch.training import distributed
from fixmatch.training.nonfinite import NonFiniteError, NonFiniteGuard
from fixmatch.training.step import forward_loss, frozen_running_stats

QUICK = dict(dataset="synthetic", model="cnn_small", num_labels=40, batch_size=8, mu=2, lr=0.05, ema=0.9,
             eval_every=20, eval_batch_size=512, progress=False, device="cpu")
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py: the in-process runs; each rank sets its own
B, MU = 8, 3
# Two ranks sum their halves' gradients in another order than one process: float32 rounding only.
TOLERANCE = dict(rtol=1e-5, atol=1e-6)
# The one-step variants compared between 2 ranks and 1 process (keyword arguments of _one_step). With tau 0.125
# rank 0 masks 4 of its 12 unlabeled samples and rank 1 masks 7: per-rank denominators of the masked Lu would
# give another gradient than the global one.
VARIANTS = {"joint": {}, "weak_no_grad": dict(weak_no_grad=True), "dist_align": dict(dist_align=True),
            "masked": dict(lu_norm="masked", tau=0.125)}


def test_env_absent_is_one_process_and_torchrun_env_is_read():
    assert distributed.read_env({}) == distributed.DistEnv(0, 1, 0)
    env = distributed.read_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (env.rank, env.world_size, env.local_rank, env.is_main, env.enabled) == (3, 4, 1, False, True)
    with pytest.raises(ConfigError, match="RANK"):
        distributed.read_env({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(ConfigError, match="not below WORLD_SIZE"):
        distributed.read_env({"RANK": "2", "WORLD_SIZE": "2"})


def test_shards_tile_the_global_batch_and_rank0_augments_as_one_process():
    batch = torch.arange(12)
    parts = [distributed.shard(batch, distributed.DistEnv(r, 3)) for r in range(3)]
    assert torch.equal(torch.cat(parts), batch)
    assert torch.equal(distributed.shard(batch, distributed.DistEnv()), batch)
    assert distributed.augment_seed(7, 123, 0) == 7 * 2**32 + 123  # the single-process seed
    seeds = {distributed.augment_seed(7, 123, r) for r in range(4)}
    assert len(seeds) == 4 and all(0 <= s < 2**63 for s in seeds)
    with pytest.raises(ConfigError, match="divisible"):
        check_batch_sizes(30, 4)


@pytest.mark.parametrize("overrides, message", [
    (dict(sync_bn=True), "sync-bn needs CUDA"),
    (dict(amp="fp16"), "fp16 needs CUDA"),
])
def test_options_this_device_cannot_run_are_refused_before_writing(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message):
        fixmatch.train(Config(**QUICK, steps=20, **overrides), out=tmp_path / "run")
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_compile_without_a_cpu_compiler_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no g++/c++/clang++ there
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(ConfigError, match="needs a C\\+\\+ compiler") as e:
        fixmatch.train(Config(**QUICK, steps=20, compile=True), out=tmp_path / "run")
    assert "\n" not in str(e.value)
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_frozen_running_stats_normalise_with_the_batch_and_leave_running_stats():
    bn = nn.BatchNorm2d(3).train()
    x = torch.randn(8, 3, 4, 4) * 3 + 1
    before = [t.clone() for t in bn.buffers()]
    with frozen_running_stats(bn):
        y = bn(x)
    assert all(torch.equal(a, b) for a, b in zip(before, bn.buffers()))
    assert torch.allclose(y.mean((0, 2, 3)), torch.zeros(3), atol=1e-5)  # batch statistics were used
    bn(x)
    assert not torch.equal(bn.running_mean, before[0]) and bn.num_batches_tracked == 1


# ---------------------------------------------------------------- one step on 2 ranks == one step on 1

class NoBatchNormNet(nn.Module):
    """BatchNorm-free, so per-rank batch statistics cannot make two ranks differ from one process."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))


def _global_batch():
    g = torch.Generator().manual_seed(1)
    x_lb, x_w = torch.rand(B, 3, 8, 8, generator=g), torch.rand(B * MU, 3, 8, 8, generator=g)
    x_s = (x_w + 0.3 * torch.rand(x_w.shape, generator=g)).clamp(0, 1)
    return x_lb, torch.randint(0, 10, (B,), generator=g), x_w, x_s


def _one_step(env, weak_no_grad=False, dist_align=False, lu_norm="all", tau=0.1):
    """One optimiser + EMA step on this rank's share of the global batch; returns the new weights and EMA.

    ``dist_align``: with distribution alignment, whose p_model is the mean over ranks (as train.py builds it).
    """
    rank_mean = functools.partial(distributed.all_reduce_mean_, env=env) if env.enabled else None
    torch.manual_seed(0)
    model = NoBatchNormNet()
    optimizer = make_optimizer(model, 0.1, 0.9, True, 5e-4)
    ema = EMA(model, 0.5)
    train_model = distributed.wrap_model(model, env, torch.device("cpu"), sync_bn=False)
    x_lb, y_lb, x_w, x_s = (distributed.shard(t, env) for t in _global_batch())
    mean, std = torch.full((1, 3, 1, 1), 0.5), torch.full((1, 3, 1, 1), 0.25)
    # tau 0.1: most unlabeled samples pass the threshold, so Lu contributes to the gradient.
    align = DistributionAlignment(reduce=rank_mean) if dist_align else None
    loss, stats = forward_loss(train_model, x_lb, y_lb, x_w, x_s, mean, std, tau=tau, lambda_u=1.0, T=1.0,
                               lu_norm=lu_norm, channels_last=False, weak_no_grad=weak_no_grad, bn_model=model,
                               align=align, rank_mean=rank_mean)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    ema.update(model)
    return {k: v.clone() for k, v in model.state_dict().items()}, ema.state_dict(), float(stats.mask_rate)


def _rank_main(rank, world_size, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    env = distributed.DistEnv(rank, world_size)
    results = {name: _one_step(env, **options) for name, options in VARIANTS.items()}
    results["ctaugment"] = _ctaugment_update(env)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    gc.collect()  # the DDP wrappers go before their process group
    dist.barrier()  # neither rank closes its connections while the other still uses them
    dist.destroy_process_group()


@pytest.mark.slow
def test_one_step_on_two_ranks_equals_one_step_on_one_process(tmp_path):
    mp.spawn(_rank_main, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    torch.manual_seed(0)
    initial = NoBatchNormNet().state_dict()
    single = {name: _one_step(distributed.DistEnv(), **options) for name, options in VARIANTS.items()}
    # alignment changes the pseudo-labels of this batch, so a per-rank p_model would be noticed
    assert any(not torch.allclose(single["joint"][0][k], single["dist_align"][0][k], **TOLERANCE)
               for k in single["joint"][0])
    ranks = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=True) for rank in range(2)]
    # what the masked variant tests: unequal masked counts on the two ranks
    assert [r["masked"][2] for r in ranks] == [pytest.approx(4 / 12), pytest.approx(7 / 12)]
    for name, (weights, ema, mask_rate) in single.items():
        assert mask_rate > 0.4
        for rank in range(2):
            r_weights, r_ema, _ = ranks[rank][name]
            for k in weights:
                assert not torch.allclose(weights[k], initial[k], **TOLERANCE)  # the step moved every tensor
                torch.testing.assert_close(r_weights[k], weights[k], **TOLERANCE)
                torch.testing.assert_close(r_ema[k], ema[k], **TOLERANCE)


    # CTAugment: every rank's rates equal one process's update from the global batch's probes, bit for bit.
    single_rates, proximity = _ctaugment_update(distributed.DistEnv())
    assert not torch.equal(single_rates, CTAugment().rates) and proximity.shape == (2 * B,)
    for rank in range(2):
        rates, r_proximity = ranks[rank]["ctaugment"]
        assert torch.equal(rates, single_rates) and torch.equal(r_proximity, proximity)


def _ctaugment_update(env):
    """One CTAugment update from this rank's share of 2B fixed probes; returns the rates and the proximities."""
    cta = CTAugment()
    g = torch.Generator().manual_seed(3)
    choices = cta.sample(2 * B, g, probe=True)
    probs = torch.softmax(3 * torch.randn(2 * B, 10, generator=g), 1)
    labels = torch.randint(0, 10, (2 * B,), generator=g)
    mine = CTAChoices(*(distributed.shard(t, env) for t in (choices.ops, choices.bins, choices.values)))
    gather = functools.partial(distributed.all_gather_cat, env=env) if env.enabled else None
    proximity = cta.update(mine, distributed.shard(probs, env), distributed.shard(labels, env), gather=gather)
    return cta.rates, proximity


def test_weak_no_grad_is_the_same_loss_without_batchnorm():
    """Without BatchNorm, the separate no-grad weak forward gives the default step's gradient exactly."""
    a, _, _ = _one_step(distributed.DistEnv(), weak_no_grad=False)
    b, _, _ = _one_step(distributed.DistEnv(), weak_no_grad=True)
    for k in a:
        torch.testing.assert_close(a[k], b[k], **TOLERANCE)


# ---------------------------------------------------------------- a 2-process run: outputs, stop, resume

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_ranks(world_size, argv):
    """What torchrun does for one node: one process per rank with RANK, WORLD_SIZE, MASTER_ADDR/PORT set."""
    port = _free_port()
    procs = []
    for rank in range(world_size):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, "-m", "fixmatch", "train", *argv], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def _flags(**config):
    flags = []
    for k, v in config.items():
        flags += ["--no-progress"] if k == "progress" else ["--" + k.replace("_", "-"), str(v)]
    return flags


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_process_run_writes_once_stops_and_resumes_with_two_or_one_process(tmp_path):
    run, steps = tmp_path / "run", 60
    procs = _start_ranks(2, [*_flags(**QUICK, steps=steps), "--out", str(run)])
    deadline = time.time() + 240
    while not (run / "metrics.jsonl").is_file() or not (run / "metrics.jsonl").read_text():
        assert time.time() < deadline and all(p.poll() is None for p in procs), procs[0].stderr.read()
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGINT)  # a signal that reaches one rank stops both at the same step
    outputs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [130, 130], outputs
    stopped_at = load_checkpoint(run / "checkpoints" / "last.pt")["step"]
    assert 20 <= stopped_at < steps and stopped_at % 10 == 0
    assert outputs[0][0].count("step      20 |") == 1 and "step" not in outputs[1][0]  # rank 0 alone reports
    assert [r["step"] for r in _rows(run)] == list(range(20, stopped_at + 1, 20))
    assert len(list((run / "tensorboard").iterdir())) == 1  # one writer
    shutil.copytree(run, tmp_path / "one", ignore=shutil.ignore_patterns(".lock"))

    procs = _start_ranks(2, ["--out", str(run), "--resume", "--no-progress"])
    outputs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == steps
    assert [r["step"] for r in _rows(run)] == [20, 40, 60]
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert not any(k.startswith("module.") for k in state["model"])  # the unwrapped model is saved
    assert fixmatch.evaluate(run, device="cpu")["test_acc"] == pytest.approx(_rows(run)[-1]["test_acc"])

    one = fixmatch.train(None, out=tmp_path / "one", resume=True)  # this process: no RANK, one process
    assert one["steps"] == steps
    rows_one, rows_two = _rows(tmp_path / "one"), _rows(run)
    assert [r["step"] for r in rows_one] == [20, 40, 60]
    assert rows_one[0] == rows_two[0]  # written before the stop, kept by both resumes
    assert one["test_acc_last"] > 30.0 and summary["test_acc_last"] > 30.0  # both went on learning (chance 10%)


def _guard_rank_main(rank, world_size, init_file, out_dir):
    # Rank 1 alone sees a NaN loss (its gradients are finite): both ranks must skip, and both must stop;
    # rank 1 alone holds an infinite weight: both must refuse to checkpoint. Deferred (the GPU path of stop):
    # rank 0 goes bad at step 5, rank 1 at step 3; both run on and both name step 3 where they sync.
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    env = distributed.DistEnv(rank, world_size)
    rank_min = functools.partial(distributed.min_over_ranks, env=env)
    loss = torch.tensor(float("nan") if rank == 1 else 1.0)
    grads = [nn.Parameter(torch.ones(3))]
    grads[0].grad = torch.ones(3)
    skip = NonFiniteGuard("skip", torch.device("cpu"), Path(out_dir) / "none.pt", rank_min=rank_min)
    verdicts = [skip.step_is_finite(1, loss, grads), skip.step_is_finite(2, torch.tensor(2.0), grads)]
    stop = NonFiniteGuard("stop", torch.device("cpu"), Path(out_dir) / "none.pt", rank_min=rank_min)
    try:
        stop.step_is_finite(1, loss, grads)
        stopped = False
    except NonFiniteError:
        stopped = True
    net = nn.Linear(2, 2)
    if rank == 1:
        net.bias.data[0] = float("inf")  # e.g. BatchNorm statistics that one rank's bad forward pass updated
    try:
        skip.check_weights(3, net)
        refused = False
    except NonFiniteError:
        refused = True
    deferred = NonFiniteGuard("stop", torch.device("cpu"), Path(out_dir) / "none.pt", rank_min=rank_min)
    deferred.deferred = True
    ran_on = all(deferred.step_is_finite(step, torch.tensor(math.nan if step == 5 - 2 * rank else 1.0), grads)
                 for step in range(1, 7))
    try:
        deferred.raise_if_failed()
        named = None
    except NonFiniteError as e:
        named = str(e).split(";")[0]
    clean = NonFiniteGuard("stop", torch.device("cpu"), Path(out_dir) / "none.pt", rank_min=rank_min)
    clean.deferred = True
    clean.step_is_finite(1, torch.tensor(1.0), grads)
    clean.raise_if_failed()  # no rank went bad: no error on any
    torch.save({"verdicts": verdicts, "skipped": skip.skipped, "stopped": stopped, "refused": refused,
                "ran_on": ran_on, "named": named},
               os.path.join(out_dir, f"guard{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_every_rank_reaches_the_same_nonfinite_verdict(tmp_path):
    mp.spawn(_guard_rank_main, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        result = torch.load(tmp_path / f"guard{rank}.pt", weights_only=True)
        assert result == {"verdicts": [False, True], "skipped": 1, "stopped": True, "refused": True,
                          "ran_on": True, "named": "non-finite loss, gradients or BatchNorm statistics at step 3"}, f"rank {rank}"
    one = distributed.DistEnv()
    flag = torch.tensor(False)
    assert distributed.min_over_ranks(flag, one) is flag  # one process: the verdict as it is


@pytest.mark.slow
def test_two_process_run_with_ctaugment_and_masked_lu(tmp_path):
    """The options that talk to the other ranks inside a step (CTAugment's gathered probes, the masked Lu's
    count) run end to end on 2 processes; the rates rank 0 saves moved away from their start."""
    run = tmp_path / "run"
    config = {**QUICK, "eval_every": 10}
    procs = _start_ranks(2, [*_flags(**config, steps=10, strong="ctaugment", lu_norm="masked"), "--out", str(run)])
    outputs = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert json.loads((run / "summary.json").read_text())["steps"] == 10
    rates = load_checkpoint(run / "checkpoints" / "last.pt")["ctaugment"]["rates"]
    assert not torch.equal(rates, CTAugment().rates)


def _label_choice_rank_main(rank, world_size, port, out_dir):
    """One rank of a 2-process run whose labels come from float features: rank 1's own choice is made to differ
    (as another host's arithmetic could), and each rank records the split it trains on."""
    from fixmatch.training import loop

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    choose, batches_for = loop._split_for, loop._batches_for

    def own_choice(config, run, resume, data, device):
        split = choose(dataclasses.replace(config, label_selection="random"), run, resume, data, device)
        if rank == 1:  # another labeled set of the same size
            other = sorted(set(range(data.train_labels.numel())) - set(split.labeled))[:len(split.labeled)]
            split = dataclasses.replace(split, labeled=other)
        return split

    def recording(config, data, split, *args, **kwargs):
        Path(out_dir, f"labeled{rank}.json").write_text(json.dumps(list(split.labeled)))
        return batches_for(config, data, split, *args, **kwargs)

    loop._split_for, loop._batches_for = own_choice, recording
    # representative would read a selection checkpoint; the patched choice stands in for it.
    config = Config(**{**QUICK, "eval_every": 2}, steps=2, label_selection="representative",
                    selection_checkpoint="features")
    fixmatch.train(config, out=Path(out_dir, "run"))


@pytest.mark.slow
def test_labels_chosen_from_features_are_rank_zeros_on_every_rank(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    mp.spawn(_label_choice_rank_main, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    chosen = [json.loads((tmp_path / f"labeled{rank}.json").read_text()) for rank in range(2)]
    saved = json.loads((tmp_path / "run" / "split.json").read_text())["labeled"]
    assert chosen[0] == chosen[1] == saved and len(saved) == QUICK["num_labels"]
