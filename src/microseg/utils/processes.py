"""Worker processes that end with their parent.

A ``ProcessPoolExecutor`` worker blocks on its task queue; when the parent is killed with
SIGKILL (an out-of-memory kill, ``kill -9`` of a stuck ``ingest``) nothing tells the worker, and
it lives on, holding memory and open files. :func:`die_with_parent`, run as the pool's
``initializer``, asks Linux to send the worker SIGKILL when its parent dies
(``PR_SET_PDEATHSIG``); elsewhere it does nothing (macOS and Windows have no such call).

:func:`identity` and :func:`is_running` answer "is the process that wrote this record still
alive?" for records a killed process leaves behind (an MLflow run left RUNNING): a pid alone is
not enough, since pids are reused, so the identity adds the process's start time, the boot it
ran in and its pid namespace (two containers on one kernel share pids but not namespaces).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import socket
import sys
from collections.abc import Mapping
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


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def _start_time(pid: int) -> str:
    """Clock ticks after boot at which ``pid`` started (Linux ``/proc``; "" elsewhere)."""
    stat = _read(f"/proc/{pid}/stat")
    # the command name (field 2) may hold spaces and parentheses: fields after its last ")"
    fields = stat.rpartition(")")[2].split()
    return fields[19] if len(fields) > 19 else ""


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def identity(pid: int | None = None) -> dict[str, str]:
    """Who this process is, as strings (for tags): host, boot id, pid namespace, pid, start."""
    pid = os.getpid() if pid is None else pid
    return {
        "host": socket.gethostname(),
        "boot": _read("/proc/sys/kernel/random/boot_id"),
        "pidns": _pid_namespace(),
        "pid": str(pid),
        "start": _start_time(pid),
    }


def is_running(other: Mapping[str, str]) -> bool | None:
    """Whether the process ``other`` (an :func:`identity`) still runs: None when this process
    cannot tell (another machine, boot or pid namespace, or a record without a pid)."""
    me = identity()
    if any(other.get(k, "") != me[k] for k in ("host", "boot", "pidns")):
        return None
    try:
        pid = int(other.get("pid", ""))
    except ValueError:
        return None
    if pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process with that pid: alive, maybe not ours
        pass
    start = other.get("start", "")
    return not start or _start_time(pid) in ("", start)


__all__ = ["die_with_parent", "identity", "is_running", "worker_pool"]
