"""Files: atomic writes, checkpoints, strict JSON, safe names and run directories.

Nothing here knows about models or data (a checkpoint holds any two modules and
a Pyro optimiser); every other module writes through it.
"""

from __future__ import annotations

import errno
import io as _io
import json
import math
import os
import re
import socket
import tempfile
from pathlib import Path

import torch
from pyro.optim.optim import _get_state_dict  # handles optimisers and LR schedulers

from .errors import DivergenceError

# A gymnasium id, optionally with one namespace ("ALE/Pong-v5"), each part starting with a
# letter, digit or underscore: never absolute, never "..", never more than one level deep.
_NAME_PART = r"[A-Za-z0-9_][A-Za-z0-9_.:+-]*"
_ENV_ID = re.compile(rf"(?:{_NAME_PART}/)?{_NAME_PART}", re.ASCII)
MAX_NAME_LENGTH = 128


def check_env_id(value, what: str = "env_id") -> str:
    """``value`` if it is a safe environment id (or ``""``, unknown), else ``ValueError``.

    Ids read from data files and checkpoints name run directories
    (``runs/<env id>``), so they are checked before any path is made of them:
    at most one ``/`` (a gymnasium namespace), each part starting with a
    letter, digit or underscore, then letters, digits and ``_.:+-``.
    """
    if not isinstance(value, str):
        raise ValueError(f"{what}: expected a string such as 'Pendulum-v1', got {type(value).__name__}")
    if value == "":
        return value
    if len(value) > MAX_NAME_LENGTH or not _ENV_ID.fullmatch(value):
        shown = value if len(value) <= 60 else value[:57] + "..."
        raise ValueError(
            f"{what}: expected a gymnasium id such as 'Pendulum-v1' or 'ALE/Pong-v5' (letters, digits"
            f" and _.:+-, at most one '/', at most {MAX_NAME_LENGTH} characters), got {shown!r}"
        )
    return value


# ---------------------------------------------------------------- atomic writes

_TMP_SUFFIX = ".tmp"


def _tmp_prefix(path: Path) -> str:
    # The writer's host and PID are in the name, so that a leftover of a killed writer
    # can be told from a file another live process is still writing.
    return f".{path.name}.{socket.gethostname()}.{os.getpid()}."


def atomic_write(path, write) -> None:
    """Call ``write(file)`` on a temporary file beside ``path``, then rename it over ``path``.

    A crash at any instant leaves either the old file or the new one, never
    part of one. Temporary files left by killed writers on this host are
    removed by :func:`remove_stale_temporaries`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_tmp_prefix(path), suffix=_TMP_SUFFIX)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual mode
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_directory(path.parent)  # make the rename itself durable
    remove_stale_temporaries(path.parent, path.name, recursive=False)


def fsync_directory(directory) -> None:
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    except OSError as e:  # some file systems cannot fsync a directory
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(dir_fd)


def remove_stale_temporaries(directory, name: str | None = None, *, recursive: bool = True) -> list[Path]:
    """Delete the temporary files of :func:`atomic_write` below ``directory`` (of the file
    ``name`` only, if given) whose writer, on this host, is no longer running.

    :returns: what was removed.
    """
    host = socket.gethostname()
    removed = []
    pattern = re.compile(rf"^\..+\.{re.escape(host)}\.(\d+)\..*{re.escape(_TMP_SUFFIX)}$")
    glob = f".{name}.*{_TMP_SUFFIX}" if name else f".*{_TMP_SUFFIX}"
    paths = Path(directory).rglob(glob) if recursive else Path(directory).glob(glob)
    for p in paths:
        m = pattern.match(p.name)
        if m and not pid_alive(int(m.group(1))):
            try:
                p.unlink()
                removed.append(p)
            except FileNotFoundError:
                pass
    return removed


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID runs on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    return True


def physical_memory() -> int | None:
    """This machine's physical memory in bytes, None where the system does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


# ---------------------------------------------------------------- strict JSON


def strict_json(obj) -> str:
    """JSON text that any reader accepts: NaN and ±inf (a horizon no window reached,
    an overflowed score) are written as null; numpy and torch scalars and arrays as numbers and lists."""
    return json.dumps(_strict(obj), indent=2, allow_nan=False) + "\n"


def _strict(x):
    if isinstance(x, bool) or x is None or isinstance(x, str):
        return x
    if isinstance(x, int):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _strict(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_strict(v) for v in x]
    if hasattr(x, "tolist"):  # numpy and torch scalars and arrays
        return _strict(x.tolist())
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"strict_json: cannot write a {type(x).__name__}")


def write_json(path, obj) -> None:
    """:func:`strict_json` written atomically."""
    text = strict_json(obj).encode()
    atomic_write(path, lambda f: f.write(text))


# ---------------------------------------------------------------- run directories
#
# A run directory is written as a transaction. Every file a command writes goes first into
# the directory's `.staging/` folder (each file itself written atomically). The commit point is
# one atomic rename: `.staging/COMMIT`, the new manifest, appears whole or not at all. After it
# the staged files are renamed into place and the manifest becomes `run.json`. A crash before
# the commit point leaves the old run untouched (and the staged files, so that training can be
# resumed); a crash after it is rolled forward by the next process that opens the directory,
# before it reads anything. `run.json` names every file of the run with its SHA-256, so a
# reader can tell a complete run from a mix of two.
#
# Staging inside the directory, rather than building a sibling directory and swapping it in,
# keeps the run's path, its lock and its unchanged files (a large dataset that `evaluate` does
# not rewrite) where they are: POSIX cannot atomically replace a non-empty directory, and a
# swap would leave an instant with no run at all.

MANIFEST = "run.json"
MANIFEST_FORMAT = "pyro_worldmodel.manifest/1"
STAGING = ".staging"
LOCK = ".lock"
_COMMIT = "COMMIT"
# What a run directory held before manifests existed (version 0.1.0 of the package).
LEGACY_NAMES = (
    "episodes.npz",
    "model.ckpt",
    "metrics.json",
    "imagination.npz",
    "loop.json",
    "loop.png",
    "compare.md",
    "compare.json",
)
LEGACY_FIGURES = (
    "training.png",
    "kl_per_t.png",
    "open_loop.png",
    "imagination.png",
    "estimators.png",
    "learning_curves.png",
)
_TXN = "transaction.json"


def sha256_of(path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class RunLock:
    """One writer per directory: an exclusive ``flock`` on ``<directory>/.lock``.

    The operating system drops the lock when its process ends, however it ends,
    so a lock left by a killed process never blocks. The holder writes its PID,
    host and command into the file, so a refused writer can say who holds it.
    """

    def __init__(self, directory, command: str = "pyro_worldmodel"):
        self.directory = Path(directory)
        self.command = command
        self._fd: int | None = None

    @property
    def path(self) -> Path:
        return self.directory / LOCK

    def acquire(self) -> RunLock:

        self.directory.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                _flock_briefly(fd)
            except BlockingIOError:
                error = _locked(self.directory, fd)
                os.close(fd)
                raise error from None
            except BaseException:
                os.close(fd)
                raise
            # The file may have been removed and made anew between open and flock; only a
            # lock on the file that is at the path now excludes the others.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        import datetime

        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": self.command,
            "since": datetime.datetime.now().isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        import fcntl

        try:
            os.ftruncate(self._fd, 0)
        except OSError:  # a read-only or full disk: the lock still goes with the descriptor
            pass
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _flock_briefly(fd: int, tries: int = 5, wait: float = 0.02) -> None:
    """An exclusive flock, retried for a moment: :func:`check_unlocked` holds a shared one
    for microseconds, which must not turn a writer away. A real holder is still refused
    within a tenth of a second."""
    import fcntl
    import time

    for i in range(tries):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if i == tries - 1:
                raise
            time.sleep(wait)


def check_unlocked(directory) -> None:
    """Refuse at once, without waiting or writing, if another process holds ``directory``'s lock:
    a command checks this before long work (collecting data) that the lock would then waste."""
    import fcntl

    path = Path(directory) / LOCK
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # no lock file (or none that can be read): nobody holds it
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _locked(directory, fd) from None
    finally:
        os.close(fd)


def _locked(directory, fd: int):
    """The error for a directory whose lock (open as ``fd``) another process holds."""
    from .errors import RunLockedError

    holder = _read_holder(fd)
    pid = holder.get("pid")
    who = f"pid {pid}" if pid else "another process"
    what = f" ({holder['command']}, since {holder['since']})" if "command" in holder else ""
    return RunLockedError(
        f"{Path(directory)}: in use by {who}{what}, which holds its lock {Path(directory) / LOCK};"
        " wait for it to finish, or write to another directory",
        pid=pid,
    )


def _read_holder(fd: int) -> dict:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        return info if isinstance(info, dict) else {}
    except (ValueError, OSError):
        return {}


class RunDirectory:
    """A directory whose files form one run, written by :class:`Transaction` s.

    Open it with :meth:`open` (takes the lock and finishes an interrupted commit)
    to write; read a finished run's files with :meth:`file`, which checks them
    against the manifest.
    """

    def __init__(self, path, lock: RunLock | None = None):
        self.path = Path(path)
        self.lock = lock

    @classmethod
    def open(cls, path, command: str = "pyro_worldmodel") -> RunDirectory:
        """Lock ``path`` for this process and recover it; use as a context manager.

        A directory this call creates is removed again at :meth:`close` if it is then
        still empty of a run and of staged files, so a refusal leaves nothing behind.
        """
        path = Path(path)
        created = not path.exists()
        lock = RunLock(path, command).acquire()
        run = cls(path, lock)
        run._created = created
        try:
            run.recover()
        except BaseException:
            run.close()
            raise
        return run

    def close(self) -> None:
        if self.lock is None or not self.lock.held:
            return
        if getattr(self, "_created", False) and not self.files and self.staged_transaction() is None:
            _remove_tree(self.staging)
            (self.path / LOCK).unlink(missing_ok=True)
            self.lock.release()
            try:
                self.path.rmdir()
            except OSError:  # something else appeared there
                pass
            return
        self.lock.release()

    def __enter__(self) -> RunDirectory:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- reading

    @property
    def staging(self) -> Path:
        """The folder of every command's staging area, ``.staging/<command>/``."""
        return self.path / STAGING

    def staging_of(self, command: str) -> Path:
        """Where ``command`` stages its files: each command has its own area, so that one
        command never discards what another left for a resume."""
        if not re.fullmatch(r"[a-z_]+", command):
            raise ValueError(f"command: expected a lower-case word, got {command!r}")
        return self.staging / command

    def manifest(self) -> dict | None:
        """The committed manifest, or None where nothing was committed. A directory written
        before manifests existed lists its files without checksums."""
        path = self.path / MANIFEST
        if path.exists():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (ValueError, OSError) as e:
                raise _run_error(f"{path}: expected a run manifest, got an unreadable file ({e})") from None
            if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
                raise _run_error(f"{path}: expected a {MANIFEST_FORMAT} manifest")
            if not isinstance(data.get("files"), dict):
                raise _run_error(f"{path}: the manifest lists no files")
            for name in data["files"]:
                _check_relative(name, path)
            return data
        legacy = self._legacy_files()
        if not legacy:
            return None
        return {"format": MANIFEST_FORMAT, "files": {name: None for name in legacy}, "legacy": True}

    def _legacy_files(self) -> list[str]:
        # Only the names pyro_worldmodel writes: a directory of other files is no run, and
        # nothing of a user's own is ever taken for one (and replaced).
        if not self.path.is_dir():
            return []
        names = [name for name in LEGACY_NAMES if (self.path / name).is_file()]
        figures = self.path / "figures"
        if figures.is_dir():
            names += [f"figures/{n}" for n in LEGACY_FIGURES if (figures / n).is_file()]
        return sorted(names)

    def pending(self) -> dict | None:
        """The manifest of a commit that passed its commit point but was not finished (a
        crash), or None. Any writer that opens the directory finishes it first."""
        for commit in sorted(self.staging.glob(f"*/{_COMMIT}")) if self.staging.is_dir() else []:
            try:
                return json.loads(commit.read_text(encoding="utf-8"))
            except (ValueError, OSError):
                continue
        return None

    @property
    def files(self) -> dict:
        """``{relative name: sha256 or None}`` of the committed run; empty if none."""
        m = self.manifest()
        return {} if m is None else dict(m["files"])

    def has(self, name: str) -> bool:
        return name in self.files

    def file(self, name: str, *, verify: bool = True) -> Path:
        """The path of a committed file, after checking it against the manifest."""
        files = self.files
        path = self.path / name
        if name not in files:
            if self.pending() is not None:
                raise _run_error(
                    f"{self.path}: a commit was interrupted; any pyro-worldmodel command that writes"
                    " here finishes it"
                )
            raise FileNotFoundError(f"{path}: no such file in the run")
        if verify and files[name] is not None:
            try:
                digest = sha256_of(path)
            except FileNotFoundError:
                raise _run_error(f"{path}: listed in {self.path / MANIFEST} but missing") from None
            if digest != files[name]:
                raise _run_error(
                    f"{path}: does not match the run's manifest {self.path / MANIFEST} (it was changed"
                    " after the run was written, or a commit was interrupted: any pyro-worldmodel"
                    " command that writes here finishes it)"
                )
        return path

    def verify(self) -> None:
        """Every file of the run is present and matches the manifest; raises otherwise."""
        for name in self.files:
            self.file(name)

    # ---- writing (with the lock held)

    def _require_lock(self):
        if self.lock is None or not self.lock.held:
            raise RuntimeError(f"{self.path}: open it with RunDirectory.open() to write")

    def recover(self) -> str | None:
        """Finish a commit that a crash interrupted, and remove leftovers of killed writers.

        :returns: ``"rolled forward"`` if an interrupted commit was finished, else None.
        """
        self._require_lock()
        done = None
        for commit in sorted(self.staging.glob(f"*/{_COMMIT}")) if self.staging.is_dir() else []:
            self._roll_forward(json.loads(commit.read_text(encoding="utf-8")), commit.parent)
            done = "rolled forward"
        # The run's own folders only: a subdirectory may be another run (compare/, loop/),
        # and --out may name a directory that holds a user's own files.
        for folder, recursive in ((self.path, False), (self.path / "figures", False), (self.staging, True)):
            if folder.is_dir():
                remove_stale_temporaries(folder, recursive=recursive)
        return done

    def _roll_forward(self, new: dict, area: Path) -> None:
        old = self.manifest()
        touched = {self.path}
        for name in new["files"]:
            staged = area / name
            if staged.exists():  # not yet moved
                target = self.path / name
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staged, target)
                touched.add(target.parent)
        for name in (old or {}).get("files", {}):
            if name not in new["files"]:
                try:
                    (self.path / name).unlink()
                    touched.add((self.path / name).parent)
                except FileNotFoundError:
                    pass
        for folder in touched:  # every rename durable before the manifest says it happened
            fsync_directory(folder)
        os.replace(area / _COMMIT, self.path / MANIFEST)
        fsync_directory(self.path)
        if new.get("replace"):  # what other commands staged belonged to the run now replaced
            _remove_tree(self.staging)
        else:
            _remove_tree(area)
            try:
                self.staging.rmdir()  # when no other command has anything staged
            except OSError:
                pass

    def staged_transaction(self, command: str | None = None) -> dict | None:
        """What an uncommitted transaction of ``command`` (by default, of any command) left
        staged: its ``command``, ``pid`` and ``started``; None if nothing."""
        areas = [self.staging_of(command)] if command else sorted(self.staging.glob("*"))
        for area in areas:
            info = area / _TXN
            if info.exists():
                try:
                    data = json.loads(info.read_text(encoding="utf-8"))
                    return data if isinstance(data, dict) else {}
                except (ValueError, OSError):
                    return {}
        return None

    def transaction(self, command: str, *, replace: bool = False, keep: tuple[str, ...] = ()) -> Transaction:
        """Begin writing a new version of the run.

        :param replace: the new run is only what this transaction writes: files of the old
            run it does not write again are removed at the commit.
        :param keep: files of an interrupted transaction of the same ``command`` to keep (a
            resumed training's checkpoint); everything else it staged is discarded.
        """
        self._require_lock()
        area = self.staging_of(command)
        if area.exists():
            for p in sorted(area.rglob("*"), reverse=True):
                relative = str(p.relative_to(area)).replace(os.sep, "/")
                if p.is_file() and relative not in keep and p.name != _TXN:
                    p.unlink()
        return Transaction(self, command, replace=replace)


class Transaction:
    """New files of a run, staged; :meth:`commit` makes them the run at once."""

    def __init__(self, run: RunDirectory, command: str, *, replace: bool = False):
        import datetime

        self.run, self.command, self.replace = run, command, replace
        self.area = run.staging_of(command)
        self.committed = False
        self.area.mkdir(parents=True, exist_ok=True)
        write_json(
            self.area / _TXN,
            {
                "command": command,
                "pid": os.getpid(),
                "started": datetime.datetime.now().isoformat(timespec="seconds"),
            },
        )

    def path(self, name: str) -> Path:
        """Where to stage the file ``name`` (relative to the run); its folder exists."""
        _check_relative(name, self.run.path)
        path = self.area / name
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def write(self, name: str, write) -> Path:
        """Stage ``name``: ``write(file)`` on a temporary file, renamed into the staging area."""
        path = self.path(name)
        atomic_write(path, write)
        return path

    def write_json(self, name: str, obj) -> Path:
        text = strict_json(obj).encode()
        return self.write(name, lambda f: f.write(text))

    def staged(self) -> list[str]:
        return sorted(
            str(p.relative_to(self.area)).replace(os.sep, "/")
            for p in self.area.rglob("*")
            if p.is_file() and p.name not in (_TXN, _COMMIT) and not p.name.endswith(_TMP_SUFFIX)
        )

    def commit(self, **info) -> dict:
        """Make the staged files the run, atomically; :returns: the new manifest."""
        import datetime

        self.run._require_lock()
        if self.committed:
            raise RuntimeError("this transaction was committed already")
        old = self.run.manifest() or {"files": {}}
        files = {} if self.replace else dict(old["files"])
        for name in self.staged():
            files[name] = sha256_of(self.area / name)
        for name, digest in list(files.items()):
            if digest is None:  # a file of a run written before manifests: checksum it now
                files[name] = sha256_of(self.run.path / name)
        manifest = {
            "format": MANIFEST_FORMAT,
            "command": self.command,
            "committed": datetime.datetime.now().isoformat(timespec="seconds"),
            "replace": self.replace,
            "files": dict(sorted(files.items())),
            **info,
        }
        write_json(self.area / _COMMIT, manifest)  # the commit point
        self.run._roll_forward(manifest, self.area)
        self.committed = True
        return manifest


def _check_relative(name: str, where) -> None:
    p = Path(name)
    if not name or p.is_absolute() or ".." in p.parts or name.startswith("."):
        raise _run_error(f"{where}: expected a relative file name inside the run, got {name!r}")


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def _run_error(message: str):
    from .errors import RunDirectoryError

    return RunDirectoryError(message)


def check_free_space(directory, needed: int, what: str) -> None:
    """Refuse to start when the file system of ``directory`` has less than ``needed`` bytes free."""
    import shutil

    directory = Path(directory)
    probe = directory
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise OSError(
            errno.ENOSPC,
            f"{what} needs about {_mib(needed)} and the file system of {probe} has {_mib(free)} free",
        )


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


# ---------------------------------------------------------------- checkpoints

CHECKPOINT_FORMAT = "pyro_worldmodel.checkpoint/1"


def save_checkpoint(path, model, guide, optim=None, **extra) -> Path:
    """Save model, guide and optimiser state to ``path``, atomically.

    The file is written beside ``path`` and renamed over it, so a crash
    leaves either the old file or the new one, never half of one. Optimiser
    state is stored by parameter name relative to its module, so it loads
    into a model whose param-store prefix differs. A state with a NaN or an
    infinity is refused (``DivergenceError``): it is never a good checkpoint.

    :param extra: further tensors, numbers, strings, lists and dicts to store.
    """
    path = Path(path)
    state = {
        "format": CHECKPOINT_FORMAT,
        "model": model.state_dict(),
        "guide": guide.state_dict(),
        "optim": _relative_optim_state(optim, model, guide) if optim is not None else None,
        "extra": extra,
    }
    bad = _nonfinite_entries({k: state[k] for k in ("model", "guide", "optim")})
    if bad:
        raise DivergenceError(
            f"checkpoint: refusing to write {path}: {bad[0]} holds a NaN or an infinity"
            + (f" (and {len(bad) - 1} more tensors)" if len(bad) > 1 else ""),
            step=extra.get("step", -1),
        )
    # Serialised in memory first: a full disk then fails in a plain write (OSError), not
    # inside torch's zip writer, which reports it as a RuntimeError.
    buffer = _io.BytesIO()
    torch.save(state, buffer)
    atomic_write(path, lambda f: f.write(buffer.getbuffer()))
    return path


def _nonfinite_entries(tree, prefix="") -> list[str]:
    """Dotted names of the floating tensors in nested dicts and lists that are not all finite."""
    if torch.is_tensor(tree):
        if tree.is_floating_point() or tree.is_complex():
            return [] if bool(tree.isfinite().all()) else [prefix or "a tensor"]
        return []
    if isinstance(tree, dict):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    else:
        return []
    out = []
    for k, v in items:
        out += _nonfinite_entries(v, f"{prefix}.{k}" if prefix else str(k))
    return out


def load_checkpoint(path, model, guide, optim=None) -> dict:
    """Load a :func:`save_checkpoint` file into ``model``, ``guide`` and ``optim``.

    Uses ``torch.load(weights_only=True)``: nothing but tensors and plain
    containers is ever unpickled. A checkpoint with a NaN or an infinity in
    its weights or optimiser state is refused.

    :returns: the ``extra`` entries that were saved.
    """
    device = next(model.parameters()).device
    state = read_checkpoint(path, map_location=device)
    bad = _nonfinite_entries({k: state[k] for k in ("model", "guide", "optim")})
    if bad:
        raise ValueError(f"path: {path} holds non-finite values (in {bad[0]}); it is not a good checkpoint")
    for key, module in (("model", model), ("guide", guide)):
        try:
            module.load_state_dict(state[key])
        except (RuntimeError, TypeError, AttributeError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{key}: the checkpoint's {key} does not fit this one: {first}") from None
    if optim is not None and state["optim"] is not None:
        try:
            optim.set_state(
                {
                    f"{owner.name}$$${rel}": value
                    for key, owner in (("model", model), ("guide", guide))
                    for rel, value in state["optim"][key].items()
                }
            )
        except (KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"path: {path} holds an optimiser state that does not fit ({e!r})") from None
    return state["extra"]


def read_checkpoint(path, map_location="cpu") -> dict:
    """The contents of a :func:`save_checkpoint` file, checked for its format.

    ``torch.load(weights_only=True)``: a file that needs anything else to load (a
    pickled object, which could run code) is refused, not retried unsafely.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"path: expected a checkpoint file, got the directory {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as e:
        # torch's own message suggests weights_only=False, which would run the file's code.
        kind = (
            "holds objects other than tensors and plain containers"
            if _is_unpickling(e)
            else "is truncated or corrupted"
        )
        raise ValueError(f"path: {path} is not a readable pyro_worldmodel checkpoint: it {kind}") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"path: expected a {CHECKPOINT_FORMAT} file, got {path}")
    missing = [k for k in ("model", "guide", "optim", "extra") if k not in state]
    if missing or not isinstance(state["model"], dict) or not isinstance(state["guide"], dict):
        raise ValueError(
            f"path: {path} is an incomplete {CHECKPOINT_FORMAT} file (lacks {missing or 'weights'})"
        )
    if not isinstance(state["extra"], dict):
        raise ValueError(f"path: {path} has a malformed 'extra' entry")
    return state


def _is_unpickling(e: Exception) -> bool:
    import pickle

    return isinstance(e, pickle.UnpicklingError) or "weights_only" in str(e)


def _relative_optim_state(optim, model, guide):
    # Keyed by the parameter objects, not by param-store names, so a cleared
    # store (pyro.clear_param_store() in a notebook) loses nothing.
    owners = {
        id(p): (key, rel)
        for key, owner in (("model", model), ("guide", guide))
        for rel, p in owner.named_parameters()
    }
    out = {"model": {}, "guide": {}}
    for param, optimizer in optim.optim_objs.items():
        if id(param) in owners:
            key, rel = owners[id(param)]
            out[key][rel] = _get_state_dict(optimizer)
    # Sorted: Pyro creates an optimiser per parameter in the order of a set, which varies
    # between processes, and the same state should make the same file.
    return {key: dict(sorted(states.items())) for key, states in out.items()}
