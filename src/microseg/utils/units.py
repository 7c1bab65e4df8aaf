"""Physical units: voxel sizes and voxel coordinates in nanometres.

Spine stacks are anisotropic (about 94 nm in XY but 500 nm in Z), so distances between points
are taken in nanometres, never voxels; everything that matches or merges points converts here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from microseg.errors import AnnotationError, MicrosegError, ShapeMismatchError

#: ``(z, y, x)`` voxel size in nanometres
VoxelSize = Sequence[float] | np.ndarray


def voxel_size(voxel_size_nm: VoxelSize) -> np.ndarray:
    """``voxel_size_nm`` as a float64 ``(3,)`` array, checked to be three positive numbers."""
    vs = np.asarray(voxel_size_nm, dtype=float)
    if vs.shape != (3,) or not np.all(np.isfinite(vs)) or np.any(vs <= 0):
        raise MicrosegError(
            f"voxel_size_nm must be three positive numbers (z, y, x) in nm; found {voxel_size_nm!r}"
        )
    return vs


def to_nm(points_zyx: np.ndarray, voxel_size_nm: VoxelSize) -> np.ndarray:
    """Voxel coordinates ``(N, 3)`` in z, y, x order -> nanometres (float64, same order)."""
    pts = np.asarray(points_zyx, dtype=float)
    if pts.ndim == 1 and pts.size == 0:
        pts = pts.reshape(0, 3)
    if pts.ndim != 2 or pts.shape[1] != 3:
        raise ShapeMismatchError(
            f"points must be an (N, 3) array of z, y, x voxel coordinates; found shape {pts.shape}"
        )
    if not np.all(np.isfinite(pts)):
        raise AnnotationError(
            f"points must be finite; found {int((~np.isfinite(pts)).any(axis=1).sum())} "
            "row(s) with NaN or inf"
        )
    return pts * voxel_size(voxel_size_nm)
