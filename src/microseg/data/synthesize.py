"""``microseg synth``: write the seeded synthetic datasets in their native formats.

The generators (``synth_spines``, ``synth_tracking``) are pure; this module decides file
layout and writes through the io layer, each dataset folder atomically, so that ingest reads
synthetic data exactly as it would read a user's DeepD3 export or CTC download.

Spine layout (``data/synthetic/spines``): the DeepD3 release's own files (io/deepd3.py), so
``format: deepd3`` reads it as it reads the real dataset, plus what DeepD3 lacks::

    DeepD3_Training.d3set, DeepD3_Validation.d3set   training sets (stacks x0.., masks)
    DeepD3_Benchmark.tif                             held-out benchmark stack (ImageJ voxel size)
    Annotations_and_Clusters.csv                     raters' spine clicks, one cluster per spine
    Spine_<R>.tif, Dendrite_<R>.tif                  rater R's masks of it (R = U, V, W; 0/255)
    points/{train,val}_x<i>.csv       spine head centres of each d3set stack (x, y, z voxels)
    truth/benchmark_spines.csv        the benchmark's true head centres (the raters' clicks
    truth/benchmark_{spine,dendrite}_mask.tif    and majority vote are what it is scored on)
    batch/stackNN.tif, stackNN.csv    unseen stacks with annotations (batch evaluation)
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from microseg.config import SynthSpinesConfig, SynthTrackingConfig
from microseg.data.synth_spines import (
    SpineSynthConfig,
    SpineVolume,
    generate_spine_volume,
    rate_volume,
    rater_clicks,
)
from microseg.data.synth_tracking import TrackingSynthConfig, generate_tracking_sequence
from microseg.errors import ConfigError
from microseg.io import ctc, d3set, deepd3, points, tiff
from microseg.utils.atomic import atomic_path
from microseg.utils.registry import Registry

log = logging.getLogger(__name__)

#: fixed so that the same seed gives byte-identical files (DVC then sees no change)
TIMESTAMP = "20260101_000000"
#: DeepD3's rater letters (Spine_U.tif, ...), in the order raters are simulated
RATER_NAMES = "UVWXYZ"
POINT_COLUMNS = ["x", "y", "z", "spine_id", "kind", "head_diameter_um", "neck_length_um", "snr"]


def _generator_cfg(cls: type, base: dict, overrides: dict):
    try:
        return cls(**{**base, **overrides})
    except TypeError as exc:
        raise ConfigError(f"unknown synth generator option: {exc}") from exc


def write_spines(cfg: SynthSpinesConfig, out: Path) -> Path:
    """The DeepD3 layout (d3sets, benchmark, raters' clicks and masks), per-stack head points,
    the benchmark's truth and ``batch/stackNN.tif`` + ``.csv`` (new stacks for ``batch-eval``)."""
    gen = _generator_cfg(
        SpineSynthConfig,
        {"shape": tuple(cfg.shape), "voxel_size_nm": tuple(cfg.voxel_size_nm)},
        cfg.generator,
    )
    if cfg.n_raters > len(RATER_NAMES):
        raise ConfigError(f"synth.spines.n_raters: at most {len(RATER_NAMES)}, got {cfg.n_raters}")
    z_um, xy_um = cfg.voxel_size_nm[0] / 1000, cfg.voxel_size_nm[2] / 1000
    voxel = tuple(cfg.voxel_size_nm)
    with atomic_path(out) as tmp:
        (tmp / "points").mkdir(parents=True)
        seed = cfg.seed * 1000
        for split, n, name in (
            ("train", cfg.n_train, deepd3.TRAINING),
            ("val", cfg.n_val, deepd3.VALIDATION),
        ):
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
                tmp / name, d3set.D3Set(stacks, dendrites, spines, pd.DataFrame(meta))
            )
        bench_cfg = replace(
            gen, shape=tuple(cfg.benchmark_shape), n_dendrites=tuple(cfg.benchmark_dendrites)
        )
        vol = generate_spine_volume(bench_cfg, seed=cfg.seed * 1000 + 999)
        _write_benchmark(tmp, vol, cfg, voxel)
        # new, unseen stacks as a user would bring them (batch evaluation by the champion)
        for i in range(cfg.n_batch):
            vol = generate_spine_volume(gen, seed=cfg.seed * 1000 + 900 + i)
            tiff.write_stack(
                tmp / "batch" / f"stack{i + 1:02d}.tif", vol.image, voxel_size_nm=voxel
            )
            points.write_points(tmp / "batch" / f"stack{i + 1:02d}.csv", _points(vol.points))
    log.info("synthetic spine data in %s", out)
    return out


def _write_benchmark(
    root: Path, vol: SpineVolume, cfg: SynthSpinesConfig, voxel: tuple[float, float, float]
) -> None:
    """The benchmark stack as DeepD3 publishes it: the stack, every rater's masks (0/255, as
    ImageJ saves a binary mask) and their clicks; the generator's truth beside it."""
    tiff.write_stack(root / deepd3.BENCHMARK, vol.image, voxel_size_nm=voxel)
    names = list(RATER_NAMES[: cfg.n_raters])
    raters = rate_volume(vol, n_raters=cfg.n_raters, seed=cfg.seed * 1000 + 998)
    for name, r in zip(names, raters, strict=True):
        _write_mask(root / f"Spine_{name}.tif", r.spine, voxel, 255)
        _write_mask(root / f"Dendrite_{name}.tif", r.dendrite, voxel, 255)
    clicks = rater_clicks(vol, raters, names, seed=cfg.seed * 1000 + 997)
    clicks.to_csv(root / deepd3.ANNOTATIONS)  # with pandas' index column, as DeepD3's file
    (root / "truth").mkdir()
    points.write_points(root / "truth" / "benchmark_spines.csv", _points(vol.points))
    _write_mask(root / "truth" / "benchmark_spine_mask.tif", vol.spine, voxel)
    _write_mask(root / "truth" / "benchmark_dendrite_mask.tif", vol.dendrite, voxel)


def _write_mask(path: Path, mask, voxel: tuple[float, float, float], value: int = 1) -> None:
    """Masks compress ~50x with zlib; the image stays uncompressed so it can be memory-mapped."""
    data = mask.astype("uint8") * np.uint8(value)
    tiff.write_stack(path, data, voxel_size_nm=voxel, compression="zlib")


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
