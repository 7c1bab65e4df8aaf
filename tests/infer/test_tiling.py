"""Tile grid and fusion of tile boxes (WBF, NMS), on a fake detector that sees exact boxes."""

from __future__ import annotations

import numpy as np
import pytest

from microseg.errors import ConfigError
from microseg.infer.tiling import (
    fuse_boxes,
    nms_boxes,
    overlap_px,
    predict_tiled,
    tile_grid,
    to_plane,
    wbf_boxes,
)


def test_grid_covers_the_plane_and_shifts_edge_tiles_inside():
    tiles = tile_grid(100, 130, 64, 16)
    ys = sorted({t[0] for t in tiles})
    xs = sorted({t[1] for t in tiles})
    assert ys == [0, 36] and xs == [0, 48, 66]  # last tiles end exactly at the border
    assert all(t[2] - t[0] == 64 and t[3] - t[1] == 64 for t in tiles)
    covered = np.zeros((100, 130), int)
    for y0, x0, y1, x1 in tiles:
        covered[y0:y1, x0:x1] += 1
    assert covered.min() >= 1


def test_grid_small_plane_is_one_tile_and_fractions_work():
    assert tile_grid(40, 50, 64, 16) == [(0, 0, 40, 50)]
    assert overlap_px(64, 0.25) == 16 and overlap_px(64, 16) == 16
    assert [t[1] for t in tile_grid(64, 160, 64, 0.5)] == [0, 32, 64, 96]
    with pytest.raises(ConfigError):
        tile_grid(100, 100, 64, 64)
    with pytest.raises(ConfigError):
        overlap_px(64, -1)


def test_to_plane_shifts_and_drops_boxes_cut_by_interior_borders():
    boxes = np.array(
        [
            [10, 10, 20, 20, 0.9],  # inside
            [0, 30, 6, 40, 0.8],  # touches the tile's left border, an interior border
            [55, 5, 64, 15, 0.7],  # touches the right border = image border: kept
        ],
        np.float32,
    )
    out = to_plane(boxes, (0, 36, 64, 100), (64, 100), edge_px=2)
    assert out[:, :4].tolist() == [[46, 10, 56, 20], [91, 5, 100, 15]]
    kept_all = to_plane(boxes, (0, 36, 64, 100), (64, 100), edge_px=None)
    assert len(kept_all) == 3


def test_nms_and_wbf_merge_duplicates_differently():
    boxes = np.array(
        [[10, 10, 20, 20, 0.9], [12, 10, 22, 20, 0.5], [50, 50, 60, 60, 0.4]], np.float32
    )
    nms = nms_boxes(boxes, 0.5)
    assert nms[:, :4].tolist() == [[10, 10, 20, 20], [50, 50, 60, 60]]  # best box unchanged
    wbf = wbf_boxes(boxes, (100, 100), 0.5)
    assert len(wbf) == 2
    fused = wbf[np.argmax(wbf[:, 4])]
    x1 = (10 * 0.9 + 12 * 0.5) / 1.4  # score-weighted mean
    assert fused[0] == pytest.approx(x1, abs=1e-3)
    assert fused[4] == pytest.approx(0.7, abs=1e-5)  # mean score, not divided by tile count
    assert fuse_boxes([], (10, 10), "wbf").shape == (0, 5)
    with pytest.raises(ConfigError):
        fuse_boxes([boxes], (100, 100), "mean")  # type: ignore[arg-type]


def _oracle(objects: np.ndarray):
    """A fake detector: reports every object fully inside a crop, with the crop's offset found
    by matching pixel content (each crop carries its origin in its first row)."""

    def predict(crops):
        out = []
        for crop in crops:
            y0, x0 = int(crop[0, 0]) * 4, int(crop[0, 1]) * 4
            h, w = crop.shape[:2]
            rows = []
            for x1, y1, x2, y2 in objects:
                if x1 >= x0 and y1 >= y0 and x2 <= x0 + w and y2 <= y0 + h:
                    rows.append([x1 - x0, y1 - y0, x2 - x0, y2 - y0, 0.9])
                elif x2 > x0 and y2 > y0 and x1 < x0 + w and y1 < y0 + h:  # cut by the tile
                    cx1, cy1 = max(x1, x0) - x0, max(y1, y0) - y0
                    cx2, cy2 = min(x2, x0 + w) - x0, min(y2, y0 + h) - y0
                    rows.append([cx1, cy1, cx2, cy2, 0.6])
            out.append(np.asarray(rows, np.float32).reshape(-1, 5))
        return out

    return predict


def _image_with_origins(h, w, tile, overlap):
    """Each tile's top-left pixel pair stores its origin / 4 (so the fake can locate it)."""
    img = np.zeros((h, w), np.uint8)
    for y0, x0, _, _ in tile_grid(h, w, tile, overlap):
        img[y0, x0], img[y0, x0 + 1] = y0 // 4, x0 // 4
    return img


@pytest.mark.parametrize("fusion", ["wbf", "nms"])
def test_tiled_prediction_recovers_every_object_once(fusion):
    objects = np.array([[10, 10, 18, 18], [58, 20, 68, 30], [100, 90, 110, 100], [60, 60, 70, 70]])
    img = _image_with_origins(128, 128, 64, 24)
    got = predict_tiled(_oracle(objects), [img, img], tile=64, overlap=24, fusion=fusion)
    assert len(got) == 2
    for boxes in got:
        assert len(boxes) == len(objects)
        order = np.lexsort((boxes[:, 1], boxes[:, 0]))
        np.testing.assert_allclose(
            boxes[order, :4], objects[np.lexsort((objects[:, 1], objects[:, 0]))], atol=1e-3
        )
        assert np.allclose(boxes[:, 4], 0.9)


def test_without_edge_filter_cut_boxes_survive_nms():
    objects = np.array([[58, 20, 68, 30]])  # straddles the first tile's right border
    img = _image_with_origins(128, 128, 64, 24)
    got = predict_tiled(
        _oracle(objects), [img], tile=64, overlap=24, fusion="nms", iou_thr=0.5, edge_px=None
    )[0]
    assert len(got) == 2  # the full box and the cut half (IoU 0.4) both remain
