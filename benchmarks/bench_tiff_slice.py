"""Memory to read one plane of a ~2 GB stack: ``TiffStack`` (lazy) vs ``tifffile.imread`` (peer).

Writes an uncompressed uint16 ImageJ stack plane by plane into a temporary folder (so making
it never needs 2 GB of RAM), then in this one process measures the peak-RSS increase (VmHWM,
reset before each reader, Linux) and the tracemalloc peak of (a) ``open_stack(path)[z]``
and (b) ``tifffile.imread(path)[z]``, prints both and their ratio, and deletes the file.

    .venv/bin/python benchmarks/bench_tiff_slice.py [--gib 2.0] [--dir /tmp]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import tifffile

from microseg.io.tiff import open_stack

log = logging.getLogger("bench_tiff_slice")

PLANE_YX = (2048, 2048)


def _status_bytes(field: str) -> int:
    """A ``VmRSS``/``VmHWM`` line of /proc/self/status in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> int:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS and return that RSS.

    Writing 5 to clear_refs does this for our own process; without it the peak left by
    writing the stack would hide the lazy reader's (small) peak.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        log.warning("cannot reset peak RSS; the lazy reader's number is an upper bound")
    return _status_bytes("VmRSS")


def _planes(n: int) -> Iterator[np.ndarray]:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 4096, PLANE_YX, dtype=np.uint16)
    for z in range(n):
        yield base + np.uint16(z)


def make_stack(path: Path, gib: float) -> tuple[int, ...]:
    n_planes = max(2, round(gib * 2**30 / (2 * PLANE_YX[0] * PLANE_YX[1])))
    shape = (n_planes, *PLANE_YX)
    tifffile.imwrite(path, _planes(n_planes), shape=shape, dtype=np.uint16, imagej=True)
    return shape


def measure(fn: Callable[[], np.ndarray]) -> tuple[float, int, int, np.ndarray]:
    """Seconds, peak-RSS increase and tracemalloc peak (bytes) of one call."""
    rss_before = _reset_peak_rss()
    tracemalloc.start()
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return seconds, _status_bytes("VmHWM") - rss_before, traced_peak, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=2.0, help="stack size in GiB")
    parser.add_argument("--dir", default=None, help="where to put the temporary stack")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench_tiff_") as tmp:
        path = Path(tmp) / "stack.tif"
        start = time.perf_counter()
        shape = make_stack(path, args.gib)
        log.info(
            "wrote %s uint16 (%.2f GiB) in %.1f s",
            shape,
            path.stat().st_size / 2**30,
            time.perf_counter() - start,
        )
        z = shape[0] // 2
        plane_bytes = 2 * PLANE_YX[0] * PLANE_YX[1]

        def lazy() -> np.ndarray:
            with open_stack(path) as stack:
                return stack[z]

        def peer() -> np.ndarray:
            return tifffile.imread(path)[z].copy()

        t_lazy, rss_lazy, traced_lazy, a = measure(lazy)
        t_peer, rss_peer, traced_peer, b = measure(peer)
        assert np.array_equal(a, b), "the two readers disagree"

    mib = 2**20
    print(f"stack {shape} uint16, one plane = {plane_bytes / mib:.1f} MiB")
    print(f"{'reader':<28}{'seconds':>9}{'peak RSS +MiB':>15}{'tracemalloc MiB':>17}")
    for name, t, rss, traced in (
        ("TiffStack[z] (microseg)", t_lazy, rss_lazy, traced_lazy),
        ("tifffile.imread()[z] (peer)", t_peer, rss_peer, traced_peer),
    ):
        print(f"{name:<28}{t:>9.3f}{rss / mib:>15.1f}{traced / mib:>17.1f}")
    print(
        f"ratio peer/microseg: peak RSS {rss_peer / max(rss_lazy, 1):.0f}x, "
        f"tracemalloc {traced_peer / max(traced_lazy, 1):.0f}x, "
        f"time {t_peer / max(t_lazy, 1e-9):.0f}x"
    )


if __name__ == "__main__":
    main()
