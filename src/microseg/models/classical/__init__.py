"""The classical baseline of every nuclei table: Otsu threshold + distance-transform watershed.

Steps (:func:`otsu_watershed`):

1. Colour images are averaged to grey; the grey image is percentile normalised (1..99 %)
   and smoothed by a Gaussian of ``smooth_sigma`` px.
2. Polarity. ``"auto"`` decides from the image: the background is the majority of the pixels,
   so when the median lies *above* the Otsu threshold the background is bright and the objects
   are dark (brightfield, H&E tissue) and the image is inverted; otherwise objects are bright
   (fluorescence). ``"bright"``/``"dark"`` force it.
3. Foreground = pixels above ``threshold_scale * otsu`` (holes filled); the Euclidean distance
   transform of that mask is smoothed a little and its local maxima
   (``skimage.feature.peak_local_max`` with ``min_distance`` and a square ``footprint``, one
   peak per plateau) seed a watershed of the negated distance inside the mask, which splits
   touching round nuclei at their waists. Mask components without a peak keep one label.
4. Objects smaller than ``min_size`` px are removed and labels renumbered 1..N (uint16).

Known failure: DSB 2018 brightfield images show whole grey cells with small dark nuclei; Otsu's
two-level split finds the cells, not the nuclei (train F1@0.5 about 0.05 on those two images).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from scipy import ndimage
from skimage.feature import peak_local_max
from skimage.filters import threshold_otsu
from skimage.segmentation import watershed

from microseg.data.targets import percentile_normalise
from microseg.errors import ConfigError
from microseg.infer.watershed import remove_small_and_relabel
from microseg.models import Predictor, register_model
from microseg.utils.fields import known_fields

Polarity = Literal["auto", "bright", "dark"]


@dataclass(frozen=True)
class ClassicalConfig:
    """The tunable knobs of the Otsu + watershed baseline.

    Defaults: the best of an 81-point grid (smooth_sigma x min_distance x footprint x
    distance_sigma) by mean F1@0.5 on the DSB 2018 *train* split (0.767; val 0.713).
    """

    polarity: Polarity = "auto"
    smooth_sigma: float = 0.5
    threshold_scale: float = 1.0
    min_distance: int = 7
    footprint: int = 9
    distance_sigma: float = 2.0
    min_size: int = 20
    fill_holes: bool = True

    def __post_init__(self) -> None:
        if self.polarity not in ("auto", "bright", "dark"):
            raise ConfigError(f"polarity must be auto, bright or dark; found {self.polarity!r}")
        if self.min_distance < 1 or self.footprint < 1:
            raise ConfigError("min_distance and footprint must be >= 1")

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> ClassicalConfig:
        return cls(**known_fields(cls, values, "classical baseline"))


def grey(image: np.ndarray) -> np.ndarray:
    """Percentile-normalised single-channel float32 image (colour averaged)."""
    return percentile_normalise(image).mean(axis=0)


def objects_are_dark(image: np.ndarray, threshold: float | None = None) -> bool:
    """True when the majority (background) of a grey image is above its Otsu threshold."""
    t = threshold_otsu(image) if threshold is None else threshold
    return bool(np.median(image) > t)


def otsu_watershed(image: np.ndarray, cfg: ClassicalConfig | None = None) -> np.ndarray:
    """Instances (uint16, 0 = background) of a ``YX``/``YXC`` image; see the module docstring."""
    cfg = cfg or ClassicalConfig()
    x = grey(image)
    if cfg.smooth_sigma > 0:
        x = ndimage.gaussian_filter(x, cfg.smooth_sigma)
    if x.max() <= x.min():
        return np.zeros(x.shape, np.uint16)
    t = threshold_otsu(x)
    dark = objects_are_dark(x, t) if cfg.polarity == "auto" else cfg.polarity == "dark"
    if dark:
        x, t = 1.0 - x, 1.0 - t
    mask = x > t * cfg.threshold_scale
    if cfg.fill_holes:
        mask = ndimage.binary_fill_holes(mask)
    if not mask.any():
        return np.zeros(x.shape, np.uint16)
    components, _ = ndimage.label(mask)
    dist = ndimage.distance_transform_edt(mask)
    if cfg.distance_sigma > 0:
        dist = ndimage.gaussian_filter(dist, cfg.distance_sigma)
    peaks = peak_local_max(
        dist,
        min_distance=cfg.min_distance,
        footprint=np.ones((cfg.footprint, cfg.footprint), bool),
        labels=components,
        exclude_border=False,
        num_peaks_per_label=np.inf,
    )
    markers = np.zeros(x.shape, np.int32)
    markers[tuple(peaks.T)] = np.arange(1, len(peaks) + 1)
    labels = watershed(-dist, markers, mask=mask)
    rest = mask & (labels == 0)
    if rest.any():
        extra, _ = ndimage.label(rest)
        labels = np.where(extra > 0, extra + labels.max(), labels)
    return remove_small_and_relabel(labels, cfg.min_size)


@register_model("classical")
@dataclass
class ClassicalSegmenter:
    """The Otsu + watershed baseline behind the ``models`` protocol (nothing to train)."""

    config: ClassicalConfig = field(default_factory=ClassicalConfig)

    trainable = False

    @classmethod
    def train(cls, data: Any, out_dir: Any, train: Mapping[str, Any], hooks: Any = None, **_: Any):
        raise ConfigError("the classical baseline has nothing to train")

    @classmethod
    def load(
        cls, path: Any = None, infer: Mapping[str, Any] | None = None, **_: Any
    ) -> ClassicalSegmenter:
        """No weights: the config is the model (``infer`` = :class:`ClassicalConfig` keys)."""
        return cls(ClassicalConfig.from_mapping(infer or {}))

    def as_predictor(self) -> Predictor:
        cfg = self.config
        return lambda image: (otsu_watershed(image, cfg), None, None)
