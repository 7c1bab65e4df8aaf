"""COCO mask/box AP with pycocotools on the DSB val+test workload, against our matching counts.

Workload: the real DSB 2018 val and test images (38 label images, ~1,400 nuclei, 256² to
520 x 696 px) against predictions made from the ground truth with the errors a nucleus
segmenter makes: boundaries one pixel too wide or narrow, ~8 % of nuclei missed, ~5 % merged
with a neighbour, ~4 % split in two, ~6 % false-positive blobs on background; scores higher
for good detections than for bad ones. ``--copies N`` repeats the images N times.

Timed, best of ``--repeats``: label images -> COCO RLE (``io.coco``), then ``COCOeval``
evaluate + accumulate for segm and bbox (maxDets 1/10/1000, and the COCO default 1/10/100 to
show what the cap costs), and our sparse matching (F1 at 0.5/0.7/0.9 plus the DSB score's ten
thresholds) over the same images. TP/FP/FN at IoU 0.5, 0.7, 0.9 must agree between COCOeval's
greedy matching and ours on every image. ``faster-coco-eval`` is compared only when it is
importable (it is not a project dependency).

    .venv/bin/python benchmarks/bench_coco_eval.py [--copies 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
from scipy import ndimage
from skimage.segmentation import expand_labels, relabel_sequential

from microseg.evaluate.coco_eval import CocoData, coco_metrics, run_cocoeval, to_coco
from microseg.evaluate.instances import InstanceSample, evaluate_instances, threshold_key

ROOT = Path(__file__).resolve().parents[1]
DSB = ROOT / "data" / "prepared" / "dsb2018"


def erode_labels(labels: np.ndarray) -> np.ndarray:
    """Each instance one pixel thinner (a pixel stays if its 3x3 neighbourhood is its label)."""
    lo = ndimage.grey_erosion(labels, size=3)
    hi = ndimage.grey_dilation(labels, size=3)
    return np.where((lo == labels) & (hi == labels), labels, 0)


def perturb(gt: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict[int, float]]:
    """A plausible prediction of ``gt`` (see the module notes) and one score per instance."""
    gt = gt.astype(np.int32)
    mode = rng.integers(0, 3)
    pred = expand_labels(gt, 1) if mode == 0 else erode_labels(gt) if mode == 1 else gt.copy()
    ids = np.unique(gt)[1:]
    quality: dict[int, float] = {}
    if ids.size:
        pred[np.isin(pred, rng.choice(ids, round(0.08 * ids.size), replace=False))] = 0
        # merges: a nucleus absorbs its nearest touching neighbour
        grown = expand_labels(gt, 3)
        for a in rng.choice(ids, round(0.05 * ids.size), replace=False):
            ring = grown[ndimage.binary_dilation(grown == a)]
            others = np.setdiff1d(ring, [0, a])
            if others.size:
                pred[pred == others[0]] = a
                quality[int(a)] = 0.5
        # splits: a nucleus cut in two at its centroid column
        top = int(pred.max())
        for k, a in enumerate(rng.choice(ids, round(0.04 * ids.size), replace=False)):
            ys, xs = np.nonzero(pred == a)
            if xs.size > 8:
                cut = xs > xs.mean()
                pred[ys[cut], xs[cut]] = top + 1 + k
                quality[int(a)] = quality[top + 1 + k] = 0.4
    # false positives: small discs on background
    top = int(pred.max())
    yy, xx = np.mgrid[-4:5, -4:5]
    disc = yy**2 + xx**2 <= 12
    for k in range(max(1, round(0.06 * ids.size))):
        y = int(rng.integers(5, gt.shape[0] - 5))
        x = int(rng.integers(5, gt.shape[1] - 5))
        window = (slice(y - 4, y + 5), slice(x - 4, x + 5))
        if not (gt[window].any() or pred[window].any()):
            pred[window][disc] = top + 1 + k
            quality[top + 1 + k] = 0.2
    pred, fw, _ = relabel_sequential(pred)
    scores = {}
    for old in np.unique(fw.in_values):
        new = int(fw[old])
        if new:
            q = quality.get(int(old), 0.8)
            scores[new] = float(np.clip(q + rng.normal(0, 0.15), 0.01, 0.99))
    return pred.astype(np.uint16), scores


def dsb_workload(copies: int = 1, seed: int = 0) -> list[InstanceSample]:
    """GT and perturbed predictions of the DSB val + test split (needs ``microseg ingest``)."""
    manifest_path = DSB / "manifest.parquet"
    if not manifest_path.is_file():
        raise SystemExit(
            f"{manifest_path} is missing: run `dvc pull data.dvc && microseg ingest dsb2018`"
        )
    manifest = pd.read_parquet(manifest_path)
    manifest = manifest[manifest["split"].isin(["val", "test"])].sort_values("sample_id")
    rng = np.random.default_rng(seed)
    samples = []
    for c in range(copies):
        for row in manifest.itertuples():
            gt = tifffile.imread(DSB / row.label_path)
            pred, scores = perturb(gt, rng)
            samples.append(InstanceSample(f"{row.sample_id}#{c}", gt, pred, scores))
    return samples


def best_of(repeats: int, fn, *args, **kwargs):
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        times.append(time.perf_counter() - t0)
    return out, min(times)


def faster_coco_eval_peer(data: CocoData, iou_type: str, repeats: int):
    """Stats and time of faster-coco-eval on the same GT/DT, or None when not installed."""
    if importlib.util.find_spec("faster_coco_eval") is None:
        return None
    import copy

    from faster_coco_eval import COCO as FCOCO
    from faster_coco_eval import COCOeval_faster

    def run():
        gt = FCOCO(copy.deepcopy(data.gt))
        drop = ("bbox", "area") if iou_type == "segm" else ("segmentation", "area")
        dt = gt.loadRes([{k: v for k, v in r.items() if k not in drop} for r in data.results])
        ev = COCOeval_faster(gt, dt, iou_type, print_function=lambda *a: None)
        ev.params.maxDets = [1, 10, 1000]
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
        return ev.stats

    return best_of(repeats, run)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--copies", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    samples = dsb_workload(args.copies, args.seed)
    n_gt = sum(np.unique(s.gt[s.gt > 0]).size for s in samples)
    n_dt = sum(len(s.scores or {}) for s in samples)
    most = max(np.unique(s.gt).size - 1 for s in samples)
    print(
        f"workload: {len(samples)} images, {n_gt} GT nuclei (max {most}/image), {n_dt} detections"
    )

    data, t_convert = best_of(args.repeats, to_coco, samples)
    print(f"labels -> COCO RLE (io.coco)             {t_convert * 1e3:8.1f} ms")
    evals, t_eval = {}, {}
    for iou_type in ("segm", "bbox"):
        evals[iou_type], t_eval[iou_type] = best_of(args.repeats, run_cocoeval, data, iou_type)
        print(f"pycocotools COCOeval {iou_type:4s} (maxDets 1000) {t_eval[iou_type] * 1e3:8.1f} ms")
    capped, t_capped = best_of(args.repeats, run_cocoeval, data, "segm", max_dets=(1, 10, 100))
    print(f"pycocotools COCOeval segm (maxDets 100)  {t_capped * 1e3:8.1f} ms")
    ours, t_ours = best_of(args.repeats, evaluate_instances, samples, with_rand=False)
    print(f"ours: sparse matching, 3 + 10 thresholds  {t_ours * 1e3:8.1f} ms")
    ours_rand, t_ours_rand = best_of(args.repeats, evaluate_instances, samples)
    print(f"ours: + pixel Dice, Rand error, VOI       {t_ours_rand * 1e3:8.1f} ms")

    total_coco = t_convert + t_eval["segm"]
    print(
        f"ratio COCO segm (convert + eval) / ours:  {total_coco / t_ours:6.1f}x "
        f"(COCOeval alone {t_eval['segm'] / t_ours:.1f}x)"
    )

    print("\nmetrics (maxDets 1000 | COCO default 100):")
    flat = coco_metrics(evals)
    for key in ("AP", "AP50", "AP75", "APs", "APm", "AR1000"):
        capped_value = capped.stats.get(key.replace("1000", "100"), float("nan"))
        print(
            f"  segm_{key:7s} {flat[f'segm_{key}']:.4f} | {capped_value:.4f}   "
            f"bbox_{key:7s} {flat[f'bbox_{key}']:.4f}"
        )
    s = ours.summary
    print(
        f"  ours: F1@0.5 {s['f1_50']:.4f}  F1@0.7 {s['f1_70']:.4f}  F1@0.9 {s['f1_90']:.4f}  "
        f"DSB score {s['dsb_ap']:.4f}  Dice {ours_rand.summary['dice']:.4f}  "
        f"ARE {ours_rand.summary['are']:.4f}  VOI {ours_rand.summary['voi']:.4f}"
    )

    print("\ncross-check, per-image TP/FP/FN: COCOeval (greedy by score) vs ours (optimal):")
    per_image = ours.per_image.set_index("image_id")
    for t in (0.5, 0.7, 0.9):
        k = threshold_key(t)
        coco = evals["segm"].match_counts(t).set_index("image_id")
        mine = per_image[[f"tp_{k}", f"fp_{k}", f"fn_{k}"]].set_axis(["tp", "fp", "fn"], axis=1)
        same = bool((coco.loc[mine.index] == mine).all(axis=None))
        print(
            f"  IoU {t}: TP {int(coco['tp'].sum())} vs {int(mine['tp'].sum())}, "
            f"FP {int(coco['fp'].sum())} vs {int(mine['fp'].sum())}, "
            f"FN {int(coco['fn'].sum())} vs {int(mine['fn'].sum())}: "
            f"{'identical on every image' if same else 'DIFFERENT'}"
        )
        if not same:
            raise SystemExit("COCOeval and our matching disagree")

    peer = faster_coco_eval_peer(data, "segm", args.repeats)
    if peer is None:
        print("\nfaster-coco-eval: not installed (not a project dependency); peer unavailable")
    else:
        stats, t_peer = peer
        print(
            f"\nfaster-coco-eval segm {t_peer * 1e3:.1f} ms: {t_eval['segm'] / t_peer:.1f}x "
            f"faster than pycocotools; AP {stats[0]:.4f} vs {flat['segm_AP']:.4f}"
        )


if __name__ == "__main__":
    main()
