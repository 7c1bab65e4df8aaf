"""Spine detections drawn on their stack: PNG per plane plus one RGB TIFF (``microseg visualize``).

:func:`render_overlays` reads a ``ZYX`` stack lazily (:func:`microseg.io.tiff.open_stack`, one
plane in memory at a time) and a predictions CSV, and writes into ``out_dir``::

    plane_{z:04d}.png   the selected planes (``z_start:z_stop:z_step``) with their marks
    overlay.tif         the same planes as one ``ZYXC`` uint8 ImageJ stack (Fiji opens it as
                        RGB), streamed page by page with :class:`tifffile.TiffWriter`

The folder is built in a temporary sibling and renamed into place (:mod:`microseg.utils.atomic`),
so an error leaves the previous folder, never part of a new one. ``out_dir`` belongs to the
overlays: one holding other files is refused rather than replaced.

**CSV kinds** (decided by columns, case-insensitive, a leading pandas index column ignored):

* boxes ``z, x1, y1, x2, y2[, score][, status]`` (``predictions_dedup.csv``/``_raw.csv`` of
  :mod:`microseg.infer.fusion`, ``detections.csv`` of ``microseg predict``). Pixel-edge
  coordinates: a box covers the pixels whose centre lies in ``[x1, x2) x [y1, y2)``, at least
  one pixel (as :func:`microseg.infer.fusion.box_pixel_bounds`). Its point is its centre,
  ``((x1 + x2)/2 - 0.5, (y1 + y2)/2 - 0.5)`` in voxel-centre coordinates.
* points ``z, y, x[, score][, status]`` in voxel-centre coordinates (``spines.csv``, annotation
  CSVs of :mod:`microseg.io.points`); a point belongs to plane ``round(z)``.

Box columns win when a CSV has both (``predictions_raw.csv`` also carries centres ``x, y``).

**Modes**: ``dots`` (a filled disc at each point), ``boxes`` (box outlines), ``both``. ``both``
means "everything the CSV has", so on a points CSV it draws dots; ``boxes`` on a points CSV is
a :class:`~microseg.errors.ConfigError` naming the file, because the boxes asked for do not
exist and silently drawing something else would hide that.

**Geometry** (what the tests pin): a dot of radius ``r`` is every pixel at integer offset
``(dy, dx)`` from the pixel nearest the point with ``dy² + dx² <= r²``. A box outline is
``line_width`` pixels drawn *inside* the box's pixel range, on its outermost rows and columns.
With ``scale = s`` the plane is enlarged ``s`` times (nearest neighbour) and coordinates mapped
(edge ``e -> s e``, centre ``c -> s c + (s - 1)/2``); ``dot_radius`` and ``line_width`` are in
output pixels.

**Colour**: ``color`` for dots, ``box_color`` for boxes; where the CSV has ``status``, both marks
take ``status_colors[status]`` (``high`` green, ``validated`` cyan, ``rejected_*`` grey and
magenta); statuses starting with ``rejected`` are hidden unless ``show_rejected``. With
``spread = k`` a mark of plane ``z`` is also drawn, blended at ``faint_alpha``, on planes
``z ± 1..k``. ``show_scores`` writes ``score`` (2 decimals) beside each mark with Pillow's
bundled default font (no download).

**Contrast**: intensities are mapped ``lo..hi -> 0..255`` with ``lo, hi`` the ``percentiles``
of the whole stack estimated from at most 16 evenly spaced planes, strided in XY
(:func:`microseg.data.transforms.sample_percentiles`, the scaling the detector saw), so the
stack is not read twice. Optional CLAHE follows (:func:`apply_clahe`).
"""

from __future__ import annotations

import functools
import logging
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import tifffile
from PIL import Image, ImageColor, ImageDraw, ImageFont
from tqdm.auto import tqdm

from microseg.data.transforms import sample_percentiles, to_uint8
from microseg.errors import (
    AnnotationError,
    ConfigError,
    DataFormatError,
    MicrosegError,
    MissingFileError,
)
from microseg.io.tiff import open_stack
from microseg.utils.atomic import atomic_path
from microseg.utils.progress import bar_disabled

log = logging.getLogger(__name__)

Mode = Literal["dots", "boxes", "both"]
MODES: tuple[str, ...] = ("dots", "boxes", "both")
Color = str | Sequence[int]
RGB = tuple[int, int, int]

BOX_COLS: tuple[str, ...] = ("x1", "y1", "x2", "y2")
POINT_COLS: tuple[str, ...] = ("z", "y", "x")
TIFF_NAME = "overlay.tif"
PNG_PATTERN = re.compile(r"plane_\d{4,}\.png")
#: zlib level of the PNGs: PNG encoding is most of the time per plane; level 3 wrote a smooth
#: 1024² RGB plane about 2.5x faster than Pillow's default 6 at the same size (1 was +20 %)
PNG_COMPRESS_LEVEL = 3
#: what one visualize run may write (uncompressed estimate of the PNGs + the RGB TIFF)
MAX_OUTPUT_BYTES = 4 * 2**30

#: colour per fusion status (:data:`microseg.infer.fusion.STATUSES`); others get the defaults
STATUS_COLORS: dict[str, str] = {
    "high": "#30ff30",
    "validated": "#30d0ff",
    "rejected_low_yolo": "#a0a0a0",
    "rejected_no_punet": "#ff30ff",
}


def png_name(z: int) -> str:
    return f"plane_{z:04d}.png"


def parse_color(value: Color, what: str = "color") -> RGB:
    """``"red"``, ``"#ff3030"``, ``"255,48,48"`` or ``(255, 48, 48)`` -> an RGB tuple."""
    if isinstance(value, str):
        text = value.strip()
        if re.fullmatch(r"\d+\s*,\s*\d+\s*,\s*\d+", text):
            value = [int(v) for v in text.split(",")]
        else:
            try:
                rgb = ImageColor.getrgb(text)
            except ValueError as exc:
                raise ConfigError(
                    f"{what}: expected a colour name, #rrggbb or r,g,b; found {value!r}"
                ) from exc
            return (int(rgb[0]), int(rgb[1]), int(rgb[2]))
    vals = list(value)
    if len(vals) != 3 or not all(
        isinstance(v, int | np.integer) and not isinstance(v, bool) and 0 <= v <= 255 for v in vals
    ):
        raise ConfigError(f"{what}: expected three integers in 0..255; found {value!r}")
    return (int(vals[0]), int(vals[1]), int(vals[2]))


@dataclass(frozen=True)
class OverlayConfig:
    """Knobs of :func:`render_overlays` (see the module notes for their meaning)."""

    mode: Mode = "both"
    dot_radius: int = 3
    color: Color = "#ff3030"
    box_color: Color = "#30ff30"
    line_width: int = 1
    clahe: bool = False
    clahe_clip: float = 0.01
    percentiles: tuple[float, float] = (1.0, 99.8)
    show_scores: bool = False
    show_rejected: bool = False
    z_start: int = 0
    z_stop: int | None = None
    z_step: int = 1
    spread: int = 0
    scale: int = 1
    faint_alpha: float = 0.35
    # the whole map (from_mapping merges given entries into STATUS_COLORS instead)
    status_colors: Mapping[str, Color] = field(default_factory=lambda: dict(STATUS_COLORS))

    def __post_init__(self) -> None:
        def bad(what: str) -> ConfigError:
            return ConfigError(f"overlay config: {what}")

        def is_int(v: object) -> bool:
            return isinstance(v, int | np.integer) and not isinstance(v, bool)

        if self.mode not in MODES:
            raise bad(f"mode must be one of {MODES}; found {self.mode!r}")
        for name, low in (
            ("dot_radius", 0),
            ("line_width", 1),
            ("z_start", 0),
            ("z_step", 1),
            ("spread", 0),
            ("scale", 1),
        ):
            v = getattr(self, name)
            if not (is_int(v) and v >= low):
                raise bad(f"{name} must be an integer >= {low}; found {v!r}")
        if self.z_stop is not None and not (is_int(self.z_stop) and self.z_stop >= 0):
            raise bad(f"z_stop must be None or an integer >= 0; found {self.z_stop!r}")
        if not (isinstance(self.clahe_clip, int | float) and 0 < self.clahe_clip <= 1):
            raise bad(f"clahe_clip must be in (0, 1]; found {self.clahe_clip!r}")
        if not (isinstance(self.faint_alpha, int | float) and 0 <= self.faint_alpha <= 1):
            raise bad(f"faint_alpha must be in [0, 1]; found {self.faint_alpha!r}")
        p = tuple(self.percentiles)
        if not (
            len(p) == 2 and all(isinstance(v, int | float) for v in p) and 0 <= p[0] < p[1] <= 100
        ):
            raise bad(f"percentiles must be (low, high) with 0 <= low < high <= 100; found {p!r}")
        object.__setattr__(self, "percentiles", (float(p[0]), float(p[1])))
        # fail on a bad colour now, not after half the planes are drawn
        parse_color(self.color, "color")
        parse_color(self.box_color, "box_color")
        for status, c in self.status_colors.items():
            parse_color(c, f"status_colors[{status!r}]")

    @classmethod
    def from_mapping(cls, d: Mapping[str, Any] | None) -> OverlayConfig:
        """From params or CLI flags; ``None`` values keep the default, unknown keys are an error."""
        d = dict(d or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(
                f"overlay config: unknown key(s) {unknown}; expected some of {sorted(known)}"
            )
        kwargs = {k: v for k, v in d.items() if v is not None}
        if "percentiles" in kwargs:
            kwargs["percentiles"] = tuple(kwargs["percentiles"])
        if isinstance(kwargs.get("color"), list):
            kwargs["color"] = tuple(kwargs["color"])
        if isinstance(kwargs.get("box_color"), list):
            kwargs["box_color"] = tuple(kwargs["box_color"])
        if "status_colors" in kwargs:  # given entries override the defaults
            kwargs["status_colors"] = {**STATUS_COLORS, **dict(kwargs["status_colors"])}
        return cls(**kwargs)


@dataclass(frozen=True)
class OverlayResult:
    """What :func:`render_overlays` wrote: ``n_marks`` counts marks drawn in full (one per
    detection and plane, a dot and box of one detection being one mark), ``n_faint`` those
    drawn faintly on neighbour planes."""

    out_dir: Path
    tiff_path: Path
    png_paths: tuple[Path, ...]
    planes: tuple[int, ...]
    n_planes: int
    n_marks: int
    n_faint: int
    kind: Literal["boxes", "points"]
    intensity_range: tuple[float, float]


# --------------------------------------------------------------------------- reading


def _lines(mask: np.ndarray, limit: int = 10) -> str:
    rows = np.flatnonzero(mask) + 2  # header is line 1
    shown = ", ".join(str(r) for r in rows[:limit])
    return shown + (f" ... ({len(rows)} rows)" if len(rows) > limit else "")


def read_marks(path: str | Path) -> tuple[pd.DataFrame, Literal["boxes", "points"]]:
    """A predictions CSV as marks: ``z`` (plane index), ``x, y`` (voxel centre), box columns
    when it has boxes, ``score`` (NaN where absent) and ``status`` ("" where absent)."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError("expected a predictions CSV, found nothing", path)
    if not path.read_bytes().strip():
        raise AnnotationError(
            "expected a CSV with columns z,x1,y1,x2,y2[,score,status] or z,y,x[,score], "
            "found an empty file",
            path,
        )
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        raise DataFormatError(f"expected a CSV file, could not parse it ({exc})", path) from exc
    if len(df.columns) and str(df.columns[0]).startswith("Unnamed:"):
        df = df.drop(columns=df.columns[0])
    df.columns = [str(c).strip().lower() for c in df.columns]
    cols = set(df.columns)
    if {"z", *BOX_COLS} <= cols:
        kind: Literal["boxes", "points"] = "boxes"
        numeric = ["z", *BOX_COLS]
    elif set(POINT_COLS) <= cols:
        kind = "points"
        numeric = list(POINT_COLS)
    else:
        raise AnnotationError(
            "expected box columns z,x1,y1,x2,y2 or point columns z,y,x; "
            f"found columns {list(df.columns)}",
            path,
        )
    out = pd.DataFrame(index=df.index)
    for c in [*numeric, *(["score"] if "score" in cols else [])]:
        values = pd.to_numeric(df[c], errors="coerce")
        bad = values.isna() & df[c].notna()
        if bad.any():
            raise AnnotationError(
                f"column {c} must be numeric, found {df[c][bad].iloc[0]!r} on lines "
                f"{_lines(bad.to_numpy())}",
                path,
            )
        out[c] = values.astype("float64")
    coords = out[numeric].to_numpy()
    nonfinite = ~np.isfinite(coords).all(axis=1)
    if nonfinite.any():
        raise AnnotationError(
            f"expected finite coordinates, found NaN/inf/empty on lines {_lines(nonfinite)}", path
        )
    if kind == "boxes":
        flipped = (out["x2"] < out["x1"]) | (out["y2"] < out["y1"])
        if flipped.any():
            raise AnnotationError(
                f"expected x1 <= x2 and y1 <= y2, found otherwise on lines "
                f"{_lines(flipped.to_numpy())}",
                path,
            )
        out["x"] = (out["x1"] + out["x2"]) / 2 - 0.5
        out["y"] = (out["y1"] + out["y2"]) / 2 - 0.5
    if "score" not in out:
        out["score"] = np.nan
    out["status"] = df["status"].fillna("").astype(str) if "status" in cols else ""
    out["z"] = np.floor(out["z"].to_numpy() + 0.5).astype(np.int64)
    return out.reset_index(drop=True), kind


def check_marks_fit(
    marks: pd.DataFrame, shape: tuple[int, int, int], csv_path: Path, stack_path: Path
) -> None:
    """Every mark's plane and point must lie inside the stack (a CSV of another stack fails)."""
    depth, height, width = shape
    z = marks["z"].to_numpy()
    y = np.floor(marks["y"].to_numpy() + 0.5)
    x = np.floor(marks["x"].to_numpy() + 0.5)
    outside = (z < 0) | (z >= depth) | (y < 0) | (y >= height) | (x < 0) | (x >= width)
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        raise AnnotationError(
            f"expected marks inside the stack {stack_path} of shape (Z, Y, X)={tuple(shape)}, "
            f"found {int(outside.sum())} outside, e.g. (z, y, x)=({z[i]}, {marks['y'].iloc[i]:g}, "
            f"{marks['x'].iloc[i]:g}) on lines {_lines(outside)}",
            csv_path,
        )


# --------------------------------------------------------------------------- contrast


def apply_clahe(plane_u8: np.ndarray, clip: float = 0.01) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation of a uint8 plane, 8x8 tiles.

    OpenCV's CLAHE is used (``cv2`` comes with ultralytics): on this machine it took 1.0 ms
    against scikit-image's ``equalize_adapthist`` 78 ms on a 256² plane and 15 vs 330 ms on
    1024², and it stays in uint8. ``clip`` is scikit-image's convention (fraction of a tile's
    pixels per histogram bin); OpenCV's ``clipLimit`` is in multiples of the mean bin count
    (tile area / 256), so the same clip in counts is ``clipLimit = clip * 256``. Without
    OpenCV, scikit-image does the same job, slower (its output is also stretched to 0..255).
    """
    plane_u8 = np.ascontiguousarray(plane_u8, dtype=np.uint8)
    try:
        import cv2
    except ImportError:  # pragma: no cover - opencv ships with ultralytics
        from skimage.exposure import equalize_adapthist

        out = equalize_adapthist(plane_u8, clip_limit=clip)
        return np.clip(out * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return cv2.createCLAHE(clipLimit=clip * 256.0, tileGridSize=(8, 8)).apply(plane_u8)


def display_plane(
    plane: np.ndarray, lo: float, hi: float, cfg: OverlayConfig | None = None
) -> np.ndarray:
    """A raw plane as display uint8: ``lo..hi -> 0..255``, then CLAHE if ``cfg.clahe``."""
    cfg = cfg or OverlayConfig()
    u8 = to_uint8(plane, lo, hi)
    return apply_clahe(u8, cfg.clahe_clip) if cfg.clahe else u8


# --------------------------------------------------------------------------- drawing


def _is_rejected(status: pd.Series) -> np.ndarray:
    return status.astype(str).str.startswith("rejected").to_numpy()


def visible_marks(marks: pd.DataFrame, cfg: OverlayConfig) -> pd.DataFrame:
    """Marks minus the rejected ones unless ``cfg.show_rejected``."""
    if cfg.show_rejected or "status" not in marks or marks.empty:
        return marks
    return marks.loc[~_is_rejected(marks["status"])]


def box_pixel_ranges(x1: float, y1: float, x2: float, y2: float) -> tuple[int, int, int, int]:
    """Unclipped half-open pixel ranges ``r0:r1, c0:c1`` of a pixel-edge box (fusion's rule)."""
    c0 = math.ceil(x1 - 0.5)
    c1 = max(math.ceil(x2 - 0.5), c0 + 1)
    r0 = math.ceil(y1 - 0.5)
    r1 = max(math.ceil(y2 - 0.5), r0 + 1)
    return r0, r1, c0, c1


def _paint(
    img: np.ndarray, rows: slice, cols: slice, mask: np.ndarray | None, rgb: RGB, alpha: float
) -> None:
    """Blend ``rgb`` into ``img[rows, cols]`` (where ``mask``) after clipping to the image."""
    h, w = img.shape[:2]
    r_a, r_b = max(rows.start, 0), min(rows.stop, h)
    c_a, c_b = max(cols.start, 0), min(cols.stop, w)
    if r_a >= r_b or c_a >= c_b:
        return
    view = img[r_a:r_b, c_a:c_b]
    sel = (
        np.ones(view.shape[:2], bool)
        if mask is None
        else mask[r_a - rows.start : r_b - rows.start, c_a - cols.start : c_b - cols.start]
    )
    colour = np.asarray(rgb, dtype=np.float32)
    if alpha >= 1.0:
        view[sel] = colour.astype(np.uint8)
    else:
        mixed = (1.0 - alpha) * view[sel].astype(np.float32) + alpha * colour
        view[sel] = np.clip(mixed + 0.5, 0, 255).astype(np.uint8)


@functools.lru_cache(maxsize=64)
def _disc(radius: int) -> np.ndarray:
    d = np.arange(-radius, radius + 1)
    return d[:, None] ** 2 + d[None, :] ** 2 <= radius * radius


def _draw_dot(img: np.ndarray, y: float, x: float, radius: int, rgb: RGB, alpha: float) -> None:
    cy, cx = math.floor(y + 0.5), math.floor(x + 0.5)
    rows = slice(cy - radius, cy + radius + 1)
    cols = slice(cx - radius, cx + radius + 1)
    _paint(img, rows, cols, _disc(radius), rgb, alpha)


def _draw_box(
    img: np.ndarray, box: tuple[float, float, float, float], width: int, rgb: RGB, alpha: float
) -> None:
    r0, r1, c0, c1 = box_pixel_ranges(*box)
    rows, cols = slice(r0, r1), slice(c0, c1)
    ring = np.zeros((r1 - r0, c1 - c0), bool)
    ring[:width], ring[-width:], ring[:, :width], ring[:, -width:] = True, True, True, True
    _paint(img, rows, cols, ring, rgb, alpha)


@functools.lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled default font (Pillow >= 10.1 takes a size); nothing is downloaded."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # pragma: no cover - Pillow < 10.1
        return ImageFont.load_default()


def _status_rgb(cfg: OverlayConfig) -> dict[str, RGB]:
    return {s: parse_color(c, f"status_colors[{s!r}]") for s, c in cfg.status_colors.items()}


def draw_plane(
    plane_u8: np.ndarray, marks: pd.DataFrame, cfg: OverlayConfig, z: int | None = None
) -> np.ndarray:
    """Draw ``marks`` on a display plane; returns ``(H*scale, W*scale, 3)`` uint8.

    ``plane_u8`` is ``(H, W)`` or ``(H, W, 3)`` uint8 (it is not modified). ``marks`` has
    ``x, y`` (voxel centres), optionally ``x1, y1, x2, y2``, ``z``, ``score``, ``status``.
    Without ``z`` every mark is drawn in full; with ``z``, marks of plane ``z`` are drawn in
    full, those within ``cfg.spread`` planes faintly, the rest not at all.
    """
    plane_u8 = np.asarray(plane_u8)
    if plane_u8.dtype != np.uint8 or plane_u8.ndim not in (2, 3):
        raise ValueError(
            f"expected an (H, W[, 3]) uint8 plane, found {plane_u8.shape} {plane_u8.dtype}"
        )
    img = plane_u8 if plane_u8.ndim == 3 else np.repeat(plane_u8[..., None], 3, axis=2)
    s = cfg.scale
    img = np.repeat(np.repeat(img, s, axis=0), s, axis=1) if s > 1 else img.copy()
    marks = visible_marks(marks, cfg)
    if marks.empty:
        return img
    has_boxes = all(c in marks for c in BOX_COLS)
    if cfg.mode == "boxes" and not has_boxes:
        raise ConfigError(f"mode 'boxes' needs box columns {list(BOX_COLS)}; found points")
    draw_boxes = cfg.mode in ("boxes", "both") and has_boxes
    draw_dots = cfg.mode in ("dots", "both")
    if z is not None:
        dz = np.abs(marks["z"].to_numpy() - z)
        marks = marks.loc[dz <= cfg.spread].assign(_faint=dz[dz <= cfg.spread] > 0)
        # faint marks first, so a mark of this plane is never covered by a neighbour's
        marks = marks.sort_values("_faint", ascending=False, kind="stable")
    dot_rgb, box_rgb = parse_color(cfg.color), parse_color(cfg.box_color)
    status_rgb = _status_rgb(cfg)
    statuses = marks["status"].astype(str) if "status" in marks else pd.Series("", marks.index)
    faint = marks["_faint"].to_numpy() if "_faint" in marks else np.zeros(len(marks), bool)
    xs, ys = (
        marks["x"].to_numpy(float) * s + (s - 1) / 2,
        marks["y"].to_numpy(float) * s + (s - 1) / 2,
    )
    boxes = marks[list(BOX_COLS)].to_numpy(float) * s if has_boxes else None
    labels: list[tuple[float, float, str, RGB]] = []
    scores = marks["score"].to_numpy(float) if "score" in marks else np.full(len(marks), np.nan)
    for i, status in enumerate(statuses):
        alpha = cfg.faint_alpha if faint[i] else 1.0
        own = status_rgb.get(status)
        if draw_boxes and boxes is not None:
            _draw_box(img, tuple(boxes[i]), cfg.line_width, own or box_rgb, alpha)
        if draw_dots:
            _draw_dot(img, ys[i], xs[i], cfg.dot_radius, own or dot_rgb, alpha)
        if cfg.show_scores and not faint[i] and math.isfinite(scores[i]):
            colour = own or (dot_rgb if draw_dots else box_rgb)
            right = xs[i] + cfg.dot_radius + 2
            if draw_boxes and boxes is not None:
                right = max(right, boxes[i][2] + 1)
            labels.append((right, ys[i] - cfg.dot_radius - 2, f"{scores[i]:.2f}", colour))
    if labels:
        pil = Image.fromarray(img)
        pen = ImageDraw.Draw(pil)
        font = _font(10 + 3 * (min(s, 8) - 1))
        for x, y, text, colour in labels:
            pen.text((x, y), text, fill=colour, font=font)
        img = np.asarray(pil).copy()
    return img


# --------------------------------------------------------------------------- writing


def select_planes(depth: int, cfg: OverlayConfig) -> list[int]:
    """Planes ``z_start:z_stop:z_step`` of a stack of ``depth`` planes (``z_stop`` clipped)."""
    stop = depth if cfg.z_stop is None else min(cfg.z_stop, depth)
    planes = list(range(cfg.z_start, stop, cfg.z_step))
    if not planes:
        raise ConfigError(
            f"overlay config: planes z_start={cfg.z_start}, z_stop={cfg.z_stop}, "
            f"z_step={cfg.z_step} select none of the stack's {depth} planes"
        )
    return planes


def _check_out_dir(out_dir: Path) -> None:
    """Refuse to replace a folder that holds anything but our own earlier output."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise MicrosegError("expected a folder for the overlays, found a file", out_dir)
    foreign = sorted(
        p.name
        for p in out_dir.iterdir()
        if p.name != TIFF_NAME and not PNG_PATTERN.fullmatch(p.name)
    )
    if foreign:
        raise MicrosegError(
            "expected an overlay folder (plane_*.png, overlay.tif) to replace, found other "
            f"files {foreign[:5]}; choose an empty or new --out folder",
            out_dir,
        )


def _tiff_kwargs(voxel_nm: tuple[float, float, float] | None, cfg: OverlayConfig) -> dict:
    meta: dict[str, Any] = {"axes": "ZYXS"}
    kwargs: dict[str, Any] = {}
    if voxel_nm is not None:
        z_nm, y_nm, x_nm = voxel_nm
        if math.isfinite(x_nm) and math.isfinite(y_nm) and x_nm > 0 and y_nm > 0:
            kwargs["resolution"] = (1e3 * cfg.scale / x_nm, 1e3 * cfg.scale / y_nm)
            meta["unit"] = "um"
        if math.isfinite(z_nm) and z_nm > 0:
            meta["spacing"] = z_nm * cfg.z_step / 1e3
            meta["unit"] = "um"
    return {"metadata": meta, **kwargs}


def render_overlays(
    stack_path: str | Path,
    predictions_csv: str | Path,
    out_dir: str | Path,
    cfg: OverlayConfig | None = None,
) -> OverlayResult:
    """Draw the predictions of ``predictions_csv`` on ``stack_path``; write PNGs and a TIFF.

    Everything that can be wrong with the inputs (CSV columns, marks outside the stack, a
    plane range selecting nothing, ``boxes`` mode on points, a foreign ``out_dir``) is checked
    before the first plane is read, and the folder appears only when complete.
    """
    cfg = cfg or OverlayConfig()
    stack_path, csv_path, out_dir = Path(stack_path), Path(predictions_csv), Path(out_dir)
    marks, kind = read_marks(csv_path)
    if cfg.mode == "boxes" and kind == "points":
        raise ConfigError(
            f"mode 'boxes' needs box columns z,x1,y1,x2,y2; found a points CSV with columns "
            f"{[c for c in marks.columns if c in (*POINT_COLS, 'score', 'status')]} "
            "(use mode 'dots' or 'both')",
            csv_path,
        )
    _check_out_dir(out_dir)
    with open_stack(stack_path, expect_ndim=3) as stack:
        shape = (int(stack.shape[0]), int(stack.shape[1]), int(stack.shape[2]))
        check_marks_fit(marks, shape, csv_path, stack_path)
        planes = select_planes(shape[0], cfg)
        marks = visible_marks(marks, cfg).sort_values("z", kind="stable").reset_index(drop=True)
        lo, hi = sample_percentiles(stack, cfg.percentiles)
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise DataFormatError(
                f"expected finite intensities, found percentiles {lo}, {hi} (NaN/inf in stack)",
                stack_path,
            )
        mark_z = marks["z"].to_numpy()
        counts = {"full": 0, "faint": 0}
        height, width = shape[1] * cfg.scale, shape[2] * cfg.scale
        # PNGs + the RGB TIFF, uncompressed; issue 18: --scale 200 wrote 8.3 GB from 295 KB
        out_bytes = 2 * len(planes) * height * width * 3
        if out_bytes > MAX_OUTPUT_BYTES:
            raise ConfigError(
                f"--scale {cfg.scale} on {len(planes)} planes of {shape[1]}x{shape[2]} would "
                f"write about {out_bytes / 2**30:.1f} GiB (limit {MAX_OUTPUT_BYTES / 2**30:.0f} "
                "GiB): lower --scale or select planes with --z-start/--z-stop/--z-step"
            )

        def rgb_planes(folder: Path) -> Iterator[np.ndarray]:
            for z in tqdm(planes, desc="overlays", unit="plane", disable=bar_disabled()):
                a, b = np.searchsorted(mark_z, [z - cfg.spread, z + cfg.spread + 1])
                near = marks.iloc[a:b]
                rgb = draw_plane(display_plane(stack.plane(z), lo, hi, cfg), near, cfg, z=z)
                counts["full"] += int((near["z"] == z).sum())
                counts["faint"] += int((near["z"] != z).sum())
                Image.fromarray(rgb).save(folder / png_name(z), compress_level=PNG_COMPRESS_LEVEL)
                yield rgb

        with atomic_path(out_dir) as tmp:
            tmp.mkdir(parents=True)
            n = len(planes)
            with tifffile.TiffWriter(
                tmp / TIFF_NAME, imagej=True, bigtiff=n * height * width * 3 > 2**32 - 2**25
            ) as tw:
                tw.write(
                    rgb_planes(tmp),
                    shape=(n, height, width, 3),
                    dtype=np.uint8,
                    photometric="rgb",
                    **_tiff_kwargs(stack.voxel_size_nm, cfg),
                )
    log.info(
        "wrote %d overlay planes (%d marks, %d faint) of %s to %s",
        len(planes),
        counts["full"],
        counts["faint"],
        stack_path,
        out_dir,
    )
    return OverlayResult(
        out_dir=out_dir,
        tiff_path=out_dir / TIFF_NAME,
        png_paths=tuple(out_dir / png_name(z) for z in planes),
        planes=tuple(planes),
        n_planes=len(planes),
        n_marks=counts["full"],
        n_faint=counts["faint"],
        kind=kind,
        intensity_range=(lo, hi),
    )


__all__ = [
    "MODES",
    "STATUS_COLORS",
    "OverlayConfig",
    "OverlayResult",
    "apply_clahe",
    "box_pixel_ranges",
    "display_plane",
    "draw_plane",
    "parse_color",
    "read_marks",
    "render_overlays",
    "select_planes",
]
