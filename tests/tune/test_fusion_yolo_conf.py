"""The fusion study's ``yolo_conf``: searched, drops low-confidence boxes before fusion, and
applied the same way wherever ``params/tuned_fusion.yaml`` is read."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml

from microseg.errors import ConfigError
from microseg.infer.fusion import FusionParams, fuse_with_probabilities
from microseg.infer.spine_pipeline import drop_low_conf, read_fusion_params, with_yolo_conf
from microseg.tune.fusion import (
    YOLO_CONF,
    pooled_metrics,
    prepare,
    read_best_file,
    tune_fusion,
    write_best_params,
)

VS = (500.0, 94.0, 94.0)


def _stack(scores: list[float]) -> tuple[pd.DataFrame, np.ndarray, pd.DataFrame, tuple]:
    """One true spine per score, far apart, one box each in plane 2, bright in the Prob-UNet
    map: the fusion tree validates every box at or above ``low_conf``."""
    depth, size = 5, 64 * len(scores)
    prob = np.zeros((depth, 64, size), np.float32)
    rows, gt = [], []
    for k, s in enumerate(scores):
        cx, cy = 32.0 + 64 * k, 32.0
        prob[1:4, 28:37, int(cx) - 4 : int(cx) + 5] = 0.9
        rows.append((2, cx - 3.5, cy - 3.5, cx + 4.5, cy + 4.5, s))
        gt.append((cx, cy, 2.0))
    det = pd.DataFrame(rows, columns=["z", "x1", "y1", "x2", "y2", "score"])
    return det, prob, pd.DataFrame(gt, columns=["x", "y", "z"]), VS


SCORES = [0.9, 0.6, 0.2, 0.12, 0.06]
PARAMS = FusionParams(high_conf=0.5, low_conf=0.05, punet_thr=0.5)


def test_a_higher_yolo_conf_drops_the_low_confidence_boxes_before_fusion():
    prepared = prepare([_stack(SCORES)])
    seen = {}
    for conf in (0.0, 0.1, 0.15, 0.3):
        m = pooled_metrics(prepared, PARAMS, 1000.0, yolo_conf=conf)
        seen[conf] = (m["tp"], m["fn"], m["fp"])
    # every spine is validated without the cut; each cut loses exactly the boxes below it
    assert seen == {0.0: (5, 0, 0), 0.1: (4, 1, 0), 0.15: (3, 2, 0), 0.3: (2, 3, 0)}
    kept = drop_low_conf(prepared[0].detections, 0.15)
    assert kept["score"].tolist() == [0.9, 0.6, 0.2] and list(kept.index) == [0, 1, 2]


@pytest.mark.parametrize("conf", [0.0, 0.1, 0.3, 0.55, 0.95])
def test_folding_yolo_conf_into_the_cuts_keeps_the_same_boxes(conf):
    """Inference reads the tuned file with :func:`read_fusion_params`, which folds
    ``yolo_conf`` into ``low_conf``/``high_conf``: the kept boxes and their scores must equal
    dropping the boxes before fusion, as the study and ``fuse`` do."""
    rng = np.random.default_rng(3)
    det, _, _, vs = _stack(list(rng.uniform(0.02, 0.99, 12)))
    p_box = rng.uniform(0, 1, len(det))
    keep = det["score"].to_numpy() >= conf
    dropped = fuse_with_probabilities(drop_low_conf(det, conf), p_box[keep], PARAMS, vs)
    folded = fuse_with_probabilities(det, p_box, with_yolo_conf(PARAMS, conf), vs)
    cols = ["z", "x", "y", "score"]
    pd.testing.assert_frame_equal(
        dropped.dedup[cols].reset_index(drop=True), folded.dedup[cols].reset_index(drop=True)
    )


def test_yolo_conf_is_searched_and_written_with_the_tuned_params(tmp_path):
    items = [_stack(SCORES)]
    best, st = tune_fusion(items, 6, f"sqlite:///{tmp_path / 'o.db'}", "f", seed=0)
    for t in st.trials:
        dist = t.distributions["yolo_conf"]
        assert (dist.low, dist.high) == YOLO_CONF
        assert t.user_attrs["fusion_params"]["yolo_conf"] == t.params["yolo_conf"]
    assert best["yolo_conf"] == st.best_trial.params["yolo_conf"]
    path = write_best_params(tmp_path / "tuned_fusion.yaml", best)
    assert yaml.safe_load(path.read_text())["yolo_conf"] == pytest.approx(best["yolo_conf"])
    fp, conf = read_best_file(path)
    assert conf == pytest.approx(best["yolo_conf"])
    # the inference reader accepts the file and folds the cut in
    folded = read_fusion_params(path)
    assert folded.low_conf == pytest.approx(max(fp.low_conf, conf))


def test_a_bad_yolo_conf_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "tuned_fusion.yaml"
    path.write_text(yaml.safe_dump({**FusionParams().to_dict(), "yolo_conf": 1.5}))
    with pytest.raises(ConfigError, match="yolo_conf must be in") as err:
        read_fusion_params(path)
    assert "tuned_fusion.yaml" in str(err.value)
    with pytest.raises(ConfigError, match="yolo_conf"):
        write_best_params(tmp_path / "x.yaml", {**FusionParams().to_dict(), "yolo_conf": -1})
