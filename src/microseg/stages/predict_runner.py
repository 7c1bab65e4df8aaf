"""A loaded model of any task behind one call: :class:`Runner` turns an
:class:`~microseg.stages.predict_inputs.Input` into a
:class:`~microseg.stages.predict_result.Result`.

Nuclei models run through their family's predictor (``raw image -> labels, foreground
probability, scores``), exactly as ``evaluate_cells`` scores them. Tracking segments every
frame (a family with ``predict_sequence`` sees the whole time-lapse in order, as
``track@<name>`` runs it) and links the masks with ``tracking.link``
(:func:`microseg.infer.tracking.link`). Spines run as ``microseg predict`` always did (YOLO
boxes de-duplicated in 3D, Prob-UNet maps), or, for a registered spine model, the fused
pipeline it was registered with.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np

from microseg.config import Params
from microseg.errors import ConfigError, MissingFileError
from microseg.stages.predict_inputs import Input
from microseg.stages.predict_models import FUSION_FAMILY, ModelSpec, load_segmenter
from microseg.stages.predict_result import (
    NucleiResult,
    Result,
    SpineResult,
    TrackingResult,
    track_rows,
)


class Runner:
    """``spec``'s model, loaded once, with the params it predicts with."""

    def __init__(self, params: Params, spec: ModelSpec) -> None:
        self.params, self.spec = params, spec
        self.model: Any = None
        self.predictor: Any = None
        if spec.task == "spines":
            self._load_spines()
        else:
            self.model = load_segmenter(spec)
            sequence = getattr(self.model, "predict_sequence", None)
            if spec.task == "tracking" and sequence is not None:
                self.predictor = None
            else:
                self.predictor = self.model.as_predictor()

    @property
    def task(self) -> str:
        return self.spec.task

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def family(self) -> str:
        return self.spec.family

    def predict(self, item: Input) -> Result:
        t0 = time.perf_counter()
        if self.task == "nuclei":
            result: Result = self._nuclei(item)
        elif self.task == "tracking":
            result = self._tracking(item)
        else:
            result = self._spines(item)
        result.seconds = time.perf_counter() - t0
        return result

    # --------------------------------------------------------------------------- nuclei
    def _nuclei(self, item: Input) -> NucleiResult:
        labels, prob, scores = self.predictor(item.array)
        return NucleiResult(
            item.name,
            labels=np.asarray(labels).astype(np.uint16, copy=False),
            probability=None if prob is None else np.asarray(prob, np.float32),
            pixel_size_um=item.pixel_size_um,
            scores=scores,
            image=item.array,
        )

    # --------------------------------------------------------------------------- tracking
    def segment_frames(self, frames: np.ndarray) -> np.ndarray:
        """Instance masks of every frame (``TYX`` uint16; ids mean nothing across frames)."""
        if self.predictor is None:
            masks = self.model.predict_sequence(frames)[0]
        else:
            masks = np.stack([self.predictor(f)[0] for f in frames])
        return np.asarray(masks).astype(np.uint16, copy=False)

    def _tracking(self, item: Input) -> TrackingResult:
        from microseg.infer.tracking import LinkConfig, link

        masks = self.segment_frames(item.array)
        tracked, table = link(masks, LinkConfig.from_mapping(self.params.tracking.link))
        return TrackingResult(
            item.name,
            labels=tracked,
            tracks=track_rows(tracked, table, item.pixel_size_um),
            pixel_size_um=item.pixel_size_um,
            track_table=table,
        )

    # --------------------------------------------------------------------------- spines
    def _load_spines(self) -> None:
        spec, params = self.spec, self.params
        if spec.family == FUSION_FAMILY:
            from microseg.infer.spine_pipeline import SpinePipelineConfig, read_fusion_params
            from microseg.models.yolo import YoloSpineDetector
            from microseg.stages.punet import load_prob_model
            from microseg.utils.devices import auto_device

            cfg = SpinePipelineConfig.from_dict(spec.config)
            device = params.punet.predict.device or cfg.device
            if device == "auto":
                device = auto_device()
            cfg = dataclasses.replace(cfg, device=device)
            self.fusion = (cfg, read_fusion_params(spec.files["fusion"]))
            yolo = YoloSpineDetector.load(spec.files["yolo"])
            punet = load_prob_model(spec.files["punet"], map_location=device)
            self.model = (yolo, punet)
            return
        weights = spec.weights
        if weights is None or not Path(weights).is_file():
            hint = f"train it (microseg train -m {spec.name})" if spec.source == "params" else ""
            raise MissingFileError(f"no {spec.family} weights; {hint or 'give --weights'}", weights)
        if spec.family == "yolo":
            from microseg.stages.spines import load_yolo

            self.model = load_yolo(Path(weights), params)
        elif spec.family == "punet":  # either Prob-UNet family's file (spines.prob_model)
            from microseg.stages.punet import load_prob_model

            self.model = load_prob_model(weights)
        else:
            raise ConfigError(f"unknown spine model {spec.family!r}; available: yolo, punet")

    def _voxel(self, item: Input) -> tuple[float, float, float] | None:
        from microseg.io import tiff

        if item.voxel_size_nm is not None:
            return item.voxel_size_nm
        with tiff.open_stack(item.path, expect_ndim=3) as st:
            found = st.voxel_size_nm
        if found is not None:
            return found
        datasets = self.params.datasets
        name = getattr(self.params.spines, "dataset", "spines")
        return datasets[name].voxel_size_nm if name in datasets else None

    def _spines(self, item: Input) -> SpineResult:
        if self.family == FUSION_FAMILY:  # the file's voxel size, else the registered one
            from microseg.infer.spine_pipeline import predict_spines

            cfg, fusion_params = self.fusion
            yolo, punet = self.model
            voxel = item.voxel_size_nm
            res = predict_spines(item.path, yolo, punet, fusion_params, cfg, voxel)
            return SpineResult(
                item.name, points=res.dedup, family=self.family, voxel_size_nm=voxel, native=res
            )
        voxel = self._voxel(item)
        if voxel is None:
            raise ConfigError(
                f"{item.path}: no voxel size in the file; give --voxel-size z,y,x (nm)"
            )
        if self.family == "yolo":
            return self._yolo(item, voxel)
        from microseg.stages.punet import predict_stack

        p = self.params.punet.predict
        res = predict_stack(self.model, item.path, self.params)
        n = float(res["n_samples"])
        mean = res["sum_p_spine"] / n
        return SpineResult(
            item.name,
            probability=res["prob_spine"],
            uncertainty=np.maximum(res["sum_p2_spine"] / n - mean**2, 0.0),
            family="punet",
            voxel_size_nm=voxel,
            native=res,
            size_thr=p.size_thr,
            prob_thr=p.prob_thr,
        )

    def _yolo(self, item: Input, voxel: tuple[float, float, float]) -> SpineResult:
        from microseg.infer.yolo_predict import detections_to_points, nms_per_plane, predict_stack
        from microseg.stages.spines import yolo_stack_kwargs

        p, s = self.params.yolo.predict, self.params.spines
        boxes = predict_stack(
            self.model, item.path, conf=p.conf, iou=p.iou, **yolo_stack_kwargs(self.params)
        )
        boxes = nms_per_plane(boxes, iou=p.iou, conf=p.conf)
        points = detections_to_points(boxes, voxel, s.dedup_radius_nm, s.dedup_mode)
        return SpineResult(item.name, points=points, boxes=boxes, voxel_size_nm=voxel)


__all__ = ["Runner"]
