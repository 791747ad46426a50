"""Speed options in a real (short) training on the CPU: bf16 autocast and the no-grad weak forward."""
import math

import torch

import fixmatch
from fixmatch.checkpoint import load_checkpoint
from fixmatch.config import Config

QUICK = dict(dataset="synthetic", model="cnn_small", num_labels=40, batch_size=16, mu=3, lr=0.05, ema=0.9,
             eval_every=20, eval_batch_size=512, progress=False, device="cpu", steps=20)


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
