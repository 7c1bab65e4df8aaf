"""``microseg synth``: write the seeded synthetic datasets in their native formats.

The generators (``synth_spines``, ``synth_tracking``) are pure; this module decides file
layout and writes through the io layer, each dataset folder atomically, so that ingest reads
synthetic data exactly as it would read a user's DeepD3 export or CTC download.

Spine layout (``data/synthetic/spines``)::

    train.d3set, val.d3set            DeepD3 training sets (stacks x0.., dendrite/spine masks)
    points/{train,val}_x<i>.csv       spine head centres of each d3set stack (x, y, z voxels)
    benchmark/stack.tif               held-out benchmark stack (ImageJ voxel size)
    benchmark/spines.csv              its spine annotations
    benchmark/{spine,dendrite}_mask.tif
    raters/rater<k>_{spines,dendrites}.tif   simulated raters of the benchmark stack
    batch/stackNN.tif, stackNN.csv    unseen stacks with annotations (batch evaluation)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from microseg.config import SynthSpinesConfig, SynthTrackingConfig
from microseg.data.synth_spines import SpineSynthConfig, generate_spine_volume, simulate_raters
from microseg.data.synth_tracking import TrackingSynthConfig, generate_tracking_sequence
from microseg.errors import ConfigError
from microseg.io import ctc, d3set, points, tiff
from microseg.utils.atomic import atomic_path
from microseg.utils.registry import Registry

log = logging.getLogger(__name__)

#: fixed so that the same seed gives byte-identical files (DVC then sees no change)
TIMESTAMP = "20260101_000000"
POINT_COLUMNS = ["x", "y", "z", "spine_id", "kind", "head_diameter_um", "neck_length_um", "snr"]


def _generator_cfg(cls: type, base: dict, overrides: dict):
    try:
        return cls(**{**base, **overrides})
    except TypeError as exc:
        raise ConfigError(f"unknown synth generator option: {exc}") from exc


def write_spines(cfg: SynthSpinesConfig, out: Path) -> Path:
    """Training/validation d3sets, a benchmark stack with annotations, raters, and
    ``batch/stackNN.tif`` + ``.csv`` (new stacks for ``batch-eval``)."""
    gen = _generator_cfg(
        SpineSynthConfig,
        {"shape": tuple(cfg.shape), "voxel_size_nm": tuple(cfg.voxel_size_nm)},
        cfg.generator,
    )
    z_um, xy_um = cfg.voxel_size_nm[0] / 1000, cfg.voxel_size_nm[2] / 1000
    with atomic_path(out) as tmp:
        (tmp / "points").mkdir(parents=True)
        seed = cfg.seed * 1000
        for split, n in (("train", cfg.n_train), ("val", cfg.n_val)):
            stacks, dendrites, spines, meta = {}, {}, {}, []
            for i in tqdm(range(n), desc=f"synth {split}"):
                seed += 1
                vol = generate_spine_volume(gen, seed=seed)
                key = f"x{i}"
                stacks[key], dendrites[key], spines[key] = vol.image, vol.dendrite, vol.spine
                meta.append(
                    d3set.meta_row(
                        vol.image.shape, xy_um, z_um, f"synthetic seed {seed}", timestamp=TIMESTAMP
                    )
                )
                points.write_points(tmp / "points" / f"{split}_{key}.csv", _points(vol.points))
            d3set.write_d3set(
                tmp / f"{split}.d3set", d3set.D3Set(stacks, dendrites, spines, pd.DataFrame(meta))
            )
        bench_cfg = replace(
            gen, shape=tuple(cfg.benchmark_shape), n_dendrites=tuple(cfg.benchmark_dendrites)
        )
        vol = generate_spine_volume(bench_cfg, seed=cfg.seed * 1000 + 999)
        bench = tmp / "benchmark"
        voxel = tuple(cfg.voxel_size_nm)
        tiff.write_stack(bench / "stack.tif", vol.image, voxel_size_nm=voxel)
        _write_mask(bench / "spine_mask.tif", vol.spine, voxel)
        _write_mask(bench / "dendrite_mask.tif", vol.dendrite, voxel)
        points.write_points(bench / "spines.csv", _points(vol.points))
        raters = simulate_raters(vol, n_raters=cfg.n_raters, seed=cfg.seed * 1000 + 998)
        for k, (sp, de) in enumerate(raters, start=1):
            _write_mask(tmp / "raters" / f"rater{k}_spines.tif", sp, voxel)
            _write_mask(tmp / "raters" / f"rater{k}_dendrites.tif", de, voxel)
        # new, unseen stacks as a user would bring them (batch evaluation by the champion)
        for i in range(cfg.n_batch):
            vol = generate_spine_volume(gen, seed=cfg.seed * 1000 + 900 + i)
            tiff.write_stack(
                tmp / "batch" / f"stack{i + 1:02d}.tif", vol.image, voxel_size_nm=voxel
            )
            points.write_points(tmp / "batch" / f"stack{i + 1:02d}.csv", _points(vol.points))
    log.info("synthetic spine data in %s", out)
    return out


def _write_mask(path: Path, mask, voxel: tuple[float, float, float]) -> None:
    """Masks compress ~50x with zlib; the image stays uncompressed so it can be memory-mapped."""
    tiff.write_stack(path, mask.astype("uint8"), voxel_size_nm=voxel, compression="zlib")


def _points(df: pd.DataFrame) -> pd.DataFrame:
    return df[[c for c in POINT_COLUMNS if c in df]].reset_index(drop=True)


def write_tracking(cfg: SynthTrackingConfig, out: Path) -> Path:
    """``n_sequences`` CTC sequences ``01, 02, ...`` with full SEG and TRA ground truth."""
    gen = _generator_cfg(
        TrackingSynthConfig,
        {"shape": tuple(cfg.shape), "n_frames": cfg.n_frames},
        cfg.generator,
    )
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        for i in tqdm(range(1, cfg.n_sequences + 1), desc="synth tracking"):
            seq = generate_tracking_sequence(gen, seed=cfg.seed * 1000 + i)
            seg = {t: seq.labels[t] for t in range(seq.labels.shape[0])}
            ctc.write_ctc_gt(tmp, f"{i:02d}", seq.frames, seq.labels, seq.tracks, seg=seg)
    log.info("synthetic tracking data in %s", out)
    return out


#: synthetic dataset -> its writer
WRITERS: Registry[Callable[[object, Path], Path]] = Registry("synthetic dataset")
WRITERS.add("spines", write_spines)
WRITERS.add("tracking", write_tracking)
