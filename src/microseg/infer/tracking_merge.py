"""Two cells under one mask: detect the merge, remember who is hidden, undo it at the split.

A segmenter that cannot see the border between two touching nuclei draws one mask over both
for a few frames. Frame to frame, one of the two tracks (the *host*) links to the merged mask
and the other ends. Without help the split afterwards looks like a division of the host (two
daughters, both new identities) and the hidden cell's track is lost.

* :func:`find_merges` -- a track that ends at ``t - 1`` is *hidden* in an object of ``t`` when
  that object covers at least ``merge_min_cover`` of its pixels, links to another track (the
  host), and is at least ``merge_area_ratio`` times the host's previous area (it grew by the
  cell it swallowed). When the merged object linked to neither, the track it overlaps most
  is made the host.
* :func:`resolve_split` -- when a host's object is followed by more than one object near it,
  host and hidden cells are given those objects by one assignment on the distance between
  each object and where each cell would be (its offset from the merged mask's centroid when
  it was swallowed, applied to the mask's last centroid). The host keeps its track; a
  hidden cell that takes an object continues as a new label whose parent is its track
  before the merge (the CTC form of a closed gap, as ``link`` writes gaps). A hidden cell
  that has not re-emerged within ``merge_max_frames`` is forgotten (its track stays ended).

:func:`merge_step` runs both for one frame of :mod:`microseg.infer.tracking`'s loop.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
from scipy.optimize import linear_sum_assignment


class FrameLike(Protocol):
    """What :func:`merge_step` reads of a frame (the linker's ``_Frame``)."""

    pos: np.ndarray  # (n, 2) centroids
    area: np.ndarray

    def __len__(self) -> int: ...


class MergeKnobs(Protocol):
    """The ``LinkConfig`` fields :func:`merge_step` reads (no import of the linker: it
    imports this module)."""

    max_dist: float
    merge_max_frames: int
    merge_min_cover: float
    merge_area_ratio: float


@dataclass
class Hidden:
    """A cell last seen on its own at frame ``t``, ``offset`` from the centroid of the merged
    mask that swallowed it (merged cells move together: the offset, not the cell's own
    velocity, says where it will come out)."""

    seg: int  # its track segment (ended at t)
    t: int
    offset: np.ndarray

    def predict(self, blob: np.ndarray) -> np.ndarray:
        return blob + self.offset


def find_merges(
    match: np.ndarray,
    overlaps: tuple[np.ndarray, np.ndarray, np.ndarray],
    area_a: np.ndarray,
    area_b: np.ndarray,
    min_cover: float,
    area_ratio: float,
    taken_b: np.ndarray | None = None,
) -> list[tuple[int, list[int]]]:
    """Merges between frames ``a`` and ``b``: ``[(host_i, [hidden_i, ...]), ...]``.

    ``match[i]`` is the object of ``b`` that object ``i`` of ``a`` links to (or -1); an
    unmatched merged object is given to its largest overlap (``match`` is updated in place);
    objects of ``b`` in ``taken_b`` (already continuing a hidden cell) are left alone.
    """
    oi, oj, inter = overlaps
    ending = match[oi] < 0
    cover = inter / area_a[oi]
    keep = ending & (cover >= min_cover)
    if taken_b is not None:
        keep &= ~taken_b[oj]
    if not keep.any():
        return []
    owner = np.full(len(area_b), -1, np.int64)
    linked = np.flatnonzero(match >= 0)
    owner[match[linked]] = linked
    by_obj: dict[int, list[tuple[float, int]]] = {}
    for i, j, n in zip(oi[keep].tolist(), oj[keep].tolist(), inter[keep].tolist(), strict=True):
        by_obj.setdefault(j, []).append((n, i))
    out = []
    for j, swallowed in by_obj.items():
        swallowed.sort(reverse=True)
        host = int(owner[j])
        if host < 0:  # the merged mask linked to nobody: the largest overlap hosts it
            if len(swallowed) < 2:
                continue
            host = swallowed.pop(0)[1]
            match[host] = j
        if area_b[j] < area_ratio * area_a[host]:
            continue
        out.append((host, [i for _, i in swallowed]))
    return out


def resolve_split(
    blob: np.ndarray,
    host: Hidden,
    hidden: list[Hidden],
    objects: np.ndarray,
    pos: np.ndarray,
) -> tuple[int, dict[int, int]]:
    """Who takes which of ``objects`` (indices into ``pos``) that followed the merged mask
    last seen at centroid ``blob``.

    Returns ``(host_object or -1, {hidden index: object})``; objects nobody takes are left to
    start tracks of their own.
    """
    cells = [host, *hidden]
    want = np.array([c.predict(blob) for c in cells])
    cost = np.hypot(*(want[:, None, :] - pos[objects][None, :, :]).transpose(2, 0, 1))
    rows, cols = linear_sum_assignment(cost)
    host_obj = -1
    taken: dict[int, int] = {}
    for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
        if r == 0:
            host_obj = int(objects[c])
        else:
            taken[r - 1] = int(objects[c])
    return host_obj, taken


def merge_step(
    t: int,
    prev: FrameLike,
    cur: FrameLike,
    prev_ids: np.ndarray,
    match: np.ndarray,
    overlaps: tuple[np.ndarray, np.ndarray, np.ndarray],
    merged: dict[int, tuple[Hidden, list[Hidden]]],
    parent: np.ndarray,
    taken: np.ndarray,
    cfg: MergeKnobs,
) -> set[int]:
    """One frame of merge handling in :func:`microseg.infer.tracking.link`: undo merges that
    came apart at ``t`` and note new ones.

    Updates ``match`` (who continues the host), ``parent`` and ``taken`` (objects of ``cur``
    that continue a hidden cell) and ``merged``; returns the objects of ``prev`` whose split
    is settled here (no division).
    """
    alive = {int(s): a for a, s in enumerate(prev_ids.tolist())}
    for seg in [s for s in merged if s not in alive]:
        del merged[seg]
    settled: set[int] = set()
    free = np.ones(len(cur), bool)
    free[match[match >= 0]] = False
    oi, oj, _ = overlaps
    for seg, (host, hidden) in list(merged.items()):
        hidden[:] = [h for h in hidden if t - h.t - 1 <= cfg.merge_max_frames]
        a = alive[seg]
        if not hidden:
            del merged[seg]
            continue
        near = free & (np.hypot(*(cur.pos - prev.pos[a]).T) <= cfg.max_dist)
        near[oj[(oi == a) & free[oj]]] = True
        if not near.any():
            continue
        objects = np.flatnonzero(near)
        if match[a] >= 0:
            objects = np.concatenate([[match[a]], objects])
        host_obj, out = resolve_split(prev.pos[a], host, hidden, objects, cur.pos)
        match[a] = host_obj
        for k, obj in out.items():
            parent[obj] = hidden[k].seg
            taken[obj] = True
        free[objects] = True
        free[[o for o in [host_obj, *out.values()] if o >= 0]] = False
        hidden[:] = [h for k, h in enumerate(hidden) if k not in out]
        settled.add(a)
        if not hidden or host_obj < 0:
            del merged[seg]
    found = find_merges(
        match, overlaps, prev.area, cur.area, cfg.merge_min_cover, cfg.merge_area_ratio, taken
    )
    for a, swallowed in found:
        blob = cur.pos[match[a]]
        seg = int(prev_ids[a])
        host, hidden = merged.get(seg, (Hidden(seg, t - 1, prev.pos[a] - blob), []))
        for i in swallowed:
            hidden.append(Hidden(int(prev_ids[i]), t - 1, prev.pos[i] - blob))
            hidden.extend(merged.pop(int(prev_ids[i]), (None, []))[1])  # hidden in it before
        merged[seg] = (host, hidden)
    return settled
