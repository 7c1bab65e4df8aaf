"""Score the linker on the train/val sequences (01, 02) with a segmenter's masks: how the
``tracking.link`` knobs in params.yaml were chosen (never on the test sequence 03).

Run after ``dvc repro train_tracking_seg``. Segments 01/02 once per segmenter (cached under
reports/tracking_knobs/masks/<name>/), links them with
params.yaml's tracking.link plus ``--set key=value`` overrides (each a LinkConfig field,
values parsed as YAML), writes CTC results to a temp folder and scores them with
py-ctcmetrics. ``--post key=value`` overrides the segmenter's post-processing
(``infer.post``, a PostprocessConfig field; masks cached per override set): how
``tracking.segmenters.maunet.infer.post`` was chosen. ``--masks gt`` links shuffled ground
truth with the model-mask repairs off, as ``tracking.masks: gt`` does. ``merged`` counts the
frames, in the 8 after each true division, where one mask covers both daughters (what no
linker can time).

    .venv/bin/python benchmarks/tracking_knobs.py --model unet --set join_pinched=false
    .venv/bin/python benchmarks/tracking_knobs.py --model maunet --post peak_h=0.2
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import yaml

from microseg.config import load_params
from microseg.infer.tracking import LinkConfig, link
from microseg.io import ctc, tiff
from microseg.stages import tracking as st

KEYS = ("CT", "BC(0)", "BC(1)", "TRA", "HOTA", "tp_div(0)", "fp_div(0)", "fn_div(0)")
CACHE = Path("reports/tracking_knobs/masks")


def masks_of(params, name: str, seq: str, post: dict | None = None) -> np.ndarray:
    post = post or {}
    tag = hashlib.md5(json.dumps(post, sort_keys=True).encode()).hexdigest()[:8]
    folder = CACHE / name / tag if post else CACHE / name
    path = folder / f"{seq}.tif"
    if not path.exists():
        sets = {f"tracking.segmenters.{name}.infer.post.{k}": v for k, v in post.items()}
        for split in ("train", "val", "test"):
            p = load_params("params.yaml", {"tracking.split": split, **sets})
            if seq in st._sequences(p, split):
                st.segment_sequences(p, name, out_dir=folder)
                break
    return tiff.read_stack(path)


def merged_daughters(gt, pred: np.ndarray, horizon: int = 8) -> int:
    """Frames, in the ``horizon`` after each true division, where the mask covering most of
    one daughter also covers most of her sister."""
    tracks = gt.tracks
    n = 0
    for _, kids in tracks[tracks["P"] > 0].groupby("P"):
        if len(kids) != 2:
            continue
        (a, b), start = kids["L"].tolist(), int(kids["B"].max())
        for t in range(start, min(int(kids["E"].min()), start + horizon - 1) + 1):
            ids = []
            for d in (a, b):
                v = pred[t][gt.tra[t] == d]
                v = v[v > 0]
                ids.append(int(np.bincount(v).argmax()) if v.size else 0)
            n += ids[0] == ids[1] > 0
    return n


def score(
    params,
    name: str,
    seqs,
    overrides: dict,
    gt_masks: bool,
    linker: str = "ours",
    post: dict | None = None,
):
    from microseg.evaluate.tracking import evaluate_ctc

    cfg = LinkConfig.from_mapping({**params.tracking.link, **overrides})
    if gt_masks:
        cfg = dataclasses.replace(cfg, split_merges=False, join_pinched=False)
    gt_root = params.dataset_source("tracking")
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for seq in seqs:
            gt = ctc.read_ctc_gt(gt_root, seq)
            if gt_masks:
                masks = st.shuffled_ids(gt.tra, params.seed)
            else:
                masks = masks_of(params, name, seq, post)
            if linker == "laptrack":
                from microseg.infer.tracking_laptrack import link_laptrack

                tracked, tracks = link_laptrack(masks, params.tracking.laptrack)
            else:
                tracked, tracks = link(masks, cfg, images=gt.frames)
            ctc.write_ctc_result(Path(tmp), seq, tracked, tracks)
            s = evaluate_ctc(gt_root, seq, Path(tmp))
            rows[seq] = {k: s.get(k) for k in KEYS} | {"merged": merged_daughters(gt, masks)}
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="unet")
    ap.add_argument("--seqs", nargs="+", default=["01", "02"])
    ap.add_argument("--set", nargs="*", default=[], dest="sets")
    ap.add_argument("--post", nargs="*", default=[], dest="posts")
    ap.add_argument("--masks", choices=["model", "gt"], default="model")
    ap.add_argument("--linker", default="ours")
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    params = load_params("params.yaml")
    overrides = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in a.sets)}
    post = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in a.posts)}
    rows = score(params, a.model, a.seqs, overrides, a.masks == "gt", a.linker, post)
    if a.json:
        json.dump(rows, sys.stdout)
        return
    tag = f"{a.model if a.masks == 'model' else 'gt'} {a.linker} {overrides} post {post}"
    for seq, r in rows.items():
        print(
            f"{tag} {seq}: CT {r['CT']:.3f} BC0 {r['BC(0)']:.3f} BC1 {r['BC(1)']:.3f} "
            f"TRA {r['TRA']:.4f} HOTA {r['HOTA']:.3f} div0 tp/fp/fn "
            f"{r['tp_div(0)']}/{r['fp_div(0)']}/{r['fn_div(0)']} merged {r['merged']}"
        )


if __name__ == "__main__":
    main()
