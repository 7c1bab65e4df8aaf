"""Batch evaluation by a registered model: validate inputs, predict, validate outputs, score.

``microseg batch-eval --model models:/<name>@champion --input DIR --out DIR`` runs
:func:`batch_eval`. The rules it keeps:

* **Inputs are judged before the model sees them.** One row per file (readable, ndim, shape,
  dtype, non-finite count, intensity range; read plane by plane, so a large stack costs one
  plane of memory) goes through a Great Expectations suite built with the machinery of
  :mod:`microseg.data.validate`. A file that fails is reported by name with the expectation it
  broke and is skipped, never silently used.
* **Outputs are judged before they are scored.** The model's answers go through a second GE
  suite: spines ``score`` in [0, 1], boxes with ``0 <= x1 < x2 <= W`` and ``0 <= y1 < y2 <= H``,
  ``0 <= z < Z``, no NaN; nuclei label images that exist, have the input's shape, an integer
  dtype and as many objects as the model claims. A file whose output fails is reported and left
  out of the scores.
* **The alias is resolved once.** ``models:/<name>@champion`` becomes ``models:/<name>/<v>``
  before loading, and the run is tagged with that name and version, so a promotion during the
  run cannot mix two models in one report.

The model is a pyfunc with ``metadata["task"]``: ``"spines"`` (input ``path`` of a ZYX TIFF,
output ``path, z, y, x, x1, y1, x2, y2, score, status``) or ``"nuclei"`` (input ``path``,
``params={"out_dir": ...}``; writes ``<out_dir>/<stem>_labels.tif`` and returns ``path,
labels_path, n_objects, height, width``).

Scores need annotations: spines ``<stem>.csv`` points (in ``annotations_dir`` or beside the
stack) scored by :func:`microseg.evaluate.points.evaluate_points` in nm with the stack's
voxel size; nuclei ``<stem>_labels.tif`` ground truth scored by F1 at IoU 0.5
(:mod:`microseg.evaluate.instances`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
import numpy as np
import pandas as pd
import tifffile
from tqdm.auto import tqdm

from microseg.config import Params, SpinesEvalConfig, ValidateConfig, check_device
from microseg.data.validate import (
    INTEGER_DTYPE,
    Failure,
    _ephemeral_context,
    _failures,
    _fmt,
    _import_gx,
    _run_batch,
)
from microseg.errors import MicrosegError, MissingFileError
from microseg.evaluate.instances import image_scores, summarize
from microseg.evaluate.points import evaluate_points
from microseg.evaluate.rates import prf
from microseg.io.png import read_image, read_png
from microseg.io.points import read_points
from microseg.io.tiff import SUPPORTED_DTYPES, TiffStack
from microseg.registry import promotion, runs
from microseg.utils.atomic import atomic_path, write_text
from microseg.utils.convert import jsonable

if TYPE_CHECKING:
    from great_expectations.expectations import Expectation

logger = logging.getLogger(__name__)

TASKS = ("spines", "nuclei")
SUFFIXES = {"spines": (".tif", ".tiff"), "nuclei": (".png", ".tif", ".tiff")}
ALLOWED_NDIM = {"spines": [3], "nuclei": [2, 3]}
#: files whose stem ends so are annotations (nuclei ground truth), never inputs
LABEL_SUFFIX = "_labels"
SPINE_COLUMNS = ("z", "y", "x", "x1", "y1", "x2", "y2", "score")
NUCLEI_COLUMNS = ("labels_path", "n_objects")
INDEX_COLUMNS = ("sample_id", "image_path")
RESULT_NAME = "batch_eval.json"
INPUT_RESULT_NAME = "input_validation.json"
#: the summary alone, small enough for ``dvc metrics``
METRICS_NAME = "metrics.json"
PREDICTIONS_NAME = "predictions.csv"
IOU_THRESHOLD = 0.5
_ALIAS_URI = re.compile(r"^models:/([^/@]+)@([^/@]+)$")
_VERSION_URI = re.compile(r"^models:/([^/@]+)/(\d+)$")


@dataclass
class BatchEvalResult:
    """What a batch evaluation found; the files it names are already on disk."""

    model_uri: str
    resolved_uri: str
    task: str
    model_name: str | None
    model_version: str | None
    #: inputs that passed validation and were given to the model
    good_files: list[Path]
    #: input file name -> why it was skipped (failed expectations, read errors)
    bad_files: dict[str, list[str]]
    #: one row per good file: output status and, when annotated, its scores
    per_file: pd.DataFrame
    #: input file name -> what was wrong with the model's answer for it
    output_failures: dict[str, list[str]]
    #: dataset scores and counts (also logged as ``batch_eval.<key>`` metrics)
    summary: dict[str, Any]
    out_dir: Path
    strict: bool = False
    #: input file name -> why its annotation could not be scored
    scoring_errors: dict[str, str] = field(default_factory=dict)
    run_id: str | None = None

    @property
    def exit_code(self) -> int:
        """1 when asked to be strict and anything was bad, else 0."""
        bad = self.bad_files or self.output_failures or self.scoring_errors
        return int(self.strict and bool(bad))


# ---------------------------------------------------------------------------- model


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


def _load(uri: str, task: str | None) -> tuple[Any, str]:
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


def _use_device(model: Any, device: str, uri: str) -> None:
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


# ---------------------------------------------------------------------------- inputs


def list_inputs(input_dir: Path, task: str) -> list[Path]:
    """Images of ``task`` directly in ``input_dir`` (sorted), ground-truth label files excluded."""
    if not input_dir.is_dir():
        raise MissingFileError("expected a folder of input images, found nothing", input_dir)
    paths = sorted(
        p
        for p in input_dir.iterdir()
        if p.is_file()
        and p.suffix.lower() in SUFFIXES[task]
        and not p.stem.endswith(LABEL_SUFFIX)
        and not p.name.startswith(".")
    )
    if not paths:
        raise MissingFileError(
            f"expected {task} images ({', '.join(SUFFIXES[task])}), found none", input_dir
        )
    return paths


def _plane_stats(planes: Iterable[np.ndarray]) -> dict[str, Any]:
    """Non-finite count and finite min/max over planes, one plane in memory at a time."""
    n_bad, lo, hi = 0, math.inf, -math.inf
    for plane in planes:
        if np.issubdtype(plane.dtype, np.floating):
            finite = np.isfinite(plane)
            n_bad += int(plane.size - finite.sum())
            plane = plane[finite]
        if plane.size:
            lo, hi = min(lo, float(plane.min())), max(hi, float(plane.max()))
    return {
        "n_nonfinite": n_bad,
        "intensity_min": lo if math.isfinite(lo) else None,
        "intensity_max": hi if math.isfinite(hi) else None,
    }


def _tiff_row(path: Path) -> dict[str, Any]:
    # the header alone first: a dtype we cannot decode is a dtype failure, not "unreadable"
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        shape, dtype = tuple(int(s) for s in series.shape), np.dtype(series.dtype)
    row: dict[str, Any] = {"ndim": len(shape), "shape": _shape(shape), "dtype": dtype.name}
    if dtype not in SUPPORTED_DTYPES:
        return row
    with TiffStack(path) as stack:
        planes = [stack.asarray()] if stack.ndim <= 2 else (stack[i] for i in range(len(stack)))
        row.update(_plane_stats(planes))
        z, y, x = stack.voxel_size_nm or (math.nan,) * 3
    row.update(voxel_size_z_nm=z, voxel_size_y_nm=y, voxel_size_x_nm=x)
    return row


def _png_row(path: Path) -> dict[str, Any]:
    array = read_image(path)
    return {
        "ndim": array.ndim,
        "shape": _shape(array.shape),
        "dtype": array.dtype.name,
        **_plane_stats([array]),
    }


def input_table(paths: Sequence[Path]) -> pd.DataFrame:
    """One row per file: what GE judges (``readable``, ``ndim``, ``dtype``, ``n_nonfinite``)."""
    rows = []
    for path in paths:
        row: dict[str, Any] = {
            "sample_id": path.stem,
            "image_path": str(path),
            "file": path.name,
            "size_bytes": path.stat().st_size,
            "readable": True,
            "error": "",
        }
        try:
            reader = _tiff_row if path.suffix.lower() in (".tif", ".tiff") else _png_row
            row.update(reader(path))
        except Exception as exc:  # any failure to read is a finding about the file
            row["readable"] = False
            row["error"] = (
                str(exc) if isinstance(exc, MicrosegError) else f"{type(exc).__name__}: {exc}"
            )
        rows.append(row)
    columns = [
        "sample_id",
        "image_path",
        "file",
        "size_bytes",
        "readable",
        "error",
        "ndim",
        "shape",
        "dtype",
        "n_nonfinite",
        "intensity_min",
        "intensity_max",
        "voxel_size_z_nm",
        "voxel_size_y_nm",
        "voxel_size_x_nm",
    ]
    table = pd.DataFrame(rows).reindex(columns=columns)
    table["readable"] = table["readable"].astype(bool)
    return table


def input_expectations(task: str, allowed_dtypes: Sequence[str]) -> list[Expectation]:
    """Per-file checks; value checks skip nulls, so an unreadable file fails ``readable`` only."""
    _import_gx()
    import great_expectations.expectations as gxe

    return [
        gxe.ExpectColumnValuesToBeUnique(column="sample_id"),  # one output folder per stem
        gxe.ExpectColumnValuesToBeInSet(column="readable", value_set=[True]),
        gxe.ExpectColumnValuesToBeInSet(column="ndim", value_set=ALLOWED_NDIM[task]),
        gxe.ExpectColumnValuesToBeInSet(column="dtype", value_set=list(allowed_dtypes)),
        gxe.ExpectColumnValuesToBeBetween(column="n_nonfinite", max_value=0),
    ]


def spine_output_expectations() -> list[Expectation]:
    """Detections inside the stack they came from, with probabilities for scores."""
    _import_gx()
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
    _import_gx()
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


# ---------------------------------------------------------------------------- GE plumbing


class _Validator:
    """One ephemeral GE context for the run; each table is its own suite and checkpoint."""

    def __init__(self) -> None:
        self._docs = tempfile.TemporaryDirectory(prefix="microseg-ge-")
        self.context = _ephemeral_context(Path(self._docs.name))
        self.datasource = self.context.data_sources.add_pandas("batch_eval")

    def run(
        self, name: str, frame: pd.DataFrame, expectations: list[Expectation]
    ) -> tuple[dict[str, list[str]], list[Failure], dict[str, Any]]:
        """``({file name: [reasons]}, failures, GE result JSON)`` for one table."""
        result = _run_batch(self.context, self.datasource, name, frame, expectations, INDEX_COLUMNS)
        failures = _failures(name, result)
        by_file: dict[str, list[str]] = {}
        for f in failures:
            if f.exception or not f.rows:
                raise MicrosegError(f"{name} validation could not judge the files: {f.describe()}")
            for row in f.rows:
                values = ", ".join(f"{c}={_fmt(row[c])}" for c in f.columns if c in row)
                reason = f"{f.signature} failed (observed {values})"
                by_file.setdefault(Path(str(row["image_path"])).name, []).append(reason)
        return by_file, failures, jsonable(result.to_json_dict(), default=str)

    def close(self) -> None:
        self._docs.cleanup()


def _failure_records(failures: list[Failure]) -> list[dict[str, Any]]:
    return [{**asdict(f), "signature": f.signature, "message": f.describe()} for f in failures]


# ---------------------------------------------------------------------------- predict


def _shape(shape: Sequence[int]) -> str:
    return ",".join(str(int(s)) for s in shape)


def _spatial_shape(shape: str) -> str:
    """The label image's expected shape: ``H,W`` for colour ``H,W,3|4``, else the input's."""
    dims = shape.split(",")
    return ",".join(dims[:2]) if len(dims) == 3 and dims[2] in ("3", "4") else shape


def _clear(stage: Path) -> None:
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


def _read_labels(path: Path) -> np.ndarray:
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
                labels = _read_labels(Path(labels_path))
                rec.update(
                    labels_readable=True,
                    labels_shape=_shape(labels.shape),
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


# ---------------------------------------------------------------------------- scoring


def _annotation(where: Sequence[Path], names: Sequence[str]) -> Path | None:
    for folder in where:
        for name in names:
            if (folder / name).is_file():
                return folder / name
    return None


def _score_spines(
    pred: pd.DataFrame,
    row: pd.Series,
    where: Sequence[Path],
    voxel_size_nm: Sequence[float] | None,
    max_dist_nm: float,
) -> dict[str, Any] | None:
    ann = _annotation(where, [f"{row['sample_id']}.csv"])
    if ann is None:
        return None
    voxel = [row.get(f"voxel_size_{a}_nm") for a in "zyx"]
    if not all(v is not None and np.isfinite(v) and v > 0 for v in voxel):
        if voxel_size_nm is None:
            raise MicrosegError(
                "expected a voxel size (z, y, x) in the stack's metadata or passed as "
                f"voxel_size_nm to score against {ann}, found {voxel}",
                row["image_path"],
            )
        voxel = list(voxel_size_nm)
    shape = tuple(int(s) for s in str(row["shape"]).split(","))
    gt = read_points(ann, shape=shape, allow_empty=True)
    scores = evaluate_points(pred, gt, voxel, max_dist_nm)
    return {"annotation": str(ann), **scores}


def _score_nuclei(
    pred: pd.DataFrame, row: pd.Series, where: Sequence[Path]
) -> dict[str, Any] | None:
    stem = row["sample_id"]
    names = [f"{stem}{LABEL_SUFFIX}{s}" for s in (".tif", ".tiff", ".png")]
    ann = _annotation(where, names)
    if ann is None:
        return None
    gt = _read_labels(ann)
    labels = _read_labels(Path(pred["labels_path"].iloc[0]))
    scores = image_scores(gt, labels, (IOU_THRESHOLD,), with_rand=False)
    return {"annotation": str(ann), **scores}


def _predict_all(
    model: Any,
    task: str,
    good: pd.DataFrame,
    out_dir: Path,
    predict_params: dict[str, Any] | None,
    validator: _Validator,
    progress: bool,
) -> tuple[dict[str, pd.DataFrame], dict[str, list[str]], list[Failure], dict[str, Any]]:
    """Predict file by file (a failure costs that file only), then judge all outputs with GE."""
    predict = _predict_spines if task == "spines" else _predict_nuclei
    outputs: dict[str, pd.DataFrame] = {}
    out_bad: dict[str, list[str]] = {}
    bar = tqdm(list(good.iterrows()), desc="batch-eval", unit="file", disable=not progress)
    for _, row in bar:
        bar.set_postfix_str(row["file"])
        _clear(out_dir / row["sample_id"])
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


def _score_all(
    task: str,
    good: pd.DataFrame,
    outputs: dict[str, pd.DataFrame],
    out_bad: dict[str, list[str]],
    where: Sequence[Path],
    voxel_size_nm: Sequence[float] | None,
    max_dist_nm: float,
) -> tuple[pd.DataFrame, dict[str, str]]:
    """One row per evaluated file; files with rejected outputs are listed but never scored."""
    rows, errors = [], {}
    for _, row in good.iterrows():
        fname = row["file"]
        rec: dict[str, Any] = {"file": fname, "status": "ok", "scored": False}
        pred = outputs.get(fname)
        if pred is not None:
            rec["n_pred"] = len(pred) if task == "spines" else int(pred["n_objects"].sum())
        if fname in out_bad:
            rec["status"] = "prediction_failed" if pred is None else "output_rejected"
            rows.append(rec)
            continue
        try:
            if task == "spines":
                scores = _score_spines(pred, row, where, voxel_size_nm, max_dist_nm)
            else:
                scores = _score_nuclei(pred, row, where)
        except MicrosegError as exc:
            errors[fname] = str(exc)
            logger.warning("could not score %s: %s", fname, exc)
            scores = None
        if scores is not None:
            rec.update(scored=True, **scores)
        rows.append(rec)
    return pd.DataFrame(rows), errors


def _summary(task: str, scored: pd.DataFrame) -> dict[str, Any]:
    if scored.empty:
        return {"n_scored": 0}
    if task == "spines":
        tp, fp, fn = (int(scored[c].sum()) for c in ("tp", "fp", "fn"))
        return {
            "n_scored": len(scored),
            **prf(tp, fp, fn, empty=1.0)._asdict(),
            "tp": tp,
            "fp": fp,
            "fn": fn,
            "n_pred": int(scored["n_pred"].sum()),
            "n_gt": int(scored["n_gt"].sum()),
        }
    return {"n_scored": len(scored), **summarize(scored, (IOU_THRESHOLD,))}


# ---------------------------------------------------------------------------- main


def batch_eval(
    model_uri: str,
    input_dir: str | Path,
    out_dir: str | Path,
    *,
    annotations_dir: str | Path | None = None,
    strict: bool = False,
    progress: bool = True,
    params: Params | None = None,
    predict_params: dict[str, Any] | None = None,
    voxel_size_nm: Sequence[float] | None = None,
    task: str | None = None,
    device: str | None = None,
) -> BatchEvalResult:
    """Validate, predict, check and score every image in ``input_dir``; log one MLflow run.

    ``params`` (microseg params) points MLflow at the configured store, supplies the allowed
    dtypes (``validate.allowed_image_dtypes``) and the match distance
    (``spines.match_dist_nm``), and names the run's experiment; without it the current MLflow
    settings and defaults apply. ``voxel_size_nm`` (z, y, x) is used for stacks whose metadata
    has none; ``task`` overrides the model's ``metadata["task"]``; ``device`` (``auto``,
    ``cpu``, ``cuda``, ``cuda:N``, ``mps``) overrides the one the model was logged with. A run
    already active is logged into; otherwise one is started.
    """
    started = time.perf_counter()
    input_dir, out_dir = Path(input_dir), Path(out_dir)
    if params is not None:
        runs.configure(params)
    validate_cfg = params.validate_ if params is not None else ValidateConfig()
    spines_cfg = params.spines if params is not None else SpinesEvalConfig()

    device = check_device(device) if device is not None else None
    load_uri, name, version = resolve_model_uri(model_uri)
    model, task = _load(load_uri, task)
    if device is not None:
        _use_device(model, device, load_uri)
    paths = list_inputs(input_dir, task)
    logger.info("batch-eval: %d %s inputs in %s with %s", len(paths), task, input_dir, load_uri)

    validator = _Validator()
    try:
        table = input_table(paths)
        bad, in_failures, in_json = validator.run(
            "inputs", table, input_expectations(task, validate_cfg.allowed_image_dtypes)
        )
        for fname, reasons in bad.items():
            error = table.loc[table["file"] == fname, "error"].iloc[0]
            if error:
                reasons.append(f"read error: {error}")
            logger.warning("skipping %s: %s", fname, "; ".join(reasons))
        good = table[~table["file"].isin(bad)]

        out_dir.mkdir(parents=True, exist_ok=True)
        for stem in table.loc[table["file"].isin(bad), "sample_id"]:
            _clear(out_dir / stem)
        outputs, out_bad, out_failures, out_json = _predict_all(
            model, task, good, out_dir, predict_params, validator, progress
        )
    finally:
        validator.close()
    for fname, reasons in out_bad.items():
        logger.warning("output of %s rejected: %s", fname, "; ".join(reasons))

    where = [Path(annotations_dir)] if annotations_dir is not None else []
    per_file, scoring_errors = _score_all(
        task, good, outputs, out_bad, [*where, input_dir], voxel_size_nm, spines_cfg.match_dist_nm
    )
    scored = per_file[per_file["scored"]] if len(per_file) else per_file
    summary = {
        "n_inputs": len(paths),
        "n_bad_inputs": len(bad),
        "n_evaluated": len(good),
        "n_output_failures": len(out_bad),
        "n_scoring_errors": len(scoring_errors),
        **_summary(task, scored),
        "seconds": round(time.perf_counter() - started, 3),
    }
    result = BatchEvalResult(
        model_uri=model_uri,
        resolved_uri=load_uri,
        task=task,
        model_name=name,
        model_version=version,
        good_files=[Path(p) for p in good["image_path"]],
        bad_files=bad,
        per_file=per_file,
        output_failures=out_bad,
        summary=summary,
        out_dir=out_dir,
        strict=strict,
        scoring_errors=scoring_errors,
    )
    _write_reports(
        result, table, in_failures, in_json, out_failures, out_json, input_dir, annotations_dir
    )
    result.run_id = _log_run(result, params, input_dir)
    logger.info(
        "batch-eval: %d good, %d bad inputs, %d rejected outputs; %s",
        len(good),
        len(bad),
        len(out_bad),
        {k: v for k, v in summary.items() if k in ("precision", "recall", "f1", "f1_50")},
    )
    return result


def _write_reports(
    result: BatchEvalResult,
    table: pd.DataFrame,
    in_failures: list[Failure],
    in_json: dict[str, Any],
    out_failures: list[Failure],
    out_json: dict[str, Any],
    input_dir: Path,
    annotations_dir: str | Path | None,
) -> None:
    report = {
        "model_uri": result.model_uri,
        "resolved_uri": result.resolved_uri,
        "model_name": result.model_name,
        "model_version": result.model_version,
        "task": result.task,
        "input_dir": str(input_dir),
        "annotations_dir": None if annotations_dir is None else str(annotations_dir),
        "strict": result.strict,
        "exit_code": result.exit_code,
        "summary": result.summary,
        "bad_files": result.bad_files,
        "output_failures": result.output_failures,
        "scoring_errors": result.scoring_errors,
        "per_file": result.per_file.to_dict(orient="records"),
        "output_validation": {
            "success": not out_failures,
            "failures": _failure_records(out_failures),
            "great_expectations": out_json,
        },
    }
    inputs = {
        "success": not in_failures,
        "n_files": len(table),
        "n_bad": len(result.bad_files),
        "failures": _failure_records(in_failures),
        "files": table.to_dict(orient="records"),
        "great_expectations": in_json,
    }
    write_text(
        result.out_dir / RESULT_NAME, json.dumps(jsonable(report, default=str), indent=2) + "\n"
    )
    write_text(
        result.out_dir / INPUT_RESULT_NAME,
        json.dumps(jsonable(inputs, default=str), indent=2) + "\n",
    )
    write_text(
        result.out_dir / METRICS_NAME,
        json.dumps(jsonable(result.summary, default=str), indent=2) + "\n",
    )


def _log_run(result: BatchEvalResult, params: Params | None, input_dir: Path) -> str:
    """Log into the active run, else a new one (a stage run when params are given)."""
    tags = {
        "model_uri": result.model_uri,
        "model_uri_resolved": result.resolved_uri,
        "registered_model_name": result.model_name or "",
        "registered_model_version": result.model_version or "",
        "microseg.task": result.task,
        "batch_eval.strict": str(result.strict).lower(),
    }
    active = mlflow.active_run()
    if active is not None:
        ctx: Any = contextlib.nullcontext(active)
    elif params is not None:
        ctx = runs.stage_run(
            params,
            stage="batch_eval",
            task=result.task,
            dataset=input_dir.name,
            section={"model_uri": result.model_uri, "strict": result.strict},
        )
    else:
        ctx = mlflow.start_run(
            run_name=f"batch_eval-{input_dir.name}",
            tags={"microseg.stage": "batch_eval", "git_commit": runs.git_commit()},
        )
    with ctx as run:
        mlflow.set_tags(tags)
        metrics = {
            f"batch_eval.{k}": float(v)
            for k, v in result.summary.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        }
        mlflow.log_metrics(metrics)
        for name in (RESULT_NAME, INPUT_RESULT_NAME):
            mlflow.log_artifact(str(result.out_dir / name), artifact_path="batch_eval")
        return run.info.run_id
