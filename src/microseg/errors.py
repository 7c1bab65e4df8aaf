"""One error family for everything a user can get wrong.

Each message says which file, what was expected and what was found, so the CLI can print it
without a traceback (``cli.main`` catches :class:`MicrosegError`).
"""

from __future__ import annotations

from pathlib import Path


class MicrosegError(Exception):
    """Base class: bad user input or environment, reported without a traceback."""

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        super().__init__(f"{path}: {message}" if path is not None else message)


class DataFormatError(MicrosegError):
    """A file exists but its content is not what its format promises (corrupt, wrong keys)."""


class ShapeMismatchError(MicrosegError):
    """Arrays that must agree (image vs label, raters vs stack) do not."""


class AnnotationError(MicrosegError):
    """Annotations are empty, malformed, or refer to things that do not exist."""


class MissingFileError(MicrosegError, FileNotFoundError):
    """An input the stage needs is not there."""


class ConfigError(MicrosegError):
    """params.yaml or a CLI override does not validate."""


class ValidationFailed(MicrosegError):
    """Great Expectations found bad data; the message lists the failed expectations."""


class MissingExtraError(MicrosegError, ImportError):
    """A command needs a package of an optional extra (``pipeline``, ``viewer``) that this
    install lacks; an ImportError too, so ``except ImportError`` fallbacks keep working."""


class Terminated(KeyboardInterrupt):
    """SIGTERM stopped a run (a cancelled CI job, a preempted cluster slot, ``kill``).

    A KeyboardInterrupt, so everything that handles Ctrl-C (a tuning trial marked interrupted,
    the CLI's resume message) handles it too; the CLI exits 143 (128 + SIGTERM), never 0, so
    DVC does not record a half-trained model as the stage's output.
    """
