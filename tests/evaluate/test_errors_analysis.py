"""Error categories on a hand-drawn scene, hardest images across models, per-modality tables."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from microseg.errors import MicrosegError
from microseg.evaluate.errors_analysis import (
    classify_errors,
    error_table,
    errors_by_threshold,
    hardest_images,
    per_modality,
)
from microseg.evaluate.instances import image_scores, instance_overlap


def scene() -> tuple[np.ndarray, np.ndarray]:
    """GT 1 found; GT 2 + 3 merged by pred 20; GT 4 split into 30 + 31; GT 5 missed;
    pred 40 a false positive on background."""
    gt = np.zeros((40, 60), np.uint16)
    pred = np.zeros_like(gt)
    gt[2:10, 2:10] = 1
    pred[2:10, 2:10] = 10
    gt[15:23, 2:10], gt[15:23, 11:19] = 2, 3
    pred[15:23, 2:19] = 20
    gt[2:10, 25:42] = 4  # each half has IoU 64/136 < 0.5
    pred[2:10, 25:33], pred[2:10, 33:41] = 30, 31
    gt[30:38, 30:38] = 5
    pred[30:36, 50:58] = 40
    return gt, pred


def test_categories_on_a_hand_drawn_scene():
    gt, pred = scene()
    r = classify_errors(gt, pred)
    assert r.false_positive_ids.tolist() == [20, 30, 31, 40]
    assert r.miss_ids.tolist() == [2, 3, 4, 5]
    assert r.merge_pred_ids.tolist() == [20] and r.merged_gt_ids.tolist() == [2, 3]
    assert r.split_gt_ids.tolist() == [4] and r.split_pred_ids.tolist() == [30, 31]
    c = r.counts()
    assert c == {
        "n_gt": 5, "n_pred": 5, "tp": 1, "false_positives": 4, "misses": 4, "merges": 1,
        "merged_gt": 2, "splits": 1, "split_pred": 2, "misses_in_merge": 2, "fp_in_split": 2,
    }  # fmt: skip
    # the same from a precomputed overlap, and consistent with the matching counts
    assert classify_errors(instance_overlap(gt, pred)).counts() == c
    row = image_scores(gt, pred, [0.5], with_rand=False)
    assert (row["tp_50"], row["fp_50"], row["fn_50"]) == (c["tp"], 4, 4)


def test_cover_fraction_decides_merges():
    gt, pred = scene()
    pred[15:23, 11:19] = 0  # pred 20 now covers GT 3 not at all
    pred[15:23, 11:13] = 20  # ... and only a quarter of it
    assert classify_errors(gt, pred).merge_pred_ids.size == 0
    assert classify_errors(gt, pred, cover=0.2).merge_pred_ids.tolist() == [20]


def test_error_table_and_threshold_sweep():
    gt, pred = scene()
    t = error_table([("a", gt, pred), ("b", gt, gt)])
    assert t["image_id"].tolist() == ["a", "b"]
    assert t.loc[1, "false_positives"] == 0 and t.loc[1, "tp"] == 5
    sweep = errors_by_threshold(gt, pred, [0.5, 0.9])
    assert sweep["threshold_key"].tolist() == ["50", "90"]
    assert (sweep["tp"] + sweep["misses"] == sweep["n_gt"]).all()
    assert (sweep["tp"] + sweep["false_positives"] == sweep["n_pred"]).all()


def per_image_two_models() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "model": ["unet"] * 4 + ["yolo"] * 4,
            "image_id": ["a", "b", "c", "d"] * 2,
            "f1_50": [0.9, 0.2, 0.5, 0.6, 0.8, 0.4, 0.3, 0.6],
            "tp_50": [9, 1, 5, 6, 8, 2, 3, 6],
            "fp_50": [1, 4, 5, 4, 2, 3, 7, 4],
            "fn_50": [1, 4, 5, 4, 2, 3, 7, 4],
        }
    )


def test_hardest_images_across_models():
    h = hardest_images(per_image_two_models(), "f1_50", k=3)
    assert h["image_id"].tolist() == ["b", "c", "d"]  # means 0.3, 0.4, 0.6
    assert h["mean"].tolist() == pytest.approx([0.3, 0.4, 0.6])
    assert list(h.columns[:3]) == ["image_id", "unet", "yolo"]
    assert h.loc[0, "min"] == 0.2 and h.loc[0, "n_models"] == 2
    # ties by id, and "higher is worse" metrics the other way round
    df = per_image_two_models().assign(are=[0.1, 0.5, 0.5, 0.0] * 2)
    h = hardest_images(df, "are", k=2, higher_is_better=False)
    assert h["image_id"].tolist() == ["b", "c"]
    with pytest.raises(MicrosegError, match="columns"):
        hardest_images(df, "nope")


def test_per_modality_from_manifest():
    manifest = pd.DataFrame(
        {"sample_id": ["a", "b", "c"], "modality": ["tissue", "fluorescence", "tissue"]}
    )
    t = per_modality(per_image_two_models(), manifest, thresholds=[0.5])
    assert t[["modality", "model"]].values.tolist() == [
        ["fluorescence", "unet"], ["fluorescence", "yolo"], ["tissue", "unet"],
        ["tissue", "yolo"], ["unknown", "unet"], ["unknown", "yolo"],
    ]  # fmt: skip
    row = t[(t.model == "unet") & (t.modality == "tissue")].iloc[0]
    assert row["n_images"] == 2
    assert row["f1_50"] == pytest.approx(2 * 14 / (2 * 14 + 6 + 6))  # micro over a and c
    assert row["macro_f1_50"] == pytest.approx(0.7)
    with pytest.raises(MicrosegError, match="manifest"):
        per_modality(per_image_two_models())
    # a modality column in the table wins over the manifest
    own = per_image_two_models().assign(modality="brightfield")
    assert set(per_modality(own, thresholds=[0.5])["modality"]) == {"brightfield"}
