"""3-class probabilities (background, interior, boundary) -> instance labels by seeded watershed.

Used by every 3-class U-Net of :mod:`microseg.models.unet` and by :mod:`microseg.models.maunet`;
lives in ``infer/`` because it is inference, not the network: changing a threshold must not make
DVC retrain a model.

Seeds are the connected components of ``P(interior) > t_seed`` (seeds smaller than
``seed_min_size`` dropped). Where touching nuclei share one interior component (the common
error on dense tissue), ``split_h > 0`` splits it the classical way: the h-maxima of its
distance transform (maxima at least ``split_h`` pixels deeper than the waist between them)
seed a watershed of the negated distance inside the component, so two round cores joined by a
neck become two seeds while an elongated nucleus with a flat ridge stays one. The mask is
``1 - P(background) > t_mask`` (interior + boundary); the elevation that grows seeds into it is
``-P(interior)`` (``"prob"``) or minus the distance transform of the mask (``"distance"``).
Mask components without a seed become instances of their own (``keep_unseeded``). Objects
smaller than ``min_size`` pixels are removed and the rest relabelled 1..N (uint16).

Families with a distance head (``maunet``) append a fourth channel: the predicted per-instance
normalised distance transform (1 at an instance's centre, falling towards its edge, 0 outside);
``seeds="distance"`` thresholds that channel instead of ``P(interior)`` (``t_seed`` then cuts
the distance, so touching nuclei separate where their distances dip towards 0) and
``elevation="predicted_distance"`` floods ``-distance``. Both need the fourth channel;
:func:`needs_distance` tells a caller (the validation grid search) which settings do.

``peak_h > 0`` seeds from peaks instead of regions: the h-maxima of the seed map (maxima at
least ``peak_h`` above the saddle towards any higher one) inside its regions above ``t_seed``
of ``seed_min_size`` pixels or more. A
regressed distance often peaks well below 1 (a blurred regression undershoots), so one fixed
cut either merges touching nuclei or loses faint ones; its peaks separate them at any height.

Two knobs shape the predicted distance before seeds and flooding read it. ``seed_weight:
interior`` multiplies it by the interior share of the foreground, ``P(interior) / (P(interior)
+ P(boundary))``: where the 3-class head sees the border between touching nuclei the distance
is pulled towards 0, so their peaks separate. ``seed_sigma`` smooths it (Gaussian, pixels): a
regressed distance is flat-topped and noisy, and each ripple is a peak, so without smoothing a
low ``peak_h`` splits nuclei and a high one merges them. On DSB 2018 validation (81 images, the
demo's MAUNet, IoU 0.5) ``seed_sigma: 1`` with ``seed_weight: interior`` at ``peak_h: 0.1`` gave
F1 0.784 with 280 merges, the raw distance 0.757 with 288, and the same network's 3-class map
decoded as the U-Net's 0.739 with 360 (``benchmarks/bench_merges.py``).

``by_modality`` maps an image kind (:func:`microseg.infer.modality.image_modality`) to the knobs
that kind's validation images chose over the shared ones: on DSB 2018 the large nuclei of H&E
tissue split on the ripples of a flat distance top at the ``peak_h`` that fluorescence's small
round nuclei need. :meth:`PostprocessConfig.for_image` applies them; a predictor calls it with
the raw image, so a packaged model carries the choice with it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any, Literal

import numpy as np
from scipy import ndimage
from skimage.morphology import h_maxima
from skimage.segmentation import relabel_sequential, watershed

from microseg.errors import ConfigError, DataFormatError
from microseg.infer.modality import MODALITIES, image_modality
from microseg.utils.fields import known_fields

ELEVATIONS = ("prob", "distance", "predicted_distance")
SEEDS = ("interior", "distance")
SEED_WEIGHTS = ("none", "interior")


@dataclass(frozen=True)
class PostprocessConfig:
    """3-class probabilities -> instances (see the module docstring)."""

    t_seed: float = 0.5
    t_mask: float = 0.5
    elevation: Literal["prob", "distance", "predicted_distance"] = "prob"
    #: which map ``t_seed`` thresholds: P(interior), or the predicted distance (4th channel)
    seeds: Literal["interior", "distance"] = "interior"
    seed_min_size: int = 4
    split_h: float = 0.0  # pixels; 0: seeds are the interior components as they are
    #: > 0: seeds are the h-maxima of the seed map above t_seed (0: its regions above t_seed)
    peak_h: float = 0.0
    #: the predicted distance times the interior share of the foreground (``interior``) or not
    seed_weight: Literal["none", "interior"] = "none"
    seed_sigma: float = 0.0  # Gaussian smoothing of the predicted distance (pixels; 0: none)
    min_size: int = 20  # DSB 2018: 1 % of true nuclei are smaller than 21 px
    keep_unseeded: bool = True
    #: image kind -> the knobs it uses instead (chosen on that kind's validation images)
    by_modality: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.elevation not in ELEVATIONS:
            raise ConfigError(f"elevation must be one of {ELEVATIONS}; found {self.elevation!r}")
        if self.seeds not in SEEDS:
            raise ConfigError(f"seeds must be one of {SEEDS}; found {self.seeds!r}")
        for name in ("t_seed", "t_mask"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name} must be in [0, 1]; found {getattr(self, name)}")
        if self.split_h < 0:
            raise ConfigError(f"split_h must be >= 0 pixels; found {self.split_h}")
        if self.peak_h < 0:
            raise ConfigError(f"peak_h must be >= 0; found {self.peak_h}")
        if self.seed_weight not in SEED_WEIGHTS:
            raise ConfigError(
                f"seed_weight must be one of {SEED_WEIGHTS}; found {self.seed_weight!r}"
            )
        if self.seed_sigma < 0:
            raise ConfigError(f"seed_sigma must be >= 0 pixels; found {self.seed_sigma}")
        for kind, knobs in self.by_modality.items():
            if kind not in MODALITIES:
                raise ConfigError(f"by_modality: unknown image kind {kind!r}; known {MODALITIES}")
            unknown = sorted(set(knobs) - set(KNOBS))
            if unknown:
                raise ConfigError(f"by_modality[{kind!r}]: unknown knobs {unknown}")
            replace(self, by_modality={}, **knobs)  # the kind's config is valid on its own

    def for_modality(self, kind: str | None) -> PostprocessConfig:
        """The config an image of ``kind`` is post-processed with (without ``by_modality``)."""
        knobs = self.by_modality.get(kind, {}) if kind is not None else {}
        return replace(self, by_modality={}, **knobs)

    def for_image(self, image: np.ndarray) -> PostprocessConfig:
        """:meth:`for_modality` of the raw image's kind; the image is not looked at when no
        kind has knobs of its own."""
        return self.for_modality(image_modality(image) if self.by_modality else None)

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> PostprocessConfig:
        return cls(**known_fields(cls, values, "unet post-processing"))


#: the knobs a ``by_modality`` entry may set (every field but itself)
KNOBS = tuple(f.name for f in fields(PostprocessConfig) if f.name != "by_modality")


def remove_small_and_relabel(labels: np.ndarray, min_size: int) -> np.ndarray:
    """Objects smaller than ``min_size`` pixels set to 0, the rest numbered 1..N (uint16)."""
    labels = np.asarray(labels)
    if min_size > 1 and labels.max() > 0:
        areas = np.bincount(labels.ravel())
        small = areas < min_size
        small[0] = False
        labels = np.where(small[labels], 0, labels)
    out, _, _ = relabel_sequential(labels)
    if out.max() > np.iinfo(np.uint16).max:
        raise DataFormatError(f"{out.max()} instances do not fit uint16")
    return out.astype(np.uint16)


def label_rest(labels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``labels`` plus each component of ``mask`` that no label covers, numbered after them."""
    rest, n_rest = ndimage.label(mask & (labels == 0))
    return np.where(rest > 0, rest + labels.max(), labels) if n_rest else labels


def split_cores(core: np.ndarray, h: float) -> np.ndarray:
    """Label a binary mask, splitting components at necks that are ``h`` pixels shallower
    than both cores (h-maxima of the distance transform as watershed markers)."""
    core = np.asarray(core, bool)
    if h <= 0 or not core.any():
        return ndimage.label(core)[0]
    dist = ndimage.distance_transform_edt(core).astype(np.float32)
    markers, _ = ndimage.label(h_maxima(dist, h))
    seeds = watershed(-dist, markers, mask=core)
    return label_rest(seeds, core).astype(np.int32)  # components too shallow for a maximum


def shaped_distance(probs: np.ndarray, cfg: PostprocessConfig) -> np.ndarray:
    """The predicted distance (channel 3) as seeds and flooding read it: weighted by the
    interior share and smoothed as ``cfg`` says (see the module docstring)."""
    dist = probs[3]
    if cfg.seed_weight == "interior":
        dist = dist * probs[1] / np.maximum(probs[1] + probs[2], 1e-6)
    if cfg.seed_sigma > 0:
        dist = ndimage.gaussian_filter(dist, cfg.seed_sigma)
    return dist


def needs_distance(cfg: PostprocessConfig) -> bool:
    """Whether ``cfg`` reads the predicted-distance channel (only 4-channel inputs have it)."""
    return cfg.seeds == "distance" or cfg.elevation == "predicted_distance"


def probs_to_instances(probs: np.ndarray, cfg: PostprocessConfig | None = None) -> np.ndarray:
    """Seeded watershed of a ``(3, H, W)`` softmax (background, interior, boundary), or of
    ``(4, H, W)`` with the predicted normalised distance appended -> uint16 instances."""
    cfg = cfg or PostprocessConfig()
    probs = np.asarray(probs, np.float32)
    if probs.ndim != 3 or probs.shape[0] not in (3, 4):
        raise DataFormatError(
            f"expected (3, H, W) class probabilities (+ a distance channel); found {probs.shape}"
        )
    if needs_distance(cfg) and probs.shape[0] != 4:
        raise DataFormatError(
            f"seeds={cfg.seeds!r}, elevation={cfg.elevation!r} need a 4th (distance) channel; "
            f"found {probs.shape[0]} channels"
        )
    interior = probs[1]
    dist = shaped_distance(probs, cfg) if probs.shape[0] == 4 else None
    seed_map = dist if cfg.seeds == "distance" else interior
    core = seed_map > cfg.t_seed
    if cfg.peak_h > 0 and core.any():  # peaks are points: the size filter is the regions'
        if cfg.seed_min_size > 1:
            core = remove_small_and_relabel(ndimage.label(core)[0], cfg.seed_min_size) > 0
        seeds = split_cores(core & h_maxima(seed_map, cfg.peak_h).astype(bool), cfg.split_h)
    else:
        seeds = split_cores(core, cfg.split_h)
        if seeds.max() and cfg.seed_min_size > 1:
            seeds = remove_small_and_relabel(seeds, cfg.seed_min_size).astype(np.int32)
    mask = (1.0 - probs[0] > cfg.t_mask) | (seeds > 0)
    if cfg.elevation == "prob":
        elevation = -interior
    elif cfg.elevation == "predicted_distance":
        elevation = -dist
    else:
        elevation = -ndimage.distance_transform_edt(mask).astype(np.float32)
    labels = watershed(elevation, seeds, mask=mask) if seeds.max() > 0 else np.zeros_like(seeds)
    if cfg.keep_unseeded:
        labels = label_rest(labels, mask)
    return remove_small_and_relabel(labels, cfg.min_size)
