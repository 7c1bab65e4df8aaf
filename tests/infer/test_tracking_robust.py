"""Linking masks with the errors a segmenter makes: two cells under one mask for a few frames,
missed detections, daughters that stay touching after a division, spurious fragments and
tracks broken in two. Both linkers where the peer should cope as well."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage
from skimage.draw import disk, ellipse

from microseg.errors import ConfigError
from microseg.infer.tracking import LinkConfig, link
from microseg.infer.tracking_laptrack import link_laptrack
from microseg.infer.tracking_split import join_pinched, split_merges
from microseg.io.ctc import check_tracks

SHAPE = (64, 96)


def paint(n_frames: int, cells: dict[int, dict[int, tuple[float, float, float]]]) -> np.ndarray:
    """``cells[value][t] = (y, x, r)`` discs; two cells given the same value in a frame are one
    (merged) mask, as a segmenter that cannot see the border between them draws it."""
    out = np.zeros((n_frames, *SHAPE), np.uint16)
    for value, frames in cells.items():
        for t, (y, x, r) in frames.items():
            rr, cc = disk((y, x), r, shape=SHAPE)
            out[t, rr, cc] = value
    return out


def track_at(tracked: np.ndarray, t: int, y: float, x: float) -> int:
    lab = int(tracked[t, round(y), round(x)])
    assert lab > 0, f"nothing tracked at frame {t} ({y}, {x})"
    return lab


def root(tracks: pd.DataFrame, lab: int) -> int:
    """Follow single-daughter parent links (closed gaps) back to where a cell's track began."""
    rows = tracks.set_index("L")
    n_children = tracks.loc[tracks.P > 0, "P"].value_counts()
    while True:
        p = int(rows.at[lab, "P"])
        if p == 0 or n_children.get(p, 0) != 1:
            return lab
        lab = p


def divisions(tracks: pd.DataFrame) -> dict[int, list[int]]:
    kids = tracks[tracks.P > 0].groupby("P")["L"].apply(list)
    return {int(p): sorted(k) for p, k in kids.items() if len(k) >= 2}


def _approach_merge_separate(merge: range, n_frames: int = 14):
    """A and B drift right side by side; B comes close, both are one mask during ``merge``,
    then B moves back. (y, x, r) per frame, plus the painted masks."""
    a = {t: (24.0, 12 + 2.0 * t, 7) for t in range(n_frames)}
    b = {}
    for t in range(n_frames):
        if t < merge.start:
            dy = 20 - 2.0 * t
        elif t in merge:
            dy = 12.0
        else:
            dy = 12.0 + 4.0 * (t - merge.stop + 1)
        b[t] = (24.0 + min(max(dy, 12.0), 22.0), 12 + 2.0 * t, 7)
    cells = {1: a, 2: {t: p for t, p in b.items() if t not in merge}}
    masks = paint(n_frames, cells)
    for t in merge:  # one mask over both: value 1 painted on B too
        rr, cc = disk(b[t][:2], b[t][2], shape=SHAPE)
        masks[t, rr, cc] = 1
    return a, b, masks


# --------------------------------------------------------------------------- must-show cases


def test_merge_that_splits_after_three_frames_gives_one_track_per_cell() -> None:
    merge = range(5, 8)
    a, b, masks = _approach_merge_separate(merge)
    tracked, tracks = link(masks, LinkConfig())
    check_tracks(tracked, tracks)
    assert not divisions(tracks), "a merge that separates again is not a division"
    n = len(masks)
    for cell in (a, b):  # every frame where the cell has its own mask leads back to frame 0
        first = root(tracks, track_at(tracked, 0, *cell[0][:2]))
        for t in range(n):
            if t not in merge:
                assert root(tracks, track_at(tracked, t, *cell[t][:2])) == first, t
    assert root(tracks, track_at(tracked, n - 1, *a[n - 1][:2])) != root(
        tracks, track_at(tracked, n - 1, *b[n - 1][:2])
    )


def test_merge_handling_can_be_switched_off() -> None:
    _, _, masks = _approach_merge_separate(range(5, 8))
    _, tracks = link(masks, LinkConfig(merges=False))
    assert len(divisions(tracks)) == 1  # the split reads as a division of the merged mask
    _, peer = link_laptrack(masks)  # and so it does for the peer
    assert len(divisions(peer)) == 1


@pytest.mark.parametrize("linker", ["ours", "laptrack"])
def test_missed_detection_for_two_frames_is_bridged(linker: str) -> None:
    cells = {
        1: {t: (20, 10 + 3 * t, 6) for t in range(14) if t not in (6, 7)},  # unseen at 6, 7
        2: {t: (46, 80 - 2 * t, 6) for t in range(14)},  # another cell, always seen
    }
    masks = paint(14, cells)
    tracked, tracks = link(masks) if linker == "ours" else link_laptrack(masks)
    before = track_at(tracked, 5, 20, 25)
    after = track_at(tracked, 8, 20, 34)
    assert before != after  # CTC: a track is present in every frame from B to E
    assert int(tracks.set_index("L").at[after, "P"]) == before  # the gap, bridged
    assert root(tracks, after) == root(tracks, track_at(tracked, 0, 20, 10))
    assert not divisions(tracks)


def test_division_whose_daughters_touch_for_two_frames_is_detected() -> None:
    # the mother (frames 0-3) divides; the segmenter sees the touching daughters as one
    # two-lobed mask at frames 4 and 5; they separate from frame 6 on
    n = 12
    mother = {t: (32.0, 40.0 + 0.5 * t, 9) for t in range(4)}
    d1 = {t: (32.0, 36.0 - 2.0 * max(t - 5, 0), 6.5) for t in range(4, n)}
    d2 = {t: (32.0, 48.0 + 2.0 * max(t - 5, 0), 6.5) for t in range(4, n)}
    bystander = {t: (10.0, 10.0 + t, 5) for t in range(n)}
    masks = paint(n, {1: mother, 4: bystander})
    for t in range(4, n):
        for value, d in ((2, d1), (3, d2)):
            rr, cc = disk(d[t][:2], d[t][2], shape=SHAPE)
            masks[t, rr, cc] = 2 if t < 6 else value  # one mask while they touch
    tracked, tracks = link(masks, LinkConfig())
    check_tracks(tracked, tracks)
    divs = divisions(tracks)
    assert len(divs) == 1, tracks
    ((mom, kids),) = divs.items()
    assert root(tracks, mom) == track_at(tracked, 0, 32, 40)
    assert sorted(kids) == sorted([track_at(tracked, n - 1, *d1[n - 1][:2]),
                                   track_at(tracked, n - 1, *d2[n - 1][:2])])  # fmt: skip
    assert track_at(tracked, 0, 10, 10) not in divs  # the bystander is left alone


# --------------------------------------------------------------------------- clean-up knobs


def test_fragments_whose_ends_meet_are_fused() -> None:
    # the mask jumps 10 px between frames 5 and 6 (a segmentation that moved its centroid):
    # the frame link is refused (beyond max_dist), and no frame is missing to close a gap over
    cells = {1: {t: (30, 16 + 2 * t + (10 if t >= 6 else 0), 6) for t in range(12)}}
    masks = paint(12, cells)
    _, plain = link(masks, LinkConfig(max_dist=8.0))
    assert len(plain) == 2 and (plain.P == 0).all()
    tracked, fused = link(masks, LinkConfig(max_dist=8.0, fuse_max_dist=12.0))
    assert [tuple(r) for r in fused[["L", "B", "E", "P"]].to_numpy()] == [(1, 0, 11, 0)]
    assert set(np.unique(tracked)) == {0, 1}
    _, far = link(masks, LinkConfig(max_dist=8.0, fuse_max_dist=5.0))  # too far to fuse
    assert len(far) == 2


def test_short_spurious_tracks_and_daughters_are_removed() -> None:
    n = 12
    cell = {t: (30, 30 + t, 8) for t in range(n)}
    masks = paint(n, {1: cell, 2: {5: (10, 80, 4)}})  # a one-frame speck far away
    for t in (6,):  # the cell's mask cut in two for one frame (over-segmentation)
        y, x, _ = cell[t]
        masks[t][masks[t] == 1] = 0
        for value, dx in ((1, -5), (3, 5)):
            rr, cc = disk((y, x + dx), 5, shape=SHAPE)
            masks[t, rr, cc] = value
    tracked, raw = link(masks, LinkConfig(merges=False))
    assert len(raw) > 2
    tracked, clean = link(masks, LinkConfig(merges=False, min_track_length=2))
    check_tracks(tracked, clean)
    assert tracked[5, 10, 80] == 0  # the speck is gone
    assert not divisions(clean)
    assert root(clean, track_at(tracked, n - 1, *cell[n - 1][:2])) == track_at(tracked, 0, 30, 30)


def test_sister_size_and_brightness_gate_divisions() -> None:
    cells = {
        1: {t: (32, 40 + 0.3 * t, 9) for t in range(4)},
        2: {t: (32, 33 - 0.8 * (t - 4), 7) for t in range(4, 8)},
        3: {t: (32, 48 + 0.8 * (t - 4), 4.5) for t in range(4, 8)},  # much smaller
    }
    masks = paint(8, cells)
    loose = LinkConfig(div_area_ratio=(0.2, 0.8), div_max_sister_ratio=0.0)
    assert divisions(link(masks, loose)[1])
    gated = link(masks, LinkConfig(div_area_ratio=(0.2, 0.8)))[1]  # default: at most 2x
    assert not divisions(gated)
    images = np.where(masks == 3, 300.0, np.where(masks > 0, 100.0, 10.0))
    cfg = LinkConfig(
        div_area_ratio=(0.2, 0.8), div_max_sister_ratio=0.0, div_max_intensity_ratio=1.5
    )
    assert divisions(link(masks, cfg)[1])  # no frames given: the cue cannot apply
    assert not divisions(link(masks, cfg, images=images)[1])
    with pytest.raises(Exception, match="one shape"):
        link(masks, cfg, images=images[:3])


def test_new_knobs_are_checked_and_reachable_from_a_mapping() -> None:
    from microseg.errors import ConfigError

    cfg = LinkConfig.from_mapping({"merges": False, "fuse_max_dist": 5.0, "min_track_length": 3})
    assert not cfg.merges and cfg.fuse_max_dist == 5.0 and cfg.min_track_length == 3
    for bad in (
        {"merge_max_frames": -1},
        {"merge_min_cover": 0.0},
        {"fuse_max_dist": -1.0},
        {"min_track_length": 0},
        {"div_max_sister_ratio": 0.5},
        {"div_max_intensity_ratio": 0.9},
    ):
        with pytest.raises(ConfigError):
            LinkConfig(**bad)


# --------------------------------------------------------------------------- split_merges
# merged masks cut between the cells of the neighbouring frame: each cell keeps a mask of its
# own while touching, the division whose daughters touch is found at its frame, and nothing
# outside a merged mask changes

SPLIT = LinkConfig(split_merges=True)


def test_merge_for_three_frames_is_split_between_the_two_cells() -> None:
    merge = range(5, 8)
    a, b, masks = _approach_merge_separate(merge)
    tracked, tracks = link(masks, SPLIT)
    check_tracks(tracked, tracks)
    assert len(tracks) == 2 and (tracks.P == 0).all(), tracks  # one unbroken track per cell
    ta, tb = track_at(tracked, 0, *a[0][:2]), track_at(tracked, 0, *b[0][:2])
    for t in range(len(masks)):
        assert (track_at(tracked, t, *a[t][:2]), track_at(tracked, t, *b[t][:2])) == (ta, tb), t
    for t in merge:  # the merged mask, every pixel of it, shared between the two cells
        assert set(np.unique(tracked[t][masks[t] > 0])) == {ta, tb}
        sizes = np.bincount(tracked[t].ravel())[[ta, tb]]
        assert sizes.min() > 0.4 * sizes.sum(), sizes  # two discs of one size: about half each
    plain, _ = link(masks, LinkConfig())
    assert all(len(np.unique(plain[t][masks[t] > 0])) == 1 for t in merge)  # not before


def _touching_daughters(n: int = 12):
    """A mother (frames 0-3) divides; the daughters are one two-lobed mask at frames 4-5."""
    mother = {t: (32.0, 40.0 + 0.5 * t, 9) for t in range(4)}
    d1 = {t: (32.0, 36.0 - 2.0 * max(t - 5, 0), 6.5) for t in range(4, n)}
    d2 = {t: (32.0, 48.0 + 2.0 * max(t - 5, 0), 6.5) for t in range(4, n)}
    masks = paint(n, {1: mother, 4: {t: (10.0, 10.0 + t, 5) for t in range(n)}})
    for t in range(4, n):
        for value, d in ((2, d1), (3, d2)):
            rr, cc = disk(d[t][:2], d[t][2], shape=SHAPE)
            masks[t, rr, cc] = 2 if t < 6 else value
    return d1, d2, masks


def test_division_whose_daughters_touch_is_found_at_its_frame() -> None:
    d1, d2, masks = _touching_daughters()
    late = link(masks, LinkConfig())[1]
    assert set(late.loc[late.P > 0, "B"]) == {6}  # without the split: found when they part
    tracked, tracks = link(masks, SPLIT)
    check_tracks(tracked, tracks)
    ((mom, kids),) = divisions(tracks).items()
    assert mom == track_at(tracked, 3, 32, 41.5)
    rows = tracks.set_index("L")
    assert [int(rows.at[k, "B"]) for k in kids] == [4, 4]
    for t in (4, 5):  # each daughter its own mask while they touch
        assert sorted([track_at(tracked, t, *d1[t][:2]), track_at(tracked, t, *d2[t][:2])]) == kids
    _, only_forward = link(masks, LinkConfig(split_merges=True, split_back_frames=0))
    assert set(only_forward.loc[only_forward.P > 0, "B"]) == {6}  # the backward pass found it


def test_backward_splits_stop_after_split_back_frames() -> None:
    _, _, masks = _touching_daughters()
    cfg = LinkConfig(split_merges=True, split_back_frames=1)
    out, n_split = split_merges(masks, cfg)
    assert n_split == 1
    assert len(np.unique(out[5])) == 4 and len(np.unique(out[4])) == 3  # 5 cut, 4 left whole


def test_pixels_outside_merged_masks_are_untouched() -> None:
    merge = range(5, 8)
    _, _, masks = _approach_merge_separate(merge)
    masks[:, 50:60, 80:92] = 9  # a bystander
    out, n_split = split_merges(masks, SPLIT)
    assert n_split == len(merge)
    assert np.array_equal(out > 0, masks > 0)
    changed = out != masks
    assert changed.any() and not changed[:, 50:60, 80:92].any()
    for t in range(len(masks)):
        if t not in merge:
            assert np.array_equal(out[t], masks[t])


def test_backward_cuts_need_a_neck_when_gated() -> None:
    # going back from two objects, an elongated cell (no neck) is left whole by the gate while
    # two touching discs (a neck) are still cut; ungated, both are cut
    masks = np.zeros((2, *SHAPE), np.uint16)
    rr, cc = ellipse(20, 48, 8, 16, shape=SHAPE)
    masks[:, rr, cc] = 1
    masks[1][(masks[1] == 1) & (np.arange(SHAPE[1]) >= 48)] = 2  # drawn as two halves at 1
    for value, x in ((3, 40), (4, 53)):  # two discs: apart at 1, one mask at 0
        rr, cc = disk((46, x), 7, shape=SHAPE)
        masks[0, rr, cc] = 3
        masks[1, rr, cc] = value
    loose = LinkConfig(split_merges=True, split_back_frames=1, split_back_max_neck=0.0)
    assert split_merges(masks, loose)[1] == 2
    gate = LinkConfig(split_merges=True, split_back_frames=1, split_back_max_neck=0.95)
    gated, n_gated = split_merges(masks, gate)
    assert n_gated == 1
    assert len(np.unique(gated[0, :32])) == 2 and len(np.unique(gated[0, 32:])) == 3
    *_, masks = _touching_daughters()  # the round mother is not cut going back further
    gate = LinkConfig(split_merges=True, split_back_frames=5, split_back_max_neck=0.95)
    tracks = link(masks, gate)[1]
    assert [int(tracks.set_index("L").at[k, "B"]) for k in divisions(tracks).popitem()[1]] == [4, 4]


def test_a_pinched_mother_drawn_as_two_halves_divides_a_frame_later() -> None:
    # the mother's last frame (3) is drawn as her two touching halves; the daughters (from 4,
    # touching at 4) are the division: joined, frame 3 is the mother's and frame 4 is not
    n = 10
    masks = paint(
        n, {1: {t: (32.0, 40.0, 9) for t in range(4)}, 9: {t: (8, 8, 4) for t in range(n)}}
    )
    masks[3][(masks[3] == 1) & (np.arange(SHAPE[1]) >= 40)] = 5
    for value, x0, step in ((2, 34.0, -2.0), (3, 46.0, 2.0)):
        for t in range(4, n):
            rr, cc = disk((32.0, x0 + step * (t - 4)), 6.5, shape=SHAPE)
            masks[t, rr, cc] = value
    assert (ndimage.binary_dilation(masks[4] == 2) & (masks[4] == 3)).any()  # they touch at 4

    def daughters_start(cfg: LinkConfig) -> list[int]:
        tracks = link(masks, cfg)[1]
        ((_, kids),) = divisions(tracks).items()
        return [int(tracks.set_index("L").at[k, "B"]) for k in kids]

    assert daughters_start(LinkConfig()) == [3, 3]
    assert daughters_start(LinkConfig(join_pinched=True)) == [4, 4]
    joined, n_joins = join_pinched(masks, 0.5, 2.0)
    assert n_joins == 1 and len(np.unique(joined[3])) == 3 and len(np.unique(joined[4])) == 4


@pytest.mark.parametrize(
    "bad",
    [
        {"split_min_cover": 0.0},
        {"split_area_ratio": -0.1},
        {"split_erode": -1},
        {"split_back_max_neck": -0.5},
        {"split_max_frames": -1},
        {"split_back_frames": -1},
    ],
)
def test_split_knobs_are_checked(bad: dict) -> None:
    with pytest.raises(ConfigError):
        LinkConfig(**bad)
    assert LinkConfig.from_mapping({"split_merges": True, "split_erode": 1}).split_erode == 1
