"""Memory measurement: peak resident set size and device peak, resettable between phases.

torch is imported only for CUDA queries, so that sizing on a CPU (`subspec plan`) runs without it.
"""

from __future__ import annotations

import ctypes
import resource
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def reset_peak_rss() -> None:
    """Reset the kernel's high-water mark so loading does not count toward generation's peak."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        pass  # not Linux, or not permitted: the peak then covers the whole process


def peak_rss_bytes() -> int:
    """Peak resident set size since the last reset (VmHWM), in bytes."""
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    """Resident set size now, in bytes."""
    for line in _STATUS.read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc keeps it otherwise: measured ~0.4 GB of
    loading temporaries still counted in RSS for the 1.5B model)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc


def fast_memory_budget(budget: int | None, device: torch.device) -> int | None:
    """The budget to plan for: `budget`, or on a CUDA device without one, the memory free on
    it now (None on CPU: no limit)."""
    if budget is None and device.type == "cuda":
        import torch

        return torch.cuda.mem_get_info(device)[0]
    return budget


def reset_device_peak(device: torch.device) -> None:
    """Reset the CUDA allocator's high-water mark (nothing to do on CPU)."""
    if device.type == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats(device)


def device_peak_bytes(device: torch.device) -> int | None:
    """Peak bytes torch allocated on a CUDA device since the last reset; None on CPU (host
    RSS there is the fast tier, and on CUDA RSS includes the whole pinned slow tier)."""
    if device.type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(device)
    return None


def available_bytes(device: str = "cpu") -> int:
    """Fast memory free now: MemAvailable on CPU, torch.cuda.mem_get_info on CUDA."""
    if device.startswith("cuda"):
        import torch

        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


AUTO_MARGIN_FRACTION = 0.10  # --memory-budget auto keeps 10% of the free memory free ...
AUTO_MARGIN_MIN = 1 << 30  # ... and at least 1 GiB, for the process, the OS and page cache


def auto_margin(free: int) -> int:
    """What `--memory-budget auto` leaves free out of `free` bytes."""
    return max(int(free * AUTO_MARGIN_FRACTION), AUTO_MARGIN_MIN)


def auto_budget(device: str = "cpu") -> int:
    """The budget `--memory-budget auto` stands for: free memory minus `auto_margin`."""
    free = available_bytes(device)
    return max(free - auto_margin(free), 0)
