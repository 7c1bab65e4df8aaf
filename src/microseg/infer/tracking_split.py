"""Split masks that cover two cells, using the neighbouring frame's objects as seeds.

A segmenter that cannot see the border between two touching nuclei draws one mask over both.
Linking alone can only remember who is hidden (:mod:`microseg.infer.tracking_merge`); the
merged frames still score as one detection covering two cells (AOGM ``NS``), and a division
whose daughters touch at first is found only when they come apart (late, so not a division
at the right frame). Here the mask itself is split before linking:

* **Forward** (frame ``t`` from the already split ``t - 1``): an object of ``t`` that
  covers at least ``split_min_cover`` of each of two or more objects of ``t - 1``, and whose
  area is at least ``split_area_ratio`` times their sum, is cut by a seeded watershed on its
  distance transform. Seeds are the previous objects, moved by the merged mask's own motion
  (its centroid minus theirs, area-weighted) and eroded by ``split_erode`` px; pixels outside
  the mask are never touched.
* **Backward** (frame ``t`` from the already split ``t + 1``, after the forward pass): the
  same rule against the next frame, for at most ``split_back_frames`` frames before the
  objects were first seen apart. This finds daughters that touch for a few frames after a
  division (and two cells merged when they first appear). Going back from daughters reaches
  their mother, one cell of about their joint size and place, so a backward cut is kept
  only where the mask has a neck: the distance transform on the cut below
  ``split_back_max_neck`` times the smaller piece's peak (on 01/02's U-Net masks, 17 of 19
  backward cuts of a single cell had a ratio >= 1, 19 of 24 right cuts < 1; forward cuts,
  which follow two cells seen apart, were right at any ratio, so they are not gated). The
  gate is loosened (``split_back_grown``) for a mask that has grown over the segmenter's own
  mask of the frame before: a mother's area is flat, daughters drawn as one grow fast, and
  two cells drawn as one are about twice one.

A chain of forward splits stops after ``split_max_frames`` frames. Each split object keeps
its id on its first piece; the others get new ids above the frame's largest.

:func:`join_pinched` does the opposite at a division's first frame: the mother, pinched into
two lobes at her last frame, is drawn by the U-Net as two touching objects, so the division
came a frame early (BC(0) 0 on 01/02); her halves are made one mask again.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
from scipy import ndimage
from skimage.segmentation import watershed


class SplitKnobs(Protocol):
    """The ``LinkConfig`` fields read here (no import of the linker: it imports this module)."""

    split_min_cover: float
    split_area_ratio: float
    split_erode: int
    split_max_frames: int
    split_back_frames: int
    split_back_max_neck: float
    split_back_grown: tuple[tuple[float, float], ...]


def split_merges(masks: np.ndarray, cfg: SplitKnobs) -> tuple[np.ndarray, int]:
    """``(T, Y, X)`` label images with merged masks split (a copy) and the number of splits:
    a forward pass, then a backward pass over its result."""
    raw = np.asarray(masks)
    out = np.array(masks, dtype=np.int64)  # room for new ids whatever the input's dtype
    depth: dict[int, int] = {}  # id -> frames since its cells were seen apart
    splits = 0
    for t in range(1, len(out)):
        out[t], depth, k = split_frame(out[t - 1], out[t], depth, cfg.split_max_frames, 0.0, cfg)
        splits += k
    back: dict[int, int] = {}
    for t in range(len(out) - 2, -1, -1):
        before = raw[t - 1] if t > 0 else None  # the segmenter's own, for the growth
        out[t], back, k = split_frame(
            out[t + 1], out[t], back, cfg.split_back_frames, cfg.split_back_max_neck, cfg, before
        )
        splits += k
    return out, splits


def split_frame(
    ref: np.ndarray,
    cur: np.ndarray,
    ref_depth: dict[int, int],
    max_depth: int,
    max_neck: float,
    cfg: SplitKnobs,
    before: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[int, int], int]:
    """Split the objects of ``cur`` that cover two or more objects of ``ref`` (a neighbouring
    frame). ``ref_depth[id]``: frames since that object's cells were seen apart (absent: an
    object of the segmenter's own); a piece is ``1 +`` its seed's depth, and no split is made
    beyond ``max_depth`` (0: no splits); ``max_neck`` gates the cut (:func:`_cut`), loosened
    for a mask grown over ``before``, the segmenter's frame on its other side
    (:func:`_neck_gate`). Returns the new frame, its depths and the count."""
    if max_depth <= 0:
        return cur, {}, 0
    both = (ref > 0) & (cur > 0)
    if not both.any():
        return cur, {}, 0
    pairs, inter = np.unique(
        np.stack([ref[both], cur[both]]).astype(np.int64), axis=1, return_counts=True
    )
    ref_ids, ref_area = np.unique(ref[ref > 0], return_counts=True)
    area_of = dict(zip(ref_ids.tolist(), ref_area.tolist(), strict=True))
    seeds: dict[int, list[int]] = {}
    for (i, j), n in zip(pairs.T.tolist(), inter.tolist(), strict=True):
        if n >= cfg.split_min_cover * area_of[i]:
            seeds.setdefault(j, []).append(i)
    out = cur.copy()
    depth: dict[int, int] = {}
    next_id = int(cur.max()) + 1
    splits = 0
    for j, refs in seeds.items():
        if len(refs) < 2:
            continue
        d = 1 + max(ref_depth.get(i, 0) for i in refs)
        if d > max_depth:
            continue
        mask = cur == j
        neck = _neck_gate(mask, before, max_neck, cfg.split_back_grown)
        pieces = _cut(ref, mask, refs, area_of, neck, cfg)
        if pieces is None:
            continue
        for k, piece in enumerate(pieces):
            new = j if k == 0 else next_id
            next_id += k > 0
            out[piece] = new
            depth[new] = d
        splits += 1
    return out, depth, splits


def _cut(
    ref: np.ndarray,
    mask: np.ndarray,
    refs: list[int],
    area_of: dict[int, int],
    max_neck: float,
    cfg: SplitKnobs,
) -> list[np.ndarray] | None:
    """One boolean mask per seed object, or None when the mask should stay whole: too small
    for the seeds, a seed outside it, or (``max_neck`` > 0) no neck where it would be cut."""
    area = int(mask.sum())
    if area < cfg.split_area_ratio * sum(area_of[i] for i in refs):
        return None
    ys, xs = np.nonzero(mask)
    weights = np.array([area_of[i] for i in refs], np.float64)
    centres = np.array([np.argwhere(ref == i).mean(axis=0) for i in refs])
    shift = np.rint(np.array([ys.mean(), xs.mean()]) - weights @ centres / weights.sum())
    markers = np.zeros(mask.shape, np.int32)
    ball = _disk(cfg.split_erode)
    for k, i in enumerate(refs, start=1):
        seed = ndimage.shift(ref == i, shift, order=0, mode="constant", cval=False)
        eroded = ndimage.binary_erosion(seed, ball) if cfg.split_erode > 0 else seed
        seed = (eroded if (eroded & mask).any() else seed) & mask
        if not seed.any():
            return None
        markers[seed & (markers == 0)] = k
    dist = ndimage.distance_transform_edt(mask)
    labels = watershed(-dist, markers, mask=mask)
    pieces = [labels == k for k in range(1, len(refs) + 1)]
    if any(not p.any() for p in pieces):
        return None
    if max_neck > 0 and _neck(labels, dist) >= max_neck * min(float(dist[p].max()) for p in pieces):
        return None
    return pieces


def _neck_gate(
    mask: np.ndarray,
    before: np.ndarray | None,
    max_neck: float,
    grown: tuple[tuple[float, float], ...],
) -> float:
    """The neck gate of a backward cut of ``mask``: ``max_neck``, or the gate of the highest
    ``(growth, neck)`` tier of ``grown`` reached by the mask's area over the object of
    ``before`` (the segmenter's frame before) it overlaps most. A mother's area is flat over
    her last frames while two daughters grow fast from their first (CTC ground truth of
    01/02: +0..9 % a frame, then +5..27 %), and two cells drawn as one are twice one, so a
    grown mask over two cells of the next frame is cut on a weaker neck or none (0)."""
    if not grown or before is None or max_neck <= 0:
        return max_neck
    under = before[mask]
    ids, counts = np.unique(under[under > 0], return_counts=True)
    if len(ids) == 0:
        return max_neck
    ratio = float(mask.sum()) / float((before == ids[np.argmax(counts)]).sum())
    gate = max_neck
    for growth, neck in sorted(grown):
        if ratio >= 1.0 + growth:
            gate = neck
    return gate


def _neck(labels: np.ndarray, dist: np.ndarray) -> float:
    """Largest distance-transform value on the cut: pixels next to another piece."""
    cut = np.zeros(labels.shape, bool)
    for axis in (0, 1):
        a = np.swapaxes(labels, 0, axis)
        c = np.swapaxes(cut, 0, axis)
        differ = (a[1:] != a[:-1]) & (a[1:] > 0) & (a[:-1] > 0)
        c[1:] |= differ
        c[:-1] |= differ
    return float(dist[cut].max()) if cut.any() else 0.0


def _disk(radius: int) -> np.ndarray:
    r = max(int(radius), 0)
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    return yy**2 + xx**2 <= r * r


def join_pinched(
    masks: np.ndarray, min_cover: float, max_sister_ratio: float, max_growth: float = 0.0
) -> tuple[np.ndarray, int]:
    """Give a division's first frame back to the mother when her two halves still touch.

    A mother pinched into two lobes at her last frame is one cell (the CTC ground truth of the
    synthetic sequences says so), but a segmenter draws the lobes as two objects, and the
    division is then found a frame early (BC(0) 0 on the U-Net's masks). Two objects of ``t``
    that touch, each lying at least ``min_cover`` inside one object of ``t - 1`` (the same
    one) and alike in size (``max_sister_ratio``, 0: any), are made one again -- once per
    lineage: an object of ``t - 1`` that is itself such a join is not joined again, so the
    daughters that follow a joined mother stay two. With ``max_growth`` > 0, halves whose
    total area is ``1 + max_growth`` x that object or more are not joined: they are daughters
    growing out of a mask that held them both (a mother's area is flat). Returns a copy and
    the number of joins.
    """
    out = np.array(masks, dtype=np.int64)
    joined_prev: set[int] = set()
    n_joins = 0
    for t in range(1, len(out)):
        prev, cur = out[t - 1], out[t]
        joined: set[int] = set()
        both = (prev > 0) & (cur > 0)
        if not both.any():
            joined_prev = joined
            continue
        ids, area = np.unique(cur[cur > 0], return_counts=True)
        area_of = dict(zip(ids.tolist(), area.tolist(), strict=True))
        prev_ids, prev_area = np.unique(prev[prev > 0], return_counts=True)
        prev_area_of = dict(zip(prev_ids.tolist(), prev_area.tolist(), strict=True))
        pairs, inter = np.unique(np.stack([cur[both], prev[both]]), axis=1, return_counts=True)
        inside: dict[int, list[int]] = {}  # object of t - 1 -> objects of t mostly inside it
        for (j, i), n in zip(pairs.T.tolist(), inter.tolist(), strict=True):
            if n >= min_cover * area_of[j] and i not in joined_prev:
                inside.setdefault(i, []).append(j)
        for i, js in inside.items():
            if len(js) != 2:
                continue
            j, k = js
            big, small = max(area_of[j], area_of[k]), min(area_of[j], area_of[k])
            if max_sister_ratio > 0 and big > max_sister_ratio * small:
                continue
            if max_growth > 0 and big + small >= (1.0 + max_growth) * prev_area_of[i]:
                continue
            if not (ndimage.binary_dilation(cur == j) & (cur == k)).any():
                continue
            cur[cur == k] = j
            joined.add(j)
            n_joins += 1
        joined_prev = joined
    return out, n_joins
