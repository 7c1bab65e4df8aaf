"""3D de-duplication: anisotropic radius, greedy NMS against a brute-force reference, modes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from microseg.errors import AnnotationError, MicrosegError
from microseg.infer.dedup import dedup_3d

VS = (500.0, 94.0, 94.0)


def dets(rows: list[tuple], **extra) -> pd.DataFrame:
    """Detections from (z, y, x, score) tuples."""
    z, y, x, s = (list(c) for c in zip(*rows, strict=True))
    return pd.DataFrame({"z": z, "y": y, "x": x, "score": s, **extra})


def brute_force_nms(df: pd.DataFrame, vs, radius: float) -> dict[int, int]:
    """O(N^2) greedy NMS with a plain double loop: {kept row position: n absorbed}."""
    zyx = df[["z", "y", "x"]].to_numpy(float) * np.asarray(vs)
    order = sorted(range(len(df)), key=lambda k: -df["score"].iloc[k])
    suppressed = [False] * len(df)
    kept: dict[int, int] = {}
    for a in order:
        if suppressed[a]:
            continue
        kept[a] = 1
        for b in order:
            if (
                b != a
                and not suppressed[b]
                and b not in kept
                and np.sqrt(((zyx[a] - zyx[b]) ** 2).sum()) <= radius
            ):
                suppressed[b] = True
                kept[a] += 1
    return kept


def test_one_plane_apart_merges_at_600_not_400() -> None:
    df = dets([(3, 20, 20, 0.9), (4, 20, 20, 0.5)])
    merged = dedup_3d(df, VS, radius_nm=600.0)
    assert len(merged) == 1 and merged["n_merged"].tolist() == [2]
    assert (merged["z_min"][0], merged["z_max"][0]) == (3, 4)
    assert len(dedup_3d(df, VS, radius_nm=400.0)) == 2


def test_lateral_distance_uses_94_nm_pixels() -> None:
    lateral = dets([(3, 20, 20, 0.9), (3, 20, 25, 0.5)])  # 5 px = 470 nm
    axial = dets([(3, 20, 20, 0.9), (4, 20, 20, 0.5)])  # 1 plane = 500 nm
    assert len(dedup_3d(lateral, VS, radius_nm=480.0)) == 1
    assert len(dedup_3d(lateral, VS, radius_nm=460.0)) == 2
    assert len(dedup_3d(axial, VS, radius_nm=480.0)) == 2
    # Oblique: 1 plane and 4 px -> sqrt(500^2 + 376^2) = 625.6 nm.
    oblique = dets([(3, 20, 20, 0.9), (4, 24, 20, 0.5)])
    assert len(dedup_3d(oblique, VS, radius_nm=626.0)) == 1
    assert len(dedup_3d(oblique, VS, radius_nm=625.0)) == 2


def test_highest_score_survives_and_keeps_its_columns() -> None:
    df = dets(
        [(2, 10, 10, 0.3), (3, 11, 10, 0.8), (4, 10, 11, 0.6), (20, 90, 90, 0.1)],
        label=["a", "b", "c", "far"],
    )
    df["x1"], df["x2"] = df["x"] - 2, df["x"] + 2
    df["y1"], df["y2"] = df["y"] - 2, df["y"] + 2
    out = dedup_3d(df, VS, radius_nm=1100.0)
    assert out["label"].tolist() == ["b", "far"]
    assert out["score"].tolist() == [0.8, 0.1]
    assert out["n_merged"].tolist() == [3, 1]
    assert out[["z_min", "z_max"]].to_numpy().tolist() == [[2, 4], [20, 20]]
    assert out.loc[0, ["x1", "y1", "x2", "y2"]].tolist() == [8, 9, 12, 13]
    assert list(out.columns) == [*df.columns, "n_merged", "z_min", "z_max"]


def test_suppressed_detection_does_not_suppress() -> None:
    # a suppresses b; c lies only within reach of b, so c survives (no chaining in NMS).
    df = dets([(0, 0, 0, 0.9), (1, 0, 0, 0.7), (2, 0, 0, 0.5)])
    out = dedup_3d(df, VS, radius_nm=600.0)
    assert out["z"].tolist() == [0, 2] and out["n_merged"].tolist() == [2, 1]


def test_cluster_mode_chains_and_reports_weighted_centroid() -> None:
    df = dets([(0, 10, 10, 0.9), (1, 10, 12, 0.5), (2, 10, 10, 0.8)], label=["a", "b", "c"])
    df["x1"], df["x2"] = df["x"] - 3, df["x"] + 3
    df["y1"], df["y2"] = df["y"] - 3, df["y"] + 3
    out = dedup_3d(df, VS, radius_nm=600.0, mode="cluster")
    assert len(out) == 1 and out["n_merged"][0] == 3 and out["label"][0] == "a"
    w = np.array([0.9, 0.5, 0.8])
    assert out["z"][0] == pytest.approx((w * [0, 1, 2]).sum() / w.sum())
    assert out["x"][0] == pytest.approx((w * [10, 12, 10]).sum() / w.sum())
    assert out["x2"][0] - out["x1"][0] == pytest.approx(6.0)
    assert (out["x1"][0] + out["x2"][0]) / 2 == pytest.approx(out["x"][0])
    assert out["score"][0] == 0.9 and (out["z_min"][0], out["z_max"][0]) == (0, 2)
    assert len(dedup_3d(df, VS, radius_nm=600.0, mode="nms")) == 2


@pytest.mark.parametrize("mode", ["nms", "cluster"])
def test_order_independent(mode: str) -> None:
    rng = np.random.default_rng(5)
    n = 400
    df = pd.DataFrame(
        {
            "z": rng.integers(0, 10, n),
            "y": rng.uniform(0, 100, n),
            "x": rng.uniform(0, 100, n),
            "score": rng.choice([0.2, 0.5, 0.9], n),  # many ties
            "id": np.arange(n),
        }
    )
    ref = dedup_3d(df, VS, 800.0, mode=mode)
    assert 20 < len(ref) < n
    for seed in range(3):
        shuffled = df.sample(frac=1.0, random_state=seed)
        pd.testing.assert_frame_equal(dedup_3d(shuffled, VS, 800.0, mode=mode), ref)


def test_empty_input_keeps_columns() -> None:
    df = pd.DataFrame({c: pd.Series(dtype=float) for c in ["z", "y", "x", "score", "x1"]})
    out = dedup_3d(df, VS, 600.0)
    assert out.empty
    assert list(out.columns) == ["z", "y", "x", "score", "x1", "n_merged", "z_min", "z_max"]
    box_only = pd.DataFrame({c: pd.Series(dtype=float) for c in ["z", "x1", "y1", "x2", "y2"]})
    out = dedup_3d(box_only, VS, 600.0, score_col=None, mode="cluster")
    assert {"x", "y", "n_merged", "z_min", "z_max"} <= set(out.columns) and out.empty


@pytest.mark.parametrize("seed", range(6))
def test_matches_brute_force_reference(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = 300
    df = pd.DataFrame(
        {
            "z": rng.integers(0, 8, n).astype(float),
            "y": rng.uniform(0, 60, n),
            "x": rng.uniform(0, 60, n),
            "score": rng.random(n),
        }
    )
    radius = float(rng.uniform(400, 1500))
    ref = brute_force_nms(df, VS, radius)
    df["row"] = np.arange(n)
    out = dedup_3d(df, VS, radius)
    assert dict(zip(out["row"], out["n_merged"], strict=True)) == ref
    assert out["n_merged"].sum() == n


def test_centre_from_box_and_unscored_input() -> None:
    df = pd.DataFrame(
        {"z": [0, 1, 9], "x1": [0.0, 1, 0], "y1": [0.0, 0, 0], "x2": [4.0, 5, 4], "y2": [4.0, 4, 4]}
    )
    out = dedup_3d(df, VS, 600.0, score_col=None)
    assert out["x"].tolist() == [2.0, 2.0] and out["n_merged"].tolist() == [2, 1]


def test_bad_input_is_reported() -> None:
    df = dets([(0, 0, 0, 0.9)])
    with pytest.raises(AnnotationError, match=r"score column 'conf'.*found columns"):
        dedup_3d(df, VS, 600.0, score_col="conf")
    with pytest.raises(AnnotationError, match="centre columns x, y"):
        dedup_3d(df.drop(columns="x"), VS, 600.0)
    with pytest.raises(AnnotationError, match="plane column 'z'"):
        dedup_3d(df.drop(columns="z"), VS, 600.0)
    with pytest.raises(MicrosegError, match="mode"):
        dedup_3d(df, VS, 600.0, mode="wbf")  # type: ignore[arg-type]
    with pytest.raises(AnnotationError, match="finite"):
        dedup_3d(dets([(0, 0, 0, float("nan"))]), VS, 600.0)
