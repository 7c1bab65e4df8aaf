"""The writers the uncertainty and inter-rater benchmark stages (:mod:`microseg.stages.punet`)
and the user-stack commands (:mod:`microseg.stages.uncertainty_tools`) share, so that a map has
one name and one look wherever it is made: ``<head>_<map>.tif`` (float32, ZYX),
``panel_<head>.png|pdf``, ``uncertainty_vs_disagreement_<head>.csv`` with ``roc_<head>.png|pdf``.
Kept apart from the commands, which resolve models (and so import every stage).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from microseg.io import tiff
from microseg.utils.atomic import atomic_path

Voxel = tuple[float, float, float] | None


def maps_from_sums(
    sum_p: np.ndarray, sum_p2: np.ndarray, sum_entropy: np.ndarray, n: int
) -> dict[str, np.ndarray]:
    """The five uncertainty maps (float32) from a Prob-UNet's running sums over ``n`` samples."""
    from microseg.evaluate.uncertainty import UncertaintySums, uncertainty_maps

    arrays = (np.asarray(a, dtype=np.float64) for a in (sum_p, sum_p2, sum_entropy))
    return uncertainty_maps(UncertaintySums(*arrays, n=int(n)))


def write_uncertainty_maps(
    out_dir: Path,
    head: str,
    image: np.ndarray,
    maps: Mapping[str, np.ndarray],
    voxel_size_nm: Voxel,
    *,
    planes: Sequence[int],
    title: str,
    gt: np.ndarray | None = None,
) -> dict[str, float]:
    """``<head>_<map>.tif`` per map and ``panel_<head>.png|pdf``; returns the maps' means."""
    from microseg.report.figures import uncertainty_panel

    for name, arr in maps.items():
        tiff.write_stack(out_dir / f"{head}_{name}.tif", arr, voxel_size_nm)
    uncertainty_panel(
        image,
        maps,
        out_dir / f"panel_{head}.png",
        out_dir / f"panel_{head}.pdf",
        gt=gt,
        planes=list(planes),
        title=title,
    )
    return {f"mean_{k}": float(np.mean(v)) for k, v in maps.items()}


def write_disagreement_scores(
    out_dir: Path,
    head: str,
    maps: Mapping[str, np.ndarray],
    disagreement: np.ndarray,
    region: np.ndarray,
    seed: int,
) -> pd.DataFrame:
    """AUROC and Spearman of each map for voxels where raters disagree (within ``region``):
    ``uncertainty_vs_disagreement_<head>.csv`` and ``roc_<head>.png|pdf``."""
    from microseg.evaluate.inter_rater import compare_uncertainty_to_disagreement
    from microseg.report.figures import roc_figure

    table = compare_uncertainty_to_disagreement(maps, disagreement, mask=region, seed=seed)
    with atomic_path(out_dir / f"uncertainty_vs_disagreement_{head}.csv") as tmp:
        table.to_csv(tmp, index=False)
    curves = table.attrs.get("roc_curves", {})
    roc_figure(curves, out_dir / f"roc_{head}.png", out_dir / f"roc_{head}.pdf")
    return table
