"""Linking per-frame masks into CTC tracks: synthetic sequences scored by py-ctcmetrics, and
hand-made divisions, births, deaths and gaps.

The synthetic ground truth is relabelled per frame with random ids before linking, so the
linker cannot read the answer from the label values; what is tested is linking alone (the
masks are perfect), hence DET == 1 and TRA >= 0.99.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from skimage.draw import disk
from skimage.measure import regionprops_table

from microseg.data.synth_tracking import TrackingSynthConfig, generate_tracking_sequence
from microseg.errors import ConfigError, DataFormatError, ShapeMismatchError
from microseg.evaluate.tracking import evaluate_ctc, validate_ctc
from microseg.infer.tracking import (
    LinkConfig,
    compact_labels,
    frame_features,
    link,
    overlap_counts,
)
from microseg.io.ctc import check_tracks, write_ctc_gt, write_ctc_result

SHAPE = (64, 64)


def shuffle_ids(labels: np.ndarray, seed: int, high: int = 60_000) -> np.ndarray:
    """Every frame relabelled with random, unrelated ids in [1, high)."""
    rng = np.random.default_rng(seed)
    dtype = np.uint16 if high <= 1 << 16 else np.uint32
    out = np.zeros(labels.shape, dtype)
    for t, frame in enumerate(labels):
        ids = np.unique(frame[frame > 0])
        lut = np.zeros(int(frame.max()) + 1, dtype)
        lut[ids] = rng.choice(high - 1, len(ids), replace=False) + 1
        out[t] = lut[frame]
    return out


def paint(n_frames: int, cells: dict[int, dict[int, tuple[float, float, float]]]) -> np.ndarray:
    """``cells[cell][t] = (y, x, r)``: discs painted with value ``cell`` (ids kept, on purpose
    irrelevant: the tests shuffle them or rely on the linker ignoring them)."""
    out = np.zeros((n_frames, *SHAPE), np.uint16)
    for cell, frames in cells.items():
        for t, (y, x, r) in frames.items():
            rr, cc = disk((y, x), r, shape=SHAPE)
            out[t, rr, cc] = cell
    return out


def table(tracks: pd.DataFrame) -> list[tuple[int, int, int, int]]:
    return [tuple(int(v) for v in row) for row in tracks[["L", "B", "E", "P"]].to_numpy()]


# --------------------------------------------------------------------------- synthetic + CTC


@pytest.mark.parametrize("seed", [0, 1, 3, 4, 9])
def test_synthetic_sequences_score_perfect_det_and_tra(tmp_path: Path, seed: int) -> None:
    s = generate_tracking_sequence(TrackingSynthConfig(), seed=seed)
    assert (s.tracks["P"] > 0).any() and s.left_fov  # divisions and a cell leaving the field
    seg = {t: s.labels[t] for t in range(0, len(s.labels), 6)}
    write_ctc_gt(tmp_path, "01", s.frames, s.labels, s.tracks, seg=seg)
    masks = shuffle_ids(s.labels, seed)
    tracked, tracks = link(masks, LinkConfig())
    assert tracked.dtype == np.uint16 and tracked.shape == masks.shape
    check_tracks(tracked, tracks)
    write_ctc_result(tmp_path, "01", tracked, tracks)
    assert validate_ctc(tmp_path, "01")
    scores = evaluate_ctc(tmp_path, "01", tmp_path)
    assert scores["Valid"] == 1
    assert scores["DET"] == 1.0
    assert scores["SEG"] == 1.0
    assert scores["TRA"] >= 0.99, scores
    # most divisions are found: the mother ends, two daughters point at it
    found = tracks[tracks.P > 0].groupby("P").size()
    assert (found == 2).sum() >= (s.tracks.P > 0).sum() // 2 - 1


def test_huge_sparse_ids_link_like_small_ones() -> None:
    s = generate_tracking_sequence(TrackingSynthConfig(n_frames=12), seed=2)
    small, t_small = link(shuffle_ids(s.labels, 0))
    big, t_big = link(shuffle_ids(s.labels, 1, high=2**31))
    assert np.array_equal(small, big)
    pd.testing.assert_frame_equal(t_small, t_big)


def test_every_input_object_becomes_one_track_id() -> None:
    s = generate_tracking_sequence(TrackingSynthConfig(n_frames=10), seed=5)
    masks = shuffle_ids(s.labels, 5)
    tracked, _ = link(masks)
    assert np.array_equal(tracked > 0, masks > 0)
    for t in range(len(masks)):
        pairs = np.unique(np.stack([masks[t][masks[t] > 0], tracked[t][masks[t] > 0]]), axis=1)
        assert len(np.unique(pairs[0])) == pairs.shape[1]  # one track id per input object
        assert len(np.unique(pairs[1])) == pairs.shape[1]  # and no two objects share one


# --------------------------------------------------------------------------- hand-made events


def test_division_mother_ends_daughters_start_with_parent() -> None:
    cells = {
        1: {t: (32, 32 + 0.3 * t, 9) for t in range(4)},
        2: {t: (32, 26 - 0.8 * (t - 4), 6) for t in range(4, 8)},
        3: {t: (32, 39 + 0.8 * (t - 4), 6) for t in range(4, 8)},
        4: {t: (8, 8 + 0.5 * t, 4) for t in range(8)},  # a bystander
    }
    tracked, tracks = link(shuffle_ids(paint(8, cells), 7))
    by_cell = {}
    for cell, frames in cells.items():
        t0 = min(frames)
        by_cell[cell] = int(tracked[t0][int(frames[t0][0]), int(frames[t0][1])])
    rows = {r.L: (r.B, r.E, r.P) for r in tracks.itertuples()}
    mother = by_cell[1]
    assert rows[mother] == (0, 3, 0)
    assert rows[by_cell[2]] == (4, 7, mother)
    assert rows[by_cell[3]] == (4, 7, mother)
    assert rows[by_cell[4]] == (0, 7, 0)
    # switched off, or daughters too small for the area gate: no division
    _, plain = link(paint(8, cells), LinkConfig(divisions=False))
    assert (plain.P == 0).all()
    _, strict = link(paint(8, cells), LinkConfig(div_area_ratio=(0.6, 0.8)))
    assert (strict.P == 0).all()
    # elongation gate: a round mother does not divide when 0.5 is required
    _, round_mother = link(paint(8, cells), LinkConfig(div_min_eccentricity=0.5))
    assert (round_mother.P == 0).all()


def test_birth_and_death() -> None:
    cells = {
        1: {t: (16, 12 + t, 6) for t in range(6)},  # dies after frame 5
        2: {t: (48, 40 - t, 6) for t in range(3, 10)},  # born at frame 3
    }
    _, tracks = link(shuffle_ids(paint(10, cells), 1))
    assert table(tracks) == [(1, 0, 5, 0), (2, 3, 9, 0)]


def test_gap_closing_joins_with_a_parent_link() -> None:
    moving = {t: (30, 10 + 2 * t, 6) for t in range(12) if t not in (4, 5)}  # unseen at 4, 5
    masks = shuffle_ids(paint(12, {1: moving}), 3)
    tracked, tracks = link(masks, LinkConfig(max_gap=2))
    assert table(tracks) == [(1, 0, 3, 0), (2, 6, 11, 1)]  # CTC: a gap is parent -> 1 child
    check_tracks(tracked, tracks)
    _, short = link(masks, LinkConfig(max_gap=1))  # two frames missing: too long a gap
    assert table(short) == [(1, 0, 3, 0), (2, 6, 11, 0)]
    _, off = link(masks, LinkConfig(max_gap=0))
    assert table(off) == [(1, 0, 3, 0), (2, 6, 11, 0)]


def test_gap_closing_follows_velocity_and_respects_distance() -> None:
    fast = {t: (30, 4 + 4 * t, 5) for t in range(14) if t != 6}  # 4 px/frame, frame 6 missing
    _, tracks = link(paint(14, {1: fast}), LinkConfig(max_gap=1, gap_max_dist=3.0))
    assert table(tracks) == [(1, 0, 5, 0), (2, 7, 13, 1)]  # predicted position is right
    jump = {t: (30, 10 + (30 if t > 6 else 0), 5) for t in range(12) if t != 6}
    _, far = link(paint(12, {1: jump}), LinkConfig(max_gap=1, gap_max_dist=10.0))
    assert (far.P == 0).all()


def test_exit_and_entry_at_the_edge_are_two_cells_unless_asked() -> None:
    cells = {
        1: {t: (30, 6 - 3 * t, 6) for t in range(3)},  # leaves through the left edge
        2: {t: (34, 2 + 2 * (t - 4), 6) for t in range(4, 10)},  # comes in there
    }
    masks = paint(10, cells)
    _, tracks = link(masks)
    assert (tracks.P == 0).all() and len(tracks) == 2
    _, joined = link(masks, LinkConfig(gap_reentry=True, gap_max_dist=30.0))
    assert table(joined)[1][3] == 1


def test_empty_frames_and_empty_sequences() -> None:
    cells = {1: {t: (30, 30, 6) for t in range(8) if t != 3}}
    tracked, tracks = link(paint(8, cells))
    assert table(tracks) == [(1, 0, 2, 0), (2, 4, 7, 1)]
    tracked, tracks = link(np.zeros((4, *SHAPE), np.uint8))
    assert not tracked.any() and tracks.empty and list(tracks.columns) == ["L", "B", "E", "P"]


def test_bad_input_and_config_are_refused() -> None:
    with pytest.raises(ShapeMismatchError):
        link(np.zeros(SHAPE, np.uint16))
    with pytest.raises(DataFormatError):
        link(np.zeros((2, *SHAPE), np.float32))
    with pytest.raises(DataFormatError):
        link(-np.ones((2, *SHAPE), np.int32))
    for bad in (
        {"max_dist": 0},
        {"min_iou": 1.5},
        {"max_gap": -1},
        {"div_area_ratio": (0.8, 0.3)},
        {"birth_cost": -1},
        {"div_min_eccentricity": 1.0},
    ):
        with pytest.raises(ConfigError):
            LinkConfig(**bad)


# --------------------------------------------------------------------------- building blocks


def test_features_match_skimage_regionprops() -> None:
    s = generate_tracking_sequence(TrackingSynthConfig(n_frames=3), seed=4)
    frame = shuffle_ids(s.labels, 4)[2]
    ours = frame_features(frame)
    ref = regionprops_table(
        frame.astype(np.int64), properties=("label", "area", "centroid", "eccentricity")
    )
    assert np.array_equal(ours["label"], ref["label"])
    np.testing.assert_allclose(ours["area"], ref["area"])
    np.testing.assert_allclose(ours[["cy", "cx"]], np.c_[ref["centroid-0"], ref["centroid-1"]])
    np.testing.assert_allclose(ours["eccentricity"], ref["eccentricity"], atol=1e-9)


def test_overlap_counts_match_pairwise_masks() -> None:
    s = generate_tracking_sequence(TrackingSynthConfig(n_frames=2), seed=6)
    (a, la), (b, lb) = compact_labels(s.labels[0]), compact_labels(s.labels[1])
    i, j, n = overlap_counts(a, b, len(la), len(lb))
    got = {(int(x), int(y)): int(c) for x, y, c in zip(i, j, n, strict=True)}
    want = {}
    for x in range(len(la)):
        for y in range(len(lb)):
            c = int(np.count_nonzero((a == x + 1) & (b == y + 1)))
            if c:
                want[(x, y)] = c
    assert got == want
