"""Reading a torch file a user may hand in: tensors only, and a one-line reason when refused.

``torch.load(weights_only=True)`` never runs code from the file; when the file pickles more
than tensors (a payload, or a whole pickled module) torch refuses with a six-line lecture on
``weights_only``. The user needs one line: this file holds code, not weights.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

from microseg.errors import DataFormatError


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_torch(path: str | Path, map_location: Any = "cpu", *, mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)``; any failure is a one-line
    :class:`DataFormatError` naming the file."""
    import torch

    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        code = re.search(r"GLOBAL (\S+)", text)  # torch's weights-only refusal names it
        if code is None:  # junk, truncated, not a pickle at all
            detail = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|$)", text, re.S)
            reason = " ".join(detail.group(1).split())[:200] if detail else first_line(exc)
            raise DataFormatError(f"not a readable torch file ({reason})", path) from exc
        msg = (
            f"refusing to load: the file pickles {code.group(1)}, not only tensors, and "
            "loading it could run code"
        )
        raise DataFormatError(msg, path) from exc
    except Exception as exc:  # not a zip, truncated, wrong magic: several exception types
        raise DataFormatError(
            f"not a readable torch file ({type(exc).__name__}: {first_line(exc)})", path
        ) from exc


__all__ = ["first_line", "read_torch"]
