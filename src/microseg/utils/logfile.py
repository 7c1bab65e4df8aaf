"""One log file per command: ``logs/<command>[-<key>].log``, next to what DVC and CI print.

``microseg`` writes every log record of INFO and above to the file of the command it runs (the
folder is ``MICROSEG_LOG_DIR``, default ``logs``), besides stderr. A run **overwrites** its
file: the file is the log of the last run, as the outputs beside it are; the MLflow run a
stage opens keeps a copy of each run's (``registry.runs.stage_run`` attaches :func:`current`
when the run ends). The folder is neither a DVC output nor in git (.gitignore, .dvcignore).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

from microseg.errors import MicrosegError

ENV_DIR = "MICROSEG_LOG_DIR"
DEFAULT_DIR = "logs"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
#: loggers that keep their records from the root logger (``propagate = False``) but whose
#: records belong in the file (Ultralytics' trainer reports its epochs there)
OWN_HANDLER_LOGGERS = ("ultralytics",)

_handler: logging.FileHandler | None = None
_NOTED = "_microseg_in_log_file"


class _PlainFormatter(logging.Formatter):
    """The house format without terminal colour codes (Ultralytics colours its messages)."""

    _ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

    def format(self, record: logging.LogRecord) -> str:
        return self._ANSI.sub("", super().format(record))


def log_path(parts: Sequence[str], directory: str | Path | None = None) -> Path:
    """``<directory>/<part>-<part>....log``; characters other than letters, digits and
    ``._@-`` become ``_`` (a model name such as ``tracking_seg@unet`` stays readable)."""
    name = "-".join(re.sub(r"[^\w.@-]+", "_", str(p)).strip("._") or "_" for p in parts)
    folder = Path(directory or os.environ.get(ENV_DIR) or DEFAULT_DIR)
    return folder / f"{name or 'microseg'}.log"


@contextlib.contextmanager
def attached(
    path: str | Path, level: int = logging.INFO, header: str | None = None
) -> Iterator[Path]:
    """Records of ``level`` and above go to ``path`` (overwritten, starting with the line
    ``header``: which command, which version) while the block runs."""
    global _handler
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="w", encoding="utf-8")
    handler.setLevel(level)
    handler.setFormatter(_PlainFormatter(FORMAT))
    if header is not None:
        handler.stream.write(header.rstrip("\n") + "\n")
    loggers = [logging.getLogger(), *map(logging.getLogger, OWN_HANDLER_LOGGERS)]
    for logger in loggers:
        logger.addHandler(handler)
    previous, _handler = _handler, handler
    try:
        yield path
    finally:
        _handler = previous
        for logger in loggers:
            logger.removeHandler(handler)
        handler.close()


def record_error(exc: BaseException) -> None:
    """The error that ends a command or a stage run, into the file only (stderr shows it once
    already: ``main``'s line, or Python's traceback); once per error. A user error
    (:class:`~microseg.errors.MicrosegError`) gets its message, anything else its traceback."""
    if _handler is None or getattr(exc, _NOTED, False):
        return
    trace = None if isinstance(exc, MicrosegError) else (type(exc), exc, exc.__traceback__)
    msg = f"{type(exc).__name__}: {exc}"
    _handler.handle(logging.LogRecord("microseg", logging.ERROR, "", 0, msg, None, trace))
    with contextlib.suppress(AttributeError):
        setattr(exc, _NOTED, True)


def current() -> Path | None:
    """The file this command logs to, flushed (None outside ``microseg`` or a block of
    :func:`attached`)."""
    if _handler is None:
        return None
    _handler.flush()
    return Path(_handler.baseFilename)
