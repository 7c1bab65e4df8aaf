"""Does 2.5D input help? YOLOv8n-P2 on single planes vs planes z-1, z, z+1 as channels.

Both models are converted from the same synthetic d3sets (``microseg synth spines``), trained
from scratch with the same seed, epochs and hyper-parameters on CPU, then scored as point F1
(3D dedup at 1500 nm, one-to-one matching within 1000 nm) on the two validation stacks and on
the held-out benchmark stack, at conf 0.25 and at the best conf of a sweep. Prints both and
the 2.5D / single ratios.

    .venv/bin/python benchmarks/bench_yolo_25d.py --data data/prepared/spines [--epochs 15]
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import pandas as pd

from microseg.data.yolo_convert import convert_d3set_to_yolo
from microseg.evaluate.points import evaluate_points
from microseg.evaluate.rates import prf
from microseg.infer.yolo_predict import detections_to_points, predict_stack
from microseg.io.d3set import read_d3set
from microseg.io.points import read_points
from microseg.io.tiff import open_stack
from microseg.models.yolo import YoloSpineDetector

VS = (500.0, 94.0, 94.0)
CONFS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5)


def _f1s(boxes: list[pd.DataFrame], gts: list[pd.DataFrame], radius: float) -> dict[float, float]:
    """Pooled point F1 (summed TP/FP/FN over stacks) per confidence threshold."""
    out = {}
    for conf in CONFS:
        tp = fp = fn = 0
        for df, gt in zip(boxes, gts, strict=True):
            pts = detections_to_points(df[df["score"] >= conf], VS, radius)
            m = evaluate_points(pts, gt, VS, 1000.0)
            tp, fp, fn = tp + m["tp"], fp + m["fp"], fn + m["fn"]
        out[conf] = prf(tp, fp, fn, empty=0.0).f1
    return out


def run(data: Path, work: Path, epochs: int, seed: int, radius: float) -> pd.DataFrame:
    val = read_d3set(data / "val.d3set")
    val_gt = [read_points(data / "points" / f"val_{k}.csv") for k in val.stack_keys()]
    bench_gt = [read_points(data / "benchmark" / "spines.csv")]
    rows = []
    for channels in ("single", "25d"):
        ds = work / f"yolo_{channels}"
        yaml = ds / "spine_detection.yaml"
        if not yaml.exists():
            convert_d3set_to_yolo(data / "train.d3set", data / "val.d3set", ds, channels=channels)
        det = YoloSpineDetector.build("n", channels=channels)
        t0 = time.perf_counter()
        result = det.fit(
            yaml,
            work / f"runs_{channels}_s{seed}_e{epochs}",
            epochs=epochs,
            imgsz=256,
            batch=16,
            seed=seed,
            patience=epochs,
            extra={"val": False},  # validate the last epoch only: the budget goes to training
        )
        train_s = time.perf_counter() - t0
        det = YoloSpineDetector.load(result.best or result.last)
        kw = {"conf": 0.05, "channels": channels, "progress": False}
        val_boxes = [predict_stack(det, val.stacks[k], **kw) for k in val.stack_keys()]
        with open_stack(data / "benchmark" / "stack.tif") as stack:
            bench_boxes = [predict_stack(det, stack, **kw)]
        f_val, f_bench = _f1s(val_boxes, val_gt, radius), _f1s(bench_boxes, bench_gt, radius)
        rows.append(
            {
                "channels": channels,
                "train_s": train_s,
                "val_mAP50": result.metrics.get("val/mAP50", float("nan")),
                "val_f1@0.25": f_val[0.25],
                "val_best_f1": max(f_val.values()),
                "bench_f1@0.25": f_bench[0.25],
                "bench_best_f1": max(f_bench.values()),
                "bench_best_conf": max(f_bench, key=f_bench.get),
            }
        )
    return pd.DataFrame(rows).set_index("channels")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("data/prepared/spines"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/microseg_bench_25d"))
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--radius", type=float, default=1500.0, help="3D dedup radius (nm)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    pd.set_option("display.width", 160)
    pd.set_option("display.precision", 3)
    table = run(args.data, args.work, args.epochs, args.seed, args.radius)
    print(f"YOLOv8n-P2, {args.epochs} epochs, imgsz 256, seed {args.seed}, CPU")
    print(table.to_string())
    ratio = table.loc["25d"] / table.loc["single"]
    print(
        "\n25d / single: "
        f"val best F1 {ratio['val_best_f1']:.3f}, benchmark best F1 {ratio['bench_best_f1']:.3f}, "
        f"benchmark F1@0.25 {ratio['bench_f1@0.25']:.3f}, train time {ratio['train_s']:.3f}"
    )


if __name__ == "__main__":
    main()
