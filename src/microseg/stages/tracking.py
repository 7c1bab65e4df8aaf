"""Tracking stages: ``train_tracking_seg@<name>`` (a segmenter), ``track@<name>`` (its masks
-> CTC result) and ``evaluate_tracking`` (CTC scores of every segmenter).

The segmenters of ``tracking.segmenters`` are registered families trained on the frames of
the train/val sequences (one targets cache per segmenter, the same frames for all) and run on
every frame of the test sequences: a family with ``predict_sequence`` (``lstmunet``) sees a
whole sequence in order, any other (``unet``) one frame at a time. ``track@<name>`` links one
segmenter's per-frame instance masks (``masks: model``), or, to test the linker alone, the
ground truth with every frame's ids shuffled (``masks: gt``). ``evaluate_tracking`` scores
every segmenter's tracks on the same sequences: ``metrics/tracking.json`` holds
``{"masks": ..., "<name>": {"<seq>": {SEG, DET, TRA, ...}}}``.

Every linker of ``tracking.linker`` + ``tracking.compare_linkers`` links the same masks: our
linker's result is ``reports/tracking/<name>`` (row ``<name>``), another linker's is
``reports/tracking/<name>/<linker>`` (row ``<name>+<linker>``), inside the folder that
``track@<name>`` owns.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from microseg.config import Params, TrackingSegConfig
from microseg.errors import ConfigError, DataFormatError, MissingFileError
from microseg.io import ctc, tiff
from microseg.stages.common import metrics_file, samples, write_json

log = logging.getLogger(__name__)

RESULT_DIR = Path("reports/tracking")  # <name>/<seq>_RES, montages, lineage plots
SEG_PRED_DIR = Path("reports/tracking_seg")  # <name>/<seq>.tif
SEG_MODEL_DIR = Path("models/tracking_seg")  # <name>/best.pt
SEG_TARGETS = Path("data/targets/tracking")  # <name>/ (targets cache of the frames)
INFO_NAME = "train_info.json"


def segmenter(params: Params, name: str) -> TrackingSegConfig:
    """The segmenter ``name`` of ``tracking.segmenters`` (a ConfigError naming the others)."""
    segs = params.tracking.segmenters
    if name not in segs:
        raise ConfigError(
            f"unknown tracking segmenter {name!r}; params.yaml defines {sorted(segs)}"
        )
    return segs[name]


def segmenter_names(params: Params, name: str | None = None) -> list[str]:
    """``[name]`` (checked), or every segmenter when None."""
    if name is None:
        return list(params.tracking.segmenters)
    segmenter(params, name)
    return [name]


def _sequences(params: Params, split: str) -> list[str]:
    """CTC sequence names (``01``...) of a split of the prepared tracking dataset."""
    return [
        s.sample_id.removeprefix("seq") for s in samples(params.prepared_dir("tracking"), split)
    ]


def _frame_items(params: Params, splits: tuple[str, ...]):
    """Every frame of the sequences of ``splits`` as a 2D image with its instance labels."""
    from microseg.data.targets import RawItem

    gt_root = params.dataset_source("tracking")
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


def train_tracking_seg(params: Params, name: str, hooks=None) -> dict[str, Any]:
    """Train segmenter ``name`` on the frames of the train/val sequences, then segment every
    frame of the tracking split into ``reports/tracking_seg/<name>/<seq>.tif``."""
    from microseg.data.targets import WeightMapConfig, write_targets
    from microseg.models import get_model
    from microseg.stages.cells import count_parameters

    sc = segmenter(params, name)
    family = get_model(sc.family)
    if not getattr(family, "trainable", True):
        raise ConfigError(f"tracking segmenter {name!r} ({sc.family}) has nothing to train")
    t = params.cells.targets
    weights = WeightMapConfig(w0=t.w0, sigma=t.sigma, max_class_weight=t.max_class_weight)
    targets = SEG_TARGETS / name
    index = write_targets(
        _frame_items(params, ("train", "val")), targets, weights, tuple(t.percentiles)
    )
    model_dir = SEG_MODEL_DIR / name
    start = time.perf_counter()
    from microseg.stages.finetune import resolve_init_from

    train = resolve_init_from(params.engine.train_section(sc.train), params, "weights")
    result = family.train(targets, model_dir, train, hooks)
    seconds = float(result.seconds or time.perf_counter() - start)
    n_params = count_parameters(model_dir / "best.pt")
    # no seconds in the hashed info file (times: timing.json and the MLflow run)
    write_json(model_dir / INFO_NAME, {"n_params": n_params, "family": sc.family})
    return {
        "best": result.best,
        "best_epoch": result.best_epoch,
        "epochs": result.epochs_completed,
        "seconds": seconds,
        "n_params": n_params,
        "n_frames_train": int((index["split"] == "train").sum()),
        "n_frames_val": int((index["split"] == "val").sum()),
        "segmented": segment_sequences(params, name),
    }


def segment_sequences(params: Params, name: str, out_dir: Path | None = None) -> dict[str, int]:
    """Instance masks of every frame of the tracking split's sequences (TYX uint16) by
    segmenter ``name``: whole sequences in order when its family has ``predict_sequence``,
    else frame by frame; returns the number of objects per sequence."""
    from microseg.models import get_model

    sc = segmenter(params, name)
    weights = SEG_MODEL_DIR / name / "best.pt"
    model = get_model(sc.family).load(weights, train=sc.train, infer=sc.infer)
    predict_sequence = getattr(model, "predict_sequence", None)
    predict = None if predict_sequence is not None else model.as_predictor()
    out_dir = SEG_PRED_DIR / name if out_dir is None else out_dir
    gt_root = params.dataset_source("tracking")
    counts = {}
    for seq in _sequences(params, params.tracking.split):
        frames = ctc.read_ctc_gt(gt_root, seq).frames
        if predict_sequence is not None:
            masks = np.asarray(predict_sequence(frames)[0])
        else:
            masks = np.stack([predict(f)[0] for f in frames])
        masks = masks.astype(np.uint16)
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


def linkers(params: Params) -> list[str]:
    """``tracking.linker`` then ``tracking.compare_linkers``, each once."""
    cfg = params.tracking
    return list(dict.fromkeys([cfg.linker, *cfg.compare_linkers]))


def row_name(name: str, linker: str) -> str:
    """The ``metrics/tracking.json`` key: ``<name>`` for our linker, ``<name>+<linker>``."""
    return name if linker == "ours" else f"{name}+{linker}"


def linker_dir(root: Path, linker: str) -> Path:
    """Where a linker's CTC results go inside a segmenter's result folder ``root``."""
    return root if linker == "ours" else root / linker


def linker_function(params: Params, linker: str):
    """``(masks, frames) -> (tracked, tracks)`` for ``linker`` with its params (checked now, so
    a bad key fails before any sequence is read). laptrack links centroids and ignores the
    frames; ours reads their intensity for the division cue."""
    if linker == "laptrack":
        from microseg.infer.tracking_laptrack import link_laptrack, make_laptrack

        make_laptrack(params.tracking.laptrack)
        return lambda masks, frames: link_laptrack(masks, params.tracking.laptrack)
    from microseg.infer.tracking import LinkConfig, link

    link_cfg = LinkConfig.from_mapping(params.tracking.link)
    if params.tracking.masks == "gt":
        # ground truth has no merged masks to cut and no pinched mothers drawn as two: the
        # mask repairs for model masks would only alter it (masks: gt checks the linker alone)
        link_cfg = dataclasses.replace(link_cfg, split_merges=False, join_pinched=False)
    return lambda masks, frames: link(masks, link_cfg, images=frames)


def track(params: Params, name: str, out_dir: Path | None = None) -> dict[str, Any]:
    """Link segmenter ``name``'s masks (or shuffled ground truth, ``masks: gt``) of every
    sequence of the tracking split into ``reports/tracking/<name>/`` (CTC results, figures),
    once per linker (:func:`linkers`)."""
    from microseg.report.tracking_figures import save_lineage_plot, save_track_montage

    cfg = params.tracking
    segmenter(params, name)
    out_dir = RESULT_DIR / name if out_dir is None else out_dir
    gt_root = params.dataset_source("tracking")
    functions = {lk: linker_function(params, lk) for lk in linkers(params)}
    summary: dict[str, Any] = {}
    for seq in _sequences(params, cfg.split):
        gt = ctc.read_ctc_gt(gt_root, seq)
        if cfg.masks == "gt":
            masks = shuffled_ids(gt.tra, params.seed)
        else:
            pred = SEG_PRED_DIR / name / f"{seq}.tif"
            if not pred.exists():
                raise MissingFileError(
                    f"segmentation of the sequence missing; run train_tracking_seg@{name}", pred
                )
            masks = tiff.read_stack(pred)
        summary[seq] = {}
        for lk, function in functions.items():
            start = time.perf_counter()
            tracked, tracks = function(masks, gt.frames)
            seconds = time.perf_counter() - start
            where = linker_dir(out_dir, lk)
            ctc.write_ctc_result(where, seq, tracked, tracks)
            title = f"sequence {seq} ({row_name(name, lk)})"
            save_track_montage(tracked, where / f"{seq}_montage.png", images=gt.frames)
            save_lineage_plot(tracks, where / f"{seq}_lineage.png", title=title)
            suffix = "" if lk == "ours" else f"_{lk}"
            summary[seq] |= {
                f"n_tracks{suffix}": len(tracks),
                f"n_divisions{suffix}": _n_divisions(tracks),
                f"link_seconds{suffix}": round(seconds, 3),
            }
    return summary


def _n_divisions(tracks) -> int:
    """Parents with two or more daughters (a single daughter is a closed gap)."""
    children = tracks.loc[tracks["P"] > 0, "P"].value_counts()
    return int((children >= 2).sum())


def evaluate_tracking(params: Params, res_root: Path = RESULT_DIR) -> dict[str, Any]:
    """CTC scores of every segmenter's tracks on the test sequences -> one row per segmenter
    x linker (:func:`row_name`) and sequence in ``metrics/tracking.json``."""
    from microseg.evaluate.tracking import evaluate_ctc, per_frame_scores

    gt_root = params.dataset_source("tracking")
    out: dict[str, Any] = {"masks": params.tracking.masks}
    seqs = _sequences(params, params.tracking.split)
    pairs = [(n, lk) for n in params.tracking.segmenters for lk in linkers(params)]
    for name, lk in pairs:
        res_dir = linker_dir(res_root / name, lk)
        rows = {}
        for seq in seqs:
            if not (res_dir / f"{seq}_RES").is_dir():
                raise MissingFileError(
                    f"no tracks of {name!r} by linker {lk!r}; run track@{name}", res_dir
                )
            gt = ctc.read_ctc_gt(gt_root, seq)
            res = ctc.read_ctc_result(res_dir, seq)
            full = [t for t, m in enumerate(res.masks) if m.min() > 0]
            if full:  # py-ctcmetrics needs background in every frame; say why, not its error
                raise DataFormatError(
                    f"{name}: frames {full[:5]} of sequence {seq} have no background pixel "
                    "(one object covers the field: an untrained segmenter?); the CTC scorer "
                    "needs background in every frame",
                    res_dir,
                )
            scores = evaluate_ctc(gt_root, seq, res_dir)
            frames = per_frame_scores(gt.tra, res.masks)
            scores["mean_fg_iou"] = float(frames["fg_iou"].mean())
            scores["mean_rand_error"] = float(frames["rand_error"].mean())
            rows[seq] = scores
        out[row_name(name, lk)] = rows
    write_json(metrics_file(params, "tracking"), out)
    return out
