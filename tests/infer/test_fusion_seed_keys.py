"""``results.json`` also carries DeepD3.V2's key names (``yolo_prob_fusion.py``), same values."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from microseg.infer.fusion import (
    SEED_PARAM_NAMES,
    SEED_RESULT_ALIASES,
    FusionParams,
    evaluate_fusion,
    fuse_with_probabilities,
    write_fusion_outputs,
)

VS = (500.0, 94.0, 94.0)


def _result(params: FusionParams):
    det = pd.DataFrame(
        {
            "z": [0, 1, 2, 3],
            "x1": [10.0, 10.0, 40.0, 60.0],
            "y1": [10.0, 10.0, 40.0, 5.0],
            "x2": [16.0, 16.0, 46.0, 66.0],
            "y2": [16.0, 16.0, 46.0, 11.0],
            "score": [0.9, 0.3, 0.2, 0.01],
        }
    )
    return fuse_with_probabilities(det, np.array([0.0, 0.8, 0.1, 0.9]), params, VS)


def test_seed_aliases_equal_our_values(tmp_path):
    params = FusionParams(high_conf=0.6, low_conf=0.05, punet_thr=0.4, dedup_radius_nm=1200.0)
    res = _result(params)
    gt = pd.DataFrame({"x": [12.5, 42.5], "y": [12.5, 42.5], "z": [0.0, 2.0]})
    metrics = evaluate_fusion(res, gt, VS)
    out = json.loads(write_fusion_outputs(tmp_path, res, metrics)["results"].read_text())
    # the seed's results.json keys: precision, recall, f1_score, detections, statistics, parameters
    for key in ("precision", "recall", "f1_score", "detections", "statistics", "parameters"):
        assert key in out, key
    assert set(SEED_RESULT_ALIASES) == {"f1_score", "parameters"}
    assert out["f1_score"] == out["f1"] == pytest.approx(metrics["f1"])
    assert 0 < out["f1"] < 1  # a real score: the one fused spine finds 1 of the 2 points
    # ours unchanged; the seed's option names carry our values
    assert out["params"] == params.to_dict()
    assert {k: out["parameters"][k] for k in out["params"]} == out["params"]
    assert out["parameters"]["yolo_high_conf"] == 0.6
    assert out["parameters"]["yolo_low_conf"] == 0.05
    assert out["parameters"]["punet_validation"] == 0.4
    assert out["parameters"]["dedup_nm"] == 1200.0
    assert (out["parameters"]["weight_yolo"], out["parameters"]["weight_punet"]) == (0.45, 0.55)
    assert set(out["parameters"]) == set(out["params"]) | set(SEED_PARAM_NAMES)
    # the seed's statistics keys are ours already
    assert set(out["statistics"]) >= {
        "yolo_total",
        "kept_high_conf",
        "kept_validated",
        "rejected_low_yolo",
        "rejected_no_punet",
    }


def test_without_metrics_the_alias_is_null_too(tmp_path):
    res = _result(FusionParams())
    out = json.loads(write_fusion_outputs(tmp_path, res)["results"].read_text())
    assert out["f1"] is None and out["f1_score"] is None
