"""Linking 200 frames x 300 cells: :func:`microseg.infer.tracking.link` vs per-pair mask IoU.

Masks are painted outside the timed region by a fast random walk of discs: 300 nuclei on a
jittered grid that drift with the stage, wander and jitter, so some leave the field and the
field is crowded (about 10 % foreground) but cells rarely touch. Ids are shuffled per frame.

Ours: :func:`link` end to end (features, sparse bincount IoU, gated augmented assignment,
divisions, gap closing, relabelling and the CTC check). Target: under 10 s on a 2-core box.

Peer linker, measured in the same process on the same masks: ``laptrack`` (LAP tracking with
gap closing and splitting, :func:`microseg.infer.tracking_laptrack.link_laptrack`, our
adapter: the same centroids, its graph cut into CTC tracks). Printed as a ratio to ours.

Baseline, also in the same process: the textbook linker -- IoU of every candidate pair by
comparing the two full-frame boolean masks (``(a == i) & (b == j)``), for all pairs within
``max_dist``, then one dense ``linear_sum_assignment`` on the augmented matrix. It is timed on
a few frame pairs and extrapolated to the whole sequence (running it all would take minutes).

    .venv/bin/python benchmarks/bench_tracking_link.py [--frames 200] [--cells 300]

``--accuracy``: instead of timing, score the linkers on imperfect masks. The synthetic
tracking sequences of params.yaml (``synth.tracking``, seeds ``seed * 1000 + i``; 01 train,
02 val, 03 test) are segmented by the classical Otsu + watershed baseline (real merges of
touching nuclei, splits, misses; no trained model needed) and by ground truth with shuffled
ids; every linker links the same masks and py-ctcmetrics scores them. Knobs are tuned on 01
and 02 only; 03 is printed apart (``--seqs 1 2`` leaves it out).

    .venv/bin/python benchmarks/bench_tracking_link.py --accuracy [--seqs 1 2 3] [--hard]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial import cKDTree

from microseg.infer.tracking import LinkConfig, frame_features, link
from microseg.infer.tracking_laptrack import link_laptrack


def paint_discs(
    n_frames: int, n_cells: int, shape: tuple[int, int], radius: float, seed: int
) -> np.ndarray:
    """Random-walk discs with per-frame random ids: ``(T, Y, X)`` uint32 label images."""
    rng = np.random.default_rng(seed)
    h, w = shape
    side = int(np.ceil(np.sqrt(n_cells * w / h)))
    rows = int(np.ceil(n_cells / side))
    gy, gx = np.meshgrid((np.arange(rows) + 0.5) * h / rows, (np.arange(side) + 0.5) * w / side)
    pos = np.stack([gy.ravel(), gx.ravel()], 1)[:n_cells]
    pos += rng.uniform(-3, 3, pos.shape)
    vel = np.zeros_like(pos)
    drift = np.array([0.35, 0.2])
    r = int(np.ceil(radius))
    oy, ox = np.mgrid[-r : r + 1, -r : r + 1]
    inside = oy**2 + ox**2 <= radius**2
    oy, ox = oy[inside], ox[inside]
    masks = np.zeros((n_frames, h, w), np.uint32)
    for t in range(n_frames):
        ids = (rng.choice((1 << 20) - 1, n_cells, replace=False) + 1).astype(np.uint32)
        yy = np.rint(pos[:, :1] + oy).astype(np.int64)
        xx = np.rint(pos[:, 1:] + ox).astype(np.int64)
        ok = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
        lab = np.broadcast_to(ids[:, None], yy.shape)
        masks[t][yy[ok], xx[ok]] = lab[ok]
        vel = 0.7 * vel + rng.normal(0, 0.3, vel.shape)
        pos += vel + drift + rng.normal(0, 0.3, pos.shape)
    return masks


def naive_pair(a: np.ndarray, b: np.ndarray, cfg: LinkConfig) -> int:
    """One frame pair, textbook style: per-pair full-mask IoU, dense augmented LSA."""
    fa, fb = frame_features(a), frame_features(b)
    pa, pb = fa[["cy", "cx"]].to_numpy(), fb[["cy", "cx"]].to_numpy()
    n, m = len(fa), len(fb)
    near = cKDTree(pa).sparse_distance_matrix(cKDTree(pb), cfg.max_dist, output_type="coo_matrix")
    mat = np.full((n + m, m + n), np.inf)
    la, lb = fa["label"].to_numpy(), fb["label"].to_numpy()
    for i, j, d in zip(near.row, near.col, near.data, strict=True):
        ma, mb = a == la[i], b == lb[j]
        inter = np.count_nonzero(ma & mb)
        iou = inter / np.count_nonzero(ma | mb)
        mat[i, j] = cfg.w_iou * (1 - iou) + cfg.w_dist * d / cfg.max_dist
    mat[np.arange(n), m + np.arange(n)] = cfg.death_cost
    mat[n + np.arange(m), np.arange(m)] = cfg.birth_cost
    mat[n:, m:] = 0.0
    r, c = linear_sum_assignment(mat)
    return int(((r < n) & (c < m)).sum())


SCORES = ("TRA", "DET", "SEG", "CT", "TF", "BC(0)", "BC(2)", "CCA", "HOTA", "IDF1", "MOTA")


def linkers(extra: dict[str, dict]) -> dict[str, object]:
    """Name -> ``masks -> (tracked, tracks)``: ours, ours without merge handling, laptrack."""
    from microseg.infer.tracking_laptrack import link_laptrack

    out = {
        "ours": lambda m: link(m, LinkConfig(**extra.get("ours", {}))),
        "ours-nomerge": lambda m: link(m, LinkConfig(merges=False, **extra.get("ours", {}))),
        "laptrack": lambda m: link_laptrack(m, extra.get("laptrack")),
    }
    return out


def accuracy(seqs: list[int], hard: bool, extra: dict[str, dict]) -> None:
    """CTC scores of every linker on classical and GT masks of the synthetic sequences."""
    import tempfile
    from pathlib import Path

    from microseg.config import load_params
    from microseg.data.synth_tracking import TrackingSynthConfig, generate_tracking_sequence
    from microseg.evaluate.tracking import evaluate_ctc
    from microseg.io.ctc import write_ctc_gt, write_ctc_result
    from microseg.models.classical import otsu_watershed
    from microseg.stages.tracking import shuffled_ids

    params = load_params(Path(__file__).resolve().parents[1] / "params.yaml")
    st = params.synth.tracking
    gen = dict(st.generator) if hard else {}
    cfg = TrackingSynthConfig(shape=tuple(st.shape), n_frames=st.n_frames, **gen)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for i in seqs:
            seq = generate_tracking_sequence(cfg, seed=st.seed * 1000 + i)
            name = f"{i:02d}"
            labels = {t: seq.labels[t] for t in range(len(seq.labels))}
            write_ctc_gt(root, name, seq.frames, seq.labels, seq.tracks, seg=labels)
            sources = {
                "classical": np.stack([otsu_watershed(f) for f in seq.frames]),
                "gt": shuffled_ids(seq.labels, i),
            }
            for src, masks in sources.items():
                for lk, fn in linkers(extra).items():
                    t0 = time.perf_counter()
                    tracked, tracks = fn(masks)
                    sec = time.perf_counter() - t0
                    res = root / src / lk
                    write_ctc_result(res, name, tracked, tracks)
                    sc = evaluate_ctc(root, name, res)
                    rows.append({"seq": name, "masks": src, "linker": lk, "s": sec,
                                 **{k: sc.get(k, float("nan")) for k in SCORES}})  # fmt: skip
    import pandas as pd

    df = pd.DataFrame(rows)
    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.precision", 3):
        for part, sel in (("train/val (01, 02)", df.seq.isin(["01", "02"])),
                          ("test (03)", df.seq.eq("03"))):  # fmt: skip
            if sel.any():
                print(f"-- {part}: mean over sequences")
                print(df[sel].groupby(["masks", "linker"])[["s", *SCORES]].mean())
        print(df.to_string(index=False, float_format="%.3f"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=200)
    ap.add_argument("--cells", type=int, default=300)
    ap.add_argument("--size", type=int, default=768, help="square field, px")
    ap.add_argument("--radius", type=float, default=8.0)
    ap.add_argument("--peer-pairs", type=int, default=3, help="frame pairs the peer runs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--accuracy", action="store_true", help="CTC scores, not timing")
    ap.add_argument("--seqs", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--hard", action="store_true", help="params.yaml's generator options")
    ap.add_argument("--ours", default="{}", help="JSON LinkConfig overrides (accuracy)")
    ap.add_argument("--laptrack", default="{}", help="JSON LapTrack overrides (accuracy)")
    args = ap.parse_args()
    if args.accuracy:
        import json

        extra = {"ours": json.loads(args.ours), "laptrack": json.loads(args.laptrack)}
        accuracy(args.seqs, args.hard, extra)
        return

    t0 = time.perf_counter()
    masks = paint_discs(args.frames, args.cells, (args.size, args.size), args.radius, args.seed)
    gen_s = time.perf_counter() - t0
    fg = float((masks != 0).mean())
    print(
        f"masks: {args.frames} frames x {args.cells} cells, {args.size}x{args.size} px, "
        f"{fg:.1%} foreground (painted in {gen_s:.1f} s, untimed)"
    )
    cfg = LinkConfig()

    t0 = time.perf_counter()
    _, tracks = link(masks, cfg)
    ours = time.perf_counter() - t0
    last = args.frames - 1
    n_full = int((tracks["B"].eq(0) & tracks["E"].eq(last)).sum())
    print(
        f"ours  link(): {ours:.2f} s  ({1e3 * ours / args.frames:.1f} ms/frame), "
        f"{len(tracks)} tracks, {n_full} span all frames, "
        f"{int((tracks.P > 0).sum())} with a parent"
    )

    import laptrack  # imported before the clock starts, like ours

    t0 = time.perf_counter()
    _, lap_tracks = link_laptrack(masks)
    lap = time.perf_counter() - t0
    n_full = int((lap_tracks["B"].eq(0) & lap_tracks["E"].eq(last)).sum())
    print(
        f"laptrack {laptrack.__version__} (adapter): {lap:.2f} s  "
        f"({1e3 * lap / args.frames:.1f} ms/frame), {len(lap_tracks)} tracks, "
        f"{n_full} span all frames, {int((lap_tracks.P > 0).sum())} with a parent"
    )
    print(f"ratio laptrack / ours: {lap / ours:.1f}x")
    from microseg.infer.tracking import _Frame

    t0 = time.perf_counter()
    for m in masks:
        _Frame.of(m)
    feats = time.perf_counter() - t0
    print(
        f"  of which per-frame features shared by both (centroids, areas): {feats:.2f} s; "
        f"linking alone: ours {ours - feats:.2f} s, laptrack {lap - feats:.2f} s, "
        f"ratio {(lap - feats) / max(ours - feats, 1e-9):.1f}x"
    )

    pairs = min(args.peer_pairs, args.frames - 1)
    t0 = time.perf_counter()
    for t in range(pairs):
        naive_pair(masks[t], masks[t + 1], cfg)
    peer_pair = (time.perf_counter() - t0) / max(pairs, 1)
    peer = peer_pair * (args.frames - 1)
    print(
        f"textbook per-pair mask IoU + dense LSA: {peer_pair:.2f} s/frame pair on {pairs} pairs, "
        f"extrapolated {peer:.1f} s for {args.frames - 1} pairs"
    )
    print(f"ratio textbook / ours: {peer / ours:.1f}x   target ours < 10 s: "
          f"{'PASS' if ours < 10 else 'FAIL'}")  # fmt: skip


if __name__ == "__main__":
    main()
