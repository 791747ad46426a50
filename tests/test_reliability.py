"""Reliability: non-finite steps, full disks, one writer per run directory, untrusted files."""
import builtins
import errno
import io
import json
import math
import os
import pickle
import re
import signal
import subprocess
import sys
import tarfile
import zlib

import pytest
import torch
import yaml
from PIL import Image
from torch import nn

import fixmatch
import fixmatch.core.atomic as atomic_module
import fixmatch.models as models
import fixmatch.runs.checkpoint as checkpoint_module
from fixmatch.cli import main
from fixmatch.config import Config
from fixmatch.core.files import append_line
from fixmatch.data.datasets import DatasetError, load_dataset
from fixmatch.data.safe_archive import is_safe_member_name, safe_tar_files
from fixmatch.data.safe_image import open_image
from fixmatch.runs.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from fixmatch.runs.rundir import RunDirError, lock_run_dir
from fixmatch.training.nonfinite import NonFiniteError, NonFiniteGuard

QUICK = dict(dataset="synthetic", model="cnn_small", num_labels=40, batch_size=8, mu=2, lr=0.05, ema=0.9,
             eval_every=10, eval_batch_size=500, progress=False, device="cpu", strong="randaugment")

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def _cli(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return code, err


def _flags(**cfg):
    out = []
    for k, v in cfg.items():
        out += ["--no-progress"] if k == "progress" else ["--" + k.replace("_", "-"), str(v)]
    return out


def _files_equal_snapshot(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


# --------------------------------------------------------------------------- non-finite losses

class _NaNAt(nn.Module):
    """cnn_small whose training forward passes number ``bad_steps`` (1-based) return NaN logits, or with
    ``overflow_input`` overflow from the input on, so that BatchNorm's batch statistics are non-finite too, or
    with ``overflow_input="variance"`` get an input so large (1e25, finite) that only the first BatchNorm's
    batch variance overflows: it normalises to zeros, so the loss and gradients stay finite while its
    running_var becomes inf."""

    def __init__(self, num_classes, in_channels, bad_steps, overflow_input=False, **kw):
        super().__init__()
        self.net = models.create_model("cnn_small", num_classes, in_channels, **kw)
        self.bad_steps, self.calls, self.overflow_input = set(bad_steps), 0, overflow_input
        self.initial = {k: v.clone() for k, v in self.state_dict().items()}

    def forward(self, x):
        bad = False
        if self.training and torch.is_grad_enabled():
            self.calls += 1
            bad = self.calls in self.bad_steps
        if bad and self.overflow_input:
            x = x * (1e25 if self.overflow_input == "variance" else float("inf"))
        out = self.net(x)
        return out * float("nan") if bad and not self.overflow_input else out


@pytest.fixture
def nan_model(monkeypatch):
    created = []

    def factory(bad_steps, overflow_input, num_classes, in_channels, **kw):
        created.append(_NaNAt(num_classes, in_channels, bad_steps, overflow_input, **kw))
        return created[-1]

    def register(bad_steps, overflow_input=False):
        monkeypatch.setitem(models._REGISTRY, "nan_test", lambda **kw: factory(bad_steps, overflow_input, **kw))
        return "nan_test"
    register.created = created
    return register


def test_nonfinite_loss_stops_at_its_step_and_keeps_the_last_good_checkpoint(tmp_path, nan_model, capsys):
    run = tmp_path / "run"
    code, err = _cli(["train", *_flags(**{**QUICK, "model": nan_model({17})}, steps=30), "--out", str(run)], capsys)
    assert code == 2
    assert "non-finite loss, gradients or BatchNorm statistics at step 17" in err
    assert f"{run / 'checkpoints' / 'last.pt'} (step 10)" in err and "--on-nonfinite skip" in err
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["step"] == 10
    assert all(torch.isfinite(t).all() for t in state["model"].values() if t.is_floating_point())
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [10]


def test_nonfinite_steps_can_be_skipped_and_are_counted(tmp_path, nan_model):
    run = tmp_path / "run"
    summary = fixmatch.train(Config(**{**QUICK, "model": nan_model({3, 14, 15}), "on_nonfinite": "skip"},
                                    steps=20), out=run)
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["nonfinite_steps"] for r in rows] == [1, 3]
    assert summary["nonfinite_steps"] == 3
    assert all(r["loss_s"] == r["loss_s"] for r in rows)  # skipped steps stay out of the averages (no NaN)
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    assert state["nonfinite_steps"] == 3
    for key in ("model", "ema"):  # NaN gradients never reached the weights
        assert all(torch.isfinite(t).all() for t in state[key].values() if t.is_floating_point())


def test_a_window_of_only_skipped_steps_logs_its_training_averages_as_undefined(tmp_path, nan_model, capsys):
    # Steps 1-3 are all skipped: their loss and mask averages are undefined (null), not a perfect 0.
    fixmatch.train(Config(**{**QUICK, "model": nan_model({1, 2, 3}), "on_nonfinite": "skip", "eval_every": 3},
                          steps=6), out=tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["loss_s"], r["loss_u"], r["mask_rate"], r["pseudo_label_acc"]) for r in rows[:1]] == [(None,) * 4]
    assert rows[1]["loss_s"] > 0 and rows[1]["mask_rate"] is not None
    assert re.search(r"step +3 \| .* Ls - Lu - \| mask - pl-acc +- \|", capsys.readouterr().out)


def test_a_skipped_step_stays_out_of_distribution_alignment(tmp_path, nan_model):
    # Step 3's weak logits are NaN: its batch mean must not enter p_model (which would turn every aligned
    # probability into NaN, and so mask out every pseudo-label, for the next 128 steps).
    fixmatch.train(Config(**{**QUICK, "model": nan_model({3}), "on_nonfinite": "skip", "dist_align": True,
                             "eval_every": 5}, steps=5), out=tmp_path / "run")
    history = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")["dist_align"]["history"]
    assert history.shape == (4, 10) and torch.isfinite(history).all()


def test_a_skipped_step_leaves_the_weights_untouched(tmp_path, nan_model):
    # Step 1 is skipped: the weights and the BatchNorm statistics after it are the initial ones (the forward pass
    # that produced the NaN had moved the statistics; they are put back).
    fixmatch.train(Config(**{**QUICK, "model": nan_model({1}), "on_nonfinite": "skip", "eval_every": 1}, steps=1),
                   out=tmp_path / "a")
    init = nan_model.created[0].initial
    state = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")
    assert any("running_mean" in k for k in init)
    assert all(torch.equal(state["model"][k], init[k]) for k in init)
    assert all(torch.equal(state["ema"][k], init[k]) for k in init)


def test_a_skipped_overflow_does_not_poison_batchnorm_statistics(tmp_path, nan_model):
    # Step 3 overflows from the input on, so its BatchNorm batch statistics are non-finite: kept, they would reach
    # the EMA at step 4 and stop the run at its first evaluation ("non-finite weights").
    summary = fixmatch.train(Config(**{**QUICK, "model": nan_model({3}, overflow_input=True),
                                       "on_nonfinite": "skip"}, steps=20), out=tmp_path / "run")
    assert summary["nonfinite_steps"] == 1
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    for key in ("model", "ema"):
        assert all(torch.isfinite(t).all() for t in state[key].values() if t.is_floating_point())


def test_a_step_that_makes_only_the_running_statistics_infinite_is_caught_at_that_step(tmp_path, nan_model, capsys):
    # Loss and gradients of step 13 are finite, its BatchNorm running_var is not: skip mode drops the step and
    # restores the statistics; stop mode names step 13, not the evaluation that would first see the damage.
    model = nan_model({13}, overflow_input="variance")
    summary = fixmatch.train(Config(**{**QUICK, "model": model, "on_nonfinite": "skip"}, steps=20),
                             out=tmp_path / "skip")
    assert summary["nonfinite_steps"] == 1
    state = load_checkpoint(tmp_path / "skip" / "checkpoints" / "last.pt")
    for key in ("model", "ema"):
        assert all(torch.isfinite(t).all() for t in state[key].values() if t.is_floating_point())
    code, err = _cli(["train", *_flags(**{**QUICK, "model": model}, steps=20), "--out", str(tmp_path / "stop")],
                     capsys)
    assert code == 2 and "non-finite loss, gradients or BatchNorm statistics at step 13" in err


def test_deferred_check_names_the_first_bad_step(tmp_path):
    # The GPU path of on_nonfinite=stop: no per-step sync, the first bad step is kept on the device and
    # reported at the next sync point (forced on here on a CPU).
    guard = NonFiniteGuard("stop", torch.device("cpu"), tmp_path / "last.pt")
    guard.deferred = True
    w = nn.Parameter(torch.ones(3))
    for step, value in [(1, 1.0), (2, float("inf")), (3, float("nan")), (4, 1.0)]:
        w.grad = torch.full((3,), value)
        assert guard.step_is_finite(step, torch.tensor(value), [w])  # the update is not held back
    with pytest.raises(NonFiniteError, match=r"at step 2; .*Last good checkpoint: none yet"):
        guard.raise_if_failed()
    fine = NonFiniteGuard("stop", torch.device("cpu"), tmp_path / "last.pt")
    fine.deferred = True
    fine.raise_if_failed()
    with pytest.raises(NonFiniteError, match="non-finite weights at step 7"):
        fine.check_weights(7, nn.Linear(2, 2).requires_grad_(False).apply(lambda m: m.weight.fill_(math.nan)))


def test_deferred_check_adds_no_per_step_collective(tmp_path):
    # Several processes, GPU path of stop: the ranks agree where the verdict is read, not at every step.
    calls = []

    def rank_min(t):  # one process standing in for the minimum over ranks: counts the collectives
        calls.append(t.clone())
        return t

    guard = NonFiniteGuard("stop", torch.device("cpu"), tmp_path / "last.pt", rank_min=rank_min)
    guard.deferred = True
    w = nn.Parameter(torch.ones(3))
    w.grad = torch.ones(3)
    for step in range(1, 11):
        assert guard.step_is_finite(step, torch.tensor(1.0), [w])
    assert calls == []
    guard.raise_if_failed()
    assert len(calls) == 1 and int(calls[0]) == torch.iinfo(torch.int64).max  # "no bad step" as the largest int
    guard.step_is_finite(11, torch.tensor(math.nan), [w])
    with pytest.raises(NonFiniteError, match="at step 11;"):
        guard.raise_if_failed()
    now = NonFiniteGuard("stop", torch.device("cpu"), tmp_path / "last.pt", rank_min=rank_min)
    now.step_is_finite(1, torch.tensor(1.0), [w])  # read at once (CPU): agreed at once
    assert len(calls) == 3


def test_large_finite_gradients_are_not_taken_for_overflow(tmp_path):
    # Squared, 1e20 overflows float32: a check by the 2-norm would call this sound step non-finite.
    guard = NonFiniteGuard("stop", torch.device("cpu"), tmp_path / "last.pt")
    w = nn.Parameter(torch.ones(3))
    w.grad = torch.tensor([1e20, -3e38, 0.0])
    assert guard.step_is_finite(1, torch.tensor(1.0), [w])
    for bad in (math.inf, -math.inf, math.nan):  # one bad element among large finite ones still counts
        w.grad = torch.tensor([1e20, bad, 0.0])
        with pytest.raises(NonFiniteError, match="at step 2"):
            guard.step_is_finite(2, torch.tensor(1.0), [w])


# --------------------------------------------------------------------------- full disk, unwritable output

def _failing_torch_save(fail_from_call):
    """torch.save that writes part of the file and then fails with ENOSPC, from its ``fail_from_call``-th call."""
    real, calls = torch.save, [0]

    def save(obj, f, *args, **kw):
        calls[0] += 1
        if calls[0] < fail_from_call:
            return real(obj, f, *args, **kw)
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return save


def test_disk_full_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    # Calls 1 and 2 write best.pt and last.pt at step 10; the checkpoint of step 20 fails half-way.
    monkeypatch.setattr(checkpoint_module.torch, "save", _failing_torch_save(3))
    code, err = _cli(["train", *_flags(**QUICK, steps=30), "--out", str(run)], capsys)
    assert code == 2 and "No space left on device" in err and "is intact" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.pt", "last.pt"]  # no temp file
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 10
    assert not (run / ".lock").exists()
    monkeypatch.undo()
    # Once space is back, the run resumes from the intact checkpoint.
    fixmatch.train(None, out=run, resume=True)
    assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == 30


def test_save_checkpoint_failure_is_one_checkpoint_error_and_leaves_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"format": "fixmatch-checkpoint", "w": torch.ones(3)}, path)
    before = path.read_bytes()
    monkeypatch.setattr(checkpoint_module.torch, "save", _failing_torch_save(1))
    with pytest.raises(CheckpointError, match="No space left on device"):
        save_checkpoint({"format": "fixmatch-checkpoint", "w": torch.zeros(3)}, path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["last.pt"]

    def failing_replace(src, dst):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))
    monkeypatch.undo()
    monkeypatch.setattr(checkpoint_module.os, "replace", failing_replace)
    with pytest.raises(CheckpointError, match="Read-only file system"):
        save_checkpoint({"format": "fixmatch-checkpoint", "w": torch.zeros(3)}, path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["last.pt"]


class _FillingFile(io.RawIOBase):
    """A binary file on a disk with ``room`` bytes left: the write that would pass it fails with ENOSPC."""

    def __init__(self, path, mode, room):
        super().__init__()
        self._real, self._room = open(path, mode), room

    def writable(self):
        return True

    def write(self, data):
        if len(data) > self._room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= len(data)
        return self._real.write(data)

    def fileno(self):
        return self._real.fileno()

    def close(self):
        self._real.close()
        super().close()


@pytest.mark.parametrize("room", [0, 100, 5000])
def test_disk_filling_up_inside_torch_save_is_named_not_hidden(tmp_path, monkeypatch, room):
    # The real torch.save, writing to a file that runs out of space: torch turns the OSError into a RuntimeError
    # about its zip stream, and save_checkpoint must still report the full disk.
    path = tmp_path / "last.pt"
    save_checkpoint({"format": "fixmatch-checkpoint", "w": torch.ones(3)}, path)
    before = path.read_bytes()
    monkeypatch.setattr(atomic_module, "open", lambda p, mode: _FillingFile(p, mode, room), raising=False)
    with pytest.raises(CheckpointError, match="No space left on device.*is intact"):
        save_checkpoint({"format": "fixmatch-checkpoint", "w": torch.zeros(3000)}, path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["last.pt"]


class _FullDiskFile(io.StringIO):
    """A text file whose writes store half the data and fail, as a full disk does."""

    def __init__(self, path):
        super().__init__()
        self._real = open(path, "a")

    def tell(self):
        return self._real.tell()

    def write(self, text):
        self._real.write(text[: len(text) // 2])
        self._real.flush()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def truncate(self, size=None):
        return self._real.truncate(size)

    def close(self):
        self._real.close()


def test_disk_full_while_logging_leaves_no_torn_metrics_line(tmp_path, monkeypatch, capsys):
    import fixmatch.core.files as files
    path = tmp_path / "metrics.jsonl"
    append_line(path, '{"step": 10}')
    monkeypatch.setattr(files, "open", lambda p, mode="r": _FullDiskFile(p) if mode == "a" else builtins.open(p, mode),
                        raising=False)
    with pytest.raises(RunDirError, match="No space left on device"):
        append_line(path, '{"step": 20, "test_acc": 50.0}')
    assert path.read_text() == '{"step": 10}\n'

    # In a run: the evaluation at step 10 cannot be logged; one line, no checkpoint, no torn line.
    run = tmp_path / "run"
    code, err = _cli(["train", *_flags(**QUICK, steps=20), "--out", str(run)], capsys)
    assert code == 2 and "cannot write" in err and "metrics.jsonl" in err
    assert (run / "metrics.jsonl").read_text() == ""
    assert not (run / "checkpoints").exists()


def test_unwritable_output_folder_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, err = _cli(["train", *_flags(**QUICK, steps=20), "--out", str(blocker / "run")], capsys)
    assert code == 2 and "cannot create the run directory" in err


# --------------------------------------------------------------------------- one writer per run directory

def test_second_writer_is_refused_while_the_first_holds_the_run_directory(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)  # a run directory as a training leaves it (no need to train)
    (run / "config.yaml").write_text(yaml.safe_dump(Config(**QUICK, steps=10).to_dict()))
    (run / "checkpoints" / "last.pt").write_bytes(b"checkpoint bytes")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from fixmatch.runs.rundir import lock_run_dir\n"
                               "with lock_run_dir(sys.argv[1]):\n    print('locked', flush=True); sys.stdin.read()",
         str(run)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = _files_equal_snapshot(run / "checkpoints")
        for argv in (["train", "--out", str(run), "--resume"], ["train", *_flags(**QUICK, steps=20), "--out", str(run)]):
            code, err = _cli(argv, capsys)
            assert code == 2 and f"in use by another fixmatch process (pid {holder.pid})" in err
        assert _files_equal_snapshot(run / "checkpoints") == before
    finally:
        holder.send_signal(signal.SIGKILL)  # a crash: the operating system releases the lock
        holder.wait()
    assert (run / ".lock").exists()  # left behind by the killed holder, but not stuck:
    with lock_run_dir(run):
        pass
    assert not (run / ".lock").exists()


@pytest.mark.slow
def test_run_killed_before_its_first_checkpoint_restarts_on_resume(tmp_path):
    fixmatch.train(Config(**QUICK, steps=20), out=tmp_path / "straight")
    run = tmp_path / "run"
    fixmatch.train(Config(**QUICK, steps=20), out=run)
    # What a kill between the first logged evaluation and its checkpoint leaves: a config, a split, a metrics
    # row, a temporary file and a stale lock file, but no checkpoint.
    for p in (run / "checkpoints").iterdir():
        p.unlink()
    (run / "checkpoints" / ".last.pt.x1y2.tmp").write_bytes(b"torn")
    (run / ".lock").write_text("12345\n")
    (run / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text().splitlines()[0] + "\n")
    fixmatch.train(None, out=run, resume=True)
    rows = [{k: v for k, v in json.loads(line).items() if k != "wall_s"}
            for r in (run, tmp_path / "straight") for line in (r / "metrics.jsonl").read_text().splitlines()]
    assert rows[:2] == rows[2:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["best.pt", "last.pt"]


# --------------------------------------------------------------------------- untrusted files

class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("container", ["torch-zip", "raw-pickle"])
def test_checkpoint_that_would_run_code_is_rejected(tmp_path, container):
    marker, path = tmp_path / "pwned", tmp_path / "evil.pt"
    state = {"format": "fixmatch-checkpoint", "step": 1, "model": _Payload(marker)}
    if container == "torch-zip":
        torch.save(state, path)
    else:  # the legacy, non-zip format: a bare pickle stream
        path.write_bytes(pickle.dumps(state, protocol=2))
    with pytest.raises(CheckpointError, match=r"cannot load checkpoint .*asks to import (posix|os|nt)\.system") as info:
        load_checkpoint(path)
    assert not marker.exists()
    # one line, and never torch's advice to retry with weights_only=False
    assert "\n" not in str(info.value) and "weights_only" not in str(info.value)


def test_unreadable_checkpoints_are_named_in_one_line(tmp_path):
    save_checkpoint({"format": "fixmatch-checkpoint", "step": 1, "w": torch.zeros(4096)}, tmp_path / "good.pt")
    whole = (tmp_path / "good.pt").read_bytes()
    cases = {"empty.pt": (b"", "empty or cut short"),
             "cut.pt": (whole[:len(whole) // 2], "cut short or corrupt"),
             "text.pt": (b"these are not the weights you are looking for", "not a torch file of tensors")}
    for name, (content, reason) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(CheckpointError, match=reason) as info:
            load_checkpoint(tmp_path / name)
        message = str(info.value)
        assert "\n" not in message and "weights_only" not in message and "RUN_DIR/checkpoints/last.pt" in message
    assert load_checkpoint(tmp_path / "good.pt")["step"] == 1


def _png_declaring(width, height):
    """A valid tiny PNG whose header is rewritten to declare ``width`` x ``height`` (a decompression bomb's
    header: the decoder would allocate for that size)."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    ihdr = bytes(data[12:16]) + width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes(data[24:29])
    data[12:29] = ihdr
    data[29:33] = zlib.crc32(ihdr).to_bytes(4, "big")
    return bytes(data)


def test_open_image_refuses_decompression_bombs_before_decoding(tmp_path):
    big = tmp_path / "big.png"  # over this module's limit, under Pillow's
    big.write_bytes(_png_declaring(10_000, 10_000))
    with pytest.raises(DatasetError, match=r"big.png is 10000x10000 = 100000000 pixels, over the limit of 67108864"):
        open_image(big)
    bomb = tmp_path / "bomb.png"  # over Pillow's own limit too
    bomb.write_bytes(_png_declaring(100_000, 100_000))
    with pytest.raises(DatasetError, match=r"bomb.png is too large to decode safely .*10000000000 pixels"):
        open_image(bomb)
    ok = tmp_path / "ok.png"
    Image.new("RGB", (40, 30), (10, 20, 30)).save(ok)
    img = open_image(ok)
    assert img.size == (40, 30) and img.getpixel((0, 0)) == (10, 20, 30)
    with pytest.raises(DatasetError, match="over the limit of 1000"):
        open_image(ok, max_pixels=1000)


def test_open_image_refuses_non_images_and_unlisted_formats(tmp_path):
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    eps = tmp_path / "figure.eps"  # Pillow would hand EPS files to Ghostscript
    eps.write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    truncated = tmp_path / "cut.png"
    buf = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buf, "PNG")
    truncated.write_bytes(buf.getvalue()[:60])
    for path in (text, eps, truncated):
        with pytest.raises(DatasetError, match=str(path.name)):
            open_image(path)


@pytest.mark.parametrize("name", ["../evil.txt", "/etc/evil.txt", "cifar-10-batches-py/../../evil.txt",
                                  "C:\\evil.txt", "a\\..\\..\\evil.txt"])
def test_archive_members_with_unsafe_paths_are_never_read(tmp_path, name):
    assert not is_safe_member_name(name)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for member in (name, "cifar-10-batches-py/readme.txt"):
            payload = b"overwrite me"
            info = tarfile.TarInfo(member)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        link = tarfile.TarInfo("cifar-10-batches-py/link")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    with tarfile.open(archive, "r:gz") as tar:
        assert [i.name for i in safe_tar_files(tar)] == ["cifar-10-batches-py/readme.txt"]
    # The CIFAR-10 loader reads through the same filter: the archive just lacks the expected members.
    with pytest.raises(DatasetError, match="lacks"):
        load_dataset("cifar10", tmp_path, download=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cifar-10-python.tar.gz"]


def test_safe_member_names_are_accepted():
    for name in ("cifar-10-batches-py/data_batch_1", "a/b/c.bin", "./x", "dir..name/file"):
        assert is_safe_member_name(name)
