"""Worker processes that end with their parent.

A ``ProcessPoolExecutor`` worker blocks on its task queue; when the parent is killed with
SIGKILL (an out-of-memory kill, ``kill -9`` of a stuck ``ingest``) nothing tells the worker, and
it lives on, holding memory and open files. :func:`die_with_parent`, run as the pool's
``initializer``, asks Linux to send the worker SIGKILL when its parent dies
(``PR_SET_PDEATHSIG``); elsewhere it does nothing (macOS and Windows have no such call).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
from concurrent.futures import ProcessPoolExecutor

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int | None = None) -> None:
    """Pool initializer: SIGKILL this process when its parent ends (Linux)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if parent is not None and os.getppid() != parent:  # the parent died before the call
        os._exit(1)


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """A process pool whose workers die with this process."""
    return ProcessPoolExecutor(
        max_workers=workers, initializer=die_with_parent, initargs=(os.getpid(),)
    )


__all__ = ["die_with_parent", "worker_pool"]
