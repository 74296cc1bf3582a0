"""Peak memory of a piece of work, on the CPU or a GPU.

:class:`PeakMemory` measures the largest total size of the tensors that the
work allocates and that are alive at once. On CUDA it is
``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, less
what was allocated when the work began. On the CPU it is the allocation and
free events of ``torch.profiler`` (``profile_memory=True``) in time order,
summed cumulatively: frees of tensors made before the work are not reported,
so the figure is the peak of the work's own allocations. Other devices give NaN.
Used by :func:`~pyro_worldmodel.compare.compare_estimators` and
``benchmarks/svi_step.py``; ``tests/test_compare.py`` checks it against
allocations of known size.
"""

from __future__ import annotations

import math
import os
import sys

import torch


def peak_memory(fn, device="cpu") -> float:
    """Call ``fn()`` and return the peak memory it allocated, in bytes (NaN where not measurable)."""
    probe = PeakMemory(device)
    probe.start()
    try:
        fn()
    finally:
        peak = probe.stop()
    return peak


class PeakMemory:
    """Peak bytes of tensors allocated between :meth:`start` and :meth:`stop` and alive at once."""

    def __init__(self, device):
        self.device = torch.device(device)
        self.running = False
        self._prof = None
        self._base = 0

    @staticmethod
    def describe(device) -> str:
        kind = torch.device(device).type
        if kind == "cuda":
            return "torch.cuda.max_memory_allocated during the step, less the memory allocated at its start"
        if kind == "cpu":
            return "peak of the cumulative sum of torch.profiler's allocation and free events during the step"
        return f"not measured on {kind}"

    def start(self) -> None:
        self.running = True
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif self.device.type == "cpu":
            from torch.profiler import ProfilerActivity, profile

            self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            # Kineto prints a line at start and stop, and c10 one when a tensor made before
            # the start is freed; they go to file descriptor 2, muted until stop().
            self._muted = _mute_stderr()
            self._prof.start()

    def stop(self) -> float:
        self.running = False
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return float(torch.cuda.max_memory_allocated(self.device) - self._base)
        if self.device.type != "cpu":
            return math.nan
        try:
            self._prof.stop()
        finally:
            _unmute_stderr(self._muted)
        try:
            from torch._C._profiler import _EventType

            events = []
            stack = list(self._prof.profiler.kineto_results.experimental_event_tree())
            while stack:
                node = stack.pop()
                stack.extend(node.children)
                fields = node.extra_fields
                if node.tag == _EventType.Allocation and fields.device.type == "cpu":
                    events.append((node.start_time_ns, fields.alloc_size, fields.ptr))
        except (AttributeError, ImportError, RuntimeError):  # a torch without this profiler API
            return math.nan
        # Only blocks allocated in this stretch count: the profiler also reports frees of
        # blocks it saw allocated in an earlier profiling session.
        live, own, peak = 0, {}, 0
        for _, size, ptr in sorted(events, key=lambda e: (e[0], e[1] < 0)):
            if size > 0:
                own[ptr] = size
                live += size
            elif ptr in own:
                live -= own.pop(ptr)
            peak = max(peak, live)
        return float(peak)


def _mute_stderr() -> int | None:
    """Point file descriptor 2 at /dev/null; :returns: a copy of the old one, for :func:`_unmute_stderr`."""
    sys.stderr.flush()
    try:
        saved = os.dup(2)
        devnull = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return None
    os.dup2(devnull, 2)
    os.close(devnull)
    return saved


def _unmute_stderr(saved: int | None) -> None:
    if saved is not None:
        os.dup2(saved, 2)
        os.close(saved)
