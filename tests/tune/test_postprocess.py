"""Watershed thresholds chosen on validation: the grid's best point wins, ties keep the base."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from microseg.errors import ConfigError, DataFormatError
from microseg.infer.watershed import PostprocessConfig, probs_to_instances
from microseg.tune.postprocess import grid_points, search_by_modality, search_postprocess


def _touching_pair() -> tuple[np.ndarray, np.ndarray]:
    """Two touching discs whose interior probability dips only to 0.65 at the contact."""
    yy, xx = np.mgrid[:40, :60]
    gt = np.zeros((40, 60), np.uint16)
    gt[(yy - 20) ** 2 + (xx - 20) ** 2 <= 100] = 1
    gt[((yy - 20) ** 2 + (xx - 39) ** 2 <= 100) & (gt == 0)] = 2
    fg = gt > 0
    interior = np.where(fg, 0.9, 0.0).astype(np.float32)
    interior[:, 28:31] = np.where(fg[:, 28:31], 0.65, 0.0)  # the neck between them
    probs = np.stack([1 - fg.astype(np.float32), interior, fg * (1 - interior)]).astype(np.float32)
    return probs, gt


def test_a_higher_seed_threshold_separates_the_touching_pair() -> None:
    probs, gt = _touching_pair()
    base = PostprocessConfig(t_seed=0.5, min_size=5)
    chosen, table = search_postprocess([probs], [gt], base, {"t_seed": [0.5, 0.7, 0.95]})
    # 0.5 and 0.95 (no seed: the unseeded mask is kept) give one merged object matching one
    # disc at IoU > 0.5 (F1 2/3); 0.7 cuts at the neck: both matched
    assert chosen.t_seed == 0.7 and chosen.min_size == 5
    assert list(table["f1"].round(3)) == [0.667, 0.667, 1.0, 0.667]


def test_ties_keep_the_base_config() -> None:
    probs, gt = _touching_pair()
    base = PostprocessConfig(t_seed=0.7, min_size=5)
    chosen, _ = search_postprocess([probs], [gt], base, {"t_seed": [0.75, 0.8]})
    assert chosen == base


def test_unknown_keys_are_refused() -> None:
    with pytest.raises(ConfigError, match="t_sed"):
        grid_points({"t_sed": [0.5]})


def _with_distance(probs: np.ndarray, gt: np.ndarray) -> np.ndarray:
    dist = np.zeros(gt.shape, np.float32)
    for i in (1, 2):
        d = ndimage.distance_transform_edt(gt == i)
        dist[gt == i] = d[gt == i] / d.max()
    return np.concatenate([probs, dist[None]])


def test_distance_points_are_searched_with_a_distance_channel() -> None:
    probs, gt = _touching_pair()
    base = PostprocessConfig(t_seed=0.5, min_size=5)
    grid = {"seeds": ["interior", "distance"], "elevation": ["prob", "predicted_distance"]}
    chosen, table = search_postprocess([_with_distance(probs, gt)], [gt], base, grid)
    assert len(table) == 5
    assert chosen.seeds == "distance" and chosen.t_seed == 0.5
    assert table["f1"].max() == 1.0


def test_distance_points_are_skipped_without_one() -> None:
    """A 3-class model under a grid that names distance settings searches what it did."""
    probs, gt = _touching_pair()
    base = PostprocessConfig(t_seed=0.5, min_size=5)
    plain = {"t_seed": [0.5, 0.7, 0.95]}
    grid = {**plain, "seeds": ["interior", "distance"], "elevation": ["prob", "predicted_distance"]}
    chosen, table = search_postprocess([probs], [gt], base, grid)
    before, old = search_postprocess([probs], [gt], base, plain)
    assert chosen == before
    assert len(table) == len(old) == 4
    assert set(table["seeds"]) == {"interior"} and set(table["elevation"]) == {"prob"}
    with pytest.raises(DataFormatError, match="4th"):  # a distance base needs the channel
        search_postprocess([probs], [gt], PostprocessConfig(seeds="distance"), plain)


def test_parallel_search_gives_the_serial_table() -> None:
    """Points scored in worker processes come back in grid order with the same scores."""
    probs, gt = _touching_pair()
    base = PostprocessConfig(t_seed=0.5, min_size=5)
    grid = {"t_seed": [0.5, 0.6, 0.7, 0.95], "t_mask": [0.3, 0.5], "min_size": [5, 20]}
    serial, t1 = search_postprocess([probs, probs], [gt, gt], base, grid, workers=1)
    parallel, t2 = search_postprocess([probs, probs], [gt, gt], base, grid, workers=2)
    assert serial == parallel
    assert t1.equals(t2) and len(t1) == 17


def _big_disc() -> tuple[np.ndarray, np.ndarray]:
    """One large nucleus whose interior probability sags to 0.65 across its middle: a seed
    threshold of 0.7 cuts it in two halves (neither matches at IoU 0.5), 0.5 keeps it whole."""
    yy, xx = np.mgrid[:40, :60]
    gt = (((yy - 20) ** 2 + (xx - 30) ** 2) <= 225).astype(np.uint16)
    interior = np.where(gt > 0, 0.9, 0.0).astype(np.float32)
    interior[:, 29:32] = np.where(gt[:, 29:32] > 0, 0.65, 0.0)
    probs = np.stack([1 - gt.astype(np.float32), interior, gt * (1 - interior)])
    return probs.astype(np.float32), gt


def test_a_kind_keeps_its_own_knobs_only_where_its_images_prefer_them() -> None:
    pair, disc = _touching_pair(), _big_disc()
    images = [pair, pair, disc, disc, disc]
    kinds = ["fluorescence", "fluorescence", "tissue", "tissue", "brightfield"]
    shared = PostprocessConfig(t_seed=0.7, min_size=5)
    grid = {"t_seed": [0.5, 0.7]}
    chosen, table = search_by_modality(
        [p for p, _ in images], [g for _, g in images], kinds, shared, grid, min_images=2
    )
    # tissue's discs split at 0.7 and stay whole at 0.5; fluorescence's pairs need 0.7 (the
    # shared value: no entry); one brightfield image is below min_images (shared choice)
    assert chosen.by_modality == {"tissue": {"t_seed": 0.5}}
    assert chosen.for_modality(None) == shared
    assert set(table["modality"]) == {"fluorescence", "tissue"}
    disc_probs, _ = disc
    assert probs_to_instances(disc_probs, chosen.for_modality("tissue")).max() == 1
    assert probs_to_instances(disc_probs, chosen.for_modality("brightfield")).max() == 2


def test_one_kind_per_image_is_required() -> None:
    probs, gt = _touching_pair()
    with pytest.raises(ConfigError, match="kind"):
        search_by_modality([probs], [gt], [], PostprocessConfig(), {"t_seed": [0.5]}, 1)
