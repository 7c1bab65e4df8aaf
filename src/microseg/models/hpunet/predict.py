"""Hierarchical Prob-UNet inference on ZYX stacks: the flat family's output, plane by plane.

The result dict, its per-sample sums (``sum_p``, ``sum_p2``, ``sum_entropy``), the
``on_plane``/``on_samples`` callbacks and the files (``write_predictions``) are the flat
Prob-UNet's (:mod:`microseg.models.punet.predict`), so ``uncertainty``, ``inter_rater``,
``predict`` and the fusion read either family's samples unchanged. Only the sampling differs:
the latents are spatial maps at several decoder scales, so the decoder runs per sample
(:meth:`HierarchicalProbUNet.iter_sample_logits`). Noise of plane ``z`` is drawn from a
generator seeded by ``(seed, z)``: results do not depend on ``batch_planes``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from monai.inferers import SlidingWindowInferer
from tqdm.auto import tqdm

from microseg.data.patches import DEFAULT_PERCENTILES, intensity_range
from microseg.data.transforms import check_stack_finite
from microseg.errors import ShapeMismatchError
from microseg.models.hpunet.network import HierarchicalProbUNet
from microseg.models.punet.network import HEADS, pad_to_multiple
from microseg.models.punet.predict import (
    STATS,
    PlaneCallback,
    _plane_generator,
    _plane_stats,
    _PlaneReader,
)
from microseg.utils.devices import model_device
from microseg.utils.progress import bar_disabled


def _accumulate(
    out: dict[str, dict[str, torch.Tensor]], logits: dict[str, torch.Tensor], h: int, w: int
) -> None:
    for k in HEADS:
        for name, value in _plane_stats(logits[k][..., :h, :w]).items():
            out[k][name] = out[k][name] + value if name in out[k] else value


@torch.no_grad()
def _stats_whole(
    model: HierarchicalProbUNet,
    x: torch.Tensor,
    zs: list[int],
    n_samples: int,
    temperature: float,
    seed: int,
    chunk: int,
    samples: dict[str, list[torch.Tensor]] | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    h, w = x.shape[-2:]
    xp = pad_to_multiple(x, model.pad_multiple)
    gens = [_plane_generator(seed, z) for z in zs]
    out: dict[str, dict[str, torch.Tensor]] = {k: {} for k in HEADS}
    for logits in model.iter_sample_logits(xp, n_samples, temperature, generator=gens, chunk=chunk):
        _accumulate(out, logits, h, w)
        if samples is not None:
            for k in HEADS:
                samples[k].append(torch.sigmoid(logits[k][..., :h, :w]))
    return out


@torch.no_grad()
def _stats_tiled(
    model: HierarchicalProbUNet,
    x: torch.Tensor,
    zs: list[int],
    n_samples: int,
    temperature: float,
    seed: int,
    chunk: int,
    tile: tuple[int, int],
    sw_batch: int,
) -> dict[str, dict[str, torch.Tensor]]:
    """Window means of the sums, blended by MONAI's sliding window (as the flat family)."""
    size, overlap = (int(v) for v in tile)
    if size % model.pad_multiple or not 0 <= overlap < size:
        raise ValueError(
            f"tile {tile}: size a multiple of {model.pad_multiple}, 0 <= overlap < size"
        )
    gen = _plane_generator(seed, zs[0])

    def window_net(win: torch.Tensor) -> torch.Tensor:
        sums: dict[str, dict[str, torch.Tensor]] = {k: {} for k in HEADS}
        for logits in model.iter_sample_logits(
            win, n_samples, temperature, generator=gen, chunk=chunk
        ):
            _accumulate(sums, logits, *win.shape[-2:])
        return torch.stack([sums[k][s] / n_samples for k in HEADS for s in STATS], dim=1)

    inferer = SlidingWindowInferer(
        roi_size=(size, size),
        sw_batch_size=sw_batch,
        overlap=overlap / size,
        mode="gaussian",
        padding_mode="reflect",
    )
    means = inferer(x, window_net)
    names = [(k, s) for k in HEADS for s in STATS]
    out: dict[str, dict[str, torch.Tensor]] = {k: {} for k in HEADS}
    for i, (k, s) in enumerate(names):
        out[k][s] = means[:, i] * n_samples
    return out


def predict_stack_hpunet(
    model: HierarchicalProbUNet,
    stack: Any,
    *,
    n_samples: int = 24,
    temperature: float = 1.4,
    tile: tuple[int, int] | None = None,
    batch_planes: int = 4,
    sample_chunk: int = 4,
    percentiles: tuple[float, float] = DEFAULT_PERCENTILES,
    intensity: tuple[float, float] | None = None,
    seed: int = 0,
    device: str | torch.device | None = None,
    collect: bool = True,
    on_plane: PlaneCallback | None = None,
    on_samples: PlaneCallback | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """:func:`microseg.models.punet.predict.predict_stack_punet`'s arguments and result for
    the hierarchical model (see there): ``prob_<head>`` and ``<stat>_<head>`` per plane."""
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
    check_stack_finite(stack)
    lo, hi = intensity or intensity_range(stack, percentiles, max_planes=16)
    reader = _PlaneReader(stack, (model.in_channels - 1) // 2, lo, hi)
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
    starts = range(0, shape[0], max(1, batch_planes))
    for z0 in tqdm(starts, desc="hpunet planes", disable=bar_disabled(progress), leave=False):
        zs = list(range(z0, min(z0 + batch_planes, shape[0])))
        x = torch.from_numpy(np.stack([reader.window(z) for z in zs])).to(device)
        if tile is None:
            kept = {k: [] for k in HEADS} if on_samples is not None else None
            stats = _stats_whole(model, x, zs, n_samples, temperature, seed, chunk, kept)
            if on_samples is not None and kept is not None:
                per_head = {k: torch.cat(v, dim=1).float().cpu().numpy() for k, v in kept.items()}
                for i, z in enumerate(zs):
                    on_samples(z, {k: per_head[k][i] for k in HEADS})
        else:
            stats = _stats_tiled(
                model, x, zs, n_samples, temperature, seed, chunk, tile, batch_planes
            )
        for i, z in enumerate(zs):
            plane = {f"{s}_{k}": stats[k][s][i].float().cpu().numpy() for k in HEADS for s in STATS}
            for k in HEADS:
                plane[f"prob_{k}"] = plane[f"sum_p_{k}"] / np.float32(n_samples)
            if collect:
                for key in keys:
                    result[key][z] = plane[key]
            if on_plane is not None:
                on_plane(z, plane)
    return result
