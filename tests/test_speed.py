"""Speed options in a real (short) training on the CPU: bf16 autocast, the no-grad weak forward, torch.compile,
and the fp16 loss-scaling path that CUDA runs use."""
import json
import math
import sys

import pytest
import torch
from test_train import _Killed, _metrics

import fixmatch
from fixmatch.config import Config
from fixmatch.runs.checkpoint import load_checkpoint
from fixmatch.training.speed import find_cpu_compiler

# Batch 8, mu 2 (40 images a step, not 112): float16 and bfloat16 convolutions are slow on most CPUs.
QUICK = dict(dataset="synthetic", model="cnn_small", num_labels=40, batch_size=8, mu=2, lr=0.05, ema=0.9,
             eval_every=20, eval_batch_size=512, progress=False, device="cpu", steps=20)
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py; for every test of this file


@pytest.mark.slow
def test_bf16_autocast_and_weak_no_grad_train_on_the_cpu(tmp_path):
    fixmatch.train(Config(**QUICK), out=tmp_path / "default")
    default = load_checkpoint(tmp_path / "default" / "checkpoints" / "last.pt")["model"]
    for key, value in (("amp", "bf16"), ("weak_no_grad", True)):
        summary = fixmatch.train(Config(**QUICK, **{key: value}), out=tmp_path / key)
        assert summary["steps"] == 20 and math.isfinite(summary["test_acc_last"])
        state = load_checkpoint(tmp_path / key / "checkpoints" / "last.pt")
        assert state["config"][key] == value
        # BatchNorm counted one batch per step: a no-grad weak forward leaves the running statistics alone.
        counts = {int(v) for k, v in state["model"].items() if k.endswith("num_batches_tracked")}
        assert counts == {20}
        # another computation than the default (bf16 rounding; the weak batch's own BatchNorm statistics)
        assert any(not torch.equal(v, default[k]) for k, v in state["model"].items())


@pytest.mark.skipif(find_cpu_compiler() is None, reason="torch.compile on the CPU needs a C++ compiler")
# inductor imports torch.utils.mkldnn, whose classes use torch.jit.script_method: torch's warning, not ours
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compile_on_the_cpu_trains_like_eager(tmp_path):
    """--compile changes the kernels, not the computation: the same first step to float rounding."""
    one_step = dict(QUICK, steps=1, eval_every=1)
    fixmatch.train(Config(**one_step), out=tmp_path / "eager")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    summary = fixmatch.train(Config(**one_step, compile=True), out=tmp_path / "compiled")
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # the model did go through dynamo
    assert summary["steps"] == 1
    eager, compiled = (json.loads((tmp_path / run / "metrics.jsonl").read_text()) for run in ("eager", "compiled"))
    for key in ("loss_s", "loss_u", "mask_rate"):
        assert compiled[key] == pytest.approx(eager[key], rel=1e-4, abs=1e-6), key
    eager, compiled = (load_checkpoint(tmp_path / run / "checkpoints" / "last.pt") for run in ("eager", "compiled"))
    a, b = eager["model"], compiled["model"]
    assert a.keys() == b.keys()  # the plain module's names, without the compiled wrapper's prefix
    for k in a:
        # After one step an EMA parameter (decay 0.9) is 0.9 * init + 0.1 * weights, so weights - EMA is 0.9 x
        # the update; buffers are copied from the live model (update 0), so they must agree to 1e-6.
        update = (a[k].float() - eager["ema"][k].float()).abs().max()
        difference = (a[k].float() - b[k].float()).abs().max()
        assert difference <= 1e-2 * update + 1e-6, k  # kernels sum in another order: far below the step itself


# ---------------------------------------------------------------- fp16 loss scaling, exercised on the CPU

@pytest.fixture
def fp16_scaler_on_the_cpu(monkeypatch):
    """The fp16 path (autocast to float16, GradScaler) that `fixmatch train` allows on CUDA only, run on the CPU,
    where PyTorch also has float16 autocast and a GradScaler, so that CI covers what GPU runs rely on. The
    scaler starts at 2^28, far too high, so that the first steps overflow and are skipped by it, and grows
    every 5 clean steps, so that its state keeps changing."""
    train_module = sys.modules["fixmatch.training.loop"]
    monkeypatch.setattr(sys.modules["fixmatch.config"], "check_amp", lambda amp, device_type: None)
    monkeypatch.setattr(sys.modules["fixmatch.training.state"], "make_grad_scaler",
                        lambda amp, device: torch.amp.GradScaler(device.type, init_scale=2.0**28, growth_interval=5))
    return train_module


@pytest.mark.slow
def test_fp16_overflows_are_the_scalers_to_skip_and_its_state_survives_a_resume(tmp_path, fp16_scaler_on_the_cpu):
    config = Config(**{**QUICK, "steps": 60, "amp": "fp16"})  # on_nonfinite "stop": a counted overflow would stop
    straight = fixmatch.train(config, out=tmp_path / "straight")
    scaler = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")["scaler"]
    assert straight["nonfinite_steps"] == 0  # the overflowing steps were loss scaling at work, not failures
    assert scaler["scale"] < 2.0**28  # the scaler met overflows and backed off
    assert straight["test_acc_last"] > 30.0  # it learned (chance 10%)

    real_save = fp16_scaler_on_the_cpu.save_checkpoint

    def save_then_die(state, path):
        real_save(state, path)
        if path.name == "last.pt" and state["step"] == 20:
            raise _Killed

    fp16_scaler_on_the_cpu.save_checkpoint = save_then_die
    try:
        with pytest.raises(_Killed):
            fixmatch.train(config, out=tmp_path / "resumed")
    finally:
        fp16_scaler_on_the_cpu.save_checkpoint = real_save
    fixmatch.train(None, out=tmp_path / "resumed", resume=True)
    # A resume that restarted the scaler at 2^28 would skip steps again and take another path.
    assert _metrics(tmp_path / "resumed") == _metrics(tmp_path / "straight")
    assert load_checkpoint(tmp_path / "resumed" / "checkpoints" / "last.pt")["scaler"] == scaler
