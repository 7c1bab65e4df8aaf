"""The model side of a batch evaluation: load it once, predict file by file, judge its answers.

The alias is pinned to a version before loading, so a promotion during the run cannot mix two
models in one report. A file whose prediction fails costs that file only; the answers then go
through a GE suite (spines inside the stack with scores in [0, 1]; nuclei label images of the
input's shape holding the objects the model claims).

Prediction runs on :func:`microseg.utils.engine.run_inputs`: here (``engine=local``) or on Ray
actors that each load the model once (``engine=ray``). Each input's answer is written
atomically into ``<out>/<stem>/`` with ``done.json`` last, keyed by the input's bytes, the
pinned model, its params and device, so a rerun (after a crash, or a killed worker) skips
inputs already answered. Every answer, fresh or earlier, is read back from disk the same way,
so both engines and a resumed run report the same.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
import pandas as pd
import tifffile

from microseg.data.expectations import INTEGER_DTYPE, Failure, import_gx
from microseg.errors import MicrosegError, MissingFileError
from microseg.io.png import read_png
from microseg.registry.batch_inputs import TASKS, shape_text
from microseg.registry.batch_validation import Validator
from microseg.registry.resolve import VERSION_URI, resolve_registered_model
from microseg.utils.atomic import atomic_path
from microseg.utils.engine import EngineOptions, run_inputs

if TYPE_CHECKING:
    from great_expectations.expectations import Expectation

SPINE_COLUMNS = ("z", "y", "x", "x1", "y1", "x2", "y2", "score")
NUCLEI_COLUMNS = ("labels_path", "n_objects")
PREDICTIONS_NAME = "predictions.csv"
#: written last, with the key of what the answer depends on: a rerun skips the input
DONE_NAME = "done.json"


def load_model(uri: str, task: str | None) -> tuple[Any, str]:
    """The pyfunc at ``uri``; a registry version is loaded from its verified local copy (its
    files' sha256 checked against the one recorded at registration before MLflow unpickles
    anything of it: :mod:`microseg.registry.integrity`)."""
    source = uri
    if VERSION_URI.match(uri):
        source = str(resolve_registered_model(uri).folder)
    try:
        model = mlflow.pyfunc.load_model(source)
    except Exception as exc:
        raise MicrosegError(f"could not load the model ({type(exc).__name__}: {exc})", uri) from exc
    return model, _task(getattr(model.metadata, "metadata", None) or {}, task, uri)


def model_task(uri: str, task: str | None) -> str:
    """The model's task from its MLmodel file alone (for workers that load it themselves)."""
    try:
        info = mlflow.models.get_model_info(uri)
    except Exception as exc:
        raise MicrosegError(f"could not read the model ({type(exc).__name__}: {exc})", uri) from exc
    return _task(info.metadata or {}, task, uri)


def _task(meta: dict[str, Any], task: str | None, uri: str) -> str:
    task = task or meta.get("task")
    if task not in TASKS:
        raise MicrosegError(
            f"expected model metadata 'task' in {list(TASKS)}, found {meta.get('task')!r}", uri
        )
    return task


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


def _predict_spines(model: Any, row: dict[str, Any], stage: Path, params: dict | None) -> None:
    out = model.predict(pd.DataFrame({"path": [row["image_path"]]}), params=params or None)
    _check_frame(out, SPINE_COLUMNS)
    with atomic_path(stage / PREDICTIONS_NAME) as tmp:
        out.to_csv(tmp, index=False)


def _spines_frame(row: dict[str, Any], stage: Path) -> pd.DataFrame:
    out = pd.read_csv(stage / PREDICTIONS_NAME)
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


def _predict_nuclei(model: Any, row: dict[str, Any], stage: Path, params: dict | None) -> None:
    """The model writes into a staging folder that becomes ``stage`` whole, marker included."""
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
        # the staging folder becomes ``stage``: point at where the files will be
        moved = [Path(p) for p in out["labels_path"].astype(str)]
        out["labels_path"] = [str(stage / p.relative_to(tmp)) if p.is_relative_to(tmp) else str(p)
                              for p in moved]  # fmt: skip
        out.to_csv(tmp / PREDICTIONS_NAME, index=False)
        _write_done(tmp, row)


def _nuclei_frame(row: dict[str, Any], stage: Path) -> pd.DataFrame:
    """The saved answer with its label images checked (readable, shape, dtype, object count)."""
    out = pd.read_csv(stage / PREDICTIONS_NAME).drop(columns="labels_error", errors="ignore")
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
        records.append({**rec, "labels_path": labels_path})
    checked = pd.concat([out.drop(columns="labels_path"), pd.DataFrame(records)], axis=1)
    checked["n_objects"] = pd.to_numeric(checked["n_objects"], errors="coerce")
    return checked.assign(
        sample_id=row["sample_id"],
        image_path=row["image_path"],
        input_shape=_spatial_shape(str(row["shape"])),
    )


def input_key(
    image_path: str | Path, uri: str, task: str, params: dict | None, device: str | None
) -> str:
    """What an output depends on: the input's bytes, the pinned model, its params and device;
    a rerun skips an input only when all are the same (no clock: the folder is a DVC output)."""
    with open(image_path, "rb") as f:
        digest = hashlib.file_digest(f, "md5").hexdigest()
    text = json.dumps(
        {"input_md5": digest, "model": uri, "task": task, "params": params, "device": device},
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(text.encode()).hexdigest()


def _write_done(stage: Path, row: dict[str, Any]) -> None:
    with atomic_path(stage / DONE_NAME) as tmp:
        tmp.write_text(json.dumps({"key": row["key"]}) + "\n")


def is_done(stage: Path, key: str) -> bool:
    """The input's answer is on disk, whole, from the same input, model, params and device."""
    marker = stage / DONE_NAME
    if not (marker.is_file() and (stage / PREDICTIONS_NAME).is_file()):
        return False
    try:
        return json.loads(marker.read_text()).get("key") == key
    except (OSError, ValueError, AttributeError):
        return False


@dataclass(frozen=True)
class BatchWorker:
    """Builds the per-input prediction function; called once per worker (Ray: per actor).

    ``model`` is the model loaded here (``engine=local``); without it, the worker loads
    ``uri`` itself, against the MLflow store the driver uses, and moves it to ``device``.
    """

    uri: str
    task: str
    out_dir: str
    device: str | None = None
    predict_params: dict[str, Any] | None = None
    tracking_uri: str | None = None
    registry_uri: str | None = None
    model: Any = field(default=None, compare=False, repr=False)

    def __call__(self) -> Callable[[dict[str, Any]], str | None]:
        model = self.model
        if model is None:
            if self.tracking_uri:
                mlflow.set_tracking_uri(self.tracking_uri)
            if self.registry_uri:
                mlflow.set_registry_uri(self.registry_uri)
            model, _ = load_model(self.uri, self.task)
            if self.device is not None:
                use_device(model, self.device, self.uri)
        predict = _predict_spines if self.task == "spines" else _predict_nuclei
        out_dir, params = Path(self.out_dir), self.predict_params

        def one(row: dict[str, Any]) -> str | None:
            """None when the answer is saved, else why not (one file's failure is its own)."""
            stage = out_dir / row["sample_id"]
            clear_output(stage)
            try:
                predict(model, row, stage, params)
                if self.task == "spines":  # nuclei write theirs inside the staged folder
                    _write_done(stage, row)
            except Exception as exc:
                return f"prediction failed: {type(exc).__name__}: {exc}"
            return None

        return one


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
    worker: BatchWorker,
    good: pd.DataFrame,
    validator: Validator,
    progress: bool,
    options: EngineOptions | None = None,
) -> tuple[dict[str, pd.DataFrame], dict[str, list[str]], list[Failure], dict[str, Any]]:
    """Predict file by file on ``options``' engine (a failure costs that file only; an input
    whose answer is on disk from the same model is skipped), then judge all outputs with GE."""
    out_dir = Path(worker.out_dir)
    rows = [
        {
            "sample_id": row["sample_id"],
            "image_path": row["image_path"],
            "file": row["file"],
            "shape": row["shape"],
            "key": input_key(
                row["image_path"], worker.uri, worker.task, worker.predict_params, worker.device
            ),
        }
        for _, row in good.iterrows()
    ]
    outcomes = run_inputs(
        rows,
        worker,
        options,
        done=lambda r: is_done(out_dir / r["sample_id"], r["key"]),
        name=lambda r: r["file"],
        desc="batch-eval",
        progress=progress,
    )
    read = _spines_frame if worker.task == "spines" else _nuclei_frame
    outputs: dict[str, pd.DataFrame] = {}
    out_bad: dict[str, list[str]] = {}
    for row, outcome in zip(rows, outcomes, strict=True):
        if outcome.value is not None:
            out_bad[row["file"]] = [outcome.value]
            continue
        try:  # fresh or from an earlier run, every answer is read back from disk alike
            outputs[row["file"]] = read(row, out_dir / row["sample_id"])
        except Exception as exc:
            out_bad[row["file"]] = [f"prediction failed: {type(exc).__name__}: {exc}"]
    frames = [f for f in outputs.values() if len(f)]
    failures: list[Failure] = []
    ge_json: dict[str, Any] = {}
    if frames:
        expectations = (
            spine_output_expectations() if worker.task == "spines" else nuclei_output_expectations()
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
