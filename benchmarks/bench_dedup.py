"""KD-tree 3D de-duplication vs brute-force greedy NMS, measured in the same run.

50,000 random detections in a 60 x 1024 x 1024 stack (500/94/94 nm voxels) are
de-duplicated at 1 µm. The peers are O(N^2): a pure-Python double loop (the obvious way to
write it) and a NumPy version (one vectorised distance row per kept detection). They run on a
crop of the same stack with the same density (y, x < 384: about 1/7 of the detections), where
all three must keep identical rows; their full-size time is extrapolated as N^2.

    .venv/bin/python benchmarks/bench_dedup.py [--n 50000] [--crop 256] [--radius 1000]
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import pandas as pd

from microseg.infer.dedup import dedup_3d

VS = (500.0, 94.0, 94.0)
SHAPE = (60, 1024, 1024)


def python_double_loop(df: pd.DataFrame, vs, radius: float) -> list[int]:
    """Greedy NMS, every pair by a plain Python loop; returns kept row positions."""
    pts = [(z * vs[0], y * vs[1], x * vs[2]) for z, y, x in df[["z", "y", "x"]].to_numpy()]
    score = df["score"].tolist()
    order = sorted(range(len(pts)), key=lambda k: -score[k])
    suppressed = [False] * len(pts)
    kept = []
    for a_pos, a in enumerate(order):
        if suppressed[a]:
            continue
        kept.append(a)
        pa = pts[a]
        for b in order[a_pos + 1 :]:
            if not suppressed[b] and math.dist(pa, pts[b]) <= radius:
                suppressed[b] = True
    return sorted(kept)


def numpy_rows(df: pd.DataFrame, vs, radius: float) -> list[int]:
    """Greedy NMS with one vectorised distance row per kept detection: O(N^2) work."""
    pts = df[["z", "y", "x"]].to_numpy(float) * np.asarray(vs)
    order = np.argsort(-df["score"].to_numpy(), kind="stable")
    pts = pts[order]
    alive = np.ones(len(pts), bool)
    kept = []
    for k in range(len(pts)):
        if not alive[k]:
            continue
        kept.append(order[k])
        d2 = ((pts[k + 1 :] - pts[k]) ** 2).sum(axis=1)
        alive[k + 1 :] &= d2 > radius**2
    return sorted(int(k) for k in kept)


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=50_000)
    ap.add_argument("--crop", type=int, default=384, help="y, x extent of the peers' crop")
    ap.add_argument("--radius", type=float, default=1000.0, help="nm")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    rng = np.random.default_rng(args.seed)
    df = pd.DataFrame(
        {
            "z": rng.integers(0, SHAPE[0], args.n),
            "y": rng.uniform(0, SHAPE[1], args.n),
            "x": rng.uniform(0, SHAPE[2], args.n),
            "score": rng.random(args.n),
        }
    )
    df["row"] = np.arange(len(df))

    full, t_full = timed(dedup_3d, df, VS, args.radius)
    print(f"full stack: {args.n} detections -> {len(full)} kept at {args.radius:.0f} nm")
    print(f"  dedup_3d (KD-tree)          {t_full:8.3f} s")

    crop = df[(df["y"] < args.crop) & (df["x"] < args.crop)].reset_index(drop=True)
    n = len(crop)
    ours, t_ours = timed(dedup_3d, crop, VS, args.radius)
    ref_py, t_py = timed(python_double_loop, crop, VS, args.radius)
    ref_np, t_np = timed(numpy_rows, crop, VS, args.radius)
    kept_ours = sorted(crop["row"].to_numpy()[np.searchsorted(crop["row"], ours["row"])])
    kept_py = sorted(crop["row"].to_numpy()[ref_py])
    kept_np = sorted(crop["row"].to_numpy()[ref_np])
    assert kept_ours == kept_py == kept_np, "survivors differ from the brute-force reference"
    print(f"crop y,x < {args.crop}: {n} detections -> {len(ours)} kept (identical in all three)")
    print(f"  dedup_3d (KD-tree)          {t_ours:8.3f} s")
    print(f"  Python double loop          {t_py:8.3f} s   ratio {t_py / t_ours:8.1f}x")
    print(f"  NumPy row per detection     {t_np:8.3f} s   ratio {t_np / t_ours:8.1f}x")
    scale = (args.n / n) ** 2
    print(f"extrapolated to {args.n} (x (N/n)^2 = {scale:.0f}):")
    print(f"  Python double loop  ~{t_py * scale:10.1f} s   ratio ~{t_py * scale / t_full:9.0f}x")
    print(f"  NumPy row           ~{t_np * scale:10.1f} s   ratio ~{t_np * scale / t_full:9.0f}x")


if __name__ == "__main__":
    main()
