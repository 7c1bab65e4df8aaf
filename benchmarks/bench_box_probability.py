"""Box aggregation of a spine probability stack: one summed-area table per plane vs slices.

The peer is what a straightforward fusion does (DeepD3.V2's ``get_box_mean_prob``): slice each
box out of its plane and take the mean. Both run in this process on the same 48x384x384 stack
and 20,000 boxes (YOLO-sized, 4-20 px a side, then larger, 20-60 px); the script prints both
times, their ratio and the largest difference. Max (ours is itself a per-box slice loop) and
quantile (a padded gather, sorted once) are timed against their per-box slice peers as well.

    .venv/bin/python benchmarks/bench_box_probability.py [--boxes 20000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd

from microseg.infer.fusion import box_pixel_bounds, box_probability


def make_boxes(
    rng: np.random.Generator, n: int, shape: tuple[int, int, int], size: tuple[float, float]
) -> pd.DataFrame:
    depth, h, w = shape
    bw = rng.uniform(*size, n)
    bh = rng.uniform(*size, n)
    x1 = rng.uniform(-2, w - 4, n)
    y1 = rng.uniform(-2, h - 4, n)
    return pd.DataFrame(
        {
            "z": rng.integers(0, depth, n),
            "x1": x1,
            "y1": y1,
            "x2": x1 + bw,
            "y2": y1 + bh,
            "score": rng.random(n),
        }
    )


def per_box(stack: np.ndarray, det: pd.DataFrame, fn) -> np.ndarray:
    """The peer: one slice and one reduction per box (same pixel convention)."""
    r0, r1, c0, c1 = box_pixel_bounds(det, stack.shape[1], stack.shape[2])
    z = det["z"].to_numpy()
    out = np.zeros(len(det))
    for k in range(len(det)):
        if r1[k] > r0[k] and c1[k] > c0[k]:
            out[k] = fn(stack[z[k], r0[k] : r1[k], c0[k] : c1[k]])
    return out


def best_of(repeats: int, f):
    best, result = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = f()
        best = min(best, time.perf_counter() - t0)
    return best, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--boxes", type=int, default=20_000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    shape = (48, 384, 384)
    stack = rng.random(shape, dtype=np.float32)
    print(f"{args.boxes} boxes on a {shape} float32 stack; best of {args.repeats}")
    for size in ((4.0, 20.0), (20.0, 60.0)):
        det = make_boxes(rng, args.boxes, shape, size)
        print(f"boxes {size[0]:.0f}-{size[1]:.0f} px a side")
        run(stack, det, args.repeats)


def run(stack: np.ndarray, det: pd.DataFrame, repeats: int) -> None:
    peers = {
        "mean": np.mean,
        "max": np.max,
        "quantile": lambda p: np.quantile(p, 0.9),
    }
    for agg, fn in peers.items():
        t_ours, ours = best_of(repeats, lambda a=agg: box_probability(stack, det, a, 0.9))
        t_peer, peer = best_of(repeats, lambda f=fn: per_box(stack, det, f))
        label = {"mean": "integral image", "max": "slice loop", "quantile": "padded gather"}[agg]
        print(
            f"{agg:9s} {label:15s} {t_ours * 1e3:8.1f} ms | per-box slice {t_peer * 1e3:8.1f} ms"
            f" | ratio {t_peer / t_ours:6.1f}x | max |diff| {np.max(np.abs(ours - peer)):.2e}"
        )


if __name__ == "__main__":
    main()
