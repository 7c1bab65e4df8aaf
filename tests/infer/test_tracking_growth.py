"""Growth as the cue that a mask holds daughters still drawn as one: a backward cut with no
neck is made in a mask that grew over the segmenter's mask of the frame before, and a
mother's pinched halves are not joined back when they grew over her."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage
from skimage.draw import disk, ellipse

from microseg.errors import ConfigError
from microseg.infer.tracking import LinkConfig, link
from microseg.infer.tracking_split import join_pinched, split_merges

SHAPE = (64, 96)


def _grown_daughters(n: int = 10) -> np.ndarray:
    """A round mother (frames 0-3, flat area) divides; the daughters are drawn as one growing
    ellipse with no neck at frames 4-5, then as two discs moving apart."""
    masks = np.zeros((n, *SHAPE), np.uint16)
    for t in range(4):
        rr, cc = disk((32, 40), 9, shape=SHAPE)
        masks[t, rr, cc] = 1
    for t in (4, 5):
        rr, cc = ellipse(32, 40, 7 + 0.5 * (t - 4), 14 + t - 4, shape=SHAPE)
        masks[t, rr, cc] = 2
    for t in range(6, n):
        for value, x in ((2, 33 - 2 * (t - 6)), (3, 47 + 2 * (t - 6))):
            rr, cc = disk((32, x), 7, shape=SHAPE)
            masks[t, rr, cc] = value
    return masks


def _daughters_start(masks: np.ndarray, cfg: LinkConfig) -> list[int]:
    tracks = link(masks, cfg)[1]
    kids = tracks[tracks.P > 0]
    assert len(kids) == 2 and kids.P.nunique() == 1, tracks
    return sorted(kids.B.astype(int).tolist())


def test_a_grown_mask_is_cut_back_without_a_neck() -> None:
    masks = _grown_daughters()
    area = (masks > 0).sum(axis=(1, 2))
    assert area[4] >= 1.16 * area[3] and area[5] >= 1.16 * area[4]  # growing, from frame 4
    plain = LinkConfig(split_merges=True)  # the neck gate alone: the ellipse has no neck
    assert split_merges(masks, plain)[1] == 0
    assert _daughters_start(masks, plain) == [6, 6]
    for tiers in (((0.08, 1.01),), ((0.16, 0.0),)):  # neck <= 1, or no gate
        cfg = LinkConfig(split_merges=True, split_back_grown=tiers)
        out, n_split = split_merges(masks, cfg)
        assert n_split == 2, tiers
        assert [len(np.unique(out[t])) - 1 for t in range(6)] == [1, 1, 1, 1, 2, 2]
        assert _daughters_start(masks, cfg) == [4, 4]  # the mother (flat) is left whole


@pytest.mark.parametrize("tiers", [((0.5, 0.0),), ((0.08, 0.95),)])
def test_growth_below_the_tier_or_a_neck_above_its_gate_is_not_cut(tiers: tuple) -> None:
    masks = _grown_daughters()
    assert split_merges(masks, LinkConfig(split_merges=True, split_back_grown=tiers))[1] == 0


def test_halves_grown_over_the_mask_before_are_not_joined() -> None:
    # frame 0: one mask over two cells (no neck); frame 1: they are two touching discs, each
    # mostly inside it, together 1.26 x its area: daughters growing, not a pinched mother
    masks = np.zeros((2, *SHAPE), np.uint16)
    rr, cc = ellipse(32, 40, 7, 13, shape=SHAPE)
    masks[0, rr, cc] = 1
    for value, x in ((2, 33), (3, 47)):
        rr, cc = disk((32, x), 7.5, shape=SHAPE)
        masks[1, rr, cc] = value
    assert (ndimage.binary_dilation(masks[1] == 2) & (masks[1] == 3)).any()
    assert (masks[1] > 0).sum() >= 1.2 * (masks[0] > 0).sum()
    assert join_pinched(masks, 0.5, 2.0)[1] == 1  # without the growth test: joined
    assert join_pinched(masks, 0.5, 2.0, max_growth=0.5)[1] == 1  # grew less than that
    kept, n_joins = join_pinched(masks, 0.5, 2.0, max_growth=0.12)
    assert n_joins == 0 and np.array_equal(kept, masks)


@pytest.mark.parametrize(
    "bad",
    [
        {"join_max_growth": -0.1},
        {"split_back_grown": ((-0.1, 1.0),)},
        {"split_back_grown": ((0.1, -1.0),)},
        {"split_back_grown": ((0.1,),)},
    ],
)
def test_growth_knobs_are_checked(bad: dict) -> None:
    with pytest.raises(ConfigError):
        LinkConfig(**bad)


def test_growth_tiers_from_yaml_lists() -> None:
    cfg = LinkConfig.from_mapping({"split_back_grown": [[0.08, 1.01], [0.16, 0]]})
    assert cfg.split_back_grown == ((0.08, 1.01), (0.16, 0.0))
    hash(cfg)  # frozen and hashable, as with the defaults
