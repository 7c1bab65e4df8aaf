"""Which optional extra brings a package, and the one clear error when it is missing.

``pip install microseg`` is the core: it applies models. Training, evaluation, tuning, the
MLflow registry and the DVC stages need ``microseg[pipeline]``, the napari viewer
``microseg[viewer]`` (pyproject.toml; ``tests/test_extras.py`` keeps this table in step with
it). A missing package of an extra becomes one line that says what to install, not a traceback
from deep inside a stage.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from microseg.errors import MissingExtraError

#: import name (top level) -> the extra whose distribution provides it
EXTRA_OF: dict[str, str] = {
    "dvc": "pipeline",
    "mlflow": "pipeline",
    "optuna": "pipeline",
    "optuna_integration": "pipeline",
    "great_expectations": "pipeline",
    "lightning": "pipeline",
    "psycopg2": "pipeline",
    "pyarrow": "pipeline",
    "flammkuchen": "pipeline",
    "tables": "pipeline",
    "ctc_metrics": "pipeline",
    "ruamel": "pipeline",
    "napari": "viewer",
    "ray": "scale",
}


def install_hint(extra: str) -> str:
    return f"pip install 'microseg[{extra}]'"


def missing_extra(exc: ImportError) -> MissingExtraError | None:
    """The clear error for ``exc`` when it is a missing package of an extra, else None (a
    missing core package is a broken install: its traceback is the useful report)."""
    root = (exc.name or "").split(".")[0]
    extra = EXTRA_OF.get(root)
    if not isinstance(exc, ModuleNotFoundError) or extra is None:
        return None
    return MissingExtraError(
        f"this needs the {extra} extra ({root} is not installed): {install_hint(extra)}"
    )


def require(extra: str, module: str) -> ModuleType:
    """``module`` imported, or :class:`MissingExtraError` naming ``extra`` when it is not
    installed; call it where a core entry point reaches into an extra (``models:/`` URIs)."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] != module.split(".")[0]:
            raise  # the package is there but one of its own dependencies is missing
        raise MissingExtraError(
            f"this needs the {extra} extra ({module} is not installed): {install_hint(extra)}"
        ) from exc


__all__ = ["EXTRA_OF", "install_hint", "missing_extra", "require"]
