"""Mixed precision against fp32 on the same machine: seconds per step and the validation metric.

Trains the demo's U-Net (``cells.models.unet`` widths, DSB targets cache from ``dvc repro
prepare_targets``) and the Prob-UNet (``punet.train`` widths, the synthetic spine d3sets) for a
few epochs with ``precision: 32-true`` and then with ``--precision`` (default ``bf16-mixed``),
same seed, same batches, and prints the speed ratio and both validation metrics. Meant for a
GPU runner (``--device cuda``); on a CPU bf16 autocast is usually slower than fp32.

    .venv/bin/python benchmarks/bench_precision.py --device cuda [--precision 16-mixed]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from microseg.config import load_params

ROOT = Path(__file__).resolve().parents[1]


def unet_run(params, precision: str, device: str, epochs: int, steps: int) -> tuple[float, float]:
    from microseg.models.unet.train import UnetTrainConfig, train_unet

    section = params.engine.train_section(dict(params.cells.models["unet"].train))
    cfg = UnetTrainConfig.from_mapping(
        {
            **section,
            "epochs": epochs,
            "steps_per_epoch": steps,
            "precision": precision,
            "device": device,
            "progress": False,
            "num_threads": None,
        }
    )
    targets = ROOT / "data" / "targets" / params.cells.dataset
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = train_unet(targets, tmp, cfg)
        seconds = time.perf_counter() - t0
    return seconds / (epochs * steps), float(result.best.get("val_f1_50", float("nan")))


def punet_run(params, precision: str, device: str, epochs: int, steps: int) -> tuple[float, float]:
    from microseg.models.punet.train import PunetTrainConfig, train_punet

    section = params.engine.train_section(dict(params.punet.train))
    cfg = PunetTrainConfig.from_mapping(
        {
            **section,
            "epochs": epochs,
            "steps_per_epoch": steps,
            "precision": precision,
            "device": device,
            "progress": False,
            "num_threads": None,
        }
    )
    src = Path(params.datasets["spines"].source)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        result = train_punet(src / "train.d3set", src / "val.d3set", tmp, cfg)
        seconds = time.perf_counter() - t0
    return seconds / (epochs * steps), float(result.best.get("val_spine_dice", float("nan")))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="bf16-mixed")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--families", nargs="+", default=["unet", "punet"])
    args = ap.parse_args()
    params = load_params(ROOT / "params.yaml")
    runs = {"unet": unet_run, "punet": punet_run}
    name = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    print(f"device {args.device} ({name}), {args.epochs} epochs x {args.steps} steps")
    for family in args.families:
        base_s, base_m = runs[family](params, "32-true", args.device, args.epochs, args.steps)
        mixed_s, mixed_m = runs[family](
            params, args.precision, args.device, args.epochs, args.steps
        )
        print(
            f"{family:6s} 32-true {1000 * base_s:7.1f} ms/step (val {base_m:.3f})  "
            f"{args.precision} {1000 * mixed_s:7.1f} ms/step (val {mixed_m:.3f})  "
            f"speed-up x{base_s / mixed_s:.2f}"
        )


if __name__ == "__main__":
    main()
