"""Ingest of the 536-image DSB 2018 data: target under 60 s on a 2-core machine.

Peer, in the same process: the notebook way (skimage.io.imread every PNG, paint masks into a
label image one by one, or read the compact label PNG, tifffile.imwrite), single process, no
checks or statistics. ``--source`` takes either layout (the bundled compact one by default, or
the published ``stage1_train``).

    python benchmarks/bench_ingest_dsb.py [--source data/raw/dsb2018]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import tifffile
from skimage import io as skio

from microseg.config import DatasetConfig
from microseg.data.ingest import ingest
from microseg.data.manifest import read_manifest


def notebook_ingest(source: Path, out: Path) -> int:
    out.mkdir(parents=True)
    n = 0
    if (source / "labels").is_dir():  # compact layout
        for path in sorted((source / "images").glob("*.png")):
            tifffile.imwrite(out / f"{path.stem}_img.tif", skio.imread(path))
            tifffile.imwrite(
                out / f"{path.stem}_lab.tif", skio.imread(source / "labels" / path.name)
            )
            n += 1
        return n
    for sample in sorted(p for p in source.iterdir() if p.is_dir()):
        image = skio.imread(sample / "images" / f"{sample.name}.png")[..., :3]
        labels = np.zeros(image.shape[:2], np.uint16)
        for i, m in enumerate(sorted((sample / "masks").glob("*.png")), start=1):
            labels[skio.imread(m) > 0] = i
        tifffile.imwrite(out / f"{sample.name}_img.tif", image)
        tifffile.imwrite(out / f"{sample.name}_lab.tif", labels)
        n += 1
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--source", type=Path, default=Path("data/raw/dsb2018"))
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    cfg = DatasetConfig(format="dsb2018", source=args.source, task="nuclei")
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        out = ingest("dsb2018", cfg, Path(tmp) / "prepared", seed=42, workers=args.workers)
        ours = time.perf_counter() - t0
        n = len(read_manifest(out))
        t0 = time.perf_counter()
        n_peer = notebook_ingest(args.source, Path(tmp) / "peer")
        peer = time.perf_counter() - t0
    print(
        f"microseg ingest ({args.workers} workers, checks + stats + manifest): "
        f"{n} images in {ours:.1f} s"
    )
    print(f"notebook loop (skimage + tifffile, no checks): {n_peer} images in {peer:.1f} s")
    print(f"ratio peer/ours: {peer / ours:.2f}x   target < 60 s: {'PASS' if ours < 60 else 'FAIL'}")


if __name__ == "__main__":
    main()
