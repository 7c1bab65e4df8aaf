"""Per-sample statistics recorded in the manifest and checked by the validation suite."""

from __future__ import annotations

import numpy as np

from microseg.data.manifest import shape_str


def image_stats(image: np.ndarray, channel_axis: int | None = None) -> dict[str, float | int | str]:
    """Intensity percentiles and non-finite count; one strided pass keeps it cheap on stacks."""
    flat = image.reshape(-1)
    finite_mask = np.isfinite(flat) if np.issubdtype(flat.dtype, np.floating) else None
    n_nonfinite = 0 if finite_mask is None else int(flat.size - np.count_nonzero(finite_mask))
    values = flat if finite_mask is None else flat[finite_mask]
    # a fixed stride subsample makes percentiles O(1e6) whatever the stack size, deterministically
    step = max(1, values.size // 2_000_000)
    sample = values[::step].astype(np.float64)
    if sample.size == 0:
        p1 = p50 = p99 = lo = hi = float("nan")
    else:
        p1, p50, p99 = (float(v) for v in np.percentile(sample, [1, 50, 99]))
        lo, hi = float(values.min()), float(values.max())
    spatial = image.shape if channel_axis is None else np.delete(image.shape, channel_axis)
    channels = 1 if channel_axis is None else int(image.shape[channel_axis])
    return {
        "shape": shape_str(tuple(spatial)),
        "dtype": str(image.dtype),
        "channels": channels,
        "intensity_min": lo,
        "intensity_p1": p1,
        "intensity_p50": p50,
        "intensity_p99": p99,
        "intensity_max": hi,
        "n_nonfinite": n_nonfinite,
    }


def label_stats(labels: np.ndarray, n_instances: int | None = None) -> dict[str, int | str]:
    """Shape, dtype, range and instance count of a label image (0 = background)."""
    if n_instances is None:
        n_instances = int(np.unique(labels).size - (1 if (labels == 0).any() else 0))
    return {
        "label_shape": shape_str(labels.shape),
        "label_dtype": str(labels.dtype),
        "label_min": int(labels.min()) if labels.size else 0,
        "label_max": int(labels.max()) if labels.size else 0,
        "n_instances": int(n_instances),
    }
