"""Memory budgets: the default limit, sizes given as text, and this process's peak RSS."""

from __future__ import annotations

import ctypes
import os
import resource
import sys

DEFAULT_FRACTION = 0.5  # of the machine's physical memory


def physical_memory() -> int:
    """Bytes of physical memory of this machine."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_memory_limit(fraction: float = DEFAULT_FRACTION) -> int:
    """``fraction`` of the machine's physical memory, in bytes."""
    return int(fraction * physical_memory())


def parse_size(value) -> int:
    """``'4GB'``, ``'500MB'``, ``'3e9'`` or an int -> bytes (decimal units)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        size = int(value)
    else:
        units = {"kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
        low = str(value).strip().lower()
        factor = next((f for u, f in units.items() if low.endswith(u)), 1)
        number = low[:-2] if factor != 1 else low
        try:
            size = int(float(number) * factor)
        except ValueError:
            raise ValueError(f"memory limit {value!r} is not a size: give bytes or e.g. '4GB', '500MB'") from None
    if size <= 0:
        raise ValueError(f"memory limit must be positive, got {value!r}")
    return size


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def cap_mmap_threshold(size: int = 1 << 20) -> bool:
    """glibc only: serve every allocation of ``size`` bytes or more with its own mmap, so
    freeing it returns the memory to the OS (process-wide; idempotent).

    By default glibc raises this threshold up to 32 MB after large frees, and arrays below
    it then live in per-thread arenas that keep freed pages: worker threads handling one
    10k-row cluster after another (SemDeDup) grew the resident set by ~10 MB per cluster
    (2e6 rows, 200 clusters: +1.06 GB; with the cap: +0). Returns whether it was applied.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, int(size)))
    except (OSError, AttributeError):  # not glibc
        return False


M_MMAP_THRESHOLD = -3  # mallopt parameter number (malloc.h)
