"""pyro_worldmodel.io: atomic files, the run-directory lock and its transactions.

Crashes are real where a real one can be had cheaply (a child process killed
with SIGKILL while it holds the lock or writes), and simulated at each rename of
a commit, where a crash between two renames is otherwise a matter of luck.
"""

import json
import math
import multiprocessing
import os
import signal
import socket
import time

import numpy as np
import pytest
import torch

from pyro_worldmodel import io
from pyro_worldmodel.errors import RunDirectoryError, RunLockedError
from pyro_worldmodel.io import RunDirectory, RunLock, check_env_id, strict_json

# ---------------------------------------------------------------- names from files


@pytest.mark.parametrize("name", ["Pendulum-v1", "ALE/Pong-v5", "phys2d/CartPole-v1", "my_env:Env-v0", ""])
def test_gymnasium_ids_are_safe_names(name):
    assert check_env_id(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "/somewhere/else",
        "../outside",
        "a/../../b",
        "..",
        ".",
        "a/b/c",
        "runs/../../etc",
        "~/x",
        "a b",
        "x" * 200,
        "Pendulum-v1\n",
        "é-v1",
        "a/",
        "/",
    ],
)
def test_a_name_that_could_leave_its_folder_is_refused(name):
    with pytest.raises(ValueError, match=r"env_id: expected a gymnasium id"):
        check_env_id(name)


def test_a_name_that_is_not_a_string_is_refused():
    with pytest.raises(ValueError, match="env_id: expected a string.*got int"):
        check_env_id(3)


# ---------------------------------------------------------------- strict JSON


def test_strict_json_writes_non_finite_numbers_as_null_and_numpy_and_torch_as_numbers():
    text = strict_json(
        {
            "nan": math.nan,
            "inf": math.inf,
            "ninf": -math.inf,
            "np": np.float32(1.5),
            "t": torch.tensor([1, 2]),
        }
    )
    assert json.loads(text) == {"nan": None, "inf": None, "ninf": None, "np": 1.5, "t": [1, 2]}
    assert "NaN" not in text and "Infinity" not in text


# ---------------------------------------------------------------- atomic writes and leftovers


def _write_then_die(path, ready):
    """A writer killed mid-write: its temporary file stays behind."""

    def write(f):
        f.write(b"partial")
        f.flush()
        ready.set()
        time.sleep(60)

    io.atomic_write(path, write)


def test_a_killed_writer_leaves_the_old_file_and_its_temporary_is_removed_later(tmp_path):
    target = tmp_path / "model.ckpt"
    target.write_bytes(b"old")
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    child = ctx.Process(target=_write_then_die, args=(target, ready))
    child.start()
    assert ready.wait(30)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    leftovers = [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    assert len(leftovers) == 1 and str(child.pid) in leftovers[0].name
    assert target.read_bytes() == b"old"

    assert io.remove_stale_temporaries(tmp_path) == leftovers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.ckpt"]


def test_a_live_writers_temporary_is_kept(tmp_path):
    live = tmp_path / f".model.ckpt.{socket.gethostname()}.{os.getpid()}.abc.tmp"
    live.write_bytes(b"being written")
    other_host = tmp_path / ".model.ckpt.not-this-host.1.abc.tmp"
    other_host.write_bytes(b"another machine's")
    assert io.remove_stale_temporaries(tmp_path) == []
    assert live.exists() and other_host.exists()


# ---------------------------------------------------------------- the lock


def _hold_lock(directory, ready, release):
    with RunLock(directory, "pyro-worldmodel train"):
        ready.set()
        release.wait(60)


def test_a_second_writer_is_refused_at_once_naming_the_holders_pid(tmp_path):
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(tmp_path / "run", ready, release))
    holder.start()
    try:
        assert ready.wait(30)
        start = time.perf_counter()
        with pytest.raises(RunLockedError, match=rf"in use by pid {holder.pid} \(pyro-worldmodel train") as e:
            RunLock(tmp_path / "run", "pyro-worldmodel evaluate").acquire()
        assert time.perf_counter() - start < 1.0  # refused, not queued
        assert e.value.pid == holder.pid
    finally:
        release.set()
        holder.join()
    with RunLock(tmp_path / "run"):  # released when the holder finished
        pass


def test_a_lock_left_by_a_killed_process_never_blocks(tmp_path):
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold_lock, args=(tmp_path / "run", ready, release))
    holder.start()
    assert ready.wait(30)
    os.kill(holder.pid, signal.SIGKILL)
    holder.join()
    assert (tmp_path / "run" / ".lock").exists()  # the file stays; the lock went with the process
    with RunLock(tmp_path / "run", "pyro-worldmodel train") as lock:
        assert json.loads((tmp_path / "run" / ".lock").read_text())["pid"] == os.getpid()
        assert lock.held


def test_one_process_cannot_take_its_own_lock_twice(tmp_path):
    with RunLock(tmp_path / "run"):
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
            RunLock(tmp_path / "run").acquire()


# ---------------------------------------------------------------- transactions


def _commit(path, files: dict, *, replace=False, command="train"):
    with RunDirectory.open(path, command) as run:
        tx = run.transaction(command, replace=replace)
        for name, data in files.items():
            tx.write(name, lambda f, data=data: f.write(data))
        return tx.commit()


def test_a_commit_makes_the_staged_files_the_run_with_their_checksums(tmp_path):
    manifest = _commit(tmp_path / "run", {"model.ckpt": b"weights", "figures/a.png": b"png"})
    run = RunDirectory(tmp_path / "run")
    assert run.files == manifest["files"]
    assert set(run.files) == {"model.ckpt", "figures/a.png"}
    assert run.file("model.ckpt").read_bytes() == b"weights"
    run.verify()
    assert not (tmp_path / "run" / ".staging").exists()


def test_an_uncommitted_transaction_changes_nothing_a_reader_sees(tmp_path):
    _commit(tmp_path / "run", {"model.ckpt": b"v1", "episodes.npz": b"d1"})
    with RunDirectory.open(tmp_path / "run", "train") as run:
        tx = run.transaction("train", replace=True)
        tx.write("model.ckpt", lambda f: f.write(b"v2"))
        reader = RunDirectory(tmp_path / "run")
        assert reader.file("model.ckpt").read_bytes() == b"v1"
        assert reader.file("episodes.npz").read_bytes() == b"d1"
    # abandoned: the old run stands, the staged files wait for a resume or the next writer
    assert RunDirectory(tmp_path / "run").file("model.ckpt").read_bytes() == b"v1"
    assert (tmp_path / "run" / ".staging" / "train" / "model.ckpt").read_bytes() == b"v2"


def test_replace_removes_what_the_new_run_does_not_write_and_a_partial_commit_keeps_it(tmp_path):
    _commit(tmp_path / "run", {"model.ckpt": b"v1", "metrics.json": b"{}"})
    _commit(tmp_path / "run", {"metrics.json": b"{1}"}, command="evaluate")
    run = RunDirectory(tmp_path / "run")
    assert run.file("model.ckpt").read_bytes() == b"v1" and run.file("metrics.json").read_bytes() == b"{1}"
    _commit(tmp_path / "run", {"episodes.npz": b"d"}, replace=True, command="collect")
    assert set(RunDirectory(tmp_path / "run").files) == {"episodes.npz"}
    assert not (tmp_path / "run" / "model.ckpt").exists()


def test_a_file_changed_behind_the_runs_back_is_detected(tmp_path):
    _commit(tmp_path / "run", {"model.ckpt": b"v1", "episodes.npz": b"d1"})
    (tmp_path / "run" / "episodes.npz").write_bytes(b"another writer's data")
    with pytest.raises(RunDirectoryError, match="episodes.npz: does not match the run's manifest"):
        RunDirectory(tmp_path / "run").file("episodes.npz")
    (tmp_path / "run" / "model.ckpt").unlink()
    with pytest.raises(RunDirectoryError, match="model.ckpt: listed in .* but missing"):
        RunDirectory(tmp_path / "run").file("model.ckpt")


class Crash(BaseException):
    """Stands for the process dying: nothing after it runs, no handler catches it."""


@pytest.mark.parametrize("crash_at", range(5))
def test_a_crash_at_any_rename_of_a_commit_leaves_the_old_run_or_the_new_one(tmp_path, monkeypatch, crash_at):
    """Staging three files is four renames (the transaction record, then each file); the
    commit is five more (the commit record, the three files into place, the manifest).
    Crash at each of those five, then let the next writer recover."""
    old = {"model.ckpt": b"v1", "episodes.npz": b"d1", "metrics.json": b"m1"}
    new = {"model.ckpt": b"v2", "episodes.npz": b"d2", "figures/training.png": b"p2"}
    _commit(tmp_path / "run", old)

    real_replace, calls = os.replace, []

    def crashing_replace(src, dst):
        calls.append(dst)
        if len(calls) > 4 + crash_at:
            raise Crash(dst)
        real_replace(src, dst)

    monkeypatch.setattr(io.os, "replace", crashing_replace)
    with pytest.raises(Crash):
        _commit(tmp_path / "run", new, replace=True)
    monkeypatch.setattr(io.os, "replace", real_replace)

    with RunDirectory.open(tmp_path / "run", "evaluate") as run:  # the next writer recovers first
        run.verify()
        contents = {name: run.file(name).read_bytes() for name in run.files}
    committed = crash_at >= 1  # the first commit rename is the commit point
    assert contents == (new if committed else old), (crash_at, calls)


def test_resume_keeps_what_an_interrupted_transaction_of_the_same_command_staged(tmp_path):
    with RunDirectory.open(tmp_path / "run", "train") as run:
        tx = run.transaction("train")
        tx.write("model.ckpt", lambda f: f.write(b"step 30"))
        tx.write("metrics.json", lambda f: f.write(b"{}"))
    with RunDirectory.open(tmp_path / "run", "evaluate") as run:
        assert run.staged_transaction("train")["command"] == "train"
        run.transaction("evaluate")  # another command's staging area: the train's stays
        assert (run.staging_of("train") / "model.ckpt").read_bytes() == b"step 30"
    with RunDirectory.open(tmp_path / "run", "train") as run:
        tx = run.transaction("train", keep=("model.ckpt",))  # a resume keeps the checkpoint only
        assert tx.staged() == ["model.ckpt"]
    with RunDirectory.open(tmp_path / "run", "train") as run:
        assert run.transaction("train").staged() == []  # a fresh train discards it


def test_a_directory_the_writer_created_and_left_empty_is_removed(tmp_path):
    with RunDirectory.open(tmp_path / "new", "train"):
        assert (tmp_path / "new" / ".lock").exists()
    assert not (tmp_path / "new").exists()
    (tmp_path / "mine").mkdir()
    with RunDirectory.open(tmp_path / "mine", "train"):
        pass
    assert (tmp_path / "mine").is_dir()  # not created by it: left, with its lock file


def test_a_probe_refuses_a_held_directory_at_once_and_never_turns_a_writer_away(tmp_path):
    io.check_unlocked(tmp_path / "nothing-here")
    with RunLock(tmp_path / "run", "pyro-worldmodel train"):
        with pytest.raises(RunLockedError, match=f"in use by pid {os.getpid()}"):
            io.check_unlocked(tmp_path / "run")
    io.check_unlocked(tmp_path / "run")  # released: passes, and takes nothing
    with RunLock(tmp_path / "run"):
        pass


def test_a_directory_written_before_manifests_is_read_as_a_run_of_its_known_files(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "figures").mkdir(parents=True)
    for name in ("model.ckpt", "episodes.npz", "figures/training.png", "notes.txt"):
        (run_dir / name).write_bytes(name.encode())
    run = RunDirectory(run_dir)
    assert set(run.files) == {"model.ckpt", "episodes.npz", "figures/training.png"}  # not notes.txt
    _commit(run_dir, {"metrics.json": b"{}"}, command="evaluate")
    files = RunDirectory(run_dir).files
    assert set(files) == {"model.ckpt", "episodes.npz", "figures/training.png", "metrics.json"}
    assert all(digest is not None for digest in files.values())
    assert (run_dir / "notes.txt").read_bytes() == b"notes.txt"


def test_a_manifest_naming_a_path_outside_the_run_is_refused(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    for bad in ("../../etc/passwd", "/etc/passwd", ".lock"):
        manifest = {"format": io.MANIFEST_FORMAT, "files": {bad: None}}
        (run_dir / "run.json").write_text(json.dumps(manifest))
        with pytest.raises(RunDirectoryError, match="expected a relative file name inside the run"):
            RunDirectory(run_dir).manifest()


def test_writing_needs_the_lock(tmp_path):
    with pytest.raises(RuntimeError, match="open it with RunDirectory.open"):
        RunDirectory(tmp_path).transaction("train")


def test_too_little_free_space_is_refused_before_writing(tmp_path):
    with pytest.raises(OSError, match="train needs about .* MiB free") as e:
        io.check_free_space(tmp_path / "not" / "yet", 2**62, "train")
    assert e.value.errno == 28
    assert not (tmp_path / "not").exists()
    io.check_free_space(tmp_path, 1, "train")
