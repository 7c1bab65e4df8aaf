"""Seeded watershed of 3-class probabilities: perfect maps, unseeded blobs, neck splitting."""

from __future__ import annotations

from dataclasses import asdict, replace

import numpy as np
import pytest
from scipy import ndimage
from skimage.draw import disk

from microseg.data.targets import instances_to_classes
from microseg.errors import ConfigError, DataFormatError
from microseg.infer.watershed import (
    PostprocessConfig,
    needs_distance,
    probs_to_instances,
    remove_small_and_relabel,
    split_cores,
)


def two_touching_discs() -> np.ndarray:
    labels = np.zeros((64, 64), np.uint16)
    labels[disk((32, 22), 10.5, shape=labels.shape)] = 1
    labels[disk((32, 43), 10.5, shape=labels.shape)] = 2
    return labels


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


@pytest.mark.parametrize("elevation", ["prob", "distance"])
def test_watershed_recovers_touching_discs_from_perfect_map(elevation):
    truth = two_touching_discs()
    classes = instances_to_classes(truth)
    probs = np.eye(3, dtype=np.float32)[classes].transpose(2, 0, 1)
    labels = probs_to_instances(probs, PostprocessConfig(elevation=elevation, min_size=5))
    assert labels.dtype == np.uint16
    assert labels.max() == 2
    for i in (1, 2):
        best = max(iou(truth == i, labels == j) for j in (1, 2))
        assert best > 0.95
    # the foreground is exactly the truth's
    assert np.array_equal(labels > 0, truth > 0)


def test_unseeded_components_and_small_objects():
    probs = np.zeros((3, 32, 32), np.float32)
    probs[0] = 1.0
    # a blob of boundary only (no interior seed) and a 2-pixel speck
    probs[:, 5:12, 5:12] = np.array([0, 0, 1], np.float32)[:, None, None]
    probs[:, 20, 20:22] = np.array([0, 1, 0], np.float32)[:, None]
    keep = probs_to_instances(probs, PostprocessConfig(seed_min_size=1, min_size=1))
    assert keep.max() == 2
    strict = probs_to_instances(probs, PostprocessConfig(min_size=5, keep_unseeded=False))
    assert strict.max() == 0


def test_remove_small_and_relabel():
    labels = np.zeros((10, 10), np.int32)
    labels[0, :3] = 7
    labels[5:8, 5:8] = 3
    labels[9, 9] = 12
    out = remove_small_and_relabel(labels, min_size=3)
    assert out.dtype == np.uint16
    assert sorted(np.unique(out).tolist()) == [0, 1, 2]
    assert out[9, 9] == 0


def test_probs_shape_is_checked():
    with pytest.raises(DataFormatError):
        probs_to_instances(np.zeros((2, 8, 8), np.float32))


def merged_core_probs() -> tuple[np.ndarray, np.ndarray]:
    """Two discs of radius 9 whose *interiors* touch through a 5-pixel neck (the network's
    typical merge on dense tissue): one interior component, two nuclei."""
    truth = np.zeros((48, 72), np.uint16)
    truth[disk((24, 22), 11, shape=truth.shape)] = 1
    truth[disk((24, 48), 11, shape=truth.shape)] = 2
    truth[20:29, 33:37] = 0
    interior = np.zeros(truth.shape, bool)
    interior[disk((24, 22), 9, shape=truth.shape)] = True
    interior[disk((24, 48), 9, shape=truth.shape)] = True
    interior[22:27, 28:43] = True  # the neck joining the two cores
    fg = truth > 0
    probs = np.zeros((3, *truth.shape), np.float32)
    probs[1] = interior
    probs[2] = fg & ~interior
    probs[0] = ~(fg | interior)
    return truth, probs


def test_split_h_splits_a_neck_and_zero_keeps_it_merged():
    truth, probs = merged_core_probs()
    assert ndimage.label(probs[1] > 0.5)[1] == 1
    merged = probs_to_instances(probs, PostprocessConfig(min_size=5))
    split = probs_to_instances(probs, PostprocessConfig(min_size=5, split_h=2.0))
    assert merged.max() == 1
    assert split.max() == 2
    for i in (1, 2):  # each nucleus recovered (the neck pixels go to one side or the other)
        assert max(iou(truth == i, split == j) for j in (1, 2)) > 0.85


def test_split_h_leaves_an_ellipse_whole():
    core = np.zeros((40, 80), bool)
    yy, xx = np.mgrid[:40, :80]
    core[((yy - 20) / 8.0) ** 2 + ((xx - 40) / 30.0) ** 2 <= 1] = True
    labels = split_cores(core, 2.0)
    assert labels.max() == 1
    assert np.array_equal(labels > 0, core)


def test_split_cores_keeps_shallow_components_and_every_pixel():
    core = np.zeros((30, 30), bool)
    core[2:4, 2:9] = True  # too thin for any maximum of height 3
    core[10:25, 10:25] = True
    labels = split_cores(core, 3.0)
    assert labels.max() == 2
    assert np.array_equal(labels > 0, core)
    assert np.array_equal(split_cores(core, 0.0) > 0, core)


def test_split_h_must_be_non_negative():
    with pytest.raises(ConfigError, match="split_h"):
        PostprocessConfig(split_h=-1)
    with pytest.raises(ConfigError, match="unknown"):
        PostprocessConfig.from_mapping({"t_seeds": 0.5})


# -- a fourth channel: the predicted normalised distance (maunet) -------------------------------
def with_distance(truth: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """``probs`` plus the true per-instance distance transform, each divided by its maximum."""
    dist = np.zeros(truth.shape, np.float32)
    for i in np.unique(truth[truth > 0]):
        d = ndimage.distance_transform_edt(truth == i)
        dist[truth == i] = d[truth == i] / d.max()
    return np.concatenate([probs, dist[None]])


def test_distance_seeds_split_what_the_interior_merges():
    truth, probs = merged_core_probs()
    four = with_distance(truth, probs)
    interior = probs_to_instances(four, PostprocessConfig(min_size=5))
    assert interior.max() == 1  # the 4th channel is ignored unless asked for
    assert np.array_equal(interior, probs_to_instances(probs, PostprocessConfig(min_size=5)))
    for elevation in ("predicted_distance", "prob", "distance"):
        cfg = PostprocessConfig(seeds="distance", elevation=elevation, t_seed=0.5, min_size=5)
        labels = probs_to_instances(four, cfg)
        assert labels.max() == 2, elevation
        for i in (1, 2):
            assert max(iou(truth == i, labels == j) for j in (1, 2)) > 0.85, elevation


def test_predicted_distance_floods_from_the_distance_seeds():
    truth = two_touching_discs()
    probs = np.eye(3, dtype=np.float32)[instances_to_classes(truth)].transpose(2, 0, 1)
    four = with_distance(truth, probs)
    cfg = PostprocessConfig(seeds="distance", elevation="predicted_distance", t_seed=0.6)
    labels = probs_to_instances(four, cfg)
    assert labels.max() == 2 and np.array_equal(labels > 0, truth > 0)
    for i in (1, 2):
        assert max(iou(truth == i, labels == j) for j in (1, 2)) > 0.95


def test_distance_peaks_seed_an_undershooting_regression():
    """A blurred regression that peaks at 0.35: no region passes t_seed = 0.5, a low cut
    joins the pair, its peaks (h-maxima) separate them; a small speck's peak is no seed."""
    truth = two_touching_discs()
    probs = np.eye(3, dtype=np.float32)[instances_to_classes(truth)].transpose(2, 0, 1)
    four = with_distance(truth, probs)
    four[3] = ndimage.gaussian_filter(four[3] * 0.45, 2)
    four[3, 5:7, 5:7] = 0.3  # a 4-pixel speck above the cut, outside the mask
    base = PostprocessConfig(seeds="distance", elevation="predicted_distance", min_size=5)
    assert probs_to_instances(four, replace(base, t_seed=0.5)).max() == 1  # the unseeded mask
    assert probs_to_instances(four, replace(base, t_seed=0.05)).max() == 1
    cfg = replace(base, t_seed=0.05, peak_h=0.1, seed_min_size=5, min_size=1)
    peaks = probs_to_instances(four, cfg)
    assert peaks.max() == 2 and np.array_equal(peaks > 0, truth > 0)
    assert probs_to_instances(four, replace(cfg, seed_min_size=1)).max() == 3  # + the speck
    for i in (1, 2):
        assert max(iou(truth == i, peaks == j) for j in (1, 2)) > 0.95
    with pytest.raises(ConfigError, match="peak_h"):
        PostprocessConfig(peak_h=-0.1)


def test_distance_settings_need_the_fourth_channel():
    _, probs = merged_core_probs()
    assert not needs_distance(PostprocessConfig(elevation="distance"))
    for cfg in (PostprocessConfig(seeds="distance"),
                PostprocessConfig(elevation="predicted_distance")):  # fmt: skip
        assert needs_distance(cfg)
        with pytest.raises(DataFormatError, match="4th"):
            probs_to_instances(probs, cfg)
    with pytest.raises(DataFormatError):
        probs_to_instances(np.zeros((5, 8, 8), np.float32))
    with pytest.raises(ConfigError, match="seeds"):
        PostprocessConfig(seeds="peaks")
    with pytest.raises(ConfigError, match="elevation"):
        PostprocessConfig(elevation="height")


def test_interior_weight_separates_a_pair_whose_distance_does_not_dip():
    """The regression saw one blob (its distance peaks once, between the nuclei); the 3-class
    head saw the border: weighting by the interior share gives each nucleus its own peak."""
    truth = two_touching_discs()
    probs = np.eye(3, dtype=np.float32)[instances_to_classes(truth)].transpose(2, 0, 1)
    yy, xx = np.mgrid[:64, :64]
    bump = np.exp(-((xx - 32.5) ** 2 / (2 * 14.0**2) + (yy - 32) ** 2 / (2 * 8.0**2)))
    four = np.concatenate([probs, (bump * (truth > 0)).astype(np.float32)[None]])
    base = PostprocessConfig(
        seeds="distance", elevation="predicted_distance", t_seed=0.1, peak_h=0.1, min_size=5
    )
    assert probs_to_instances(four, base).max() == 1
    weighted = probs_to_instances(four, replace(base, seed_weight="interior"))
    assert weighted.max() == 2
    for i in (1, 2):
        assert max(iou(truth == i, weighted == j) for j in (1, 2)) > 0.85


def test_seed_sigma_smooths_ripples_that_split_one_nucleus():
    truth = np.zeros((48, 48), np.uint16)
    truth[disk((24, 24), 12, shape=truth.shape)] = 1
    probs = np.eye(3, dtype=np.float32)[instances_to_classes(truth)].transpose(2, 0, 1)
    four = with_distance(truth, probs)
    four[3] = np.minimum(four[3], 0.6)  # a flat top, as a blurred regression gives
    rng = np.random.default_rng(0)
    four[3] += np.where(truth > 0, rng.normal(0, 0.04, truth.shape), 0).astype(np.float32)
    base = PostprocessConfig(
        seeds="distance", elevation="predicted_distance", t_seed=0.1, peak_h=0.05, min_size=5
    )
    assert probs_to_instances(four, base).max() > 1  # ripples become seeds
    smooth = probs_to_instances(four, replace(base, seed_sigma=2.0))
    assert smooth.max() == 1 and iou(truth == 1, smooth == 1) > 0.95
    with pytest.raises(ConfigError, match="seed_sigma"):
        PostprocessConfig(seed_sigma=-1)
    with pytest.raises(ConfigError, match="seed_weight"):
        PostprocessConfig(seed_weight="boundary")  # type: ignore[arg-type]


def test_by_modality_knobs_apply_to_their_kind_only():
    cfg = PostprocessConfig(peak_h=0.05, by_modality={"tissue": {"peak_h": 0.1, "min_size": 30}})
    tissue = cfg.for_modality("tissue")
    assert (tissue.peak_h, tissue.min_size, tissue.by_modality) == (0.1, 30, {})
    assert (
        cfg.for_modality("fluorescence") == cfg.for_modality(None) == replace(cfg, by_modality={})
    )
    colour = np.zeros((16, 16, 3), np.uint8)
    colour[..., 0] = 200  # red: a colour image is tissue
    assert cfg.for_image(colour) == tissue
    assert cfg.for_image(np.zeros((16, 16), np.uint8)).peak_h == 0.05
    # the choice travels as plain data (postprocess.json, a packaged model's config)
    assert PostprocessConfig.from_mapping(asdict(cfg)) == cfg


@pytest.mark.parametrize(
    ("by_modality", "match"),
    [
        ({"histology": {"peak_h": 0.1}}, "unknown image kind"),
        ({"tissue": {"peak": 0.1}}, "unknown knobs"),
        ({"tissue": {"by_modality": {}}}, "unknown knobs"),
        ({"tissue": {"t_mask": 1.5}}, "t_mask"),
    ],
)
def test_by_modality_is_checked(by_modality, match):
    with pytest.raises(ConfigError, match=match):
        PostprocessConfig(by_modality=by_modality)
