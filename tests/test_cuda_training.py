"""Training on a CUDA device: every precision learns, fp16 keeps its loss scale and dropout its random stream
across a resume, compiled steps train, and a checkpoint written on the GPU evaluates the same on the CPU.

Skipped where no GPU is present (as in CI); benchmarks/gpu_checks.sh runs them on a GPU machine. CUDA
convolutions are not bit-reproducible by default, so the resume test compares with a tolerance instead of
the CPU tests' exact equality.
"""
import math
import os
import signal
import threading
import time

import pytest
import torch
from test_train import QUICK as CPU_QUICK
from test_train import _metrics

import fixmatch
from fixmatch.config import Config
from fixmatch.runs.checkpoint import load_checkpoint
from fixmatch.training.loop import TrainingInterrupted

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

QUICK = {**CPU_QUICK, "device": "cuda"}  # the CPU training tests' settings, on the GPU


@pytest.mark.parametrize("amp", ["none", "bf16", "fp16"])
def test_every_precision_learns_on_cuda(tmp_path, amp):
    run = tmp_path / amp
    summary = fixmatch.train(Config(**QUICK, steps=120, amp=amp), out=run)
    assert summary["test_acc_last"] > 60.0  # chance is 10%; the CPU test of test_train.py asks the same
    rows = _metrics(run)
    assert all(math.isfinite(r["loss_s"]) and math.isfinite(r["loss_u"]) for r in rows)
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    if amp == "fp16":  # the loss scale is saved, so a resumed run does not start from the initial 2^16 again
        assert state["scaler"] and state["scaler"]["scale"] > 0
    else:
        assert state["scaler"] is None


def _interrupt_after_first_evaluation(run):
    """SIGINT to this process once the run has logged an evaluation (as Ctrl-C would): the loop stops after
    the step in progress and writes its checkpoint."""
    def watch():
        deadline = time.time() + 300
        while time.time() < deadline:
            if (run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text():
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.01)
    threading.Thread(target=watch, daemon=True).start()


def test_fp16_run_resumes_on_cuda(tmp_path):
    config = Config(**QUICK, steps=200, amp="fp16")
    straight = fixmatch.train(config, out=tmp_path / "straight")
    run = tmp_path / "resumed"
    _interrupt_after_first_evaluation(run)
    with pytest.raises(TrainingInterrupted):
        fixmatch.train(config, out=run)
    cut = load_checkpoint(run / "checkpoints" / "last.pt")
    assert 20 <= cut["step"] < 200 and cut["scaler"]["scale"] > 0
    resumed = fixmatch.train(None, out=run, resume=True)
    assert resumed["steps"] == 200
    assert [r["step"] for r in _metrics(run)] == [r["step"] for r in _metrics(tmp_path / "straight")]
    # Same data, augmentation and initial weights; only the GPU's reduction order differs.
    assert resumed["test_acc_last"] == pytest.approx(straight["test_acc_last"], abs=5.0)


def test_resume_continues_the_gpu_random_stream_of_dropout(tmp_path):
    # MobileNetV3's dropout draws from the CUDA generator every step: a resumed run that re-seeded it instead of
    # restoring it would replay the masks of step 0 and end with a different generator state.
    config = Config(**{**QUICK, "model": "mobilenetv3_small"}, steps=200)
    fixmatch.train(config, out=tmp_path / "straight")
    run = tmp_path / "resumed"
    _interrupt_after_first_evaluation(run)
    with pytest.raises(TrainingInterrupted):
        fixmatch.train(config, out=run)
    cut = load_checkpoint(run / "checkpoints" / "last.pt")
    assert 20 <= cut["step"] < 200 and cut["rng"]["cuda"].dtype == torch.uint8
    fixmatch.train(None, out=run, resume=True)
    a, b = (load_checkpoint(r / "checkpoints" / "last.pt")["rng"]["cuda"] for r in (run, tmp_path / "straight"))
    assert torch.equal(a, b)


def test_compiled_channels_last_training_learns_on_cuda(tmp_path):
    summary = fixmatch.train(Config(**QUICK, steps=120, amp="bf16", compile=True, channels_last=True),
                             out=tmp_path / "compiled")
    assert summary["test_acc_last"] > 60.0


def test_gpu_checkpoint_evaluates_the_same_on_the_cpu(tmp_path):
    run = tmp_path / "run"
    fixmatch.train(Config(**QUICK, steps=40), out=run)
    on_gpu = fixmatch.evaluate(run, device="cuda")["test_acc"]
    on_cpu = fixmatch.evaluate(run, device="cpu")["test_acc"]
    assert on_cpu == pytest.approx(_metrics(run)[-1]["test_acc"], abs=0.5)
    assert on_cpu == pytest.approx(on_gpu, abs=0.5)  # 500 test images: 0.5 points is two or three of them


@pytest.mark.parametrize("strong", ["randaugment", "randaugment-tf", "ctaugment"])
def test_policies_draw_on_the_generators_device_and_apply_draws_from_another(strong):
    from fixmatch.augment import make_strong_augment
    policy = make_strong_augment(strong)
    x = torch.rand(8, 3, 32, 32, device="cuda")
    gen = torch.Generator(device="cuda").manual_seed(0)
    assert policy.sample(8, gen).ops.device.type == "cuda"  # no device given: the generator's
    on_cpu = policy.sample(8, torch.Generator().manual_seed(0))
    out = policy.apply(x, on_cpu, gen)  # drawn on the CPU, applied to a CUDA batch
    assert out.device.type == "cuda" and out.shape == x.shape
