"""glibc malloc settings for CPU inference: freed tensor memory stays in the process for reuse.

PyTorch on CPU allocates and frees the same multi-megabyte activation buffers for every layer of
every slice. With glibc's defaults a block above 128 KiB is an ``mmap`` of its own (and a freed heap
top above 128 KiB is trimmed), so every new buffer is fresh zeroed pages from the kernel: one
LiteMedSAM encode on 2 cores took ~2 million page faults and a third of its time in the kernel.
Raising both thresholds keeps those blocks for reuse: 1.63 -> 1.15 s per slice, side by side in
one run (``ragseg bench litemedsam`` prints both). That holds for the main arena only: a thread's
own arena gives a heap back whole once it is free, whatever the thresholds, so the server's worker
threads still re-faulted (1.59 s per slice in a thread); one arena for every thread (the arena
limit) gives them the same reuse (1.19 s). The cost: up to the trim threshold of freed memory stays
mapped to the process, and threads share one malloc lock (held for microseconds per tensor; the
model work between allocations is milliseconds). The same reason has PyTorch's CPU tuning guide
recommend jemalloc or tcmalloc; this needs neither.

Applied once when :mod:`ragseg` is imported (CLI, server, Ray actors, tests). Set
``RAGSEG_MALLOC_TUNE=0`` to keep glibc's defaults; ``MALLOC_*_`` environment variables, where set,
are left to glibc.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

from . import defaults

logger = logging.getLogger(__name__)

# mallopt(3) parameter numbers (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
GLIBC_DEFAULT_THRESHOLD = 128 * 1024  # both thresholds' initial value in glibc

_libc: ctypes.CDLL | None = None
active = False  # whether tune() set the thresholds in this process


def _mallopt(param: int, value: int) -> bool:
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL("libc.so.6")
    return bool(_libc.mallopt(param, value))


def set_thresholds(trim: int, mmap: int, arenas: int | None = None) -> bool:
    """Set glibc's trim and mmap thresholds (bytes) and, if given, its arena limit; False where
    this is not glibc or it refused one."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        ok = _mallopt(M_TRIM_THRESHOLD, trim) and _mallopt(M_MMAP_THRESHOLD, mmap)
        return ok and (arenas is None or _mallopt(M_ARENA_MAX, arenas))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt to speak of)
        return False


def tune() -> bool:
    """Apply :data:`defaults.MALLOC_TRIM_THRESHOLD`, :data:`defaults.MALLOC_MMAP_THRESHOLD` and
    :data:`defaults.MALLOC_ARENA_MAX` unless opted out (``RAGSEG_MALLOC_TUNE=0``) or the environment
    sets glibc's own variables. Threads that already have an arena keep it: call this early."""
    if os.environ.get("RAGSEG_MALLOC_TUNE", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    if any(k in os.environ for k in ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_ARENA_MAX")):
        return False
    global active
    active = set_thresholds(defaults.MALLOC_TRIM_THRESHOLD, defaults.MALLOC_MMAP_THRESHOLD,
                            defaults.MALLOC_ARENA_MAX)
    if not active:
        logger.debug("malloc thresholds not set (not glibc?)")
    return active
