"""Stack prediction (streaming, 2.5D, tiles), plane boxes -> 3D points, conf/IoU sweep."""

from __future__ import annotations

import gc
import tracemalloc

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage as ndi

from microseg.errors import ConfigError
from microseg.infer.yolo_predict import (
    DET_COLS,
    SUMMARY_COLS,
    detections_to_points,
    nms_per_plane,
    predict_stack,
    sample_percentiles,
    sweep,
)
from microseg.io.tiff import open_stack, write_stack

VS = (500.0, 94.0, 94.0)


class BlobDetector:
    """Fake detector: a box per bright component of the (centre) channel, score 0.9."""

    def __init__(self, record: bool = True) -> None:
        self.record = record
        self.calls: list[dict] = []
        self.images: list[np.ndarray] = []

    def predict(self, images, **kwargs):
        self.calls.append({"n": len(images), **kwargs})
        out = []
        for im in images:
            if self.record:
                self.images.append(im)
            plane = im[..., 1] if im.ndim == 3 else im
            labels, _ = ndi.label(plane > 128)
            rows = [
                [sl[1].start, sl[0].start, sl[1].stop, sl[0].stop, 0.9]
                for sl in ndi.find_objects(labels)
            ]
            out.append(np.asarray(rows, np.float32).reshape(-1, 5))
        return out


def _stack(depth=6, h=64, w=80) -> np.ndarray:
    rng = np.random.default_rng(0)
    stack = rng.integers(100, 120, (depth, h, w)).astype(np.uint16)
    stack[2, 10:16, 20:26] = 4000  # voxels 10..15 / 20..25: centre (12.5, 22.5)
    stack[4, 40:44, 60:64] = 4000
    return stack


def test_predict_stack_finds_blobs_plane_by_plane(tmp_path):
    path = write_stack(tmp_path / "s.tif", _stack(), voxel_size_nm=VS)
    det = BlobDetector()
    df = predict_stack(
        det, path, conf=0.3, iou=0.6, batch_planes=4, norm_percentiles=(0, 100), progress=False
    )
    assert list(df.columns) == DET_COLS
    assert df[["z", "x1", "y1", "x2", "y2"]].values.tolist() == [
        [2, 20, 10, 26, 16],
        [4, 60, 40, 64, 44],
    ]
    assert df[["x", "y"]].values.tolist() == [[22.5, 12.5], [61.5, 41.5]]
    assert [c["n"] for c in det.calls] == [4, 2]
    assert det.calls[0]["conf"] == 0.3 and det.calls[0]["iou"] == 0.6
    assert det.calls[0]["imgsz"] == 96  # native scale: 80 px up to the stride


def test_predict_stack_25d_feeds_neighbour_planes(tmp_path):
    stack = np.stack([np.full((32, 32), 100 * (z + 1), np.uint16) for z in range(4)])
    det = BlobDetector()
    predict_stack(
        det, stack, channels="25d", batch_planes=3, norm_percentiles=(0, 100), progress=False
    )
    assert len(det.images) == 4 and det.images[0].shape == (32, 32, 3)
    levels = [tuple(int(v) for v in im[0, 0]) for im in det.images]
    lv = [0, 85, 170, 255]  # planes scaled 100..400 -> 0..255
    assert levels == [
        (lv[0], lv[0], lv[1]),
        (lv[0], lv[1], lv[2]),
        (lv[1], lv[2], lv[3]),
        (lv[2], lv[3], lv[3]),
    ]


def test_predict_stack_tiled_matches_whole_planes():
    stack = _stack()
    whole = predict_stack(BlobDetector(), stack, norm_percentiles=(0, 100), progress=False)
    for fusion in ("wbf", "nms"):
        det = BlobDetector()
        tiled = predict_stack(
            det, stack, tile=(48, 24), fusion=fusion, norm_percentiles=(0, 100), progress=False
        )
        cols = ["z", "x1", "y1", "x2", "y2"]
        pd.testing.assert_frame_equal(
            tiled[cols].sort_values(cols).reset_index(drop=True).astype(float),
            whole[cols].sort_values(cols).reset_index(drop=True).astype(float),
        )
        assert det.calls[0]["imgsz"] == 64
        assert det.calls[0]["n"] == 6 * 6  # 2x3 tiles per plane, all 6 planes in one batch


def test_predict_stack_rejects_bad_options():
    with pytest.raises(ConfigError):
        predict_stack(BlobDetector(), _stack(), channels="rgb", progress=False)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        predict_stack(BlobDetector(), _stack(), batch_planes=0, progress=False)
    with pytest.raises(ConfigError):
        predict_stack(BlobDetector(), _stack(), tile=(32, 40), progress=False)


def test_percentiles_come_from_a_subsample_close_to_the_full_stack():
    stack = np.random.default_rng(1).gamma(2.0, 100.0, (40, 128, 128)).astype(np.float32)
    lo, hi = sample_percentiles(stack, (1, 99.8), max_planes=8, max_pixels=20_000)
    full_lo, full_hi = np.percentile(stack, (1, 99.8))
    assert lo == pytest.approx(full_lo, rel=0.15) and hi == pytest.approx(full_hi, rel=0.15)


def _peak_bytes(path, channels) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        with open_stack(path) as stack:
            predict_stack(
                BlobDetector(record=False), stack, batch_planes=4, channels=channels, progress=False
            )
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("channels", ["single", "25d"])
def test_memory_does_not_grow_with_depth(tmp_path, channels):
    rng = np.random.default_rng(0)
    for depth in (16, 64):
        stack = rng.integers(100, 110, (depth, 256, 256)).astype(np.uint16)
        stack[:, 100:130, 50:80] = 4000  # one bright blob per plane (above the 99.8th pct)
        write_stack(tmp_path / f"d{depth}.tif", stack)
    _peak_bytes(tmp_path / "d16.tif", channels)  # warm caches (imports, tifffile)
    small = _peak_bytes(tmp_path / "d16.tif", channels)
    large = _peak_bytes(tmp_path / "d64.tif", channels)
    whole_stack = 64 * 256 * 256 * 2
    assert large < 1.3 * small, (small, large)
    assert large < whole_stack  # less than the stack itself


# ----------------------------------------------------------------- boxes -> points, sweep
def _boxes(rows) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["z", "x1", "y1", "x2", "y2", "score"])


def test_detections_to_points_merges_a_spine_across_planes():
    df = _boxes(
        [
            (3, 10, 10, 16, 16, 0.5),
            (4, 11, 10, 17, 16, 0.9),  # best plane
            (5, 10, 11, 16, 17, 0.6),
            (4, 60, 60, 66, 66, 0.4),  # another spine
        ]
    )
    pts = detections_to_points(df, VS, dedup_radius_nm=1500)
    assert len(pts) == 2
    top = pts.iloc[0]
    assert (top["z"], top["x"], top["y"], top["n_merged"]) == (4, 13.5, 12.5, 3)
    with pytest.raises(ConfigError):
        detections_to_points(df.drop(columns="score"), VS)


def test_nms_per_plane_never_suppresses_across_planes():
    df = _boxes([(0, 0, 0, 10, 10, 0.9), (0, 1, 0, 11, 10, 0.8), (1, 1, 0, 11, 10, 0.7)])
    assert nms_per_plane(df, 0.5)["score"].tolist() == [0.9, 0.7]
    assert len(nms_per_plane(df, 1.0)) == 3
    assert nms_per_plane(df, 0.5, conf=0.75)["score"].tolist() == [0.9]


def test_nms_then_threshold_equals_threshold_then_nms():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 50, (300, 2))
    wh = rng.uniform(4, 12, (300, 2))
    df = pd.DataFrame(
        {
            "z": rng.integers(0, 3, 300),
            "x1": xy[:, 0],
            "y1": xy[:, 1],
            "x2": xy[:, 0] + wh[:, 0],
            "y2": xy[:, 1] + wh[:, 1],
            "score": rng.uniform(0, 1, 300),
        }
    )
    for conf in (0.2, 0.5, 0.8):
        a = nms_per_plane(df, 0.4)
        a = a[a["score"] >= conf]
        b = nms_per_plane(df[df["score"] >= conf], 0.4)
        assert sorted(a["score"]) == sorted(b["score"])


def test_sweep_writes_one_csv_per_setting_and_a_summary(tmp_path):
    gt = pd.DataFrame({"x": [19.5, 62.5], "y": [19.5, 62.5], "z": [4.0, 4.0]})
    raw = _boxes(
        [
            (4, 10, 10, 30, 30, 0.9),
            (4, 14, 10, 34, 30, 0.85),  # duplicate of the first at IoU 0.67, 376 nm off
            (4, 60, 60, 66, 66, 0.5),
            (4, 40, 40, 46, 46, 0.2),  # a false positive
        ]
    )
    summary = sweep(raw, gt, VS, [0.1, 0.4], [0.5, 0.8], tmp_path / "sw", dedup_radius_nm=300)
    assert list(summary.columns) == SUMMARY_COLS and len(summary) == 4
    files = sorted(p.name for p in (tmp_path / "sw").iterdir())
    assert files == [
        "metrics_summary.csv",
        "predictions_conf0.10_iou0.50.csv",
        "predictions_conf0.10_iou0.80.csv",
        "predictions_conf0.40_iou0.50.csv",
        "predictions_conf0.40_iou0.80.csv",
    ]
    row = summary.set_index(["conf", "iou"])
    assert row.loc[(0.4, 0.5), "f1"] == 1.0 and row.loc[(0.4, 0.5), "n_boxes"] == 2
    assert row.loc[(0.1, 0.5), "fp"] == 1  # the 0.2 box counts at conf 0.1
    assert row.loc[(0.4, 0.8), "n_boxes"] == 3  # iou 0.8 keeps the duplicate box ...
    assert row.loc[(0.4, 0.8), "fp"] == 1  # ... which a 300 nm dedup does not absorb
    boxes = pd.read_csv(tmp_path / "sw" / "predictions_conf0.40_iou0.50.csv")
    assert boxes["score"].tolist() == [0.9, 0.5]
    written = pd.read_csv(tmp_path / "sw" / "metrics_summary.csv")
    pd.testing.assert_frame_equal(written, summary, check_dtype=False)
    with pytest.raises(ConfigError):
        sweep(raw, gt, VS, [], [0.5])
