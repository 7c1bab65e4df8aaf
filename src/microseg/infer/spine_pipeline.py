"""A stack in, fused spines out: YOLO boxes -> Prob-UNet spine probability -> :func:`fuse`.

One function, :func:`predict_spines`, serves ``microseg fuse --input DIR`` (through
:func:`predict_folder`) and the MLflow pyfunc (:mod:`microseg.registry.pyfunc`), so the
registered model and the CLI cannot drift apart.

Raw boxes are taken the way ``eval_yolo`` writes them for the fusion stages (the boxes the
fusion study was tuned on): no per-plane NMS (``iou=1.0``; fusion de-duplicates in 3D, in nm)
and the lowest confidence of the YOLO sweep. The fusion tree judges every box down to
``low_conf``, so YOLO's own cut is ``min(cfg.conf, fusion_params.low_conf)``; the two agree
whenever the tuned ``low_conf`` is at or above the sweep's lowest confidence (see
:func:`yolo_conf`).

The Prob-UNet probability is never held for the whole stack: planes are predicted a batch at a
time (:func:`microseg.models.punet.predict.predict_stack_punet` with ``collect=False``) and each
plane's boxes are aggregated (:func:`microseg.infer.fusion.box_probability`) as it passes, so
memory depends on the plane size, not on the depth. The numbers equal ``fuse`` on the full
probability stack.

Voxel size, first found wins per axis: the caller's, the TIFF's metadata, ``cfg.voxel_size_nm``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd
import yaml
from tqdm.auto import tqdm

from microseg.errors import ConfigError, MicrosegError, MissingFileError
from microseg.infer.fusion import (
    FusionParams,
    FusionResult,
    box_probability,
    evaluate_fusion,
    fuse_with_probabilities,
    write_fusion_outputs,
)
from microseg.io.tiff import TiffStack, open_stack
from microseg.utils.atomic import atomic_path
from microseg.utils.progress import bar_disabled

if TYPE_CHECKING:
    from microseg.config import Params

log = logging.getLogger(__name__)

VoxelSize = tuple[float, float, float]
STACK_SUFFIXES = (".tif", ".tiff")
SUMMARY_NAME = "summary.csv"
SUMMARY_COLS = [
    "stack",
    "status",
    "error",
    "result_dir",
    "points",
    "n_spines",
    "n_kept_boxes",
    "n_boxes",
    "precision",
    "recall",
    "f1",
    "tp",
    "fp",
    "fn",
    "seconds",
]


@dataclass(frozen=True)
class SpinePipelineConfig:
    """Every knob of :func:`predict_spines` except the fusion params (tuned separately).

    YOLO: ``conf`` (upper bound of its own cut, see :func:`yolo_conf`), ``iou`` (its per-plane
    NMS; 1.0 = none, as the fusion was tuned), ``tile`` ``[size, overlap]`` or None, ``fusion``
    of tile boxes, ``batch_planes``, ``max_det`` per image, ``channels`` and
    ``norm_percentiles`` as at conversion. Prob-UNet: ``n_samples``, ``temperature``,
    ``punet_tile``, ``punet_batch_planes``, ``seed``. ``dedup_radius_nm``/``dedup_mode`` build
    the fusion params when no tuned ones exist (:meth:`default_fusion_params`);
    ``voxel_size_nm`` is the last-resort voxel size; ``match_dist_nm`` scores against points;
    ``device`` runs the Prob-UNet (``auto``: CUDA when present).
    """

    conf: float = 0.05
    iou: float = 1.0
    tile: tuple[int, float] | None = None
    fusion: Literal["nms", "wbf"] = "nms"
    batch_planes: int = 8
    max_det: int = 3000
    channels: Literal["single", "25d"] = "single"
    norm_percentiles: tuple[float, float] = (1.0, 99.8)
    n_samples: int = 24
    temperature: float = 1.4
    punet_tile: tuple[int, int] | None = None
    punet_batch_planes: int = 4
    seed: int = 42
    dedup_radius_nm: float = 1500.0
    dedup_mode: Literal["nms", "cluster"] = "nms"
    voxel_size_nm: VoxelSize = (500.0, 94.0, 94.0)
    match_dist_nm: float = 1000.0
    device: str = "auto"

    def __post_init__(self) -> None:
        def fix(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        def bad(what: str) -> ConfigError:
            return ConfigError(f"spine pipeline config: {what}; found {self!r}")

        if self.tile is not None:
            fix("tile", (int(self.tile[0]), float(self.tile[1])))
        if self.punet_tile is not None:
            fix("punet_tile", (int(self.punet_tile[0]), int(self.punet_tile[1])))
        fix("norm_percentiles", tuple(float(v) for v in self.norm_percentiles))
        fix("voxel_size_nm", tuple(float(v) for v in self.voxel_size_nm))
        if not (0.0 <= self.conf <= 1.0 and 0.0 < self.iou <= 1.0):
            raise bad("conf must be in [0, 1] and iou in (0, 1]")
        if self.fusion not in ("nms", "wbf") or self.channels not in ("single", "25d"):
            raise bad("fusion must be 'nms'/'wbf' and channels 'single'/'25d'")
        if min(self.batch_planes, self.max_det, self.n_samples, self.punet_batch_planes) < 1:
            raise bad("batch_planes, max_det, n_samples and punet_batch_planes must be >= 1")
        if not self.temperature > 0:
            raise bad("temperature must be > 0")
        if self.dedup_mode not in ("nms", "cluster"):
            raise bad("dedup_mode must be 'nms' or 'cluster'")
        if len(self.voxel_size_nm) != 3 or not all(
            math.isfinite(v) and v > 0 for v in self.voxel_size_nm
        ):
            raise bad("voxel_size_nm must be three positive numbers (z, y, x)")

    @classmethod
    def from_params(cls, params: Params) -> SpinePipelineConfig:
        """The settings the pipeline stages use (``eval_yolo``'s raw boxes, ``predict_punet``)."""
        p, c, pp = params.yolo.predict, params.yolo.convert, params.punet.predict
        spines = params.datasets.get("spines")
        voxel = (spines.voxel_size_nm if spines else None) or params.synth.spines.voxel_size_nm
        return cls(
            conf=float(min(params.yolo.sweep.confs)),
            iou=1.0,
            tile=p.tile,
            fusion=p.fusion,
            batch_planes=p.batch_planes,
            max_det=p.max_det,
            channels=c.channels,
            norm_percentiles=c.norm_percentiles,
            n_samples=pp.n_samples,
            temperature=pp.temperature,
            punet_tile=pp.tile,
            punet_batch_planes=pp.batch_planes,
            seed=params.seed,
            dedup_radius_nm=params.spines.dedup_radius_nm,
            dedup_mode=params.spines.dedup_mode,
            voxel_size_nm=voxel,
            match_dist_nm=params.spines.match_dist_nm,
        )

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SpinePipelineConfig:
        """From :meth:`to_dict` output (e.g. the JSON stored in the pyfunc model)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(
                f"spine pipeline config: unknown key(s) {unknown}; expected some of {sorted(known)}"
            )
        return cls(**dict(d))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able (tuples as lists)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    def default_fusion_params(self) -> FusionParams:
        """Untuned fusion params with this config's de-duplication."""
        return FusionParams(dedup_radius_nm=self.dedup_radius_nm, dedup_mode=self.dedup_mode)


def read_fusion_params(path: str | Path) -> FusionParams:
    """Fusion params from a YAML mapping (``params/tuned_fusion.yaml``).

    Same format as :func:`microseg.tune.fusion.write_best_params`; read here so inference needs
    no tuning code (nor Optuna).
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError("expected a fusion params YAML file, found nothing", path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"expected fusion params as YAML, could not parse it ({exc})", path
        ) from exc
    if not isinstance(data, Mapping):
        raise ConfigError(f"expected a mapping of fusion params, found {type(data).__name__}", path)
    fields_, conf = split_yolo_conf(data, path)
    return with_yolo_conf(FusionParams.from_dict(fields_), conf)


#: the fusion study's YOLO confidence (``params/tuned_fusion.yaml``): boxes below it are dropped
#: before fusion; not a :class:`FusionParams` field
YOLO_CONF_KEY = "yolo_conf"


def split_yolo_conf(
    data: Mapping[str, Any], path: str | Path | None = None
) -> tuple[dict[str, Any], float]:
    """A tuned fusion mapping -> its :class:`FusionParams` fields and ``yolo_conf`` (0.0 when
    absent: every box goes to fusion)."""
    rest = dict(data)
    conf = rest.pop(YOLO_CONF_KEY, None)
    conf = 0.0 if conf is None else conf
    if not isinstance(conf, int | float) or not 0.0 <= float(conf) <= 1.0:
        raise ConfigError(f"fusion params: {YOLO_CONF_KEY} must be in [0, 1]; found {conf!r}", path)
    return rest, float(conf)


def drop_low_conf(detections: pd.DataFrame, conf: float) -> pd.DataFrame:
    """The boxes fusion sees: those scoring at least ``conf`` (``yolo_conf``), reindexed."""
    if conf <= 0.0:
        return detections
    return detections.loc[detections["score"].to_numpy() >= conf].reset_index(drop=True)


def with_yolo_conf(params: FusionParams, conf: float) -> FusionParams:
    """``params`` whose decision tree drops what :func:`drop_low_conf` drops: raising both
    cuts to ``conf`` rejects every box below it and keeps the rest's statuses and scores (a
    box at or above ``high_conf`` is kept as is; one below it is validated or rejected as
    before), so paths that take whole stacks (``predict_spines``) need no extra filter."""
    if conf <= 0.0:
        return params
    return replace(
        params, low_conf=max(params.low_conf, conf), high_conf=max(params.high_conf, conf)
    )


def yolo_conf(cfg: SpinePipelineConfig, fusion_params: FusionParams) -> float:
    """YOLO's own confidence cut: low enough for every box the fusion tree may keep."""
    return min(float(cfg.conf), float(fusion_params.low_conf))


def resolve_voxel_size(
    explicit: Sequence[float] | None,
    from_file: Sequence[float] | None,
    default: Sequence[float],
    where: str | Path | None = None,
) -> VoxelSize:
    """Per axis (z, y, x): the caller's value, else the file's, else ``default``."""
    if explicit is not None:
        vals = tuple(float(v) for v in explicit)
        if len(vals) != 3 or not all(math.isfinite(v) and v > 0 for v in vals):
            raise ConfigError(
                f"voxel size must be three positive nm (z, y, x); found {vals}", where
            )
        return vals  # type: ignore[return-value]
    out = [float(v) for v in default]
    for i, v in enumerate(from_file or ()):
        if v is not None and math.isfinite(float(v)) and float(v) > 0:
            out[i] = float(v)
    return (out[0], out[1], out[2])


def _device(name: str) -> str:
    from microseg.utils.devices import resolve_device

    return str(resolve_device(name))


def _check_channels(yolo: Any, cfg: SpinePipelineConfig) -> None:
    trained = (getattr(yolo, "meta", None) or {}).get("channels")
    if trained and trained != cfg.channels:
        raise ConfigError(
            f"the YOLO weights were trained on {trained!r} images, but the pipeline config "
            f"feeds {cfg.channels!r} (yolo.convert.channels)"
        )


def yolo_boxes(
    yolo: Any,
    stack: TiffStack | np.ndarray,
    fusion_params: FusionParams,
    cfg: SpinePipelineConfig,
    progress: bool = False,
) -> pd.DataFrame:
    """Raw per-plane YOLO boxes (``z, x1, y1, x2, y2, score, x, y``) for the fusion tree."""
    from microseg.infer.yolo_predict import predict_stack

    _check_channels(yolo, cfg)
    return predict_stack(
        yolo,
        stack,
        conf=yolo_conf(cfg, fusion_params),
        iou=cfg.iou,
        tile=cfg.tile,
        fusion=cfg.fusion,
        batch_planes=cfg.batch_planes,
        channels=cfg.channels,
        norm_percentiles=cfg.norm_percentiles,
        max_det=cfg.max_det,
        progress=progress,
    )


def streamed_box_probability(
    punet: Any,
    stack: TiffStack | np.ndarray,
    detections: pd.DataFrame,
    fusion_params: FusionParams,
    cfg: SpinePipelineConfig,
    progress: bool = False,
) -> np.ndarray:
    """Each box's Prob-UNet spine probability, planes predicted and reduced one batch at a time.

    ``punet`` is the family's model (``get_model("punet").load(...)``): anything with
    ``predict_stack(stack, **options)`` that streams planes to ``on_plane`` (this module runs no
    family code of its own). Equals ``box_probability(prob_spine_stack, detections, agg,
    quantile)`` without holding the stack. No boxes: the network does not run.
    """
    if not hasattr(punet, "predict_stack"):
        raise ConfigError(
            f"the spine pipeline needs the punet family's model (with predict_stack); got "
            f"{type(punet).__name__}: load it with microseg.models.get_model('punet').load"
        )
    out = np.zeros(len(detections), dtype=np.float64)
    if len(detections) == 0:
        return out
    z = np.round(detections["z"].to_numpy(dtype=float)).astype(np.int64)
    depth = int(stack.shape[0])
    if z.min() < 0 or z.max() >= depth:
        raise ConfigError(f"boxes lie on planes {z.min()}..{z.max()}; the stack has {depth}")
    rows = {int(p): np.flatnonzero(z == p) for p in np.unique(z)}

    def on_plane(plane_z: int, plane: Mapping[str, np.ndarray]) -> None:
        idx = rows.get(int(plane_z))
        if idx is not None:
            out[idx] = box_probability(
                plane["prob_spine"], detections.iloc[idx], fusion_params.agg, fusion_params.quantile
            )

    punet.predict_stack(
        stack,
        n_samples=cfg.n_samples,
        temperature=cfg.temperature,
        tile=cfg.punet_tile,
        batch_planes=cfg.punet_batch_planes,
        seed=cfg.seed,
        device=_device(cfg.device),
        collect=False,
        on_plane=on_plane,
        progress=progress,
    )
    return out


def _predict(
    stack_path: str | Path,
    yolo: Any,
    punet: Any,
    fusion_params: FusionParams,
    cfg: SpinePipelineConfig,
    voxel_size_nm: Sequence[float] | None,
    progress: bool,
) -> tuple[FusionResult, VoxelSize, tuple[int, ...]]:
    with open_stack(stack_path, expect_ndim=3) as stack:
        voxel = resolve_voxel_size(
            voxel_size_nm, stack.voxel_size_nm, cfg.voxel_size_nm, stack_path
        )
        dets = yolo_boxes(yolo, stack, fusion_params, cfg, progress)
        probs = streamed_box_probability(punet, stack, dets, fusion_params, cfg, progress)
        shape = tuple(stack.shape)
    result = fuse_with_probabilities(dets, probs, fusion_params, voxel)
    log.info(
        "%s: %d boxes -> %d high + %d validated -> %d spines",
        Path(stack_path).name,
        result.stats["yolo_total"],
        result.stats["kept_high_conf"],
        result.stats["kept_validated"],
        result.stats["kept_after_dedup"],
    )
    return result, voxel, shape


def predict_spines(
    stack_path: str | Path,
    yolo: Any,
    punet: Any,
    fusion_params: FusionParams,
    cfg: SpinePipelineConfig,
    voxel_size_nm: Sequence[float] | None = None,
    progress: bool = False,
) -> FusionResult:
    """Fused, de-duplicated spines of one ``ZYX`` TIFF stack (``result.dedup``, best first).

    ``yolo``: a :class:`~microseg.models.yolo.YoloSpineDetector` (anything with its
    ``predict``); ``punet``: a :class:`~microseg.models.punet.ProbUNet`. ``voxel_size_nm``
    (z, y, x) overrides the file's metadata; see the module notes for the rest.
    """
    return _predict(stack_path, yolo, punet, fusion_params, cfg, voxel_size_nm, progress)[0]


# --------------------------------------------------------------------------- folders


def list_stacks(inputs: str | Path | Iterable[str | Path]) -> list[Path]:
    """A folder's ``*.tif``/``*.tiff`` (sorted, hidden files skipped), one file, or a list."""
    if isinstance(inputs, str | Path):
        root = Path(inputs)
        if root.is_dir():
            paths = sorted(
                p
                for p in root.iterdir()
                if p.is_file() and p.suffix.lower() in STACK_SUFFIXES and not p.name.startswith(".")
            )
            if not paths:
                raise MissingFileError("expected TIFF stacks (*.tif, *.tiff), found none", root)
        elif root.is_file():
            paths = [root]
        else:
            raise MissingFileError(
                "expected a folder of TIFF stacks or a TIFF file, found nothing", root
            )
    else:
        paths = [Path(p) for p in inputs]
    stems: dict[str, Path] = {}
    for p in paths:
        if p.stem in stems:
            raise ConfigError(
                f"stacks {stems[p.stem].name} and {p.name} would share the result folder "
                f"{p.stem!r}; rename one"
            )
        stems[p.stem] = p
    return paths


def find_points(stack: Path, annotations: str | Path | None = None) -> Path | None:
    """``<stem>.csv`` or ``<stem>_points.csv`` in ``annotations`` (default: beside the stack)."""
    folder = Path(annotations) if annotations is not None else stack.parent
    for name in (f"{stack.stem}.csv", f"{stack.stem}_points.csv"):
        if (folder / name).is_file():
            return folder / name
    return None


#: written after ``results.json``: what produced the result (params, models, the run key)
RUN_NAME = "run.json"


def run_key(
    fusion_params: FusionParams,
    cfg: SpinePipelineConfig,
    voxel_size_nm: Sequence[float] | None,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """A digest of everything that decides a stack's result except the stack itself (the
    fusion thresholds, the pipeline config, the voxel size, and what the caller adds: the
    models' file digests). A finished result counts only under the same key (issue 18: a
    rerun with other fusion params reported the old results as "skipped")."""
    import hashlib

    payload = {
        "fusion": asdict(fusion_params),
        "cfg": asdict(cfg),
        "voxel_size_nm": list(voxel_size_nm) if voxel_size_nm is not None else None,
        "extra": dict(extra or {}),
    }
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def is_finished(
    stack: Path, result_dir: Path, points: Path | None = None, key: str | None = None
) -> bool:
    """``results.json`` exists, is newer than the stack and its points, and ``run.json``
    (written after it) holds ``key``: an interrupted or differently configured run is redone."""
    done = result_dir / "results.json"
    if not done.is_file():
        return False
    if key is not None:
        try:
            if json.loads((result_dir / RUN_NAME).read_text()).get("key") != key:
                return False
        except (OSError, ValueError):
            return False
    inputs = [stack, *([points] if points is not None else [])]
    return all(done.stat().st_mtime_ns > p.stat().st_mtime_ns for p in inputs if p.exists())


def _row(stack: Path, status: str, result_dir: Path, points: Path | None, **kw: Any) -> dict:
    row = dict.fromkeys(SUMMARY_COLS)
    row.update(
        stack=stack.name,
        status=status,
        error="",
        result_dir=str(result_dir),
        points=str(points) if points else "",
    )
    row.update(kw)
    return row


def _row_from_results(stack: Path, result_dir: Path, points: Path | None) -> dict:
    res = json.loads((result_dir / "results.json").read_text())
    stats, m = res.get("statistics") or {}, res.get("metrics") or {}
    return _row(
        stack,
        "skipped",
        result_dir,
        points,
        n_spines=res.get("detections"),
        n_kept_boxes=res.get("detections_before_dedup"),
        n_boxes=stats.get("yolo_total"),
        **{k: m.get(k) for k in ("precision", "recall", "f1", "tp", "fp", "fn")},
    )


def predict_folder(
    inputs: str | Path | Iterable[str | Path],
    out_dir: str | Path,
    yolo: Any,
    punet: Any,
    fusion_params: FusionParams,
    cfg: SpinePipelineConfig,
    *,
    voxel_size_nm: Sequence[float] | None = None,
    annotations: str | Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
    models_key: Mapping[str, Any] | None = None,
) -> pd.DataFrame:
    """:func:`predict_spines` on every stack; one ``<out_dir>/<stem>/`` per stack.

    Each result folder holds ``predictions_raw.csv``, ``predictions_dedup.csv`` and
    ``results.json`` (:func:`~microseg.infer.fusion.write_fusion_outputs`; precision, recall
    and F1 when a points CSV is found, see :func:`find_points`). A stack whose
    ``results.json`` is newer than it (and than its points) is skipped unless ``overwrite``,
    so an interrupted run resumes. A stack that cannot be read (or whose points are bad) is
    logged, marked ``failed`` with the reason, and the run goes on.

    Returns the summary (:data:`SUMMARY_COLS`; ``status`` is ``done``, ``skipped`` or
    ``failed``), also written to ``<out_dir>/summary.csv``.
    """
    from microseg.io.points import read_points

    stacks = list_stacks(inputs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    key = run_key(fusion_params, cfg, voxel_size_nm, models_key)
    rows = []
    bar = tqdm(stacks, desc="stacks", unit="stack", disable=bar_disabled(progress))
    for stack in bar:
        bar.set_postfix_str(stack.name)
        rdir = out / stack.stem
        points = find_points(stack, annotations)
        if not overwrite and is_finished(stack, rdir, points, key):
            log.info("%s: finished earlier (%s); skipped", stack.name, rdir / "results.json")
            rows.append(_row_from_results(stack, rdir, points))
            continue
        (rdir / RUN_NAME).unlink(missing_ok=True)  # until the new result is whole
        t0 = time.perf_counter()
        try:
            result, voxel, shape = _predict(
                stack, yolo, punet, fusion_params, cfg, voxel_size_nm, progress=False
            )
            metrics = None
            if points is not None:
                gt = read_points(points, shape=shape[:3], allow_empty=True)
                metrics = evaluate_fusion(result, gt, voxel, cfg.match_dist_nm)
            write_fusion_outputs(rdir, result, metrics)
            with atomic_path(rdir / RUN_NAME) as tmp:
                tmp.write_text(json.dumps({"key": key, "models": dict(models_key or {})}) + "\n")
        except (MicrosegError, OSError) as exc:
            log.warning("%s: failed, skipped: %s", stack.name, exc)
            rows.append(_row(stack, "failed", rdir, points, error=str(exc)))
            continue
        m = metrics or {}
        rows.append(
            _row(
                stack,
                "done",
                rdir,
                points,
                n_spines=len(result.dedup),
                n_kept_boxes=result.stats["kept_high_conf"] + result.stats["kept_validated"],
                n_boxes=result.stats["yolo_total"],
                seconds=time.perf_counter() - t0,
                **{k: m.get(k) for k in ("precision", "recall", "f1", "tp", "fp", "fn")},
            )
        )
    summary = pd.DataFrame(rows, columns=SUMMARY_COLS)
    with atomic_path(out / SUMMARY_NAME) as tmp:
        summary.to_csv(tmp, index=False)
    failed = summary.loc[summary["status"] == "failed", "stack"].tolist()
    if failed:
        log.warning("%d of %d stack(s) failed: %s", len(failed), len(summary), failed)
    return summary


__all__: Sequence[str] = (
    "SUMMARY_COLS",
    "YOLO_CONF_KEY",
    "SpinePipelineConfig",
    "drop_low_conf",
    "find_points",
    "is_finished",
    "list_stacks",
    "predict_folder",
    "predict_spines",
    "read_fusion_params",
    "resolve_voxel_size",
    "split_yolo_conf",
    "streamed_box_probability",
    "with_yolo_conf",
    "yolo_boxes",
    "yolo_conf",
)
