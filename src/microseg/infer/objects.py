"""Per-image object statistics of a label image (count and area distribution in pixels)."""

from __future__ import annotations

from typing import Any

import numpy as np


def object_stats(sample_id: str, labels: np.ndarray) -> dict[str, Any]:
    """Object count and area distribution (pixels) of one label image."""
    areas = np.bincount(np.asarray(labels).ravel())[1:]
    areas = areas[areas > 0]
    if areas.size == 0:
        q = dict.fromkeys(("area_mean", "area_median", "area_p10", "area_p90"), float("nan"))
    else:
        p10, p50, p90 = np.percentile(areas, (10, 50, 90))
        q = {
            "area_mean": float(areas.mean()),
            "area_median": float(p50),
            "area_p10": float(p10),
            "area_p90": float(p90),
        }
    return {"sample_id": sample_id, "n_objects": int(areas.size), **q}
