"""A registered version's files are the files that were registered: sha256 recorded, then checked.

A model's folder in the artifact store is what loading trusts: its ``python_model.pkl`` is
unpickled by ``mlflow.pyfunc.load_model`` and its Ultralytics ``best.pt`` holds a pickled
network. Anyone who can write to the artifact store (a shared bucket, an NFS folder) could
swap them after review. So :func:`register_version` records a digest of the whole folder as a
version tag (the tag lives in the tracking database, apart from the artifacts), and every load
of a registered version (``batch-eval``, ``predict -m models:/…``, ``microseg.load``) recomputes
it on the downloaded files before anything in them is read.

The digest is sha256 over the sorted ``relative path + sha256 of the file`` lines, so a renamed,
added or removed file changes it too. ``registered_model_meta`` is left out: MLflow writes it
into a folder downloaded through ``models:/`` (the name and version), it is not the model's.
Each weights file's own sha256 is a tag as well (``sha256.<file>``), for people comparing
versions in the UI. A version registered outside microseg gets its digest on first load.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from microseg.errors import MicrosegError

log = logging.getLogger(__name__)

DIGEST_TAG = "artifacts_sha256"
FILE_TAG_PREFIX = "sha256."
#: files MLflow adds to a downloaded ``models:/`` folder (not part of the logged model)
IGNORED = frozenset({"registered_model_meta"})
WEIGHT_SUFFIXES = (".pt", ".pth", ".ckpt", ".safetensors")
_CHUNK = 1 << 20


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def folder_digests(folder: Path) -> tuple[str, dict[str, str]]:
    """``(tree digest, {relative path: sha256})`` of every file under ``folder``."""
    files = {
        p.relative_to(folder).as_posix(): file_sha256(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name not in IGNORED and "__pycache__" not in p.parts
    }
    tree = hashlib.sha256("".join(f"{k}\0{v}\n" for k, v in sorted(files.items())).encode())
    return tree.hexdigest(), files


def version_tags(folder: Path) -> dict[str, str]:
    """The integrity tags of a model folder: its tree digest and each weights file's sha256."""
    tree, files = folder_digests(folder)
    tags = {DIGEST_TAG: tree}
    for rel, digest in files.items():
        if rel.endswith(WEIGHT_SUFFIXES):
            tags[FILE_TAG_PREFIX + rel.rsplit("/", 1)[-1]] = digest
    return tags


def source_tags(source: str, tracking_uri: str) -> dict[str, str]:
    """Download the model at ``source`` (a logged model or run artifacts) and digest it."""
    import mlflow

    with tempfile.TemporaryDirectory(prefix="microseg-digest-") as tmp:
        got = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=source, dst_path=tmp, tracking_uri=tracking_uri
            )
        )
        return version_tags(got)


def verify_folder(
    folder: Path,
    tags: Mapping[str, Any],
    what: str,
    record: Callable[[dict[str, str]], None] | None = None,
) -> None:
    """Refuse a downloaded version whose files are not the ones registered.

    ``what`` names the version (``models:/name/3``) in the message. A version without the tag
    was registered outside microseg (the MLflow UI's "Register model", ``mlflow.register_model``):
    its digest is recorded now through ``record`` (trust on first use, with a warning) and
    checked from then on.
    """
    expected = (tags or {}).get(DIGEST_TAG)
    tree, _ = folder_digests(folder)
    if not expected:
        log.warning(
            "%s was registered without a sha256 of its files (not by `microseg register`); "
            "recording it now: later loads are checked against these files",
            what,
        )
        if record is not None:
            try:
                record({**version_tags(folder), DIGEST_TAG + ".recorded": "first load"})
            except Exception as exc:  # a read-only registry: load, but say so
                log.warning("could not record the sha256 on %s: %s", what, exc)
        return
    if tree != expected:
        raise MicrosegError(
            f"refusing to load: the files in the artifact store changed since registration "
            f"(sha256 {tree[:12]}…, registered {str(expected)[:12]}…); someone replaced or "
            "edited them: register the model again from its training run",
            what,
        )


__all__ = [
    "DIGEST_TAG",
    "FILE_TAG_PREFIX",
    "file_sha256",
    "folder_digests",
    "source_tags",
    "verify_folder",
    "version_tags",
]
