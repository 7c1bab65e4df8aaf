"""One ``promote`` of a registered model at a time, across processes and machines.

Promoting reads the champion, decides, moves the alias and appends a numbered history tag.
Two promotions of one model interleaved would both record the same previous champion and
write the same ``champion_history.<NNNN>`` key (one event lost). MLflow has no
compare-and-swap, so the decision runs under a lock held where the registry lives:

* SQLite store (``sqlite:///path``) or file store: a lock file in ``.microseg-locks/`` beside
  it (``filelock``: an OS lock, released when the process dies, so a killed ``promote`` never
  wedges the next);
* PostgreSQL store: a session-level ``pg_advisory_lock`` on the same database (released when
  the connection closes, by a crash too), so promotions from several machines serialise;
* an MLflow server (``http(s)://``): its database is out of reach. ``promote`` then relies on
  re-reading the champion just before moving the alias (:func:`microseg.registry.promotion.
  promote`), and the team runs promotions from one CI job (a workflow ``concurrency`` group).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from microseg.errors import MicrosegError

log = logging.getLogger(__name__)

#: seconds a promotion waits for another one of the same model before giving up
TIMEOUT_S = 120.0
_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def registry_uri(client: Any) -> str:
    """The registry URI ``client`` talks to (the tracking URI unless one was set apart)."""
    return str(getattr(client, "_registry_uri", None) or client.tracking_uri)


def lock_kind(uri: str) -> str:
    """``file`` (SQLite or file store), ``postgresql`` or ``none`` (a server, or unknown)."""
    if "://" not in uri:  # a plain path is a file store; ``databricks`` names a server
        return "none" if uri.startswith("databricks") else "file"
    scheme = uri.split(":", 1)[0].split("+", 1)[0].lower()
    if scheme in ("sqlite", "file"):
        return "file"
    if scheme in ("postgresql", "postgres"):
        return "postgresql"
    return "none"


def _lock_file(uri: str, name: str) -> Path:
    """``.microseg-locks/promote-<name>.lock`` beside the SQLite file or file store."""
    if uri.startswith("sqlite:///"):
        base = Path(uri[len("sqlite:///") :])
    else:
        base = Path(uri.removeprefix("file://")).expanduser()
    folder = base.parent / ".microseg-locks"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"promote-{_SAFE.sub('_', name)}.lock"


def advisory_key(name: str) -> int:
    """A stable signed 64-bit key for ``pg_advisory_lock`` from the model name."""
    digest = hashlib.sha256(f"microseg-promote:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


@contextlib.contextmanager
def _file_lock(uri: str, name: str, timeout: float) -> Iterator[None]:
    from filelock import FileLock, Timeout

    path = _lock_file(uri, name)
    try:
        with FileLock(str(path), timeout=timeout):
            yield
    except Timeout as exc:
        raise MicrosegError(
            f"another promote of {name!r} has held the registry lock for {timeout:.0f} s; "
            "wait for it to finish (a killed one releases the lock when its process ends)",
            path,
        ) from exc


@contextlib.contextmanager
def _pg_lock(uri: str, name: str, timeout: float) -> Iterator[None]:
    from sqlalchemy import create_engine, text
    from sqlalchemy.pool import NullPool

    engine = create_engine(uri, poolclass=NullPool)
    key = advisory_key(name)
    try:
        with engine.connect() as conn:
            deadline = time.monotonic() + timeout
            while not conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key}).scalar():
                if time.monotonic() > deadline:
                    raise MicrosegError(
                        f"another promote of {name!r} has held the PostgreSQL advisory lock "
                        f"{key} for {timeout:.0f} s; wait for it to finish"
                    )
                time.sleep(0.2)
            try:
                yield
            finally:
                conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
    finally:
        engine.dispose()


@contextlib.contextmanager
def promotion_lock(client: Any, name: str, timeout: float = TIMEOUT_S) -> Iterator[str]:
    """Hold the registry's promotion lock of ``name``; yields the lock kind used."""
    uri = registry_uri(client)
    kind = lock_kind(uri)
    if kind == "file":
        with _file_lock(uri, name, timeout):
            yield kind
    elif kind == "postgresql":
        with _pg_lock(uri, name, timeout):
            yield kind
    else:
        log.debug("no lock for %s: %s has no database this process can reach", name, uri)
        yield kind


__all__ = ["TIMEOUT_S", "advisory_key", "lock_kind", "promotion_lock", "registry_uri"]
