"""Detection overlays: pixel-exact marks, plane selection, contrast, errors and atomic output."""

from __future__ import annotations

import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from PIL import Image

from microseg.errors import AnnotationError, ConfigError, MicrosegError
from microseg.infer.fusion import box_pixel_bounds
from microseg.io.points import read_points, write_points
from microseg.io.tiff import TiffStack, write_stack
from microseg.report import overlays
from microseg.report.overlays import (
    OverlayConfig,
    box_pixel_ranges,
    display_plane,
    draw_plane,
    parse_color,
    read_marks,
    render_overlays,
)

RED, GREEN, BLUE = (255, 0, 0), (0, 255, 0), (0, 0, 255)
BG = 40


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch):
    """The score font must come from Pillow itself: any connection attempt fails the test."""
    attempts: list[tuple] = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    yield
    assert attempts == []


def _plane(h: int = 30, w: int = 30) -> np.ndarray:
    return np.full((h, w), BG, np.uint8)


def _points(*rows: tuple[float, float, float], **extra) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=["z", "y", "x"])
    for k, v in extra.items():
        df[k] = v
    return df


def _coloured(img: np.ndarray, rgb: tuple[int, int, int]) -> np.ndarray:
    return (img == np.asarray(rgb, np.uint8)).all(axis=2)


def _no_temp(folder: Path) -> None:
    assert [p.name for p in folder.iterdir() if p.name.startswith(".")] == []


# --------------------------------------------------------------------------- geometry


@pytest.mark.parametrize("r", [0, 1, 3, 5])
def test_dot_is_the_disc_of_radius_r_at_the_point(r: int) -> None:
    cfg = OverlayConfig(mode="dots", dot_radius=r, color="#ff0000")
    img = draw_plane(_plane(), _points((0, 12, 17)), cfg)
    assert img.shape == (30, 30, 3) and img.dtype == np.uint8
    red = _coloured(img, RED)
    assert red[12, 17]  # centre
    assert red[12, 17 + r] and red[12 - r, 17] and red[12 + r, 17] and red[12, 17 - r]
    assert not red[12, 17 + r + 1] and not red[12 + r + 1, 17] and not red[12 - r - 1, 17]
    # hand count of integer offsets with dy² + dx² <= r²
    assert red.sum() == {0: 1, 1: 5, 3: 29, 5: 81}[r]
    # everything else keeps the grey background
    assert (img[~red] == BG).all()


def test_dot_centre_rounds_to_nearest_pixel_and_box_centre_convention() -> None:
    cfg = OverlayConfig(mode="dots", dot_radius=0, color=RED)
    img = draw_plane(_plane(), _points((0, 5.4, 7.6)), cfg)
    assert np.argwhere(_coloured(img, RED)).tolist() == [[5, 8]]
    # a box x1=10, x2=15 covers columns 10..14: its centre pixel is column 12
    boxes = pd.DataFrame({"z": [0], "x1": [10.0], "y1": [20.0], "x2": [15.0], "y2": [25.0]})
    boxes["x"] = (boxes.x1 + boxes.x2) / 2 - 0.5
    boxes["y"] = (boxes.y1 + boxes.y2) / 2 - 0.5
    img = draw_plane(_plane(), boxes, cfg)
    assert np.argwhere(_coloured(img, RED)).tolist() == [[22, 12]]


def test_box_outline_lands_on_the_box_edge_pixels() -> None:
    boxes = pd.DataFrame({"x1": [5.0], "y1": [6.0], "x2": [12.0], "y2": [10.0]})
    boxes["x"], boxes["y"] = 8.0, 7.5
    img = draw_plane(_plane(), boxes, OverlayConfig(mode="boxes", box_color=GREEN))
    green = _coloured(img, GREEN)
    expected = np.zeros_like(green)
    expected[6, 5:12] = expected[9, 5:12] = True  # top and bottom rows 6 and 9
    expected[6:10, 5] = expected[6:10, 11] = True  # left and right columns 5 and 11
    assert (green == expected).all()
    # two pixels wide: the line grows inward
    img = draw_plane(_plane(), boxes, OverlayConfig(mode="boxes", box_color=GREEN, line_width=2))
    green = _coloured(img, GREEN)
    expected[7, 5:12] = expected[8, 5:12] = True
    expected[6:10, 6] = expected[6:10, 10] = True
    assert (green == expected).all()


def test_box_ranges_agree_with_fusion_and_scale_maps_edges() -> None:
    rng = np.random.default_rng(3)
    x1, y1 = rng.uniform(0, 40, 50), rng.uniform(0, 40, 50)
    df = pd.DataFrame(
        {"x1": x1, "y1": y1, "x2": x1 + rng.uniform(0, 9, 50), "y2": y1 + rng.uniform(0, 9, 50)}
    )
    ref = np.stack(box_pixel_bounds(df, 100, 100), axis=1)
    ours = np.array([box_pixel_ranges(*row) for row in df.to_numpy()])
    assert (ours == ref).all()
    # scale 2: edges double, so columns 10..23 and rows 12..19
    boxes = pd.DataFrame({"x1": [5.0], "y1": [6.0], "x2": [12.0], "y2": [10.0], "x": [8.0]})
    boxes["y"] = 7.5
    img = draw_plane(_plane(), boxes, OverlayConfig(mode="both", box_color=GREEN, scale=2))
    assert img.shape == (60, 60, 3)
    rows, cols = np.nonzero(_coloured(img, GREEN))
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (12, 19, 10, 23)
    # the dot sits on the centre of the enlarged voxel: 8 -> 16.5 rounds to 17, 7.5 -> 15.5 -> 16
    red = _coloured(img, parse_color("#ff3030"))
    assert red[16, 17] and red.sum() == 29


def test_marks_partly_outside_are_clipped() -> None:
    boxes = pd.DataFrame({"x1": [-3.0], "y1": [25.0], "x2": [4.0], "y2": [40.0], "x": [0.0]})
    boxes["y"] = 29.0
    img = draw_plane(_plane(), boxes, OverlayConfig(mode="boxes", box_color=GREEN))
    green = _coloured(img, GREEN)
    assert green[25, 0:4].all() and green[25:30, 3].all()  # top and right edges
    assert green.sum() == 4 + 4  # row 25 cols 0..3 and col 3 rows 26..29; nothing wraps


# --------------------------------------------------------------------------- colours, status


def test_status_colours_and_rejected_hidden_by_default() -> None:
    marks = _points(
        (0, 5, 5), (0, 5, 15), (0, 15, 5), (0, 15, 15),
        status=["high", "validated", "rejected_low_yolo", ""],
    )  # fmt: skip
    cfg = OverlayConfig(mode="dots", dot_radius=1, color=BLUE)
    img = draw_plane(_plane(), marks, cfg)
    assert tuple(img[5, 5]) == parse_color("#30ff30")
    assert tuple(img[5, 15]) == parse_color("#30d0ff")
    assert tuple(img[15, 5]) == (BG, BG, BG)  # rejected: hidden
    assert tuple(img[15, 15]) == BLUE  # no status: the default colour
    img = draw_plane(_plane(), marks, OverlayConfig(mode="dots", show_rejected=True))
    assert tuple(img[15, 5]) == parse_color("#a0a0a0")
    cfg = OverlayConfig.from_mapping({"status_colors": {"high": "yellow"}, "dot_radius": 0})
    img = draw_plane(_plane(), marks, cfg)
    assert tuple(img[5, 5]) == (255, 255, 0) and tuple(img[5, 15]) == parse_color("#30d0ff")


def test_spread_draws_neighbours_faintly() -> None:
    marks = _points((5, 10, 10), (7, 20, 20))
    cfg = OverlayConfig(mode="dots", dot_radius=1, color=RED, spread=1, faint_alpha=0.5)
    img = draw_plane(_plane(), marks, cfg, z=6)
    faint = tuple(round(0.5 * BG + 0.5 * c) for c in RED)
    assert tuple(img[10, 10]) == faint and tuple(img[20, 20]) == faint
    img = draw_plane(_plane(), marks, cfg, z=5)
    assert tuple(img[10, 10]) == RED and tuple(img[20, 20]) == (BG, BG, BG)  # 2 planes away
    img = draw_plane(_plane(), marks, OverlayConfig(mode="dots", color=RED), z=6)
    assert (img == BG).all()  # spread 0: only the mark's own plane


def test_scores_are_written_beside_the_mark() -> None:
    marks = _points((0, 15, 5), score=[0.87])
    plane = _plane(30, 40)
    off = draw_plane(plane, marks, OverlayConfig(mode="dots", color=RED, dot_radius=2))
    on = draw_plane(
        plane, marks, OverlayConfig(mode="dots", color=RED, dot_radius=2, show_scores=True)
    )
    assert (on[:, :8] == off[:, :8]).all()  # the dot itself is unchanged
    text = (on[:, 8:] != off[:, 8:]).any(axis=2)
    assert text.sum() > 10 and not (off[:, 8:] != BG).any()


def test_parse_color_and_config_validation() -> None:
    assert parse_color("red") == RED
    assert parse_color("#30ff30") == (48, 255, 48)
    assert parse_color("1, 2,3") == (1, 2, 3) == parse_color([1, 2, 3])
    for bad in ("nocolour", (1, 2), (0, 0, 256)):
        with pytest.raises(ConfigError):
            parse_color(bad)
    with pytest.raises(ConfigError, match="unknown key"):
        OverlayConfig.from_mapping({"radius": 3})
    with pytest.raises(ConfigError, match="mode"):
        OverlayConfig(mode="circles")
    with pytest.raises(ConfigError, match="percentiles"):
        OverlayConfig(percentiles=(99.0, 1.0))
    with pytest.raises(ConfigError, match="color"):
        OverlayConfig(color="not-a-colour")
    cfg = OverlayConfig.from_mapping({"dot_radius": None, "z_stop": 4, "percentiles": [2, 98]})
    assert cfg.dot_radius == 3 and cfg.z_stop == 4 and cfg.percentiles == (2.0, 98.0)


# --------------------------------------------------------------------------- contrast


def test_clahe_raises_contrast_of_a_low_contrast_plane_and_is_off_by_default() -> None:
    rng = np.random.default_rng(0)
    plane = (1000 + rng.normal(0, 40, (128, 128))).astype(np.uint16)
    plane[0, 0] = 4000  # one bright speck squeezes the tissue into the darkest grey levels
    tissue = np.ones(plane.shape, bool)
    tissue[0, 0] = False
    lo, hi = float(plane.min()), float(plane.max())
    assert OverlayConfig().clahe is False
    plain = display_plane(plane, lo, hi)
    assert (plain == display_plane(plane, lo, hi, OverlayConfig(clahe=False))).all()
    # independent reference for the linear map
    ref = np.clip((plane.astype(np.float64) - lo) * 255 / (hi - lo) + 0.5, 0, 255).astype(np.uint8)
    assert (plain == ref).all()
    eq = display_plane(plane, lo, hi, OverlayConfig(clahe=True))
    assert eq.dtype == np.uint8 and eq.shape == plane.shape
    assert plain[tissue].std() < 5 and eq[tissue].std() > 2.5 * plain[tissue].std()
    # a higher clip limit equalises harder
    eq_hi = display_plane(plane, lo, hi, OverlayConfig(clahe=True, clahe_clip=0.05))
    assert eq_hi[tissue].std() > 2 * eq[tissue].std()


# --------------------------------------------------------------------------- files


@pytest.fixture()
def stack_path(tmp_path: Path) -> Path:
    rng = np.random.default_rng(1)
    stack = rng.integers(100, 3000, (8, 16, 20)).astype(np.uint16)
    return write_stack(tmp_path / "stack.tif", stack, voxel_size_nm=(500.0, 100.0, 100.0))


def _write_csv(path: Path, df: pd.DataFrame) -> Path:
    df.to_csv(path, index=False)
    return path


def _boxes_csv(path: Path) -> Path:
    return _write_csv(
        path,
        pd.DataFrame(
            {
                "z": [1, 3, 3, 4, 5],
                "x1": [2.0, 4.0, 10.0, 6.0, 12.0],
                "y1": [2.0, 5.0, 8.0, 6.0, 3.0],
                "x2": [7.0, 9.0, 15.0, 11.0, 17.0],
                "y2": [7.0, 10.0, 13.0, 11.0, 8.0],
                "score": [0.9, 0.4, 0.3, 0.8, 0.7],
                "status": ["high", "validated", "rejected_no_punet", "high", "high"],
            }
        ),
    )


def test_render_selects_planes_and_writes_matching_pngs_and_tiff(
    tmp_path: Path, stack_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_full_read(self):
        raise AssertionError("the whole stack was loaded")

    monkeypatch.setattr(TiffStack, "asarray", no_full_read)
    csv = _boxes_csv(tmp_path / "predictions_dedup.csv")
    out = tmp_path / "overlays"
    cfg = OverlayConfig.from_mapping({"z_start": 1, "z_stop": 7, "z_step": 2, "spread": 1})
    res = render_overlays(stack_path, csv, out, cfg)
    assert res.planes == (1, 3, 5) and res.n_planes == 3 and res.kind == "boxes"
    assert sorted(p.name for p in out.iterdir()) == [
        "overlay.tif",
        "plane_0001.png",
        "plane_0003.png",
        "plane_0005.png",
    ]
    # full marks: z=1 (1), z=3 (1 kept; the rejected one hidden), z=5 (1); faint: z=4 on 3 and 5
    assert (res.n_marks, res.n_faint) == (3, 2)
    with tifffile.TiffFile(res.tiff_path) as tif:
        tiff = tif.asarray()
        assert tif.series[0].axes == "ZYXS"
        assert tif.imagej_metadata["spacing"] == pytest.approx(1.0)  # 0.5 µm x z_step 2
    assert tiff.shape == (3, 16, 20, 3) and tiff.dtype == np.uint8
    for i, png in enumerate(res.png_paths):
        assert (np.asarray(Image.open(png)) == tiff[i]).all()
    # unmarked pixels are the stack scaled by its own 1 and 99.8 % percentiles
    raw = tifffile.imread(stack_path).astype(np.float64)
    lo, hi = np.percentile(raw, [1.0, 99.8])
    assert res.intensity_range == pytest.approx((lo, hi))
    grey = np.clip((raw[5] - lo) * 255 / (hi - lo) + 0.5, 0, 255).astype(np.uint8)
    assert (tiff[2, 14:, :, 0] == grey[14:]).all() and (tiff[2, :, 0, 1] == grey[:, 0]).all()
    # plane 5: box x 12..16, y 3..7 in the "high" colour, dot at (y, x) = (5, 14)
    high = parse_color("#30ff30")
    assert tuple(tiff[2, 3, 12]) == high and tuple(tiff[2, 7, 16]) == high
    assert tuple(tiff[2, 5, 14]) == high and tuple(tiff[2, 5, 17]) == high  # dot, r=3
    assert tuple(tiff[2, 5, 18]) != high and tuple(tiff[2, 9, 14]) != high


def test_clip_of_z_stop_and_empty_selection(tmp_path: Path, stack_path: Path) -> None:
    csv = _boxes_csv(tmp_path / "p.csv")
    res = render_overlays(stack_path, csv, tmp_path / "a", OverlayConfig(z_start=6, z_stop=99))
    assert res.planes == (6, 7)
    with pytest.raises(ConfigError, match="select none"):
        render_overlays(stack_path, csv, tmp_path / "b", OverlayConfig(z_start=8))
    assert not (tmp_path / "b").exists()


def test_points_csv_from_io_points_reads_the_same(tmp_path: Path, stack_path: Path) -> None:
    pts = pd.DataFrame({"z": [2.2, 6.0], "y": [4.0, 12.6], "x": [3.0, 18.4], "score": [0.5, 0.6]})
    csv = write_points(tmp_path / "spines.csv", pts)  # x, y, z column order
    marks, kind = read_marks(csv)
    ref = read_points(csv, shape=(8, 16, 20))
    assert kind == "points"
    assert (marks[["y", "x"]].to_numpy() == ref[["y", "x"]].to_numpy()).all()
    assert marks["z"].tolist() == [2, 6]
    # 'both' on points draws dots; 'boxes' on points is refused, naming the file
    res = render_overlays(stack_path, csv, tmp_path / "o", OverlayConfig(mode="both"))
    assert res.n_marks == 2 and res.kind == "points"
    plane6 = np.asarray(Image.open(tmp_path / "o" / "plane_0006.png"))
    assert tuple(plane6[13, 18]) == parse_color("#ff3030")
    with pytest.raises(ConfigError, match=r"spines\.csv") as err:
        render_overlays(stack_path, csv, tmp_path / "p", OverlayConfig(mode="boxes"))
    assert "mode 'boxes'" in str(err.value)
    assert not (tmp_path / "p").exists()


def test_bad_csv_is_a_clear_error_naming_the_file(tmp_path: Path, stack_path: Path) -> None:
    csv = _write_csv(tmp_path / "weird.csv", pd.DataFrame({"a": [1], "b": [2], "c": [3]}))
    with pytest.raises(AnnotationError) as err:
        render_overlays(stack_path, csv, tmp_path / "out")
    msg = str(err.value)
    assert "weird.csv" in msg and "['a', 'b', 'c']" in msg and "z,x1,y1,x2,y2" in msg
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(AnnotationError, match=r"empty\.csv.*empty file"):
        read_marks(empty)
    text = _write_csv(
        tmp_path / "text.csv", pd.DataFrame({"z": [1, "x"], "y": [1, 2], "x": [1, 2]})
    )
    with pytest.raises(AnnotationError, match=r"text\.csv.*column z must be numeric.*line"):
        read_marks(text)
    with pytest.raises(MicrosegError, match="nothing"):
        read_marks(tmp_path / "missing.csv")
    assert not (tmp_path / "out").exists()
    _no_temp(tmp_path)


def test_marks_outside_the_stack_are_an_error_and_nothing_is_written(
    tmp_path: Path, stack_path: Path
) -> None:
    bad = _write_csv(
        tmp_path / "other_stack.csv",
        pd.DataFrame({"z": [1, 12], "x1": [1.0, 1], "y1": [1.0, 1], "x2": [4.0, 4], "y2": [4, 4]}),
    )
    with pytest.raises(AnnotationError) as err:
        render_overlays(stack_path, bad, tmp_path / "out")
    msg = str(err.value)
    assert "other_stack.csv" in msg and "(8, 16, 20)" in msg and "line" in msg
    assert not (tmp_path / "out").exists()
    _no_temp(tmp_path)


def test_failure_midway_keeps_the_previous_output(
    tmp_path: Path, stack_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    csv = _boxes_csv(tmp_path / "p.csv")
    out = tmp_path / "out"
    first = render_overlays(stack_path, csv, out, OverlayConfig(z_stop=2))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = {"n": 0}
    real = overlays.draw_plane

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("disk on fire")
        return real(*args, **kwargs)

    monkeypatch.setattr(overlays, "draw_plane", flaky)
    with pytest.raises(RuntimeError, match="disk on fire"):
        render_overlays(stack_path, csv, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert first.n_planes == 2
    _no_temp(tmp_path)


def test_foreign_out_dir_is_refused(tmp_path: Path, stack_path: Path) -> None:
    out = tmp_path / "reports"
    out.mkdir()
    (out / "index.html").write_text("keep me")
    with pytest.raises(MicrosegError, match=r"index\.html"):
        render_overlays(stack_path, _boxes_csv(tmp_path / "p.csv"), out)
    assert (out / "index.html").read_text() == "keep me"
    assert [p.name for p in out.iterdir()] == ["index.html"]
