"""TrainState: one state_dict()/load_state_dict() pair saves and restores a run, in the checkpoint format of
release 0.1, so that every checkpoint written since still resumes and loads."""
import dataclasses
import json
import lzma
import shutil
from pathlib import Path

import pytest
import torch
from run_helpers import Killed, assert_same_state, kill_after_checkpoint, metrics_rows

import fixmatch
from fixmatch.augment.views import build_views
from fixmatch.config import Config
from fixmatch.core.dist_align import DistributionAlignment
from fixmatch.core.preprocess import channel_stats, normalize
from fixmatch.data.batches import IndexStream
from fixmatch.data.datasets import load_dataset
from fixmatch.data.pool import pool_labels
from fixmatch.data.split import make_split, unlabeled_pool
from fixmatch.models import create_model
from fixmatch.runs.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, tensor_digest
from fixmatch.runs.model_spec import checkpoint_fields
from fixmatch.training.batches import Batches
from fixmatch.training.distributed import DistEnv
from fixmatch.training.state import RunningStats, TrainState, new_train_state
from fixmatch.training.step import train_step

DATA = Path(__file__).parent / "data"
CPU = torch.device("cpu")
TINY = dict(dataset="synthetic", model="cnn_small", num_labels=40, batch_size=8, mu=2, lr=0.05, ema=0.9,
            eval_every=10, eval_batch_size=512, progress=False, device="cpu", strong="ctaugment", dist_align=True)


@pytest.fixture(scope="module")
def data():
    return load_dataset("synthetic")


def _state(config: Config, data, tmp_path: Path, model_seed: int) -> tuple[TrainState, Batches]:
    """A run's training state and batches at step 0, wired as train() wires them (one process, CPU)."""
    env = DistEnv()
    split = make_split(data.train_labels, config.num_labels, data.num_classes, config.seed)
    stream_lb = IndexStream(split.labeled, config.batch_size, config.seed, stream_id=0)
    pool = unlabeled_pool(split, data.train_labels.numel(), data.num_unlabeled_extra)
    stream_ulb = IndexStream(pool, config.batch_size * config.mu, config.seed, stream_id=1)
    weak, strong = build_views(config)
    align = None
    if config.dist_align:
        align = DistributionAlignment(DistributionAlignment.target_from_labels(data.train_labels[split.labeled],
                                                                               data.num_classes))
    torch.manual_seed(model_seed)
    kwargs = {"image_size": list(data.image_size)}
    model = create_model(config.model, data.num_classes, data.in_channels, **kwargs)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    mean, std = channel_stats(data.mean, data.std, CPU)
    state = new_train_state(config, model, strong, align, mean, std, split, data.class_names,
                            checkpoint_fields(config.model, kwargs, data), tmp_path / "last.pt", env, CPU)
    return state, Batches(data, stream_lb, stream_ulb, weak, pool_labels(data), config.seed, env, CPU)


def _steps(state: TrainState, batches: Batches, n: int) -> None:
    for _ in range(n):
        state.set_lr()
        train_step(state, batches.get(state.step, state.strong))


# ------------------------------------------------------------------ 1. the round trip

@pytest.mark.slow
def test_state_dict_round_trip_restores_every_tensor_and_rng_state_and_the_next_step(data, tmp_path):
    config = Config(**TINY, steps=40, schedule="plateau", plateau_patience=0)
    a, batches = _state(config, data, tmp_path, model_seed=0)
    _steps(a, batches, 5)
    # The fields no step changes get values a resume must carry over, so that forgetting one is noticed.
    a.best_acc = 37.5
    a.schedule.observe(37.5)
    a.schedule.observe(20.0)  # no improvement with patience 0: the lr scale halves
    a.guard.skipped = 2
    sd = a.state_dict()
    # Every part of the state is non-trivial, or the comparisons below would prove nothing.
    assert sd["step"] == 5 and sd["schedule"]["scale"] == 0.5
    assert sd["optimizer"]["state"] and all(s["momentum_buffer"].abs().sum() > 0
                                            for s in sd["optimizer"]["state"].values())
    assert sd["sums"].dtype == torch.float64 and sd["sums"][4] == 5 and sd["sums"][0] > 0
    assert not torch.all(sd["ctaugment"]["rates"] == 1)
    assert sd["dist_align"]["history"].shape == (5, data.num_classes)

    b, _ = _state(config, data, tmp_path, model_seed=1)  # other weights, untrained policies
    assert not torch.equal(b.model.state_dict()["fc.weight"], sd["model"]["fc.weight"])
    assert b.state_dict()["dist_align"]["history"].numel() == 0
    torch.manual_seed(12345)  # the global generator elsewhere: loading must put it back
    assert not torch.equal(torch.get_rng_state(), sd["rng"]["torch"])
    # Through a file, as a resume does (the dict itself holds a's live tensors: torch's optimizer would share them).
    save_checkpoint(sd, tmp_path / "last.pt")
    b.load_state_dict(load_checkpoint(tmp_path / "last.pt"), tmp_path / "last.pt", "fix it")
    assert torch.equal(torch.get_rng_state(), sd["rng"]["torch"])
    assert b.wall_before == sd["wall_s"]
    restored = b.state_dict()
    for d in (restored, sd):
        d.pop("wall_s")  # the clock runs on
    assert_same_state(sd, restored)
    # The live objects, not only what state_dict() reads back from them.
    assert (b.step, b.best_acc, b.guard.skipped, b.schedule.scale) == (5, 37.5, 2, 0.5)
    assert_same_state(dataclasses.asdict(a.stats), dataclasses.asdict(b.stats), "stats")
    assert_same_state(a.cta.state_dict(), b.cta.state_dict(), "ctaugment")
    for p_a, p_b in zip(a.optimizer.param_groups[0]["params"], b.optimizer.param_groups[0]["params"]):
        assert torch.equal(a.optimizer.state[p_a]["momentum_buffer"], b.optimizer.state[p_b]["momentum_buffer"])

    # One more step from each: the same batch, bit-identical losses, weights, EMA and policies.
    rng = torch.get_rng_state()
    out = []
    for s in (a, b):
        torch.set_rng_state(rng)
        lr = s.set_lr()
        batch = batches.get(s.step, s.strong)
        out.append((lr, batch, train_step(s, batch)))
    (lr_a, batch_a, stats_a), (lr_b, batch_b, stats_b) = out
    assert lr_a == lr_b
    for name in ("x_lb", "y_lb", "x_ulb_w", "x_ulb_s", "y_ulb_true"):
        assert torch.equal(getattr(batch_a, name), getattr(batch_b, name)), name
    for name in ("loss_s", "loss_u", "mask_rate", "pl_correct", "pl_known"):
        assert torch.equal(getattr(stats_a, name), getattr(stats_b, name)), name
    assert stats_a.finite and stats_b.finite
    after_a, after_b = a.state_dict(), b.state_dict()
    for d in (after_a, after_b):
        d.pop("wall_s")
    assert_same_state(after_a, after_b)


@pytest.fixture(scope="module")
def trained_state_dict(data, tmp_path_factory):
    config = Config(**TINY, steps=40)
    state, batches = _state(config, data, tmp_path_factory.mktemp("state"), model_seed=0)
    _steps(state, batches, 2)
    return state.state_dict(), config


def _damage_sums(sd):
    sd["sums"] = torch.zeros(5, dtype=torch.float64)


def _drop_ema(sd):
    del sd["ema"]


def _drop_dist_align(sd):
    del sd["dist_align"]


def _damage_momentum(sd):
    first = next(iter(sd["optimizer"]["state"].values()))
    first["momentum_buffer"] = first["momentum_buffer"][:1]


def _damage_ctaugment(sd):
    sd["ctaugment"]["nbins"] = sd["ctaugment"]["nbins"][:3]


def _damage_ctaugment_rates(sd):
    sd["ctaugment"]["rates"] = sd["ctaugment"]["rates"][:, :, :5]


def _damage_rng(sd):
    sd["rng"] = "not a dict"


def _damage_step(sd):
    sd["step"] = -3


DAMAGES = [(_damage_sums, "sums"), (_drop_ema, "ema"), (_drop_dist_align, "dist_align"),
           (_damage_momentum, "optimizer"), (_damage_ctaugment, "ctaugment"),
           (_damage_ctaugment_rates, "ctaugment"), (_damage_rng, "rng"),
           (_damage_step, "step")]


@pytest.mark.parametrize("damage, field", [pytest.param(d, f, id=d.__name__.lstrip("_")) for d, f in DAMAGES])
def test_a_damaged_field_is_refused_in_one_line_naming_it(data, trained_state_dict, tmp_path, damage, field):
    sd, config = trained_state_dict
    sd = {k: (v.copy() if isinstance(v, dict) else v) for k, v in sd.items()}  # the fixture's stays intact
    sd["optimizer"] = {**sd["optimizer"], "state": {k: dict(v) for k, v in sd["optimizer"]["state"].items()}}
    damage(sd)
    fresh, _ = _state(config, data, tmp_path, model_seed=1)
    with pytest.raises(CheckpointError) as e:
        fresh.load_state_dict(sd, tmp_path / "last.pt", "use another checkpoint")
    message = str(e.value)
    assert "\n" not in message and f"'{field}'" in message and "last.pt" in message, message
    assert message.endswith("use another checkpoint"), message


# ------------------------------------------------------------------ 2. RunningStats

def test_running_stats_sum_reset_and_means():
    stats = RunningStats.zeros(CPU)
    assert stats.means() == {"loss_s": None, "loss_u": None, "mask_rate": None, "pseudo_label_acc": None}
    one = torch.ones(())
    stats.add(loss_s=torch.tensor(2.0), loss_u=torch.tensor(1.0), mask_rate=torch.tensor(0.5),
              pl_correct=torch.tensor(3), steps=one, pl_known=torch.tensor(4))
    stats.add(loss_s=torch.tensor(4.0), loss_u=torch.tensor(0.0), mask_rate=torch.tensor(0.25),
              pl_correct=torch.tensor(1), steps=one, pl_known=torch.tensor(4))
    assert all(getattr(stats, f.name).dtype == torch.float64 for f in dataclasses.fields(stats))
    assert stats.means() == {"loss_s": 3.0, "loss_u": 0.5, "mask_rate": 0.375, "pseudo_label_acc": 50.0}
    # Finite steps, but no used pseudo-label with a known true label: its accuracy is undefined, not 0%.
    stats.pl_correct.zero_()
    stats.pl_known.zero_()
    assert stats.means()["pseudo_label_acc"] is None and stats.means()["loss_s"] == 3.0
    stats.reset()
    assert stats.as_tensor().tolist() == [0.0] * 6
    assert stats.means()["loss_s"] is None


def test_running_stats_tensor_is_the_checkpoints_sums_field_in_release_0_1_order():
    # Release 0.1 wrote sums = [loss_s, loss_u, mask_rate, pl_correct, steps, pl_known] (float64, CPU).
    order = ["loss_s", "loss_u", "mask_rate", "pl_correct", "steps", "pl_known"]
    assert [f.name for f in dataclasses.fields(RunningStats)] == order
    stats = RunningStats.zeros(CPU)
    stats.add(**{name: torch.tensor(float(i + 1)) for i, name in enumerate(order)})
    values = stats.as_tensor()
    assert values.dtype == torch.float64 and values.tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    back = RunningStats.zeros(CPU)
    back.load_tensor(torch.tensor([6.0, 5.0, 4.0, 3.0, 2.0, 1.0], dtype=torch.float64))
    assert [getattr(back, name).item() for name in order] == [6.0, 5.0, 4.0, 3.0, 2.0, 1.0]
    # A release 0.1 row: means come from the slots by those names.
    assert back.means() == {"loss_s": 3.0, "loss_u": 2.5, "mask_rate": 2.0, "pseudo_label_acc": 300.0}


# ------------------------------------------------------------------ 3. the fp16 loss scaler

@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_loss_scaler_is_a_disabled_scaler_without_fp16(data, tmp_path, amp):
    state, _ = _state(Config(**TINY, steps=40, amp=amp), data, tmp_path, model_seed=0)
    assert isinstance(state.scaler, torch.amp.GradScaler) and not state.scaler.is_enabled()
    assert state.state_dict()["scaler"] is None


def test_loss_scaler_is_enabled_for_fp16_and_its_scale_round_trips(data, tmp_path):
    if not torch.amp.GradScaler("cpu", enabled=True).is_enabled():
        pytest.skip("this torch has no fp16 loss scaling on the CPU")
    config = Config(**TINY, steps=40, amp="fp16")
    a, _ = _state(config, data, tmp_path, model_seed=0)
    assert a.scaler.is_enabled()
    a.scaler.scale(torch.ones(()))  # the scale tensor is created at first use
    a.scaler.update(new_scale=256.0)
    sd = a.state_dict()
    assert sd["scaler"]["scale"] == 256.0
    b, _ = _state(config, data, tmp_path, model_seed=1)
    assert b.scaler.get_scale() != 256.0
    b.load_state_dict(sd, tmp_path / "last.pt", "fix it")
    assert b.scaler.get_scale() == 256.0


# ------------------------------------------------------------------ 4. checkpoints of release 0.1

# The checkpoint format of release 0.1 (its train.py wrote these keys, in this order; save_checkpoint adds
# "tensor_digest"). Frozen here, not read from a file: a new or renamed key in state_dict() fails this test.
V01_KEYS = ["format", "step", "model", "ema", "optimizer", "config", "split", "class_names", "best_acc", "wall_s",
            "sums", "rng", "nonfinite_steps", "model_name", "model_kwargs", "in_channels", "input_size", "mean",
            "std", "ctaugment", "schedule", "dist_align", "scaler"]
V01_TYPES = {"format": str, "step": int, "model": dict, "ema": dict, "optimizer": dict, "config": dict,
             "split": dict, "class_names": list, "best_acc": float, "wall_s": float, "sums": torch.Tensor,
             "rng": dict, "nonfinite_steps": int, "model_name": str, "model_kwargs": dict, "in_channels": int,
             "input_size": list, "mean": list, "std": list, "ctaugment": (dict, type(None)), "schedule": dict,
             "dist_align": (dict, type(None)), "scaler": (dict, type(None))}


def _check_v01_format(sd: dict, num_classes: int, cta: bool, align: bool) -> None:
    """``sd`` is a checkpoint as release 0.1 wrote it (key set and order, types, shapes of the non-model fields)."""
    assert [k for k in sd if k != "tensor_digest"] == V01_KEYS
    for key, kind in V01_TYPES.items():
        assert isinstance(sd[key], kind) and not isinstance(sd[key], bool), (key, type(sd[key]))
    assert sd["format"] == "fixmatch-checkpoint"
    assert sd["model"].keys() == sd["ema"].keys() and all(isinstance(v, torch.Tensor) for v in sd["model"].values())
    assert sd["optimizer"].keys() == {"state", "param_groups"}
    # A key added since the release is absent from its config and takes its default.
    assert {k: v for k, v in Config(**sd["config"]).to_dict().items() if k in sd["config"]} == sd["config"]
    assert sd["split"]["format"] == "fixmatch-split" and isinstance(sd["split"]["labeled"], list)
    assert sd["sums"].shape == (6,) and sd["sums"].dtype == torch.float64 and sd["sums"].device.type == "cpu"
    assert sd["rng"].keys() == {"torch", "cuda"} and sd["rng"]["cuda"] is None  # written on the CPU
    assert sd["rng"]["torch"].dtype == torch.uint8 and sd["rng"]["torch"].shape == torch.get_rng_state().shape
    assert sd["class_names"] == list(sd["class_names"]) and len(sd["class_names"]) == num_classes
    assert len(sd["mean"]) == len(sd["std"]) == sd["in_channels"] and len(sd["input_size"]) == 2
    assert sd["schedule"].keys() == {"scale", "best", "num_bad"}
    assert sd["scaler"] is None  # amp none
    if cta:
        assert sd["ctaugment"].keys() == {"rates", "nbins"}
        assert sd["ctaugment"]["rates"].dtype == torch.float32 and sd["ctaugment"]["nbins"].dtype == torch.int64
        assert sd["ctaugment"]["rates"].shape[:2] == sd["ctaugment"]["nbins"].shape
    else:
        assert sd["ctaugment"] is None
    if align:
        assert sd["dist_align"].keys() == {"window", "history"} and isinstance(sd["dist_align"]["window"], int)
        history = sd["dist_align"]["history"]
        assert history.dtype == torch.float32 and history.ndim == 2 and history.shape[1] == num_classes
    else:
        assert sd["dist_align"] is None


@pytest.mark.parametrize("extra", [{}, {"strong": "randaugment", "dist_align": False}], ids=["cta-align", "plain"])
def test_state_dict_keeps_the_release_0_1_checkpoint_format(data, tmp_path, extra):
    config = Config(**{**TINY, **extra}, steps=40)
    state, batches = _state(config, data, tmp_path, model_seed=0)
    _steps(state, batches, 1)  # as the first checkpoint, after at least one step
    sd = state.state_dict()
    _check_v01_format(sd, data.num_classes, cta=not extra, align=not extra)
    assert sd["model"].keys() == state.model.state_dict().keys()


def _release_0_1_writer(ckpt: dict) -> dict:
    """Release 0.1's checkpoint expression (its train.py), fed with the values of the run's objects; the
    values are read from a checkpoint of the current code by the names release 0.1 gave them."""
    model, ema, optimizer = ckpt["model"], ckpt["ema"], ckpt["optimizer"]
    config, split, class_names = ckpt["config"], ckpt["split"], ckpt["class_names"]
    sums = torch.tensor(ckpt["sums"].tolist(), dtype=torch.float64)  # loss_s, loss_u, mask, pl_correct, steps,
    #                                                                  pl_known
    described = {k: ckpt[k] for k in ("model_name", "model_kwargs", "in_channels", "input_size", "mean", "std",
                                      "class_names")}
    return {"format": "fixmatch-checkpoint", "step": ckpt["step"], "model": model, "ema": ema,
            "optimizer": optimizer, "config": config, "split": split, "class_names": list(class_names),
            "best_acc": ckpt["best_acc"], "wall_s": ckpt["wall_s"], "sums": sums,
            "rng": {"torch": ckpt["rng"]["torch"], "cuda": None}, "nonfinite_steps": ckpt["nonfinite_steps"],
            **described, "ctaugment": ckpt["ctaugment"], "schedule": ckpt["schedule"],
            "dist_align": ckpt["dist_align"], "scaler": ckpt["scaler"]}


def _save_as_release_0_1(state: dict, path: Path) -> None:
    """Release 0.1's save_checkpoint: torch.save of the state plus its tensor digest."""
    torch.save({**state, "tensor_digest": tensor_digest(state)}, path)


def _check_load_predicts(path: Path, data, n: int = 64) -> None:
    """fixmatch.load(path) gives the checkpoint's EMA network with the run's preprocessing."""
    sd = load_checkpoint(path)
    loaded = fixmatch.load(path, device="cpu")
    assert loaded.class_names == sd["class_names"] and loaded.step == sd["step"]
    net = create_model(sd["model_name"], len(sd["class_names"]), sd["in_channels"], **sd["model_kwargs"])
    net.load_state_dict(sd["ema"])
    x = data.test_images[:n]
    mean, std = channel_stats(sd["mean"], sd["std"], CPU)
    with torch.no_grad():
        expected = torch.softmax(net.eval()(normalize(x.float() / 255, mean, std, False)), 1)
    torch.testing.assert_close(torch.from_numpy(loaded.predict(x).probabilities), expected, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_checkpoint_written_by_the_release_0_1_writer_resumes_and_loads(data, tmp_path, monkeypatch):
    config = Config(**{**TINY, "eval_every": 4}, steps=8)
    fixmatch.train(config, out=tmp_path / "straight")
    run = tmp_path / "killed"
    undo = kill_after_checkpoint(monkeypatch, 4)
    with pytest.raises(Killed):
        fixmatch.train(config, out=run)
    undo()
    last = run / "checkpoints" / "last.pt"
    old = _release_0_1_writer(load_checkpoint(last))
    _check_v01_format(old, data.num_classes, cta=True, align=True)
    assert old["step"] == 4 and not torch.all(old["ctaugment"]["rates"] == 1)
    assert old["optimizer"]["state"] and old["dist_align"]["history"].shape[0] == 4
    _save_as_release_0_1(old, last)
    (run / "checkpoints" / "best.pt").unlink(missing_ok=True)

    fixmatch.train(out=run, resume=True)
    assert metrics_rows(run) == metrics_rows(tmp_path / "straight")
    a, b = load_checkpoint(last), load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    for key in ("model", "ema", "ctaugment", "dist_align"):
        assert_same_state(a[key], b[key], key)

    _save_as_release_0_1(old, tmp_path / "old.pt")
    _check_load_predicts(tmp_path / "old.pt", data)
    # The EMA model of the step-4 checkpoint scores what the run logged at step 4.
    predicted = fixmatch.load(tmp_path / "old.pt").predict(data.test_images).indices
    accuracy = 100.0 * (torch.tensor(predicted) == data.test_labels).double().mean().item()
    assert accuracy == pytest.approx(metrics_rows(run)[0]["test_acc"], abs=1e-4)


# A run written by the code of release 0.1 (tests/data/README.md says how), killed right after its step-2
# checkpoint: its last.pt, and the --init-weights file its config names (both xz-compressed to stay small).
RELEASE_0_1_RUN = DATA / "release-0.1-run"


def _unpack_release_0_1_run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(RELEASE_0_1_RUN, run, ignore=shutil.ignore_patterns("*.xz"))
    packed = RELEASE_0_1_RUN / "checkpoints" / "last.pt.xz"
    (run / "checkpoints" / "last.pt").write_bytes(lzma.decompress(packed.read_bytes()))
    (tmp_path / "init.pt").write_bytes(lzma.decompress((DATA / "release-0.1-init.pt.xz").read_bytes()))
    return run


def test_the_committed_release_0_1_checkpoint_has_the_frozen_format(data, tmp_path):
    run = _unpack_release_0_1_run(tmp_path)
    sd = load_checkpoint(run / "checkpoints" / "last.pt")  # its tensor digest verifies
    _check_v01_format(sd, data.num_classes, cta=True, align=True)
    assert sd["step"] == 2 and sd["config"]["strong"] == "ctaugment" and sd["config"]["dist_align"] is True
    _check_load_predicts(run / "checkpoints" / "last.pt", data)


@pytest.mark.slow
def test_a_run_written_by_release_0_1_resumes_like_an_uninterrupted_run(tmp_path, monkeypatch):
    run = _unpack_release_0_1_run(tmp_path)
    old_rows = metrics_rows(run)
    assert [r["step"] for r in old_rows] == [2]
    monkeypatch.chdir(tmp_path)  # the run's config names its --init-weights file relative to the folder
    config = Config(**json.loads(json.dumps(load_checkpoint(run / "checkpoints" / "last.pt")["config"])))
    fixmatch.train(config, out=tmp_path / "straight")
    summary = fixmatch.train(out=run, resume=True)
    assert summary["steps"] == 4
    rows = metrics_rows(run)
    assert rows[0] == old_rows[0]  # release 0.1's own row is kept
    # The committed steps were computed on another CPU, whose kernels may round the last float32 bit otherwise
    # than this one's: the resumed run equals the uninterrupted one to float32 rounding, not bit for bit.
    assert_same_state(rows, metrics_rows(tmp_path / "straight"), "metrics", rtol=1e-5)
    a = load_checkpoint(run / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    for key in ("model", "ema", "ctaugment", "dist_align", "sums"):
        assert_same_state(a[key], b[key], key, rtol=1e-5)
