"""Seed noise of each family's tiny training run -> tests/data/characterisation.json.

The runs, data and adapter are those of ``tests/train/test_characterisation.py`` (loaded from
its file, so there is one definition). Every family trains once per seed on one CPU thread;
the script prints a table (value at the pinned seed, seed mean and std, tolerance, seconds)
and, with ``--write``, stores it as the characterisation the test checks against.

Tolerance per metric: ``max(3 * seed std, floor)``. The floor keeps a metric whose seeds
happen to agree closely from pinning an exact value that any harmless reordering of random
draws (another loop, another seeding scheme) would break; see ``WHY`` below. Optimizer steps
are a count, pinned exactly.

    PYTHONPATH=src OMP_NUM_THREADS=1 .venv/bin/python benchmarks/characterise_families.py \
        [--seeds 0 1 2 3 4] [--families unet punet maskrcnn] [--write]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TEST_MODULE = REPO / "tests" / "train" / "test_characterisation.py"
OUT = REPO / "tests" / "data" / "characterisation.json"

#: smallest tolerance of a validation metric (all of them lie in [0, 1])
FLOOR = 0.05
WHY = (
    "tolerance = max(3 x seed std, floor) around the seed mean. The floor (0.05 on metrics in "
    "[0, 1]) exists because with 5 seeds a std is itself uncertain (its 95% interval reaches "
    "about 2.9x the estimate), because a port that seeds or orders random draws differently "
    "(Lightning's seed_everything, another sampler order) changes the trajectory like a new "
    "seed would, and because on 2 validation images one nucleus more or less matched moves "
    "F1@0.5 by about 0.04-0.1; a real regression (broken loss, wrong schedule, no validation) "
    "moves these metrics by 0.2 or more. optimizer_steps is a count and must match exactly."
)


def load_test_module():
    spec = importlib.util.spec_from_file_location("test_characterisation", TEST_MODULE)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look the module up by name
    spec.loader.exec_module(mod)
    return mod


def summarise(values: list[float], pinned: float, exact: bool) -> dict[str, float]:
    mean = statistics.fmean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    tol = 0.0 if exact else max(3 * std, FLOOR)
    return {
        "value_at_pinned_seed": round(pinned, 6),
        "mean": round(mean, 6),
        "std": round(std, 6),
        "tolerance": round(tol, 6),
        "values": [round(v, 6) for v in values],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--families", nargs="+", default=None)
    ap.add_argument("--write", action="store_true", help=f"write {OUT.relative_to(REPO)}")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)
    mod = load_test_module()
    names = args.families or sorted(mod.FAMILIES)
    if mod.PINNED_SEED not in args.seeds:
        raise SystemExit(f"--seeds must include the pinned seed {mod.PINNED_SEED}")

    families: dict[str, dict] = {}
    seconds: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        data = mod.make_toy_data(Path(tmp) / "data")
        for name in names:
            runs, times = {}, []
            for seed in args.seeds:
                t0 = time.perf_counter()
                runs[seed] = mod.characterise(name, data, Path(tmp) / f"{name}-{seed}", seed)
                times.append(time.perf_counter() - t0)
                print(f"{name} seed {seed}: {runs[seed]} ({times[-1]:.1f} s)", flush=True)
            seconds[name] = statistics.fmean(times)
            keys = list(runs[mod.PINNED_SEED])
            families[name] = {
                k: summarise(
                    [runs[s][k] for s in args.seeds],
                    runs[mod.PINNED_SEED][k],
                    exact=k == "optimizer_steps",
                )
                for k in keys
            }

    print(f"\n{'family':<9} {'metric':<24} {'seed ' + str(mod.PINNED_SEED):>8} "
          f"{'mean':>8} {'std':>8} {'tol':>8} {'s/run':>6}")  # fmt: skip
    for name, metrics in families.items():
        for k, s in metrics.items():
            print(
                f"{name:<9} {k:<24} {s['value_at_pinned_seed']:>8.4f} {s['mean']:>8.4f} "
                f"{s['std']:>8.4f} {s['tolerance']:>8.4f} {seconds[name]:>6.1f}"
            )
    if args.write:
        old = json.loads(OUT.read_text()) if OUT.is_file() else {"families": {}}
        doc = {
            "why": WHY,
            "generated_by": "benchmarks/characterise_families.py --write",
            "pinned_seed": mod.PINNED_SEED,
            "seeds": args.seeds,
            "torch": torch.__version__,
            "wall_seconds_per_run_on_a_shared_2_core_cpu": {
                **old.get("wall_seconds_per_run_on_a_shared_2_core_cpu", {}),
                **{k: round(v, 1) for k, v in seconds.items()},
            },
            "families": {**old["families"], **families},
        }
        OUT.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"written {OUT}")


if __name__ == "__main__":
    main()
