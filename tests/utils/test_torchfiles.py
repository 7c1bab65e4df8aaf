"""read_torch: tensors load; junk and pickled code are refused in one line naming the file."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from microseg.errors import DataFormatError
from microseg.utils.torchfiles import read_torch


class Payload:
    def __reduce__(self):
        return (print, ("ran",))


def test_tensors_load_junk_and_code_are_refused_in_one_line(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(2)}, tmp_path / "ok.pt")
    assert torch.equal(read_torch(tmp_path / "ok.pt")["w"], torch.ones(2))
    (tmp_path / "junk.pt").write_bytes(b"not torch")
    with pytest.raises(DataFormatError, match="not a readable torch file") as junk:
        read_torch(tmp_path / "junk.pt")
    torch.save({"x": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(DataFormatError, match="refusing to load") as evil:
        read_torch(tmp_path / "evil.pt")
    for err in (junk, evil):
        assert "\n" not in str(err.value) and str(tmp_path) in str(err.value)
    (tmp_path / "raw.pkl").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(DataFormatError):
        read_torch(tmp_path / "raw.pkl")
