"""Random-shape occluders: filled ellipses and rounded rectangles drawn onto the image only.

The neuron-detector seed trains with distractors that look like nothing in the labels
(debris, bubbles, out-of-focus blobs): a network that learns to ignore them makes fewer false
positives. :class:`RandShapesd` is a MONAI randomizable dictionary transform, so a
``Compose`` that holds it seeds it with ``set_random_state`` like every other ``Rand*d`` and
a run stays reproducible. It writes the keys it is given (the image) and nothing else: label
maps, weight maps and targets keep every value, under the shapes too.

Each shape replaces the pixels it covers with one random intensity (the same in every
channel: an occluder sits in front of all planes or frames of a patch); with ``soft_edge``
the blend ramps from 0 at the shape's border to 1 at ``soft_edge`` pixels inside it, so
pixels outside a shape never change.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch
from monai.transforms import MapTransform, RandomizableTransform
from scipy import ndimage
from skimage.draw import ellipse, rectangle

from microseg.errors import ConfigError

KINDS = ("ellipse", "rounded_rect")


@dataclass
class ShapesConfig:
    """Params of the shape augmentation (``prob: 0`` = off: the pipeline does not hold it)."""

    #: chance that a patch gets shapes at all
    prob: float = 0.0
    #: 1 .. max_shapes shapes per patch that gets any
    max_shapes: int = 3
    #: each semi-axis (half side) as a fraction of the patch side
    size_range: tuple[float, float] = (0.05, 0.25)
    #: fill value, in the units of the (normalised) image
    intensity_range: tuple[float, float] = (0.0, 1.0)
    kinds: tuple[str, ...] = KINDS
    #: pixels over which a shape fades in from its border (0: hard edge)
    soft_edge: float = 0.0

    def __post_init__(self) -> None:
        self.size_range = _pair(self.size_range, "size_range")
        self.intensity_range = _pair(self.intensity_range, "intensity_range")
        self.kinds = tuple(str(k) for k in self.kinds)
        lo, hi = self.size_range
        checks = {
            "prob": 0.0 <= self.prob <= 1.0,
            "max_shapes": isinstance(self.max_shapes, int) and self.max_shapes >= 1,
            "size_range": 0.0 < lo <= hi <= 1.0,
            "intensity_range": self.intensity_range[0] <= self.intensity_range[1],
            "kinds": bool(self.kinds) and set(self.kinds) <= set(KINDS),
            "soft_edge": self.soft_edge >= 0.0,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ConfigError(
                "invalid shapes config: "
                + ", ".join(f"{k}={getattr(self, k)!r}" for k in bad)
                + f" (prob in [0, 1], size_range in (0, 1], kinds from {KINDS})"
            )

    @property
    def enabled(self) -> bool:
        return self.prob > 0

    @classmethod
    def from_mapping(cls, values: ShapesConfig | Mapping[str, Any] | None) -> ShapesConfig:
        """From a params mapping (``None``: off); unknown keys are an error."""
        if isinstance(values, ShapesConfig):
            return values
        values = dict(values or {})
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise ConfigError(f"unknown shapes keys {unknown}; known: {sorted(names)}")
        return cls(**values)

    def transform(self, keys: str | Sequence[str] = ("image",)) -> RandShapesd | None:
        """The transform on ``keys``, or ``None`` when off (nothing is added to a pipeline)."""
        if not self.enabled:
            return None
        return RandShapesd(
            keys=keys,
            prob=self.prob,
            max_shapes=self.max_shapes,
            size_range=self.size_range,
            intensity_range=self.intensity_range,
            kinds=self.kinds,
            soft_edge=self.soft_edge,
        )


def _pair(value: Any, name: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError) as exc:
        msg = f"invalid shapes config: {name} must be [low, high], found {value!r}"
        raise ConfigError(msg) from exc
    return lo, hi


def shape_mask(
    kind: str,
    center: tuple[float, float],
    radii: tuple[float, float],
    shape: tuple[int, int],
    rotation: float = 0.0,
    corner: float = 0.0,
) -> np.ndarray:
    """Boolean mask of one filled shape (clipped to ``shape``): an ellipse with semi-axes
    ``radii`` turned by ``rotation``, or an axis-aligned rectangle of half sides ``radii``
    whose corners are rounded with radius ``corner`` (a fraction of the shorter half side)."""
    mask = np.zeros(shape, bool)
    cy, cx = center
    ry, rx = max(radii[0], 0.5), max(radii[1], 0.5)
    if kind == "ellipse":
        mask[ellipse(cy, cx, ry, rx, shape=shape, rotation=rotation)] = True
        return mask
    if kind != "rounded_rect":
        raise ConfigError(f"unknown shape kind {kind!r}; known: {KINDS}")
    r = float(np.clip(corner, 0.0, 1.0)) * min(ry, rx)
    top, left, bottom, right = cy - ry, cx - rx, cy + ry, cx + rx
    # the cross of two rectangles, then a disk in each corner
    for (y0, x0), (y1, x1) in (
        ((top + r, left), (bottom - r, right)),
        ((top, left + r), (bottom, right - r)),
    ):
        y0c, x0c = max(0, round(y0)), max(0, round(x0))
        y1c, x1c = min(shape[0] - 1, round(y1)), min(shape[1] - 1, round(x1))
        if y0c <= y1c and x0c <= x1c:
            mask[rectangle((y0c, x0c), end=(y1c, x1c), shape=shape)] = True
    if r > 0:
        for y, x in (
            (top + r, left + r),
            (top + r, right - r),
            (bottom - r, left + r),
            (bottom - r, right - r),
        ):
            mask[ellipse(y, x, r, r, shape=shape)] = True
    return mask


def shape_alpha(mask: np.ndarray, soft_edge: float) -> np.ndarray:
    """Blend weight of a shape: 1 inside, ramping from 0 at its border over ``soft_edge``
    pixels inward; 0 outside (an occluder never touches pixels it does not cover)."""
    if soft_edge <= 0:
        return mask.astype(np.float32)
    inside = ndimage.distance_transform_edt(mask)
    return np.clip(inside / float(soft_edge), 0.0, 1.0).astype(np.float32)


class RandShapesd(RandomizableTransform, MapTransform):
    """Draw 1 .. ``max_shapes`` random filled shapes into the ``keys`` arrays ``(C, H, W)``
    with probability ``prob``; every other key of the dictionary is returned untouched.

    Sizes are semi-axes as fractions of the patch's shorter side drawn from ``size_range``;
    centres anywhere in the patch (a shape may be cut by the border); intensities from
    ``intensity_range``; ``kinds`` from ``("ellipse", "rounded_rect")``. :attr:`last_alpha`
    holds the blend weights ``(n_shapes, H, W)`` of the latest call (``None`` when it drew
    nothing), for tests and previews.
    """

    backend = [torch.Tensor, np.ndarray]  # noqa: RUF012 - MONAI's convention

    def __init__(
        self,
        keys: str | Sequence[Hashable] = ("image",),
        prob: float = 0.1,
        max_shapes: int = 3,
        size_range: tuple[float, float] = (0.05, 0.25),
        intensity_range: tuple[float, float] = (0.0, 1.0),
        kinds: Sequence[str] = KINDS,
        soft_edge: float = 0.0,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        cfg = ShapesConfig(prob, max_shapes, size_range, intensity_range, tuple(kinds), soft_edge)
        self.cfg = cfg
        self.last_alpha: np.ndarray | None = None

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)

    def _draw(self, size: tuple[int, int]) -> list[tuple[np.ndarray, float]]:
        """The shapes of one call: ``(alpha, intensity)`` each, from this transform's ``R``."""
        cfg, rand = self.cfg, self.R
        h, w = size
        side = min(h, w)
        out = []
        for _ in range(int(rand.randint(1, cfg.max_shapes + 1))):
            kind = cfg.kinds[int(rand.randint(len(cfg.kinds)))]
            radii = (
                float(rand.uniform(*cfg.size_range)) * side,
                float(rand.uniform(*cfg.size_range)) * side,
            )
            center = (float(rand.uniform(0, h)), float(rand.uniform(0, w)))
            rotation = float(rand.uniform(-np.pi / 2, np.pi / 2))
            corner = float(rand.uniform(0.2, 1.0))
            value = float(rand.uniform(*cfg.intensity_range))
            mask = shape_mask(kind, center, radii, (h, w), rotation=rotation, corner=corner)
            out.append((shape_alpha(mask, cfg.soft_edge), value))
        return out

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        self.last_alpha = None
        if not self._do_transform:
            return d
        keys = list(self.key_iterator(d))
        if not keys:
            return d
        drawn = self._draw(tuple(int(s) for s in d[keys[0]].shape[-2:]))
        self.last_alpha = np.stack([a for a, _ in drawn])
        for key in keys:
            d[key] = _blend(d[key], drawn)
        return d


def _blend(image: Any, drawn: list[tuple[np.ndarray, float]]) -> Any:
    """``image`` with each shape blended in, in order (later shapes in front): a copy of the
    same type, dtype and device whose pixels outside every shape are the input's, bit for
    bit."""
    out = image.clone() if isinstance(image, torch.Tensor) else np.array(image, copy=True)
    for alpha, value in drawn:
        if isinstance(out, torch.Tensor):
            a = torch.as_tensor(alpha, dtype=out.dtype, device=out.device).expand_as(out)
            out = torch.where(a > 0, out * (1 - a) + a * value, out)
        else:
            a = np.broadcast_to(alpha.astype(out.dtype, copy=False), out.shape)
            out = np.where(a > 0, out * (1 - a) + a * value, out).astype(out.dtype, copy=False)
    return out
