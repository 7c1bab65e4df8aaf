"""CTC scores through py-ctcmetrics, and per-frame IoU / Rand error scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile

from microseg.data.synth_tracking import TrackingSynthConfig, generate_tracking_sequence
from microseg.errors import AnnotationError, DataFormatError, MissingFileError, ShapeMismatchError
from microseg.evaluate.tracking import (
    PER_FRAME_COLUMNS,
    evaluate_ctc,
    frame_scores,
    per_frame_scores,
    validate_ctc,
)
from microseg.io.ctc import write_ctc_gt, write_ctc_result


@pytest.fixture(scope="module")
def seq():
    return generate_tracking_sequence(TrackingSynthConfig(n_frames=16), seed=1)


@pytest.fixture()
def gt_root(tmp_path: Path, seq) -> Path:
    seg = {t: seq.labels[t] for t in (0, 5, 10, 15)}
    write_ctc_gt(tmp_path, "01", seq.frames, seq.labels, seq.tracks, seg=seg)
    return tmp_path


def test_ground_truth_as_result_is_perfect(gt_root: Path, seq) -> None:
    write_ctc_result(gt_root, "01", seq.labels, seq.tracks)
    scores = evaluate_ctc(gt_root, "01", gt_root)
    for key in ("SEG", "DET", "TRA", "LNK", "CHOTA", "HOTA", "IDF1", "MOTA", "CT", "TF", "BC(0)"):
        assert scores[key] == pytest.approx(1.0), key
    assert "CCA" not in scores  # undefined: no track here both starts and ends with a division
    assert scores["Valid"] == 1 and scores["AOGM"] == 0
    assert all(isinstance(v, int | float) for v in scores.values())  # JSON-ready


def test_broken_link_costs_tra_but_not_det(gt_root: Path, seq) -> None:
    labels, tracks = seq.labels.copy(), seq.tracks.copy()
    row = tracks[(tracks.E - tracks.B >= 6) & (tracks.P == 0)].iloc[0]
    cut, new = int(row.B) + 3, int(tracks.L.max()) + 1
    labels[cut:][labels[cut:] == row.L] = new  # the track continues under a new id, no parent
    tracks.loc[tracks.L == row.L, "E"] = cut - 1
    tracks.loc[tracks.P == row.L, "P"] = new
    tracks = pd.concat([tracks, pd.DataFrame([[new, cut, int(row.E), 0]], columns=tracks.columns)])
    write_ctc_result(gt_root, "01", labels, tracks)
    scores = evaluate_ctc(gt_root, "01", gt_root, metrics=["DET", "TRA", "LNK"])
    assert scores["DET"] == 1.0
    assert scores["AOGM_EA"] == 1 and 0.99 < scores["TRA"] < 1.0 and scores["LNK"] < 1.0
    assert "SEG" not in scores and "CHOTA" not in scores


def test_missing_object_costs_det(gt_root: Path, seq) -> None:
    labels = seq.labels.copy()
    lab = int(seq.tracks.L.iloc[0])
    labels[0][labels[0] == lab] = 0
    tracks = seq.tracks.copy()
    tracks.loc[tracks["L"].eq(lab), "B"] = 1
    write_ctc_result(gt_root, "01", labels, tracks)
    scores = evaluate_ctc(gt_root, "01", gt_root)
    assert scores["DET"] < 1.0 and scores["AOGM_FN"] == 1 and scores["SEG"] < 1.0


def test_without_seg_ground_truth_seg_is_left_out(tmp_path: Path, seq) -> None:
    write_ctc_gt(tmp_path, "02", seq.frames, seq.labels, seq.tracks)
    write_ctc_result(tmp_path, "02", seq.labels, seq.tracks)
    scores = evaluate_ctc(tmp_path, "02", tmp_path)
    assert "SEG" not in scores and scores["TRA"] == 1.0


def test_invalid_result_is_refused_with_the_checkers_reason(gt_root: Path, seq) -> None:
    res = gt_root / "01_RES"
    res.mkdir()
    for t, frame in enumerate(seq.labels):
        tifffile.imwrite(res / f"mask{t:03d}.tif", frame)
    lines = [f"{r.L} {r.B} {r.E} {r.P}" for r in seq.tracks.itertuples()]
    lines[0] = lines[0].split()[0] + " 0 0 0"  # claims one frame, the mask has it in more
    (res / "res_track.txt").write_text("\n".join(lines) + "\n")
    assert not validate_ctc(gt_root, "01")
    with pytest.raises(AnnotationError, match="not a valid CTC result"):
        evaluate_ctc(gt_root, "01", gt_root)


def test_missing_folders_and_unknown_metrics(gt_root: Path, tmp_path: Path, seq) -> None:
    with pytest.raises(MissingFileError):
        evaluate_ctc(gt_root, "01", tmp_path / "nowhere")
    with pytest.raises(MissingFileError):
        evaluate_ctc(tmp_path / "nowhere", "01", gt_root)
    write_ctc_result(gt_root, "01", seq.labels, seq.tracks)
    with pytest.raises(DataFormatError, match="unknown CTC metrics"):
        evaluate_ctc(gt_root, "01", gt_root, metrics=["TRA", "NOPE"])


# --------------------------------------------------------------------------- per frame


def test_identical_masks_score_perfectly_even_with_other_ids(seq) -> None:
    perm = np.random.default_rng(0).permutation(int(seq.labels.max()) + 1)
    perm = np.where(np.arange(len(perm)) == 0, 0, perm + 1000)
    df = per_frame_scores(seq.labels, perm[seq.labels])
    assert list(df.columns) == list(PER_FRAME_COLUMNS) and len(df) == len(seq.labels)
    assert (df.fg_iou == 1.0).all() and (df.mean_instance_iou == 1.0).all()
    assert (df.seg == 1.0).all() and (df.rand_error == 0.0).all()
    assert (df.n_matched == df.n_gt).all() and (df.n_gt == df.n_pred).all()


def test_shifted_masks_score_worse(seq) -> None:
    shifted = np.roll(seq.labels, 3, axis=2)
    df = per_frame_scores(seq.labels, shifted)
    assert (df.fg_iou < 1.0).all() and (df.mean_instance_iou < 1.0).all()
    assert (df.rand_error > 0.0).all()
    worse = per_frame_scores(seq.labels, np.roll(seq.labels, 8, axis=2))
    assert worse.fg_iou.mean() < df.fg_iou.mean()
    assert worse.rand_error.mean() > df.rand_error.mean()


def test_frame_scores_by_hand() -> None:
    gt = np.zeros((20, 20), np.uint16)
    gt[2:6, 2:6] = 1  # 16 px
    gt[10:14, 10:14] = 2
    pred = np.zeros_like(gt)
    pred[2:6, 3:7] = 5  # shifted by one column: IoU 12 / 20
    s = frame_scores(gt, pred)
    assert s["fg_iou"] == pytest.approx(12 / 36)
    assert s["mean_instance_iou"] == pytest.approx(0.6) and s["n_matched"] == 1
    assert s["seg"] == pytest.approx(0.3)  # the missed cell counts as 0
    assert (s["n_gt"], s["n_pred"]) == (2, 1)
    empty = frame_scores(np.zeros((4, 4), np.uint8), np.zeros((4, 4), np.uint8))
    assert empty["fg_iou"] == 1.0 and empty["rand_error"] == 0.0
    only_pred = frame_scores(np.zeros((4, 4), np.uint8), np.ones((4, 4), np.uint8))
    assert only_pred["fg_iou"] == 0.0 and np.isnan(only_pred["rand_error"])


def test_per_frame_scores_refuse_mismatched_stacks(seq) -> None:
    with pytest.raises(ShapeMismatchError):
        per_frame_scores(seq.labels, seq.labels[:-1])
    with pytest.raises(DataFormatError):
        per_frame_scores(seq.labels, seq.labels.astype(np.float32))


def test_cca_is_reported_exactly_when_the_gt_has_a_cell_cycle(tmp_path: Path, seq) -> None:
    # a hand-made lineage: 1 divides into 2, 3; 2 divides again into 4, 5 -> one full cycle (2)
    masks = np.zeros((8, 32, 32), np.uint16)
    boxes = {1: (0, 1, 4, 4), 2: (2, 3, 4, 4), 3: (2, 7, 14, 14), 4: (4, 7, 4, 20),
             5: (4, 7, 20, 4)}  # fmt: skip
    for lab, (b, e, y, x) in boxes.items():
        masks[b : e + 1, y : y + 6, x : x + 6] = lab
    tracks = pd.DataFrame(
        {"L": [1, 2, 3, 4, 5], "B": [0, 2, 2, 4, 4], "E": [1, 3, 7, 7, 7], "P": [0, 1, 1, 2, 2]}
    )
    write_ctc_gt(tmp_path, "01", masks, masks, tracks, seg={0: masks[0]})
    write_ctc_result(tmp_path, "01", masks, tracks)
    scores = evaluate_ctc(tmp_path, "01", tmp_path)
    assert scores["gt_cell_cycles"] == 1
    assert scores["CCA"] == pytest.approx(1.0)
    # no division that divides again: CCA undefined, and the count says why
    write_ctc_gt(tmp_path / "b", "01", seq.frames, seq.labels, seq.tracks)
    write_ctc_result(tmp_path / "b", "01", seq.labels, seq.tracks)
    scores = evaluate_ctc(tmp_path / "b", "01", tmp_path / "b")
    assert scores["gt_cell_cycles"] == 0 and "CCA" not in scores
