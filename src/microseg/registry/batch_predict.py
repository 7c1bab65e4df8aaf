"""The model side of a batch evaluation: load it once, predict file by file, judge its answers.

The alias is pinned to a version before loading, so a promotion during the run cannot mix two
models in one report. A file whose prediction fails costs that file only; the answers then go
through a GE suite (spines inside the stack with scores in [0, 1]; nuclei label images of the
input's shape holding the objects the model claims).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
import pandas as pd
import tifffile
from tqdm.auto import tqdm

from microseg.data.expectations import INTEGER_DTYPE, Failure, import_gx
from microseg.errors import MicrosegError, MissingFileError
from microseg.io.png import read_png
from microseg.registry import promotion
from microseg.registry.batch_inputs import TASKS, shape_text
from microseg.registry.batch_validation import Validator
from microseg.utils.atomic import atomic_path
from microseg.utils.progress import bar_disabled

if TYPE_CHECKING:
    from great_expectations.expectations import Expectation

SPINE_COLUMNS = ("z", "y", "x", "x1", "y1", "x2", "y2", "score")
NUCLEI_COLUMNS = ("labels_path", "n_objects")
PREDICTIONS_NAME = "predictions.csv"
_ALIAS_URI = re.compile(r"^models:/([^/@]+)@([^/@]+)$")
_VERSION_URI = re.compile(r"^models:/([^/@]+)/(\d+)$")


def resolve_model_uri(model_uri: str, client: Any = None) -> tuple[str, str | None, str | None]:
    """``(uri to load, registered name, version)``; an alias is pinned to its version now."""
    if m := _ALIAS_URI.match(model_uri):
        name, alias = m.groups()
        mv = promotion.alias_version(name, alias, client)
        if mv is None:
            raise MicrosegError(
                f"expected a version of registered model {name!r} with alias {alias!r}, "
                "found none (register and promote a model first)",
                model_uri,
            )
        return f"models:/{name}/{mv.version}", name, str(mv.version)
    if m := _VERSION_URI.match(model_uri):
        return model_uri, m.group(1), m.group(2)
    return model_uri, None, None


def load_model(uri: str, task: str | None) -> tuple[Any, str]:
    try:
        model = mlflow.pyfunc.load_model(uri)
    except Exception as exc:
        raise MicrosegError(f"could not load the model ({type(exc).__name__}: {exc})", uri) from exc
    meta = getattr(model.metadata, "metadata", None) or {}
    task = task or meta.get("task")
    if task not in TASKS:
        raise MicrosegError(
            f"expected model metadata 'task' in {list(TASKS)}, found {meta.get('task')!r}", uri
        )
    return model, task


def use_device(model: Any, device: str, uri: str) -> None:
    """Move a loaded microseg model to ``device``; a version whose code predates
    ``use_device`` (models carry their own copy of the package) says so."""
    use = getattr(model.unwrap_python_model(), "use_device", None)
    if use is None:
        raise MicrosegError(
            f"this model cannot be moved to {device!r} (its code predates --device); "
            "run without --device: it uses the device it was logged with",
            uri,
        )
    use(device)


def spine_output_expectations() -> list[Expectation]:
    """Detections inside the stack they came from, with probabilities for scores."""
    import_gx()
    import great_expectations.expectations as gxe

    def greater(a: str, b: str, or_equal: bool) -> Expectation:
        return gxe.ExpectColumnPairValuesAToBeGreaterThanB(
            column_A=a, column_B=b, or_equal=or_equal, ignore_row_if="either_value_is_missing"
        )

    return [
        *(gxe.ExpectColumnValuesToNotBeNull(column=c) for c in SPINE_COLUMNS),
        gxe.ExpectColumnValuesToBeBetween(column="score", min_value=0, max_value=1),
        *(gxe.ExpectColumnValuesToBeBetween(column=c, min_value=0) for c in SPINE_COLUMNS[:5]),
        greater("x2", "x1", False),
        greater("y2", "y1", False),
        greater("width", "x2", True),
        greater("height", "y2", True),
        greater("depth", "z", False),
        greater("height", "y", False),
        greater("width", "x", False),
    ]


def nuclei_output_expectations() -> list[Expectation]:
    """A readable integer label image of the input's shape holding the objects it claims."""
    import_gx()
    import great_expectations.expectations as gxe

    return [
        gxe.ExpectColumnValuesToBeInSet(column="labels_readable", value_set=[True]),
        gxe.ExpectColumnPairValuesToBeEqual(
            column_A="labels_shape", column_B="input_shape", ignore_row_if="either_value_is_missing"
        ),
        gxe.ExpectColumnValuesToMatchRegex(column="labels_dtype", regex=INTEGER_DTYPE),
        gxe.ExpectColumnPairValuesToBeEqual(
            column_A="n_objects", column_B="n_labels", ignore_row_if="either_value_is_missing"
        ),
    ]


def _spatial_shape(shape: str) -> str:
    """The label image's expected shape: ``H,W`` for colour ``H,W,3|4``, else the input's."""
    dims = shape.split(",")
    return ",".join(dims[:2]) if len(dims) == 3 and dims[2] in ("3", "4") else shape


def clear_output(stage: Path) -> None:
    """Drop a previous run's output for this stem, so a file that fails now leaves none behind."""
    if (stage / PREDICTIONS_NAME).is_file():
        shutil.rmtree(stage)


def _predict_spines(model: Any, row: pd.Series, stage: Path, params: dict | None) -> pd.DataFrame:
    out = model.predict(pd.DataFrame({"path": [row["image_path"]]}), params=params or None)
    _check_frame(out, SPINE_COLUMNS)
    out = out.copy()
    with atomic_path(stage / PREDICTIONS_NAME) as tmp:
        out.to_csv(tmp, index=False)
    for col in SPINE_COLUMNS:
        out[col] = pd.to_numeric(out[col], errors="coerce")
    z, h, w = (int(s) for s in str(row["shape"]).split(","))
    return out.assign(
        sample_id=row["sample_id"], image_path=row["image_path"], depth=z, height=h, width=w
    )


def read_labels(path: Path) -> np.ndarray:
    """A label image of any integer dtype (``skimage`` gives int32/int64), errors named."""
    if not path.is_file():
        raise MissingFileError("expected a label image, found nothing", path)
    if path.suffix.lower() == ".png":
        return read_png(path)
    try:
        return np.asarray(tifffile.imread(path))
    except Exception as exc:
        raise MicrosegError(
            f"expected a readable TIFF label image, found {type(exc).__name__}: {exc}", path
        ) from exc


def _predict_nuclei(model: Any, row: pd.Series, stage: Path, params: dict | None) -> pd.DataFrame:
    with atomic_path(stage) as tmp:
        tmp.mkdir(parents=True)
        out = model.predict(
            pd.DataFrame({"path": [row["image_path"]]}),
            params={**(params or {}), "out_dir": str(tmp)},
        )
        _check_frame(out, NUCLEI_COLUMNS)
        if out.empty:
            raise MicrosegError("expected one row per input image, found an empty table")
        out = out.copy().reset_index(drop=True)
        records = []
        for labels_path in out["labels_path"].astype(str):
            rec: dict[str, Any] = {"labels_readable": False}
            try:
                labels = read_labels(Path(labels_path))
                rec.update(
                    labels_readable=True,
                    labels_shape=shape_text(labels.shape),
                    labels_dtype=labels.dtype.name,
                    n_labels=int(np.unique(labels[labels > 0]).size),
                )
            except MicrosegError as exc:
                rec["labels_error"] = str(exc)
            # the staging folder becomes ``stage``: point at where the file will be
            p = Path(labels_path)
            if p.is_relative_to(tmp):
                labels_path = str(stage / p.relative_to(tmp))
            records.append({**rec, "labels_path": labels_path})
        checked = pd.concat([out.drop(columns="labels_path"), pd.DataFrame(records)], axis=1)
        checked.drop(
            columns=["labels_readable", "labels_shape", "labels_dtype", "n_labels"], errors="ignore"
        ).to_csv(tmp / PREDICTIONS_NAME, index=False)
    checked["n_objects"] = pd.to_numeric(checked["n_objects"], errors="coerce")
    return checked.assign(
        sample_id=row["sample_id"],
        image_path=row["image_path"],
        input_shape=_spatial_shape(str(row["shape"])),
    )


def _check_frame(out: Any, columns: Sequence[str]) -> None:
    if not isinstance(out, pd.DataFrame):
        raise MicrosegError(f"expected the model to return a DataFrame, found {type(out).__name__}")
    missing = [c for c in columns if c not in out.columns]
    if missing:
        raise MicrosegError(
            f"expected output columns {list(columns)}, missing {missing} "
            f"(found {list(out.columns)})"
        )


def predict_all(
    model: Any,
    task: str,
    good: pd.DataFrame,
    out_dir: Path,
    predict_params: dict[str, Any] | None,
    validator: Validator,
    progress: bool,
) -> tuple[dict[str, pd.DataFrame], dict[str, list[str]], list[Failure], dict[str, Any]]:
    """Predict file by file (a failure costs that file only), then judge all outputs with GE."""
    predict = _predict_spines if task == "spines" else _predict_nuclei
    outputs: dict[str, pd.DataFrame] = {}
    out_bad: dict[str, list[str]] = {}
    bar = tqdm(
        list(good.iterrows()), desc="batch-eval", unit="file", disable=bar_disabled(progress)
    )
    for _, row in bar:
        bar.set_postfix_str(row["file"])
        clear_output(out_dir / row["sample_id"])
        try:
            outputs[row["file"]] = predict(model, row, out_dir / row["sample_id"], predict_params)
        except Exception as exc:  # one file's failure must not end the batch
            out_bad[row["file"]] = [f"prediction failed: {type(exc).__name__}: {exc}"]
    frames = [f for f in outputs.values() if len(f)]
    failures: list[Failure] = []
    ge_json: dict[str, Any] = {}
    if frames:
        expectations = (
            spine_output_expectations() if task == "spines" else nuclei_output_expectations()
        )
        checked, failures, ge_json = validator.run(
            "outputs", pd.concat(frames, ignore_index=True), expectations
        )
        for fname, reasons in checked.items():
            out_bad.setdefault(fname, []).extend(reasons)
    for fname, frame in outputs.items():
        errors = frame["labels_error"].dropna() if "labels_error" in frame else []
        if len(errors):
            out_bad.setdefault(fname, []).extend(f"labels: {e}" for e in errors)
    return outputs, out_bad, failures, ge_json
