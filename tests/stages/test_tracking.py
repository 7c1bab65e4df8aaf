"""The tracking benchmark compares segmenters: each trains (``train_tracking_seg@<name>``),
segments the test sequences, is linked (``track@<name>``), and ``evaluate_tracking`` writes a
row per segmenter on the same sequences."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from tests.tiny_segmenters import tiny_train

from microseg.config import Params, load_params
from microseg.data.ingest import ingest
from microseg.data.synthesize import write_tracking
from microseg.errors import ConfigError, DataFormatError, MissingFileError
from microseg.infer.watershed import probs_to_instances
from microseg.io import ctc, tiff
from microseg.models import get_model
from microseg.stages import tracking
from microseg.stages.training import trainers

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = {
    "unet": {"family": "unet", "train": tiny_train("unet", device="cpu")},
    "lstmunet": {
        "family": "lstmunet",
        "train": tiny_train("lstmunet", val_max_frames=3, device="cpu"),
    },
    "maunet": {  # 4-channel probabilities (distance head): seeds from the distance's peaks
        "family": "maunet",
        "train": tiny_train("maunet", device="cpu"),
        "infer": {"post": {"peak_h": 0.3, "seed_sigma": 0.0}},
    },
}


def tiny_params(root: Path, **overrides) -> Params:
    return load_params(
        REPO / "params.yaml",
        {
            "mlflow.tracking_uri": f"sqlite:///{root / 'mlflow.db'}",
            "paths.prepared": str(root / "prepared"),
            "paths.metrics": str(root / "metrics"),
            "synth.tracking.n_frames": 5,
            "synth.tracking.shape": [48, 48],
            "tracking.segmenters": TINY,
            **overrides,
        },
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Three synthetic sequences (train 01, val 02, test 03), ingested, as the cwd."""
    root = tmp_path_factory.mktemp("tracking_stage")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        params = tiny_params(root)
        write_tracking(params.synth.tracking, Path(params.datasets["tracking"].source))
        ingest("tracking", params.datasets["tracking"], params.paths.prepared, params.seed)
        yield root


@pytest.fixture(scope="module")
def trained(workdir: Path) -> dict[str, dict]:
    params = tiny_params(workdir)
    return {name: tracking.train_tracking_seg(params, name) for name in TINY}


def test_segmenters_config_checks() -> None:
    p = load_params(REPO / "params.yaml")
    assert {"unet", "lstmunet"} <= set(p.tracking.segmenters)
    assert p.tracking.segmenters["lstmunet"].family == "lstmunet"
    # touching daughters: MAUNet's distance peaks split them where the U-Net draws one mask
    maunet = p.tracking.segmenters["maunet"]
    assert maunet.family == "maunet" and maunet.infer["post"]["peak_h"] > 0
    with pytest.raises(ConfigError, match=r"tracking\.seg became tracking\.segmenters"):
        load_params(REPO / "params.yaml", {"tracking.seg": {"train": {}}})
    with pytest.raises(ConfigError, match="segmenter name"):
        load_params(REPO / "params.yaml", {"tracking.segmenters": {"a/b": {"family": "unet"}}})
    with pytest.raises(ConfigError, match="empty"):
        load_params(REPO / "params.yaml", {"tracking.segmenters": {}})
    moved = p.with_device("cpu").tracking.segmenters
    assert all(s.train["device"] == s.infer["device"] == "cpu" for s in moved.values())


def test_every_segmenter_is_a_trainer(tmp_path: Path) -> None:
    t = trainers(tiny_params(tmp_path))
    for name in TINY:
        tr = t[f"tracking_seg@{name}"]
        assert tr.out_dir == tracking.SEG_MODEL_DIR / name and tr.stage == "train_tracking_seg"
    assert "tracking_seg" not in t
    with pytest.raises(ConfigError, match="unknown tracking segmenter 'nope'"):
        tracking.segmenter_names(tiny_params(tmp_path), "nope")


def test_train_segments_the_test_sequences(workdir: Path, trained: dict[str, dict]) -> None:
    params = tiny_params(workdir)
    for name, out in trained.items():
        assert out["n_frames_train"] == out["n_frames_val"] == 5
        assert (workdir / "models/tracking_seg" / name / "best.pt").is_file()
        info = json.loads((workdir / "models/tracking_seg" / name / "train_info.json").read_text())
        assert info["family"] == TINY[name]["family"] and info["n_params"] > 0
        masks = tiff.read_stack(workdir / "reports/tracking_seg" / name / "03.tif")
        assert masks.shape == (5, 48, 48) and masks.dtype == np.uint16
        assert out["segmented"] == {"03": int(sum(len(np.unique(m[m > 0])) for m in masks))}
    # lstmunet segments the sequence as a whole (state carried), not frame by frame
    sc = params.tracking.segmenters["lstmunet"]
    model = get_model("lstmunet").load(
        workdir / "models/tracking_seg/lstmunet/best.pt", infer=sc.infer
    )
    frames = ctc.read_ctc_gt(workdir / "data/synthetic/tracking", "03").frames
    np.testing.assert_array_equal(
        tiff.read_stack(workdir / "reports/tracking_seg/lstmunet/03.tif"),
        model.predict_sequence(frames)[0],
    )
    # maunet's infer.post updates the distance seeding saved with its weights, not the
    # 3-class defaults: its masks are the distance-peak watershed of its 4-channel output
    sc = params.tracking.segmenters["maunet"]
    model = get_model("maunet").load(
        workdir / "models/tracking_seg/maunet/best.pt", train=sc.train, infer=sc.infer
    )
    assert model.post.seeds == "distance" and model.post.peak_h == 0.3
    probs = model.probabilities(frames[0])
    assert probs.shape == (4, 48, 48)
    np.testing.assert_array_equal(
        tiff.read_stack(workdir / "reports/tracking_seg/maunet/03.tif")[0],
        probs_to_instances(probs, model.post),
    )


def test_every_segmenter_gets_a_row(workdir: Path, trained: dict[str, dict]) -> None:
    params = tiny_params(workdir)
    for name in TINY:
        summary = tracking.track(params, name)
        assert set(summary) == {"03"}
        assert (workdir / "reports/tracking" / name / "03_RES" / "res_track.txt").is_file()
    out = tracking.evaluate_tracking(params)
    saved = json.loads((workdir / "metrics" / "tracking.json").read_text())
    assert saved["masks"] == out["masks"] == "model"
    for name in TINY:
        assert {"SEG", "DET", "TRA", "HOTA", "mean_fg_iou"} <= set(saved[name]["03"])
        assert 0.0 <= saved[name]["03"]["TRA"] <= 1.0


def test_gt_masks_check_the_linker_alone(workdir: Path, trained: dict[str, dict]) -> None:
    params = tiny_params(workdir, **{"tracking.masks": "gt"})
    res = workdir / "gt_res"
    tracking.track(params, "unet", out_dir=res / "unet")
    with pytest.raises(MissingFileError, match="track@lstmunet"):
        tracking.evaluate_tracking(params, res_root=res)
    for name in ("lstmunet", "maunet"):
        tracking.track(params, name, out_dir=res / name)
    out = tracking.evaluate_tracking(params, res_root=res)
    assert out["masks"] == "gt"
    assert out["unet"]["03"]["DET"] == out["lstmunet"]["03"]["DET"] == pytest.approx(1.0)
    assert out["unet"]["03"]["SEG"] == pytest.approx(1.0)


def test_a_frame_without_background_is_a_clear_error(tmp_path: Path, workdir: Path) -> None:
    params = tiny_params(workdir, **{"tracking.segmenters": {"full": {"family": "unet"}}})
    masks = np.ones((5, 48, 48), np.uint16)
    tracks = pd.DataFrame({"L": [1], "B": [0], "E": [4], "P": [0]})
    ctc.write_ctc_result(tmp_path / "full", "03", masks, tracks)
    with pytest.raises(DataFormatError, match="no background pixel"):
        tracking.evaluate_tracking(params, res_root=tmp_path)


def test_track_needs_the_segmentation(tmp_path: Path, workdir: Path) -> None:
    params = tiny_params(workdir, **{"tracking.segmenters": {"other": {"family": "unet"}}})
    with pytest.raises(MissingFileError, match="train_tracking_seg@other"):
        tracking.track(params, "other", out_dir=tmp_path / "o")
