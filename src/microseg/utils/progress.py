"""Whether progress bars are drawn: on a terminal yes, in DVC, CI and redirected logs no.

A bar redrawn with carriage returns is one unreadable line in a log file, so a bar is drawn
only where a person watches: the stream it writes to is a terminal. ``MICROSEG_PROGRESS=1``
forces bars on (``0``: off); else a non-empty ``TQDM_DISABLE`` turns them off, as tqdm reads
it (any value disables, ``0`` included). ``microseg`` calls :func:`export_to_tqdm` first, so
every tqdm bar that does not pass ``disable`` follows (tqdm >= 4.66 takes its defaults from
``TQDM_*`` variables when it is imported); bars with their own switch (``progress=``,
Lightning's, Ultralytics') ask :func:`progress_enabled` or :func:`bar_disabled`.
"""

from __future__ import annotations

import os
import sys
from typing import TextIO

from microseg.errors import ConfigError

ENV = "MICROSEG_PROGRESS"
TQDM_ENV = "TQDM_DISABLE"
_ON = {"1", "true", "yes", "on"}
_OFF = {"0", "false", "no", "off"}


def progress_enabled(stream: TextIO | None = None) -> bool:
    """``MICROSEG_PROGRESS``, else ``TQDM_DISABLE``, else whether ``stream`` (default:
    stderr, where bars go) is a terminal."""
    forced = os.environ.get(ENV, "").strip().lower()
    if forced in _ON:
        return True
    if forced in _OFF:
        return False
    if forced:
        raise ConfigError(f"{ENV} must be 0 or 1, found {os.environ[ENV]!r}")
    if os.environ.get(TQDM_ENV):
        return False
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def bar_disabled(progress: bool = True) -> bool:
    """tqdm's ``disable`` for a bar the caller asked for (``progress``): off where
    :func:`progress_enabled` says so."""
    return not (progress and progress_enabled())


def export_to_tqdm() -> None:
    """Set ``TQDM_DISABLE`` from :func:`progress_enabled` for this process and its children.

    Call it before tqdm is imported: tqdm reads the variable once, at import."""
    if progress_enabled():
        os.environ.pop(TQDM_ENV, None)
    else:
        os.environ[TQDM_ENV] = "1"
