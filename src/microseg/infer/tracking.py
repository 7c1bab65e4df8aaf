"""Link per-frame instance masks into Cell Tracking Challenge tracks.

Input: a ``(T, Y, X)`` stack of instance label images whose ids mean nothing across frames.
Output: the same objects relabelled so that the value is a track id, and the CTC track table
``L B E P``. The steps:

1. **Features** per frame: label, area, centroid, bounding box and eccentricity as
   :func:`skimage.measure.regionprops` defines them (a test cross-checks), on ids made compact
   first, for all objects at once: moments with ``np.bincount``, boxes with
   :func:`scipy.ndimage.find_objects` (``regionprops_table`` builds a Python object per
   region, about 10x slower with hundreds of objects a frame). IoU between consecutive
   frames comes from one sparse overlap count: the pairs of labels under every pixel that is
   foreground in both, counted with ``np.bincount`` -- never one mask comparison per pair.
2. **Frame-to-frame assignment** with :func:`scipy.optimize.linear_sum_assignment` on the
   standard augmented cost matrix (Jaqaman et al. 2008)::

        [ link (n x m)      death (n x n, diagonal) ]
        [ birth (m x m, d.) 0     (m x n)           ]

   ``link = w_iou * (1 - IoU) + w_dist * distance / max_dist`` for pairs within ``max_dist``
   px and with ``IoU >= min_iou`` (other pairs are forbidden), so a link is taken only when
   it is cheaper than ending one track and starting another (``death_cost + birth_cost``).
   The problem splits into connected components of the gating graph; components with one
   candidate pair are decided directly and only the others go to the solver.
3. **Divisions**: a track whose object at ``t`` continued into one object of ``t + 1`` while
   another object of ``t + 1`` nearby was left unmatched (or a track that matched nothing with
   two unmatched objects nearby) is a mother when: both daughters lie within
   ``div_max_dist`` px and ``div_max_radii`` of the mother's equivalent radii of its centroid,
   each has ``div_area_ratio`` of its area, they lie on opposite sides of it (angle > 90
   degrees), and it is at least ``div_min_eccentricity`` elongated; the daughters must look like
   sisters: areas within ``div_max_sister_ratio`` of each other and, when the frames are
   given, mean intensities within ``div_max_intensity_ratio``. The mother's track ends
   at ``t``; both daughters start new tracks at ``t + 1`` with ``P`` = mother. Candidates are
   accepted greedily by total daughter distance, each object used once.
4. **Gap closing**: a track that ends (without daughters) and one that begins (without a
   parent) after 1..``max_gap`` missing frames are joined when the second begins within
   ``gap_max_dist`` of where the first, moving on at its last velocity, would be (one
   assignment over all such pairs, again with no-link options). A track that ends touching
   the image edge and one that begins touching it are a cell leaving and another coming in,
   not a gap, unless ``gap_reentry``.
0. **Split merged masks** first (``split_merges``, :mod:`microseg.infer.tracking_split`):
   a mask over two objects of the previous (then the next) frame is cut between them by a
   seeded watershed, so both cells keep a mask of their own; with ``join_pinched`` a
   division's first frame whose two halves touch is given back to the mother (unless they
   have grown over her, ``join_max_growth``: daughters still drawn as one before).
5. **Merges** (``merges``, :mod:`microseg.infer.tracking_merge`): a track that vanishes into
   a neighbour's grown mask is remembered as hidden in it for up to ``merge_max_frames``;
   when that mask comes apart, host and hidden cells take the pieces (not a division).
6. **Division timing** (``div_retime_drop``, :mod:`microseg.infer.tracking_retime`): a
   division is moved to the frame where the mask's major axis drops (the mother is longest
   at her last frame), cutting or joining masks there.
7. **Clean-up** (``fuse_max_dist``, ``min_track_length``,
   :mod:`microseg.infer.tracking_post`): fragments fused, spurious short tracks and
   daughters removed.

**How a closed gap is written.** The CTC rules (``io.ctc.check_tracks`` and the official
validator in ``py-ctcmetrics``, ``valid() -> inspect_masks``) require a label to be present in
*every* frame from ``B`` to ``E``, and a mask cannot be invented for the missing frames. So the
track after the gap gets a new label whose parent ``P`` is the track before the gap: a parent
with a single daughter, the CTC convention for a track interrupted by a gap.
``py-ctcmetrics`` merges exactly such single-child chains back into one trajectory
(``merge_tracks``: "a cell is invisible for a few frames and the tracking algorithm splits
the track") for CHOTA/HOTA/IDF1/MOTA; the TRA graph sees a parent edge across the gap.

Track ids are 1, 2, ... in order of appearance, and within a frame in order of position
(y, then x), so the output does not depend on the arbitrary input ids; an id is never
reused. Output is ``uint16`` and checked with :func:`microseg.io.ctc.check_tracks` before it is
returned.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.optimize import linear_sum_assignment
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from scipy.spatial import cKDTree

from microseg.errors import ConfigError, DataFormatError, ShapeMismatchError
from microseg.infer.tracking_merge import Hidden, merge_step
from microseg.infer.tracking_post import postprocess
from microseg.infer.tracking_retime import retime_divisions
from microseg.infer.tracking_split import join_pinched, split_merges
from microseg.io.ctc import TRACK_COLUMNS, check_tracks

log = logging.getLogger(__name__)

FEATURE_COLUMNS = (
    "label", "area", "cy", "cx", "bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1", "eccentricity",
)  # fmt: skip
_MAX_TRACK_ID = int(np.iinfo(np.uint16).max)
_LUT_LIMIT = 1 << 24  # label values up to this are mapped with a lookup table


@dataclass(frozen=True)
class LinkConfig:
    """Knobs of :func:`link`; distances in pixels, costs dimensionless."""

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> LinkConfig:
        """From ``tracking.link``; an unknown key (a typo) is a ``ConfigError`` listing the
        known ones, not a TypeError."""
        from dataclasses import fields

        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"tracking.link: unknown key(s) {unknown}; known: {sorted(known)}")
        return cls(**values)

    max_dist: float = 20.0  # centroid gate for a frame-to-frame link
    min_iou: float = 0.0  # IoU gate for a link (0: distance alone gates)
    w_iou: float = 1.0  # weight of (1 - IoU) in the link cost
    w_dist: float = 1.0  # weight of distance / max_dist in the link cost
    birth_cost: float = 0.5  # cost of starting a track (a link costs less than birth + death)
    death_cost: float = 0.5  # cost of ending a track
    max_gap: int = 2  # most missing frames a gap closing bridges (0: no gap closing)
    gap_max_dist: float = 20.0  # gate between predicted end and start of a gap
    gap_reentry: bool = False  # join an exit at the image edge to an entry there (else: 2 cells)
    divisions: bool = True
    div_max_dist: float = 20.0  # mother centroid to each daughter centroid
    div_area_ratio: tuple[float, float] = (0.3, 0.8)  # each daughter's area / mother's area
    div_min_eccentricity: float = 0.0  # mother's elongation at the last frame (0: not used)
    div_max_radii: float = 2.0  # ... and at most this many mother's equivalent radii (0: off)
    div_max_sister_ratio: float = 2.0  # larger / smaller daughter area, at most (0: off)
    div_max_intensity_ratio: float = 0.0  # brighter / dimmer daughter (needs images; 0: off)
    merges: bool = True  # two cells under one mask: keep the hidden one, undo at the split
    merge_max_frames: int = 5  # most frames a cell stays hidden in a merged mask
    merge_min_cover: float = 0.5  # share of the vanished cell's pixels the merged mask covers
    merge_area_ratio: float = 1.2  # merged mask / host's previous area, at least
    split_merges: bool = False  # cut a mask over two tracked cells (tracking_split) first
    split_min_cover: float = 0.5  # share of each neighbouring-frame object the mask covers
    split_area_ratio: float = 0.8  # mask area / the covered objects' total area, at least
    split_erode: int = 1  # px the seeds (neighbouring-frame objects, moved) are eroded by
    split_max_frames: int = 10  # most frames a forward chain of splits runs (0: none)
    split_back_frames: int = 5  # most frames split backwards before cells are seen apart (0: none)
    split_back_max_neck: float = 1.0  # backward cut's distance transform / smaller peak (0: off)
    split_back_grown: tuple[tuple[float, float], ...] = ()  # (growth, neck): gate of a grown mask
    join_pinched: bool = False  # a division's first frame, halves touching: still the mother
    join_max_growth: float = 0.0  # ... unless the halves grew this much over her (0: off)
    div_retime_drop: float = 0.0  # move a division to a length drop this large (0: off)
    div_retime_frames: int = 3  # ... found at most this many frames before it
    fuse_max_dist: float = 0.0  # fuse a track ending at t with one starting at t+1 this near
    min_track_length: int = 1  # shorter lone tracks / short daughters are spurious (1: off)

    def __post_init__(self) -> None:
        grown = tuple(tuple(float(v) for v in tier) for tier in self.split_back_grown)
        object.__setattr__(self, "split_back_grown", grown)  # YAML gives lists
        for name in ("max_dist", "gap_max_dist", "div_max_dist"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("w_iou", "w_dist", "birth_cost", "death_cost"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.min_iou <= 1.0:
            raise ConfigError(f"min_iou must be in [0, 1], got {self.min_iou}")
        if self.max_gap < 0 or self.merge_max_frames < 0:
            raise ConfigError(
                f"max_gap and merge_max_frames must be >= 0, got {self.max_gap}, "
                f"{self.merge_max_frames}"
            )
        if self.fuse_max_dist < 0 or self.min_track_length < 1:
            raise ConfigError(
                f"fuse_max_dist must be >= 0 and min_track_length >= 1, got "
                f"{self.fuse_max_dist}, {self.min_track_length}"
            )
        if not 0.0 < self.merge_min_cover <= 1.0 or self.merge_area_ratio < 0:
            raise ConfigError(
                f"merge_min_cover must be in (0, 1] and merge_area_ratio >= 0, got "
                f"{self.merge_min_cover}, {self.merge_area_ratio}"
            )
        lo, hi = self.div_area_ratio
        if not 0 < lo <= hi:
            raise ConfigError(f"div_area_ratio must be 0 < low <= high, got {(lo, hi)}")
        for name in ("div_max_sister_ratio", "div_max_intensity_ratio"):
            value = getattr(self, name)
            if value != 0 and value < 1:
                raise ConfigError(f"{name} must be 0 (off) or >= 1, got {value}")
        if self.div_max_radii < 0:
            raise ConfigError(f"div_max_radii must be >= 0, got {self.div_max_radii}")
        if (
            not 0.0 < self.split_min_cover <= 1.0
            or self.split_area_ratio < 0
            or self.split_erode < 0
            or self.split_back_max_neck < 0
            or self.join_max_growth < 0
            or any(len(tier) != 2 or min(tier) < 0 for tier in self.split_back_grown)
            or self.split_max_frames < 0
            or self.split_back_frames < 0
            or not 0.0 <= self.div_retime_drop < 1.0
            or self.div_retime_frames < 0
        ):
            raise ConfigError(
                "split_min_cover must be in (0, 1]; split_area_ratio, split_erode, "
                "split_max_frames, split_back_frames, split_back_max_neck, join_max_growth, "
                "div_retime_frames and each split_back_grown (growth, neck) >= 0, "
                "div_retime_drop in [0, 1); got "
                f"{self.split_min_cover}, {self.split_area_ratio}, {self.split_erode}, "
                f"{self.split_max_frames}, {self.split_back_frames}, {self.split_back_max_neck}, "
                f"{self.join_max_growth}, {self.split_back_grown}, {self.div_retime_frames}, "
                f"{self.div_retime_drop}"
            )
        if not 0.0 <= self.div_min_eccentricity < 1.0:
            raise ConfigError(
                f"div_min_eccentricity must be in [0, 1), got {self.div_min_eccentricity}"
            )


# --------------------------------------------------------------------------- features


def compact_labels(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Relabel to ``1..n`` (int32, 0 stays background); returns it and the sorted original ids.

    Per-frame ids may be anything up to 2**32 or more; skimage's ``regionprops`` walks one slot
    per possible label value, so big sparse ids are made compact first.
    """
    flat = image.ravel()
    top = int(flat.max()) if flat.size else 0
    if top < _LUT_LIMIT:
        present = np.flatnonzero(np.bincount(flat.astype(np.intp, copy=False), minlength=1))
        present = present[present != 0]
        lut = np.zeros(top + 1, np.int32)
        lut[present] = np.arange(1, len(present) + 1, dtype=np.int32)
        return lut[image], present.astype(np.int64)
    values, inverse = np.unique(image, return_inverse=True)
    compact = inverse.reshape(image.shape).astype(np.int32)
    if values[0] == 0:
        return compact, values[1:].astype(np.int64)
    return compact + 1, values.astype(np.int64)


def frame_features(labels: np.ndarray) -> pd.DataFrame:
    """Per-object features of one label image, sorted by label (columns ``FEATURE_COLUMNS``)."""
    return _features(*compact_labels(np.asarray(labels)))


def _features(compact: np.ndarray, original: np.ndarray) -> pd.DataFrame:
    """skimage's ``regionprops`` area, centroid and bbox, all objects at once: moments by
    ``np.bincount`` over the foreground pixels, boxes by :func:`scipy.ndimage.find_objects`
    (regionprops builds one Python object per region: 10x slower at 300 objects a frame)."""
    n = len(original)
    ys, xs = np.nonzero(compact)
    idx = compact[ys, xs].astype(np.intp) - 1
    area = np.bincount(idx, minlength=n).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        cy = np.bincount(idx, ys, n) / area
        cx = np.bincount(idx, xs, n) / area
    box = np.zeros((n, 4), np.int64)
    for k, sl in enumerate(ndimage.find_objects(compact, max_label=n)):
        if sl is not None:
            box[k] = (sl[0].start, sl[1].start, sl[0].stop, sl[1].stop)
    df = pd.DataFrame(
        {
            "label": original,
            "area": area,
            "cy": cy,
            "cx": cx,
            "bbox_y0": box[:, 0],
            "bbox_x0": box[:, 1],
            "bbox_y1": box[:, 2],
            "bbox_x1": box[:, 3],
        }
    )
    df["eccentricity"] = _eccentricity(ys, xs, idx, df)
    return df


def _eccentricity(ys: np.ndarray, xs: np.ndarray, idx: np.ndarray, df: pd.DataFrame) -> np.ndarray:
    """skimage's ``eccentricity`` (from the inertia tensor) for all objects at once."""
    n = len(df)
    if n == 0:
        return np.zeros(0)
    dy = ys - df["cy"].to_numpy()[idx]
    dx = xs - df["cx"].to_numpy()[idx]
    area = df["area"].to_numpy()
    # inertia tensor eigenvalues = eigenvalues of the (population) coordinate covariance
    a = np.bincount(idx, dy * dy, n) / area
    c = np.bincount(idx, dx * dx, n) / area
    b = np.bincount(idx, dy * dx, n) / area
    root = np.sqrt(((a - c) / 2) ** 2 + b**2)
    l1 = (a + c) / 2 + root
    l2 = (a + c) / 2 - root
    with np.errstate(divide="ignore", invalid="ignore"):
        ecc = np.sqrt(np.clip(1.0 - l2 / l1, 0.0, 1.0))
    return np.where(l1 > 0, ecc, 0.0)


def overlap_counts(
    a: np.ndarray, b: np.ndarray, na: int, nb: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sparse pixel overlaps of two compact label images (values ``1..na``, ``1..nb``).

    Returns ``(i, j, count)`` for every pair of objects that share pixels, ``i = label_a - 1``.
    One pass over the pixels that are foreground in both, counted with ``np.bincount``.
    """
    both = (a != 0) & (b != 0)
    empty = np.zeros(0, np.int64)
    if na == 0 or nb == 0 or not both.any():
        return empty, empty, empty
    key = (a[both].astype(np.int64) - 1) * nb + (b[both] - 1)
    if na * nb <= 1 << 24:
        counts = np.bincount(key, minlength=na * nb)
        keys = np.flatnonzero(counts)
        counts = counts[keys]
    else:  # very many objects: sort instead of a dense count table
        keys, counts = np.unique(key, return_counts=True)
    return keys // nb, keys % nb, counts.astype(np.int64)


# --------------------------------------------------------------------------- frame to frame


@dataclass
class _Frame:
    compact: np.ndarray  # the label image with ids 1..n
    labels: np.ndarray  # original id of each object (sorted)
    area: np.ndarray
    pos: np.ndarray  # (n, 2) centroids y, x
    ecc: np.ndarray
    border: np.ndarray  # touches the edge of the image
    mean: np.ndarray | None = None  # mean intensity of each object (when an image is given)

    @classmethod
    def of(cls, image: np.ndarray, intensity: np.ndarray | None = None) -> _Frame:
        compact, original = compact_labels(image)
        df = _features(compact, original)
        h, w = image.shape
        border = (df["bbox_y0"] == 0) | (df["bbox_x0"] == 0)
        border |= (df["bbox_y1"] == h) | (df["bbox_x1"] == w)
        mean = None
        if intensity is not None:
            n = len(original) + 1
            sums = np.bincount(compact.ravel(), np.asarray(intensity, np.float64).ravel(), n)
            mean = sums[1:] / np.maximum(df["area"].to_numpy(), 1)
        return cls(
            compact=compact,
            labels=original,
            area=df["area"].to_numpy(),
            pos=df[["cy", "cx"]].to_numpy(),
            ecc=df["eccentricity"].to_numpy(),
            border=border.to_numpy(),
            mean=mean,
        )

    def __len__(self) -> int:
        return len(self.labels)


def _candidates(
    fa: _Frame, fb: _Frame, cfg: LinkConfig, overlaps: tuple[np.ndarray, ...]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gated pairs ``(i, j, cost)`` between frames: overlapping or within ``max_dist``."""
    oi, oj, inter = overlaps
    i, j = oi, oj
    if cfg.min_iou <= 0.0:  # pairs that do not touch may still link on distance alone
        near = cKDTree(fa.pos).sparse_distance_matrix(
            cKDTree(fb.pos), cfg.max_dist, output_type="coo_matrix"
        )
        i = np.concatenate([oi, near.row.astype(np.int64)])
        j = np.concatenate([oj, near.col.astype(np.int64)])
    nb = len(fb)
    key = np.unique(i * nb + j)
    i, j = key // nb, key % nb
    shared = np.zeros(len(key), np.float64)
    shared[np.searchsorted(key, oi * nb + oj)] = inter
    iou = shared / (fa.area[i] + fb.area[j] - shared)
    dist = np.hypot(*(fa.pos[i] - fb.pos[j]).T) if len(i) else np.zeros(0)
    ok = (dist <= cfg.max_dist) & (iou >= cfg.min_iou)
    cost = cfg.w_iou * (1.0 - iou[ok]) + cfg.w_dist * dist[ok] / cfg.max_dist
    return i[ok], j[ok], cost


def _assign(
    n: int, m: int, i: np.ndarray, j: np.ndarray, cost: np.ndarray, birth: float, death: float
) -> np.ndarray:
    """Optimal links with no-link options: ``match[i] = j`` or -1 (augmented LSA)."""
    match = np.full(n, -1, np.int64)
    if len(i) == 0:
        return match
    graph = coo_matrix((np.ones(len(i)), (i, n + j)), shape=(n + m, n + m))
    _, comp = connected_components(graph, directed=False)
    edges_per = np.bincount(comp[i], minlength=n + m)
    single = edges_per[comp[i]] == 1
    take = single & (cost < birth + death)
    match[i[take]] = j[take]
    hard = ~single
    if not hard.any():
        return match
    # one solve over all components that have a choice to make
    rows = np.unique(i[hard])
    cols = np.unique(j[hard])
    ri, cj = np.searchsorted(rows, i[hard]), np.searchsorted(cols, j[hard])
    nr, nc = len(rows), len(cols)
    mat = np.full((nr + nc, nc + nr), np.inf)  # inf: forbidden
    mat[ri, cj] = cost[hard]
    mat[np.arange(nr), nc + np.arange(nr)] = death
    mat[nr + np.arange(nc), np.arange(nc)] = birth
    mat[nr:, nc:] = 0.0
    r, c = linear_sum_assignment(mat)
    linked = (r < nr) & (c < nc)
    match[rows[r[linked]]] = cols[c[linked]]
    return match


def _divisions(
    fa: _Frame,
    fb: _Frame,
    match: np.ndarray,
    cfg: LinkConfig,
    taken_b: np.ndarray | None = None,
    skip_a: set[int] | frozenset[int] = frozenset(),
) -> list[tuple[int, int, int]]:
    """Accepted divisions ``(mother, daughter1, daughter2)`` between two frames; objects of
    ``b`` in ``taken_b`` and mothers in ``skip_a`` (a merge that came apart) take no part."""
    if len(fa) == 0 or len(fb) < 2:
        return []
    matched_b = np.zeros(len(fb), bool) if taken_b is None else taken_b.copy()
    matched_b[match[match >= 0]] = True
    free = np.flatnonzero(~matched_b)
    if len(free) == 0:
        return []
    lo, hi = cfg.div_area_ratio
    tree = cKDTree(fa.pos)
    near = tree.query_ball_point(fb.pos[free], cfg.div_max_dist)
    by_mother: dict[int, list[int]] = {}
    for j, mothers in zip(free.tolist(), near, strict=True):
        for i in mothers:
            by_mother.setdefault(i, []).append(j)

    def fits(i: int, j: int) -> bool:
        ratio = fb.area[j] / fa.area[i]
        reach = cfg.div_max_dist
        if cfg.div_max_radii > 0:
            reach = min(reach, cfg.div_max_radii * np.sqrt(fa.area[i] / np.pi))
        return lo <= ratio <= hi and dist(i, j) <= reach

    def dist(i: int, j: int) -> float:
        return float(np.hypot(*(fb.pos[j] - fa.pos[i])))

    def opposite(i: int, j: int, k: int) -> bool:
        return float(np.dot(fb.pos[j] - fa.pos[i], fb.pos[k] - fa.pos[i])) < 0.0

    def sisters(j: int, k: int) -> bool:
        """Daughters of one mother look alike: similar size (and brightness, with images)."""
        if cfg.div_max_sister_ratio > 0:
            big, small = max(fb.area[j], fb.area[k]), min(fb.area[j], fb.area[k])
            if big > cfg.div_max_sister_ratio * small:
                return False
        if cfg.div_max_intensity_ratio > 0 and fb.mean is not None:
            hi, lo = max(fb.mean[j], fb.mean[k]), min(fb.mean[j], fb.mean[k])
            if hi > cfg.div_max_intensity_ratio * max(lo, 1e-9):
                return False
        return True

    proposals: list[tuple[float, int, int, int]] = []
    for i, js in by_mother.items():
        if i in skip_a or fa.ecc[i] < cfg.div_min_eccentricity:
            continue
        js = [j for j in js if fits(i, j)]
        if match[i] >= 0:
            k = int(match[i])
            if not fits(i, k):
                continue
            pairs = [(k, j) for j in js]
        else:
            pairs = [(j, k) for x, j in enumerate(js) for k in js[x + 1 :]]
        for j, k in pairs:
            if opposite(i, j, k) and sisters(j, k):
                proposals.append((dist(i, j) + dist(i, k), i, j, k))
    accepted: list[tuple[int, int, int]] = []
    used_a: set[int] = set()
    used_b: set[int] = set()
    for _, i, j, k in sorted(proposals):
        if i in used_a or j in used_b or k in used_b:
            continue
        used_a.add(i)
        used_b.update((j, k))
        accepted.append((i, j, k))
    return accepted


# --------------------------------------------------------------------------- segments


@dataclass
class _Segments:
    """Track segments under construction (index = creation order)."""

    start: list[int] = field(default_factory=list)
    end: list[int] = field(default_factory=list)
    parent: list[int] = field(default_factory=list)  # segment index or -1
    history: list[list[tuple[float, float]]] = field(default_factory=list)  # last positions
    first: list[tuple[float, float]] = field(default_factory=list)  # position at the start
    border_first: list[bool] = field(default_factory=list)  # touched the image edge at start
    border_last: list[bool] = field(default_factory=list)  # ... at its last frame so far

    def new(self, t: int, pos: np.ndarray, parent: int = -1, border: bool = False) -> int:
        self.first.append((float(pos[0]), float(pos[1])))
        self.border_first.append(bool(border))
        self.border_last.append(bool(border))
        self.start.append(t)
        self.end.append(t)
        self.parent.append(parent)
        self.history.append([(float(pos[0]), float(pos[1]))])
        return len(self.start) - 1

    def extend(self, s: int, t: int, pos: np.ndarray, border: bool = False) -> None:
        self.end[s] = t
        self.border_last[s] = bool(border)
        hist = self.history[s]
        hist.append((float(pos[0]), float(pos[1])))
        if len(hist) > 4:
            del hist[0]

    def velocity(self, s: int) -> np.ndarray:
        hist = np.asarray(self.history[s])
        if len(hist) < 2:
            return np.zeros(2)
        return (hist[-1] - hist[0]) / (len(hist) - 1)


def _close_gaps(segs: _Segments, n_frames: int, cfg: LinkConfig) -> int:
    """Join ends to later starts across 1..max_gap missing frames; returns how many."""
    if cfg.max_gap <= 0:
        return 0
    has_child = set(p for p in segs.parent if p >= 0)
    ends = [s for s in range(len(segs.start)) if segs.end[s] < n_frames - 2 and s not in has_child]
    starts = [s for s in range(len(segs.start)) if segs.start[s] >= 2 and segs.parent[s] < 0]
    if not ends or not starts:
        return 0
    ei, sj, cost = [], [], []
    start_pos = np.array([segs.first[s] for s in starts])
    start_t = np.array([segs.start[s] for s in starts])
    tree = cKDTree(start_pos)
    reach = cfg.gap_max_dist + cfg.max_dist * (cfg.max_gap + 1)  # generous pre-gate
    for a, s in enumerate(ends):
        last = np.asarray(segs.history[s][-1])
        vel = segs.velocity(s)
        for b in tree.query_ball_point(last, reach):
            missing = int(start_t[b]) - segs.end[s] - 1
            if not 1 <= missing <= cfg.max_gap:
                continue
            if segs.border_last[s] and segs.border_first[starts[b]] and not cfg.gap_reentry:
                continue  # left the field and something came in there: two cells
            predicted = last + vel * (missing + 1)
            d = float(np.hypot(*(start_pos[b] - predicted)))
            if d <= cfg.gap_max_dist:
                ei.append(a)
                sj.append(b)
                cost.append(d / cfg.gap_max_dist)
    if not ei:
        return 0
    match = _assign(len(ends), len(starts), np.array(ei), np.array(sj), np.array(cost), 0.5, 0.5)
    joined = 0
    for a, b in enumerate(match.tolist()):
        if b >= 0:
            segs.parent[starts[b]] = ends[a]
            joined += 1
    return joined


# --------------------------------------------------------------------------- public


def check_input(masks: np.ndarray) -> np.ndarray:
    """``masks`` as an array, refused unless ``(T, Y, X)`` non-negative integers."""
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise ShapeMismatchError(f"expected masks of shape (T, Y, X), found {masks.shape}")
    if not np.issubdtype(masks.dtype, np.integer) or (
        np.issubdtype(masks.dtype, np.signedinteger) and masks.size and masks.min() < 0
    ):
        raise DataFormatError(f"expected non-negative integer labels, found {masks.dtype}")
    return masks


def link(
    masks: np.ndarray, cfg: LinkConfig | None = None, images: np.ndarray | None = None
) -> tuple[np.ndarray, pd.DataFrame]:
    """Link per-frame instance labels into tracks.

    Args:
        masks: ``(T, Y, X)`` non-negative integer label images; 0 is background, ids are
            arbitrary per frame (the same id in two frames means nothing).
        cfg: linking knobs (:class:`LinkConfig`).
        images: the ``(T, Y, X)`` frames the masks came from (optional): the intensity cue
            of divisions (``div_max_intensity_ratio``) needs them.

    Returns:
        ``(tracked, tracks)``: ``uint16`` masks whose value is the track id, and the CTC track
        table (columns ``L B E P``, int64, sorted by ``L``) that passes
        :func:`microseg.io.ctc.check_tracks`.
    """
    cfg = cfg or LinkConfig()
    masks = check_input(masks)
    n_frames = len(masks)
    if images is not None and np.shape(images) != masks.shape:
        raise ShapeMismatchError(
            f"images {np.shape(images)} and masks {masks.shape} must have one shape"
        )
    n_split = 0
    if cfg.split_merges:
        masks, n_split = split_merges(masks, cfg)
    if cfg.join_pinched:
        masks, n_join = join_pinched(
            masks, cfg.split_min_cover, cfg.div_max_sister_ratio, cfg.join_max_growth
        )
        log.info("%d pinched mothers made one mask again", n_join)
    segs = _Segments()
    tracked = np.zeros(masks.shape, np.uint16)
    n_div = n_unmerged = 0
    merged: dict[int, tuple[Hidden, list[Hidden]]] = {}  # host segment -> (host, hidden cells)
    prev: _Frame | None = None
    prev_ids = np.zeros(0, np.int64)  # segment index of each object of the previous frame
    for t in range(n_frames):
        cur = _Frame.of(masks[t], None if images is None else images[t])
        ids = np.full(len(cur), -1, np.int64)
        parent = np.full(len(cur), -1, np.int64)  # mother's segment for daughters
        if prev is not None and len(prev) and len(cur):
            overlaps = overlap_counts(prev.compact, cur.compact, len(prev), len(cur))
            i, j, cost = _candidates(prev, cur, cfg, overlaps)
            match = _assign(len(prev), len(cur), i, j, cost, cfg.birth_cost, cfg.death_cost)
            taken = np.zeros(len(cur), bool)
            split_hosts: set[int] = set()
            if cfg.merges:
                split_hosts = merge_step(
                    t, prev, cur, prev_ids, match, overlaps, merged, parent, taken, cfg
                )
                n_unmerged += int(taken.sum())
            divs = []
            if cfg.divisions:
                divs = _divisions(prev, cur, match, cfg, taken, split_hosts)
            for mother, d1, d2 in divs:
                match[mother] = -1
                parent[[d1, d2]] = prev_ids[mother]
            n_div += len(divs)
            for a in np.flatnonzero(match >= 0).tolist():
                b = int(match[a])
                ids[b] = prev_ids[a]
                segs.extend(int(prev_ids[a]), t, cur.pos[b], cur.border[b])
        # new tracks numbered by position, so the output does not depend on the input ids
        born = np.flatnonzero(ids < 0)
        for b in born[np.lexsort((cur.pos[born, 1], cur.pos[born, 0]))].tolist():
            ids[b] = segs.new(t, cur.pos[b], int(parent[b]), cur.border[b])
        if len(segs.start) > _MAX_TRACK_ID:
            raise DataFormatError(
                f"linking made more than {_MAX_TRACK_ID} tracks by frame {t}; CTC labels are uint16"
            )
        # a frame's track ids are final once it is linked: later events only touch later frames
        tracked[t] = np.concatenate([[0], ids + 1]).astype(np.uint16)[cur.compact]
        prev, prev_ids = cur, ids
    n_gaps = _close_gaps(segs, n_frames, cfg)
    n_tracks = len(segs.start)
    tracks = pd.DataFrame(
        {
            "L": np.arange(1, n_tracks + 1, dtype=np.int64),
            "B": np.asarray(segs.start, np.int64),
            "E": np.asarray(segs.end, np.int64),
            "P": np.asarray(segs.parent, np.int64) + 1,  # -1 -> 0, segment s -> label s + 1
        },
        columns=list(TRACK_COLUMNS),
    )
    check_tracks(tracked, tracks)
    n_retimed = 0
    if cfg.divisions and cfg.div_retime_drop > 0:
        tracked, tracks, n_retimed = retime_divisions(tracked, tracks, cfg)
    if cfg.fuse_max_dist > 0 or cfg.min_track_length > 1:
        tracked, tracks = postprocess(tracked, tracks, cfg.fuse_max_dist, cfg.min_track_length)
        n_tracks = len(tracks)
    log.info(
        "linked %d frames: %d masks split, %d tracks, %d divisions, %d gaps closed, "
        "%d cells out of merges, %d divisions moved to a length drop",
        n_frames,
        n_split,
        n_tracks,
        n_div,
        n_gaps,
        n_unmerged,
        n_retimed,
    )
    return tracked, tracks
