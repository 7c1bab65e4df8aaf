"""Tracking figures: overlays coloured by track id, montage, lineage plot; atomic PNG output."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from microseg.errors import DataFormatError, ShapeMismatchError
from microseg.report.tracking_figures import (
    lineage_figure,
    lineage_rows,
    overlay_rgb,
    save_lineage_plot,
    save_track_montage,
    save_track_overlays,
    track_colors,
)

# mother 1 divides into 2 and 3; 3 is lost for a frame and found again as 5 (a closed gap);
# 4 lives alone
TRACKS = pd.DataFrame(
    [[1, 0, 2, 0], [2, 3, 7, 1], [3, 3, 4, 1], [4, 0, 7, 0], [5, 6, 7, 3]],
    columns=["L", "B", "E", "P"],
)


def masks_for(tracks: pd.DataFrame, shape=(40, 48)) -> np.ndarray:
    out = np.zeros((int(tracks.E.max()) + 1, *shape), np.uint16)
    for k, row in enumerate(tracks.itertuples()):
        y, x = 6 + 7 * k, 6 + 6 * k
        out[row.B : row.E + 1, y - 3 : y + 3, x - 3 : x + 3] = row.L
    return out


def is_png(path: Path) -> bool:
    with Image.open(path) as im:
        return im.format == "PNG" and min(im.size) > 10


def test_overlays_one_png_per_frame_and_no_temp_files(tmp_path: Path) -> None:
    masks = masks_for(TRACKS)
    images = np.random.default_rng(0).poisson(20, masks.shape).astype(np.uint16)
    paths = save_track_overlays(masks, tmp_path / "ov", images=images)
    assert [p.name for p in paths] == [f"track_t{t:03d}.png" for t in range(len(masks))]
    assert all(is_png(p) for p in paths)
    assert sorted(q.name for q in (tmp_path / "ov").iterdir()) == [p.name for p in paths]
    some = save_track_overlays(masks, tmp_path / "few", frames=[1, 6], prefix="f")
    assert [p.name for p in some] == ["f001.png", "f006.png"]


def test_montage_and_lineage_pngs(tmp_path: Path) -> None:
    masks = masks_for(TRACKS)
    montage = save_track_montage(masks, tmp_path / "montage.png", n_frames=5, ncols=3)
    lineage = save_lineage_plot(TRACKS, tmp_path / "lineage.png")
    assert is_png(montage) and is_png(lineage)
    svg = save_lineage_plot(TRACKS, tmp_path / "lineage.svg")
    assert svg.read_text().lstrip().startswith("<?xml")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_lineage_title_counts_divisions_and_gaps() -> None:
    fig = lineage_figure(TRACKS)
    assert "5 tracks, 1 divisions, 1 closed gaps" in fig.axes[0].get_title()


def test_lineage_rows_put_mothers_between_daughters_and_gaps_in_line() -> None:
    rows = lineage_rows(TRACKS)
    assert set(rows) == {1, 2, 3, 4, 5}
    assert rows[1] == pytest.approx((rows[2] + rows[3]) / 2)
    assert rows[3] == rows[5]  # after the gap, the same cell on the same row
    assert len({rows[2], rows[3], rows[4]}) == 3


def test_one_colour_per_track_everywhere() -> None:
    colours = track_colors([7, 7, 8])
    assert np.array_equal(colours[0], colours[1]) and not np.array_equal(colours[0], colours[2])
    mask = np.zeros((12, 12), np.uint16)
    mask[2:10, 2:10] = 7
    rgb = overlay_rgb(mask)
    inner, edge = rgb[5, 5], rgb[2, 5]
    np.testing.assert_allclose(edge, track_colors([7])[0])  # outline in the track colour
    np.testing.assert_allclose(inner, 0.85 * track_colors([7])[0])  # fill over black
    assert (rgb[0, 0] == 0).all()  # background stays


def test_bad_inputs_are_refused(tmp_path: Path) -> None:
    masks = masks_for(TRACKS)
    with pytest.raises(DataFormatError):
        save_lineage_plot(TRACKS, tmp_path / "lineage.jpg")
    with pytest.raises(ShapeMismatchError):
        save_track_overlays(masks[0], tmp_path)
    with pytest.raises(ShapeMismatchError):
        save_track_montage(masks, tmp_path / "m.png", images=masks[:, :10])
    with pytest.raises(DataFormatError):
        lineage_figure(TRACKS.drop(columns="P"))
