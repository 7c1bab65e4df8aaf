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

A folder runs on :func:`microseg.utils.engine.run_inputs`: in this process (``engine`` local,
the default) or on Ray actors that each load the model once (``ray``; params ``scale``).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from microseg.config import Params
from microseg.errors import MicrosegError
from microseg.stages.predict_inputs import ReadOptions, is_single, list_inputs, read_input, stem
from microseg.stages.predict_models import ModelSpec, default_model, resolve_spec
from microseg.stages.predict_result import RESULTS, Result, SaveOptions
from microseg.stages.predict_runner import Runner
from microseg.utils.atomic import atomic_path
from microseg.utils.engine import EngineOptions, run_inputs

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
    engine: EngineOptions | None = None,
) -> PredictResult:
    """Any model on ``source`` (one input, or a folder of inputs) into ``out``; see the
    module docstring. One input's errors are raised; a folder's are reported per input.
    ``engine`` (default: params ``scale``) says where a folder's inputs run."""
    options = options or PredictOptions()
    if voxel_size is not None:
        read = dataclasses.replace(options.read, voxel_size_nm=voxel_size)
        options = dataclasses.replace(options, read=read)
    engine = engine or EngineOptions.from_mapping(params.scale.model_dump())
    name = model if model is not None else default_model(params, task)
    spec = resolve_spec(params, name, task=task, weights=weights, device=device)
    single = is_single(source, spec.task)
    # Ray workers load their own copies: the model is loaded here only to be used here
    runner = Runner(params, spec) if single or engine.engine == "local" else None
    result = PredictResult(0, task=spec.task, model=spec.name)
    if runner is not None and single:
        result.n_stacks = 1
        predicted, target = _predict_one(runner, source, out, options, single=True)
        result.messages.append(_message(spec, predicted, target))
        return result
    inputs = list_inputs(source, spec.task)
    result.n_stacks, result.folder = len(inputs), True
    make_worker: Callable[[], Callable[[Path], dict[str, Any]]]
    if runner is not None:
        make_worker = functools.partial(_folder_worker, params, spec, out, options, runner)
    else:
        make_worker = functools.partial(_folder_worker, params, spec, out, options)
    result.summary = _predict_folder(spec, make_worker, inputs, out, options, result, engine)
    return result


def _target(spec: ModelSpec | Runner, path: Path, out: Path, single: bool) -> Path:
    """Where an input's files go: spines get a folder each (``out`` for one stack), the other
    tasks write ``<stem>_*`` files into ``out``."""
    return out / stem(path) if spec.task == "spines" and not single else out


def _done(spec: ModelSpec | Runner, path: Path, out: Path) -> bool:
    """The input's marker (its last output, see ``predict_result``) exists."""
    target = _target(spec, path, out, single=False)
    return RESULTS[spec.task].marker(target, stem(path), spec.family).exists()


def _predict_one(
    runner: Runner, path: Path, out: Path, options: PredictOptions, single: bool
) -> tuple[Result, Path]:
    """Read, predict and save one input; returns the result and where it went."""
    result = runner.predict(read_input(path, runner.task, options.read))
    target = _target(runner, path, out, single)
    result.save(target, **dataclasses.asdict(options.save))
    return result, target


def _message(runner: ModelSpec | Runner, result: Any, target: Path) -> str:
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


def _folder_worker(
    params: Params,
    spec: ModelSpec,
    out: Path,
    options: PredictOptions,
    runner: Runner | None = None,
) -> Callable[[Path], dict[str, Any]]:
    """The per-input function of a folder run: ``spec``'s model loaded once per worker (or
    ``runner``, loaded here already); returns the input's summary row and message."""
    runner = runner if runner is not None else Runner(params, spec)

    def one(path: Path) -> dict[str, Any]:
        try:
            predicted, target = _predict_one(runner, path, out, options, single=False)
        except (MicrosegError, OSError, ValueError) as exc:
            log.warning("%s: failed, skipped: %s", path.name, exc)
            return {"row": _row(path, "failed", error=str(exc)), "message": None}
        msg = _message(runner, predicted, target)
        log.info("%s: %s", path.name, msg)
        row = _row(path, "done", target, predicted.n_objects, round(predicted.seconds, 3))
        return {"row": row, "message": msg}

    return one


def _predict_folder(
    spec: ModelSpec,
    make_worker: Callable[[], Callable[[Path], dict[str, Any]]],
    inputs: list[Path],
    out: Path,
    options: PredictOptions,
    result: PredictResult,
    engine: EngineOptions,
) -> pd.DataFrame:
    out.mkdir(parents=True, exist_ok=True)
    rows: dict[int, dict[str, Any]] = {}
    index = {path: i for i, path in enumerate(inputs)}

    def record(path: Path, outcome: Any) -> None:
        if outcome.skipped:
            target = _target(spec, path, out, single=False)
            log.info("%s: predicted earlier (%s); skipped", path.name, target)
            result.skipped.append(path.name)
            rows[index[path]] = _row(path, "skipped", output=target)
        else:
            rows[index[path]] = row = outcome.value["row"]
            if row["status"] == "failed":
                result.failed.append((path.name, row["error"]))
            else:
                result.messages.append(outcome.value["message"])
        # after every input: an interrupted run keeps its record
        _write_summary(out, [rows[i] for i in sorted(rows)])

    run_inputs(
        inputs,
        make_worker,
        engine,
        done=None if options.overwrite else functools.partial(_done, spec, out=out),
        name=lambda p: p.name,
        desc=f"predict {spec.name}",
        progress=True,
        on_result=record,
    )
    return pd.DataFrame([rows[i] for i in sorted(rows)], columns=SUMMARY_COLS)


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
    engine: EngineOptions | None = None,
    save_vis: bool = False,
    vis_interval: int = 10,
) -> pd.DataFrame:
    """YOLO + Prob-UNet + fusion on a stack or a folder of stacks, one result folder each,
    resumable; the summary has one row per stack (``status`` done, skipped or failed).
    ``engine`` (default: params ``scale``) ``ray`` spreads the stacks over Ray actors that
    each load both models once. ``save_vis``: PNGs of every ``vis_interval``-th plane and a
    max projection in ``<stem>/vis/`` (:mod:`microseg.report.fusion_vis`); the number of
    result folders drawn is ``summary.attrs["vis"]``."""
    from microseg.infer.spine_pipeline import SpinePipelineConfig, read_fusion_params

    cfg = SpinePipelineConfig.from_params(params)
    if params.punet.predict.device is not None:
        cfg = dataclasses.replace(cfg, device=params.punet.predict.device)
    fp = read_fusion_params(fusion_params) if fusion_params.exists() else None
    fp = fp or cfg.default_fusion_params()
    models_key = _weights_key(yolo_weights=yolo_weights, punet_weights=punet_weights)
    engine = engine or EngineOptions.from_mapping(params.scale.model_dump())
    kw = {"voxel_size_nm": voxel_size, "annotations": annotations, "overwrite": overwrite,
          "models_key": models_key}  # fmt: skip
    make_worker = functools.partial(
        _fuse_worker, params, yolo_weights, punet_weights, fp, cfg, out, **kw
    )
    if save_vis:  # a bad interval fails before any model runs
        from microseg.report.fusion_vis import vis_planes

        vis_planes(1, vis_interval)
    if engine.engine == "local":  # one call: the pipeline's own loop, bar and summary
        summary = make_worker()(input_)
    else:
        summary = _fuse_on_ray(make_worker, input_, out, engine, fp, cfg, kw)
    if save_vis:
        summary.attrs["vis"] = _save_vis(summary, input_, vis_interval)
    return summary


def _save_vis(summary: pd.DataFrame, input_: Path, interval: int) -> int:
    """Draw ``vis/`` for every fused stack whose drawing is missing or older than its result;
    a stack that cannot be drawn is named in the log and the rest go on."""
    from microseg.infer.spine_pipeline import list_stacks
    from microseg.report.fusion_vis import render_fusion_vis, vis_is_current

    stacks = {p.name: p for p in list_stacks(input_)}
    drawn = 0
    for row in summary.itertuples():
        if row.status not in ("done", "skipped") or row.stack not in stacks:
            continue
        rdir = Path(row.result_dir)
        if row.status == "skipped" and vis_is_current(rdir, interval):
            continue
        try:
            pngs = render_fusion_vis(stacks[row.stack], rdir, interval=interval)
        except (MicrosegError, OSError) as exc:
            log.warning("%s: visualisation failed: %s", row.stack, exc)
            continue
        log.info("%s: %d visualisation PNGs -> %s", row.stack, len(pngs), pngs[0].parent)
        drawn += 1
    return drawn


def _fuse_worker(
    params: Params,
    yolo_weights: Path,
    punet_weights: Path,
    fp: Any,
    cfg: Any,
    out: Path,
    **kwargs: Any,
) -> Callable[[Any], pd.DataFrame]:
    """Both models loaded once per worker; the pipeline's folder loop on what it is given
    (a folder, or one stack of a Ray run)."""
    from microseg.infer.spine_pipeline import predict_folder
    from microseg.stages import spines
    from microseg.stages.punet import load_prob_model

    yolo = spines.load_yolo(yolo_weights, params)
    punet = load_prob_model(punet_weights)  # a flat or hierarchical Prob-UNet file
    return functools.partial(
        predict_folder, out_dir=out, yolo=yolo, punet=punet, fusion_params=fp, cfg=cfg, **kwargs
    )


def _fuse_on_ray(
    make_worker: Callable[[], Callable[[list[Path]], pd.DataFrame]],
    input_: Path,
    out: Path,
    engine: EngineOptions,
    fp: Any,
    cfg: Any,
    kw: dict[str, Any],
) -> pd.DataFrame:
    """One stack per Ray task; finished stacks are read here without loading a model."""
    from microseg.infer import spine_pipeline as sp

    stacks = sp.list_stacks(input_)
    key = sp.run_key(fp, cfg, kw["voxel_size_nm"], kw["models_key"])

    def finished(one: list[Path]) -> bool:
        points = sp.find_points(one[0], kw["annotations"])
        return not kw["overwrite"] and sp.is_finished(one[0], out / one[0].stem, points, key)

    outcomes = run_inputs(
        [[s] for s in stacks],
        make_worker,
        engine,
        done=finished,
        name=lambda one: one[0].name,
        desc="stacks",
    )
    skipped = [stacks[o.index] for o in outcomes if o.skipped]
    frames = [o.value for o in outcomes if not o.skipped]
    if skipped:  # the pipeline's loop reads their results.json; no model is touched
        frames.append(sp.predict_folder(skipped, out, None, None, fp, cfg, progress=False, **kw))
    order = {s.name: i for i, s in enumerate(stacks)}
    records = [r for frame in frames for r in frame.to_dict(orient="records")]
    summary = pd.DataFrame(records, columns=sp.SUMMARY_COLS)
    summary = summary.sort_values("stack", key=lambda c: c.map(order)).reset_index(drop=True)
    with atomic_path(out / sp.SUMMARY_NAME) as tmp:  # the whole run's, over the workers' own
        summary.to_csv(tmp, index=False)
    failed = summary.loc[summary["status"] == "failed", "stack"].tolist()
    if failed:
        log.warning("%d of %d stack(s) failed: %s", len(failed), len(summary), failed)
    return summary


def _weights_key(**paths: Path) -> dict[str, str]:
    """The models' file digests: other weights under the same names redo every stack."""
    from microseg.data.ingest import file_md5

    return {k: file_md5(p) if Path(p).is_file() else str(p) for k, p in paths.items()}
