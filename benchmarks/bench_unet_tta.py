"""Test-time mirroring of a trained nuclei U-Net: F1@0.5 and seconds, with and without it.

For each setting the validation images choose the watershed thresholds (``cells.post_grid``,
as ``evaluate_cells`` does) and the test split is scored pooled, overall and per modality
(fluorescence vs tissue), with the defaults and with the chosen thresholds. Needs a trained
model (``dvc repro train_cells@unet``) and the prepared DSB sample.

    .venv/bin/python benchmarks/bench_unet_tta.py [--model unet] [--weights DIR]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict
from pathlib import Path

import torch

from microseg.config import load_params
from microseg.data.manifest import read_manifest
from microseg.infer.watershed import PostprocessConfig
from microseg.io.tiff import read_stack
from microseg.stages.cells import MODELS_ROOT, load_model, model_config
from microseg.tune.postprocess import pooled_f1, search_postprocess

ROOT = Path(__file__).resolve().parents[1]


def modality_f1(items, post: PostprocessConfig, modality: str | None) -> float:
    """Pooled F1@0.5 over the ``(modality, probs, labels)`` items of one modality (None: all)."""
    chosen = [(p, gt) for mod, p, gt in items if modality is None or mod == modality]
    return pooled_f1([c[0] for c in chosen], [c[1] for c in chosen], post)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="unet")
    ap.add_argument("--weights", type=Path, default=None, help="folder with best.pt")
    args = ap.parse_args()
    torch.set_num_threads(1)
    params = load_params(ROOT / "params.yaml")
    mc = model_config(params, args.model)
    prepared = ROOT / params.paths.prepared / params.cells.dataset
    m = read_manifest(prepared)
    weights = (args.weights or ROOT / MODELS_ROOT / args.model) / "best.pt"
    seconds = {}
    for tta in (False, True):
        mc_tta = mc.model_copy(update={"infer": {**mc.infer, "tta": tta}})
        model = load_model(mc_tta, weights.parent)
        data, t0 = {}, time.perf_counter()
        for split in ("val", "test"):
            rows = m[(m["split"] == split) & (m["label_kind"] == "instance")]
            data[split] = [
                (r.modality, model.probabilities(read_stack(prepared / r.image_path)),
                 read_stack(prepared / r.label_path))
                for r in rows.itertuples()
            ]  # fmt: skip
        seconds[tta] = time.perf_counter() - t0
        val = data["val"]
        chosen, _ = search_postprocess(
            [v[1] for v in val], [v[2] for v in val], model.infer.post, params.cells.post_grid
        )
        for label, post in (("defaults", model.infer.post), ("val-chosen", chosen)):
            scores = {
                name: round(modality_f1(data["test"], post, mod), 4)
                for name, mod in (("all", None), ("fluorescence", "fluorescence"),
                                  ("tissue", "tissue"))
            }  # fmt: skip
            val_f1 = modality_f1(val, post, None)
            print(f"tta={tta!s:5} {label:10} val F1@0.5 {val_f1:.4f}  test F1@0.5 {scores}")
        print(f"           chosen: { {k: asdict(chosen)[k] for k in params.cells.post_grid} }")
    print(f"probabilities of {len(data['val']) + len(data['test'])} images: "
          f"{seconds[False]:.1f} s plain, {seconds[True]:.1f} s mirrored "
          f"(x{seconds[True] / seconds[False]:.2f})")  # fmt: skip


if __name__ == "__main__":
    main()
