"""The ``pyro-worldmodel`` command in a child process that a test can kill at any instant.

Children are forked from a server that has imported the package once, so a
run starts in milliseconds instead of the second or two that importing torch
takes; each still runs ``main(argv)`` in its own process, as the console
script does, and dies as a process dies (SIGKILL: no handler, no cleanup).

``faults`` inject what a test cannot otherwise time: a SIGKILL at the k-th
rename of a file (the instants where a run directory changes), or an
``OSError`` (a full or read-only disk) at the k-th fsync.
"""

from __future__ import annotations

import errno
import multiprocessing
import os
import signal
import sys
from pathlib import Path

_CONTEXT = None
_REPLACE, _FSYNC = os.replace, os.fsync  # the real ones: faults patch the module's


def context():
    """A forkserver context whose server has imported the command's modules."""
    global _CONTEXT
    if _CONTEXT is None:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(["pyro_worldmodel.cli", "pyro_worldmodel.loop", "clichild"])
        _CONTEXT = ctx
    return _CONTEXT


def _child(argv, log, faults, cwd):
    """Runs in the child: redirect output to ``log``, inject faults, run the command, exit."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.chdir(cwd)
    sys.stdout = os.fdopen(1, "w", buffering=1)
    sys.stderr = os.fdopen(2, "w", buffering=1)
    _inject(faults or {})
    from pyro_worldmodel.cli import main

    try:
        rc = main([str(a) for a in argv])
        if "count_renames" in (faults or {}):
            Path(faults["count_renames"]).write_text(str(_renames[0]))
    except SystemExit as e:  # argparse
        rc = e.code if isinstance(e.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
        rc = 1
    sys.stdout.flush()
    sys.stderr.flush()
    _record(log, rc)
    os._exit(rc)


def _record(log: str, rc: int) -> None:
    """Write the exit code beside the log, atomically. Under load the forkserver can lose a
    child's status and report 255 for a process that exited normally (CPython issue 140867);
    the parent then reads the code the child recorded."""
    tmp = f"{log}.rc.tmp"
    with open(tmp, "w") as f:
        f.write(str(rc))
        f.flush()
        _FSYNC(f.fileno())
    _REPLACE(tmp, f"{log}.rc")


_renames = [0]


def _inject(faults: dict) -> None:
    if "kill_at_rename" in faults or "count_renames" in faults:
        real = os.replace

        def replace(src, dst, **kw):
            _renames[0] += 1
            if _renames[0] == faults.get("kill_at_rename"):
                os.kill(os.getpid(), signal.SIGKILL)
            return real(src, dst, **kw)

        os.replace = replace
    if "nan_after_update" in faults:  # a blow-up in the optimiser's k-th update, as training can have
        import pyro.optim.optim
        import torch

        real_call, updates = pyro.optim.optim.PyroOptim.__call__, [0]

        def call(self, params, *args, **kwargs):
            real_call(self, params, *args, **kwargs)
            updates[0] += 1
            if updates[0] == faults["nan_after_update"]:
                with torch.no_grad():
                    for p in params:
                        p.fill_(float("nan"))

        pyro.optim.optim.PyroOptim.__call__ = call
    if "fail_at_fsync" in faults:
        real_fsync, count_fsync = os.fsync, [0]
        code = {"full": errno.ENOSPC, "read-only": errno.EROFS}[faults.get("disk", "full")]

        def fsync(fd):
            count_fsync[0] += 1
            if count_fsync[0] >= faults["fail_at_fsync"]:
                raise OSError(code, os.strerror(code))
            return real_fsync(fd)

        os.fsync = fsync


class Child:
    """One command running in a child process."""

    def __init__(self, argv, log: Path, *, faults: dict | None = None, cwd: Path | None = None):
        self.log = Path(log)
        self.recorded = Path(f"{log}.rc")
        self.recorded.unlink(missing_ok=True)
        self.process = context().Process(
            target=_child, args=(list(map(str, argv)), str(log), faults, str(cwd or os.getcwd()))
        )
        self.process.start()

    def wait(self, timeout: float = 300) -> int:
        self.process.join(timeout)
        if self.process.exitcode is None:
            self.kill()
            raise TimeoutError(f"{self.log}: still running after {timeout} s")
        if self.process.exitcode == 255 and self.recorded.exists():
            return int(self.recorded.read_text())  # the status the forkserver lost
        return self.process.exitcode

    def kill(self) -> None:
        """SIGKILL, as ``kill -9`` sends."""
        if self.process.exitcode is None:
            try:
                os.kill(self.process.pid, signal.SIGKILL)
            except ProcessLookupError:  # it ended on its own just now
                pass
        self.process.join()

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def run(argv, log: Path, **kw) -> tuple[int, str]:
    """Run to the end: ``(exit code, output)``."""
    child = Child(argv, log, **kw)
    rc = child.wait()
    return rc, child.output
