"""Probabilistic U-Net sampling: U-Net features once per tile vs a full forward per sample.

Both paths draw the same ``S`` latents from the prior of one tile and must give the same
logits. The naive path is what a straightforward implementation does (and what the
``sample`` loop of the DeepD3.V2 seed costs when ``forward`` is called per sample): U-Net,
prior net and concatenating head per sample. The efficient path runs the U-Net and the prior
once and only the 1x1 heads per sample, with the first head convolution split into a
feature part (once) and a latent part (a per-sample bias).

    .venv/bin/python benchmarks/bench_punet_sampling.py [--tile 128] [--samples 24]
        [--filters 32,64,128,192] [--latent 12] [--head-convs 4] [--batch 1] [--threads N]
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from microseg.models.punet.network import HEADS, ProbUNet

log = logging.getLogger("bench_punet_sampling")


@torch.no_grad()
def naive(model: ProbUNet, x: torch.Tensor, eps: dict[str, torch.Tensor]) -> dict:
    """A full forward (U-Net + prior + concatenating heads) for every sample."""
    n = eps[HEADS[0]].shape[1]
    outs: dict[str, list[torch.Tensor]] = {k: [] for k in HEADS}
    for s in range(n):
        features = model.unet_features(x)
        prior = model.prior(x)
        z = {k: prior[k].base_dist.loc + prior[k].base_dist.scale * eps[k][:, s] for k in HEADS}
        logits = model.head_logits(features, z)
        for k in HEADS:
            outs[k].append(logits[k])
    return {k: torch.cat(v, dim=1) for k, v in outs.items()}


@torch.no_grad()
def efficient(model: ProbUNet, x: torch.Tensor, eps: dict[str, torch.Tensor]) -> dict:
    """U-Net features and prior once; only the heads per sample (batched in chunks)."""
    features = model.unet_features(x)
    prior = model.prior(x)
    z = {
        k: prior[k].base_dist.loc[:, None] + prior[k].base_dist.scale[:, None] * eps[k]
        for k in HEADS
    }
    return model.sample_heads(features, prior, z=z, chunk=8)


def timed(fn, repeats: int) -> tuple[float, dict]:
    out = fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tile", type=int, default=128)
    ap.add_argument("--samples", type=int, default=24)
    ap.add_argument("--filters", default="32,64,128,192")
    ap.add_argument("--latent", type=int, default=12)
    ap.add_argument("--head-convs", type=int, default=4)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    filters = tuple(int(f) for f in args.filters.split(","))
    model = ProbUNet(
        filters=filters,
        latent_dim_spine=args.latent,
        latent_dim_dendrite=args.latent,
        head_convs=args.head_convs,
    ).eval()
    x = torch.randn(args.batch, 1, args.tile, args.tile)
    eps = {k: torch.randn(args.batch, args.samples, model.latent_dims[k]) for k in HEADS}
    t_naive, out_naive = timed(lambda: naive(model, x, eps), args.repeats)
    t_eff, out_eff = timed(lambda: efficient(model, x, eps), args.repeats)
    diff = max(float((out_naive[k] - out_eff[k]).abs().max()) for k in HEADS)
    log.info(
        "ProbUNet filters=%s latent=%d head_convs=%d, %d tile(s) of %dx%d, S=%d, %d threads",
        filters,
        args.latent,
        args.head_convs,
        args.batch,
        args.tile,
        args.tile,
        args.samples,
        torch.get_num_threads(),
    )
    log.info("naive (full forward per sample): %8.3f s", t_naive)
    log.info("efficient (features once):       %8.3f s", t_eff)
    log.info("ratio naive / efficient:         %8.1fx", t_naive / t_eff)
    log.info("max |logit difference|:          %8.2e", diff)


if __name__ == "__main__":
    main()
