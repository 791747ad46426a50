"""Kill at any moment: a run SIGKILLed ten times (some kills inside a checkpoint write) and resumed each time
ends exactly where an uninterrupted run with the same seed ends, and never leaves an unreadable checkpoint."""
import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from run_helpers import assert_same_state, metrics_rows

from fixmatch.cli import main
from fixmatch.runs.checkpoint import TEST_PAUSE_ENV, load_checkpoint

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the test forks its trainings (POSIX only)")

STEPS, EVAL_EVERY = 80, 4
FLAGS = ["--dataset", "synthetic", "--model", "cnn_small", "--num-labels", "40", "--batch-size", "8", "--mu", "2",
         "--lr", "0.05", "--ema", "0.9", "--eval-every", str(EVAL_EVERY), "--eval-batch-size", "500",
         "--steps", str(STEPS), "--strong", "ctaugment", "--device", "cpu", "--no-progress"]


class ForkServer:
    """Drives tests/fork_trainer.py: start a `fixmatch train` child, learn its pid, wait for its exit code."""

    def __init__(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}  # the two CPU threads of a small machine fight otherwise
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("fork_trainer.py"))],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(json.loads(x)) for x in self.proc.stdout], daemon=True).start()

    def start(self, argv, log, env=None) -> int:
        self.proc.stdin.write(json.dumps({"argv": argv, "log": str(log), "env": env or {}}) + "\n")
        self.proc.stdin.flush()
        return self.lines.get(timeout=120)["pid"]

    def exited(self) -> bool:
        return not self.lines.empty()

    def wait(self, timeout=120) -> int:
        return self.lines.get(timeout=timeout)["exit"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def _check_readable(run, split):
    for path in (run / "checkpoints").glob("*.pt"):
        state = load_checkpoint(path)  # never torn, never unreadable
        assert state["split"] == split and 0 < state["step"] <= STEPS
    if (run / "metrics.jsonl").exists():
        metrics_rows(run)


@pytest.mark.slow
def test_sigkill_at_ten_random_moments_then_resume_matches_uninterrupted_run(tmp_path):
    server = ForkServer()
    try:
        straight, run = tmp_path / "straight", tmp_path / "killed"
        t = time.perf_counter()
        server.start(["train", *FLAGS, "--out", str(straight)], tmp_path / "straight.log")
        assert server.wait() == 0, (tmp_path / "straight.log").read_text()
        duration = time.perf_counter() - t
        split = json.loads((straight / "split.json").read_text())

        rng = random.Random(6)
        modes = ["checkpoint"] * 4 + ["random"] * 6
        rng.shuffle(modes)
        kills_in_checkpoint_write, resumed_from = 0, []
        for i, mode in enumerate(modes):
            argv = ["train", *FLAGS, "--out", str(run)] + (["--resume"] if (run / "config.yaml").is_file() else [])
            last = run / "checkpoints" / "last.pt"
            resumed_from.append(load_checkpoint(last)["step"] if last.is_file() else 0)
            log = tmp_path / f"kill{i}.log"
            if mode == "checkpoint":
                # Widen the window between a complete temporary file and its rename, then kill inside it, at the
                # third or fourth checkpoint write of this launch: after its first evaluation's last.pt (the
                # first evaluation writes best.pt, then last.pt), so that later launches resume mid-run.
                stale = {p.name for p in (run / "checkpoints").glob(".*.pt.*.tmp")}  # removed at start-up
                # 0.3 s: each write of the launch pauses, and this loop notices a new file within milliseconds.
                pid = server.start(argv, log, {TEST_PAUSE_ENV: "0.3"})
                target, seen, deadline = rng.randint(3, 4), set(), time.time() + 120
                while len(seen) < target and not server.exited():
                    assert time.time() < deadline, log.read_text()
                    seen |= {p.name for p in (run / "checkpoints").glob(".*.pt.*.tmp")} - stale
                    time.sleep(0.002)
                if kills_in_checkpoint_write == 0 and not server.exited():
                    _check_second_writer_refused(run, pid)
            else:
                # A random moment of the whole launch: start-up, a step, an evaluation or a write.
                pid = server.start(argv, log)
                time.sleep(rng.uniform(0, duration / 20))
            assert not server.exited(), f"the run ended after {i} kills: {log.read_text()}"
            os.kill(pid, signal.SIGKILL)
            assert server.wait() == -signal.SIGKILL
            if mode == "checkpoint":
                kills_in_checkpoint_write += any((run / "checkpoints").glob(".*.pt.*.tmp"))
            _check_readable(run, split)
        assert kills_in_checkpoint_write == 4
        # Launches that resumed from an evaluation's checkpoint, not from scratch (the final one too).
        assert sum(step > 0 for step in resumed_from) >= 3, resumed_from
        assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] >= EVAL_EVERY

        server.start(["train", "--out", str(run), "--resume", "--no-progress"], tmp_path / "final.log")
        assert server.wait() == 0, (tmp_path / "final.log").read_text()
    finally:
        server.close()

    # Same evaluations, hence the same split, data order, augmentation draws and CTAugment policies.
    assert metrics_rows(run) == metrics_rows(straight)
    a, b = load_checkpoint(run / "checkpoints" / "last.pt"), load_checkpoint(straight / "checkpoints" / "last.pt")
    for key in ("step", "model", "ema", "optimizer", "ctaugment", "rng", "sums", "split", "best_acc",
                "nonfinite_steps"):
        assert_same_state(a[key], b[key], key)
    assert not torch.all(a["ctaugment"]["rates"] == 1)  # CTAugment did learn, and identically
    best_a, best_b = (load_checkpoint(r / "checkpoints" / "best.pt") for r in (run, straight))
    assert best_a["step"] == best_b["step"]
    assert_same_state(best_a["ema"], best_b["ema"], "best ema")
    summary = json.loads((run / "summary.json").read_text())
    straight_summary = json.loads((straight / "summary.json").read_text())
    for key in ("steps", "test_acc_last", "test_acc_best", "test_acc_median_last20", "nonfinite_steps"):
        assert summary[key] == straight_summary[key]
    leftovers = [p.name for p in (*run.iterdir(), *(run / "checkpoints").iterdir()) if p.name.startswith(".")]
    assert leftovers == []  # stale temporary files were cleared by the next start; the lock file went with the run


def _check_second_writer_refused(run, pid):
    """While the child trains, a second `fixmatch train` on its run directory is refused, with or without
    --resume (the child is paused in a checkpoint write, alive before and after the attempts)."""
    os.kill(pid, 0)
    for argv in (["train", "--out", str(run), "--resume"], ["train", *FLAGS, "--out", str(run)]):
        err = _run_main(argv)
        assert f"in use by another fixmatch process (pid {pid})" in err
    os.kill(pid, 0)


def _run_main(argv):
    import contextlib
    import io
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        assert main(argv) == 2
    err = buf.getvalue()
    assert len(err.strip().splitlines()) == 1
    return err
