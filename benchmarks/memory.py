"""Peak memory of one measured cell.

Each method runs in its own interpreter (see ``benchmarks.worker``); inside it, the peak of
one generation is read from the kernel's high-water mark of resident memory (``VmHWM``),
which Linux lets a process reset by writing ``5`` to ``/proc/self/clear_refs``. After a
reset the mark equals the current resident size, so a cell's peak includes the weights and
everything the process already holds: it is the memory a server needs while generating.
Elsewhere (no ``/proc``) the cell peak falls back to the process peak of ``getrusage``.

Example:
    >>> tracker = PeakMemory()
    >>> tracker.reset()
    >>> tracker.peak_rss_mb() > 0
    True
"""

from __future__ import annotations

import resource
import sys
from pathlib import Path

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def process_peak_rss_mb() -> float:
    """The peak resident memory of this process since it started, in MiB (``getrusage``)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def _status_kib(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss_mb() -> float | None:
    """Resident memory now, in MiB (None where ``/proc`` is missing)."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib / 1024


class PeakMemory:
    """Resettable peak of resident memory (and of CUDA memory when a CUDA device is used)."""

    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device
        self._resettable = _CLEAR_REFS.exists() and _status_kib("VmHWM") is not None

    @property
    def resettable(self) -> bool:
        """Whether per-cell peaks are exact (Linux) or fall back to the process peak."""
        return self._resettable

    def reset(self) -> None:
        """Start a new measurement window."""
        if self._resettable:
            try:
                _CLEAR_REFS.write_text("5")
            except OSError:
                self._resettable = False
        if self._on_cuda():
            torch.cuda.reset_peak_memory_stats(self.device)

    def peak_rss_mb(self) -> float:
        """Peak resident memory since the last :meth:`reset`, in MiB."""
        if self._resettable:
            kib = _status_kib("VmHWM")
            if kib is not None:
                return kib / 1024
        return process_peak_rss_mb()

    def peak_gpu_mb(self) -> float | None:
        """Peak CUDA memory allocated by torch since the last :meth:`reset` (None off CUDA)."""
        if not self._on_cuda():
            return None
        return torch.cuda.max_memory_allocated(self.device) / (1024 * 1024)

    def _on_cuda(self) -> bool:
        return self.device is not None and self.device.type == "cuda" and torch.cuda.is_available()
