"""Track-level clean-up of a CTC result (tracked masks + ``L B E P`` table), any linker's.

Segmentation errors leave three marks on linked tracks, each undone here by one knob of
:class:`microseg.infer.tracking.LinkConfig` (0 switches it off):

* **Fragments** (``fuse_max_dist``): a track ends at ``t`` without daughters and another
  begins at ``t + 1`` without a parent close to where the first ended -- the frame-to-frame
  link was refused (the mask changed shape too much for the IoU term, or was briefly split
  and merged). Such pairs (one assignment over all of them, cost = distance) become one
  track: the later label is rewritten to the earlier one.
* **Spurious divisions** (``min_track_length``): a mother with two daughters of which one is
  a short childless track that ends before the last frame is a fragment that came and went
  (over-segmentation), not a division: the short daughter is removed and the mother
  continues as the other daughter.
* **Spurious tracks** (``min_track_length``): tracks shorter than this with no parent and no
  daughters that neither begin at the first frame nor end at the last (where a short track
  may be a real cell cut off by the sequence) are removed from the masks.

Removing a detection costs more in the CTC AOGM (a false negative weighs 10) than keeping a
false one (1), so ``min_track_length`` is best kept small; see the issue 19 notes for the
values chosen on the training sequences. Labels are renumbered 1..n in their old order and
the result is checked with :func:`microseg.io.ctc.check_tracks`.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment

from microseg.io.ctc import TRACK_COLUMNS, check_tracks

log = logging.getLogger(__name__)


def _centroids(tracked: np.ndarray, frames: set[int]) -> dict[tuple[int, int], np.ndarray]:
    """``{(frame, label): (y, x)}`` for every label present in each of ``frames``."""
    out = {}
    for t in sorted(frames):
        ys, xs = np.nonzero(tracked[t])
        if not len(ys):
            continue
        lab = tracked[t][ys, xs].astype(np.int64)
        n = np.bincount(lab)
        present = np.flatnonzero(n)
        cy = np.bincount(lab, ys)[present] / n[present]
        cx = np.bincount(lab, xs)[present] / n[present]
        for k, lb in enumerate(present.tolist()):
            out[(t, lb)] = np.array([cy[k], cx[k]])
    return out


def _fuse_pairs(table: pd.DataFrame, tracked: np.ndarray, max_dist: float) -> dict[int, int]:
    """``{later label: earlier label}`` for fragments to fuse (see the module docstring)."""
    has_kids = set(table.loc[table.P > 0, "P"].tolist())
    ends = table[~table.L.isin(has_kids)]
    starts = table[(table.P == 0) & (table.B > 0)]
    if ends.empty or starts.empty:
        return {}
    ends = ends.assign(B=ends.E + 1)[["L", "E", "B"]]
    cand = ends.merge(starts[["L", "B"]], on="B", suffixes=("", "_s"))
    if cand.empty:
        return {}
    pos = _centroids(tracked, set(cand["E"].tolist()) | set(cand["B"].tolist()))
    a, b = cand["L"].to_numpy(), cand["L_s"].to_numpy()
    d = np.array([
        np.hypot(*(pos[(e, la)] - pos[(e + 1, lb)]))
        for la, e, lb in zip(a.tolist(), cand["E"].tolist(), b.tolist(), strict=True)
    ])  # fmt: skip
    ok = d <= max_dist
    if not ok.any():
        return {}
    a, b, d = a[ok], b[ok], d[ok]
    ua, ia = np.unique(a, return_inverse=True)
    ub, ib = np.unique(b, return_inverse=True)
    cost = np.full((len(ua), len(ub)), 1e9)
    cost[ia, ib] = d
    rows, cols = linear_sum_assignment(cost)
    keep = cost[rows, cols] < 1e9
    return {int(ub[c]): int(ua[r]) for r, c in zip(rows[keep], cols[keep], strict=True)}


def _spurious(table: pd.DataFrame, n_frames: int, min_len: int) -> tuple[set[int], dict[int, int]]:
    """Labels to remove, and ``{daughter: mother}`` fusions that undo a spurious division."""
    length = table.E - table.B + 1
    kids = table[table.P > 0].groupby("P")["L"].apply(list).to_dict()
    short = (length < min_len) & ~table.L.isin(list(kids)) & (n_frames - 1 > table.E)
    short_set = set(table.L[short].tolist())
    remove: set[int] = set()
    fuse: dict[int, int] = {}
    for mother, daughters in kids.items():
        if len(daughters) != 2:
            continue
        fake = [d for d in daughters if d in short_set]
        if len(fake) == 1:
            remove.add(fake[0])
            other = daughters[0] if daughters[1] == fake[0] else daughters[1]
            fuse[other] = int(mother)
    lonely = short & (table.P == 0) & (table.B > 0)
    remove |= set(table.L[lonely].tolist())
    return remove, fuse


def _apply(
    tracked: np.ndarray, table: pd.DataFrame, fuse: dict[int, int], remove: set[int]
) -> tuple[np.ndarray, pd.DataFrame]:
    """Rewrite labels (``fuse``: later -> earlier, chains followed), drop ``remove``."""
    target = {int(lb): int(lb) for lb in table.L}
    for later in sorted(fuse):  # later labels fuse into earlier ones: resolve chains upwards
        e = fuse[later]
        while e in fuse:
            e = fuse[e]
        target[later] = e
    for lb in remove:
        target[lb] = 0
    rows = {}
    for r in table.itertuples(index=False):
        t = target[int(r.L)]
        if t == 0:
            continue
        b, e, p = rows.get(t, (r.B, r.E, 0))
        parent = r.P if t == int(r.L) else p
        rows[t] = (min(b, r.B), max(e, r.E), parent)
    out = pd.DataFrame(
        [(lb, b, e, p) for lb, (b, e, p) in sorted(rows.items())], columns=list(TRACK_COLUMNS)
    )
    # a parent that was fused away is its fused label now; a removed parent leaves an orphan
    out["P"] = [target.get(int(p), 0) if p else 0 for p in out.P]
    new = np.zeros(max(target) + 1 if target else 1, np.uint16)
    order = out.L.to_numpy()
    new_id = {int(lb): k + 1 for k, lb in enumerate(order)}
    for lb, t in target.items():
        new[lb] = new_id.get(t, 0) if t else 0
    out["L"] = [new_id[int(lb)] for lb in out.L]
    out["P"] = [new_id.get(int(p), 0) if p else 0 for p in out.P]
    return new[tracked], out.astype("int64")


def postprocess(
    tracked: np.ndarray, tracks: pd.DataFrame, fuse_max_dist: float, min_track_length: int
) -> tuple[np.ndarray, pd.DataFrame]:
    """Fuse fragments, undo spurious divisions and drop spurious tracks (module docstring)."""
    table = tracks[list(TRACK_COLUMNS)].astype("int64").reset_index(drop=True)
    if table.empty or (fuse_max_dist <= 0 and min_track_length <= 1):
        return tracked, tracks
    n_fused = n_removed = 0
    if fuse_max_dist > 0:
        fuse = _fuse_pairs(table, tracked, fuse_max_dist)
        tracked, table = _apply(tracked, table, fuse, set())
        n_fused = len(fuse)
    if min_track_length > 1:
        remove, fuse = _spurious(table, len(tracked), min_track_length)
        tracked, table = _apply(tracked, table, fuse, remove)
        n_removed = len(remove)
    check_tracks(tracked, table)
    log.info("track post-processing: %d fragments fused, %d spurious tracks removed",
             n_fused, n_removed)  # fmt: skip
    return tracked, table
