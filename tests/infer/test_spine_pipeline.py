"""Stack -> fused spines: the pipeline equals its pieces run by hand; folder runs resume."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from microseg.errors import ConfigError, MissingFileError
from microseg.infer.fusion import DEDUP_COLS, FusionParams, box_probability, evaluate_fusion, fuse
from microseg.infer.spine_pipeline import (
    SUMMARY_COLS,
    SpinePipelineConfig,
    find_points,
    list_stacks,
    predict_folder,
    predict_spines,
    read_fusion_params,
    resolve_voxel_size,
    yolo_conf,
)
from microseg.infer.yolo_predict import predict_stack
from microseg.io.points import read_points, write_points
from microseg.io.tiff import read_stack, write_stack
from microseg.models.punet import ProbUNet, PunetSegmenter, load_punet, save_punet
from microseg.models.punet.predict import predict_stack_punet
from microseg.models.yolo import YoloSpineDetector

VOXEL = (500.0, 94.0, 94.0)
CFG = SpinePipelineConfig(
    conf=0.0, iou=1.0, batch_planes=2, n_samples=4, punet_batch_planes=2, seed=3, device="cpu"
)


def write_noise_stack(path: Path, seed: int, shape=(4, 64, 64), voxel=VOXEL) -> Path:
    """Noise plus a few bright blobs, so planes (and the nets' outputs) differ."""
    rng = np.random.default_rng(seed)
    stack = rng.normal(300, 40, shape)
    yy, xx = np.mgrid[: shape[1], : shape[2]]
    for _ in range(4):
        z, y, x = rng.integers(0, shape[0]), *rng.integers(8, shape[1] - 8, 2)
        stack[z] += 2000 * np.exp(-((yy - y) ** 2 + (xx - x) ** 2) / 8.0)
    return write_stack(path, np.clip(stack, 0, 65535).astype(np.uint16), voxel)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """An untrained YOLO and a tiny Prob-UNet, saved and loaded back as the pipeline would."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("spine_models")
    YoloSpineDetector.build("n").save(root / "yolo.pt")
    save_punet(
        ProbUNet(filters=(4, 8), latent_dim_spine=2, latent_dim_dendrite=2, head_convs=2),
        root / "punet.pt",
    )
    punet = PunetSegmenter(load_punet(root / "punet.pt"))
    return YoloSpineDetector.load(root / "yolo.pt"), punet, root


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Path:
    return write_noise_stack(tmp_path_factory.mktemp("stack") / "s.tif", seed=0)


def by_hand(models, path: Path, fp: FusionParams, cfg=CFG, voxel=VOXEL):
    """The pieces the stages run: eval_yolo's raw boxes, predict_punet's stack, then fuse."""
    yolo, punet, _ = models
    dets = predict_stack(
        yolo,
        path,
        conf=yolo_conf(cfg, fp),
        iou=1.0,
        batch_planes=cfg.batch_planes,
        channels=cfg.channels,
        norm_percentiles=cfg.norm_percentiles,
        max_det=cfg.max_det,
        progress=False,
    )
    res = predict_stack_punet(
        punet.network,
        read_stack(path),
        n_samples=cfg.n_samples,
        temperature=cfg.temperature,
        batch_planes=cfg.punet_batch_planes,
        seed=cfg.seed,
        progress=False,
    )
    return dets, res["prob_spine"], fuse(dets, res["prob_spine"], fp, voxel)


@pytest.fixture(scope="module")
def mixed_params(models, stack) -> FusionParams:
    """Thresholds inside the untrained models' score ranges: every decision branch occurs."""
    dets, prob, _ = by_hand(models, stack, FusionParams(high_conf=0.0, low_conf=0.0))
    s = dets["score"].to_numpy()
    p = box_probability(prob, dets)
    levels = np.unique(s)  # untrained scores tie a lot: cut between distinct values
    low, high = float(levels[len(levels) // 4]), float(levels[3 * len(levels) // 4])
    mid = (s >= low) & (s < high)
    return FusionParams(
        high_conf=high,
        low_conf=low,
        punet_thr=float(np.median(p[mid])),
        dedup_radius_nm=600.0,
    )


def test_predict_spines_equals_the_pieces_run_by_hand(models, stack, mixed_params):
    yolo, punet, _ = models
    dets, prob, expected = by_hand(models, stack, mixed_params)
    got = predict_spines(stack, yolo, punet, mixed_params, CFG)
    assert len(dets) > 100  # conf 0: every raw box of every plane
    pd.testing.assert_frame_equal(got.raw, expected.raw, check_exact=True)
    pd.testing.assert_frame_equal(got.dedup, expected.dedup, check_exact=True)
    assert got.stats == expected.stats
    # every branch taken, so the Prob-UNet probability (not just YOLO's score) decided some
    assert set(got.raw["status"]) == {"high", "validated", "rejected_low_yolo", "rejected_no_punet"}
    # each box read on its own plane: the probabilities of another plane would differ
    shifted = box_probability(np.roll(prob, 1, axis=0), dets)
    assert not np.allclose(shifted, got.raw["punet_prob"].to_numpy(), rtol=0, atol=1e-7)
    assert 0 < len(got.dedup) < len(got.raw)


def test_voxel_size_from_caller_overrides_the_file(models, stack, mixed_params):
    yolo, punet, _ = models
    coarse = (500.0, 400.0, 400.0)  # fewer pixels per 600 nm: fewer merges
    got = predict_spines(stack, yolo, punet, mixed_params, CFG, voxel_size_nm=coarse)
    _, _, expected = by_hand(models, stack, mixed_params, voxel=coarse)
    _, _, at_file = by_hand(models, stack, mixed_params, voxel=VOXEL)
    pd.testing.assert_frame_equal(got.dedup, expected.dedup)
    assert len(expected.dedup) != len(at_file.dedup)


def test_resolve_voxel_size_fills_unknown_axes_from_the_default():
    assert resolve_voxel_size(None, (float("nan"), 90.0, 91.0), VOXEL) == (500.0, 90.0, 91.0)
    assert resolve_voxel_size((1, 2, 3), (7.0, 8.0, 9.0), VOXEL) == (1.0, 2.0, 3.0)
    assert resolve_voxel_size(None, None, VOXEL) == VOXEL
    with pytest.raises(ConfigError, match="three positive"):
        resolve_voxel_size((1, 0, 3), None, VOXEL)


def test_yolo_conf_reaches_down_to_the_fusion_low_conf():
    cfg = SpinePipelineConfig(conf=0.05)
    assert yolo_conf(cfg, FusionParams(low_conf=0.2)) == 0.05
    assert yolo_conf(cfg, FusionParams(low_conf=0.01)) == 0.01


def test_config_from_params_matches_the_stages_and_round_trips_as_json(params):
    cfg = SpinePipelineConfig.from_params(params)
    assert cfg.conf == min(params.yolo.sweep.confs) and cfg.iou == 1.0  # eval_yolo's raw boxes
    assert cfg.channels == params.yolo.convert.channels
    assert cfg.max_det == params.yolo.predict.max_det
    assert cfg.n_samples == params.punet.predict.n_samples and cfg.seed == params.seed
    assert cfg.voxel_size_nm == tuple(params.datasets["spines"].voxel_size_nm)
    assert cfg.dedup_radius_nm == params.spines.dedup_radius_nm
    again = SpinePipelineConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    tiled = replace(cfg, tile=(128, 0.25), punet_tile=(64, 16))
    assert SpinePipelineConfig.from_dict(json.loads(json.dumps(tiled.to_dict()))) == tiled
    with pytest.raises(ConfigError, match="unknown key"):
        SpinePipelineConfig.from_dict({**cfg.to_dict(), "sparkle": 1})
    with pytest.raises(ConfigError, match="channels"):
        SpinePipelineConfig(channels="rgb")
    assert cfg.default_fusion_params() == FusionParams(
        dedup_radius_nm=params.spines.dedup_radius_nm, dedup_mode=params.spines.dedup_mode
    )


def test_read_fusion_params(tmp_path):
    path = tmp_path / "tuned.yaml"
    path.write_text("high_conf: 0.4\nlow_conf: 0.1\nagg: max\n")
    assert read_fusion_params(path) == FusionParams(high_conf=0.4, low_conf=0.1, agg="max")
    path.write_text("high_conf: 0.4\nsparkle: 1\n")
    with pytest.raises(ConfigError, match="unknown key"):
        read_fusion_params(path)
    with pytest.raises(MissingFileError):
        read_fusion_params(tmp_path / "none.yaml")


def test_weights_trained_on_other_channels_are_refused(models, stack):
    yolo, punet, _ = models
    yolo25 = YoloSpineDetector(yolo.yolo, {**yolo.meta, "channels": "25d"})
    with pytest.raises(ConfigError, match="25d"):
        predict_spines(stack, yolo25, punet, FusionParams(), CFG)


# ------------------------------------------------------------------------------ folders
def test_list_stacks_and_find_points(tmp_path):
    for name in ("b.tif", "a.TIFF", ".hidden.tif", "notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in list_stacks(tmp_path)] == ["a.TIFF", "b.tif"]
    with pytest.raises(MissingFileError, match="found nothing"):
        list_stacks(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MissingFileError, match="found none"):
        list_stacks(tmp_path / "empty")
    (tmp_path / "a.tif").write_bytes(b"x")
    with pytest.raises(ConfigError, match="share the result folder"):
        list_stacks(tmp_path)
    (tmp_path / "b_points.csv").write_text("x,y,z\n")
    assert find_points(tmp_path / "b.tif") == tmp_path / "b_points.csv"
    assert find_points(tmp_path / "a.tif") is None


def test_predict_folder_reports_bad_stacks_scores_points_and_resumes(
    models, mixed_params, tmp_path
):
    yolo, punet, _ = models
    src = tmp_path / "in"
    a = write_noise_stack(src / "a.tif", seed=1)
    b = write_noise_stack(src / "b.tif", seed=2)
    (src / "c.tif").write_bytes(b"II*\x00 this is not a TIFF stack")
    pts = pd.DataFrame({"x": [10.0, 40.0, 20.0], "y": [12.0, 30.0, 50.0], "z": [0.0, 1.0, 3.0]})
    write_points(src / "b_points.csv", pts)
    out = tmp_path / "out"

    summary = predict_folder(src, out, yolo, punet, mixed_params, CFG, progress=False)
    assert list(summary.columns) == SUMMARY_COLS
    assert summary.set_index("stack")["status"].to_dict() == {
        "a.tif": "done",
        "b.tif": "done",
        "c.tif": "failed",
    }
    bad = summary.set_index("stack").loc["c.tif"]
    assert "c.tif" in bad["error"] and not (out / "c").exists()
    assert sorted(p.name for p in out.iterdir()) == ["a", "b", "summary.csv"]
    assert pd.read_csv(out / "summary.csv")["status"].tolist() == summary["status"].tolist()

    # a: the written detections are predict_spines' ones; no points -> no metrics
    ref_a = predict_spines(a, yolo, punet, mixed_params, CFG)
    written = pd.read_csv(out / "a" / "predictions_dedup.csv")
    pd.testing.assert_frame_equal(written, ref_a.dedup[DEDUP_COLS], check_dtype=False)
    assert json.loads((out / "a" / "results.json").read_text())["f1"] is None
    # b: scored against its points exactly as evaluate_fusion does
    ref_b = evaluate_fusion(
        predict_spines(b, yolo, punet, mixed_params, CFG),
        read_points(src / "b_points.csv"),
        VOXEL,
        CFG.match_dist_nm,
    )
    row_b = summary.set_index("stack").loc["b.tif"]
    assert (row_b["tp"], row_b["fp"], row_b["fn"]) == (ref_b["tp"], ref_b["fp"], ref_b["fn"])
    assert row_b["f1"] == pytest.approx(ref_b["f1"])
    assert row_b["n_spines"] == ref_b["tp"] + ref_b["fp"]

    # rerun: finished stacks are skipped (files untouched), the bad one is reported again
    stamps = {s: (out / s / "results.json").stat().st_mtime_ns for s in ("a", "b")}
    again = predict_folder(src, out, yolo, punet, mixed_params, CFG, progress=False)
    assert again.set_index("stack")["status"].to_dict() == {
        "a.tif": "skipped",
        "b.tif": "skipped",
        "c.tif": "failed",
    }
    assert {s: (out / s / "results.json").stat().st_mtime_ns for s in ("a", "b")} == stamps
    skipped_b = again.set_index("stack").loc["b.tif"]
    assert (skipped_b["tp"], skipped_b["fp"], skipped_b["fn"]) == (
        row_b["tp"],
        row_b["fp"],
        row_b["fn"],
    )
    # a stack changed after its result: predicted again
    future = stamps["a"] + 10**9
    os.utime(a, ns=(future, future))
    third = predict_folder(src, out, yolo, punet, mixed_params, CFG, progress=False)
    assert third.set_index("stack")["status"].to_dict()["a.tif"] == "done"
    assert third.set_index("stack")["status"].to_dict()["b.tif"] == "skipped"
