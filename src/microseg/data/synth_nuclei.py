"""Synthetic DSB-2018-like nuclei images fitted to a real training split.

For a synthetic-augmentation study (real only / synthetic only / real + synthetic) the
synthetic images must look like the real ones in the numbers a segmenter is sensitive to, so
the generator is *fitted*, not hand-tuned: :func:`fit_nuclei_stats` measures every training
image of an ingested nuclei dataset (``data/prepared/<ds>``) and keeps, per modality
(fluorescence, tissue, brightfield), one :class:`ImageProfile` per image (size, nucleus count,
area deciles and log-normal fit, axis ratio, foreground/background colour, texture,
illumination gradient, blur and noise) plus a :class:`ModalityStats` summary.
:func:`render` draws a real image's profile and renders a new image from it, so the joint
distribution of size, count and nucleus size is the real one; :func:`generate` writes a
prepared-layout folder (``images/<id>.tif``, ``labels/<id>.tif``, ``manifest.parquet``) that
the nuclei stages read as they read an ingested dataset, plus ``synth_nuclei.json`` with the
seed and the stats.

Nuclei are smooth star-convex blobs (ellipses whose radius is perturbed by a few low harmonics)
with chromatin texture; labels never overlap (a blob only takes free pixels, some touch) and
each is one connected component. Intensities are rendered in contrast units (background 0,
nucleus 1), blurred, mapped per channel onto the profile's background and foreground colour
(so polarity and H&E colour follow from the data), then get Poisson-Gaussian noise and are
rounded to the ingested convention: uint8 ``YX`` greyscale, uint8 ``YXC`` RGB for tissue.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage

from microseg.errors import ConfigError, DataFormatError

log = logging.getLogger(__name__)

MODALITIES = ("fluorescence", "tissue", "brightfield")
STATS_NAME = "synth_nuclei.json"
#: pixels around nuclei left out of the background statistics (blurred edges, halos)
BG_MARGIN_PX = 2
MIN_OBJECT_PX = 5
#: Immerkaer (1996) fast noise estimate: sigma = sqrt(pi/2) / 6 * mean |I * NOISE_KERNEL|
NOISE_KERNEL = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], np.float64)


@dataclass
class ImageProfile:
    """What one real training image looks like, in the numbers the generator reproduces.

    Intensities are per channel in the image's own units (uint8 0..255); texture, gradient
    and spread are in contrast units (fraction of |foreground - background|).
    """

    height: int
    width: int
    n_objects: int
    #: robust log-normal fit (median, IQR / 1.349) of the areas (px) of nuclei off the border
    log_area_median: float
    log_area_std: float
    #: deciles (0, 10, .., 100 %) of the same log areas: what the generator draws from
    log_area_quantiles: list[float]
    axis_ratio: float  # median major / minor axis
    border_fraction: float  # share of nuclei cut by the image border
    fg_mean: list[float]
    bg_mean: list[float]
    fg_std: list[float]
    bg_std: list[float]
    object_spread: float  # std of nucleus mean contrast between nuclei
    fg_texture: float  # within-nucleus std (noise removed)
    bg_texture: float  # background std after the illumination plane (noise removed)
    bg_texture_scale: float  # its correlation length (Gaussian sigma, px)
    gradient: float  # illumination change across the image
    blur_sigma: float  # Gaussian sigma (px) that explains the edge steepness
    noise_sigma: float  # pixel noise (intensity units)


@dataclass
class ModalityStats:
    """One modality's summary (for people and tests) and its per-image profiles (the
    empirical distribution the generator draws from)."""

    n_images: int
    channels: int
    shapes: list[list[int]]  # [height, width, n_images]
    objects_per_image_mean: float
    objects_per_image_quantiles: list[float]  # p5, p25, p50, p75, p95
    area_median: float
    area_quantiles: list[float]  # p5, p25, p50, p75, p95 of all nuclei pooled
    area_lognormal: list[float]  # mu, sigma of the pooled log areas
    axis_ratio_median: float
    eccentricity_median: float
    fg_mean: list[float]  # mean over images of the per-image mean, per channel
    bg_mean: list[float]
    fg_std: list[float]
    bg_std: list[float]
    blur_sigma_median: float
    noise_sigma_median: float
    profiles: list[ImageProfile] = field(default_factory=list)


@dataclass
class NucleiStats:
    """Fitted statistics of a nuclei dataset's split, per modality; JSON round-trips."""

    source: str
    split: str
    modalities: dict[str, ModalityStats]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> NucleiStats:
        mods = {}
        for name, m in d["modalities"].items():
            profiles = [ImageProfile(**p) for p in m.get("profiles", [])]
            mods[name] = ModalityStats(**{**m, "profiles": profiles})
        return cls(source=str(d["source"]), split=str(d["split"]), modalities=mods)

    def save(self, path: str | Path) -> Path:
        from microseg.utils.atomic import write_text

        write_text(path, json.dumps(self.to_dict(), indent=1, sort_keys=True) + "\n")
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> NucleiStats:
        path = Path(path)
        try:
            d = json.loads(path.read_text())
            return cls.from_dict(d.get("stats", d))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataFormatError(f"not a synth-nuclei stats file ({exc})", path) from exc


# ------------------------------------------------------------------------------ measuring
def _channels(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image, np.float64)
    return img[..., None] if img.ndim == 2 else img


def _object_moments(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ids, areas and axis ratios (major / minor, from second moments) of every label."""
    flat = labels.ravel().astype(np.int64)
    n = int(flat.max()) + 1
    yy, xx = np.indices(labels.shape, dtype=np.float64)
    y, x = yy.ravel(), xx.ravel()
    area = np.bincount(flat, minlength=n).astype(np.float64)
    ids = np.flatnonzero(area[1:] > 0) + 1
    sums = {k: np.bincount(flat, v, n)[ids] for k, v in (("y", y), ("x", x))}
    sq = {k: np.bincount(flat, v, n)[ids] for k, v in (("yy", y * y), ("xx", x * x), ("xy", x * y))}
    a = area[ids]
    my, mx = sums["y"] / a, sums["x"] / a
    cyy = sq["yy"] / a - my**2 + 1 / 12
    cxx = sq["xx"] / a - mx**2 + 1 / 12
    cxy = sq["xy"] / a - mx * my
    half_tr, det = (cyy + cxx) / 2, np.sqrt(((cyy - cxx) / 2) ** 2 + cxy**2)
    major, minor = half_tr + det, np.maximum(half_tr - det, 1e-6)
    return ids, a, np.sqrt(major / minor)


def _noise_sigma(grey: np.ndarray, where: np.ndarray) -> float:
    """Immerkaer's estimate over ``where`` (background interior: edges are not noise)."""
    resp = np.abs(ndimage.convolve(grey, NOISE_KERNEL, mode="reflect"))
    inner = ndimage.binary_erosion(where, iterations=1)
    vals = resp[inner] if inner.sum() > 100 else resp
    return float(math.sqrt(math.pi / 2) / 6 * vals.mean())


def _blur_sigma(u: np.ndarray, labels: np.ndarray) -> float:
    """Sigma of the Gaussian that makes a unit step as steep as the nuclei edges are: the
    slope of a blurred step peaks at 1 / (sigma sqrt(2 pi)); measured after a sigma-1
    smoothing (removed in quadrature) so that noise does not pass for sharpness."""
    fg = labels > 0
    edge = fg & ~ndimage.binary_erosion(fg)
    if edge.sum() < 10:
        return 1.0
    smooth = ndimage.gaussian_filter(u, 1.0)
    grad = np.hypot(ndimage.sobel(smooth, 0), ndimage.sobel(smooth, 1)) / 8
    slope = float(np.median(grad[edge]))
    measured = 1 / (math.sqrt(2 * math.pi) * max(slope, 1e-3))
    return float(np.clip(math.sqrt(max(measured**2 - 1.0, 0.0)), 0.3, 4.0))


def _texture_scale(resid: np.ndarray, where: np.ndarray, texture: float, s: float = 4.0) -> float:
    """Correlation length of the background texture: Gaussian-correlated noise of sigma c
    keeps c^2 / (c^2 + s^2) of its variance under a further sigma-s smoothing (white noise
    keeps almost none), so c follows from that ratio (masked smoothing: nuclei left out)."""
    if texture <= 1e-6 or where.sum() < 100:
        return 3.0
    w = ndimage.gaussian_filter(where.astype(np.float64), s)
    sm = ndimage.gaussian_filter(np.where(where, resid, 0.0), s) / np.maximum(w, 1e-6)
    inner = where & (w > 0.5)
    if inner.sum() < 100:
        return 3.0
    rho = min(float(sm[inner].var()) / texture**2, 0.95)
    return float(np.clip(s * math.sqrt(rho / (1 - rho)), 1.0, 30.0))


def measure_image(image: np.ndarray, labels: np.ndarray) -> ImageProfile:
    """Profile of one image and its instance labels (0 = background)."""
    img = _channels(image)
    fg = labels > 0
    bg = ~ndimage.binary_dilation(fg, iterations=BG_MARGIN_PX)
    if bg.sum() < 16:
        bg = ~fg
    ids, areas, ratios = _object_moments(labels)
    # the area fit leaves out nuclei cut by the image border: rendering cuts its own
    edge_ids = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    on_edge = np.isin(ids, edge_ids)
    keep = (areas >= MIN_OBJECT_PX) & ~on_edge
    if keep.sum() < 3:
        keep = areas >= MIN_OBJECT_PX
    log_a = np.log(areas[keep] if keep.any() else areas)
    fg_mean = img[fg].mean(0) if fg.any() else img.reshape(-1, img.shape[-1]).mean(0)
    bg_mean = img[bg].mean(0)
    grey = img.mean(-1)
    contrast = float(fg_mean.mean() - bg_mean.mean())
    c = contrast if abs(contrast) > 1.0 else math.copysign(1.0, contrast or 1.0)
    u = (grey - bg_mean.mean()) / c
    noise = _noise_sigma(grey, bg)
    # illumination: least-squares plane through the background
    h, w = grey.shape
    yy, xx = np.indices((h, w))
    design = np.stack([np.ones(bg.sum()), yy[bg] / h - 0.5, xx[bg] / w - 0.5], 1)
    coef, *_ = np.linalg.lstsq(design, u[bg], rcond=None)
    resid = u[bg] - design @ coef
    noise_u = noise / abs(c)
    bg_tex = math.sqrt(max(float(resid.var()) - noise_u**2, 0.0))
    plane = coef[0] + coef[1] * (yy / h - 0.5) + coef[2] * (xx / w - 0.5)
    bg_scale = _texture_scale(u - plane, bg, bg_tex)
    # nucleus texture: deviation from each nucleus's own mean; spread: between nuclei
    lab = labels.astype(np.int64)
    n = int(lab.max()) + 1
    sums = np.bincount(lab[fg], u[fg], n)
    cnt = np.maximum(np.bincount(lab[fg], minlength=n), 1)
    obj_mean = sums / cnt
    within = u[fg] - obj_mean[lab[fg]]
    fg_tex = math.sqrt(max(float(within.var()) - noise_u**2, 0.0)) if fg.any() else 0.0
    spread = float(obj_mean[ids].std()) if len(ids) > 1 else 0.0
    return ImageProfile(
        height=int(h),
        width=int(w),
        n_objects=len(ids),
        log_area_median=float(np.median(log_a)) if log_a.size else 0.0,
        log_area_std=float(np.subtract(*np.percentile(log_a, [75, 25])) / 1.349)
        if log_a.size > 3
        else 0.3,
        log_area_quantiles=[float(v) for v in np.percentile(log_a, np.arange(0, 101, 10))]
        if log_a.size
        else [0.0] * 11,
        axis_ratio=float(np.median(ratios)) if len(ratios) else 1.0,
        border_fraction=float(on_edge.mean()) if len(ids) else 0.0,
        fg_mean=[float(v) for v in fg_mean],
        bg_mean=[float(v) for v in bg_mean],
        fg_std=[float(v) for v in (img[fg].std(0) if fg.any() else np.zeros(img.shape[-1]))],
        bg_std=[float(v) for v in img[bg].std(0)],
        object_spread=spread,
        fg_texture=fg_tex,
        bg_texture=bg_tex,
        bg_texture_scale=bg_scale,
        gradient=float(np.hypot(coef[1], coef[2])),
        blur_sigma=_blur_sigma(u, labels),
        noise_sigma=noise,
    )


def _q(values: np.ndarray) -> list[float]:
    return [float(v) for v in np.percentile(values, [5, 25, 50, 75, 95])]


def summarise(profiles: list[ImageProfile], areas: np.ndarray, ratios: np.ndarray) -> ModalityStats:
    """A modality's summary from its image profiles and its pooled nucleus areas/ratios."""
    counts = np.array([p.n_objects for p in profiles], np.float64)
    shapes: dict[tuple[int, int], int] = {}
    for p in profiles:
        shapes[(p.height, p.width)] = shapes.get((p.height, p.width), 0) + 1
    log_a = np.log(areas) if areas.size else np.zeros(1)
    ratios = ratios if ratios.size else np.ones(1)

    def chan(attr: str) -> list[float]:
        return [float(v) for v in np.mean([getattr(p, attr) for p in profiles], 0)]

    return ModalityStats(
        n_images=len(profiles),
        channels=len(profiles[0].fg_mean),
        shapes=[[h, w, k] for (h, w), k in sorted(shapes.items())],
        objects_per_image_mean=float(counts.mean()),
        objects_per_image_quantiles=_q(counts),
        area_median=float(np.median(areas)) if areas.size else 0.0,
        area_quantiles=_q(areas) if areas.size else [0.0] * 5,
        area_lognormal=[float(log_a.mean()), float(log_a.std())],
        axis_ratio_median=float(np.median(ratios)),
        eccentricity_median=float(np.median(np.sqrt(1 - 1 / ratios**2))),
        fg_mean=chan("fg_mean"),
        bg_mean=chan("bg_mean"),
        fg_std=chan("fg_std"),
        bg_std=chan("bg_std"),
        blur_sigma_median=float(np.median([p.blur_sigma for p in profiles])),
        noise_sigma_median=float(np.median([p.noise_sigma for p in profiles])),
        profiles=profiles,
    )


def stats_from_samples(
    samples: Iterable[tuple[np.ndarray, np.ndarray, str]], source: str = "", split: str = "train"
) -> NucleiStats:
    """Fit from ``(image, labels, modality)`` triples (the work of :func:`fit_nuclei_stats`)."""
    per: dict[str, tuple[list[ImageProfile], list[np.ndarray], list[np.ndarray]]] = {}
    for image, labels, modality in samples:
        profiles, areas, ratios = per.setdefault(modality, ([], [], []))
        profiles.append(measure_image(image, labels))
        _, a, r = _object_moments(labels)
        areas.append(a)
        ratios.append(r[a >= MIN_OBJECT_PX])
    if not per:
        raise ConfigError(f"no {split!r} samples to fit nuclei statistics on ({source})")
    mods = {
        m: summarise(p, np.concatenate(a), np.concatenate(r))
        for m, (p, a, r) in sorted(per.items())
    }
    return NucleiStats(source=source, split=split, modalities=mods)


def fit_nuclei_stats(
    prepared: str | Path, split: str = "train", max_per_modality: int | None = None
) -> NucleiStats:
    """Measure the ``split`` (training by default: never fit on what models are judged on)
    of an ingested nuclei dataset folder (``manifest.parquet`` + TIFFs)."""
    from microseg.data.manifest import read_manifest
    from microseg.io.tiff import read_stack

    prepared = Path(prepared)
    m = read_manifest(prepared)
    rows = m[(m.split == split) & (m.label_kind == "instance") & (m["axes"].isin(["YX", "YXC"]))]
    if max_per_modality is not None:
        rows = rows.sort_values("sample_id").groupby("modality").head(max_per_modality)
    unknown = sorted(set(rows.modality) - set(MODALITIES))
    if unknown:
        raise DataFormatError(f"modalities {unknown} are not nuclei modalities", prepared)

    def samples() -> Iterable[tuple[np.ndarray, np.ndarray, str]]:
        for r in rows.sort_values("sample_id").itertuples():
            image, labels = read_stack(prepared / r.image_path), read_stack(prepared / r.label_path)
            if image.shape[:2] != labels.shape:
                raise DataFormatError(
                    f"labels {labels.shape} do not match image {image.shape}",
                    prepared / r.label_path,
                )
            yield image, labels, str(r.modality)

    return stats_from_samples(samples(), source=str(prepared), split=split)


# ------------------------------------------------------------------------------- rendering
def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Unit-std Gaussian-correlated noise (texture)."""
    n = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return n / max(float(n.std()), 1e-9)


def _blob(rng: np.random.Generator, area: float, ratio: float) -> np.ndarray:
    """A star-convex nucleus mask of about ``area`` px: an ellipse of axis ratio ``ratio``
    whose radius is perturbed by harmonics 2..4 (smooth, never split)."""
    a = math.sqrt(area * ratio / math.pi)  # semi-major
    b = a / ratio
    amps = rng.normal(0, 0.04, 3)
    phases = rng.uniform(0, 2 * math.pi, 3)
    r = math.ceil(a * 1.2) + 1
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1].astype(np.float64)
    theta = rng.uniform(0, math.pi)
    ct, st = math.cos(theta), math.sin(theta)
    u, v = (xx * ct + yy * st) / a, (-xx * st + yy * ct) / b
    phi = np.arctan2(v, u)
    bound = 1 + sum(
        amp * np.cos(k * phi + ph) for k, amp, ph in zip((2, 3, 4), amps, phases, strict=True)
    )
    return np.hypot(u, v) <= bound


def _place(
    rng: np.random.Generator,
    shape: tuple[int, int],
    areas: np.ndarray,
    ratios: np.ndarray,
    border_fraction: float = 0.0,
) -> np.ndarray:
    """Instance labels: blobs placed at random, each taking only free pixels (rejected when
    more than a quarter of it is taken; dropped after six rejections), then cut to its
    largest connected piece."""
    h, w = shape
    labels = np.zeros(shape, np.int32)
    nxt = 1
    for area, ratio in zip(areas, ratios, strict=True):
        mask = _blob(rng, float(area), float(ratio))
        # a border nucleus has its centre near an edge (up to one radius in, half a radius
        # out: annotators skip slivers), so the image shows a fragment; the others lie
        # wholly inside when the frame allows
        r_eq = max(int(math.sqrt(area / math.pi)), 1)
        on_border = rng.uniform() < border_fraction or min(h, w) <= 4 * r_eq
        for _ in range(6):
            if on_border:  # an edge chosen by its length; inward offset -r/2 .. r
                cy, cx = int(rng.integers(0, h)), int(rng.integers(0, w))
                inward = int(rng.integers(-(r_eq // 2), r_eq + 1))
                far = rng.uniform() < 0.5
                if rng.uniform() < h / (h + w):
                    cx = w - inward if far else inward - 1
                else:
                    cy = h - inward if far else inward - 1
            else:
                cy, cx = rng.integers(r_eq, h - r_eq), rng.integers(r_eq, w - r_eq)
            r = mask.shape[0] // 2
            y0, x0 = cy - r, cx - r
            sy = slice(max(y0, 0), min(y0 + mask.shape[0], h))
            sx = slice(max(x0, 0), min(x0 + mask.shape[1], w))
            m = mask[sy.start - y0 : sy.stop - y0, sx.start - x0 : sx.stop - x0]
            if not m.any():
                continue
            win = labels[sy, sx]
            if (win[m] > 0).mean() <= 0.25:
                win[m & (win == 0)] = nxt
                nxt += 1
                break
    # one connected component per label, ids 1..N without gaps
    out = np.zeros(shape, np.uint16)
    k = 0
    for i, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        comp, n = ndimage.label(labels[sl] == i)
        if n == 0:
            continue
        sizes = np.bincount(comp.ravel())[1:]
        if sizes.max() < MIN_OBJECT_PX:
            continue
        k += 1
        out[sl][comp == 1 + int(np.argmax(sizes))] = k
    return out


def render(
    stats: NucleiStats, modality: str, seed: int, profile: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic image and its uint16 instance labels, deterministic in ``seed``.

    A real training image's profile (index ``profile``, else drawn by the seed) is the
    template: the image has its size, about its nucleus count, areas drawn from its area
    deciles, its share of border-cut nuclei, colours, texture, illumination, blur and noise.
    """
    if modality not in stats.modalities or not stats.modalities[modality].profiles:
        raise ConfigError(
            f"no fitted statistics for modality {modality!r}; have {sorted(stats.modalities)}"
        )
    ms = stats.modalities[modality]
    rng = np.random.default_rng(seed)
    drawn = int(rng.integers(len(ms.profiles)))
    p = ms.profiles[drawn if profile is None else profile % len(ms.profiles)]
    shape = (p.height, p.width)
    n = max(1, round(p.n_objects * float(np.exp(rng.normal(0, 0.1)))))
    # inverse-CDF draw from the image's own area deciles (real areas are not log-normal:
    # a normal fit's tails gave 2x too many large nuclei on crowded images), stratified
    # (one draw per 1/n of the CDF) so that a single image's sizes are not a lottery
    cdf = (rng.permutation(n) + rng.uniform(0, 1, n)) / n
    areas = np.exp(np.interp(cdf, np.linspace(0, 1, 11), p.log_area_quantiles))
    areas = np.clip(areas, MIN_OBJECT_PX * 2, 0.25 * p.height * p.width)
    ratios = np.clip(1 + (p.axis_ratio - 1) * np.exp(rng.normal(0, 0.4, n)), 1.0, 4.0)
    labels = _place(rng, shape, areas, ratios, p.border_fraction)

    # contrast units: background 0 (+ plane + stroma texture), nuclei ~1 (+ chromatin)
    yy, xx = np.indices(shape, dtype=np.float64)
    angle = rng.uniform(0, 2 * math.pi)
    plane = p.gradient * (
        (yy / p.height - 0.5) * math.sin(angle) + (xx / p.width - 0.5) * math.cos(angle)
    )
    u = plane + p.bg_texture * _smooth_noise(rng, shape, p.bg_texture_scale)
    k = int(labels.max())
    level = np.concatenate([[0.0], 1 + p.object_spread * rng.standard_normal(k)])
    fg = labels > 0
    u[fg] = level[labels[fg]] + plane[fg] + p.fg_texture * _smooth_noise(rng, shape, 1.2)[fg]
    u = ndimage.gaussian_filter(u, p.blur_sigma)
    # rescale so the measured (as measure_image measures) means are exactly 0 and 1
    bg = ~ndimage.binary_dilation(fg, iterations=BG_MARGIN_PX)
    if bg.sum() < 16:
        bg = ~fg
    m0 = float(u[bg].mean())
    m1 = float(u[fg].mean()) if fg.any() else m0 + 1
    u = (u - m0) / (m1 - m0 if abs(m1 - m0) > 1e-6 else 1.0)

    fg_c, bg_c = np.asarray(p.fg_mean), np.asarray(p.bg_mean)
    img = bg_c + u[..., None] * (fg_c - bg_c)
    # Poisson-Gaussian noise: half the variance shot noise at the mean level, half read noise
    level_mean = max(float(img.mean()), 1.0)
    gain = max(0.5 * p.noise_sigma**2 / level_mean, 1e-3)
    img = rng.poisson(np.clip(img, 0, None) / gain) * gain
    img = img + rng.normal(0, math.sqrt(0.5) * p.noise_sigma, img.shape)
    img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    return (img[..., 0] if ms.channels == 1 else img), labels


# ------------------------------------------------------------------------------- writing
def modality_counts(
    stats: NucleiStats, n_per_modality: int | Mapping[str, int] | None, total: int | None
) -> dict[str, int]:
    """Images per modality: given per modality, or ``total`` split in the real proportions
    (largest remainders, so the counts add up)."""
    mods = sorted(stats.modalities)
    if (n_per_modality is None) == (total is None):
        raise ConfigError("give exactly one of n_per_modality and total")
    if n_per_modality is not None:
        if isinstance(n_per_modality, int):
            return {m: int(n_per_modality) for m in mods}
        bad = sorted(set(n_per_modality) - set(mods))
        if bad:
            raise ConfigError(f"no fitted statistics for modalities {bad}; have {mods}")
        return {m: int(n_per_modality.get(m, 0)) for m in mods}
    weights = np.array([stats.modalities[m].n_images for m in mods], np.float64)
    exact = total * weights / weights.sum()
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: total - counts.sum()]:
        counts[i] += 1
    return dict(zip(mods, (int(c) for c in counts), strict=True))


def image_seed(seed: int, modality: str, index: int, n_profiles: int) -> tuple[int, int]:
    """Seed and profile of image ``index``: one image can be re-rendered alone, and counts
    can grow without changing the images already drawn. Profiles are used in seeded
    permutations, one whole cycle after another (not drawn independently), so n images
    follow the real split's distribution closely even when n is small."""
    mod = MODALITIES.index(modality)
    ss = np.random.SeedSequence([seed, mod, index])
    cycle = np.random.default_rng([seed, mod, index // n_profiles]).permutation(n_profiles)
    return int(ss.generate_state(1)[0]), int(cycle[index % n_profiles])


def generate(
    stats: NucleiStats,
    out_dir: str | Path,
    seed: int = 0,
    n_per_modality: int | Mapping[str, int] | None = None,
    total: int | None = None,
    val_fraction: float = 0.15,
    dataset: str | None = None,
) -> Path:
    """Write synthetic images in the prepared nuclei layout (what ``ingest`` writes and the
    nuclei stages read), atomically; the first ``val_fraction`` of each modality is ``val``,
    the rest ``train``. ``synth_nuclei.json`` records seed, counts and the stats used."""
    from tqdm import tqdm

    from microseg.data.manifest import normalise, write_manifest
    from microseg.data.stats import image_stats, label_stats
    from microseg.io import tiff
    from microseg.utils.atomic import atomic_path

    if not 0 <= val_fraction < 1:
        raise ConfigError(f"val_fraction must be in [0, 1), got {val_fraction}")
    counts = modality_counts(stats, n_per_modality, total)
    out = Path(out_dir)
    name = dataset or out.name
    rows = []
    with atomic_path(out) as tmp:
        (tmp / "images").mkdir(parents=True)
        (tmp / "labels").mkdir()
        for modality, n in counts.items():
            n_val = round(n * val_fraction)
            for i in tqdm(range(n), desc=f"synth nuclei {modality}", disable=n < 20):
                sid = f"synth_{modality}_{i:05d}"
                n_prof = len(stats.modalities[modality].profiles)
                image, labels = render(stats, modality, *image_seed(seed, modality, i, n_prof))
                # exactly as ingest writes real samples (``_instance_2d_row``)
                tiff.write_stack(tmp / "images" / f"{sid}.tif", image)
                tiff.write_stack(tmp / "labels" / f"{sid}.tif", labels)
                rows.append(
                    {
                        "sample_id": sid,
                        "dataset": name,
                        "task": "nuclei",
                        "split": "val" if i < n_val else "train",
                        "image_path": f"images/{sid}.tif",
                        "label_path": f"labels/{sid}.tif",
                        "label_kind": "instance",
                        "axes": "YXC" if image.ndim == 3 else "YX",
                        "modality": modality,
                        "source_path": f"synthetic:{STATS_NAME}#seed={seed}",
                        **image_stats(image, 2 if image.ndim == 3 else None),
                        **label_stats(labels),
                    }
                )
        manifest = normalise(rows).sort_values("sample_id").reset_index(drop=True)
        write_manifest(manifest, tmp)
        record = {
            "generator": "microseg.data.synth_nuclei",
            "seed": int(seed),
            "counts": counts,
            "val_fraction": val_fraction,
            "stats": stats.to_dict(),
        }
        (tmp / STATS_NAME).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    log.info("wrote %d synthetic nuclei images to %s", len(rows), out)
    return out
