"""Tracking stages: ``track`` (masks -> CTC result) and ``evaluate_tracking`` (CTC scores).

``track`` links per-frame instance masks of the test sequences. The masks come from the
segmentation model (``masks: model``) or, to test the linker alone, from the ground truth
with every frame's ids shuffled (``masks: gt``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from microseg.config import Params
from microseg.errors import MissingFileError
from microseg.io import ctc, tiff
from microseg.stages.common import metrics_file, samples, write_json

log = logging.getLogger(__name__)

RESULT_DIR = Path("reports/tracking")
SEG_PRED_DIR = Path("reports/tracking_seg")
SEG_MODEL_DIR = Path("models/tracking_seg")
SEG_TARGETS = Path("data/targets/tracking")


def _sequences(params: Params, split: str) -> list[str]:
    """CTC sequence names (``01``...) of a split of the prepared tracking dataset."""
    return [
        s.sample_id.removeprefix("seq") for s in samples(params.paths.prepared / "tracking", split)
    ]


def _frame_items(params: Params, splits: tuple[str, ...]):
    """Every frame of the sequences of ``splits`` as a 2D image with its instance labels."""
    from microseg.data.targets import RawItem

    gt_root = Path(params.datasets["tracking"].source)
    for split in splits:
        for seq in _sequences(params, split):
            gt = ctc.read_ctc_gt(gt_root, seq)
            for t, (frame, labels) in enumerate(zip(gt.frames, gt.tra, strict=True)):
                yield RawItem(
                    f"seq{seq}_t{t:03d}",
                    split,
                    "fluorescence",
                    frame,
                    labels,
                    str(gt_root / seq / f"t{t:03d}.tif"),
                )


def train_tracking_seg(params: Params, hooks=None) -> dict[str, Any]:
    """U-Net (the cells family) on the frames of the train/val sequences; then segment
    every frame of the tracking split into ``reports/tracking_seg/<seq>.tif``."""
    from microseg.data.targets import WeightMapConfig, write_targets
    from microseg.stages.cells import train_unet_model

    t = params.cells.targets
    weights = WeightMapConfig(w0=t.w0, sigma=t.sigma, max_class_weight=t.max_class_weight)
    index = write_targets(
        _frame_items(params, ("train", "val")), SEG_TARGETS, weights, tuple(t.percentiles)
    )
    train = params.engine.train_section(params.tracking.seg.train)
    out = train_unet_model(train, SEG_TARGETS, SEG_MODEL_DIR, hooks)
    out["n_frames_train"] = int((index["split"] == "train").sum())
    out["n_frames_val"] = int((index["split"] == "val").sum())
    out["segmented"] = segment_sequences(params)
    return out


def segment_sequences(params: Params, out_dir: Path = SEG_PRED_DIR) -> dict[str, int]:
    """Instance masks of every frame of the tracking split's sequences (TYX uint16)."""
    from microseg.models import get_model

    seg = params.tracking.seg
    model = get_model("unet").load(SEG_MODEL_DIR / "best.pt", train=seg.train, infer=seg.infer)
    predict = model.as_predictor()
    gt_root = Path(params.datasets["tracking"].source)
    counts = {}
    for seq in _sequences(params, params.tracking.split):
        frames = ctc.read_ctc_gt(gt_root, seq).frames
        masks = np.stack([predict(f)[0] for f in frames]).astype(np.uint16)
        tiff.write_stack(out_dir / f"{seq}.tif", masks)
        counts[seq] = int(sum(len(np.unique(m[m > 0])) for m in masks))
    return counts


def shuffled_ids(masks: np.ndarray, seed: int) -> np.ndarray:
    """Every frame's instance ids replaced by a random permutation (no identity leaks)."""
    rng = np.random.default_rng(seed)
    out = np.zeros_like(masks, dtype=np.uint32)
    for t, frame in enumerate(masks):
        ids = np.unique(frame[frame > 0])
        lut = np.zeros(int(frame.max()) + 1, np.uint32)
        lut[ids] = rng.permutation(len(ids)) + 1 + rng.integers(0, 1000)
        out[t] = lut[frame]
    return out


def track(params: Params, out_dir: Path = RESULT_DIR) -> dict[str, Any]:
    from microseg.infer.tracking import LinkConfig, link
    from microseg.report.tracking_figures import save_lineage_plot, save_track_montage

    cfg = params.tracking
    gt_root = Path(params.datasets["tracking"].source)
    link_cfg = LinkConfig(**cfg.link)
    summary = {}
    for seq in _sequences(params, cfg.split):
        gt = ctc.read_ctc_gt(gt_root, seq)
        if cfg.masks == "gt":
            masks = shuffled_ids(gt.tra, params.seed)
        else:
            pred = SEG_PRED_DIR / f"{seq}.tif"
            if not pred.exists():
                raise MissingFileError("segmentation of the sequence missing", pred)
            masks = tiff.read_stack(pred)
        tracked, tracks = link(masks, link_cfg)
        ctc.write_ctc_result(out_dir, seq, tracked, tracks)
        save_track_montage(tracked, out_dir / f"{seq}_montage.png", images=gt.frames)
        save_lineage_plot(tracks, out_dir / f"{seq}_lineage.png", title=f"sequence {seq}")
        summary[seq] = {
            "n_tracks": len(tracks),
            "n_divisions": int((tracks["P"] > 0).sum() // 2),
        }
    return summary


def evaluate_tracking(params: Params, res_dir: Path = RESULT_DIR) -> dict[str, Any]:
    """CTC scores of the test sequences -> ``metrics/tracking.json``."""
    from microseg.evaluate.tracking import evaluate_ctc, per_frame_scores

    gt_root = Path(params.datasets["tracking"].source)
    out: dict[str, Any] = {"masks": params.tracking.masks}
    for seq in _sequences(params, params.tracking.split):
        scores = evaluate_ctc(gt_root, seq, res_dir)
        gt = ctc.read_ctc_gt(gt_root, seq)
        res = ctc.read_ctc_result(res_dir, seq)
        frames = per_frame_scores(gt.tra, res.masks)
        scores["mean_fg_iou"] = float(frames["fg_iou"].mean())
        scores["mean_rand_error"] = float(frames["rand_error"].mean())
        out[seq] = scores
    write_json(metrics_file(params, "tracking"), out)
    return out
