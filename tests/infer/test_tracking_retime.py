"""Division timing by the length drop (``div_retime_drop``): a mother is longest at her last
frame, her daughters' first frame is shorter; a division the linker found late (daughters
drawn as one) or early (a pinched mother drawn as two) is moved there."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from skimage.draw import ellipse

from microseg.errors import ConfigError
from microseg.infer.tracking import LinkConfig, link
from microseg.infer.tracking_retime import major_length

SHAPE = (64, 96)
MOTHER_END = 3  # frames 0-3: an elongating mother, longest at 3


def _mother(masks: np.ndarray, value: int = 1) -> None:
    for t in range(MOTHER_END + 1):
        rr, cc = ellipse(32, 48, 8, 9 + 2.5 * t, shape=SHAPE)
        masks[t, rr, cc] = value


def _daughters(masks: np.ndarray, t: int, gap: float, joined: bool) -> None:
    """Two round daughters ``gap`` px apart (centre to centre) along x; one object if joined."""
    for value, sign in ((2, -1), (3, 1)):
        rr, cc = ellipse(32, 48 + sign * gap / 2, 8, 7, shape=SHAPE)
        masks[t, rr, cc] = 2 if joined else value


def _late(n: int = 10) -> np.ndarray:
    """Daughters drawn as one touching pair at frames 4-5, apart from 6."""
    masks = np.zeros((n, *SHAPE), np.uint16)
    _mother(masks)
    for t in range(MOTHER_END + 1, n):
        _daughters(masks, t, 12 + 2 * (t - MOTHER_END - 1), joined=t < 6)
    return masks


def _early(n: int = 10) -> np.ndarray:
    """The pinched mother of frame 3 drawn as two lobes, longer than the daughters after."""
    masks = _late(n)
    masks[MOTHER_END] = 0
    for value, sign in ((4, -1), (5, 1)):
        rr, cc = ellipse(32, 48 + sign * 8.5, 7, 8.5, shape=SHAPE)
        masks[MOTHER_END, rr, cc] = value
    for t in range(MOTHER_END + 1, n):  # the daughters drawn apart from their first frame
        masks[t] = 0
        _daughters(masks, t, 14 + 2 * (t - MOTHER_END - 1), joined=False)
    return masks


def _division(masks: np.ndarray, cfg: LinkConfig) -> tuple[int, list[int]]:
    tracks = link(masks, cfg)[1]
    kids = tracks[tracks.P > 0]
    assert len(kids) == 2 and kids.P.nunique() == 1, tracks
    mother_end = int(tracks.set_index("L").at[int(kids.P.iloc[0]), "E"])
    return mother_end, sorted(kids.B.astype(int).tolist())


def test_the_fixtures_have_the_length_drop_at_the_split() -> None:
    for masks in (_late(), _early()):
        length = [major_length(m > 0) for m in masks]
        assert length[MOTHER_END + 1] < 0.92 * length[MOTHER_END]
        assert all(b >= a for a, b in itertools.pairwise(length[: MOTHER_END + 1]))


def test_a_late_division_moves_back_to_the_drop() -> None:
    masks = _late()
    assert _division(masks, LinkConfig()) == (5, [6, 6])  # found where seen apart
    cfg = LinkConfig(div_retime_drop=0.08, div_retime_frames=5)
    assert _division(masks, cfg) == (MOTHER_END, [4, 4])
    tracked = link(masks, cfg)[0]
    assert [len(np.unique(tracked[t])) - 1 for t in range(6)] == [1, 1, 1, 1, 2, 2]
    assert (tracked[4:6] > 0).sum() == (masks[4:6] > 0).sum()  # cut, not redrawn


def test_an_early_division_moves_forward_to_the_drop() -> None:
    masks = _early()
    assert _division(masks, LinkConfig()) == (2, [3, 3])  # the lobes taken for daughters
    cfg = LinkConfig(div_retime_drop=0.08, div_retime_frames=5)
    assert _division(masks, cfg) == (MOTHER_END, [4, 4])


def test_a_window_too_short_or_a_drop_too_large_leaves_it() -> None:
    masks = _late()
    assert _division(masks, LinkConfig(div_retime_drop=0.08, div_retime_frames=1)) == (5, [6, 6])
    assert _division(masks, LinkConfig(div_retime_drop=0.5, div_retime_frames=5)) == (5, [6, 6])


def test_a_mask_merged_with_a_neighbour_is_not_cut() -> None:
    masks = _late()
    rr, cc = ellipse(32, 48, 10, 17, shape=SHAPE)  # frame 5: the pair in a larger blob
    masks[5, rr, cc] = 2
    cfg = LinkConfig(div_retime_drop=0.08, div_retime_frames=5)
    mother_end, _ = _division(masks, cfg)
    assert mother_end == 5


@pytest.mark.parametrize("bad", [{"div_retime_drop": -0.1}, {"div_retime_drop": 1.0},
                                 {"div_retime_frames": -1}])  # fmt: skip
def test_bad_values_are_refused(bad: dict) -> None:
    with pytest.raises(ConfigError):
        LinkConfig(**bad)
