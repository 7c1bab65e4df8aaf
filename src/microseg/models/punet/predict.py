"""Probabilistic U-Net inference on ZYX stacks, streamed plane by plane.

For every plane the U-Net features and the prior are computed once; ``n_samples`` latents
are drawn from the prior and only the 1x1 heads run per sample
(:meth:`ProbUNet.sample_heads`). Each sample's logits are divided by ``temperature``
(DeepD3.V2 defaults: 24 samples at T = 1.4). Per pixel and head the running sums

* ``sum_p``       = sum_s p_s                  (mean: ``sum_p / S``)
* ``sum_p2``      = sum_s p_s^2                (variance: ``sum_p2 / S - mean^2``)
* ``sum_entropy`` = sum_s H(p_s), in nats      (expected entropy = aleatoric part)

are kept, which is all an uncertainty stage needs: predictive entropy ``H(mean)``, mutual
information ``H(mean) - sum_entropy / S`` (epistemic part), variance. Memory does not grow
with depth: planes are read, normalised and reduced a batch at a time, and with
``collect=False`` nothing per plane is kept (hand ``on_plane`` a writer instead). Per-sample
probabilities are never stored unless ``on_samples`` asks for them, plane by plane.

Random draws are seeded per plane (``seed``, ``z``), so results do not depend on
``batch_planes``. With ``tile=(size, overlap)`` planes go through MONAI's
``SlidingWindowInferer`` and each window draws its own latents from its own prior.
"""

from __future__ import annotations

import inspect
import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import SlidingWindowInferer
from skimage.morphology import remove_small_objects
from tqdm.auto import tqdm

from microseg.data.patches import DEFAULT_PERCENTILES, context_planes, intensity_range, normalize
from microseg.data.transforms import check_stack_finite
from microseg.errors import ShapeMismatchError
from microseg.io.tiff import write_stack
from microseg.models.punet.network import HEADS, ProbUNet, pad_to_multiple
from microseg.utils.atomic import write_text
from microseg.utils.devices import model_device
from microseg.utils.progress import bar_disabled

log = logging.getLogger(__name__)

STATS = ("sum_p", "sum_p2", "sum_entropy")
PlaneCallback = Callable[[int, Mapping[str, np.ndarray]], None]


def bernoulli_entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """``H(sigmoid(l))`` in nats, stable for large ``|l|``: ``softplus(l) - l * sigmoid(l)``."""
    return F.softplus(logits) - logits * torch.sigmoid(logits)


def _plane_stats(logits: torch.Tensor) -> dict[str, torch.Tensor]:
    """Sums over the sample axis 1 of ``(B, S, H, W)`` logits (already temperature-scaled)."""
    p = torch.sigmoid(logits)
    return {
        "sum_p": p.sum(1),
        "sum_p2": (p * p).sum(1),
        "sum_entropy": bernoulli_entropy_from_logits(logits).sum(1),
    }


def _plane_generator(seed: int, z: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(z))


class _PlaneReader:
    """Normalised planes with their context, read lazily and cached only while needed."""

    def __init__(self, stack: Any, context: int, lo: float, hi: float) -> None:
        self.stack, self.context, self.lo, self.hi = stack, context, lo, hi
        self.depth = len(stack)
        self.cache: dict[int, np.ndarray] = {}

    def window(self, z: int) -> np.ndarray:
        planes = context_planes(self.depth, z, self.context)
        for q in planes:
            if q not in self.cache:
                self.cache[q] = normalize(np.asarray(self.stack[q]), self.lo, self.hi)
        for q in [q for q in self.cache if q < z - self.context]:
            del self.cache[q]
        return np.stack([self.cache[q] for q in planes])


@torch.no_grad()
def _stats_whole(
    model: ProbUNet,
    x: torch.Tensor,
    zs: list[int],
    n_samples: int,
    temperature: float,
    seed: int,
    chunk: int,
    samples: dict[str, list[torch.Tensor]] | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """Per-head sums for a batch of whole planes ``(B, C, H, W)``.

    With ``samples`` (a dict of empty lists per head) the per-sample probabilities
    ``(B, chunk, H, W)`` are appended there too.
    """
    h, w = x.shape[-2:]
    xp = pad_to_multiple(x, model.pad_multiple)
    features = model.unet_features(xp)
    prior = model.prior(xp)
    dims = [model.latent_dims[k] for k in HEADS]
    eps = torch.stack(
        [torch.randn((n_samples, sum(dims)), generator=_plane_generator(seed, z)) for z in zs]
    ).to(x.device, x.dtype)
    eps_by_head = dict(zip(HEADS, torch.split(eps, dims, dim=-1), strict=True))
    z = {
        k: prior[k].base_dist.loc[:, None] + prior[k].base_dist.scale[:, None] * eps_by_head[k]
        for k in HEADS
    }
    out: dict[str, dict[str, torch.Tensor]] = {k: {} for k in HEADS}
    for logits in model.iter_sample_heads(
        features, prior, temperature=temperature, z=z, chunk=chunk
    ):
        for k in HEADS:
            cropped = logits[k][..., :h, :w]
            for name, value in _plane_stats(cropped).items():
                out[k][name] = out[k][name] + value if name in out[k] else value
            if samples is not None:
                samples[k].append(torch.sigmoid(cropped))
    return out


@torch.no_grad()
def _stats_tiled(
    model: ProbUNet,
    x: torch.Tensor,
    zs: list[int],
    n_samples: int,
    temperature: float,
    seed: int,
    chunk: int,
    tile: tuple[int, int],
    sw_batch: int,
) -> dict[str, dict[str, torch.Tensor]]:
    """Per-head sums for a batch of planes, window by window (MONAI sliding window)."""
    size, overlap = (int(v) for v in tile)
    if size % model.pad_multiple:
        raise ValueError(f"tile size {size} must be a multiple of {model.pad_multiple}")
    if not 0 <= overlap < size:
        raise ValueError(f"tile overlap must be in [0, {size}), got {overlap}")
    gen = _plane_generator(seed, zs[0])

    def window_net(win: torch.Tensor) -> torch.Tensor:
        features = model.unet_features(win)
        prior = model.prior(win)
        dims = [model.latent_dims[k] for k in HEADS]
        eps = torch.randn((win.shape[0], n_samples, sum(dims)), generator=gen)
        eps_by_head = dict(zip(HEADS, torch.split(eps.to(win), dims, dim=-1), strict=True))
        z = {
            k: prior[k].base_dist.loc[:, None] + prior[k].base_dist.scale[:, None] * eps_by_head[k]
            for k in HEADS
        }
        logits = model.sample_heads(features, prior, temperature=temperature, z=z, chunk=chunk)
        chans = []
        for k in HEADS:
            s = _plane_stats(logits[k])
            chans += [s[name] / n_samples for name in STATS]
        return torch.stack(chans, dim=1)  # window means; blending means keeps them means

    inferer = SlidingWindowInferer(
        roi_size=(size, size),
        sw_batch_size=sw_batch,
        overlap=overlap / size,
        mode="gaussian",
        padding_mode="reflect",
    )
    means = inferer(x, window_net)
    out: dict[str, dict[str, torch.Tensor]] = {k: {} for k in HEADS}
    i = 0
    for k in HEADS:
        for name in STATS:
            out[k][name] = means[:, i] * n_samples
            i += 1
    return out


def predict_stack_punet(
    model: ProbUNet,
    stack: Any,
    *,
    n_samples: int = 24,
    temperature: float = 1.4,
    tile: tuple[int, int] | None = None,
    batch_planes: int = 4,
    sample_chunk: int = 8,
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
    intensity: tuple[float, float] | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    collect: bool = True,
    on_plane: PlaneCallback | None = None,
    on_samples: PlaneCallback | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Mean probabilities and running sums for every plane of a ZYX ``stack``.

    Args:
        model: a trained :class:`ProbUNet` (put in eval mode here).
        stack: ``(Z, Y, X)`` array or lazy :class:`~microseg.io.tiff.TiffStack`.
        n_samples, temperature: prior draws per plane; logits are divided by ``temperature``.
        tile: ``None`` for whole planes, or ``(size, overlap)`` in pixels for MONAI's
            ``SlidingWindowInferer`` (Gaussian blending of window means).
        batch_planes: planes per forward pass; ``sample_chunk``: samples per head pass.
        percentiles, intensity: normalisation as in training (per-stack percentiles, exact
            and streamed for integer stacks); ``intensity=(lo, hi)`` overrides them.
        seed: latents of plane ``z`` depend on ``(seed, z)`` only (whole-plane mode).
        collect: keep ``(Z, Y, X)`` float32 outputs; ``False`` keeps nothing (streaming).
        on_plane: called as ``on_plane(z, stats)`` with 2D arrays ``prob_<head>`` and
            ``<stat>_<head>`` for stat in :data:`STATS`.
        on_samples: called as ``on_samples(z, {head: (S, Y, X) float32 probabilities})``;
            whole-plane mode only (holds ``batch_planes * S`` planes per head meanwhile).
        device: ``auto | cpu | cuda[:N] | mps``; the model is moved there. ``auto`` (or
            ``None``): the accelerator the model already sits on, else the best one here.

    Returns:
        ``{"prob_spine", "prob_dendrite", "sum_p_spine", "sum_p2_spine",
        "sum_entropy_spine", ... (each (Z, Y, X) float32 when ``collect``), "n_samples",
        "temperature", "shape", "intensity"}``.
    """
    return stream_stack(
        model, stack, _stats_whole, _stats_tiled,
        n_samples=n_samples, temperature=temperature, tile=tile, batch_planes=batch_planes,
        sample_chunk=sample_chunk, percentiles=percentiles, intensity=intensity, seed=seed,
        device=device, collect=collect, on_plane=on_plane, on_samples=on_samples,
        progress=progress, desc="punet planes",
    )  # fmt: skip


def stream_stack(
    model: Any,
    stack: Any,
    stats_whole: Callable[..., dict[str, dict[str, torch.Tensor]]],
    stats_tiled: Callable[..., dict[str, dict[str, torch.Tensor]]],
    *,
    n_samples: int,
    temperature: float,
    tile: tuple[int, int] | None,
    batch_planes: int,
    sample_chunk: int,
    percentiles: tuple[float, float],
    intensity: tuple[float, float] | None,
    seed: int,
    device: str | torch.device | None,
    collect: bool,
    on_plane: PlaneCallback | None,
    on_samples: PlaneCallback | None,
    progress: bool,
    desc: str,
) -> dict[str, Any]:
    """The plane loop of :func:`predict_stack_punet` around a family's sample statistics
    (``stats_whole(model, x, zs, n_samples, temperature, seed, chunk, kept)``,
    ``stats_tiled(..., chunk, tile, sw_batch)``): the hierarchical family shares it."""
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    shape = tuple(int(s) for s in stack.shape)
    if len(shape) != 3:
        raise ShapeMismatchError(f"expected a ZYX stack, found shape {shape}")
    if on_samples is not None and tile is not None:
        raise ValueError("on_samples needs whole-plane inference (tile=None)")
    device = model_device(model, str(device) if device is not None else "auto")
    model.to(device)
    model.eval()
    context = (model.in_channels - 1) // 2
    check_stack_finite(stack)  # one NaN voxel would make every map NaN
    lo, hi = intensity or intensity_range(stack, percentiles, max_planes=16)
    reader = _PlaneReader(stack, context, lo, hi)
    depth = shape[0]
    keys = [f"prob_{k}" for k in HEADS] + [f"{s}_{k}" for k in HEADS for s in STATS]
    result: dict[str, Any] = {
        "n_samples": int(n_samples),
        "temperature": float(temperature),
        "shape": shape,
        "intensity": (float(lo), float(hi)),
    }
    if collect:
        result.update({k: np.zeros(shape, dtype=np.float32) for k in keys})
    chunk = max(1, min(sample_chunk, n_samples))
    starts = range(0, depth, max(1, batch_planes))
    for z0 in tqdm(starts, desc=desc, disable=bar_disabled(progress), leave=False):
        zs = list(range(z0, min(z0 + batch_planes, depth)))
        x = torch.from_numpy(np.stack([reader.window(z) for z in zs])).to(device)
        if tile is None:
            kept: dict[str, list[torch.Tensor]] | None = (
                {k: [] for k in HEADS} if on_samples is not None else None
            )
            stats = stats_whole(model, x, zs, n_samples, temperature, seed, chunk, kept)
            if on_samples is not None and kept is not None:
                per_head = {k: torch.cat(v, dim=1).float().cpu().numpy() for k, v in kept.items()}
                for i, z in enumerate(zs):
                    on_samples(z, {k: per_head[k][i] for k in HEADS})
        else:
            stats = stats_tiled(
                model, x, zs, n_samples, temperature, seed, chunk, tile, batch_planes
            )
        for i, z in enumerate(zs):
            plane = {}
            for k in HEADS:
                for name in STATS:
                    plane[f"{name}_{k}"] = stats[k][name][i].float().cpu().numpy()
                plane[f"prob_{k}"] = plane[f"sum_p_{k}"] / np.float32(n_samples)
            if collect:
                for key in keys:
                    result[key][z] = plane[key]
            if on_plane is not None:
                on_plane(z, plane)
    return result


# -- writing --------------------------------------------------------------------------------
def mask_name(
    head: str,
    n_samples: int,
    temperature: float,
    size_thr: int,
    prob_thr: float,
    source: str = "prior",
) -> str:
    """DeepD3.V2's file name, e.g. ``mask_spine_prior_S24_T1.40_size40_thr0.50.tif``."""
    return (
        f"mask_{head}_{source}_S{int(n_samples)}_T{float(temperature):.2f}"
        f"_size{int(size_thr)}_thr{float(prob_thr):.2f}.tif"
    )


_RSO_PARAMS = inspect.signature(remove_small_objects).parameters


def remove_small(mask: np.ndarray, size_thr: int) -> np.ndarray:
    """Drop 3D connected components (6-connectivity) with fewer than ``size_thr`` voxels."""
    mask = np.asarray(mask, dtype=bool)
    if size_thr <= 1 or not mask.any():
        return mask
    if "max_size" in _RSO_PARAMS:  # scikit-image >= 0.26: removes sizes <= max_size
        return remove_small_objects(mask, max_size=int(size_thr) - 1, connectivity=1)
    return remove_small_objects(mask, min_size=int(size_thr), connectivity=1)


def write_predictions(
    out_dir: str | Path,
    result: Mapping[str, Any],
    voxel_size_nm: tuple[float, float, float] | None,
    *,
    size_thr: int = 40,
    prob_thr: float = 0.5,
    n_samples: int | None = None,
    temperature: float | None = None,
    source: str = "prior",
    model: str = "punet",
) -> dict[str, Path]:
    """Write probabilities, thresholded masks and the sums for the uncertainty stage.

    Files (all written atomically): ``prob_{spine,dendrite}.tif`` (float32 mean
    probability), ``mask_<head>_<source>_S<n>_T<t>_size<s>_thr<p>.tif`` (uint8 0/1, voxels
    with ``prob >= prob_thr`` after removing 3D components smaller than ``size_thr``
    voxels), ``{sum_p,sum_p2,sum_entropy}_<head>.tif`` (float32) and
    ``punet_prediction.json`` (settings and file names). ``n_samples``/``temperature``
    default to the values stored in ``result``; ``model`` names the family that sampled
    them (``punet`` or ``hpunet``: same files either way).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = int(n_samples if n_samples is not None else result["n_samples"])
    t = float(temperature if temperature is not None else result["temperature"])
    missing = [f"prob_{k}" for k in HEADS if f"prob_{k}" not in result]
    if missing:
        raise ValueError(f"result lacks {missing}: predict with collect=True to write it")
    paths: dict[str, Path] = {}
    for k in HEADS:
        prob = np.asarray(result[f"prob_{k}"], dtype=np.float32)
        paths[f"prob_{k}"] = write_stack(out_dir / f"prob_{k}.tif", prob, voxel_size_nm)
        mask = remove_small(prob >= prob_thr, size_thr).astype(np.uint8)
        name = mask_name(k, n, t, size_thr, prob_thr, source)
        paths[f"mask_{k}"] = write_stack(out_dir / name, mask, voxel_size_nm)
        for stat in STATS:
            key = f"{stat}_{k}"
            if key in result:
                arr = np.asarray(result[key], dtype=np.float32)
                paths[key] = write_stack(out_dir / f"{key}.tif", arr, voxel_size_nm)
    meta = {
        "model": model,
        "source": source,
        "n_samples": n,
        "temperature": t,
        "size_thr_voxels": int(size_thr),
        "prob_thr": float(prob_thr),
        "voxel_size_nm": list(voxel_size_nm) if voxel_size_nm is not None else None,
        "intensity": list(result.get("intensity", ())) or None,
        "entropy_unit": "nats",
        "files": {key: p.name for key, p in paths.items()},
    }
    meta_path = out_dir / "punet_prediction.json"
    write_text(meta_path, json.dumps(meta, indent=2) + "\n")
    paths["meta"] = meta_path
    log.info("wrote Probabilistic U-Net predictions (%d files) to %s", len(paths), out_dir)
    return paths
