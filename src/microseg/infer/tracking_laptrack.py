"""The peer linker: ``laptrack`` (Fukai & Kawaguchi 2023, LAP tracking after Jaqaman et al.
2008) on object centroids, written out as our CTC result.

``laptrack.LapTrack.predict`` links points frame to frame, then closes gaps and adds
splittings, and returns a directed graph whose nodes are ``(frame, index)``. This adapter

1. measures the objects of each frame with the same features as our linker
   (:class:`microseg.infer.tracking._Frame`), so both linkers see the same centroids;
2. runs ``LapTrack`` on the centroids (its knobs come from ``tracking.laptrack``, with
   defaults in pixels matching ``tracking.link``: squared distances, because laptrack's
   default metric is ``sqeuclidean``);
3. cuts the graph into CTC tracks: an edge from frame t to t + 1 whose ends have one
   successor and one predecessor continues a track; a node with two successors is a mother
   (both successors start tracks with ``P`` = mother); an edge across missing frames is a
   closed gap, written as our linker writes it (a new label whose parent is the track before
   the gap);
4. numbers tracks as our linker does (order of appearance, then position y, x) and checks
   the result with :func:`microseg.io.ctc.check_tracks`.

Merging is left off: a CTC track table cannot hold two parents.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from microseg.errors import ConfigError, DataFormatError
from microseg.infer.tracking import _MAX_TRACK_ID, _Frame, check_input
from microseg.io.ctc import TRACK_COLUMNS, check_tracks

log = logging.getLogger(__name__)

#: our defaults for ``laptrack.LapTrack`` (squared pixels), chosen on the train/val sequences
#: 01, 02 (classical and ground-truth masks; ``benchmarks/bench_tracking_link.py --accuracy``):
#: frame links within 15 px (laptrack's default; 20 px cost HOTA on classical masks), gaps of
#: up to 2 missing frames within 20 px (as ``LinkConfig``), splitting within 20 px (off:
#: no division is ever found; 10 px: BC 0.88 instead of 0.93 on ground truth).
DEFAULTS: dict[str, Any] = {
    "cutoff": 15.0**2,
    "gap_closing_cutoff": 20.0**2,
    "gap_closing_max_frame_count": 3,  # frame difference: 2 missing frames
    "splitting_cutoff": 20.0**2,
}


def make_laptrack(values: Mapping[str, Any] | None = None):
    """A ``laptrack.LapTrack`` from ``tracking.laptrack`` over :data:`DEFAULTS`; a bad key or
    value is a ``ConfigError`` quoting laptrack's own check."""
    from laptrack import LapTrack
    from pydantic import ValidationError

    kwargs = {**DEFAULTS, **dict(values or {})}
    if kwargs.get("merging_cutoff"):
        raise ConfigError(
            "tracking.laptrack.merging_cutoff: merges cannot be written as CTC tracks "
            "(a track has one parent); leave it False"
        )
    try:
        return LapTrack(**kwargs)
    except (ValidationError, TypeError) as exc:
        raise ConfigError(f"tracking.laptrack: {exc}") from exc


def link_laptrack(
    masks: np.ndarray, values: Mapping[str, Any] | None = None
) -> tuple[np.ndarray, pd.DataFrame]:
    """Link per-frame instance labels with ``laptrack``; same contract as
    :func:`microseg.infer.tracking.link` (``uint16`` track-id masks, CTC table ``L B E P``)."""
    masks = check_input(masks)
    tracker = make_laptrack(values)
    frames = [_Frame.of(m) for m in masks]
    coords = [f.pos if len(f) else np.zeros((0, 2)) for f in frames]
    graph = tracker.predict(coords) if any(len(f) for f in frames) else None
    seg_of: dict[tuple[int, int], int] = {}  # node -> segment (before renumbering)
    start: list[int] = []
    end: list[int] = []
    parent: list[int] = []
    first_pos: list[tuple[float, float]] = []
    for t, frame in enumerate(frames):
        for i in range(len(frame)):
            node = (t, i)
            preds = list(graph.predecessors(node)) if graph is not None else []
            if len(preds) > 1:  # not produced with merging off; refuse rather than guess
                raise DataFormatError(f"laptrack merged tracks at frame {t}; CTC cannot hold it")
            if preds:
                p = preds[0]
                if p[0] == t - 1 and graph.out_degree(p) == 1:
                    s = seg_of[p]
                    seg_of[node] = s
                    end[s] = t
                    continue
                mother = seg_of[p]
            else:
                mother = -1
            seg_of[node] = len(start)
            start.append(t)
            end.append(t)
            parent.append(mother)
            first_pos.append((float(frame.pos[i, 0]), float(frame.pos[i, 1])))
    n = len(start)
    if n > _MAX_TRACK_ID:
        raise DataFormatError(f"laptrack made {n} tracks; CTC labels are uint16")
    # number as our linker does: by first frame, then position (y, x)
    pos = np.asarray(first_pos, np.float64).reshape(-1, 2)
    order = np.lexsort((pos[:, 1], pos[:, 0], np.asarray(start, np.int64)))
    new_id = np.empty(n, np.int64)
    new_id[order] = np.arange(1, n + 1)
    tracked = np.zeros(masks.shape, np.uint16)
    for t, frame in enumerate(frames):
        if len(frame):
            lut = np.zeros(len(frame) + 1, np.uint16)
            lut[1:] = [new_id[seg_of[(t, i)]] for i in range(len(frame))]
            tracked[t] = lut[frame.compact]
    par = np.asarray(parent, np.int64)
    tracks = pd.DataFrame(
        {
            "L": new_id,
            "B": np.asarray(start, np.int64),
            "E": np.asarray(end, np.int64),
            "P": np.where(par >= 0, new_id[np.maximum(par, 0)], 0),
        },
        columns=list(TRACK_COLUMNS),
    )
    tracks = tracks.sort_values("L").reset_index(drop=True).astype("int64")
    check_tracks(tracked, tracks)
    log.info("laptrack linked %d frames: %d tracks", len(masks), n)
    return tracked, tracks
