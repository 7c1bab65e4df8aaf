"""Atomic outputs: write to a temporary sibling, then rename.

A killed stage never leaves a half-written file or folder behind, which is what lets DVC
and our own resume logic trust whatever exists on disk.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    system or file system cannot."""
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn(_AT_FDCWD, bytes(a), _AT_FDCWD, bytes(b), _RENAME_EXCHANGE) == 0


def _replace_dir(tmp: Path, path: Path) -> None:
    """Put folder ``tmp`` at ``path`` without a moment where neither exists whole: swap the
    two atomically, then delete the old one. Without an atomic swap the old folder is renamed
    aside first (a kill between the renames leaves it there, complete, not half-deleted)."""
    if _exchange(tmp, path):
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = tmp.with_name(tmp.name.replace(".tmp", ".old", 1))
    os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale(path: Path) -> None:
    """Temporary siblings of ``path`` left by a process that was killed (its pid is in the
    name and no longer runs): a killed stage must not leave them behind forever."""
    for p in path.parent.glob(f".{path.stem}.*.tmp{path.suffix}"):
        parts = p.name[len(path.stem) + 2 :].split(".")
        if parts and parts[0].isdigit() and not _pid_alive(int(parts[0])):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it onto ``path`` only on success.

    Works for files and folders alike (write whatever you like at the yielded path). A folder
    that exists is swapped out in one step, so a kill at any moment leaves either the old or the
    new folder whole. The suffix is kept so that writers that dispatch on it (tifffile, pandas)
    still work; the temporary name carries the pid, so that leftovers of a killed run are
    removed by the next write of the same path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path)
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{path.stem}.{os.getpid()}.", suffix=f".tmp{path.suffix}", dir=path.parent
    )
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.unlink()
    try:
        yield tmp
        if path.is_dir() and not path.is_symlink() and tmp.is_dir():
            _replace_dir(tmp, path)
        else:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def write_text(path: str | Path, text: str) -> None:
    """Atomically write a text file."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Atomically write a binary file."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_torch(path: str | Path, obj: Any) -> None:
    """``torch.save(obj)`` to ``path`` atomically, with the same bytes for the same ``obj``.

    torch names the folder inside its zip archive after the file it writes to; saving to the
    temporary file of :func:`atomic_path` would put that random name into the bytes (and into
    every DVC hash). Serialised in memory the archive is always named ``archive``.
    """
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes(path, buffer.getvalue())
