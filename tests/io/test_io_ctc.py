"""Cell Tracking Challenge folders: round trip, the checker's rules, py-ctcmetrics agreement."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from skimage.draw import disk

from microseg.errors import AnnotationError, DataFormatError, MissingFileError
from microseg.io.ctc import (
    check_tracks,
    n_digits,
    read_ctc_gt,
    read_ctc_result,
    read_track_file,
    write_ctc_gt,
    write_ctc_result,
    write_track_file,
)

SHAPE = (5, 32, 40)


def _sequence() -> tuple[np.ndarray, np.ndarray, pd.DataFrame]:
    """Cell 1 moves for 3 frames then divides into 2 and 3; cell 4 stays for all 5."""
    masks = np.zeros(SHAPE, np.uint16)
    for t in range(3):
        masks[t][disk((10, 8 + 2 * t), 4, shape=SHAPE[1:])] = 1
    for t in (3, 4):
        masks[t][disk((5, 14), 3, shape=SHAPE[1:])] = 2
        masks[t][disk((15, 14), 3, shape=SHAPE[1:])] = 3
    for t in range(5):
        masks[t][disk((24, 30 - t), 5, shape=SHAPE[1:])] = 4
    rng = np.random.default_rng(0)
    frames = (rng.integers(0, 30, SHAPE) + 180 * (masks > 0)).astype(np.uint8)
    tracks = pd.DataFrame(
        [[1, 0, 2, 0], [2, 3, 4, 1], [3, 3, 4, 1], [4, 0, 4, 0]], columns=list("LBEP")
    )
    return frames, masks, tracks


def test_gt_round_trip(tmp_path):
    frames, masks, tracks = _sequence()
    seg = {1: masks[1], 3: masks[3]}
    write_ctc_gt(tmp_path, "01", frames, masks, tracks, seg)
    names = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.*"))
    assert "01/t000.tif" in names and "01/t004.tif" in names
    assert "01_GT/TRA/man_track003.tif" in names and "01_GT/TRA/man_track.txt" in names
    assert "01_GT/SEG/man_seg001.tif" in names and "01_GT/SEG/man_seg000.tif" not in names
    assert (tmp_path / "01_GT/TRA/man_track.txt").read_text().splitlines()[1] == "2 3 4 1"
    seq = read_ctc_gt(tmp_path, "01")
    np.testing.assert_array_equal(seq.frames, frames)
    np.testing.assert_array_equal(seq.tra, masks)
    assert seq.tra.dtype == np.uint16
    pd.testing.assert_frame_equal(seq.tracks, tracks)
    assert sorted(seq.seg) == [1, 3]
    np.testing.assert_array_equal(seq.seg[3], masks[3])


def test_result_round_trip(tmp_path):
    _, masks, tracks = _sequence()
    write_ctc_result(tmp_path, "02", masks, tracks)
    assert (tmp_path / "02_RES" / "mask004.tif").is_file()
    res = read_ctc_result(tmp_path, "02")
    np.testing.assert_array_equal(res.masks, masks)
    pd.testing.assert_frame_equal(res.tracks, tracks)


def test_ctc_metrics_accepts_our_files(tmp_path):
    from ctc_metrics import evaluate_sequence, validate_sequence

    frames, masks, tracks = _sequence()
    write_ctc_gt(tmp_path, "01", frames, masks, tracks, {0: masks[0], 3: masks[3]})
    write_ctc_result(tmp_path, "01", masks, tracks)
    res, gt = str(tmp_path / "01_RES"), str(tmp_path / "01_GT")
    assert validate_sequence(res, threads=1)["Valid"] == 1
    scores = evaluate_sequence(res, gt, metrics=["SEG", "TRA", "DET"], threads=1)
    assert scores["TRA"] == pytest.approx(1.0)
    assert scores["DET"] == pytest.approx(1.0)
    assert scores["SEG"] == pytest.approx(1.0)


def test_ctc_metrics_sees_a_worse_result(tmp_path):
    """The cross-check can fail: dropping one daughter lowers DET and TRA below 1."""
    from ctc_metrics import evaluate_sequence

    frames, masks, tracks = _sequence()
    write_ctc_gt(tmp_path, "01", frames, masks, tracks, {3: masks[3]})
    worse = masks.copy()
    worse[worse == 3] = 0
    write_ctc_result(tmp_path, "01", worse, tracks[tracks.L != 3])
    scores = evaluate_sequence(
        str(tmp_path / "01_RES"), str(tmp_path / "01_GT"), metrics=["TRA", "DET"], threads=1
    )
    assert scores["DET"] < 1.0 and scores["TRA"] < 1.0


def _broken(kind: str) -> tuple[np.ndarray, pd.DataFrame]:
    _, masks, tracks = _sequence()
    masks, tracks = masks.copy(), tracks.copy()
    if kind == "gap":
        masks[1][masks[1] == 4] = 0
    elif kind == "outside":
        masks[4][0:3, 0:3] = 1
    elif kind == "unknown":
        masks[2][0:3, 0:3] = 9
    elif kind == "parent_late":
        tracks.loc[tracks.L == 1, "E"] = 3
        masks[3][0:3, 0:3] = 1
    elif kind == "no_parent":
        tracks.loc[tracks.L == 3, "P"] = 7
    elif kind == "duplicate":
        tracks.loc[tracks.L == 3, "L"] = 2
    return masks, tracks


@pytest.mark.parametrize(
    ("kind", "match"),
    [
        ("gap", r"label 4: expected in frames 0..4 only, missing from \[1\]"),
        ("outside", r"label 1: expected in frames 0..2 only.*present outside in \[4\]"),
        ("unknown", r"labels \[9\] in frame 2 are not in the track table"),
        ("parent_late", r"label 2: parent 1 ends at frame 3.*begins at frame 3"),
        ("no_parent", r"label 3: parent 7 is not in the track table"),
        ("duplicate", r"track labels \[2\] appear more than once"),
    ],
)
def test_check_tracks_rules(tmp_path, kind, match):
    masks, tracks = _broken(kind)
    with pytest.raises(AnnotationError, match=match):
        check_tracks(masks, tracks, "res_track.txt")
    with pytest.raises(AnnotationError, match=r"res_track\.txt"):
        write_ctc_result(tmp_path, "01", masks, tracks)
    assert not (tmp_path / "01_RES").exists()


def test_check_tracks_frame_range():
    _, masks, tracks = _sequence()
    tracks.loc[tracks.L == 4, "E"] = 5
    with pytest.raises(AnnotationError, match=r"label 4: expected 0 <= B <= E < 5"):
        check_tracks(masks, tracks)


def test_reading_validates_gt(tmp_path):
    frames, masks, tracks = _sequence()
    write_ctc_gt(tmp_path, "01", frames, masks, tracks)
    write_track_file(tmp_path / "01_GT/TRA/man_track.txt", tracks[tracks.L != 4])
    with pytest.raises(AnnotationError, match=r"labels \[4\] in frame 0"):
        read_ctc_gt(tmp_path, "01")
    assert read_ctc_gt(tmp_path, "01", validate=False).tracks.shape == (3, 4)
    (tmp_path / "01" / "t002.tif").unlink()
    with pytest.raises(DataFormatError, match=r"numbered 0..3, missing \[2\]"):
        read_ctc_gt(tmp_path, "01")
    with pytest.raises(MissingFileError):
        read_ctc_gt(tmp_path, "02")


def test_track_file_parsing(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("1 0 4 0\n2\t5\t6\t1\n\n")
    assert read_track_file(path).to_numpy().tolist() == [[1, 0, 4, 0], [2, 5, 6, 1]]
    path.write_text("1 0 4 0\n2 5 x 1\n")
    with pytest.raises(DataFormatError, match=r"t\.txt.*line 2"):
        read_track_file(path)
    path.write_text("")
    assert read_track_file(path).empty


def test_four_digits_from_1000_frames(tmp_path):
    assert (n_digits(999), n_digits(1000)) == (3, 4)
    masks = np.zeros((1000, 2, 2), np.uint16)
    masks[:, 0, 0] = 1
    write_ctc_result(tmp_path, "01", masks, pd.DataFrame([[1, 0, 999, 0]], columns=list("LBEP")))
    assert (tmp_path / "01_RES" / "mask0999.tif").is_file()
    assert not (tmp_path / "01_RES" / "mask999.tif").exists()
    assert read_ctc_result(tmp_path, "01").masks.shape == (1000, 2, 2)
