"""``MemoryUsage``: peak memory per epoch, in the logs."""

from __future__ import annotations

import resource
import sys
from typing import Any

import jax

from hkfit.callbacks.base import Callback

_MB = 1024 * 1024


def device_peak_bytes(devices: Any = None) -> int | None:
    """The largest ``peak_bytes_in_use`` over ``devices`` (local ones by default).

    None when the backend reports no memory statistics (the CPU backend).
    """
    peaks = []
    for device in devices if devices is not None else jax.local_devices():
        stats = device.memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    return max(peaks) if peaks else None


def _reset_rss_peak() -> bool:
    """Restarts the kernel's peak-RSS counter (Linux); whether it could."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_peak_bytes() -> int:
    """The process's peak resident memory: since the last reset on Linux, else ever."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


class MemoryUsage(Callback):
    """Adds each epoch's peak memory, in MiB, to its logs (and so to History and the bar).

    * ``device_peak_mb``: the largest ``peak_bytes_in_use`` of the local devices, where the
      backend reports it (GPUs, TPUs). XLA keeps this peak over the process's life, so it
      is the peak up to the end of that epoch.
    * ``rss_peak_mb``: the process's peak resident memory during the epoch (Linux; on other
      systems, its peak so far). Always logged: on CPU it is where the arrays live.

    >>> import hkfit
    >>> hkfit.callbacks.MemoryUsage().wants_batch_logs()  # no per-batch device sync
    False
    """

    def on_epoch_begin(self, epoch, logs=None):
        _reset_rss_peak()

    def on_epoch_end(self, epoch, logs=None):
        if logs is None:
            return
        peak = device_peak_bytes()
        if peak is not None:
            logs["device_peak_mb"] = peak / _MB
        logs["rss_peak_mb"] = rss_peak_bytes() / _MB
