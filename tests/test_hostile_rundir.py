"""A run directory someone else prepared: links, FIFOs, hard links and foreign files are refused in one line and
nothing outside the run's own files is written, read or removed. And a rank whose launcher died stops with a
checkpoint instead of training on alone."""
import dataclasses
import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import fixmatch
from fixmatch.cli import main
from fixmatch.config import Config
from fixmatch.core.atomic import atomic_file, atomic_path, default_permissions
from fixmatch.core.files import append_line, write_text_atomic
from fixmatch.runs.checkpoint import load_checkpoint
from fixmatch.runs.log import read_metrics
from fixmatch.runs.rundir import RunDirError, lock_run_dir
from fixmatch.training import distributed

pytestmark = [pytest.mark.usefixtures("one_thread"),  # conftest.py
              pytest.mark.skipif(os.name != "posix", reason="links, FIFOs and hard links as POSIX makes them")]

QUICK = dict(dataset="synthetic", model="cnn_small", num_labels=40, batch_size=8, mu=2, lr=0.05, ema=0.9,
             eval_every=10, eval_batch_size=500, progress=False, device="cpu")
PRECIOUS = "precious data, not to be lost\n"


def _within(seconds, fn, *args):
    """fn(*args), run in a thread: a test fails, rather than hangs, when an open blocks on a FIFO."""
    box = {}

    def run():
        try:
            box["value"] = fn(*args)
        except BaseException as e:  # handed to the test
            box["error"] = e
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still blocked after {seconds} s"
    if "error" in box:
        raise box["error"]
    return box["value"]


def _cli(argv, capsys, seconds=120):
    code = _within(seconds, main, argv)
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return code, err


def _victim(tmp_path, name="victim.txt"):
    victim = tmp_path / name
    victim.write_text(PRECIOUS)
    victim.chmod(0o600)
    return victim


def _untouched(victim):
    return victim.read_text() == PRECIOUS and stat.S_IMODE(victim.stat().st_mode) == 0o600


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 10-step run, trained through an --out that is a link to the real folder."""
    base = tmp_path_factory.mktemp("made")
    (base / "real").mkdir()
    (base / "link").symlink_to(base / "real")
    fixmatch.train(Config(**QUICK, steps=10), out=base / "link")
    return base / "real"


@pytest.fixture
def run(tmp_path, finished_run):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run, symlinks=True)
    return run


# --------------------------------------------------------------------------- the lock file

@pytest.mark.parametrize("resume", [True, False])
def test_a_link_at_the_lock_file_is_refused_and_its_target_untouched(tmp_path, run, capsys, resume):
    victim = _victim(tmp_path)
    (run / ".lock").symlink_to(victim)
    if not resume:  # a new run in a folder holding only the planted link
        for p in run.iterdir():
            if p.name != ".lock":
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    argv = ["train", "--out", str(run), "--resume"] if resume else ["train", *_flags(steps=10), "--out", str(run)]
    code, err = _cli(argv, capsys)
    assert code == 2 and f"refusing {run / '.lock'}: it is a symbolic link to {victim}" in err
    assert _untouched(victim) and (run / ".lock").is_symlink()


def test_a_dangling_link_hard_link_or_fifo_at_the_lock_file_is_refused(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    lock = run / ".lock"
    lock.symlink_to(tmp_path / "would-be-created")
    with pytest.raises(RunDirError, match="is a symbolic link"):
        _within(30, _enter, run)
    assert not (tmp_path / "would-be-created").exists()

    lock.unlink()
    victim = _victim(tmp_path)
    os.link(victim, lock)
    with pytest.raises(RunDirError, match="has 2 hard links"):
        _within(30, _enter, run)
    assert _untouched(victim)

    lock.unlink()
    os.mkfifo(lock)
    with pytest.raises(RunDirError, match=r"is a named pipe \(FIFO\)"):
        _within(30, _enter, run)


def _enter(run):
    with lock_run_dir(run):
        pass


def test_a_lock_file_of_another_program_is_left_alone(tmp_path, capsys):
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / ".lock").write_text("held by an editor session 42\n")
    code, err = _cli(["train", *_flags(steps=10), "--out", str(folder)], capsys)
    assert code == 2 and "is not a fixmatch lock file" in err
    assert (folder / ".lock").read_text() == "held by an editor session 42\n"


def test_out_may_be_a_link_and_nothing_but_run_files_is_removed_where_it_leads(tmp_path, finished_run, capsys):
    # The fixture trained through a link: the run's files are in the folder it leads to.
    assert (finished_run / "checkpoints" / "last.pt").is_file() and (finished_run / "summary.json").is_file()
    foreign = tmp_path / "project"
    foreign.mkdir()
    (foreign / ".notes.tmp").write_text("an editor's temporary")
    (foreign / "data.txt").write_text("data")
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "exp").symlink_to(foreign)  # planted in a shared runs folder
    code, err = _cli(["train", *_flags(steps=10), "--out", str(tmp_path / "runs" / "exp")], capsys)
    assert code == 2 and "already exists" in err
    assert sorted(p.name for p in foreign.iterdir()) == [".notes.tmp", "data.txt"]


# --------------------------------------------------------------------------- what the run directory holds

def _plant_checkpoints_link(run, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    shutil.move(run / "checkpoints", elsewhere)
    (elsewhere / ".last.pt.abcd1234.tmp").write_text("someone else's temporary")
    (run / "checkpoints").symlink_to(elsewhere)
    return "checkpoints", elsewhere


def _plant_file_link(name):
    def plant(run, tmp_path):
        target = tmp_path / f"copy-of-{name.replace('/', '-')}"
        shutil.copyfile(run / name, target)
        target.chmod(0o600)
        (run / name).unlink()
        (run / name).symlink_to(target)
        return name, target
    return plant


def _plant_fifo(name):
    def plant(run, tmp_path):
        (run / name).unlink(missing_ok=True)
        os.mkfifo(run / name)
        return name, None
    return plant


def _plant_victim_link(name):
    def plant(run, tmp_path):
        victim = _victim(tmp_path)
        (run / name).unlink()
        (run / name).symlink_to(victim)
        return name, victim
    return plant


def _plant_summary_folder(run, tmp_path):
    (run / "summary.json").unlink()
    (run / "summary.json").mkdir()
    return "summary.json", None


def _plant_tensorboard_link(run, tmp_path):
    elsewhere = tmp_path / "elsewhere-tb"
    elsewhere.mkdir()
    shutil.rmtree(run / "tensorboard")
    (run / "tensorboard").symlink_to(elsewhere)
    return "tensorboard", elsewhere


def _plant_event_file_link(run, tmp_path):
    victim = _victim(tmp_path)
    (run / "tensorboard" / "events.out.tfevents.1.host.2.0").symlink_to(victim)
    return "tensorboard/events.out.tfevents.1.host.2.0", victim


PLANTED = {
    "checkpoints-link": _plant_checkpoints_link,
    "last.pt-link": _plant_file_link("checkpoints/last.pt"),
    "config.yaml-link": _plant_file_link("config.yaml"),
    "metrics-link": _plant_victim_link("metrics.jsonl"),
    "metrics-fifo": _plant_fifo("metrics.jsonl"),
    "split-fifo": _plant_fifo("split.json"),
    "summary-folder": _plant_summary_folder,
    "tensorboard-link": _plant_tensorboard_link,
    "event-file-link": _plant_event_file_link,
}


@pytest.mark.parametrize("planted", sorted(PLANTED))
def test_links_and_special_files_in_a_run_directory_are_refused_before_anything_is_done(
        tmp_path, run, capsys, planted):
    name, target = PLANTED[planted](run, tmp_path)
    before = {p: p.read_bytes() for p in target.rglob("*")} if target is not None and target.is_dir() else None
    target_text = target.read_bytes() if target is not None and target.is_file() else None
    code, err = _cli(["train", "--out", str(run), "--resume"], capsys)
    assert code == 2 and f"refusing {run / name}: it is " in err, err
    assert "remove it" in err and "precious" not in err  # a linked file's content never reaches the message
    if before is not None:  # the folder a link led to: nothing written, nothing removed
        assert {p: p.read_bytes() for p in target.rglob("*")} == before
    if target_text is not None:
        assert target.read_bytes() == target_text and stat.S_IMODE(target.stat().st_mode) == 0o600
    assert not (run / ".lock").exists()


def test_appending_metrics_never_goes_through_a_link_or_a_hard_link_nor_blocks_on_a_fifo(tmp_path):
    victim = _victim(tmp_path)
    path = tmp_path / "metrics.jsonl"
    path.symlink_to(victim)
    with pytest.raises(RunDirError, match="is a symbolic link"):
        append_line(path, '{"step": 10}')
    path.unlink()
    path.symlink_to(tmp_path / "would-be-created")
    with pytest.raises(RunDirError, match="is a symbolic link"):
        append_line(path, '{"step": 10}')
    assert not (tmp_path / "would-be-created").exists()
    path.unlink()
    os.link(victim, path)
    with pytest.raises(RunDirError, match="has 2 hard links"):
        append_line(path, '{"step": 10}')
    assert _untouched(victim)
    path.unlink()
    os.mkfifo(path)
    with pytest.raises(RunDirError, match="is a named pipe"):
        _within(30, append_line, path, '{"step": 10}')
    path.unlink()
    append_line(path, '{"step": 10}')  # a plain file: as before
    assert path.read_text() == '{"step": 10}\n'


def test_reading_metrics_refuses_links_and_special_files_without_reading_them(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.symlink_to("/dev/zero")  # read through, it would never end
    with pytest.raises(RunDirError, match="symbolic link to /dev/zero"):
        _within(30, read_metrics, path)
    path.unlink()
    os.mkfifo(path)
    with pytest.raises(RunDirError, match="named pipe"):
        _within(30, read_metrics, path)
    path.unlink()
    path.symlink_to(_victim(tmp_path))
    with pytest.raises(RunDirError) as e:
        read_metrics(path)
    assert "precious" not in str(e.value)
    path.unlink()
    assert read_metrics(path) == []  # none yet: as before


def test_a_folder_or_link_where_a_file_is_replaced_whole_is_refused(tmp_path):
    path = tmp_path / "summary.json"
    path.mkdir()
    with pytest.raises(RunDirError, match=r"summary.json: it is a folder, not a regular file.*remove it"):
        write_text_atomic(path, "{}")
    path.rmdir()
    victim = _victim(tmp_path)
    path.symlink_to(victim)
    with pytest.raises(RunDirError, match="is a symbolic link"):
        write_text_atomic(path, "{}")
    assert path.is_symlink() and _untouched(victim)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json", "victim.txt"]  # no temporary left


def test_a_link_put_at_the_temporary_name_is_neither_chmodded_nor_renamed_into_place(tmp_path):
    victim = _victim(tmp_path)
    path = tmp_path / "split.json"
    with pytest.raises(OSError, match="was replaced"):
        with atomic_path(path) as tmp:  # another process swaps the temporary for a link before the rename
            tmp.write_text("{}")
            tmp.unlink()
            tmp.symlink_to(victim)
    assert _untouched(victim) and not path.exists() and not path.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["victim.txt"]


def test_atomic_file_writes_the_file_it_created_whole_or_not_at_all(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("old")
    with atomic_file(path) as f:
        f.write("new")
        assert path.read_text() == "old"
    assert path.read_text() == "new" and stat.S_IMODE(path.stat().st_mode) == default_permissions()
    with pytest.raises(RuntimeError, match="writer failed"):
        with atomic_file(path, "wb") as f:
            f.write(b"half")
            raise RuntimeError("writer failed")
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml"]


# --------------------------------------------------------------------------- an unwritable run directory

def test_an_existing_run_directory_that_is_not_writable_is_named_as_such(tmp_path, run, capsys, monkeypatch):
    real_open = os.open

    def read_only_fs(path, flags, *args, **kwargs):  # what a read-only mount (or chmod a-w, for non-root) does
        if Path(path).name == ".lock" and flags & os.O_CREAT:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)
    monkeypatch.setattr(os, "open", read_only_fs)
    code, err = _cli(["train", "--out", str(run), "--resume"], capsys)
    assert code == 2 and f"run directory {run} exists but is not writable (Read-only file system)" in err
    assert "cannot create" not in err


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_run_directory_is_named_as_such(tmp_path, run, capsys):
    run.chmod(0o555)
    try:
        code, err = _cli(["train", "--out", str(run), "--resume"], capsys)
    finally:
        run.chmod(0o755)
    assert code == 2 and "exists but is not writable" in err


# --------------------------------------------------------------------------- a rank whose launcher died

def test_launcher_watch_notices_a_changed_parent_and_plain_processes_watch_nothing():
    assert distributed.read_env({}).launcher_pid is None
    assert not distributed.LauncherWatch(distributed.read_env({}), None).gone()
    env = distributed.read_env({"RANK": "0", "WORLD_SIZE": "1"})
    assert env.launcher_pid == os.getppid() and env == distributed.DistEnv(0, 1, 0)
    assert not distributed.LauncherWatch(env, None).gone()
    assert distributed.LauncherWatch(dataclasses.replace(env, launcher_pid=os.getppid() + 1), None).gone()


def _flags(**overrides):
    out = []
    for k, v in {**QUICK, **overrides}.items():
        out += ["--no-progress"] if k == "progress" else ["--" + k.replace("_", "-"), str(v)]
    return out


def _running(pid):
    """True while ``pid`` runs; an exited process that nobody reaped yet (a zombie) does not count."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "fork"), reason="the parent forks the run (POSIX only)")
@pytest.mark.parametrize("launcher", ["torchrun", "shell"])
def test_a_rank_stops_with_a_checkpoint_when_its_launcher_is_killed(tmp_path, launcher):
    run, log, steps = tmp_path / "run", tmp_path / "child.log", 100_000  # far more than the test waits for
    # The parent: tests/fork_trainer.py, which forks the run as torchrun starts a rank (a session of its own).
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"} if launcher == "torchrun" else {}
    parent = subprocess.Popen([sys.executable, str(Path(__file__).with_name("fork_trainer.py"))],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    pid = None
    try:
        parent.stdin.write(json.dumps({"argv": ["train", *_flags(steps=steps), "--out", str(run)],
                                       "log": str(log), "env": env}) + "\n")
        parent.stdin.flush()
        pid = json.loads(parent.stdout.readline())["pid"]
        deadline = time.time() + 180
        while not (run / "checkpoints" / "last.pt").is_file():
            assert time.time() < deadline and _running(pid), log.read_text() if log.exists() else "no log"
            time.sleep(0.05)
        parent.kill()  # kill -9 of the launcher alone (torchrun's ranks are in sessions of their own)
        parent.wait(timeout=30)
        deadline = time.time() + (60 if launcher == "torchrun" else 3)
        while _running(pid) and time.time() < deadline:
            time.sleep(0.05)
        if launcher == "shell":  # a plain run outlives its shell, as it always did; SIGTERM still stops it
            assert _running(pid), log.read_text()
            os.kill(pid, signal.SIGTERM)
            deadline = time.time() + 60
            while _running(pid) and time.time() < deadline:
                time.sleep(0.05)
        assert not _running(pid), "the run trains on without its launcher"
        message = log.read_text().strip().splitlines()[-1]
        assert message.startswith("fixmatch: interrupted at step") and "--resume" in message, message
        stopped = int(message.split("interrupted at step ")[1].split(";")[0])
        assert load_checkpoint(run / "checkpoints" / "last.pt")["step"] == stopped < steps
        _enter(run)  # the lock is free: `--resume` may continue the run
    finally:
        if pid is not None and _running(pid):
            os.kill(pid, signal.SIGKILL)
        if parent.poll() is None:
            parent.kill()
