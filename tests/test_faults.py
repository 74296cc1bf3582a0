"""Fault injection: the real command line, killed, raced, starved of disk, fed bad input.

Every test runs ``pyro-worldmodel`` in child processes (``clichild``: forked from
a server that imported the package once, so a kill costs milliseconds) or, for
the two-writer race, as the installed console script. After each fault the run
directory must hold one complete, consistent run: the old one or the new one,
every file matching the manifest, and the dataset's normaliser the
checkpoint's. ``--resume`` then has to reach the bytes of an uninterrupted run.

The default run kills each command at a few seeded instants; ``-m slow`` runs
the thorough version (at least 12 instants per command, and a kill at every
rename a train makes).
"""

from __future__ import annotations

import errno
import json
import random
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from clichild import Child, run

from pyro_worldmodel.data import Episodes
from pyro_worldmodel.io import RunDirectory

EVAL = "--context 3 --horizon 5 --num-samples 5 --iwae-particles 4 --max-windows 20".split()
TRAIN = ["--steps", "12", "--window", "10", *EVAL]
LOOP = [
    *"--env CartPole-v1 --iterations 3 --seed-episodes 1 --train-steps 6 --batch-size 8 --window 10".split(),
    *"--eval-episodes 1 --context 4".split(),
    *"--set planner.candidates=16 --set planner.top_k=4 --set planner.horizon=3 --set planner.iterations=1".split(),
]
FAST_KILLS, SLOW_KILLS = 3, 12


# ---------------------------------------------------------------- fixtures and checks


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def data(workdir) -> Path:
    rc, out = run(
        [
            "collect",
            "--env",
            "Pendulum-v1",
            "--episodes",
            6,
            "--max-episode-steps",
            40,
            "--out",
            workdir / "data",
        ],
        workdir / "collect.log",
    )
    assert rc == 0, out
    return workdir / "data" / "episodes.npz"


@pytest.fixture(scope="module")
def reference(workdir, data) -> dict:
    """An uninterrupted train, and how long it took."""
    start = time.perf_counter()
    rc, out = run(
        ["train", "--data", data, *TRAIN, "--out", workdir / "reference"], workdir / "reference.log"
    )
    assert rc == 0, out
    return {
        "run": workdir / "reference",
        "seconds": time.perf_counter() - start,
        "files": files_of(workdir / "reference"),
    }


@pytest.fixture(scope="module")
def old_run(workdir, data) -> Path:
    """A complete run with another seed: what an interrupted --overwrite must leave standing."""
    rc, out = run(
        ["train", "--data", data, *TRAIN, "--seed", 7, "--out", workdir / "old"], workdir / "old.log"
    )
    assert rc == 0, out
    return workdir / "old"


def files_of(run_dir: Path) -> dict:
    """What the run holds, after recovery, every file checked against the manifest: each
    file's SHA-256, except a checkpoint's, which is a digest of what it holds (pickle's bytes
    for equal contents differ between processes, by its memo and torch's serialisation id)."""
    with RunDirectory.open(run_dir, "test") as run:  # recovers an interrupted commit first
        run.verify()
        files = dict(run.files)
    if "model.ckpt" in files:
        state = torch.load(run_dir / "model.ckpt", weights_only=True)
        files["model.ckpt"] = content_digest(state)
        stored = state["extra"].get("run", {}).get("normalizer") or state["extra"].get("normalizer")
        if "episodes.npz" in files:
            normalizer = Episodes.load(run_dir / "episodes.npz").normalizer
            for key, value in stored.items():
                assert torch.equal(getattr(normalizer, key), value), f"{run_dir}: normaliser {key} differs"
    return files


def content_digest(tree) -> str:
    """A digest of nested containers of tensors and plain values: bit-exact for tensors."""
    import hashlib

    h = hashlib.sha256()

    def walk(x):
        if torch.is_tensor(x):
            h.update(f"T{x.dtype}{tuple(x.shape)}".encode())
            h.update(x.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(x, dict):
            h.update(b"{")
            for k in sorted(x, key=str):
                h.update(repr(k).encode())
                walk(x[k])
            h.update(b"}")
        elif isinstance(x, (list, tuple)):
            h.update(b"[")
            for v in x:
                walk(v)
            h.update(b"]")
        else:
            h.update(repr(x).encode())

    walk(tree)
    return h.hexdigest()


def weights(ckpt: Path) -> dict:
    state = torch.load(ckpt, weights_only=True)
    return {f"{part}.{k}": v for part in ("model", "guide") for k, v in state[part].items()}


def loop_state(ckpt: Path) -> str:
    """The loop's checkpoint without its wall-clock times: model, guide, optimiser, the
    planner's networks and optimisers, the generator, and the iterations' figures."""
    state = torch.load(ckpt, weights_only=True)
    rows = [
        {k: v for k, v in row.items() if "seconds" not in k} for row in state["extra"]["loop"]["iterations"]
    ]
    return content_digest(
        [state["model"], state["guide"], state["optim"], state["extra"]["loop_state"], rows]
    )


def in_pairs(task, items) -> list:
    """``[task(i, item) for ...]``, two at a time: each child is one single-threaded process,
    so on two cores two run side by side in the time of one."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=2) as pool:
        return list(pool.map(lambda pair: task(*pair), enumerate(items)))


def kill_instants(n: int, seconds: float, seed: int) -> list[float]:
    rng = random.Random(seed)
    return sorted(rng.uniform(0.0, seconds) for _ in range(n))


def assert_one_line_error(output: str, pattern: str) -> None:
    assert "Traceback" not in output, output
    assert "Trace Shapes" not in output, output
    errors = [line for line in output.splitlines() if ": error: " in line]
    assert len(errors) == 1, output
    import re

    assert re.search(pattern, errors[0]), (pattern, errors[0])


# ---------------------------------------------------------------- kill -9 at random instants


def _kill_train(workdir, data, reference, old_run, n, seed):
    def one(i, delay):
        out = workdir / f"killed-train-{seed}-{i}"
        overwrite = i % 2 == 1  # half into a fresh directory, half over a finished run
        if overwrite:
            shutil.copytree(old_run, out)
        argv = ["train", "--data", data, *TRAIN, "--out", out, *(["--overwrite"] if overwrite else [])]
        child = Child(argv, workdir / f"killed-train-{seed}-{i}.log")
        time.sleep(delay)
        child.kill()
        files = files_of(out) if out.exists() else {}
        if not files:
            outcome = "no run"
        elif files == reference["files"]:
            outcome = "new run"
        else:
            assert overwrite and files == files_of(old_run), f"kill at {delay:.2f} s left a mix: {files}"
            outcome = "old run"
        rc, log = run([*argv, "--resume"], workdir / f"resumed-train-{seed}-{i}.log")
        assert rc == 0, log
        assert files_of(out) == reference["files"], f"resumed after a kill at {delay:.2f} s"
        shutil.rmtree(out)
        return outcome

    outcomes = in_pairs(one, kill_instants(n, reference["seconds"], seed))
    return {k: outcomes.count(k) for k in ("old run", "new run", "no run")}


def test_train_killed_at_random_instants_leaves_a_run_and_resumes_to_the_same_bytes(
    workdir, data, reference, old_run
):
    print("train kills:", _kill_train(workdir, data, reference, old_run, FAST_KILLS, seed=0))


@pytest.mark.slow
def test_train_killed_at_12_instants(workdir, data, reference, old_run):
    print("train kills:", _kill_train(workdir, data, reference, old_run, SLOW_KILLS, seed=1))


@pytest.fixture(scope="module")
def renames(workdir, data) -> int:
    """How many files a train renames into place: each is an instant a run directory changes."""
    out, count = workdir / "count-renames", workdir / "renames.txt"
    rc, log = run(
        ["train", "--data", data, *TRAIN, "--out", out],
        workdir / "count.log",
        faults={"count_renames": count},
    )
    assert rc == 0, log
    shutil.rmtree(out)
    return int(count.read_text())


@pytest.mark.parametrize("overwrite", [False, True], ids=["fresh", "over a finished run"])
@pytest.mark.parametrize("back", [None, 10, 9, 8, 1, 0])
def test_train_killed_at_a_rename_around_its_commit(
    workdir, data, reference, old_run, renames, back, overwrite
):
    """The first rename (the transaction's record), the last staged file, the commit record
    (the commit point), the first file moved into place, the manifest and after it."""
    argv = ["train", "--data", data, *TRAIN, *(["--overwrite"] if overwrite else [])]
    old = files_of(old_run) if overwrite else None
    _kill_at_rename(
        workdir,
        argv,
        reference["files"],
        1 if back is None else renames - back,
        old_run if overwrite else None,
        old,
    )


@pytest.mark.slow
def test_train_killed_at_every_rename(workdir, data):
    """A shorter train (4 steps, no evaluation), killed at each of its renames in turn."""
    argv = ["train", "--data", data, "--steps", 4, "--window", 10, "--no-evaluate"]
    out, count = workdir / "short-reference", workdir / "short-renames.txt"
    rc, log = run([*argv, "--out", out], workdir / "short.log", faults={"count_renames": count})
    assert rc == 0, log
    expected = files_of(out)
    in_pairs(lambda i, k: _kill_at_rename(workdir, argv, expected, k), range(1, int(count.read_text()) + 2))


def _kill_at_rename(workdir, argv, expected, k, old_run=None, old=None):
    out = workdir / f"rename-{k}{'-over' if old_run else ''}"
    if old_run is not None:
        shutil.copytree(old_run, out)
    rc, log = run([*argv, "--out", out], workdir / f"{out.name}.log", faults={"kill_at_rename": k})
    files = files_of(out) if out.exists() else {}
    assert files in ({}, expected) if old is None else files in (old, expected), (
        f"kill at rename {k}: {sorted(files)}"
    )
    if rc == 0:  # past the last rename
        assert files == expected
    rc, log = run([*argv, "--out", out, "--resume"], workdir / f"{out.name}-resumed.log")
    assert rc == 0, log
    assert files_of(out) == expected
    shutil.rmtree(out)


def _kill_evaluate(workdir, data, reference, n, seed):
    base = workdir / f"evaluate-base-{seed}"
    rc, log = run(["train", "--data", data, *TRAIN, "--no-evaluate", "--out", base], workdir / "base.log")
    assert rc == 0, log
    before = files_of(base)
    argv_eval = ["evaluate", *EVAL]
    start = time.perf_counter()
    done = workdir / f"evaluate-done-{seed}"
    shutil.copytree(base, done)
    rc, log = run([*argv_eval, "--run", done], workdir / "evaluate-done.log")
    assert rc == 0, log
    seconds, after = time.perf_counter() - start, files_of(done)
    assert after["model.ckpt"] == before["model.ckpt"]

    def one(i, delay):
        out = workdir / f"killed-evaluate-{seed}-{i}"
        shutil.copytree(base, out)
        child = Child([*argv_eval, "--run", out], workdir / f"killed-evaluate-{seed}-{i}.log")
        time.sleep(delay)
        child.kill()
        assert files_of(out) in (before, after), f"kill at {delay:.2f} s"
        rc, log = run([*argv_eval, "--run", out], workdir / f"again-evaluate-{seed}-{i}.log")
        assert rc == 0, log
        assert files_of(out) == after
        shutil.rmtree(out)

    in_pairs(one, kill_instants(n, seconds, seed))


def test_evaluate_killed_at_random_instants_leaves_the_old_metrics_or_the_new(workdir, data, reference):
    _kill_evaluate(workdir, data, reference, FAST_KILLS, seed=0)


@pytest.mark.slow
def test_evaluate_killed_at_12_instants(workdir, data, reference):
    _kill_evaluate(workdir, data, reference, SLOW_KILLS, seed=1)


@pytest.fixture(scope="module")
def loop_reference(workdir) -> dict:
    out = workdir / "loop-reference"
    start = time.perf_counter()
    rc, log = run(["loop", *LOOP, "--out", out], workdir / "loop-reference.log")
    assert rc == 0, log
    return {
        "run": out,
        "seconds": time.perf_counter() - start,
        "weights": weights(out / "model.ckpt"),
        "state": loop_state(out / "model.ckpt"),
        "episodes": (out / "episodes.npz").read_bytes(),
    }


def _loop_iterations(run_dir: Path) -> int:
    files = files_of(run_dir)
    if not files:
        return 0
    assert set(files) == {"model.ckpt", "episodes.npz", "loop.json", "loop.png"}
    rows = json.loads((run_dir / "loop.json").read_text())["iterations"]
    saved = torch.load(run_dir / "model.ckpt", weights_only=True)["extra"]["loop"]["iterations"]
    data = Episodes.load(run_dir / "episodes.npz")
    assert len(rows) == len(saved) and rows[-1]["episodes"] == len(data)  # one iteration's files
    return len(rows)


def _kill_loop(workdir, loop_reference, n, seed):
    def one(i, delay):
        out = workdir / f"killed-loop-{seed}-{i}"
        child = Child(["loop", *LOOP, "--out", out], workdir / f"killed-loop-{seed}-{i}.log")
        time.sleep(delay)
        child.kill()
        complete = _loop_iterations(out) if out.exists() else 0
        rc, log = run(["loop", *LOOP, "--out", out, "--resume"], workdir / f"resumed-loop-{seed}-{i}.log")
        assert rc == 0, log
        assert _loop_iterations(out) == 3
        resumed = weights(out / "model.ckpt")
        for key, value in loop_reference["weights"].items():
            assert torch.equal(resumed[key], value), f"kill at {delay:.2f} s: {key} differs after --resume"
        assert loop_state(out / "model.ckpt") == loop_reference["state"], f"kill at {delay:.2f} s"
        assert (out / "episodes.npz").read_bytes() == loop_reference["episodes"]
        shutil.rmtree(out)
        return complete

    return in_pairs(one, kill_instants(n, loop_reference["seconds"], seed))


def test_loop_killed_at_random_instants_resumes_to_the_same_weights(workdir, loop_reference):
    print("loop iterations complete at each kill:", _kill_loop(workdir, loop_reference, FAST_KILLS, seed=0))


@pytest.mark.slow
def test_loop_killed_at_12_instants(workdir, loop_reference):
    seen = _kill_loop(workdir, loop_reference, SLOW_KILLS, seed=1)
    print("loop iterations complete at each kill:", seen)


# ---------------------------------------------------------------- divergence


def test_a_blow_up_mid_training_exits_2_with_the_last_good_checkpoint_kept(workdir, data, old_run):
    """The optimiser's 5th update (step 4) writes NaN into every parameter it steps: the
    loss of step 5 is not finite, training stops there, and the checkpoint of step 4 (the
    last parameters with a finite loss) is what the message names. The finished run stays."""
    out = workdir / "blow-up"
    shutil.copytree(old_run, out)
    argv = ["train", "--data", data, *TRAIN, "--out", out, "--overwrite"]
    rc, log = run(argv, workdir / "blow-up.log", faults={"nan_after_update": 5})
    assert rc == 2, log
    staged = out / ".staging" / "train" / "model.ckpt"
    assert_one_line_error(
        log,
        rf"training diverged at step 5: the loss is (nan|inf|not finite) \((model|guide)\.\S+ is not finite after"
        rf" the optimiser's update at step 4.*the last good checkpoint is {staged} \(step 4\)",
    )
    state = torch.load(staged, weights_only=True)
    assert state["extra"]["step"] == 4 and len(state["extra"]["history"]["loss"]) == 4
    assert all(bool(v.isfinite().all()) for part in ("model", "guide") for v in state[part].values())
    assert files_of(out) == files_of(old_run)
    shutil.rmtree(out)


# ---------------------------------------------------------------- two writers


def test_two_writers_started_together_one_proceeds_and_the_other_names_the_lock(workdir, data, old_run):
    out = workdir / "raced"
    shutil.copytree(old_run, out)
    script = shutil.which("pyro-worldmodel")
    assert script, "the console script is installed with the package"
    argv = [
        script,
        "train",
        "--data",
        str(data),
        *TRAIN[:1],
        "300",
        *TRAIN[2:],
        "--out",
        str(out),
        "--overwrite",
    ]
    procs = [
        subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)
    ]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    codes = sorted(rc for rc, _, _ in results)
    assert codes == [0, 2], results
    loser = next(err for rc, _, err in results if rc == 2)
    winner = next(p.pid for p, (rc, _, _) in zip(procs, results) if rc == 0)
    assert_one_line_error(loser, rf"in use by pid {winner} \(pyro-worldmodel train")
    files_of(out)  # one consistent run
    shutil.rmtree(out)


def test_evaluate_during_a_train_is_refused(workdir, data, old_run):
    out = workdir / "busy"
    shutil.copytree(old_run, out)
    child = Child(
        ["train", "--data", data, "--steps", 400, *TRAIN[2:], "--out", out, "--overwrite"],
        workdir / "busy.log",
    )
    try:
        for _ in range(300):  # until it holds the lock
            if (out / ".staging").exists():
                break
            time.sleep(0.02)
        rc, log = run(["evaluate", "--run", out, *EVAL], workdir / "busy-evaluate.log")
        assert rc == 2
        assert_one_line_error(log, rf"in use by pid {child.process.pid}")
    finally:
        child.kill()
    assert files_of(out) == files_of(old_run)
    shutil.rmtree(out)


# ---------------------------------------------------------------- a full or read-only disk


def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        return False
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    return done.returncode == 0


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def test_a_disk_that_fills_up_mid_run_exits_2_and_keeps_the_previous_run(workdir, data, old_run):
    """A small file system, filled by another process while train writes its checkpoints."""
    mount = workdir / "disk-full"
    if not _mount_tmpfs(mount, "64m"):
        pytest.skip("cannot mount a small file system here; the injected-OSError test covers it")
    try:
        out = mount / "run"
        shutil.copytree(old_run, out)
        argv = ["train", "--data", data, "--steps", 400, *TRAIN[2:], "--out", out, "--overwrite"]
        child = Child(argv, workdir / "disk-full.log")
        for _ in range(1000):
            if (out / ".staging" / "train" / "model.ckpt").exists():
                break
            time.sleep(0.01)
        with open(mount / "filler", "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 2**20)
                    f.flush()
            except OSError as e:
                assert e.errno == errno.ENOSPC
        rc, log = child.wait(), child.output
        assert rc == 2, log
        assert_one_line_error(log, "No space left on device")
        (mount / "filler").unlink()
        assert files_of(out) == files_of(old_run)
    finally:
        _umount(mount)


def test_a_read_only_disk_exits_2_and_keeps_the_run(workdir, data, old_run):
    """Mounted read-only before train starts (a file system with a file open for writing,
    as the lock is, cannot be remounted read-only)."""
    mount = workdir / "disk-ro"
    if not _mount_tmpfs(mount, "64m"):
        pytest.skip("cannot mount a small file system here; the injected-OSError test covers it")
    try:
        out = mount / "run"
        shutil.copytree(old_run, out)
        subprocess.run(["mount", "-o", "remount,ro", str(mount)], check=True)
        rc, log = run(["train", "--data", data, *TRAIN, "--out", out, "--overwrite"], workdir / "disk-ro.log")
        assert rc == 2, log
        assert_one_line_error(log, "Read-only file system")
        assert files_of_read_only(out) == files_of(old_run)
    finally:
        _umount(mount)


@pytest.mark.parametrize("disk", ["full", "read-only"])
@pytest.mark.parametrize("at", [2, 6, 30])
def test_a_write_that_fails_mid_run_exits_2_and_keeps_the_previous_run(workdir, data, old_run, disk, at):
    """The OSError a full or read-only disk gives, raised at the k-th fsync: the transaction
    record, a checkpoint while training, a figure or the commit itself."""
    out = workdir / f"failing-{disk}-{at}"
    shutil.copytree(old_run, out)
    argv = ["train", "--data", data, *TRAIN, "--out", out, "--overwrite"]
    rc, log = run(argv, workdir / f"failing-{disk}-{at}.log", faults={"fail_at_fsync": at, "disk": disk})
    assert rc == 2, log
    assert_one_line_error(log, "No space left on device" if disk == "full" else "Read-only file system")
    assert files_of(out) == files_of(old_run)
    shutil.rmtree(out)


def files_of_read_only(run_dir: Path) -> dict:
    """files_of for a directory that cannot be locked: verify the manifest only."""
    run = RunDirectory(run_dir)
    run.verify()
    files = dict(run.files)
    files["model.ckpt"] = content_digest(torch.load(run_dir / "model.ckpt", weights_only=True))
    return files


def test_too_little_free_space_is_refused_before_anything_is_written(workdir, data):
    mount = workdir / "tiny"
    if not _mount_tmpfs(mount, "512k"):
        pytest.skip("cannot mount a small file system here; the injected-OSError test covers the write path")
    try:
        rc, log = run(["train", "--data", data, *TRAIN, "--out", mount / "run"], workdir / "tiny.log")
        assert rc == 2
        assert_one_line_error(log, r"train needs about .* MiB and the file system of .* has .* free")
        assert list(mount.iterdir()) == []
    finally:
        _umount(mount)


def test_a_first_train_killed_after_its_commit_point_is_finished_by_the_next_evaluate(
    workdir, data, reference, renames
):
    """Killed at the first file moved into place, just after the commit point, the run is
    only in the staging area and its commit record; evaluate (not train --resume) finds it
    pending, finishes the commit, and evaluates the new run."""
    out = workdir / "pending"
    rc, log = run(
        ["train", "--data", data, *TRAIN, "--out", out],
        workdir / "pending.log",
        faults={"kill_at_rename": renames - 7},
    )
    assert rc == -9, log  # SIGKILL
    assert not (out / "run.json").exists() and list((out / ".staging").glob("*/COMMIT"))
    rc, log = run(["evaluate", "--run", out, *EVAL], workdir / "pending-evaluate.log")
    assert rc == 0, log
    assert files_of(out) == reference["files"]
    shutil.rmtree(out)
