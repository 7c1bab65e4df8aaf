"""What the Lightning engine costs per optimizer step, against a plain PyTorch loop.

Both train the demo's U-Net (``cells.models.unet`` widths) on the same random patch batches
of the DSB targets cache (``data/targets/dsb2018``, built by ``dvc repro prepare_targets``),
with the same loss, AdamW, per-step warm-up/cosine schedule and gradient clipping, one
thread, no validation. The peer is the hand-written loop the engine replaced; the engine adds
the Trainer's hooks, our epoch callback and an atomic ``last.ckpt`` per epoch.

    .venv/bin/python benchmarks/bench_engine_overhead.py [--steps 60] [--epochs 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from microseg.config import load_params
from microseg.data.targets import load_targets
from microseg.models.unet.network import build_unet
from microseg.models.unet.train import (
    PatchSampler,
    UnetDataModule,
    UnetModule,
    UnetTrainConfig,
    _train_items,
)
from microseg.train.engine import fit
from microseg.train.family import epoch_seed
from microseg.train.schedules import warmup_cosine
from microseg.train.softmax_losses import build_loss

ROOT = Path(__file__).resolve().parents[1]


def plain_loop(cfg: UnetTrainConfig, targets: Path) -> float:
    sampler = PatchSampler(_train_items(load_targets(targets, "train"), cfg), cfg)
    torch.manual_seed(cfg.seed)
    model = build_unet(cfg.model)
    loss_fn = build_loss(cfg.loss, **cfg.loss_params)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    total = cfg.epochs * cfg.steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total, cfg.warmup_steps, 0.02))
    t0 = time.perf_counter()
    for epoch in range(cfg.epochs):
        seed = epoch_seed(cfg.seed, epoch)
        sampler.reseed(seed)
        rng = np.random.default_rng(seed)
        model.train()
        for _ in range(cfg.steps_per_epoch):
            b = sampler.batch(rng)
            loss = loss_fn(model(b["image"]), b["target"], b["weight"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip_norm or 1e9)
            opt.step()
            sched.step()
    return time.perf_counter() - t0


def engine(cfg: UnetTrainConfig, targets: Path) -> float:
    data = UnetDataModule(targets, cfg)
    data.setup("fit")
    module = UnetModule(cfg)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        fit(module, data, cfg, tmp, has_val=False)
        return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(1)
    params = load_params(ROOT / "params.yaml")
    targets = ROOT / "data" / "targets" / params.cells.dataset
    train = dict(params.cells.models["unet"].train)
    cfg = UnetTrainConfig.from_mapping(
        {
            **train,
            "epochs": args.epochs,
            "steps_per_epoch": args.steps,
            "val_every": args.epochs + 1,  # no validation in either
            "progress": False,
            "device": "cpu",
            "num_threads": 1,
        }
    )
    steps = args.epochs * args.steps
    plain, light = [], []
    for _ in range(args.repeats):  # interleaved, so a busy neighbour hits both alike
        plain.append(plain_loop(cfg, targets))
        light.append(engine(cfg, targets))
    p, e = min(plain), min(light)
    print(
        f"{steps} steps, U-Net {cfg.model.arch} {list(cfg.model.features)}, batch "
        f"{cfg.batch_size} at {cfg.patch_size} px, 1 CPU thread (best of {args.repeats})"
    )
    print(f"plain PyTorch loop : {p:7.2f} s  ({1000 * p / steps:6.1f} ms/step)")
    print(f"Lightning engine   : {e:7.2f} s  ({1000 * e / steps:6.1f} ms/step)")
    print(f"engine / plain     : {e / p:.3f}")


if __name__ == "__main__":
    main()
