"""Synthetic 2D+t nucleus sequences with Cell Tracking Challenge ground truth.

Nuclei are ellipses that drift with the stage, wander and jitter on their own, touch, divide
(the mother elongates and pinches over a few frames, then two daughters appear along its long
axis, ``daughter_offset`` apart, moving apart at ``daughter_speed_px``: slow daughters stay
touching for frames) and enter or leave the field of view. Over the sequence the nuclei may
bleach (``bleach_per_frame``) and the focus drift (``blur_growth`` widens the PSF); crowding
comes from ``n_cells`` and ``touch_fraction``. The label image of every frame carries the track
id as its value, so one array is both the CTC SEG and TRA truth, and the track table follows
the CTC ``man_track.txt`` rules: a label is present in every frame from B to E, daughters
begin the frame after their mother ends, and a label value is never reused.

Everything is drawn from one ``np.random.default_rng(seed)``; nothing is written to disk.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import ndimage

from microseg.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrackingSynthConfig:
    """Knobs of the tracking generator; lengths in pixels, rates per frame."""

    shape: tuple[int, int] = (128, 128)
    n_frames: int = 30
    n_cells: tuple[int, int] = (8, 12)
    radius_px: tuple[float, float] = (6.0, 10.0)  # area-equivalent nucleus radius
    aspect: tuple[float, float] = (1.0, 1.5)  # long / short axis
    drift_px: tuple[float, float] = (0.3, 1.0)  # speed of the common (stage) drift
    motility_px: float = 0.6  # std of each cell's own persistent velocity change
    persistence: float = 0.7  # how much of its own velocity a cell keeps per frame
    jitter_px: float = 0.4  # frame-to-frame positional noise
    division_probability: float = 0.012  # per cell and frame
    division_frames: int = 3  # frames the mother spends elongating before the split
    min_division_age: int = 8  # frames between birth and the next division
    enter_probability: float = 0.08  # chance per frame that a cell drifts in from an edge
    min_visible_px: int = 12  # a cell partly out with fewer visible pixels has left
    touch_fraction: float = 0.8  # centres kept at least this x (r_i + r_j) apart
    cell_photons: tuple[float, float] = (40.0, 90.0)
    flicker: float = 0.08  # log-normal std of each cell's brightness, frame to frame
    global_flicker: float = 0.04  # illumination flicker shared by all cells in a frame
    texture: float = 0.15  # relative chromatin texture inside nuclei
    background_photons: float = 12.0
    background_gradient: float = 0.4
    psf_sigma_px: float = 1.2
    read_noise_photons: float = 2.0
    gain_adu_per_photon: float = 4.0
    offset_adu: float = 100.0
    ensure_events: bool = True  # force >= 1 division and >= 1 cell leaving the field
    # harder sequences (params.yaml synth.tracking.generator turns them on; off here keeps the
    # pinned statistics): daughters that start closer and separate slowly, photobleaching and
    # a focus that drifts over the sequence
    daughter_offset: float = 0.5  # each daughter's centre from the mother's, x her long semi-axis
    daughter_speed_px: float = 0.6  # speed at which the daughters move apart
    bleach_per_frame: float = 0.0  # fraction of the nuclei's brightness lost per frame
    blur_growth: float = 0.0  # PSF sigma grows by this fraction from first to last frame

    def __post_init__(self) -> None:
        if len(self.shape) != 2 or min(self.shape) < 8 or self.n_frames < 1:
            raise ConfigError(
                f"need a (Y, X) shape of at least 8x8 and n_frames >= 1, "
                f"got shape={self.shape}, n_frames={self.n_frames}"
            )
        for name in ("n_cells", "radius_px", "aspect", "drift_px", "cell_photons"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ConfigError(f"{name} must be a range 0 <= low <= high, got {(lo, hi)}")
        if self.radius_px[0] <= 0 or self.aspect[0] < 1:
            raise ConfigError("radius_px must be > 0 and aspect >= 1 (long / short axis)")
        if not 0.0 <= self.bleach_per_frame < 1.0 or self.blur_growth < 0:
            raise ConfigError(
                f"bleach_per_frame must be in [0, 1) and blur_growth >= 0, got "
                f"{self.bleach_per_frame}, {self.blur_growth}"
            )
        if self.daughter_offset <= 0 or self.daughter_speed_px < 0:
            raise ConfigError(
                f"daughter_offset must be > 0 and daughter_speed_px >= 0, got "
                f"{self.daughter_offset}, {self.daughter_speed_px}"
            )


@dataclass
class TrackingSequence:
    """One time-lapse and its CTC ground truth (arrays TYX)."""

    frames: np.ndarray  # uint16
    labels: np.ndarray  # uint16, value = track id (CTC SEG and TRA)
    tracks: pd.DataFrame  # L, B, E, P (man_track.txt)
    cfg: TrackingSynthConfig
    left_fov: list[int] = field(default_factory=list)  # tracks that ended by leaving the field


@dataclass
class _Cell:
    y: float
    x: float
    radius: float
    target_radius: float
    aspect: float
    theta: float
    vy: float
    vx: float
    brightness: float
    age: int = 0
    track: int = 0  # 0 until the cell is first seen
    parent: int = 0
    divide_in: int = -1  # frames until split; -1 when not dividing
    leaving: bool = False  # pushed out of the field (ensure_events)

    def axes(self) -> tuple[float, float]:
        root = np.sqrt(self.aspect)
        return self.radius * root, self.radius / root


# --------------------------------------------------------------------------- drawing cells


def _new_cell(
    rng: np.random.Generator, cfg: TrackingSynthConfig, y: float, x: float, age: int = 0
) -> _Cell:
    r = rng.uniform(*cfg.radius_px)
    return _Cell(
        y=y,
        x=x,
        radius=r,
        target_radius=r,
        aspect=rng.uniform(*cfg.aspect),
        theta=rng.uniform(0, np.pi),
        vy=0.0,
        vx=0.0,
        brightness=rng.uniform(*cfg.cell_photons),
        age=age,
    )


def _initial_cells(rng: np.random.Generator, cfg: TrackingSynthConfig) -> list[_Cell]:
    """Cells scattered over the field; they may touch but not pile up."""
    h, w = cfg.shape
    n = int(rng.integers(cfg.n_cells[0], cfg.n_cells[1] + 1))
    cells: list[_Cell] = []
    for _ in range(200 * n):
        if len(cells) == n:
            break
        c = _new_cell(rng, cfg, rng.uniform(0, h), rng.uniform(0, w), age=int(rng.integers(0, 20)))
        if all(_gap(c, o) >= 0.9 * (c.radius + o.radius) for o in cells):
            cells.append(c)
    return cells


def _gap(a: _Cell, b: _Cell) -> float:
    return float(np.hypot(a.y - b.y, a.x - b.x))


def _entering_cell(rng: np.random.Generator, cfg: TrackingSynthConfig, drift: np.ndarray) -> _Cell:
    """A cell straddling an edge, moving inwards (preferably from the upstream side)."""
    h, w = cfg.shape
    inward = {"top": drift[0], "bottom": -drift[0], "left": drift[1], "right": -drift[1]}
    names = list(inward)
    weight = np.array([max(inward[k], 0.0) + 0.2 for k in names])
    edge = names[int(rng.choice(4, p=weight / weight.sum()))]
    c = _new_cell(rng, cfg, 0.0, 0.0, age=int(rng.integers(0, 20)))
    depth = c.radius * rng.uniform(-0.2, 0.4)  # centre a little outside to a little inside
    along_y, along_x = rng.uniform(0, h), rng.uniform(0, w)
    speed = rng.uniform(0.5, 1.5)
    c.y, c.x, c.vy, c.vx = {
        "top": (depth, along_x, speed, 0.0),
        "bottom": (h - 1 - depth, along_x, -speed, 0.0),
        "left": (along_y, depth, 0.0, speed),
        "right": (along_y, w - 1 - depth, 0.0, -speed),
    }[edge]
    return c


# --------------------------------------------------------------------------- motion and events


def _move(rng: np.random.Generator, cfg: TrackingSynthConfig, c: _Cell, drift: np.ndarray):
    """Persistent random walk on top of the common drift, plus jitter; radius relaxes."""
    if not c.leaving:
        c.vy = cfg.persistence * c.vy + rng.normal(0, cfg.motility_px)
        c.vx = cfg.persistence * c.vx + rng.normal(0, cfg.motility_px)
    c.y += drift[0] + c.vy + rng.normal(0, cfg.jitter_px)
    c.x += drift[1] + c.vx + rng.normal(0, cfg.jitter_px)
    c.theta += rng.normal(0, 0.08)
    c.radius += 0.15 * (c.target_radius - c.radius)
    c.age += 1


def _repel(cells: list[_Cell], touch: float) -> None:
    """Push overlapping pairs apart until their centres are ``touch`` x (r_i + r_j) apart."""
    for i, a in enumerate(cells):
        for b in cells[i + 1 :]:
            d = _gap(a, b)
            need = touch * (a.radius + b.radius)
            if d >= need:
                continue
            if d < 1e-6:
                uy, ux = 1.0, 0.0
            else:
                uy, ux = (a.y - b.y) / d, (a.x - b.x) / d
            push = (need - d) / 2
            a.y, a.x = a.y + uy * push, a.x + ux * push
            b.y, b.x = b.y - uy * push, b.x - ux * push


def _elongate(c: _Cell, cfg: TrackingSynthConfig) -> None:
    """One frame of a dividing mother: longer, thinner and brighter (condensed chromatin)."""
    c.aspect += (2.4 - c.aspect) / max(c.divide_in + 1, 1)
    c.brightness *= 1.08
    c.vy *= 0.5
    c.vx *= 0.5


def _split(rng: np.random.Generator, cfg: TrackingSynthConfig, m: _Cell) -> list[_Cell]:
    """Two daughters along the mother's long axis, half its area each, moving apart."""
    a, _ = m.axes()
    uy, ux = np.sin(m.theta), np.cos(m.theta)
    out = []
    for sign in (-1.0, 1.0):
        off = cfg.daughter_offset * a
        d = _new_cell(rng, cfg, m.y + sign * off * uy, m.x + sign * off * ux)
        d.radius = m.radius / np.sqrt(2.0)
        d.target_radius = max(d.target_radius, d.radius)
        d.aspect = rng.uniform(1.1, 1.4)
        d.theta = m.theta + rng.normal(0, 0.2)
        d.vy, d.vx = sign * cfg.daughter_speed_px * uy, sign * cfg.daughter_speed_px * ux
        d.brightness = m.brightness / 1.08**cfg.division_frames * rng.uniform(1.0, 1.2)
        d.parent = m.track
        out.append(d)
    return out


def _centre_inside(c: _Cell, shape: tuple[int, int], margin: float = 0.0) -> bool:
    h, w = shape
    return margin <= c.y <= h - 1 - margin and margin <= c.x <= w - 1 - margin


def _start_leaving(c: _Cell, cfg: TrackingSynthConfig, frames_left: int) -> None:
    """Send a cell out through its nearest edge fast enough to be gone before the end."""
    h, w = cfg.shape
    dists = {(-1, 0): c.y, (1, 0): h - 1 - c.y, (0, -1): c.x, (0, 1): w - 1 - c.x}
    (dy, dx), dist = min(dists.items(), key=lambda kv: kv[1])
    speed = (dist + 3 * c.radius) / max(frames_left // 2, 1) + 1.0
    c.vy, c.vx, c.leaving = dy * speed, dx * speed, True


# --------------------------------------------------------------------------- rendering


def _ellipse_into(
    out: np.ndarray, value: int, cy: float, cx: float, a: float, b: float, theta: float
) -> None:
    """Paint an ellipse into ``out`` where it is still 0 (earlier nuclei are never overwritten)."""
    h, w = out.shape
    r = int(np.ceil(max(a, b))) + 1
    y0, y1 = max(int(np.floor(cy)) - r, 0), min(int(np.ceil(cy)) + r + 1, h)
    x0, x1 = max(int(np.floor(cx)) - r, 0), min(int(np.ceil(cx)) + r + 1, w)
    if y0 >= y1 or x0 >= x1:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1]
    dy, dx = yy - cy, xx - cx
    u = dx * np.cos(theta) + dy * np.sin(theta)
    v = -dx * np.sin(theta) + dy * np.cos(theta)
    inside = (u / a) ** 2 + (v / b) ** 2 <= 1.0
    view = out[y0:y1, x0:x1]
    view[inside & (view == 0)] = value


def _paint_cell(out: np.ndarray, value: int, c: _Cell) -> None:
    a, b = c.axes()
    if c.divide_in == 0:  # last frame before the split: a pinched, two-lobed mother
        uy, ux = np.sin(c.theta), np.cos(c.theta)
        for s in (-1.0, 1.0):
            _ellipse_into(out, value, c.y + s * 0.45 * a * uy, c.x + s * 0.45 * a * ux,
                          0.58 * a, 0.95 * b, c.theta)  # fmt: skip
    else:
        _ellipse_into(out, value, c.y, c.x, a, b, c.theta)


def _render_labels(cells: list[_Cell], shape: tuple[int, int]) -> np.ndarray:
    """Label map with value = index in ``cells`` + 1; each centre pixel is reserved first.

    Reserving centres guarantees that a cell whose centre is in the field is never hidden by
    a neighbour, so tracks have no gaps.
    """
    out = np.zeros(shape, np.int32)
    h, w = shape
    for i, c in enumerate(cells, start=1):
        iy, ix = round(c.y), round(c.x)
        if 0 <= iy < h and 0 <= ix < w and out[iy, ix] == 0:
            out[iy, ix] = i
    for i, c in enumerate(cells, start=1):
        _paint_cell(out, i, c)
    return out


def _image(
    rng: np.random.Generator,
    cfg: TrackingSynthConfig,
    labels: np.ndarray,
    cells: list[_Cell],
    level: np.ndarray,
    t: int = 0,
) -> np.ndarray:
    """Photon image of frame ``t``: textured nuclei (bleached), PSF blur (growing), background,
    shot + read noise."""
    shine = np.zeros(len(cells) + 1, np.float32)
    glob = np.exp(rng.normal(0, cfg.global_flicker))
    if cfg.bleach_per_frame:
        glob *= (1.0 - cfg.bleach_per_frame) ** t
    for i, c in enumerate(cells, start=1):
        shine[i] = c.brightness * np.exp(rng.normal(0, cfg.flicker)) * glob
    tex = ndimage.gaussian_filter(rng.standard_normal(cfg.shape).astype(np.float32), 1.5)
    tex = 1.0 + cfg.texture * tex / max(float(tex.std()), 1e-6)
    signal = shine[labels] * tex
    sigma = cfg.psf_sigma_px
    if cfg.blur_growth and cfg.n_frames > 1:
        sigma *= 1.0 + cfg.blur_growth * t / (cfg.n_frames - 1)
    expected = ndimage.gaussian_filter(signal, sigma) + level
    photons = rng.poisson(np.maximum(expected, 0)).astype(np.float32)
    photons += rng.normal(0, cfg.read_noise_photons, cfg.shape).astype(np.float32)
    adu = cfg.offset_adu + cfg.gain_adu_per_photon * photons
    return np.clip(np.rint(adu), 0, 65535).astype(np.uint16)


def _background(rng: np.random.Generator, cfg: TrackingSynthConfig) -> np.ndarray:
    h, w = cfg.shape
    theta = rng.uniform(0, 2 * np.pi)
    yy, xx = np.meshgrid(np.linspace(-0.5, 0.5, h), np.linspace(-0.5, 0.5, w), indexing="ij")
    ramp = np.cos(theta) * yy + np.sin(theta) * xx
    return (cfg.background_photons * (1 + cfg.background_gradient * ramp)).astype(np.float32)


# --------------------------------------------------------------------------- simulation


@dataclass
class _State:
    cells: list[_Cell]
    next_track: int = 1
    divided: int = 0
    left: list[int] = field(default_factory=list)


def _settle_frame(
    state: _State, cfg: TrackingSynthConfig, drawn: np.ndarray
) -> tuple[np.ndarray, list[_Cell]]:
    """Decide who is visible this frame; give ids to newcomers; return (labels, visible cells).

    A known cell that is fully out (or only a sliver with its centre outside) has left: its
    track ended last frame and it is dropped. A newcomer needs ``min_visible_px`` to count.
    """
    counts = np.bincount(drawn.ravel(), minlength=len(state.cells) + 1)
    keep = np.zeros(len(state.cells) + 1, np.int64)
    survivors: list[_Cell] = []
    for i, c in enumerate(state.cells, start=1):
        n = int(counts[i])
        inside = _centre_inside(c, cfg.shape)
        if c.track and (n == 0 or (not inside and n < cfg.min_visible_px)):
            state.left.append(c.track)
            continue
        if not c.track:
            if n < cfg.min_visible_px:
                continue
            c.track = state.next_track
            state.next_track += 1
        keep[i] = c.track
        survivors.append(c)
    state.cells = survivors
    return keep[drawn], survivors


def _advance(
    rng: np.random.Generator,
    cfg: TrackingSynthConfig,
    state: _State,
    drift: np.ndarray,
    t: int,
) -> None:
    """Move everyone to frame t+1: splits, new divisions, forced events, entries, motion."""
    nxt: list[_Cell] = []
    for c in state.cells:
        if c.divide_in == 0:
            nxt.extend(_split(rng, cfg, c))
            state.divided += 1
            continue
        if c.divide_in > 0:
            c.divide_in -= 1
            _elongate(c, cfg)
        elif (
            c.age >= cfg.min_division_age
            and not c.leaving
            and _centre_inside(c, cfg.shape, margin=c.radius)
            and rng.random() < cfg.division_probability
        ):
            c.divide_in = cfg.division_frames
        nxt.append(c)
    if cfg.ensure_events:
        _force_events(cfg, state, nxt, t)
    if rng.random() < cfg.enter_probability:
        nxt.append(_entering_cell(rng, cfg, drift))
    for c in nxt:
        _move(rng, cfg, c, drift)
    _repel(nxt, cfg.touch_fraction)
    state.cells = nxt


def _force_events(cfg: TrackingSynthConfig, state: _State, cells: list[_Cell], t: int) -> None:
    """If chance has not provided them by mid-sequence, start one division and one exit."""
    t_force = cfg.n_frames // 3
    if t != t_force:
        return
    h, w = cfg.shape
    busy = any(c.divide_in >= 0 for c in cells)
    tracked = [c for c in cells if c.track and not c.leaving]
    if state.divided == 0 and not busy and tracked:
        central = min(tracked, key=lambda c: np.hypot(c.y - h / 2, c.x - w / 2))
        central.divide_in = cfg.division_frames
    if not state.left and not any(c.leaving for c in cells):
        free = [c for c in tracked if c.divide_in < 0]
        if free:
            edge = min(free, key=lambda c: min(c.y, c.x, h - 1 - c.y, w - 1 - c.x))
            _start_leaving(edge, cfg, cfg.n_frames - t - 1)


def _tracks_table(labels: np.ndarray, parents: dict[int, int]) -> pd.DataFrame:
    """CTC man_track table read back from the label volume itself."""
    rows = []
    present = [np.unique(f[f > 0]) for f in labels]
    ids = np.unique(np.concatenate(present)) if present else np.array([], int)
    for lab in ids:
        frames = [t for t, p in enumerate(present) if lab in p]
        rows.append((int(lab), frames[0], frames[-1], int(parents.get(int(lab), 0))))
    return pd.DataFrame(rows, columns=["L", "B", "E", "P"]).astype("int64")


def generate_tracking_sequence(
    cfg: TrackingSynthConfig | None = None, seed: int = 0
) -> TrackingSequence:
    """Simulate a nucleus time-lapse with full SEG + TRA ground truth."""
    cfg = cfg or TrackingSynthConfig()
    rng = np.random.default_rng(seed)
    angle = rng.uniform(0, 2 * np.pi)
    drift = rng.uniform(*cfg.drift_px) * np.array([np.sin(angle), np.cos(angle)])
    level = _background(rng, cfg)
    state = _State(_initial_cells(rng, cfg))
    frames = np.zeros((cfg.n_frames, *cfg.shape), np.uint16)
    labels = np.zeros((cfg.n_frames, *cfg.shape), np.uint16)
    parents: dict[int, int] = {}
    for t in range(cfg.n_frames):
        lab, visible = _settle_frame(state, cfg, _render_labels(state.cells, cfg.shape))
        for c in visible:
            parents.setdefault(c.track, c.parent)
        labels[t] = lab
        order = np.zeros(int(lab.max()) + 1, np.int64)
        order[[c.track for c in visible]] = np.arange(1, len(visible) + 1)
        frames[t] = _image(rng, cfg, order[lab], visible, level, t)
        if t + 1 < cfg.n_frames:
            _advance(rng, cfg, state, drift, t)
    tracks = _tracks_table(labels, parents)
    left = [lab for lab in state.left if lab in set(tracks["L"])]
    log.debug("tracking seed=%d: %d tracks, %d divisions", seed, len(tracks), state.divided)
    return TrackingSequence(frames, labels, tracks, cfg, left_fov=sorted(left))
