"""Whole-plane vs tiled (WBF / NMS fusion) YOLO inference, and the box-definition oracle.

Two measurements on the synthetic spine data (``microseg synth spines``), both scored as point
F1 against head-centre annotations (3D dedup, one-to-one matching within 1000 nm):

``--oracle`` (seconds, no network): ground-truth boxes from the spine masks of the validation
stacks and the benchmark stack, one box per 8-connected component per plane, boxed either as
the whole component (head + neck, DeepD3-V2's converter) or the head only
(``microseg.data.yolo_convert``), fed through ``dedup_3d`` with the component area as score.
This bounds what a perfect detector trained on each box definition could reach.

default: a YOLOv8n-P2 trained on the synthetic training stacks (``--weights``, or trained here
for ``--epochs`` on CPU) predicts the benchmark stack three ways: whole planes at native scale,
tiles of ``--tile`` px with ``--overlap`` px fused by WBF, and fused by NMS. Each is predicted
once at a low confidence; F1 is reported at conf 0.25 and at the best conf of a sweep, with
wall time, and ratios against whole-plane inference measured in the same run.

    .venv/bin/python benchmarks/bench_tiled_fusion.py --oracle --data data/prepared/spines
    .venv/bin/python benchmarks/bench_tiled_fusion.py --data data/prepared/spines \
        [--weights best.pt | --epochs 30] [--tile 256 --overlap 64]
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from microseg.data.yolo_convert import convert_d3set_to_yolo, stack_boxes
from microseg.evaluate.points import evaluate_points
from microseg.evaluate.rates import prf
from microseg.infer.dedup import dedup_3d
from microseg.infer.yolo_predict import detections_to_points, predict_stack
from microseg.io.d3set import read_d3set
from microseg.io.points import read_points
from microseg.io.tiff import open_stack, read_stack

VS = (500.0, 94.0, 94.0)
CONFS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6)


def oracle(data: Path) -> pd.DataFrame:
    """Point F1 of ground-truth boxes per box definition, box score and dedup radius.

    Scores: the component area (a detector's confidence tends to peak where the spine is
    biggest) and a random score (a detector whose confidence says nothing about the plane).
    F1 is reported on the benchmark stack and pooled (summed TP/FP/FN) over every stack.
    """
    d3 = read_d3set(data / "val.d3set")
    cases = [
        (f"val_{k}", d3.spines[k], read_points(data / "points" / f"val_{k}.csv"))
        for k in d3.stack_keys()
    ]
    d3 = read_d3set(data / "train.d3set")
    cases += [
        (f"train_{k}", d3.spines[k], read_points(data / "points" / f"train_{k}.csv"))
        for k in d3.stack_keys()
    ]
    bench_mask = read_stack(data / "benchmark" / "spine_mask.tif").astype(bool)
    cases.append(("benchmark", bench_mask, read_points(data / "benchmark" / "spines.csv")))
    rows = []
    for box in ("component", "head"):
        boxes = {name: stack_boxes(mask, box=box, min_box_px=10) for name, mask, _ in cases}
        for score in ("area", "random"):
            for mode, radii in (
                ("nms", np.arange(1000.0, 2001.0, 125.0)),
                ("cluster", (500.0, 1000.0)),
            ):
                for radius in radii:
                    rng = np.random.default_rng(0)
                    tp = fp = fn = 0
                    row = {"box": box, "score": score, "mode": mode, "radius_nm": float(radius)}
                    for name, _, gt in cases:
                        df = boxes[name].copy()
                        df["s"] = df["area"] if score == "area" else rng.random(len(df))
                        pts = dedup_3d(df, VS, radius, score_col="s", mode=mode)
                        m = evaluate_points(pts, gt, VS, 1000.0)
                        tp, fp, fn = tp + m["tp"], fp + m["fp"], fn + m["fn"]
                        if name == "benchmark":
                            row["f1_benchmark"] = m["f1"]
                            row["dist_nm_benchmark"] = m["mean_distance_nm"]
                    row["f1_pooled"] = prf(tp, fp, fn, empty=1.0).f1
                    rows.append(row)
    return pd.DataFrame(rows)


def _train(data: Path, work: Path, epochs: int) -> Path:
    from microseg.models.yolo import YoloSpineDetector

    yaml = work / "yolo_single" / "spine_detection.yaml"
    if not yaml.exists():
        convert_d3set_to_yolo(data / "train.d3set", data / "val.d3set", yaml.parent)
    det = YoloSpineDetector.build("n", channels="single")
    result = det.fit(yaml, work / "runs", epochs=epochs, imgsz=256, batch=16, patience=epochs)
    return result.best or result.last


def _f1_by_conf(df: pd.DataFrame, gt: pd.DataFrame, radius: float) -> dict[float, float]:
    out = {}
    for conf in CONFS:
        pts = detections_to_points(df[df["score"] >= conf], VS, radius)
        out[conf] = evaluate_points(pts, gt, VS, 1000.0)["f1"]
    return out


def fusion(
    data: Path, weights: Path, tile: int, overlap: int, radius: float, repeats: int, edge_px: float
) -> pd.DataFrame:
    from microseg.models.yolo import YoloSpineDetector

    det = YoloSpineDetector.load(weights)
    gt = read_points(data / "benchmark" / "spines.csv")
    methods = {
        "whole": {"tile": None},
        "tiled+wbf": {"tile": (tile, overlap), "fusion": "wbf", "edge_px": edge_px},
        "tiled+nms": {"tile": (tile, overlap), "fusion": "nms", "edge_px": edge_px},
    }
    rows = []
    with open_stack(data / "benchmark" / "stack.tif") as stack:
        predict_stack(det, stack, conf=0.05, batch_planes=8, progress=False)  # warm-up
        for name, kw in methods.items():
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                df = predict_stack(
                    det, stack, conf=0.05, iou=0.7, batch_planes=8, progress=False, **kw
                )
                times.append(time.perf_counter() - t0)
            f1 = _f1_by_conf(df, gt, radius)
            best = max(f1, key=f1.get)
            rows.append(
                {
                    "method": name,
                    "f1@0.25": f1[0.25],
                    "best_f1": f1[best],
                    "best_conf": best,
                    "boxes": len(df),
                    "seconds": min(times),
                }
            )
    out = pd.DataFrame(rows).set_index("method")
    out["f1_ratio"] = out["best_f1"] / out.loc["whole", "best_f1"]
    out["time_ratio"] = out["seconds"] / out.loc["whole", "seconds"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("data/prepared/spines"))
    ap.add_argument("--oracle", action="store_true", help="only the box-definition oracle")
    ap.add_argument("--weights", type=Path, help="trained YOLO weights (else train here)")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--work", type=Path, default=Path("/tmp/microseg_bench_fusion"))
    ap.add_argument("--tile", type=int, default=256)
    ap.add_argument("--overlap", type=int, default=64)
    ap.add_argument("--radius", type=float, default=1500.0, help="3D dedup radius (nm)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--edge-px", type=float, default=2.0, help="drop tile-cut boxes (-1: keep)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    pd.set_option("display.width", 160)
    pd.set_option("display.precision", 3)

    if args.oracle:
        table = oracle(args.data)
        print("Oracle: ground-truth boxes -> dedup_3d -> point F1 @ 1000 nm")
        wide = table.pivot_table(
            index=["score", "mode", "radius_nm"],
            columns="box",
            values=["f1_benchmark", "f1_pooled", "dist_nm_benchmark"],
        )
        print(wide.to_string())
        best = table.groupby(["box", "score"])[["f1_benchmark", "f1_pooled"]].max()
        print("\nbest over dedup settings:")
        print(best.to_string())
        wins = (wide["f1_pooled"]["head"] > wide["f1_pooled"]["component"]).sum()
        pooled = best["f1_pooled"]
        area = pooled[("head", "area")] / pooled[("component", "area")]
        rand = pooled[("head", "random")] / pooled[("component", "random")]
        print(
            f"head beats component (pooled F1) in {wins} of {len(wide)} settings; best pooled "
            f"F1 head/component = {area:.3f} (area score), {rand:.3f} (random score)"
        )
        return

    weights = args.weights or _train(args.data, args.work, args.epochs)
    edge = None if args.edge_px < 0 else args.edge_px
    table = fusion(args.data, weights, args.tile, args.overlap, args.radius, args.repeats, edge)
    shape = read_stack(args.data / "benchmark" / "stack.tif").shape
    print(f"Benchmark stack {shape}, tile {args.tile}/{args.overlap} px, weights {weights}")
    print(table.to_string())
    best = table["best_f1"].idxmax()
    wbf_nms = table.loc["tiled+wbf", "best_f1"] / table.loc["tiled+nms", "best_f1"]
    print(
        f"\nbest F1: {best} ({table.loc[best, 'best_f1']:.3f}); "
        f"tiled+wbf / tiled+nms F1 ratio {wbf_nms:.3f}"
    )


if __name__ == "__main__":
    main()
