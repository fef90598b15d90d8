"""Freed buffers kept for the next tensor instead of handed back to the kernel.

A merge allocates and frees buffers of the same sizes tensor after tensor: inputs, sort
keys, outputs. glibc's malloc maps each block above 32 MiB afresh and unmaps it when freed,
and gives each thread an arena of its own whose freed pages go back too, so every tensor
pays again for page faults and for the kernel zeroing fresh pages (a 4 × 0.54 B ties merge
here: 1.2 M page faults). Told to serve every block from one heap and to keep what is
freed, a merging process faults in little more than its peak (0.43 M faults, a third of
the system time; peak RSS stays near 2 GB).
After a merge the kept memory is handed back (``return_freed_memory``), so what runs next
(an evaluation) starts from what is in use.

Only glibc has these knobs; elsewhere both calls do nothing. They change the whole process,
so they are called where a process starts to merge (the CLI, a worker process, a shard's
flow run), not by the library's functions.
"""

from __future__ import annotations

import atexit
import ctypes
import ctypes.util
import functools
import gc
import platform

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_KEEP_UP_TO = 2**31 - 1
"""Free memory at the heap's top above this is still returned (mallopt takes a C int)."""


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def keep_freed_memory() -> bool:
    """From now on, large blocks come from one heap and freed ones stay for reuse: one arena
    for all threads, no block mapped on its own, no automatic trim. Call it before the
    process starts its threads (an arena a thread already has stays its own). Also has the
    process skip the collector's walk at exit (``freeze_objects_at_exit``). Returns whether
    the allocator took the settings."""
    freeze_objects_at_exit()
    libc = _glibc()
    if libc is None:
        return False
    settings = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _KEEP_UP_TO))
    return all(libc.mallopt(option, value) == 1 for option, value in settings)


def return_freed_memory() -> None:
    """Hand the memory freed so far back to the kernel (``malloc_trim``)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


@functools.cache
def freeze_objects_at_exit() -> None:
    """At interpreter exit, after the exit handlers, move every object out of the garbage
    collector's reach: the shutdown would otherwise walk all of torch's and numba's objects
    several times over (1-3 s per process here, a shard pod's included). Nothing a finished
    process needs is left to collect; objects are still released as modules are torn down."""
    atexit.register(gc.freeze)


__all__ = ["freeze_objects_at_exit", "keep_freed_memory", "return_freed_memory"]
