"""Instance IoU + matching: our one-bincount overlap against three peers, measured in one run.

Two workloads: the DSB val+test images with perturbed predictions (see ``bench_coco_eval``:
38 images, ~1,400 nuclei) and one 2048 x 2048 mosaic of DSB label tiles (~5,000 nuclei) with
its perturbed prediction. Every method must give the same overlapping pairs and IoUs.

Overlap peers:
- ``loop``: per GT instance, its bounding box, and per predicted label found there one pair of
  boolean masks (the obvious per-pair loop, already restricted to boxes);
- ``unique``: ``np.unique`` on paired label keys (sort-based; what ``evaluate.tracking`` does);
- ``skimage``: ``skimage.metrics.contingency_table`` (a scipy sparse matrix).

Matching peer: one dense ``linear_sum_assignment`` on the full IoU matrix with StarDist's
costs (``-(iou >= t) - iou / (2 n)``), against ours (unique pairs taken directly, Hungarian
only on conflicting components); TP counts must agree at IoU 0.3, 0.5, 0.7, 0.9.

    .venv/bin/python benchmarks/bench_instance_matching.py [--repeats 3] [--mosaic 2048]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
from scipy import ndimage
from scipy.optimize import linear_sum_assignment
from skimage.metrics import contingency_table

from microseg.evaluate.instances import InstanceOverlap, instance_overlap, match_instances

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_coco_eval import DSB, dsb_workload, perturb

THRESHOLDS = (0.3, 0.5, 0.7, 0.9)


def pairs_ours(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, ...]:
    ov = instance_overlap(gt, pred)
    gi, pi, _, iou = ov.pairs
    return ov.gt_ids[gi], ov.pred_ids[pi], iou


def pairs_loop(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, ...]:
    rows = []
    p_area = np.bincount(pred.ravel())
    for g, sl in enumerate(ndimage.find_objects(gt), start=1):
        if sl is None:
            continue
        g_mask = gt[sl] == g
        g_area = int(g_mask.sum())
        for p in np.unique(pred[sl][g_mask]):
            if p == 0:
                continue
            inter = int(np.count_nonzero(g_mask & (pred[sl] == p)))
            rows.append((g, int(p), inter / (g_area + int(p_area[p]) - inter)))
    if not rows:
        return np.zeros(0, int), np.zeros(0, int), np.zeros(0)
    g_ids, p_ids, iou = map(np.asarray, zip(*rows, strict=True))
    return g_ids, p_ids, iou


def pairs_unique(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, ...]:
    g, p = gt.ravel().astype(np.int64), pred.ravel().astype(np.int64)
    g_area, p_area = np.bincount(g), np.bincount(p)
    both = (g > 0) & (p > 0)
    width = int(p.max()) + 1
    keys, inter = np.unique(g[both] * width + p[both], return_counts=True)
    gi, pi = keys // width, keys % width
    return gi, pi, inter / (g_area[gi] + p_area[pi] - inter)


def pairs_skimage(gt: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, ...]:
    table = contingency_table(gt, pred).tocoo()
    g_area = np.asarray(table.sum(axis=1)).ravel()
    p_area = np.asarray(table.sum(axis=0)).ravel()
    keep = (table.row > 0) & (table.col > 0) & (table.data > 0)
    gi, pi, inter = table.row[keep], table.col[keep], table.data[keep]
    return gi, pi, inter / (g_area[gi] + p_area[pi] - inter)


def as_dict(pairs: tuple[np.ndarray, ...]) -> dict[tuple[int, int], float]:
    g, p, iou = pairs
    keys = zip(np.asarray(g).tolist(), np.asarray(p).tolist(), strict=True)
    return dict(zip(keys, np.asarray(iou).tolist(), strict=True))


def tp_dense_lsa(ov: InstanceOverlap, t: float) -> int:
    """StarDist-style: the dense IoU matrix and one full Hungarian solve."""
    iou = ov.iou_matrix()
    if iou.size == 0:
        return 0
    n = min(iou.shape)
    cost = -(iou >= t).astype(float) - iou / (2 * n)
    r, c = linear_sum_assignment(cost)
    return int(np.count_nonzero(iou[r, c] >= t))


def tp_ours(ov: InstanceOverlap, t: float) -> int:
    return match_instances(ov, t).tp


def timed(repeats: int, fn, pairs):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = [fn(g, p) for g, p in pairs]
        best = min(best, time.perf_counter() - t0)
    return out, best


def mosaic(size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """All DSB label images (densest first) packed row by row into one big image, and its
    perturbed prediction: a whole-slide-like field with thousands of nuclei."""
    manifest = pd.read_parquet(DSB / "manifest.parquet")
    manifest = manifest.assign(
        density=manifest["n_instances"]
        / manifest["shape"].map(lambda s: np.prod([int(v) for v in str(s).split(",")]))
    ).sort_values(["density", "sample_id"], ascending=[False, True])
    gt = np.zeros((size, size), np.uint32)
    y = x = row_h = offset = 0
    for path in manifest["label_path"]:
        tile = tifffile.imread(DSB / path).astype(np.uint32)
        h, w = tile.shape
        if x + w > size:
            y, x, row_h = y + row_h, 0, 0
        if y + h > size:
            break
        gt[y : y + h, x : x + w] = np.where(tile > 0, tile + offset, 0)
        offset += int(tile.max())
        x, row_h = x + w, max(row_h, h)
    pred, _ = perturb(gt, np.random.default_rng(seed + 1))
    return gt, pred.astype(np.uint32)


def run(name: str, pairs: list[tuple[np.ndarray, np.ndarray]], repeats: int) -> None:
    n_gt = sum(int(np.unique(g[g > 0]).size) for g, _ in pairs)
    n_px = sum(g.size for g, _ in pairs)
    print(f"\n{name}: {len(pairs)} image(s), {n_px / 1e6:.2f} Mpx, {n_gt} GT nuclei")
    ref, t_ref = timed(repeats, pairs_ours, pairs)
    print(f"  overlap + IoU  ours (bincount)       {t_ref * 1e3:9.1f} ms")
    for label, fn in (("unique", pairs_unique), ("skimage", pairs_skimage), ("loop", pairs_loop)):
        got, t = timed(1 if label == "loop" else repeats, fn, pairs)
        same = True
        for a, b in zip(map(as_dict, ref), map(as_dict, got), strict=True):
            same &= a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-12 for k in a)
        print(
            f"  overlap + IoU  {label:8s}              {t * 1e3:9.1f} ms   "
            f"{t / t_ref:6.1f}x ours   pairs {'identical' if same else 'DIFFERENT'}"
        )
        if not same:
            raise SystemExit(f"{label} disagrees with ours")
    overlaps = [(instance_overlap(g, p), t) for g, p in pairs for t in [None]]
    for t in THRESHOLDS:
        ours, t_ours = timed(repeats, lambda ov, _, t=t: tp_ours(ov, t), overlaps)
        dense, t_dense = timed(repeats, lambda ov, _, t=t: tp_dense_lsa(ov, t), overlaps)
        same = ours == dense
        print(
            f"  match @ {t:.1f} (given the overlaps)  ours {t_ours * 1e3:9.3f} ms   "
            f"dense LSA {t_dense * 1e3:9.3f} ms"
            f"   {t_dense / t_ours:6.1f}x   TP {sum(ours)} vs {sum(dense)} "
            f"{'identical' if same else 'DIFFERENT'}"
        )
        if not same:
            raise SystemExit("dense LSA and our matching disagree")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--mosaic", type=int, default=4096, help="side of the mosaic image (px)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    samples = dsb_workload(1, args.seed)
    run("DSB val+test", [(s.gt, s.pred) for s in samples], args.repeats)
    run(f"mosaic {args.mosaic}^2", [mosaic(args.mosaic, args.seed)], args.repeats)


if __name__ == "__main__":
    main()
