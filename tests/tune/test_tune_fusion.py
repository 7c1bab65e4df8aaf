"""Optuna search over fusion params: beats defaults and YOLO alone; resumes; shares a study."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pytest

from microseg.infer.fusion import FusionParams
from microseg.tune.fusion import (
    pooled_metrics,
    prepare,
    read_best_file,
    read_best_params,
    read_tuned,
    tune_fusion,
    write_best_params,
)
from microseg.tune.storage import optuna_storage, study

VS = (500.0, 94.0, 94.0)


def _synthetic_stack(rng: np.random.Generator, n_true: int = 10, n_debris: int = 6):
    """Spines that YOLO sees in three planes: 60% with a high score, 40% with a low one that the
    Prob-UNet map confirms; debris YOLO sees in two planes, half with a score just above the
    default ``high_conf``, all of it dark in the map."""
    depth, size = 12, 128
    prob = (rng.random((depth, size, size)) * 0.05).astype(np.float32)
    yy, xx = np.mgrid[:size, :size]
    centres: list[tuple[float, float]] = []
    while len(centres) < n_true + n_debris:
        c = tuple(rng.uniform(10, size - 10, 2))
        if all(np.hypot(c[0] - a, c[1] - b) > 20 for a, b in centres):
            centres.append(c)
    gt, rows = [], []
    for k, (cy, cx) in enumerate(centres):
        true = k < n_true
        z = int(rng.integers(2, depth - 2))
        if true:
            gt.append((cx, cy, float(z)))
            prob[z - 1 : z + 2][:, np.hypot(yy - cy, xx - cx) <= 4.5] = 0.9
            strong = k < 0.6 * n_true
            planes = (z - 1, z, z + 1)
            score = rng.uniform(0.8, 0.95) if strong else rng.uniform(0.25, 0.45)
        else:
            planes = (z, z + 1)
            score = rng.uniform(0.52, 0.6) if k % 2 else rng.uniform(0.25, 0.45)
        for zp in planes:
            jx, jy = rng.uniform(-0.7, 0.7, 2)
            s = score if zp == z else score * 0.95
            # box centre (x1 + x2)/2 - 0.5 lands on the spine's voxel centre
            rows.append((zp, cx + jx - 3.5, cy + jy - 3.5, cx + jx + 4.5, cy + jy + 4.5, s))
    det = pd.DataFrame(rows, columns=["z", "x1", "y1", "x2", "y2", "score"])
    return det, prob, pd.DataFrame(gt, columns=["x", "y", "z"]), VS


@pytest.fixture(scope="module")
def val_items():
    rng = np.random.default_rng(7)
    return [_synthetic_stack(rng) for _ in range(3)]


def _yolo_only_best_f1(prepared) -> float:
    best = 0.0
    for t in np.linspace(0.05, 0.95, 37):
        p = FusionParams(high_conf=float(t), low_conf=float(t))  # YOLO score alone decides
        best = max(best, pooled_metrics(prepared, p)["f1"])
    return best


def test_tuning_beats_defaults_and_yolo_alone_then_resumes(val_items, tmp_path):
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    seen: list[dict] = []
    best, st = tune_fusion(
        val_items, 30, url, "fusion-test", seed=0, on_trial=lambda t, m: seen.append(m)
    )
    prepared = prepare(val_items)
    fp, conf = read_tuned(best)
    tuned = pooled_metrics(prepared, fp, yolo_conf=conf)["f1"]
    default = pooled_metrics(prepared, FusionParams())["f1"]
    yolo_only = _yolo_only_best_f1(prepared)
    assert tuned == pytest.approx(st.best_value)
    assert tuned > default + 0.02, (tuned, default)
    assert tuned > yolo_only + 0.05, (tuned, yolo_only)
    assert best["low_conf"] <= best["high_conf"]
    assert best["w_yolo"] + best["w_punet"] == pytest.approx(1.0)
    assert len(seen) == 30 and all("f1" in m and "params" in m for m in seen)

    # resume: same storage and name -> the same study grows by the new trials
    best2, st2 = tune_fusion(val_items, 4, url, "fusion-test", seed=0)
    assert len(st2.trials) == 34
    assert st2.best_value >= st.best_value
    path = write_best_params(tmp_path / "params" / "tuned_fusion.yaml", best2)
    assert read_best_file(path) == read_tuned(best2)
    assert 0.01 <= best2["yolo_conf"] <= 0.3
    # folded into the cuts: the same kept boxes, so the same F1
    fp2, conf2 = read_best_file(path)
    assert pooled_metrics(prepared, read_best_params(path))["f1"] == pytest.approx(
        pooled_metrics(prepared, fp2, yolo_conf=conf2)["f1"]
    )


@pytest.mark.postgres
def test_postgres_study_shared_by_two_workers(val_items, pg_database):
    items = val_items[:1]
    # the storage is a server-side RDB with heartbeats (stale trials re-queued)
    assert optuna_storage(pg_database).heartbeat_interval is not None

    def work(worker: int) -> int:
        _, st = tune_fusion(items, 4, pg_database, "shared", seed=1, worker=worker)
        return len(st.trials)

    with ThreadPoolExecutor(max_workers=2) as pool:
        list(pool.map(work, [0, 1]))
    st = study("shared", pg_database, seed=1)
    assert len(st.trials) == 8
    assert all(t.state.name == "COMPLETE" for t in st.trials)
    # the two workers' seeds differ, so they did not propose the same first point
    firsts = [t.params for t in st.trials[:2]]
    assert firsts[0] != firsts[1]
    # a later run resumes the same server-side study
    _, st2 = tune_fusion(items, 2, pg_database, "shared", seed=1)
    assert len(st2.trials) == 10
