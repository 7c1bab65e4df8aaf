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
