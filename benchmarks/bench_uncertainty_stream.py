"""Uncertainty maps from streamed sums (plane by plane) vs a full in-memory sample stack.

A 48 x 384 x 384 volume with S = 24 Probabilistic U-Net-like samples (float32). The samples of
each plane come from a seeded generator, so every variant sees the same numbers:

- **streamed**: for each plane, draw its ``S x Y x X`` samples, accumulate
  :class:`~microseg.evaluate.uncertainty.UncertaintySums` and write the plane's maps into
  float32 output volumes; at most one plane of samples exists at a time;
- **full stack, our sums**: draw all ``S x Z x Y x X`` samples into one array, then
  :func:`~microseg.evaluate.uncertainty.from_samples` on it (chunked, so only the stack is big);
- **full stack, numpy** (the peer): the same stack, then the textbook vectorised formulas
  (``p.mean(0)``, ``p.var(0)``, ``-(xlogy(p, p) + xlogy(1 - p, 1 - p)).mean(0)``, ...).

Time (``perf_counter``, sample drawing included, best of ``--repeat``) and peak traced memory
(``tracemalloc``, a separate run) are printed for each, with ratios against the streamed path,
and the maps are checked to agree.

    .venv/bin/python benchmarks/bench_uncertainty_stream.py [--shape 48 384 384] [--samples 24]
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
from collections.abc import Callable

import numpy as np
from scipy.special import xlogy

from microseg.evaluate.uncertainty import MAP_NAMES, from_samples, uncertainty_maps


class Sampler:
    """Deterministic samples per plane: sigmoid(structure + per-sample shift + noise)."""

    def __init__(self, shape: tuple[int, int, int], n_samples: int, seed: int = 0) -> None:
        self.shape, self.s, self.seed = shape, n_samples, seed
        _, ny, nx = shape
        y, x = np.ogrid[:ny, :nx]
        # blobs and ridges: confident background, confident foreground, unsure edges
        self.base = (6.0 * np.sin(y / 9.0) * np.cos(x / 13.0) - 2.0).astype(np.float32)

    def plane(self, z: int, out: np.ndarray | None = None) -> np.ndarray:
        rng = np.random.default_rng([self.seed, z])
        _, ny, nx = self.shape
        p = out if out is not None else np.empty((self.s, ny, nx), np.float32)
        rng.standard_normal(out=p, dtype=np.float32)
        p *= np.float32(1.5)
        p += self.base + np.float32(0.05 * z)
        p += rng.normal(0, 1.0, (self.s, 1, 1)).astype(np.float32)  # per-sample shift
        np.negative(p, out=p)
        np.exp(p, out=p)
        p += np.float32(1.0)
        np.reciprocal(p, out=p)
        return p


def streamed(sampler: Sampler) -> dict[str, np.ndarray]:
    nz = sampler.shape[0]
    out = {k: np.empty(sampler.shape, np.float32) for k in MAP_NAMES}
    buf = np.empty((sampler.s, *sampler.shape[1:]), np.float32)
    for z in range(nz):
        maps = uncertainty_maps(from_samples(sampler.plane(z, out=buf)))
        for k in MAP_NAMES:
            out[k][z] = maps[k]
    return out


def full_stack(sampler: Sampler) -> np.ndarray:
    p = np.empty((sampler.s, *sampler.shape), np.float32)
    buf = np.empty((sampler.s, *sampler.shape[1:]), np.float32)
    for z in range(sampler.shape[0]):
        p[:, z] = sampler.plane(z, out=buf)
    return p


def full_ours(sampler: Sampler) -> dict[str, np.ndarray]:
    return uncertainty_maps(from_samples(full_stack(sampler)))


def full_numpy(sampler: Sampler) -> dict[str, np.ndarray]:
    p = full_stack(sampler)
    mean = p.mean(0)
    var = p.var(0)
    q = 1 - p
    expected = -(xlogy(p, p) + xlogy(q, q)).mean(0)
    entropy = -(xlogy(mean, mean) + xlogy(1 - mean, 1 - mean))
    mi = np.maximum(entropy - expected, 0)
    return {
        "mean": mean,
        "variance": var,
        "entropy": entropy,
        "mutual_information": mi,
        "expected_entropy": expected,
    }


def timed(fn: Callable, sampler: Sampler, repeat: int) -> tuple[float, dict]:
    best, result = float("inf"), {}
    for _ in range(repeat):
        result = {}
        t0 = time.perf_counter()
        result = fn(sampler)
        best = min(best, time.perf_counter() - t0)
    return best, result


def peak_memory(fn: Callable, sampler: Sampler) -> int:
    tracemalloc.start()
    try:
        fn(sampler)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=(48, 384, 384), help="z y x")
    ap.add_argument("--samples", type=int, default=24)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    sampler = Sampler(tuple(args.shape), args.samples, args.seed)
    stack_mib = args.samples * np.prod(args.shape) * 4 / 2**20
    maps_mib = len(MAP_NAMES) * np.prod(args.shape) * 4 / 2**20
    print(
        f"volume {tuple(args.shape)}, S = {args.samples}: sample stack {stack_mib:.0f} MiB "
        f"float32, five float32 maps {maps_mib:.0f} MiB"
    )
    t0 = time.perf_counter()
    for z in range(args.shape[0]):
        sampler.plane(z)
    print(f"  drawing the samples alone: {time.perf_counter() - t0:.2f} s (included below)")

    variants = [
        ("streamed, plane by plane", streamed),
        ("full stack + our sums", full_ours),
        ("full stack + numpy (peer)", full_numpy),
    ]
    rows, results = [], {}
    for name, fn in variants:
        t, res = timed(fn, sampler, args.repeat)
        results[name] = res
        rows.append((name, t, peak_memory(fn, sampler)))
    ref = results[variants[0][0]]
    for name, res in list(results.items())[1:]:
        worst = max(float(np.max(np.abs(res[k] - ref[k]))) for k in MAP_NAMES)
        assert worst < 1e-4, (name, worst)
        print(f"  maps agree with the streamed ones: {name}: max |diff| {worst:.2e}")
    t_ref, m_ref = rows[0][1], rows[0][2]
    print(f"  {'variant':28s} {'time s':>8s} {'peak MiB':>9s} {'time x':>7s} {'memory x':>9s}")
    for name, t, m in rows:
        print(f"  {name:28s} {t:8.2f} {m / 2**20:9.0f} {t / t_ref:7.2f} {m / m_ref:9.2f}")


if __name__ == "__main__":
    main()
