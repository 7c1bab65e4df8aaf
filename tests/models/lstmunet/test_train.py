"""LSTM-UNet training on a tiny synthetic time-lapse: sequences from the targets cache,
windows with one augmentation for all their frames, a few steps through the engine."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from microseg.data.targets import load_targets
from microseg.errors import ConfigError
from microseg.models import get_model
from microseg.models.lstmunet.train import (
    LstmUnetTrainConfig,
    SequenceSample,
    group_sequences,
    train_lstmunet,
    window_items,
)
from microseg.models.unet.train import PatchSampler

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_cfg(**kw) -> LstmUnetTrainConfig:
    values = {
        "model": {"features": [8, 16]},
        "window": 3,
        "patch_size": 32,
        "batch_size": 2,
        "epochs": 2,
        "steps_per_epoch": 2,
        "warmup_steps": 0,
        "val_max_frames": 4,
        "device": "cpu",
        "progress": False,
        "seed": 5,
        **kw,
    }
    return LstmUnetTrainConfig.from_mapping(values)


def test_frames_are_grouped_into_ordered_sequences(tiny_targets: Path, tiny_sequences) -> None:
    samples = load_targets(tiny_targets)
    seqs = {s.sequence_id: s for s in group_sequences(samples, channels=1)}
    assert set(seqs) == {"seq01", "seq02"}
    s = seqs["seq01"]
    assert s.images.shape == (6, 1, 32, 32) and s.targets.shape == s.labels.shape == (6, 32, 32)
    np.testing.assert_array_equal(s.labels, tiny_sequences["01"].labels)  # in frame order
    assert group_sequences(samples, channels=3)[0].images.shape[1] == 3
    # an id without _t<frame> is a sequence of its own
    lone = [samples[0].__class__(**{**samples[0].__dict__, "sample_id": "plain"})]
    assert [len(q) for q in group_sequences(lone, 1)] == [1]


def test_windows_and_their_errors(tiny_targets: Path) -> None:
    seqs = group_sequences(load_targets(tiny_targets, "train"), 1)
    items = window_items(seqs, tiny_cfg(window=4, patch_size=48))
    assert len(items) == 3  # 6 frames, windows of 4
    assert items[0]["image"].shape == (4, 48, 48) and items[0]["target"].shape == (4, 48, 48)
    assert items[0]["weight"].shape == (4, 48, 48)
    with pytest.raises(ConfigError, match="no train sequence has 7 frames"):
        window_items(seqs, tiny_cfg(window=7))


def test_one_augmentation_for_every_frame_of_a_window(tiny_targets: Path) -> None:
    """A window of one frame repeated stays identical across frames after the pipeline
    (crop, flips, rotation, elastic, intensity): every frame got the same transform."""
    s = group_sequences(load_targets(tiny_targets, "train"), 1)[0]
    rep = SequenceSample(
        "rep", *(np.repeat(a[:1], 3, axis=0) for a in (s.images, s.targets, s.weights, s.labels))
    )
    cfg = tiny_cfg(patch_size=16, elastic_prob=1.0, intensity_prob=1.0, noise_prob=0.0)
    sampler = PatchSampler(window_items([rep], cfg), cfg)
    sampler.reseed(3)
    batch = sampler.batch(np.random.default_rng(0))
    assert batch["image"].shape == (2, 3, 16, 16) and batch["target"].shape == (2, 3, 16, 16)
    for key in ("image", "target", "weight"):
        for t in (1, 2):
            np.testing.assert_allclose(batch[key][:, t], batch[key][:, 0])
    # ... and the patch is not the untouched top-left corner of the frame
    assert not np.allclose(batch["image"][0, 0].numpy(), rep.images[0, 0, :16, :16])


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"window": 0}, "window"),
        ({"patch_size": 31}, "multiple of 2"),
        ({"loss": "nope"}, "nope"),
        ({"val_max_images": 3}, "unknown"),
    ],
)
def test_config_checks(values: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        tiny_cfg(**values)


def test_train_save_load_predict(tmp_path: Path, tiny_targets: Path, tiny_sequences) -> None:
    out = tmp_path / "run"
    result = train_lstmunet(tiny_targets, out, tiny_cfg())
    assert result.epochs_completed == 2 and result.global_step == 4
    assert {"val_f1_50", "val_dice"} <= set(result.history[-1])
    assert (out / "best.pt").is_file() and (out / "last.ckpt").is_file()
    state = json.loads((out / "train_state.json").read_text())
    assert state["model_config"]["features"] == [8, 16]
    # a finished run is returned as it is
    again = train_lstmunet(tiny_targets, out, tiny_cfg())
    assert again.epochs_completed == 2 and again.resumed_from_epoch is None
    # the family's façade trains from a params section and loads what it wrote
    family = get_model("lstmunet")
    family.check_train_keys(["window", "model.features", "lr"])
    with pytest.raises(ConfigError, match="unknown"):
        family.check_train_keys(["model.arch"])
    model = family.load(out / "best.pt", infer={"device": "cpu"})
    frames = tiny_sequences["02"].frames
    labels, probs = model.predict_sequence(frames)
    assert labels.shape == frames.shape and labels.dtype == np.uint16
    assert np.isfinite(probs).all()


#: a params-style train section, as the stages hand it to the family
FACADE_SECTION = {
    "model": {"features": [8, 16]},
    "window": 2,
    "patch_size": 32,
    "batch_size": 1,
    "epochs": 1,
    "steps_per_epoch": 1,
    "device": "cpu",
}


def test_facade_train_section(tmp_path: Path, tiny_targets: Path) -> None:
    result = get_model("lstmunet").train(tiny_targets, tmp_path / "f", FACADE_SECTION)
    assert result.epochs_completed == 1 and (tmp_path / "f" / "best.pt").is_file()


def test_same_seed_same_weights(tiny_targets: Path, train_twice, same_weights) -> None:
    """Two runs on the same sequences and config end with the same tensors (issue 16)."""
    section = {**FACADE_SECTION, "batch_size": 2, "epochs": 2, "steps_per_epoch": 2}
    a, b = train_twice("lstmunet", tiny_targets, section)
    assert same_weights(a.best_path, b.best_path) > 10
