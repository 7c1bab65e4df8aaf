"""Cell Tracking Challenge folders, ground truth and results, with the official checker's rules.

Layout (as the CTC evaluation software and ``py-ctcmetrics`` expect)::

    <root>/<seq>/t000.tif                        frames
    <root>/<seq>_GT/SEG/man_seg000.tif           segmentation GT (any subset of frames)
    <root>/<seq>_GT/TRA/man_track000.tif         tracking markers, one file per frame
    <root>/<seq>_GT/TRA/man_track.txt            "L B E P" per track
    <root>/<seq>_RES/mask000.tif + res_track.txt results

Indices have 3 digits, 4 when a sequence has 1000 frames or more. Each folder is written into
a temporary sibling and renamed, so a half-written sequence never looks complete.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile

from microseg.errors import AnnotationError, DataFormatError, MissingFileError, ShapeMismatchError
from microseg.io.tiff import read_stack
from microseg.utils.atomic import atomic_path, write_text

log = logging.getLogger(__name__)

TRACK_COLUMNS = ("L", "B", "E", "P")


@dataclass
class CtcSequence:
    frames: np.ndarray  # (T, Y, X) raw images
    tra: np.ndarray  # (T, Y, X) uint16 tracking markers
    tracks: pd.DataFrame  # L, B, E, P
    seg: dict[int, np.ndarray] = field(default_factory=dict)  # frame -> (Y, X) uint16


@dataclass
class CtcResult:
    masks: np.ndarray  # (T, Y, X) uint16
    tracks: pd.DataFrame  # L, B, E, P


def n_digits(n_frames: int) -> int:
    """3 digits, or 4 for sequences of 1000 frames or more (as CTC names them)."""
    return 4 if n_frames >= 1000 else 3


# -- track files ----------------------------------------------------------------------------
def _empty_tracks() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="int64") for c in TRACK_COLUMNS})


def read_track_file(path: str | Path) -> pd.DataFrame:
    """Read ``L B E P`` lines (space or tab separated) into an int64 DataFrame."""
    path = Path(path)
    if not path.is_file():
        raise MissingFileError("expected a CTC track file (L B E P lines), found nothing", path)
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 4:
            raise DataFormatError(
                f"line {number}: expected 4 integers 'L B E P', found {line.strip()!r}", path
            )
        try:
            rows.append([int(p) for p in parts])
        except ValueError as exc:
            raise DataFormatError(
                f"line {number}: expected 4 integers 'L B E P', found {line.strip()!r}", path
            ) from exc
    if not rows:
        return _empty_tracks()
    return pd.DataFrame(rows, columns=list(TRACK_COLUMNS)).astype("int64")


def _tracks_text(tracks: pd.DataFrame) -> str:
    table = _as_tracks(tracks)
    return "".join(f"{r.L} {r.B} {r.E} {r.P}\n" for r in table.itertuples(index=False))


def write_track_file(path: str | Path, tracks: pd.DataFrame) -> Path:
    """Write a track table atomically as ``L B E P`` lines."""
    write_text(path, _tracks_text(tracks))
    return Path(path)


def _as_tracks(tracks: pd.DataFrame, path: str | Path | None = None) -> pd.DataFrame:
    missing = [c for c in TRACK_COLUMNS if c not in tracks.columns]
    if missing:
        raise DataFormatError(f"track table lacks columns {missing}", path)
    try:
        return tracks[list(TRACK_COLUMNS)].astype("int64").reset_index(drop=True)
    except (TypeError, ValueError) as exc:
        raise DataFormatError(f"track table must hold integers ({exc})", path) from exc


# -- the checker's rules --------------------------------------------------------------------
def check_tracks(masks: np.ndarray, tracks: pd.DataFrame, path: str | Path | None = None) -> None:
    """Enforce the CTC consistency rules between label images and the track table.

    Labels are unique and positive; 0 <= B <= E < T; every label in the masks is in the table
    and occurs in exactly the frames B..E (every one of them); a parent (P != 0) exists and
    ends before its daughter begins. Raises :class:`AnnotationError` naming the label.
    """
    table = _as_tracks(tracks, path)
    n_frames = len(masks)
    labels = table["L"].to_numpy()
    dupes = sorted(set(labels[pd.Series(labels).duplicated().to_numpy()].tolist()))
    if dupes:
        raise AnnotationError(f"track labels {dupes[:10]} appear more than once", path)
    for row in table.itertuples(index=False):
        if row.L <= 0:
            raise AnnotationError(f"track label {row.L} must be positive", path)
        if not 0 <= row.B <= row.E < n_frames:
            raise AnnotationError(
                f"label {row.L}: expected 0 <= B <= E < {n_frames}, found B={row.B} E={row.E}",
                path,
            )
        if row.P < 0:
            raise AnnotationError(f"label {row.L}: parent {row.P} must be >= 0", path)
    by_label = table.set_index("L")
    for row in table.itertuples(index=False):
        if row.P == 0:
            continue
        if row.P not in by_label.index:
            raise AnnotationError(f"label {row.L}: parent {row.P} is not in the track table", path)
        parent_end = int(by_label.at[row.P, "E"])
        if parent_end >= row.B:
            raise AnnotationError(
                f"label {row.L}: parent {row.P} ends at frame {parent_end}, expected it to end "
                f"before the daughter begins at frame {row.B}",
                path,
            )
    present = [set(np.unique(frame).tolist()) - {0} for frame in masks]
    known = set(labels.tolist())
    for t, found in enumerate(present):
        unknown = sorted(found - known)
        if unknown:
            raise AnnotationError(
                f"labels {unknown[:10]} in frame {t} are not in the track table", path
            )
    for row in table.itertuples(index=False):
        frames_with = [t for t, found in enumerate(present) if row.L in found]
        expected = list(range(row.B, row.E + 1))
        if frames_with != expected:
            missing = sorted(set(expected) - set(frames_with))
            extra = sorted(set(frames_with) - set(expected))
            raise AnnotationError(
                f"label {row.L}: expected in frames {row.B}..{row.E} only, missing from "
                f"{missing[:10]}, present outside in {extra[:10]}",
                path,
            )


# -- folders --------------------------------------------------------------------------------
def _check_series(array: np.ndarray, name: str, path: Path) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 3:
        raise ShapeMismatchError(f"expected {name} of shape (T, Y, X), found {array.shape}", path)
    return array


def _as_labels(array: np.ndarray, name: str, path: Path) -> np.ndarray:
    if not np.issubdtype(array.dtype, np.integer) or (array.size and array.min() < 0):
        raise DataFormatError(f"expected non-negative integer {name}, found {array.dtype}", path)
    if array.size and array.max() > np.iinfo(np.uint16).max:
        raise DataFormatError(f"{name} labels exceed 65535 (CTC uses uint16)", path)
    return array.astype(np.uint16, copy=False)


def _write_frames(folder: Path, prefix: str, frames: np.ndarray, digits: int) -> None:
    for t, frame in enumerate(frames):
        tifffile.imwrite(folder / f"{prefix}{t:0{digits}d}.tif", frame)


def write_ctc_gt(
    root: str | Path,
    seq: str,
    frames: np.ndarray,
    tra: np.ndarray,
    tracks: pd.DataFrame,
    seg: dict[int, np.ndarray] | None = None,
) -> Path:
    """Write raw frames and SEG/TRA ground truth of one sequence; returns ``<root>/<seq>_GT``."""
    root = Path(root)
    gt_dir = root / f"{seq}_GT"
    frames = _check_series(frames, "frames", root / seq)
    tra = _as_labels(_check_series(tra, "TRA markers", gt_dir), "TRA markers", gt_dir)
    if tra.shape != frames.shape:
        raise ShapeMismatchError(
            f"TRA shape {tra.shape} differs from frames shape {frames.shape}", gt_dir
        )
    check_tracks(tra, tracks, gt_dir / "TRA" / "man_track.txt")
    seg = seg or {}
    digits = n_digits(len(frames))
    for t, mask in seg.items():
        if not 0 <= t < len(frames) or np.shape(mask) != frames.shape[1:]:
            raise ShapeMismatchError(
                f"SEG frame {t} of shape {np.shape(mask)} does not fit {len(frames)} frames of "
                f"shape {frames.shape[1:]}",
                gt_dir,
            )
    with atomic_path(root / seq) as tmp:
        tmp.mkdir()
        _write_frames(tmp, "t", frames, digits)
    with atomic_path(gt_dir) as tmp:
        (tmp / "TRA").mkdir(parents=True)
        _write_frames(tmp / "TRA", "man_track", tra, digits)
        (tmp / "TRA" / "man_track.txt").write_text(_tracks_text(tracks))
        if seg:
            (tmp / "SEG").mkdir()
            for t in sorted(seg):
                mask = _as_labels(np.asarray(seg[t]), f"SEG frame {t}", gt_dir)
                tifffile.imwrite(tmp / "SEG" / f"man_seg{t:0{digits}d}.tif", mask)
    return gt_dir


def write_ctc_result(root: str | Path, seq: str, masks: np.ndarray, tracks: pd.DataFrame) -> Path:
    """Write a tracking result (``mask###.tif`` + ``res_track.txt``) after checking it."""
    res_dir = Path(root) / f"{seq}_RES"
    masks = _as_labels(_check_series(masks, "masks", res_dir), "masks", res_dir)
    check_tracks(masks, tracks, res_dir / "res_track.txt")
    with atomic_path(res_dir) as tmp:
        tmp.mkdir()
        _write_frames(tmp, "mask", masks, n_digits(len(masks)))
        (tmp / "res_track.txt").write_text(_tracks_text(tracks))
    return res_dir


def _numbered(folder: Path, prefix: str) -> dict[int, Path]:
    """``{index: path}`` of ``<prefix><digits>.tif`` files in ``folder``."""
    pattern = re.compile(rf"^{re.escape(prefix)}(\d+)\.tif$")
    found: dict[int, Path] = {}
    for path in sorted(folder.glob(f"{prefix}*.tif")):
        match = pattern.match(path.name)
        if match:
            found[int(match.group(1))] = path
        else:
            log.warning("%s: unexpected file name, ignored", path)
    return found


def _read_series(folder: Path, prefix: str) -> np.ndarray:
    if not folder.is_dir():
        raise MissingFileError(f"expected a folder of {prefix}###.tif files, found nothing", folder)
    files = _numbered(folder, prefix)
    if not files:
        raise MissingFileError(f"expected {prefix}###.tif files, found none", folder)
    expected = list(range(len(files)))
    if sorted(files) != expected:
        gaps = sorted(set(expected) - set(files))
        raise DataFormatError(
            f"expected {prefix} files numbered 0..{len(files) - 1}, missing {gaps[:10]}", folder
        )
    planes = [read_stack(files[t], expect_ndim=2) for t in expected]
    shapes = {p.shape for p in planes}
    if len(shapes) != 1:
        raise ShapeMismatchError(f"expected frames of one shape, found {sorted(shapes)}", folder)
    return np.stack(planes)


def read_ctc_gt(root: str | Path, seq: str, validate: bool = True) -> CtcSequence:
    """Read frames, TRA markers + track table and any SEG frames of one sequence."""
    root = Path(root)
    gt_dir = root / f"{seq}_GT"
    frames = _read_series(root / seq, "t")
    tra = _read_series(gt_dir / "TRA", "man_track")
    if tra.shape != frames.shape:
        raise ShapeMismatchError(
            f"TRA markers have shape {tra.shape}, frames {frames.shape}", gt_dir / "TRA"
        )
    track_path = gt_dir / "TRA" / "man_track.txt"
    tracks = read_track_file(track_path)
    if validate:
        check_tracks(tra, tracks, track_path)
    seg: dict[int, np.ndarray] = {}
    if (gt_dir / "SEG").is_dir():
        for t, path in _numbered(gt_dir / "SEG", "man_seg").items():
            if t >= len(frames):
                raise DataFormatError(f"SEG frame {t} beyond the {len(frames)} frames", path)
            seg[t] = read_stack(path, expect_ndim=2)
            if seg[t].shape != frames.shape[1:]:
                raise ShapeMismatchError(
                    f"SEG shape {seg[t].shape} differs from frame shape {frames.shape[1:]}", path
                )
    return CtcSequence(frames=frames, tra=tra, tracks=tracks, seg=seg)


def read_ctc_result(root: str | Path, seq: str, validate: bool = True) -> CtcResult:
    """Read ``<root>/<seq>_RES`` masks and ``res_track.txt``."""
    res_dir = Path(root) / f"{seq}_RES"
    masks = _read_series(res_dir, "mask")
    track_path = res_dir / "res_track.txt"
    tracks = read_track_file(track_path)
    if validate:
        check_tracks(masks, tracks, track_path)
    return CtcResult(masks=masks, tracks=tracks)
