"""A registered model as a local folder: ``models:/<name>@<alias>`` -> its files and params.

``microseg predict --model models:/...`` and ``microseg.load("models:/...")`` need what a
registered version carries (its weights and the config it was logged with), not MLflow's pyfunc
machinery: the version's files are downloaded once into a cache keyed by the pinned version (a
version never changes, so the cache needs no invalidation) and its ``MLmodel`` file is read as
YAML. The pickled python model is never loaded, so nothing of the download is unpickled, and
the files are checked against the sha256 recorded at registration before anything is read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from microseg.config import Params
from microseg.errors import DataFormatError, MicrosegError, MissingFileError
from microseg.utils.atomic import atomic_path
from microseg.utils.extras import require

MLMODEL = "MLmodel"
#: the URI schemes this module resolves (MLflow's model registry and run artifacts)
SCHEMES = ("models:/", "runs:/")
log = logging.getLogger(__name__)
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
ALIAS_URI = re.compile(r"^models:/([^/@]+)@([^/@]+)$")
VERSION_URI = re.compile(r"^models:/([^/@]+)/(\d+)$")


@dataclass(frozen=True)
class LocalModel:
    """A registered model's files on this machine and what it was logged with."""

    uri: str  # as asked (``models:/name@champion``)
    pinned_uri: str  # the version it resolved to (``models:/name/3``)
    task: str  # the model's ``metadata["task"]``: nuclei | spines
    family: str  # ``metadata["model_family"]`` (``yolo+punet-fusion`` for spines)
    folder: Path  # the downloaded model folder (holds ``MLmodel``)
    artifacts: dict[str, Path] = field(default_factory=dict)  # artifact key -> local file
    #: the JSON ``config`` artifact: nuclei ``{family, train, infer, post}``; spines the
    #: pipeline config (``SpinePipelineConfig``)
    config: dict[str, Any] = field(default_factory=dict)
    name: str | None = None
    version: str | None = None


def is_registry_uri(text: str) -> bool:
    return str(text).startswith(SCHEMES)


def cache_root() -> Path:
    """``$MICROSEG_CACHE/registry``, else ``~/.cache/microseg/registry``."""
    base = os.environ.get("MICROSEG_CACHE") or Path.home() / ".cache" / "microseg"
    return Path(base) / "registry"


def resolve_model_uri(model_uri: str, client: Any = None) -> tuple[str, str | None, str | None]:
    """``(uri to load, registered name, version)``; an alias is pinned to its version now."""
    from microseg.registry.promotion import alias_version

    if m := ALIAS_URI.match(model_uri):
        name, alias = m.groups()
        mv = alias_version(name, alias, client)
        if mv is None:
            raise MicrosegError(
                f"expected a version of registered model {name!r} with alias {alias!r}, "
                "found none (register and promote a model first)",
                model_uri,
            )
        return f"models:/{name}/{mv.version}", name, str(mv.version)
    if m := VERSION_URI.match(model_uri):
        return model_uri, m.group(1), m.group(2)
    return model_uri, None, None


def resolve_registered_model(
    uri: str, *, params: Params | None = None, cache_dir: Path | None = None
) -> LocalModel:
    """Download (once) and read the model at ``uri``; an alias is pinned to its version first.

    ``params`` points MLflow at the configured store (``MLFLOW_TRACKING_URI`` wins, as for
    every stage); ``cache_dir`` defaults to :func:`cache_root`, keyed by the registry (a hash
    of its URI), name and version. A cached copy that fails the sha256 check is downloaded
    again; a fresh download that fails it is refused. A core install (no MLflow)
    gets one line that names the ``pipeline`` extra.
    """
    require("pipeline", "mlflow")
    if params is not None:
        from microseg.registry import runs

        runs.configure(params)
    try:
        pinned, name, version = resolve_model_uri(uri)
    except MicrosegError:
        raise
    except Exception as exc:  # the store cannot be reached or read
        raise MicrosegError(f"could not resolve ({type(exc).__name__}: {exc})", uri) from exc
    import mlflow

    # a version number is unique within one registry only: the store is part of the key
    store = hashlib.sha256(mlflow.get_registry_uri().encode()).hexdigest()[:12]
    key = [store, name, version] if name and version else ["uri", _UNSAFE.sub("_", pinned)]
    folder = (cache_dir or cache_root()).joinpath(*key)
    cached = (folder / MLMODEL).is_file() and bool(name and version)
    if not cached:
        _download(pinned, folder)
    if name and version:
        try:
            _verify(folder, name, version, pinned)
        except MicrosegError:
            if not cached:
                raise
            log.warning("%s: the cached copy in %s differs; downloading it again", pinned, folder)
            _download(pinned, folder)
            _verify(folder, name, version, pinned)
    local = read_model_folder(folder, uri=uri)
    return LocalModel(
        uri=uri,
        pinned_uri=pinned,
        task=local.task,
        family=local.family,
        folder=folder,
        artifacts=local.artifacts,
        config=local.config,
        name=name,
        version=version,
    )


def _verify(folder: Path, name: str, version: str, pinned: str) -> None:
    """The cached files against the sha256 recorded at registration (every load: the cache
    is a plain folder anyone on the machine may have edited)."""
    from mlflow import MlflowClient

    from microseg.registry.integrity import verify_folder

    client = MlflowClient()
    try:
        tags = client.get_model_version(name, version).tags
    except Exception as exc:  # the store cannot be reached or read
        raise MicrosegError(f"could not read the version's tags ({exc})", pinned) from exc

    def record(new: dict[str, str]) -> None:
        for key, value in new.items():
            client.set_model_version_tag(name, version, key, value)

    verify_folder(folder, tags, pinned, record)


def _download(uri: str, folder: Path) -> None:
    import mlflow

    with atomic_path(folder) as tmp:
        tmp.mkdir(parents=True)
        try:
            got = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(tmp)))
        except Exception as exc:
            raise MicrosegError(
                f"could not download the model ({type(exc).__name__}: {exc})", uri
            ) from exc
        if not (tmp / MLMODEL).is_file():  # some stores nest the files one folder down
            nested = got if (got / MLMODEL).is_file() else next(tmp.rglob(MLMODEL)).parent
            for item in nested.iterdir():
                item.rename(tmp / item.name)


def read_model_folder(folder: str | Path, uri: str | None = None) -> LocalModel:
    """A downloaded (or ``mlflow.pyfunc.save_model``) model folder: task, family, artifact
    files and config, read from ``MLmodel`` and the JSON config artifact."""
    folder = Path(folder)
    path = folder / MLMODEL
    if not path.is_file():
        raise MissingFileError("expected an MLflow model folder with an MLmodel file", folder)
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise DataFormatError(f"not valid YAML ({exc})", path) from exc
    meta = doc.get("metadata") or {}
    pyfunc = (doc.get("flavors") or {}).get("python_function") or {}
    artifacts = {
        key: folder / str(entry.get("path", ""))
        for key, entry in (pyfunc.get("artifacts") or {}).items()
        if isinstance(entry, dict)
    }
    missing = [k for k, p in artifacts.items() if not p.is_file()]
    if missing:
        raise MissingFileError(f"model artifacts {missing} are not in the folder", folder)
    config: dict[str, Any] = {}
    if "config" in artifacts:
        try:
            config = json.loads(artifacts["config"].read_text())
        except json.JSONDecodeError as exc:
            raise DataFormatError(f"config is not JSON ({exc})", artifacts["config"]) from exc
    task = str(meta.get("task") or "")
    family = str(meta.get("model_family") or config.get("family") or "")
    if task == "nuclei":
        if "family" not in config:  # a U-Net pyfunc logged before families existed
            config = {"family": "unet", "infer": config, "post": config.get("post")}
        family = family or str(config["family"])
        if "weights" not in artifacts and "unet" in artifacts:
            artifacts["weights"] = artifacts["unet"]
    if task not in ("nuclei", "spines"):
        raise DataFormatError(
            f"expected model metadata 'task' nuclei or spines, found {meta.get('task')!r}", path
        )
    return LocalModel(
        uri=uri or str(folder),
        pinned_uri=uri or str(folder),
        task=task,
        family=family,
        folder=folder,
        artifacts=artifacts,
        config=config,
    )


__all__ = [
    "ALIAS_URI",
    "SCHEMES",
    "VERSION_URI",
    "LocalModel",
    "cache_root",
    "is_registry_uri",
    "read_model_folder",
    "resolve_model_uri",
    "resolve_registered_model",
]
