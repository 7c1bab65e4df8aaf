"""Move a division to the frame where the masks' length drops.

A dividing mother elongates up to her last frame, where she is longest (pinched into two
lobes); her daughters' first frame is markedly shorter (two rounder cells, still touching).
On the CTC ground truth of 01/02 the major axis drops 10-18 % from the mother's last frame
to the daughters' union, and grows frame to frame otherwise. A segmenter errs on either
side of that frame: daughters drawn as one mask for a few frames (the linker's division
comes late: the mother's track holds the daughters' first frames) or a pinched mother drawn
as two (early). The linker places the division where two objects are first seen; here it
is moved to the length drop (a ratio below ``1 - div_retime_drop``) nearest to it within
``div_retime_frames`` before it or one frame after (the largest drop in the window put a
division of 02's U-Net masks 5 frames early):

* **late**: the drop lies inside the mother's track. Her masks from that frame on are cut
  into the two daughters by the seeded watershed of :mod:`microseg.infer.tracking_split`,
  backwards from the daughters' first objects, and the daughters start there.
* **early**: the drop lies between the daughters' first and second frames. Their first
  objects are given back to the mother (one mask) and they start a frame later.

A frame whose mask is more than ``_MAX_AREA_JUMP`` x the area of its neighbour (a mask
merged with another cell) is never cut or joined: its length says nothing of the division.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import pandas as pd

from microseg.infer.tracking_split import SplitKnobs, _cut
from microseg.io.ctc import check_tracks

_MAX_AREA_JUMP = 1.3  # a mask this much larger than its neighbour frame holds another cell


class RetimeKnobs(SplitKnobs, Protocol):
    """The ``LinkConfig`` fields read here."""

    div_retime_drop: float
    div_retime_frames: int


def major_length(mask: np.ndarray) -> float:
    """Major-axis length of a binary mask (skimage's ``axis_major_length``: 4 sqrt(l1) of
    the coordinate covariance)."""
    ys, xs = np.nonzero(mask)
    if len(ys) < 2:
        return float(len(ys))
    cov = np.cov(np.stack([ys, xs]).astype(np.float64), bias=True)
    return float(4.0 * np.sqrt(max(np.linalg.eigvalsh(cov)[-1], 0.0)))


def retime_divisions(
    tracked: np.ndarray, tracks: pd.DataFrame, cfg: RetimeKnobs
) -> tuple[np.ndarray, pd.DataFrame, int]:
    """Tracks with each division moved to its length drop (module docstring); returns the
    masks and table (copies, checked) and how many divisions moved."""
    if cfg.div_retime_drop <= 0 or cfg.div_retime_frames <= 0:
        return tracked, tracks, 0
    out = np.array(tracked, copy=True)
    table = tracks.copy().reset_index(drop=True)
    row = {int(lb): k for k, lb in enumerate(table["L"].tolist())}
    kids = table[table["P"] > 0].groupby("P")["L"].apply(list)
    moved = 0
    for mother, daughters in kids.items():
        if len(daughters) != 2:
            continue
        m, (d1, d2) = row[int(mother)], (int(daughters[0]), int(daughters[1]))
        te = int(table.at[m, "E"])
        if any(int(table.at[row[d], "B"]) != te + 1 for d in (d1, d2)):
            continue
        shift = _drop_frame(out, table, row, int(mother), (d1, d2), cfg)
        if shift < 0 and _cut_late(out, int(mother), (d1, d2), te, -shift, cfg):
            table.at[m, "E"] = te + shift
            for d in (d1, d2):
                table.at[row[d], "B"] = te + 1 + shift
            moved += 1
        elif shift == 1:
            first = np.isin(out[te + 1], (d1, d2))
            out[te + 1][first] = mother
            table.at[m, "E"] = te + 1
            for d in (d1, d2):
                table.at[row[d], "B"] = te + 2
            moved += 1
    if moved:
        check_tracks(out, table)
    return out, table, moved


def _drop_frame(
    out: np.ndarray,
    table: pd.DataFrame,
    row: dict[int, int],
    mother: int,
    daughters: tuple[int, int],
    cfg: RetimeKnobs,
) -> int:
    """Frames the division should move (0: stays; -k: k frames earlier; 1: one later)."""
    m = row[mother]
    te, b = int(table.at[m, "E"]), int(table.at[m, "B"])
    frames = list(range(max(b, te - cfg.div_retime_frames), te + 1))
    masks = [out[t] == mother for t in frames]
    d_end = min(int(table.at[row[d], "E"]) for d in daughters)
    for t in range(te + 1, min(te + 2, d_end) + 1):
        frames.append(t)
        masks.append(np.isin(out[t], daughters))
    length = np.array([major_length(mk) for mk in masks])
    area = np.array([mk.sum() for mk in masks], np.float64)
    ratio = length[1:] / np.maximum(length[:-1], 1e-9)
    jump = np.maximum(area[1:] / area[:-1], area[:-1] / area[1:])
    ratio[jump > _MAX_AREA_JUMP] = np.inf
    drops = np.flatnonzero(ratio < 1.0 - cfg.div_retime_drop)
    if not len(drops):
        return 0
    here = frames.index(te + 1) - 1  # ratio index of the linker's own division
    # the drop nearest the linker's division, the larger of two as near (the largest in the
    # window: a drop 5 frames early on 02's U-Net masks)
    k = int(drops[np.lexsort((ratio[drops], np.abs(drops - here)))[0]])
    first = frames[k + 1]  # the daughters' first frame by shape
    if first <= te:  # late: no mask from `first` to the daughters' first may hold another cell
        i = frames.index(first)
        if (jump[i : frames.index(te) + 1] > _MAX_AREA_JUMP).any():
            return 0
    return first - (te + 1)


def _cut_late(
    out: np.ndarray,
    mother: int,
    daughters: tuple[int, int],
    te: int,
    k: int,
    cfg: SplitKnobs,
) -> bool:
    """Cut the mother's masks of frames ``te - k + 1 .. te`` into the daughters, backwards
    from their first objects (``te + 1``); all frames or none (False)."""
    pieces_by_t = {}
    ref = np.where(np.isin(out[te + 1], daughters), out[te + 1], 0)
    for t in range(te, te - k, -1):
        mask = out[t] == mother
        area_of = {d: int((ref == d).sum()) for d in daughters}
        pieces = _cut(ref, mask, list(daughters), area_of, 0.0, cfg)
        if pieces is None:
            return False
        pieces_by_t[t] = pieces
        ref = np.zeros_like(ref)
        for d, p in zip(daughters, pieces, strict=True):
            ref[p] = d
    for t, pieces in pieces_by_t.items():
        for d, p in zip(daughters, pieces, strict=True):
            out[t][p] = d
    return True
