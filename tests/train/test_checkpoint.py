from pathlib import Path

import pytest

from microseg.errors import DataFormatError
from microseg.train.checkpoint import load_checkpoint, save_checkpoint


def test_round_trip_and_refusals(tmp_path: Path) -> None:
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"format": "a/1", "epoch": 3})
    assert load_checkpoint(path, "a/1")["epoch"] == 3
    with pytest.raises(DataFormatError, match="expected a b/1 checkpoint"):
        load_checkpoint(path, "b/1")
    with pytest.raises(DataFormatError, match="could not load it"):
        (tmp_path / "bad.pt").write_bytes(b"garbage")
        load_checkpoint(tmp_path / "bad.pt", "a/1")


def test_same_payload_same_bytes_whatever_the_file_name(tmp_path: Path) -> None:
    """torch names its zip folder after the file; the atomic writer's temporary name must not
    reach the bytes (DVC would hash a new output every run)."""
    import hashlib

    import torch

    payload = {"format": "toy/1", "w": torch.arange(6.0).reshape(2, 3), "meta": {"epoch": 3}}
    save_checkpoint(tmp_path / "a.pt", payload)
    save_checkpoint(tmp_path / "other_name.pt", payload)
    digests = {
        hashlib.md5((tmp_path / n).read_bytes()).hexdigest() for n in ("a.pt", "other_name.pt")
    }
    assert len(digests) == 1
    assert torch.equal(load_checkpoint(tmp_path / "a.pt", "toy/1")["w"], payload["w"])


def test_train_state_holds_no_times_and_timing_keeps_them(tmp_path: Path) -> None:
    """``train_state.json`` (hashed by DVC) has no wall clock; ``timing.json`` (dvcignored)
    has the total and per-epoch seconds, and reading the state puts them back."""
    import json

    from microseg.train.engine import STATE, TIMING, TrainState

    state = TrainState(
        epochs_completed=2,
        history=[
            {"epoch": 0.0, "val_f1_50": 0.5, "train_seconds": 3.5, "val_seconds": 1.0},
            {"epoch": 1.0, "val_f1_50": 0.6, "train_seconds": 3.0},
        ],
        seconds=8.25,
    )
    state.write(tmp_path / STATE)
    text = (tmp_path / STATE).read_text()
    assert "seconds" not in text and json.loads(text)["history"][1] == {
        "epoch": 1.0,
        "val_f1_50": 0.6,
    }
    timing = json.loads((tmp_path / TIMING).read_text())
    assert timing["seconds"] == 8.25 and timing["epochs"][0]["val_seconds"] == 1.0
    back = TrainState.read(tmp_path / STATE)
    assert back is not None and back.seconds == 8.25 and back.history == state.history
    (tmp_path / TIMING).unlink()  # times are a record: without them the state still reads
    assert TrainState.read(tmp_path / STATE).seconds == 0.0
    dvcignore = (Path(__file__).resolve().parents[2] / ".dvcignore").read_text().split("\n")
    assert TIMING in dvcignore
