"""Named errors for what a user can fix.

Bad arguments and bad data raise :class:`ValueError` (or a subclass) whose
message names the argument, what was expected and what was given. The
classes here name the other ways a run can fail without a bug: the
``pyro-worldmodel`` command prints each as one line and exits with status 2.
"""

from __future__ import annotations


class WorldModelError(Exception):
    """Base class of the package's named errors."""


class RunLockedError(WorldModelError):
    """Another process is writing the run directory; ``pid`` is that process, if known."""

    def __init__(self, message: str, pid: int | None = None):
        super().__init__(message)
        self.pid = pid


class RunDirectoryError(WorldModelError, ValueError):
    """A run directory is not what the command needs: incomplete, of another kind,
    or holding a finished run that would be replaced without ``--overwrite``."""


class DivergenceError(WorldModelError, FloatingPointError):
    """Training met a non-finite loss, gradient or parameter.

    :ivar step: the SVI step at which it happened.
    :ivar checkpoint: the last good checkpoint on disk, or None if none was written.
    """

    def __init__(self, message: str, step: int, checkpoint=None):
        super().__init__(message)
        self.step = step
        self.checkpoint = checkpoint
