"""A child process that must not outlive the process that started it.

Linux's ``PR_SET_PDEATHSIG`` has the kernel signal the child when its parent dies, however
it dies (SIGKILL, the OOM killer), which no exit handler of the parent can do. The signal
comes when the *thread* that started the child ends, so the parent starts such children
from a thread that lives as long as they should (the main thread).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys

_PR_SET_PDEATHSIG = 1


def exit_with_parent(parent: int, sig: int = signal.SIGTERM) -> bool:
    """Have the kernel send ``sig`` to this process when ``parent`` dies, and exit at once if
    it already has. Returns whether the kernel took the request (Linux only)."""
    taken = False
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # no prctl in this libc
            taken = ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) == 0
    if os.getppid() != parent:  # the parent died before the kernel was asked
        os._exit(1)
    return taken


__all__ = ["exit_with_parent"]
