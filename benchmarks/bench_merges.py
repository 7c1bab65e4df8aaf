"""Does MAUNet's distance head reduce merges? Three decodes of one trained network, same budget.

One MAUNet (``models/cells/<model>``, trained by ``dvc repro``) gives 4-channel maps: the
3-class softmax and the predicted distance. Its 3-class channels alone are what a 3-class U-Net
gives, so decoding them as the U-Net is decoded isolates the distance head's contribution at
the same encoder, data and training budget:

- ``3-class``: interior seeds, the U-Net's grid (``cells.post_grid``);
- ``distance``: seeds at the peaks of the raw predicted distance, flooded over ``-distance``;
- ``distance, shaped``: the distance weighted by the interior share and smoothed
  (``seed_weight``, ``seed_sigma``; ``cells.post_grids.<family>``, what the pipeline uses).

Each decode's thresholds are chosen on the validation split (pooled F1 at IoU 0.5), then the
test split is scored once: pooled F1@0.5, merges and splits (:mod:`microseg.evaluate.errors_
analysis`), and the paired bootstrap interval of the per-image difference to ``3-class``.

    .venv/bin/python benchmarks/bench_merges.py [--model maunet] [--val-images 81] [--out F]
        [--cache DIR]   (maps kept as float16 .npz: a rerun only decodes)
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pandas as pd

from microseg.config import load_params
from microseg.data.manifest import read_manifest
from microseg.evaluate.errors_analysis import classify_errors
from microseg.evaluate.instances import image_scores
from microseg.evaluate.paired import bootstrap_mean_ci
from microseg.infer.watershed import PostprocessConfig, probs_to_instances
from microseg.io.tiff import read_stack
from microseg.stages.cells import load_model, model_config, stratified_head
from microseg.tune.postprocess import search_postprocess


def maps(model, prepared: Path, rows: pd.DataFrame, cache: Path | None) -> tuple[list, list]:
    """Each image's 4-channel maps (read from / written to ``cache`` when given) and GT."""
    probs = []
    for r in rows.itertuples():
        f = cache / f"{r.split}_{r.sample_id}.npz" if cache else None
        if f is not None and f.is_file():
            probs.append(np.load(f)["probs"].astype(np.float32))
            continue
        probs.append(model.probabilities(read_stack(prepared / r.image_path)))
        if f is not None:
            np.savez_compressed(f, probs=probs[-1].astype(np.float16))
    return probs, [read_stack(prepared / r.label_path) for r in rows.itertuples()]


def per_image(probs: list, gts: list, cfg: PostprocessConfig, channels: int) -> pd.DataFrame:
    rows = []
    for p, gt in zip(probs, gts, strict=True):
        pred = probs_to_instances(p[:channels], cfg)
        s = image_scores(gt, pred, (0.5,), dsb_thresholds=(), with_rand=False)
        e = classify_errors(gt, pred, threshold=0.5)
        rows.append({"tp": s["tp_50"], "fp": s["fp_50"], "fn": s["fn_50"],
                     "f1": s["f1_50"], "merges": e.merge_pred_ids.size,
                     "splits": e.split_gt_ids.size})  # fmt: skip
    return pd.DataFrame(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="maunet")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--val-images", type=int, default=None, help="stratified val subset")
    ap.add_argument("--out", type=Path, default=None, help="write the table as JSON")
    ap.add_argument("--cache", type=Path, default=None, help="maps as float16 .npz (reused)")
    args = ap.parse_args()
    params = load_params(args.params)
    mc = model_config(params, args.model)
    model = load_model(mc, Path("models/cells") / args.model)
    prepared = params.paths.prepared / params.cells.dataset
    m = read_manifest(prepared)
    m = m[m["label_kind"] == "instance"]
    val = m[m["split"] == "val"]
    if args.val_images:
        val = stratified_head(val, args.val_images)
    if args.cache:
        args.cache.mkdir(parents=True, exist_ok=True)
    vp, vg = maps(model, prepared, val, args.cache)
    tp_, tg = maps(model, prepared, m[m["split"] == params.cells.split], args.cache)
    base = model.infer.post
    raw = replace(base, seed_weight="none", seed_sigma=0.0)
    own = params.cells.post_grids.get(mc.family, {})
    raw_grid = {k: v for k, v in own.items() if k not in ("seed_weight", "seed_sigma")}
    decodes = {
        "3-class": (PostprocessConfig(), params.cells.post_grid, 3),
        "distance": (raw, raw_grid, 4),
        "distance, shaped": (base, own, 4),
    }
    tables, out = {}, {"model": args.model, "val_images": len(vp), "test_images": len(tp_)}
    for name, (start, grid, ch) in decodes.items():
        chosen, _ = search_postprocess([p[:ch] for p in vp], vg, start, grid)
        t = tables[name] = per_image(tp_, tg, chosen, ch)
        tp, fp, fn = (int(t[c].sum()) for c in ("tp", "fp", "fn"))
        out[name] = {"f1_50": 2 * tp / max(2 * tp + fp + fn, 1), "merges": int(t.merges.sum()),
                     "splits": int(t.splits.sum()), "tp": tp, "fp": fp, "fn": fn,
                     "post": asdict(chosen)}  # fmt: skip
    ref = tables["3-class"]
    for name in ("distance", "distance, shaped"):
        for col in ("f1", "merges"):
            d = (tables[name][col] - ref[col]).to_numpy(float)
            lo, hi = bootstrap_mean_ci(d)
            out[name][f"{col}_diff_per_image"] = {"mean": float(d.mean()), "low": lo, "high": hi}
    print(f"{'decode':18} {'F1@0.5':>7} {'merges':>7} {'splits':>7}  per-image diff to 3-class")
    for name in decodes:
        r = out[name]
        diff = ""
        for col in ("f1", "merges"):
            if f"{col}_diff_per_image" in r:
                c = r[f"{col}_diff_per_image"]
                diff += f"  {col} {c['mean']:+.3f} [{c['low']:+.3f}, {c['high']:+.3f}]"
        print(f"{name:18} {r['f1_50']:7.3f} {r['merges']:7d} {r['splits']:7d}{diff}")
    if args.out:
        args.out.write_text(json.dumps(out, indent=2, default=float) + "\n")


if __name__ == "__main__":
    main()
