"""Prediction on new data, outside the pipeline: ``microseg predict`` and ``fuse --input``.

``predict`` runs any model on any input of its task (names, paths and registry URIs:
:mod:`microseg.stages.predict_models`; reading: :mod:`microseg.stages.predict_inputs`;
outputs: :mod:`microseg.stages.predict_result`):

* nuclei: a 2D image or a folder of them -> ``<stem>_labels.tif``, ``<stem>_objects.csv``
  (+ probability, ROIs, GeoJSON);
* tracking: a time-lapse (TYX file or a CTC folder of ``t###.tif``), or a folder of them ->
  ``<stem>_RES/`` (CTC) + ``<stem>_tracks.csv``;
* spines: a ZYX stack or a folder of them -> one result folder per stack (plane by plane, so
  memory does not grow with depth).

A folder run is resumable: an input whose outputs are complete is skipped unless
``overwrite``; every output is written atomically, so an interrupted run leaves no half
result; an input that cannot be read or predicted is named, marked ``failed`` and the rest
go on. ``<out>/summary.csv`` lists every input with its status (done, skipped, failed).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from microseg.config import Params
from microseg.errors import MicrosegError
from microseg.stages.predict_inputs import ReadOptions, is_single, list_inputs, read_input, stem
from microseg.stages.predict_models import default_model, resolve_spec
from microseg.stages.predict_result import RESULTS, Result, SaveOptions
from microseg.stages.predict_runner import Runner
from microseg.utils.atomic import atomic_path

log = logging.getLogger(__name__)

Voxel = tuple[float, float, float] | None
SUMMARY_NAME = "summary.csv"
SUMMARY_COLS = ["input", "status", "n_objects", "seconds", "output", "error"]
NOUNS = {"nuclei": "image", "tracking": "time-lapse", "spines": "stack"}


@dataclass(frozen=True)
class PredictOptions:
    """Reading (channel, scene, timepoint, sizes), writing (format, ROI exports) and resume."""

    read: ReadOptions = field(default_factory=ReadOptions)
    save: SaveOptions = field(default_factory=SaveOptions)
    overwrite: bool = False


@dataclass
class PredictResult:
    """``messages``: one line per predicted input; ``failed``: ``(input name, reason)``;
    ``summary``: one row per input of a folder (:data:`SUMMARY_COLS`)."""

    n_stacks: int
    messages: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    folder: bool = False
    task: str = "spines"
    model: str = "yolo"
    skipped: list[str] = field(default_factory=list)
    summary: pd.DataFrame | None = None

    @property
    def noun(self) -> str:
        return NOUNS.get(self.task, "input")


def load_runner(
    params: Params,
    model: str | Path | None = None,
    *,
    task: str | None = None,
    weights: Path | None = None,
    device: str | None = None,
) -> Runner:
    """The :class:`~microseg.stages.predict_runner.Runner` of ``model`` (default: the task's,
    see :func:`~microseg.stages.predict_models.default_model`)."""
    name = model if model is not None else default_model(params, task)
    spec = resolve_spec(params, name, task=task, weights=weights, device=device)
    return Runner(params, spec)


def predict_stacks(
    params: Params,
    source: Path,
    out: Path,
    model: str | Path | None = None,
    weights: Path | None = None,
    voxel_size: Voxel = None,
    *,
    task: str | None = None,
    options: PredictOptions | None = None,
    device: str | None = None,
) -> PredictResult:
    """Any model on ``source`` (one input, or a folder of inputs) into ``out``; see the
    module docstring. One input's errors are raised; a folder's are reported per input."""
    options = options or PredictOptions()
    if voxel_size is not None:
        read = dataclasses.replace(options.read, voxel_size_nm=voxel_size)
        options = dataclasses.replace(options, read=read)
    runner = load_runner(params, model, task=task, weights=weights, device=device)
    task = runner.task
    result = PredictResult(0, task=task, model=runner.name)
    if is_single(source, task):
        result.n_stacks = 1
        predicted, target = _predict_one(runner, source, out, options, single=True)
        result.messages.append(_message(runner, predicted, target))
        return result
    inputs = list_inputs(source, task)
    result.n_stacks, result.folder = len(inputs), True
    result.summary = _predict_folder(runner, inputs, out, options, result)
    return result


def _target(runner: Runner, path: Path, out: Path, single: bool) -> Path:
    """Where an input's files go: spines get a folder each (``out`` for one stack), the other
    tasks write ``<stem>_*`` files into ``out``."""
    return out / stem(path) if runner.task == "spines" and not single else out


def _done(runner: Runner, path: Path, out: Path) -> bool:
    """The input's marker (its last output, see ``predict_result``) exists."""
    target = _target(runner, path, out, single=False)
    return RESULTS[runner.task].marker(target, stem(path), runner.family).exists()


def _predict_one(
    runner: Runner, path: Path, out: Path, options: PredictOptions, single: bool
) -> tuple[Result, Path]:
    """Read, predict and save one input; returns the result and where it went."""
    result = runner.predict(read_input(path, runner.task, options.read))
    target = _target(runner, path, out, single)
    result.save(target, **dataclasses.asdict(options.save))
    return result, target


def _message(runner: Runner, result: Any, target: Path) -> str:
    if runner.task == "spines":
        if runner.family == "yolo":
            n_boxes = len(result.boxes) if result.boxes is not None else 0
            return f"{n_boxes} boxes, {len(result.points)} spines after 3D dedup -> {target}"
        if runner.family == "punet":
            return f"probabilities, masks and uncertainty sums -> {target}"
        return f"{len(result.points)} fused spines -> {target}"
    if runner.task == "tracking":
        table = result.track_table
        n_div = int((table["P"] > 0).sum())
        return f"{result.name}: {len(table)} tracks ({n_div} with a parent) -> {target}"
    return f"{result.name}: {result.n_objects} objects -> {target}"


def _predict_folder(
    runner: Runner, inputs: list[Path], out: Path, options: PredictOptions, result: PredictResult
) -> pd.DataFrame:
    from tqdm.auto import tqdm

    out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    for path in tqdm(inputs, desc=f"predict {runner.name}", unit=result.noun):
        target = _target(runner, path, out, single=False)
        if not options.overwrite and _done(runner, path, out):
            log.info("%s: predicted earlier (%s); skipped", path.name, target)
            result.skipped.append(path.name)
            rows.append(_row(path, "skipped", output=target))
        else:
            try:
                predicted, target = _predict_one(runner, path, out, options, single=False)
            except (MicrosegError, OSError, ValueError) as exc:
                log.warning("%s: failed, skipped: %s", path.name, exc)
                result.failed.append((path.name, str(exc)))
                rows.append(_row(path, "failed", error=str(exc)))
            else:
                msg = _message(runner, predicted, target)
                log.info("%s: %s", path.name, msg)
                result.messages.append(msg)
                rows.append(
                    _row(path, "done", target, predicted.n_objects, round(predicted.seconds, 3))
                )
        _write_summary(out, rows)  # after every input: an interrupted run keeps its record
    return pd.DataFrame(rows, columns=SUMMARY_COLS)


def _row(
    path: Path,
    status: str,
    output: Path | None = None,
    n_objects: int | None = None,
    seconds: float | None = None,
    error: str = "",
) -> dict[str, Any]:
    return {
        "input": path.name,
        "status": status,
        "n_objects": n_objects,
        "seconds": seconds,
        "output": str(output) if output is not None else "",
        "error": error,
    }


def _write_summary(out: Path, rows: list[dict[str, Any]]) -> None:
    with atomic_path(out / SUMMARY_NAME) as tmp:
        pd.DataFrame(rows, columns=SUMMARY_COLS).to_csv(tmp, index=False)


def fuse_folder(
    params: Params,
    input_: Path,
    out: Path,
    *,
    yolo_weights: Path,
    punet_weights: Path,
    fusion_params: Path,
    voxel_size: Voxel = None,
    annotations: Path | None = None,
    overwrite: bool = False,
) -> pd.DataFrame:
    """YOLO + Prob-UNet + fusion on a stack or a folder of stacks, one result folder each,
    resumable; the summary has one row per stack (``status`` done, skipped or failed)."""
    from microseg.infer.spine_pipeline import (
        SpinePipelineConfig,
        predict_folder,
        read_fusion_params,
    )
    from microseg.models import get_model
    from microseg.stages import spines

    cfg = SpinePipelineConfig.from_params(params)
    if params.punet.predict.device is not None:
        cfg = dataclasses.replace(cfg, device=params.punet.predict.device)
    fp = read_fusion_params(fusion_params) if fusion_params.exists() else None
    return predict_folder(
        input_,
        out,
        spines.load_yolo(yolo_weights, params),
        get_model("punet").load(punet_weights),
        fp or cfg.default_fusion_params(),
        cfg,
        voxel_size_nm=voxel_size,
        annotations=annotations,
        overwrite=overwrite,
        models_key=_weights_key(yolo_weights=yolo_weights, punet_weights=punet_weights),
    )


def _weights_key(**paths: Path) -> dict[str, str]:
    """The models' file digests: other weights under the same names redo every stack."""
    from microseg.data.ingest import file_md5

    return {k: file_md5(p) if Path(p).is_file() else str(p) for k, p in paths.items()}
