"""Intensity and channel transforms shared by training, inference, evaluation and export.

**Channels.** :func:`to_chw` turns ``YX``/``YXC``/``CYX`` into ``CYX``; :func:`match_channels`
is the model-input rule (grey repeated to 3 channels, colour averaged to 1).

**Percentile normalisation** has one convention: ``y = (x - p_lo) / (p_hi - p_lo)`` in float32,
with ``p_lo``/``p_hi`` intensity percentiles of the image (whole array, or per channel/plane).
:func:`scale_percentiles` computes them, :func:`rescale` applies a given range; the presets the
call sites use are :func:`percentile_normalise`, :func:`normalize`, :func:`normalise_percentiles`,
:func:`normalize_stack` and :func:`to_uint8`. What differs between uses is stated by keyword:

* ``clip``: clip ``y`` to [0, 1] (network inputs of the nuclei models, LoG blobs) or not
  (spine stacks for the per-plane U-Net and the DoG baseline, where bright spines above
  ``p_hi`` must keep their contrast).
* ``flat``: what a range without contrast gives, i.e. ``p_hi - p_lo`` not finite or
  ``<= eps``: ``"zero"`` maps the whole image (channel) to 0; ``"shift"`` uses scale 1, so
  ``y = x - p_lo`` (a truly flat image is 0 as well, outliers keep their offset).
  :func:`percentile_range` gives ranges with ``hi > lo`` always (``hi = lo + 1`` when flat),
  which is the ``"shift"`` rule.
* ``arithmetic``: how the scale is applied. The variants agree to the last float32 bit or
  two; they exist so that outputs already recorded (DVC caches, trained models) are
  reproduced bit for bit: ``"reciprocal"`` subtracts ``float32(p_lo)`` and multiplies by
  ``float32(gain / scale)`` (nuclei inputs, DoG, uint8 export), ``"divide32"`` divides by
  ``float32(scale)`` (DeepD3 patches), ``"divide64"`` computes in float64 and rounds once
  (LoG blobs).

:class:`PercentileNormalise` is the same as a MONAI-style callable (array in, array out, no
dictionary keys) so that a model family's training and inference share one object.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
from scipy import ndimage as ndi

from microseg.errors import ConfigError, DataFormatError, ShapeMismatchError

if TYPE_CHECKING:
    from microseg.io.tiff import TiffStack

Flat = Literal["zero", "shift"]
Arithmetic = Literal["reciprocal", "divide32", "divide64"]
FLAT: tuple[str, ...] = ("zero", "shift")
ARITHMETIC: tuple[str, ...] = ("reciprocal", "divide32", "divide64")


# -- channels ---------------------------------------------------------------------------------
def to_chw(image: np.ndarray) -> np.ndarray:
    """``YX`` -> ``1YX``; ``YXC`` (C <= 4, as ingest writes colour) -> ``CYX``; ``CYX`` kept."""
    image = np.asarray(image)
    if image.ndim == 2:
        return image[None]
    if image.ndim == 3 and image.shape[-1] in (3, 4) and image.shape[0] > 4:
        return np.moveaxis(image[..., :3], -1, 0)
    if image.ndim == 3 and image.shape[0] <= 4:
        return image[:3]
    raise ShapeMismatchError(f"expected a 2D image (YX, YXC or CYX); found shape {image.shape}")


def match_channels(image_chw: np.ndarray, channels: int) -> np.ndarray:
    """The model-input convention: greyscale is repeated to 3 channels, colour averaged to 1.

    Models default to ``in_channels=3`` so that colour (H&E tissue) keeps its information and
    greyscale images (fluorescence, brightfield) are the same grey in R, G and B.
    """
    c = image_chw.shape[0]
    if c == channels:
        return image_chw
    if channels == 3 and c == 1:
        return np.repeat(image_chw, 3, axis=0)
    if channels == 1:
        return image_chw.mean(axis=0, keepdims=True, dtype=np.float32)
    raise ShapeMismatchError(f"cannot turn a {c}-channel image into {channels} channels")


# -- scaling ----------------------------------------------------------------------------------
def rescale(
    x: np.ndarray,
    lo: float | np.ndarray,
    hi: float | np.ndarray,
    *,
    clip: bool,
    flat: Flat,
    eps: float = 0.0,
    gain: float = 1.0,
    arithmetic: Arithmetic = "reciprocal",
) -> np.ndarray:
    """``gain * (x - lo) / (hi - lo)`` as float32, under the module's convention.

    ``lo``/``hi`` are numbers or arrays that broadcast against ``x`` (per channel or plane);
    ``hi - lo`` is taken in their dtype. ``clip`` clips to ``[0, gain]``. ``gain`` is folded
    into the reciprocal; the division variants multiply by it afterwards.
    """
    _check(flat, arithmetic)
    lo, hi = np.asarray(lo), np.asarray(hi)
    scale = hi - lo
    ok = np.isfinite(scale) & (scale > eps)
    scale = np.where(ok, scale, 1.0)
    if arithmetic == "divide64":
        y = (np.asarray(x, dtype=np.float64) - lo) / scale
    else:
        shifted = np.asarray(x, dtype=np.float32) - lo.astype(np.float32)
        if arithmetic == "divide32":
            y = shifted / scale.astype(np.float32)
        else:
            y = shifted * (gain / scale.astype(np.float64)).astype(np.float32)
    if gain != 1.0 and arithmetic != "reciprocal":
        y = y * gain
    if flat == "zero" and not ok.all():
        y = np.where(ok, y, 0.0)
    if clip:
        y = np.clip(y, 0.0, gain)
    return y.astype(np.float32, copy=False)


def scale_percentiles(
    x: np.ndarray,
    percentiles: Sequence[float],
    *,
    clip: bool,
    flat: Flat,
    channel_wise: bool = False,
    eps: float = 0.0,
    arithmetic: Arithmetic = "reciprocal",
) -> np.ndarray:
    """:func:`rescale` from ``x``'s own ``(low, high)`` percentiles, computed on float32 values
    over the whole array or, with ``channel_wise``, per index of the first axis (channel of a
    ``CYX`` image, plane of a ``ZYX`` stack)."""
    x = np.asarray(x, dtype=np.float32)
    axis = tuple(range(1, x.ndim)) if channel_wise else None
    lo, hi = np.percentile(x, percentiles, axis=axis, keepdims=True)
    return rescale(x, lo, hi, clip=clip, flat=flat, eps=eps, arithmetic=arithmetic)


class PercentileNormalise:
    """:func:`scale_percentiles` with its settings fixed: ``PercentileNormalise(...)(image)``.

    A MONAI-style array transform (no dictionary keys) on numpy arrays, so that a family's
    training data pipeline and its predictor normalise with one object and cannot drift apart.
    """

    def __init__(
        self,
        percentiles: Sequence[float] = (1.0, 99.8),
        *,
        clip: bool,
        flat: Flat,
        channel_wise: bool = False,
        eps: float = 0.0,
        arithmetic: Arithmetic = "reciprocal",
    ) -> None:
        if len(percentiles) != 2 or not 0 <= percentiles[0] < percentiles[1] <= 100:
            raise ConfigError(
                f"percentiles must be (low, high) with 0 <= low < high <= 100; found {percentiles}"
            )
        _check(flat, arithmetic)
        self.percentiles = tuple(float(p) for p in percentiles)
        self.clip, self.flat, self.channel_wise = clip, flat, channel_wise
        self.eps, self.arithmetic = eps, arithmetic

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return scale_percentiles(
            image,
            self.percentiles,
            clip=self.clip,
            flat=self.flat,
            channel_wise=self.channel_wise,
            eps=self.eps,
            arithmetic=self.arithmetic,
        )

    def __repr__(self) -> str:
        return (
            f"PercentileNormalise(percentiles={self.percentiles}, clip={self.clip}, "
            f"flat={self.flat!r}, channel_wise={self.channel_wise}, eps={self.eps}, "
            f"arithmetic={self.arithmetic!r})"
        )


def percentile_normalise(
    image: np.ndarray, lower: float = 1.0, upper: float = 99.0, eps: float = 1e-6
) -> np.ndarray:
    """Network input of the nuclei models: per channel ``p_lower..p_upper`` -> [0, 1], clipped,
    float32 ``CYX``; a channel without contrast becomes 0.

    ``image`` is ``YX``, ``YXC`` or ``CYX`` (see :func:`to_chw`).
    """
    return scale_percentiles(
        to_chw(image), (lower, upper), clip=True, flat="zero", channel_wise=True, eps=eps
    )


def normalize(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Spine stacks for the per-plane U-Net: ``(x - lo) / (hi - lo)`` as float32, not clipped
    (scale 1 when ``hi <= lo``); ``lo``/``hi`` from :func:`intensity_range` of the whole stack.
    """
    return rescale(x, lo, hi, clip=False, flat="shift", arithmetic="divide32")


def normalise_percentiles(
    stack: np.ndarray, percentiles: tuple[float, float] = (1.0, 99.8)
) -> np.ndarray:
    """DoG baseline input: ``(x - p_lo) / (p_hi - p_lo)`` in float32 (not clipped), from the
    stack's percentiles."""
    return scale_percentiles(stack, percentiles, clip=False, flat="shift")


def normalize_stack(
    stack: np.ndarray,
    mode: Literal["stack", "plane"] | None = "stack",
    percentiles: tuple[float, float] = (1.0, 99.8),
    background_sigma: float | None = None,
) -> np.ndarray:
    """LoG blob input: float32 copy of ``stack``, optionally background-flattened and
    percentile-scaled to [0, 1].

    ``background_sigma`` (pixels) subtracts a wide per-plane Gaussian blur first, removing
    uneven illumination. ``mode="stack"`` maps the stack's p_low..p_high to 0..1 (keeps the
    fall-off of brightness with depth); ``"plane"`` does it per plane (undoes it). Clipped to
    [0, 1] so that thresholds on the LoG response mean the same across stacks.
    """
    img = np.asarray(stack, dtype=np.float32)
    if background_sigma:
        img = img - ndi.gaussian_filter(img, sigma=(0, background_sigma, background_sigma))
    if mode is None:
        return img
    if mode not in ("stack", "plane"):
        raise ConfigError(f"normalize must be 'stack', 'plane' or None; found {mode!r}")
    return scale_percentiles(
        img, percentiles, clip=True, flat="shift", channel_wise=mode == "plane",
        arithmetic="divide64",
    )  # fmt: skip


def to_uint8(plane: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map ``lo..hi`` linearly onto ``0..255`` (rounded, clipped): the YOLO and overlay images."""
    scaled = rescale(plane, lo, hi, clip=False, flat="shift", gain=255.0)
    return np.clip(scaled + 0.5, 0, 255).astype(np.uint8)


def _check(flat: str, arithmetic: str) -> None:
    if flat not in FLAT or arithmetic not in ARITHMETIC:
        raise ConfigError(
            f"flat must be one of {FLAT} and arithmetic one of {ARITHMETIC}; "
            f"found {flat!r} and {arithmetic!r}"
        )


# -- intensity ranges -------------------------------------------------------------------------
def percentile_range(
    values: np.ndarray, percentiles: Sequence[float] = (1.0, 99.8)
) -> tuple[float, float]:
    """``(low, high)`` intensity at the given percentiles; ``high > low`` always."""
    lo, hi = np.percentile(np.asarray(values, dtype=np.float32), list(percentiles))
    lo, hi = float(lo), float(hi)
    if not hi > lo:
        hi = lo + 1.0
    return lo, hi


def check_stack_finite(stack: TiffStack | np.ndarray) -> None:
    """Refuse a float stack holding NaN or inf before it is normalised: one NaN voxel made
    every percentile NaN and every prediction NaN, reported as "0 spines" (issue 18). Integer
    stacks cannot hold them and cost nothing; float stacks are read plane by plane."""
    first = np.asarray(stack[0])
    if first.dtype.kind != "f":
        return
    path = getattr(stack, "path", None)
    for z in range(int(stack.shape[0])):
        plane = first if z == 0 else np.asarray(stack[z])
        bad = int(np.count_nonzero(~np.isfinite(plane)))
        if bad:
            raise DataFormatError(
                f"plane {z} holds {bad} NaN/inf voxels; predictions would be NaN everywhere "
                "(replace them, e.g. with 0, before predicting)",
                path,
            )


def sample_percentiles(
    stack: TiffStack | np.ndarray,
    percentiles: Sequence[float] = (1.0, 99.8),
    max_planes: int = 16,
    max_pixels: int = 1_000_000,
) -> tuple[float, float]:
    """Intensity percentiles from at most ``max_planes`` evenly spaced planes, strided in XY.

    Reads those planes one at a time and keeps at most ``max_pixels`` values in all.
    """
    check_stack_finite(stack)
    depth, height, width = (int(s) for s in stack.shape[:3])
    zs = np.unique(np.linspace(0, depth - 1, min(depth, max_planes)).round().astype(int))
    per_plane = max(1, max_pixels // len(zs))
    stride = max(1, int(np.ceil(np.sqrt(height * width / per_plane))))
    samples = [np.asarray(stack[int(z)])[::stride, ::stride].ravel() for z in zs]
    return percentile_range(np.concatenate(samples), percentiles)


def intensity_range(
    stack: np.ndarray | object,
    percentiles: tuple[float, float] = (1.0, 99.8),
    max_planes: int | None = None,
) -> tuple[float, float]:
    """Low and high intensity percentiles of a ZYX stack, read plane by plane.

    uint8/uint16 stacks (all microscopy stacks here) are histogrammed plane by plane: the
    result equals ``np.percentile(stack, percentiles)`` exactly and memory stays constant,
    however deep a lazy stack is. Other dtypes are loaded, from at most ``max_planes``
    evenly spaced planes when given.
    """
    depth = len(stack)  # type: ignore[arg-type]
    first = np.asarray(stack[0])  # type: ignore[index]
    if first.dtype.kind == "u" and first.dtype.itemsize <= 2:
        hist = np.zeros(2 ** (8 * first.dtype.itemsize), dtype=np.int64)
        for z in range(depth):
            plane = first if z == 0 else np.asarray(stack[z])  # type: ignore[index]
            hist += np.bincount(plane.ravel(), minlength=hist.size)
        lo, hi = _histogram_percentiles(hist, percentiles)
        return lo, hi
    if max_planes is None or depth <= max_planes:
        planes = range(depth)
    else:
        planes = np.unique(np.linspace(0, depth - 1, max_planes).round().astype(int))
    if isinstance(stack, np.ndarray) and len(planes) == depth:
        values = stack
    else:
        values = np.stack([np.asarray(stack[int(z)]) for z in planes])  # type: ignore[index]
    lo, hi = np.percentile(values, percentiles)
    return float(lo), float(hi)


def _histogram_percentiles(hist: np.ndarray, percentiles: Sequence[float]) -> list[float]:
    """``np.percentile`` (linear interpolation) of the values a count histogram describes."""
    cum = np.cumsum(hist)
    n = int(cum[-1])
    out = []
    for q in percentiles:
        pos = q / 100.0 * (n - 1)
        i = int(np.floor(pos))
        frac = pos - i
        lo = int(np.searchsorted(cum, i, side="right"))  # value of the i-th smallest
        hi = int(np.searchsorted(cum, min(i + 1, n - 1), side="right"))
        out.append(float(lo + frac * (hi - lo)))
    return out
