"""Sequence prediction: the state carried frame by frame, whole frames of any size, the
façade's protocol (load, predict_sequence, single-image predictor, save)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from microseg.errors import DataFormatError, MissingFileError
from microseg.infer.watershed import PostprocessConfig
from microseg.models import get_model
from microseg.models.lstmunet import (
    LstmUnet,
    LstmUnetConfig,
    LstmUnetSegmenter,
    SequenceInferConfig,
    predict_sequence,
    predict_sequence_probs,
    save_lstmunet,
)
from microseg.models.unet.predict import prepare_input

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = SequenceInferConfig(device="cpu")


@pytest.fixture()
def net() -> LstmUnet:
    torch.manual_seed(0)
    return LstmUnet(LstmUnetConfig(features=(8, 16, 32), norm="instance")).eval()


def test_probs_carry_the_state_and_match_the_network(net: LstmUnet, tiny_sequences) -> None:
    frames = tiny_sequences["01"].frames[:3]
    probs = predict_sequence_probs(net, frames, CPU)
    assert probs.shape == (3, 3, 32, 32) and probs.dtype == np.float32
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    x = torch.from_numpy(np.stack([prepare_input(f, 1) for f in frames]))[None]
    with torch.no_grad():
        whole = torch.softmax(net(x)[0][0], dim=1).numpy()
    np.testing.assert_allclose(probs, whole, atol=1e-5)
    # the last frame alone (fresh state) differs from the last frame after the others
    alone = predict_sequence_probs(net, frames[2:], CPU)[0]
    assert np.abs(alone - probs[2]).max() > 1e-4


def test_frames_of_any_size_are_padded_and_cropped(net: LstmUnet) -> None:
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 4000, (2, 30, 21)).astype(np.uint16)
    labels, probs = predict_sequence(net, frames, CPU)
    assert labels.shape == (2, 30, 21) and labels.dtype == np.uint16
    assert probs.shape == (2, 3, 30, 21)
    with pytest.raises(DataFormatError, match="empty"):
        predict_sequence_probs(net, [], CPU)


def test_facade_loads_predicts_and_saves(tmp_path: Path, net: LstmUnet, tiny_sequences) -> None:
    path = save_lstmunet(net, tmp_path / "best.pt", PostprocessConfig(min_size=3))
    model = get_model("lstmunet").load(path, train={"epochs": 1}, infer={"device": "cpu"})
    assert isinstance(model, LstmUnetSegmenter) and model.post.min_size == 3
    frames = tiny_sequences["01"].frames
    labels, probs = model.predict_sequence(frames)
    assert labels.shape == frames.shape and probs.shape == (len(frames), 3, 32, 32)
    # one image = a sequence of one frame
    one, fg, scores = model.as_predictor()(frames[3])
    ref_labels, ref_probs = predict_sequence(net, frames[3:4], model.infer)
    np.testing.assert_array_equal(one, ref_labels[0])
    np.testing.assert_allclose(fg, 1.0 - ref_probs[0, 0], atol=1e-6)
    assert set(scores) == set(np.unique(one[one > 0]).tolist())
    np.testing.assert_allclose(model.probabilities(frames[3]), ref_probs[0], atol=1e-6)
    # post from the caller wins over the saved one; save round-trips
    other = get_model("lstmunet").load(path, infer={"device": "cpu"}, post={"min_size": 7})
    assert other.post.min_size == 7
    again = get_model("lstmunet").load(model.save(tmp_path / "again.pt"), infer={"device": "cpu"})
    np.testing.assert_allclose(again.predict_sequence(frames)[1], probs, atol=1e-6)
    with pytest.raises(MissingFileError):
        get_model("lstmunet").load(tmp_path / "missing.pt")
