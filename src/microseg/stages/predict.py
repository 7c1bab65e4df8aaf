"""Prediction on new stacks, outside the pipeline: ``microseg predict`` and ``fuse --input``.

Stacks are predicted plane by plane (memory does not grow with depth). A folder gives one
result folder per stack; a stack that cannot be read is reported and the rest go on.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from microseg.config import Params
from microseg.errors import ConfigError, MicrosegError
from microseg.utils.atomic import atomic_path

log = logging.getLogger(__name__)

MODELS = ("yolo", "punet")
Voxel = tuple[float, float, float] | None


@dataclass
class PredictResult:
    """``messages``: one line per predicted stack; ``failed``: ``(stack name, reason)``."""

    n_stacks: int
    messages: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    folder: bool = False


def load_model(params: Params, model: str, weights: Path | None = None) -> Any:
    """YOLO or Prob-UNet weights (default ``models/<model>/best.pt``) on the params' device."""
    from microseg.stages import punet, spines

    if model == "yolo":
        return spines.load_yolo(weights or spines.YOLO_MODEL_DIR / "best.pt", params)
    if model == "punet":
        from microseg.models.punet import load_punet

        return load_punet(weights or punet.MODEL_DIR / "best.pt")
    raise ConfigError(f"unknown model {model!r}; available: yolo, punet")


def predict_stacks(
    params: Params,
    stack: Path,
    out: Path,
    model: str = "yolo",
    weights: Path | None = None,
    voxel_size: Voxel = None,
) -> PredictResult:
    """One stack -> ``out``; a folder of stacks -> ``out/<stem>`` each."""
    from tqdm.auto import tqdm

    net = load_model(params, model, weights)
    if not stack.is_dir():
        return PredictResult(1, [predict_one(net, model, stack, out, voxel_size, params)])
    stacks = sorted(p for p in stack.iterdir() if p.suffix.lower() in (".tif", ".tiff"))
    if not stacks:
        raise ConfigError(f"no .tif stacks in {stack}")
    result = PredictResult(len(stacks), folder=True)
    for path in tqdm(stacks, desc=f"predict {model}"):
        try:
            msg = predict_one(net, model, path, out / path.stem, voxel_size, params)
            log.info("%s: %s", path.name, msg)
            result.messages.append(msg)
        except MicrosegError as exc:
            result.failed.append((path.name, str(exc)))
    return result


def predict_one(net: Any, model: str, stack: Path, out: Path, voxel_size: Voxel, params) -> str:
    """One stack -> ``out``: YOLO boxes + 3D spines, or Prob-UNet maps."""
    from microseg.io import tiff

    with tiff.open_stack(stack, expect_ndim=3) as st:
        voxel = voxel_size or st.voxel_size_nm or params.datasets["spines"].voxel_size_nm
    if model == "yolo":
        from microseg.infer.yolo_predict import detections_to_points, nms_per_plane, predict_stack

        p, c, s = params.yolo.predict, params.yolo.convert, params.spines
        boxes = predict_stack(
            net,
            stack,
            conf=p.conf,
            iou=p.iou,
            tile=p.tile,
            fusion=p.fusion,
            batch_planes=p.batch_planes,
            channels=c.channels,
            norm_percentiles=c.norm_percentiles,
            max_det=p.max_det,
        )
        boxes = nms_per_plane(boxes, iou=p.iou, conf=p.conf)
        points = detections_to_points(boxes, voxel, s.dedup_radius_nm, s.dedup_mode)
        for name, df in (("detections.csv", boxes), ("spines.csv", points)):
            with atomic_path(out / name) as tmp:
                df.to_csv(tmp, index=False)
        return f"{len(boxes)} boxes, {len(points)} spines after 3D dedup -> {out}"
    from microseg.models.punet.predict import write_predictions
    from microseg.stages.punet import predict_stack

    p = params.punet.predict
    result = predict_stack(net, stack, params)
    write_predictions(out, result, voxel, size_thr=p.size_thr, prob_thr=p.prob_thr)
    return f"probabilities, masks and uncertainty sums -> {out}"


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
    )
