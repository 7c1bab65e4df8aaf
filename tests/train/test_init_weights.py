"""Fine-tuning (``init_from``): tensors matched by name and shape, wrappers ignored, another
architecture refused, and every Lightning family's training starts from the file."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from microseg.errors import ConfigError, DataFormatError, MissingFileError
from microseg.train import init_weights
from microseg.train.init_weights import load_init_weights, match_tensors


class Net(nn.Module):
    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3))
        self.head = nn.Conv2d(4, classes, 1)


class Wrapped(nn.Module):  # a LightningModule holds its network as an attribute
    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.net = Net(classes)


def test_wrapped_and_plain_names_meet(tmp_path: Path) -> None:
    src = Net()
    torch.save({"format": "x/1", "model": src.state_dict()}, tmp_path / "best.pt")
    dst = Wrapped()
    report = load_init_weights(dst, tmp_path / "best.pt")
    assert report.fraction == 1.0 and not report.missing
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[f"net.{k}"], v)


def test_other_head_is_left_as_initialised(tmp_path: Path) -> None:
    torch.save(Wrapped(classes=3).state_dict(), tmp_path / "w.pt")
    dst = Wrapped(classes=5)
    head_before = dst.net.head.weight.clone()
    report = load_init_weights(dst, tmp_path / "w.pt")
    assert report.shape_mismatch == ["net.head.weight", "net.head.bias"]
    assert torch.equal(dst.net.head.weight, head_before)
    src = torch.load(tmp_path / "w.pt", weights_only=True)
    assert torch.equal(dst.net.body[0].weight, src["net.body.0.weight"])


def test_another_architecture_is_refused(tmp_path: Path) -> None:
    other = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    torch.save({"state_dict": other.state_dict()}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="another architecture"):
        load_init_weights(Wrapped(), tmp_path / "other.pt")


def test_unsafe_missing_and_empty_files(tmp_path: Path) -> None:
    with pytest.raises(MissingFileError, match="not found"):
        load_init_weights(Wrapped(), tmp_path / "none.pt")

    class Payload:
        def __reduce__(self):
            return (print, ("code ran",))

    torch.save({"model": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(DataFormatError, match="safely"):
        load_init_weights(Wrapped(), tmp_path / "evil.pt")
    torch.save({"epoch": 3}, tmp_path / "meta.pt")
    with pytest.raises(DataFormatError, match="no state dict"):
        load_init_weights(Wrapped(), tmp_path / "meta.pt")


def test_match_counts() -> None:
    a, b = Wrapped().state_dict(), Net(classes=2).state_dict()
    matched, mismatch, missing = match_tensors(b, a)
    assert len(matched) == 4 and len(mismatch) == 2 and not missing


def test_unet_family_fine_tunes_from_its_own_best(tmp_path, monkeypatch) -> None:
    """The engine loads ``init_from`` into the freshly built family module before fitting."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "models" / "unet"))
    import test_train as unet_tests  # the U-Net tests' toy data and tiny config

    targets = unet_tests.toy_targets.__wrapped__(_Factory(tmp_path))
    first = unet_tests.train_unet(targets, tmp_path / "a", unet_tests.tiny_cfg(epochs=1))
    calls = []
    real = init_weights.load_init_weights

    def spy(module, path):
        report = real(module, path)
        calls.append(report)
        return report

    monkeypatch.setattr(init_weights, "load_init_weights", spy)
    cfg = unet_tests.tiny_cfg(epochs=1, init_from=str(first.best_path))
    unet_tests.train_unet(targets, tmp_path / "b", cfg)
    assert len(calls) == 1 and calls[0].fraction == 1.0
    other = unet_tests.tiny_cfg(
        epochs=1, init_from=str(first.best_path),
        model={**unet_tests.TINY_MODEL, "features": [8, 16, 32]},
    )  # fmt: skip
    with pytest.raises(ConfigError, match="another architecture"):
        unet_tests.train_unet(targets, tmp_path / "c", other)


class _Factory:
    """The bit of ``TempPathFactory`` the toy-data fixture uses."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def mktemp(self, name: str) -> Path:
        path = self.root / name
        path.mkdir()
        return path
