"""Scale-out throughput: ``microseg predict`` on a folder with the Ray engine, 1 vs 2 workers.

The peer is the same run on one Ray worker (and, for reference, ``--engine local`` in this
process). Every run predicts the same synthetic nuclei images (bright discs on noise,
``--size`` square) with the classical ``otsu`` model into a fresh folder; the Ray cluster is
started once, before the clock, so each time includes starting the workers and loading the
model in each, as a real run pays. Each engine runs twice, on ``--images`` and on twice as
many: the difference of the two times is the steady rate (images per second once the workers
are up), the first time alone the rate a run of that size sees. The script prints both and the
ratio of 2 workers to 1; with two free cores the steady ratio can approach 2.

    .venv/bin/python benchmarks/bench_batch_scale.py [--images 8] [--size 512]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from microseg.config import load_params
from microseg.stages.predict import predict_stacks
from microseg.utils.engine import EngineOptions

REPO = Path(__file__).resolve().parents[1]


def nuclei_image(rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    image = rng.normal(20, 3, (size, size))
    for _ in range(size // 16):
        cy, cx = rng.integers(12, size - 12, 2)
        image[(yy - cy) ** 2 + (xx - cx) ** 2 < 36] = 200
    return np.clip(image, 0, 255).astype(np.uint8)


def run(params, folder: Path, out: Path, options: EngineOptions, n: int) -> float:
    t0 = time.perf_counter()
    result = predict_stacks(params, folder, out, "otsu", engine=options)
    seconds = time.perf_counter() - t0
    assert len(result.messages) == n and not result.failed, (result.failed, result.skipped)
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args()

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    params = load_params(REPO / "params.yaml")
    rng = np.random.default_rng(0)
    n = args.images
    engines = {
        "local": EngineOptions(),
        "ray x1": EngineOptions(engine="ray", num_workers=1),
        "ray x2": EngineOptions(engine="ray", num_workers=2),
    }
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        folders = {}
        for count in (n, 2 * n):
            folders[count] = Path(tmp) / f"images{count}"
            folders[count].mkdir()
            for i in range(count):
                image = nuclei_image(rng, args.size)
                Image.fromarray(image).save(folders[count] / f"img{i:03d}.png")
        cpus = os.cpu_count() or 1
        ray.init(num_cpus=max(2, cpus), include_dashboard=False, log_to_driver=False,
                 configure_logging=False)  # fmt: skip
        try:  # imports and first-call costs of this process, before any clock
            run(params, folders[n], Path(tmp) / "warm-up", EngineOptions(), n)
            for name, opts in engines.items():
                t = {}
                for count in (n, 2 * n):
                    out = Path(tmp) / f"out-{name}-{count}".replace(" ", "")
                    t[count] = run(params, folders[count], out, opts, count)
                rows[name] = (t[n], n / t[n], n / max(t[2 * n] - t[n], 1e-9))
        finally:
            ray.shutdown()
    print(
        f"otsu on {args.size}x{args.size} images, {cpus} CPU cores (load: {os.getloadavg()[0]:.1f})"
    )
    print(f"  {'engine':<8} {n:>3} images   run rate   steady rate (from {n} more images)")
    for name, (seconds, rate, steady) in rows.items():
        print(f"  {name:<8} {seconds:8.2f} s  {rate:6.2f}/s   {steady:6.2f}/s")
    one, two = rows["ray x1"], rows["ray x2"]
    print(f"ray 2 workers / 1 worker: run {two[1] / one[1]:.2f}x, steady {two[2] / one[2]:.2f}x")
    print(f"ray 1 worker / local:     run {one[1] / rows['local'][1]:.2f}x, "
          f"steady {one[2] / rows['local'][2]:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
